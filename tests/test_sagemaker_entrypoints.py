"""The container entry points, run as SageMaker runs them, on temporary /opt/ml trees.

Training runs under the real ``sagemaker-training`` toolkit with the hyperparameters
of the planned request; processing stages run in-process against
``SAGEMAKER_BASE_DIR`` trees, once through the exact shell entry point of the
planned request. Two simulated hosts over a sharded input must give the same union
of outputs as one host.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pytest

from sagewatch.config import Settings
from sagewatch.detector import Detector
from sagewatch.errors import ConfigError
from sagewatch.pipeline import stage_features, stage_generate
from sagewatch.sagemaker import contract, entrypoints, jobs, plans
from sagewatch.sagemaker.bundle import build_source_bundle
from sagewatch.scoring import score_features
from sagewatch.stage_tables import read_features

TINY = {"n_samples": 200, "n_machines": 3, "epochs": 2, "hidden_dims": [16, 8]}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny() -> Settings:
    return Settings().with_overrides(TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny) -> dict[str, Path]:
    """Raw part files (one per machine) and their features, computed locally."""
    root = tmp_path_factory.mktemp("data")
    raw, _ = stage_generate(tiny, str(root / "raw"))
    stage_features(tiny, raw, str(root / "features"))
    return {"raw": Path(raw), "features": root / "features"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny, data) -> dict:
    """One training job run by the sagemaker-training toolkit, as in the container."""
    pytest.importorskip("sagemaker_training")
    base = tmp_path_factory.mktemp("training") / "ml"
    archive = base.parent / contract.SOURCE_ARCHIVE
    archive.write_bytes(build_source_bundle().data)
    hps = jobs.training_hyperparameters(tiny, "s3://bucket/code/sourcedir.tar.gz")
    hps["sagemaker_submit_directory"] = json.dumps(str(archive))
    config = base / "input" / "config"
    config.mkdir(parents=True)
    _write_json(config / "hyperparameters.json", hps)
    _write_json(
        config / "resourceconfig.json",
        {"current_host": "localhost", "hosts": ["localhost"]},
    )
    _write_json(
        config / "inputdataconfig.json",
        {
            "train": {
                "TrainingInputMode": "File",
                "S3DistributionType": "FullyReplicated",
            }
        },
    )
    shutil.copytree(data["features"], base / "input" / "data" / "train")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "AWS_"))}
    env |= {"SAGEMAKER_BASE_DIR": str(base), "PATH": f"{BIN}:{env.get('PATH', '')}"}
    done = subprocess.run(
        [str(BIN / "train")],
        cwd=base.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {
        "base": base,
        "returncode": done.returncode,
        "log": done.stdout + done.stderr,
    }


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _processing_tree(
    base: Path, host: str, hosts: list[str], inputs: dict[str, list[Path]]
) -> Path:
    """A temporary /opt/ml for one processing instance: its shard of each input."""
    _write_json(
        base / "config" / "resourceconfig.json", {"current_host": host, "hosts": hosts}
    )
    for name, files in inputs.items():
        folder = base / "processing" / "input" / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    return base


def _model_archive(model_dir: Path) -> bytes:
    """Pack a model folder as SageMaker does: files at the archive root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return buffer.getvalue()


def _run(monkeypatch, base: Path, *argv: str) -> int:
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    return entrypoints.main(list(argv))


def _outputs(base: Path, name: str, pattern: str = "*.parquet") -> list[Path]:
    return sorted((base / "processing" / "output" / name).glob(pattern))


def _union(files: list[Path]) -> pl.DataFrame:
    frame = pl.concat([pl.read_parquet(f) for f in files], how="vertical")
    return frame.sort(["machine_id", "timestamp"])


# ----------------------------------------------------------------------------- settings


