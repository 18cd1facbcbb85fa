"""Chunked features and scoring: bounded memory whatever the number of rows.

Input larger than one chunk is read file by file in batches (polars' streaming scan)
and cut into chunks of whole entities; an entity longer than a chunk is cut into
pieces in time order, each a chunk of its own. Every chunk is validated by
:func:`sagewatch.schema.validate` with the same rules as the in-memory path, and a
piece carries the last ``rolling_window - 1`` readings of the piece before it, so
its features are those of the whole entity. Scoring reads the feature files the
same way and carries, per entity, the rows of context a detector asks for (its
``context_rows`` attribute, 0 when absent).

Features go to one Parquet file per entity, as Float32 columns (a long entity's
pieces appended as row groups); scores to one CSV and one Parquet file, appended
chunk by chunk. A chunk's feature files are written on a second thread while the
next chunk is validated and computed, so memory holds about two chunks and their
outputs; nothing is moved into place before the end.

Notes:
    Streamed results equal the in-memory ones exactly, quality report included:
    counts add up over chunks, the median step and time gaps come from the merged
    counts of every step, constant sensors from merged minima and maxima. Where
    chunk-by-chunk validation could differ from validating the whole input, the
    stage falls back to the in-memory path (with an INFO line saying why) and
    discards what it streamed. That is the case when the input fits in one chunk
    (nothing to gain); when files differ in their columns or types, or an entity's
    rows are not contiguous; when any chunk breaks a rule (the in-memory path then
    raises the error, with its exact file, line and entity) or has a rule drop,
    sort or de-duplicate rows; when chunks find different sensors, empty sensors
    or ignored columns; when a piece of a long entity does not start later than
    the piece before, or starts with a missing reading (forward fill would need
    the piece before); when an entity name comes back in a later chunk; and when
    steps take more than ``MAX_STEP_VALUES`` distinct values. Compressed CSV is
    read whole per file.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from sagewatch import storage
from sagewatch.config import Settings
from sagewatch.errors import InputError
from sagewatch.features import (
    FEATURE_DTYPE,
    as_stored,
    entity_starts,
    feature_block,
    feature_names,
    sensor_matrix,
)
from sagewatch.schema import (
    ENTITY,
    LABEL,
    LINE,
    SOURCE,
    TIMESTAMP,
    Dataset,
    validate,
)

if TYPE_CHECKING:
    from sagewatch.detector import Detector

log = logging.getLogger(__name__)

CHUNK_ROWS = 1_000_000
# Raw rows per features chunk: as fast as larger chunks, at half the memory (two
# chunks are in flight, and a chunk's Float32 features take about 75 bytes a row).
FEATURE_CHUNK_ROWS = 500_000
FEATURES_STEM = "features"
# Distinct time steps kept for an exact median; beyond this, validate in memory.
MAX_STEP_VALUES = 100_000
_CSV = (".csv", ".csv.gz", ".tsv", ".txt")


class NotGroupedError(InputError):
    """The rows of an entity are not contiguous, so chunks cannot hold whole ones."""


class _Fallback(Exception):
    """Streaming cannot give exactly the in-memory result; the reason is the text."""


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
    """Consecutive rows: whole entities, or one piece of a long entity that may
    continue the chunk before (``continues``) and go on in the next (``open_end``)."""

    frame: pl.DataFrame
    continues: bool = False
    open_end: bool = False


def count_rows(files: list[str], sep: str | None = None) -> int | None:
    """Rows in the files: Parquet from metadata, plain CSV by a scan; None when
    they cannot be counted cheaply (compressed or unreadable files)."""
    if any(f.endswith(".gz") for f in files):
        return None
    try:
        return sum(
            int(storage.scan_table(f, sep=sep).select(pl.len()).collect().item())
            for f in files
        )
    except (pl.exceptions.PolarsError, OSError):
        return None


def entity_chunks(
    batches: Iterator[pl.DataFrame],
    key: pl.Expr,
    chunk_rows: int,
) -> Iterator[Chunk]:
    """Regroup row batches into chunks of whole entities, of about ``chunk_rows``
    rows at most: a chunk ends before the entity that would take it past
    ``chunk_rows``, so memory follows the chunk size, not the entities' lengths.

    An entity that reaches ``chunk_rows`` rows on its own is passed on in pieces,
    each piece a chunk of its own.

    Raises:
        NotGroupedError: an entity's rows appear again after another entity's.
    """
    pending: _Part | None = None
    ready: list[_Part] = []
    ready_rows, done = 0, _Seen()
    open_name: str | None = None  # the entity whose last piece went out open-ended

    def emit(parts: list[_Part], *, open_end: bool) -> Iterator[Chunk]:
        nonlocal open_name
        frame = _concat([p.frame for p in parts])
        first: str | None = parts[0].names[0]
        if first == open_name and not open_end:
            cut = parts[0].first_rows
            yield Chunk(frame.slice(0, cut), continues=True)
            frame = frame.slice(cut)
            first = None
        if frame.height:
            yield Chunk(frame, continues=first == open_name, open_end=open_end)
        open_name = parts[-1].names[-1] if open_end else None

    for batch in batches:
        part = _Part.of(batch, key)
        if pending is not None:
            part = pending.join(part)
        complete, pending = part.split_last()
        if complete is not None:
            done.add(complete.names)
            if ready and ready_rows + complete.frame.height > chunk_rows:
                # cut before the chunk outgrows chunk_rows: memory follows it
                yield from emit(ready, open_end=False)
                ready, ready_rows = [], 0
            ready.append(complete)
            ready_rows += complete.frame.height
        if ready_rows >= chunk_rows or (ready and pending.frame.height >= chunk_rows):
            yield from emit(ready, open_end=False)
            ready, ready_rows = [], 0
        if pending.frame.height >= chunk_rows:
            yield from emit([pending], open_end=True)
            pending = None
    if pending is not None:
        done.add(pending.names)
        if ready and ready_rows + pending.frame.height > chunk_rows:
            yield from emit(ready, open_end=False)
            ready = []
        ready.append(pending)
    if ready:
        yield from emit(ready, open_end=False)


@dataclass
class _Part:
    """Consecutive rows with where their entities' runs start and their names."""

    frame: pl.DataFrame
    starts: np.ndarray  # row of each run's first row, 0 first
    names: list[str]

    @classmethod
    def of(cls, frame: pl.DataFrame, key: pl.Expr) -> _Part:
        """Runs of ``key``, evaluated only where one of its columns changes."""
        columns = key.meta.root_names()
        change = pl.any_horizontal(
            pl.col(c).ne_missing(pl.col(c).shift(1)) for c in columns
        )
        changed = frame.select(change.alias("change")).to_series()
        at = np.union1d([0], changed.arg_true().to_numpy())
        keys = frame[at].select(key.alias("k")).to_series().to_list()
        new = [0, *(i for i in range(1, len(keys)) if keys[i] != keys[i - 1])]
        return cls(frame, at[new], [keys[i] for i in new])

    @property
    def first_rows(self) -> int:
        """Rows of the first run."""
        return int(self.starts[1]) if len(self.starts) > 1 else self.frame.height

    def join(self, later: _Part) -> _Part:
        """This part followed by ``later``."""
        shift = self.frame.height
        same = later.names[0] == self.names[-1]
        starts = later.starts[1:] if same else later.starts
        return _Part(
            _concat([self.frame, later.frame]),
            np.concatenate([self.starts, starts + shift]),
            self.names + (later.names[1:] if same else later.names),
        )

    def split_last(self) -> tuple[_Part | None, _Part]:
        """The rows before the last run (None when there are none), and that run."""
        last = int(self.starts[-1])
        tail = _Part(self.frame.slice(last), self.starts[-1:] - last, self.names[-1:])
        if last == 0:
            return None, tail
        return _Part(self.frame.slice(0, last), self.starts[:-1], self.names[:-1]), tail


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
    if all(f.schema == frames[0].schema for f in frames[1:]):
        return pl.concat(frames, how="vertical", rechunk=False)
    try:
        return pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"input parts do not share one schema: {exc}") from exc


