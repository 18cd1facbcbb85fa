"""Reading the stages' own tables back: features and scores, checked on the way in.

A features table must be one ``sagewatch features`` wrote; a scores table one that
``sagewatch score`` wrote, checked row by row (timestamp, entity, finite score and
threshold, 0/1 flags) because people edit and join them by hand before ``evaluate``.
Errors name the file, the column and the CSV line or Parquet row.
"""

from __future__ import annotations

import logging

import polars as pl

from sagewatch import storage
from sagewatch.errors import InputError
from sagewatch.features import sensors_of
from sagewatch.reference import canonical
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP
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

    Each part file is read and checked on its own, so an error names the file and
    its CSV line or Parquet row, then the parts are joined in name order.

    Raises:
        InputError: the table is not one ``sagewatch score`` wrote.
    """
    from sagewatch.scoring import SCORE_COLUMNS  # loads torch

    what = "anomaly_scores.csv or .parquet written by `sagewatch score`"
    parts = []
    for path in storage.list_files(_one_copy(uri)):
        part = storage.read_table(path)
        require(part, path, [TIMESTAMP, ENTITY, *SCORE_COLUMNS[:4]], what)
        if part.height:
            parts.append(_checked_scores(part, path))
    if not parts:
        raise InputError(f"{uri}: the table has no rows; expected {what}")
    try:
        return parts[0] if len(parts) == 1 else pl.concat(parts, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"part files under {uri} do not share one schema: {exc}"
        ) from exc


def _checked_scores(read: pl.DataFrame, path: str) -> pl.DataFrame:
    """One part file's rows with typed columns, or an error naming the first bad
    value: a missing timestamp or entity, a score or threshold that is not a finite
    number, a flag or label that is not 0 or 1."""
    csv = path.endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"))

    def place(row: int) -> str:  # the header is line 1 of a CSV file
        return f"{path}, line {row + 2}" if csv else f"{path}, row {row + 1}"

    stamps = to_utc(
        read[TIMESTAMP],
        locate=lambda row: f"{place(row)}, column 'timestamp'",
        expected=f"expected {ISO_EXAMPLES}, as the score stage writes them",
    )
    entity = read[ENTITY].cast(pl.String)
    problems = {ENTITY: (entity.is_null() | (entity.str.strip_chars() == ""), "a name")}
    numbers = {}
    for column in ("anomaly_score", "threshold", "is_anomaly", "in_reference", LABEL):
        if column not in read.columns:
            continue
        values = read[column].cast(pl.Float64, strict=False)
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
