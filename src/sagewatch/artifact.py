"""A fitted detector's folder: ``weights.pt`` and ``detector.json``.

``weights.pt`` holds tensors only and is loaded with ``weights_only=True``;
``detector.json`` holds everything else, readable by people: the format version,
the model's architecture and settings, scaler, threshold and alarm rule, the
feature names, the training summary, the library versions and the checksum of
``weights.pt``. The Isolation Forest is stored as its trees' arrays (see
:class:`~sagewatch.models.IsolationTrees`), so no kind needs pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sagewatch import __version__, storage
from sagewatch.config import ModelSettings
from sagewatch.errors import ArtifactError
from sagewatch.features import sensor_of
from sagewatch.models import IsolationTrees, Scaler
from sagewatch.networks import (
    CausalConvAutoencoder,
    ConvAutoencoder,
    DenseAutoencoder,
)

if TYPE_CHECKING:
    from sagewatch.detector import Detector

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
WEIGHTS = "weights.pt"
METADATA = "detector.json"


def save(
    detector: Detector, uri: str, extra: dict[str, Any] | None
) -> list[storage.FileInfo]:
    """Write ``weights.pt`` then ``detector.json`` (with ``extra`` entries) under
    the folder ``uri``."""
    buffer = io.BytesIO()
    torch.save(_state(detector.model_), buffer)
    weights = buffer.getvalue()
    scaler = detector.scaler_
    meta = {
        "format_version": FORMAT_VERSION,
        "sagewatch_version": __version__,
        "kind": detector.settings.detector,
        "architecture": _architecture(detector.model_),
        "context_rows": detector.context_rows,
        "feature_names": detector.feature_names_,
        "sensors": detector.sensors_,
        "scaler": {
            "center": scaler.center_.tolist(),
            "scale": scaler.scale_.tolist(),
            "entity_center": {k: v.tolist() for k, v in scaler.entity_center_.items()},
        },
        "threshold": {"value": detector.threshold_, **detector.threshold_rule_},
        "alarm": detector.alarm_rule_,
        "training": detector.training_,
        "reference_end": getattr(detector, "reference_end_", {}),
        "feature_window": getattr(detector, "feature_window_", 1),
        "model_settings": detector.settings.model_dump(mode="json"),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "versions": _versions(),
        **(extra or {}),
    }
    target = storage.join(uri, WEIGHTS)
    previous = _current(target)
    try:
        with storage.replacing(uri):
            infos = [storage.write_bytes(target, weights)]
            infos.append(storage.write_json(storage.join(uri, METADATA), meta))
    except Exception:
        _put_back(target, previous)
        raise
    log.info("saved %s detector to %s", detector.settings.detector, uri)
    return infos


def _current(weights_uri: str) -> bytes | None:
    """The weights at ``weights_uri`` now (None when there are none)."""
    try:
        return storage.read_bytes(weights_uri, record=False)
    except storage.NotFoundError:
        return None


def _put_back(weights_uri: str, previous: bytes | None) -> None:
    """Undo the weights half of a save that failed after replacing them, so the
    previous detector stays whole (its ``detector.json`` was not replaced)."""
    try:
        if _current(weights_uri) == previous:
            return  # the save failed before the weights were replaced
        if previous is None:
            storage.remove(weights_uri)
        else:
            storage.write_bytes(weights_uri, previous)
    except storage.StorageError as exc:
        log.error(
            "%s: could not put the previous weights back (%s); the folder holds the "
            "new weights and the previous %s, which `score` refuses by checksum: "
            "train again",
            weights_uri,
            exc,
            METADATA,
        )
    else:
        log.warning("%s not written; %s put back as it was", METADATA, weights_uri)


def load(build: Callable[[ModelSettings], Detector], uri: str) -> Detector:
    """The detector saved under the folder ``uri``, made by ``build`` from its
    settings and given the saved state.

    Raises:
        ArtifactError: missing files, a checksum mismatch, or an unknown format.
    """
    meta = _read_metadata(uri)
    try:
        weights = storage.read_bytes(storage.join(uri, WEIGHTS))
    except storage.NotFoundError as exc:
        raise ArtifactError(f"{uri}: no {WEIGHTS} next to {METADATA}") from exc
    if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
        raise ArtifactError(
            f"{uri}/{WEIGHTS}: checksum differs from detector.json; "
            "the file is damaged or was replaced"
        )
    try:
        state = torch.load(io.BytesIO(weights), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for a bad file
        raise ArtifactError(f"{uri}/{WEIGHTS}: cannot load weights: {exc}") from exc
    try:
        detector = build(ModelSettings.model_validate(meta["model_settings"]))
        _restore(detector, meta, state)
        _check_restored(detector)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(
            f"{uri}: detector.json and weights do not fit together: {exc}"
        ) from exc
    detector.metadata_ = meta
    log.info("loaded %s detector from %s", meta["kind"], uri)
    return detector


def _state(model: Any) -> dict[str, torch.Tensor]:
    """The model's tensors: each member's state under ``member<i>.``, or the
    arrays of PCA or the forest."""
    if isinstance(model, list):
        return {
            f"member{i}.{k}": v
            for i, member in enumerate(model)
            for k, v in member.state_dict().items()
        }
    arrays = model.arrays if isinstance(model, IsolationTrees) else model
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _architecture(model: Any) -> dict[str, Any]:
    if isinstance(model, list):
        return {**model[0].arguments(), "members": len(model)}
    if isinstance(model, IsolationTrees):
        return {
            "n_trees": int(model.arrays["feature"].shape[0]),
            "path_length_normaliser": model.normaliser,
        }
    return {"n_components": int(model["components"].shape[0])}


def _restore(
    detector: Detector, meta: dict[str, Any], state: dict[str, torch.Tensor]
) -> None:
    detector.feature_names_ = list(meta["feature_names"])
    detector.sensors_ = list(meta["sensors"])
    detector.scaler_ = _restore_scaler(meta["scaler"])
    detector.threshold_ = float(meta["threshold"]["value"])
    detector.threshold_rule_ = {
        k: v for k, v in meta["threshold"].items() if k != "value"
    }
    detector.alarm_rule_ = dict(meta["alarm"])
    detector.training_ = meta.get("training", {})
    detector.reference_end_ = dict(meta.get("reference_end", {}))
    detector.feature_window_ = int(meta.get("feature_window", 1))
    arch = dict(meta["architecture"])
    arrays = {k: v.numpy() for k, v in state.items()}
    if meta["kind"] == "autoencoder":
        if arch.get("type") != detector.settings.architecture:
            raise ValueError(
                f"architecture type {arch.get('type')!r} differs from "
                f"model_settings.architecture {detector.settings.architecture!r}"
            )
        members = arch.pop("members")
        detector.model_ = [
            _restore_member(arch, state, f"member{i}.") for i in range(members)
        ]
    elif meta["kind"] == "iforest":
        detector.model_ = IsolationTrees(arrays, float(arch["path_length_normaliser"]))
    else:
        detector.model_ = arrays


def _restore_scaler(saved: dict[str, Any]) -> Scaler:
    scaler = Scaler(per_entity=bool(saved["entity_center"]))
    scaler.center_ = np.asarray(saved["center"], dtype=np.float64)
    scaler.scale_ = np.asarray(saved["scale"], dtype=np.float64)
    scaler.entity_center_ = {
        k: np.asarray(v, dtype=np.float64) for k, v in saved["entity_center"].items()
    }
    return scaler


def _restore_member(
    arch: dict[str, Any], state: dict[str, torch.Tensor], prefix: str
) -> nn.Module:
    arch = dict(arch)  # the members share one description: keep it whole
    kind = arch.pop("type", None)
    classes = {
        "dense": DenseAutoencoder,
        "window": ConvAutoencoder,
        "causal": CausalConvAutoencoder,
    }
    if kind not in classes:
        raise ValueError(
            f"architecture type {kind!r}; expected one of {sorted(classes)}"
        )
    model = classes[kind](**arch)
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(own)
    return model.eval()


def _check_restored(detector: Detector) -> None:
    """Shapes and values that ``detector.json`` must agree on; ValueError if not."""
    names = detector.feature_names_
    if len(set(names)) != len(names) or not names:
        raise ValueError("feature_names must be a non-empty list of unique names")
    for part in ("center_", "scale_"):
        value = getattr(detector.scaler_, part)
        if value.shape != (len(names),) or not np.isfinite(value).all():
            raise ValueError(
                f"scaler {part.rstrip('_')} has shape {value.shape}; expected "
                f"({len(names)},) finite values"
            )
    if not (detector.scaler_.scale_ > 0).all():
        raise ValueError("scaler scale must be positive")
    if not np.isfinite(detector.threshold_):
        raise ValueError(f"threshold {detector.threshold_} is not finite")
    if set(detector.sensors_) != {sensor_of(f) for f in names}:
        raise ValueError("sensors do not match feature_names")
    model = detector.model_
    width = None
    if isinstance(model, list) and model:
        width = model[0].n_features
    if isinstance(model, dict) and "components" in model:
        width = model["components"].shape[1]
    if width is not None and width != len(names):
        raise ValueError(
            f"the model takes {width} features, feature_names has {len(names)}"
        )


def _read_metadata(uri: str) -> dict[str, Any]:
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, METADATA)))
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{uri}/{METADATA}: not valid JSON ({exc}); the file is damaged"
        ) from exc
    except storage.NotFoundError as exc:
        raise ArtifactError(
            f"{uri}: no {METADATA}; is this a detector folder?"
        ) from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        writer = meta.get("sagewatch_version") if isinstance(meta, dict) else "?"
        raise ArtifactError(
            f"{uri}/{METADATA}: artifact format {version!r}, this sagewatch "
            f"{__version__} reads format {FORMAT_VERSION}; retrain or use the version "
            f"that wrote it ({writer})"
        )
    if meta.get("sagewatch_version") != __version__:
        log.warning(
            "%s was written by sagewatch %s, this is %s; the format is the same",
            uri,
            meta.get("sagewatch_version"),
            __version__,
        )
    return meta


def _versions() -> dict[str, str]:
    import polars

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "polars": polars.__version__,
    }
