"""One integration test of `run` on synthetic data, and its outputs' contracts."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from sagewatch.pipeline import run

SCORE_COLUMNS = [
    "timestamp",
    "machine_id",
    "anomaly_score",
    "threshold",
    "is_anomaly",
    "top_sensor",
]


def test_run_synthetic_writes_every_output(tmp_path: Path, small_settings) -> None:
    result = run(small_settings, data_dir=str(tmp_path))

    scores = pl.read_csv(tmp_path / "scores" / "anomaly_scores.csv")
    assert scores.columns[:6] == SCORE_COLUMNS
    assert "label" in scores.columns
    assert scores.height == 800
    assert (tmp_path / "model" / "detector.json").is_file()
    assert (tmp_path / "model" / "weights.pt").is_file()
    report = json.loads(
        (tmp_path / "evaluation" / "evaluation_report.json").read_text()
    )
    assert set(report["metrics"]) >= {
        "precision",
        "recall",
        "f1",
        "far",
        "mar",
        "pr_auc",
    }
    html = (tmp_path / "evaluation" / "evaluation_report.html").read_text()
    assert "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == [
        "generate",
        "features",
        "train",
        "score",
        "evaluate",
    ]
    assert result.report["rows"] == 800
