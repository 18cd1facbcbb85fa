"""Threshold rules and alarm smoothing on hand-checked inputs."""

from __future__ import annotations

import numpy as np
import pytest

from sagewatch.thresholds import alarms, pot_threshold, quantile_threshold


def test_quantile_threshold() -> None:
    assert quantile_threshold(np.arange(101.0), 0.9) == pytest.approx(90.0)


def test_pot_recovers_an_exponential_tail() -> None:
    scores = np.random.default_rng(0).exponential(1.0, 20_000)

    value, fit = pot_threshold(scores, risk=1e-4, initial_quantile=0.9)

    # P(X > x) = exp(-x): the 1e-4 exceedance level is ln(1e4) = 9.21, beyond
    # the sample's 1 - 1e-4 quantile estimated from only two rows.
    assert value == pytest.approx(np.log(1e4), rel=0.1)
    assert fit["exceedances"] == 2000
    assert abs(fit["shape"]) < 0.1
    assert "fallback" not in fit


def test_pot_with_too_few_exceedances_falls_back_to_quantile() -> None:
    scores = np.arange(50.0)

    value, fit = pot_threshold(scores, risk=0.01, initial_quantile=0.9)

    assert fit["exceedances"] == 5
    assert "fallback" in fit
    assert value == pytest.approx(np.quantile(scores, 0.99))


def test_pot_on_constant_scores_falls_back() -> None:
    value, fit = pot_threshold(np.full(500, 2.0), risk=1e-3, initial_quantile=0.9)

    assert value == 2.0
    assert "fallback" in fit


def test_alarms_min_rows_of_window() -> None:
    above = np.array([1, 0, 1, 1, 0, 0, 1, 1])
    entity = np.array(["a"] * 8)

    out = alarms(above, entity, min_rows=2, window=3)

    assert out.tolist() == [0, 0, 1, 1, 1, 0, 0, 1]
    assert out.dtype == np.int8


def test_alarms_do_not_cross_entities() -> None:
    above = np.array([1, 1, 1, 1, 0])
    entity = np.array(["a", "a", "b", "b", "b"])

    out = alarms(above, entity, min_rows=2, window=2)

    # Row 2 is b's first row: a's rows do not count towards it.
    assert out.tolist() == [0, 1, 0, 1, 0]


def test_alarms_one_of_one_is_the_threshold_decision() -> None:
    above = np.array([True, False, True])

    assert alarms(above, np.array(["a"] * 3), min_rows=1, window=1).tolist() == [
        1,
        0,
        1,
    ]
