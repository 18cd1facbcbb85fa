"""A SageMaker Pipeline of the stages: features -> train -> score -> evaluate.

The definition (schema version 2020-12-01) is plain JSON built from the same
request builders as the single jobs (:mod:`.jobs`); values that vary per execution
are pipeline expressions:

* parameters ``InputDataUri``, ``Epochs``, ``ProcessingInstanceType``,
  ``ProcessingInstanceCount`` and ``TrainingInstanceType``, with the settings as
  defaults;
* each step's outputs go to ``<base>/pipeline/<execution id>/<stage>/``, so
  executions never mix files;
* later steps read earlier steps' outputs through step properties
  (``Steps.Features.ProcessingOutputConfig.Outputs['features'].S3Output.S3Uri``,
  ``Steps.Train.ModelArtifacts.S3ModelArtifacts``), which also orders the steps.

The definition is deterministic: the same settings and code give byte-identical
JSON (the code archive is named by its content hash, nothing carries a time). Step
caching (``cache_expire_after``) therefore reuses a step whose image, arguments,
inputs and code are unchanged; output locations are not part of SageMaker's cache
key, so the per-execution output prefix does not defeat it.

Notes:
    The image is chosen for the default instance types. Choosing a GPU instance
    type at execution time needs a GPU image in ``image_uri``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sagewatch.config import Settings
from sagewatch.errors import ConfigError
from sagewatch.sagemaker import contract
from sagewatch.sagemaker.bundle import SourceBundle, build_source_bundle
from sagewatch.sagemaker.jobs import (
    evaluate_request,
    features_request,
    score_request,
    training_request,
)
from sagewatch.sagemaker.plans import (
    Upload,
    code_upload,
    input_source,
    with_label_windows,
)
from sagewatch.sagemaker.target import Target, locations, resolve_target
from sagewatch.sagemaker.validation import check_instance_type, validate_request

SCHEMA_VERSION = "2020-12-01"
STEPS = ("Features", "Train", "Score", "Evaluate")
_OPERATIONS = {"Processing": "CreateProcessingJob", "Training": "CreateTrainingJob"}


def _get(path: str) -> dict[str, str]:
    return {"Get": path}


def _param(name: str) -> dict[str, str]:
    return _get(f"Parameters.{name}")


def _join(on: str, values: list[Any]) -> dict[str, Any]:
    return {"Std:Join": {"On": on, "Values": values}}


def _processing_output(step: str, output: str) -> dict[str, str]:
    return _get(
        f"Steps.{step}.ProcessingOutputConfig.Outputs['{output}'].S3Output.S3Uri"
    )


@dataclass(frozen=True)
class PipelinePlan:
    """The pipeline definition, the CreatePipeline request and the uploads.

    ``start`` is the StartPipelineExecution request, None when no execution is
    started.
    """

    definition: dict[str, Any]
    request: dict[str, Any]
    uploads: tuple[Upload, ...]
    placeholders: tuple[str, ...]
    start: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.request["PipelineName"])

    def to_dict(self) -> dict[str, Any]:
        """For reading: the definition appears as an object, not as JSON text."""
        text = self.request["PipelineDefinition"]
        requests: list[dict[str, Any]] = [
            {
                "operation": "CreatePipeline (UpdatePipeline when it exists)",
                "request": {**self.request, "PipelineDefinition": self.definition},
                "definition_sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
        ]
        if self.start is not None:
            requests.append(
                {"operation": "StartPipelineExecution", "request": self.start}
            )
        return {
            "uploads": [u.describe() for u in self.uploads],
            "placeholders": list(self.placeholders),
            "requests": requests,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def pipeline_definition(
    settings: Settings, target: Target, *, code: Upload, input_uri: str
) -> dict[str, Any]:
    """The definition object; :func:`definition_text` is what is sent."""
    sm = settings.sagemaker
    code_dir = code.uri.rsplit("/", 1)[0] + "/"
    executions = f"{locations(settings, target)['pipeline']}"

    def output(stage: str) -> dict[str, Any]:
        return _join(
            "/", [executions, _get("Execution.PipelineExecutionId"), f"{stage}/"]
        )

    processing = {
        "instance_type": _param("ProcessingInstanceType"),
        "instance_count": _param("ProcessingInstanceCount"),
    }
    arguments = {
        "Features": features_request(
            settings,
            target,
            job_name=None,
            code_uri=code_dir,
            input_uri=_param("InputDataUri"),
            output_uri=output("features"),
            **processing,
        ),
        "Train": training_request(
            settings,
            target,
            job_name=None,
            code_uri=code.uri,
            features_uri=_processing_output("Features", "features"),
            output_uri=output("model"),
            instance_type=_param("TrainingInstanceType"),
            epochs=_join("", [_param("Epochs")]),
        ),
        "Score": score_request(
            settings,
            target,
            job_name=None,
            code_uri=code_dir,
            features_uri=_processing_output("Features", "features"),
            model_uri=_get("Steps.Train.ModelArtifacts.S3ModelArtifacts"),
            output_uri=output("scores"),
            **processing,
        ),
        "Evaluate": evaluate_request(
            settings,
            target,
            job_name=None,
            code_uri=code_dir,
            scores_uri=_processing_output("Score", "scores"),
            output_uri=output("evaluation"),
            instance_type=_param("ProcessingInstanceType"),
        ),
    }
    steps = []
    for name in STEPS:
        step: dict[str, Any] = {
            "Name": name,
            "Type": "Training" if name == "Train" else "Processing",
            "Arguments": arguments[name],
        }
        if sm.cache_expire_after:
            step["CacheConfig"] = {
                "Enabled": True,
                "ExpireAfter": sm.cache_expire_after,
            }
        steps.append(step)
    return {
        "Version": SCHEMA_VERSION,
        "Metadata": {},
        "Parameters": [
            {"Name": "InputDataUri", "Type": "String", "DefaultValue": input_uri},
            {
                "Name": "Epochs",
                "Type": "Integer",
                "DefaultValue": settings.model.epochs,
            },
            {
                "Name": "ProcessingInstanceType",
                "Type": "String",
                "DefaultValue": sm.processing_instance_type,
            },
            {
                "Name": "ProcessingInstanceCount",
                "Type": "Integer",
                "DefaultValue": sm.processing_instance_count,
            },
            {
                "Name": "TrainingInstanceType",
                "Type": "String",
                "DefaultValue": sm.training_instance_type,
            },
        ],
        "Steps": steps,
    }


def definition_text(definition: dict[str, Any]) -> str:
    """The exact JSON text sent as ``PipelineDefinition``."""
    return json.dumps(definition, indent=2)


def plan_pipeline(
    settings: Settings,
    *,
    input_uri: str | None = None,
    strict: bool = False,
    bundle: SourceBundle | None = None,
    start: bool = True,
    parameters: Mapping[str, str] | None = None,
) -> PipelinePlan:
    """The pipeline, its uploads and (with ``start``) the execution to start.

    ``parameters`` override the declared pipeline parameters for that execution;
    a local path in ``InputDataUri`` is uploaded like ``input_uri``. Local input
    and a local ``label_windows`` file are uploaded under ``uploads/``. Every
    request is validated offline.

    Raises:
        ConfigError: a step request botocore or SageMaker would refuse, a parameter
            the pipeline does not declare or whose value the settings would refuse
            (see :func:`execution_parameters`), parameters without ``start``, or
            (with ``strict``) a missing role, bucket or image.
        NotFoundError: a local input or ``label_windows`` path that holds nothing.
    """
    target = resolve_target(settings, strict=strict)
    code = code_upload(settings, target, bundle or build_source_bundle())
    input_uri, raw = input_source(settings, target, input_uri, "raw")
    settings, windows = with_label_windows(settings, target)
    uploads = [code, *raw, *windows]
    definition = pipeline_definition(settings, target, code=code, input_uri=input_uri)
    for operation, request in step_requests(definition):
        validate_request(operation, request)
    sm = settings.sagemaker
    request = {
        "PipelineName": sm.pipeline_name,
        "PipelineDisplayName": sm.pipeline_name,
        "PipelineDefinition": definition_text(definition),
        "PipelineDescription": "sagewatch: features, train, score, evaluate",
        "RoleArn": target.role,
    }
    validate_request("CreatePipeline", request)
    if not start:
        if parameters:
            raise ConfigError(
                f"pipeline parameters {sorted(parameters)} given but no execution "
                "is started; they apply to an execution only"
            )
        return PipelinePlan(definition, request, tuple(uploads), target.placeholders)
    execution: dict[str, Any] = {"PipelineName": sm.pipeline_name}
    if parameters:
        parameters = dict(parameters)
        given_input = parameters.get("InputDataUri")
        if given_input:  # as --input: a local path uploaded, an S3 folder its prefix
            parameters["InputDataUri"], raw = input_source(
                settings, target, given_input, "raw"
            )
            uploads += [u for u in raw if u not in uploads]
        execution["PipelineParameters"] = execution_parameters(
            definition, parameters, settings
        )
    validate_request("StartPipelineExecution", execution)
    return PipelinePlan(
        definition, request, tuple(uploads), target.placeholders, execution
    )


_PARSERS = {"Integer": int, "Float": float}
# The setting each parameter stands in for; its value must pass that setting's rules.
_PARAMETER_SETTINGS = {
    "Epochs": "epochs",
    "ProcessingInstanceType": "processing_instance_type",
    "ProcessingInstanceCount": "processing_instance_count",
    "TrainingInstanceType": "training_instance_type",
}
_INSTANCE_KINDS = {
    "ProcessingInstanceType": "processing",
    "TrainingInstanceType": "training",
}
_S3_URI = re.compile(r"s3://[^/]+(/.*)?")


def execution_parameters(
    definition: dict[str, Any],
    given: Mapping[str, str],
    settings: Settings | None = None,
) -> list[dict[str, str]]:
    """``PipelineParameters`` for an execution, checked against the definition.

    A value must parse as the declared type and pass the rules of the setting the
    parameter stands for (``Epochs`` those of ``epochs``, and so on, checked
    through ``settings``, the defaults when None); instance types must be ones
    SageMaker offers, ``InputDataUri`` an s3:// URI. Integer and Float values are
    sent in their canonical form (``"050"`` as ``"50"``), String values as given.

    Raises:
        ConfigError: a name the definition does not declare, or a value that does
            not parse as the declared type or breaks its setting's rules.
    """
    declared = {p["Name"]: p["Type"] for p in definition["Parameters"]}
    out = []
    for name, value in given.items():
        if name not in declared:
            raise ConfigError(
                f"pipeline parameter {name!r} is not declared; expected one of "
                f"{', '.join(declared)}"
            )
        typed = _parse_parameter(name, declared[name], value)
        _check_parameter(settings or Settings(), name, typed)
        out.append({"Name": name, "Value": str(typed)})
    return out


def _parse_parameter(name: str, kind: str, value: str) -> Any:
    parse = _PARSERS.get(kind)
    if parse is None:
        return value
    try:
        return parse(value)
    except ValueError:
        raise ConfigError(
            f"pipeline parameter {name!r}: expected {kind.lower()}, got {value!r}"
        ) from None


def _check_parameter(settings: Settings, name: str, value: Any) -> None:
    """Refuse a value the settings (or SageMaker) would refuse for its setting."""
    where = f"pipeline parameter {name!r}"
    if name in _PARAMETER_SETTINGS:
        settings.with_overrides({_PARAMETER_SETTINGS[name]: value}, source=where)
    if name in _INSTANCE_KINDS:
        check_instance_type(value, _INSTANCE_KINDS[name], where)
    if name == "InputDataUri" and not _S3_URI.fullmatch(value):
        raise ConfigError(
            f"{where}: expected an s3://bucket/prefix/ URI or a local path to "
            f"upload, got {value!r}"
        )


# ----------------------------------------------------------------------------- checks


def step_requests(definition: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each step as the job request SageMaker will make from it.

    Parameters take their defaults, the execution id a fixed stand-in, and step
    properties the value the referenced (earlier) step will produce, so every step
    can be validated like a single job.

    Raises:
        ConfigError: a reference to an unknown parameter, a later or unknown step,
            or an output the step does not have.
    """
    defaults = {p["Name"]: p["DefaultValue"] for p in definition["Parameters"]}
    resolved: dict[str, dict[str, Any]] = {}
    out = []
    for step in definition["Steps"]:
        args = _resolve(step["Arguments"], defaults, resolved, step["Name"])
        resolved[step["Name"]] = args
        operation = _OPERATIONS[step["Type"]]
        key = "ProcessingJobName" if step["Type"] == "Processing" else "TrainingJobName"
        out.append((operation, {key: f"pipelines-stand-in-{step['Name']}", **args}))
    return out


