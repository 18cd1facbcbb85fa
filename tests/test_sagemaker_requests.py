"""SageMaker requests, built offline: valid for botocore, deterministic, round-trip.

No AWS and no network: botocore's bundled service model is the reference.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tomllib
from datetime import datetime
from pathlib import Path

import botocore.session
import pytest
from botocore.validate import validate_parameters
from click.testing import CliRunner

from sagewatch.cli import main
from sagewatch.config import Settings
from sagewatch.errors import ConfigError
from sagewatch.sagemaker import bundle as bundle_mod
from sagewatch.sagemaker import contract, jobs, plans, workflow
from sagewatch.sagemaker.entrypoints import parse_setting_args, resolve_settings
from sagewatch.sagemaker.validation import validate_request

ROOT = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/sagewatch-test"
IMAGE = "registry.example/pytorch-training:2.5-cpu-py311"


@pytest.fixture(scope="module")
def bundle() -> bundle_mod.SourceBundle:
    return bundle_mod.build_source_bundle()


@pytest.fixture
def settings() -> Settings:
    return Settings().with_overrides(
        {"role": ROLE, "bucket": "sagewatch-bucket", "image_uri": IMAGE, "epochs": 2}
    )


def _botocore_validate(operation: str, request: dict) -> None:
    """Validate with botocore alone, as boto3 does before sending."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    validate_parameters(request, model.operation_model(operation).input_shape)


def _all_plans(settings: Settings, bundle) -> list[plans.JobPlan]:
    return [
        plans.plan_features(settings, job_name="f-1", bundle=bundle),
        plans.plan_training(settings, job_name="t-1", bundle=bundle),
        plans.plan_scoring(
            settings,
            job_name="s-1",
            model_uri=plans.model_artifact_uri(settings, "t-1"),
            bundle=bundle,
        ),
    ]


# ----------------------------------------------------------------------------- valid


def test_every_job_request_passes_botocore_validation(settings, bundle) -> None:
    for plan in _all_plans(settings, bundle):
        _botocore_validate(plan.operation, plan.request)
        assert plan.placeholders == ()


def test_every_pipeline_step_passes_botocore_validation(settings, bundle) -> None:
    pipeline = workflow.plan_pipeline(settings, bundle=bundle)
    steps = workflow.step_requests(pipeline.definition)
    assert [op for op, _ in steps] == [
        "CreateProcessingJob",
        "CreateTrainingJob",
        "CreateProcessingJob",
        "CreateProcessingJob",
    ]
    for operation, request in steps:
        _botocore_validate(operation, request)
    create = {**pipeline.request, "ClientRequestToken": "t" * 32}
    _botocore_validate("CreatePipeline", create)


def test_validation_refuses_what_botocore_and_sagemaker_refuse(settings, bundle):
    request = plans.plan_features(settings, job_name="f-1", bundle=bundle).request
    cluster = request["ProcessingResources"]["ClusterConfig"]
    with pytest.raises(ConfigError, match="InstanceCount"):
        validate_request(
            "CreateProcessingJob",
            {
                **request,
                "ProcessingResources": {
                    "ClusterConfig": {**cluster, "InstanceCount": "1"}
                },
            },
        )
    # botocore skips maxima, patterns and enums; SageMaker would refuse these.
    app = {**request["AppSpecification"], "ContainerArguments": ["x" * 257]}
    with pytest.raises(ConfigError, match="257 characters, at most 256"):
        validate_request("CreateProcessingJob", {**request, "AppSpecification": app})
    with pytest.raises(ConfigError, match="RoleArn"):
        validate_request("CreateProcessingJob", {**request, "RoleArn": "x" * 25})
    with pytest.raises(ConfigError, match="job name 'bad_name'"):
        plans.plan_features(settings, job_name="bad_name", bundle=bundle)


def test_container_entrypoint_fits_sagemaker_limits() -> None:
    assert all(len(item) <= 256 for item in jobs.PROCESSING_ENTRYPOINT)


# ------------------------------------------------------------------ deterministic


