"""Fitting a detector on the reference period; the autoencoder training loop.

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
from collections.abc import Callable
from datetime import UTC
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from sagewatch.config import ModelSettings, ReferenceSettings, Settings
from sagewatch.detector import Detector
from sagewatch.errors import InputError
from sagewatch.models import window_index
from sagewatch.schema import ENTITY, TIMESTAMP

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
    """Row numbers of the training and validation sequences. (sequences, length)

    Sequences are the ``length`` rows ending at a row (see
    :func:`~sagewatch.models.window_index`), built only for the rows chosen as
    ends, so memory follows the sample, not the reference period. Training sequences end
    at every ``sequence_stride``-th row that is not held out, at most
    ``max_train_samples`` of them (a seeded sample); validation sequences end at
    every ``validation_stride``-th held-out row, counted back from the last, at
    most a quarter of ``max_train_samples`` of them (a seeded sample).
    """
    ends = np.flatnonzero(~held)[:: settings.sequence_stride]
    if len(ends) > settings.max_train_samples:
        rng = np.random.default_rng(settings.seed)
        ends = np.sort(rng.choice(ends, settings.max_train_samples, replace=False))
        log.info("sampled %d training sequences", len(ends))
    held_ends = np.flatnonzero(held)[::-1][::validation_stride][::-1]
    cap = max(settings.max_train_samples // 4, 1)
    if len(held_ends) > cap:
        rng = np.random.default_rng(settings.seed + 1)
        held_ends = np.sort(rng.choice(held_ends, cap, replace=False))
        log.info("sampled %d validation sequences", len(held_ends))
    return window_index(entity, length, ends), window_index(entity, length, held_ends)


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
        "stopped_at_epoch_limit": still_improving,
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
        until = settings.train_until
        if until.tzinfo is None:
            until = until.replace(tzinfo=UTC)
        expr = pl.col(TIMESTAMP) <= pl.lit(until).dt.convert_time_zone("UTC")
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
    """Fit a detector on the reference period of a features table.

    The last ``validation_fraction`` of each entity's reference rows is held out for
    early stopping and the threshold (when that leaves fewer than 2 rows to train
    on, nothing is held out and the threshold comes from the training rows).

    Raises:
        InputError: no entity has enough reference rows.
    """
    model = settings.model
    reference = reference_mask(features, settings.reference)
    ref = features.filter(reference)
    per_entity = ref.group_by(ENTITY, maintain_order=True).len()
    empty = sorted(set(features[ENTITY].unique()) - set(per_entity[ENTITY]))
    if empty:
        log.warning(
            "no reference rows for entities %s; they are scored but not trained on",
            empty[:10],
        )
    if ref.height < 2:
        raise InputError(
            f"the reference period holds {ref.height} rows; need at least 2. "
            "Check train_rows / train_until / train_fraction"
        )
    is_val = _held_out(ref, model.validation_fraction)
    if int((~is_val).sum()) < 2:
        is_val = np.zeros(ref.height, dtype=bool)
    # Float32 as stored (Float64 from older feature files); the scaler works in
    # float64 and hands the model float32.
    x = ref.select(feature_columns).to_numpy()
    entity = ref[ENTITY].cast(pl.String).to_numpy()
    detector = Detector(model).fit(
        x, entity, feature_columns, validation=is_val, progress=progress
    )
    ends = ref.group_by(ENTITY, maintain_order=True).agg(pl.col(TIMESTAMP).max())
    detector.feature_window_ = settings.features.rolling_window
    detector.reference_end_ = {
        e: t.isoformat() for e, t in zip(ends[ENTITY], ends[TIMESTAMP], strict=True)
    }
    info = {
        "reference_rows": ref.height,
        "train_rows": int((~is_val).sum()),
        "validation_rows": int(is_val.sum()),
        "entities_without_reference": empty,
    }
    return detector, info


def _held_out(ref: pl.DataFrame, fraction: float) -> np.ndarray:
    """The last ``fraction`` of each entity's reference rows (rounded down)."""
    if fraction <= 0:
        return np.zeros(ref.height, dtype=bool)
    position = pl.int_range(pl.len()).over(ENTITY)
    tail = position >= (pl.len() - (pl.len() * fraction).floor()).over(ENTITY)
    return ref.select(tail.alias("held")).to_series().to_numpy()
