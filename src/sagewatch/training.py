"""The autoencoder training loop: seeded, early-stopped, with a progress bar.

Training is deterministic on CPU for a given seed and thread count: weights are
initialised from ``torch.manual_seed(seed)`` and batches are shuffled by a generator
seeded the same way. The best epoch by validation loss is kept (early stopping on the
held-out tail of the reference period).
"""

from __future__ import annotations

import copy
import logging
import time
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
from sagewatch.schema import ENTITY, TIMESTAMP

log = logging.getLogger(__name__)


def fit_autoencoder(
    z_train: np.ndarray,
    z_val: np.ndarray,
    settings: ModelSettings,
    *,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Train an :class:`~sagewatch.detector.Autoencoder` on scaled reference rows.

    Returns the model (in eval mode, best epoch restored) and a training summary.
    Each epoch logs one line ``epoch=E train_loss=X val_loss=Y`` that a SageMaker
    metric-definition regex can read.
    """
    from sagewatch.detector import Autoencoder

    torch.manual_seed(settings.seed)
    model = Autoencoder(z_train.shape[1], settings.hidden_dims, settings.encoding_dim)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn = nn.MSELoss()
    x_train = torch.from_numpy(np.ascontiguousarray(z_train, dtype=np.float32))
    x_val = torch.from_numpy(np.ascontiguousarray(z_val, dtype=np.float32))
    generator = torch.Generator().manual_seed(settings.seed)

    history: list[dict[str, float]] = []
    best_loss, best_state, best_epoch, waited = float("inf"), None, 0, 0
    started = time.perf_counter()
    bar = tqdm(
        range(1, settings.epochs + 1),
        desc="train",
        unit="epoch",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        train_loss = _epoch(
            model, optimiser, loss_fn, x_train, settings.batch_size, generator
        )
        val_loss = _evaluate(model, loss_fn, x_val) if len(x_val) else train_loss
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
    seconds = time.perf_counter() - started
    if best_state is not None:
        model.load_state_dict(best_state)
    summary = {
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_val_loss": best_loss,
        "n_train": len(z_train),
        "n_val": len(z_val),
        "seconds": round(seconds, 3),
        "samples_per_second": round(
            len(z_train) * len(history) / max(seconds, 1e-9), 1
        ),
        "history": history,
    }
    return model.eval(), summary


def _epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,  # (rows, features)
    batch_size: int,
    generator: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(x), generator=generator)
    total = 0.0
    for start in range(0, len(x), batch_size):
        batch = x[order[start : start + batch_size]]  # (batch, features)
        optimiser.zero_grad()
        loss = loss_fn(model(batch), batch)
        loss.backward()
        optimiser.step()
        total += loss.item() * len(batch)
    return total / len(x)


def _evaluate(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(loss_fn(model(x), x))


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
    early stopping and the threshold; the rest is sampled down to
    ``max_train_samples`` rows (seeded) when larger.

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
    position = pl.int_range(pl.len()).over(ENTITY)
    tail = position >= (pl.len() * (1 - model.validation_fraction)).floor().over(ENTITY)
    is_val = (
        ref.select(tail.alias("v")).to_series()
        if model.validation_fraction > 0
        else pl.Series([False] * ref.height)
    )
    x = ref.select(feature_columns).to_numpy().astype(np.float64)
    x_val, x_train = x[is_val.to_numpy()], x[~is_val.to_numpy()]
    if len(x_train) < 2:
        x_train, x_val = x, x[:0]
    if len(x_train) > model.max_train_samples:
        rng = np.random.default_rng(model.seed)
        keep = np.sort(rng.choice(len(x_train), model.max_train_samples, replace=False))
        log.info(
            "sampled %d of %d reference rows for training", len(keep), len(x_train)
        )
        x_train = x_train[keep]
    detector = Detector(model).fit(x_train, x_val, feature_columns, progress=progress)
    ends = ref.group_by(ENTITY, maintain_order=True).agg(pl.col(TIMESTAMP).max())
    detector.reference_end_ = {
        e: t.isoformat() for e, t in zip(ends[ENTITY], ends[TIMESTAMP], strict=True)
    }
    info = {
        "reference_rows": ref.height,
        "train_rows": len(x_train),
        "validation_rows": len(x_val),
        "entities_without_reference": empty,
    }
    return detector, info
