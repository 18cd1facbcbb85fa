"""Chunked stages give the same results as the in-memory path, bit for bit."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from sagewatch import detector as detector_module
from sagewatch import scoring, streaming
from sagewatch.config import ModelSettings, Settings
from sagewatch.detector import Detector
from sagewatch.errors import InputError, StorageError
from sagewatch.features import (
    build_features,
    entity_starts,
    feature_block,
    feature_names,
    sensor_matrix,
)
from sagewatch.pipeline import stage_features, stage_score, stage_train
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP, load_raw
from sagewatch.scoring import score_features
from sagewatch.stage_tables import read_features
from sagewatch.streaming import _chunks, _writers

# Entity lengths: longer and shorter than the chunks and the window, one row alone.
LENGTHS = {"pump-1": 40, "pump-2": 4, "pump-3": 1, "pump-4": 23}
START = datetime(2024, 3, 1, tzinfo=UTC)


def _raw(seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for name, n in LENGTHS.items():
        parts.append(
            pl.DataFrame(
                {
                    "timestamp": [START + timedelta(seconds=10 * i) for i in range(n)],
                    "machine_id": name,
                    "temp": rng.normal(70, 2, n).round(3),
                    "vib": rng.normal(1, 0.1, n).round(4),
                    "anomaly": (rng.random(n) < 0.2).astype(np.int8),
                }
            )
        )
    return pl.concat(parts)


def _write(frame: pl.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return str(path)


def _in_memory(settings: Settings, uri: str) -> pl.DataFrame:
    return build_features(*_validated(settings, uri)[:2], settings.features)


def _validated(settings: Settings, uri: str) -> tuple[pl.DataFrame, list[str], dict]:
    window = settings.features.rolling_window
    data = load_raw(uri, settings.data, settings.quality, rolling_window=window)
    return data.frame, data.sensors, data.quality


def _written(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.exists() else []


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort([ENTITY, TIMESTAMP])


@pytest.mark.parametrize("chunk_rows", [1, 5, 9, 67])
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_streamed_features_equal_in_memory(
    tmp_path: Path, chunk_rows: int, suffix: str
) -> None:
    settings = Settings()
    raw = _write(_raw(), tmp_path / "raw" / f"fleet{suffix}")

    result = streaming.stream_features(
        settings, raw, str(tmp_path / "features"), chunk_rows=chunk_rows
    )

    assert result is not None
    streamed = pl.read_parquet(tmp_path / "features" / "*.parquet")
    expected = _in_memory(settings, raw)
    assert_frame_equal(_sorted(streamed), _sorted(expected), check_exact=True)
    assert result.rows_out == sum(LENGTHS.values())
    assert result.quality == _validated(settings, raw)[2]
    assert sorted(Path(o.uri).name for o in result.outputs) == [
        f"features-{name}.parquet" for name in sorted(LENGTHS)
    ]
    assert [i.rows for i in result.inputs] == [sum(LENGTHS.values())]


@pytest.mark.parametrize("chunk_rows", [5, 68])  # streamed; in memory
def test_feature_files_hold_float32_rounded_from_the_float64_kernel(
    tmp_path: Path, chunk_rows: int
) -> None:
    settings = Settings()
    raw = _write(_raw(), tmp_path / "raw" / "fleet.parquet")
    frame, sensors, _ = _validated(settings, raw)
    starts = entity_starts(frame[ENTITY])
    exact = feature_block(sensor_matrix(frame, sensors), starts, 0, settings.features)

    stage_features(settings, raw, str(tmp_path / "features"), chunk_rows=chunk_rows)

    files = sorted((tmp_path / "features").glob("*.parquet"))  # entities in order
    names = feature_names(sensors, settings.features.statistics)
    for path in files:
        schema = pl.read_parquet_schema(path)
        assert [schema[n] for n in names] == [pl.Float32] * len(names), path.name
        assert schema[LABEL] == pl.Int8  # other columns keep their types
    stored = pl.read_parquet(files).select(names).to_numpy().T  # (features, rows)
    assert np.array_equal(stored, exact.astype(np.float32))
    assert (np.abs(stored - exact) <= 2.0**-24 * np.abs(exact)).all()


def _float64_features(settings: Settings, raw: str, folder: Path) -> None:
    """Feature files as versions that stored Float64 wrote them."""
    frame, sensors, _ = _validated(settings, raw)
    starts = entity_starts(frame[ENTITY])
    exact = feature_block(sensor_matrix(frame, sensors), starts, 0, settings.features)
    names = feature_names(sensors, settings.features.statistics)
    table = frame.select(TIMESTAMP, ENTITY).with_columns(
        *(pl.Series(name, exact[i]) for i, name in enumerate(names)), frame[LABEL]
    )
    folder.mkdir(parents=True)
    for (name,), part in table.group_by(ENTITY, maintain_order=True):
        part.write_parquet(folder / f"features-{name}.parquet")


def test_float64_feature_files_of_older_versions_train_and_score(
    tmp_path: Path,
) -> None:
    settings = Settings(model={"detector": "pca"})
    raw = _write(_raw(), tmp_path / "raw" / "fleet.parquet")
    new, mixed = tmp_path / "new", tmp_path / "mixed"
    stage_features(settings, raw, str(new), chunk_rows=5)
    _float64_features(settings, raw, mixed)
    # pump-3 and pump-4 as written now: one folder of both kinds.
    for name in ("pump-3", "pump-4"):
        (new / f"features-{name}.parquet").replace(mixed / f"features-{name}.parquet")

    table = read_features(str(mixed))
    assert table.schema["temp__mean"] == pl.Float64
    detector, record = stage_train(settings, str(mixed), str(tmp_path / "model"))
    uri, _ = stage_score(
        settings, str(mixed), detector, str(tmp_path / "scores"), chunk_rows=5
    )

    assert record.rows_in == sum(LENGTHS.values())
    assert np.isfinite(detector.threshold_)
    streamed = pl.read_parquet(uri)
    assert_frame_equal(streamed, score_features(table, detector), check_exact=True)
    rounded = score_features(
        table.with_columns(pl.col(detector.feature_names_).cast(pl.Float32)), detector
    )
    # Rounding the old features to float32 moves no score by more than 1e-4 of
    # the threshold (the scaled features move by less than 1e-4 of their scale).
    assert streamed["anomaly_score"].to_numpy() == pytest.approx(
        rounded["anomaly_score"].to_numpy(), rel=0, abs=1e-4 * detector.threshold_
    )


def test_an_unused_column_is_warned_about_once_not_per_chunk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _write(_raw().with_columns(pl.lit("x").alias("note")), tmp_path / "r.csv")
    with caplog.at_level(logging.WARNING, logger="sagewatch"):
        result = streaming.stream_features(
            Settings(), raw, str(tmp_path / "features"), chunk_rows=5
        )
    assert result is not None and result.quality["ignored_columns"] == ["note"]
    warned = [r for r in caplog.records if "are not used" in r.getMessage()]
    assert [r.getMessage() for r in warned] == [f"{raw}: columns ['note'] are not used"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_folder_of_files_streams_like_one_file(tmp_path: Path, suffix: str) -> None:
    raw = _raw()
    first = raw.filter(pl.col("machine_id") <= "pump-2")
    _write(first, tmp_path / "raw" / f"a{suffix}")
    _write(raw.filter(pl.col("machine_id") > "pump-2"), tmp_path / "raw" / f"b{suffix}")
    settings = Settings()

    result = streaming.stream_features(
        settings, str(tmp_path / "raw"), str(tmp_path / "features"), chunk_rows=5
    )

    assert result is not None
    streamed = pl.read_parquet(tmp_path / "features" / "*.parquet")
    expected = _in_memory(settings, str(tmp_path / "raw"))
    assert_frame_equal(_sorted(streamed), _sorted(expected), check_exact=True)
    assert [(Path(i.uri).name, i.rows) for i in result.inputs] == [
        (f"a{suffix}", first.height),
        (f"b{suffix}", raw.height - first.height),
    ]


@pytest.mark.parametrize(
    "ending", ["\n", "   \n", "\n \t\n\n", ",,,,\n , ,,,\n", '"",,,"",\n']
)
def test_blank_lines_at_the_end_of_a_csv_still_stream(
    tmp_path: Path, ending: str
) -> None:
    path = Path(_write(_raw(), tmp_path / "fleet.csv"))
    path.write_text(path.read_text() + ending)
    settings = Settings()

    result = streaming.stream_features(
        settings, str(path), str(tmp_path / "features"), chunk_rows=5
    )

    assert result is not None
    assert [i.rows for i in result.inputs] == [sum(LENGTHS.values())]
    streamed = pl.read_parquet(tmp_path / "features" / "*.parquet")
    expected = _in_memory(settings, str(path))
    assert_frame_equal(_sorted(streamed), _sorted(expected), check_exact=True)


def test_a_blank_line_falls_back_quietly_and_is_named_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = Path(_write(_raw(), tmp_path / "fleet.csv"))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines[:30], "\n", *lines[30:]]))  # becomes line 31
    with caplog.at_level(logging.INFO, logger="sagewatch"):
        assert (
            streaming.stream_features(
                Settings(), str(path), str(tmp_path / "features"), chunk_rows=5
            )
            is None
        )
        with pytest.raises(InputError, match=r", line 31: the line has no values"):
            stage_features(Settings(), str(path), str(tmp_path / "f"), chunk_rows=5)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (
        logging.INFO,
        f"{path}: not streamed (a row has no entity value); validating in memory",
    ) in messages
    assert not any(level >= logging.WARNING for level, _ in messages)


def test_warnings_of_an_abandoned_stream_are_not_repeated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _raw()
    twice = pl.concat([raw.head(3), raw.slice(2, 1), raw.slice(3)])  # row 2 twice
    path = _write(twice, tmp_path / "fleet.csv")
    with caplog.at_level(logging.INFO, logger="sagewatch"):
        stage_features(Settings(), path, str(tmp_path / "features"), chunk_rows=5)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # the abandoned attempt warned of it too, with its chunk's counts
    assert [m for m in warned if "duplicate" in m] == [
        f"{path}: dropped 1 exact duplicate rows"
    ]
    validated = [
        r.getMessage() for r in caplog.records if "validated" in r.getMessage()
    ]
    assert len(validated) == 1
    assert validated[0].startswith(f"validated {path}: 69 rows in, 68 rows out")


def test_input_within_one_chunk_is_validated_in_memory(tmp_path: Path) -> None:
    raw = _write(_raw(), tmp_path / "raw" / "fleet.parquet")

    result = streaming.stream_features(
        Settings(), raw, str(tmp_path / "features"), chunk_rows=68
    )

    assert result is None
    assert not _written(tmp_path / "features")


def _gappy() -> pl.DataFrame:
    """pump-1 with missing readings mid-entity, a doubled step and a 1-row entity."""
    raw = _raw()
    temp = raw["temp"].to_list()
    temp[5] = temp[6] = None  # filled from row 4 (max_fill_gap=3)
    temp[30] = None
    times = raw["timestamp"].to_list()
    times[20:40] = [t + timedelta(seconds=10) for t in times[20:40]]
    return raw.with_columns(pl.Series("temp", temp), pl.Series("timestamp", times))


@pytest.mark.parametrize("chunk_rows", [4, 7, 13])
def test_streamed_quality_report_equals_in_memory_with_fills_and_gaps(
    tmp_path: Path, chunk_rows: int
) -> None:
    settings = Settings()
    raw = _write(_gappy(), tmp_path / "raw" / "fleet.parquet")
    _, _, quality = _validated(settings, raw)
    assert quality["repaired"] == {"forward_filled_values": 3}
    assert quality["time_gaps"] == 1

    result = streaming.stream_features(
        settings, raw, str(tmp_path / "features"), chunk_rows=chunk_rows
    )

    assert result is not None
    assert result.quality == quality
    streamed = pl.read_parquet(tmp_path / "features" / "*.parquet")
    assert_frame_equal(
        _sorted(streamed), _sorted(_in_memory(settings, raw)), check_exact=True
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("gap_at_piece_start", "rows dropped"),
        ("duplicate_across_pieces", "goes back in time|duplicate"),
        ("bad_value", "not a number"),
    ],
)
def test_pieces_that_need_the_whole_entity_fall_back_to_memory(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: str,
    reason: str,
) -> None:
    raw = _raw().with_columns(pl.col("temp").cast(pl.String))
    temp, times = raw["temp"].to_list(), raw["timestamp"].to_list()
    if change == "gap_at_piece_start":
        temp[10] = None  # pump-1's second piece of 10 rows starts here
    elif change == "duplicate_across_pieces":
        times[10] = times[9]
    else:
        temp[33] = "n/a?"
    raw = raw.with_columns(pl.Series("temp", temp), pl.Series("timestamp", times))
    uri = _write(raw, tmp_path / "raw" / "fleet.parquet")
    settings = Settings()
    caplog.set_level(logging.INFO, logger="sagewatch.streaming")

    result = streaming.stream_features(
        settings, uri, str(tmp_path / "features"), chunk_rows=10
    )

    assert result is None
    assert not _written(tmp_path / "features")
    assert any(re.search(reason, r.getMessage()) for r in caplog.records)
    if change == "bad_value":
        with pytest.raises(InputError, match="row 34, entity 'pump-1'"):
            stage_features(settings, uri, str(tmp_path / "f"), chunk_rows=10)
        return
    features, record = stage_features(settings, uri, str(tmp_path / "f"), chunk_rows=10)
    assert isinstance(features, pl.DataFrame)
    assert record.details["quality"] == _validated(settings, uri)[2]


def test_a_failed_write_on_the_writer_thread_stops_the_stage_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _write(_raw(), tmp_path / "raw" / "fleet.parquet")
    real, calls = _writers._write_parquet, []

    def write(part: pl.DataFrame, path: str, metadata: dict | None) -> None:
        calls.append(path)
        if len(calls) == 2:  # pump-3, after pump-2; the rest is appended
            raise StorageError(f"cannot write {path}: disk full")
        real(part, path, metadata)

    monkeypatch.setattr(_writers, "_write_parquet", write)
    with pytest.raises(StorageError, match="disk full"):
        streaming.stream_features(
            Settings(), raw, str(tmp_path / "features"), chunk_rows=5
        )
    assert len(calls) == 2
    assert not _written(tmp_path / "features")


def test_long_entity_is_cut_into_pieces_with_flags() -> None:
    frame = _raw()
    batches = (frame.slice(i, 6) for i in range(0, frame.height, 6))

    chunks = list(streaming.entity_chunks(batches, pl.col(ENTITY), 10))

    assert sum(c.frame.height for c in chunks) == frame.height
    assert pl.concat([c.frame for c in chunks]).equals(frame)
    pieces = [(c.frame[ENTITY][0], c.continues, c.open_end) for c in chunks]
    assert pieces[0] == ("pump-1", False, True)
    assert pieces[1] == ("pump-1", True, True)
    for chunk in chunks:
        names = chunk.frame[ENTITY].unique().to_list()
        assert chunk.open_end or len(names) >= 1


def test_chunks_of_whole_entities_stay_within_the_chunk_size() -> None:
    # Three entities of 6 rows, chunks of 10: one entity per chunk, never 12 rows.
    frame = pl.DataFrame(
        {"machine_id": ["a"] * 6 + ["b"] * 6 + ["c"] * 6, "v": range(18)}
    )
    batches = (frame.slice(i, 4) for i in range(0, frame.height, 4))

    chunks = list(streaming.entity_chunks(batches, pl.col(ENTITY), 10))

    assert [c.frame[ENTITY].unique().to_list() for c in chunks] == [["a"], ["b"], ["c"]]
    assert not any(c.continues or c.open_end for c in chunks)
    assert pl.concat([c.frame for c in chunks]).equals(frame)


def test_feature_chunks_end_before_the_file_that_would_outgrow_them(
    tmp_path: Path,
) -> None:
    files = []
    for name in ("a", "b", "c"):
        stamps = [START + timedelta(seconds=i) for i in range(6)]
        frame = pl.DataFrame({TIMESTAMP: stamps, ENTITY: name, "v": range(6)})
        files.append(_write(frame, tmp_path / f"features-{name}.parquet"))

    chunks = list(streaming.feature_chunks(files, 10))

    assert [c.frame.height for c in chunks] == [6, 6, 6]
    assert [c.frame[ENTITY][0] for c in chunks] == ["a", "b", "c"]


def test_runs_of_an_entity_spelled_with_spaces_are_one_entity() -> None:
    names = ["a", "a", " a", "a ", "b", "b", "a"]
    frame = pl.DataFrame({"id": names, "x": range(len(names))})
    key = pl.col("id").str.strip_chars()

    part = _chunks._Part.of(frame, key)

    assert part.starts.tolist() == [0, 4, 6]
    assert part.names == ["a", "b", "a"]
    with pytest.raises(streaming.NotGroupedError, match="entity 'a'"):
        list(streaming.entity_chunks(iter([frame.head(3), frame.tail(4)]), key, 100))


def test_interleaved_entities_are_refused_then_read_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _write(_raw().sort(TIMESTAMP), tmp_path / "raw" / "by_time.parquet")
    settings = Settings()

    with caplog.at_level(logging.INFO, logger="sagewatch"):
        streamed = streaming.stream_features(
            settings, raw, str(tmp_path / "features"), chunk_rows=3
        )
    assert streamed is None
    warned = [r for r in caplog.records if "not streamed" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert not _written(tmp_path / "features")
    features, record = stage_features(
        settings, raw, str(tmp_path / "again"), chunk_rows=3
    )
    assert isinstance(features, pl.DataFrame)
    assert record.rows_out == sum(LENGTHS.values())
    assert_frame_equal(_sorted(features), _sorted(_in_memory(settings, raw)))


@pytest.fixture(params=["pca", "autoencoder", "causal"])
def fitted(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, str, Detector]:
    settings = Settings()
    raw = _write(_raw(), tmp_path / "raw" / "fleet.parquet")
    features_dir = str(tmp_path / "features")
    stage_features(settings, raw, features_dir, chunk_rows=7)
    table = read_features(features_dir)
    names = feature_names(["temp", "vib"], settings.features.statistics)
    x = table.select(names).to_numpy()[:50]
    entity = table["machine_id"].to_numpy()[:50]
    held = np.arange(50) >= 40
    if request.param != "causal":
        model = ModelSettings(detector=request.param, epochs=2, hidden_dims=[8])
    else:
        # Tiles of 8 rows, so chunks and tiles both cut the entities of 40 and 23.
        monkeypatch.setattr(detector_module, "TILE_ROWS", 8)
        model = ModelSettings(architecture="causal", epochs=2, hidden_dims=[8, 8])
    detector = Detector(model).fit(x, entity, names, validation=held)
    return settings, features_dir, detector


@pytest.mark.parametrize("chunk_rows", [1, 4, 11, 67])
def test_streamed_scores_equal_in_memory(
    tmp_path: Path, fitted: tuple[Settings, str, Detector], chunk_rows: int
) -> None:
    settings, features_dir, detector = fitted
    out = tmp_path / "scores"

    uri, record = stage_score(
        settings, features_dir, detector, str(out), chunk_rows=chunk_rows
    )

    expected = score_features(read_features(features_dir), detector)
    assert uri == str(out / "anomaly_scores.parquet")
    assert_frame_equal(pl.read_parquet(uri), expected, check_exact=True)
    from_csv = pl.read_csv(out / "anomaly_scores.csv")
    assert from_csv.height == expected.height
    assert from_csv["anomaly_score"].to_list() == expected["anomaly_score"].to_list()
    assert record.rows_out == expected.height
    assert record.details["flagged"] == int(expected["is_anomaly"].sum())


def test_scoring_carries_context_rows_of_each_entity(
    tmp_path: Path,
    fitted: tuple[Settings, str, Detector],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, features_dir, detector = fitted
    if detector.context_rows == 0:  # make the PCA detector look back 3 rows
        monkeypatch.setattr(Detector, "context_rows", property(lambda self: 3))
    seen: list[pl.DataFrame] = []

    def spy(frame: pl.DataFrame, det: Detector, **kwargs) -> pl.DataFrame:
        seen.append(frame)
        return score_features(frame, det, **kwargs)

    monkeypatch.setattr(scoring, "score_features", spy)
    uri, _ = stage_score(settings, features_dir, detector, str(tmp_path), chunk_rows=5)

    table = read_features(features_dir)
    position = table.with_columns(pl.int_range(pl.len()).over(ENTITY).alias("pos"))
    assert len(seen) > 1  # the stage scored in several chunks
    for block in seen:
        first = block.head(1).join(position, on=[ENTITY, TIMESTAMP])
        assert first["pos"][0] == 0 or block.height > 5, "context missing"
        assert block.filter(pl.col(ENTITY) == block[ENTITY][0]).height >= min(
            first["pos"][0] + 1, 4
        )
    assert_frame_equal(pl.read_parquet(uri), score_features(table, detector))


def test_features_out_of_time_order_are_scored_whole(
    tmp_path: Path, fitted: tuple[Settings, str, Detector]
) -> None:
    settings, features_dir, detector = fitted
    shuffled = read_features(features_dir).sample(fraction=1.0, shuffle=True, seed=1)
    _write(shuffled, tmp_path / "mixed" / "features.parquet")

    scores, record = stage_score(
        settings, str(tmp_path / "mixed"), detector, str(tmp_path / "out"), chunk_rows=4
    )

    assert isinstance(scores, pl.DataFrame)
    expected = score_features(read_features(features_dir), detector)
    assert_frame_equal(scores, expected)
    assert record.rows_out == expected.height
