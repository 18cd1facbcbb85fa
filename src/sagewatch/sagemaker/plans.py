"""Job plans: the validated request, the uploads it needs, nothing sent yet.

A plan is what ``--plan`` prints and what :mod:`.launch` submits, so the printed
JSON is exactly the request that is sent. Inputs given as local paths become
uploads to a content-addressed prefix (``uploads/<sha256>/``), so uploading twice
writes nothing new and a re-planned request names the same objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sagewatch import storage
from sagewatch.config import Settings
from sagewatch.errors import ConfigError, StorageError
from sagewatch.sagemaker import contract
from sagewatch.sagemaker.bundle import SourceBundle, build_source_bundle
from sagewatch.sagemaker.jobs import (
    check_job_name,
    features_request,
    score_request,
    training_request,
)
from sagewatch.sagemaker.target import Target, locations, resolve_target
from sagewatch.sagemaker.validation import validate_request


@dataclass(frozen=True)
class Upload:
    """Bytes to put in S3 before the requests are sent (content-addressed)."""

    uri: str
    sha256: str
    bytes: int
    source: str
    files: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    data: bytes | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "uri": self.uri,
            "files": max(len(self.files), 1),
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class JobPlan:
    """One job request, what must be uploaded first, and what must be empty."""

    operation: str
    request: dict[str, Any]
    uploads: tuple[Upload, ...] = ()
    empty_outputs: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        key = (
            "ProcessingJobName" if "Processing" in self.operation else "TrainingJobName"
        )
        return str(self.request[key])

    def to_dict(self) -> dict[str, Any]:
        return {
            "uploads": [u.describe() for u in self.uploads],
            "placeholders": list(self.placeholders),
            "requests": [{"operation": self.operation, "request": self.request}],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def code_upload(settings: Settings, target: Target, bundle: SourceBundle) -> Upload:
    return Upload(
        uri=f"{target.root(settings)}/{bundle.key}",
        sha256=bundle.sha256,
        bytes=len(bundle.data),
        source="sagewatch source archive",
        data=bundle.data,
    )


def input_upload(settings: Settings, target: Target, local: str) -> Upload:
    """Plan the upload of local data to ``uploads/<content hash>/``.

    Uploads stay out of the stage prefixes (``raw/``, ``features/``), which jobs
    read whole by default.

    Raises:
        NotFoundError: no table files at ``local``.
        ConfigError: two files with one name (from a glob over several folders).
    """
    files = storage.list_files(local)
    base = Path(local) if Path(local).is_dir() else None
    names = [
        Path(f).relative_to(base).as_posix() if base else Path(f).name for f in files
    ]
    if len(set(names)) != len(names):
        raise ConfigError(f"{local}: several input files share a name; upload a folder")
    digest, size = hashlib.sha256(), 0
    for name, path in sorted(zip(names, files, strict=True)):
        data = Path(path).read_bytes()
        size += len(data)
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    sha = digest.hexdigest()
    prefix = locations(settings, target)["uploads"]
    return Upload(
        uri=f"{prefix}{sha[:16]}/",
        sha256=sha,
        bytes=size,
        source=str(local),
        files=tuple(sorted(zip(names, files, strict=True))),
    )


def s3_input_prefix(uri: str, files: tuple[str, ...] = storage.TABLE_SUFFIXES) -> str:
    """The S3 prefix a job reads for ``uri``: a file (one of the suffixes
    ``files``) as it is, a folder with its trailing slash (SageMaker matches key
    prefixes, so ``raw`` would also take ``raw-old/``, where the local commands
    read only ``raw/``).

    Raises:
        ConfigError: a glob, which a job input cannot express; a file whose suffix
            is not in lower case, which the job would not find in its input folder.
    """
    if storage.is_glob(uri):
        raise ConfigError(
            f"{uri}: a SageMaker job reads an S3 prefix, not a glob; give the folder "
            "(or one file), or copy the files to match under one prefix"
        )
    if not uri[5:].split("/")[0] or uri.endswith(files):
        return uri  # a file; or no bucket, which the request's validation names
    if uri.lower().endswith(files):
        raise ConfigError(
            f"{uri}: the job looks for files ending in {', '.join(files)} (in lower "
            "case) in its input folder; rename the file or copy it to such a name"
        )
    return uri.rstrip("/") + "/"


def s3_model_prefix(uri: str) -> str:
    """The S3 prefix the scoring job reads a detector from: a ``model.tar.gz`` as
    it is, a folder with its trailing slash.

    Raises:
        ConfigError: another file, which the job would not take for a detector.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name == "model.tar.gz":
        return uri
    if name.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip", ".json", ".pt")):
        raise ConfigError(
            f"{uri}: expected a model.tar.gz (as a training job writes it) or the "
            "folder of a detector (detector.json and weights.pt)"
        )
    return s3_input_prefix(uri, ())


def input_source(
    settings: Settings, target: Target, input_uri: str | None, kind: str
) -> tuple[str, list[Upload]]:
    """An input as an S3 URI, and the upload that puts local data there.

    ``input_uri`` None means the stage prefix ``kind`` (``raw``, ``features``).
    """
    if input_uri is None:
        return locations(settings, target)[kind], []
    if storage.is_s3(input_uri):
        return s3_input_prefix(input_uri), []
    upload = input_upload(settings, target, input_uri)
    return upload.uri, [upload]


