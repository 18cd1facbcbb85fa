"""Detection quality of the three detectors on labelled real data (SKAB and NAB).

Runs the product's own stages (``stage_features``, ``stage_train``,
``stage_score`` and :func:`sagewatch.evaluation.evaluate`) with the configuration
in ``config.yaml`` plus only the data mapping each data set needs, once per
detector, and prints one table: F1, FAR, MAR, PR-AUC, ROC-AUC, event recall, mean
detection delay and time per file. The table is also written as JSON.

SKAB protocol (../shared/data/README.md): every file is one entity, its first
``--train-rows`` rows are the reference period and the rest is scored; one
confusion matrix is pooled over the scored rows of all files. NAB: each file is
one entity labelled by its anomaly windows; the first ``--nab-train-rows`` rows of
each file (before the first window in both files) are the reference period.

Usage (from the repository root):

    python benchmarks/detection.py
    python benchmarks/detection.py --set threshold_rule=quantile --set seed=7
    python benchmarks/detection.py --methods autoencoder --seeds 42 1 2 3 4 5 6 7 8 9 \
        --output benchmarks/results/detection_seeds.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sagewatch import __version__, storage
from sagewatch.config import Settings, load_settings
from sagewatch.evaluation import evaluate
from sagewatch.pipeline import stage_features, stage_score, stage_train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("autoencoder", "pca", "iforest")
COLUMNS = (
    "f1",
    "far",
    "mar",
    "pr_auc",
    "roc_auc",
    "event_recall",
    "mean_detection_delay",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    datasets = {
        "skab": (
            args.skab,
            {
                "sep": ";",
                "timestamp_column": "datetime",
                "label_column": "anomaly",
                "train_rows": args.train_rows,
            },
        ),
        "nab": (
            args.nab / "realKnownCause",
            {
                "timestamp_column": "timestamp",
                "label_column": None,
                "label_windows": str(args.nab / "anomaly_windows.json"),
                "train_rows": args.nab_train_rows,
            },
        ),
    }
    seeds = args.seeds or [None]
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        folder, mapping = datasets[name]
        for method in args.methods:
            for seed in seeds:
                chosen = {} if seed is None else {"seed": str(seed)}
                settings = load_settings(
                    args.config,
                    environ={},
                    overrides={**mapping, **overrides, **chosen, "detector": method},
                )
                rows.append(run_one(name, folder, method, settings))
                _print_row(rows[-1])
    _print_table(rows)
    summary = _seed_summary(rows) if args.seeds else []
    for line in summary:
        print(_summary_line(line))
    result = {
        "command": " ".join(["python", "benchmarks/detection.py", *sys.argv[1:]]),
        "overrides": overrides,
        "model_settings": load_settings(
            args.config, environ={}, overrides=overrides
        ).model.model_dump(mode="json"),
        "sagewatch_version": __version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        **({"seed_summary": summary} if args.seeds else {}),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(args.output), result)
    print(f"\nwritten to {args.output}")
    return 0


def run_one(
    dataset: str, folder: Path, method: str, settings: Settings
) -> dict[str, Any]:
    """Features, train, score and evaluate one data set with one detector."""
    with tempfile.TemporaryDirectory(prefix="sagewatch-bench-") as tmp:
        features, _ = stage_features(settings, str(folder), f"{tmp}/features")
        started = time.perf_counter()
        detector, train = stage_train(settings, features, f"{tmp}/model")
        scores, score = stage_score(settings, features, detector, f"{tmp}/scores")
        seconds = time.perf_counter() - started
    report = evaluate(scores)
    metrics = report["metrics"]
    files = scores["machine_id"].n_unique()
    return {
        "dataset": dataset,
        "method": method,
        "seed": settings.model.seed,
        "files": files,
        "scored_rows": report["evaluated_rows"],
        **{k: metrics.get(k) for k in COLUMNS},
        "events": metrics.get("n_events"),
        "threshold": detector.threshold_,
        "train_seconds": train.seconds,
        "score_seconds": score.seconds,
        "seconds_per_file": round(seconds / max(files, 1), 3),
        "confusion": metrics["confusion"],
    }


def _seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PR-AUC spread over the seeds of each data set and method, and how many seeds
    meet the SKAB goal (F1 >= 0.82 with FAR <= 12 % and MAR <= 22 %)."""
    out = []
    for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
        runs = [r for r in rows if (r["dataset"], r["method"]) == (dataset, method)]
        pr = [r["pr_auc"] for r in runs if r["pr_auc"] is not None]
        goal = [
            r["seed"]
            for r in runs
            if (r["f1"] or 0) >= 0.82
            and (r["far"] or 0) <= 12
            and (r["mar"] or 0) <= 22
        ]
        out.append(
            {
                "dataset": dataset,
                "method": method,
                "seeds": [r["seed"] for r in runs],
                "pr_auc_mean": sum(pr) / len(pr) if pr else None,
                "pr_auc_min": min(pr, default=None),
                "pr_auc_max": max(pr, default=None),
                "seeds_meeting_goal": goal if dataset == "skab" else None,
            }
        )
    return out


def _summary_line(s: dict[str, Any]) -> str:
    line = (
        f"{s['dataset']:<5} {s['method']:<12} {len(s['seeds'])} seeds: PR-AUC mean "
        f"{_fmt(s['pr_auc_mean'])} (min {_fmt(s['pr_auc_min'])}, max "
        f"{_fmt(s['pr_auc_max'])})"
    )
    if s["seeds_meeting_goal"] is None:
        return line
    return (
        f"{line}; F1/FAR/MAR goal met by {len(s['seeds_meeting_goal'])} of "
        f"{len(s['seeds'])}"
    )


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_HEADER = (
    f"{'data':<5} {'method':<12} {'seed':>4} {'F1':>6} {'FAR %':>6} {'MAR %':>6} "
    f"{'PR-AUC':>7} {'ROC-AUC':>7} {'ev.rec':>6} {'delay':>6} {'s/file':>7}"
)


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['dataset']:<5} {row['method']:<12} {row['seed']:>4} "
        f"{_fmt(row['f1']):>6} {_fmt(row['far'], 1):>6} {_fmt(row['mar'], 1):>6} "
        f"{_fmt(row['pr_auc']):>7} "
        f"{_fmt(row['roc_auc']):>7} {_fmt(row['event_recall'], 2):>6} "
        f"{_fmt(row['mean_detection_delay'], 0):>6} {row['seconds_per_file']:>7.2f}"
    )


def _print_row(row: dict[str, Any]) -> None:
    print(_line(row), file=sys.stderr, flush=True)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(_HEADER)
    for row in rows:
        print(_line(row))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skab", type=Path, default=SHARED / "skab" / "valve1")
    p.add_argument("--nab", type=Path, default=SHARED / "nab")
    p.add_argument("--train-rows", type=int, default=400)
    p.add_argument("--nab-train-rows", type=int, default=2000)
    p.add_argument("--datasets", nargs="+", default=["skab", "nab"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[],
        help="Run each detector once per seed and summarise the spread.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a setting (repeatable), e.g. --set threshold_rule=quantile.",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "detection.json",
    )
    return p


if __name__ == "__main__":
    raise SystemExit(main())
