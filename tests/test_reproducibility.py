"""Same input, config and seed give byte-identical scores, whichever way they are run.

The manifest names the exact input bytes (SHA-256 per raw file) and the resolved
config that produced each score file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sagewatch.cli import main
from sagewatch.config import Settings, load_settings

CONFIG = """\
generate: {n_samples: 120, n_machines: 2}
features: {rolling_window: 6}
model: {epochs: 3, hidden_dims: [8], encoding_dim: 2, batch_size: 64, seed: 7}
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def first_run(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("first")
    _cli("run", "--config", str(config), "--data-dir", str(data_dir))
    return data_dir


def test_two_runs_give_byte_identical_scores(
    config: Path, first_run: Path, tmp_path: Path
) -> None:
    _cli("run", "--config", str(config), "--data-dir", str(tmp_path))
    first = (first_run / "scores" / "anomaly_scores.csv").read_bytes()
    assert (tmp_path / "scores" / "anomaly_scores.csv").read_bytes() == first
    assert first.count(b"\n") == 241  # header + 2 machines x 120 rows


def test_stages_one_by_one_match_run(
    config: Path, first_run: Path, tmp_path: Path
) -> None:
    c = ["--config", str(config)]
    _cli("generate", *c, "--output-dir", str(tmp_path / "raw"))
    _cli(
        "features",
        *c,
        "--input",
        str(tmp_path / "raw"),
        "--output-dir",
        str(tmp_path / "features"),
    )
    _cli(
        "train",
        *c,
        "--input",
        str(tmp_path / "features"),
        "--model-dir",
        str(tmp_path / "model"),
    )
    _cli(
        "score",
        *c,
        "--input",
        str(tmp_path / "features"),
        "--model-dir",
        str(tmp_path / "model"),
        "--output-dir",
        str(tmp_path / "scores"),
    )
    _cli(
        "evaluate",
        *c,
        "--input",
        str(tmp_path / "scores" / "anomaly_scores.csv"),
        "--output-dir",
        str(tmp_path / "evaluation"),
    )
    for name in ("anomaly_scores.csv", "anomaly_scores.parquet"):
        assert _sha(tmp_path / "scores" / name) == _sha(first_run / "scores" / name)
    assert _sha(tmp_path / "model" / "weights.pt") == _sha(
        first_run / "model" / "weights.pt"
    )


def test_manifest_names_the_input_bytes_and_config_of_the_scores(
    config: Path, first_run: Path
) -> None:
    manifest = json.loads((first_run / "run_manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}

    raw = sorted((first_run / "raw").glob("*.csv"))
    assert len(raw) == 2
    assert {i["uri"]: i["sha256"] for i in stages["features"]["inputs"]} == {
        str(p): _sha(p) for p in raw
    }
    scores = first_run / "scores" / "anomaly_scores.csv"
    written = {o["uri"]: o["sha256"] for o in stages["score"]["outputs"]}
    assert written[str(scores)] == _sha(scores)
    used = {i["uri"] for i in stages["score"]["inputs"]}
    assert {o["uri"] for o in stages["features"]["outputs"]} <= used
    assert str(first_run / "model" / "weights.pt") in used

    resolved = load_settings(config, environ={})
    assert Settings.model_validate(manifest["config"]) == resolved
    assert (
        manifest["config_sha256"]
        == hashlib.sha256(
            json.dumps(resolved.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()
    )
    quality = stages["features"]["details"]["quality"]
    assert quality["rows_in"] == quality["rows_out"] == 240
    assert quality["dropped"] == {}
    report = json.loads(
        (first_run / "evaluation" / "evaluation_report.json").read_text()
    )
    assert report["context"]["data_quality"] == quality
    page = (first_run / "evaluation" / "evaluation_report.html").read_text()
    assert "<h2>Input data quality</h2>" in page
