"""Submit planned jobs and pipelines to SageMaker and follow them to the end.

Every AWS call goes through plain boto3, which takes region, credentials and
endpoint from the standard AWS configuration (``AWS_ENDPOINT_URL`` too, so a local
stand-in works). Every botocore failure is wrapped once into :class:`CloudError`
naming the operation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sagewatch import storage
from sagewatch.errors import CloudError, ConfigError, StorageError
from sagewatch.sagemaker.plans import JobPlan, Upload
from sagewatch.sagemaker.target import default_region
from sagewatch.sagemaker.workflow import PipelinePlan

log = logging.getLogger(__name__)

StatusCallback = Callable[[str], None]

_JOBS = {
    "CreateProcessingJob": ("processing", "ProcessingJobName", "ProcessingJobStatus"),
    "CreateTrainingJob": ("training", "TrainingJobName", "TrainingJobStatus"),
}


@contextlib.contextmanager
def aws_errors(operation: str) -> Iterator[None]:
    """Turn botocore failures into :class:`CloudError` naming ``operation``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "?"), error.get("Message", exc)
        raise CloudError(f"{operation} refused: {code}: {message}") from exc
    except BotoCoreError as exc:
        raise CloudError(f"{operation} failed: {exc}") from exc


def sagemaker_client(region: str | None) -> Any:
    """A boto3 SageMaker client for ``region`` (None: :func:`.default_region`).

    Raises:
        ConfigError: no region configured.
        StorageError: the AWS configuration cannot be read (a profile that does not
            exist, a malformed endpoint URL), as the S3 side reports it.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, NoRegionError

    storage.check_aws_environment()
    try:
        return boto3.client("sagemaker", region_name=region or default_region())
    except NoRegionError as exc:
        raise ConfigError(
            "no AWS region: set region (SAGEMAKER_REGION) or AWS_REGION"
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(
            f"cannot set up the SageMaker client: {exc}; check AWS_PROFILE and "
            "~/.aws/config"
        ) from exc
    except ValueError as exc:  # botocore's answer to a malformed AWS_ENDPOINT_URL
        raise StorageError(
            f"cannot set up the SageMaker client: {exc}; check the AWS_* variables"
        ) from exc


def upload(item: Upload) -> None:
    """Put an upload's bytes in S3; objects already there (same content key) stay.

    Each file is checked on its own, so an upload cut short is completed next time.
    """
    targets = [(item.uri, item.data)] if item.data is not None else []
    targets += [(storage.join(item.uri, name), Path(path)) for name, path in item.files]
    written = 0
    for uri, source in targets:
        if storage.exists(uri):
            continue
        data = source.read_bytes() if isinstance(source, Path) else source
        storage.write_bytes(uri, data)
        written += 1
    log.info(
        "%s: %d of %d objects uploaded to %s",
        item.source,
        written,
        len(targets),
        item.uri,
    )


def check_empty(uri: str) -> None:
    """Refuse to write job outputs where an earlier run left files.

    Host-suffixed outputs from a run with more instances would otherwise mix with
    this run's files.

    Raises:
        ConfigError: naming the prefix and how to proceed.
    """
    if storage.exists(uri):
        raise ConfigError(
            f"{uri} already holds files from an earlier run; pass another --output, "
            f"or remove them first (aws s3 rm --recursive {uri})"
        )


def require_submittable(placeholders: tuple[str, ...]) -> None:
    if placeholders:
        raise ConfigError(
            f"cannot submit: {', '.join(placeholders)} not set (see --plan output)"
        )


def submit_job(
    plan: JobPlan,
    *,
    client: Any,
    wait: bool = True,
    poll_seconds: float = 30,
    on_status: StatusCallback | None = None,
) -> dict[str, Any]:
    """Upload what the plan needs, create the job, and follow it unless ``wait``
    is False. Returns the last description (or the create response).

    Raises:
        ConfigError: placeholders in the plan, or outputs that are not empty.
        CloudError: a refused call, or a job that failed or was stopped.
    """
    require_submittable(plan.placeholders)
    for uri in plan.empty_outputs:
        check_empty(uri)
    for item in plan.uploads:
        upload(item)
    kind, _, _ = _JOBS[plan.operation]
    method = getattr(client, _snake(plan.operation))
    with aws_errors(plan.operation):
        response = method(**plan.request)
    _report(on_status, f"created {kind} job {plan.name}")
    if not wait:
        return dict(response)
    return wait_for_job(
        client,
        plan.operation,
        plan.name,
        poll_seconds=poll_seconds,
        on_status=on_status,
    )


def wait_for_job(
    client: Any,
    operation: str,
    name: str,
    *,
    poll_seconds: float = 30,
    on_status: StatusCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll a job until it ends; report each change of status.

    Raises:
        CloudError: the job failed or was stopped (with SageMaker's reason).
    """
    kind, name_key, status_key = _JOBS[operation]
    describe = getattr(client, f"describe_{kind}_job")
    last = None
    while True:
        with aws_errors(f"Describe{kind.title()}Job"):
            job = describe(**{name_key: name})
        status = job[status_key]
        secondary = job.get("SecondaryStatus")
        line = f"{kind} job {name}: {status}" + (f" ({secondary})" if secondary else "")
        if line != last:
            _report(on_status, line)
            last = line
        if status == "Completed":
            return dict(job)
        if status in {"Failed", "Stopped"}:
            raise CloudError(f"{kind} job {name} {status.lower()}: {_reason(job)}")
        sleep(poll_seconds)


