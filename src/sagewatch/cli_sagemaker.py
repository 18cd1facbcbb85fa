"""The ``sagewatch sagemaker`` commands: the stages as SageMaker jobs or a Pipeline.

Part of the command line (:mod:`sagewatch.cli`), so it may print. The
:mod:`sagewatch.sagemaker` modules are imported only inside the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from sagewatch.cli_options import (
    Decorator,
    config_option,
    handle_errors,
    input_options,
    options,
    overrides,
    reference_options,
    seed_option,
    settings_from,
)
from sagewatch.config import Settings

_sagemaker_options = options(
    click.option(
        "--plan",
        is_flag=True,
        help="Print the requests as JSON; make no AWS call.",
    ),
    click.option("--no-wait", is_flag=True, help="Return once submitted."),
    config_option,
)
_raw_input_option = click.option(
    "--input",
    "input_uri",
    default=None,
    help="Raw data: s3:// URI, or a local file/folder to upload (default: raw/).",
)
_features_input_option = click.option(
    "--input",
    "input_uri",
    default=None,
    help="Features: s3:// URI, or a local folder to upload (default: features/).",
)
_processing_options = options(
    click.option(
        "--instance-type",
        "processing_instance_type",
        default=None,
        help="Processing instance type (default ml.m5.xlarge).",
    ),
    click.option(
        "--instance-count",
        "processing_instance_count",
        type=int,
        default=None,
        help="Processing instances; more than one split the work by entity.",
    ),
)


def _s3_only(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    """Refuse a local path where a job needs an S3 location."""
    from sagewatch.storage import is_glob

    if value is not None and not value.startswith("s3://"):
        raise click.BadParameter(f"expected an s3:// URI, got {value!r}")
    if value is not None and is_glob(value):
        raise click.BadParameter(f"expected an s3:// prefix, not a glob: {value!r}")
    return value


def _output_option(what: str) -> Decorator:
    """``--output``: the s3:// prefix for ``what``."""
    return click.option(
        "--output",
        "output_uri",
        default=None,
        callback=_s3_only,
        help=f"s3:// prefix for {what}.",
    )


def _job_name_option(stage: str) -> Decorator:
    """``--job-name``, by default ``sagewatch-<stage>-<time>``."""
    return click.option(
        "--job-name", default=None, help=f"Default: sagewatch-{stage}-<time>."
    )


@click.group("sagemaker")
def sagemaker_group() -> None:
    """Run the stages as SageMaker jobs or as a SageMaker Pipeline.

    Every command takes --plan: print the requests as JSON and call nothing (a
    pipeline's definition appears as an object; boto3 adds a ClientRequestToken).
    Without it the command uploads code and inputs, submits, and follows the job
    until it ends (--no-wait: return once submitted).
    """


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


def _plan_and_submit(
    planner: Callable[..., Any],
    stage: str,
    settings: Settings,
    *,
    job_name: str | None,
    plan: bool,
    no_wait: bool,
    **where: Any,
) -> tuple[Any, dict[str, Any] | None]:
    """Plan the stage's job (strictly unless ``--plan``), then print or submit it.

    Returns the job and what :func:`_submit` returns.
    """
    job = planner(
        settings, job_name=_job_name(stage, job_name), strict=not plan, **where
    )
    return job, _submit(job, settings, plan=plan, no_wait=no_wait)


def _processing_output(job: Any) -> str:
    """Where a processing job writes its output."""
    return job.request["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]


@sagemaker_group.command("features")
@_raw_input_option
@_output_option("features")
@_processing_options
@_job_name_option("features")
@_sagemaker_options
@input_options
@handle_errors
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

    settings = settings_from(config, **overrides(kwargs))
    job, result = _plan_and_submit(
        plan_features,
        "features",
        settings,
        job_name=job_name,
        plan=plan,
        no_wait=no_wait,
        input_uri=input_uri,
        output_uri=output_uri,
    )
    if result is None:
        return
    click.echo(f"features: {_processing_output(job)}")


@sagemaker_group.command("train")
@_features_input_option
@_output_option("models")
@click.option(
    "--instance-type",
    "training_instance_type",
    default=None,
    help="Training instance type (default ml.m5.xlarge).",
)
@_job_name_option("train")
@_sagemaker_options
@seed_option
@reference_options
@handle_errors
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

    settings = settings_from(config, **overrides(kwargs))
    job, result = _plan_and_submit(
        plan_training,
        "train",
        settings,
        job_name=job_name,
        plan=plan,
        no_wait=no_wait,
        input_uri=input_uri,
        output_uri=output_uri,
    )
    if result is None:
        return
    model = result.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if model:
        click.echo(f"model: {model}")
    click.echo(f"to score with it: export TRAINING_JOB_NAME={job.name}")


@sagemaker_group.command("score")
@_features_input_option
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
    callback=_s3_only,
    help="Or with this s3:// model.tar.gz or detector prefix (env MODEL_ARTIFACT_URI).",
)
@_output_option("scores")
@_processing_options
@_job_name_option("score")
@_sagemaker_options
@handle_errors
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

    settings = settings_from(config, **kwargs)
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
    job, result = _plan_and_submit(
        plan_scoring,
        "score",
        settings,
        job_name=job_name,
        plan=plan,
        no_wait=no_wait,
        model_uri=model_uri,
        input_uri=input_uri,
        output_uri=output_uri,
    )
    if result is None:
        return
    click.echo(f"scores: {_processing_output(job)}")


@sagemaker_group.command("pipeline")
@_raw_input_option
@click.option(
    "--processing-instance-type",
    default=None,
    help="Instance type of the processing steps (default ml.m5.xlarge).",
)
@click.option(
    "--processing-instance-count",
    type=int,
    default=None,
    help="Instances per processing step; more split features and scoring by entity.",
)
@click.option(
    "--training-instance-type",
    default=None,
    help="Instance type of the training step (default ml.m5.xlarge).",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a declared pipeline parameter for this execution "
    "(repeatable; checked like the setting it stands for; a local InputDataUri "
    "is uploaded like --input).",
)
@click.option("--no-start", is_flag=True, help="Create or update only.")
@_sagemaker_options
@seed_option
@input_options
@reference_options
@handle_errors
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

    settings = settings_from(config, **overrides(kwargs))
    parameters = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        parameters[name] = value
    if no_start and parameters:
        raise ConfigError(
            "--param sets an execution's parameters; --no-start starts none"
        )
    pipeline = plan_pipeline(
        settings,
        input_uri=input_uri,
        strict=not plan,
        start=not no_start,
        parameters=parameters,
    )
    if plan:
        click.echo(pipeline.to_json(), nl=False)
        return
    from sagewatch.sagemaker.launch import sagemaker_client, submit_pipeline

    result = submit_pipeline(
        pipeline,
        client=sagemaker_client(settings.sagemaker.region),
        wait=not no_wait,
        poll_seconds=settings.sagemaker.poll_seconds,
        on_status=click.echo,
    )
    for key, value in result.items():
        click.echo(f"{key}: {value}")
