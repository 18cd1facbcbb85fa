"""Score statistics, labelled metrics and the JSON + self-contained HTML report.

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

import base64
import html
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from sagewatch import storage
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
REPORT_JSON = "evaluation_report.json"
REPORT_HTML = "evaluation_report.html"


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


def write_report(
    scores: pl.DataFrame,
    output_dir: str,
    *,
    top_n: int = 20,
    percentiles: Sequence[float] = (50, 90, 95, 99),
    max_plot_entities: int = 12,
    context: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[storage.FileInfo]]:
    """Write ``evaluation_report.json`` and ``.html`` to ``output_dir``."""
    report = evaluate(scores, top_n=top_n, percentiles=percentiles)
    if context:
        report["context"] = context
    page = render_html(
        scores, report, max_plot_entities=max_plot_entities, progress=progress
    )
    infos = [
        storage.write_json(storage.join(output_dir, REPORT_JSON), report),
        storage.write_bytes(
            storage.join(output_dir, REPORT_HTML), page.encode("utf-8")
        ),
    ]
    log.info(
        "report: %d rows evaluated, %d flagged, written to %s",
        report["evaluated_rows"],
        report["anomalies"],
        output_dir,
    )
    return report, infos


def render_html(
    scores: pl.DataFrame,
    report: dict[str, Any],
    *,
    max_plot_entities: int = 12,
    progress: bool = False,
) -> str:
    """One HTML page with every image inlined, so it opens offline."""
    import matplotlib

    matplotlib.use("Agg")
    sections = [
        "<h1>sagewatch evaluation report</h1>",
        _summary_table(report),
        _metrics_table(report.get("metrics")),
        _comparison_table(report),
        "<h2>Score distribution</h2>",
        _img(_plot_histogram(scores, report["threshold"])),
        "<h2>Anomaly score over time</h2>",
    ]
    entities = scores[ENTITY].unique(maintain_order=True).to_list()
    shown = entities[:max_plot_entities]
    for entity in tqdm(
        shown, desc="plot", unit="entity", disable=not progress, leave=False
    ):
        sections.append(
            _img(
                _plot_entity(
                    scores.filter(pl.col(ENTITY) == entity), entity, report["threshold"]
                )
            )
        )
    if len(entities) > max_plot_entities:
        sections.append(
            f"<p>{len(entities) - max_plot_entities} more entities not plotted.</p>"
        )
    sections.append(f"<h2>Top {len(report['top_anomalies'])} scores</h2>")
    sections.append(_table(report["top_anomalies"]))
    if report["top_sensors"]:
        sections.append("<h2>Top sensor of flagged rows</h2>")
        sections.append(
            _table([{"sensor": k, "rows": v} for k, v in report["top_sensors"].items()])
        )
    sections.append(_training_section(report.get("context", {}).get("training")))
    sections.append(_quality_section(report.get("context", {}).get("data_quality")))
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<title>sagewatch evaluation report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th{background:#f2f2f2}img{max-width:100%}"
        f"</style></head><body>{body}</body></html>\n"
    )


def _summary_table(report: dict[str, Any]) -> str:
    stats = report["score_statistics"]
    rows = [
        {"what": "rows scored", "value": report["rows"]},
        {
            "what": "rows evaluated (outside reference period)",
            "value": report["evaluated_rows"],
        },
        {"what": "entities", "value": report["entities"]},
        {"what": "threshold", "value": _fmt(report["threshold"])},
        {"what": "rows flagged", "value": report["anomalies"]},
        {
            "what": "score mean / max",
            "value": f"{_fmt(stats.get('mean'))} / {_fmt(stats.get('max'))}",
        },
    ]
    return "<h2>Summary</h2>" + _table(rows)


def _training_section(training: dict[str, Any] | None) -> str:
    """How many reference rows the detector was fitted on, and the samples drawn
    from them (training cost and memory follow the samples, not the rows)."""
    if not training:
        return ""
    sample = training["sample"]

    def drawn(part: str) -> str:
        return f"{sample[part]['used']} of {sample[part]['of']}"

    rows = [
        {"what": "reference rows", "value": training["reference_rows"]},
        {
            "what": "training / held-out rows",
            "value": f"{training['train_rows']} / {training['validation_rows']}",
        },
        {"what": "training samples (seeded sample)", "value": drawn("training")},
        {"what": "validation samples (early stopping)", "value": drawn("validation")},
        {"what": "rows the threshold is computed on", "value": drawn("calibration")},
        {"what": "seed", "value": sample["seed"]},
    ]
    return "<h2>Training sample</h2>" + _table(rows)


def _quality_section(quality: dict[str, Any] | None) -> str:
    """What input validation repaired and dropped, from the features stage."""
    if not quality:
        return ""
    rows = [
        {"what": "input rows", "value": quality.get("rows_in")},
        {"what": "rows kept", "value": quality.get("rows_out")},
        *({"what": f"dropped: {k}", "value": v} for k, v in quality["dropped"].items()),
        *(
            {"what": f"repaired: {k}", "value": v}
            for k, v in quality["repaired"].items()
        ),
    ]
    for key in ("empty_sensors", "constant_sensors", "ignored_columns"):
        if quality.get(key):
            rows.append({"what": key.replace("_", " "), "value": quality[key]})
    sensors = [{"sensor": k, **v} for k, v in quality.get("sensors", {}).items()]
    return "<h2>Input data quality</h2>" + _table(rows) + _table(sensors)


def _metrics_table(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "<p>No labels in the input: labelled metrics are not available.</p>"
    rows = [{"metric": k, "value": _fmt(metrics.get(k))} for k in METRIC_KEYS]
    notes = "".join(f"<p>{html.escape(u)}</p>" for u in metrics.get("undefined", []))
    return "<h2>Labelled metrics (FAR and MAR in %)</h2>" + _table(rows) + notes


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's detector and the baselines in ``context.comparison``, one row
    each, with the same labelled metrics (empty without labels)."""
    metrics = report.get("metrics")
    others = (report.get("context") or {}).get("comparison") or []
    if not metrics or not others:
        return []
    own = (report.get("context") or {}).get("detector", "configured")
    keys = [k for k in others[0] if k not in ("detector", "seconds")]
    first = {"detector": f"{own} (this run)", **{k: metrics.get(k) for k in keys}}
    return [first, *({k: v for k, v in r.items() if k != "seconds"} for r in others)]


