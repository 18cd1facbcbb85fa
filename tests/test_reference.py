"""Reference rows read block by block: a table in memory, its feature files and
arrays give the same layout, the same blocks and the same detector."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sagewatch import models, streaming
from sagewatch.config import Settings
from sagewatch.errors import InputError
from sagewatch.features import build_features, feature_names
from sagewatch.pipeline import stage_train
from sagewatch.reference import ArrayReference, FileReference, TableReference
from sagewatch.schema import ENTITY, TIMESTAMP
from sagewatch.training import reference_mask

# Longer and shorter than a block (8 rows here) and a batch (5 rows), one row alone.
LENGTHS = {"m-a": 90, "m-b": 7, "m-c": 1, "m-d": 64}
START = datetime(2024, 3, 1, tzinfo=UTC)
MODEL = {"epochs": 2, "hidden_dims": [4], "batch_size": 16}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "BLOCK_ROWS", 8)


def _settings(**overrides: object) -> Settings:
    return Settings().with_overrides({**MODEL, **overrides})


def _features(settings: Settings, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    parts = [
        pl.DataFrame(
            {
                TIMESTAMP: [START + timedelta(minutes=i) for i in range(n)],
                ENTITY: name,
                "temp": rng.normal(70, 2, n).round(3),
                "vib": rng.normal(1, 0.1, n).round(4),
            }
        ).with_columns(pl.col(TIMESTAMP).dt.cast_time_unit("us"))
        for name, n in LENGTHS.items()
    ]
    return build_features(pl.concat(parts), ["temp", "vib"], settings.features)


def _columns(settings: Settings) -> list[str]:
    return feature_names(["temp", "vib"], settings.features.statistics)


def _files(frame: pl.DataFrame, folder: Path) -> str:
    streaming.write_features(frame, str(folder))
    return str(folder)


def _file_reference(folder: str, settings: Settings) -> FileReference:
    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    return FileReference(files, _columns(settings), settings, batch_rows=5)


def _blocks(reference) -> list[tuple[int, int, list]]:
    return [(b.run, b.start, b.x.tolist()) for b in reference.blocks()]


@pytest.mark.parametrize(
    "rule",
    [
        {"train_rows": 30},
        {"train_until": "2024-03-01T00:20:00"},
        {"train_fraction": 0.4},
    ],
    ids=["train-rows", "train-until", "train-fraction"],
)
def test_layout_is_the_reference_mask_and_its_held_out_tail(
    tmp_path: Path, rule: dict[str, object]
) -> None:
    settings = _settings(**rule, validation_fraction=0.25)
    frame = _features(settings)
    ref = frame.filter(reference_mask(frame, settings.reference))
    per_entity = ref.group_by(ENTITY, maintain_order=True).agg(pl.len())
    held = (pl.col("len") * 0.25).floor().cast(pl.Int64)  # the tail, rounded down
    expected = per_entity.with_columns(held.alias("held")).rows()

    table = TableReference(frame, _columns(settings), settings)
    files = _file_reference(_files(frame, tmp_path / "f"), settings)

    for reference in (table, files):
        layout = reference.layout
        assert layout.names == [name for name, _, _ in expected]
        assert layout.rows.tolist() == [rows for _, rows, _ in expected]
        assert layout.held.tolist() == [held for _, _, held in expected]
        assert reference.height == sum(LENGTHS.values())


def test_files_and_table_give_the_same_blocks_fingerprint_and_ends(
    tmp_path: Path,
) -> None:
    settings = _settings(train_rows=70)
    frame = _features(settings)
    table = TableReference(frame, _columns(settings), settings)
    per_entity = _file_reference(_files(frame, tmp_path / "f"), settings)
    one_file = tmp_path / "one" / "all.parquet"
    one_file.parent.mkdir()
    frame.write_parquet(one_file)
    single = FileReference([str(one_file)], _columns(settings), settings, batch_rows=3)

    expected = _blocks(table)
    assert [(r, s) for r, s, _ in expected][:3] == [(0, 0), (0, 8), (0, 16)]
    assert max(len(x) for _, _, x in expected) == 8
    assert sum(len(x) for _, _, x in expected) == 70 + 7 + 1 + 64
    for reference in (per_entity, single):
        assert _blocks(reference) == expected
        assert reference.sha256 == table.sha256
        assert reference.reference_end == table.reference_end
    assert table.reference_end["m-a"] == "2024-03-01T01:09:00+00:00"
    assert _blocks(table) == expected  # a second pass reads the same rows


def test_entity_without_reference_rows_is_listed(tmp_path: Path) -> None:
    settings = _settings(train_until="2024-03-01T00:00:00")
    frame = _features(settings).with_columns(
        pl.when(pl.col(ENTITY) == "m-b")
        .then(pl.col(TIMESTAMP) + timedelta(days=1))
        .otherwise(pl.col(TIMESTAMP))
        .alias(TIMESTAMP)
    )

    reference = _file_reference(_files(frame, tmp_path / "f"), settings)

    assert reference.without_reference == ["m-b"]
    assert reference.layout.names == ["m-a", "m-c", "m-d"]
    assert reference.layout.rows.tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"detector": "pca"},
        {"architecture": "causal", "hidden_dims": [4, 4], "sequence_length": 8},
    ],
    ids=["dense", "pca", "causal"],
)
def test_feature_files_train_the_same_detector_as_the_table(
    tmp_path: Path, model: dict[str, object]
) -> None:
    settings = _settings(**model, max_train_samples=40, max_calibration_rows=30)
    frame = _features(settings)
    folder = _files(frame, tmp_path / "f")

    _, from_table = stage_train(settings, frame, str(tmp_path / "m1"))
    _, from_files = stage_train(settings, folder, str(tmp_path / "m2"))

    weights = [(tmp_path / m / "weights.pt").read_bytes() for m in ("m1", "m2")]
    assert weights[0] == weights[1]
    meta = [
        json.loads((tmp_path / m / "detector.json").read_text()) for m in ("m1", "m2")
    ]
    for key in ("scaler", "threshold", "training_data_sha256", "reference"):
        assert meta[0][key] == meta[1][key], key
    assert from_table.rows_in == from_files.rows_in == sum(LENGTHS.values())
    assert [i["uri"] for i in from_files.inputs] == sorted(
        str(p) for p in (tmp_path / "f").glob("*.parquet")
    )
    assert [i["rows"] for i in from_files.inputs] == list(LENGTHS.values())


def test_float32_feature_files_give_the_table_detector(tmp_path: Path) -> None:
    settings = _settings()
    frame = _features(settings).with_columns(
        pl.col(_columns(settings)).cast(pl.Float32)
    )

    table, _ = stage_train(settings, frame, str(tmp_path / "m1"))
    files, _ = stage_train(
        settings, _files(frame, tmp_path / "f"), str(tmp_path / "m2")
    )

    assert files.threshold_ == table.threshold_
    assert np.array_equal(files.scaler_.scale_, table.scaler_.scale_)
    # 45 reference rows of 90, the last 9 held out: the centre of 36 rows
    value = frame.filter(pl.col(ENTITY) == "m-a")["temp__value"].head(36)
    assert table.scaler_.entity_center_["m-a"][0] == pytest.approx(
        value.cast(pl.Float64).mean(), rel=1e-12
    )


def test_files_out_of_order_are_read_whole_and_sorted(tmp_path: Path) -> None:
    settings = _settings()
    frame = _features(settings)
    backwards = tmp_path / "f" / "backwards.parquet"
    backwards.parent.mkdir()
    frame.sort(ENTITY, descending=True, maintain_order=True).write_parquet(backwards)

    with pytest.raises(streaming.NotGroupedError, match="entity 'm-c' after 'm-d'"):
        _file_reference(str(backwards.parent), settings)
    table, _ = stage_train(settings, frame, str(tmp_path / "m1"))
    files, record = stage_train(settings, str(backwards), str(tmp_path / "m2"))

    assert files.threshold_ == table.threshold_
    assert record.inputs[0]["rows"] == frame.height  # read whole, as tracked


def test_missing_reference_value_is_refused_and_later_ones_not_read(
    tmp_path: Path,
) -> None:
    settings = _settings(train_rows=20)
    frame = _features(settings)
    late = pl.int_range(pl.len()).over(ENTITY) == 50
    folder = _files(
        frame.with_columns(
            pl.when(late)
            .then(float("nan"))
            .otherwise(pl.col("vib__std"))
            .alias("vib__std")
        ),
        tmp_path / "late",
    )
    stage_train(settings, folder, str(tmp_path / "m1"))  # row 50: not read

    early = (pl.int_range(pl.len()).over(ENTITY) == 3) & (pl.col(ENTITY) == "m-d")
    folder = _files(
        frame.with_columns(
            pl.when(early)
            .then(None)
            .otherwise(pl.col("temp__mean"))
            .alias("temp__mean")
        ),
        tmp_path / "early",
    )
    with pytest.raises(InputError) as info:
        stage_train(settings, folder, str(tmp_path / "m2"))
    assert str(info.value).startswith(
        f"{folder}: entity 'm-d', row 3: missing or non-finite temp__mean in the "
        "reference period;"
    )
    assert not (tmp_path / "m2").exists()


def test_held_out_rows_must_be_the_tail_of_each_entity() -> None:
    x = np.zeros((6, 2))
    entity = np.array(["a"] * 3 + ["b"] * 3)

    tail = ArrayReference(x, entity, np.array([0, 1, 1, 0, 0, 1], bool))
    assert tail.layout.held.tolist() == [2, 1]
    with pytest.raises(ValueError, match="last rows of each entity"):
        ArrayReference(x, entity, np.array([1, 0, 0, 0, 0, 0], bool))
