"""The JSON report and the self-contained HTML page."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from sagewatch.report import REPORT_HTML, REPORT_JSON, write_report


def _scores(label: bool = True) -> pl.DataFrame:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "timestamp": [start + timedelta(minutes=i) for i in range(8)],
            "machine_id": ["a"] * 4 + ["b"] * 4,
            "anomaly_score": [0.1, 0.2, 5.0, 0.3, 0.1, 0.4, 0.2, 9.0],
            "threshold": [1.0] * 8,
            "is_anomaly": [0, 0, 1, 0, 0, 0, 0, 1],
            "top_sensor": ["t", "t", "p", "t", "t", "t", "t", "v"],
            "in_reference": [1, 0, 0, 0, 1, 0, 0, 0],
            "label": [0, 0, 1, 1, 0, 0, 0, 1],
        }
    )
    return frame if label else frame.drop("label")


def test_report_json_counts_only_rows_outside_the_reference(tmp_path: Path) -> None:
    report, _ = write_report(_scores(), str(tmp_path), top_n=2, percentiles=[50])

    saved = json.loads((tmp_path / REPORT_JSON).read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    assert report["rows"] == 8
    assert report["evaluated_rows"] == 6
    assert report["anomalies"] == 2
    assert report["score_statistics"]["max"] == 9.0
    assert report["score_statistics"]["percentiles"] == {"p50": 0.35}
    assert [r["anomaly_score"] for r in report["top_anomalies"]] == [9.0, 5.0]
    assert report["top_sensors"] == {"p": 1, "v": 1}
    m = report["metrics"]
    assert m["confusion"] == {"tp": 2, "fp": 0, "fn": 1, "tn": 3}
    assert m["precision"] == 1.0
    assert m["recall"] == 2 / 3
    assert m["f1"] == 2 / (2 + 0.5)
    assert m["far"] == 0.0
    assert m["mar"] == 100 / 3
    assert m["n_events"] == 2 and m["event_recall"] == 1.0


def test_report_without_labels_has_no_metrics(tmp_path: Path) -> None:
    report, _ = write_report(_scores(label=False), str(tmp_path))
    assert "metrics" not in report
    page = (tmp_path / REPORT_HTML).read_text()
    assert "No labels in the input" in page


def test_html_is_self_contained_with_plots_and_tables(tmp_path: Path) -> None:
    write_report(_scores(), str(tmp_path), top_n=3)
    page = (tmp_path / REPORT_HTML).read_text()
    # one histogram plus one time series per entity
    assert page.count("data:image/png;base64,") == 3
    assert "http" not in page.replace("http-equiv", "")
    assert "<script" not in page
    for heading in (
        "Summary",
        "Labelled metrics",
        "Score distribution",
        "Top 3 scores",
    ):
        assert heading in page
