"""Fitting a detector on the reference period; each model kind's fit and the
autoencoder training loop.

The reference period is read twice, block by block (:mod:`sagewatch.reference`):
once for the scaler's statistics, once to keep the rows that the seeded samples
of :mod:`sagewatch.sampling` touch. Memory and fitting time therefore follow
``max_train_samples`` and ``max_calibration_rows``, not the length of the
reference period.

Training is deterministic on CPU for a given seed and thread count (``threads``,
1 by default): weights are initialised from ``torch.manual_seed(seed)`` and batches
are shuffled by a generator seeded the same way; ensemble member ``i`` uses seed
``seed + i``. The best epoch by validation loss is kept (early stopping on the
held-out tail of the reference period).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from sagewatch.config import ModelSettings, ReferenceSettings, Settings
from sagewatch.detector import Detector
from sagewatch.errors import InputError
from sagewatch.models import IsolationTrees, fit_pca
from sagewatch.networks import CausalConvAutoencoder, ConvAutoencoder, DenseAutoencoder
from sagewatch.reference import ArrayReference, Reference, TableReference, until_expr
from sagewatch.sampling import Sample, held_ends, train_ends, windows
from sagewatch.schema import ENTITY

log = logging.getLogger(__name__)
# Validation sequences per forward pass (memory stays bounded on long references).
_EVAL_BATCH = 4096


def training_sequences(
    entity: np.ndarray,
    held: np.ndarray,
    settings: ModelSettings,
    *,
    length: int,
    validation_stride: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the training and validation sequences of rows grouped by
    ``entity``, ``held`` marking the last rows of each (see
    :func:`~sagewatch.sampling.plan_sample`). Returns (sequences, length) twice.
    """
    layout = ArrayReference(np.zeros((len(entity), 0)), entity, held).layout
    ends, _ = train_ends(layout, settings.sequence_stride, settings)
    held, _ = held_ends(layout, validation_stride, settings)
    return windows(layout, ends, length), windows(layout, held, length)


