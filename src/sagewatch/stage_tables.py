"""Reading the stages' own tables back: features and scores, checked on the way in.

A features table must be one ``sagewatch features`` wrote; a scores table one that
``sagewatch score`` wrote, checked row by row (timestamp, entity, finite score and
threshold, 0/1 flags) because people edit and join them by hand before ``evaluate``.
Errors name the file, the column and the CSV line or Parquet row.
"""

from __future__ import annotations

import functools
import json
import logging

import polars as pl

from sagewatch import storage
from sagewatch.errors import InputError
from sagewatch.features import sensors_of
from sagewatch.reference import canonical
from sagewatch.schema import CSV_SUFFIXES, ENTITY, LABEL, TIMESTAMP
from sagewatch.timestamps import ISO_EXAMPLES, to_utc

log = logging.getLogger(__name__)

FEATURES_TABLE = "a features table written by `sagewatch features` (Parquet)"
EVERY_FEATURE = (
    "every feature of the configured statistics (compute the features with the "
    "same statistics)"
)
SCORES_CSV = "anomaly_scores.csv"
SCORES_PARQUET = "anomaly_scores.parquet"


def scores_columns(scores: pl.DataFrame | str) -> list[str]:
    """Column names of a scores table in memory or at a URI (read lazily)."""
    if isinstance(scores, pl.DataFrame):
        return scores.columns
    return storage.table_schema(scores).names()


def feature_part_schemas(files: list[str]) -> dict[str, pl.Schema]:
    """The schema of each part file of a features table, each checked to be one:
    a timestamp of a date-time type, an entity and ``<sensor>__<statistic>``
    columns (so a scores table caught by the same glob is refused).

    Raises:
        InputError: a file that is not a features table, named.
    """
    schemas = {f: storage.table_schema(f) for f in files}
    for path, schema in schemas.items():
        names = schema.names()
        require_names(names, path, [TIMESTAMP, ENTITY], FEATURES_TABLE)
        if not sensors_of(names) or not isinstance(schema[TIMESTAMP], pl.Datetime):
            raise InputError(
                f"{path}: no '<sensor>__<statistic>' columns or no typed timestamps; "
                f"expected {FEATURES_TABLE}"
            )
    _refuse_mixed_runs(files)
    return schemas


def _refuse_mixed_runs(files: list[str]) -> None:
    """Refuse part files computed with different feature settings (a folder that
    holds parts of two runs), named with the settings of each. Files without the
    record (written by hand, or by an earlier version) are not compared."""
    from sagewatch.streaming import STAMP_KEY  # imports this module's users

    stamps: dict[str, str] = {}
    for path in files:
        if path.endswith(".parquet"):
            recorded = storage.parquet_metadata(path).get(STAMP_KEY)
            if recorded is not None:
                stamps.setdefault(_canonical_stamp(recorded), path)
    if len(stamps) > 1:
        (a, first), (b, second) = list(stamps.items())[:2]
        raise InputError(
            f"{first} and {second}: feature files computed with different "
            f"settings ({_shown(a)} and {_shown(b)}); expected the parts of one "
            "features run "
            "(compute the features again)"
        )


def recorded_window(files: list[str]) -> tuple[int, str] | None:
    """The rolling window the Parquet files record they were computed with, and
    the first file that records it; None when none carries a record of ours
    (written by hand, or by an earlier version). Footers are read up to the first
    record: parts of two runs are refused apart (see :func:`feature_part_schemas`).
    """
    from sagewatch.streaming import STAMP_KEY  # imports this module's users

    for path in files:
        if path.endswith(".parquet"):
            stamp = _stamp(storage.parquet_metadata(path).get(STAMP_KEY))
            window = stamp.get("rolling_window") if stamp else None
            if isinstance(window, int) and not isinstance(window, bool):
                return window, path
    return None


def _stamp(recorded: str | None) -> dict | None:
    """A feature file's record as a mapping; None when it is missing or not JSON
    of an object."""
    try:
        value = json.loads(recorded) if recorded else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _canonical_stamp(recorded: str) -> str:
    """The record with its statistics sorted: their order does not change the
    values of any column, and files written before the record was sorted list
    them in the configured order. A record that is not ours is compared as
    written."""
    stamp = _stamp(recorded)
    statistics = stamp.get("statistics") if stamp else None
    if not isinstance(statistics, list) or not all(
        isinstance(name, str) for name in statistics
    ):
        return recorded
    return json.dumps({**stamp, "statistics": sorted(statistics)}, sort_keys=True)


def _shown(record: str, limit: int = 200) -> str:
    return (
        record
        if len(record) <= limit
        else f"{record[:limit]}... ({len(record)} characters)"
    )


def read_features(uri: str) -> pl.DataFrame:
    """Read a features table (file or folder of parts) in canonical order.

    Feature columns come back as stored: Float32, or Float64 from versions that
    stored that (a folder holding both reads as Float64, which keeps every value).

    Raises:
        InputError: the table is not one ``sagewatch features`` wrote.
    """
    feature_part_schemas(storage.list_files(uri))
    features = storage.read_table(uri)
    require(features, uri, [TIMESTAMP, ENTITY], FEATURES_TABLE)
    if not sensors_of(features.columns) or features.schema[TIMESTAMP] != pl.Datetime:
        raise InputError(
            f"{uri}: no '<sensor>__<statistic>' columns or no typed timestamps; "
            f"expected {FEATURES_TABLE}"
        )
    return canonical(features)  # as written by `sagewatch features`: no sorted copy


