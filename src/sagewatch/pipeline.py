"""Local orchestration of the stages, and the manifest each run leaves behind.

Each ``stage_*`` function reads its inputs from URIs, calls the pure stage code and
writes its outputs to URIs, returning a :class:`StageRecord`. :func:`run` chains them
and keeps tables in memory between stages, so nothing is read twice. The SageMaker
entry points call the same stage functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from sagewatch import __version__, storage
from sagewatch.comparison import compare_detectors
from sagewatch.config import Settings
from sagewatch.detector import Detector
from sagewatch.evaluation import write_report
from sagewatch.features import build_features, feature_names, sensors_of
from sagewatch.schema import ENTITY, TIMESTAMP, Dataset, load_raw
from sagewatch.scoring import score_features
from sagewatch.synthetic import generate
from sagewatch.training import fit_detector

log = logging.getLogger(__name__)

RAW_STEM = "sensor_data"
FEATURES_STEM = "features"
SCORES_CSV = "anomaly_scores.csv"
SCORES_PARQUET = "anomaly_scores.parquet"
MANIFEST = "run_manifest.json"


@dataclass
class StageRecord:
    """What one stage read, wrote, dropped and how long it took."""

    name: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int | None = None
    rows_out: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """The outcome of :func:`run`: records, the report and where things are."""

    data_dir: str
    stages: list[StageRecord]
    report: dict[str, Any]
    manifest_uri: str


class _Timer:
    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)


def layout(settings: Settings, data_dir: str) -> dict[str, str]:
    """Where each stage writes under ``data_dir`` (the prefixes come from config)."""
    d = settings.data
    return {
        "raw": storage.join(data_dir, d.raw_data_prefix),
        "features": storage.join(data_dir, d.features_prefix),
        "model": storage.join(data_dir, d.model_prefix),
        "scores": storage.join(data_dir, d.scores_prefix),
        "evaluation": storage.join(data_dir, d.evaluation_prefix),
    }


# ----------------------------------------------------------------------------- stages


def stage_generate(settings: Settings, output_dir: str) -> tuple[str, StageRecord]:
    """Write the synthetic data set as one CSV per machine under ``output_dir``."""
    with _Timer() as timer:
        frame = generate(
            settings.generate,
            seed=settings.model.seed,
            reference_fraction=settings.reference.train_fraction,
        )
        infos = storage.write_partitioned(
            frame, output_dir, by="machine_id", stem=RAW_STEM, suffix=".csv"
        )
    record = StageRecord(
        "generate",
        outputs=[i.as_dict() for i in infos],
        rows_out=frame.height,
        seconds=timer.seconds,
    )
    return output_dir, record


def stage_features(
    settings: Settings,
    input_uri: str,
    output_dir: str,
    *,
    dataset: Dataset | None = None,
) -> tuple[pl.DataFrame, StageRecord]:
    """Validate raw input and write its rolling features to ``output_dir``."""
    with _Timer() as timer:
        data = dataset or load_raw(input_uri, settings.data, settings.quality)
        features = build_features(
            data.frame, data.sensors, settings.features, data.passthrough
        )
        infos = storage.write_partitioned(
            features, output_dir, by=ENTITY, stem=FEATURES_STEM
        )
    record = StageRecord(
        "features",
        inputs=_describe_inputs(input_uri),
        outputs=[i.as_dict() for i in infos],
        rows_in=data.quality["rows_in"],
        rows_out=features.height,
        dropped=data.quality["dropped"],
        seconds=timer.seconds,
        details={"sensors": data.sensors, "quality": data.quality},
    )
    return features, record


def stage_train(
    settings: Settings,
    features: pl.DataFrame | str,
    model_dir: str,
    *,
    progress: bool = False,
) -> tuple[Detector, StageRecord]:
    """Fit a detector on the reference period and save it to ``model_dir``."""
    with _Timer() as timer:
        inputs = []
        if isinstance(features, str):
            inputs = _describe_inputs(features)
            features = read_features(features)
        columns = feature_names(
            sensors_of(features.columns), settings.features.statistics
        )
        detector, info = fit_detector(features, columns, settings, progress=progress)
        fingerprint = hashlib.sha256(
            features.hash_rows(seed=0).to_numpy().tobytes()
        ).hexdigest()
        written = detector.save(
            model_dir,
            extra={
                "config": settings.model_dump(mode="json"),
                "reference": info,
                "training_data_sha256": fingerprint,
            },
        )
    record = StageRecord(
        "train",
        inputs=inputs,
        outputs=[w.as_dict() for w in written],
        rows_in=features.height,
        rows_out=info["train_rows"],
        seconds=timer.seconds,
        details={
            "threshold": detector.threshold_,
            **info,
            "training": {k: v for k, v in detector.training_.items() if k != "history"},
        },
    )
    return detector, record


def stage_score(
    settings: Settings,
    features: pl.DataFrame | str,
    detector: Detector | str,
    output_dir: str,
    *,
    progress: bool = False,
) -> tuple[pl.DataFrame, StageRecord]:
    """Score a features table and write ``anomaly_scores.csv`` and ``.parquet``."""
    with _Timer() as timer:
        inputs = []
        if isinstance(detector, str):
            inputs += [
                storage.file_info(storage.join(detector, n)).as_dict()
                for n in ("detector.json", "weights.pt")
            ]
            detector = Detector.load(detector)
        source = features if isinstance(features, str) else "features"
        if isinstance(features, str):
            inputs += _describe_inputs(features)
            features = read_features(features)
        scores = score_features(features, detector, source=source, progress=progress)
        written = [
            storage.write_table(scores, storage.join(output_dir, SCORES_CSV)),
            storage.write_table(scores, storage.join(output_dir, SCORES_PARQUET)),
        ]
    record = StageRecord(
        "score",
        inputs=inputs,
        outputs=[w.as_dict() for w in written],
        rows_in=features.height,
        rows_out=scores.height,
        seconds=timer.seconds,
        details={
            "threshold": detector.threshold_,
            "flagged": int(scores["is_anomaly"].sum()),
        },
    )
    return scores, record


def stage_evaluate(
    settings: Settings,
    scores: pl.DataFrame | str,
    output_dir: str,
    *,
    context: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], StageRecord]:
    """Write the JSON and HTML report for a scores table."""
    with _Timer() as timer:
        inputs = []
        if isinstance(scores, str):
            inputs = _describe_inputs(scores)
            scores = read_scores(scores)
        ev = settings.evaluation
        report, written = write_report(
            scores,
            output_dir,
            top_n=ev.top_n,
            percentiles=ev.percentiles,
            max_plot_entities=ev.max_plot_entities,
            context=context,
        )
    record = StageRecord(
        "evaluate",
        inputs=inputs,
        outputs=[w.as_dict() for w in written],
        rows_in=scores.height,
        seconds=timer.seconds,
    )
    return report, record


def read_features(uri: str) -> pl.DataFrame:
    """Read a features table (file or folder of parts) in canonical order."""
    return storage.read_table(uri).sort([ENTITY, TIMESTAMP], maintain_order=True)


def read_scores(uri: str) -> pl.DataFrame:
    """Read a scores table written by :func:`stage_score` (CSV or Parquet)."""
    scores = storage.read_table(uri)
    if scores.schema.get("timestamp") == pl.String:
        scores = scores.with_columns(
            pl.col("timestamp").str.to_datetime(time_zone="UTC", time_unit="us")
        )
    return scores.with_columns(
        pl.col("machine_id").cast(pl.String), pl.col("top_sensor").cast(pl.String)
    )


# ----------------------------------------------------------------------------- run


def run(
    settings: Settings,
    *,
    data_dir: str,
    input_uri: str | None = None,
    progress: bool = False,
) -> RunResult:
    """Run every stage in order and write ``run_manifest.json`` under ``data_dir``."""
    paths = layout(settings, data_dir)
    started = datetime.now(UTC)
    stages: list[StageRecord] = []
    if input_uri is None:
        input_uri, record = stage_generate(settings, paths["raw"])
        stages.append(record)
    features, record = stage_features(settings, input_uri, paths["features"])
    stages.append(record)
    detector, record = stage_train(
        settings, features, paths["model"], progress=progress
    )
    stages.append(record)
    scores, record = stage_score(
        settings, features, detector, paths["scores"], progress=progress
    )
    stages.append(record)
    context = {
        "input": input_uri,
        "detector": settings.model.detector,
        "data_quality": stages[-3].details["quality"],
        "comparison": compare_detectors(features, detector.feature_names_, settings),
    }
    report, record = stage_evaluate(
        settings, scores, paths["evaluation"], context=context
    )
    stages.append(record)
    manifest_uri = storage.join(data_dir, MANIFEST)
    write_manifest(
        manifest_uri,
        settings,
        stages,
        started=started,
        extra={"input": input_uri, "data_dir": data_dir},
    )
    return RunResult(data_dir, stages, report, manifest_uri)


def write_manifest(
    uri: str,
    settings: Settings,
    stages: list[StageRecord],
    *,
    started: datetime,
    extra: dict[str, Any] | None = None,
) -> storage.FileInfo:
    """Record what every stage read and wrote, with fingerprints and the config."""
    manifest = {
        "sagewatch_version": __version__,
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "python": platform.python_version(),
        "config": settings.model_dump(mode="json"),
        "config_sha256": hashlib.sha256(
            json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest(),
        "stages": [asdict(s) for s in stages],
        **(extra or {}),
    }
    return storage.write_json(uri, manifest)


def _describe_inputs(uri: str) -> list[dict[str, Any]]:
    return [storage.file_info(f).as_dict() for f in storage.list_files(uri)]
