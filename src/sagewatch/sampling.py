"""Which reference rows a fit reads: seeded samples chosen from the layout alone.

The model trains on at most ``max_train_samples`` sequences (rows for the dense
autoencoder, PCA and Isolation Forest), early stopping watches at most a quarter as
many held-out sequences, and the threshold comes from at most
``max_calibration_rows`` held-out rows. Rows are numbered across entities in table
order, as :class:`~sagewatch.reference.Layout` numbers them; without a cap every
row is taken, so a reference period smaller than the samples gives the same fit as
reading it whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from sagewatch.config import ModelSettings
from sagewatch.reference import Layout

log = logging.getLogger(__name__)

# Consecutive held-out rows per block of the threshold's sample: each block is
# scored after the detector's context rows, a cost shared by the block's rows.
CALIBRATION_BLOCK = 1024


@dataclass
class Sample:
    """The reference rows a fit reads, and what each is used for.

    Rows are numbered across entities in table order (the layout's numbering);
    ``rows`` lists those kept in memory and every other array points into it.
    """

    rows: np.ndarray  # (kept,) sorted row numbers
    train: np.ndarray  # (sequences, length) training sequences
    validation: np.ndarray  # (sequences, length) held-out sequences, early stopping
    scored: np.ndarray  # (scored,) rows scored for the threshold, run by run
    segment: np.ndarray  # (scored,) run of consecutive rows each belongs to
    position: np.ndarray  # (scored,) row number within its entity
    calibration: np.ndarray  # (scored,) bool: rows whose scores set the threshold
    sizes: dict[str, Any]


def plan_sample(
    layout: Layout,
    settings: ModelSettings,
    *,
    length: int,
    stride: int,
    validation_stride: int = 1,
    validation: bool = True,
    context: int = 0,
) -> Sample:
    """Choose the rows a fit reads, from the layout alone (no data).

    Training sequences are the ``length`` rows ending at every ``stride``-th
    training row (counted across entities), at most ``max_train_samples`` of
    them (a sample seeded with ``seed``). Validation sequences end at every
    ``validation_stride``-th held-out row counted back from the last, at most a
    quarter of ``max_train_samples`` (seed + 1). The threshold comes from the
    held-out rows (every reference row when none is held out), at most
    ``max_calibration_rows`` of them in blocks of :data:`CALIBRATION_BLOCK`
    consecutive rows (seed + 2), each scored after the ``context`` rows before
    it, so its score is the one it gets in the whole table.

    Notes:
        Blocks of consecutive rows make a clustered sample: neighbouring scores
        are correlated, so a capped threshold varies a little more than one from
        as many independent rows would. Blocks keep the context cheap, which
        matters for the convolutional models (about 300 context rows per block
        for the causal one).
    """
    ends, train_from = train_ends(layout, stride, settings)
    held, held_from = (
        held_ends(layout, validation_stride, settings)
        if validation
        else (np.zeros(0, np.int64), 0)
    )
    train = windows(layout, ends, length)
    val = windows(layout, held, length)
    run, lo, hi, calibration_from = _calibration_blocks(layout, settings)
    scored, segment, position, calibration = _scored(layout, run, lo, hi, context)
    rows = np.unique(np.concatenate([train.ravel(), val.ravel(), scored]))
    sizes = {
        "seed": settings.seed,
        "training": {"used": len(train), "of": train_from},
        "validation": {"used": len(val), "of": held_from},
        "calibration": {
            "used": int(calibration.sum()),
            "of": calibration_from,
            "block_rows": CALIBRATION_BLOCK,
        },
        "rows_read": len(rows),
    }
    return Sample(
        rows,
        np.searchsorted(rows, train),
        np.searchsorted(rows, val),
        np.searchsorted(rows, scored),
        segment,
        position,
        calibration,
        sizes,
    )


def train_ends(
    layout: Layout, stride: int, settings: ModelSettings
) -> tuple[np.ndarray, int]:
    """Row numbers where training sequences end, and how many there could be."""
    count = -(-int(layout.train.sum()) // stride)
    chosen = np.arange(count, dtype=np.int64)
    if count > settings.max_train_samples:
        rng = np.random.default_rng(settings.seed)
        chosen = np.sort(rng.choice(count, settings.max_train_samples, replace=False))
        log.info("sampled %d training sequences of %d", len(chosen), count)
    run, place = _locate(layout.train, chosen * stride)
    return layout.start[run] + place, count


def held_ends(
    layout: Layout, stride: int, settings: ModelSettings
) -> tuple[np.ndarray, int]:
    """Row numbers where validation sequences end, and how many there could be."""
    total = int(layout.held.sum())
    count = -(-total // stride)
    chosen = np.arange(count, dtype=np.int64)
    cap = max(settings.max_train_samples // 4, 1)
    if count > cap:
        rng = np.random.default_rng(settings.seed + 1)
        chosen = np.sort(rng.choice(count, cap, replace=False))
        log.info("sampled %d validation sequences of %d", len(chosen), count)
    run, place = _locate(layout.held, total - 1 - (count - 1 - chosen) * stride)
    return layout.start[run] + layout.train[run] + place, count


def _locate(counts: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entity and place within it of items numbered across entities of ``counts``."""
    ends = np.cumsum(counts)
    run = np.searchsorted(ends, numbers, side="right")
    return run, numbers - (ends - counts)[run]


def windows(layout: Layout, ends: np.ndarray, length: int) -> np.ndarray:
    """The ``length`` rows ending at each of ``ends``, the entity's first row
    standing in for rows before it (as :func:`~sagewatch.models.window_index`)."""
    run = np.searchsorted(np.cumsum(layout.rows), ends, side="right")
    first = layout.start[run] if len(ends) else np.zeros(0, np.int64)
    window = ends[:, None] + np.arange(1 - length, 1)[None, :]
    return np.maximum(window, first[:, None])


def _calibration_blocks(
    layout: Layout, settings: ModelSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Entity, first and end row of each block of rows that sets the threshold,
    and how many rows there were to choose from."""
    held = bool(layout.held.any())
    first = layout.train if held else np.zeros_like(layout.rows)
    size = layout.held if held else layout.rows
    total = int(size.sum())
    if total <= settings.max_calibration_rows:
        run = np.flatnonzero(size)
        return run, first[run], first[run] + size[run], total
    count = -(-size // CALIBRATION_BLOCK)
    run = np.repeat(np.arange(len(size)), count)
    k = np.arange(len(run)) - np.repeat(np.cumsum(count) - count, count)
    lo = first[run] + k * CALIBRATION_BLOCK
    hi = np.minimum(lo + CALIBRATION_BLOCK, first[run] + size[run])
    order = np.random.default_rng(settings.seed + 2).permutation(len(run))
    taken = order[np.cumsum((hi - lo)[order]) <= settings.max_calibration_rows]
    if not len(taken):  # one block is more than the cap: its first rows
        taken = order[:1]
        hi[taken] = lo[taken] + settings.max_calibration_rows
    taken = np.sort(taken)
    log.info(
        "threshold from %d blocks of %d held-out rows (of %d rows)",
        len(taken),
        CALIBRATION_BLOCK,
        total,
    )
    return run[taken], lo[taken], hi[taken], total


def _scored(
    layout: Layout, run: np.ndarray, lo: np.ndarray, hi: np.ndarray, context: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows to score for the calibration blocks (each after ``context`` rows of
    its entity; overlapping runs merged): row numbers, run, position, and which
    are calibration rows."""
    segments: list[list[Any]] = []  # entity, first scored row, end, blocks
    for r, a, b in zip(run.tolist(), lo.tolist(), hi.tolist(), strict=True):
        first = max(a - context, 0)
        if segments and segments[-1][0] == r and first <= segments[-1][2]:
            segments[-1][2] = b
            segments[-1][3].append((a, b))
        else:
            segments.append([r, first, b, [(a, b)]])
    rows, label, position, calibration = [], [], [], []
    for i, (r, first, end, blocks) in enumerate(segments):
        places = np.arange(first, end)
        mask = np.zeros(end - first, bool)
        for a, b in blocks:
            mask[a - first : b - first] = True
        rows.append(layout.start[r] + places)
        label.append(np.full(end - first, i))
        position.append(places)
        calibration.append(mask)
    if not segments:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, bool)
    return tuple(np.concatenate(a) for a in (rows, label, position, calibration))
