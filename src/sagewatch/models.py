"""The building blocks of a detector besides the networks: scaler, rows, PCA, forest.

* :class:`Scaler` standardises features against the reference period, centring each
  entity on its own reference rows.
* :func:`window_index` turns rows in time order into sequences of ``length`` rows
  ending at each row, never crossing entities; :func:`trailing_mean` averages a
  row's values over the last rows of its entity (the dense autoencoder's errors).
* :func:`fit_pca` / :func:`pca_reconstruct` are the PCA reconstruction baseline.
* :class:`IsolationTrees` is a fitted Isolation Forest held as plain arrays, so it
  is saved as tensors and scored without pickle.

The autoencoders are in :mod:`sagewatch.networks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sagewatch.errors import NotFittedError

# Scaled inputs are clipped here so absurd readings give large, finite scores.
CLIP = 1e3
# Reference rows of one entity per block of scaler statistics (see Scaler).
BLOCK_ROWS = 65_536


class Scaler:
    """Standardise features with statistics of the reference period.

    With ``per_entity`` each entity is centred on the mean of its own reference
    rows (machines of one fleet run at different levels); the spread is the pooled
    within-entity standard deviation, which short references estimate poorly one
    entity at a time. Entities without reference rows are centred on the pooled
    reference mean.

    The statistics are sums in float64 that :meth:`add` adds to, one block of an
    entity's rows at a time, and :meth:`update` turns into centres and scale once,
    so a reference period of any length and any number of entities is learnt
    without holding its rows; :meth:`fit` cuts each entity's rows into
    blocks of :data:`BLOCK_ROWS`, as the training pipeline does, so both give the
    same bits.

    Notes:
        A feature that was (nearly) constant in the reference period would get a
        tiny standard deviation, and any later change would score astronomically.
        The scale is therefore floored at ``rel_floor`` times the feature's typical
        magnitude (and at ``abs_floor``), so a constant 96.0 that turns into 93.0
        scores about 31, not 3e8. The same floor bounds what the float32 storage
        of features costs: rounding a value x to float32 (relative error at most
        2^-24) moves it by at most 2^-24 |x| / (rel_floor * mean |x|) of its scale,
        6e-5 of the scale for values at the reference's typical magnitude.
    """

    def __init__(
        self,
        *,
        per_entity: bool = True,
        rel_floor: float = 1e-3,
        abs_floor: float = 1e-6,
    ) -> None:
        self.per_entity = per_entity
        self.rel_floor = rel_floor
        self.abs_floor = abs_floor

    def fit(
        self,
        x: np.ndarray,
        entity: np.ndarray,
        groups: Sequence[int] | None = None,
    ) -> Scaler:
        """Learn centres and scale from reference rows ``x`` (rows, features).

        ``groups[j]`` names the sensor of feature ``j``; see the class Notes. The
        statistics are computed in float64 whatever the type of ``x`` (feature
        files store float32).
        """
        self._moments: dict[str, _Moments] = {}
        for name, rows in _entity_rows(entity):
            part = x[rows]
            for start in range(0, len(part), BLOCK_ROWS):
                self.add(part[start : start + BLOCK_ROWS], str(name))
        return self.update(groups)

    def partial_fit(
        self, x: np.ndarray, entity: str, groups: Sequence[int] | None = None
    ) -> Scaler:
        """Add reference rows ``x`` (rows, features) of one entity to the statistics.

        Centres and scale are those of every row added so far. Rows added in
        other blocks round differently in the last bits: cut the same rows the
        same way for the same result. Recomputing them costs time in the number
        of entities; over many blocks, :meth:`add` them and :meth:`update` once.
        """
        return self.add(x, entity).update(groups)

    def add(self, x: np.ndarray, entity: str) -> Scaler:
        """Add reference rows of one entity to the sums, leaving centres and
        scale as they were until :meth:`update`."""
        x = np.asarray(x, dtype=np.float64)
        if not hasattr(self, "_moments"):
            self._moments = {}
        self._moments.setdefault(entity, _Moments(x.shape[1])).add(x)
        return self

    def update(self, groups: Sequence[int] | None = None) -> Scaler:
        """Centres and scale from every row added so far."""
        parts = list(self._moments.values())
        rows = sum(m.rows for m in parts)
        self.center_ = np.sum([m.total for m in parts], axis=0) / rows
        magnitude = np.sum([m.magnitude for m in parts], axis=0) / rows
        squares = np.sum([m.squares for m in parts], axis=0)
        if self.per_entity:
            self.entity_center_ = {k: m.mean.copy() for k, m in self._moments.items()}
        else:
            self.entity_center_ = {}
            shift = [m.rows * np.square(m.mean - self.center_) for m in parts]
            squares = squares + np.sum(shift, axis=0)
        spread = np.sqrt(squares / rows)
        floor = np.maximum(self.rel_floor * magnitude, self.abs_floor)
        if groups is not None:
            ids = np.asarray(groups)
            level = np.zeros(ids.max() + 1)
            np.maximum.at(level, ids, magnitude)
            degenerate = spread <= 1e-6 * level[ids]
            floor = np.where(
                degenerate, np.maximum(floor, self.rel_floor * level[ids]), floor
            )
        self.scale_ = np.maximum(spread, floor)
        return self

    def centers(self, entity: np.ndarray) -> np.ndarray:
        """The centre each row is measured from. (rows, features)"""
        out = np.empty((len(entity), len(self.center_)))
        for start, stop, center in self._runs(entity):
            out[start:stop] = center
        return out

    def transform(self, x: np.ndarray, entity: np.ndarray) -> np.ndarray:
        if not hasattr(self, "scale_"):
            raise NotFittedError("Scaler is not fitted; call fit first")
        # (rows, features): a float64 copy to work in, whatever the type of x
        z = np.array(x, dtype=np.float64)
        for start, stop, center in self._runs(entity):
            z[start:stop] -= center
        z /= self.scale_
        np.clip(z, -CLIP, CLIP, out=z)
        return z.astype(np.float32)

    def _runs(self, entity: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """First row, end and centre of each run of rows of one entity."""
        if not self.entity_center_:
            yield 0, len(entity), self.center_
            return
        _, starts = entity_runs(entity)
        stops = np.r_[starts[1:], len(entity)]
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            name = str(entity[start])
            yield start, stop, self.entity_center_.get(name, self.center_)


class _Moments:
    """Row count, sums, mean and squared deviations from the mean of one entity.

    Blocks are merged with the pairwise update of Chan, Golub and LeVeque, so the
    squared deviations never come from a difference of large sums.
    """

    def __init__(self, width: int) -> None:
        self.rows = 0
        self.total = np.zeros(width)
        self.magnitude = np.zeros(width)
        self.mean = np.zeros(width)
        self.squares = np.zeros(width)

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        total = x.sum(axis=0)
        mean = total / len(x)
        squares = np.square(x - mean).sum(axis=0)
        rows = self.rows + len(x)
        delta = mean - self.mean
        self.squares += squares + np.square(delta) * (self.rows * len(x) / rows)
        self.rows = rows
        self.total += total
        self.mean = self.total / rows
        self.magnitude += np.abs(x).sum(axis=0)


def _entity_rows(entity: np.ndarray) -> Iterator[tuple[Any, slice | np.ndarray]]:
    """Each entity and its rows: a slice when its rows are one run, else a mask."""
    _, starts = entity_runs(entity)
    names = entity[starts].tolist()
    if len(set(names)) < len(names):  # some entity comes back later
        for name in dict.fromkeys(names):
            yield name, entity == name
        return
    stops = np.r_[starts[1:], len(entity)].tolist()
    for name, start, stop in zip(names, starts.tolist(), stops, strict=True):
        yield name, slice(start, stop)


def entity_runs(entity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's run number and the first row of each run of equal entities.

    Rows grouped by entity make one run per entity. Returns (rows,) and (runs,).
    """
    new = np.r_[True, entity[1:] != entity[:-1]] if len(entity) else np.zeros(0, bool)
    return np.cumsum(new) - 1, np.flatnonzero(new)


