"""Typed, frozen settings resolved as ``config.yaml`` < environment < CLI flags.

Every setting lives in one section of :class:`Settings` and has a name that is unique
across sections, so a flat override such as ``{"epochs": "3"}`` (a CLI flag, an
environment variable or a SageMaker hyperparameter) finds its place without naming the
section. Unknown keys and values of the wrong type raise :class:`ConfigError` naming
the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sagewatch.errors import ConfigError

_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

# The environment variables the project has always honoured, and where they land.
ENV_VARS: dict[str, str] = {
    "RAW_DATA_PREFIX": "raw_data_prefix",
    "FEATURES_PREFIX": "features_prefix",
    "MODEL_PREFIX": "model_prefix",
    "SCORES_PREFIX": "scores_prefix",
    "ROLLING_WINDOW": "rolling_window",
    "EPOCHS": "epochs",
    "BATCH_SIZE": "batch_size",
    "ENCODING_DIM": "encoding_dim",
    "SAGEMAKER_ROLE": "role",
    "SAGEMAKER_BUCKET": "bucket",
    "SAGEMAKER_REGION": "region",
    "SAGEMAKER_IMAGE_URI": "image_uri",
}


class _Loader(yaml.SafeLoader):
    """YAML with numbers read as written in decimal (YAML 1.2's core schema).

    PyYAML follows YAML 1.1, where ``010`` is 8, ``12:30`` is 750 and ``0x10`` is
    16; here they are text, which an integer setting then refuses, and ``010`` is
    10. ``1e-3`` is a number, as in YAML 1.2.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+.0123456789"),
)
_Loader.add_constructor(_INT, lambda loader, node: int(node.value, 10))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_values_for_others(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse true/false for a setting that is not one (pydantic would read
        ``epochs: yes`` as 1)."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if bool not in set(get_args(annotation) or (annotation,)):
                raise ValueError(
                    "expected a value of the setting's type, not true or false "
                    "(yes, no, on and off are read as true or false)"
                )
        return value


def _check_prefix(value: str) -> str:
    """A relative folder or key prefix, ``a`` or ``a/b``, that stays inside its base."""
    parts = value.rstrip("/").split("/")
    if value.startswith("/") or any(not p.strip() or p.startswith(".") for p in parts):
        raise ValueError(
            "expected a relative folder name such as features or runs/features "
            "(no leading /, no blank parts, none starting with .: listings skip "
            "hidden folders)"
        )
    return value.rstrip("/")


class DataSettings(_Section):
    """How an input table maps onto the schema, and where stage outputs go."""

    timestamp_column: str = "timestamp"
    timezone: str = "UTC"
    timestamp_format: str | None = None
    entity_column: str | None = "machine_id"
    label_column: str | None = "anomaly"
    sensor_columns: list[str] | None = Field(default=None, min_length=1)
    passthrough_columns: list[str] = Field(
        default_factory=lambda: ["changepoint", "anomaly_kind"]
    )
    sep: str | None = None
    label_windows: str | None = None
    raw_data_prefix: str = "raw"
    features_prefix: str = "features"
    model_prefix: str = "model"
    scores_prefix: str = "scores"
    evaluation_prefix: str = "evaluation"

    @field_validator("sep")
    @classmethod
    def _one_byte_sep(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # How a tab is typed in a shell or a YAML file without escapes.
        if value == "\\t" or value.lower() == "tab":
            return "\t"
        if len(value.encode("utf-8")) != 1:
            raise ValueError(
                "expected one single-byte character such as , or ; "
                "(\\t or tab for a tab)"
            )
        return value

    @field_validator(
        "raw_data_prefix",
        "features_prefix",
        "model_prefix",
        "scores_prefix",
        "evaluation_prefix",
    )
    @classmethod
    def _relative_prefix(cls, value: str) -> str:
        return _check_prefix(value)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown timezone {value!r}; expected an IANA name "
                "such as UTC or Europe/Berlin"
            ) from exc
        return value


class QualitySettings(_Section):
    """Repair rules for messy input: what is fixed and what is refused."""

    sort_rows: bool = True
    drop_duplicate_rows: bool = True
    duplicate_timestamps: Literal["keep_last", "error"] = "keep_last"
    max_fill_gap: int = Field(default=3, ge=0)
    drop_unfilled_rows: bool = True
    max_abs_value: float = Field(default=1e12, gt=0)
    max_drop_fraction: float = Field(default=0.1, ge=0, le=1)
    max_sensors: int = Field(default=1000, ge=1)


class ReferenceSettings(_Section):
    """The healthy reference period each entity's detector is fitted on."""

    train_rows: int | None = Field(default=None, ge=1)
    train_until: datetime | None = None
    train_fraction: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _one_rule(self) -> ReferenceSettings:
        if self.train_rows is not None and self.train_until is not None:
            raise ValueError(
                f"train_rows ({self.train_rows}) and train_until "
                f"({self.train_until.isoformat()}) both set; choose one way to define "
                "the reference period"
            )
        return self


_REFERENCE_RULES = {"train_rows", "train_until", "train_fraction"}


Statistic = Literal["value", "mean", "std", "min", "max", "range", "slope", "change"]


class FeatureSettings(_Section):
    """Per-entity rolling statistics, kept in the order :data:`Statistic` lists
    them whatever order they are given in, so the feature columns, and a model
    trained on them, do not depend on how a configuration lists them."""

    rolling_window: int = Field(default=12, ge=2)
    statistics: list[Statistic] = Field(
        default_factory=lambda: ["value", "mean", "std", "range", "slope", "change"],
    )

    @field_validator("statistics")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("expected at least one statistic")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            names = ", ".join(repeated)
            raise ValueError(
                f"expected each statistic once, got {names} more than once"
            )
        return sorted(value, key=get_args(Statistic).index)


class ModelSettings(_Section):
    """The detector, its training loop, its threshold rule and alarm smoothing."""

    detector: Literal["autoencoder", "pca", "iforest"] = "autoencoder"
    center_per_entity: bool = True
    architecture: Literal["dense", "window", "causal"] = "dense"
    sequence_length: int = Field(default=16, ge=2)
    hidden_dims: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, min_length=1
    )
    encoding_dim: int | None = Field(default=None, ge=1)
    kernel_size: int = Field(default=5, ge=1)
    ensemble_size: int = Field(default=1, ge=1)
    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    validation_fraction: float = Field(default=0.2, ge=0, lt=1)
    patience: int = Field(default=5, ge=1)
    sequence_stride: int = Field(default=1, ge=1)
    score_window: int = Field(default=12, ge=1)
    max_train_samples: int = Field(default=200_000, ge=10)
    max_calibration_rows: int = Field(default=1_000_000, ge=1)
    pca_variance: float = Field(default=0.95, gt=0, le=1)
    iforest_trees: int = Field(default=100, ge=1)
    iforest_max_samples: int = Field(default=256, ge=2)
    threshold_rule: Literal["pot", "quantile"] = "pot"
    threshold_quantile: float = Field(default=0.995, gt=0, lt=1)
    threshold_risk: float = Field(default=1e-3, gt=0, lt=1)
    threshold_tail: float = Field(default=0.1, gt=0, lt=1)
    threshold_margin: float = Field(default=1.0, gt=0)
    alarm_window: int = Field(default=1, ge=1)
    alarm_min_rows: int = Field(default=1, ge=1)
    threads: int | None = Field(default=1, ge=1)
    seed: int = Field(default=42, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.alarm_min_rows > self.alarm_window:
            raise ValueError(
                f"alarm_min_rows={self.alarm_min_rows} exceeds "
                f"alarm_window={self.alarm_window}"
            )
        return self


class GenerateSettings(_Section):
    """The synthetic data generator."""

    n_samples: int = Field(default=2000, ge=1)
    n_machines: int = Field(default=5, ge=1)
    n_sensors: int = Field(default=5, ge=2, le=12)
    frequency_seconds: int = Field(default=60, ge=1)
    start: datetime = datetime(2024, 1, 1)
    anomaly_fraction: float = Field(default=0.05, ge=0, lt=0.5)


class EvaluationSettings(_Section):
    """The report."""

    top_n: int = Field(default=20, ge=1)
    percentiles: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: [50.0, 90.0, 95.0, 99.0]
    )
    max_plot_entities: int = Field(default=12, ge=1)


