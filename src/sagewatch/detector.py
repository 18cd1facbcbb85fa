"""A fitted anomaly detector: scaler, model and threshold as one object.

The detector follows scikit-learn's habits: ``__init__`` stores arguments, ``fit``
learns the attributes with a trailing underscore, and scoring before ``fit`` raises
:class:`NotFittedError`. Three models share one interface: an autoencoder (the
default), PCA reconstruction and Isolation Forest. Scores are per row; the
attribution splits each row's reconstruction error over the raw sensors.

An artifact is a folder with ``weights.pt`` (tensors only, loaded with
``weights_only=True``) and ``detector.json`` (everything else, readable by people).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sagewatch import __version__, storage
from sagewatch.config import ModelSettings
from sagewatch.errors import ArtifactError, NotFittedError, SchemaMismatchError
from sagewatch.features import SEPARATOR, sensor_of, sensors_of

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "weights.pt"
METADATA = "detector.json"
# Scaled inputs are clipped here so absurd readings give large, finite scores.
_CLIP = 1e3


class Scaler:
    """Standardise features with statistics of the reference period.

    Notes:
        A feature that was (nearly) constant in the reference period would get a
        tiny standard deviation, and any later change would score astronomically.
        The scale is therefore floored at ``rel_floor`` times the feature's typical
        magnitude (and at ``abs_floor``), so a constant 96.0 that turns into 93.0
        scores about 31, not 3e8. The spread, slope and change rate of a constant
        sensor are all exactly 0, so they have no magnitude of their own: when
        ``groups`` names each feature's sensor, a feature whose spread is zero to
        within rounding (at most ``1e-6`` of its sensor's level) is floored at
        ``rel_floor`` times that level instead. A sensor that was exactly 0.0
        throughout the reference period keeps ``abs_floor``; any later reading away
        from 0 is clipped at ``_CLIP`` standard units.
    """

    def __init__(self, *, rel_floor: float = 1e-3, abs_floor: float = 1e-6) -> None:
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor

    def fit(self, x: np.ndarray, groups: Sequence[int] | None = None) -> Scaler:
        """Learn centre and scale; ``groups[j]`` is the sensor of feature ``j``."""
        self.center_ = x.mean(axis=0)
        spread = x.std(axis=0)
        magnitude = np.abs(x).mean(axis=0)
        floor = np.maximum(self.rel_floor * magnitude, self.abs_floor)
        if groups is not None:
            ids = np.asarray(groups)
            level = np.zeros(ids.max() + 1)
            np.maximum.at(level, ids, magnitude)
            degenerate = spread <= 1e-6 * level[ids]
            floor = np.where(
                degenerate, np.maximum(floor, self.rel_floor * level[ids]), floor
            )
        self.scale_ = np.maximum(spread, floor)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "scale_"):
            raise NotFittedError("Scaler is not fitted; call fit first")
        z = (x - self.center_) / self.scale_
        return np.clip(z, -_CLIP, _CLIP).astype(np.float32)


class Autoencoder(nn.Module):
    """A fully connected autoencoder: features -> hidden -> code -> back again."""

    def __init__(
        self, n_features: int, hidden_dims: Sequence[int], encoding_dim: int
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_dims = list(hidden_dims)
        self.encoding_dim = encoding_dim
        sizes = [n_features, *hidden_dims, encoding_dim]
        self.encoder = _mlp(sizes)
        self.decoder = _mlp(sizes[::-1], last_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, features)
        return self.decoder(self.encoder(x))  # (batch, features)


def _mlp(sizes: Sequence[int], *, last_activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Detector:
    """Scaler + model + threshold, fitted on the reference period only."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        x_train: np.ndarray,
        x_val: np.ndarray,
        feature_names: Sequence[str],
        *,
        progress: bool = False,
    ) -> Detector:
        """Learn the scaler and model on ``x_train``, the threshold on ``x_val``.

        ``x_val`` is the held-out tail of the reference period; when it is empty the
        threshold comes from the training rows themselves (recorded as such).
        """
        from sagewatch.training import fit_autoencoder

        if x_train.shape[0] < 2:
            raise ValueError(
                f"need at least 2 reference rows to fit, got {x_train.shape[0]}"
            )
        self.feature_names_ = list(feature_names)
        self.sensors_ = list(dict.fromkeys(sensor_of(f) for f in feature_names))
        groups = [self.sensors_.index(sensor_of(f)) for f in feature_names]
        self.scaler_ = Scaler().fit(x_train, groups)
        z_train = self.scaler_.transform(x_train)
        z_val = self.scaler_.transform(x_val) if len(x_val) else z_train[:0]
        kind = self.settings.detector
        if kind == "autoencoder":
            self.model_, self.training_ = fit_autoencoder(
                z_train, z_val, self.settings, progress=progress
            )
        elif kind == "pca":
            self.model_, self.training_ = _fit_pca(z_train, self.settings)
        else:
            raise NotImplementedError(
                f"detector {kind!r} is not implemented by Detector.fit"
            )
        self.threshold_, self.threshold_rule_ = self._choose_threshold(z_train, z_val)
        return self

    def _choose_threshold(
        self, z_train: np.ndarray, z_val: np.ndarray
    ) -> tuple[float, dict[str, Any]]:
        source = "validation" if len(z_val) else "training"
        scores = self._scores_scaled(z_val if len(z_val) else z_train)
        q = self.settings.threshold_quantile
        value = float(np.quantile(scores, q)) * self.settings.threshold_margin
        rule = {
            "rule": "quantile",
            "quantile": q,
            "margin": self.settings.threshold_margin,
            "computed_on": f"{source} rows of the reference period",
            "n_rows": len(scores),
        }
        log.info(
            "threshold %.6g: quantile %.4g x %.3g of %d %s scores",
            value,
            q,
            rule["margin"],
            len(scores),
            source,
        )
        return value, rule

    # ------------------------------------------------------------------ scoring

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "Detector is not fitted; call fit or load a saved detector"
            )

    def errors(self, x: np.ndarray) -> np.ndarray:
        """Squared reconstruction error per feature, scaled units. (rows, features)"""
        self._check_fitted()
        return self._errors_scaled(self.scaler_.transform(x))

    def _errors_scaled(self, z: np.ndarray) -> np.ndarray:
        if isinstance(self.model_, Autoencoder):
            with torch.no_grad():
                recon = self.model_(torch.from_numpy(z)).numpy()
        else:
            mean, components = self.model_["mean"], self.model_["components"]
            recon = (z - mean) @ components.T @ components + mean
        return np.square(z - recon, dtype=np.float64)

    def _scores_scaled(self, z: np.ndarray) -> np.ndarray:
        return self._errors_scaled(z).mean(axis=1)

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """Anomaly score per row: mean squared reconstruction error. (rows,)"""
        return self.errors(x).mean(axis=1)

    def attribution(self, errors: np.ndarray) -> np.ndarray:
        """Each sensor's share of a row's error, from :meth:`errors`. (rows, sensors)"""
        groups = np.array(
            [self.sensors_.index(sensor_of(f)) for f in self.feature_names_]
        )
        per_sensor = np.zeros((errors.shape[0], len(self.sensors_)))
        np.add.at(per_sensor.T, groups, errors.T)
        total = per_sensor.sum(axis=1, keepdims=True)
        return np.divide(
            per_sensor, total, out=np.zeros_like(per_sensor), where=total > 0
        )

    def check_columns(self, columns: Sequence[str], source: str) -> None:
        """Refuse a features table whose sensors or features differ from the model's."""
        self._check_fitted()
        missing = [f for f in self.feature_names_ if f not in columns]
        statistics = {f.rsplit(SEPARATOR, 1)[1] for f in self.feature_names_}
        features = [c for c in columns if c.rsplit(SEPARATOR, 1)[-1] in statistics]
        extra = [s for s in sensors_of(features) if s not in self.sensors_]
        if extra:
            raise SchemaMismatchError(
                f"{source}: sensor(s) {extra} are not among the model's sensors "
                f"{self.sensors_}; expected the sensors it was trained on"
            )
        if missing:
            absent = sorted({sensor_of(f) for f in missing})
            raise SchemaMismatchError(
                f"{source}: the model needs sensor(s) {absent} (features {missing[:6]}"
                f"{'...' if len(missing) > 6 else ''}), which the data lacks"
            )

    # ------------------------------------------------------------------ artifact

    def save(
        self, uri: str, *, extra: dict[str, Any] | None = None
    ) -> list[storage.FileInfo]:
        """Write ``weights.pt`` then ``detector.json`` under the folder ``uri``."""
        self._check_fitted()
        buffer = io.BytesIO()
        torch.save(self._state(), buffer)
        weights = buffer.getvalue()
        meta = {
            "format_version": FORMAT_VERSION,
            "sagewatch_version": __version__,
            "kind": self.settings.detector,
            "architecture": self._architecture(),
            "feature_names": self.feature_names_,
            "sensors": self.sensors_,
            "scaler": {
                "center": self.scaler_.center_.tolist(),
                "scale": self.scaler_.scale_.tolist(),
            },
            "threshold": {"value": self.threshold_, **self.threshold_rule_},
            "training": self.training_,
            "reference_end": getattr(self, "reference_end_", {}),
            "model_settings": self.settings.model_dump(mode="json"),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "versions": _versions(),
            **(extra or {}),
        }
        infos = [storage.write_bytes(storage.join(uri, WEIGHTS), weights)]
        infos.append(storage.write_json(storage.join(uri, METADATA), meta))
        log.info("saved %s detector to %s", self.settings.detector, uri)
        return infos

    def _state(self) -> dict[str, torch.Tensor]:
        if isinstance(self.model_, Autoencoder):
            return self.model_.state_dict()
        return {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.model_.items()
        }

    def _architecture(self) -> dict[str, Any]:
        if isinstance(self.model_, Autoencoder):
            return {
                "n_features": self.model_.n_features,
                "hidden_dims": self.model_.hidden_dims,
                "encoding_dim": self.model_.encoding_dim,
            }
        return {"n_components": int(self.model_["components"].shape[0])}

    @classmethod
    def load(cls, uri: str) -> Detector:
        """Load an artifact folder written by :meth:`save`.

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
            state = torch.load(
                io.BytesIO(weights), weights_only=True, map_location="cpu"
            )
        except Exception as exc:  # torch raises many types for a bad file
            raise ArtifactError(f"{uri}/{WEIGHTS}: cannot load weights: {exc}") from exc
        try:
            detector = cls(ModelSettings.model_validate(meta["model_settings"]))
            detector._restore(meta, state)
            _check_restored(detector)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise ArtifactError(
                f"{uri}: detector.json and weights do not fit together: {exc}"
            ) from exc
        detector.metadata_ = meta
        log.info("loaded %s detector from %s", meta["kind"], uri)
        return detector

    def _restore(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.feature_names_ = list(meta["feature_names"])
        self.sensors_ = list(meta["sensors"])
        self.scaler_ = Scaler()
        self.scaler_.center_ = np.asarray(meta["scaler"]["center"], dtype=np.float64)
        self.scaler_.scale_ = np.asarray(meta["scaler"]["scale"], dtype=np.float64)
        self.threshold_ = float(meta["threshold"]["value"])
        self.threshold_rule_ = {
            k: v for k, v in meta["threshold"].items() if k != "value"
        }
        self.training_ = meta.get("training", {})
        self.reference_end_ = dict(meta.get("reference_end", {}))
        arch = meta["architecture"]
        if meta["kind"] == "autoencoder":
            model = Autoencoder(
                arch["n_features"], arch["hidden_dims"], arch["encoding_dim"]
            )
            model.load_state_dict(state)
            self.model_ = model.eval()
        else:
            self.model_ = {k: v.numpy() for k, v in state.items()}


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
    width = model.n_features if isinstance(model, Autoencoder) else None
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


def _fit_pca(
    z: np.ndarray, settings: ModelSettings
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Principal components that keep 95 % of the reference variance (float32)."""
    mean = z.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    explained = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-12)
    k = int(min(np.searchsorted(explained, 0.95) + 1, vt.shape[0]))
    model = {"mean": mean.astype(np.float32), "components": vt[:k].astype(np.float32)}
    return model, {
        "n_components": k,
        "explained_variance": float(explained[k - 1]),
        "n_train": len(z),
    }


def _versions() -> dict[str, str]:
    import polars

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "polars": polars.__version__,
    }
