"""Threshold rules and alarm smoothing.

A threshold is learnt from calibration scores: scores of reference rows the model
was not fitted on (the held-out tail of each entity's reference period).

* ``quantile``: the ``threshold_quantile`` of the calibration scores.
* ``pot`` (peaks over threshold): a generalised Pareto distribution is fitted to
  the largest ``threshold_tail`` share of the calibration scores, and the threshold is
  the score it predicts to be exceeded with probability ``threshold_risk``. The tail
  model extrapolates beyond the largest calibration score, which a quantile of a
  few hundred rows cannot do.

Either is then multiplied by ``threshold_margin`` (:func:`learn_threshold`). The
calibration rows are scored in batches, each after the rows its scores depend on
(:func:`calibration_scores`).

An alarm is raised on a row when at least ``alarm_min_rows`` of the last
``alarm_window`` rows of its entity (itself included) score above the threshold,
which suppresses isolated exceedances.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sagewatch.config import ModelSettings
    from sagewatch.sampling import Sample

log = logging.getLogger(__name__)

# Fewer exceedances than this make a tail fit meaningless; POT falls back.
MIN_EXCEEDANCES = 10
# Calibration rows scored per pass when the threshold is learnt.
_CALIBRATION_BATCH = 65_536


def calibration_scores(
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, Any]],
    z: np.ndarray,
    sample: Sample,
    context: int,
) -> np.ndarray:
    """Scores of the calibration rows (held-out rows, all rows when none is
    held out, or a sample of either), each scored after its context rows.

    ``z`` holds the sample's scaled rows; ``score(z, entity, position)`` returns
    their scores first. The rows go through it in batches of
    :data:`_CALIBRATION_BATCH`, each after the ``context`` rows before it, so
    memory does not grow with ``max_calibration_rows`` and every row scores as in
    one pass. (calibration rows,)
    """
    total = len(sample.scored)
    scores = np.empty(total)
    for start in range(0, total, _CALIBRATION_BATCH):
        lead = min(start, context)
        rows = slice(start - lead, min(start + _CALIBRATION_BATCH, total))
        part, _ = score(
            z[sample.scored[rows]], sample.segment[rows], sample.position[rows]
        )
        scores[start : rows.stop] = part[lead:]
    return scores[sample.calibration]


def learn_threshold(
    scores: np.ndarray, settings: ModelSettings, source: str
) -> tuple[float, dict[str, Any]]:
    """The threshold of the settings' rule on calibration ``scores``, and the rule
    as ``detector.json`` records it; ``source`` names the rows scored."""
    s = settings
    rule: dict[str, Any] = {
        "rule": s.threshold_rule,
        "margin": s.threshold_margin,
        "computed_on": f"{source} rows of the reference period",
        "n_rows": len(scores),
    }
    if s.threshold_rule == "pot":
        value, fit = pot_threshold(
            scores, risk=s.threshold_risk, initial_quantile=1 - s.threshold_tail
        )
        rule.update(risk=s.threshold_risk, tail=s.threshold_tail, fit=fit)
    else:
        value = quantile_threshold(scores, s.threshold_quantile)
        rule["quantile"] = s.threshold_quantile
    value *= s.threshold_margin
    log.info(
        "threshold %.6g (%s rule x %.3g) from %d %s scores",
        value,
        "quantile fallback of the pot"
        if "fallback" in rule.get("fit", {})
        else s.threshold_rule,
        s.threshold_margin,
        len(scores),
        source,
    )
    return float(value), rule


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
