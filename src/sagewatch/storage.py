"""Read and write artifacts at URIs: local paths or ``s3://bucket/key``.

This is the only module that knows about files and buckets. S3 goes through boto3,
which takes its endpoint, region and credentials from the standard AWS configuration
(``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``, profiles), so MinIO, Ceph or a moto
server need no code change.

Every write is atomic: the bytes go to a temporary name next to the target and are
moved into place only once complete (``os.replace`` locally; a copy from a temporary
key and a delete on S3). A failure half-way leaves the previous object untouched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob as globlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from sagewatch.errors import (
    AccessDeniedError,
    EndpointError,
    InputError,
    NotFoundError,
    StorageError,
)

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".tsv", ".txt")
_SEPARATORS = (",", ";", "\t", "|")


@dataclass(frozen=True)
class FileInfo:
    """What the manifest records about one file."""

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


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    if is_s3(base):
        head = str(base).rstrip("/")
        return "/".join([head, *(p.strip("/") for p in parts if p)])
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name; expected s3://bucket/key")
    return bucket, key


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- S3


@lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str | None) -> Any:
    import boto3

    kwargs: dict[str, Any] = {}
    if region:
        kwargs["region_name"] = region
    return boto3.client("s3", **kwargs)


def s3_client() -> Any:
    """A boto3 S3 client for the current environment (endpoint, region)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _client(endpoint, region or "us-east-1")


