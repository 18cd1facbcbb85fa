"""The input contract: column mapping, timestamp parsing, the quality summary."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

from sagewatch.config import DataSettings, QualitySettings, Settings
from sagewatch.errors import ConfigError, InputError
from sagewatch.schema import load_raw, validate
from sagewatch.timestamps import in_windows, to_utc

ROOT = Path(__file__).resolve().parents[1]


def _settings(**overrides: object) -> Settings:
    return Settings().with_overrides(overrides)


def _load(uri: Path, **overrides: object):
    s = _settings(**overrides)
    return load_raw(str(uri), s.data, s.quality, rolling_window=4)


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# ----------------------------------------------------------------------------- time


def test_iso_variants_parse_to_utc() -> None:
    text = pl.Series(
        [
            "2024-01-01",
            "2024-01-01 06:30",
            "2024-01-01T06:30:15.250",
            "2024-01-01 06:30:15",
        ]
    )
    assert to_utc(text).to_list() == [
        _utc(2024, 1, 1),
        _utc(2024, 1, 1, 6, 30),
        _utc(2024, 1, 1, 6, 30, 15, 250_000),
        _utc(2024, 1, 1, 6, 30, 15),
    ]


def test_every_offset_spelling_is_applied() -> None:
    text = pl.Series(
        [
            "2024-01-01T12:00:00Z",
            "2024-01-01T12:00:00+0100",
            "2024-01-01T12:00:00-05:30",
            "2024-01-01 12:00:00+02",
        ]
    )
    assert to_utc(text).to_list() == [
        _utc(2024, 1, 1, 12),
        _utc(2024, 1, 1, 11),
        _utc(2024, 1, 1, 17, 30),
        _utc(2024, 1, 1, 10),
    ]


def test_typed_datetimes_are_localised_or_converted() -> None:
    naive = pl.Series([datetime(2024, 7, 1, 12)])
    aware = naive.dt.replace_time_zone("America/New_York")
    days = pl.Series([date(2024, 7, 1)])
    assert to_utc(naive, timezone="Europe/Berlin").to_list() == [_utc(2024, 7, 1, 10)]
    assert to_utc(aware).to_list() == [_utc(2024, 7, 1, 16)]
    assert to_utc(days).to_list() == [_utc(2024, 7, 1)]
    assert to_utc(aware).dtype == pl.Datetime("us", "UTC")


def test_missing_typed_timestamp_is_refused() -> None:
    with pytest.raises(InputError, match=r"^row 2: empty timestamp; expected"):
        to_utc(pl.Series([datetime(2024, 1, 1), None]))


def test_label_windows_by_file_name_and_for_every_file() -> None:
    sources = pl.Series(["/d/a.csv"] * 3 + ["/d/b.csv"] * 3)
    times = to_utc(
        pl.Series(["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 02:00"] * 2)
    )
    by_file = {
        "data/a.csv": [["2024-01-01 00:30:00.000000", "2024-01-01 01:00:00"]],
        "b.csv": [],
    }
    inside = in_windows(sources, times, by_file).to_list()
    assert inside == [False, True, False, False, False, False]
    every = [["2024-01-01 02:00", "2024-01-01 03:00"]]
    assert in_windows(sources, times, every).to_list() == [False, False, True] * 2
    with pytest.raises(InputError, match=r"label windows name no file called 'b\.csv'"):
        in_windows(sources, times, {"a.csv": []})
    with pytest.raises(InputError, match=r"expected \[start, end\]"):
        in_windows(sources, times, [["2024-01-01"]])


# ----------------------------------------------------------------------------- columns


def test_folder_without_entity_column_gives_one_entity_per_file(tmp_path: Path) -> None:
    for name, level in (("pump-a.csv", 1), ("pump-b.csv.gz", 2)):
        text = "timestamp,temp\n" + "".join(
            f"2024-01-01 00:0{m}:00,{level}\n" for m in range(2)
        )
        if name.endswith(".gz"):
            import gzip

            (tmp_path / name).write_bytes(gzip.compress(text.encode()))
        else:
            (tmp_path / name).write_text(text)
    data = _load(tmp_path)
    assert data.frame["machine_id"].to_list() == ["pump-a"] * 2 + ["pump-b"] * 2
    assert data.frame["temp"].to_list() == [1.0, 1.0, 2.0, 2.0]
    assert data.quality["entity_rows"] == {"pump-a": 2, "pump-b": 2}
    assert data.quality["short_entities"] == {"pump-a": 2, "pump-b": 2}


def test_column_mapping_from_settings(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "when;unit;t1;t2;t3;flag;kind\n"
        "2024-01-01 00:00:00;7;1;2;3;1;spike\n"
        "2024-01-01 00:01:00;7;4;5;6;0;\n"
    )
    data = _load(
        path,
        timestamp_column="when",
        entity_column="unit",
        label_column="flag",
        sensor_columns=["t2", "t1", "t2"],
        passthrough_columns=["kind"],
    )
    assert data.frame.columns == [
        "timestamp",
        "machine_id",
        "t2",
        "t1",
        "label",
        "kind",
    ]
    assert data.sensors == ["t2", "t1"]
    assert data.frame["machine_id"].to_list() == ["7", "7"]
    assert data.frame["label"].to_list() == [1, 0]
    assert data.frame["kind"].to_list() == ["spike", None]
    assert data.quality["ignored_columns"] == ["t3"]


def test_named_sensor_or_label_that_is_absent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("timestamp,machine_id,temp\n2024-01-01 00:00:00,m1,1\n")
    with pytest.raises(InputError) as info:
        _load(path, sensor_columns=["temp", "flow"])
    assert str(info.value) == (
        f"{path}: sensor columns ['flow'] not found; columns are ['timestamp', "
        "'machine_id', 'temp']"
    )
    with pytest.raises(InputError, match="label column 'flag' not found"):
        _load(path, label_column="flag")


def test_canonical_name_used_by_another_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("when,timestamp,machine_id,temp\n2024-01-01,x,m1,1\n")
    with pytest.raises(InputError) as info:
        _load(path, timestamp_column="when")
    assert str(info.value) == (
        f"{path}: column 'timestamp' would be overwritten by the column mapped by "
        "timestamp_column ('when'); rename it, or set timestamp_column: timestamp"
    )


def test_passthrough_columns_may_differ_between_files(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "timestamp,machine_id,temp,changepoint\n2024-01-01 00:00:00,a,1,0\n"
    )
    (tmp_path / "b.csv").write_text(
        "timestamp,machine_id,temp\n2024-01-01 00:00:00,b,2\n"
    )
    data = _load(tmp_path)
    assert data.frame["changepoint"].to_list() == [0, None]
    assert data.passthrough == ["changepoint"]


def test_parquet_errors_count_rows_not_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pl.DataFrame(
        {
            "timestamp": ["2024-01-01", "later"],
            "machine_id": ["m", "m"],
            "x": [1.0, 2.0],
        }
    ).write_parquet(path)
    with pytest.raises(InputError) as info:
        _load(path)
    assert str(info.value).startswith(
        f"{path}, row 2, entity 'm', column 'timestamp': cannot parse 'later'"
    )


def test_in_memory_table_is_validated_like_a_file() -> None:
    raw = pl.DataFrame(
        {
            "timestamp": ["2024-01-01 00:00:00", "2024-01-01 00:01:00"],
            "machine_id": ["m", "m"],
            "x": ["1.5", "oops"],
        }
    )
    with pytest.raises(InputError) as info:
        validate(raw, "memory", DataSettings(), QualitySettings())
    assert str(info.value).startswith(
        "memory, row 2, entity 'm', column 'x': value 'oops' is not a number"
    )


# ----------------------------------------------------------------------------- summary


def test_quality_summary_counts(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "timestamp,machine_id,temp,pres\n"
        "2024-01-01 00:00:00,m1,1,5\n"
        "2024-01-01 00:01:00,m1,,5\n"
        "2024-01-01 00:02:00,m1,3,5\n"
        "2024-01-01 00:10:00,m1,4,5\n"
        "2024-01-01 00:00:00,m2,9,5\n"
        "2024-01-01 00:01:00,m2,inf,5\n"
    )
    report = _load(path).quality
    assert report["rows_in"] == report["rows_out"] == 6
    assert report["median_step_seconds"] == 60.0
    assert report["time_gaps"] == 1  # 8 minutes between 00:02 and 00:10
    assert report["constant_sensors"] == ["pres"]
    assert report["entity_rows"] == {"m1": 4, "m2": 2}
    assert report["sensors"]["temp"] == {
        "missing": 1,
        "non_finite": 1,
        "out_of_range": 0,
        "filled": 2,
    }
    assert report["repaired"] == {"forward_filled_values": 2}
    assert report["empty_sensors"] == report["ignored_columns"] == []
    assert report["entities_dropped"] == []


def test_entity_losing_every_row_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    rows = "".join(f"2024-01-01 00:{m:02d}:00,m1,{m},1\n" for m in range(20))
    path.write_text(
        "timestamp,machine_id,temp,pres\n" + rows + "2024-01-01 00:00:00,m2,1,\n"
    )
    report = _load(path).quality
    assert report["entities_dropped"] == ["m2"]
    assert report["dropped"] == {"rows_with_unfilled_gaps": 1}
    assert "m2" not in report["entity_rows"]


def _table(names: list[str], minutes: list[int], temp: list[float]) -> pl.DataFrame:
    stamps = [f"2024-01-01 00:{m:02d}:00" for m in minutes]
    return pl.DataFrame({"timestamp": stamps, "machine_id": names, "temp": temp})


def test_entities_in_descending_order_are_sorted_without_counting_repairs() -> None:
    raw = _table(["b", "b", "a", "a"], [0, 1, 5, 6], [1.0, 2.0, 3.0, 4.0])
    data = validate(raw, "memory", DataSettings(), QualitySettings())
    assert data.frame["machine_id"].to_list() == ["a", "a", "b", "b"]
    assert data.frame["temp"].to_list() == [3.0, 4.0, 1.0, 2.0]
    assert data.quality["out_of_order_rows"] == 0
    assert data.quality["repaired"] == {}
    assert data.quality["entity_rows"] == {"a": 2, "b": 2}


def test_interleaved_entities_count_only_their_own_earlier_rows() -> None:
    # b's 00:03 follows a's 00:07 in the file but b's own 00:02: in order.
    raw = _table(["a", "b", "a", "b", "a"], [5, 2, 7, 3, 6], [1.0, 2.0, 3.0, 4.0, 5.0])
    data = validate(raw, "memory", DataSettings(), QualitySettings())
    assert data.quality["out_of_order_rows"] == 1  # a's 00:06 after its 00:07
    assert data.frame["temp"].to_list() == [1.0, 5.0, 3.0, 2.0, 4.0]


def test_duplicate_timestamp_split_across_runs_of_an_entity_is_found() -> None:
    raw = _table(["a", "b", "a"], [0, 0, 0], [1.0, 2.0, 3.0])
    quality = QualitySettings(max_drop_fraction=0.5)
    data = validate(raw, "memory", DataSettings(), quality)
    assert data.quality["duplicate_timestamps"] == 1  # rows beyond the first
    assert data.quality["dropped"] == {"duplicate_timestamps": 1}
    assert data.frame["temp"].to_list() == [3.0, 2.0]  # the last 'a' row is kept


def test_entity_names_are_stripped_wherever_a_run_changes_spelling() -> None:
    raw = _table(["a", " a", "a ", "b"], [0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    data = validate(raw, "memory", DataSettings(), QualitySettings())
    assert data.quality["entity_rows"] == {"a": 3, "b": 1}


def test_integer_labels_pass_and_a_label_of_2_is_refused() -> None:
    raw = _table(["a", "a", "a"], [0, 1, 2], [1.0, 2.0, 3.0])
    ok = validate(
        raw.with_columns(anomaly=pl.Series([0, 1, 0], dtype=pl.Int64)),
        "memory",
        DataSettings(),
        QualitySettings(),
    )
    assert ok.frame["label"].to_list() == [0, 1, 0]
    assert ok.frame["label"].dtype == pl.Int8
    with pytest.raises(
        InputError, match="row 3, entity 'a', column 'anomaly': label 2"
    ):
        validate(
            raw.with_columns(anomaly=pl.Series([0, 1, 2])),
            "memory",
            DataSettings(),
            QualitySettings(),
        )


# ----------------------------------------------------------------------------- config


def test_unknown_timezone_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown timezone 'Mars/Olympus'"):
        _settings(timezone="Mars/Olympus")


def test_config_yaml_documents_every_data_and_quality_setting() -> None:
    text = (ROOT / "config.yaml").read_text()
    tree = yaml.safe_load(text)
    for section, model in (("data", DataSettings), ("quality", QualitySettings)):
        assert list(tree[section]) == list(model.model_fields)
        for key in model.model_fields:
            line = next(x for x in text.splitlines() if x.strip().startswith(f"{key}:"))
            assert "#" in line or key.endswith("_prefix"), key
    assert Settings.model_validate(tree) == Settings()
