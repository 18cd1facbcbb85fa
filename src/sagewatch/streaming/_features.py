"""Features computed chunk by chunk and written per entity as they come.

Every chunk is validated by :func:`sagewatch.schema.validate` with the same rules as
the in-memory path, and a piece of a long entity carries the last
``rolling_window - 1`` readings of the piece before it, so its features are those of
the whole entity. Where the result could differ from the in-memory path's, the stage
falls back to it (see the notes of :mod:`sagewatch.streaming`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from sagewatch import storage
from sagewatch.config import Settings
from sagewatch.errors import InputError
from sagewatch.features import (
    FEATURE_DTYPE,
    entity_starts,
    feature_block,
    feature_names,
    sensor_matrix,
)
from sagewatch.schema import ENTITY, LABEL, SOURCE, TIMESTAMP, Dataset, validate
from sagewatch.streaming._chunks import (
    NotGroupedError,
    _Fallback,
    count_rows,
    entity_chunks,
    raw_batches,
)
from sagewatch.streaming._progress import Progress
from sagewatch.streaming._quality import _Quality
from sagewatch.streaming._writers import _EntityWriter, stamp

log = logging.getLogger(__name__)

# Raw rows per features chunk: as fast as larger chunks, at half the memory (two
# chunks are in flight, and a chunk's Float32 features take about 75 bytes a row).
FEATURE_CHUNK_ROWS = 500_000


@dataclass
class FeaturesResult:
    """What :func:`stream_features` read, dropped and wrote."""

    sensors: list[str]
    passthrough: list[str]
    quality: dict[str, Any]
    outputs: list[storage.FileInfo] = field(default_factory=list)
    inputs: list[storage.FileInfo] = field(default_factory=list)
    rows_out: int = 0


@dataclass
class _Tail:
    """The last rows of the entity a chunk ended with, as context for the next."""

    entity: str
    values: np.ndarray  # (sensors, rows)
    position: int  # rows of the entity before the first carried row
    last_time: pl.Series  # (1,) kept as a series: no loss of precision


def stream_features(
    settings: Settings,
    input_uri: str,
    output_dir: str,
    *,
    chunk_rows: int = FEATURE_CHUNK_ROWS,
    progress: bool = False,
) -> FeaturesResult | None:
    """Validate raw input chunk by chunk and write its features per entity.

    Returns None, having written nothing, where the result could differ from the
    in-memory path's (see the notes of :mod:`sagewatch.streaming`); the caller
    then validates in memory.

    Raises:
        StorageError: the input cannot be listed.
    """
    data = settings.data
    files = storage.list_files(input_uri)
    total = count_rows(files, data.sep)
    try:
        if total is not None and total <= chunk_rows:
            raise _Fallback(f"{total} rows fit in one chunk of {chunk_rows}")
        _same_schema(files, data.sep)
        metadata = stamp(settings.features.rolling_window, settings.features.statistics)
        with _EntityWriter(output_dir, metadata) as writer, _held_logs() as held:
            result = _stream_features(
                settings, input_uri, files, writer, chunk_rows, total, progress
            )
    except (_Fallback, InputError, pl.exceptions.PolarsError) as exc:
        # Interleaved entities cost memory the user can avoid: say so aloud.
        level = logging.WARNING if isinstance(exc, NotGroupedError) else logging.INFO
        reason = (str(exc).strip() or repr(exc)).splitlines()[0]
        log.log(level, "%s: not streamed (%s); validating in memory", input_uri, reason)
        return None
    for record in held:  # the in-memory path gives its own after a fallback
        logging.getLogger(record.name).handle(record)
    result.outputs = writer.outputs
    file_rows = result.quality.pop("_file_rows")
    result.inputs = [storage.file_info(f, rows=file_rows.get(f)) for f in files]
    return result


@contextlib.contextmanager
def _held_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold back what validating chunks logs (repairs, rows in and out) until
    streaming succeeds: after a fallback it would repeat with other counts."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    loggers = [logging.getLogger(name) for name in _VALIDATION_LOGGERS]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        yield held
    finally:
        for logger in loggers:
            logger.removeFilter(hold)


_VALIDATION_LOGGERS = ("sagewatch.quality", "sagewatch.schema", "sagewatch.timestamps")


def _same_schema(files: list[str], sep: str | None) -> None:
    first = storage.table_schema(files[0], sep=sep)
    for path in files[1:]:
        if storage.table_schema(path, sep=sep) != first:
            raise _Fallback(f"{path}: columns or types differ from {files[0]}")


def _stream_features(
    settings: Settings,
    input_uri: str,
    files: list[str],
    writer: _EntityWriter,
    chunk_rows: int,
    total: int | None,
    progress: bool,
) -> FeaturesResult:
    data, quality = settings.data, settings.quality
    windows = storage.read_json(data.label_windows) if data.label_windows else None
    merged = _Quality()
    batches = raw_batches(files, data.sep, chunk_rows, merged.file_rows)
    first = next(batches)
    entity = data.entity_column
    key = (
        pl.col(entity).cast(pl.String).str.strip_chars()
        if entity and entity in first.columns
        else pl.col(SOURCE)
    )
    bar = Progress("features", total, show=progress)
    tail: _Tail | None = None
    result: FeaturesResult | None = None
    buffers = _Buffers(writer)
    for chunk in entity_chunks(_prepend(first, batches), key, chunk_rows):
        dataset = validate(
            chunk.frame, input_uri, data, quality, label_windows=windows, summary=False
        )
        if result is None:
            result = FeaturesResult(dataset.sensors, dataset.passthrough, {})
        carry = tail if chunk.continues else None
        merged.add(dataset, result, carry)
        features, tail = _chunk_features(dataset, carry, settings, buffers)
        writer.write(features, continues=carry is not None, open_end=chunk.open_end)
        result.rows_out += features.height
        bar.update(chunk.frame.height)
    bar.close()
    assert result is not None
    result.quality = merged.report(settings.features.rolling_window)
    if result.quality["ignored_columns"]:
        log.warning(
            "%s: columns %s are not used", input_uri, result.quality["ignored_columns"]
        )
    return result


def _prepend(
    first: pl.DataFrame, rest: Iterator[pl.DataFrame]
) -> Iterator[pl.DataFrame]:
    yield first
    yield from rest


class _Buffers:
    """Two float32 arrays for chunks' features, used in turn.

    Polars takes a chunk's features from its array without copying, so the array
    is in use until the writer has written the chunk. Chunk ``i`` reuses the array
    of chunk ``i - 2``: writing chunk ``i - 1`` first waited for chunk ``i - 2``.
    Reuse spares the page faults of touching a fresh array for every chunk. The
    features are computed in float64 block by block and rounded as they are
    stored here (see :func:`sagewatch.features.feature_block`).
    """

    def __init__(self, writer: _EntityWriter) -> None:
        self.writer = writer
        self.taken = 0
        self._arrays: list[np.ndarray | None] = [None, None]

    def take(self, shape: tuple[int, int, int]) -> np.ndarray:
        assert self.writer.written >= self.taken - 1, "a chunk is still unwritten"
        turn = self.taken % 2
        self.taken += 1
        have = self._arrays[turn]
        if have is None or have.shape[:2] != shape[:2] or have.shape[2] < shape[2]:
            have = self._arrays[turn] = np.empty(shape, dtype=FEATURE_DTYPE)
        return have[:, :, : shape[2]]


def _chunk_features(
    dataset: Dataset, carry: _Tail | None, settings: Settings, buffers: _Buffers
) -> tuple[pl.DataFrame, _Tail]:
    """Features of one validated chunk, with the tail of the chunk before."""
    frame, sensors = dataset.frame, dataset.sensors
    window = settings.features.rolling_window
    values = sensor_matrix(frame, sensors)  # (sensors, rows)
    starts = entity_starts(frame[ENTITY])
    lead, context = 0, 0
    if carry is not None:
        if np.isnan(values[:, 0]).any():
            raise _Fallback(
                f"a piece of entity {carry.entity!r} starts with a missing reading"
            )
        context, lead = carry.values.shape[1], carry.position
        values = np.concatenate([carry.values, values], axis=1)
        starts = starts[1:] + context
    names = feature_names(sensors, settings.features.statistics)
    shape = (len(sensors), len(settings.features.statistics), values.shape[1])
    out = buffers.take(shape)  # (sensors, statistics, rows)
    # One thread: more only contend with the writing threads for the cores.
    block = feature_block(values, starts, lead, settings.features, threads=1, out=out)
    block = block[:, context:]
    keep = [c for c in (LABEL, *dataset.passthrough) if c in frame.columns]
    out = frame.select(TIMESTAMP, ENTITY).with_columns(
        pl.Series(name, block[i]) for i, name in enumerate(names)
    )
    out = out.with_columns(frame.select(keep)) if keep else out

    begin = int(starts[-1]) if len(starts) else 0
    offset = lead if begin == 0 else 0
    total = values.shape[1]
    first = max(begin, total - (window - 1))
    tail = _Tail(
        frame[ENTITY][-1],
        values[:, first:].copy(),
        offset + first - begin,
        frame[TIMESTAMP].tail(1),
    )
    return out, tail
