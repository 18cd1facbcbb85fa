"""Per-entity rolling features: level, spread, trend and change rate.

For every sensor and statistic there is one column ``<sensor>__<statistic>``. Windows
count rows (the last ``rolling_window`` rows up to and including the current one) and
never cross entities. The first rows of an entity use the rows available so far, so
every value is defined: the spread of a single row is 0, so are its slope and change.

Statistics:
    value   the reading itself
    mean    rolling mean
    std     rolling sample standard deviation (ddof=1)
    min     rolling minimum
    max     rolling maximum
    range   rolling max - min
    slope   least-squares slope of the reading against the row index, per row
    change  difference to the previous row
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import polars as pl

from sagewatch.config import FeatureSettings
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP

log = logging.getLogger(__name__)

SEPARATOR = "__"


def feature_name(sensor: str, statistic: str) -> str:
    return f"{sensor}{SEPARATOR}{statistic}"


def feature_names(sensors: Sequence[str], statistics: Sequence[str]) -> list[str]:
    """Feature columns in their fixed order: by sensor, then by statistic."""
    return [feature_name(s, stat) for s in sensors for stat in statistics]


def sensor_of(feature: str) -> str:
    return feature.rsplit(SEPARATOR, 1)[0]


def sensors_of(columns: Sequence[str]) -> list[str]:
    """The sensors named by a features table's columns, in order of appearance."""
    seen: dict[str, None] = {}
    for column in columns:
        if SEPARATOR in column:
            seen.setdefault(sensor_of(column), None)
    return list(seen)


def build_features(
    frame: pl.DataFrame | pl.LazyFrame,
    sensors: Sequence[str],
    settings: FeatureSettings,
    passthrough: Sequence[str] = (),
) -> pl.DataFrame:
    """Compute rolling features for a canonical table sorted by entity and time."""
    lazy = frame.lazy()
    columns = lazy.collect_schema().names()
    keep = [c for c in (LABEL, *passthrough) if c in columns]
    window = settings.rolling_window
    index = pl.int_range(pl.len()).over(ENTITY).alias("__row")
    exprs = [
        _statistic(sensor, stat, window).alias(feature_name(sensor, stat))
        for sensor in sensors
        for stat in settings.statistics
    ]
    out = lazy.with_columns(index).select(TIMESTAMP, ENTITY, *exprs, *keep).collect()
    log.info(
        "features: %d rows, %d entities, %d features (window %d)",
        out.height,
        out[ENTITY].n_unique(),
        len(exprs),
        window,
    )
    return out


def _statistic(sensor: str, stat: str, window: int) -> pl.Expr:
    x = pl.col(sensor)
    if stat == "value":
        return x
    if stat == "mean":
        expr = x.rolling_mean(window, min_samples=1)
    elif stat == "std":
        expr = x.rolling_std(window, min_samples=2).fill_null(0.0)
    elif stat == "min":
        expr = x.rolling_min(window, min_samples=1)
    elif stat == "max":
        expr = x.rolling_max(window, min_samples=1)
    elif stat == "range":
        expr = x.rolling_max(window, min_samples=1) - x.rolling_min(
            window, min_samples=1
        )
    elif stat == "slope":
        row = pl.col("__row")
        cov = pl.rolling_cov(row, x, window_size=window, min_samples=2)
        expr = (cov / row.rolling_var(window, min_samples=2)).fill_null(0.0)
    elif stat == "change":
        expr = x.diff().fill_null(0.0)
    else:  # pragma: no cover - FeatureSettings restricts the names
        raise ValueError(f"unknown statistic {stat!r}")
    return expr.over(ENTITY)