def fit_model(
    z: np.ndarray,
    sample: Sample,
    settings: ModelSettings,
    *,
    sensors: Sequence[str],
    hidden: list[int],
    network_context: int,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The model of ``settings.detector`` fitted on the scaled rows ``z`` that
    ``sample`` keeps, and a summary for ``detector.json``.

    The autoencoders (``ensemble_size`` of them, member ``i`` trained with seed
    ``seed + i``) learn from the training sequences, of hidden widths ``hidden``;
    the causal model's sequences start ``network_context`` rows early, rows that
    only feed the network. PCA and Isolation Forest learn from the last row of
    each training sequence.
    """
    s = settings
    if s.detector == "autoencoder":
        code = _code_width(s, z.shape[1], sensors)
        build = _builder(s, z.shape[1], hidden, code)
        context = network_context if s.architecture == "causal" else 0
        members, summaries = _fit_members(build, z, sample, s, context, progress)
        return members, {
            "members": summaries,
            "n_train": len(sample.train),
            "encoding_dim": code,
        }
    train = z[sample.train[:, -1]]  # (rows, features)
    if s.detector == "pca":
        model, k = fit_pca(train, s.pca_variance)
        return model, {"n_components": k, "n_train": len(train)}
    trees = IsolationTrees.fit(
        train,
        n_trees=s.iforest_trees,
        max_samples=s.iforest_max_samples,
        seed=s.seed,
    )
    return trees, {"n_trees": s.iforest_trees, "n_train": len(train)}


def _code_width(settings: ModelSettings, features: int, sensors: Sequence[str]) -> int:
    """``encoding_dim``, else half the features (dense), half the sensors (causal)
    or 16 channels (window); a causal code as wide as the sensors is warned about.
    """
    s = settings
    if s.encoding_dim:
        code = s.encoding_dim
    elif s.architecture == "dense":
        code = max(1, features // 2)
    elif s.architecture == "causal":
        code = max(1, len(sensors) // 2)
    else:
        code = 16
    if s.architecture == "causal" and code >= len(sensors):
        log.warning(
            "encoding_dim=%d is not below the number of sensors (%d): the causal "
            "autoencoder can pass each row through its code and will miss "
            "anomalies; use fewer code channels",
            code,
            len(sensors),
        )
    return code


def _builder(
    settings: ModelSettings, features: int, hidden: list[int], code: int
) -> Callable[[], nn.Module]:
    """What makes a new, untrained autoencoder of the settings' architecture."""
    s = settings

    def build() -> nn.Module:
        if s.architecture == "dense":
            return DenseAutoencoder(features, hidden, code)
        if s.architecture == "causal":
            return CausalConvAutoencoder(features, hidden, code, s.kernel_size)
        return ConvAutoencoder(features, s.sequence_length, hidden, code, s.kernel_size)

    return build


def _fit_members(
    build: Callable[[], nn.Module],
    z: np.ndarray,
    sample: Sample,
    settings: ModelSettings,
    context: int,
    progress: bool,
) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """The ensemble's members, member ``i`` trained with seed ``seed + i``, and
    their training summaries."""
    members, summaries = [], []
    for member in range(settings.ensemble_size):
        model, summary = fit_autoencoder(
            build,
            z,
            sample.train,
            sample.validation,
            settings,
            context=context,
            seed=settings.seed + member,
            progress=progress,
        )
        members.append(model)
        summaries.append(summary)
    return members, summaries


def fit_autoencoder(
    build: Callable[[], nn.Module],
    z: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    settings: ModelSettings,
    *,
    context: int = 0,
    seed: int,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the autoencoder that ``build()`` makes on scaled reference rows.

    ``z`` (rows, features) holds the scaled rows; ``train_idx`` and ``val_idx``
    (sequences, length) are row numbers of the sequences. The loss is the mean
    squared error of each sequence's rows after its first ``context`` (rows that
    are there only so the ones after them see their full history, for the causal
    model). ``build`` runs after the seed is set. Returns the model (in
    eval mode, best epoch restored) and a training summary. Each epoch logs one
    line ``epoch=E train_loss=X val_loss=Y`` that a SageMaker metric-definition
    regex can read.
    """
    torch.manual_seed(seed)
    model = build()
    optimiser = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, fused=True
    )
    rows = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    train = torch.from_numpy(train_idx)
    val = torch.from_numpy(val_idx)
    generator = torch.Generator().manual_seed(seed)

    history: list[dict[str, float]] = []
    best_loss, best_state, best_epoch, waited = float("inf"), None, 0, 0
    started = time.perf_counter()
    bar = tqdm(
        range(1, settings.epochs + 1),
        desc=f"train (seed {seed})",
        unit="epoch",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        train_loss = _epoch(
            model, optimiser, rows, train, settings.batch_size, generator, context
        )
        val_loss = (
            _evaluate(model, rows, val, settings.batch_size, context)
            if len(val)
            else train_loss
        )
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        log.debug("epoch=%d train_loss=%.6f val_loss=%.6f", epoch, train_loss, val_loss)
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= settings.patience:
                log.info("early stop after epoch %d (best epoch %d)", epoch, best_epoch)
                break
    bar.close()
    still_improving = best_epoch == len(history) == settings.epochs
    if still_improving:
        log.info(
            "validation loss still falling at the last epoch (%d); the model may be "
            "under-trained: raise epochs",
            settings.epochs,
        )
    seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    summary = {
        "seed": seed,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "stopped_at_epoch_limit": len(history) == settings.epochs,
        "still_improving": still_improving,
        "best_val_loss": best_loss,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "seconds": round(seconds, 3),
        "samples_per_second": round(
            len(train_idx) * len(history) / max(seconds, 1e-9), 1
        ),
        "history": history,
    }
    return model.eval(), summary


def _epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    rows: torch.Tensor,  # (rows, features)
    index: torch.Tensor,  # (sequences, length)
    batch_size: int,
    generator: torch.Generator,
    context: int,
) -> float:
    model.train()
    order = torch.randperm(len(index), generator=generator)
    total = 0.0
    for start in range(0, len(index), batch_size):
        batch = rows[index[order[start : start + batch_size]]]  # (batch, length, f)
        optimiser.zero_grad()
        loss = torch.mean(torch.square(model(batch)[:, context:] - batch[:, context:]))
        loss.backward()
        optimiser.step()
        total += loss.item() * len(batch)
    return total / len(index)


def _evaluate(
    model: nn.Module,
    rows: torch.Tensor,  # (rows, features)
    index: torch.Tensor,  # (sequences, length)
    batch_size: int,
    context: int,
) -> float:
    """Mean squared error over the sequences, in batches of bounded memory."""
    model.eval()
    step = max(batch_size, _EVAL_BATCH)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(index), step):
            x = rows[index[start : start + step]]  # (batch, length, features)
            error = torch.square(model(x)[:, context:] - x[:, context:])
            total += float(error.double().sum())
            count += error.numel()
    return total / max(count, 1)


def reference_mask(frame: pl.DataFrame, settings: ReferenceSettings) -> pl.Series:
    """Which rows of a canonical table (sorted by entity, time) are the reference.

    ``train_rows`` (first N rows of each entity) wins over ``train_until`` (rows up
    to and including a timestamp), which wins over ``train_fraction`` (the first
    share of each entity's rows, rounded up).
    """
    row = pl.int_range(pl.len()).over(ENTITY)
    if settings.train_rows is not None:
        expr = row < settings.train_rows
    elif settings.train_until is not None:
        expr = until_expr(settings)
    else:
        expr = row < (pl.len() * settings.train_fraction).ceil().over(ENTITY)
    return frame.select(expr.alias("in_reference")).to_series()


def fit_detector(
    features: pl.DataFrame,
    feature_columns: list[str],
    settings: Settings,
    *,
    progress: bool = False,
) -> tuple[Detector, dict[str, Any]]:
    """Fit a detector on the reference period of a features table in memory.

    See :func:`fit_reference`; the table gives the same detector as the feature
    files written from it.

    Raises:
        InputError: no entity has enough reference rows, or features are missing.
    """
    reference = TableReference(features, feature_columns, settings)
    return fit_reference(reference, settings, progress=progress)


def fit_reference(
    reference: Reference, settings: Settings, *, progress: bool = False
) -> tuple[Detector, dict[str, Any]]:
    """Fit a detector on a reference period read block by block.

    The last ``validation_fraction`` of each entity's reference rows is held out
    for early stopping and the threshold (when that leaves fewer than 2 rows to
    train on, nothing is held out and the threshold comes from the training
    rows). Memory follows the samples (:func:`~sagewatch.sampling.plan_sample`),
    not the reference period. Returns the detector and what it was fitted on.

    Raises:
        InputError: no entity has enough reference rows, or features are missing.
    """
    layout = reference.layout
    if reference.without_reference:
        log.warning(
            "no reference rows for entities %s; they are scored but not trained on",
            reference.without_reference[:10],
        )
    total = int(layout.rows.sum())
    if total < 2:
        raise InputError(
            f"the reference period holds {total} rows; need at least 2. "
            "Check train_rows / train_until / train_fraction"
        )
    detector = Detector(settings.model).fit_reference(
        reference, reference.columns, progress=progress
    )
    detector.feature_window_ = settings.features.rolling_window
    detector.reference_end_ = dict(reference.reference_end)
    info = {
        "reference_rows": total,
        "train_rows": int(layout.train.sum()),
        "validation_rows": int(layout.held.sum()),
        "entities_without_reference": reference.without_reference,
        "sample": detector.training_["sample"],
    }
    return detector, info