def row_positions(entity: np.ndarray) -> np.ndarray:
    """Row number of each row within its entity; rows grouped by entity. (rows,)"""
    run, starts = entity_runs(entity)
    return np.arange(len(entity)) - starts[run]


def window_index(
    entity: np.ndarray, length: int, ends: np.ndarray | None = None
) -> np.ndarray:
    """Row numbers of the ``length`` rows ending at each row, within its entity.

    Rows must be grouped by entity and in time order. The first rows of an entity
    repeat its first row where there is no earlier row. With ``ends``, only the
    windows ending at those rows. (rows or ends, length)
    """
    run, starts = entity_runs(entity)
    first = starts[run]  # (rows,)
    ends = np.arange(len(entity)) if ends is None else np.asarray(ends, np.int64)
    offsets = np.arange(1 - length, 1)  # (length,)
    return np.maximum(ends[:, None] + offsets[None, :], first[ends][:, None])


def trailing_mean(values: np.ndarray, entity: np.ndarray, window: int) -> np.ndarray:
    """Mean of each row and the ``window - 1`` rows before it, within its entity.

    Rows must be grouped by entity and in time order; at an entity's start its first
    row stands in for the missing earlier ones (as in :func:`window_index`). Every
    row's window is added up oldest row first, so a row gets the same value in any
    block that holds its window. (rows, ...)
    """
    if window <= 1:
        return values
    n = len(values)
    total = np.zeros(values.shape, dtype=np.float64)
    for back in range(min(window, n + 1) - 1, -1, -1):
        total[back:] += values[: n - back]
    # The first window - 1 rows of each entity reached into the entity before.
    run, starts = entity_runs(entity)
    position = np.arange(n) - starts[run]
    near = np.flatnonzero(position < window - 1)
    if len(near):
        first = starts[run[near]]
        fixed = np.zeros((len(near), *values.shape[1:]), dtype=np.float64)
        for back in range(window - 1, -1, -1):
            fixed += values[np.maximum(near - back, first)]
        total[near] = fixed
    return total / window


