"""The documented SKAB and NAB commands, checked against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from sagewatch.cli import main


def _hand_metrics(scores_csv: Path) -> dict[str, float]:
    scores = pl.read_csv(scores_csv).filter(pl.col("in_reference") == 0)
    y = scores["label"].to_numpy() == 1
    p = scores["is_anomaly"].to_numpy() == 1
    tp, fp = np.sum(y & p), np.sum(~y & p)
    fn, tn = np.sum(y & ~p), np.sum(~y & ~p)
    return {
        "f1": tp / (tp + (fp + fn) / 2),
        "far": 100 * fp / (fp + tn),
        "mar": 100 * fn / (fn + tp),
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
    }


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, ["-q", "run", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_skab_file_metrics_match_hand_computation(
    shared_data: Path, tmp_path: Path
) -> None:
    out = _run(
        [
            "--input",
            str(shared_data / "skab" / "valve1" / "0.csv"),
            "--sep",
            ";",
            "--timestamp-column",
            "datetime",
            "--label-column",
            "anomaly",
            "--train-rows",
            "400",
            "--epochs",
            "5",
            "--data-dir",
            str(tmp_path),
        ]
    )
    scores = pl.read_csv(tmp_path / "scores" / "anomaly_scores.csv")
    assert scores.height == 1147
    assert scores["in_reference"].sum() == 400
    assert "changepoint" not in scores["top_sensor"].unique().to_list()
    report = json.loads(
        (tmp_path / "evaluation" / "evaluation_report.json").read_text()
    )
    expected = _hand_metrics(tmp_path / "scores" / "anomaly_scores.csv")
    for key, value in expected.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-12)
    assert f"f1               {expected['f1']:.4f}" in out
    assert f"far              {expected['far']:.4f} %" in out
    assert f"mar              {expected['mar']:.4f} %" in out


def test_nab_file_with_label_windows(shared_data: Path, tmp_path: Path) -> None:
    nab = shared_data / "nab"
    _run(
        [
            "--input",
            str(nab / "realKnownCause" / "machine_temperature_system_failure.csv"),
            "--label-windows",
            str(nab / "anomaly_windows.json"),
            "--train-until",
            "2013-12-09",
            "--epochs",
            "3",
            "--data-dir",
            str(tmp_path),
        ]
    )
    scores = pl.read_csv(
        tmp_path / "scores" / "anomaly_scores.csv", try_parse_dates=True
    )
    windows = json.loads((nab / "anomaly_windows.json").read_text())
    spans = windows["realKnownCause/machine_temperature_system_failure.csv"]
    first_start = spans[0][0][:19].replace(" ", "T")
    labelled = scores.filter(pl.col("label") == 1)
    assert labelled["timestamp"].min().strftime("%Y-%m-%dT%H:%M:%S") == first_start
    assert scores["top_sensor"].unique().to_list() == ["value"]
    report = json.loads(
        (tmp_path / "evaluation" / "evaluation_report.json").read_text()
    )
    expected = _hand_metrics(tmp_path / "scores" / "anomaly_scores.csv")
    assert report["metrics"]["f1"] == pytest.approx(expected["f1"], rel=1e-12)
    assert report["metrics"]["n_events"] == 4