def _run_names(frame: pl.DataFrame, key: pl.Expr) -> list[str]:
    values = frame.select(key.alias("k")).to_series()
    starts = np.flatnonzero(np.diff(values.rle_id().to_numpy())) + 1
    return values.gather([0, *starts.tolist()]).cast(pl.String).to_list()


def raw_batches(
    files: list[str],
    sep: str | None,
    chunk_rows: int,
    rows_read: Counter[str] | None = None,
) -> Iterator[pl.DataFrame]:
    """Row batches of raw input files, in order, each row tagged with its file and
    line (CSV, header = line 1) or row number, as :func:`sagewatch.schema.load_raw`
    tags them. ``rows_read``, when given, counts the rows read per file.

    Raises:
        InputError: a file has a header but no rows, or cannot be read.
    """
    for path in files:
        first = 2 if path.endswith(_CSV) else 1
        scan = storage.scan_table(path, sep=sep)
        rows = 0
        for batch in _batches(scan, path, chunk_rows):
            yield batch.with_columns(
                pl.lit(path).alias(SOURCE),
                pl.int_range(
                    first + rows, first + rows + batch.height, dtype=pl.Int64
                ).alias(LINE),
            )
            rows += batch.height
            if rows_read is not None:
                rows_read[path] += batch.height
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
    in-memory path's (see the module notes); the caller then validates in memory.

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
        with _EntityWriter(output_dir) as writer:
            result = _stream_features(
                settings, input_uri, files, writer, chunk_rows, total, progress
            )
    except (_Fallback, InputError, pl.exceptions.PolarsError) as exc:
        log.info("%s: not streamed (%s); validating in memory", input_uri, exc)
        return None
    result.outputs = writer.outputs
    result.inputs = [
        storage.file_info(f, rows=result.quality.pop("_file_rows").get(f))
        for f in files
    ]
    return result


