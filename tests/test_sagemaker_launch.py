"""Launch paths against a moto server on 127.0.0.1: uploads, jobs, the pipeline.

moto accepts the requests and marks jobs completed at once; nothing runs. The tests
check what reached the endpoint: the uploaded objects and the created jobs and
pipeline, compared with the plans. Failure reporting is checked with botocore's
Stubber, since moto never fails a job.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from click.testing import CliRunner

from sagewatch.cli import main
from sagewatch.config import Settings
from sagewatch.errors import CloudError, ConfigError
from sagewatch.pipeline import stage_generate
from sagewatch.sagemaker import launch, plans, workflow
from sagewatch.sagemaker.bundle import build_source_bundle

ROLE = "arn:aws:iam::123456789012:role/sagewatch-test"
IMAGE = "registry.example/pytorch-training:2.5-cpu-py311"


@pytest.fixture(scope="module")
def bundle():
    return build_source_bundle()


@pytest.fixture
def settings(s3_bucket: str) -> Settings:
    return Settings().with_overrides(
        {
            "role": ROLE,
            "bucket": s3_bucket,
            "image_uri": IMAGE,
            "region": "us-east-1",
            "n_samples": 50,
            "n_machines": 2,
        }
    )


@pytest.fixture
def raw_dir(tmp_path: Path, settings: Settings) -> Path:
    uri, _ = stage_generate(settings, str(tmp_path / "raw"))
    return Path(uri)


@pytest.fixture
def client(settings: Settings):
    return launch.sagemaker_client(settings.sagemaker.region)


def _keys(bucket: str, prefix: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _body(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def test_features_job_uploads_code_and_input_then_runs(
    settings, raw_dir, client, bundle, s3_bucket
) -> None:
    plan = plans.plan_features(
        settings, job_name="sw-features-1", input_uri=str(raw_dir), bundle=bundle
    )
    lines: list[str] = []

    job = launch.submit_job(plan, client=client, poll_seconds=0, on_status=lines.append)

    assert job["ProcessingJobStatus"] == "Completed"
    assert lines == [
        "created processing job sw-features-1",
        "processing job sw-features-1: Completed",
    ]
    assert _body(s3_bucket, f"sagewatch/{bundle.key}") == bundle.data
    raw_uri = plan.uploads[1].uri
    raw_prefix = raw_uri.split(f"s3://{s3_bucket}/")[1]
    assert _keys(s3_bucket, raw_prefix) == [
        f"{raw_prefix}{p.name}" for p in sorted(raw_dir.iterdir())
    ]
    assert (
        _body(s3_bucket, f"{raw_prefix}sensor_data-machine_001.csv")
        == (raw_dir / "sensor_data-machine_001.csv").read_bytes()
    )
    described = client.describe_processing_job(ProcessingJobName="sw-features-1")
    assert described["AppSpecification"] == plan.request["AppSpecification"]
    assert described["ProcessingInputs"] == plan.request["ProcessingInputs"]
    assert described["RoleArn"] == ROLE

    # Planning the same local input again names the same objects: nothing new.
    again = plans.plan_features(
        settings, job_name="sw-features-2", input_uri=str(raw_dir), bundle=bundle
    )
    assert again.request["ProcessingInputs"] == plan.request["ProcessingInputs"]


def test_an_upload_cut_short_is_completed(settings, raw_dir, bundle, s3_bucket):
    plan = plans.plan_features(
        settings, job_name="sw-features-4", input_uri=str(raw_dir), bundle=bundle
    )
    raw = plan.uploads[1]
    launch.upload(raw)
    prefix = raw.uri.split(f"s3://{s3_bucket}/")[1]
    first = f"{prefix}sensor_data-machine_001.csv"
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key=first)
    assert first not in _keys(s3_bucket, prefix)

    launch.upload(raw)

    assert (
        _body(s3_bucket, first)
        == (raw_dir / "sensor_data-machine_001.csv").read_bytes()
    )
    assert len(_keys(s3_bucket, prefix)) == 2


def test_processing_output_with_old_files_is_refused(
    settings, client, bundle, s3_bucket
) -> None:
    plan = plans.plan_features(settings, job_name="sw-features-3", bundle=bundle)
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="sagewatch/features/features-m-algo-1.parquet", Body=b"x"
    )
    with pytest.raises(ConfigError, match="already holds files from an earlier run"):
        launch.submit_job(plan, client=client, poll_seconds=0)
    summaries = client.list_processing_jobs()["ProcessingJobSummaries"]
    assert "sw-features-3" not in [j["ProcessingJobName"] for j in summaries]


def test_training_then_scoring_with_the_trained_model(
    settings, client, bundle, s3_bucket
) -> None:
    train = plans.plan_training(settings, job_name="sw-train-1", bundle=bundle)
    done = launch.submit_job(train, client=client, poll_seconds=0, on_status=None)
    described = client.describe_training_job(TrainingJobName="sw-train-1")
    assert described["HyperParameters"] == train.request["HyperParameters"]
    # moto keeps no MetricDefinitions; the image is what it stores.
    assert described["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    model = launch.training_model_uri(client, "sw-train-1")
    assert model == done["ModelArtifacts"]["S3ModelArtifacts"]
    assert model == plans.model_artifact_uri(settings, "sw-train-1")

    score = plans.plan_scoring(
        settings, job_name="sw-score-1", model_uri=model, bundle=bundle
    )
    launch.submit_job(score, client=client, wait=False)
    inputs = client.describe_processing_job(ProcessingJobName="sw-score-1")[
        "ProcessingInputs"
    ]
    assert {i["InputName"]: i["S3Input"]["S3Uri"] for i in inputs}["model"] == model


def test_pipeline_is_created_updated_and_started(
    settings, raw_dir, client, bundle, s3_bucket
) -> None:
    plan = workflow.plan_pipeline(settings, input_uri=str(raw_dir), bundle=bundle)
    lines: list[str] = []

    result = launch.submit_pipeline(
        plan, client=client, poll_seconds=0, on_status=lines.append
    )

    assert result["PipelineExecutionStatus"] == "Succeeded"
    assert lines[0] == "created pipeline sagewatch"
    assert lines[-1] == "execution: Succeeded"
    described = client.describe_pipeline(PipelineName="sagewatch")
    assert described["PipelineDefinition"] == plan.request["PipelineDefinition"]
    assert json.loads(described["PipelineDefinition"]) == plan.definition
    executions = client.list_pipeline_executions(PipelineName="sagewatch")
    assert [
        e["PipelineExecutionArn"] for e in executions["PipelineExecutionSummaries"]
    ] == [result["PipelineExecutionArn"]]
    assert _body(s3_bucket, f"sagewatch/{bundle.key}") == bundle.data

    changed = workflow.plan_pipeline(
        settings.with_overrides({"epochs": 7}),
        input_uri=str(raw_dir),
        bundle=bundle,
        start=False,
    )
    again = launch.submit_pipeline(changed, client=client, on_status=lines.append)
    assert again == {"PipelineArn": result["PipelineArn"]}
    assert lines[-1] == "updated pipeline sagewatch"
    stored = json.loads(
        client.describe_pipeline(PipelineName="sagewatch")["PipelineDefinition"]
    )
    epochs = [p for p in stored["Parameters"] if p["Name"] == "Epochs"]
    assert epochs[0]["DefaultValue"] == 7


def test_pipeline_execution_gets_the_parameters_given(
    settings, raw_dir, client, bundle
) -> None:
    plan = workflow.plan_pipeline(
        settings,
        input_uri=str(raw_dir),
        bundle=bundle,
        parameters={"Epochs": "5", "TrainingInstanceType": "ml.m5.2xlarge"},
    )
    result = launch.submit_pipeline(plan, client=client, wait=False)
    sent = client.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=result["PipelineExecutionArn"]
    )["PipelineParameters"]
    assert sent == [
        {"Name": "Epochs", "Value": "5"},
        {"Name": "TrainingInstanceType", "Value": "ml.m5.2xlarge"},
    ]


def test_pipeline_execution_uploads_a_local_input_parameter(
    settings, raw_dir, client, bundle, s3_bucket
) -> None:
    plan = workflow.plan_pipeline(
        settings, bundle=bundle, parameters={"InputDataUri": str(raw_dir)}
    )
    result = launch.submit_pipeline(plan, client=client, wait=False)

    raw = plan.uploads[-1]
    prefix = raw.uri.split(f"s3://{s3_bucket}/")[1]
    assert _keys(s3_bucket, prefix) == [
        f"{prefix}{p.name}" for p in sorted(raw_dir.iterdir())
    ]
    sent = client.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=result["PipelineExecutionArn"]
    )["PipelineParameters"]
    assert sent == [{"Name": "InputDataUri", "Value": raw.uri}]


def test_features_job_uploads_local_label_windows(
    settings, client, bundle, s3_bucket, tmp_path
) -> None:
    windows = tmp_path / "windows.json"
    windows.write_text('{"m.csv": [["2024-01-01", "2024-01-02"]]}', encoding="utf-8")
    local = settings.with_overrides({"label_windows": str(windows)})
    plan = plans.plan_features(local, job_name="sw-features-5", bundle=bundle)

    launch.submit_job(plan, client=client, wait=False)

    uri = plan.uploads[-1].uri
    assert _body(s3_bucket, uri.split(f"s3://{s3_bucket}/")[1]) == (
        windows.read_bytes()
    )
    described = client.describe_processing_job(ProcessingJobName="sw-features-5")
    arguments = described["AppSpecification"]["ContainerArguments"]
    assert f"label_windows={json.dumps(uri)}" in arguments


def test_cli_submits_features_without_waiting(
    settings, raw_dir, s3_bucket, monkeypatch
) -> None:
    monkeypatch.setenv("SAGEMAKER_ROLE", ROLE)
    monkeypatch.setenv("SAGEMAKER_BUCKET", s3_bucket)
    monkeypatch.setenv("SAGEMAKER_IMAGE_URI", IMAGE)
    args = ["sagemaker", "features", "--input", str(raw_dir), "--no-wait"]
    result = CliRunner().invoke(main, [*args, "--job-name", "sw-cli-1"])
    assert result.exit_code == 0, result.output
    assert "created processing job sw-cli-1" in result.output
    client = launch.sagemaker_client("us-east-1")
    assert client.describe_processing_job(ProcessingJobName="sw-cli-1")


def test_cli_refuses_to_submit_without_a_role(s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv("SAGEMAKER_BUCKET", s3_bucket)
    monkeypatch.setenv("SAGEMAKER_IMAGE_URI", IMAGE)
    result = CliRunner().invoke(main, ["sagemaker", "train"])
    assert result.exit_code == 2
    assert "role (SAGEMAKER_ROLE)" in result.output


# ----------------------------------------------------------------------------- failures


def test_failed_job_reports_the_reason_sagemaker_gives() -> None:
    client = boto3.client("sagemaker", region_name="us-east-1")
    name = {"TrainingJobName": "sw-train-9"}
    with Stubber(client) as stub:
        for status, secondary, extra in (
            ("InProgress", "Starting", {}),
            ("InProgress", "Training", {}),
            ("Failed", "Failed", {"FailureReason": "train failed: unknown 'epochz'"}),
        ):
            stub.add_response(
                "describe_training_job",
                _training_description(status, secondary, **extra),
                name,
            )
        lines: list[str] = []
        with pytest.raises(
            CloudError, match=r"training job sw-train-9 failed: .*epochz"
        ):
            launch.wait_for_job(
                client,
                "CreateTrainingJob",
                "sw-train-9",
                on_status=lines.append,
                sleep=lambda _: None,
            )
    assert lines == [
        "training job sw-train-9: InProgress (Starting)",
        "training job sw-train-9: InProgress (Training)",
        "training job sw-train-9: Failed (Failed)",
    ]


def test_refused_call_names_the_operation() -> None:
    client = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_client_error(
            "describe_training_job",
            service_error_code="ValidationException",
            service_message="Requested resource not found.",
        )
        with pytest.raises(CloudError, match="DescribeTrainingJob refused: Valid"):
            launch.training_model_uri(client, "missing")


def _training_description(status: str, secondary: str, **extra) -> dict:
    from datetime import UTC, datetime

    return {
        "TrainingJobName": "sw-train-9",
        "TrainingJobArn": (
            "arn:aws:sagemaker:us-east-1:123456789012:training-job/sw-train-9"
        ),
        "ModelArtifacts": {"S3ModelArtifacts": ""},
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "AlgorithmSpecification": {"TrainingInputMode": "File"},
        "ResourceConfig": {"VolumeSizeInGB": 30},
        "StoppingCondition": {},
        "CreationTime": datetime(2024, 1, 1, tzinfo=UTC),
        **extra,
    }
