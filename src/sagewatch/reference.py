"""The reference period of a features table, handed out in blocks of one entity.

A detector learns its scaler from every reference row and its model from a sample
of them (see :mod:`sagewatch.training`). This module says which rows of each
entity are the reference (:class:`Layout`) and reads them in blocks of at most
:data:`~sagewatch._block_rows()` rows of one entity, cut at multiples of
that number counted from the entity's first row, whatever the source:

* :class:`ArrayReference`: arrays in memory (``Detector.fit``);
* :class:`TableReference`: a features table in memory;
* :class:`FileReference`: Parquet feature files, read file by file in batches,
  only the feature columns and only as far as the reference period reaches.

The same rows therefore give the same blocks, and the same detector, from any
source. The first pass over a table also fingerprints its reference rows, notes
each entity's last reference timestamp and refuses missing or non-finite
features; memory holds a batch and a block, not the table.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from sagewatch import storage
from sagewatch.config import ReferenceSettings, Settings
from sagewatch.errors import InputError
from sagewatch.schema import ENTITY, TIMESTAMP
from sagewatch.streaming import NotGroupedError

if TYPE_CHECKING:  # torch loads only where a detector is fitted
    from sagewatch.models import Scaler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Reference rows of each entity (a run of rows) in table order, of which the
    last ``held`` are held out. ``rows`` and ``held`` are (entities,)."""

    names: list[str]
    rows: np.ndarray
    held: np.ndarray

    @classmethod
    def split(
        cls, names: list[str], rows: np.ndarray, validation_fraction: float
    ) -> Layout:
        """Hold out the last ``validation_fraction`` of each entity's rows
        (rounded down); none when that leaves fewer than 2 rows to train on."""
        rows = np.asarray(rows, dtype=np.int64)
        held = np.zeros_like(rows)
        if validation_fraction > 0:
            held = np.floor(rows * validation_fraction).astype(np.int64)
        if (rows - held).sum() < 2:
            held = np.zeros_like(rows)
        return cls(names, rows, held)

    @property
    def train(self) -> np.ndarray:
        """Rows before the held-out ones, per entity. (entities,)"""
        return self.rows - self.held

    @cached_property
    def start(self) -> np.ndarray:
        """Number of each entity's first row, counting across entities. (entities,)"""
        return np.r_[0, np.cumsum(self.rows)[:-1]].astype(np.int64)


@dataclass
class Block:
    """Consecutive reference rows of entity ``run`` (its place in the layout), the
    first being its row number ``start``; ``x`` is (rows, features) float64."""

    run: int
    start: int
    x: np.ndarray
    time: np.ndarray | None = None  # (rows,) physical timestamps, first pass only


class Reference:
    """Reference rows of a table, entity by entity, in aligned blocks."""

    layout: Layout
    columns: list[str]
    #: Entities of the table that have no reference rows.
    without_reference: list[str]
    #: SHA-256 of the entity, timestamp and features of every reference row, in
    #: order (None until a table has been read once; arrays have none).
    sha256: str | None = None
    #: Last reference timestamp of each entity (ISO 8601), known after one pass.
    reference_end: dict[str, str]
    #: Where the rows come from, for messages.
    source = "features"
    _timed = False
    _dtype: pl.DataType = pl.Datetime("us", "UTC")

    def blocks(self) -> Iterator[Block]:
        """Every reference row once, in blocks of at most ``BLOCK_ROWS`` rows.

        Raises:
            InputError: (first pass over a table) missing or non-finite features.
        """
        if not self._timed or self.sha256 is not None:
            yield from _aligned(self._pieces(time=False), self.layout)
            return
        check = _FirstPass(self.layout, self.columns, self.source)
        for block in _aligned(self._pieces(time=True), self.layout):
            check.add(block)
            yield block
        self.sha256, self.reference_end = check.finish(self._dtype)

    def _pieces(self, *, time: bool) -> Iterator[Block]:
        """Reference rows in order, in pieces of any size."""
        raise NotImplementedError(f"{type(self).__name__}._pieces")


class ArrayReference(Reference):
    """Rows ``x`` (rows, features) grouped by ``entity``; ``held`` marks the last
    rows of each entity's run (possibly none, possibly all) as held out.

    Raises:
        ValueError: a held-out row comes before a training row of its entity.
    """

    def __init__(self, x: np.ndarray, entity: np.ndarray, held: np.ndarray) -> None:
        from sagewatch.models import entity_runs

        self._x = x
        run, starts = entity_runs(entity)
        counts = np.diff(np.r_[starts, len(entity)])
        held_counts = np.bincount(run, weights=held, minlength=len(starts))
        held_counts = held_counts.astype(np.int64)
        position = np.arange(len(entity)) - starts[run]
        if not np.array_equal(held, position >= (counts - held_counts)[run]):
            raise ValueError(
                "validation must mark the last rows of each entity's reference, "
                "after its training rows"
            )
        self._starts = starts
        self.layout = Layout([str(entity[s]) for s in starts], counts, held_counts)
        self.columns = [str(i) for i in range(x.shape[1])]
        self.without_reference = []
        self.reference_end = {}

    def _pieces(self, *, time: bool) -> Iterator[Block]:
        for run, start, lo, hi in _table_blocks(self._starts, self.layout.rows):
            yield Block(run, start, np.asarray(self._x[lo:hi], dtype=np.float64))


