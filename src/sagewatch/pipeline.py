"""Local orchestration of the stages.

Each ``stage_*`` function reads its inputs from URIs, calls the pure stage code and
writes its outputs to URIs, returning a :class:`~sagewatch.manifest.StageRecord`.
:func:`run` chains them and keeps tables in memory between stages, so nothing is
read twice. The SageMaker entry points call the same stage functions.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from sagewatch import storage, streaming
from sagewatch.config import Settings
from sagewatch.errors import ConfigError, InputError
from sagewatch.features import build_features, feature_names, sensors_of
from sagewatch.manifest import (
    MANIFEST,
    StageRecord,
    Timer,
    as_dicts,
    describe_inputs,
    handed_over,
    remove_previous,
    store_info,
    without_history,
    write_manifest,
)
from sagewatch.reference import FileReference, TableReference
from sagewatch.report import write_report
from sagewatch.schema import LABEL, TIMESTAMP, Dataset, load_raw
from sagewatch.stage_tables import (
    EVERY_FEATURE,
    SCORES_CSV,
    SCORES_PARQUET,
    feature_part_schemas,
    read_features,
    read_scores,
    recorded_window,
    require,
    require_names,
    scores_columns,
)
from sagewatch.synthetic import generate

if TYPE_CHECKING:  # torch loads only for the stages that need it
    from sagewatch.detector import Detector

log = logging.getLogger(__name__)

RAW_STEM = "sensor_data"
FEATURES_STEM = "features"


@dataclass
class RunResult:
    """The outcome of :func:`run`: records, the report and where things are."""

    data_dir: str
    stages: list[StageRecord]
    report: dict[str, Any]
    manifest_uri: str


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
    storage.check_output(output_dir)
    with Timer() as timer:
        frame = generate(
            settings.generate,
            seed=settings.model.seed,
            reference_fraction=settings.reference.train_fraction,
        )
        with storage.replacing(output_dir):
            infos = storage.write_partitioned(
                frame, output_dir, by="machine_id", stem=RAW_STEM, suffix=".csv"
            )
        storage.remove_stale(output_dir, stem=RAW_STEM, keep=[i.uri for i in infos])
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
    progress: bool = False,
    chunk_rows: int = streaming.FEATURE_CHUNK_ROWS,
) -> tuple[pl.DataFrame | str, StageRecord]:
    """Validate raw input and write its rolling features to ``output_dir``.

    Input read from a URI streams in chunks of ``chunk_rows`` rows when
    :func:`sagewatch.streaming.stream_features` can give exactly the in-memory
    result, and the features then come back as the URI of ``output_dir``;
    otherwise (and for a ``dataset`` already in memory) they come back as a table.
    """
    if dataset is None and storage.is_within(output_dir, input_uri):
        raise ConfigError(
            f"output folder {output_dir} is the raw input folder {input_uri} or "
            "inside it: the feature files would be read as raw input next time; "
            "choose another output folder"
        )
    storage.check_output(output_dir)
    with (
        Timer() as timer,
        storage.track_reads() as reads,
        storage.replacing(output_dir),
    ):
        streamed = None
        if dataset is None:
            streamed = streaming.stream_features(
                settings,
                input_uri,
                output_dir,
                chunk_rows=chunk_rows,
                progress=progress,
            )
        if streamed is not None:
            out: pl.DataFrame | str = output_dir
            quality, sensors = streamed.quality, streamed.sensors
            infos, rows_out = streamed.outputs, streamed.rows_out
            inputs = [f.as_dict() for f in streamed.inputs]
        else:
            data = dataset or load_raw(
                input_uri,
                settings.data,
                settings.quality,
                rolling_window=settings.features.rolling_window,
            )
            out = build_features(
                data.frame, data.sensors, settings.features, data.passthrough
            )
            infos = streaming.write_features(
                out,
                output_dir,
                streaming.stamp(
                    settings.features.rolling_window, settings.features.statistics
                ),
            )
            quality, sensors, rows_out = data.quality, data.sensors, out.height
            inputs = as_dicts(reads) if dataset is None else describe_inputs(input_uri)
    with Timer() as cleanup:  # once every new part is in place
        storage.remove_stale(
            output_dir, stem=FEATURES_STEM, keep=[i.uri for i in infos]
        )
    record = StageRecord(
        "features",
        inputs=inputs,
        outputs=[i.as_dict() for i in infos],
        rows_in=quality["rows_in"],
        rows_out=rows_out,
        dropped=quality["dropped"],
        seconds=timer.seconds + cleanup.seconds,
        details={"sensors": sensors, "quality": quality},
    )
    return out, record


def stage_train(
    settings: Settings,
    features: pl.DataFrame | str,
    model_dir: str,
    *,
    progress: bool = False,
) -> tuple[Detector, StageRecord]:
    """Fit a detector on the reference period and save it to ``model_dir``.

    Parquet feature files sorted by entity and time (as ``sagewatch features``
    writes them) are read file by file: only the entity, timestamp and feature
    columns, only up to each entity's last reference row; other input is read
    whole. Memory then follows the training samples, not the table. Either way
    ``training_data_sha256`` in detector.json fingerprints the entity, timestamp
    and features of every reference row, so a table and the files written from
    it give the same fingerprint (and the same detector).
    """
    from sagewatch.training import fit_reference

    storage.check_output(model_dir)  # before the fit, not after it
    with (
        Timer() as timer,
        storage.track_reads() as reads,
        ThreadPoolExecutor(1, "sagewatch-hash") as hasher,
    ):
        reference = _training_reference(settings, features)
        # The files are hashed for the manifest on a second thread meanwhile.
        hashes = [hasher.submit(storage.file_info, *f) for f in _files(reference)]
        try:
            detector, info = fit_reference(reference, settings, progress=progress)
            inputs = as_dicts(reads) + [h.result().as_dict() for h in hashes]
        except BaseException:
            hasher.shutdown(cancel_futures=True)
            raise
        recorded = _recorded_window(features)
        if recorded is not None and recorded[0] != detector.feature_window_:
            log.warning(
                "%s: the features were computed with rolling_window=%d (recorded in "
                "%s), not the configured %d; the detector records %d",
                features,
                recorded[0],
                recorded[1],
                detector.feature_window_,
                recorded[0],
            )
            detector.feature_window_ = recorded[0]
        written = detector.save(
            model_dir,
            extra={
                "config": settings.model_dump(mode="json"),
                "reference": info,
                "training_data_sha256": reference.sha256,
            },
        )
    record = StageRecord(
        "train",
        inputs=inputs,
        outputs=[w.as_dict() for w in written],
        rows_in=reference.height,
        rows_out=info["train_rows"],
        seconds=timer.seconds,
        details={
            "threshold": detector.threshold_,
            **info,
            "training": without_history(detector.training_),
        },
    )
    return detector, record


def _recorded_window(features: pl.DataFrame | str) -> tuple[int, str] | None:
    """See :func:`~sagewatch.stage_tables.recorded_window`; None for a table."""
    if not isinstance(features, str):
        return None
    return recorded_window(storage.list_files(features))


def _check_window(features: pl.DataFrame | str, detector: Detector) -> None:
    """Refuse features computed with another rolling window than the detector's:
    their values mean something else, and nearly every row would be flagged.

    Raises:
        InputError: the windows differ.
    """
    recorded = _recorded_window(features)
    window = getattr(detector, "feature_window_", 1)  # 1: not recorded
    if recorded is None or window < 2 or recorded[0] == window:
        return
    raise InputError(
        f"{recorded[1]}: features computed with rolling_window={recorded[0]}; the "
        f"detector was trained on features with rolling_window={window}; compute "
        f"the features again with --rolling-window {window}, or train on these"
    )


def _training_reference(
    settings: Settings, features: pl.DataFrame | str
) -> TableReference | FileReference:
    """The reference period of a features table in memory or at a URI.

    Raises:
        InputError: the table is not one ``sagewatch features`` wrote, or lacks
            features of the configured statistics.
    """
    if isinstance(features, str):
        found = _feature_files(features, settings)
        if found is not None:
            try:
                return FileReference(*found, settings, source=features)
            except streaming.NotGroupedError as exc:
                log.info(
                    "%s: not read file by file (%s); reading it whole", features, exc
                )
        source, features = features, read_features(features)
    else:
        source = "features"
    columns = feature_names(sensors_of(features.columns), settings.features.statistics)
    require(features, source, columns, EVERY_FEATURE)
    return TableReference(features, columns, settings)


def _feature_files(uri: str, settings: Settings) -> tuple[list[str], list[str]] | None:
    """The Parquet files of a features table and the feature columns to train on;
    None when the table is not only Parquet files with one timestamp type.

    Raises:
        InputError: a file is not a features table, or lacks feature columns
            that other files have.
    """
    files = storage.list_files(uri)
    if not all(f.endswith(".parquet") for f in files):
        return None
    schemas = feature_part_schemas(files)
    if len({schema[TIMESTAMP] for schema in schemas.values()}) > 1:
        return None
    every = list(dict.fromkeys(c for schema in schemas.values() for c in schema))
    columns = feature_names(sensors_of(every), settings.features.statistics)
    require_names(every, uri, columns, EVERY_FEATURE)
    for path, schema in schemas.items():
        missing = [c for c in columns if c not in schema]
        if missing:
            rows = storage.scan_table(path).select(pl.len()).collect().item()
            shown = ", ".join(f"{c} ({rows} rows)" for c in missing[:5])
            raise InputError(
                f"{path}: features with missing or non-finite values: {shown}"
                f"{' ...' if len(missing) > 5 else ''} (no such columns in this "
                "file); expected complete features (were part files computed from "
                "inputs with different sensors?)"
            )
    return files, columns


def _files(reference: TableReference | FileReference) -> list[tuple[str, int]]:
    """Files read in batches, with their rows (tables read whole are tracked)."""
    if not isinstance(reference, FileReference):
        return []
    return list(zip(reference.files, reference.file_rows, strict=True))


def stage_score(
    settings: Settings,
    features: pl.DataFrame | str,
    detector: Detector | str,
    output_dir: str,
    *,
    progress: bool = False,
    chunk_rows: int = streaming.CHUNK_ROWS,
) -> tuple[pl.DataFrame | str, StageRecord]:
    """Score a features table and write ``anomaly_scores.csv`` and ``.parquet``.

    Features at a URI stream in chunks of ``chunk_rows`` rows, and the scores come
    back as the URI of the Parquet file; a table in memory gives a table.
    """
    from sagewatch.detector import Detector
    from sagewatch.scoring import score_features

    storage.check_output(output_dir)
    with Timer() as timer, storage.replacing(output_dir):
        with storage.track_reads() as reads:
            if isinstance(detector, str):
                detector = Detector.load(detector)
        _check_window(features, detector)
        inputs = as_dicts(reads)
        scores: pl.DataFrame | str | None = None
        source = features if isinstance(features, str) else "features"
        if isinstance(features, str):
            result = streaming.stream_scores(
                features,
                detector,
                output_dir,
                (SCORES_CSV, SCORES_PARQUET),
                chunk_rows=chunk_rows,
                progress=progress,
            )
            if result is not None:
                scores = storage.join(output_dir, SCORES_PARQUET)
                written, rows, flagged = result.outputs, result.rows, result.flagged
                inputs += [f.as_dict() for f in result.inputs]
            else:
                with storage.track_reads() as reads:
                    features = read_features(features)
                inputs += as_dicts(reads)
        if scores is None:
            assert isinstance(features, pl.DataFrame)
            table = score_features(features, detector, source=source, progress=progress)
            # Parquet first, as streamed: should putting the two in place fail
            # between them, `evaluate` (which reads the Parquet copy) has the new.
            parquet = storage.write_table(
                table, storage.join(output_dir, SCORES_PARQUET)
            )
            csv = storage.write_table(table, storage.join(output_dir, SCORES_CSV))
            written = [csv, parquet]
            scores, rows = table, table.height
            flagged = int(table["is_anomaly"].sum())
    record = StageRecord(
        "score",
        inputs=inputs,
        outputs=[w.as_dict() for w in written],
        rows_in=rows,
        rows_out=rows,
        seconds=timer.seconds,
        details={"threshold": detector.threshold_, "flagged": flagged},
    )
    return scores, record


def stage_evaluate(
    settings: Settings,
    scores: pl.DataFrame | str,
    output_dir: str,
    *,
    context: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], StageRecord]:
    """Write the JSON and HTML report for a scores table."""
    storage.check_output(output_dir)
    with Timer() as timer:
        with storage.track_reads() as reads:
            if isinstance(scores, str):
                scores = read_scores(scores)
        ev = settings.evaluation
        report, written = write_report(
            scores,
            output_dir,
            top_n=ev.top_n,
            percentiles=ev.percentiles,
            max_plot_entities=ev.max_plot_entities,
            context=context,
            progress=progress,
        )
    record = StageRecord(
        "evaluate",
        inputs=as_dicts(reads),
        outputs=[w.as_dict() for w in written],
        rows_in=scores.height,
        seconds=timer.seconds,
    )
    return report, record


def detector_label(kind: str, settings: Settings) -> str:
    """A detector's name in reports; the autoencoder says which architecture."""
    if kind == "autoencoder":
        return f"autoencoder ({settings.model.architecture})"
    return kind


