"""The S3 half of :mod:`sagewatch.storage`: client, requests and error translation.

Only :mod:`sagewatch.storage` imports this module. boto3 resolves the endpoint,
region and credentials from the standard AWS configuration (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ``AWS_REGION``, the shared config files)
and retries per ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``. Every boto3 or botocore
failure leaves here as one :class:`~sagewatch.errors.StorageError` that names the URI
and what to check, with any secret from the environment masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from sagewatch.errors import (
    AccessDeniedError,
    EndpointError,
    NotFoundError,
    StorageError,
)

log = logging.getLogger("sagewatch.storage")

CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120
_CHUNK = 8 * 1024 * 1024
# Server-side copies: storage runs up to COPY_OBJECTS at once, a large object's
# parts COPY_PARTS at a time in all (split among the objects under way, at most
# 10 per object as boto3 does by default); the pool holds them all, with room
# for other calls.
COPY_OBJECTS = 16
COPY_PARTS = 64
_POOL_CONNECTIONS = COPY_PARTS + 16

# The environment that decides which client is right; a change builds a new one.
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
}


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} has no bucket name; expected s3://bucket/key")
    return bucket, key


# ----------------------------------------------------------------------------- client


def client() -> Any:
    """A boto3 S3 client for the current AWS configuration.

    One client is kept per distinct configuration, each from a fresh boto3 session,
    so a changed environment (another profile, endpoint or key) is never served a
    client built for the old one.
    """
    return _connection()[1]


def _connection() -> tuple[Any, Any]:
    state = "\0".join(os.environ.get(name, "") for name in _AWS_ENV)
    return _new_connection(hashlib.sha256(state.encode()).hexdigest())


@lru_cache(maxsize=4)
def _new_connection(_state: str) -> tuple[Any, Any]:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    check_environment()
    try:
        session = boto3.session.Session()
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            max_pool_connections=_POOL_CONNECTIONS,
        )
        s3 = session.client(
            "s3", region_name=region(session) or "us-east-1", config=config
        )
    except BotoCoreError as exc:  # e.g. a profile that does not exist
        raise StorageError(
            redact(
                f"cannot set up the S3 client: {exc}; check AWS_PROFILE and "
                "~/.aws/config"
            )
        ) from exc
    except ValueError as exc:
        raise StorageError(
            redact(f"cannot set up the S3 client: {exc}; check the AWS_* variables")
        ) from exc
    return session, s3


def check_environment() -> None:
    """Refuse AWS variables botocore would fail on with a bare ValueError."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        url = os.environ.get(name)
        if url and not re.match(r"https?://[^/]", url):
            raise StorageError(
                f"{name}={_public(url)!r} is not a URL; expected one that starts "
                "with http:// or https://, such as http://127.0.0.1:9000"
            )
    attempts = os.environ.get("AWS_MAX_ATTEMPTS")
    if attempts and not (attempts.strip().isdigit() and int(attempts) >= 1):
        raise StorageError(
            f"AWS_MAX_ATTEMPTS={attempts!r} is not a whole number of at least 1; "
            "expected the number of attempts per request, such as 5"
        )
    mode = os.environ.get("AWS_RETRY_MODE")
    if mode and mode not in ("legacy", "standard", "adaptive"):
        raise StorageError(
            f"AWS_RETRY_MODE={mode!r} is not a retry mode; expected legacy, "
            "standard or adaptive"
        )


def region(session: Any = None) -> str | None:
    """The AWS region in use: ``AWS_REGION``, else botocore's own lookup
    (``AWS_DEFAULT_REGION``, the profile's ``region``), else None.

    botocore itself does not read ``AWS_REGION``, which other AWS SDKs and the
    SageMaker containers set.
    """
    if os.environ.get("AWS_REGION"):
        return os.environ["AWS_REGION"]
    if session is not None:
        return session.region_name
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        return boto3.session.Session().region_name
    except BotoCoreError as exc:  # e.g. a profile that does not exist
        raise StorageError(
            redact(
                f"cannot look up the AWS region: {exc}; check AWS_PROFILE and "
                "~/.aws/config"
            )
        ) from exc


def endpoint() -> str:
    """The S3 endpoint in use, without any user or password part."""
    with errors("s3://", "connect to"):
        return _public(client().meta.endpoint_url)