class TableReference(Reference):
    """The reference rows of a features table in memory (any order: it is put in
    the canonical order, by entity then time, as a copy when it is not)."""

    _timed = True

    def __init__(
        self, frame: pl.DataFrame, columns: Sequence[str], settings: Settings
    ) -> None:
        frame = canonical(frame)
        entity = frame[ENTITY].cast(pl.String)
        starts = np.flatnonzero(np.diff(entity.rle_id().to_numpy(), prepend=-1))
        counts = np.diff(np.r_[starts, frame.height]).astype(np.int64)
        names = entity.gather(starts).to_list()
        until = None
        if settings.reference.train_until is not None and frame.height:
            flags = frame.select(until_expr(settings.reference)).to_series()
            until = np.add.reduceat(flags.to_numpy().astype(np.int64), starts)
        elif settings.reference.train_until is not None:
            until = np.zeros(0, np.int64)
        rows = reference_rows(counts, until, settings.reference)
        self.layout, self.without_reference = _layout(names, rows, settings)
        self._frame, self._starts = frame, starts[rows > 0]
        self.columns = list(columns)
        self.height = frame.height
        self._dtype = frame.schema[TIMESTAMP]

    def _pieces(self, *, time: bool) -> Iterator[Block]:
        for run, start, lo, hi in _table_blocks(self._starts, self.layout.rows):
            part = self._frame.slice(lo, hi - lo)
            yield Block(run, start, _matrix(part, self.columns), _time(part, time))


class FileReference(Reference):
    """The reference rows of Parquet feature files sorted by entity and time.

    The constructor reads the entity and timestamp columns once, in batches of
    ``batch_rows``, to count each entity's rows; blocks then read the feature
    columns of each file up to its last reference row. ``source`` names the
    table in messages.

    Raises:
        NotGroupedError: the files, read in order, do not hold each entity's
            rows together, entities in ascending order, rows in time order (read
            the table whole and sort it instead).
    """

    _timed = True

    def __init__(
        self,
        files: list[str],
        columns: Sequence[str],
        settings: Settings,
        *,
        source: str | None = None,
        batch_rows: int | None = None,
    ) -> None:
        self.files = files
        self.source = source or (files[0] if len(files) == 1 else "feature files")
        self.columns = list(columns)
        self._batch_rows = batch_rows or _block_rows()
        self._until = settings.reference.train_until is not None
        self._dtype = storage.table_schema(files[0])[TIMESTAMP]
        names, counts, until, self._segments = self._scan(settings.reference)
        rows = reference_rows(counts, until, settings.reference)
        self.layout, self.without_reference = _layout(names, rows, settings)
        self._run = np.where(rows > 0, np.cumsum(rows > 0) - 1, -1)
        self._rows_all = rows
        self.file_rows = [int(sum(n for _, n in s)) for s in self._segments]
        self.height = int(counts.sum())

    def _scan(
        self, settings: ReferenceSettings
    ) -> tuple[list[str], np.ndarray, np.ndarray | None, list[list[list[int]]]]:
        """Entities in order, their rows, rows up to ``train_until``, and each
        file's runs as [entity number, rows]."""
        names: list[str] = []
        counts: list[int] = []
        until: list[int] = []
        segments: list[list[list[int]]] = []
        last_time: int | None = None
        select = [pl.col(ENTITY).cast(pl.String), pl.col(TIMESTAMP)]
        if self._until:
            select.append(until_expr(settings).alias("until"))
        for path in self.files:
            runs: list[list[int]] = []
            scan = storage.scan_table(path).select(select)
            for batch in storage.collect_batches(scan, path, self._batch_rows):
                time = _checked_time(batch, path)
                ids = batch[ENTITY].rle_id().to_numpy()
                starts = np.r_[0, np.flatnonzero(np.diff(ids)) + 1]
                lengths = np.diff(np.r_[starts, batch.height]).tolist()
                flags = (
                    np.add.reduceat(batch["until"].to_numpy().astype(np.int64), starts)
                    if self._until
                    else np.zeros(len(starts), np.int64)
                )
                batch_names = batch[ENTITY].gather(starts).to_list()
                for k, name in enumerate(batch_names):
                    if names and name == names[-1]:
                        if k == 0 and last_time is not None and time[0] < last_time:
                            raise NotGroupedError(f"{path}: rows not in time order")
                        counts[-1] += lengths[k]
                        until[-1] += int(flags[k])
                    elif names and name < names[-1]:
                        raise NotGroupedError(
                            f"{path}: entity {name!r} after {names[-1]!r}"
                        )
                    else:
                        names.append(name)
                        counts.append(lengths[k])
                        until.append(int(flags[k]))
                    if runs and runs[-1][0] == len(names) - 1:
                        runs[-1][1] += lengths[k]
                    else:
                        runs.append([len(names) - 1, lengths[k]])
                last_time = int(time[-1])
            segments.append(runs)
        return (
            names,
            np.asarray(counts, np.int64),
            np.asarray(until, np.int64) if self._until else None,
            segments,
        )

    def _pieces(self, *, time: bool) -> Iterator[Block]:
        columns = self.columns + ([TIMESTAMP] if time else [])
        seen = np.zeros(len(self._rows_all), np.int64)  # rows passed per entity
        for path, runs in zip(self.files, self._segments, strict=True):
            plan = []  # [run in the layout or -1, rows, first row number, rows kept]
            head = offset = 0
            for entity, rows in runs:
                first = int(seen[entity])
                kept = int(np.clip(self._rows_all[entity] - first, 0, rows))
                plan.append((int(self._run[entity]), rows, first, kept))
                seen[entity] += rows
                offset += rows
                head = offset - rows + kept if kept else head
            if head:
                scan = storage.scan_table(path).select(columns).head(head)
                yield from _cut(
                    storage.collect_batches(scan, path, self._batch_rows), plan, time
                )


