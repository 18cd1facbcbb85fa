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

A fitted detector is saved as a folder with ``weights.pt`` and ``detector.json``
(see :mod:`sagewatch.artifact`); the errors of each model kind are computed in
:mod:`sagewatch.row_scores`.

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
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sagewatch import artifact, storage
from sagewatch.artifact import FORMAT_VERSION, METADATA, WEIGHTS
from sagewatch.config import ModelSettings
from sagewatch.errors import NotFittedError, SchemaMismatchError
from sagewatch.features import SEPARATOR, sensor_of, sensors_of
from sagewatch.models import IsolationTrees, Scaler, row_positions
from sagewatch.row_scores import (
    dense_scores,
    pca_errors,
    per_sensor,
    sequence_errors,
    tile_errors,
)
from sagewatch.thresholds import alarms, calibration_scores, learn_threshold

if TYPE_CHECKING:
    from sagewatch.reference import Reference

log = logging.getLogger(__name__)

# The autoencoder scores rows in tiles of TILE_ROWS rows aligned on the row number
# within the entity (see :func:`~sagewatch.row_scores.tile_errors`).
TILE_ROWS = 256


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
        from sagewatch.training import fit_model

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
                self.scaler_.add(train, layout.names[block.run])
        self.scaler_.update(groups)
        sample = plan_sample(layout, self.settings, **self._sample_shape())
        z = gather(reference, sample.rows, self.scaler_)  # (rows kept, features)
        with compute_threads(self.settings.threads):
            self.model_, self.training_ = fit_model(
                z,
                sample,
                self.settings,
                sensors=self.sensors_,
                hidden=self.hidden_dims,
                network_context=self.network_context,
                progress=progress,
            )
            calibration = calibration_scores(
                self._score_scaled, z, sample, self.context_rows
            )
        self.training_["sample"] = sample.sizes
        source = "held-out" if layout.held.any() else "training"
        self.threshold_, self.threshold_rule_ = learn_threshold(
            calibration, self.settings, source
        )
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
        s = self.settings
        groups = [self.sensors_.index(sensor_of(f)) for f in self.feature_names_]
        sensors = len(self.sensors_)
        if isinstance(self.model_, IsolationTrees):
            squares = np.square(z, dtype=np.float64)
            return self.model_.score(z), per_sensor(squares, groups, sensors)
        if isinstance(self.model_, dict):
            errors = pca_errors(self.model_, z, entity, position)
        elif s.architecture == "dense":
            return dense_scores(
                self.model_, z, entity, position, s.score_window, groups, sensors
            )
        elif self._causal:
            errors = tile_errors(
                self.model_,
                z,
                entity,
                position,
                context=self.receptive_field,
                skip=self.network_context,
                window=s.score_window,
                tile_rows=TILE_ROWS,
            )
        else:
            errors = sequence_errors(self.model_, z, entity, s.sequence_length)
        return errors.mean(axis=1), per_sensor(errors, groups, sensors)

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
        return artifact.save(self, uri, extra)

    @classmethod
    def load(cls, uri: str) -> Detector:
        """Load an artifact folder written by :meth:`save`.

        Raises:
            ArtifactError: missing files, a checksum mismatch, or an unknown format.
        """
        return artifact.load(cls, uri)


def _names(entity: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Entity names as an array of strings (objects from a table stay as they are)."""
    names = np.asarray(entity)
    return names if names.dtype.kind in "OU" else names.astype(str)


__all__ = [
    "FORMAT_VERSION",
    "METADATA",
    "TILE_ROWS",
    "WEIGHTS",
    "Detector",
    "NotFittedError",
    "compute_threads",
]
