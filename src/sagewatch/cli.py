"""The ``sagewatch`` command line: every command, and the only module that prints.

Settings resolve as ``config.yaml`` < environment variables < the flags given here.
Expected failures (bad input, missing files, bad settings) print one line and exit
non-zero; ``-v`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from sagewatch import __version__
from sagewatch.config import Settings, load_settings
from sagewatch.errors import SagewatchError

log = logging.getLogger("sagewatch")


class _State:
    verbosity = 0


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SagewatchError as exc:
            if _State.verbosity > 0:
                log.exception("failed")
            lines = [line.strip() for line in str(exc).splitlines()]
            click.echo(f"error: {' '.join(line for line in lines if line)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _settings(config: str | None, **flags: Any) -> Settings:
    return load_settings(config, overrides=flags)


def _progress() -> bool:
    return _State.verbosity >= 0 and sys.stderr.isatty()


def _stage_manifest(settings: Settings, record: Any, output_dir: str) -> None:
    """Leave ``<stage>_manifest.json`` beside a single stage's outputs."""
    from datetime import UTC, datetime, timedelta

    from sagewatch import storage
    from sagewatch.pipeline import write_manifest

    started = datetime.now(UTC) - timedelta(seconds=record.seconds)
    uri = storage.join(output_dir, f"{record.name}_manifest.json")
    write_manifest(uri, settings, [record], started=started)


# ----------------------------------------------------------------------------- options

config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="Settings file (default: ./config.yaml when present).",
)
seed_option = click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed for data generation, sampling and weights.",
)


def input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Column mapping and reading options shared by commands that read raw data."""
    options = [
        click.option(
            "--timestamp-column",
            default=None,
            help="Timestamp column (default timestamp).",
        ),
        click.option(
            "--timezone",
            default=None,
            help="Zone of timestamps without a UTC offset (default UTC).",
        ),
        click.option(
            "--timestamp-format",
            default=None,
            help="strftime layout of non-ISO timestamps, e.g. '%d/%m/%Y %H:%M'.",
        ),
        click.option(
            "--entity-column",
            default=None,
            help="Entity column (default machine_id; absent = one entity per file).",
        ),
        click.option(
            "--label-column",
            default=None,
            help="0/1 label column, used only for evaluation (default anomaly).",
        ),
        click.option(
            "--sensor-columns",
            default=None,
            help="Comma-separated sensor columns (default: every numeric column).",
        ),
        click.option(
            "--sep",
            default=None,
            help="CSV separator (default: guessed from the header).",
        ),
        click.option(
            "--label-windows",
            default=None,
            help="JSON of labelled [start, end] windows, e.g. NAB's.",
        ),
        click.option(
            "--rolling-window", type=int, default=None, help="Rows per rolling window."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def reference_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--train-rows",
            type=int,
            default=None,
            help="Reference period: first N rows of each entity.",
        ),
        click.option(
            "--train-until",
            default=None,
            help="Reference period: rows up to this timestamp.",
        ),
        click.option(
            "--train-fraction",
            type=float,
            default=None,
            help="Reference period: first share of each entity (default 0.5).",
        ),
        click.option("--epochs", type=int, default=None),
        click.option("--batch-size", type=int, default=None),
        click.option("--encoding-dim", type=int, default=None),
        click.option(
            "--detector",
            type=click.Choice(["autoencoder", "pca", "iforest"]),
            default=None,
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    """CLI keyword arguments -> flat setting overrides."""
    from sagewatch.errors import ConfigError

    out = dict(kwargs)
    rules = [
        k
        for k in ("train_rows", "train_until", "train_fraction")
        if out.get(k) is not None
    ]
    if len(rules) > 1:
        given = " and ".join("--" + r.replace("_", "-") for r in rules)
        raise ConfigError(f"{given} both given; choose one reference period rule")
    if out.get("sensor_columns"):
        out["sensor_columns"] = [
            c.strip() for c in out["sensor_columns"].split(",") if c.strip()
        ]
    return out


# ----------------------------------------------------------------------------- commands


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="sagewatch")
@click.option(
    "-v", "--verbose", count=True, help="More logging (-v debug and tracebacks)."
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Warnings and errors only; no progress bars."
)
def main(verbose: int, quiet: bool) -> None:
    """Unsupervised anomaly detection on multivariate sensor time series."""
    _State.verbosity = -1 if quiet else verbose
    _setup_logging(_State.verbosity)


@main.command()
@click.option(
    "--input",
    "input_uri",
    default=None,
    help="Raw data: file, folder, glob or s3:// URI (default: synthetic data).",
)
@click.option(
    "--data-dir",
    default="data",
    show_default=True,
    help="Where every output goes (local or s3://).",
)
@config_option
@click.option("--n-samples", type=int, default=None, help="Synthetic rows per machine.")
@click.option("--n-machines", type=int, default=None, help="Synthetic machines.")
@seed_option
@input_options
@reference_options
@_handle_errors
def run(
    input_uri: str | None, data_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Run every stage: ingest, features, train, score, evaluate."""
    from sagewatch.pipeline import run as run_pipeline

    settings = _settings(config, **_flags(kwargs))
    result = run_pipeline(
        settings, data_dir=data_dir, input_uri=input_uri, progress=_progress()
    )
    _print_summary(result)


