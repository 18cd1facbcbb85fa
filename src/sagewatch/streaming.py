"""Chunked features and scoring: bounded memory whatever the number of rows.

Raw input is read file by file in batches (polars' streaming scan) and cut into
chunks of whole entities, each validated by :func:`sagewatch.schema.validate` with
the same rules as the in-memory path. An entity longer than a chunk is cut into
pieces in time order; each piece carries the last ``rolling_window - 1`` rows of the
piece before it, so its features are the same as if the entity had been read whole.
Scoring reads the feature files the same way and carries, per entity, the rows of
context a detector asks for (its ``context_rows`` attribute, 0 when absent).

Features go to one Parquet file per entity (the pieces of a long entity are appended
as row groups); scores to one CSV and one Parquet file, appended chunk by chunk.
Memory holds one chunk and its outputs.

Notes:
    Input must be grouped by entity (the rows of an entity contiguous), as it is
    with one file per entity or a table sorted by entity; otherwise the stages fall
    back to the in-memory path (and say so), since grouping needs every row.
    Validation of a long entity's pieces is piece by piece: a gap at the start of a
    piece is not forward-filled from the piece before, and row numbers in error
    messages count from the start of the chunk. Sensors are those of the first
    chunk. The quality summary's median step is the median of the chunks' medians.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from sagewatch import storage
from sagewatch.config import Settings
from sagewatch.errors import InputError
from sagewatch.features import (
    entity_starts,
    feature_block,
    feature_names,
    sensor_matrix,
)
from sagewatch.schema import ENTITY, LABEL, SOURCE, TIMESTAMP, Dataset, validate

if TYPE_CHECKING:
    from sagewatch.detector import Detector

log = logging.getLogger(__name__)

CHUNK_ROWS = 1_000_000
FEATURES_STEM = "features"


class NotGroupedError(InputError):
    """The rows of an entity are not contiguous, so chunks cannot hold whole ones."""


# ----------------------------------------------------------------------------- progress


class Progress:
    """Rows done of a total (when known) and the rate: a bar and a closing log line."""

    def __init__(self, name: str, total: int | None, *, show: bool) -> None:
        self.name, self.total, self.done = name, total, 0
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=total,
            desc=name,
            unit="row",
            unit_scale=True,
            disable=not show,
            leave=False,
        )

    def update(self, rows: int) -> None:
        self.done += rows
        self.bar.update(rows)
        log.debug(
            "%s: %d of %s rows, %.0f rows/s",
            self.name,
            self.done,
            self.total if self.total is not None else "?",
            self.rate,
        )

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()
        log.info(
            "%s: %d rows in %.2f s (%.0f rows/s)",
            self.name,
            self.done,
            time.perf_counter() - self.started,
            self.rate,
        )


# ----------------------------------------------------------------------------- reading


@dataclass
class Chunk:
    """Consecutive rows: whole entities, except that the first may continue the
    last entity of the chunk before (``continues``) and the last may go on in the
    next chunk (``open_end``)."""

    frame: pl.DataFrame
    continues: bool = False
    open_end: bool = False


def count_rows(files: list[str], sep: str | None = None) -> int | None:
    """Rows in Parquet files from their metadata; None when a CSV is among them."""
    if not all(f.endswith(".parquet") for f in files):
        return None
    return sum(
        int(storage.scan_table(f, sep=sep).select(pl.len()).collect().item())
        for f in files
    )


def entity_chunks(
    batches: Iterator[pl.DataFrame],
    key: pl.Expr,
    chunk_rows: int,
) -> Iterator[Chunk]:
    """Regroup row batches into chunks of about ``chunk_rows`` rows cut at entities.

    An entity that reaches ``chunk_rows`` rows on its own is passed on in pieces.

    Raises:
        NotGroupedError: an entity's rows appear again after another entity's.
    """
    pending: pl.DataFrame | None = None
    ready: list[pl.DataFrame] = []
    ready_rows, done = 0, _Seen()
    open_name: str | None = None  # the entity whose last piece went out open-ended

    def emit(frames: list[pl.DataFrame], *, open_end: bool) -> Chunk:
        nonlocal open_name
        frame = _concat(frames)
        first = frame.select(key.first()).item()
        chunk = Chunk(frame, continues=first == open_name, open_end=open_end)
        open_name = frame.select(key.last()).item() if open_end else None
        return chunk

    for batch in batches:
        frame = batch if pending is None else _concat([pending, batch])
        runs = frame.select(key.rle_id()).to_series().to_numpy()
        last = int(np.searchsorted(runs, runs[-1]))
        complete, pending = frame.slice(0, last), frame.slice(last)
        if complete.height:
            done.add(_run_names(complete, key))
            ready.append(complete)
            ready_rows += complete.height
        if ready_rows >= chunk_rows or (ready and pending.height >= chunk_rows):
            yield emit(ready, open_end=False)
            ready, ready_rows = [], 0
        if pending.height >= chunk_rows:
            yield emit([pending], open_end=True)
            pending = None
    if pending is not None:
        done.add(_run_names(pending, key))
        ready.append(pending)
    if ready:
        yield emit(ready, open_end=False)


class _Seen:
    """Entities already passed; refuses one that comes back after another."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.current: str | None = None

    def add(self, names: list[str]) -> None:
        fresh = names[1:] if names and names[0] == self.current else names
        again = [n for n in fresh if n in self.names]
        if len(set(fresh)) < len(fresh) or self.current in fresh[1:] or again:
            name = again[0] if again else _repeated(fresh)
            raise NotGroupedError(
                f"entity {name!r}: its rows are not contiguous in the input; sort "
                "the input by entity and time (or use one file per entity) to "
                "stream it"
            )
        if self.current is not None and fresh and fresh[0] != self.current:
            self.names.add(self.current)
        self.names.update(fresh[:-1])
        self.current = names[-1] if names else self.current


