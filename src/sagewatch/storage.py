"""Read and write artifacts at URIs: local paths or ``s3://bucket/key``.

This module, with the three private modules named below, is the only code that knows
about files and buckets. S3 goes through boto3, which takes its endpoint, region and
credentials from the standard AWS configuration (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ``AWS_REGION``, the shared config files),
so MinIO, Ceph or a moto server need no code change. Retries follow
``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``.

Every write is atomic. The content is first written completely to a temporary file
next to the target (locally) or in a temporary folder (for S3). Locally it is then
renamed into place with ``os.replace``; on S3 it is uploaded in one request or one
multipart upload, and S3 shows an object only once such an upload has completed (a
failed multipart upload is aborted). A failure half-way therefore leaves the previous
file or object untouched and nothing under the final name. A stage writes its files
inside :func:`replacing`, which puts them in place together at the end.

A location that cannot be reached, read or written raises a
:class:`~sagewatch.errors.StorageError` naming the URI and what to check (a table
that cannot be parsed raises :class:`~sagewatch.errors.InputError`); credentials
never appear in messages. The S3 requests live in :mod:`sagewatch._s3`, the
table formats in :mod:`sagewatch._tables` and the expansion of folders and globs into
files in :mod:`sagewatch._listing`; nothing else imports them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

from sagewatch import _listing, _s3, _tables
from sagewatch.errors import (
    AccessDeniedError,
    InputError,
    NotFoundError,
    StorageError,
)

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
sniff_separator = _tables.sniff_separator


@dataclass(frozen=True)
class FileInfo:
    """What the manifest records about one file: URI, size, SHA-256, rows."""

    uri: str
    bytes: int
    sha256: str
    rows: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "rows": self.rows,
        }


# ----------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


is_glob = _listing.is_glob


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    if is_s3(base):
        head = str(base).rstrip("/")
        return "/".join([head, *(p.strip("/") for p in parts if p)])
    return str(Path(base, *parts))


def is_within(uri: str, folder: str) -> bool:
    """Whether ``uri`` is the folder ``folder`` or lies inside it (False for a
    glob ``folder``)."""
    if is_s3(uri) != is_s3(folder) or is_glob(folder):
        return False
    if is_s3(uri):
        return (uri.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")
    inner, outer = Path(uri).resolve(), Path(folder).resolve()
    return inner == outer or outer in inner.parents


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    return _s3.split(uri)


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- reads


_READ_LOGS: contextvars.ContextVar[tuple[list[FileInfo], ...]] = contextvars.ContextVar(
    "sagewatch_read_logs", default=()
)


@contextlib.contextmanager
def track_reads() -> Iterator[list[FileInfo]]:
    """Collect a :class:`FileInfo` for every file read whole inside the block.

    The size and SHA-256 come from the bytes already read, and tables carry their
    row count, so a manifest can describe its inputs without reading them again.
    """
    files: list[FileInfo] = []
    token = _READ_LOGS.set((*_READ_LOGS.get(), files))
    try:
        yield files
    finally:
        _READ_LOGS.reset(token)


def _record(uri: str, data: bytes, rows: int | None = None) -> None:
    logs = _READ_LOGS.get()
    if not logs:
        return
    info = FileInfo(uri, len(data), hashlib.sha256(data).hexdigest(), rows)
    for files in logs:
        known = [i for i, f in enumerate(files) if f.uri == uri]
        if not known:
            files.append(info)
        elif rows is not None:
            files[known[0]] = info


# ----------------------------------------------------------------------------- S3


def s3_client() -> Any:
    """A boto3 S3 client for the current AWS configuration (endpoint, region,
    profile, credentials), rebuilt whenever that configuration changes."""
    return _s3.client()


def check_aws_environment() -> None:
    """Refuse malformed AWS variables (``AWS_ENDPOINT_URL``, ``AWS_MAX_ATTEMPTS``,
    ``AWS_RETRY_MODE``) with one line naming the variable, as botocore does not.

    Raises:
        StorageError: one of them cannot be used.
    """
    _s3.check_environment()


def aws_region() -> str | None:
    """The AWS region in use: ``AWS_REGION`` (which botocore does not read), else
    ``AWS_DEFAULT_REGION`` or the profile's; None when none is set.

    Raises:
        StorageError: the AWS configuration cannot be read (a missing profile).
    """
    return _s3.region()


def endpoint() -> str:
    """The S3 endpoint in use, without any user or password part."""
    return _s3.endpoint()


def storage_options() -> dict[str, Any]:
    """Keyword arguments that point polars' own S3 reader at this configuration.

    Pass them to ``pl.scan_parquet`` / ``pl.scan_csv``: the region, the endpoint
    when it is not AWS's own, and a credential provider backed by the same boto3
    session (profiles and role credentials included).
    """
    return _s3.polars_options()


def parquet_metadata(uri: str) -> dict[str, str]:
    """The key-value metadata of a Parquet file's footer (only the footer is read).

    Raises:
        StorageError: the file cannot be read.
    """
    options = storage_options() if is_s3(uri) else {}
    try:
        return pl.read_parquet_metadata(uri, **options)
    except (OSError, pl.exceptions.PolarsError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc
        raise StorageError(f"cannot read the metadata of {uri}: {first}") from exc


# ----------------------------------------------------------------------------- bytes


def exists(uri: str) -> bool:
    """Whether a file or object exists at ``uri`` (a folder or prefix counts)."""
    return _s3.exists(uri) if is_s3(uri) else Path(uri).exists()


def read_bytes(uri: str, *, record: bool = True) -> bytes:
    """Read one file or object whole; ``record`` False keeps it out of
    :func:`track_reads` (a file read only to be put back, not an input).

    Raises:
        NotFoundError, AccessDeniedError, EndpointError, StorageError.
    """
    data = _fetch(uri)
    if record:
        _record(uri, data)
    return data


def _fetch(uri: str) -> bytes:
    log.debug("read %s", uri)
    if is_s3(uri):
        return _s3.get(uri)
    with _local_errors(uri, "read"):
        return Path(uri).read_bytes()


@contextlib.contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFoundError(
            f"cannot {action} {uri}: no such file or folder; check the path"
        ) from exc
    except IsADirectoryError as exc:
        raise StorageError(
            f"cannot {action} {uri}: it is a folder, not a file"
        ) from exc
    except PermissionError as exc:
        raise AccessDeniedError(
            f"cannot {action} {uri}: permission denied; check the file permissions"
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot {action} {uri}: {exc.strerror or exc}") from exc
    except pl.exceptions.ComputeError as exc:  # polars' own I/O errors
        if action != "write":
            raise
        first = str(exc).strip().splitlines()[0]
        raise StorageError(f"cannot write {uri}: {first}") from exc


def file_info(uri: str, rows: int | None = None) -> FileInfo:
    """Size and SHA-256 of one file or object, streamed in chunks (not kept)."""
    if is_s3(uri):
        return FileInfo(uri, *_s3.digest(uri), rows)
    with _local_errors(uri, "read"), open(uri, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256")
        size = fh.tell()
    return FileInfo(uri, size, sha.hexdigest(), rows)


def write_bytes(uri: str, data: bytes) -> FileInfo:
    """Write ``data`` atomically; return its size and SHA-256."""
    with _staged(uri) as staged:
        Path(staged.path).write_bytes(data)
    return staged.info


def read_json(uri: str) -> Any:
    """Read a JSON document.

    Raises:
        StorageError: the file cannot be read or is not valid JSON.
    """
    import json

    data = read_bytes(uri)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from exc


def write_json(uri: str, obj: Any) -> FileInfo:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    import json

    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes(uri, text.encode("utf-8"))


# ----------------------------------------------------------------------------- staging


@dataclass
class _Staging:
    path: str
    info: FileInfo
    # Size and SHA-256 of the finished file, from a writer that already hashed it.
    known: FileInfo | None = None


@contextlib.contextmanager
def _staged(
    uri: str, rows: Callable[[str], int | None] | None = None
) -> Iterator[_Staging]:
    """Yield a temporary local path to write; on success move the file to ``uri``.

    ``rows``, given the finished temporary file, counts its rows for the record.
    """
    staging = _Staging("", FileInfo(uri, 0, ""))
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="sagewatch-") as tmpdir:
            staging.path = os.path.join(tmpdir, basename(uri) or "object")
            with _local_errors(uri, "write"):
                yield staging
            staging.info = _describe_local(staging.path, uri, rows, staging.known)
            _s3.upload(staging.path, _upload_target(uri), shown=uri)
        return
    with _local_staged(uri) as tmp:
        staging.path = tmp
        yield staging
        staging.info = _describe_local(tmp, uri, rows, staging.known)


@contextlib.contextmanager
def _local_staged(uri: str) -> Iterator[str]:
    """A temporary name next to local ``uri``, renamed onto it on success."""
    target = Path(uri)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    deferred = False
    try:
        with _local_errors(uri, "write"):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield str(tmp)
            deferred = _defer(str(tmp), uri)
            if not deferred:
                os.replace(tmp, target)
        log.debug("wrote %s", uri)
    finally:
        # A parent that is not a folder fails here too; the error above says why.
        if not deferred:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _describe_local(
    path: str,
    uri: str,
    rows: Callable[[str], int | None] | None,
    known: FileInfo | None = None,
) -> FileInfo:
    info = known or file_info(path)
    return replace(info, uri=uri, rows=rows(path) if rows else info.rows)


# ----------------------------------------------------------------------------- listing


def list_files(uri: str, suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> list[str]:
    """Expand a file, a folder (or prefix) or a glob into the files it names.

    A glob's ``*`` and ``?`` stay within one folder level and ``**`` spans levels,
    locally and on S3 alike. Hidden files and temporary names are skipped; the
    result is sorted.

    Raises:
        NotFoundError: nothing matches (an empty folder or prefix, or a missing
            bucket).
    """
    uri = str(uri)
    found = _listing.s3(uri, suffixes) if is_s3(uri) else _listing.local(uri, suffixes)
    if not found:
        raise NotFoundError(
            f"no input files at {uri} (looked for {', '.join(suffixes)}); "
            "check the path, prefix or glob"
        )
    return found


# ----------------------------------------------------------------------------- tables


def read_table(uri: str, *, sep: str | None = None) -> pl.DataFrame:
    """Read a CSV (any separator, ``.gz`` too) or Parquet file, folder or glob.

    Part files are concatenated in name order. CSV columns whose values do not all
    parse as numbers come back as strings, so validation can name the bad row.
    Inside :func:`track_reads`, each file is recorded with its row count.

    Raises:
        NotFoundError: nothing at ``uri``.
        InputError: a file that cannot be parsed as a table.
    """
    frames = [_read_one(f, sep) for f in list_files(uri)]
    if len(frames) == 1:
        return frames[0]
    try:
        return pl.concat(frames, how="diagonal_relaxed")
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"part files under {uri} do not share one schema: {exc}"
        ) from exc


def _read_one(uri: str, sep: str | None) -> pl.DataFrame:
    data = _fetch(uri)
    frame = _tables.parse(uri, data, sep)
    _record(uri, data, frame.height)
    return frame


def collect_batches(scan: pl.LazyFrame, uri: str, rows: int) -> Iterator[pl.DataFrame]:
    """The non-empty batches of about ``rows`` rows a lazy scan of ``uri`` yields.

    Raises:
        InputError: polars cannot read the table.
    """
    try:
        for batch in scan.collect_batches(chunk_size=rows):
            if batch.height:
                yield batch
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{uri}: {_unreadable(uri)}: {exc}") from exc


def scan_table(uri: str, *, sep: str | None = None) -> pl.LazyFrame:
    """A lazy scan of a Parquet or CSV file, folder or glob, local or on S3.

    Parquet and plain CSV are streamed by polars' own reader (on S3 with the same
    endpoint, region and credentials as :func:`s3_client`); gzip CSV is read whole.

    Notes:
        Scanned files are not fingerprinted (no bytes pass through here); use
        :func:`file_info`, which streams, where a manifest needs them. Read errors
        inside polars surface when the frame is collected, as polars errors.

    Raises:
        NotFoundError: nothing at ``uri`` (checked now, before any scan).
    """
    files = list_files(uri)
    options = storage_options() if is_s3(files[0]) else {}
    frames = []
    for f in files:
        if f.endswith(".parquet"):
            frames.append(pl.scan_parquet(f, **options))
        elif f.endswith(".gz"):
            frames.append(_read_one(f, sep).lazy())
        else:
            head = _head(f)
            _tables.check_first_line(f, head)
            separator = _tables.choose_separator(f, head, sep)
            frames.append(
                pl.scan_csv(
                    f, separator=separator, infer_schema_length=10_000, **options
                )
            )
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")


def table_schema(uri: str, *, sep: str | None = None) -> pl.Schema:
    """Column names and types of one table file, from its footer or first lines.

    Raises:
        NotFoundError: nothing at ``uri``.
        InputError: polars cannot read the file as a table (a truncated or
            damaged Parquet file, say).
    """
    try:
        return scan_table(uri, sep=sep).collect_schema()
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc
        raise InputError(f"{uri}: {_unreadable(uri)}: {first}") from exc


def _unreadable(uri: str) -> str:
    if uri.endswith(".parquet"):
        return "not a readable Parquet file"
    return "cannot read as a table"


def _head(uri: str, size: int = 65536) -> bytes:
    """The first ``size`` bytes of a file or object."""
    if is_s3(uri):
        return _s3.get(uri, first_bytes=size)
    with _local_errors(uri, "read"), open(uri, "rb") as fh:
        return fh.read(size)


def write_table(df: pl.DataFrame, uri: str) -> FileInfo:
    """Write ``df`` as Parquet, CSV or TSV (by suffix, ``.gz`` too), atomically.

    Raises:
        StorageError: an unknown suffix, or the file cannot be written.
    """
    writer = _tables.writer(uri)
    with _staged(uri) as staged:
        writer(df, staged.path)
    return replace(staged.info, rows=df.height)


def sink_table(lf: pl.LazyFrame, uri: str) -> FileInfo:
    """Stream ``lf`` into a Parquet or CSV file at ``uri``, atomically.

    The rows are streamed to a local temporary file first (then renamed or
    uploaded), so the frame never has to fit in memory.
    """
    if uri.endswith(".parquet"):
        with _staged(uri, rows=_tables.parquet_rows) as staged:
            lf.sink_parquet(staged.path, statistics=True)
    elif uri.endswith((".csv", ".txt")):
        with _staged(uri, rows=_tables.csv_rows) as staged:
            lf.sink_csv(staged.path)
    else:
        raise StorageError(f"cannot stream into {uri}: expected .parquet or .csv")
    return staged.info


# ----------------------------------------------------------------------------- folders


def upload_dir(local_dir: str | Path, uri: str) -> list[FileInfo]:
    """Copy every file of a local folder to ``uri`` (a folder or prefix).

    Each file is copied atomically; sub-folders are kept.

    Raises:
        NotFoundError: ``local_dir`` is not a folder.
    """
    source = Path(local_dir)
    if not source.is_dir():
        raise NotFoundError(f"cannot copy {source}: it is not a folder")
    infos = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = join(uri, path.relative_to(source).as_posix())
        info = replace(file_info(str(path)), uri=target)
        if is_s3(target):
            _s3.upload(str(path), target)
        else:
            with _local_staged(target) as tmp:
                shutil.copyfile(path, tmp)
        infos.append(info)
    return infos


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every file under ``uri`` into ``local_dir``; return ``local_dir``.

    Raises:
        NotFoundError: ``uri`` is not a folder or holds nothing.
    """
    local = Path(local_dir)
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise NotFoundError(f"cannot copy {uri}: it is not a folder")
        upload_dir(uri, str(local))
        return local
    bucket, key = split_s3(uri)
    folder = key.rstrip("/") + "/" if key.strip("/") else ""
    keys = [k for k in _s3.keys(f"s3://{bucket}/{folder}") if not k.endswith("/")]
    if not keys:
        raise NotFoundError(f"nothing under {uri}; check the bucket and prefix")
    for k in keys:
        with _local_staged(str(local / k[len(folder) :])) as tmp:
            _s3.download(f"s3://{bucket}/{k}", tmp)
    return local


