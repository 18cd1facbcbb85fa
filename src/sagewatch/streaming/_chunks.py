"""Input files read in batches and regrouped into chunks of whole entities.

Input larger than one chunk is read file by file in batches (polars' streaming scan)
and cut into chunks of whole entities; an entity longer than a chunk is cut into
pieces in time order, each a chunk of its own. Feature files are read the same way
for scoring, and must hold their entities in ascending order and in time order.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from sagewatch import storage
from sagewatch.errors import InputError
from sagewatch.schema import CSV_SUFFIXES, ENTITY, LINE, SOURCE, TIMESTAMP


class NotGroupedError(InputError):
    """The rows of an entity are not contiguous, so chunks cannot hold whole ones."""


class _Fallback(Exception):
    """Streaming cannot give exactly the in-memory result; the reason is the text."""


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
    """Regroup row batches of at most ``chunk_rows`` rows into chunks of whole
    entities: a chunk ends before the entity that would take it past
    ``chunk_rows``, so memory follows the chunk size, not the entities' lengths.

    An entity with ``chunk_rows`` rows still pending at the end of a batch is
    passed on in pieces, each piece a chunk of its own; one that ends in that
    batch goes whole. A chunk therefore holds fewer than ``2 * chunk_rows`` rows.

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
        if None in names:  # a blank line or an empty entity: in memory names the line
            raise _Fallback("a row has no entity value")
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
        csv = path.endswith(CSV_SUFFIXES)
        first = 2 if csv else 1
        batches = storage.collect_batches(
            storage.scan_table(path, sep=sep), path, chunk_rows
        )
        rows = 0
        for batch in _without_blank_tail(batches) if csv else batches:
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


def _without_blank_tail(batches: Iterator[pl.DataFrame]) -> Iterator[pl.DataFrame]:
    """``batches`` without the blank or whitespace-only lines at the end of the
    file: they are no rows, as in :func:`sagewatch.schema.load_raw`. Blank lines
    before a row stay, for the checks to refuse."""
    held: list[pl.DataFrame] = []  # the last batch with a row, then blank ones
    for batch in batches:
        # a batch whose first row is not blank has a row: the full check is rare
        if not (_blank_row(batch, 0) and _is_blank(batch).all()):
            yield from held
            held = []
        held.append(batch)
    if held:
        last = held[0]
        if _blank_row(last, -1):
            rows = (~_is_blank(last)).arg_true()
            last = last.head(rows[-1] + 1 if rows.len() else 0)
        if last.height:
            yield last


def _blank_row(batch: pl.DataFrame, row: int) -> bool:
    return bool(_is_blank(batch.slice(row, 1)).all())


def _is_blank(batch: pl.DataFrame) -> pl.Series:
    return batch.select(
        pl.all_horizontal(
            pl.all().cast(pl.String).str.strip_chars().fill_null("") == ""
        )
    ).to_series()


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
        for batch in storage.collect_batches(
            storage.scan_table(path), path, chunk_rows
        ):
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
