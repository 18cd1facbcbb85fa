"""A fitted anomaly detector: scaler, model, threshold and alarm rule as one object.

The detector follows scikit-learn's habits: ``__init__`` stores arguments, ``fit``
learns the attributes with a trailing underscore, and scoring before ``fit`` raises
:class:`NotFittedError`. Three models share one interface:

* ``autoencoder`` (default; an ensemble over seeds when asked), in one of three
  architectures: ``dense`` (default) reconstructs each feature row on its own and
  a row's score is the mean squared error of the last ``score_window`` rows;
  ``window`` reconstructs the ``sequence_length`` rows ending at each row;
  ``causal`` reconstructs each row from it and the rows before it in one pass
  per series.
* ``pca``: squared error of the reconstruction from the principal components.
* ``iforest``: Isolation Forest score.

Each row gets an anomaly score and per-feature contributions (squared
reconstruction errors; for Isolation Forest, which reconstructs nothing, the squared
scaled deviation from the entity's reference centre), which the attribution sums per
sensor. Rows come in blocks of one or more entities, each entity's rows in time
order; a row's score and alarm use up to :attr:`Detector.context_rows` earlier rows
of its entity, so a caller that cuts an entity into blocks passes that many rows
before each block.

An artifact is a folder with ``weights.pt`` (tensors only, loaded with
``weights_only=True``) and ``detector.json`` (everything else, readable by people).
The Isolation Forest is stored as its trees' arrays (see
:class:`~sagewatch.models.IsolationTrees`), so no kind needs pickle.

Notes:
    The autoencoder runs over each entity's rows in tiles of :data:`TILE_ROWS`
    rows, each with the receptive field before it, aligned on the row number
    within the entity; tiles go through the network in batches of a fixed size.
    A row is therefore always computed in the same place of the same-shaped
    tensor, and its score does not depend on where a block or chunk starts (the
    caller passes the row numbers).

    Isolation Forest splits on one feature at a time within the reference
    range: a reading beyond the range of one sensor is isolated no faster than
    the most extreme reference row, and with many features few splits look at
    the one that moved. Entity centring needs the same entity
    names at scoring as in training; an unknown entity is measured from the
    pooled reference centre.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import platform
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sagewatch import __version__, storage
from sagewatch.config import ModelSettings
from sagewatch.errors import ArtifactError, NotFittedError, SchemaMismatchError
from sagewatch.features import SEPARATOR, sensor_of, sensors_of
from sagewatch.models import (
    CausalConvAutoencoder,
    ConvAutoencoder,
    DenseAutoencoder,
    IsolationTrees,
    Scaler,
    dense_forward,
    entity_runs,
    fit_pca,
    pca_reconstruct,
    row_positions,
    trailing_mean,
    window_index,
)
from sagewatch.thresholds import alarms, pot_threshold, quantile_threshold

if TYPE_CHECKING:
    from sagewatch.reference import Reference
    from sagewatch.sampling import Sample

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
WEIGHTS = "weights.pt"
METADATA = "detector.json"
# Rows go through PCA and the window autoencoder in blocks of exactly this many
# (zero-padded), so a row's score does not depend on how the rows were cut into
# blocks; the dense autoencoder takes larger blocks of _DENSE_BATCH rows.
_FORWARD_BATCH = 512
_DENSE_BATCH = 8192
# The autoencoder scores rows in tiles of TILE_ROWS rows aligned on the row number
# within the entity, _TILE_BATCH tiles (zero-padded) per network call.
TILE_ROWS = 256
_TILE_BATCH = 32
# Calibration rows scored per pass when the threshold is learnt.
_CALIBRATION_BATCH = 65_536


@contextlib.contextmanager
def compute_threads(threads: int | None) -> Iterator[None]:
    """Run torch and numpy's BLAS with ``threads`` threads, then restore both."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


