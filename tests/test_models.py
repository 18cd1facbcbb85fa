"""Scaler, windows, PCA and the array forest."""

from __future__ import annotations

import numpy as np
import pytest

from sagewatch import models
from sagewatch.errors import NotFittedError
from sagewatch.models import (
    IsolationTrees,
    Scaler,
    average_path_length,
    trailing_mean,
    window_index,
)


def test_scaler_centres_each_entity_with_a_pooled_spread() -> None:
    x = np.array([[1.0], [3.0], [11.0], [13.0]])
    entity = np.array(["a", "a", "b", "b"])

    scaler = Scaler().fit(x, entity)

    assert scaler.entity_center_["a"] == pytest.approx([2.0])
    assert scaler.entity_center_["b"] == pytest.approx([12.0])
    assert scaler.scale_ == pytest.approx([1.0])  # every row is 1 from its centre
    z = scaler.transform(np.array([[4.0], [12.0], [7.0]]), np.array(["a", "b", "c"]))
    # Unknown entity "c" is measured from the pooled centre, 7.
    assert z[:, 0].tolist() == pytest.approx([2.0, 0.0, 0.0])


def test_scaler_global_centre() -> None:
    x = np.array([[1.0], [3.0], [11.0], [13.0]])

    scaler = Scaler(per_entity=False).fit(x, np.array(["a", "a", "b", "b"]))

    assert scaler.entity_center_ == {}
    assert scaler.center_ == pytest.approx([7.0])
    assert scaler.scale_ == pytest.approx([np.sqrt((36 + 16 + 16 + 36) / 4)])


def test_scaler_constant_feature_gets_a_floor_not_a_blow_up() -> None:
    x = np.full((10, 1), 96.0)

    scaler = Scaler().fit(x, np.array(["a"] * 10))
    z = scaler.transform(np.array([[93.0]]), np.array(["a"]))

    assert scaler.scale_[0] == pytest.approx(0.096)
    assert z[0, 0] == pytest.approx(-31.25)


def test_scaler_learns_float32_features_in_float64() -> None:
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(0, 1, (5_000, 2))).astype(np.float32)
    entity = np.repeat(["a", "b"], 2_500)

    narrow = Scaler().fit(x, entity)
    wide = Scaler().fit(x.astype(np.float64), entity)

    assert narrow.center_.dtype == narrow.scale_.dtype == np.float64
    assert np.array_equal(narrow.center_, wide.center_)
    assert np.array_equal(narrow.scale_, wide.scale_)
    assert np.array_equal(narrow.entity_center_["b"], wide.entity_center_["b"])


def test_float32_features_move_scaled_values_by_under_1e_4_of_the_scale() -> None:
    # Float32 steps are 1 at a level of 1e7: readings with a spread of 0.3 move by
    # up to 0.5. The scale's floor, 1e-3 of the level, keeps that small.
    rng = np.random.default_rng(1)
    x = np.column_stack(
        [
            1e7 + rng.normal(0, 0.3, 2_000),
            50 + rng.normal(0, 2, 2_000),
            rng.normal(0, 1e-3, 2_000),
        ]
    )
    entity = np.repeat(["a"], 2_000)
    scaler = Scaler().fit(x, entity)

    rounded = x.astype(np.float32)
    moved = np.abs(scaler.transform(rounded, entity) - scaler.transform(x, entity))

    assert scaler.scale_[0] == pytest.approx(1e4)  # the floor, not the spread
    assert moved.max() < 1e-4
    assert moved[:, 0].max() > 3e-5  # the level's rounding does show


@pytest.mark.parametrize("per_entity", [True, False])
def test_scaler_statistics_added_block_by_block(
    monkeypatch: pytest.MonkeyPatch, per_entity: bool
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 3.0, (50, 2)) + np.repeat([[0.0, 0.0], [40.0, -9.0]], 25, 0)
    entity = np.repeat(["a", "b"], 25)
    monkeypatch.setattr(models, "BLOCK_ROWS", 7)  # blocks of 7, 7, 7 and 4 rows

    scaler = Scaler(per_entity=per_entity).fit(x, entity)

    centre = {n: x[entity == n].mean(axis=0) for n in ("a", "b")}
    deviation = x - (np.where((entity == "a")[:, None], centre["a"], centre["b"]))
    if not per_entity:
        deviation = x - x.mean(axis=0)
    assert scaler.center_ == pytest.approx(x.mean(axis=0), rel=1e-14)
    assert scaler.scale_ == pytest.approx(np.sqrt((deviation**2).mean(0)), rel=1e-12)
    if per_entity:
        assert scaler.entity_center_["b"] == pytest.approx(centre["b"], rel=1e-14)
    blocks = Scaler(per_entity=per_entity)
    for start in (0, 7, 14, 21, 25, 32, 39, 46):
        stop = min(start + 7, 25 if start < 25 else 50)
        blocks.partial_fit(x[start:stop], str(entity[start]))
    assert np.array_equal(blocks.scale_, scaler.scale_)
    assert np.array_equal(blocks.center_, scaler.center_)


def test_scaler_not_fitted() -> None:
    with pytest.raises(NotFittedError):
        Scaler().transform(np.zeros((1, 1)), np.array(["a"]))


def test_window_index_repeats_the_first_row_and_stops_at_entities() -> None:
    entity = np.array(["a", "a", "a", "b", "b"])

    index = window_index(entity, 3)

    assert index.tolist() == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 1, 2],
        [3, 3, 3],
        [3, 3, 4],
    ]


def test_window_index_for_chosen_ends_equals_the_full_index() -> None:
    entity = np.array(["a", "a", "a", "b", "b"])

    assert window_index(entity, 3, np.array([1, 4])).tolist() == [[0, 0, 1], [3, 3, 4]]


def test_average_path_length_small_trees() -> None:
    c = average_path_length(np.array([0, 1, 2, 3, 256]))

    assert c[:3].tolist() == [0.0, 0.0, 1.0]
    assert c[3] == pytest.approx(2 * (np.log(2) + np.euler_gamma) - 4 / 3)
    assert c[4] == pytest.approx(2 * (np.log(255) + np.euler_gamma) - 2 * 255 / 256)


def test_isolation_trees_score_like_scikit_learn() -> None:
    from sklearn.ensemble import IsolationForest

    rng = np.random.default_rng(3)
    train = rng.normal(size=(300, 4)).astype(np.float32)
    test = np.vstack([rng.normal(size=(50, 4)), rng.normal(6, 1, size=(5, 4))])

    trees = IsolationTrees.fit(train, n_trees=20, max_samples=64, seed=5)
    forest = IsolationForest(n_estimators=20, max_samples=64, random_state=5)
    expected = -forest.fit(train).score_samples(test)

    assert trees.score(test) == pytest.approx(expected, abs=1e-12)
    assert trees.score(test)[-5:].min() > trees.score(test)[:50].max()


def test_trailing_mean_stays_within_each_entity() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    entity = np.array(list("aaaabb"))

    out = trailing_mean(values, entity, 3)

    # An entity's first row stands in for the rows before it.
    assert np.allclose(out, [1.0, 4 / 3, 2.0, 3.0, 10.0, 40 / 3])
    assert np.allclose(trailing_mean(values[:2], entity[:2], 3), [1.0, 4 / 3])
    assert trailing_mean(values, entity, 1) is values
