"""Per-feature errors of each model kind on scaled rows, computed in fixed shapes.

Each function takes scaled features ``z`` (rows, features) of rows grouped by
entity in time order, as :class:`~sagewatch.detector.Detector` passes them, and
computes every row in the same place of a block or tile of a fixed shape. A row's
values therefore do not depend on where a block or chunk of rows starts: a matrix
product may round a row differently at another place in the batch (OpenBLAS does,
at the edges of its internal panels), never at the same place.

* :func:`pca_errors`: squared errors of the PCA reconstruction.
* :func:`dense_scores`: the dense autoencoder's score and per-sensor sums,
  averaged over the last ``window`` rows of the entity.
* :func:`sequence_errors`: the window autoencoder's errors over each row's
  sequence.
* :func:`tile_errors`: the causal autoencoder's errors, in tiles of rows aligned
  on the row number within the entity (:func:`tile_index`).

PCA and the dense autoencoder run in numpy on tiles of :data:`ROW_TILE` rows
aligned the same way, one matrix product per tile (numpy multiplies a stack of
matrices one by one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sagewatch.models import entity_runs, pca_reconstruct, trailing_mean, window_index
from sagewatch.networks import DenseAutoencoder, dense_forward

# Sequences go through the window autoencoder in blocks of exactly this many
# (zero-padded).
_FORWARD_BATCH = 512
# Rows per tile of PCA and the dense autoencoder, and tiles per numpy call.
ROW_TILE = 256
_TILES_PER_CALL = 32
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


def _aligned_tiles(
    z: np.ndarray,
    entity: np.ndarray,
    position: np.ndarray,
    compute: Callable[[np.ndarray], np.ndarray],
    width: int,
) -> np.ndarray:
    """``compute`` applied to the rows in tiles of :data:`ROW_TILE` rows aligned on
    the row number within the entity, and its values read back per row.

    ``compute`` maps tiles (tiles, ROW_TILE, features) to values (tiles, ROW_TILE,
    width), each row's from that row alone. Returns (rows, width).
    """
    index, tile_of, offset = tile_index(entity, position, 0, ROW_TILE)
    out = np.empty((len(z), width))
    for start in range(0, len(index), _TILES_PER_CALL):
        values = compute(z[index[start : start + _TILES_PER_CALL]])
        # tiles follow the rows in order: theirs are a contiguous range
        first, end = np.searchsorted(tile_of, [start, start + len(values)])
        out[first:end] = values[tile_of[first:end] - start, offset[first:end]]
    return out


def pca_errors(
    model: dict[str, np.ndarray],
    z: np.ndarray,
    entity: np.ndarray,
    position: np.ndarray,
) -> np.ndarray:
    """Squared error of each feature's PCA reconstruction. (rows, features)"""

    def errors(tiles: np.ndarray) -> np.ndarray:
        return np.square(tiles - pca_reconstruct(model, tiles), dtype=np.float64)

    return _aligned_tiles(z, entity, position, errors, z.shape[1])


def dense_scores(
    members: Sequence[DenseAutoencoder],
    z: np.ndarray,
    entity: np.ndarray,
    position: np.ndarray,
    window: int,
    groups: list[int],
    sensors: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared error of each row and its per-sensor sums, averaged over the
    members and over the ``window`` rows ending at the row.

    The network runs in numpy (see :func:`~sagewatch.networks.dense_forward`) on
    aligned tiles. Returns (rows,) and (rows, sensors).
    """
    layers = [m.layers() for m in members]

    def score_and_sensors(tiles: np.ndarray) -> np.ndarray:
        inputs = tiles.astype(np.float32, copy=False)
        total = np.zeros(tiles.shape)
        for member in layers:
            total += np.square(dense_forward(member, inputs) - tiles)
        errors = (total / len(layers)).reshape(-1, tiles.shape[2])
        per_row = np.column_stack(
            [errors.mean(axis=1), per_sensor(errors, groups, sensors)]
        )
        return per_row.reshape(*tiles.shape[:2], 1 + sensors)

    per_row = _aligned_tiles(z, entity, position, score_and_sensors, 1 + sensors)
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
