"""The account side of the settings: role, bucket, region, images and S3 layout.

Nothing here calls AWS. A setting that is missing can stand in as a visible
``${...}`` placeholder, so ``--plan`` works before an account is configured; a plan
with placeholders is refused at submission.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagewatch.config import Settings
from sagewatch.errors import ConfigError

ROLE_PLACEHOLDER = "arn:aws:iam::${ACCOUNT_ID}:role/${SAGEMAKER_ROLE}"
BUCKET_PLACEHOLDER = "${SAGEMAKER_BUCKET}"
IMAGE_PLACEHOLDER = "${IMAGE_URI}"


@dataclass(frozen=True)
class Target:
    """The account side of the settings: role, bucket, region and images.

    ``placeholders`` names the settings that were not given and stand in the
    requests as ``${...}``; such a plan can be printed but not submitted.
    """

    role: str
    bucket: str
    region: str | None
    processing_image: str
    training_image: str
    placeholders: tuple[str, ...] = ()

    def root(self, settings: Settings) -> str:
        return f"s3://{self.bucket}/{settings.sagemaker.base_prefix.strip('/')}"


def resolve_target(settings: Settings, *, strict: bool) -> Target:
    """Role, bucket, region and images from the settings.

    With ``strict`` False, missing values become visible placeholders (for
    ``--plan``); with ``strict`` True they raise.

    Raises:
        ConfigError: a missing role, bucket or image when ``strict``.
    """
    sm = settings.sagemaker
    missing = []
    if not sm.role:
        missing.append("role")
    if not sm.bucket:
        missing.append("bucket")
    region = sm.region or _default_region()
    images = {
        kind: resolve_image(settings, instance_type, region=region, strict=strict)
        for kind, instance_type in (
            ("processing", sm.processing_instance_type),
            ("training", sm.training_instance_type),
        )
    }
    if IMAGE_PLACEHOLDER in images.values():
        missing.append("image_uri")
    if strict and missing:
        raise ConfigError(
            "cannot submit: set "
            + ", ".join(_HOW_TO_SET[m] for m in missing)
            + " (config.yaml section sagemaker, or the environment)"
        )
    return Target(
        role=sm.role or ROLE_PLACEHOLDER,
        bucket=sm.bucket or BUCKET_PLACEHOLDER,
        region=region,
        processing_image=images["processing"],
        training_image=images["training"],
        placeholders=tuple(missing),
    )


_HOW_TO_SET = {
    "role": "role (SAGEMAKER_ROLE)",
    "bucket": "bucket (SAGEMAKER_BUCKET)",
    "image_uri": "image_uri (SAGEMAKER_IMAGE_URI) or install sagewatch[sagemaker]",
}


def _default_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name


def resolve_image(
    settings: Settings, instance_type: str, *, region: str | None, strict: bool
) -> str:
    """``image_uri`` when set, else the AWS PyTorch training image for the region.

    The lookup needs the SageMaker SDK (``pip install sagewatch[sagemaker]``); it
    reads the SDK's bundled tables and makes no call.

    Raises:
        ConfigError: no lookup possible when ``strict``, or an unknown
            region/version combination.
    """
    sm = settings.sagemaker
    if sm.image_uri:
        return sm.image_uri
    try:
        from sagemaker.core import image_uris
    except ImportError:
        if strict:
            raise ConfigError(
                "no image: set image_uri (SAGEMAKER_IMAGE_URI), or install "
                "sagewatch[sagemaker] to look up the AWS PyTorch image"
            ) from None
        return IMAGE_PLACEHOLDER
    if not region:
        if strict:
            raise ConfigError(
                "no AWS region: set region (SAGEMAKER_REGION) or AWS_REGION"
            )
        return IMAGE_PLACEHOLDER
    try:
        return str(
            image_uris.retrieve(
                framework="pytorch",
                region=region,
                version=sm.framework_version,
                py_version=sm.py_version,
                instance_type=instance_type,
                image_scope="training",
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"no PyTorch {sm.framework_version} ({sm.py_version}) image for "
            f"{instance_type} in {region}: {exc}"
        ) from exc


def locations(settings: Settings, target: Target) -> dict[str, str]:
    """The S3 prefixes of each stage under ``s3://bucket/base_prefix``."""
    root, d = target.root(settings), settings.data
    return {
        "raw": f"{root}/{d.raw_data_prefix.strip('/')}/",
        "features": f"{root}/{d.features_prefix.strip('/')}/",
        "model": f"{root}/{d.model_prefix.strip('/')}/",
        "scores": f"{root}/{d.scores_prefix.strip('/')}/",
        "evaluation": f"{root}/{d.evaluation_prefix.strip('/')}/",
        "code": f"{root}/code/",
        "pipeline": f"{root}/pipeline",
    }
