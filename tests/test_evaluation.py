"""Labelled metrics on hand-computed cases, the degenerate label columns, the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from sagewatch.errors import InputError
from sagewatch.evaluation import evaluate, event_metrics, labelled_metrics
from sagewatch.report import comparison_rows, render_html
from sagewatch.stage_tables import read_scores
from sagewatch.timestamps import ISO_EXAMPLES

# Six rows: tp at 0 and 5, fn at 1, fp at 2, tn at 3 and 4.
LABEL = np.array([1, 1, 0, 0, 0, 1])
FLAGGED = np.array([1, 0, 1, 0, 0, 1])
SCORE = np.array([0.9, 0.4, 0.8, 0.1, 0.2, 0.7])


def test_labelled_metrics_hand_computed() -> None:
    m = labelled_metrics(LABEL, SCORE, FLAGGED)

    assert m["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 2}
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / (2 + (1 + 1) / 2))
    assert m["far"] == pytest.approx(100 / 3)
    assert m["mar"] == pytest.approx(100 / 3)
    # Ranked scores: + - + + - -. AP = 1/3 * (1 + 2/3 + 3/4).
    assert m["pr_auc"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # Positive-negative pairs ordered correctly: 3 + 2 + 2 of 9.
    assert m["roc_auc"] == pytest.approx(7 / 9)
    assert "undefined" not in m


def test_labelled_metrics_skab_f1_equals_harmonic_mean() -> None:
    m = labelled_metrics(
        np.array([1, 1, 1, 1, 0, 0, 0, 0]),
        np.zeros(8),
        np.array([1, 1, 1, 0, 1, 1, 0, 0]),
    )

    precision, recall = 3 / 5, 3 / 4
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_labelled_metrics_no_positives_are_undefined_not_zero() -> None:
    m = labelled_metrics(np.zeros(4), np.array([0.1, 0.5, 0.2, 0.9]), [0, 1, 0, 1])

    assert m["far"] == pytest.approx(50.0)
    assert m["precision"] == 0.0
    for key in ("recall", "f1", "mar", "pr_auc", "roc_auc"):
        assert m[key] is None, key
    assert "no labelled anomalies" in m["undefined"][0]


def test_labelled_metrics_all_positives() -> None:
    m = labelled_metrics(np.ones(4), np.array([0.1, 0.5, 0.2, 0.9]), [0, 1, 1, 1])

    assert m["recall"] == pytest.approx(0.75)
    assert m["mar"] == pytest.approx(25.0)
    assert m["f1"] == pytest.approx(3 / (3 + 0.5))
    assert m["far"] is None and m["pr_auc"] is None and m["roc_auc"] is None
    assert "every row is labelled anomalous" in m["undefined"][0]


def test_labelled_metrics_nothing_flagged() -> None:
    m = labelled_metrics(np.array([0, 1]), np.array([0.1, 0.9]), np.zeros(2))

    assert m["precision"] is None
    assert m["recall"] == 0.0 and m["f1"] == 0.0 and m["mar"] == 100.0
    assert m["pr_auc"] == pytest.approx(1.0)
    assert any("no row is flagged" in u for u in m["undefined"])


def test_labelled_metrics_empty() -> None:
    m = labelled_metrics(np.array([]), np.array([]), np.array([]))

    assert m["n_rows"] == 0
    assert all(m[k] is None for k in ("precision", "recall", "f1", "far", "mar"))


def test_event_metrics_segments_per_entity() -> None:
    entity = np.array(["a"] * 6 + ["b"] * 4)
    label = np.array([0, 1, 1, 0, 1, 1, 1, 1, 0, 1])
    flagged = np.array([0, 0, 1, 0, 0, 0, 0, 1, 0, 0])

    m = event_metrics(entity, label, flagged)

    # Segments a[1:3], a[4:6], b[6:8] (split at the entity change), b[9:10].
    assert m["n_events"] == 4
    assert m["events_detected"] == 2
    assert m["event_recall"] == pytest.approx(0.5)
    assert m["mean_detection_delay"] == pytest.approx(1.0)


def test_event_metrics_alarm_outside_segment_does_not_count() -> None:
    m = event_metrics(np.array(["a"] * 5), [0, 1, 1, 0, 0], [1, 0, 0, 1, 1])

    assert m["n_events"] == 1 and m["events_detected"] == 0
    assert m["event_recall"] == 0.0
    assert m["mean_detection_delay"] is None


def test_event_metrics_no_events() -> None:
    m = event_metrics(np.array(["a", "a"]), np.zeros(2), np.ones(2))

    assert m == {
        "n_events": 0,
        "events_detected": 0,
        "event_recall": None,
        "mean_detection_delay": None,
    }


def _scores(label: list[int], in_reference: list[int] | None = None) -> pl.DataFrame:
    n = len(label)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return pl.DataFrame(
        {
            "timestamp": [start + timedelta(minutes=i) for i in range(n)],
            "machine_id": ["m1"] * n,
            "anomaly_score": np.linspace(0.1, 1.0, n),
            "threshold": [0.5] * n,
            "is_anomaly": [int(v > 0.5) for v in np.linspace(0.1, 1.0, n)],
            "top_sensor": ["s1"] * n,
            "in_reference": in_reference or [0] * n,
            "label": label,
        },
        schema_overrides={"is_anomaly": pl.Int8, "in_reference": pl.Int8},
    )


def test_evaluate_all_zero_label_column_reports_undefined() -> None:
    report = evaluate(_scores([0] * 10))

    metrics = report["metrics"]
    assert metrics["n_positive"] == 0
    assert metrics["f1"] is None and metrics["pr_auc"] is None
    assert metrics["event_recall"] is None
    assert metrics["far"] == pytest.approx(50.0)
    page = render_html(_scores([0] * 10), report)
    assert "undefined" in page


def test_evaluate_leaves_out_reference_rows() -> None:
    report = evaluate(_scores([0, 0, 0, 0, 1, 1], in_reference=[1, 1, 0, 0, 0, 0]))

    assert report["evaluated_rows"] == 4
    assert report["metrics"]["n_rows"] == 4
    assert report["metrics"]["n_positive"] == 2


def test_comparison_rows_put_this_run_first() -> None:
    report = evaluate(_scores([0, 0, 1, 1]))
    report["context"] = {
        "detector": "autoencoder",
        "comparison": [{"detector": "pca", "f1": 0.5, "pr_auc": 0.7, "seconds": 1.0}],
    }

    rows = comparison_rows(report)

    assert [r["detector"] for r in rows] == ["autoencoder (this run)", "pca"]
    assert rows[0]["f1"] == report["metrics"]["f1"]
    assert "seconds" not in rows[1]
    assert "Detectors side by side" in render_html(_scores([0, 0, 1, 1]), report)


def test_comparison_rows_empty_without_labels() -> None:
    scores = _scores([0, 0]).drop("label")
    report = evaluate(scores)
    report["context"] = {"comparison": [{"detector": "pca", "f1": 0.5}]}

    assert comparison_rows(report) == []


def test_scores_file_without_rows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "anomaly_scores.csv"
    _scores([0, 1]).head(0).write_csv(path)
    with pytest.raises(InputError, match="the table has no rows; expected"):
        read_scores(str(path))


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("label", None, "0 or 1"),
        ("label", 2, "0 or 1"),
        ("is_anomaly", -1, "0 or 1"),
        ("anomaly_score", None, "a finite number"),
        ("anomaly_score", float("inf"), "a finite number"),
        ("threshold", float("nan"), "a finite number"),
        ("machine_id", None, "a name"),
        ("machine_id", "  ", "a name"),
        ("timestamp", "yesterday", f"{ISO_EXAMPLES}, as the score stage writes them"),
    ],
)
def test_scores_file_with_a_bad_value_names_the_line(
    tmp_path: Path, column: str, value: object, expected: str
) -> None:
    kind = {"0 or 1": pl.Int64, "a finite number": pl.Float64}.get(expected, pl.String)
    frame = _scores([0, 0, 1, 1]).with_columns(pl.col(column).cast(kind))
    frame[2, column] = value
    csv, parquet = tmp_path / "anomaly_scores.csv", tmp_path / "scores.parquet"
    frame.write_csv(csv)
    frame.write_parquet(parquet)
    for path, place in ((csv, "line 4"), (parquet, "row 3")):  # header: line 1
        with pytest.raises(InputError) as info:
            read_scores(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}, {place}, column {column!r}: ")
        assert f"expected {expected}" in message
        blank = value is None or str(value).strip() == ""
        assert ("an empty value" if blank else repr(value)) in message
        assert "timestamp_format" not in message  # evaluate has no such setting


def test_scores_parts_are_checked_each_by_its_own_name_and_row(tmp_path: Path) -> None:
    good = _scores([0, 0, 1, 1])
    good.write_parquet(tmp_path / "anomaly_scores-1.parquet")
    bad = good.with_columns(
        pl.col("is_anomaly").cast(pl.Int64), machine_id=pl.lit("m2")
    )
    bad[2, "is_anomaly"] = 2
    bad.write_parquet(tmp_path / "anomaly_scores-2.parquet")
    with pytest.raises(InputError) as info:
        read_scores(str(tmp_path))
    part = tmp_path / "anomaly_scores-2.parquet"
    assert str(info.value).startswith(f"{part}, row 3, column 'is_anomaly': value 2;")
    bad.with_columns(pl.lit(0).alias("is_anomaly")).write_parquet(part)
    assert read_scores(str(tmp_path)).height == 8


def test_scores_in_any_row_and_part_order_evaluate_alike(tmp_path: Path) -> None:
    labels = [0, 1, 1, 0, 0, 1, 0, 0]
    frame = pl.concat(
        [_scores(labels), _scores(labels[::-1]).with_columns(machine_id=pl.lit("m2"))]
    )
    expected = evaluate(frame)["metrics"]
    assert expected["n_events"] == 4
    frame.sort("anomaly_score", descending=True).write_csv(tmp_path / "by_score.csv")
    parts = tmp_path / "parts"
    parts.mkdir()
    later = frame.filter(pl.col("timestamp") >= frame["timestamp"][4])
    later.write_parquet(parts / "a.parquet")  # the later rows in the first part
    frame.join(later, on=["machine_id", "timestamp"], how="anti").write_parquet(
        parts / "b.parquet"
    )

    for uri in (tmp_path / "by_score.csv", parts):
        read = read_scores(str(uri))
        assert_frame_equal(read, frame, check_dtypes=False)
        assert evaluate(read)["metrics"] == expected


def test_a_row_scored_twice_is_refused_naming_both_places(tmp_path: Path) -> None:
    frame = _scores([0, 1, 1, 0])
    frame.write_csv(tmp_path / "anomaly_scores-algo-1.csv")
    frame.tail(1).write_csv(tmp_path / "anomaly_scores-algo-2.csv")
    with pytest.raises(InputError) as info:
        read_scores(str(tmp_path))
    assert str(info.value).startswith(
        f"{tmp_path / 'anomaly_scores-algo-1.csv'}, line 5 and "
        f"{tmp_path / 'anomaly_scores-algo-2.csv'}, line 2: entity 'm1' at "
    )
    assert "is scored twice (2 rows share an entity and timestamp)" in str(info.value)


def test_csv_parts_with_a_parquet_twin_are_read_once(tmp_path: Path) -> None:
    frame = _scores([0, 1, 1, 0])
    for number, part in enumerate((frame.head(2), frame.tail(2)), start=1):
        part.write_csv(tmp_path / f"anomaly_scores-algo-{number}.csv")
        part.write_parquet(tmp_path / f"anomaly_scores-algo-{number}.parquet")
    assert read_scores(str(tmp_path)).height == 4


def test_scores_padded_with_spaces_read_as_raw_input_is(tmp_path: Path) -> None:
    frame = _scores([0, 1, 1, 0]).with_columns(
        pl.format(" {} ", "machine_id").alias("machine_id"),
        pl.format(" {} ", "anomaly_score").alias("anomaly_score"),
    )
    frame.write_csv(tmp_path / "anomaly_scores.csv")
    read = read_scores(str(tmp_path / "anomaly_scores.csv"))
    assert read["machine_id"].to_list() == ["m1"] * 4
    assert (
        read["anomaly_score"].to_list() == _scores([0] * 4)["anomaly_score"].to_list()
    )


def test_scores_timestamps_are_read_as_iso_8601_row_by_row(tmp_path: Path) -> None:
    frame = _scores([0, 0, 1, 1])
    text = frame.with_columns(
        pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%S%z").alias("timestamp")
    )
    text[1, "timestamp"] = "2024-01-01 00:01:00Z"  # another ISO 8601 spelling
    path = tmp_path / "anomaly_scores.csv"
    text.write_csv(path)
    assert read_scores(str(path))["timestamp"].equals(frame["timestamp"])
    naive = tmp_path / "naive.parquet"  # pandas writes times without a zone: UTC
    frame.with_columns(pl.col("timestamp").dt.replace_time_zone(None)).write_parquet(
        naive
    )
    assert read_scores(str(naive))["timestamp"].equals(frame["timestamp"])
    text[2, "timestamp"] = "2024-01-01 00:02:00"  # no offset among ones with one
    text.write_csv(path)
    with pytest.raises(InputError, match=r"line 4, column 'timestamp': .* no UTC off"):
        read_scores(str(path))


def test_scores_stored_as_text_are_read_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    frame = _scores([0, 1, 1, 0])
    frame.with_columns(
        pl.col("anomaly_score", "threshold").cast(pl.String)
    ).write_parquet(path)
    scores = read_scores(str(path))
    assert scores["anomaly_score"].to_list() == frame["anomaly_score"].to_list()
    assert evaluate(scores)["metrics"]["pr_auc"] == evaluate(frame)["metrics"]["pr_auc"]


def test_scores_flags_stored_as_text_are_read_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    frame = _scores([0, 1, 1, 0], [1, 0, 0, 0])
    frame.with_columns(pl.col("label", "in_reference").cast(pl.String)).write_parquet(
        path
    )
    scores = read_scores(str(path))
    assert scores["label"].to_list() == [0, 1, 1, 0]
    assert evaluate(scores)["metrics"]["n_positive"] == 2
