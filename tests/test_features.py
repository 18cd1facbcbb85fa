"""Rolling features: hand-computed values, entity boundaries, degenerate input."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from sagewatch.config import DataSettings, FeatureSettings, QualitySettings
from sagewatch.errors import InputError
from sagewatch.features import (
    as_stored,
    build_features,
    feature_block,
    feature_names,
)
from sagewatch.schema import ENTITY, TIMESTAMP, validate

ALL = ["value", "mean", "std", "min", "max", "range", "slope", "change"]
X = [1.0, 3.0, 2.0, 5.0, 4.0, 4.0, 4.0, 10.0, 0.0, 2.0]
START = datetime(2024, 1, 1, tzinfo=UTC)
# Features are stored as float32: rounding to the nearest float32 moves a value by
# at most 2^-24 of itself. The float64 kernel adds at most ~1e-12 of its own.
F32 = 2.0**-24

# Window 3 over X, worked out by hand: mean, sample std, min, max, least-squares
# slope against the row index, difference to the previous row.
EXPECTED = {
    "mean": [1, 2, 2, 10 / 3, 11 / 3, 13 / 3, 4, 6, 14 / 3, 4],
    "std": [
        *(0, 2**0.5, 1, (7 / 3) ** 0.5, (7 / 3) ** 0.5, (1 / 3) ** 0.5),
        *(0, 12**0.5, (76 / 3) ** 0.5, 28**0.5),
    ],
    "min": [1, 1, 1, 2, 2, 4, 4, 4, 0, 0],
    "max": [1, 3, 3, 5, 5, 5, 4, 10, 10, 10],
    "range": [0, 2, 2, 3, 3, 1, 0, 6, 10, 10],
    "slope": [0, 2, 0.5, 1, 1, -0.5, 0, 3, -2, -4],
    "change": [0, 2, -1, 3, -1, 0, 0, 6, -10, 2],
}


def _table(entities: dict[str, list[float]], **extra: list[float]) -> pl.DataFrame:
    rows = [(e, i, v) for e, values in entities.items() for i, v in enumerate(values)]
    frame = pl.DataFrame(
        {
            TIMESTAMP: [START + timedelta(minutes=i) for _, i, _ in rows],
            ENTITY: [e for e, _, _ in rows],
            "x": [v for _, _, v in rows],
        }
    )
    return frame.with_columns(**{k: pl.Series(v) for k, v in extra.items()})


def _features(frame: pl.DataFrame, window: int, sensors=("x",)) -> pl.DataFrame:
    settings = FeatureSettings(rolling_window=window, statistics=ALL)
    return build_features(frame, list(sensors), settings)


def _brute_force(values: list[float], window: int) -> dict[str, list[float]]:
    """The definition, one window at a time, in plain Python."""
    out: dict[str, list[float]] = {s: [] for s in ALL}
    for t in range(len(values)):
        win = values[max(0, t - window + 1) : t + 1]
        n = len(win)
        mean = sum(win) / n
        dev = [v - mean for v in win]
        index = [i - (n - 1) / 2 for i in range(n)]
        sxx = sum(i * i for i in index)
        out["value"].append(values[t])
        out["mean"].append(mean)
        out["std"].append(math.sqrt(sum(d * d for d in dev) / (n - 1)) if n > 1 else 0)
        out["min"].append(min(win))
        out["max"].append(max(win))
        out["range"].append(max(win) - min(win))
        out["slope"].append(
            sum(i * d for i, d in zip(index, dev, strict=True)) / sxx if n > 1 else 0
        )
        out["change"].append(values[t] - values[t - 1] if t else 0.0)
    return out


def test_every_statistic_matches_hand_computed_values() -> None:
    out = _features(_table({"m1": X}), window=3)

    assert out.columns == [TIMESTAMP, ENTITY, *feature_names(["x"], ALL)]
    assert out["x__value"].to_list() == X
    for stat, expected in EXPECTED.items():
        assert out[f"x__{stat}"].to_list() == pytest.approx(
            expected, rel=F32 + 1e-12, abs=1e-12
        ), stat


@pytest.mark.parametrize("window", [2, 3, 4, 5, 7, 8, 12, 13, 31])
def test_matches_the_definition_for_any_window(window: int) -> None:
    rng = np.random.default_rng(window)
    entities = {
        f"m{i}": (rng.normal(70, 3, int(n)).round(3)).tolist()
        for i, n in enumerate(rng.integers(1, 45, 9))
    }
    out = _features(_table(entities), window)

    for name, values in entities.items():
        got = out.filter(pl.col(ENTITY) == name)
        for stat, expected in _brute_force(values, window).items():
            assert got[f"x__{stat}"].to_list() == pytest.approx(
                expected, rel=F32 + 1e-11, abs=1e-11
            ), (window, name, stat)


def test_windows_never_cross_entities() -> None:
    alone = _features(_table({"b": X}), window=4)
    after_other = _features(_table({"a": [100.0, -50.0, 7.0], "b": X}), window=4)

    b = after_other.filter(pl.col(ENTITY) == "b").drop(TIMESTAMP)
    assert b.equals(alone.drop(TIMESTAMP))
    assert after_other["x__change"][3] == 0.0
    assert after_other["x__std"][3] == 0.0


def test_constant_sensor_has_exactly_zero_spread_and_slope() -> None:
    out = _features(_table({"m1": [96.1234] * 30}), window=12)

    for stat in ("std", "range", "slope", "change"):
        assert out[f"x__{stat}"].to_list() == [0.0] * 30, stat
    # The float64 mean of a constant window is exact, so it rounds like the reading.
    assert out["x__mean"].to_list() == [float(np.float32(96.1234))] * 30


def test_one_row_entity_and_window_longer_than_entity() -> None:
    out = _features(_table({"a": [5.0], "b": [1.0, 3.0]}), window=12)

    assert out.row(0, named=True) | {TIMESTAMP: None} == {
        TIMESTAMP: None,
        ENTITY: "a",
        **{
            f"x__{s}": v
            for s, v in zip(ALL, [5.0, 5.0, 0, 5.0, 5.0, 0, 0, 0], strict=True)
        },
    }
    assert out["x__slope"].to_list() == [0.0, 0.0, 2.0]
    assert out["x__std"].to_list() == pytest.approx([0.0, 0.0, 2**0.5])


def _block(values, starts, lead, settings, dtype, **kwargs) -> np.ndarray:
    shape = (values.shape[0], len(settings.statistics), values.shape[1])
    out = np.empty(shape, dtype=dtype)
    return feature_block(values, starts, lead, settings, out=out, **kwargs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blocks_give_identical_bits_wherever_they_are_cut(dtype) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(50, 10, (2, 500))
    settings = FeatureSettings(rolling_window=12, statistics=ALL)
    starts = np.array([0, 137, 139, 400])
    whole = _block(values, starts, 0, settings, dtype)

    for cut in (1, 5, 11, 12, 13, 137, 138, 150, 499):
        context = min(11, cut)
        begin = cut - context
        owner = int(np.searchsorted(starts, begin, side="right") - 1)
        inside = starts[(starts > begin)] - begin
        lead = begin - starts[owner]
        part = _block(values[:, begin:], inside, lead, settings, dtype)
        assert np.array_equal(part[:, context:], whole[:, cut:]), cut


@pytest.mark.parametrize("window", [2, 5, 12])
def test_float32_features_are_the_float64_ones_rounded_once(window: int) -> None:
    # A level of 1e7 moving by about 0.1 (float32 steps are 1 there): rounding
    # intermediate results to float32 would show in every statistic.
    rng = np.random.default_rng(window)
    values = 1e7 + rng.normal(0, 0.1, (3, 9_000)).cumsum(axis=1)
    values[1] = rng.normal(0, 1e-3, 9_000)
    settings = FeatureSettings(rolling_window=window, statistics=ALL)
    starts = np.array([0, 1, 3, 4_100, 4_101, 8_999])
    exact = feature_block(values, starts, 0, settings)  # (features, rows)

    for threads in (1, 3):  # blocks of 4096 rows computed in turn or at once
        stored = _block(values, starts, 0, settings, np.float32, threads=threads)
        assert stored.dtype == np.float32
        assert np.array_equal(stored, exact.astype(np.float32)), threads
    # At level 1e7 the readings lose their decimals; the spread, taken in float64
    # before rounding, keeps float32's relative precision.
    value = [s * len(ALL) + ALL.index("value") for s in (0, 2)]
    std = [s * len(ALL) + ALL.index("std") for s in (0, 2)]
    assert np.abs(stored[value] - exact[value]).max() > 0.1
    assert (np.abs(stored[std] - exact[std]) <= F32 * exact[std]).all()


def test_build_features_stores_float32_features_only() -> None:
    frame = _table({"m1": X, "m2": X[::-1]}, label=[0] * 19 + [1])
    out = _features(frame, window=4)

    features = feature_names(["x"], ALL)
    assert [out.schema[c] for c in features] == [pl.Float32] * len(ALL)
    assert out.schema["label"] == pl.Int64
    values = frame["x"].to_numpy()[None, :]
    settings = FeatureSettings(rolling_window=4, statistics=ALL)
    exact = feature_block(values, np.array([0, 10]), 0, settings)
    assert np.array_equal(out.select(features).to_numpy().T, exact.astype(np.float32))


def test_as_stored_rounds_float64_feature_columns_only() -> None:
    wide = pl.DataFrame(
        {
            ENTITY: ["a", "a"],
            "x__mean": [0.1, 1e7 + 0.3],
            "x__std": pl.Series([0.5, 0.25], dtype=pl.Float32),
            "reading": [0.1, 0.2],  # a passthrough column, not a feature
        }
    )

    stored = as_stored(wide)

    assert stored.schema["x__mean"] == pl.Float32
    assert stored["x__mean"].to_list() == [float(np.float32(0.1)), 1e7]
    assert stored.drop("x__mean").equals(wide.drop("x__mean"))
    assert as_stored(stored) is stored


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_reused_output_array_gives_the_same_features(dtype) -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(5, 1, (2, 300))
    settings = FeatureSettings(rolling_window=12, statistics=ALL)
    starts = np.array([0, 40, 41])
    fresh = _block(values, starts, 0, settings, dtype)
    stale = np.full((2, len(ALL), 300), 7.0, dtype)  # left over from a block before

    for lead in (0, 3):  # the block starts its entity, or 3 rows into it
        got = feature_block(values, starts[1:], lead, settings, out=stale)
        blank = np.full_like(stale, np.nan)
        want = feature_block(values, starts[1:], lead, settings, out=blank)
        assert np.array_equal(got, want, equal_nan=True), lead
    # Rows 8-10 would need rows from before the block for a full window: context.
    assert np.isnan(got[:, 8:11]).all()
    assert np.isfinite(got[:, :8]).all() and np.isfinite(got[:, 11:]).all()
    got = feature_block(values, starts, 0, settings, out=stale)
    assert np.array_equal(got, fresh)
    assert np.shares_memory(got, stale)


def test_several_sensors_and_passthrough_columns() -> None:
    frame = _table({"m1": X}, y=[v * 2 for v in X], label=[0] * 9 + [1])
    out = build_features(
        frame,
        ["x", "y"],
        FeatureSettings(rolling_window=3, statistics=["mean", "slope"]),
        passthrough=[],
    )

    assert out.columns == [
        TIMESTAMP,
        ENTITY,
        "x__mean",
        "x__slope",
        "y__mean",
        "y__slope",
        "label",
    ]
    assert out["y__slope"].to_list() == pytest.approx(
        [2 * v for v in EXPECTED["slope"]]
    )


def test_interleaved_entities_are_refused() -> None:
    frame = _table({"a": [1.0, 2.0], "b": [3.0]}).sort(TIMESTAMP)

    with pytest.raises(InputError, match="not contiguous"):
        _features(frame, window=3)


def test_unsorted_input_is_sorted_upstream_then_matches() -> None:
    frame = _table({"a": X, "b": X[::-1]})
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=3)
    data = DataSettings(label_column=None)
    dataset = validate(shuffled, "test.csv", data, QualitySettings())

    out = _features(dataset.frame, window=3)
    assert out.equals(_features(frame, window=3))
