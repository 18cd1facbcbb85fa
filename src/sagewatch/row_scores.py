"""Per-feature errors of each model kind on scaled rows, computed in fixed shapes.

Each function takes scaled features ``z`` (rows, features) of rows grouped by
entity in time order, as :class:`~sagewatch.detector.Detector` passes them, and
computes every row in a block or tile of a fixed shape, zero-padded. A row's
values therefore do not depend on where a block or chunk of rows starts.

* :func:`pca_errors`: squared errors of the PCA reconstruction.
* :func:`dense_scores`: the dense autoencoder's score and per-sensor sums,
  averaged over the last ``window`` rows of the entity.
* :func:`sequence_errors`: the window autoencoder's errors over each row's
  sequence.
* :func:`tile_errors`: the causal autoencoder's errors, in tiles of rows aligned
  on the row number within the entity (:func:`tile_index`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from sagewatch.models import entity_runs, pca_reconstruct, trailing_mean, window_index
from sagewatch.networks import DenseAutoencoder, dense_forward

# Rows go through PCA and the window autoencoder in blocks of exactly this many
# (zero-padded), so a row's score does not depend on how the rows were cut into
# blocks; the dense autoencoder takes larger blocks of _DENSE_BATCH rows.
_FORWARD_BATCH = 512
_DENSE_BATCH = 8192
# Tiles (zero-padded) per call of the causal autoencoder.
_TILE_BATCH = 32


def per_sensor(values: np.ndarray, groups: list[int], sensors: int) -> np.ndarray:
    """Per-feature values summed per sensor, ``groups[j]`` being the sensor of
    feature ``j``. (rows, features) -> (rows, sensors)"""
    if groups == sorted(groups):  # sensor by sensor, as the features stage writes
        starts = np.flatnonzero(np.diff(np.r_[-1, groups]))
        return np.add.reduceat(values, starts, axis=1)
    out = np.zeros((values.shape[0], sensors))
    for column, sensor in enumerate(groups):
        out[:, sensor] += values[:, column]
    return out


def pca_errors(model: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """Squared error of each feature's PCA reconstruction. (rows, features)"""
    errors = np.empty(z.shape, dtype=np.float64)
    block = np.zeros((_FORWARD_BATCH, z.shape[1]), dtype=z.dtype)
    for start in range(0, len(z), _FORWARD_BATCH):
        # fixed-size blocks: matrix products round alike wherever a block starts
        rows = z[start : start + _FORWARD_BATCH]
        block[: len(rows)] = rows
        recon = pca_reconstruct(model, block)[: len(rows)]
        errors[start : start + len(rows)] = np.square(rows - recon)
    return errors


def dense_scores(
    members: Sequence[DenseAutoencoder],
    z: np.ndarray,
    entity: np.ndarray,
    window: int,
    groups: list[int],
    sensors: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared error of each row and its per-sensor sums, averaged over the
    members and over the ``window`` rows ending at the row.

    The network runs in numpy (see :func:`~sagewatch.networks.dense_forward`), on
    zero-padded blocks of a fixed size. Returns (rows,) and (rows, sensors).
    """
    layers = [m.layers() for m in members]
    per_row = np.empty((len(z), 1 + sensors))  # score, then sensors
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
        part[:, 1:] = per_sensor(errors, groups, sensors)
    smoothed = trailing_mean(per_row, entity, window)
    return smoothed[:, 0], smoothed[:, 1:]


def sequence_errors(
    members: Sequence[nn.Module], z: np.ndarray, entity: np.ndarray, length: int
) -> np.ndarray:
    """Mean squared error per feature over the ``length`` rows ending at each row,
    averaged over the members. (rows, features)"""
    index = window_index(entity, length)
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
            for member in members:
                error = (member(batch) - batch)[: len(rows)]
                total += error.square().mean(dim=1).double()
            out[start : start + len(rows)] = (total / len(members)).numpy()
    return out


def tile_errors(
    members: Sequence[nn.Module],
    z: np.ndarray,
    entity: np.ndarray,
    position: np.ndarray,
    *,
    context: int,
    skip: int,
    window: int,
    tile_rows: int,
) -> np.ndarray:
    """Squared reconstruction error per feature, averaged over the members and
    over the ``window`` rows ending at each row.

    Rows are gathered into tiles of ``tile_rows`` rows, each after the
    ``context`` rows before it (see :func:`tile_index`); the first ``skip`` rows
    of a tile only feed the network. (rows, features)
    """
    index, tile_of, offset = tile_index(entity, position, context, tile_rows)
    source = torch.from_numpy(np.ascontiguousarray(z))
    errors = np.empty((len(index), tile_rows, z.shape[1]), dtype=np.float64)
    batch = torch.zeros((_TILE_BATCH, index.shape[1], z.shape[1]))
    with torch.no_grad():
        for start in range(0, len(index), _TILE_BATCH):
            tiles = index[start : start + _TILE_BATCH]
            batch.zero_()
            batch[: len(tiles)] = source[torch.from_numpy(tiles)]
            shape = (len(tiles), index.shape[1] - skip, z.shape[1])
            total = torch.zeros(shape, dtype=torch.float64)
            for member in members:
                error = (member(batch) - batch)[: len(tiles), skip:]
                total += error.square().double()
            total /= len(members)
            # mean over the last `window` rows: a difference of running sums
            run = torch.cumsum(total, dim=1)
            run = torch.cat([torch.zeros_like(run[:, :1]), run], dim=1)
            mean = (run[:, window:] - run[:, :-window]) / window
            errors[start : start + len(tiles)] = mean.numpy()
    return errors[tile_of, offset]


def tile_index(
    entity: np.ndarray, position: np.ndarray, context: int, tile_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of each tile, and each row's tile and place in it.

    Tile ``k`` of an entity covers its row numbers ``k * tile_rows`` up to the next
    tile, preceded by ``context`` rows (the entity's first row where there is none).
    Rows of a tile missing from the block (before its start, after its end) are
    replaced by the nearest row of the entity present; they only affect rows
    whose context was not passed, or later rows that are not in the block.
    Returns ``index`` (tiles, context + tile_rows), ``tile_of`` (rows,) and
    ``offset`` (rows,).
    """
    n = len(entity)
    if n == 0:
        return (
            np.zeros((0, context + tile_rows), np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )
    tile = position // tile_rows
    run, run_start = entity_runs(entity)
    run_end = np.r_[run_start[1:], n] - 1
    new_tile = np.r_[True, (run[1:] != run[:-1]) | (tile[1:] != tile[:-1])]
    tile_of = np.cumsum(new_tile) - 1
    first = np.flatnonzero(new_tile)  # first row of each tile in the block
    tile_start = tile[first] * tile_rows  # row number where each tile starts
    wanted = np.maximum(tile_start[:, None] + np.arange(-context, tile_rows), 0)
    index = (first - position[first])[:, None] + wanted
    low = run_start[run[first]][:, None]
    high = run_end[run[first]][:, None]
    index = np.clip(index, low, high)
    return index, tile_of, position - tile_start[tile_of]
