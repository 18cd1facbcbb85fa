"""The evaluation report: ``evaluation_report.json`` and one self-contained HTML page.

Every plot is a PNG inlined as base64, so the page opens offline and can be mailed
or stored as one file. The page shows what ``evaluation_report.json`` holds: the
summary, the labelled metrics, the detectors side by side, score plots, the top
scores and sensors, the training sample and the data-quality summary.
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
from sagewatch.evaluation import METRIC_KEYS, evaluate
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP

log = logging.getLogger(__name__)

REPORT_JSON = "evaluation_report.json"
REPORT_HTML = "evaluation_report.html"


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
    with storage.replacing(output_dir):
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
        _shade(ax, t, rows[LABEL], "#f0c987", 0.6, "labelled anomaly")
    if "in_reference" in rows.columns:
        _shade(ax, t, rows["in_reference"], "#cfe3cf", 0.5, "reference period")
    ax.plot(t, s, lw=0.7, color="#4c72b0", label="score")
    flagged = rows["is_anomaly"].to_numpy().astype(bool)
    ax.scatter(t[flagged], s[flagged], s=8, color="#c44e52", zorder=3, label="flagged")
    if threshold:
        ax.axhline(threshold, color="#c44e52", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(str(entity), loc="left", fontsize=10)
    ax.legend(loc="upper left", fontsize=7, ncol=5)
    return _png(fig)


def _shade(
    ax: Any, t: np.ndarray, mask: pl.Series, color: str, alpha: float, label: str
) -> None:
    """Shade the spans of ``t`` where ``mask`` is set, across the whole plot height."""
    ax.fill_between(
        t,
        0,
        1,
        where=mask.to_numpy().astype(bool),
        transform=ax.get_xaxis_transform(),
        color=color,
        alpha=alpha,
        label=label,
    )