def local_copy(uri: str, tmpdir: str | Path) -> Path:
    """A local folder holding the folder at ``uri`` (itself, when already local)."""
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise NotFoundError(f"cannot open {uri}: it is not a folder")
        return Path(uri)
    return download_dir(uri, Path(tmpdir) / basename(uri))


def safe_name(value: str) -> str:
    """A file-name-safe form of an entity name; a short hash keeps it unique."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", value)[:80]
    if cleaned == value and not value.startswith("."):
        return value
    return f"{cleaned}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def write_partitioned(
    df: pl.DataFrame, uri: str, *, by: str, stem: str = "part", suffix: str = ".parquet"
) -> list[FileInfo]:
    """Write one file per value of ``by`` under the folder ``uri``.

    Files are named ``<stem>-<value><suffix>``; each write is atomic. One file per
    entity lets SageMaker's ``ShardedByS3Key`` split the work by whole entities.
    """
    infos = []
    for (value,), part in df.group_by(by, maintain_order=True):
        name = f"{stem}-{safe_name(str(value))}{suffix}"
        infos.append(write_table(part, join(uri, name)))
    return infos


def remove(uri: str) -> None:
    """Delete one file or object; nothing happens when there is none."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3.errors(uri, "delete"):
            s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def remove_stale(uri: str, *, stem: str, keep: list[str]) -> list[str]:
    """Delete ``<stem>-*`` part files in the folder ``uri`` not named in ``keep``.

    A stage that rewrites a partitioned folder calls this after every new part is
    in place, so parts of entities from an earlier run never mix into the next
    stage. Only files directly in the folder are parts; sub-folders are left
    alone. Returns the URIs removed.
    """
    kept = set(keep)
    try:
        present = list_files(uri)
    except NotFoundError:
        return []
    folder = uri.rstrip("/") if is_s3(uri) else str(Path(uri))
    stale = [
        f
        for f in present
        if f.rsplit("/", 1)[0] == folder
        and basename(f).startswith(f"{stem}-")
        and f not in kept
    ]
    for f in stale:
        remove(f)
    if stale:
        log.warning("removed %d stale part file(s) under %s", len(stale), uri)
    return stale