def _repeated(names: list[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return names[0]


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    if len(frames) == 1:
        return frames[0]
    try:
        return pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"input parts do not share one schema: {exc}") from exc


def _run_names(frame: pl.DataFrame, key: pl.Expr) -> list[str]:
    values = frame.select(key.alias("k")).to_series()
    starts = np.flatnonzero(np.diff(values.rle_id().to_numpy())) + 1
    return values.gather([0, *starts.tolist()]).cast(pl.String).to_list()


def raw_batches(
    files: list[str], sep: str | None, chunk_rows: int
) -> Iterator[pl.DataFrame]:
    """Row batches of raw input files, in order, each tagged with its file name.

    Raises:
        InputError: a file has a header but no rows.
    """
    for path in files:
        scan = storage.scan_table(path, sep=sep).with_columns(
            pl.lit(storage.basename(path)).alias(SOURCE)
        )
        rows = 0
        for batch in _batches(scan, path, chunk_rows):
            rows += batch.height
            yield batch
        if rows == 0:
            raise InputError(f"{path}: the file has a header but no data rows")


def _batches(scan: pl.LazyFrame, path: str, chunk_rows: int) -> Iterator[pl.DataFrame]:
    try:
        for batch in scan.collect_batches(chunk_size=chunk_rows):
            if batch.height:
                yield batch
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: cannot read as a table: {exc}") from exc


# ----------------------------------------------------------------------------- features


@dataclass
class FeaturesResult:
    """What :func:`stream_features` read, dropped and wrote."""

    sensors: list[str]
    passthrough: list[str]
    quality: dict[str, Any]
    outputs: list[storage.FileInfo] = field(default_factory=list)
    rows_out: int = 0


@dataclass
class _Tail:
    """The last rows of the entity a chunk ended with, as context for the next."""

    entity: str
    values: np.ndarray  # (sensors, rows)
    position: int  # rows of the entity before the first carried row
    last_time: Any


def stream_features(
    settings: Settings,
    input_uri: str,
    output_dir: str,
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = False,
) -> FeaturesResult:
    """Validate raw input chunk by chunk and write its features per entity.

    Raises:
        NotGroupedError: the input is not grouped by entity.
        InputError: the data breaks the contract in a way no rule repairs.
    """
    data, quality = settings.data, settings.quality
    files = storage.list_files(input_uri)
    windows = storage.read_json(data.label_windows) if data.label_windows else None
    entity = data.entity_column
    batches = raw_batches(files, data.sep, chunk_rows)
    first = next(batches)
    key = (
        pl.col(entity).cast(pl.String)
        if entity and entity in first.columns
        else pl.col(SOURCE)
    )
    chunks = entity_chunks(_prepend(first, batches), key, chunk_rows)
    bar = Progress("features", count_rows(files, data.sep), show=progress)
    writer = _EntityWriter(output_dir)
    tail: _Tail | None = None
    result: FeaturesResult | None = None
    with writer:
        for chunk in chunks:
            bar.update(chunk.frame.height)
            fixed = data if result is None else _fix_sensors(data, result.sensors)
            dataset = validate(
                chunk.frame, input_uri, fixed, quality, label_windows=windows
            )
            if result is None:
                result = FeaturesResult(
                    dataset.sensors, dataset.passthrough, _empty_quality()
                )
            _add_quality(result.quality, dataset.quality)
            if dataset.sensors != result.sensors:
                _drop_chunk(result, dataset, quality.drop_unfilled_rows)
                continue
            head = dataset.frame[ENTITY][0]
            carry = tail if chunk.continues and tail and tail.entity == head else None
            features, tail = _chunk_features(dataset, carry, settings)
            writer.write(features, continues=carry is not None, open_end=chunk.open_end)
            result.rows_out += features.height
    bar.close()
    assert result is not None
    result.outputs = writer.outputs
    result.quality["rows_out"] = result.rows_out
    return result


def _prepend(
    first: pl.DataFrame, rest: Iterator[pl.DataFrame]
) -> Iterator[pl.DataFrame]:
    yield first
    yield from rest


def _fix_sensors(data: Any, sensors: list[str]) -> Any:
    return data.model_copy(update={"sensor_columns": sensors})


def _drop_chunk(result: FeaturesResult, dataset: Dataset, drop: bool) -> None:
    """A chunk that lacks a sensor entirely: every row has an unfillable gap."""
    missing = sorted(set(result.sensors) - set(dataset.sensors))
    entities = dataset.frame[ENTITY].unique(maintain_order=True).to_list()
    if not drop:
        raise InputError(
            f"{dataset.source}: sensor(s) {missing} have no values for entities "
            f"{entities[:5]}; set drop_unfilled_rows or sensor_columns"
        )
    dropped = result.quality["dropped"]
    dropped["rows_with_unfillable_gaps"] = (
        dropped.get("rows_with_unfillable_gaps", 0) + dataset.frame.height
    )
    result.quality["rows_out"] -= dataset.frame.height
    log.warning(
        "dropped %d rows of entities %s: no %s",
        dataset.frame.height,
        entities[:5],
        missing,
    )


def _chunk_features(
    dataset: Dataset, carry: _Tail | None, settings: Settings
) -> tuple[pl.DataFrame, _Tail]:
    """Features of one validated chunk, with the tail of the chunk before."""
    frame, sensors = dataset.frame, dataset.sensors
    window = settings.features.rolling_window
    values = sensor_matrix(frame, sensors)  # (sensors, rows)
    starts = entity_starts(frame[ENTITY])
    lead, context = 0, 0
    if carry is not None:
        _check_order(carry, frame)
        context, lead = carry.values.shape[1], carry.position
        values = np.concatenate([carry.values, values], axis=1)
        starts = starts[1:] + context
    block = feature_block(values, starts, lead, settings.features)[:, context:]
    names = feature_names(sensors, settings.features.statistics)
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
        frame[TIMESTAMP][-1],
    )
    return out, tail


