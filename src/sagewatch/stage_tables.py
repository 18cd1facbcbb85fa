"""Reading the stages' own tables back: features and scores, checked on the way in.

A features table must be one ``sagewatch features`` wrote; a scores table one that
``sagewatch score`` wrote, checked row by row (timestamp, entity, finite score and
threshold, 0/1 flags) because people edit and join them by hand before ``evaluate``.
Errors name the file, the column and the CSV line or Parquet row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import polars as pl

from sagewatch import storage
from sagewatch.errors import InputError
from sagewatch.features import sensors_of
from sagewatch.reference import canonical
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP

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
    return storage.scan_table(scores).collect_schema().names()


def read_features(uri: str) -> pl.DataFrame:
    """Read a features table (file or folder of parts) in canonical order.

    Feature columns come back as stored: Float32, or Float64 from versions that
    stored that (a folder holding both reads as Float64, which keeps every value).

    Raises:
        InputError: the table is not one ``sagewatch features`` wrote.
    """
    features = storage.read_table(uri)
    require(features, uri, [TIMESTAMP, ENTITY], FEATURES_TABLE)
    if not sensors_of(features.columns) or features.schema[TIMESTAMP] != pl.Datetime:
        raise InputError(
            f"{uri}: no '<sensor>__<statistic>' columns or no typed timestamps; "
            f"expected {FEATURES_TABLE}"
        )
    return canonical(features)  # as written by `sagewatch features`: no sorted copy


def read_scores(uri: str) -> pl.DataFrame:
    """Read a scores table written by ``sagewatch score`` (CSV or Parquet).

    Raises:
        InputError: the table is not one ``sagewatch score`` wrote.
    """
    from sagewatch.scoring import SCORE_COLUMNS  # loads torch

    source = _one_copy(uri)
    scores = storage.read_table(source)
    what = "anomaly_scores.csv or .parquet written by `sagewatch score`"
    require(scores, uri, [TIMESTAMP, ENTITY, *SCORE_COLUMNS[:4]], what)
    if scores.height == 0:
        raise InputError(f"{uri}: the table has no rows; expected {what}")
    read = scores
    if scores.schema[TIMESTAMP] == pl.String:
        stamps = scores[TIMESTAMP].str.to_datetime(
            time_zone="UTC", time_unit="us", strict=False
        )
        scores = scores.with_columns(stamps.alias(TIMESTAMP))
    _check_score_values(scores, read, uri, _place_namer(source))
    flags = [c for c in ("is_anomaly", "in_reference", LABEL) if c in scores.columns]
    return scores.with_columns(
        pl.col(ENTITY).cast(pl.String),
        pl.col("top_sensor").cast(pl.String),
        *[pl.col(c).cast(pl.Float64).cast(pl.Int8) for c in flags],
    )


def _place_namer(source: str) -> Callable[[int], str]:
    """How a message names row ``i`` (from 0) of a scores table: by its line in a
    single CSV file (the header is line 1), else by its row (from 1)."""
    files = storage.list_files(source)
    text = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
    if len(files) == 1 and files[0].endswith(text):
        return lambda i: f"line {i + 2}"
    return lambda i: f"row {i + 1}"


def _check_score_values(
    scores: pl.DataFrame, read: pl.DataFrame, uri: str, place: Callable[[int], str]
) -> None:
    """Refuse a missing timestamp or entity, a score or threshold that is not a
    finite number and a flag or label that is not 0 or 1, naming the first bad row
    and its value as ``read``."""
    entity = scores[ENTITY].cast(pl.String)
    problems = {
        TIMESTAMP: (scores[TIMESTAMP].is_null(), "an ISO 8601 timestamp"),
        ENTITY: (entity.is_null() | (entity.str.strip_chars() == ""), "a name"),
    }
    for column in ("anomaly_score", "threshold"):
        values = scores[column].cast(pl.Float64, strict=False)
        problems[column] = (~values.is_finite().fill_null(False), "a finite number")
    for column in ("is_anomaly", "in_reference", LABEL):
        if column in scores.columns:
            values = scores[column].cast(pl.Float64, strict=False)
            problems[column] = (~values.is_in([0.0, 1.0]).fill_null(False), "0 or 1")
    for column, (bad, expected) in problems.items():
        if bad.any():
            row = int(bad.arg_max() or 0)
            raise InputError(
                f"{uri}, {place(row)}, column {column!r}: value "
                f"{read[column][row]!r}; expected {expected}"
            )


def _one_copy(uri: str) -> str:
    """The Parquet file where a folder holds both copies of a scores table.

    ``sagewatch score`` writes the same rows as CSV and as Parquet; read as part
    files, a folder holding both would count every row twice.
    """
    files = storage.list_files(uri)
    names = {f.rsplit("/", 1)[-1]: f for f in files}
    csv, parquet = SCORES_CSV, SCORES_PARQUET
    if len(files) > 1 and csv in names and parquet in names:
        log.info("%s: reading %s, the Parquet copy of %s", uri, parquet, csv)
        return names[parquet]
    return uri


def require(frame: pl.DataFrame, uri: str, columns: list[str], what: str) -> None:
    require_names(frame.columns, uri, columns, what)


def require_names(names: list[str], uri: str, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{uri}: columns {missing} not found; expected {what}")