def test_two_builds_are_byte_identical(settings) -> None:
    first, second = bundle_mod.build_source_bundle(), bundle_mod.build_source_bundle()
    assert first.data == second.data
    assert first.sha256 == second.sha256
    for a, b in zip(
        _all_plans(settings, first), _all_plans(settings, second), strict=True
    ):
        assert a.to_json() == b.to_json()
    assert (
        workflow.plan_pipeline(settings, bundle=first).request
        == workflow.plan_pipeline(settings, bundle=second).request
    )
    assert (
        workflow.plan_pipeline(settings, bundle=first).to_json()
        == workflow.plan_pipeline(settings, bundle=second).to_json()
    )


def test_source_bundle_content_and_key_follow_the_code(tmp_path: Path) -> None:
    package = tmp_path / "sagewatch"
    shutil.copytree(bundle_mod.package_root(), package)
    original = bundle_mod.build_source_bundle(package)
    assert original.key.startswith(f"code/{original.sha256[:16]}/")
    with tarfile.open(fileobj=io.BytesIO(original.data), mode="r:gz") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        requirements = tar.extractfile("requirements.txt").read().decode()
    assert "sagewatch/sagemaker/entrypoints.py" in names
    assert contract.TRAIN_PROGRAM in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert "torch" not in requirements
    (package / "features.py").write_text("# changed\n", encoding="utf-8")
    assert bundle_mod.build_source_bundle(package).sha256 != original.sha256


def test_container_requirements_are_pyproject_dependencies_without_torch() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = [d for d in pyproject["project"]["dependencies"] if "torch" not in d]
    assert sorted(bundle_mod.REQUIREMENTS) == sorted(declared)


# ----------------------------------------------------------------------------- settings


def test_hyperparameters_round_trip_through_the_toolkit_decoding(bundle) -> None:
    settings = Settings().with_overrides(
        {
            "hidden_dims": [16, 8],
            "learning_rate": 1e-3,
            "detector": "pca",
            "train_until": datetime(2024, 1, 2, 3, 4, 5),
            "statistics": ["value", "mean"],
        }
    )
    hps = jobs.training_hyperparameters(settings, "s3://b/code/x/sourcedir.tar.gz")
    assert all(isinstance(v, str) for v in hps.values())
    assert hps["sagemaker_program"] == json.dumps(contract.TRAIN_PROGRAM)
    assert hps["hidden_dims"] == "[16, 8]"
    assert hps["train_rows"] == "null"

    def toolkit_decode(value: str):  # what sagemaker-training does to each value
        try:
            return json.loads(value)
        except ValueError:
            return value

    decoded = {
        k: toolkit_decode(v) for k, v in hps.items() if not k.startswith("sagemaker_")
    }
    again = resolve_settings(None, decoded)
    for section in ("features", "reference", "model"):
        assert getattr(again, section) == getattr(settings, section)


def test_stage_arguments_carry_exactly_the_non_default_settings() -> None:
    settings = Settings().with_overrides(
        {"rolling_window": 6, "label_column": None, "sep": ";", "max_fill_gap": 0}
    )
    args = jobs.stage_arguments(settings, "features")
    assert args == [
        "features",
        "--set",
        "label_column=null",
        "--set",
        'sep=";"',
        "--set",
        "max_fill_gap=0",
        "--set",
        "rolling_window=6",
    ]
    values = parse_setting_args(args[2::2])
    again = resolve_settings(None, values)
    assert again.data == settings.data
    assert again.quality == settings.quality
    assert again.features == settings.features
    assert jobs.stage_arguments(settings, "score") == ["score"]


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_definition_wires_steps_through_properties(settings, bundle) -> None:
    plan = workflow.plan_pipeline(settings, bundle=bundle)
    definition = json.loads(plan.request["PipelineDefinition"])
    assert definition == plan.definition
    assert definition["Version"] == "2020-12-01"
    steps = {s["Name"]: s for s in definition["Steps"]}
    assert list(steps) == ["Features", "Train", "Score", "Evaluate"]
    train = steps["Train"]["Arguments"]
    channel = train["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
    features = "Steps.Features.ProcessingOutputConfig.Outputs['features']"
    assert channel == {"Get": f"{features}.S3Output.S3Uri"}
    assert train["HyperParameters"]["epochs"] == {
        "Std:Join": {"On": "", "Values": [{"Get": "Parameters.Epochs"}]}
    }
    score_inputs = {
        i["InputName"]: i["S3Input"]["S3Uri"]
        for i in steps["Score"]["Arguments"]["ProcessingInputs"]
    }
    assert score_inputs["model"] == {
        "Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"
    }
    assert all(s["CacheConfig"]["ExpireAfter"] == "P30D" for s in steps.values())
    params = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}
    assert params["Epochs"] == 2
    assert params["InputDataUri"] == "s3://sagewatch-bucket/sagewatch/raw/"
    resolved = dict(workflow.step_requests(definition)[2][1]["ProcessingInputs"][1])
    assert resolved["S3Input"]["S3Uri"] == (
        "s3://sagewatch-bucket/sagewatch/pipeline/stand-in-execution-id/model/"
        "stand-in-job/output/model.tar.gz"
    )


