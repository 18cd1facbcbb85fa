"""Check a SageMaker request offline against botocore's service model.

botocore itself refuses missing required keys, unknown keys, wrong types and values
below a minimum before anything is sent. It does not check maximum lengths, regex
patterns or enumerations, which SageMaker then rejects only after the upload and
the call; :func:`validate_request` checks those too, so ``--plan`` and the tests
catch them without an account.

Notes:
    AWS writes its patterns for Java; a pattern Python cannot compile is skipped.
    A string holding a ``${...}`` placeholder (a setting not given yet) is exempt
    from its pattern.
"""

from __future__ import annotations

import difflib
import os
import re
from functools import lru_cache
from typing import Any

from sagewatch.errors import ConfigError

PLACEHOLDER = re.compile(r"\$\{[A-Z_]+\}")


@lru_cache(maxsize=1)
def service_model() -> Any:
    """The SageMaker service model shipped with botocore (no network).

    Loaded without a botocore session, which would read the AWS profile and fail
    on one that does not exist; ``--plan`` needs no profile.
    """
    from botocore.loaders import create_loader
    from botocore.model import ServiceModel

    loader = create_loader(os.environ.get("AWS_DATA_PATH"))
    return ServiceModel(loader.load_service_model("sagemaker", "service-2"))


def validate_request(operation: str, request: dict[str, Any]) -> None:
    """Refuse a request botocore or SageMaker would refuse.

    Idempotency tokens, which boto3 fills in when absent, count as present.

    Raises:
        ConfigError: naming the operation, the key path and what is wrong.
    """
    from botocore.exceptions import ParamValidationError
    from botocore.validate import validate_parameters

    shape = service_model().operation_model(operation).input_shape
    filled = dict(request)
    for name, member in shape.members.items():
        if member.metadata.get("idempotencyToken") and name not in filled:
            filled[name] = "0" * 32
    try:
        validate_parameters(filled, shape)
    except ParamValidationError as exc:
        raise ConfigError(f"{operation} request is invalid: {exc}") from exc
    problems: list[str] = []
    _check(filled, shape, operation, problems)
    if problems:
        raise ConfigError(
            f"{operation} request is invalid: " + "; ".join(problems[:10])
        )


def _check(value: Any, shape: Any, path: str, problems: list[str]) -> None:
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                _check(item, shape.members[key], f"{path}.{key}", problems)
    elif kind == "list" and isinstance(value, list):
        _check_size(len(value), shape, path, "items", problems)
        for i, item in enumerate(value):
            _check(item, shape.member, f"{path}[{i}]", problems)
    elif kind == "map" and isinstance(value, dict):
        _check_size(len(value), shape, path, "entries", problems)
        for key, item in value.items():
            _check(key, shape.key, f"{path} key {key!r}", problems)
            _check(item, shape.value, f"{path}[{key!r}]", problems)
    elif kind == "string" and isinstance(value, str):
        _check_string(value, shape, path, problems)
    elif kind in {"integer", "long"} and isinstance(value, int):
        top = shape.metadata.get("max")
        if top is not None and value > top:
            problems.append(f"{path}: {value} is above the maximum {top}")


def _check_size(size: int, shape: Any, path: str, unit: str, out: list[str]) -> None:
    top = shape.metadata.get("max")
    if top is not None and size > top:
        out.append(f"{path}: {size} {unit}, at most {top} allowed")


def _check_string(value: str, shape: Any, path: str, problems: list[str]) -> None:
    top = shape.metadata.get("max")
    if top is not None and len(value) > top:
        problems.append(f"{path}: {len(value)} characters, at most {top} allowed")
    if shape.enum and value not in shape.enum:
        problems.append(f"{path}: {value!r} is not one of {_some(shape)}")
    pattern = shape.metadata.get("pattern")
    if not pattern or PLACEHOLDER.search(value):
        return
    try:
        compiled = _compile(pattern)
    except re.error:
        return
    if not compiled.fullmatch(value):
        problems.append(f"{path}: {value!r} does not match the pattern {pattern!r}")


def _some(shape: Any, examples: tuple[str, ...] = ()) -> str:
    """A short account of an enumeration: all of a short one, else a few values."""
    values = list(shape.enum)
    if len(values) <= _LISTED:
        return str(values)
    shown = [v for v in examples if v in values] or values[:3]
    return (
        f"the {len(values)} values of {shape.name} in botocore's SageMaker service "
        f"model, e.g. {', '.join(shown)}"
    )


_LISTED = 12
_INSTANCE_SHAPES = {
    "processing": "ProcessingInstanceType",
    "training": "TrainingInstanceType",
}
_INSTANCE_EXAMPLES = ("ml.m5.xlarge", "ml.c5.2xlarge", "ml.g4dn.xlarge")


def check_instance_type(value: Any, kind: str, where: str) -> None:
    """Refuse an instance type SageMaker does not offer for ``kind`` jobs.

    The known types are the enumeration in botocore's service model, so a type
    newer than the installed botocore is refused too (upgrading botocore helps).

    Raises:
        ConfigError: naming ``where``, the value, a few valid types and a close
            match when there is one.
    """
    shape = service_model().shape_for(_INSTANCE_SHAPES[kind])
    if value in shape.enum:
        return
    close = difflib.get_close_matches(str(value), shape.enum, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(
        f"{where}: {value!r} is not a SageMaker {kind} instance type; expected one "
        f"of {_some(shape, _INSTANCE_EXAMPLES)} (newer types need a newer "
        f"botocore){hint}"
    )


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)
