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


def test_saved_detector_scores_exactly_like_the_fitted_one(
    tmp_path: Path, small_settings
) -> None:
    from sagewatch.detector import Detector
    from sagewatch.pipeline import (
        stage_features,
        stage_generate,
        stage_score,
        stage_train,
    )

    raw, _ = stage_generate(small_settings, str(tmp_path / "raw"))
    features, _ = stage_features(small_settings, raw, str(tmp_path / "features"))
    fitted, _ = stage_train(small_settings, features, str(tmp_path / "model"))
    loaded = Detector.load(str(tmp_path / "model"))

    direct, _ = stage_score(small_settings, features, fitted, str(tmp_path / "s1"))
    reloaded, _ = stage_score(small_settings, features, loaded, str(tmp_path / "s2"))

    assert loaded.threshold_ == fitted.threshold_
    assert direct.equals(reloaded)
    assert (tmp_path / "s1" / "anomaly_scores.csv").read_bytes() == (
        tmp_path / "s2" / "anomaly_scores.csv"
    ).read_bytes()


def test_manifest_fingerprints_match_the_files(tmp_path: Path, small_settings) -> None:
    import hashlib

    run(small_settings, data_dir=str(tmp_path))
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    outputs = [o for stage in manifest["stages"] for o in stage["outputs"]]
    assert len(outputs) >= 2 + 2 + 2 + 2 + 2  # raw, features, model, scores, report
    for item in outputs:
        data = Path(item["uri"]).read_bytes()
        assert item["bytes"] == len(data)
        assert item["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["config"]["model"]["epochs"] == 5
    detector = json.loads((tmp_path / "model" / "detector.json").read_text())
    assert detector["config"] == manifest["config"]
    assert detector["threshold"]["rule"]


def test_reference_rows_are_the_first_half_of_each_machine(
    tmp_path: Path, small_settings
) -> None:
    run(small_settings, data_dir=str(tmp_path))
    scores = pl.read_csv(tmp_path / "scores" / "anomaly_scores.csv")
    per_machine = scores.group_by("machine_id").agg(pl.col("in_reference").sum())
    assert per_machine["in_reference"].to_list() == [200, 200]
    first_half = scores.filter(pl.int_range(pl.len()).over("machine_id") < 200)
    assert first_half["in_reference"].sum() == 400


def test_rerun_with_fewer_machines_leaves_no_stale_parts(
    tmp_path: Path, small_settings
) -> None:
    run(small_settings, data_dir=str(tmp_path))
    fewer = small_settings.with_overrides({"n_machines": 1})

    result = run(fewer, data_dir=str(tmp_path))

    assert sorted(p.name for p in (tmp_path / "raw").glob("*.csv")) == [
        "sensor_data-machine_001.csv"
    ]
    assert len(list((tmp_path / "features").glob("*.parquet"))) == 1
    assert result.report["entities"] == 1


def test_training_refuses_features_with_missing_values(
    tmp_path: Path, small_settings
) -> None:
    from sagewatch.errors import InputError
    from sagewatch.pipeline import stage_train

    run(small_settings, data_dir=str(tmp_path))
    part = tmp_path / "features" / "features-machine_002.parquet"
    pl.read_parquet(part).drop("rpm__mean", "rpm__std").write_parquet(part)

    import pytest

    with pytest.raises(InputError, match=r"rpm__mean \(400 rows\)"):
        stage_train(small_settings, str(tmp_path / "features"), str(tmp_path / "m2"))
    assert not (tmp_path / "m2").exists()


def test_warm_up_rows_of_each_entity_are_scored_but_never_flagged(
    tmp_path: Path, small_settings
) -> None:
    from sagewatch.detector import Detector

    run(small_settings, data_dir=str(tmp_path))
    detector = Detector.load(str(tmp_path / "model"))
    assert detector.feature_window_ == 12
    assert detector.warmup_rows == 11 + detector.context_rows

    scores = pl.read_csv(tmp_path / "scores" / "anomaly_scores.csv")
    position = pl.int_range(pl.len()).over("machine_id")
    warm = scores.filter(position < detector.warmup_rows)
    assert warm.height == 2 * detector.warmup_rows
    assert warm["is_anomaly"].sum() == 0
    assert (warm["anomaly_score"] > detector.threshold_).any()  # scored as usual


def test_training_from_the_feature_files_matches_the_run(
    tmp_path: Path, small_settings
) -> None:
    import hashlib

    from sagewatch.pipeline import stage_train

    result = run(small_settings, data_dir=str(tmp_path))
    in_run = next(s for s in result.stages if s.name == "train")

    _, record = stage_train(
        small_settings, str(tmp_path / "features"), str(tmp_path / "m")
    )

    saved = [
        json.loads((tmp_path / folder / "detector.json").read_text())
        for folder in ("model", "m")
    ]
    assert saved[0]["training_data_sha256"] == saved[1]["training_data_sha256"]
    assert saved[0]["threshold"] == saved[1]["threshold"]
    assert record.details["sample"] == in_run.details["sample"]
    assert record.details["sample"]["training"] == {"used": 320, "of": 320}
    files = sorted((tmp_path / "features").glob("*.parquet"))
    assert [(i["uri"], i["rows"]) for i in record.inputs] == [
        (str(f), 400) for f in files
    ]
    for item, path in zip(record.inputs, files, strict=True):
        assert item["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    report = json.loads(
        (tmp_path / "evaluation" / "evaluation_report.json").read_text()
    )
    assert report["context"]["training"]["sample"] == in_run.details["sample"]
    page = (tmp_path / "evaluation" / "evaluation_report.html").read_text()
    assert "<h2>Training sample</h2>" in page
    assert "<td>training samples (seeded sample)</td><td>320 of 320</td>" in page


def test_a_score_stage_failing_to_write_keeps_both_previous_copies(
    tmp_path: Path, small_settings, monkeypatch
) -> None:
    import pytest

    from sagewatch import storage
    from sagewatch.errors import StorageError
    from sagewatch.pipeline import (
        stage_features,
        stage_generate,
        stage_score,
        stage_train,
    )
    from sagewatch.stage_tables import read_scores

    raw, _ = stage_generate(small_settings, str(tmp_path / "raw"))
    features, _ = stage_features(small_settings, raw, str(tmp_path / "features"))
    pca = small_settings.with_overrides({"detector": "pca"})
    first, _ = stage_train(small_settings, features, str(tmp_path / "m1"))
    second, _ = stage_train(pca, features, str(tmp_path / "m2"))
    out = str(tmp_path / "scores")
    stage_score(small_settings, features, first, out)
    write_table = storage.write_table

    def refuse_csv(df: pl.DataFrame, uri: str) -> storage.FileInfo:
        if uri.endswith(".csv"):
            raise StorageError(f"cannot write {uri}: access denied")
        return write_table(df, uri)

    monkeypatch.setattr(storage, "write_table", refuse_csv)
    with pytest.raises(StorageError):
        stage_score(pca, features, second, out)

    assert second.threshold_ != first.threshold_
    for copy in ("anomaly_scores.parquet", "anomaly_scores.csv"):
        read = read_scores(f"{out}/{copy}")
        assert read["threshold"].unique().to_list() == [first.threshold_]
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "anomaly_scores.csv",
        "anomaly_scores.parquet",
    ]


