"""The account side of the settings: role, bucket, region, images and S3 layout.

Nothing here calls AWS. A setting that is missing can stand in as a visible
``${...}`` placeholder, so ``--plan`` works before an account is configured; a plan
with placeholders is refused at submission.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagewatch import storage
from sagewatch.config import Settings
from sagewatch.errors import ConfigError, StorageError
from sagewatch.sagemaker.validation import check_instance_type

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
    ``--plan``); with ``strict`` True they raise, all named in one message.

    Raises:
        ConfigError: a missing role, bucket, image or region when ``strict``;
            a region/version the image lookup does not know; an instance type
            SageMaker does not offer.
        StorageError: the AWS configuration cannot be read (a missing profile).
    """
    sm = settings.sagemaker
    check_instance_type(
        sm.processing_instance_type, "processing", "processing_instance_type"
    )
    check_instance_type(sm.training_instance_type, "training", "training_instance_type")
    region = sm.region or default_region()
    missing = [name for name in ("role", "bucket") if not getattr(sm, name)]
    images = {"processing": IMAGE_PLACEHOLDER, "training": IMAGE_PLACEHOLDER}
    if sm.image_uri:
        images = dict.fromkeys(images, sm.image_uri)
    elif not _sdk_installed():
        missing.append("image_uri")
    elif not region:
        missing.append("region")
    else:
        images["processing"] = resolve_image(
            settings, sm.processing_instance_type, region
        )
        images["training"] = resolve_image(settings, sm.training_instance_type, region)
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
    "region": "region (SAGEMAKER_REGION or AWS_REGION)",
}


def default_region() -> str | None:
    """The region of the AWS configuration (see :func:`sagewatch.storage.aws_region`).

    Raises:
        StorageError: the configuration cannot be read, e.g. ``AWS_PROFILE`` names
            a profile that does not exist.
    """
    try:
        return storage.aws_region()
    except StorageError as exc:
        raise StorageError(f"{exc}, or set region (SAGEMAKER_REGION)") from exc


def _sdk_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("sagemaker.core.image_uris") is not None
    except ModuleNotFoundError:
        return False


def resolve_image(settings: Settings, instance_type: str, region: str) -> str:
    """The AWS PyTorch training image for the instance type and region.

    Uses the SageMaker SDK (``pip install sagewatch[sagemaker]``), which reads its
    bundled tables and makes no call; the image serves processing jobs too.

    Raises:
        ConfigError: the SDK knows no image for this region and version.
    """
    from sagemaker.core import image_uris

    sm = settings.sagemaker
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
        "uploads": f"{root}/uploads/",
        "pipeline": f"{root}/pipeline",
    }