@contextlib.contextmanager
def _s3_errors(uri: str, action: str) -> Iterator[None]:
    """Turn botocore failures into the project's errors, naming the URI."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"NoSuchBucket"}:
            raise NotFoundError(
                f"cannot {action} {uri}: bucket {split_s3(uri)[0]!r} does not exist"
            ) from exc
        if code in {"NoSuchKey", "404", "NotFound"}:
            raise NotFoundError(f"cannot {action} {uri}: no such object") from exc
        if code in {
            "AccessDenied",
            "403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        }:
            raise AccessDeniedError(
                f"cannot {action} {uri}: access denied ({code}); check the credentials "
                "and the bucket policy"
            ) from exc
        raise StorageError(f"cannot {action} {uri}: {code or exc}") from exc
    except EndpointConnectionError as exc:
        raise EndpointError(
            f"cannot {action} {uri}: endpoint {exc.kwargs.get('endpoint_url')} is "
            "unreachable; check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3"
        ) from exc
    except NoCredentialsError as exc:
        raise AccessDeniedError(
            f"cannot {action} {uri}: no AWS credentials found; set a profile or "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot {action} {uri}: {exc}") from exc


def _s3_keys(uri: str) -> list[str]:
    bucket, prefix = split_s3(uri)
    keys: list[str] = []
    with _s3_errors(uri, "list"):
        pages = (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(keys)


# ----------------------------------------------------------------------------- bytes


def exists(uri: str) -> bool:
    """Whether a file or object exists at ``uri`` (a folder or prefix counts)."""
    if not is_s3(uri):
        return Path(uri).exists()
    _bucket, key = split_s3(uri)
    return any(k == key or k.startswith(key.rstrip("/") + "/") for k in _s3_keys(uri))


def read_bytes(uri: str) -> bytes:
    """Read one file or object whole.

    Raises:
        NotFoundError, AccessDeniedError, EndpointError, StorageError.
    """
    log.debug("read %s", uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri, "read"):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as exc:
        raise NotFoundError(f"cannot read {uri}: no such file") from exc
    except IsADirectoryError as exc:
        raise StorageError(
            f"cannot read {uri}: it is a directory, expected a file"
        ) from exc
    except PermissionError as exc:
        raise AccessDeniedError(f"cannot read {uri}: permission denied") from exc


def write_bytes(uri: str, data: bytes) -> FileInfo:
    """Write ``data`` atomically; return its size and SHA-256."""
    with _staged(uri) as tmp:
        Path(tmp).write_bytes(data)
    return FileInfo(uri, len(data), hashlib.sha256(data).hexdigest())


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from exc


def write_json(uri: str, obj: Any) -> FileInfo:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes(uri, text.encode("utf-8"))


@contextlib.contextmanager
def _staged(uri: str) -> Iterator[str]:
    """Yield a temporary local path; on success move its content to ``uri``."""
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="sagewatch-") as tmpdir:
            tmp = os.path.join(tmpdir, basename(uri))
            yield tmp
            _put_s3(tmp, uri)
        return
    target = Path(uri)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create folder {target.parent}: {exc}") from exc
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield str(tmp)
        os.replace(tmp, target)
        log.debug("wrote %s", uri)
    finally:
        tmp.unlink(missing_ok=True)


def _put_s3(local: str, uri: str) -> None:
    """Upload under a temporary key, then copy into place and delete the temporary."""
    bucket, key = split_s3(uri)
    tmp_key = f"{key}.tmp-{uuid.uuid4().hex[:8]}"
    client = s3_client()
    with _s3_errors(uri, "write"):
        client.upload_file(local, bucket, tmp_key)
        try:
            client.copy({"Bucket": bucket, "Key": tmp_key}, bucket, key)
        finally:
            client.delete_object(Bucket=bucket, Key=tmp_key)
    log.debug("wrote %s", uri)


def file_info(uri: str, rows: int | None = None) -> FileInfo:
    """Size and SHA-256 of one file or object."""
    data = read_bytes(uri)
    return FileInfo(uri, len(data), hashlib.sha256(data).hexdigest(), rows)


# ----------------------------------------------------------------------------- listing


def list_files(uri: str, suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> list[str]:
    """Expand a file, a folder (or prefix) or a glob into the files it names.

    Hidden files and temporary names are skipped; the result is sorted.

    Raises:
        NotFoundError: nothing matches.
    """
    uri = str(uri)
    found = _list_s3(uri, suffixes) if is_s3(uri) else _list_local(uri, suffixes)
    if not found:
        raise NotFoundError(
            f"no input files at {uri} (looked for {', '.join(suffixes)}); "
            "check the path, prefix or glob"
        )
    return found


def _visible(name: str, suffixes: tuple[str, ...]) -> bool:
    base = basename(name)
    return not base.startswith(".") and ".tmp-" not in base and base.endswith(suffixes)


def _list_local(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    if any(ch in uri for ch in "*?["):
        return sorted(
            p for p in globlib.glob(uri, recursive=True) if _visible(p, suffixes)
        )
    path = Path(uri)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file() and _visible(p.name, suffixes)
        )
    return []


def _list_s3(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    bucket, key = split_s3(uri)
    if any(ch in key for ch in "*?["):
        prefix = key.split("*")[0].split("?")[0].split("[")[0]
        keys = _s3_keys(f"s3://{bucket}/{prefix}")
        return [
            f"s3://{bucket}/{k}"
            for k in keys
            if fnmatch.fnmatch(k, key) and _visible(k, suffixes)
        ]
    keys = _s3_keys(uri)
    if key in keys:
        return [uri]
    folder = key.rstrip("/") + "/" if key else ""
    return [
        f"s3://{bucket}/{k}"
        for k in keys
        if k.startswith(folder) and _visible(k, suffixes)
    ]


# ----------------------------------------------------------------------------- tables


def read_table(uri: str, *, sep: str | None = None) -> pl.DataFrame:
    """Read a CSV (any separator, ``.gz`` too) or Parquet file, folder or glob.

    Part files are concatenated in name order. CSV columns whose values do not all
    parse as numbers come back as strings, so validation can name the bad row.

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
    data = read_bytes(uri)
    log.debug("parse %s (%d bytes)", uri, len(data))
    if uri.endswith(".parquet"):
        try:
            return pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # polars raises several foreign types here
            raise InputError(f"{uri}: not a readable Parquet file: {exc}") from exc
    if uri.endswith(".gz"):
        import gzip

        try:
            data = gzip.decompress(data)
        except OSError as exc:
            raise InputError(f"{uri}: not a readable gzip file: {exc}") from exc
    return _parse_csv(uri, data, sep)


def _parse_csv(uri: str, data: bytes, sep: str | None) -> pl.DataFrame:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise InputError(
            f"{uri}: the file is empty; expected a header row and data rows"
        )
    separator = sep or sniff_separator(data)
    options: dict[str, Any] = {"separator": separator, "try_parse_dates": False}
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema_length=10_000, **options)
    except pl.exceptions.ComputeError:
        # A column that looked numeric early on holds text later: read all as text
        # and let schema validation name the first bad value.
        pass
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"{uri}: cannot parse as CSV with separator {separator!r}: {exc}"
        ) from exc
    try:
        return pl.read_csv(io.BytesIO(data), infer_schema_length=0, **options)
    except pl.exceptions.PolarsError as exc:
        raise InputError(
            f"{uri}: cannot parse as CSV with separator {separator!r}: {exc}"
        ) from exc