class Detector:
    """Scaler + model + threshold + alarm rule, fitted on the reference period."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    @property
    def receptive_field(self) -> int:
        """Earlier rows of the same entity that a row's score depends on."""
        s = self.settings
        if s.detector != "autoencoder":
            return 0
        if s.architecture == "window":
            return s.sequence_length - 1
        return self.network_context + s.score_window - 1

    @property
    def hidden_dims(self) -> list[int]:
        """The autoencoder's hidden layer widths: the setting, else the default.

        The dense default is one layer of three quarters of the features; the
        convolutional ones default to 32 channels.
        """
        s = self.settings
        if s.hidden_dims is not None:
            return list(s.hidden_dims)
        if s.architecture == "dense":
            return [max(1, round(0.75 * len(self.feature_names_)))]
        return [32]

    @property
    def _causal(self) -> bool:
        s = self.settings
        return s.detector == "autoencoder" and s.architecture == "causal"

    @property
    def network_context(self) -> int:
        """Earlier rows that the autoencoder's reconstruction of a row sees."""
        s = self.settings
        if s.detector != "autoencoder" or s.architecture == "dense":
            return 0
        if s.architecture == "window":
            return s.sequence_length - 1
        layers = len(s.hidden_dims or [32])
        return 2 * sum((s.kernel_size - 1) * 2**i for i in range(layers))

    @property
    def context_rows(self) -> int:
        """Earlier rows of its entity to pass before a block so its scores are exact.

        The receptive field and the alarm window, plus for the autoencoder the rows
        back to the start of the row's tile.
        """
        s = self.settings
        tile = TILE_ROWS - 1 if self._causal else 0
        return self.receptive_field + tile + s.alarm_window - 1

    @property
    def warmup_rows(self) -> int:
        """First rows of an entity whose features or sequence are still incomplete.

        They are scored but never flagged: a rolling window of fewer rows than
        ``rolling_window`` (or a sequence padded at the entity's start) looks
        unusual for reasons that have nothing to do with the machine.
        """
        s = self.settings
        feature_window = getattr(self, "feature_window_", 1)
        return feature_window - 1 + self.receptive_field + s.alarm_window - 1

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        x: np.ndarray,
        entity: np.ndarray,
        feature_names: Sequence[str],
        *,
        validation: np.ndarray | None = None,
        progress: bool = False,
    ) -> Detector:
        """Learn scaler and model from reference rows, the threshold from held-out ones.

        ``x`` (rows, features) holds the reference rows grouped by ``entity`` in time
        order; ``validation`` marks the held-out rows (the tail of each entity's
        reference). With no held-out rows the threshold comes from the training rows
        themselves, and detector.json says so. See :meth:`fit_reference`.

        Raises:
            ValueError: fewer than 2 training rows, or held-out rows that are not
                the tail of their entity's rows.
        """
        from sagewatch.reference import ArrayReference

        entity = _names(entity)
        held = np.zeros(len(x), bool) if validation is None else validation
        if np.sum(~held) < 2:
            raise ValueError(f"need at least 2 reference rows to fit, got {len(x)}")
        reference = ArrayReference(x, entity, np.asarray(held, dtype=bool))
        return self.fit_reference(reference, feature_names, progress=progress)

    def fit_reference(
        self,
        reference: Reference,
        feature_names: Sequence[str],
        *,
        progress: bool = False,
    ) -> Detector:
        """Fit on reference rows read block by block (two passes).

        The scaler learns from every training row; the model from a seeded
        sample of them and the threshold from a seeded sample of the held-out
        rows (see :func:`~sagewatch.sampling.plan_sample`); only the sampled
        rows are kept in memory, scaled. ``training_["sample"]`` records how
        many rows went to what.

        Raises:
            ValueError: fewer than 2 training rows.
        """
        from sagewatch.reference import gather
        from sagewatch.sampling import plan_sample

        layout = reference.layout
        if layout.train.sum() < 2:
            raise ValueError(
                f"need at least 2 reference rows to fit, got {int(layout.rows.sum())}"
            )
        self.feature_names_ = list(feature_names)
        self.sensors_ = list(dict.fromkeys(sensor_of(f) for f in feature_names))
        groups = [self.sensors_.index(sensor_of(f)) for f in feature_names]
        self.scaler_ = Scaler(per_entity=self.settings.center_per_entity)
        for block in reference.blocks():
            train = block.x[: max(int(layout.train[block.run]) - block.start, 0)]
            if len(train):
                self.scaler_.partial_fit(train, layout.names[block.run], groups)
        sample = plan_sample(layout, self.settings, **self._sample_shape())
        z = gather(reference, sample.rows, self.scaler_)  # (rows kept, features)
        with compute_threads(self.settings.threads):
            self.model_, self.training_ = self._fit_model(z, sample, progress)
            calibration = self._calibration_scores(z, sample)
        self.training_["sample"] = sample.sizes
        source = "held-out" if layout.held.any() else "training"
        self.threshold_, self.threshold_rule_ = self._threshold(calibration, source)
        self.alarm_rule_ = {
            "rule": "min_rows_of_window",
            "min_rows": self.settings.alarm_min_rows,
            "window": self.settings.alarm_window,
        }
        log.info(
            "fitted on %d reference rows of %d entities: %d training %s of %d, "
            "%d validation of %d, threshold from %d of %d rows; %d rows read into "
            "memory",
            int(layout.rows.sum()),
            len(layout.names),
            sample.sizes["training"]["used"],
            "rows" if self.settings.detector != "autoencoder" else "sequences",
            sample.sizes["training"]["of"],
            sample.sizes["validation"]["used"],
            sample.sizes["validation"]["of"],
            sample.sizes["calibration"]["used"],
            sample.sizes["calibration"]["of"],
            len(sample.rows),
        )
        return self

    def _sample_shape(self) -> dict[str, Any]:
        """What :func:`~sagewatch.sampling.plan_sample` needs from this model."""
        s = self.settings
        shape = {"context": self.context_rows, "length": 1, "stride": 1}
        if s.detector != "autoencoder":
            return {**shape, "validation": False}
        causal = self._causal
        if s.architecture != "dense":
            shape["length"] = (
                self.network_context if causal else 0
            ) + s.sequence_length
        return {
            **shape,
            "stride": s.sequence_stride,
            "validation_stride": s.sequence_length if causal else 1,
        }

    def _fit_model(
        self, z: np.ndarray, sample: Sample, progress: bool
    ) -> tuple[Any, dict[str, Any]]:
        s = self.settings
        if s.detector in ("pca", "iforest"):
            train = z[sample.train[:, -1]]  # (rows, features)
        if s.detector == "pca":
            model, k = fit_pca(train, s.pca_variance)
            return model, {"n_components": k, "n_train": len(train)}
        if s.detector == "iforest":
            trees = IsolationTrees.fit(
                train,
                n_trees=s.iforest_trees,
                max_samples=s.iforest_max_samples,
                seed=s.seed,
            )
            return trees, {"n_trees": s.iforest_trees, "n_train": len(train)}
        from sagewatch.training import fit_autoencoder

        causal = self._causal
        dense = s.architecture == "dense"
        context = self.network_context if causal else 0
        hidden = self.hidden_dims
        width = z.shape[1]
        code = s.encoding_dim or _default_code(s.architecture, width, self.sensors_)
        if causal and code >= len(self.sensors_):
            log.warning(
                "encoding_dim=%d is not below the number of sensors (%d): the causal "
                "autoencoder can pass each row through its code and will miss "
                "anomalies; use fewer code channels",
                code,
                len(self.sensors_),
            )

        def build() -> nn.Module:
            if dense:
                return DenseAutoencoder(z.shape[1], hidden, code)
            if causal:
                return CausalConvAutoencoder(z.shape[1], hidden, code, s.kernel_size)
            return ConvAutoencoder(
                z.shape[1], s.sequence_length, hidden, code, s.kernel_size
            )

        members, summaries = [], []
        for member in range(s.ensemble_size):
            model, summary = fit_autoencoder(
                build,
                z,
                sample.train,
                sample.validation,
                s,
                context=context,
                seed=s.seed + member,
                progress=progress,
            )
            members.append(model)
            summaries.append(summary)
        return members, {
            "members": summaries,
            "n_train": len(sample.train),
            "encoding_dim": code,
        }

    def _calibration_scores(self, z: np.ndarray, sample: Sample) -> np.ndarray:
        """Scores of the calibration rows (held-out rows, all rows when none is
        held out, or a sample of either), each scored after its context rows.

        The rows go through in batches of :data:`_CALIBRATION_BATCH`, each after
        the :attr:`context_rows` rows before it, so memory does not grow with
        ``max_calibration_rows`` and every row scores as in one pass.
        """
        total = len(sample.scored)
        scores = np.empty(total)
        context = self.context_rows
        for start in range(0, total, _CALIBRATION_BATCH):
            lead = min(start, context)
            rows = slice(start - lead, min(start + _CALIBRATION_BATCH, total))
            part, _ = self._score_scaled(
                z[sample.scored[rows]], sample.segment[rows], sample.position[rows]
            )
            scores[start : rows.stop] = part[lead:]
        return scores[sample.calibration]

    def _threshold(
        self, scores: np.ndarray, source: str
    ) -> tuple[float, dict[str, Any]]:
        s = self.settings
        rule: dict[str, Any] = {
            "rule": s.threshold_rule,
            "margin": s.threshold_margin,
            "computed_on": f"{source} rows of the reference period",
            "n_rows": len(scores),
        }
        if s.threshold_rule == "pot":
            value, fit = pot_threshold(
                scores, risk=s.threshold_risk, initial_quantile=1 - s.threshold_tail
            )
            rule.update(risk=s.threshold_risk, tail=s.threshold_tail, fit=fit)
        else:
            value = quantile_threshold(scores, s.threshold_quantile)
            rule["quantile"] = s.threshold_quantile
        value *= s.threshold_margin
        log.info(
            "threshold %.6g (%s rule x %.3g) from %d %s scores",
            value,
            s.threshold_rule,
            s.threshold_margin,
            len(scores),
            source,
        )
        return float(value), rule

    # ------------------------------------------------------------------ scoring

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "Detector is not fitted; call fit or load a saved detector"
            )

    def score_rows(
        self, x: np.ndarray, entity: np.ndarray, position: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly score (rows,) and per-sensor contributions (rows, sensors).

        A sensor's contribution is the sum over its features of their part of the
        score (squared reconstruction errors; see the module docstring).

        ``position`` gives each row's number within its entity (default: the rows
        of each entity here are its first ones). A row's score is exact when the
        :attr:`context_rows` rows of its entity before it are passed too.
        """
        self._check_fitted()
        entity = _names(entity)
        position = row_positions(entity) if position is None else np.asarray(position)
        z = self.scaler_.transform(x, entity)
        with compute_threads(self.settings.threads):
            return self._score_scaled(z, entity, position)

    def _score_scaled(
        self, z: np.ndarray, entity: np.ndarray, position: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.model_, IsolationTrees):
            return self.model_.score(z), self._per_sensor(
                np.square(z, dtype=np.float64)
            )
        if isinstance(self.model_, dict):
            errors = np.empty(z.shape, dtype=np.float64)
            block = np.zeros((_FORWARD_BATCH, z.shape[1]), dtype=z.dtype)
            for start in range(0, len(z), _FORWARD_BATCH):
                # fixed-size blocks: matrix products round alike wherever a block starts
                rows = z[start : start + _FORWARD_BATCH]
                block[: len(rows)] = rows
                recon = pca_reconstruct(self.model_, block)[: len(rows)]
                errors[start : start + len(rows)] = np.square(rows - recon)
            return errors.mean(axis=1), self._per_sensor(errors)
        if self.settings.architecture == "dense":
            return self._dense_scores(z, entity)
        if self._causal:
            errors = self._row_errors(z, entity, position)
        else:
            errors = self._sequence_errors(z, entity)
        return errors.mean(axis=1), self._per_sensor(errors)

    def _per_sensor(self, values: np.ndarray) -> np.ndarray:
        """Per-feature values summed per sensor. (rows, features) -> (rows, sensors)"""
        groups = [self.sensors_.index(sensor_of(f)) for f in self.feature_names_]
        if groups == sorted(groups):  # sensor by sensor, as the features stage writes
            starts = np.flatnonzero(np.diff(np.r_[-1, groups]))
            return np.add.reduceat(values, starts, axis=1)
        out = np.zeros((values.shape[0], len(self.sensors_)))
        for column, sensor in enumerate(groups):
            out[:, sensor] += values[:, column]
        return out

    def _dense_scores(
        self, z: np.ndarray, entity: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean squared error of each row and its per-sensor sums, averaged over the
        members and over the ``score_window`` rows ending at the row.

        The network runs in numpy (see :func:`~sagewatch.models.dense_forward`), on
        zero-padded blocks of a fixed size. Returns (rows,) and (rows, sensors).
        """
        layers = [m.layers() for m in self.model_]
        per_row = np.empty((len(z), 1 + len(self.sensors_)))  # score, then sensors
        block = np.zeros((_DENSE_BATCH, z.shape[1]), dtype=np.float32)
        for start in range(0, len(z), _DENSE_BATCH):
            rows = z[start : start + _DENSE_BATCH]  # (batch, features)
            block[: len(rows)] = rows
            total = np.zeros(rows.shape)
            for member in layers:
                total += np.square(dense_forward(member, block)[: len(rows)] - rows)
            errors = total / len(layers)
            part = per_row[start : start + len(rows)]
            part[:, 0] = errors.mean(axis=1)
            part[:, 1:] = self._per_sensor(errors)
        smoothed = trailing_mean(per_row, entity, self.settings.score_window)
        return smoothed[:, 0], smoothed[:, 1:]

    def _sequence_errors(self, z: np.ndarray, entity: np.ndarray) -> np.ndarray:
        """Mean squared error per feature over each row's sequence. (rows, features)"""
        index = window_index(entity, self.settings.sequence_length)
        source = torch.from_numpy(np.ascontiguousarray(z))
        out = np.zeros(z.shape, dtype=np.float64)
        batch = torch.zeros(
            (_FORWARD_BATCH, index.shape[1], z.shape[1])
        )  # (batch, length, features)
        with torch.no_grad():
            for start in range(0, len(index), _FORWARD_BATCH):
                rows = index[start : start + _FORWARD_BATCH]
                batch.zero_()
                batch[: len(rows)] = source[torch.from_numpy(rows)]
                total = torch.zeros(len(rows), z.shape[1], dtype=torch.float64)
                for member in self.model_:
                    error = (member(batch) - batch)[: len(rows)]
                    total += error.square().mean(dim=1).double()
                out[start : start + len(rows)] = (total / len(self.model_)).numpy()
        return out

    def _row_errors(
        self, z: np.ndarray, entity: np.ndarray, position: np.ndarray
    ) -> np.ndarray:
        """Squared reconstruction error per feature, averaged over the members and
        over the ``score_window`` rows ending at each row.

        Rows are gathered into tiles (see the module Notes). (rows, features)
        """
        window = self.settings.score_window
        skip = self.network_context  # rows whose own error is not needed
        index, tile_of, offset = _tile_index(entity, position, self.receptive_field)
        source = torch.from_numpy(np.ascontiguousarray(z))
        errors = np.empty((len(index), TILE_ROWS, z.shape[1]), dtype=np.float64)
        batch = torch.zeros((_TILE_BATCH, index.shape[1], z.shape[1]))
        with torch.no_grad():
            for start in range(0, len(index), _TILE_BATCH):
                tiles = index[start : start + _TILE_BATCH]
                batch.zero_()
                batch[: len(tiles)] = source[torch.from_numpy(tiles)]
                shape = (len(tiles), index.shape[1] - skip, z.shape[1])
                total = torch.zeros(shape, dtype=torch.float64)
                for member in self.model_:
                    error = (member(batch) - batch)[: len(tiles), skip:]
                    total += error.square().double()
                total /= len(self.model_)
                # mean over the last `window` rows: a difference of running sums
                run = torch.cumsum(total, dim=1)
                run = torch.cat([torch.zeros_like(run[:, :1]), run], dim=1)
                mean = (run[:, window:] - run[:, :-window]) / window
                errors[start : start + len(tiles)] = mean.numpy()
        return errors[tile_of, offset]

    def contributions(self, x: np.ndarray, entity: np.ndarray) -> np.ndarray:
        """Each sensor's contribution to each row's score. (rows, sensors)"""
        return self.score_rows(x, entity)[1]

    def score_samples(self, x: np.ndarray, entity: np.ndarray) -> np.ndarray:
        """Anomaly score per row. (rows,)"""
        return self.score_rows(x, entity)[0]

    def attribution(self, contributions: np.ndarray) -> np.ndarray:
        """Each sensor's share of a row's contributions. (rows, sensors)"""
        total = contributions.sum(axis=1, keepdims=True)
        return np.divide(
            contributions, total, out=np.zeros_like(contributions), where=total > 0
        )

    def alarms(self, scores: np.ndarray, entity: np.ndarray) -> np.ndarray:
        """1 where the alarm rule fires on scores in time order per entity. (rows,)"""
        self._check_fitted()
        return alarms(
            scores > self.threshold_,
            _names(entity),
            min_rows=self.alarm_rule_["min_rows"],
            window=self.alarm_rule_["window"],
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
            "context_rows": self.context_rows,
            "feature_names": self.feature_names_,
            "sensors": self.sensors_,
            "scaler": {
                "center": self.scaler_.center_.tolist(),
                "scale": self.scaler_.scale_.tolist(),
                "entity_center": {
                    k: v.tolist() for k, v in self.scaler_.entity_center_.items()
                },
            },
            "threshold": {"value": self.threshold_, **self.threshold_rule_},
            "alarm": self.alarm_rule_,
            "training": self.training_,
            "reference_end": getattr(self, "reference_end_", {}),
            "feature_window": getattr(self, "feature_window_", 1),
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
        if isinstance(self.model_, list):
            return {
                f"member{i}.{k}": v
                for i, member in enumerate(self.model_)
                for k, v in member.state_dict().items()
            }
        arrays = (
            self.model_.arrays
            if isinstance(self.model_, IsolationTrees)
            else self.model_
        )
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    def _architecture(self) -> dict[str, Any]:
        if isinstance(self.model_, list):
            return {**self.model_[0].arguments(), "members": len(self.model_)}
        if isinstance(self.model_, IsolationTrees):
            return {
                "n_trees": int(self.model_.arrays["feature"].shape[0]),
                "path_length_normaliser": self.model_.normaliser,
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
        scaler = meta["scaler"]
        self.scaler_ = Scaler(per_entity=bool(scaler["entity_center"]))
        self.scaler_.center_ = np.asarray(scaler["center"], dtype=np.float64)
        self.scaler_.scale_ = np.asarray(scaler["scale"], dtype=np.float64)
        self.scaler_.entity_center_ = {
            k: np.asarray(v, dtype=np.float64)
            for k, v in scaler["entity_center"].items()
        }
        self.threshold_ = float(meta["threshold"]["value"])
        self.threshold_rule_ = {
            k: v for k, v in meta["threshold"].items() if k != "value"
        }
        self.alarm_rule_ = dict(meta["alarm"])
        self.training_ = meta.get("training", {})
        self.reference_end_ = dict(meta.get("reference_end", {}))
        self.feature_window_ = int(meta.get("feature_window", 1))
        arch = dict(meta["architecture"])
        arrays = {k: v.numpy() for k, v in state.items()}
        if meta["kind"] == "autoencoder":
            if arch.get("type") != self.settings.architecture:
                raise ValueError(
                    f"architecture type {arch.get('type')!r} differs from "
                    f"model_settings.architecture {self.settings.architecture!r}"
                )
            members = arch.pop("members")
            self.model_ = [
                _restore_member(arch, state, f"member{i}.") for i in range(members)
            ]
        elif meta["kind"] == "iforest":
            self.model_ = IsolationTrees(arrays, float(arch["path_length_normaliser"]))
        else:
            self.model_ = arrays


def _names(entity: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Entity names as an array of strings (objects from a table stay as they are)."""
    names = np.asarray(entity)
    return names if names.dtype.kind in "OU" else names.astype(str)


def _tile_index(
    entity: np.ndarray, position: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of each tile, and each row's tile and place in it.

    Tile ``k`` of an entity covers its row numbers ``k * TILE_ROWS`` up to the next
    tile, preceded by ``context`` rows (the entity's first row where there is none).
    Rows of a tile missing from the block (before its start, after its end) are
    replaced by the nearest row of the entity present; they only affect rows
    whose context was not passed, or later rows that are not in the block.
    Returns ``index`` (tiles, context + TILE_ROWS), ``tile_of`` (rows,) and
    ``offset`` (rows,).
    """
    n = len(entity)
    if n == 0:
        return (
            np.zeros((0, context + TILE_ROWS), np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )
    tile = position // TILE_ROWS
    run, run_start = entity_runs(entity)
    run_end = np.r_[run_start[1:], n] - 1
    new_tile = np.r_[True, (run[1:] != run[:-1]) | (tile[1:] != tile[:-1])]
    tile_of = np.cumsum(new_tile) - 1
    first = np.flatnonzero(new_tile)  # first row of each tile in the block
    tile_start = tile[first] * TILE_ROWS  # row number where each tile starts
    wanted = np.maximum(tile_start[:, None] + np.arange(-context, TILE_ROWS), 0)
    index = (first - position[first])[:, None] + wanted
    low = run_start[run[first]][:, None]
    high = run_end[run[first]][:, None]
    index = np.clip(index, low, high)
    return index, tile_of, position - tile_start[tile_of]


def _restore_member(
    arch: dict[str, Any], state: dict[str, torch.Tensor], prefix: str
) -> nn.Module:
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


def _default_code(architecture: str, features: int, sensors: Sequence[str]) -> int:
    """Code width when ``encoding_dim`` is not set: half the features (dense),
    half the sensors (causal), 16 channels (window)."""
    if architecture == "dense":
        return max(1, features // 2)
    if architecture == "causal":
        return max(1, len(sensors) // 2)
    return 16


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
