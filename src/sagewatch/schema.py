"""The input contract: map columns, validate, repair by rule, and report quality.

Raw input has one row per (timestamp, entity). After :func:`load_raw` every table has
the canonical columns ``timestamp`` (UTC), ``machine_id`` (text), one Float64 column per
sensor, ``label`` (0/1, when the input has labels) and any passthrough columns, sorted
by entity then time. Every repair is counted in :attr:`Dataset.quality`; anything that
cannot be repaired raises :class:`InputError` naming file, column and row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from sagewatch import storage
from sagewatch.config import DataSettings, QualitySettings
from sagewatch.errors import InputError

log = logging.getLogger(__name__)

TIMESTAMP = "timestamp"
ENTITY = "machine_id"
LABEL = "label"
SOURCE = "__source"
RESERVED = frozenset(
    {
        TIMESTAMP,
        ENTITY,
        LABEL,
        "anomaly_score",
        "threshold",
        "is_anomaly",
        "top_sensor",
        "in_reference",
    }
)


@dataclass
class Dataset:
    """A validated table plus what validation found and did."""

    frame: pl.DataFrame
    sensors: list[str]
    passthrough: list[str]
    source: str
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def has_label(self) -> bool:
        return LABEL in self.frame.columns


def load_raw(uri: str, data: DataSettings, quality: QualitySettings) -> Dataset:
    """Read and validate raw sensor data from a file, folder or glob.

    Raises:
        InputError: the data breaks the contract in a way no rule repairs.
        StorageError: the URI cannot be read.
    """
    files = storage.list_files(uri)
    frames = []
    for path in files:
        frame = storage.read_table(path, sep=data.sep)
        if frame.height == 0:
            raise InputError(f"{path}: the file has a header but no data rows")
        frames.append(frame.with_columns(pl.lit(storage.basename(path)).alias(SOURCE)))
    try:
        raw = (
            pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
        )
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"files under {uri} do not share one schema: {exc}") from exc
    windows = _read_windows(data.label_windows) if data.label_windows else None
    return validate(raw, uri, data, quality, label_windows=windows)


def validate(
    raw: pl.DataFrame,
    source: str,
    data: DataSettings,
    quality: QualitySettings,
    *,
    label_windows: Any = None,
) -> Dataset:
    """Turn a raw table into the canonical form, repairing by rule and counting."""
    if raw.height == 0:
        raise InputError(f"{source}: no data rows (header only or empty)")
    if SOURCE not in raw.columns:
        raw = raw.with_columns(pl.lit(storage.basename(source)).alias(SOURCE))
    report: dict[str, Any] = {"rows_in": raw.height, "dropped": {}, "repaired": {}}

    frame = raw.with_columns(_parse_timestamps(raw, source, data.timestamp_column))
    frame = _attach_entity(frame, source, data.entity_column)
    frame = _attach_label(frame, source, data, label_windows)
    sensors = _sensor_columns(frame, source, data)
    passthrough = [c for c in data.passthrough_columns if c in frame.columns]
    frame = _cast_sensors(frame, source, sensors)
    frame = frame.select(
        [TIMESTAMP, ENTITY, *sensors, *([LABEL] if LABEL in frame.columns else [])]
        + [c for c in passthrough if c not in sensors]
        + [SOURCE]
    )
    frame, sensors = _repair(frame, source, sensors, quality, report)
    report["rows_out"] = frame.height
    report.update(_summary(frame, sensors))
    log.info(
        "validated %s: %d rows in, %d rows out, %d entities, %d sensors%s",
        source,
        report["rows_in"],
        report["rows_out"],
        frame[ENTITY].n_unique(),
        len(sensors),
        f", dropped {report['dropped']}" if report["dropped"] else "",
    )
    return Dataset(frame.drop(SOURCE), sensors, passthrough, source, report)


def _parse_timestamps(raw: pl.DataFrame, source: str, column: str) -> pl.Series:
    if column not in raw.columns:
        raise InputError(
            f"{source}: timestamp column {column!r} not found; columns are "
            f"{raw.columns}. Set --timestamp-column"
        )
    values = raw[column]
    if values.dtype == pl.Datetime:
        tz = values.dtype.time_zone  # type: ignore[union-attr]
        parsed = (
            values.dt.replace_time_zone("UTC")
            if tz is None
            else values.dt.convert_time_zone("UTC")
        )
    elif values.dtype == pl.Date:
        parsed = values.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    else:
        text = values.cast(pl.String).str.strip_chars()
        parsed = _parse_text_timestamps(text)
        bad = parsed.is_null() & text.is_not_null()
        if bad.any() or text.is_null().any():
            row = int((bad | text.is_null()).arg_max() or 0)
            raise InputError(
                f"{source}: column {column!r}, row {row + 2}: cannot parse "
                f"{text[row]!r} as a timestamp (expected ISO 8601, e.g. "
                "2024-01-01 00:00:00 or 2024-01-01T00:00:00+01:00)"
            )
    return parsed.dt.cast_time_unit("us").alias(TIMESTAMP)


def _parse_text_timestamps(text: pl.Series) -> pl.Series:
    """Parse ISO-like text to UTC; offsets may differ from row to row."""
    has_offset = text.str.contains(r"([+-]\d\d:?\d\d|Z)$")
    naive = text.str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
    if not has_offset.any():
        return naive
    aware = text.str.replace(r"Z$", "+00:00").str.to_datetime(
        format="%Y-%m-%dT%H:%M:%S%.f%z", strict=False, time_unit="us"
    )
    spaced = text.str.replace(r"Z$", "+00:00").str.to_datetime(
        format="%Y-%m-%d %H:%M:%S%.f%z", strict=False, time_unit="us"
    )
    aware = aware.fill_null(spaced).dt.convert_time_zone("UTC")
    return pl.select(pl.when(has_offset).then(aware).otherwise(naive)).to_series()


def _attach_entity(
    frame: pl.DataFrame, source: str, column: str | None
) -> pl.DataFrame:
    if column and column in frame.columns:
        if frame[column].null_count():
            row = int(frame[column].is_null().arg_max() or 0)
            raise InputError(
                f"{source}: entity column {column!r}, row {row + 2}: empty value"
            )
        return frame.with_columns(pl.col(column).cast(pl.String).alias(ENTITY))
    if column and column != ENTITY:
        raise InputError(
            f"{source}: entity column {column!r} not found; columns are {frame.columns}"
        )
    # No entity column: each input file is one entity, named after the file.
    stem = pl.col(SOURCE).str.replace(r"(\.csv|\.parquet|\.tsv|\.txt)(\.gz)?$", "")
    return frame.with_columns(stem.alias(ENTITY))


def _attach_label(
    frame: pl.DataFrame, source: str, data: DataSettings, windows: Any
) -> pl.DataFrame:
    column = data.label_column
    if windows is not None:
        return frame.with_columns(
            _label_from_windows(frame, source, windows).alias(LABEL)
        )
    if not column or column not in frame.columns:
        if column and column != "anomaly":
            raise InputError(
                f"{source}: label column {column!r} not found; "
                f"columns are {frame.columns}"
            )
        return frame
    values = frame[column]
    numeric = values.cast(pl.Float64, strict=False)
    bad = ~numeric.is_in([0.0, 1.0]).fill_null(False)
    if bad.any():
        row = int(bad.arg_max() or 0)
        raise InputError(
            f"{source}: label column {column!r}, row {row + 2}: value {values[row]!r}; "
            "expected 0 or 1"
        )
    return frame.with_columns(numeric.cast(pl.Int8).alias(LABEL))


def _read_windows(uri: str) -> Any:
    windows = storage.read_json(uri)
    if not isinstance(windows, dict | list):
        raise InputError(
            f"{uri}: expected a JSON list of [start, end] pairs or a mapping"
        )
    return windows


def _label_from_windows(frame: pl.DataFrame, source: str, windows: Any) -> pl.Series:
    """Label rows inside any ``[start, end]`` window of the file they came from."""
    label = pl.Series(LABEL, [0] * frame.height, dtype=pl.Int8)
    for name in frame[SOURCE].unique().to_list():
        if isinstance(windows, list):
            spans = windows
        else:
            keys = [k for k in windows if storage.basename(k) == name]
            if not keys:
                raise InputError(
                    f"label windows name no file called {name!r} ({source})"
                )
            spans = windows[keys[0]]
        rows = frame[SOURCE] == name
        for start, end in spans:
            lo, hi = pl.Series([start, end]).str.to_datetime(
                time_zone="UTC", time_unit="us"
            )
            inside = rows & (frame[TIMESTAMP] >= lo) & (frame[TIMESTAMP] <= hi)
            label = label.set(inside, 1)
    return label


def _sensor_columns(frame: pl.DataFrame, source: str, data: DataSettings) -> list[str]:
    taken = {
        data.timestamp_column,
        data.entity_column,
        data.label_column,
        SOURCE,
        ENTITY,
    }
    taken |= {LABEL} if LABEL in frame.columns else set()
    if data.sensor_columns:
        missing = [c for c in data.sensor_columns if c not in frame.columns]
        if missing:
            raise InputError(
                f"{source}: sensor columns {missing} not found; "
                f"columns are {frame.columns}"
            )
        sensors = list(data.sensor_columns)
    else:
        sensors = [
            c
            for c in frame.columns
            if c not in taken
            and c not in data.passthrough_columns
            and _numeric_like(frame[c])
        ]
    clash = sorted(set(sensors) & RESERVED)
    if clash:
        raise InputError(
            f"{source}: sensor column(s) {clash} use a reserved output name; "
            "rename them "
            f"or set sensor_columns (reserved: {sorted(RESERVED)})"
        )
    if not sensors:
        raise InputError(
            f"{source}: no numeric sensor columns found among {frame.columns}; "
            "set sensor_columns"
        )
    return sensors


def _numeric_like(series: pl.Series) -> bool:
    if series.dtype.is_numeric() and series.dtype != pl.Boolean:
        return True
    if series.dtype != pl.String:
        return False
    parsed = series.str.strip_chars().cast(pl.Float64, strict=False)
    return parsed.is_not_null().sum() > 0.5 * series.is_not_null().sum() > 0


def _cast_sensors(frame: pl.DataFrame, source: str, sensors: list[str]) -> pl.DataFrame:
    casts = []
    for name in sensors:
        col = frame[name]
        if col.dtype == pl.String:
            text = col.str.strip_chars()
            parsed = text.cast(pl.Float64, strict=False)
            bad = (
                parsed.is_null()
                & text.is_not_null()
                & (text != "")
                & ~text.str.to_lowercase().is_in(
                    ["nan", "na", "null", "none", "inf", "-inf"]
                )
            )
            if bad.any():
                row = int(bad.arg_max() or 0)
                raise InputError(
                    f"{source}: sensor column {name!r}, row {row + 2}: "
                    f"value {col[row]!r} "
                    "is not a number"
                )
            casts.append(parsed.alias(name))
        else:
            casts.append(col.cast(pl.Float64).alias(name))
    return frame.with_columns(casts)


def _repair(
    frame: pl.DataFrame,
    source: str,
    sensors: list[str],
    quality: QualitySettings,
    report: dict[str, Any],
) -> tuple[pl.DataFrame, list[str]]:
    dropped, repaired = report["dropped"], report["repaired"]

    too_big = [
        (pl.col(s).is_infinite() | (pl.col(s).abs() > quality.max_abs_value))
        .sum()
        .alias(s)
        for s in sensors
    ]
    counts = frame.select(too_big).row(0, named=True)
    report["non_finite"] = {s: int(n) for s, n in counts.items() if n}
    frame = frame.with_columns(
        pl.when(pl.col(s).is_finite() & (pl.col(s).abs() <= quality.max_abs_value))
        .then(pl.col(s))
        .otherwise(None)
        .alias(s)
        for s in sensors
    )

    empty = [s for s in sensors if frame[s].null_count() == frame.height]
    if empty:
        log.warning("%s: sensor(s) %s have no values at all; left out", source, empty)
        report["empty_sensors"] = empty
        sensors = [s for s in sensors if s not in empty]
        frame = frame.drop(empty)
        if not sensors:
            raise InputError(f"{source}: every sensor column is empty")

    order = pl.struct(ENTITY, TIMESTAMP)
    out_of_order = int(
        frame.select(
            (order.rank("ordinal") != pl.int_range(1, pl.len() + 1)).sum()
        ).item()
    )
    report["out_of_order_rows"] = out_of_order
    if out_of_order:
        if not quality.sort_rows:
            raise InputError(
                f"{source}: {out_of_order} rows are not in time order "
                "within their entity"
            )
        frame = frame.sort([ENTITY, TIMESTAMP], maintain_order=True)
        repaired["sorted_rows"] = out_of_order

    before = frame.height
    if quality.drop_duplicate_rows:
        frame = frame.unique(
            subset=[c for c in frame.columns if c != SOURCE],
            keep="first",
            maintain_order=True,
        )
        if frame.height < before:
            dropped["exact_duplicate_rows"] = before - frame.height

    dup = frame.select(pl.struct(ENTITY, TIMESTAMP).is_duplicated()).to_series()
    if dup.any():
        row = int(dup.arg_max() or 0)
        where = f"entity {frame[ENTITY][row]!r}, timestamp {frame[TIMESTAMP][row]}"
        if quality.duplicate_timestamps == "error":
            raise InputError(
                f"{source}: duplicated timestamp with different values: {where}"
            )
        before = frame.height
        frame = frame.unique(
            subset=[ENTITY, TIMESTAMP], keep="last", maintain_order=True
        )
        dropped["duplicate_timestamps"] = before - frame.height
        log.warning(
            "%s: kept the last of rows sharing a timestamp (first: %s)", source, where
        )

    missing = {s: frame[s].null_count() for s in sensors}
    report["missing"] = {s: n for s, n in missing.items() if n}
    if any(missing.values()):
        limit = quality.max_fill_gap or None
        filled = frame.with_columns(
            pl.col(s).fill_null(strategy="forward", limit=limit).over(ENTITY)
            for s in sensors
        )
        still = filled.select(
            pl.any_horizontal(pl.col(s).is_null() for s in sensors)
        ).to_series()
        repaired["forward_filled_values"] = int(
            sum(missing.values()) - sum(filled[s].null_count() for s in sensors)
        )
        if still.any():
            if not quality.drop_unfilled_rows:
                row = int(still.arg_max() or 0)
                raise InputError(
                    f"{source}: entity {filled[ENTITY][row]!r}: missing values "
                    f"at {filled[TIMESTAMP][row]} exceed max_fill_gap"
                )
            dropped["rows_with_unfillable_gaps"] = int(still.sum())
            filled = filled.filter(~still)
        frame = filled
    if frame.height == 0:
        raise InputError(f"{source}: no rows left after dropping {dropped}")
    return frame, sensors


def _summary(frame: pl.DataFrame, sensors: list[str]) -> dict[str, Any]:
    step = frame.select(
        pl.col(TIMESTAMP).diff().over(ENTITY).dt.total_seconds().alias("d")
    )["d"]
    median = step.median()
    gaps = int((step > 1.5 * median).sum()) if median and not math.isnan(median) else 0
    stats = frame.select([pl.col(s).std().alias(s) for s in sensors]).row(0, named=True)
    entities = frame.group_by(ENTITY, maintain_order=True).len()
    return {
        "median_step_seconds": median,
        "time_gaps": gaps,
        "constant_sensors": [s for s, v in stats.items() if not v],
        "entity_rows": dict(
            zip(entities[ENTITY].to_list(), entities["len"].to_list(), strict=True)
        ),
    }