def _comparison_table(report: dict[str, Any]) -> str:
    rows = comparison_rows(report)
    if not rows:
        return ""
    return (
        "<h2>Detectors side by side (same features, reference period, threshold "
        "rule and alarm smoothing)</h2>" + _table(rows)
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row.values())
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes) -> str:
    return (
        f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
    )


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(
        buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None}
    )
    plt.close(fig)
    return buffer.getvalue()


def _plot_histogram(scores: pl.DataFrame, threshold: float | None) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    values = np.log10(np.maximum(scores["anomaly_score"].to_numpy(), 1e-12))
    ax.hist(values, bins=80, color="#4c72b0")
    if threshold:
        ax.axvline(np.log10(max(threshold, 1e-12)), color="#c44e52", label="threshold")
        ax.legend()
    ax.set_xlabel("log10 anomaly score (all rows, reference period included)")
    ax.set_ylabel("rows")
    return _png(fig)


def _plot_entity(rows: pl.DataFrame, entity: str, threshold: float | None) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.6))
    t = rows[TIMESTAMP].to_numpy()
    s = rows["anomaly_score"].to_numpy()
    if LABEL in rows.columns:
        y = rows[LABEL].to_numpy().astype(bool)
        ax.fill_between(
            t,
            0,
            1,
            where=y,
            transform=ax.get_xaxis_transform(),
            color="#f0c987",
            alpha=0.6,
            label="labelled anomaly",
        )
    if "in_reference" in rows.columns:
        ref = rows["in_reference"].to_numpy().astype(bool)
        ax.fill_between(
            t,
            0,
            1,
            where=ref,
            transform=ax.get_xaxis_transform(),
            color="#cfe3cf",
            alpha=0.5,
            label="reference period",
        )
    ax.plot(t, s, lw=0.7, color="#4c72b0", label="score")
    flagged = rows["is_anomaly"].to_numpy().astype(bool)
    ax.scatter(t[flagged], s[flagged], s=8, color="#c44e52", zorder=3, label="flagged")
    if threshold:
        ax.axhline(threshold, color="#c44e52", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(str(entity), loc="left", fontsize=10)
    ax.legend(loc="upper left", fontsize=7, ncol=5)
    return _png(fig)