def _same_schema(files: list[str], sep: str | None) -> None:
    first = storage.scan_table(files[0], sep=sep).collect_schema()
    for path in files[1:]:
        if storage.scan_table(path, sep=sep).collect_schema() != first:
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
    return result


def _prepend(
    first: pl.DataFrame, rest: Iterator[pl.DataFrame]
) -> Iterator[pl.DataFrame]:
    yield first
    yield from rest


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


# ----------------------------------------------------------------------------- writing


def write_features(features: pl.DataFrame, output_dir: str) -> list[storage.FileInfo]:
    """Write a features table sorted by entity as one Parquet file per entity,
    in the streamed path's format (Float32 features, Float64 ones rounded); each
    file is moved into place once written.

    Raises:
        InputError: the rows of an entity are not contiguous.
        StorageError: a file cannot be written.
    """
    features = as_stored(features)
    starts = entity_starts(features[ENTITY]).tolist()
    infos = []
    for lo, hi in itertools.pairwise([*starts, features.height]):
        part = features.slice(lo, hi - lo)
        with storage.staged(_entity_uri(output_dir, part[ENTITY][0])) as staging:
            _write_parquet(part, staging.path)
        infos.append(replace(staging.info, rows=part.height))
    return infos


def _entity_uri(output_dir: str, entity: str) -> str:
    name = f"{FEATURES_STEM}-{storage.safe_name(entity)}.parquet"
    return storage.join(output_dir, name)


def _write_parquet(part: pl.DataFrame, path: str) -> None:
    """One entity's features as Parquet.

    Uncompressed: zstd makes the files about 45 % smaller but takes four times as
    long to write (1.1 against 0.26 CPU-seconds per million rows of 3 sensors),
    longer than validating and computing the features together. Without column
    statistics (min, max per row group), which halve the writing time again
    (0.12 against 0.23 s); the stages after read every row of the files anyway.
    """
    part.write_parquet(path, compression="uncompressed", statistics=False)


