"""The input contract: map columns, parse them, and hand the table to the repair rules.

Raw input has one row per (timestamp, entity). After :func:`load_raw` every table has
the canonical columns ``timestamp`` (UTC), ``machine_id`` (text), one Float64 column per
sensor, ``label`` (0/1, when the input has labels) and any passthrough columns, sorted
by entity then time. What cannot be mapped raises :class:`InputError` naming the file,
line (or row), column and the value found; what can be repaired is repaired by the
rules in :mod:`sagewatch.quality` and counted in :attr:`Dataset.quality`.

Notes:
    Line numbers count a CSV file's physical lines with the header as line 1; a quoted
    field that spans lines shifts the numbers after it. Parquet files and in-memory
    tables are counted in rows from 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from sagewatch import storage
from sagewatch.config import DataSettings, QualitySettings
from sagewatch.errors import InputError
from sagewatch.timestamps import in_windows, to_utc

log = logging.getLogger(__name__)

TIMESTAMP = "timestamp"
ENTITY = "machine_id"
LABEL = "label"
SOURCE = "__source"
LINE = "__line"
# Output columns a sensor may not be named like (nor anything starting with "__").
RESERVED = frozenset(
    {TIMESTAMP, ENTITY, LABEL, "anomaly_score", "threshold", "is_anomaly"}
    | {"top_sensor", "in_reference"}
)
# Text tables: positions in them are lines, the header being line 1.
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
_MISSING_TEXT = ("", "nan", "na", "n/a", "null", "none")


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


def load_raw(
    uri: str,
    data: DataSettings,
    quality: QualitySettings,
    *,
    rolling_window: int | None = None,
) -> Dataset:
    """Read and validate raw sensor data from a file, folder or glob.

    Raises:
        InputError: the data breaks the contract in a way no rule repairs.
        StorageError: the URI cannot be read.
    """
    from sagewatch.quality import check_same_columns

    frames = []
    for path in storage.list_files(uri):
        frame = storage.read_table(path, sep=data.sep)
        if frame.height == 0:
            raise InputError(
                f"{path}: the file has a header but no data rows; expected at "
                "least one row of readings"
            )
        frames.append(_with_position(frame, path))
    check_same_columns(frames, data)
    try:
        raw = pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"files under {uri} do not share one schema: {exc}") from exc
    windows = _read_windows(data.label_windows) if data.label_windows else None
    return validate(
        raw, uri, data, quality, label_windows=windows, rolling_window=rolling_window
    )


def validate(
    raw: pl.DataFrame,
    source: str,
    data: DataSettings,
    quality: QualitySettings,
    *,
    label_windows: Any = None,
    rolling_window: int | None = None,
    summary: bool = True,
) -> Dataset:
    """Turn a raw table into the canonical form, repairing by rule and counting.

    ``summary=False`` leaves out of the report the sampling, gaps and spreads of
    :func:`sagewatch.quality.summarize` (keeping the rows per entity), for a
    caller that merges them over chunks itself.

    Raises:
        InputError: the table breaks the contract in a way no rule repairs.
    """
    from sagewatch.quality import (
        check_column_names,
        entity_rows,
        repair,
        strip_column_names,
        summarize,
    )

    if raw.height == 0:
        raise InputError(f"{source}: no data rows (the file is header only or empty)")
    if SOURCE not in raw.columns:
        raw = _with_position(raw, source)
    raw = strip_column_names(raw)
    check_column_names(raw, data)
    report: dict[str, Any] = {"rows_in": raw.height, "dropped": {}, "repaired": {}}

    frame = raw.with_columns(_parse_timestamps(raw, data))
    frame = _attach_entity(frame, data.entity_column)
    sensors = _sensor_columns(raw, data, quality)
    passthrough = [c for c in data.passthrough_columns if c in raw.columns]
    frame = _attach_label(frame, data, label_windows)
    keep = {TIMESTAMP, ENTITY, LABEL, *sensors, *passthrough, SOURCE, LINE}
    report["ignored_columns"] = [
        c for c in raw.columns if c not in keep and c not in _mapped(data)
    ]
    if report["ignored_columns"] and summary:  # chunked callers warn once themselves
        log.warning("%s: columns %s are not used", source, report["ignored_columns"])
    frame = _cast_sensors(frame, sensors)
    frame = frame.select(
        TIMESTAMP,
        ENTITY,
        *sensors,
        *([LABEL] if LABEL in frame.columns else []),
        *[c for c in passthrough if c not in sensors],
        SOURCE,
        LINE,
    )

    frame, sensors = repair(frame, source, sensors, quality, report)
    if summary:
        report.update(summarize(frame, sensors, rolling_window=rolling_window))
    else:
        report["entity_rows"] = entity_rows(frame)
    log.info(
        "validated %s: %d rows in, %d rows out, %d entities, %d sensors%s",
        source,
        report["rows_in"],
        report["rows_out"],
        len(report["entity_rows"]),
        len(sensors),
        f", dropped {report['dropped']}" if report["dropped"] else "",
    )
    return Dataset(frame.drop(SOURCE, LINE), sensors, passthrough, source, report)


# ----------------------------------------------------------------------------- places


def _with_position(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """Attach the source file and each row's line (CSV) or row number."""
    first = 2 if str(source).endswith(CSV_SUFFIXES) else 1
    return frame.with_columns(
        pl.lit(str(source)).alias(SOURCE),
        pl.int_range(first, frame.height + first, dtype=pl.Int64).alias(LINE),
    )


