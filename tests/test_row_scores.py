"""Tiles of the causal autoencoder and per-sensor sums."""

from __future__ import annotations

import numpy as np

from sagewatch.row_scores import per_sensor, tile_index


def test_tiles_are_aligned_on_the_row_number_within_the_entity() -> None:
    entity = np.array(list("aaaaabbb"))
    position = np.array([0, 1, 2, 3, 4, 0, 1, 2])

    index, tile_of, offset = tile_index(entity, position, context=1, tile_rows=2)

    # Missing rows are the entity's nearest row: its first before, its last after.
    assert index.tolist() == [[0, 0, 1], [1, 2, 3], [3, 4, 4], [5, 5, 6], [6, 7, 7]]
    assert tile_of.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    assert offset.tolist() == [0, 1, 0, 1, 0, 0, 1, 0]


def test_a_block_starting_inside_a_tile_keeps_its_alignment() -> None:
    entity = np.array(list("aaa"))
    position = np.array([3, 4, 5])

    index, tile_of, offset = tile_index(entity, position, context=1, tile_rows=2)

    assert index.tolist() == [[0, 0, 0], [0, 1, 2]]
    assert tile_of.tolist() == [0, 1, 1]
    assert offset.tolist() == [1, 0, 1]


def test_no_rows_give_no_tiles() -> None:
    empty = np.zeros(0, np.int64)

    index, tile_of, offset = tile_index(np.array([], str), empty, 3, tile_rows=4)

    assert index.shape == (0, 7)
    assert len(tile_of) == len(offset) == 0


def test_per_sensor_sums_features_in_any_order() -> None:
    values = np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])

    assert per_sensor(values, [0, 0, 1], 2).tolist() == [[3.0, 4.0], [24.0, 32.0]]
    assert per_sensor(values, [1, 0, 1], 2).tolist() == [[2.0, 5.0], [16.0, 40.0]]