def test_pipeline_reference_to_a_missing_output_is_refused(settings, bundle) -> None:
    definition = workflow.plan_pipeline(settings, bundle=bundle).definition
    text = json.dumps(definition).replace("Outputs['scores']", "Outputs['score']")
    with pytest.raises(ConfigError, match=r"Evaluate: cannot resolve"):
        workflow.step_requests(json.loads(text))


# ----------------------------------------------------------------------------- target


def test_missing_account_settings_become_placeholders_or_errors(bundle) -> None:
    bare = Settings()
    plan = plans.plan_features(bare, job_name="f-1", bundle=bundle)
    assert set(plan.placeholders) == {"role", "bucket", "image_uri"}
    assert plan.request["RoleArn"].endswith("${SAGEMAKER_ROLE}")
    with pytest.raises(ConfigError, match=r"SAGEMAKER_ROLE.*SAGEMAKER_BUCKET"):
        plans.plan_features(bare, job_name="f-1", strict=True, bundle=bundle)


def test_distributed_training_is_refused(settings, bundle) -> None:
    many = settings.with_overrides({"training_instance_count": 2})
    with pytest.raises(ConfigError, match="training_instance_count=2"):
        plans.plan_training(many, job_name="t-1", bundle=bundle)


def test_spot_training_sets_a_wait_limit(settings, bundle) -> None:
    spot = settings.with_overrides({"spot_training": True})
    request = plans.plan_training(spot, job_name="t-1", bundle=bundle).request
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 3600,
        "MaxWaitTimeInSeconds": 7200,
    }


# ----------------------------------------------------------------------------- cli