class _EntityWriter:
    """One Parquet file per entity; a long entity's pieces appended as row groups.

    A chunk's files are written on a worker thread while the next chunk is
    computed, and each finished file is hashed on a third thread while the next
    one is written; :meth:`write` first waits for the chunk before, so at most
    one chunk waits in memory. Files are staged and moved into place together
    when the block ends without an error; otherwise none of them is.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.outputs: list[storage.FileInfo] = []
        self._stack = contextlib.ExitStack()
        self._files: list[tuple[Any, int]] = []
        self._open: _AppendParquet | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sagewatch-writer")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="sagewatch-hash")
        self._pending: Future[None] | None = None
        self._hashes: list[Future[None]] = []
        self.written = 0  # chunks written

    def __enter__(self) -> _EntityWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        error = exc[1]
        try:
            self._wait()
            if error is None and self._open is not None:
                self._finish_open()
            for hashed in self._hashes:
                hashed.result()
        except BaseException as failed:
            if error is None:
                error = failed
                raise
            log.debug("writing features stopped after an earlier error: %s", failed)
        finally:
            self._worker.shutdown()
            self._hasher.shutdown()
            if error is None:
                self._stack.__exit__(None, None, None)
            else:
                self._stack.__exit__(type(error), error, error.__traceback__)
        if error is None:
            self.outputs = [replace(s.info, rows=rows) for s, rows in self._files]

    def uri(self, entity: str) -> str:
        return _entity_uri(self.output_dir, entity)

    def write(self, features: pl.DataFrame, *, continues: bool, open_end: bool) -> None:
        """Queue one chunk's features: its entities' rows, in order.

        Raises:
            StorageError: writing the chunk before failed.
        """
        self._wait()
        self._pending = self._worker.submit(
            self._write, features, continues=continues, open_end=open_end
        )

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(
        self, features: pl.DataFrame, *, continues: bool, open_end: bool
    ) -> None:
        if self._open is not None and not continues:
            self._finish_open()
        starts = entity_starts(features[ENTITY]).tolist()
        bounds = [*starts, features.height]
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            part = features.slice(lo, hi - lo)
            first, last = i == 0, i == len(starts) - 1
            if first and continues:
                assert self._open is not None
                self._open.write(part)
                if not (last and open_end):
                    self._finish_open()
            elif last and open_end:
                staging = self._stack.enter_context(
                    storage.staged(self.uri(part[ENTITY][0]))
                )
                self._open = _AppendParquet(staging)
                self._open.write(part)
            else:
                self._write_whole(part)
        self.written += 1

    def _finish_open(self) -> None:
        assert self._open is not None
        self._open.close()
        self._done(self._open.staging, self._open.rows)
        self._open = None

    def _write_whole(self, part: pl.DataFrame) -> None:
        staging = self._stack.enter_context(storage.staged(self.uri(part[ENTITY][0])))
        _write_parquet(part, staging.path)
        self._done(staging, part.height)

    def _done(self, staging: Any, rows: int) -> None:
        """Hash a finished file now, on the hashing thread, not when it moves into
        place at the end."""
        self._hashes.append(self._hasher.submit(self._hash, staging))
        self._files.append((staging, rows))

    @staticmethod
    def _hash(staging: Any) -> None:
        staging.known = storage.file_info(staging.path)


class _AppendParquet:
    """A Parquet file written in pieces to a staged path."""

    def __init__(self, staging: Any) -> None:
        self.staging = staging
        self.rows = 0
        self._writer: Any = None

    def write(self, frame: pl.DataFrame) -> None:
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.staging.path,
                table.schema,
                compression="none",
                use_dictionary=False,
            )
        self._writer.write_table(table)
        self.rows += frame.height

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ----------------------------------------------------------------------------- scoring


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


def feature_chunks(
    files: list[str], chunk_rows: int, rows: Counter[str] | None = None
) -> Iterator[Chunk]:
    """Feature rows in chunks of at most ``chunk_rows`` rows, files in order.

    ``rows``, when given, counts the rows read per file.

    Raises:
        NotGroupedError: entities are not contiguous and in ascending order, or
            their rows go back in time.
    """
    seen = _Seen()
    last_time: Any = None
    ready: list[pl.DataFrame] = []
    total, continues = 0, False
    for path in files:
        for batch in _batches(storage.scan_table(path), path, chunk_rows):
            names = _run_names(batch, pl.col(ENTITY))
            joins = names[0] == seen.current
            _check_ascending(names, None if joins else seen.current)
            seen.add(names)
            _check_time(batch, last_time if joins else None)
            last_time = batch[TIMESTAMP][-1]
            if rows is not None:
                rows[path] += batch.height
            if ready and total + batch.height > chunk_rows:
                yield Chunk(_concat(ready), continues=continues)
                ready, total = [], 0
            if not ready:
                continues = joins
            ready.append(batch)
            total += batch.height
    if ready:
        yield Chunk(_concat(ready), continues=continues)


def _check_ascending(names: list[str], before: str | None) -> None:
    """Entities in the order the in-memory path sorts them, so outputs match."""
    order = ([before] if before is not None else []) + names
    if any(a >= b for a, b in itertools.pairwise(order)):
        raise NotGroupedError(
            "feature files do not hold entities in ascending order; streaming "
            "needs them sorted by entity and time"
        )


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
        _check_features_schema(files[0])
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
        log.info("%s: not streamed (%s); reading it whole", features_uri, exc)
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


def _check_features_schema(path: str) -> None:
    schema = storage.scan_table(path).collect_schema()
    if ENTITY not in schema or not isinstance(schema.get(TIMESTAMP), pl.Datetime):
        raise _Fallback(f"{path} is not a features table")


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


class _TableSink:
    """A CSV or Parquet file appended chunk by chunk, moved into place at the end."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._writer: Any = None
        self._csv: Any = None

    def __enter__(self) -> _TableSink:
        self._staging = self._stack.enter_context(storage.staged(self.uri))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        self._stack.__exit__(*exc)

    @property
    def info(self) -> storage.FileInfo:
        return replace(self._staging.info, rows=self.rows)

    def write(self, frame: pl.DataFrame) -> None:
        if self.uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = frame.to_arrow()
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._staging.path, table.schema)
            self._writer.write_table(table)
        else:
            if self._csv is None:
                self._csv = open(self._staging.path, "wb")  # noqa: SIM115
            frame.write_csv(self._csv, include_header=self.rows == 0)
        self.rows += frame.height

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._csv is not None:
            self._csv.close()
            self._csv = None


__all__ = [
    "CHUNK_ROWS",
    "FEATURE_CHUNK_ROWS",
    "Chunk",
    "FeaturesResult",
    "NotGroupedError",
    "Progress",
    "ScoresResult",
    "context_rows",
    "entity_chunks",
    "feature_chunks",
    "stream_features",
    "stream_scores",
    "write_features",
]