# ----------------------------------------------------------------------------- stages


@dataclass
class _Batch:
    """The files one stage writes directly in ``folder``: each finished under a
    temporary name (``staged``) and put in place (``final``) with the others."""

    folder: str
    incoming: str  # S3: the hidden folder the files are uploaded to
    moves: list[tuple[str, str]]  # (staged, final)


_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar(
    "sagewatch_batch", default=None
)


@contextlib.contextmanager
def replacing(folder: str) -> Iterator[None]:
    """Put the files written directly in ``folder`` inside the block in place
    together, when the block ends without an error; otherwise none of them.

    Each file is first finished under a temporary name: locally a hidden file next
    to its target, on S3 an object under the hidden folder ``.incoming-<id>/`` of
    ``folder`` (listings skip both). At the end the local files are renamed onto
    their targets and the S3 objects copied onto theirs, server-side. A write that
    fails (a full disk, a refused or lost upload) therefore leaves the previous
    output whole; the renames or copies at the end are short, and should one of
    the copies fail, the files already replaced are logged.
    """
    folder = folder.rstrip("/") if is_s3(folder) else str(Path(folder))
    incoming = f"{folder}/.incoming-{uuid.uuid4().hex[:12]}"
    batch = _Batch(folder, incoming, [])
    token = _BATCH.set(batch)
    try:
        yield
    except BaseException:
        _BATCH.reset(token)
        _discard(batch)
        raise
    _BATCH.reset(token)
    _publish(batch)


