"""Repair rules for messy sensor tables, and the data-quality summary.

Before any column is mapped, files read together must have the same columns, a
header may not name a column twice, and no column may carry a canonical name
(``timestamp``, ``machine_id``, ``label``) it is not mapped to. Then the row rules
run in this order on the table :mod:`sagewatch.schema` mapped; each one either
repairs (counted in the report and logged as a warning) or refuses
with an :class:`InputError` naming file, line, entity and column:

1. NaN, ±inf and readings beyond ``max_abs_value`` become missing readings.
2. A sensor with no reading at all is left out.
3. Rows out of time order within their entity are sorted (``sort_rows``) or refused.
4. Exact duplicate rows are dropped (``drop_duplicate_rows``).
5. Rows of one entity sharing a timestamp with different readings: the last one in
   file order is kept, or the input is refused (``duplicate_timestamps``).
6. Missing readings are carried forward from the entity's previous reading, at most
   ``max_fill_gap`` in a row; rows still missing one are dropped
   (``drop_unfilled_rows``) or refused.
7. Dropping more than ``max_drop_fraction`` of the rows is refused.

Rows are always put in canonical order (entity, then time); that is not a repair.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import polars as pl

from sagewatch.config import DataSettings, QualitySettings
from sagewatch.errors import InputError
from sagewatch.schema import ENTITY, LABEL, LINE, SOURCE, TIMESTAMP, where

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- columns


def check_same_columns(frames: list[pl.DataFrame], data: DataSettings) -> None:
    """Files read together must name the same columns (passthrough may differ)."""
    optional = set(data.passthrough_columns)
    expected = [c for c in frames[0].columns if c not in optional]
    for frame in frames[1:]:
        names = [c for c in frame.columns if c not in optional]
        missing = [c for c in expected if c not in names]
        extra = [c for c in names if c not in expected]
        if missing or extra:
            raise InputError(
                f"{frame[SOURCE][0]}: columns differ from {frames[0][SOURCE][0]}: "
                f"missing {missing}, extra {extra}; expected every file to have "
                "the same columns"
            )


def strip_column_names(raw: pl.DataFrame) -> pl.DataFrame:
    """``raw`` with spaces around its column names removed (a header written with
    ``", "`` between names), refusing names that would then clash."""
    renamed = {c: c.strip() for c in raw.columns if c != c.strip()}
    if not renamed:
        return raw
    names = [renamed.get(c, c) for c in raw.columns]
    for old, new in renamed.items():
        if names.count(new) > 1:
            raise InputError(
                f"{raw[SOURCE][0]}: column {old!r} is {new!r} with spaces around it, "
                f"and {new!r} is in the header too; expected unique column names"
            )
    return raw.rename(renamed)


def check_column_names(raw: pl.DataFrame, data: DataSettings) -> None:
    """Refuse duplicated headers and columns that would be silently overwritten."""
    source = raw[SOURCE][0]
    for name in raw.columns:
        match = re.fullmatch(r"(.*)_duplicated_\d+", name)
        if match and match.group(1) in raw.columns:
            raise InputError(
                f"{source}: column name {match.group(1)!r} appears more than once "
                "in the header; expected unique column names"
            )
    roles = {
        TIMESTAMP: ("timestamp_column", data.timestamp_column),
        ENTITY: ("entity_column", data.entity_column),
        LABEL: ("label_column", None if data.label_windows else data.label_column),
    }
    for canonical, (setting, mapped) in roles.items():
        if canonical in raw.columns and mapped != canonical:
            absent = (
                f" (no column {mapped!r} in this file, so the file name would be used)"
                if canonical == ENTITY and mapped and mapped not in raw.columns
                else ""
            )
            raise InputError(
                f"{source}: column {canonical!r} would be overwritten by the "
                f"column mapped by {setting} ({mapped!r}){absent}; rename it, or "
                f"set {setting}: {canonical}"
            )


# ----------------------------------------------------------------------------- rows


def repair(
    frame: pl.DataFrame,
    source: str,
    sensors: list[str],
    quality: QualitySettings,
    report: dict[str, Any],
) -> tuple[pl.DataFrame, list[str]]:
    """Apply the repair rules in order; fill ``report`` with what each one did.

    Raises:
        InputError: a rule set to refuse found its problem, or too much is dropped.
    """
    report["sensors"] = {s: {} for s in sensors}
    given = frame[ENTITY]
    frame = _invalid_to_missing(frame, source, sensors, quality, report)
    frame, sensors = _drop_empty_sensors(frame, source, sensors, report)
    frame = _sort(frame, source, quality, report)
    if _repeats_a_timestamp(frame):
        frame = _drop_exact_duplicates(frame, source, quality, report)
        frame = _resolve_duplicate_timestamps(frame, source, quality, report)
    else:  # no two rows share entity and timestamp, so neither rule has work
        report["exact_duplicate_rows"] = report["duplicate_timestamps"] = 0
    frame = _fill_missing(frame, source, sensors, quality, report)
    report["entities_dropped"] = _entities_dropped(given, frame)
    if report["entities_dropped"]:
        log.warning(
            "%s: no row left for entities %s", source, report["entities_dropped"]
        )
    _check_dropped(frame, source, quality, report)
    return frame, sensors


def _invalid_to_missing(
    frame: pl.DataFrame,
    source: str,
    sensors: list[str],
    quality: QualitySettings,
    report: dict[str, Any],
) -> pl.DataFrame:
    limit = quality.max_abs_value
    counts = frame.select(
        *[pl.col(s).null_count().alias(f"missing|{s}") for s in sensors],
        *[(~pl.col(s).is_finite()).sum().alias(f"non_finite|{s}") for s in sensors],
        *[
            (pl.col(s).is_finite() & (pl.col(s).abs() > limit))
            .sum()
            .alias(f"out_of_range|{s}")
            for s in sensors
        ],
    ).row(0, named=True)
    for key, count in counts.items():
        kind, sensor = key.split("|", 1)
        report["sensors"][sensor][kind] = int(count)
    invalid = {
        k: sum(counts[f"{k}|{s}"] for s in sensors)
        for k in ("non_finite", "out_of_range")
    }
    if any(invalid.values()):
        log.warning(
            "%s: %d non-finite and %d out-of-range readings (beyond %g) count as "
            "missing",
            source,
            invalid["non_finite"],
            invalid["out_of_range"],
            limit,
        )
    invalid_in = [
        s for s in sensors if counts[f"non_finite|{s}"] + counts[f"out_of_range|{s}"]
    ]
    return frame.with_columns(
        pl.when(pl.col(s).is_finite() & (pl.col(s).abs() <= limit))
        .then(pl.col(s))
        .otherwise(None)
        .alias(s)
        for s in invalid_in
    )


def _drop_empty_sensors(
    frame: pl.DataFrame, source: str, sensors: list[str], report: dict[str, Any]
) -> tuple[pl.DataFrame, list[str]]:
    empty = [s for s in sensors if frame[s].null_count() == frame.height]
    report["empty_sensors"] = empty
    if not empty:
        return frame, sensors
    if len(empty) == len(sensors):
        raise InputError(
            f"{source}: every sensor column ({empty}) is empty or non-finite; "
            "expected readings in at least one"
        )
    log.warning("%s: sensors %s have no valid reading; left out", source, empty)
    for sensor in empty:
        del report["sensors"][sensor]
    return frame.drop(empty), [s for s in sensors if s not in empty]


def _sort(
    frame: pl.DataFrame, source: str, quality: QualitySettings, report: dict[str, Any]
) -> pl.DataFrame:
    names = _run_names(frame)
    if len(set(names)) == len(names):
        # Each entity's rows are contiguous: the row before is the previous row.
        earlier = frame.select(
            (_same_entity() & (pl.col(TIMESTAMP).diff() < pl.duration())).fill_null(
                False
            )
        ).to_series()
    else:
        earlier = frame.select(
            (pl.col(TIMESTAMP).diff().over(ENTITY) < pl.duration()).fill_null(False)
        ).to_series()
    count = int(earlier.sum())
    report["out_of_order_rows"] = count
    if count and not quality.sort_rows:
        row = int(earlier.arg_max() or 0)
        raise InputError(
            f"{where(frame, row)}: timestamp {frame[TIMESTAMP][row]} is earlier than "
            f"the row before it; expected rows in time order within each entity "
            "(or set sort_rows: true)"
        )
    if count:
        log.warning("%s: rows out of time order, sorted: %d", source, count)
        report["repaired"]["sorted_rows"] = count
    if not count and names == sorted(set(names)):
        return frame  # already in canonical order: sorting would change nothing
    return frame.sort([ENTITY, TIMESTAMP], maintain_order=True)


def _same_entity() -> pl.Expr:
    """Whether each row belongs to the entity of the row before it."""
    return pl.col(ENTITY) == pl.col(ENTITY).shift(1)


def _run_names(frame: pl.DataFrame) -> list[str]:
    """The entity of each run of consecutive rows with one entity, in order."""
    first = frame.select(~_same_entity().fill_null(False)).to_series()
    return frame[ENTITY].filter(first).to_list()


def _repeats_a_timestamp(frame: pl.DataFrame) -> bool:
    """Whether two rows share entity and timestamp, in a table sorted by both."""
    repeat = _same_entity() & (pl.col(TIMESTAMP) == pl.col(TIMESTAMP).shift(1))
    return bool(frame.select(repeat.any()).item())


def _entities_dropped(given: pl.Series, kept: pl.DataFrame) -> list[str]:
    """Entities of ``given`` (in order of appearance) with no row in ``kept``."""
    if kept.height == given.len():
        return []
    left = set(kept[ENTITY].unique().to_list())
    return [e for e in given.unique(maintain_order=True).to_list() if e not in left]


def _drop_exact_duplicates(
    frame: pl.DataFrame, source: str, quality: QualitySettings, report: dict[str, Any]
) -> pl.DataFrame:
    content = [c for c in frame.columns if c not in (SOURCE, LINE)]
    duplicated = frame.select(pl.struct(content).is_first_distinct().not_()).to_series()
    count = int(duplicated.sum())
    report["exact_duplicate_rows"] = count
    if not count or not quality.drop_duplicate_rows:
        return frame
    log.warning("%s: dropped %d exact duplicate rows", source, count)
    report["dropped"]["exact_duplicate_rows"] = count
    return frame.filter(~duplicated)


def _resolve_duplicate_timestamps(
    frame: pl.DataFrame, source: str, quality: QualitySettings, report: dict[str, Any]
) -> pl.DataFrame:
    key = pl.struct(ENTITY, TIMESTAMP)
    duplicated = frame.select(key.is_duplicated()).to_series()
    # Counted like exact duplicates: the rows beyond the first of each key.
    repeats = frame.select(key.is_first_distinct().not_()).to_series()
    report["duplicate_timestamps"] = int(repeats.sum())
    if not duplicated.any():
        return frame
    first = int(duplicated.arg_max() or 0)
    if quality.duplicate_timestamps == "error":
        raise InputError(
            f"{where(frame, first)}: timestamp {frame[TIMESTAMP][first]} appears "
            f"again with other readings ({where(frame, first + 1)}); expected one "
            "row per entity and timestamp (or set duplicate_timestamps: keep_last)"
        )
    superseded = frame.select(key.is_last_distinct().not_()).to_series()
    count = int(superseded.sum())
    log.warning(
        "%s: %d rows share an entity and timestamp with a later row; kept the last "
        "(first at %s)",
        source,
        count,
        where(frame, first),
    )
    report["dropped"]["duplicate_timestamps"] = count
    return frame.filter(~superseded)


def _fill_missing(
    frame: pl.DataFrame,
    source: str,
    sensors: list[str],
    quality: QualitySettings,
    report: dict[str, Any],
) -> pl.DataFrame:
    before = {s: frame[s].null_count() for s in sensors}
    for sensor in sensors:
        report["sensors"][sensor]["filled"] = 0
    if not any(before.values()):
        return frame
    if quality.max_fill_gap > 0:
        frame = frame.with_columns(
            pl.col(s)
            .fill_null(strategy="forward", limit=quality.max_fill_gap)
            .over(ENTITY)
            for s in sensors
        )
    filled = {s: before[s] - frame[s].null_count() for s in sensors}
    for sensor, count in filled.items():
        report["sensors"][sensor]["filled"] = count
    if sum(filled.values()):
        log.warning(
            "%s: carried forward %d missing readings (at most %d in a row)",
            source,
            sum(filled.values()),
            quality.max_fill_gap,
        )
        report["repaired"]["forward_filled_values"] = sum(filled.values())
    still = frame.select(pl.any_horizontal(pl.col(s).is_null() for s in sensors))
    still = still.to_series()
    if not still.any():
        return frame
    row = int(still.arg_max() or 0)
    column = next(s for s in sensors if frame[s][row] is None)
    if not quality.drop_unfilled_rows:
        raise InputError(
            f"{where(frame, row, column)}: missing reading that no earlier reading "
            f"within max_fill_gap={quality.max_fill_gap} rows can fill; expected a "
            "number (or set drop_unfilled_rows: true)"
        )
    count = int(still.sum())
    log.warning(
        "%s: dropped %d rows still missing a reading (first at %s)",
        source,
        count,
        where(frame, row, column),
    )
    report["dropped"]["rows_with_unfilled_gaps"] = count
    return frame.filter(~still)


def _check_dropped(
    frame: pl.DataFrame, source: str, quality: QualitySettings, report: dict[str, Any]
) -> None:
    rows_in = report["rows_in"]
    dropped = sum(report["dropped"].values())
    report["rows_out"] = frame.height
    if frame.height == 0:
        raise InputError(
            f"{source}: no rows left after the repair rules dropped "
            f"{report['dropped']}; expected at least one complete row"
        )
    if dropped > quality.max_drop_fraction * rows_in:
        raise InputError(
            f"{source}: the repair rules would drop {dropped} of {rows_in} rows "
            f"({report['dropped']}), more than max_drop_fraction="
            f"{quality.max_drop_fraction:g}; check entity_column and the input, or "
            "raise max_drop_fraction"
        )


# ----------------------------------------------------------------------------- summary


def summarize(
    frame: pl.DataFrame, sensors: list[str], *, rolling_window: int | None = None
) -> dict[str, Any]:
    """What the validated table looks like: sampling, gaps, entities, spreads."""
    # The repair rules leave each entity's rows contiguous and in time order.
    step = frame.select(
        pl.when(_same_entity())
        .then(pl.col(TIMESTAMP).diff())
        .dt.total_seconds(fractional=True)
    ).to_series()
    median = step.median()
    gaps = int((step > 1.5 * median).sum()) if median else 0
    spread = frame.select(
        *[(pl.col(s).max() - pl.col(s).min()).alias(s) for s in sensors]
    ).row(0, named=True)
    rows = entity_rows(frame)
    summary: dict[str, Any] = {
        "median_step_seconds": median,
        "time_gaps": gaps,
        "constant_sensors": [s for s in sensors if spread[s] == 0],
        "entity_rows": rows,
    }
    if rolling_window is not None:
        summary["short_entities"] = {
            e: n for e, n in rows.items() if n < rolling_window
        }
        if summary["short_entities"]:
            log.warning(
                "%d entities have fewer rows than rolling_window=%d; their first "
                "windows are partial (e.g. %s)",
                len(summary["short_entities"]),
                rolling_window,
                next(iter(summary["short_entities"].items())),
            )
    return summary


def entity_rows(frame: pl.DataFrame) -> dict[str, int]:
    """Rows per entity, in order, of a table with each entity's rows contiguous."""
    runs = frame[ENTITY].rle().struct.unnest()
    return dict(zip(runs["value"].to_list(), runs["len"].to_list(), strict=True))
