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

Every value depends only on the rows of its own window and on how far the row is from
the start of its entity, never on rows before the window. The table can therefore be
cut into blocks anywhere, as long as each block carries the ``rolling_window - 1``
rows before it: the results are bit for bit the same (see :func:`feature_block`).

Notes:
    Full windows are combined from power-of-two pieces (1, 2, 4, 8, ... rows) with the
    pairwise update of Chan, Golub and LeVeque for the mean, the sum of squared
    deviations and the co-moment with the row index. This costs a handful of array
    operations per piece instead of one per row of the window, is as accurate as the
    two-pass formula and gives exactly 0 spread on constant windows. The first
    ``rolling_window - 1`` rows of each entity use the two-pass formula directly.

    Features are computed in float64 and stored as float32, each value rounded once
    to the nearest float32 as it is written: the stored value depends only on the
    float64 one, so it is the same wherever a block or chunk starts. Float32 nearly
    halves the feature files and the time spent writing them.

    Precision: float32 keeps about 7 significant digits (relative rounding error
    at most 2^-24, 6e-8), so rounding reaches 1 % of a reading's own spread only
    where |value| / spread exceeds about 1.7e5: a counter at 1e7 that moves by 0.1,
    an epoch time in seconds. Spread, slope and change are differences taken in
    float64 before rounding and keep 7 digits of their own even then; the level
    features (value, mean, min, max) do not. Detection does not suffer: the
    detector's scaler floors each feature's scale at 1e-3 of its mean magnitude m
    in the reference period (:class:`sagewatch.models.Scaler`), so rounding a value
    x moves it by at most 6e-5 |x| / m of its scale: 6e-5 at the reference level,
    1 % only some 170 times beyond it, where a row scores far above any threshold.
    No warning is therefore given.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from sagewatch.config import FeatureSettings
from sagewatch.errors import InputError
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP

log = logging.getLogger(__name__)

SEPARATOR = "__"
# Stored type of the feature columns; computed in float64 (see the module notes).
FEATURE_DTYPE = np.float32
# Rows per block of the in-memory path: small enough to stay in the CPU cache.
BLOCK_ROWS = 4_096


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
    """Compute rolling features for a canonical table sorted by entity and time.

    Feature columns are Float32, rounded from float64 (see the module notes).

    Raises:
        InputError: the rows of an entity are not contiguous.
    """
    table = frame.collect() if isinstance(frame, pl.LazyFrame) else frame
    keep = [c for c in (LABEL, *passthrough) if c in table.columns]
    starts = entity_starts(table[ENTITY])
    values = sensor_matrix(table, sensors)  # (sensors, rows)
    out = np.empty(
        (len(sensors), len(settings.statistics), table.height), FEATURE_DTYPE
    )
    block = feature_block(values, starts, 0, settings, out=out)  # (features, rows)
    names = feature_names(sensors, settings.statistics)
    out = table.select(TIMESTAMP, ENTITY).with_columns(
        pl.Series(name, block[i]) for i, name in enumerate(names)
    )
    out = out.with_columns(table.select(keep)) if keep else out
    log.info(
        "features: %d rows, %d entities, %d features (window %d)",
        out.height,
        len(starts),
        len(names),
        settings.rolling_window,
    )
    return out


def as_stored(features: pl.DataFrame) -> pl.DataFrame:
    """The table with Float64 feature columns rounded to Float32, as stored.

    For tables computed elsewhere or by an older version; those of
    :func:`build_features` are returned as they are.
    """
    wide = [
        name
        for name, dtype in features.schema.items()
        if SEPARATOR in name and dtype == pl.Float64
    ]
    return features.with_columns(pl.col(wide).cast(pl.Float32)) if wide else features


def sensor_matrix(table: pl.DataFrame, sensors: Sequence[str]) -> np.ndarray:
    """The sensor columns as one Float64 array. (sensors, rows)"""
    if not sensors:
        return np.empty((0, table.height))
    values = table.select(pl.col(s).cast(pl.Float64) for s in sensors).to_numpy()
    return np.ascontiguousarray(values.T)


def entity_starts(entities: pl.Series) -> np.ndarray:
    """Row indices where a new entity begins (0 first); refuses interleaved rows.

    Raises:
        InputError: an entity's rows are split into several runs.
    """
    if entities.len() == 0:
        return np.zeros(0, dtype=np.int64)
    run = entities.rle_id().to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(run)) + 1]).astype(np.int64)
    firsts = entities.gather(starts)
    if firsts.n_unique() != len(starts):
        repeated = firsts.filter(firsts.is_duplicated()).first()
        raise InputError(
            f"entity {repeated!r}: its rows are not contiguous; features need the "
            "table sorted by entity and time"
        )
    return starts