def check_output(folder: str) -> None:
    """Refuse an output folder on an S3 bucket that does not exist, before a stage
    spends its work (see :func:`~sagewatch._s3.check_bucket`); local folders and
    buckets the credentials may not look at pass.

    Raises:
        NotFoundError: no such bucket.
    """
    if is_s3(folder):
        _s3.check_bucket(folder if folder.endswith("/") else f"{folder}/")


def _batch_for(uri: str) -> _Batch | None:
    batch = _BATCH.get()
    if batch is None:
        return None
    parent = uri.rsplit("/", 1)[0] if is_s3(uri) else str(Path(uri).parent)
    return batch if parent == batch.folder else None


def _defer(tmp: str, uri: str) -> bool:
    """Leave a finished local file under its temporary name for :func:`replacing`
    to rename; False when no block of it writes ``uri``'s folder."""
    batch = _batch_for(uri)
    if batch is not None:
        batch.moves.append((tmp, uri))
    return batch is not None


def _upload_target(uri: str) -> str:
    """Where an S3 file is uploaded: its final key, or the incoming folder of the
    block of :func:`replacing` that writes its folder."""
    batch = _batch_for(uri)
    if batch is None:
        return uri
    staged = f"{batch.incoming}/{basename(uri)}"
    batch.moves.append((staged, uri))
    return staged