def with_label_windows(
    settings: Settings, target: Target
) -> tuple[Settings, list[Upload]]:
    """Settings whose local ``label_windows`` file is replaced by its S3 copy.

    The file goes to ``uploads/<content hash>/<name>``, as local input does, so
    the job's container can read it. An s3:// URI (or no file) is left as it is.

    Raises:
        NotFoundError: no file at the path.
        StorageError: the file is not valid JSON.
    """
    local = settings.data.label_windows
    if not local or storage.is_s3(local):
        return settings, []
    data = storage.read_bytes(local)
    try:
        json.loads(data)
    except ValueError as exc:
        raise StorageError(f"label_windows {local}: not valid JSON: {exc}") from exc
    sha = hashlib.sha256(data).hexdigest()
    prefix = locations(settings, target)["uploads"]
    upload = Upload(
        uri=f"{prefix}{sha[:16]}/{Path(local).name}",
        sha256=sha,
        bytes=len(data),
        source=str(local),
        data=data,
    )
    moved = settings.with_overrides(
        {"label_windows": upload.uri}, source="the label_windows upload"
    )
    return moved, [upload]


def _plan(
    operation: str,
    request: dict[str, Any],
    uploads: list[Upload],
    target: Target,
    empty: tuple[str, ...] = (),
) -> JobPlan:
    validate_request(operation, request)
    return JobPlan(operation, request, tuple(uploads), empty, target.placeholders)


def _prepare(
    settings: Settings,
    *,
    strict: bool,
    bundle: SourceBundle | None,
    input_uri: str | None,
    default: str,
) -> tuple[Target, dict[str, str], Upload, str, list[Upload]]:
    """What every job plan starts from: target, locations, code and input uploads."""
    target = resolve_target(settings, strict=strict)
    where = locations(settings, target)
    code = code_upload(settings, target, bundle or build_source_bundle())
    source, uploads = input_source(settings, target, input_uri, default)
    return target, where, code, source, uploads


def _folder(uri: str) -> str:
    """The S3 folder holding ``uri`` (Processing inputs take folders)."""
    return uri.rsplit("/", 1)[0] + "/"


def plan_features(
    settings: Settings,
    *,
    job_name: str,
    input_uri: str | None = None,
    output_uri: str | None = None,
    strict: bool = False,
    bundle: SourceBundle | None = None,
) -> JobPlan:
    """The features Processing job.

    Local input and a local ``label_windows`` file are uploaded under ``uploads/``.
    """
    target, where, code, source, uploads = _prepare(
        settings, strict=strict, bundle=bundle, input_uri=input_uri, default="raw"
    )
    settings, windows = with_label_windows(settings, target)
    output = output_uri or where["features"]
    request = features_request(
        settings,
        target,
        job_name=check_job_name(job_name),
        code_uri=_folder(code.uri),
        input_uri=source,
        output_uri=output,
    )
    return _plan(
        "CreateProcessingJob", request, [code, *uploads, *windows], target, (output,)
    )


def plan_training(
    settings: Settings,
    *,
    job_name: str,
    input_uri: str | None = None,
    output_uri: str | None = None,
    strict: bool = False,
    bundle: SourceBundle | None = None,
) -> JobPlan:
    """The Training job; the model lands in ``<output>/<job>/output/model.tar.gz``."""
    target, where, code, source, uploads = _prepare(
        settings,
        strict=strict,
        bundle=bundle,
        input_uri=input_uri,
        default="features",
    )
    request = training_request(
        settings,
        target,
        job_name=check_job_name(job_name),
        code_uri=code.uri,
        features_uri=source,
        output_uri=output_uri or where["model"],
    )
    return _plan("CreateTrainingJob", request, [code, *uploads], target)


def plan_scoring(
    settings: Settings,
    *,
    job_name: str,
    model_uri: str,
    input_uri: str | None = None,
    output_uri: str | None = None,
    strict: bool = False,
    bundle: SourceBundle | None = None,
) -> JobPlan:
    """The batch-scoring Processing job for a ``model.tar.gz`` (or detector prefix)."""
    target, where, code, source, uploads = _prepare(
        settings,
        strict=strict,
        bundle=bundle,
        input_uri=input_uri,
        default="features",
    )
    output = output_uri or where["scores"]
    request = score_request(
        settings,
        target,
        job_name=check_job_name(job_name),
        code_uri=_folder(code.uri),
        features_uri=source,
        model_uri=s3_model_prefix(model_uri),
        output_uri=output,
    )
    return _plan("CreateProcessingJob", request, [code, *uploads], target, (output,))


def model_artifact_uri(settings: Settings, training_job_name: str) -> str:
    """Where a training job planned here leaves its model (no AWS call)."""
    target = resolve_target(settings, strict=False)
    model = locations(settings, target)["model"]
    return f"{model}{training_job_name}/output/{contract.MODEL_ARCHIVE}"