def feature_block(
    values: np.ndarray,
    starts: np.ndarray,
    lead: int,
    settings: FeatureSettings,
    *,
    threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Features of a block of rows, in :func:`feature_names` order.

    ``values`` holds consecutive rows of the canonical table (sensors, rows);
    ``starts`` the block indices where an entity begins; ``lead`` how many rows of
    the first entity come before the block (0 when the block starts an entity).
    Rows of a block may be context only: the caller drops their outputs; those
    without a value are NaN. ``out``, when given, is the array (sensors, statistics,
    rows) to fill, so that a caller can reuse one; float64 by default. Every value is
    computed in float64 and rounded once to the type of ``out`` when it is written
    there, so a float32 ``out`` holds exactly the float64 results rounded to float32.
    (features, rows)
    """
    stats = list(settings.statistics)
    window = settings.rolling_window
    n_sensors, n_rows = values.shape
    if out is None:
        out = np.empty((n_sensors, len(stats), n_rows))
    assert out.shape == (n_sensors, len(stats), n_rows), out.shape
    # Rows from window - 1 on all get a full window below; the rows before are
    # first rows of an entity (recomputed below) or context.
    out[..., : window - 1] = np.nan
    position = _first_positions(n_rows, starts, lead, window)
    spans = [(lo, min(lo + BLOCK_ROWS, n_rows)) for lo in range(0, n_rows, BLOCK_ROWS)]

    def work(span: tuple[int, int]) -> None:
        lo, hi = span
        begin = max(lo - window + 1, 0)
        if hi - begin < window:
            return
        part = _Block(values[:, begin:hi], window)
        for j, stat in enumerate(stats):
            part.write(stat, out[:, j, begin + window - 1 : hi])

    n_threads = threads or min(4, os.cpu_count() or 1)
    if n_threads > 1 and len(spans) > 1:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(work, spans))
    else:
        for span in spans:
            work(span)
    _fix_first_rows(out, values, position, stats)
    return out.reshape(n_sensors * len(stats), n_rows)


def _first_positions(
    n_rows: int, starts: np.ndarray, lead: int, window: int
) -> dict[int, np.ndarray]:
    """Rows whose window is cut by their entity's start, by rows available (n)."""
    ends = np.append(starts[1:], n_rows)
    first_end = int(starts[0]) if len(starts) else n_rows
    rows: dict[int, np.ndarray] = {}
    for k in range(window - 1):
        inside = starts + k
        rows[k + 1] = inside[inside < ends]
    for k in range(min(window - 1 - lead, first_end)):
        rows[lead + k + 1] = np.append(rows[lead + k + 1], k)
    return {n: r for n, r in rows.items() if len(r)}


def _fix_first_rows(
    out: np.ndarray,
    values: np.ndarray,
    position: dict[int, np.ndarray],
    stats: Sequence[str],
) -> None:
    """Recompute rows whose window holds only n < rolling_window rows (two-pass)."""
    for n, rows in position.items():
        window = values[:, rows[:, None] + np.arange(1 - n, 1)]  # (sensors, rows, n)
        last = window[..., -1]
        # Deviations from the last reading first: a constant window gives exact 0.
        shifted = window - last[..., None]
        offset = shifted.sum(axis=2) / n
        dev = shifted - offset[..., None]
        mean = last + offset
        index = np.arange(n) - (n - 1) / 2
        exact = {
            "value": last,
            "mean": mean,
            "std": np.sqrt((dev * dev).sum(axis=2) / max(n - 1, 1)),
            "min": window.min(axis=2),
            "max": window.max(axis=2),
            "range": window.max(axis=2) - window.min(axis=2),
            "slope": (dev * index).sum(axis=2) / (n * (n * n - 1) / 12 if n > 1 else 1),
            "change": last - window[..., -2] if n > 1 else 0 * mean,
        }
        for j, stat in enumerate(stats):
            out[:, j, rows] = exact[stat]  # rounded here when out is float32


class _Scratch(threading.local):
    """Reusable work arrays, one set per thread, so blocks allocate nothing."""

    def __init__(self) -> None:
        self.arrays: dict[tuple[str, int], np.ndarray] = {}

    def get(self, name: str, size: int, shape: tuple[int, int]) -> np.ndarray:
        key = (name, size)
        have = self.arrays.get(key)
        if have is None or have.shape[0] != shape[0] or have.shape[1] < shape[1]:
            have = self.arrays[key] = np.empty((shape[0], max(shape[1], BLOCK_ROWS)))
        return have[:, : shape[1]]


_SCRATCH = _Scratch()


@dataclass
class _Piece:
    """Summary of the ``size`` rows ending at each row from row ``size - 1`` on.

    Arrays are (sensors, rows - size + 1): index i describes rows i .. i + size - 1.
    """

    size: int
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None  # sum of squared deviations from the mean
    com: np.ndarray | None = None  # co-moment with the row index
    high: np.ndarray | None = None
    low: np.ndarray | None = None


class _Block:
    """Full-window statistics of a block of rows, computed on demand.

    Only rows from ``window - 1`` on have a full window inside the block; the rows
    before are context.
    """

    def __init__(self, x: np.ndarray, window: int) -> None:
        self.x = x  # (sensors, rows)
        self.window = window
        self._moments: _Piece | None = None
        self._extremes: _Piece | None = None

    def write(self, stat: str, dest: np.ndarray) -> None:
        """Write ``stat`` for rows ``window - 1`` onwards into ``dest``.

        ``dest`` may be float32: each value is computed in float64 and rounded once
        as it is stored (ufuncs run their float64 loop and cast their output).
        """
        n, x = self.window, self.x
        if stat == "value":
            dest[...] = x[:, n - 1 :]
        elif stat == "change":
            np.subtract(x[:, n - 1 :], x[:, n - 2 : -1], out=dest)
        elif stat in {"min", "max", "range"}:
            self._extremes = piece = self._extremes or self._combine(extremes=True)
            high, low = piece.high, piece.low
            assert high is not None and low is not None
            if stat == "range":
                np.subtract(high, low, out=dest)
            else:
                dest[...] = high if stat == "max" else low
        else:
            self._moments = piece = self._moments or self._combine(extremes=False)
            assert piece.mean is not None and piece.m2 is not None
            assert piece.com is not None
            if stat == "mean":
                dest[...] = piece.mean
            elif stat == "std":
                # The variance stays float64 (dest may be float32): one rounding.
                variance = _SCRATCH.get("variance", 0, piece.m2.shape)
                np.multiply(piece.m2, 1.0 / (n - 1), out=variance)
                np.sqrt(variance, out=dest)
            elif stat == "slope":
                np.multiply(piece.com, 12.0 / (n * (n * n - 1)), out=dest)
            else:  # pragma: no cover - FeatureSettings restricts the names
                raise ValueError(f"unknown statistic {stat!r}")

    def _combine(self, *, extremes: bool) -> _Piece:
        """The window as pieces of 2^k rows, the older pieces merged in front."""
        x = self.x
        levels = {1: _Piece(1, high=x, low=x) if extremes else _Piece(1, mean=x)}
        size = 1
        while size * 2 <= self.window:
            last = levels[size]
            if size == 1 and not extremes:
                levels[2] = self._pairs()
            else:
                levels[2 * size] = self._merge(last, last, extremes)
            size *= 2
        total: _Piece | None = None
        for size in sorted(levels, reverse=True):
            if not self.window & size:
                continue
            piece = levels[size]
            if piece.m2 is None and not extremes:
                zero = _SCRATCH.get("zero", 1, x.shape)
                zero[...] = 0.0
                piece = _Piece(1, mean=x, m2=zero, com=zero)
            total = piece if total is None else self._merge(piece, total, extremes)
        assert total is not None and total.size == self.window
        return total

    def _pairs(self) -> _Piece:
        """Pieces of two rows, from the rows themselves."""
        older, newer = self.x[:, :-1], self.x[:, 1:]
        shape = older.shape
        delta = np.subtract(newer, older, out=_SCRATCH.get("delta", 0, shape))
        mean = np.add(older, newer, out=_SCRATCH.get("mean", 2, shape))
        mean *= 0.5
        m2 = np.multiply(delta, delta, out=_SCRATCH.get("m2", 2, shape))
        m2 *= 0.5
        com = np.multiply(delta, 0.5, out=_SCRATCH.get("com", 2, shape))
        return _Piece(2, mean=mean, m2=m2, com=com)

    def _merge(self, older: _Piece, newer: _Piece, extremes: bool) -> _Piece:
        """Merge ``older`` (ending ``newer.size`` rows earlier) into ``newer``."""
        n_a, n_b = older.size, newer.size
        size = n_a + n_b
        key = size if older.size == newer.size else -size
        length = self.x.shape[1] - size + 1
        shape = (self.x.shape[0], length)

        def pair(a: np.ndarray | None, b: np.ndarray | None) -> tuple[Any, Any]:
            assert a is not None and b is not None
            return a[:, :length], b[:, n_a:]

        if extremes:
            high_a, high_b = pair(older.high, newer.high)
            low_a, low_b = pair(older.low, newer.low)
            high = np.maximum(high_a, high_b, out=_SCRATCH.get("high", key, shape))
            low = np.minimum(low_a, low_b, out=_SCRATCH.get("low", key, shape))
            return _Piece(size, high=high, low=low)
        mean_a, mean_b = pair(older.mean, newer.mean)
        m2_a, m2_b = pair(older.m2, newer.m2)
        com_a, com_b = pair(older.com, newer.com)
        delta = np.subtract(mean_b, mean_a, out=_SCRATCH.get("delta", 0, shape))
        mean = np.multiply(delta, -n_a / size, out=_SCRATCH.get("mean", key, shape))
        mean += mean_b
        m2 = np.multiply(delta, delta, out=_SCRATCH.get("m2", key, shape))
        m2 *= n_a * n_b / size
        m2 += m2_a
        m2 += m2_b
        com = np.multiply(delta, n_a * n_b / 2, out=_SCRATCH.get("com", key, shape))
        com += com_a
        com += com_b
        return _Piece(size, mean=mean, m2=m2, com=com)