def _publish(batch: _Batch) -> None:
    done: list[str] = []
    try:
        if batch.moves and is_s3(batch.folder):
            _copy_all(batch.moves, done)
        for staged, final in batch.moves:
            if not is_s3(final):
                with _local_errors(final, "write"):
                    os.replace(staged, final)
                done.append(final)
    except BaseException:  # a failed copy, or a signal while copying
        if done:
            log.error(
                "%s: %d of %d new files were put in place before the failure (%s); "
                "the others are as they were: run the stage again",
                batch.folder,
                len(done),
                len(batch.moves),
                ", ".join(sorted(basename(d) for d in done)),
            )
        raise
    finally:
        _discard(batch)


def _copy_all(moves: list[tuple[str, str]], done: list[str]) -> None:
    """Copy each staged object onto its final key, several at a time; raise the
    first failure once the copies under way have ended (those not started are
    dropped), ``done`` naming those that worked."""
    from concurrent.futures import ThreadPoolExecutor

    parts = _s3.part_threads(len(moves))

    def put(staged: str, final: str) -> None:
        _s3.copy(staged, final, parts=parts)
        done.append(final)  # list.append is atomic

    pool = ThreadPoolExecutor(_s3.COPY_OBJECTS, thread_name_prefix="sagewatch-copy")
    try:
        futures = [pool.submit(put, staged, final) for staged, final in moves]
        for future in futures:
            future.result()
    finally:  # on a failure or a signal: no new copies, wait for those running
        pool.shutdown(wait=True, cancel_futures=True)


def _discard(batch: _Batch) -> None:
    """Delete what a block left under temporary names, as far as possible."""
    uploaded = [staged for staged, _ in batch.moves if is_s3(staged)]
    for staged, _ in batch.moves:
        if not is_s3(staged):
            with contextlib.suppress(OSError):
                Path(staged).unlink(missing_ok=True)
    try:
        _s3.delete(uploaded)
    except NotFoundError as exc:  # no bucket, so nothing was left behind either
        log.debug("nothing to delete under %s: %s", batch.incoming, exc)
    except StorageError as exc:
        log.warning("could not delete %s: %s", batch.incoming, exc)


# ----------------------------------------------------------------------------- streams


def staged(
    uri: str, rows: Callable[[str], int | None] | None = None
) -> contextlib.AbstractContextManager[_Staging]:
    """A local path (``.path``) to write ``uri`` through in pieces, atomically.

    For writers that append (a Parquet writer, a CSV written chunk by chunk): the
    file is moved into place (or uploaded) only when the block ends without an
    error, and ``.info`` then holds its size, SHA-256 and, given ``rows``, its rows.
    """
    return _staged(uri, rows)
