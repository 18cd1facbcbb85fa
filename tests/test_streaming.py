"""Chunked stages give the same results as the in-memory path, bit for bit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from sagewatch import scoring, streaming
from sagewatch.config import ModelSettings, Settings
from sagewatch.detector import Detector
from sagewatch.features import build_features, feature_names
from sagewatch.pipeline import read_features, stage_features, stage_score
from sagewatch.schema import ENTITY, TIMESTAMP, load_raw
from sagewatch.scoring import score_features

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
    data = load_raw(uri, settings.data, settings.quality)
    return build_features(data.frame, data.sensors, settings.features, data.passthrough)


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort([ENTITY, TIMESTAMP])


@pytest.mark.parametrize("chunk_rows", [1, 5, 9, 1000])
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_streamed_features_equal_in_memory(
    tmp_path: Path, chunk_rows: int, suffix: str
) -> None:
    settings = Settings()
    raw = _write(_raw(), tmp_path / "raw" / f"fleet{suffix}")

    result = streaming.stream_features(
        settings, raw, str(tmp_path / "features"), chunk_rows=chunk_rows
    )

    streamed = pl.read_parquet(tmp_path / "features" / "*.parquet")
    expected = _in_memory(settings, raw)
    assert_frame_equal(_sorted(streamed), _sorted(expected), check_exact=True)
    assert result.rows_out == sum(LENGTHS.values())
    assert result.quality["rows_in"] == sum(LENGTHS.values())
    assert sorted(Path(o.uri).name for o in result.outputs) == [
        f"features-{name}.parquet" for name in sorted(LENGTHS)
    ]


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


def test_interleaved_entities_are_refused_then_read_whole(tmp_path: Path) -> None:
    raw = _write(_raw().sort(TIMESTAMP), tmp_path / "raw" / "by_time.parquet")
    settings = Settings()

    with pytest.raises(streaming.NotGroupedError, match="not contiguous"):
        streaming.stream_features(
            settings, raw, str(tmp_path / "features"), chunk_rows=3
        )
    features, record = stage_features(
        settings, raw, str(tmp_path / "again"), chunk_rows=3
    )
    assert isinstance(features, pl.DataFrame)
    assert record.rows_out == sum(LENGTHS.values())
    assert_frame_equal(_sorted(features), _sorted(_in_memory(settings, raw)))


@pytest.fixture(params=["pca", "autoencoder"])
def fitted(
    tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Settings, str, Detector]:
    settings = Settings()
    raw = _write(_raw(), tmp_path / "raw" / "fleet.parquet")
    features_dir = str(tmp_path / "features")
    stage_features(settings, raw, features_dir, chunk_rows=7)
    table = read_features(features_dir)
    names = feature_names(["temp", "vib"], settings.features.statistics)
    x = table.select(names).to_numpy()
    model = ModelSettings(detector=request.param, epochs=2, hidden_dims=[8])
    detector = Detector(model).fit(x[:40], x[40:50], names)
    return settings, features_dir, detector


@pytest.mark.parametrize("chunk_rows", [1, 4, 11, 1000])
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
    detector.context_rows = 3  # a detector that looks back 3 rows per entity
    seen: list[pl.DataFrame] = []

    def spy(frame: pl.DataFrame, det: Detector, **kwargs) -> pl.DataFrame:
        seen.append(frame)
        return score_features(frame, det, **kwargs)

    monkeypatch.setattr(scoring, "score_features", spy)
    uri, _ = stage_score(settings, features_dir, detector, str(tmp_path), chunk_rows=5)

    table = read_features(features_dir)
    position = table.with_columns(pl.int_range(pl.len()).over(ENTITY).alias("pos"))
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