class SageMakerSettings(_Section):
    """Where and how the SageMaker jobs run. Nothing here has a built-in account."""

    role: str | None = None
    bucket: str | None = None
    region: str | None = None
    base_prefix: str = "sagewatch"
    processing_instance_type: str = "ml.m5.xlarge"
    processing_instance_count: int = Field(default=1, ge=1)
    training_instance_type: str = "ml.m5.xlarge"
    training_instance_count: int = Field(default=1, ge=1)
    framework_version: str = "2.5"
    py_version: str = "py311"
    image_uri: str | None = None
    max_runtime_seconds: int = Field(default=3600, ge=60)
    volume_size_gb: int = Field(default=30, ge=1)
    spot_training: bool = False
    pipeline_name: str = "sagewatch"
    cache_expire_after: str | None = "P30D"
    poll_seconds: int = Field(default=30, ge=1)

    @field_validator("base_prefix")
    @classmethod
    def _relative_prefix(cls, value: str) -> str:
        return _check_prefix(value)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("s3://"):
            raise ValueError("expected the bucket's name alone, without s3://")
        reserved = (
            ".." in value
            or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", value) is not None
            or value.startswith(("xn--", "sthree-"))
            or value.endswith(("-s3alias", "--ol-s3"))
        )
        if reserved or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            raise ValueError(
                "expected an S3 bucket name: 3 to 63 lower-case letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit (not "
                "'..', an IP address, xn--/sthree- or -s3alias/--ol-s3)"
            )
        return value

    @field_validator("role")
    @classmethod
    def _role_arn(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", value):
            raise ValueError(
                "expected an IAM role ARN such as "
                "arn:aws:iam::123456789012:role/SageMakerRole"
            )
        return value


_SECTIONS: dict[str, type[_Section]] = {
    "data": DataSettings,
    "quality": QualitySettings,
    "reference": ReferenceSettings,
    "features": FeatureSettings,
    "model": ModelSettings,
    "generate": GenerateSettings,
    "evaluation": EvaluationSettings,
    "sagemaker": SageMakerSettings,
}


class Settings(_Section):
    """Every setting sagewatch reads, grouped by the stage that uses it."""

    data: DataSettings = Field(default_factory=DataSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    sagemaker: SageMakerSettings = Field(default_factory=SageMakerSettings)

    @model_validator(mode="after")
    def _check_columns(self) -> Settings:
        names = [self.data.timestamp_column, self.data.entity_column]
        if self.data.label_column is not None and self.data.label_column in names:
            raise ValueError(
                f"label_column {self.data.label_column!r} is also the timestamp "
                "or entity column"
            )
        return self

    def with_overrides(
        self, overrides: Mapping[str, Any], *, source: str = "overrides"
    ) -> Settings:
        """Return a copy with flat ``{setting: value}`` overrides applied.

        Values may be strings (from the environment or SageMaker hyperparameters);
        they are parsed as YAML scalars first, so ``"false"``, ``"[64, 32]"`` and
        ``"1e-3"`` become the declared types.

        Raises:
            ConfigError: an unknown setting or a value of the wrong type.
        """
        tree = self.model_dump()
        if _REFERENCE_RULES & set(overrides):
            # A reference rule given here replaces the one set before, not joins it.
            tree["reference"] = ReferenceSettings().model_dump()
        for key, value in overrides.items():
            section = section_of(key)
            tree[section][key] = _parse_string(value, section, key)
        return _validate(tree, source=source)

    def flat(self) -> dict[str, Any]:
        """All settings as one ``{name: value}`` mapping (JSON-safe values)."""
        dumped = self.model_dump(mode="json")
        return {k: v for section in dumped.values() for k, v in section.items()}


def section_of(key: str) -> str:
    """Name the section a flat setting belongs to.

    Raises:
        ConfigError: no section declares ``key``.
    """
    for name, model in _SECTIONS.items():
        if key in model.model_fields:
            return name
    raise ConfigError(
        f"unknown setting {key!r}; known settings: {', '.join(sorted(known_keys()))}"
    )


def known_keys() -> set[str]:
    """Every flat setting name."""
    return {k for model in _SECTIONS.values() for k in model.model_fields}


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings from a YAML file, then the environment, then ``overrides``.

    ``path`` None means ``config.yaml`` in the working directory when it exists,
    else the built-in defaults. ``overrides`` values that are None are ignored, so
    unset CLI flags can be passed straight through.

    Raises:
        ConfigError: unreadable file, unknown key or wrongly typed value.
    """
    tree = _read_yaml(path)
    settings = _validate(tree, source=str(path or "defaults"))
    env = os.environ if environ is None else environ
    for name in ENV_VARS:  # one at a time, so an error names its variable
        if env.get(name):
            settings = settings.with_overrides(
                {ENV_VARS[name]: env[name]}, source=f"environment variable {name}"
            )
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not given:
        return settings
    return settings.with_overrides(given, source="command-line options")


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        default = Path("config.yaml")
        if not default.is_file():
            return {}
        path = default
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    try:
        tree = yaml.load(text, Loader=_Loader) or {}  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {exc}"
        ) from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections")
    return tree


def _validate(tree: Mapping[str, Any], *, source: str) -> Settings:
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration from {source}: {problems}") from exc


def _problem(err: Mapping[str, Any]) -> str:
    """One validation error: the setting, what was wrong, and the value found.

    A check across several settings names them and their values itself; the
    section or tree it ran on is not repeated.
    """
    where = ".".join(str(p) for p in err["loc"]) or "settings"
    message = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), Mapping):
        return f"{where}: {message}"
    return f"{where}: {message} (got {err.get('input')!r})"


def _parse_string(value: Any, section: str, key: str) -> Any:
    """Parse a string as a YAML scalar unless the setting itself is a string."""
    if not isinstance(value, str):
        return value
    annotation = _SECTIONS[section].model_fields[key].annotation
    types = set(get_args(annotation) or (annotation,))
    # A lone tab or space is a CSV separator, not an empty value.
    unset = value == "" or value.strip().lower() in {"none", "null"}
    if unset and type(None) in types:
        return None
    if types <= {str, type(None)}:
        return value
    try:
        return yaml.load(value, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"setting {key!r}: cannot parse {value!r}: {exc}") from exc
