"""Score statistics and labelled metrics of a scores table (files: :mod:`.report`).

Metrics are computed on the rows outside the reference period (``in_reference`` 0)
when the scores say which those are, else on every row. A metric that is undefined
for the data (no positives, no negatives) is reported as ``None`` together with the
reason, never as a crash or a silent 0.

Notes:
    F1 is SKAB's F1 = TP / (TP + (FP + FN) / 2), which equals the usual harmonic
    mean of precision and recall. FAR = FP / (FP + TN) and MAR = FN / (FN + TP) are
    given in percent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from sagewatch.schema import ENTITY, LABEL, TIMESTAMP

log = logging.getLogger(__name__)

# The labelled metrics people read, in the order the report and the CLI show them.
METRIC_KEYS = (
    "precision",
    "recall",
    "f1",
    "far",
    "mar",
    "pr_auc",
    "roc_auc",
    "event_recall",
    "mean_detection_delay",
)


# ----------------------------------------------------------------------------- metrics


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    return None if den == 0 else scale * num / den


def labelled_metrics(
    label: np.ndarray, score: np.ndarray, flagged: np.ndarray
) -> dict[str, Any]:
    """Point-wise metrics of binary decisions and threshold-free ranking metrics.

    Undefined values are ``None`` and ``undefined`` says why: with no labelled
    anomaly, recall, F1, MAR, PR-AUC and ROC-AUC; with no normal row, FAR, PR-AUC
    (trivially 1) and ROC-AUC; with no flagged row, precision.
    """
    y = np.asarray(label).astype(bool)
    p = np.asarray(flagged).astype(bool)
    tp, fp = int(np.sum(y & p)), int(np.sum(~y & p))
    fn, tn = int(np.sum(y & ~p)), int(np.sum(~y & ~p))
    has_pos, has_neg = bool(y.any()), bool((~y).any())
    metrics: dict[str, Any] = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(tp, tp + (fp + fn) / 2) if has_pos else None,
        "far": _ratio(fp, fp + tn, 100.0),
        "mar": _ratio(fn, fn + tp, 100.0),
        "pr_auc": None,
        "roc_auc": None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "n_rows": int(y.size),
        "n_positive": int(y.sum()),
    }
    undefined = []
    if has_pos and has_neg:
        from sklearn.metrics import average_precision_score, roc_auc_score

        metrics["pr_auc"] = float(average_precision_score(y, score))
        metrics["roc_auc"] = float(roc_auc_score(y, score))
    elif not has_pos:
        undefined.append(
            "no labelled anomalies: recall, F1, MAR, PR-AUC and ROC-AUC are undefined"
        )
    else:
        undefined.append(
            "every row is labelled anomalous: FAR, PR-AUC and ROC-AUC are undefined"
        )
    if not p.any():
        undefined.append("no row is flagged: precision is undefined")
    if undefined:
        metrics["undefined"] = undefined
    return metrics


def event_metrics(
    entity: np.ndarray, label: np.ndarray, flagged: np.ndarray
) -> dict[str, Any]:
    """Share of labelled segments with at least one alarm, and mean delay in rows.

    A segment is a run of consecutive labelled rows of one entity; the delay is the
    number of rows from its first row to its first alarm inside it. Segments without
    an alarm count as missed and do not enter the mean delay.
    """
    y = np.asarray(label).astype(bool)
    p = np.asarray(flagged).astype(bool)
    ent = np.asarray(entity)
    same = ent[1:] == ent[:-1]
    joined = np.r_[False, y[1:] & y[:-1] & same] if y.size else y  # row i joins i-1
    starts = np.flatnonzero(y & ~joined)
    if starts.size == 0:
        return {
            "n_events": 0,
            "events_detected": 0,
            "event_recall": None,
            "mean_detection_delay": None,
        }
    ends = np.flatnonzero(y & ~np.r_[joined[1:], False]) + 1  # exclusive
    alarm_rows = np.r_[np.flatnonzero(p & y), y.size]  # y.size: no more alarms
    first_row = alarm_rows[np.searchsorted(alarm_rows, starts)]  # first at/after
    detected = first_row < ends
    delays = (first_row - starts)[detected]
    return {
        "n_events": int(starts.size),
        "events_detected": int(detected.sum()),
        "event_recall": float(detected.mean()),
        "mean_detection_delay": float(delays.mean()) if delays.size else None,
    }


def score_statistics(score: np.ndarray, percentiles: Sequence[float]) -> dict[str, Any]:
    """Summary statistics of the anomaly score."""
    if score.size == 0:
        return {"count": 0}
    return {
        "count": int(score.size),
        "mean": float(np.mean(score)),
        "std": float(np.std(score)),
        "min": float(np.min(score)),
        "max": float(np.max(score)),
        "percentiles": {f"p{p:g}": float(np.percentile(score, p)) for p in percentiles},
    }


def evaluate(
    scores: pl.DataFrame,
    *,
    top_n: int = 20,
    percentiles: Sequence[float] = (50, 90, 95, 99),
) -> dict[str, Any]:
    """Everything the report states, as plain JSON-ready values."""
    test = (
        scores.filter(pl.col("in_reference") == 0)
        if "in_reference" in scores.columns
        else scores
    )
    if test.height == 0:
        log.warning(
            "every row lies in the reference period: nothing to evaluate; shorten it "
            "(train_rows, train_until or train_fraction)"
        )
    flagged = test.filter(pl.col("is_anomaly") == 1)
    report: dict[str, Any] = {
        "rows": scores.height,
        "evaluated_rows": test.height,
        "entities": scores[ENTITY].n_unique(),
        "threshold": float(scores["threshold"][0]) if scores.height else None,
        "anomalies": flagged.height,
        "anomaly_rate": flagged.height / test.height if test.height else None,
        "score_statistics": score_statistics(
            test["anomaly_score"].to_numpy(), percentiles
        ),
        "per_entity": _per_entity(test),
        "top_sensors": dict(flagged["top_sensor"].value_counts(sort=True).iter_rows()),
        "top_anomalies": _top(test, top_n),
    }
    if LABEL in scores.columns and test.height:
        y = test[LABEL].to_numpy()
        report["metrics"] = labelled_metrics(
            y, test["anomaly_score"].to_numpy(), test["is_anomaly"].to_numpy()
        )
        report["metrics"].update(
            event_metrics(test[ENTITY].to_numpy(), y, test["is_anomaly"].to_numpy())
        )
        if "anomaly_kind" in test.columns:
            report["recall_by_kind"] = _recall_by_kind(test)
    return report


def _per_entity(test: pl.DataFrame) -> list[dict[str, Any]]:
    grouped = test.group_by(ENTITY, maintain_order=True).agg(
        pl.len().alias("rows"),
        pl.col("is_anomaly").sum().alias("anomalies"),
        pl.col("anomaly_score").max().alias("max_score"),
    )
    return grouped.to_dicts()


def _top(test: pl.DataFrame, n: int) -> list[dict[str, Any]]:
    cols = [
        TIMESTAMP,
        ENTITY,
        "anomaly_score",
        "top_sensor",
        *([LABEL] if LABEL in test.columns else []),
    ]
    top = (
        test.sort("anomaly_score", descending=True, maintain_order=True)
        .head(n)
        .select(cols)
    )
    return top.with_columns(
        pl.col(TIMESTAMP).dt.to_string("%Y-%m-%dT%H:%M:%S%z")
    ).to_dicts()


def _recall_by_kind(test: pl.DataFrame) -> dict[str, float]:
    kinds = test.filter((pl.col(LABEL) == 1) & (pl.col("anomaly_kind") != ""))
    grouped = (
        kinds.group_by("anomaly_kind")
        .agg(pl.col("is_anomaly").mean())
        .sort("anomaly_kind")
    )
    return {k: float(v) for k, v in grouped.iter_rows()}


# ----------------------------------------------------------------------------- report