def _print_summary(result: Any) -> None:
    click.echo("")
    click.echo("stage      rows in    rows out  seconds")
    for stage in result.stages:
        rows_in = "" if stage.rows_in is None else stage.rows_in
        rows_out = "" if stage.rows_out is None else stage.rows_out
        click.echo(f"{stage.name:<9}{rows_in:>9} {rows_out:>11} {stage.seconds:>8.2f}")
        for reason, count in stage.dropped.items():
            click.echo(f"  dropped {count} rows: {reason}")
    report = result.report
    click.echo("")
    click.echo(f"threshold        {report['threshold']:.6g}")
    rate = report["anomaly_rate"] or 0.0
    click.echo(
        f"flagged          {report['anomalies']} of {report['evaluated_rows']} "
        f"evaluated rows ({100 * rate:.2f} %)"
    )
    metrics = report.get("metrics")
    if metrics:
        from sagewatch.evaluation import METRIC_KEYS

        for key in METRIC_KEYS[:-1]:  # all but the delay, which is in rows
            value = metrics.get(key)
            unit = " %" if key in {"far", "mar"} else ""
            click.echo(
                f"{key:<16} {'undefined' if value is None else f'{value:.4f}{unit}'}"
            )
    click.echo("")
    click.echo(f"outputs under    {result.data_dir}")
    click.echo(f"report           {result.stages[-1].outputs[-1]['uri']}")
    click.echo(f"manifest         {result.manifest_uri}")


@main.command("generate")
@click.option("--output-dir", default="data/raw", show_default=True)
@config_option
@click.option("--n-samples", type=int, default=None)
@click.option("--n-machines", type=int, default=None)
@seed_option
@_handle_errors
def generate_cmd(output_dir: str, config: str | None, **kwargs: Any) -> None:
    """Write a synthetic data set with labelled anomalies."""
    from sagewatch.pipeline import stage_generate

    settings = _settings(config, **_flags(kwargs))
    uri, record = stage_generate(settings, output_dir)
    _stage_manifest(settings, record, output_dir)
    click.echo(f"wrote {record.rows_out} rows to {uri}")


@main.command("features")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Raw data: file, folder, glob or s3:// URI.",
)
@click.option("--output-dir", default="data/features", show_default=True)
@config_option
@input_options
@_handle_errors
def features_cmd(
    input_uri: str, output_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Validate raw data and compute rolling features."""
    from sagewatch.pipeline import stage_features

    settings = _settings(config, **_flags(kwargs))
    _, record = stage_features(settings, input_uri, output_dir)
    _stage_manifest(settings, record, output_dir)
    click.echo(
        f"wrote {record.rows_out} feature rows in {len(record.outputs)} file(s) "
        f"under {output_dir}"
    )


@main.command("train")
@click.option(
    "--input", "input_uri", required=True, help="Features (Parquet file or folder)."
)
@click.option("--model-dir", default="data/model", show_default=True)
@config_option
@seed_option
@reference_options
@_handle_errors
def train_cmd(
    input_uri: str, model_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Fit a detector on the reference period of a features table."""
    from sagewatch.pipeline import stage_train

    settings = _settings(config, **_flags(kwargs))
    detector, record = stage_train(settings, input_uri, model_dir, progress=_progress())
    _stage_manifest(settings, record, model_dir)
    sample = record.details["sample"]
    click.echo(
        f"fitted on {record.rows_out} reference rows "
        f"({sample['training']['used']} training samples); threshold "
        f"{detector.threshold_:.6g} from {sample['calibration']['used']} rows; "
        f"saved to {model_dir}"
    )


@main.command("score")
@click.option(
    "--input", "input_uri", required=True, help="Features (Parquet file or folder)."
)
@click.option("--model-dir", default="data/model", show_default=True)
@click.option("--output-dir", default="data/scores", show_default=True)
@config_option
@_handle_errors
def score_cmd(
    input_uri: str, model_dir: str, output_dir: str, config: str | None
) -> None:
    """Score a features table with a saved detector."""
    from sagewatch.pipeline import stage_score

    settings = _settings(config)
    _, record = stage_score(
        settings, input_uri, model_dir, output_dir, progress=_progress()
    )
    _stage_manifest(settings, record, output_dir)
    click.echo(
        f"scored {record.rows_out} rows, {record.details['flagged']} flagged; "
        f"wrote {record.outputs[0]['uri']}"
    )


@main.command("evaluate")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Scores (anomaly_scores.csv or .parquet).",
)
@click.option("--output-dir", default="data/evaluation", show_default=True)
@click.option("--top-n", type=int, default=None, help="Rows in the top-scores table.")
@click.option(
    "--percentiles",
    default=None,
    help="Comma-separated score percentiles, e.g. 50,90,95,99.",
)
@config_option
@_handle_errors
def evaluate_cmd(
    input_uri: str,
    output_dir: str,
    top_n: int | None,
    percentiles: str | None,
    config: str | None,
) -> None:
    """Write the JSON and HTML report for a scores table."""
    from sagewatch.errors import ConfigError
    from sagewatch.pipeline import stage_evaluate

    parsed = None
    if percentiles:
        try:
            parsed = [float(p) for p in percentiles.split(",")]
        except ValueError as exc:
            raise ConfigError(
                "--percentiles: expected numbers separated by commas, "
                f"got {percentiles!r}"
            ) from exc
    settings = _settings(config, top_n=top_n, percentiles=parsed)
    report, record = stage_evaluate(settings, input_uri, output_dir)
    _stage_manifest(settings, record, output_dir)
    click.echo(
        f"{report['anomalies']} of {report['evaluated_rows']} rows flagged; "
        f"report at {record.outputs[-1]['uri']}"
    )
    if report.get("metrics"):
        m = report["metrics"]
        click.echo(
            "  ".join(
                f"{k}={'undefined' if m.get(k) is None else format(m[k], '.4f')}"
                for k in ("precision", "recall", "f1", "far", "mar", "pr_auc")
            )
        )


