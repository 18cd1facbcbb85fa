"""Properties of validation, features and scoring on random small frames.

For any frame of a few entities with NaN, ±inf, absurd magnitudes, duplicates and
unsorted rows: no NaN or inf reaches a feature or a score; rows out = rows in minus
the reported drops; and one entity's results depend on nothing outside it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from functools import cache

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagewatch.config import Settings
from sagewatch.detector import Detector
from sagewatch.errors import InputError
from sagewatch.features import build_features, feature_names
from sagewatch.schema import Dataset, validate
from sagewatch.scoring import score_features
from sagewatch.training import fit_detector

CONFIG = Settings().with_overrides(
    {
        "rolling_window": 4,
        "statistics": [
            "value",
            "mean",
            "std",
            "min",
            "max",
            "range",
            "slope",
            "change",
        ],
        "max_drop_fraction": 1.0,
        "epochs": 3,
        "hidden_dims": [8],
        "encoding_dim": 2,
        "batch_size": 64,
    }
)
START = datetime(2024, 1, 1, tzinfo=UTC)
ENTITIES = ("e1", "e2", "e3")

reading = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.floats(-1e12, 1e12, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 0.0, 96.0]),
    st.none(),
)
row = st.tuples(st.sampled_from(ENTITIES), st.integers(0, 15), reading, reading)
rows = st.lists(row, min_size=1, max_size=30)
EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# What validation may refuse for such frames: nothing left to work with.
ALLOWED_REFUSALS = ("every sensor column", "no rows left")


def _frame(data: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "timestamp": [START + timedelta(minutes=m) for _, m, _, _ in data],
            "machine_id": [e for e, _, _, _ in data],
            "a": [a for _, _, a, _ in data],
            "b": [b for _, _, _, b in data],
        },
        schema={
            "timestamp": pl.Datetime("us", "UTC"),
            "machine_id": pl.String,
            "a": pl.Float64,
            "b": pl.Float64,
        },
    )


def _validate(frame: pl.DataFrame) -> Dataset | None:
    try:
        return validate(frame, "random", CONFIG.data, CONFIG.quality)
    except InputError as exc:
        assert str(exc).startswith("random: ")
        assert any(reason in str(exc) for reason in ALLOWED_REFUSALS), str(exc)
        return None


@cache
def _detector(sensors: tuple[str, ...]) -> Detector:
    """A detector fitted on healthy readings of ``sensors``."""
    rng = np.random.default_rng(0)
    n = 40
    healthy = pl.DataFrame(
        {
            "timestamp": [START + timedelta(minutes=m) for m in range(n)] * 2,
            "machine_id": ["r1"] * n + ["r2"] * n,
            **{s: rng.normal(10.0, 1.0, 2 * n) for s in sensors},
        }
    ).with_columns(pl.col("timestamp").dt.cast_time_unit("us"))
    features = build_features(healthy, list(sensors), CONFIG.features)
    names = feature_names(list(sensors), CONFIG.features.statistics)
    detector, _ = fit_detector(features, names, CONFIG)
    return detector


def _features_and_scores(data: Dataset) -> tuple[pl.DataFrame, pl.DataFrame]:
    features = build_features(data.frame, data.sensors, CONFIG.features)
    scores = score_features(features, _detector(tuple(data.sensors)))
    return features, scores


@pytest.fixture(scope="module", autouse=True)
def _fit_once() -> None:
    for sensors in (("a", "b"), ("a",), ("b",)):
        _detector(sensors)


@EXAMPLES
@given(rows)
def test_no_nan_or_inf_escapes_and_every_row_is_accounted_for(data: list) -> None:
    frame = _frame(data)
    dataset = _validate(frame)
    if dataset is None:
        return
    quality = dataset.quality
    assert quality["rows_in"] == frame.height
    assert quality["rows_out"] == frame.height - sum(quality["dropped"].values())
    assert dataset.frame.height == quality["rows_out"]
    assert dataset.frame.select(pl.col(dataset.sensors).is_finite().all()).row(0) == (
        True,
    ) * len(dataset.sensors)

    features, scores = _features_and_scores(dataset)
    assert features.height == scores.height == quality["rows_out"]
    values = features.select(pl.exclude("timestamp", "machine_id")).to_numpy()
    assert np.isfinite(values).all()
    assert np.isfinite(scores["anomaly_score"].to_numpy()).all()
    assert set(scores["is_anomaly"].to_list()) <= {0, 1}
    assert set(scores["top_sensor"].to_list()) <= set(dataset.sensors)


def _interleave(frame: pl.DataFrame, permutation: list[int]) -> pl.DataFrame:
    """Reorder rows across entities, keeping each entity's own row order."""
    by_entity: dict[str, list[int]] = defaultdict(list)
    for i, entity in enumerate(frame["machine_id"].to_list()):
        by_entity[entity].append(i)
    order = [0] * frame.height
    for members in by_entity.values():
        for i, slot in zip(
            members, sorted(permutation[i] for i in members), strict=True
        ):
            order[slot] = i
    return frame[order]


@EXAMPLES
@given(rows, st.data())
def test_interleaving_entities_differently_changes_nothing(
    data: list, draw: st.DataObject
) -> None:
    frame = _frame(data)
    permutation = draw.draw(st.permutations(range(frame.height)))
    first, second = _validate(frame), _validate(_interleave(frame, permutation))
    assert (first is None) == (second is None)
    if first is None or second is None:
        return
    assert first.frame.equals(second.frame)
    assert first.quality["dropped"] == second.quality["dropped"]
    for a, b in zip(
        _features_and_scores(first), _features_and_scores(second), strict=True
    ):
        assert a.equals(b)


@EXAMPLES
@given(rows, st.sampled_from(ENTITIES))
def test_other_entities_readings_do_not_reach_an_entity(
    data: list, entity: str
) -> None:
    frame = _frame(data)
    others = pl.col("machine_id") != entity
    shifted = frame.with_columns(
        pl.when(others & pl.col(s).is_finite() & (pl.col(s).abs() < 1e3))
        .then(pl.col(s) + 500.0)
        .otherwise(pl.col(s))
        .alias(s)
        for s in ("a", "b")
    )
    first, second = _validate(frame), _validate(shifted)
    assert (first is None) == (second is None)
    if first is None or second is None:
        return
    assert first.sensors == second.sensors
    mine = pl.col("machine_id") == entity
    for a, b in zip(
        _features_and_scores(first), _features_and_scores(second), strict=True
    ):
        assert a.filter(mine).equals(b.filter(mine))
