"""Settings: file < environment < flags, strict keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sagewatch.config import ENV_VARS, Settings, known_keys, load_settings
from sagewatch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_config_yaml_documents_every_default() -> None:
    from_file = load_settings(ROOT / "config.yaml", environ={})
    assert from_file == Settings()
    text = (ROOT / "config.yaml").read_text()
    missing = [key for key in known_keys() if f"{key}:" not in text]
    assert missing == []


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "model:\n  epochs: 7\n  batch_size: 64\nfeatures:\n  rolling_window: 5\n",
    )
    env = {"EPOCHS": "9", "ROLLING_WINDOW": "6"}

    settings = load_settings(path, environ=env, overrides={"epochs": 11})

    assert settings.model.epochs == 11  # flag beats env
    assert settings.features.rolling_window == 6  # env beats file
    assert settings.model.batch_size == 64  # file beats default


def test_every_documented_env_var_lands_on_its_setting() -> None:
    values = {
        "RAW_DATA_PREFIX": "r",
        "FEATURES_PREFIX": "f",
        "MODEL_PREFIX": "m",
        "SCORES_PREFIX": "s",
        "ROLLING_WINDOW": "4",
        "EPOCHS": "3",
        "BATCH_SIZE": "32",
        "ENCODING_DIM": "2",
        "SAGEMAKER_ROLE": "arn:aws:iam::000000000000:role/example",
        "SAGEMAKER_BUCKET": "a-bucket",
        "SAGEMAKER_REGION": "eu-west-1",
        "SAGEMAKER_IMAGE_URI": "example.invalid/pytorch:2.5",
    }
    assert set(values) == set(ENV_VARS)

    flat = load_settings(None, environ=values).flat()

    assert {ENV_VARS[k]: flat[ENV_VARS[k]] for k in values} == {
        "raw_data_prefix": "r",
        "features_prefix": "f",
        "model_prefix": "m",
        "scores_prefix": "s",
        "rolling_window": 4,
        "epochs": 3,
        "batch_size": 32,
        "encoding_dim": 2,
        "role": "arn:aws:iam::000000000000:role/example",
        "bucket": "a-bucket",
        "region": "eu-west-1",
        "image_uri": "example.invalid/pytorch:2.5",
    }


def test_unknown_key_in_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"model\.epochz"):
        load_settings(path, environ={})


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="modle"):
        load_settings(_yaml(tmp_path, "modle:\n  epochs: 3\n"), environ={})


def test_a_statistic_listed_twice_or_none_is_refused(tmp_path: Path) -> None:
    thrice = _yaml(tmp_path, "features:\n  statistics: [value, mean, value, value]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(thrice, environ={})
    assert str(caught.value).endswith(
        "features.statistics: expected each statistic once, got value more than "
        "once (got ['value', 'mean', 'value', 'value'])"
    )
    with pytest.raises(ConfigError, match=r"features\.statistics: expected at least"):
        load_settings(_yaml(tmp_path, "features:\n  statistics: []\n"), environ={})


def test_a_check_across_settings_names_its_values_once(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model:\n  kernel_size: 4\n  epochs: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(caught.value).endswith("model: kernel_size must be odd, got 4")
    with pytest.raises(ConfigError) as caught:
        Settings().with_overrides({"label_column": "machine_id"})
    assert str(caught.value).endswith(
        "settings: label_column 'machine_id' is also the timestamp or entity column"
    )


def test_wrong_type_from_env_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"model\.epochs.*'three'"):
        load_settings(None, environ={"EPOCHS": "three"})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        Settings().with_overrides({"epoch": "3"})


def test_string_overrides_parse_to_declared_types() -> None:
    settings = Settings().with_overrides(
        {
            "hidden_dims": "[16, 8]",
            "learning_rate": "1e-3",
            "drop_duplicate_rows": "false",
            "train_rows": "400",
            "label_column": "none",
            "timestamp_column": "123",
        }
    )
    assert settings.model.hidden_dims == [16, 8]
    assert settings.model.learning_rate == 0.001
    assert settings.quality.drop_duplicate_rows is False
    assert settings.reference.train_rows == 400
    assert settings.data.label_column is None
    assert settings.data.timestamp_column == "123"  # a string setting stays a string


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.model.epochs = 3  # type: ignore[misc]


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path, environ={})


def test_out_of_range_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="rolling_window"):
        Settings().with_overrides({"rolling_window": 1})


def test_percentiles_outside_0_to_100_are_refused() -> None:
    with pytest.raises(ConfigError, match="percentiles"):
        Settings().with_overrides({"percentiles": "[50, 150]"})


def test_two_reference_rules_are_refused() -> None:
    with pytest.raises(ConfigError, match="choose one"):
        Settings().with_overrides({"train_rows": 10, "train_until": "2024-01-01"})


def test_error_names_the_environment_variable() -> None:
    with pytest.raises(ConfigError, match=r"from environment variable EPOCHS: "):
        load_settings(None, environ={"EPOCHS": "abc"})


@pytest.mark.parametrize(
    ("in_file", "flag", "expected"),
    [
        ({"train_until": "2024-01-02"}, {"train_rows": "400"}, (400, None, 0.5)),
        ({"train_rows": 400}, {"train_fraction": "0.2"}, (None, None, 0.2)),
        ({"train_rows": 400}, {"train_until": "2024-01-02"}, (None, "2024", 0.5)),
    ],
)
def test_a_reference_rule_on_the_command_line_replaces_the_files(
    tmp_path: Path, in_file: dict, flag: dict, expected: tuple
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"reference": in_file}))

    reference = load_settings(path, environ={}, overrides=flag).reference

    rows, until, fraction = expected
    assert reference.train_rows == rows
    assert (reference.train_until is None) == (until is None)
    assert reference.train_fraction == fraction


@pytest.mark.parametrize("spelling", ["\\t", "tab", "TAB", "\t"])
def test_tab_separator_spellings_become_a_tab(spelling: str) -> None:
    assert Settings().with_overrides({"sep": spelling}).data.sep == "\t"


def test_single_byte_separators_are_kept() -> None:
    assert Settings().with_overrides({"sep": ";"}).data.sep == ";"
    assert Settings().with_overrides({"sep": "|"}).data.sep == "|"
    assert Settings().with_overrides({"sep": ""}).data.sep is None


@pytest.mark.parametrize("sep", ["::", "ab", "é", "\\n\\t"])
def test_separator_that_is_not_one_byte_is_refused(sep: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings().with_overrides({"sep": sep})
    assert "data.sep" in str(caught.value)
    assert "expected one single-byte character" in str(caught.value)
    assert f"(got {sep!r})" in str(caught.value)


def test_separator_in_config_file_is_checked(tmp_path: Path) -> None:
    path = _yaml(tmp_path, 'data:\n  sep: "ab"\n')
    with pytest.raises(ConfigError, match=r"data\.sep.*single-byte.*'ab'"):
        load_settings(path, environ={})
    tab = load_settings(_yaml(tmp_path, "data:\n  sep: tab\n"), environ={})
    assert tab.data.sep == "\t"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"EPOCHS": "yes"}, "epochs"),
        ({"ENCODING_DIM": "on"}, "encoding_dim"),
        ({"ROLLING_WINDOW": "off"}, "rolling_window"),
    ],
)
def test_true_or_false_is_refused_for_other_settings(env: dict, setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"{setting}: .*not true or false"):
        load_settings(None, environ=env)


def test_true_or_false_in_a_file_is_refused_for_a_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.epochs: .*not true or false"):
        load_settings(_yaml(tmp_path, "model:\n  epochs: true\n"), environ={})


@pytest.mark.parametrize(
    "prefix", ["../escaped", "/", "/abs", ".", "a//b", "a/../b", ".hidden", " "]
)
def test_prefixes_must_stay_inside_their_base(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"features_prefix: .*relative folder name"):
        load_settings(None, environ={"FEATURES_PREFIX": prefix})
    with pytest.raises(ConfigError, match=r"base_prefix: .*relative folder name"):
        load_settings(None, environ={}, overrides={"base_prefix": prefix})


def test_nested_prefixes_are_kept_without_a_trailing_slash() -> None:
    settings = load_settings(None, environ={"FEATURES_PREFIX": "runs/7/features/"})
    assert settings.data.features_prefix == "runs/7/features"


@pytest.mark.parametrize(
    ("bucket", "expected"),
    [
        ("s3://mybucket", "without s3://"),
        ("Bad_Bucket!", "S3 bucket name"),
        ("mybucket/sub", "S3 bucket name"),
        ("ab", "S3 bucket name"),
        ("a..b", "S3 bucket name"),
        ("192.168.1.1", "S3 bucket name"),
        ("xn--abc", "S3 bucket name"),
        ("data-s3alias", "S3 bucket name"),
    ],
)
def test_a_malformed_bucket_is_refused_naming_the_variable(
    bucket: str, expected: str
) -> None:
    role = "arn:aws:iam::123456789012:role/r"
    with pytest.raises(ConfigError) as caught:
        load_settings(
            None, environ={"SAGEMAKER_ROLE": role, "SAGEMAKER_BUCKET": bucket}
        )
    assert str(caught.value).startswith(
        "invalid configuration from environment variable SAGEMAKER_BUCKET: "
        "sagemaker.bucket: "
    )
    assert expected in str(caught.value)


def test_a_malformed_role_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"SAGEMAKER_ROLE.*role: .*IAM role ARN"):
        load_settings(None, environ={"SAGEMAKER_ROLE": "SageMakerRole"})
    role = "arn:aws:iam::123456789012:role/service-role/SageMaker-Exec"
    settings = load_settings(
        None, environ={"SAGEMAKER_ROLE": role, "SAGEMAKER_BUCKET": "my.sensor-data"}
    )
    assert (settings.sagemaker.role, settings.sagemaker.bucket) == (
        role,
        "my.sensor-data",
    )


@pytest.mark.parametrize("text", ["12:30", "0x10", "0b11", "0o17"])
def test_integers_are_read_in_decimal_only(text: str) -> None:
    with pytest.raises(ConfigError, match=r"EPOCHS.*model.epochs"):
        load_settings(None, environ={"EPOCHS": text})


def test_leading_zeros_and_exponents_read_as_written(tmp_path: Path) -> None:
    settings = load_settings(
        _yaml(tmp_path, "features:\n  rolling_window: 010\n"),
        environ={"EPOCHS": "010"},
        overrides={"learning_rate": "1e-3"},
    )
    assert settings.features.rolling_window == 10  # YAML 1.1 reads 8
    assert settings.model.epochs == 10
    assert settings.model.learning_rate == 0.001


def test_a_sexagesimal_number_in_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"features\.rolling_window"):
        load_settings(
            _yaml(tmp_path, "features:\n  rolling_window: 1:00\n"), environ={}
        )


def test_infinite_or_nan_numbers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.learning_rate"):
        load_settings(_yaml(tmp_path, "model:\n  learning_rate: .inf\n"), environ={})
    with pytest.raises(ConfigError, match="threshold_margin"):
        load_settings(None, environ={}, overrides={"threshold_margin": "nan"})
