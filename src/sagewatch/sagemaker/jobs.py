"""SageMaker job requests for the features, training, scoring and evaluation stages.

The requests are the raw API's (``CreateProcessingJob``, ``CreateTrainingJob``),
built by hand from the settings and checked offline against botocore's service
model. Why not the SageMaker SDK: its v3 has no PyTorch estimator or processor, weighs
about 1 GB and 3 s of import, and its pipeline definitions embed upload timestamps,
so two builds of one pipeline differ and step caching never hits. Plain requests
are small, deterministic (the same settings and code give the same bytes), and what
``--plan`` prints is exactly what is sent. The SDK is used for one thing only, and
only when the ``sagemaker`` extra is installed: looking up the AWS PyTorch image
for a region (:func:`.target.resolve_image`); otherwise ``image_uri`` must be set.

How code reaches the containers: :mod:`.bundle` packs the package into a
content-addressed ``sourcedir.tar.gz``. Training jobs name it as
``sagemaker_submit_directory``, and the PyTorch image's toolkit unpacks it, installs
its ``requirements.txt`` and runs its training program. Processing jobs receive it
as an input and run a short shell entry point that unpacks it, installs the same
requirements and runs :mod:`.entrypoints`. Both work with any image that has
Python 3.11+ and PyTorch, without building an image.

Every builder accepts pipeline expressions (``{"Get": ...}``) wherever a value may
vary per execution, so :mod:`.workflow` builds its steps from the same functions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sagewatch.config import Settings
from sagewatch.errors import ConfigError
from sagewatch.sagemaker import contract
from sagewatch.sagemaker.target import Target

# A value, or a pipeline expression that resolves to one at execution time.
Expr = Any

# The shell entry point of processing jobs: unpack the code, install, run a stage.
PROCESSING_SCRIPT = (
    "set -e; d=$(mktemp -d); "
    'tar -xzf "${SAGEMAKER_BASE_DIR:-/opt/ml}/processing/input/code/'
    f'{contract.SOURCE_ARCHIVE}" -C "$d"; cd "$d"; '
    "python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt; "
    f'exec python3 -m {contract.ENTRY_MODULE} "$@"'
)
PROCESSING_ENTRYPOINT = ["/bin/sh", "-c", PROCESSING_SCRIPT, "sagewatch"]

# Read by SageMaker from the training log; training.py writes these lines.
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": r"epoch=\d+ train_loss=([-+0-9.eE]+)"},
    {"Name": "validation:loss", "Regex": r"val_loss=([-+0-9.eE]+)"},
]

# The settings each stage reads inside its container.
_STAGE_SECTIONS = {
    "features": ("data", "quality", "features"),
    "score": (),
    "evaluate": ("evaluation",),
}
_TRAINING_SECTIONS = ("features", "reference", "model")
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


def stage_arguments(settings: Settings, stage: str) -> list[str]:
    """The entry point's arguments: the stage, then every non-default setting it reads.

    Each setting is ``--set key=<JSON value>``, which the entry point decodes back to
    the exact value (also ``null``). Defaults are left out: the container runs the
    same code, so its defaults are these.
    """
    defaults = Settings().model_dump(mode="json")
    current = settings.model_dump(mode="json")
    args = [stage]
    for section in _STAGE_SECTIONS[stage]:
        for key, value in current[section].items():
            if value != defaults[section][key]:
                args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def training_hyperparameters(
    settings: Settings, code_uri: str, region: str | None = None
) -> dict[str, Any]:
    """Every feature, reference and model setting as a string, plus the toolkit's keys.

    Strings stay as they are, other values are JSON (``"false"``, ``"[64, 32]"``,
    ``"0.001"``, ``"null"``); the entry point parses them against the declared types.
    """
    current = settings.model_dump(mode="json")
    hps: dict[str, Any] = {}
    for section in _TRAINING_SECTIONS:
        for key, value in current[section].items():
            hps[key] = value if isinstance(value, str) else json.dumps(value)
    hps["sagemaker_program"] = json.dumps(contract.TRAIN_PROGRAM)
    hps["sagemaker_submit_directory"] = json.dumps(code_uri)
    hps["sagemaker_container_log_level"] = "20"
    if region:  # where the toolkit downloads the code archive from
        hps["sagemaker_region"] = json.dumps(region)
    return hps


def processing_input(
    name: str, uri: Expr, local_path: str, *, sharded: bool = False
) -> dict[str, Any]:
    return {
        "InputName": name,
        "AppManaged": False,
        "S3Input": {
            "S3Uri": uri,
            "LocalPath": local_path,
            "S3DataType": "S3Prefix",
            "S3InputMode": "File",
            "S3DataDistributionType": "ShardedByS3Key"
            if sharded
            else "FullyReplicated",
            "S3CompressionType": "None",
        },
    }


def processing_request(
    settings: Settings,
    target: Target,
    *,
    stage: str,
    job_name: str | None,
    inputs: list[dict[str, Any]],
    output: tuple[str, Expr, str],
    instance_type: Expr,
    instance_count: Expr,
) -> dict[str, Any]:
    """A CreateProcessingJob request running one stage's entry point."""
    sm = settings.sagemaker
    name, uri, local_path = output
    request: dict[str, Any] = {"ProcessingJobName": job_name} if job_name else {}
    request |= {
        "ProcessingResources": {
            "ClusterConfig": {
                "InstanceCount": instance_count,
                "InstanceType": instance_type,
                "VolumeSizeInGB": sm.volume_size_gb,
            }
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": sm.max_runtime_seconds},
        "AppSpecification": {
            "ImageUri": target.processing_image,
            "ContainerEntrypoint": PROCESSING_ENTRYPOINT,
            "ContainerArguments": stage_arguments(settings, stage),
        },
        "Environment": {"PYTHONUNBUFFERED": "1"},
        "RoleArn": target.role,
        "ProcessingInputs": inputs,
        "ProcessingOutputConfig": {
            "Outputs": [
                {
                    "OutputName": name,
                    "AppManaged": False,
                    "S3Output": {
                        "S3Uri": uri,
                        "LocalPath": local_path,
                        "S3UploadMode": "EndOfJob",
                    },
                }
            ]
        },
    }
    return request


def features_request(
    settings: Settings,
    target: Target,
    *,
    job_name: str | None,
    code_uri: str,
    input_uri: Expr,
    output_uri: Expr,
    instance_type: Expr = None,
    instance_count: Expr = None,
) -> dict[str, Any]:
    """Processing: raw data (sharded by object) in, per-entity features out."""
    sm = settings.sagemaker
    return processing_request(
        settings,
        target,
        stage="features",
        job_name=job_name,
        inputs=[
            processing_input("code", code_uri, contract.CODE_INPUT),
            processing_input("raw", input_uri, contract.RAW_INPUT, sharded=True),
        ],
        output=("features", output_uri, contract.FEATURES_OUTPUT),
        instance_type=instance_type or sm.processing_instance_type,
        instance_count=instance_count or sm.processing_instance_count,
    )


def score_request(
    settings: Settings,
    target: Target,
    *,
    job_name: str | None,
    code_uri: str,
    features_uri: Expr,
    model_uri: Expr,
    output_uri: Expr,
    instance_type: Expr = None,
    instance_count: Expr = None,
) -> dict[str, Any]:
    """Processing: ``model.tar.gz`` and features (sharded) in, scores out."""
    sm = settings.sagemaker
    return processing_request(
        settings,
        target,
        stage="score",
        job_name=job_name,
        inputs=[
            processing_input("code", code_uri, contract.CODE_INPUT),
            processing_input("model", model_uri, contract.MODEL_INPUT),
            processing_input(
                "features", features_uri, contract.FEATURES_INPUT, sharded=True
            ),
        ],
        output=("scores", output_uri, contract.SCORES_OUTPUT),
        instance_type=instance_type or sm.processing_instance_type,
        instance_count=instance_count or sm.processing_instance_count,
    )


def evaluate_request(
    settings: Settings,
    target: Target,
    *,
    job_name: str | None,
    code_uri: str,
    scores_uri: Expr,
    output_uri: Expr,
    instance_type: Expr = None,
) -> dict[str, Any]:
    """Processing on one instance: every host's scores in, the report out."""
    return processing_request(
        settings,
        target,
        stage="evaluate",
        job_name=job_name,
        inputs=[
            processing_input("code", code_uri, contract.CODE_INPUT),
            processing_input("scores", scores_uri, contract.SCORES_INPUT),
        ],
        output=("evaluation", output_uri, contract.EVALUATION_OUTPUT),
        instance_type=instance_type or settings.sagemaker.processing_instance_type,
        instance_count=1,
    )


def training_request(
    settings: Settings,
    target: Target,
    *,
    job_name: str | None,
    code_uri: str,
    features_uri: Expr,
    output_uri: Expr,
    instance_type: Expr = None,
    epochs: Expr = None,
) -> dict[str, Any]:
    """A CreateTrainingJob request: the ``train`` channel in, ``model.tar.gz`` out.

    Raises:
        ConfigError: ``training_instance_count`` above 1 (not implemented).
    """
    sm = settings.sagemaker
    if sm.training_instance_count != 1:
        raise ConfigError(
            f"training_instance_count={sm.training_instance_count}: distributed "
            "training is not implemented; the detector trains on one instance"
        )
    hps = training_hyperparameters(settings, code_uri, target.region)
    if epochs is not None:
        hps["epochs"] = epochs
    request: dict[str, Any] = {"TrainingJobName": job_name} if job_name else {}
    request |= {
        "AlgorithmSpecification": {
            "TrainingImage": target.training_image,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "RoleArn": target.role,
        "HyperParameters": hps,
        "InputDataConfig": [
            {
                "ChannelName": contract.TRAIN_CHANNEL,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": features_uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
        ],
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {
            "InstanceType": instance_type or sm.training_instance_type,
            "InstanceCount": 1,
            "VolumeSizeInGB": sm.volume_size_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": sm.max_runtime_seconds},
        "Environment": {"PYTHONUNBUFFERED": "1"},
    }
    if sm.spot_training:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = (
            2 * sm.max_runtime_seconds
        )
    return request


def check_job_name(name: str) -> str:
    """Refuse a name SageMaker would refuse (1-63 letters, digits and hyphens).

    Raises:
        ConfigError: naming the rule.
    """
    if not _JOB_NAME.fullmatch(name):
        raise ConfigError(
            f"job name {name!r}: expected 1-63 letters, digits and hyphens, "
            "starting with a letter or digit"
        )
    return name