def _features_at_windows(tmp_path: Path, settings, **windows: int) -> list:
    """Synthetic raw data, then features at each ``folder=window`` under
    ``tmp_path``, the second streamed in small chunks; the settings of each."""
    from sagewatch.pipeline import stage_features, stage_generate

    raw, _ = stage_generate(settings, str(tmp_path / "raw"))
    chosen = []
    for n, (folder, window) in enumerate(windows.items()):
        at = settings.with_overrides({"rolling_window": window})
        chunks = {"chunk_rows": 100} if n == 1 else {}
        stage_features(at, raw, str(tmp_path / folder), **chunks)
        chosen.append(at)
    return chosen


def test_parts_of_two_feature_runs_are_refused_naming_both(
    tmp_path: Path, small_settings
) -> None:
    import shutil

    import pytest

    from sagewatch import storage, streaming
    from sagewatch.errors import InputError
    from sagewatch.pipeline import stage_score, stage_train

    five, _ = _features_at_windows(tmp_path, small_settings, a=5, b=6)
    model, _ = stage_train(five, str(tmp_path / "a"), str(tmp_path / "m"))
    for folder, window in (("a", 5), ("b", 6)):
        for part in (tmp_path / folder).glob("*.parquet"):
            recorded = storage.parquet_metadata(str(part))[streaming.STAMP_KEY]
            assert f'"rolling_window": {window}' in recorded
    mixed = tmp_path / "a" / "features-machine_002.parquet"
    shutil.copy(tmp_path / "b" / "features-machine_002.parquet", mixed)

    for stage in (
        lambda: stage_train(five, str(tmp_path / "a"), str(tmp_path / "m2")),
        lambda: stage_score(five, str(tmp_path / "a"), model, str(tmp_path / "s")),
    ):
        with pytest.raises(InputError) as caught:
            stage()
        message = str(caught.value)
        assert "features-machine_001.parquet and " in message
        assert str(mixed) in message
        assert '"rolling_window": 5' in message and '"rolling_window": 6' in message
    assert not (tmp_path / "m2").exists() and not (tmp_path / "s").exists()


def test_the_same_statistics_in_another_order_give_the_same_files_and_model(
    tmp_path: Path, small_settings
) -> None:
    from sagewatch.pipeline import stage_features, stage_generate, stage_train

    raw, _ = stage_generate(small_settings, str(tmp_path / "raw"))
    listed = small_settings.features.statistics
    turned = small_settings.with_overrides({"statistics": list(reversed(listed))})
    assert turned.features.statistics == listed
    stage_features(small_settings, raw, str(tmp_path / "a"))
    stage_features(turned, raw, str(tmp_path / "b"))
    for part in ("features-machine_001.parquet", "features-machine_002.parquet"):
        assert (tmp_path / "a" / part).read_bytes() == (
            tmp_path / "b" / part
        ).read_bytes()

    first, _ = stage_train(small_settings, str(tmp_path / "a"), str(tmp_path / "m"))
    second, _ = stage_train(turned, str(tmp_path / "b"), str(tmp_path / "n"))
    assert first.feature_names_ == second.feature_names_
    assert first.threshold_ == second.threshold_
    weights = (tmp_path / "m" / "weights.pt").read_bytes()
    assert weights == (tmp_path / "n" / "weights.pt").read_bytes()


