"""What each stage read, wrote and dropped, and the manifest a run leaves behind.

A :class:`StageRecord` describes one stage; :func:`write_manifest` writes the records
of a run, with the configuration and its hash, as ``run_manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sagewatch import __version__, storage
from sagewatch.config import Settings
from sagewatch.errors import StorageError

log = logging.getLogger(__name__)

MANIFEST = "run_manifest.json"


@dataclass
class StageRecord:
    """What one stage read, wrote, dropped and how long it took."""

    name: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int | None = None
    rows_out: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Timer:
    """Seconds spent inside a ``with`` block, rounded to the millisecond."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)


def remove_previous(manifest_uri: str) -> None:
    """Delete an earlier run's manifest: it vouches for a whole run, so a run that
    fails part-way leaves none rather than one that no longer matches the folders.

    A store that cannot be reached or written is left for the first stage to
    report, with what it was writing.
    """
    try:
        if storage.exists(manifest_uri):
            log.info("removing the previous run's %s", manifest_uri)
            storage.remove(manifest_uri)
    except StorageError as exc:
        log.debug("previous manifest not removed: %s", exc)


def write_manifest(
    uri: str,
    settings: Settings,
    stages: list[StageRecord],
    *,
    started: datetime,
    extra: dict[str, Any] | None = None,
) -> storage.FileInfo:
    """Record what every stage read and wrote, with fingerprints and the config."""
    manifest = {
        "sagewatch_version": __version__,
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "python": platform.python_version(),
        "config": settings.model_dump(mode="json"),
        "config_sha256": hashlib.sha256(
            json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest(),
        "stages": [asdict(s) for s in stages],
        **(extra or {}),
    }
    return storage.write_json(uri, manifest)


def store_info(*uris: str) -> dict[str, str]:
    """The S3 endpoint, when any URI is on S3 (``s3://`` names no endpoint)."""
    return {"s3_endpoint": storage.endpoint()} if any(map(storage.is_s3, uris)) else {}


def as_dicts(files: list[storage.FileInfo]) -> list[dict[str, Any]]:
    return [f.as_dict() for f in files]


def without_history(summary: dict[str, Any]) -> dict[str, Any]:
    """A training summary without per-epoch losses (those stay in detector.json)."""
    out = {k: v for k, v in summary.items() if k != "history"}
    if "members" in out:
        out["members"] = [without_history(m) for m in out["members"]]
    return out


def describe_inputs(uri: str) -> list[dict[str, Any]]:
    """Size and SHA-256 of input files this process did not read itself.

    The files are streamed through the hash, never parsed; their row counts are
    not known here and stay empty.
    """
    return [storage.file_info(f).as_dict() for f in storage.list_files(uri)]


def handed_over(record: StageRecord, *previous: StageRecord) -> None:
    """Record the outputs of earlier stages, passed in memory, as ``record``'s inputs.

    The in-memory table is the one those files were written from, so their URIs,
    sizes and fingerprints describe it without reading anything back.
    """
    if not record.inputs:
        record.inputs = [o for p in previous for o in p.outputs]
