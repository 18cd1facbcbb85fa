"""The detectors side by side on labelled data.

When the data carry labels, the report compares the configured detector with the
other kinds fitted the same way: same features, same reference period, same
threshold rule and alarm smoothing; only ``detector`` differs. The baselines are
fitted for the comparison only and are not saved.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import polars as pl

from sagewatch.config import Settings
from sagewatch.evaluation import METRIC_KEYS, evaluate
from sagewatch.pipeline import detector_label
from sagewatch.schema import LABEL
from sagewatch.scoring import score_features
from sagewatch.training import fit_detector

log = logging.getLogger(__name__)

KINDS = ("autoencoder", "pca", "iforest")
METRICS = METRIC_KEYS


def metrics_row(detector: str, report: dict[str, Any], seconds: float | None) -> dict:
    """One row of the comparison table from an :func:`evaluate` report."""
    metrics = report.get("metrics", {})
    return {
        "detector": detector,
        **{k: metrics.get(k) for k in METRICS},
        "seconds": seconds,
    }


def compare_detectors(
    features: pl.DataFrame,
    feature_columns: list[str],
    settings: Settings,
    *,
    kinds: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Fit, score and evaluate each of ``kinds`` (default: all but the configured).

    Returns one row per detector with the labelled metrics and the seconds spent
    fitting and scoring; an empty list when the features carry no labels.
    """
    if LABEL not in features.columns:
        return []
    chosen = kinds or tuple(k for k in KINDS if k != settings.model.detector)
    rows = []
    for kind in chosen:
        other = settings.model_copy(
            update={"model": settings.model.model_copy(update={"detector": kind})}
        )
        log.info("comparison: fitting %s with the same settings", kind)
        started = time.perf_counter()
        detector, _ = fit_detector(features, feature_columns, other)
        scores = score_features(features, detector)
        seconds = round(time.perf_counter() - started, 3)
        rows.append(metrics_row(detector_label(kind, other), evaluate(scores), seconds))
        log.info(
            "comparison: %s F1 %s PR-AUC %s",
            kind,
            _short(rows[-1]["f1"]),
            _short(rows[-1]["pr_auc"]),
        )
    return rows


def _short(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"