# ------------------------------------------------------------------------- sagemaker


@click.group("sagemaker")
def sagemaker_group() -> None:
    """Run the stages as SageMaker jobs or as a SageMaker Pipeline.

    Every command takes --plan: print the exact requests as JSON and call nothing.
    Without it the command uploads code and inputs, submits, and follows the job
    until it ends (--no-wait: return once submitted).
    """


def _sagemaker_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--plan",
            is_flag=True,
            help="Print the requests as JSON; make no AWS call.",
        ),
        click.option("--no-wait", is_flag=True, help="Return once submitted."),
        config_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _job_name(stage: str, given: str | None) -> str:
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return given or f"sagewatch-{stage}-{stamp}"


def _run_job(plan: Any, settings: Settings, *, wait: bool) -> dict[str, Any]:
    from sagewatch.sagemaker.launch import sagemaker_client, submit_job

    return submit_job(
        plan,
        client=sagemaker_client(settings.sagemaker.region),
        wait=wait,
        poll_seconds=settings.sagemaker.poll_seconds,
        on_status=click.echo,
    )


def _submit(
    job: Any, settings: Settings, *, plan: bool, no_wait: bool
) -> dict[str, Any] | None:
    """Print the planned requests (``--plan``: None) or submit and follow the job."""
    if plan:
        click.echo(job.to_json(), nl=False)
        return None
    return _run_job(job, settings, wait=not no_wait)


@sagemaker_group.command("features")
@click.option(
    "--input",
    "input_uri",
    default=None,
    help="Raw data: s3:// URI, or a local file/folder to upload (default: raw/).",
)
@click.option("--output", "output_uri", default=None, help="s3:// prefix for features.")
@click.option("--instance-type", "processing_instance_type", default=None)
@click.option("--instance-count", "processing_instance_count", type=int, default=None)
@click.option("--job-name", default=None, help="Default: sagewatch-features-<time>.")
@_sagemaker_options
@input_options
@_handle_errors
def sagemaker_features(
    input_uri: str | None,
    output_uri: str | None,
    job_name: str | None,
    plan: bool,
    no_wait: bool,
    config: str | None,
    **kwargs: Any,
) -> None:
    """Compute features in a SageMaker Processing job."""
    from sagewatch.sagemaker.plans import plan_features

    settings = _settings(config, **_flags(kwargs))
    job = plan_features(
        settings,
        job_name=_job_name("features", job_name),
        input_uri=input_uri,
        output_uri=output_uri,
        strict=not plan,
    )
    if _submit(job, settings, plan=plan, no_wait=no_wait) is None:
        return
    output = job.request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]
    click.echo(f"features: {output}")