def test_cli_pipeline_plan_prints_the_definition(monkeypatch) -> None:
    monkeypatch.setenv("SAGEMAKER_ROLE", ROLE)
    monkeypatch.setenv("SAGEMAKER_BUCKET", "sagewatch-bucket")
    monkeypatch.setenv("SAGEMAKER_IMAGE_URI", IMAGE)
    result = CliRunner().invoke(
        main, ["sagemaker", "pipeline", "--plan", "--epochs", "3"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    create = plan["requests"][0]["request"]
    assert create["RoleArn"] == ROLE
    assert [s["Name"] for s in create["PipelineDefinition"]["Steps"]] == list(
        workflow.STEPS
    )
    epochs = [
        p for p in create["PipelineDefinition"]["Parameters"] if p["Name"] == "Epochs"
    ]
    assert epochs[0]["DefaultValue"] == 3
    assert plan["placeholders"] == []


def _pipeline_plan(monkeypatch, *args: str):
    monkeypatch.setenv("SAGEMAKER_ROLE", ROLE)
    monkeypatch.setenv("SAGEMAKER_BUCKET", "sagewatch-bucket")
    monkeypatch.setenv("SAGEMAKER_IMAGE_URI", IMAGE)
    return CliRunner().invoke(main, ["sagemaker", "pipeline", "--plan", *args])


def test_cli_pipeline_plan_shows_the_start_request_with_parameters(
    monkeypatch,
) -> None:
    result = _pipeline_plan(
        monkeypatch,
        "--param",
        "Epochs=050",
        "--param",
        "ProcessingInstanceCount=4",
        "--param",
        "InputDataUri=s3://other/raw/",
    )
    assert result.exit_code == 0, result.output
    requests = json.loads(result.output)["requests"]
    assert requests[1] == {
        "operation": "StartPipelineExecution",
        "request": {
            "PipelineName": "sagewatch",
            "PipelineParameters": [
                {"Name": "Epochs", "Value": "50"},
                {"Name": "ProcessingInstanceCount", "Value": "4"},
                {"Name": "InputDataUri", "Value": "s3://other/raw/"},
            ],
        },
    }
    plain = json.loads(_pipeline_plan(monkeypatch).output)["requests"]
    assert plain[1]["request"] == {"PipelineName": "sagewatch"}


def test_cli_pipeline_plan_without_start_lists_no_execution(monkeypatch) -> None:
    result = _pipeline_plan(monkeypatch, "--no-start")
    assert result.exit_code == 0, result.output
    operations = [r["operation"] for r in json.loads(result.output)["requests"]]
    assert operations == ["CreatePipeline (UpdatePipeline when it exists)"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--param", "Foo=1"],
            "pipeline parameter 'Foo' is not declared; expected one of InputDataUri, "
            "Epochs, ProcessingInstanceType, ProcessingInstanceCount, "
            "TrainingInstanceType",
        ),
        (
            ["--param", "Epochs=abc"],
            "pipeline parameter 'Epochs': expected integer, got 'abc'",
        ),
        (
            ["--param", "ProcessingInstanceCount=1.5"],
            "pipeline parameter 'ProcessingInstanceCount': expected integer, got '1.5'",
        ),
        (
            ["--param", "Epochs=0"],
            "invalid configuration from pipeline parameter 'Epochs': model.epochs: "
            "Input should be greater than or equal to 1 (got 0)",
        ),
        (
            ["--param", "Epochs=-3"],
            "invalid configuration from pipeline parameter 'Epochs': model.epochs: "
            "Input should be greater than or equal to 1 (got -3)",
        ),
        (
            ["--param", "ProcessingInstanceCount=0"],
            "invalid configuration from pipeline parameter 'ProcessingInstanceCount': "
            "sagemaker.processing_instance_count: Input should be greater than or "
            "equal to 1 (got 0)",
        ),
        (
            ["--param", "TrainingInstanceType=ml.m5.xlarg"],
            "pipeline parameter 'TrainingInstanceType': 'ml.m5.xlarg' is not a "
            "SageMaker training instance type; expected one of the 225 values of "
            "TrainingInstanceType in botocore's SageMaker service model, e.g. "
            "ml.m5.xlarge, ml.c5.2xlarge, ml.g4dn.xlarge (newer types need a newer "
            "botocore); did you mean ml.m5.xlarge?",
        ),
        (
            ["--param", "InputDataUri=s3://"],
            "pipeline parameter 'InputDataUri': expected an s3://bucket/prefix/ URI "
            "or a local path to upload, got 's3://'",
        ),
        (["--param", "Epochs"], "--param 'Epochs': expected NAME=VALUE"),
        (
            ["--no-start", "--param", "Epochs=3"],
            "--param sets an execution's parameters; --no-start starts none",
        ),
    ],
    ids=[
        "unknown",
        "not-integer",
        "fraction",
        "zero-epochs",
        "negative-epochs",
        "zero-instances",
        "unknown-instance-type",
        "no-bucket",
        "no-equals",
        "no-start",
    ],
)
def test_cli_pipeline_refuses_bad_parameters_in_one_line(
    monkeypatch, args: list[str], expected: str
) -> None:
    result = _pipeline_plan(monkeypatch, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {expected}\n"
    assert result.stdout == ""


def test_cli_pipeline_uploads_a_local_input_parameter(
    monkeypatch, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "pump.csv").write_text("timestamp,t\n2024-01-01,1\n", encoding="utf-8")

    result = _pipeline_plan(monkeypatch, "--param", f"InputDataUri={raw}")

    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    upload = plan["uploads"][1]
    assert upload["source"] == str(raw)
    assert upload["uri"].startswith("s3://sagewatch-bucket/sagewatch/uploads/")
    assert plan["requests"][1]["request"]["PipelineParameters"] == [
        {"Name": "InputDataUri", "Value": upload["uri"]}
    ]


def test_cli_pipeline_input_parameter_on_s3_is_read_as_its_prefix(monkeypatch) -> None:
    result = _pipeline_plan(monkeypatch, "--param", "InputDataUri=s3://data/raw")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["requests"][1]["request"][
        "PipelineParameters"
    ] == [{"Name": "InputDataUri", "Value": "s3://data/raw/"}]

    globbed = _pipeline_plan(monkeypatch, "--param", "InputDataUri=s3://data/r*/")
    assert globbed.exit_code == 2
    assert "a SageMaker job reads an S3 prefix, not a glob" in globbed.output


def test_float_parameters_are_checked_as_numbers() -> None:
    definition = {"Parameters": [{"Name": "Rate", "Type": "Float"}]}
    assert workflow.execution_parameters(definition, {"Rate": "1e-3"}) == [
        {"Name": "Rate", "Value": "0.001"}
    ]
    with pytest.raises(ConfigError, match="'Rate': expected float, got 'fast'"):
        workflow.execution_parameters(definition, {"Rate": "fast"})


def test_parameters_without_an_execution_are_refused(settings, bundle) -> None:
    with pytest.raises(ConfigError, match="no execution is started"):
        workflow.plan_pipeline(
            settings, bundle=bundle, start=False, parameters={"Epochs": "3"}
        )


def test_cli_help_imports_no_aws_code() -> None:
    code = (
        "import sys\n"
        "from sagewatch.cli import main\n"
        "for args in (['--help'], ['sagemaker', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('boto3', 'botocore', 'torch', 'sagewatch.sagemaker.jobs')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------------- label windows


def _windows_file(tmp_path: Path) -> Path:
    path = tmp_path / "windows.json"
    path.write_text('{"pump.csv": [["2024-01-01", "2024-01-02"]]}', encoding="utf-8")
    return path


def test_local_label_windows_are_uploaded_and_passed_as_s3(
    settings, bundle, tmp_path: Path
) -> None:
    windows = _windows_file(tmp_path)
    local = settings.with_overrides({"label_windows": str(windows)})

    plan = plans.plan_features(local, job_name="f-1", bundle=bundle)

    upload = plan.uploads[-1]
    assert upload.data == windows.read_bytes()
    assert upload.uri == (
        f"s3://sagewatch-bucket/sagewatch/uploads/{upload.sha256[:16]}/windows.json"
    )
    arguments = plan.request["AppSpecification"]["ContainerArguments"]
    assert f"label_windows={json.dumps(upload.uri)}" in arguments
    assert str(windows) not in json.dumps(plan.request)
    steps = workflow.plan_pipeline(local, bundle=bundle)
    assert upload in steps.uploads
    features = steps.definition["Steps"][0]["Arguments"]["AppSpecification"]
    assert f"label_windows={json.dumps(upload.uri)}" in features["ContainerArguments"]


def test_s3_label_windows_are_passed_as_given(settings, bundle) -> None:
    uri = "s3://sagewatch-bucket/labels/windows.json"
    plan = plans.plan_features(
        settings.with_overrides({"label_windows": uri}), job_name="f-1", bundle=bundle
    )
    assert len(plan.uploads) == 1  # the code only
    arguments = plan.request["AppSpecification"]["ContainerArguments"]
    assert f"label_windows={json.dumps(uri)}" in arguments


def test_cli_plan_shows_the_planned_label_windows_uri(
    monkeypatch, tmp_path: Path
) -> None:
    _account(monkeypatch)
    windows = _windows_file(tmp_path)
    result = CliRunner().invoke(
        main,
        [
            "sagemaker",
            "features",
            "--plan",
            "--input",
            "s3://sagewatch-bucket/raw/",
            "--label-windows",
            str(windows),
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    upload = plan["uploads"][-1]
    assert upload["source"] == str(windows)
    arguments = plan["requests"][0]["request"]["AppSpecification"]
    assert (
        f"label_windows={json.dumps(upload['uri'])}" in arguments["ContainerArguments"]
    )


@pytest.mark.parametrize(
    ("content", "code", "expected"),
    [
        (None, 4, "cannot read"),
        ("{not json", 4, "label_windows {path}: not valid JSON"),
    ],
    ids=["missing", "not-json"],
)
def test_cli_refuses_unreadable_label_windows_in_one_line(
    monkeypatch, tmp_path: Path, content, code: int, expected: str
) -> None:
    _account(monkeypatch)
    path = tmp_path / "windows.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = CliRunner().invoke(
        main, ["sagemaker", "features", "--plan", "--label-windows", str(path)]
    )
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ")
    assert expected.format(path=path) in result.stderr
    assert result.stderr.count("\n") == 1


# ----------------------------------------------------------------- instance types


@pytest.mark.parametrize(
    ("command", "kind"),
    [("features", "processing"), ("train", "training"), ("pipeline", "processing")],
)
def test_cli_unknown_instance_type_gets_a_short_line(
    monkeypatch, command: str, kind: str
) -> None:
    _account(monkeypatch)
    flag = "--processing-instance-type" if command == "pipeline" else "--instance-type"
    result = CliRunner().invoke(main, ["sagemaker", command, "--plan", flag, "foo"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        f"error: {kind}_instance_type: 'foo' is not a SageMaker {kind} instance "
        "type; expected one of the "
    )
    assert "e.g. ml.m5.xlarge" in result.stderr
    assert "botocore's SageMaker service model" in result.stderr
    assert len(result.stderr) < 400
    assert result.stdout == ""


def test_long_enumerations_are_summarised_short_ones_listed(settings, bundle):
    request = plans.plan_features(settings, job_name="f-1", bundle=bundle).request
    cluster = request["ProcessingResources"]["ClusterConfig"]
    resources = {"ClusterConfig": {**cluster, "InstanceType": "ml.nope"}}
    with pytest.raises(ConfigError) as refused:
        validate_request(
            "CreateProcessingJob", {**request, "ProcessingResources": resources}
        )
    assert "'ml.nope' is not one of the 207 values of ProcessingInstanceType" in str(
        refused.value
    )
    assert len(str(refused.value)) < 300
    output = request["ProcessingOutputConfig"]["Outputs"][0]
    bad = {**output, "S3Output": {**output["S3Output"], "S3UploadMode": "Later"}}
    with pytest.raises(ConfigError, match=r"'Later' is not one of \['Continuous', "):
        validate_request(
            "CreateProcessingJob",
            {**request, "ProcessingOutputConfig": {"Outputs": [bad]}},
        )


# ----------------------------------------------------------------------- profiles


def _account(monkeypatch) -> None:
    monkeypatch.setenv("SAGEMAKER_ROLE", ROLE)
    monkeypatch.setenv("SAGEMAKER_BUCKET", "sagewatch-bucket")
    monkeypatch.setenv("SAGEMAKER_IMAGE_URI", IMAGE)


@pytest.fixture
def missing_profile(monkeypatch, tmp_path: Path) -> None:
    """AWS_PROFILE names a profile the (empty) AWS config does not have.

    The endpoint is a closed loopback port, so nothing could leave the machine.
    The service model is loaded afresh, as in a new process.
    """
    from sagewatch.sagemaker.validation import service_model

    service_model.cache_clear()
    for name in ("config", "credentials"):
        (tmp_path / name).write_text("", encoding="utf-8")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "nosuchprofile")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    _account(monkeypatch)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--plan"],
        ["train", "--no-wait"],
        ["score", "--plan", "--training-job-name", "t-1"],
        ["score", "--training-job-name", "t-1"],
        ["pipeline", "--plan"],
    ],
    ids=["train-plan", "train-submit", "score-plan", "score-submit", "pipeline-plan"],
)
@pytest.mark.parametrize("region", [None, "us-east-1"], ids=["no-region", "region"])
def test_a_missing_profile_is_one_line_with_exit_4(
    missing_profile, monkeypatch, args: list[str], region: str | None
) -> None:
    if region:
        monkeypatch.setenv("SAGEMAKER_REGION", region)
    result = CliRunner().invoke(main, ["sagemaker", *args])
    if region and "--plan" in args:
        # The region is given: --plan looks up no profile at all.
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["placeholders"] == []
        return
    assert result.exit_code == 4, result.output
    assert result.stderr.count("\n") == 1
    assert "The config profile (nosuchprofile) could not be found" in result.stderr
    assert "check AWS_PROFILE and ~/.aws/config" in result.stderr


def test_aws_region_alone_sets_the_region(monkeypatch, settings, bundle) -> None:
    from sagewatch.sagemaker import launch

    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    plan = plans.plan_training(settings, job_name="t-1", bundle=bundle)
    assert plan.request["HyperParameters"]["sagemaker_region"] == '"eu-west-1"'
    assert launch.sagemaker_client(None).meta.region_name == "eu-west-1"


# ------------------------------------------------------------------------- README


def test_readme_says_how_the_pipeline_plan_differs_from_what_is_sent(
    settings, bundle
) -> None:
    """Guards the README's --plan wording against the plan's actual shape."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Run on SageMaker", 1)[1].split("\n## ", 1)[0]
    assert "prints its exact requests" not in section
    assert "`ClientRequestToken`" in section

    pipeline = workflow.plan_pipeline(settings, bundle=bundle)
    create = pipeline.to_dict()["requests"][0]["request"]
    assert create["PipelineDefinition"] == pipeline.definition  # an object here
    text = workflow.definition_text(create["PipelineDefinition"])
    assert {**create, "PipelineDefinition": text} == pipeline.request
    model = botocore.session.get_session().get_service_model("sagemaker")
    for operation in ("CreatePipeline", "StartPipelineExecution"):
        members = model.operation_model(operation).input_shape.members
        assert members["ClientRequestToken"].metadata["idempotencyToken"]
    assert "ClientRequestToken" not in json.dumps(pipeline.to_dict()["requests"])


def _s3_input(plan: plans.JobPlan, name: str) -> str:
    """The S3 URI of the processing input ``name`` of a planned job."""
    inputs = plan.request["ProcessingInputs"]
    return next(i for i in inputs if i["InputName"] == name)["S3Input"]["S3Uri"]


def test_s3_inputs_become_the_prefix_the_local_commands_read(settings, bundle) -> None:
    def read(uri: str) -> str:
        plan = plans.plan_features(
            settings, job_name="f-1", bundle=bundle, input_uri=uri
        )
        return _s3_input(plan, "raw")

    assert read("s3://data/raw") == "s3://data/raw/"  # not also raw-old/
    assert read("s3://data/raw/") == "s3://data/raw/"
    assert read("s3://data/raw/pump-7.csv") == "s3://data/raw/pump-7.csv"
    with pytest.raises(ConfigError, match="in lower case"):
        read("s3://data/raw/PUMP-7.CSV")  # the job's folder listing would miss it
    assert read("s3://data") == "s3://data/"
    with pytest.raises(ConfigError) as caught:
        read("s3://data/raw/*.csv")
    assert str(caught.value).startswith(
        "s3://data/raw/*.csv: a SageMaker job reads an S3 prefix, not a glob"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["score", "--plan", "--model-uri", "/tmp/model"],
        ["score", "--plan", "--training-job-name", "t", "--output", "out/scores"],
        ["features", "--plan", "--output", "/tmp/features"],
    ],
)
def test_cli_refuses_a_local_path_where_a_job_needs_s3(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["sagemaker", *args])
    assert result.exit_code == 2
    local = args[args.index("--model-uri" if "--model-uri" in args else "--output") + 1]
    assert f"expected an s3:// URI, got {local!r}" in result.output


def test_cli_refuses_a_glob_where_a_job_needs_an_s3_prefix() -> None:
    result = CliRunner().invoke(
        main, ["sagemaker", "score", "--plan", "--model-uri", "s3://b/m/*"]
    )
    assert result.exit_code == 2
    assert "expected an s3:// prefix, not a glob: 's3://b/m/*'" in result.output


def test_a_model_prefix_is_read_as_its_folder(settings, bundle) -> None:
    def model_input(uri: str) -> str:
        plan = plans.plan_scoring(
            settings, job_name="s-1", model_uri=uri, bundle=bundle
        )
        return _s3_input(plan, "model")

    assert model_input("s3://b/model/t-1") == "s3://b/model/t-1/"  # not t-10/
    archive = "s3://b/model/t-1/output/model.tar.gz"
    assert model_input(archive) == archive
    for other in ("Model.tar.gz", "other.tar.gz", "detector.json", "weights.pt"):
        with pytest.raises(ConfigError, match=r"expected a model\.tar\.gz"):
            model_input(f"s3://b/model/t-1/output/{other}")