def _reason(job: dict[str, Any]) -> str:
    parts = [job.get("FailureReason"), job.get("ExitMessage")]
    text = "; ".join(str(p).strip() for p in parts if p and str(p).strip())
    return text or "SageMaker gave no reason"


def training_model_uri(client: Any, training_job_name: str) -> str:
    """The ``model.tar.gz`` of a completed training job.

    Raises:
        CloudError: the job is unknown, not completed, or has no model.
    """
    with aws_errors("DescribeTrainingJob"):
        job = client.describe_training_job(TrainingJobName=training_job_name)
    status = job.get("TrainingJobStatus")
    uri = job.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if status != "Completed" or not uri:
        raise CloudError(
            f"training job {training_job_name} is {status}, not Completed with a "
            "model; pick another TRAINING_JOB_NAME or set MODEL_ARTIFACT_URI"
        )
    return str(uri)


def _report(on_status: StatusCallback | None, line: str) -> None:
    if on_status is None:
        log.info("%s", line)
    else:
        on_status(line)


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


# ----------------------------------------------------------------------------- pipeline


def submit_pipeline(
    plan: PipelinePlan,
    *,
    client: Any,
    wait: bool = True,
    poll_seconds: float = 30,
    on_status: StatusCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Upload, create or update the pipeline, start its execution and follow it.

    The execution is ``plan.start``; a plan without one only creates or updates.
    Returns the pipeline ARN and, when started, the execution's ARN and status.

    Raises:
        ConfigError: placeholders in the plan.
        CloudError: a refused call, or an execution that failed or was stopped.
    """
    require_submittable(plan.placeholders)
    for item in plan.uploads:
        upload(item)
    arn = upsert_pipeline(client, plan.request, on_status)
    result: dict[str, Any] = {"PipelineArn": arn}
    if plan.start is None:
        return result
    with aws_errors("StartPipelineExecution"):
        execution = client.start_pipeline_execution(**plan.start)
    result["PipelineExecutionArn"] = execution["PipelineExecutionArn"]
    _report(on_status, f"started execution {execution['PipelineExecutionArn']}")
    if wait:
        result["PipelineExecutionStatus"] = wait_for_execution(
            client,
            execution["PipelineExecutionArn"],
            poll_seconds=poll_seconds,
            on_status=on_status,
            sleep=sleep,
        )
    return result


def upsert_pipeline(
    client: Any, request: dict[str, Any], on_status: StatusCallback | None = None
) -> str:
    """Create the pipeline, or update it when one of that name exists."""
    from botocore.exceptions import ClientError

    name = request["PipelineName"]
    try:
        client.describe_pipeline(PipelineName=name)
        exists = True
    except ClientError:
        exists = False
    operation = "UpdatePipeline" if exists else "CreatePipeline"
    with aws_errors(operation):
        if exists:
            response = client.update_pipeline(**request)
        else:
            response = client.create_pipeline(**request)
    _report(on_status, f"{'updated' if exists else 'created'} pipeline {name}")
    return str(response["PipelineArn"])


def wait_for_execution(
    client: Any,
    execution_arn: str,
    *,
    poll_seconds: float = 30,
    on_status: StatusCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Poll an execution until it ends; report its and its steps' status changes.

    Raises:
        CloudError: the execution failed or was stopped (with the failed steps'
            reasons when SageMaker lists them).
    """
    seen: dict[str, str] = {}
    while True:
        with aws_errors("DescribePipelineExecution"):
            execution = client.describe_pipeline_execution(
                PipelineExecutionArn=execution_arn
            )
        status = execution["PipelineExecutionStatus"]
        steps = _steps(client, execution_arn)
        for step in steps:
            line = f"step {step['StepName']}: {step.get('StepStatus', '?')}"
            if seen.get(step["StepName"]) != line:
                seen[step["StepName"]] = line
                _report(on_status, line)
        if seen.get("") != status:
            seen[""] = status
            _report(on_status, f"execution: {status}")
        if status == "Succeeded":
            return status
        if status in {"Failed", "Stopped"}:
            reasons = [execution.get("FailureReason")] + [
                f"{s['StepName']}: {s['FailureReason']}"
                for s in steps
                if s.get("FailureReason")
            ]
            text = "; ".join(r for r in reasons if r) or "SageMaker gave no reason"
            raise CloudError(f"pipeline execution {status.lower()}: {text}")
        sleep(poll_seconds)


def _steps(client: Any, execution_arn: str) -> list[dict[str, Any]]:
    """The execution's steps, or none when the endpoint cannot list them."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = client.list_pipeline_execution_steps(
            PipelineExecutionArn=execution_arn, SortOrder="Ascending"
        )
    except (ClientError, BotoCoreError) as exc:
        log.debug("cannot list pipeline steps: %s", exc)
        return []
    return list(response.get("PipelineExecutionSteps", []))
