"""The detector: three kinds, save/load without pickle, context, attribution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sagewatch import detector as detector_module
from sagewatch import row_scores, storage
from sagewatch.config import ModelSettings, Settings
from sagewatch.detector import Detector
from sagewatch.errors import (
    ArtifactError,
    NotFittedError,
    SchemaMismatchError,
    StorageError,
)
from sagewatch.features import build_features, feature_names
from sagewatch.schema import ENTITY
from sagewatch.scoring import score_features
from sagewatch.synthetic import generate
from sagewatch.training import fit_detector

# "autoencoder" is its default (dense) architecture; "window" and "causal" name the
# convolutional ones.
KINDS = ("autoencoder", "window", "causal", "pca", "iforest")
FAST = {"epochs": 3, "iforest_trees": 20}
CONV = {"sequence_length": 8, "hidden_dims": [8], "encoding_dim": 4, "kernel_size": 3}


def _model(kind: str, **extra: object) -> ModelSettings:
    if kind == "window":
        return ModelSettings(**{**FAST, **CONV, "architecture": "window", **extra})
    if kind == "causal":
        causal = {"hidden_dims": [8, 8], "score_window": 8}
        return ModelSettings(
            **{**FAST, **CONV, "architecture": "causal", **causal, **extra}
        )
    return ModelSettings(**{**FAST, "detector": kind, **extra})


def _reference(rows: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two entities of three correlated sensors, one feature per sensor."""
    rng = np.random.default_rng(seed)
    load = np.sin(np.linspace(0, 6, rows))
    x = np.column_stack([load, 2 * load, -load]) + rng.normal(0, 0.05, (rows, 3))
    x[rows // 2 :] += 10.0  # the second entity runs at another level
    entity = np.array(["a"] * (rows // 2) + ["b"] * (rows - rows // 2))
    return x, entity


NAMES = ["s1__value", "s2__value", "s3__value"]


def _fitted(kind: str, **extra: object) -> Detector:
    x, entity = _reference()
    held = np.zeros(len(x), bool)
    held[50:60] = held[110:] = True
    return Detector(_model(kind, **extra)).fit(x, entity, NAMES, validation=held)


@pytest.mark.parametrize("kind", KINDS)
def test_detector_save_load_gives_identical_scores(kind: str, tmp_path: Path) -> None:
    detector = _fitted(kind)
    x, entity = _reference(seed=1)

    detector.save(str(tmp_path))
    loaded = Detector.load(str(tmp_path))

    before, contributions = detector.score_rows(x, entity)
    after, contributions_after = loaded.score_rows(x, entity)
    assert np.array_equal(before, after)
    assert np.array_equal(contributions, contributions_after)
    assert loaded.threshold_ == detector.threshold_
    assert loaded.context_rows == detector.context_rows
    meta = json.loads((tmp_path / "detector.json").read_text())
    assert meta["kind"] == ("autoencoder" if kind in ("window", "causal") else kind)
    assert meta["threshold"]["rule"] == "pot"
    assert meta["alarm"] == {"rule": "min_rows_of_window", "min_rows": 1, "window": 1}


@pytest.mark.parametrize("kind", ["autoencoder", "window", "causal", "pca"])
def test_detector_scores_an_outlier_above_normal_rows(kind: str) -> None:
    detector = _fitted(kind, epochs=30)
    x, entity = _reference(seed=2)
    x[100, 1] += 10.0  # s2 breaks its relation to the others in entity b

    score, contributions = detector.score_rows(x, entity)

    assert score.shape == (120,) and contributions.shape == (120, 3)
    assert score[100] > np.quantile(score, 0.95)
    assert detector.attribution(contributions)[100].argmax() == 1


def test_iforest_scores_a_point_off_the_data_above_normal_rows() -> None:
    detector = _fitted("iforest", iforest_trees=100)
    x, entity = _reference(seed=2)
    # Axis-parallel splits cannot isolate a point beyond the range of one sensor
    # any faster than the most extreme reference row; off the joint pattern of
    # all three sensors it is isolated quickly.
    x[100] += [10.0, 10.0, 10.0]

    score = detector.score_samples(x, entity)

    assert score[100] > np.quantile(score, 0.98)
    assert score[100] > 0.65  # ordinary rows score about 0.5 and below


@pytest.fixture
def causal_in_tiles_of_16(monkeypatch: pytest.MonkeyPatch) -> Detector:
    monkeypatch.setattr(detector_module, "TILE_ROWS", 16)
    return _fitted("causal")


def test_causal_scores_do_not_depend_on_where_a_block_starts(
    causal_in_tiles_of_16: Detector,
) -> None:
    detector = causal_in_tiles_of_16
    x, entity = _reference(seed=3)
    position = np.r_[np.arange(60), np.arange(60)]
    whole, contributions = detector.score_rows(x, entity)
    context = detector.context_rows
    assert context == 12 + 7 + 15  # network, score window - 1, tile - 1

    for start in (1, 17, 40, 61, 75, 100, 119):
        lead = min(start, context)
        part, part_contributions = detector.score_rows(
            x[start - lead :], entity[start - lead :], position[start - lead :]
        )
        assert np.array_equal(part[lead:], whole[start:]), start
        assert np.array_equal(part_contributions[lead:], contributions[start:])


def test_causal_tiles_take_the_detectors_tile_rows(
    monkeypatch: pytest.MonkeyPatch, causal_in_tiles_of_16: Detector
) -> None:
    x, entity = _reference(seed=3)
    shapes = []
    tile_index = row_scores.tile_index

    def spy(*args: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index, tile_of, offset = tile_index(*args)
        shapes.append(index.shape)
        return index, tile_of, offset

    monkeypatch.setattr(row_scores, "tile_index", spy)
    causal_in_tiles_of_16.score_rows(x, entity)

    assert shapes == [(8, 19 + 16)]  # 4 tiles per entity of 60 rows, after 19 rows


def test_causal_row_ignores_later_rows_and_rows_beyond_its_receptive_field() -> None:
    detector = _fitted("causal")
    x, entity = _reference(seed=3)
    before = detector.score_samples(x, entity)
    field = detector.receptive_field  # 12 + 7
    assert field == 19

    changed = x.copy()
    changed[40] += 5.0  # entity a, row 40
    after = detector.score_samples(changed, entity)

    assert np.array_equal(after[:40], before[:40])  # earlier rows: untouched
    assert (after[40 : 40 + field + 1] != before[40 : 40 + field + 1]).all()
    assert np.array_equal(after[40 + field + 1 :], before[40 + field + 1 :])


@pytest.mark.parametrize("kind", ["autoencoder", "pca", "iforest", "window", "causal"])
def test_scores_do_not_depend_on_where_a_block_starts(kind: str) -> None:
    # Wide enough that matrix products use their blocked kernels, long enough
    # that scoring cuts it into several calls; OpenBLAS rounds rows near the
    # edges of its internal panels (every 2048 rows on some CPUs) differently.
    rng = np.random.default_rng(4)
    rows, width = 9_000, 18
    x = rng.normal(size=(rows, width)) + np.sin(np.arange(rows) / 50)[:, None]
    entity = np.repeat(["a", "b"], [5_000, 4_000])
    names = [f"s{j // 3}__{stat}" for j, stat in enumerate(["v", "m", "d"] * 6)]
    held = np.zeros(rows, bool)
    held[4_500:5_000] = held[8_500:] = True
    detector = Detector(_model(kind)).fit(x, entity, names, validation=held)
    position = np.r_[np.arange(5_000), np.arange(4_000)]
    whole, contributions = detector.score_rows(x, entity, position)
    context = detector.context_rows
    expected = {"autoencoder": 11, "pca": 0, "iforest": 0}  # dense: score window - 1
    assert context == expected.get(kind, context)

    for start in (1, 11, 12, 40, 300, 2_040, 4_999, 5_003, 8_191, 8_200):
        lead = min(start, context)
        part, part_contributions = detector.score_rows(
            x[start - lead :], entity[start - lead :], position[start - lead :]
        )
        assert np.array_equal(part[lead:], whole[start:]), start
        assert np.array_equal(part_contributions[lead:], contributions[start:])


def test_dense_row_score_averages_the_errors_of_its_score_window() -> None:
    detector = _fitted("autoencoder", score_window=4)
    x, entity = _reference(seed=3)
    single = _fitted("autoencoder", score_window=1).score_samples(x, entity)

    score = detector.score_samples(x, entity)

    # Same seed and data: the two detectors share their network.
    assert score[70] == pytest.approx(single[67:71].mean(), rel=1e-12)
    # An entity's first rows: its first row stands in for the missing ones.
    assert score[61] == pytest.approx((3 * single[60] + single[61]) / 4, rel=1e-12)


def test_dense_defaults_scale_with_the_features() -> None:
    detector = _fitted("autoencoder")

    network = detector.model_[0]

    assert detector.hidden_dims == [2]  # round(3/4 of 3 features)
    assert (network.hidden_dims, network.encoding_dim) == ([2], 1)
    assert detector.training_["encoding_dim"] == 1


def test_detector_context_rows() -> None:
    assert Detector(_model("autoencoder")).context_rows == 11
    assert Detector(_model("window")).context_rows == 7
    assert Detector(_model("window", alarm_window=5)).context_rows == 11
    assert Detector(_model("pca")).context_rows == 0
    assert (
        Detector(_model("iforest", alarm_window=3, alarm_min_rows=2)).context_rows == 2
    )


def test_detector_not_fitted() -> None:
    with pytest.raises(NotFittedError):
        Detector(_model("pca")).score_rows(np.zeros((2, 3)), np.array(["a", "a"]))


def test_detector_needs_two_training_rows() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Detector(_model("pca")).fit(np.zeros((1, 3)), np.array(["a"]), NAMES)


def test_detector_without_held_out_rows_says_so() -> None:
    x, entity = _reference()

    detector = Detector(_model("pca")).fit(x, entity, NAMES)

    assert detector.threshold_rule_["computed_on"].startswith("training rows")


def test_detector_quantile_rule_and_margin() -> None:
    detector = _fitted("pca", threshold_rule="quantile", threshold_margin=2.0)
    plain = _fitted("pca", threshold_rule="quantile")

    assert detector.threshold_ == pytest.approx(2 * plain.threshold_)
    assert detector.threshold_rule_["quantile"] == 0.995


def test_detector_unseen_entity_uses_pooled_centre() -> None:
    detector = _fitted("pca")
    x, _ = _reference(seed=3)

    score = detector.score_samples(x[:10], np.array(["new"] * 10))

    assert np.all(np.isfinite(score))


@pytest.mark.parametrize("kind", ["autoencoder", "causal"])
def test_an_ensemble_is_saved_and_loaded_whole(kind: str, tmp_path: Path) -> None:
    detector = _fitted(kind, ensemble_size=2)
    x, entity = _reference(seed=1)

    detector.save(str(tmp_path))
    loaded = Detector.load(str(tmp_path))

    assert len(loaded.model_) == 2
    assert np.array_equal(
        detector.score_rows(x, entity)[0], loaded.score_rows(x, entity)[0]
    )


@pytest.mark.parametrize("earlier", [True, False])
def test_a_save_whose_detector_json_fails_keeps_the_previous_detector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier: bool
) -> None:
    x, entity = _reference(seed=1)
    old = _fitted("pca")
    if earlier:
        old.save(str(tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    new = _fitted("pca", pca_variance=0.5)
    write_json = storage.write_json

    def refuse_metadata(uri: str, obj: object) -> storage.FileInfo:
        if uri.endswith("detector.json"):
            raise StorageError(f"cannot write {uri}: access denied")
        return write_json(uri, obj)

    monkeypatch.setattr(storage, "write_json", refuse_metadata)
    with pytest.raises(StorageError, match="access denied"):
        new.save(str(tmp_path))

    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if earlier:
        loaded = Detector.load(str(tmp_path))
        assert np.array_equal(
            loaded.score_rows(x, entity)[0], old.score_rows(x, entity)[0]
        )


def test_load_refuses_tampered_weights(tmp_path: Path) -> None:
    _fitted("pca").save(str(tmp_path))
    (tmp_path / "weights.pt").write_bytes(b"not the weights")

    with pytest.raises(ArtifactError, match="checksum"):
        Detector.load(str(tmp_path))


def test_load_refuses_other_format_version(tmp_path: Path) -> None:
    _fitted("pca").save(str(tmp_path))
    meta = json.loads((tmp_path / "detector.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "detector.json").write_text(json.dumps(meta))

    with pytest.raises(ArtifactError, match="format 1"):
        Detector.load(str(tmp_path))


def test_load_refuses_a_folder_without_metadata(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no detector\.json"):
        Detector.load(str(tmp_path))


def test_check_columns_names_missing_sensor() -> None:
    with pytest.raises(SchemaMismatchError, match="s3"):
        _fitted("pca").check_columns(["s1__value", "s2__value"], "scores.csv")


# ---------------------------------------------------------------- on features


def _synthetic_features(settings: Settings) -> tuple[pl.DataFrame, list[str]]:
    frame = generate(settings.generate, seed=settings.model.seed)
    sensors = [c for c in frame.columns if c not in {"timestamp", ENTITY, "anomaly"}]
    sensors = [s for s in sensors if s != "anomaly_kind"]
    frame = frame.rename({"anomaly": "label"})
    features = build_features(frame, sensors, settings.features, ["anomaly_kind"])
    return features, feature_names(sensors, settings.features.statistics)


def test_chunked_scoring_equals_whole_table(small_settings: Settings) -> None:
    settings = small_settings.with_overrides(
        {**FAST, "alarm_window": 3, "alarm_min_rows": 2}
    )
    features, columns = _synthetic_features(settings)
    detector, _ = fit_detector(features, columns, settings)

    whole = score_features(features, detector)
    chunked = score_features(features, detector, batch_rows=37)

    assert whole.equals(chunked)


def test_same_seed_gives_identical_scores(small_settings: Settings) -> None:
    settings = small_settings.with_overrides(FAST)
    features, columns = _synthetic_features(settings)

    first = score_features(features, fit_detector(features, columns, settings)[0])
    second = score_features(features, fit_detector(features, columns, settings)[0])

    assert first.equals(second)


@pytest.mark.parametrize("kind", KINDS)
def test_attribution_names_the_sensor_with_the_injected_anomaly(
    kind: str, small_settings: Settings
) -> None:
    model = _model(kind, epochs=5).model_dump()
    settings = small_settings.with_overrides({**model, "anomaly_fraction": 0.0})
    features, columns = _synthetic_features(settings)
    detector, _ = fit_detector(features, columns, settings)
    raw = generate(settings.generate, seed=settings.model.seed)
    # Shift one sensor of one machine by 8 of its reference standard deviations
    # for 40 rows after the reference period.
    machine = raw["machine_id"][0]
    rows = (raw["machine_id"] == machine) & pl.int_range(raw.height).is_between(
        300, 339
    )
    spread = float(raw["pressure"][:200].std())
    raw = raw.with_columns(
        pl.when(rows)
        .then(pl.col("pressure") + 8 * spread)
        .otherwise(pl.col("pressure"))
        .alias("pressure")
    )
    sensors = [c for c in raw.columns if c not in {"timestamp", ENTITY, "anomaly"}]
    sensors = [s for s in sensors if s != "anomaly_kind"]
    shifted = build_features(raw, sensors, settings.features)

    scores = score_features(shifted, detector)

    flagged = scores.filter(rows & (pl.col("is_anomaly") == 1))
    # Isolation Forest rarely splits on the 2 of 30 features the shift moves, so
    # it flags few of these rows; the reconstruction models flag most of them.
    assert flagged.height >= (3 if kind == "iforest" else 30)
    share = (flagged["top_sensor"] == "pressure").mean()
    assert share > 0.8, flagged["top_sensor"].value_counts()


def test_load_refuses_weights_of_the_other_architecture(tmp_path: Path) -> None:
    _fitted("causal").save(str(tmp_path))
    meta = json.loads((tmp_path / "detector.json").read_text())
    meta["model_settings"]["architecture"] = "window"
    (tmp_path / "detector.json").write_text(json.dumps(meta))

    with pytest.raises(ArtifactError, match="architecture type 'causal' differs"):
        Detector.load(str(tmp_path))


def test_causal_code_as_wide_as_the_sensors_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="sagewatch.training"):
        _fitted("causal", encoding_dim=3)

    assert "encoding_dim=3 is not below the number of sensors (3)" in caplog.text


def test_entities_no_longer_than_the_warm_up_are_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sagewatch.scoring import warn_short_entities

    with caplog.at_level("WARNING", logger="sagewatch.scoring"):
        warn_short_entities({"a": 30, "b": 7, "c": 8}, warmup=7)

    assert "1 entity has no more rows than the 7 warm-up rows" in caplog.text
    assert caplog.text.rstrip().endswith("be flagged: ['b']")