def where(frame: pl.DataFrame, index: int, column: str | None = None) -> str:
    """``file, line N, entity 'e', column 'c'`` for row ``index`` of ``frame``."""
    source = frame[SOURCE][index]
    unit = "line" if str(source).endswith(CSV_SUFFIXES) else "row"
    parts = [f"{source}, {unit} {frame[LINE][index]}"]
    if ENTITY in frame.columns:
        parts.append(f"entity {frame[ENTITY][index]!r}")
    if column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)


def _first(mask: pl.Series) -> int:
    return int(mask.fill_null(False).arg_max() or 0)


# ----------------------------------------------------------------------------- columns


def _mapped(data: DataSettings) -> set[str]:
    return {c for c in (data.timestamp_column, data.entity_column) if c} | (
        {data.label_column} if data.label_column else set()
    )


def _sensor_columns(
    frame: pl.DataFrame, data: DataSettings, quality: QualitySettings
) -> list[str]:
    source = frame[SOURCE][0]
    taken = _mapped(data) | {SOURCE, LINE, ENTITY, TIMESTAMP, LABEL}
    if data.sensor_columns:
        missing = [c for c in data.sensor_columns if c not in frame.columns]
        if missing:
            raise InputError(
                f"{source}: sensor columns {missing} not found; "
                f"columns are {_listing(frame)}"
            )
        sensors = list(dict.fromkeys(data.sensor_columns))
    else:
        sensors = [
            c
            for c in frame.columns
            if c not in taken
            and c not in data.passthrough_columns
            and _numeric_like(frame[c])
        ]
    clash = sorted(s for s in sensors if s in RESERVED or s.startswith("__"))
    if clash:
        raise InputError(
            f"{source}: sensor column(s) {clash} use a reserved output name; rename "
            f"them or set sensor_columns (reserved: {sorted(RESERVED)} and names "
            "starting with '__')"
        )
    if not sensors:
        others = [frame[c] for c in frame.columns if c not in taken]
        example = next(
            (
                f" ({c.name!r} holds "
                f"{'text' if c.dtype == pl.String else c.dtype} values such as "
                f"{c.drop_nulls()[0]!r})"
                for c in others
                if c.drop_nulls().len()
            ),
            "",
        )
        raise InputError(
            f"{source}: no numeric sensor columns found among {_listing(frame)}"
            f"{example}; expected at least one column of numbers, or set "
            "sensor_columns"
        )
    if len(sensors) > quality.max_sensors:
        raise InputError(
            f"{source}: {len(sensors)} sensor columns, more than max_sensors="
            f"{quality.max_sensors}; choose them with sensor_columns or raise "
            "max_sensors"
        )
    return sensors


def _listing(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in (SOURCE, LINE)]


def _numeric_like(series: pl.Series) -> bool:
    """Numbers, text holding at least one number, or a column with no value at all.

    A column of text with a few numbers becomes a sensor, so validation refuses its
    first non-number instead of leaving the column out unnoticed.
    """
    if series.dtype.is_numeric() or series.dtype == pl.Null:
        return True
    if series.dtype != pl.String:
        return False
    text = series.str.strip_chars()
    present = text.is_not_null() & ~text.str.to_lowercase().is_in(_MISSING_TEXT)
    parsed = text.cast(pl.Float64, strict=False).is_not_null()
    return not present.any() or parsed.any()


def _cast_sensors(frame: pl.DataFrame, sensors: list[str]) -> pl.DataFrame:
    casts = []
    for name in sensors:
        col = frame[name]
        if col.dtype in (pl.String, pl.Null):
            text = col.cast(pl.String).str.strip_chars()
            parsed = text.cast(pl.Float64, strict=False)
            bad = parsed.is_null() & ~text.str.to_lowercase().is_in(
                _MISSING_TEXT
            ).fill_null(True)
            if bad.any():
                row = _first(bad)
                raise InputError(
                    f"{where(frame, row, name)}: value {col[row]!r} is not a number; "
                    "expected a decimal number such as 12.5 (or empty / NaN for "
                    "a missing reading)"
                )
            casts.append(parsed.alias(name))
        elif col.dtype.is_numeric() or col.dtype == pl.Boolean:
            casts.append(col.cast(pl.Float64).alias(name))
        else:
            raise InputError(
                f"{frame[SOURCE][0]}, column {name!r}: holds {col.dtype} values; "
                "expected numbers"
            )
    return frame.with_columns(casts)