def _cut(
    batches: Iterator[pl.DataFrame],
    plan: list[tuple[int, int, int, int]],
    time: bool,
) -> Iterator[Block]:
    """Reference pieces of the batches of one file whose runs ``plan`` describes."""
    step, done = 0, 0  # the run being read, and its rows already passed
    for batch in batches:
        x = batch.drop(TIMESTAMP, strict=False).to_numpy()
        stamps = batch[TIMESTAMP].to_physical().to_numpy() if time else None
        at = 0
        while at < batch.height:
            run, rows, first, kept = plan[step]
            take = min(rows - done, batch.height - at)
            keep = min(max(kept - done, 0), take)
            if keep:
                yield Block(
                    run,
                    first + done,
                    np.asarray(x[at : at + keep], dtype=np.float64),
                    None if stamps is None else stamps[at : at + keep],
                )
            at, done = at + take, done + take
            if done == rows:
                step, done = step + 1, 0


def _aligned(pieces: Iterator[Block], layout: Layout) -> Iterator[Block]:
    """Pieces in order regrouped into blocks cut at multiples of ``BLOCK_ROWS``
    rows of their entity (and at its last reference row)."""
    step = _block_rows()
    parts: list[Block] = []
    for piece in pieces:
        at = 0
        while at < len(piece.x):
            start = piece.start + at
            end = min((start // step + 1) * step, int(layout.rows[piece.run]))
            take = min(len(piece.x) - at, end - start)
            time = None if piece.time is None else piece.time[at : at + take]
            parts.append(Block(piece.run, start, piece.x[at : at + take], time))
            at += take
            if start + take == end:
                yield _joined(parts)
                parts = []


def _joined(parts: list[Block]) -> Block:
    if len(parts) == 1:
        return parts[0]
    time = None
    if parts[0].time is not None:
        time = np.concatenate([p.time for p in parts])  # type: ignore[misc]
    x = np.concatenate([p.x for p in parts])
    return Block(parts[0].run, parts[0].start, x, time)


class _FirstPass:
    """Fingerprint and last timestamps of a first pass; refuses missing values."""

    def __init__(self, layout: Layout, columns: list[str], source: str) -> None:
        self.layout = layout
        self.columns = columns
        self.source = source
        self.digest = hashlib.sha256()
        self.last: dict[str, int] = {}

    def add(self, block: Block) -> None:
        """Fingerprint a block and note its entity's latest timestamp.

        Raises:
            InputError: names the entity, row and columns of the first row with
                a missing or non-finite feature.
        """
        name = self.layout.names[block.run]
        bad = ~np.isfinite(block.x)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            columns = [c for c, b in zip(self.columns, bad[row], strict=True) if b]
            raise InputError(
                f"{self.source}: entity {name!r}, row {block.start + row}: missing "
                f"or non-finite {', '.join(columns[:5])}"
                f"{' ...' if len(columns) > 5 else ''} in the reference period; "
                "expected complete features (were part files computed from inputs "
                "with different sensors?)"
            )
        self.digest.update(name.encode() + b"\0")
        assert block.time is not None
        self.digest.update(np.ascontiguousarray(block.time, dtype=np.int64).data)
        self.digest.update(np.ascontiguousarray(block.x).data)
        self.last[name] = int(block.time[-1])

    def finish(self, dtype: pl.DataType) -> tuple[str, dict[str, str]]:
        """The fingerprint, and each entity's last timestamp (ISO 8601)."""
        stamps = pl.Series(list(self.last.values()), dtype=pl.Int64).cast(dtype)
        ends = {k: t.isoformat() for k, t in zip(self.last, stamps, strict=True)}
        return self.digest.hexdigest(), ends


def _layout(
    names: list[str], rows: np.ndarray, settings: Settings
) -> tuple[Layout, list[str]]:
    """The layout of the entities with reference rows, and the others' names."""
    keep = (rows > 0).tolist()
    kept = [n for n, k in zip(names, keep, strict=True) if k]
    layout = Layout.split(kept, rows[rows > 0], settings.model.validation_fraction)
    return layout, sorted(n for n, k in zip(names, keep, strict=True) if not k)


def reference_rows(
    rows: np.ndarray, until: np.ndarray | None, settings: ReferenceSettings
) -> np.ndarray:
    """Reference rows of entities of ``rows`` rows in time order; ``until``
    counts their rows up to ``train_until``. See ``ReferenceSettings``."""
    if settings.train_rows is not None:
        return np.minimum(rows, settings.train_rows)
    if settings.train_until is not None:
        assert until is not None
        return until
    return np.minimum(np.ceil(rows * settings.train_fraction).astype(np.int64), rows)


def until_expr(settings: ReferenceSettings) -> pl.Expr:
    """True for rows up to and including ``train_until`` (naive: UTC)."""
    until = settings.train_until
    assert until is not None
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    return pl.col(TIMESTAMP) <= pl.lit(until).dt.convert_time_zone("UTC")


def canonical(frame: pl.DataFrame) -> pl.DataFrame:
    """A features table sorted by entity then time (itself when it already is)."""
    entity, time = pl.col(ENTITY), pl.col(TIMESTAMP)
    in_order = (entity > entity.shift(1)) | (
        (entity == entity.shift(1)) & (time >= time.shift(1))
    )
    if frame.select(in_order.fill_null(True).all()).item():
        return frame
    return frame.sort([ENTITY, TIMESTAMP], maintain_order=True)


def _table_blocks(
    starts: np.ndarray, rows: np.ndarray
) -> Iterator[tuple[int, int, int, int]]:
    """Entity, first row number, and table rows [lo, hi) of each block, for
    entities whose reference rows start at table rows ``starts``."""
    step = _block_rows()
    pairs = zip(starts.tolist(), rows.tolist(), strict=True)
    for run, (first, count) in enumerate(pairs):
        for start in range(0, count, step):
            yield run, start, first + start, first + min(start + step, count)


def _block_rows() -> int:
    from sagewatch import models

    return models.BLOCK_ROWS


def _matrix(part: pl.DataFrame, columns: list[str]) -> np.ndarray:
    return np.asarray(part.select(columns).to_numpy(), dtype=np.float64)


def _time(part: pl.DataFrame, time: bool) -> np.ndarray | None:
    return part[TIMESTAMP].to_physical().to_numpy() if time else None


def _checked_time(batch: pl.DataFrame, path: str) -> np.ndarray:
    """The batch's physical timestamps; refuses nulls and time going back within
    an entity."""
    if batch[ENTITY].null_count() or batch[TIMESTAMP].null_count():
        raise NotGroupedError(f"{path}: missing entities or timestamps")
    time = batch[TIMESTAMP].to_physical().to_numpy()
    ids = batch[ENTITY].rle_id().to_numpy()
    if np.any((ids[1:] == ids[:-1]) & (time[1:] < time[:-1])):
        raise NotGroupedError(f"{path}: rows not in time order")
    return time


def gather(reference: Reference, rows: np.ndarray, scaler: Scaler) -> np.ndarray:
    """Reference rows numbered ``rows`` (sorted, across entities), scaled.

    One pass over the blocks; memory holds the rows asked for and one block.
    Returns (rows, features) float32.
    """
    layout = reference.layout
    out = np.empty((len(rows), len(reference.columns)), dtype=np.float32)
    for block in reference.blocks():
        first = int(layout.start[block.run]) + block.start
        lo, hi = np.searchsorted(rows, [first, first + len(block.x)])
        if hi > lo:
            names = np.full(hi - lo, layout.names[block.run], dtype=object)
            out[lo:hi] = scaler.transform(block.x[rows[lo:hi] - first], names)
    return out