def fit_pca(z: np.ndarray, variance: float) -> tuple[dict[str, np.ndarray], int]:
    """Principal components keeping ``variance`` of the reference variance."""
    mean = z.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    explained = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-12)
    k = int(min(np.searchsorted(explained, variance) + 1, vt.shape[0]))
    model = {"mean": mean.astype(np.float32), "components": vt[:k].astype(np.float32)}
    return model, k


def pca_reconstruct(model: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    mean, components = model["mean"], model["components"]
    return (z - mean) @ components.T @ components + mean


def average_path_length(n: np.ndarray) -> np.ndarray:
    """Expected path length of an unsuccessful search in a tree of ``n`` points."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 3.0)
    c = 2.0 * (np.log(safe - 1.0) + np.euler_gamma) - 2.0 * (safe - 1.0) / safe
    return np.where(n <= 1, 0.0, np.where(n == 2, 1.0, c))


class IsolationTrees:
    """A fitted Isolation Forest as arrays: scored with numpy, saved as tensors.

    ``feature``, ``threshold``, ``left``, ``right`` and ``leaf_length`` are
    (trees, nodes) arrays padded with leaves; ``leaf_length`` is a leaf's depth
    plus the expected remaining path length of the points it holds. The score is
    ``2 ** (-mean path length / c(max_samples))`` as in the original paper: near 1
    for isolated points, about 0.5 and below for ordinary ones.
    """

    def __init__(self, arrays: dict[str, np.ndarray], normaliser: float) -> None:
        self.arrays = arrays
        self.normaliser = normaliser

    @classmethod
    def fit(
        cls, z: np.ndarray, *, n_trees: int, max_samples: int, seed: int
    ) -> IsolationTrees:
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(
            n_estimators=n_trees,
            max_samples=min(max_samples, len(z)),
            random_state=seed,
        ).fit(z)
        trees = [estimator.tree_ for estimator in forest.estimators_]
        width = max(t.node_count for t in trees)
        arrays = {
            "feature": np.full((len(trees), width), -1, dtype=np.int64),
            "threshold": np.zeros((len(trees), width)),
            "left": np.zeros((len(trees), width), dtype=np.int64),
            "right": np.zeros((len(trees), width), dtype=np.int64),
            "leaf_length": np.zeros((len(trees), width)),
        }
        for i, tree in enumerate(trees):
            n = tree.node_count
            split = tree.children_left[:n] >= 0
            arrays["feature"][i, :n] = np.where(split, tree.feature[:n], -1)
            arrays["threshold"][i, :n] = tree.threshold[:n]
            arrays["left"][i, :n] = np.where(split, tree.children_left[:n], 0)
            arrays["right"][i, :n] = np.where(split, tree.children_right[:n], 0)
            arrays["leaf_length"][i, :n] = _node_depths(tree) + average_path_length(
                tree.n_node_samples[:n]
            )
        normaliser = float(average_path_length(np.array([forest.max_samples_]))[0])
        return cls(arrays, normaliser)

    def score(self, z: np.ndarray) -> np.ndarray:
        """Anomaly score per row, in (0, 1]. (rows,)"""
        a = self.arrays
        x = z.astype(np.float32)  # the trees split float32 values
        rows = np.arange(len(x))
        total = np.zeros(len(x))
        for t in range(a["feature"].shape[0]):
            node = np.zeros(len(x), dtype=np.int64)
            feature = a["feature"][t]
            while True:
                split = feature[node] >= 0
                if not split.any():
                    break
                f = np.where(split, feature[node], 0)
                go_left = x[rows, f] <= a["threshold"][t][node]
                child = np.where(go_left, a["left"][t][node], a["right"][t][node])
                node = np.where(split, child, node)
            total += a["leaf_length"][t][node]
        mean = total / a["feature"].shape[0]
        return np.power(2.0, -mean / max(self.normaliser, 1e-12))


def _node_depths(tree: Any) -> np.ndarray:
    depth = np.zeros(tree.node_count)
    for node in range(tree.node_count):  # parents come before their children
        for child in (tree.children_left[node], tree.children_right[node]):
            if child >= 0:
                depth[child] = depth[node] + 1
    return depth