def _check_order(carry: _Tail, frame: pl.DataFrame) -> None:
    if frame[ENTITY][0] != carry.entity or frame[TIMESTAMP][0] <= carry.last_time:
        raise InputError(
            f"entity {carry.entity!r} is longer than one chunk and its rows are not "
            f"in time order across chunks (at {frame[TIMESTAMP][0]}); sort the input "
            "by entity and time, or raise the chunk size"
        )


def _empty_quality() -> dict[str, Any]:
    return {
        "rows_in": 0,
        "rows_out": 0,
        "dropped": {},
        "repaired": {},
        "missing": {},
        "non_finite": {},
        "out_of_order_rows": 0,
        "time_gaps": 0,
        "entity_rows": {},
        "constant_sensors": None,
        "chunks": 0,
        "_steps": [],
    }


def _add_quality(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Fold one chunk's quality report into the running total."""
    for name in ("rows_in", "rows_out", "out_of_order_rows", "time_gaps"):
        total[name] += int(part.get(name) or 0)
    for name in ("dropped", "repaired", "missing", "non_finite"):
        for k, v in (part.get(name) or {}).items():
            total[name][k] = total[name].get(k, 0) + v
    for k, v in (part.get("entity_rows") or {}).items():
        total["entity_rows"][k] = total["entity_rows"].get(k, 0) + v
    constant = set(part.get("constant_sensors") or [])
    previous = total["constant_sensors"]
    total["constant_sensors"] = sorted(
        constant if previous is None else constant & set(previous)
    )
    for name in ("empty_sensors",):
        if part.get(name):
            total[name] = sorted(set(total.get(name, [])) | set(part[name]))
    if part.get("median_step_seconds") is not None:
        total["_steps"].append(part["median_step_seconds"])
    total["median_step_seconds"] = (
        float(np.median(total["_steps"])) if total["_steps"] else None
    )
    total["chunks"] += 1


def public_quality(quality: dict[str, Any]) -> dict[str, Any]:
    """The quality report without its bookkeeping."""
    return {k: v for k, v in quality.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- writing


class _EntityWriter:
    """One Parquet file per entity; a long entity's pieces appended as row groups."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.outputs: list[storage.FileInfo] = []
        self._open: _AppendParquet | None = None

    def __enter__(self) -> _EntityWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open is not None:
            info = self._open.close(failed=exc[0] is not None)
            self.outputs.append(info)
            self._open = None

    def uri(self, entity: str) -> str:
        name = f"{FEATURES_STEM}-{storage.safe_name(entity)}.parquet"
        return storage.join(self.output_dir, name)

    def write(self, features: pl.DataFrame, *, continues: bool, open_end: bool) -> None:
        if self._open is not None and not continues:
            self.outputs.append(self._open.close())
            self._open = None
        starts = entity_starts(features[ENTITY]).tolist()
        bounds = [*starts, features.height]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            part = features.slice(lo, hi - lo)
            first, last = i == 0, i == len(starts) - 1
            if first and continues:
                assert self._open is not None
                self._open.write(part)
                if not (last and open_end):
                    self.outputs.append(self._open.close())
                    self._open = None
            elif last and open_end:
                self._open = _AppendParquet(self.uri(part[ENTITY][0]))
                self._open.write(part)
            else:
                self.outputs.append(_write_features(part, self.uri(part[ENTITY][0])))


def _write_features(part: pl.DataFrame, uri: str) -> storage.FileInfo:
    """One entity's features as Parquet, atomically.

    Uncompressed: rolling statistics of noisy readings barely compress (about 10 %
    with zstd) and compressing them costs more than computing them.
    """
    with storage.staged_path(uri) as tmp:
        part.write_parquet(tmp, compression="uncompressed", statistics=True)
        size, sha = _digest(tmp)
    return storage.FileInfo(uri, size, sha, part.height)


class _AppendParquet:
    """A Parquet file written in pieces under a temporary name, then moved."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self.path = self._stack.enter_context(storage.staged_path(uri))
        self._writer: Any = None

    def write(self, frame: pl.DataFrame) -> None:
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.path, table.schema, compression="none", use_dictionary=False
            )
        self._writer.write_table(table)
        self.rows += frame.height

    def close(self, *, failed: bool = False) -> storage.FileInfo:
        if self._writer is not None:
            self._writer.close()
        info = storage.FileInfo(self.uri, *_digest(self.path), self.rows)
        if failed:
            self._stack.__exit__(InputError, InputError("aborted"), None)
        else:
            self._stack.close()
        return info


def _digest(path: str) -> tuple[int, str]:
    """Size and SHA-256 of a local file, read in pieces."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            sha.update(piece)
            size += len(piece)
    return size, sha.hexdigest()


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoresResult:
    """What :func:`stream_scores` read and wrote."""

    rows: int = 0
    flagged: int = 0
    outputs: list[storage.FileInfo] = field(default_factory=list)


def context_rows(detector: Detector) -> int:
    """Rows before each scored row that the detector needs (0: row by row)."""
    return int(getattr(detector, "context_rows", 0) or 0)


def feature_chunks(files: list[str], chunk_rows: int) -> Iterator[Chunk]:
    """Feature rows in chunks of about ``chunk_rows`` rows, files in order.

    Raises:
        NotGroupedError: an entity's rows are spread over the input, or go back in
            time.
    """
    seen = _Seen()
    last_time: Any = None
    ready: list[pl.DataFrame] = []
    rows, continues = 0, False
    for path in files:
        for batch in _batches(storage.scan_table(path), path, chunk_rows):
            names = _run_names(batch, pl.col(ENTITY))
            joins = names[0] == seen.current
            seen.add(names)
            _check_time(batch, last_time if joins else None)
            last_time = batch[TIMESTAMP][-1]
            if not ready:
                continues = joins
            ready.append(batch)
            rows += batch.height
            if rows >= chunk_rows:
                yield Chunk(_concat(ready), continues=continues)
                ready, rows = [], 0
    if ready:
        yield Chunk(_concat(ready), continues=continues)


def _check_time(batch: pl.DataFrame, last_time: Any) -> None:
    same = pl.col(ENTITY) == pl.col(ENTITY).shift(1)
    back = batch.select((same & (pl.col(TIMESTAMP).diff() <= pl.duration())).any())
    early = last_time is not None and batch[TIMESTAMP][0] <= last_time
    if back.item() or early:
        raise NotGroupedError(
            "feature rows are not in time order within their entity; streaming "
            "needs them sorted by entity and time"
        )


def stream_scores(
    features_uri: str,
    detector: Detector,
    output_dir: str,
    outputs: tuple[str, ...],
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = False,
) -> ScoresResult:
    """Score feature files chunk by chunk, appending to each of ``outputs``.

    ``outputs`` are file names under ``output_dir`` (``.csv`` or ``.parquet``).

    Raises:
        NotGroupedError: the features are not sorted by entity and time.
        SchemaMismatchError: the features lack columns the detector needs.
    """
    from sagewatch.scoring import score_features

    files = storage.list_files(features_uri)
    context = context_rows(detector)
    result = ScoresResult()
    bar = Progress("score", count_rows(files), show=progress)
    carry: pl.DataFrame | None = None
    with contextlib.ExitStack() as stack:
        sinks = [
            stack.enter_context(_TableSink(storage.join(output_dir, name)))
            for name in outputs
        ]
        for chunk in feature_chunks(files, chunk_rows):
            frame = chunk.frame
            lead = 0
            if context and chunk.continues and carry is not None:
                lead = carry.height
                frame = _concat([carry, frame])
            scores = score_features(
                frame, detector, source=features_uri, log_summary=False
            ).slice(lead)
            if context:
                carry = _entity_tail(frame, context)
            for sink in sinks:
                sink.write(scores)
            result.rows += scores.height
            result.flagged += int(scores["is_anomaly"].sum())
            bar.update(chunk.frame.height)
        result.outputs = [sink.finish() for sink in sinks]
    bar.close()
    log.info(
        "scored %d rows: %d above threshold %.6g (%.2f %%)",
        result.rows,
        result.flagged,
        detector.threshold_,
        100.0 * result.flagged / max(result.rows, 1),
    )
    return result


def _entity_tail(frame: pl.DataFrame, rows: int) -> pl.DataFrame:
    """The last ``rows`` rows of the frame's last entity."""
    last = frame[ENTITY][-1]
    tail = frame.tail(rows)
    return tail.filter(pl.col(ENTITY) == last)


class _TableSink:
    """A CSV or Parquet file appended chunk by chunk, moved into place at the end."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._writer: Any = None
        self._csv: Any = None

    def __enter__(self) -> _TableSink:
        self.path = self._stack.enter_context(storage.staged_path(self.uri))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_writers()
        self._stack.__exit__(*exc)

    def write(self, frame: pl.DataFrame) -> None:
        if self.uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = frame.to_arrow()
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, table.schema)
            self._writer.write_table(table)
        else:
            if self._csv is None:
                self._csv = open(self.path, "wb")  # noqa: SIM115 - closed in finish
            frame.write_csv(self._csv, include_header=self.rows == 0)
        self.rows += frame.height

    def _close_writers(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._csv is not None:
            self._csv.close()
            self._csv = None

    def finish(self) -> storage.FileInfo:
        self._close_writers()
        return storage.FileInfo(self.uri, *_digest(self.path), self.rows)


__all__ = [
    "CHUNK_ROWS",
    "Chunk",
    "FeaturesResult",
    "NotGroupedError",
    "Progress",
    "ScoresResult",
    "context_rows",
    "entity_chunks",
    "feature_chunks",
    "public_quality",
    "stream_features",
    "stream_scores",
]