# ----------------------------------------------------------------------------- time


def _parse_timestamps(raw: pl.DataFrame, data: DataSettings) -> pl.Series:
    column = data.timestamp_column
    if column not in raw.columns:
        raise InputError(
            f"{raw[SOURCE][0]}: timestamp column {column!r} not found; columns are "
            f"{_listing(raw)}{_separator_hint(raw)}; set timestamp_column"
        )
    parsed = to_utc(
        raw[column],
        timezone=data.timezone,
        timestamp_format=data.timestamp_format,
        locate=lambda row: where(raw, row, column),
    )
    return parsed.alias(TIMESTAMP)


def _separator_hint(raw: pl.DataFrame) -> str:
    names = _listing(raw)
    found = [s for s in (",", ";", "\t", "|") if len(names) == 1 and s in names[0]]
    if found:
        return f" (read as one column: is the separator {found[0]!r}? set sep)"
    return ""


# ----------------------------------------------------------------------------- entity


def _attach_entity(frame: pl.DataFrame, column: str | None) -> pl.DataFrame:
    if column and column in frame.columns:
        if frame[column].dtype == pl.String and _runs_stripped(frame[column]):
            text = frame[column]
        else:
            text = frame[column].cast(pl.String).str.strip_chars()
        empty = text.is_null() | (text == "")
        if empty.any():
            row = _first(empty)
            raise InputError(
                f"{where(frame.drop(ENTITY, strict=False), row, column)}: empty "
                "entity; expected a name or number for every row"
            )
        _refuse_line_breaks(frame, text, column)
        return frame.with_columns(text.alias(ENTITY))
    if column and column != ENTITY:
        raise InputError(
            f"{frame[SOURCE][0]}: entity column {column!r} not found; columns are "
            f"{_listing(frame)}"
        )
    # No entity column: each input file is one entity, named after the file.
    name = (
        pl.col(SOURCE)
        .str.extract(r"([^/\\]+)$")
        .str.replace(r"(\.csv|\.parquet|\.tsv|\.txt)(\.gz)?$", "")
    )
    return frame.with_columns(name.alias(ENTITY))


def _refuse_line_breaks(frame: pl.DataFrame, names: pl.Series, column: str) -> None:
    """Refuse a name holding a line break: a CSV quote left open merges the lines
    up to the next quote into one field. Checked on the first row of each run."""
    heads = _run_heads(names)
    broken = heads.str.contains(r"[\r\n]")
    if not broken.any():
        return
    name = heads.filter(broken)[0]
    row = _first(names == name)
    raise InputError(
        f"{where(frame.drop(ENTITY, strict=False), row, column)}: the entity "
        f"{name[:60]!r} runs over several lines; expected a name on one line (a "
        "stray quote character?)"
    )


def _run_heads(names: pl.Series) -> pl.Series:
    """The first row of each run of equal names."""
    first = pl.int_range(pl.len()) == 0
    head = pl.col("n").ne_missing(pl.col("n").shift(1)) | first
    return names.to_frame("n").filter(head).to_series()


def _runs_stripped(names: pl.Series) -> bool:
    """Whether every name is present, not empty and stripped already, judged on
    the first row of each run of equal names (the others equal it)."""
    heads = _run_heads(names)
    stripped = heads.str.strip_chars()
    return (
        not heads.null_count() and (stripped == heads).all() and (stripped != "").all()
    )


# ----------------------------------------------------------------------------- label


def _attach_label(
    frame: pl.DataFrame, data: DataSettings, windows: Any
) -> pl.DataFrame:
    column = data.label_column
    if windows is not None:
        try:
            spans = in_windows(frame[SOURCE], frame[TIMESTAMP], windows, data.timezone)
        except InputError as exc:
            raise InputError(f"{data.label_windows}: {exc}") from exc
        return frame.with_columns(spans.cast(pl.Int8).alias(LABEL))
    if not column or column not in frame.columns:
        if column and column != "anomaly":
            raise InputError(
                f"{frame[SOURCE][0]}: label column {column!r} not found; "
                f"columns are {_listing(frame)}"
            )
        return frame
    values = frame[column]
    if (
        values.dtype.is_integer()
        and not values.null_count()
        and values.is_between(0, 1).all()
    ):  # the usual case, with no value to refuse
        return frame.with_columns(values.cast(pl.Int8).alias(LABEL))
    numeric = (
        values.str.strip_chars().cast(pl.Float64, strict=False)
        if values.dtype == pl.String
        else values.cast(pl.Float64, strict=False)
    )
    bad = ~numeric.is_in([0.0, 1.0]).fill_null(False)
    if bad.any():
        row = _first(bad)
        raise InputError(
            f"{where(frame, row, column)}: label "
            f"{'missing' if values[row] in (None, '') else repr(values[row])}; "
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
