"""Samples of the reference period: every row under the caps, seeded samples of
bounded size above them, chosen from the layout alone."""

from __future__ import annotations

import numpy as np
import pytest

from sagewatch.config import ModelSettings
from sagewatch.models import window_index
from sagewatch.reference import Layout
from sagewatch.sampling import CALIBRATION_BLOCK, plan_sample


def _layout(rows: list[int], held: list[int]) -> Layout:
    return Layout(["a", "b", "c"][: len(rows)], np.array(rows), np.array(held))


def _rows(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Each row's entity and held-out flag, as arrays over the whole reference."""
    entity = np.repeat(layout.names, layout.rows)
    position = np.concatenate([np.arange(n) for n in layout.rows])
    held = position >= np.repeat(layout.train, layout.rows)
    return entity, held


def test_without_caps_every_sequence_and_held_out_row_is_taken() -> None:
    layout = _layout([10, 6], [2, 3])
    entity, held = _rows(layout)
    settings = ModelSettings(sequence_stride=2)

    sample = plan_sample(layout, settings, length=3, stride=2, context=2)

    rows = sample.rows
    ends = np.flatnonzero(~held)[::2]
    assert rows[sample.train].tolist() == window_index(entity, 3, ends).tolist()
    validation = window_index(entity, 3, np.flatnonzero(held))
    assert rows[sample.validation].tolist() == validation.tolist()
    # held-out rows after two rows of context each: rows 6..9 and 11..15
    assert rows[sample.scored].tolist() == [6, 7, 8, 9, 11, 12, 13, 14, 15]
    assert sample.position.tolist() == [6, 7, 8, 9, 1, 2, 3, 4, 5]
    assert sample.segment.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert rows[sample.scored[sample.calibration]].tolist() == [8, 9, 13, 14, 15]
    assert sample.sizes == {
        "seed": 42,
        "training": {"used": 6, "of": 6},
        "validation": {"used": 5, "of": 5},
        "calibration": {"used": 5, "of": 5, "block_rows": CALIBRATION_BLOCK},
        "rows_read": 16,
    }


def test_without_held_out_rows_the_threshold_comes_from_every_row() -> None:
    layout = _layout([4, 3], [0, 0])

    sample = plan_sample(
        layout, ModelSettings(), length=1, stride=1, validation=False, context=5
    )

    assert len(sample.validation) == 0
    assert sample.calibration.all()
    assert sample.rows[sample.scored].tolist() == list(range(7))
    assert sample.segment.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_large_reference_is_sampled_within_the_caps() -> None:
    layout = _layout([600_000, 500_000, 3_000], [120_000, 100_000, 600])
    settings = ModelSettings(max_train_samples=1_000, max_calibration_rows=5_000)

    sample = plan_sample(layout, settings, length=4, stride=1, context=11)

    assert sample.train.shape == (1_000, 4)
    assert sample.validation.shape == (250, 4)
    used = int(sample.calibration.sum())
    assert 5_000 - CALIBRATION_BLOCK < used <= 5_000
    assert sample.sizes["training"] == {"used": 1_000, "of": 882_400}
    assert sample.sizes["validation"] == {"used": 250, "of": 220_600}
    assert sample.sizes["calibration"]["of"] == 220_600
    assert sample.sizes["calibration"]["used"] == used
    # memory follows the samples: 4 rows per sequence, blocks and their context
    blocks = -(-used // CALIBRATION_BLOCK) + 3
    assert len(sample.rows) <= 1_250 * 4 + used + blocks * 11
    rows = sample.rows
    held_start = layout.start + layout.train
    entity = np.searchsorted(np.cumsum(layout.rows), rows, side="right")
    calibration = rows[sample.scored[sample.calibration]]
    assert (calibration >= held_start[entity[sample.scored[sample.calibration]]]).all()
    train_ends = rows[sample.train[:, -1]]
    assert (train_ends < held_start[entity[sample.train[:, -1]]]).all()
    # each scored run starts 11 rows before its first calibration row (or at 0)
    for segment in np.unique(sample.segment):
        mine = sample.segment == segment
        position = sample.position[mine]
        first = position[sample.calibration[mine]][0]
        assert position[0] == max(first - 11, 0)
        assert np.all(np.diff(position) == 1)


def test_samples_follow_the_seed() -> None:
    layout = _layout([600_000, 500_000], [120_000, 100_000])
    settings = ModelSettings(max_train_samples=1_000, max_calibration_rows=5_000)

    first = plan_sample(layout, settings, length=1, stride=1)
    again = plan_sample(layout, settings, length=1, stride=1)
    other = plan_sample(
        layout, settings.model_copy(update={"seed": 1}), length=1, stride=1
    )

    assert np.array_equal(first.rows, again.rows)
    assert not np.array_equal(first.rows[first.train], other.rows[other.train])
    calibration = first.rows[first.scored[first.calibration]]
    moved = other.rows[other.scored[other.calibration]]
    assert not np.array_equal(calibration, moved)


@pytest.mark.parametrize("cap", [1, 700])
def test_a_cap_smaller_than_a_block_takes_part_of_one_block(cap: int) -> None:
    layout = _layout([50_000], [10_000])
    settings = ModelSettings(max_calibration_rows=cap)

    sample = plan_sample(layout, settings, length=1, stride=1)

    assert int(sample.calibration.sum()) == cap