# ----------------------------------------------------------------------------- run


def run(
    settings: Settings,
    *,
    data_dir: str,
    input_uri: str | None = None,
    progress: bool = False,
) -> RunResult:
    """Run every stage in order and write ``run_manifest.json`` under ``data_dir``.

    Each stage replaces its own outputs atomically; a run that fails part-way
    leaves the stages before the failure done, the later ones as they were, and
    no ``run_manifest.json``.
    """
    storage.check_output(data_dir)
    paths = layout(settings, data_dir)
    started = datetime.now(UTC)
    stages: list[StageRecord] = []
    manifest_uri = storage.join(data_dir, MANIFEST)
    remove_previous(manifest_uri)
    if input_uri is None:
        input_uri, record = stage_generate(settings, paths["raw"])
        stages.append(record)
    features, features_record = stage_features(
        settings, input_uri, paths["features"], progress=progress
    )
    stages.append(features_record)
    detector, train_record = stage_train(
        settings, features, paths["model"], progress=progress
    )
    handed_over(train_record, features_record)
    stages.append(train_record)
    scores, score_record = stage_score(
        settings, features, detector, paths["scores"], progress=progress
    )
    handed_over(score_record, train_record, features_record)
    stages.append(score_record)
    from sagewatch.comparison import compare_detectors

    context = {
        "input": input_uri,
        "detector": detector_label(settings.model.detector, settings),
        "data_quality": stages[-3].details["quality"],
        "training": {
            k: train_record.details[k]
            for k in ("reference_rows", "train_rows", "validation_rows", "sample")
        },
        "comparison": [],
    }
    if LABEL in scores_columns(scores):  # only labelled data can be compared
        if isinstance(features, str):  # streamed: the comparison needs the table
            features = read_features(features)
        context["comparison"] = compare_detectors(
            features, detector.feature_names_, settings
        )
    report, record = stage_evaluate(
        settings, scores, paths["evaluation"], context=context, progress=progress
    )
    handed_over(record, score_record)
    stages.append(record)
    write_manifest(
        manifest_uri,
        settings,
        stages,
        started=started,
        extra={
            "input": input_uri,
            "data_dir": data_dir,
            **store_info(input_uri, data_dir),
        },
    )
    return RunResult(data_dir, stages, report, manifest_uri)
