"""Threshold rules and alarm smoothing.

A threshold is learnt from calibration scores: scores of reference rows the model
was not fitted on (the held-out tail of each entity's reference period).

* ``quantile``: the ``threshold_quantile`` of the calibration scores.
* ``pot`` (peaks over threshold): a generalised Pareto distribution is fitted to
  the largest ``threshold_tail`` share of the calibration scores, and the threshold is
  the score it predicts to be exceeded with probability ``threshold_risk``. The tail
  model extrapolates beyond the largest calibration score, which a quantile of a
  few hundred rows cannot do.

Either is then multiplied by ``threshold_margin``.

An alarm is raised on a row when at least ``alarm_min_rows`` of the last
``alarm_window`` rows of its entity (itself included) score above the threshold,
which suppresses isolated exceedances.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Fewer exceedances than this make a tail fit meaningless; POT falls back.
MIN_EXCEEDANCES = 10


def quantile_threshold(scores: np.ndarray, quantile: float) -> float:
    return float(np.quantile(scores, quantile))


def pot_threshold(
    scores: np.ndarray, *, risk: float, initial_quantile: float
) -> tuple[float, dict[str, Any]]:
    """Peaks-over-threshold: the score exceeded with probability ``risk``.

    Returns the threshold and the fit (initial threshold, number of exceedances,
    GPD shape and scale). With fewer than :data:`MIN_EXCEEDANCES` distinct
    exceedances, or a fitted shape of 1 or more (a tail without a mean), it falls
    back to the empirical ``1 - risk`` quantile and says so in the returned fit.

    Notes:
        The generalised Pareto distribution is fitted by probability-weighted
        moments (Hosking and Wallis, 1987), which is closed-form and, for the
        tens to hundreds of exceedances a reference period gives, less variable
        than maximum likelihood. Calibration scores of overlapping sequences are
        serially correlated; the fit treats them as independent, so the tail is
        less certain than the count of rows suggests.
    """
    scores = np.asarray(scores, dtype=np.float64)
    initial = float(np.quantile(scores, initial_quantile))
    excess = np.sort(scores[scores > initial] - initial)
    fit: dict[str, Any] = {
        "initial_threshold": initial,
        "initial_quantile": initial_quantile,
        "exceedances": int(excess.size),
    }
    if excess.size < MIN_EXCEEDANCES or np.ptp(excess) <= 0:
        return _fallback(scores, risk, fit, "too few distinct exceedances")
    shape, scale = _gpd_pwm(excess)
    if not (shape < 1 and scale > 0):
        return _fallback(scores, risk, fit, f"fitted tail shape {shape:.3g} >= 1")
    ratio = risk * scores.size / excess.size
    if ratio >= 1:
        value = float(np.quantile(scores, 1 - risk))
    elif abs(shape) < 1e-9:
        value = initial - scale * np.log(ratio)
    else:
        value = initial + scale / shape * (ratio ** (-shape) - 1.0)
    fit.update(shape=float(shape), scale=float(scale))
    return float(value), fit


def _gpd_pwm(excess: np.ndarray) -> tuple[float, float]:
    """Shape and scale of a GPD (location 0) from sorted excesses, by PWM.

    With ``a0 = E[X]`` and ``a1 = E[X (1 - F(X))]``: shape ``2 - a0 / (a0 - 2 a1)``
    and scale ``2 a0 a1 / (a0 - 2 a1)``; a shape of 0 is the exponential tail.
    """
    n = excess.size
    a0 = float(excess.mean())
    a1 = float(np.sum(excess * (n - 1 - np.arange(n))) / (n * (n - 1)))
    denominator = a0 - 2.0 * a1
    if denominator <= 0:
        return float("inf"), 0.0
    return 2.0 - a0 / denominator, 2.0 * a0 * a1 / denominator


def _fallback(
    scores: np.ndarray, risk: float, fit: dict[str, Any], reason: str
) -> tuple[float, dict[str, Any]]:
    log.warning("POT threshold: %s; using the %.4g quantile", reason, 1 - risk)
    fit["fallback"] = f"{reason}: empirical {1 - risk:.6g} quantile"
    return float(np.quantile(scores, 1 - risk)), fit


def alarms(
    above: np.ndarray, entity: np.ndarray, *, min_rows: int, window: int
) -> np.ndarray:
    """1 where at least ``min_rows`` of the last ``window`` rows are above. (rows,)

    Rows are grouped by entity in time order; counts never cross entities, and
    rows before an entity's first row count as below the threshold.
    """
    hit = np.asarray(above, dtype=np.int64)
    if window <= 1:
        return (hit >= min_rows).astype(np.int8)
    n = len(hit)
    counts = np.cumsum(np.r_[0, hit])  # counts[i] = hits among rows < i
    starts = np.r_[0, np.flatnonzero(entity[1:] != entity[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    lo = np.maximum(np.arange(n) - window + 1, first)
    in_window = counts[1:] - counts[lo]
    return (in_window >= min_rows).astype(np.int8)
