"""The command line: stage commands, summary, exit codes and messages."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import polars as pl
from click.testing import CliRunner

from sagewatch.cli import _setup_logging, main

SMALL = ["--n-samples", "300", "--n-machines", "2", "--epochs", "3"]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_python_dash_m_shows_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sagewatch", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("run", "generate", "features", "train", "score", "evaluate"):
        assert f"  {command} " in out


def test_run_prints_a_summary_with_metrics(tmp_path: Path) -> None:
    code, out = _invoke("-q", "run", "--data-dir", str(tmp_path), *SMALL)
    assert code == 0, out
    for needle in (
        "features",
        "train",
        "score",
        "threshold",
        "flagged",
        "f1",
        "pr_auc",
    ):
        assert needle in out
    assert str(tmp_path / "run_manifest.json") in out


def test_stages_one_by_one_write_their_outputs(tmp_path: Path) -> None:
    raw, feats = tmp_path / "raw", tmp_path / "features"
    model, scores, ev = tmp_path / "model", tmp_path / "scores", tmp_path / "ev"
    steps = [
        ("generate", "--output-dir", str(raw), *SMALL[:4]),
        ("features", "--input", str(raw), "--output-dir", str(feats)),
        ("train", "--input", str(feats), "--model-dir", str(model), "--epochs", "3"),
        (
            "score",
            "--input",
            str(feats),
            "--model-dir",
            str(model),
            "--output-dir",
            str(scores),
        ),
        (
            "evaluate",
            "--input",
            str(scores / "anomaly_scores.csv"),
            "--output-dir",
            str(ev),
            "--top-n",
            "5",
            "--percentiles",
            "50,99.9",
        ),
    ]
    for step in steps:
        code, out = _invoke("-q", *step)
        assert code == 0, (step, out)
    table = pl.read_csv(scores / "anomaly_scores.csv")
    assert table.height == 600
    for folder, stage in [(raw, "generate"), (feats, "features"), (model, "train")]:
        manifest = json.loads((folder / f"{stage}_manifest.json").read_text())
        assert manifest["stages"][0]["name"] == stage
        assert manifest["stages"][0]["outputs"]
    trained = json.loads((model / "train_manifest.json").read_text())
    assert trained["config"]["model"]["epochs"] == 3
    scored = json.loads((scores / "score_manifest.json").read_text())["stages"][0]
    assert {i["uri"] for i in scored["inputs"]} >= {
        str(model / "weights.pt"),
        str(model / "detector.json"),
    }
    report = json.loads((ev / "evaluation_report.json").read_text())
    assert len(report["top_anomalies"]) == 5
    assert set(report["score_statistics"]["percentiles"]) == {"p50", "p99.9"}
    top = report["top_anomalies"][0]["anomaly_score"]
    assert top == table.filter(pl.col("in_reference") == 0)["anomaly_score"].max()

    # The scores folder holds the CSV and its Parquet copy: each row counts once.
    code, out = _invoke(
        "-q", "evaluate", "--input", str(scores), "--output-dir", str(ev)
    )
    assert code == 0, out
    again = json.loads((ev / "evaluation_report.json").read_text())
    assert again["rows"] == 600
    assert again["evaluated_rows"] == report["evaluated_rows"]


def test_missing_input_exits_non_zero_without_traceback(tmp_path: Path) -> None:
    code, out = _invoke(
        "run", "--input", str(tmp_path / "nope.csv"), "--data-dir", str(tmp_path)
    )
    assert code != 0
    assert "nope.csv" in out
    assert "Traceback" not in out


def test_bad_setting_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  epochs: lots\n")
    code, out = _invoke("run", "--config", str(bad), "--data-dir", str(tmp_path))
    assert code == 2
    assert "model.epochs" in out


def test_bad_percentiles_are_refused(tmp_path: Path) -> None:
    code, out = _invoke("evaluate", "--input", "x.csv", "--percentiles", "50,high")
    assert code == 2
    assert "--percentiles" in out


def test_two_reference_flags_are_refused(tmp_path: Path) -> None:
    code, out = _invoke(
        "run", "--train-rows", "100", "--train-fraction", "0.3", "--data-dir", "x"
    )
    assert code == 2
    assert "--train-rows and --train-fraction" in out


def test_sensor_columns_that_name_no_column_are_refused(tmp_path: Path) -> None:
    code, out = _invoke("run", "--sensor-columns", " , ", "--data-dir", str(tmp_path))
    assert code == 2
    assert "--sensor-columns ' , ' names no column" in out
    assert not (tmp_path / "raw").exists()


def test_model_options_are_explained_in_help() -> None:
    code, out = _invoke("train", "--help")
    assert code == 0
    text = " ".join(out.split())  # help text wraps
    for option, words in [
        ("--epochs INTEGER", "Most training epochs"),
        ("--batch-size INTEGER", "Training sequences per optimiser step"),
        ("--encoding-dim INTEGER", "Width of the autoencoder's code"),
        ("--detector [autoencoder|pca|iforest]", "Detector to fit"),
    ]:
        assert f"{option} {words}" in text


def test_a_failed_run_leaves_no_manifest_of_an_earlier_run(tmp_path: Path) -> None:
    code, out = _invoke("-q", "run", "--data-dir", str(tmp_path), *SMALL)
    assert code == 0, out
    weights = (tmp_path / "model" / "weights.pt").read_bytes()

    # A reference period before the data: features are redone, training refuses.
    code, out = _invoke(
        "-q", "run", "--data-dir", str(tmp_path), *SMALL, "--train-until", "2000-01-01"
    )

    assert code == 3, out
    assert "reference period holds 0 rows" in out
    assert not (tmp_path / "run_manifest.json").exists()
    assert (tmp_path / "model" / "weights.pt").read_bytes() == weights


def test_log_output_drops_the_user_and_password_of_urls() -> None:
    _setup_logging(1)
    handler = logging.getLogger().handlers[0]
    try:
        raise OSError('cannot reach "https://me:s3cr3t@store.example:9000/b"')
    except OSError:
        record = logging.LogRecord(
            "sagewatch",
            logging.ERROR,
            __file__,
            1,
            "endpoint %s",
            ("s3+http://ak:sk@host/x",),
            sys.exc_info(),
        )
    text = handler.format(record)

    assert "endpoint s3+http://host/x" in text
    assert 'OSError: cannot reach "https://store.example:9000/b"' in text
    for secret in ("me:", "s3cr3t", "ak:", "sk@"):
        assert secret not in text


def test_sigterm_unwinds_like_ctrl_c_leaving_the_previous_output(
    tmp_path: Path, monkeypatch
) -> None:
    import os
    import signal

    from sagewatch import storage

    out = tmp_path / "raw"
    code, _ = _invoke("-q", "generate", "--output-dir", str(out), *SMALL[:4])
    assert code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_table = storage.write_table
    calls = []

    def terminated_on_the_second(df: pl.DataFrame, uri: str) -> storage.FileInfo:
        calls.append(uri)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return write_table(df, uri)

    monkeypatch.setattr(storage, "write_table", terminated_on_the_second)
    code, out_text = _invoke(
        "-q", "generate", "--output-dir", str(out), *SMALL[:4], "--seed", "7"
    )

    assert code == 143
    assert "terminated" in out_text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_score_refuses_a_scores_table_caught_by_its_features_glob(
    tmp_path: Path,
) -> None:
    code, out = _invoke("-q", "run", "--data-dir", str(tmp_path), *SMALL)
    assert code == 0, out

    code, out = _invoke(
        "score",
        "--input",
        f"{tmp_path}/**/*.parquet",
        "--model-dir",
        str(tmp_path / "model"),
        "--output-dir",
        str(tmp_path / "again"),
    )

    assert code == 3
    assert (
        f"{tmp_path}/scores/anomaly_scores.parquet: no '<sensor>__<statistic>'" in out
    )
    assert not (tmp_path / "again").exists()


def test_features_refuse_an_output_folder_inside_their_input(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    code, _ = _invoke("-q", "generate", "--output-dir", str(raw), *SMALL[:4])
    assert code == 0
    before = sorted(p.name for p in raw.rglob("*"))

    for output in (raw, raw / "features"):
        code, out = _invoke(
            "features", "--input", str(raw), "--output-dir", str(output)
        )
        assert code == 2
        assert "is the raw input folder" in out

    assert sorted(p.name for p in raw.rglob("*")) == before


def test_every_option_of_every_command_has_help() -> None:
    import click

    def commands(group: click.Group, prefix: str):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    missing = [
        f"{name} {param.opts[0]}"
        for name, command in commands(main, "")
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert missing == []


def test_a_damaged_parquet_part_is_named_by_train_score_and_evaluate(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    code, _ = _invoke("-q", "run", "--data-dir", str(data), *SMALL)
    assert code == 0
    features = data / "features"
    part = features / "features-machine_002.parquet"
    part.write_bytes(part.read_bytes()[:300])  # cut short: no footer
    scores = data / "scores" / "anomaly_scores.parquet"
    scores.write_bytes(scores.read_bytes()[:300])
    expected = "not a readable Parquet file: parquet: File out of specification"

    model, out_dir = str(data / "model"), str(tmp_path / "s")
    for args, damaged in (
        (["train", "--input", str(features), "--model-dir", str(tmp_path / "m")], part),
        (
            [
                "score",
                "--input",
                str(features),
                "--model-dir",
                model,
                "--output-dir",
                out_dir,
            ],
            part,
        ),
        (
            ["evaluate", "--input", str(scores), "--output-dir", str(tmp_path / "e")],
            scores,
        ),
    ):
        code, out = _invoke("-q", *args)
        assert code == 3, out
        assert out.startswith(f"error: {damaged}: {expected}"), out
    assert not any((tmp_path / name).exists() for name in ("m", "s", "e"))