def read_scores(uri: str) -> pl.DataFrame:
    """Read a scores table written by ``sagewatch score`` (CSV or Parquet), sorted by
    entity and time whatever the order of its rows and part files.

    Each part file is read and checked on its own, so an error names the file and
    its CSV line or Parquet row; where a folder holds a CSV and a Parquet copy of
    the same part, the Parquet one is read.

    Raises:
        InputError: the table is not one ``sagewatch score`` wrote, or it scores an
            entity at one timestamp twice.
    """
    from sagewatch.scoring import SCORE_COLUMNS  # loads torch

    what = "anomaly_scores.csv or .parquet written by `sagewatch score`"
    files = _one_copy(uri, storage.list_files(uri))
    parts = []
    for number, path in enumerate(files):
        part = storage.read_table(path)
        require(part, path, [TIMESTAMP, ENTITY, *SCORE_COLUMNS[:4]], what)
        if part.height:
            parts.append(
                _checked_scores(part, path).with_columns(
                    pl.lit(number, pl.Int32).alias(_PART),
                    pl.int_range(part.height, dtype=pl.Int64).alias(_ROW),
                )
            )
    if not parts:
        raise InputError(f"{uri}: the table has no rows; expected {what}")
    try:
        frame = pl.concat(parts, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"part files under {uri} do not share one schema: {exc}"
        ) from exc
    _refuse_twice_scored(frame, files)
    return frame.sort([ENTITY, TIMESTAMP], maintain_order=True).drop(_PART, _ROW)


_PART, _ROW = "__part", "__row"


def _place(path: str, row: int) -> str:
    """Where row ``row`` (from 0) of a part file is: its CSV line or Parquet row."""
    if path.endswith(CSV_SUFFIXES):
        return f"{path}, line {row + 2}"  # the header is line 1
    return f"{path}, row {row + 1}"


def _refuse_twice_scored(frame: pl.DataFrame, files: list[str]) -> None:
    twice = frame.filter(pl.struct(ENTITY, TIMESTAMP).is_duplicated())
    if not twice.height:
        return
    first = twice.row(0, named=True)
    same = twice.filter(
        (pl.col(ENTITY) == first[ENTITY]) & (pl.col(TIMESTAMP) == first[TIMESTAMP])
    )
    a, b = (
        _place(files[r[_PART]], r[_ROW]) for r in same.head(2).iter_rows(named=True)
    )
    raise InputError(
        f"{a} and {b}: entity {first[ENTITY]!r} at {first[TIMESTAMP]} is scored "
        f"twice ({twice.height} rows share an entity and timestamp); expected one "
        "row per entity and timestamp (does the input hold two copies of the scores?)"
    )


def _checked_scores(read: pl.DataFrame, path: str) -> pl.DataFrame:
    """One part file's rows with typed columns, or an error naming the first bad
    value: a missing timestamp or entity, a score or threshold that is not a finite
    number, a flag or label that is not 0 or 1."""
    place = functools.partial(_place, path)
    stamps = to_utc(
        read[TIMESTAMP],
        locate=lambda row: f"{place(row)}, column 'timestamp'",
        expected=f"expected {ISO_EXAMPLES}, as the score stage writes them",
    )
    entity = read[ENTITY].cast(pl.String).str.strip_chars()  # as in raw input
    problems = {ENTITY: (entity.is_null() | (entity == ""), "a name")}
    numbers = {}
    for column in ("anomaly_score", "threshold", "is_anomaly", "in_reference", LABEL):
        if column not in read.columns:
            continue
        values = read[column]
        if values.dtype == pl.String:  # padded with spaces by hand, as raw input may be
            values = values.str.strip_chars()
        values = values.cast(pl.Float64, strict=False)
        if column in ("anomaly_score", "threshold"):
            problems[column] = (~values.is_finite().fill_null(False), "a finite number")
        else:
            problems[column] = (~values.is_in([0.0, 1.0]).fill_null(False), "0 or 1")
            values = values.cast(pl.Int8, strict=False)
        numbers[column] = values
    for column, (bad, expected) in problems.items():
        if bad.any():
            row = int(bad.arg_max() or 0)
            value = read[column][row]
            empty = value is None or (isinstance(value, str) and not value.strip())
            shown = "an empty value" if empty else f"value {value!r}"
            raise InputError(
                f"{place(row)}, column {column!r}: {shown}; expected {expected}"
            )
    return read.with_columns(
        stamps.alias(TIMESTAMP),
        entity.alias(ENTITY),
        pl.col("top_sensor").cast(pl.String),
        *[values.alias(column) for column, values in numbers.items()],
    )


def _one_copy(uri: str, files: list[str]) -> list[str]:
    """``files`` without the CSV parts that have a Parquet twin.

    ``sagewatch score`` writes the same rows as CSV and as Parquet (``part.csv``
    and ``part.parquet``); read as part files, both would count every row twice.
    """
    stems = {f.rsplit(".", 1)[0] for f in files if f.endswith(".parquet")}
    kept = [f for f in files if not (f.endswith(".csv") and f[:-4] in stems)]
    if len(kept) < len(files):
        log.info(
            "%s: reading the Parquet copy of %d CSV part files",
            uri,
            len(files) - len(kept),
        )
    return kept


def require(frame: pl.DataFrame, uri: str, columns: list[str], what: str) -> None:
    require_names(frame.columns, uri, columns, what)


def require_names(names: list[str], uri: str, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{uri}: columns {missing} not found; expected {what}")