def _public(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


def polars_options() -> dict[str, Any]:
    """Keyword arguments that let polars' own S3 reader use this configuration."""
    with errors("s3://", "connect to"):
        session, s3 = _connection()
    options = {"aws_region": s3.meta.region_name}
    url = s3.meta.endpoint_url
    if not re.search(r"\.amazonaws\.com(\.cn)?/?$", url):
        options["aws_endpoint_url"] = url
        if url.startswith("http://"):
            options["aws_allow_http"] = "true"

    def credentials() -> tuple[dict[str, str], int | None]:
        found = session.get_credentials()
        if found is None:
            return {}, None
        frozen = found.get_frozen_credentials()
        creds = {
            "aws_access_key_id": frozen.access_key,
            "aws_secret_access_key": frozen.secret_key,
        }
        if frozen.token:
            creds["aws_session_token"] = frozen.token
        return creds, None

    return {"storage_options": options, "credential_provider": credentials}


# ----------------------------------------------------------------------------- errors


def redact(text: str) -> str:
    """``text`` with every secret from the environment replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


@contextlib.contextmanager
def errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto3/botocore failures into the project's errors, naming the URI."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except S3UploadFailedError as exc:
        # boto3 keeps the service's answer to a failed upload only as the context.
        cause = exc.__context__
        if isinstance(cause, ClientError):
            raise _client_error(cause, uri, action) from exc
        raise StorageError(redact(f"cannot {action} {uri}: {exc}")) from exc
    except ClientError as exc:
        raise _client_error(exc, uri, action) from exc
    except BotoCoreError as exc:
        raise _botocore_error(exc, uri, action) from exc
    except OSError as exc:  # the local side of a transfer
        raise StorageError(f"cannot {action} {uri}: {exc.strerror or exc}") from exc


def _client_error(exc: Any, uri: str, action: str) -> StorageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    where = f"cannot {action} {uri}"
    bucket = uri[len("s3://") :].partition("/")[0]
    if code == "NoSuchBucket":
        return NotFoundError(
            f"{where}: bucket {bucket!r} does not exist at {endpoint()}; check the "
            "bucket name and the endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)"
        )
    if code in {"NoSuchKey", "404", "NotFound"}:
        return NotFoundError(
            f"{where}: no such object; check the key and that bucket {bucket!r} "
            "holds it"
        )
    if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}:
        return AccessDeniedError(
            f"{where}: access denied ({code}); check that the credentials in use "
            f"(AWS_PROFILE or AWS_ACCESS_KEY_ID) may {action} this key and that "
            f"the policy of bucket {bucket!r} allows it"
        )
    if code in _BAD_CREDENTIALS:
        return AccessDeniedError(
            f"{where}: the store refused the credentials ({code}); check the access "
            "key, secret key and session token of the profile or environment"
        )
    if code in {"PermanentRedirect", "AuthorizationHeaderMalformed"}:
        return StorageError(
            f"{where}: bucket {bucket!r} is in another region ({code}); check "
            "AWS_REGION"
        )
    message = error.get("Message") or exc
    return StorageError(redact(f"{where}: {code or 'error'}: {message}"))


def _botocore_error(exc: Exception, uri: str, action: str) -> StorageError:
    from botocore.exceptions import (
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
        ReadTimeoutError,
    )

    where = f"cannot {action} {uri}"
    if isinstance(exc, ReadTimeoutError):
        url = _public(client().meta.endpoint_url)
        return EndpointError(
            f"{where}: the endpoint {url} took the connection but sent no answer "
            f"within {READ_TIMEOUT_S:g} s, on every attempt (AWS_MAX_ATTEMPTS); "
            "check that the store is healthy and that AWS_ENDPOINT_URL / "
            "AWS_ENDPOINT_URL_S3 name the store, not another service"
        )
    if isinstance(exc, ConnectionError):
        url = _public(client().meta.endpoint_url)
        return EndpointError(
            f"{where}: the endpoint {url} is unreachable ({type(exc).__name__}); "
            "check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and that the store is "
            "running"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return AccessDeniedError(
            f"{where}: no usable AWS credentials; set AWS_PROFILE, or "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, ProfileNotFound):
        return StorageError(f"{where}: {exc}; check AWS_PROFILE and ~/.aws/config")
    return StorageError(redact(f"{where}: {exc}"))


# ----------------------------------------------------------------------------- requests


def keys(uri: str) -> list[str]:
    """Every key under the prefix of ``uri``, sorted."""
    bucket, prefix = split(uri)
    found: list[str] = []
    with errors(uri, "list"):
        pages = (
            client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            found.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(found)


def exists(uri: str) -> bool:
    """Whether an object, or any object under ``uri`` + ``/``, exists."""
    from botocore.exceptions import ClientError

    bucket, key = split(uri)
    with errors(uri, "look up"):
        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {"404", "NotFound"}:
                raise
        folder = key.rstrip("/") + "/" if key else ""
        found = client().list_objects_v2(Bucket=bucket, Prefix=folder, MaxKeys=1)
    return bool(found.get("Contents"))


def check_bucket(uri: str) -> None:
    """Refuse a bucket that does not exist before anything is written to it; a
    bucket the credentials may not look at passes (its writes will tell).

    Raises:
        NotFoundError: no such bucket at the endpoint in use.
    """
    from botocore.exceptions import ClientError

    bucket, _ = split(uri)
    with errors(uri, "write"):
        try:
            client().head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"403", "AccessDenied", "Forbidden"}:
                return
            if code not in {"404", "NoSuchBucket", "NotFound"}:
                raise
            missing = exc
        else:
            return
    raise NotFoundError(
        f"cannot write {uri}: bucket {bucket!r} does not exist at {endpoint()}; "
        "check the bucket name and the endpoint (AWS_ENDPOINT_URL / "
        "AWS_ENDPOINT_URL_S3)"
    ) from missing


def get(uri: str, *, first_bytes: int | None = None) -> bytes:
    """The whole object, or only its first ``first_bytes`` bytes."""
    bucket, key = split(uri)
    from botocore.exceptions import ClientError

    extra = {"Range": f"bytes=0-{first_bytes - 1}"} if first_bytes else {}
    with errors(uri, "read"):
        try:
            return client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        except ClientError as exc:
            if (
                first_bytes
                and exc.response.get("Error", {}).get("Code") == "InvalidRange"
            ):
                return b""  # S3's answer to a range read of an empty object
            raise


def digest(uri: str) -> tuple[int, str]:
    """Size and SHA-256 of an object, streamed in chunks."""
    bucket, key = split(uri)
    sha, size = hashlib.sha256(), 0
    with errors(uri, "read"):
        body = client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def transfer_config() -> Any:
    """How boto3 splits large uploads and downloads into parts."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(use_threads=True)


def part_threads(objects: int) -> int:
    """Parts of one large copy in flight at once when ``objects`` copies run
    together, so that all of them fit the client's connection pool."""
    return max(1, min(10, COPY_PARTS // max(1, min(objects, COPY_OBJECTS))))


def upload(local: str, uri: str, *, shown: str | None = None) -> None:
    """Upload a complete local file in one request or one multipart upload.

    S3 shows the object only once the upload completes; a failed multipart upload
    is aborted by boto3, so the key keeps its previous object, or none. Errors
    name ``shown`` (the file a staged upload stands for) when given.
    """
    bucket, key = split(uri)
    with errors(shown or uri, "write"):
        client().upload_file(local, bucket, key, Config=transfer_config())
    log.debug("wrote %s", uri)


def copy(source: str, uri: str, *, parts: int = 10) -> None:
    """Copy an object within the store (server-side; in parts when large, up to
    ``parts`` of them at once; see :func:`part_threads`)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split(uri)
    source_bucket, source_key = split(source)
    with errors(uri, "write"):
        client().copy(
            {"Bucket": source_bucket, "Key": source_key},
            bucket,
            key,
            Config=TransferConfig(use_threads=True, max_concurrency=parts),
        )
    log.debug("copied %s to %s", source, uri)


def delete(uris: list[str]) -> None:
    """Delete objects of one bucket, a thousand per request."""
    if not uris:
        return
    bucket = split(uris[0])[0]
    keys = [split(u)[1] for u in uris]
    with errors(uris[0], "delete"):
        for start in range(0, len(keys), 1000):
            answer = client().delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]},
            )
            if answer.get("Errors"):  # the request succeeds, some keys do not
                first = answer["Errors"][0]
                raise StorageError(
                    f"cannot delete s3://{bucket}/{first.get('Key')} and "
                    f"{len(answer['Errors']) - 1} more: {first.get('Code')} "
                    f"({first.get('Message', '')})"
                )


def download(uri: str, local: str) -> None:
    """Download one object to the local file ``local``."""
    bucket, key = split(uri)
    with errors(uri, "read"):
        client().download_file(bucket, key, local, Config=transfer_config())
    log.debug("read %s", uri)
