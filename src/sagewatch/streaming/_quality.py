"""The quality report of a streamed input, merged exactly from its chunks' reports.

Counts add up over chunks, the median step and time gaps come from the merged counts
of every step, constant sensors from merged minima and maxima.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import polars as pl

from sagewatch.schema import ENTITY, TIMESTAMP, Dataset
from sagewatch.streaming._chunks import _Fallback

if TYPE_CHECKING:
    from sagewatch.streaming._features import FeaturesResult, _Tail

log = logging.getLogger(__name__)

# Distinct time steps kept for an exact median; beyond this, validate in memory.
MAX_STEP_VALUES = 100_000


class _Quality:
    """The quality report of the whole input, merged from the chunks' reports.

    Raises :class:`_Fallback` where a chunk's report cannot be merged exactly.
    """

    _SAME = ("ignored_columns", "empty_sensors")
    _ZERO = ("out_of_order_rows", "exact_duplicate_rows", "duplicate_timestamps")

    def __init__(self) -> None:
        self.first: dict[str, Any] | None = None
        self.rows_in = self.rows_out = 0
        self.repaired: Counter[str] = Counter()
        self.sensors: dict[str, Counter[str]] = {}
        self.entity_rows: Counter[str] = Counter()
        self.steps: Counter[float] = Counter()
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.file_rows: Counter[str] = Counter()

    def add(
        self, dataset: Dataset, result: FeaturesResult, carry: _Tail | None
    ) -> None:
        report, frame = dataset.quality, dataset.frame
        self._check(report, dataset, result, carry)
        self.rows_in += report["rows_in"]
        self.rows_out += report["rows_out"]
        self.repaired.update(report["repaired"])
        for sensor, counts in report["sensors"].items():
            self.sensors.setdefault(sensor, Counter()).update(counts)
        self.entity_rows.update(report["entity_rows"])
        self._add_steps(frame, carry)
        extremes = frame.select(
            *[pl.col(s).min().alias(f"lo|{s}") for s in dataset.sensors],
            *[pl.col(s).max().alias(f"hi|{s}") for s in dataset.sensors],
        ).row(0, named=True)
        for s in dataset.sensors:
            lo, hi = extremes[f"lo|{s}"], extremes[f"hi|{s}"]
            self.low[s] = lo if s not in self.low else min(self.low[s], lo)
            self.high[s] = hi if s not in self.high else max(self.high[s], hi)

    def _check(
        self,
        report: dict[str, Any],
        dataset: Dataset,
        result: FeaturesResult,
        carry: _Tail | None,
    ) -> None:
        if self.first is None:
            self.first = report
        if dataset.sensors != result.sensors:
            raise _Fallback(f"sensors {dataset.sensors} differ from {result.sensors}")
        for name in self._SAME:
            if report[name] != self.first[name]:
                raise _Fallback(f"{name} differ between chunks")
        for name in self._ZERO:
            if report[name]:
                raise _Fallback(f"{report[name]} {name.replace('_', ' ')}")
        if report["dropped"] or report["entities_dropped"]:
            raise _Fallback(f"rows dropped: {report['dropped']}")
        frame = dataset.frame
        if carry is not None:
            if (frame[TIMESTAMP].head(1) <= carry.last_time).item():
                raise _Fallback(f"entity {carry.entity!r} goes back in time")
        else:
            again = [e for e in report["entity_rows"] if e in self.entity_rows]
            if again:
                raise _Fallback(f"entity {again[0]!r} appears in two chunks")

    def _add_steps(self, frame: pl.DataFrame, carry: _Tail | None) -> None:
        same = pl.col(ENTITY) == pl.col(ENTITY).shift(1)
        steps = frame.select(
            pl.when(same).then(pl.col(TIMESTAMP).diff()).alias("step")
        ).to_series()
        if carry is not None:  # the step from the piece before
            boundary = frame[TIMESTAMP].head(1) - carry.last_time
            steps = boundary.alias("step").append(steps)
        seconds = steps.dt.total_seconds(fractional=True).drop_nulls()
        self.steps.update(dict(seconds.value_counts().iter_rows()))
        if len(self.steps) > MAX_STEP_VALUES:
            raise _Fallback(f"more than {MAX_STEP_VALUES} distinct time steps")

    def report(self, rolling_window: int) -> dict[str, Any]:
        assert self.first is not None
        median = _median(self.steps)
        gaps = (
            sum(n for v, n in self.steps.items() if v > 1.5 * median) if median else 0
        )
        entity_rows = dict(sorted(self.entity_rows.items()))
        short = {e: n for e, n in entity_rows.items() if n < rolling_window}
        if short:
            log.warning(
                "%d entities have fewer rows than rolling_window=%d; their first "
                "windows are partial (e.g. %s)",
                len(short),
                rolling_window,
                next(iter(short.items())),
            )
        return {
            "rows_in": self.rows_in,
            "dropped": {},
            "repaired": dict(self.repaired),
            "ignored_columns": self.first["ignored_columns"],
            "sensors": {s: dict(c) for s, c in self.sensors.items()},
            "empty_sensors": self.first["empty_sensors"],
            "out_of_order_rows": 0,
            "exact_duplicate_rows": 0,
            "duplicate_timestamps": 0,
            "entities_dropped": [],
            "rows_out": self.rows_out,
            "median_step_seconds": median,
            "time_gaps": int(gaps),
            "constant_sensors": [s for s in self.low if self.high[s] == self.low[s]],
            "entity_rows": entity_rows,
            "short_entities": short,
            "_file_rows": dict(self.file_rows),
        }


def _median(counts: Counter[float]) -> float | None:
    """The median of values given as counts, as polars computes it."""
    n = sum(counts.values())
    if n == 0:
        return None
    wanted = sorted({(n - 1) // 2, n // 2})
    found, seen = [], 0
    for value in sorted(counts):
        seen += counts[value]
        while wanted and wanted[0] < seen:
            found.append(value)
            wanted.pop(0)
    return pl.Series([found[0], found[-1]], dtype=pl.Float64).median()