_OUTPUT_REF = re.compile(
    r"Steps\.(\w+)\.ProcessingOutputConfig\.Outputs\['(\w+)'\]\.S3Output\.S3Uri"
)
_MODEL_REF = re.compile(r"Steps\.(\w+)\.ModelArtifacts\.S3ModelArtifacts")


def _resolve(value: Any, defaults: dict[str, Any], steps: dict, where: str) -> Any:
    if isinstance(value, list):
        return [_resolve(v, defaults, steps, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Get"}:
        return _lookup(value["Get"], defaults, steps, where)
    if set(value) == {"Std:Join"}:
        join = value["Std:Join"]
        parts = _resolve(join["Values"], defaults, steps, where)
        return join["On"].join(str(p) for p in parts)
    return {k: _resolve(v, defaults, steps, where) for k, v in value.items()}


def _lookup(path: str, defaults: dict[str, Any], steps: dict, where: str) -> Any:
    if path.startswith("Parameters.") and path[11:] in defaults:
        return defaults[path[11:]]
    if path == "Execution.PipelineExecutionId":
        return "stand-in-execution-id"
    if m := _OUTPUT_REF.fullmatch(path):
        outputs = steps.get(m[1], {}).get("ProcessingOutputConfig", {})
        for item in outputs.get("Outputs", []):
            if item["OutputName"] == m[2]:
                return item["S3Output"]["S3Uri"]
    if (m := _MODEL_REF.fullmatch(path)) and m[1] in steps:
        base = steps[m[1]]["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        return f"{base}/stand-in-job/output/{contract.MODEL_ARCHIVE}"
    raise ConfigError(f"pipeline step {where}: cannot resolve {path!r}")