def sniff_separator(data: bytes) -> str:
    """Pick the separator that splits the header line into the most columns."""
    header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return max(_SEPARATORS, key=header.count)


def write_table(df: pl.DataFrame, uri: str) -> FileInfo:
    """Write ``df`` as Parquet or CSV (by suffix), atomically; describe the file."""
    with _staged(uri) as tmp:
        if uri.endswith(".parquet"):
            df.write_parquet(tmp, statistics=True)
        elif uri.endswith(".csv.gz"):
            import gzip

            with gzip.GzipFile(tmp, "wb", mtime=0) as fh:
                df.write_csv(fh)
        elif uri.endswith((".csv", ".txt")):
            df.write_csv(tmp)
        else:
            raise StorageError(
                f"cannot write table {uri}: expected .parquet, .csv or .csv.gz"
            )
        data = Path(tmp).read_bytes()
    return FileInfo(uri, len(data), hashlib.sha256(data).hexdigest(), df.height)


# ----------------------------------------------------------------------------- folders


def upload_dir(local_dir: str | Path, uri: str) -> list[FileInfo]:
    """Copy every file of a local folder to ``uri`` (a folder or prefix)."""
    infos = []
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_dir).as_posix()
            infos.append(write_bytes(join(uri, rel), path.read_bytes()))
    return infos


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every file under ``uri`` into ``local_dir``; return ``local_dir``."""
    local = Path(local_dir)
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise NotFoundError(f"{uri} is not a folder")
        shutil.copytree(uri, local, dirs_exist_ok=True)
        return local
    bucket, key = split_s3(uri)
    folder = key.rstrip("/") + "/"
    keys = [k for k in _s3_keys(uri) if k.startswith(folder)]
    if not keys:
        raise NotFoundError(f"nothing under {uri}; check the prefix")
    for k in keys:
        target = local / k[len(folder) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(f"s3://{bucket}/{k}"))
    return local


def local_copy(uri: str, tmpdir: str | Path) -> Path:
    """A local folder holding the folder at ``uri`` (itself, when already local)."""
    if not is_s3(uri):
        if not Path(uri).is_dir():
            raise NotFoundError(f"{uri} is not a folder")
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


# ----------------------------------------------------------------------------- streams


def staged_path(uri: str) -> contextlib.AbstractContextManager[str]:
    """A local path to write ``uri`` through; moved into place only on success.

    For writers that append in pieces (a Parquet writer, a CSV written chunk by
    chunk): the target never holds a partial file.
    """
    return _staged(uri)


def _object_store_options() -> dict[str, str]:
    """polars' object-store options from the standard AWS environment."""
    options: dict[str, str] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    if endpoint:
        options["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            options["aws_allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    options["aws_region"] = region or "us-east-1"
    return options


def scan_table(uri: str, *, sep: str | None = None) -> pl.LazyFrame:
    """A lazy scan of one table file: Parquet or plain CSV, local or on S3.

    CSV columns are read as text so that validation can name a bad value; compressed
    CSV is read whole (gzip cannot be split).

    Raises:
        InputError: the file cannot be scanned as a table.
    """
    options = _object_store_options() if is_s3(uri) else None
    try:
        if uri.endswith(".parquet"):
            return pl.scan_parquet(uri, storage_options=options)
        if uri.endswith(".gz"):
            return _read_one(uri, sep).lazy()
        head = read_head(uri)
        return pl.scan_csv(
            uri,
            separator=sep or sniff_separator(head),
            infer_schema=False,
            storage_options=options,
        )
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{uri}: cannot scan as a table: {exc}") from exc


def read_head(uri: str, size: int = 65_536) -> bytes:
    """The first ``size`` bytes of a file or object (for sniffing a CSV header)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri, "read"):
            body = s3_client().get_object(
                Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}"
            )["Body"]
            data: bytes = body.read()
    else:
        try:
            with open(uri, "rb") as fh:
                data = fh.read(size)
        except FileNotFoundError as exc:
            raise NotFoundError(f"cannot read {uri}: no such file") from exc
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data