def test_a_record_listing_statistics_unsorted_is_the_same_run(
    tmp_path: Path, small_settings
) -> None:
    """Files whose record lists the statistics in the configured order (as written
    before records were sorted) join files with a sorted record."""
    import json

    import pyarrow.parquet as pq

    from sagewatch.pipeline import stage_features, stage_generate, stage_train
    from sagewatch.streaming import STAMP_KEY

    raw, _ = stage_generate(small_settings, str(tmp_path / "raw"))
    stage_features(small_settings, raw, str(tmp_path / "f"))
    part = tmp_path / "f" / "features-machine_002.parquet"
    table = pq.read_table(part)
    recorded = json.loads(pq.read_metadata(part).metadata[STAMP_KEY.encode()])
    assert recorded["statistics"] == sorted(small_settings.features.statistics)
    recorded["statistics"] = list(small_settings.features.statistics)
    assert recorded["statistics"] != sorted(recorded["statistics"])
    old = {STAMP_KEY: json.dumps(recorded)}
    pq.write_table(table.replace_schema_metadata(old), part)
    assert (
        pq.read_metadata(part).metadata[STAMP_KEY.encode()] == old[STAMP_KEY].encode()
    )

    detector, _ = stage_train(small_settings, str(tmp_path / "f"), str(tmp_path / "m"))
    assert detector.threshold_ > 0


def test_a_record_not_written_by_sagewatch_is_compared_as_written() -> None:
    from sagewatch.stage_tables import _canonical_stamp, _shown

    ours = '{"rolling_window": 12, "statistics": ["value", "mean"]}'
    assert _canonical_stamp(ours) == _canonical_stamp(
        '{"statistics":["mean","value"],"rolling_window":12}'
    )
    assert _canonical_stamp(ours) != _canonical_stamp(
        '{"rolling_window": 13, "statistics": ["value", "mean"]}'
    )
    deep = "[" * 100_000 + "]" * 100_000
    for foreign in (
        "not json",
        deep,
        '{"statistics": ' + deep + "}",
        '{"rolling_window": 12, "statistics": "mean"}',
        '{"rolling_window": 12, "statistics": [1, 2]}',
        '["value", "mean"]',
    ):
        assert _canonical_stamp(foreign) == foreign
    assert _canonical_stamp('{"statistics": "mean"}') != _canonical_stamp(
        '{"statistics": "name"}'
    )
    assert _shown("x" * 500) == "x" * 200 + "... (500 characters)"
    assert _shown(ours) == ours


def test_score_refuses_features_of_another_window_than_the_detector(
    tmp_path: Path, small_settings, caplog
) -> None:
    import pytest

    from sagewatch.errors import InputError
    from sagewatch.pipeline import stage_score, stage_train

    five, six = _features_at_windows(tmp_path, small_settings, f5=5, f6=6)

    with caplog.at_level("WARNING", logger="sagewatch.pipeline"):
        detector, _ = stage_train(six, str(tmp_path / "f5"), str(tmp_path / "m"))
    assert detector.feature_window_ == 5  # what the files record, not the setting
    assert "computed with rolling_window=5" in caplog.text
    assert "not the configured 6" in caplog.text

    with pytest.raises(InputError) as caught:
        stage_score(
            five, str(tmp_path / "f6"), str(tmp_path / "m"), str(tmp_path / "s")
        )
    assert str(caught.value) == (
        f"{tmp_path / 'f6' / 'features-machine_001.parquet'}: features computed with "
        "rolling_window=6; the detector was trained on features with "
        "rolling_window=5; compute the features again with --rolling-window 5, or "
        "train on these"
    )
    assert not (tmp_path / "s").exists()
    scores, _ = stage_score(
        six, str(tmp_path / "f5"), str(tmp_path / "m"), str(tmp_path / "s")
    )
    assert (tmp_path / "s" / "anomaly_scores.parquet").exists() and len(scores) > 0


def test_the_window_is_read_from_the_first_file_that_records_it(
    tmp_path: Path, small_settings
) -> None:
    import pyarrow.parquet as pq

    from sagewatch.pipeline import stage_features, stage_generate
    from sagewatch.stage_tables import recorded_window

    raw, _ = stage_generate(small_settings, str(tmp_path / "raw"))
    six = small_settings.with_overrides({"rolling_window": 6})
    stage_features(six, raw, str(tmp_path / "f"))
    first = tmp_path / "f" / "features-machine_001.parquet"
    second = tmp_path / "f" / "features-machine_002.parquet"
    table = pq.read_table(first)
    pq.write_table(table.replace_schema_metadata({}), first)  # as if by hand

    assert recorded_window([str(first), str(second)]) == (6, str(second))
    assert recorded_window([str(first)]) is None
