"""Staged output files: features per entity, and score tables appended by chunk.

Features go to one Parquet file per entity, as Float32 columns (a long entity's
pieces appended as row groups); scores to one CSV and one Parquet file, appended
chunk by chunk. A chunk's feature files are written on a second thread while the
next chunk is validated and computed, so memory holds about two chunks and their
outputs; nothing is moved into place before the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import polars as pl

from sagewatch import storage
from sagewatch.features import as_stored, entity_starts
from sagewatch.schema import ENTITY

log = logging.getLogger(__name__)

FEATURES_STEM = "features"


# Parquet key-value metadata of every feature file: the settings it was computed
# with, so that part files of different runs are not read as one table.
STAMP_KEY = "sagewatch.features"


def stamp(rolling_window: int, statistics: list[str]) -> dict[str, str]:
    """The metadata a feature file carries (see :data:`STAMP_KEY`)."""
    value = {"rolling_window": rolling_window, "statistics": sorted(statistics)}
    return {STAMP_KEY: json.dumps(value, sort_keys=True)}


def write_features(
    features: pl.DataFrame, output_dir: str, metadata: dict[str, str] | None = None
) -> list[storage.FileInfo]:
    """Write a features table sorted by entity as one Parquet file per entity,
    in the streamed path's format (Float32 features, Float64 ones rounded), each
    file carrying ``metadata``; each file is moved into place once written.

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
            _write_parquet(part, staging.path, metadata)
        infos.append(replace(staging.info, rows=part.height))
    return infos


def _entity_uri(output_dir: str, entity: str) -> str:
    name = f"{FEATURES_STEM}-{storage.safe_name(entity)}.parquet"
    return storage.join(output_dir, name)


def _write_parquet(
    part: pl.DataFrame, path: str, metadata: dict[str, str] | None
) -> None:
    """One entity's features as Parquet.

    Uncompressed: zstd makes the files about 45 % smaller but takes four times as
    long to write (1.1 against 0.26 CPU-seconds per million rows of 3 sensors),
    longer than validating and computing the features together. Without column
    statistics (min, max per row group), which halve the writing time again
    (0.12 against 0.23 s); the stages after read every row of the files anyway.
    """
    part.write_parquet(
        path, compression="uncompressed", statistics=False, metadata=metadata
    )


class _EntityWriter:
    """One Parquet file per entity; a long entity's pieces appended as row groups.

    A chunk's files are written on a worker thread while the next chunk is
    computed, and each finished file is hashed on a third thread while the next
    one is written; :meth:`write` first waits for the chunk before, so at most
    one chunk waits in memory. Files are staged and moved into place together
    when the block ends without an error; otherwise none of them is.
    """

    def __init__(self, output_dir: str, metadata: dict[str, str] | None = None) -> None:
        self.output_dir = output_dir
        self.metadata = metadata
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
                self._open = _AppendParquet(staging, self.metadata)
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
        _write_parquet(part, staging.path, self.metadata)
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

    def __init__(self, staging: Any, metadata: dict[str, str] | None = None) -> None:
        self.staging = staging
        self.rows = 0
        self.metadata = metadata
        self._writer: Any = None

    def write(self, frame: pl.DataFrame) -> None:
        import pyarrow.parquet as pq

        table = frame.to_arrow()
        if self.metadata:
            table = table.replace_schema_metadata(
                {**(table.schema.metadata or {}), **self.metadata}
            )
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
