"""Scores computed chunk by chunk from feature files, with each entity's context.

Scoring reads the feature files in chunks and carries, per entity, the rows of
context a detector asks for (its ``context_rows`` attribute, 0 when absent). The
next chunk is read while one is scored, and a chunk's scores are written while the
next one is scored.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import polars as pl

from sagewatch import storage
from sagewatch.errors import InputError
from sagewatch.schema import ENTITY
from sagewatch.streaming._chunks import (
    Chunk,
    NotGroupedError,
    _concat,
    _Fallback,
    count_rows,
    feature_chunks,
)
from sagewatch.streaming._progress import Progress
from sagewatch.streaming._writers import _TableSink

if TYPE_CHECKING:
    from sagewatch.detector import Detector

log = logging.getLogger(__name__)

CHUNK_ROWS = 1_000_000


@dataclass
class ScoresResult:
    """What :func:`stream_scores` read and wrote."""

    rows: int = 0
    flagged: int = 0
    outputs: list[storage.FileInfo] = field(default_factory=list)
    inputs: list[storage.FileInfo] = field(default_factory=list)


def context_rows(detector: Detector) -> int:
    """Rows before each scored row that the detector needs (0: row by row)."""
    return int(getattr(detector, "context_rows", 0) or 0)


def stream_scores(
    features_uri: str,
    detector: Detector,
    output_dir: str,
    outputs: tuple[str, ...],
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = False,
) -> ScoresResult | None:
    """Score feature files chunk by chunk, appending to each of ``outputs``.

    ``outputs`` are file names under ``output_dir`` (``.csv`` or ``.parquet``).
    Returns None, having written nothing, when the features fit in one chunk or
    are not sorted by entity and time, or are not a features table; the caller
    then reads them whole (and names any problem).

    Raises:
        SchemaMismatchError: the features lack columns the detector needs.
    """
    files = storage.list_files(features_uri)
    total = count_rows(files)
    try:
        if total is None or total <= chunk_rows:
            raise _Fallback(f"{total} rows, not more than one chunk of {chunk_rows}")
        from sagewatch.stage_tables import feature_part_schemas  # imports reference

        feature_part_schemas(files)  # a scores table in the glob is refused
        rows: Counter[str] = Counter()
        result = _stream_scores(
            files,
            features_uri,
            detector,
            output_dir,
            outputs,
            chunk_rows,
            total,
            progress,
            rows,
        )
    except (_Fallback, InputError, pl.exceptions.PolarsError) as exc:
        # Interleaved entities cost memory the user can avoid: say so aloud.
        level = logging.WARNING if isinstance(exc, NotGroupedError) else logging.INFO
        log.log(level, "%s: not streamed (%s); reading it whole", features_uri, exc)
        return None
    result.inputs = [replace(info, rows=rows[info.uri]) for info in result.inputs]
    log.info(
        "scored %d rows: %d flagged (threshold %.6g, %.2f %%)",
        result.rows,
        result.flagged,
        detector.threshold_,
        100.0 * result.flagged / max(result.rows, 1),
    )
    return result


def _stream_scores(
    files: list[str],
    features_uri: str,
    detector: Detector,
    output_dir: str,
    outputs: tuple[str, ...],
    chunk_rows: int,
    total: int,
    progress: bool,
    rows: Counter[str],
) -> ScoresResult:
    from sagewatch.scoring import score_features, warn_short_entities

    context = context_rows(detector)
    result = ScoresResult()
    bar = Progress("score", total, show=progress)
    carry: pl.DataFrame | None = None
    scored: Counter[str] = Counter()  # rows scored so far per entity
    written: Future[None] | None = None
    with contextlib.ExitStack() as stack:
        # Sinks close (and move into place) last one first: the caller lists the
        # Parquet file last so it is complete before the CSV is replaced.
        sinks = [
            stack.enter_context(_TableSink(storage.join(output_dir, name)))
            for name in outputs
        ]
        # Exited before the sinks close: a write in flight ends first. One thread
        # writes chunk k while chunk k + 1 is scored; another hashes the inputs
        # for the manifest.
        writer = stack.enter_context(ThreadPoolExecutor(1, "sagewatch-scores"))
        reader = stack.enter_context(ThreadPoolExecutor(1, "sagewatch-read"))
        hasher = stack.enter_context(ThreadPoolExecutor(1, "sagewatch-hash"))
        hashes = [hasher.submit(storage.file_info, f) for f in files]
        chunks = _read_ahead(feature_chunks(files, chunk_rows, rows), reader)
        for chunk in chunks:
            frame = chunk.frame
            lead = 0
            if context and chunk.continues and carry is not None:
                lead = carry.height
                frame = _concat([carry, frame])
            first = str(frame[ENTITY][0])
            scores = score_features(
                frame,
                detector,
                source=features_uri,
                log_summary=False,
                continued=(first, scored[first] - lead) if chunk.continues else None,
            ).slice(lead)
            counts = chunk.frame[ENTITY].cast(pl.String).value_counts()
            scored.update(dict(counts.iter_rows()))
            if context:
                carry = _entity_tail(frame, context)
            if written is not None:
                written.result()  # at most one chunk waits; its error surfaces here
            written = writer.submit(_write_each, sinks, scores)
            result.rows += scores.height
            result.flagged += int(scores["is_anomaly"].sum())
            bar.update(chunk.frame.height)
        if written is not None:
            written.result()
        for sink in sinks:
            sink.close()
        result.inputs = [h.result() for h in hashes]
    result.outputs = [sink.info for sink in sinks]
    bar.close()
    warn_short_entities(scored, detector.warmup_rows)
    return result


def _read_ahead(items: Iterator[Chunk], pool: ThreadPoolExecutor) -> Iterator[Chunk]:
    """Yield from ``items`` while ``pool`` already reads the next one."""
    done = object()
    pending = pool.submit(next, items, done)
    while (item := pending.result()) is not done:
        pending = pool.submit(next, items, done)
        yield item  # type: ignore[misc]


def _write_each(sinks: list[_TableSink], frame: pl.DataFrame) -> None:
    for sink in sinks:
        sink.write(frame)


def _entity_tail(frame: pl.DataFrame, rows: int) -> pl.DataFrame:
    """The last ``rows`` rows of the frame's last entity."""
    last = frame[ENTITY][-1]
    tail = frame.tail(rows)
    return tail.filter(pl.col(ENTITY) == last)