def test_hyperparameter_strings_become_declared_types(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SM_HPS", raising=False)
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    _write_json(
        tmp_path / "input" / "config" / "hyperparameters.json",
        {
            "epochs": "3",
            "hidden_dims": "[64, 32]",
            "learning_rate": "1e-3",
            "sort_rows": "false",
            "sagemaker_program": '"sagewatch_train.py"',
            "sagemaker_submit_directory": '"s3://bucket/code/sourcedir.tar.gz"',
        },
    )
    hps = entrypoints.read_hyperparameters()
    assert "sagemaker_program" not in hps
    settings = entrypoints.resolve_settings(None, hps)
    assert settings.model.epochs == 3
    assert settings.model.hidden_dims == [64, 32]
    assert settings.model.learning_rate == pytest.approx(0.001)
    assert settings.quality.sort_rows is False

    # The toolkit also passes every hyperparameter as --key value (plain strings).
    pairs = entrypoints.parse_cli_pairs(
        ["--epochs", "4", "--hidden-dims", "[8, 4]", "--learning_rate", "1e-2"]
    )
    settings = entrypoints.resolve_settings(None, pairs)
    assert (settings.model.epochs, settings.model.hidden_dims) == (4, [8, 4])
    assert settings.model.learning_rate == pytest.approx(0.01)


def test_unknown_or_mistyped_hyperparameters_are_named() -> None:
    with pytest.raises(ConfigError, match="'epochz'"):
        entrypoints.resolve_settings(None, {"epochz": "3"})
    with pytest.raises(ConfigError, match=r"model\.epochs"):
        entrypoints.resolve_settings(None, {"epochs": "three"})


def test_training_failure_reason_reaches_the_failure_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_HPS", json.dumps({"epochz": 3}))
    assert _run(monkeypatch, tmp_path, "train") == 1
    reason = (tmp_path / "output" / "failure").read_text(encoding="utf-8")
    assert "ConfigError" in reason
    assert "'epochz'" in reason


# ----------------------------------------------------------------------------- training


def test_training_job_runs_under_the_sagemaker_training_toolkit(trained, tiny):
    base = trained["base"]
    assert trained["returncode"] == 0, trained["log"][-3000:]
    assert (base / "output" / "success").is_file()
    assert sorted(p.name for p in (base / "model").iterdir()) == [
        "detector.json",
        "weights.pt",
    ]
    meta = json.loads((base / "model" / "detector.json").read_text(encoding="utf-8"))
    assert meta["config"]["model"]["epochs"] == 2
    assert meta["config"]["model"]["hidden_dims"] == [16, 8]
    assert meta["architecture"]["hidden_dims"] == [16, 8]

    # The metric definitions of the planned request read the per-epoch INFO lines.
    history = [h for m in meta["training"]["members"] for h in m["history"]]
    for definition, key in zip(
        jobs.METRIC_DEFINITIONS, ("train_loss", "val_loss"), strict=True
    ):
        found = [float(v) for v in re.findall(definition["Regex"], trained["log"])]
        assert found == [pytest.approx(h[key], abs=1e-6) for h in history]
    assert re.search(r"INFO sagewatch\.training: epoch=1 ", trained["log"])


def test_scoring_entry_point_uses_the_trained_model_archive(
    trained, data, tmp_path, monkeypatch
) -> None:
    assert trained["returncode"] == 0, trained["log"][-3000:]
    model_dir = trained["base"] / "model"
    features = sorted(data["features"].glob("*.parquet"))
    base = _processing_tree(
        tmp_path / "ml", "algo-1", ["algo-1"], {"features": features}
    )
    archive = base / "processing" / "input" / "model" / contract.MODEL_ARCHIVE
    archive.parent.mkdir(parents=True)
    archive.write_bytes(_model_archive(model_dir))

    assert _run(monkeypatch, base, "score") == 0

    written = sorted(p.name for p in (base / "processing/output/scores").iterdir())
    assert written == [
        "anomaly_scores-algo-1.csv",
        "anomaly_scores-algo-1.parquet",
        "stage-score-algo-1.json",
    ]
    scores = pl.read_parquet(_outputs(base, "scores")[0])
    expected = score_features(
        read_features(str(data["features"])), Detector.load(str(model_dir))
    )
    assert scores.height == 600
    assert scores["anomaly_score"].to_list() == expected["anomaly_score"].to_list()
    assert scores["threshold"][0] == Detector.load(str(model_dir)).threshold_


def test_two_scoring_hosts_give_the_one_host_union(
    trained, data, tmp_path, monkeypatch
) -> None:
    assert trained["returncode"] == 0, trained["log"][-3000:]
    archive = _model_archive(trained["base"] / "model")
    features = sorted(data["features"].glob("*.parquet"))
    shards = {"algo-1": features[0::2], "algo-2": features[1::2], "one": features}
    results = {}
    for host, files in shards.items():
        hosts = ["one"] if host == "one" else ["algo-1", "algo-2"]
        base = _processing_tree(tmp_path / host, host, hosts, {"features": files})
        model = base / "processing" / "input" / "model" / contract.MODEL_ARCHIVE
        model.parent.mkdir(parents=True)
        model.write_bytes(archive)
        assert _run(monkeypatch, base, "score") == 0
        results[host] = _outputs(base, "scores")
    assert [p.name for p in results["algo-2"]] == ["anomaly_scores-algo-2.parquet"]
    union = _union(results["algo-1"] + results["algo-2"])
    assert union.equals(_union(results["one"]))

    # The evaluation step reads every host's Parquet scores from one prefix.
    base = _processing_tree(
        tmp_path / "eval",
        "algo-1",
        ["algo-1"],
        {"scores": results["algo-1"] + results["algo-2"]},
    )
    assert _run(monkeypatch, base, "evaluate", "--set", "max_plot_entities=1") == 0
    report_path = base / "processing/output/evaluation/evaluation_report.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["rows"] == 600


# ----------------------------------------------------------------------------- features


def test_two_feature_hosts_give_the_one_host_union(data, tmp_path, monkeypatch):
    raw = sorted(data["raw"].glob("*.csv"))
    assert len(raw) == 3
    runs = {
        "one": ("algo-1", ["algo-1"], raw),
        "a": ("algo-1", ["algo-1", "algo-2"], raw[0::2]),
        "b": ("algo-2", ["algo-1", "algo-2"], raw[1::2]),
    }
    outputs = {}
    for key, (host, hosts, files) in runs.items():
        base = _processing_tree(tmp_path / key, host, hosts, {"raw": files})
        assert _run(monkeypatch, base, "features") == 0
        outputs[key] = _outputs(base, "features")
    assert [p.name for p in outputs["b"]] == ["features-machine_002-algo-2.parquet"]
    assert all(p.stem.endswith("-algo-1") for p in outputs["a"])
    union = _union(outputs["a"] + outputs["b"])
    assert union.height == 600
    assert union.equals(_union(outputs["one"]))
    assert union.equals(read_features(str(data["features"])))


def test_host_without_a_shard_writes_nothing(tmp_path, monkeypatch) -> None:
    base = _processing_tree(
        tmp_path / "ml", "algo-2", ["algo-1", "algo-2"], {"raw": []}
    )
    assert _run(monkeypatch, base, "features") == 0
    assert not (base / "processing" / "output" / "features").exists()

    alone = _processing_tree(tmp_path / "alone", "algo-1", ["algo-1"], {"raw": []})
    assert _run(monkeypatch, alone, "features") == 1
    message = (alone / "output" / "message").read_text(encoding="utf-8")
    assert "no input files" in message


def test_planned_processing_command_runs_as_the_container_would(data, tmp_path) -> None:
    """The request's own ContainerEntrypoint and ContainerArguments, in a shell."""
    settings = Settings().with_overrides({**TINY, "rolling_window": 6})
    bundle = build_source_bundle()
    request = plans.plan_features(settings, job_name="f-1", bundle=bundle).request
    app = request["AppSpecification"]
    assert app["ContainerArguments"] == ["features", "--set", "rolling_window=6"]
    raw = sorted(data["raw"].glob("*.csv"))
    base = _processing_tree(tmp_path / "ml", "algo-1", ["algo-1"], {"raw": raw})
    code = base / "processing" / "input" / "code" / contract.SOURCE_ARCHIVE
    code.parent.mkdir(parents=True)
    code.write_bytes(bundle.data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"SAGEMAKER_BASE_DIR": str(base), "PATH": f"{BIN}:{env.get('PATH', '')}"}

    done = subprocess.run(
        app["ContainerEntrypoint"] + app["ContainerArguments"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    expected, _ = stage_features(settings, str(data["raw"]), str(tmp_path / "local"))
    produced = _union(_outputs(base, "features"))
    assert produced.equals(expected.sort(["machine_id", "timestamp"]))


def test_model_input_without_a_model_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(Exception, match=r"expected model\.tar\.gz or detector\.json"):
        entrypoints.unpack_model(str(tmp_path), tmp_path / "out")