@sagemaker_group.command("train")
@click.option(
    "--input",
    "input_uri",
    default=None,
    help="Features: s3:// URI, or a local folder to upload (default: features/).",
)
@click.option("--output", "output_uri", default=None, help="s3:// prefix for models.")
@click.option("--instance-type", "training_instance_type", default=None)
@click.option("--job-name", default=None, help="Default: sagewatch-train-<time>.")
@_sagemaker_options
@seed_option
@reference_options
@_handle_errors
def sagemaker_train(
    input_uri: str | None,
    output_uri: str | None,
    job_name: str | None,
    plan: bool,
    no_wait: bool,
    config: str | None,
    **kwargs: Any,
) -> None:
    """Train the detector in a SageMaker Training job."""
    from sagewatch.sagemaker.plans import plan_training

    settings = _settings(config, **_flags(kwargs))
    job = plan_training(
        settings,
        job_name=_job_name("train", job_name),
        input_uri=input_uri,
        output_uri=output_uri,
        strict=not plan,
    )
    result = _submit(job, settings, plan=plan, no_wait=no_wait)
    if result is None:
        return
    model = result.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if model:
        click.echo(f"model: {model}")
    click.echo(f"to score with it: export TRAINING_JOB_NAME={job.name}")


@sagemaker_group.command("score")
@click.option(
    "--input",
    "input_uri",
    default=None,
    help="Features: s3:// URI, or a local folder to upload (default: features/).",
)
@click.option(
    "--training-job-name",
    envvar="TRAINING_JOB_NAME",
    default=None,
    help="Score with this training job's model (env TRAINING_JOB_NAME).",
)
@click.option(
    "--model-uri",
    envvar="MODEL_ARTIFACT_URI",
    default=None,
    help="Or with this model.tar.gz / detector prefix (env MODEL_ARTIFACT_URI).",
)
@click.option("--output", "output_uri", default=None, help="s3:// prefix for scores.")
@click.option("--instance-type", "processing_instance_type", default=None)
@click.option("--instance-count", "processing_instance_count", type=int, default=None)
@click.option("--job-name", default=None, help="Default: sagewatch-score-<time>.")
@_sagemaker_options
@_handle_errors
def sagemaker_score(
    input_uri: str | None,
    training_job_name: str | None,
    model_uri: str | None,
    output_uri: str | None,
    job_name: str | None,
    plan: bool,
    no_wait: bool,
    config: str | None,
    **kwargs: Any,
) -> None:
    """Score features in a SageMaker Processing job (batch scoring)."""
    from sagewatch.errors import ConfigError
    from sagewatch.sagemaker.plans import model_artifact_uri, plan_scoring

    settings = _settings(config, **kwargs)
    if not model_uri and not training_job_name:
        raise ConfigError(
            "which model? set --training-job-name (TRAINING_JOB_NAME) or "
            "--model-uri (MODEL_ARTIFACT_URI)"
        )
    if not model_uri and plan:
        model_uri = model_artifact_uri(settings, training_job_name or "")
    elif not model_uri:
        from sagewatch.sagemaker.launch import sagemaker_client, training_model_uri

        client = sagemaker_client(settings.sagemaker.region)
        model_uri = training_model_uri(client, training_job_name or "")
    job = plan_scoring(
        settings,
        job_name=_job_name("score", job_name),
        model_uri=model_uri,
        input_uri=input_uri,
        output_uri=output_uri,
        strict=not plan,
    )
    if _submit(job, settings, plan=plan, no_wait=no_wait) is None:
        return
    output = job.request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]
    click.echo(f"scores: {output}")


@sagemaker_group.command("pipeline")
@click.option(
    "--input",
    "input_uri",
    default=None,
    help="Raw data: s3:// URI, or a local file/folder to upload (default: raw/).",
)
@click.option("--processing-instance-type", default=None)
@click.option("--processing-instance-count", type=int, default=None)
@click.option("--training-instance-type", default=None)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a pipeline parameter for this execution (repeatable).",
)
@click.option("--no-start", is_flag=True, help="Create or update only.")
@_sagemaker_options
@seed_option
@input_options
@reference_options
@_handle_errors
def sagemaker_pipeline(
    input_uri: str | None,
    params: tuple[str, ...],
    no_start: bool,
    plan: bool,
    no_wait: bool,
    config: str | None,
    **kwargs: Any,
) -> None:
    """Create or update the SageMaker Pipeline, start it and follow it."""
    from sagewatch.errors import ConfigError
    from sagewatch.sagemaker.workflow import plan_pipeline

    settings = _settings(config, **_flags(kwargs))
    pipeline = plan_pipeline(settings, input_uri=input_uri, strict=not plan)
    if plan:
        click.echo(pipeline.to_json(), nl=False)
        return
    parameters = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        parameters[name] = value
    from sagewatch.sagemaker.launch import sagemaker_client, submit_pipeline

    result = submit_pipeline(
        pipeline,
        client=sagemaker_client(settings.sagemaker.region),
        start=not no_start,
        parameters=parameters,
        wait=not no_wait,
        poll_seconds=settings.sagemaker.poll_seconds,
        on_status=click.echo,
    )
    for key, value in result.items():
        click.echo(f"{key}: {value}")


main.add_command(sagemaker_group)


if __name__ == "__main__":  # pragma: no cover
    main()
