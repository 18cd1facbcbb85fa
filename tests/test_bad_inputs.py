"""The catalogue of bad inputs: each case states its exact outcome.

An outcome is either the error (its whole text: file, line, entity, column, what was
found and what was expected) or the repaired table with the counts the data-quality
summary reports. The README's "Input rules" section lists the same rules as one table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from sagewatch.cli import main
from sagewatch.config import Settings
from sagewatch.detector import Detector
from sagewatch.errors import ArtifactError, ConfigError, InputError, SchemaMismatchError
from sagewatch.features import build_features, feature_names
from sagewatch.schema import Dataset, load_raw
from sagewatch.scoring import score_features
from sagewatch.training import fit_detector

HEAD = "timestamp,machine_id,temp,pres\n"
ISO_HINT = (
    "expected ISO 8601 such as 2024-01-01 00:00:00 or 2024-01-01T00:00:00+01:00 "
    "(set timestamp_format for other layouts)"
)
TINY_MODEL = {"epochs": 3, "hidden_dims": [8], "encoding_dim": 2, "batch_size": 64}


def _settings(**overrides: object) -> Settings:
    return Settings().with_overrides(overrides)


def _load(path: Path, **overrides: object) -> Dataset:
    s = _settings(**overrides)
    return load_raw(
        str(path), s.data, s.quality, rolling_window=s.features.rolling_window
    )


def _file(tmp_path: Path, content: str | bytes, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _refusal(path: Path, **overrides: object) -> str:
    with pytest.raises(InputError) as info:
        _load(path, **overrides)
    return str(info.value)


def _rows(*lines: str) -> str:
    return HEAD + "".join(f"{line}\n" for line in lines)


def _t(minute: int) -> str:
    return f"2024-01-01 00:{minute:02d}:00"


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# ----------------------------------------------------------------------------- files


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, b"")
    assert _refusal(path) == (
        f"{path}: the file is empty; expected a header row and data rows"
    )


def test_whitespace_only_file_is_refused_as_empty(tmp_path: Path) -> None:
    path = _file(tmp_path, "\n  \n\n")
    assert _refusal(path).endswith(
        "the file is empty; expected a header row and data rows"
    )


def test_header_only_file_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, HEAD)
    assert _refusal(path) == (
        f"{path}: the file has a header but no data rows; expected at least one row "
        "of readings"
    )


def test_line_with_extra_fields_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,1,2,3"))
    assert _refusal(path) == (
        f"{path}, line 3: 5 fields, the header has 4; expected one field per column "
        "(a line cut short, or the wrong separator?)"
    )


def test_stray_quote_is_reported_where_it_opens(tmp_path: Path) -> None:
    lines = [
        f"{_t(0)},m1,1,2",
        f'{_t(1)},m1,"3,4',
        f"{_t(2)},m1,5,6",
        f"{_t(3)},m1,7,8",
    ]
    path = _file(tmp_path, _rows(*lines))
    assert _refusal(path) == (
        f"{path}, line 3: a quoted field opens here and never closes; expected each "
        "row on one line (a stray quote character?)"
    )
    # In the last field, on the last line, without a final line break: the same.
    last = _file(tmp_path, _rows(*lines[:1]) + f'{_t(1)},m1,3,"4', "last.csv")
    assert _refusal(last).startswith(f"{last}, line 3: a quoted field opens here")


def test_two_stray_quotes_do_not_merge_rows(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        _rows(
            f"{_t(0)},m1,1,2", f'{_t(1)},"m1,3,4', f'{_t(2)},m1",5,6', f"{_t(3)},m1,7,8"
        ),
    )
    assert _refusal(path) == (
        f"{path}, line 3: a quoted field opens here and runs to line 4; expected each "
        "row on one line (a stray quote character?)"
    )


def test_quote_inside_a_field_is_named(tmp_path: Path) -> None:
    # on the last line without a final line break, polars itself reads it
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2") + f'{_t(1)},m"1,3,4')
    assert _refusal(path) == (
        f"{path}, line 3: the field 'm\"1' holds a quote character; expected plain "
        "values, or values wholly in quotes with inner quotes doubled"
    )


def test_stray_quote_in_the_header_is_named(tmp_path: Path) -> None:
    body = "".join(f"{_t(i)},m1,{i},2\n" for i in range(3))
    opens = _file(tmp_path, 'timestamp,"machine_id,temp,pres\n' + body, "a.csv")
    assert _refusal(opens) == (
        f"{opens}, line 1: a quoted field opens here and never closes; expected each "
        "row on one line (a stray quote character?)"
    )
    inner = _file(tmp_path, 'timestamp,machine"id,temp,pres\n' + body, "b.csv")
    assert _refusal(inner).startswith(
        f"{inner}, line 1: the field 'machine\"id' holds a quote character"
    )


def test_text_after_a_closing_quote_is_named(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", f'{_t(1)},"m1"x,3,4'))
    assert _refusal(path) == (
        f"{path}, line 3: a quoted field has more text after its closing quote; "
        "expected a value wholly in quotes (a stray quote character?)"
    )


def test_blank_lines_at_the_end_are_ignored_inside_refused(tmp_path: Path) -> None:
    rows = _rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,3,4")
    assert _load(_file(tmp_path, rows + "\n\r\n\n", "end.csv")).frame.height == 2
    spaces = _file(tmp_path, rows + "   \n\t\n", "spaces.csv")  # whitespace only
    assert _load(spaces).frame.height == 2
    commas = _file(tmp_path, rows + ',,,\n , ,,\n"",,"",\n', "commas.csv")  # empty
    assert _load(commas).frame.height == 2
    first = _file(tmp_path, "\n" + rows, "first.csv")
    assert _refusal(first) == (
        f"{first}, line 1: the line is blank; expected the header row (remove blank "
        "lines before it)"
    )
    inside = _file(tmp_path, rows + "\n" + f"{_t(2)},m1,5,6\n", "inside.csv")
    assert _refusal(inside) == (
        f"{inside}, line 4: the line has no values; expected a row of readings "
        "(remove blank lines)"
    )


def test_quoted_fields_on_one_line_are_read(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f'"{_t(0)}","m,1",1,2', f'{_t(1)},"m,1","3",4'))
    data = _load(path)
    assert data.frame["machine_id"].to_list() == ["m,1", "m,1"]
    assert data.frame["temp"].to_list() == [1.0, 3.0]


def test_entity_over_several_lines_is_refused(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "timestamp": [_t(0), _t(1)],
            "machine_id": ["m1", "m1\n2024-01-01"],
            "temp": [1.0, 2.0],
            "pres": [0.1, 0.2],
        }
    )
    path = tmp_path / "in.parquet"
    frame.write_parquet(path)
    assert _refusal(path) == (
        f"{path}, row 2, column 'machine_id': the entity 'm1\\n2024-01-01' runs "
        "over several lines; expected a name on one line (a stray quote character?)"
    )


def test_line_cut_short_is_refused_not_padded(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,1"))
    assert _refusal(path) == (
        f"{path}, line 3: 3 fields, the header has 4; expected one field per column "
        "(a line cut short, or the wrong separator?)"
    )


def test_spaces_around_column_names_are_ignored(tmp_path: Path) -> None:
    path = _file(tmp_path, f"timestamp, machine_id, temp, vib\n{_t(0)}, m1, 1, 2\n")
    data = _load(path)
    assert data.sensors == ["temp", "vib"]
    assert data.frame["machine_id"].to_list() == ["m1"]
    clash = _file(tmp_path, f"timestamp,temp, temp\n{_t(0)},1,2\n", "clash.csv")
    assert _refusal(clash) == (
        f"{clash}: column ' temp' is 'temp' with spaces around it, and 'temp' is in "
        "the header too; expected unique column names"
    )


def test_wrong_separator_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = _file(tmp_path, "timestamp;machine_id;temp\n2024-01-01 00:00:00;m1;1.5\n")
    assert _refusal(path, sep=",") == (
        f"{path}, line 1: the header holds no ',' (the sep setting) but 2 ';'; "
        "expected columns separated by ',' (set sep to ';', or leave it unset to "
        "detect it)"
    )
    quoted = _file(tmp_path, _rows(f'{_t(0)},"m 1",1,2'), "quoted.csv")
    assert _refusal(quoted, sep="tab").startswith(
        f"{quoted}, line 1: the header holds no '\\t' (the sep setting) but 3 ','"
    )


def test_semicolon_separator_is_guessed(tmp_path: Path) -> None:
    path = _file(tmp_path, "timestamp;machine_id;temp\n2024-01-01 00:00:00;m1;1,5\n")
    # Decimal commas are not numbers: the guessed separator is right, the value not.
    assert _refusal(path) == (
        f"{path}: no numeric sensor columns found among ['timestamp', 'machine_id', "
        "'temp'] ('temp' holds text values such as '1,5'); expected at least one "
        "column of numbers, or set sensor_columns"
    )
    text = "timestamp;machine_id;temp\n2024-01-01 00:00:00;m1;1.5\n"
    assert _load(_file(tmp_path, text)).frame["temp"].to_list() == [1.5]


def test_bom_and_crlf_read_like_a_plain_file(tmp_path: Path) -> None:
    text = _rows(f"{_t(0)},m1,1.5,2", f"{_t(1)},m1,1.6,3")
    plain = _load(_file(tmp_path, text, "plain.csv"))
    crlf = text.replace("\n", "\r\n").encode("utf-8")
    windows = _load(_file(tmp_path, b"\xef\xbb\xbf" + crlf, "windows.csv"))
    assert windows.frame.equals(plain.frame)
    assert windows.sensors == ["temp", "pres"]


def test_utf16_file_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2").encode("utf-16"))
    assert _refusal(path) == f"{path}: the file is UTF-16 text; expected UTF-8"


@pytest.mark.parametrize(
    ("bad_row", "line"),
    [(b"00:03:00,m1,3\xff,2", 5), (b"00:04:00,m\xff1,4,2", 6)],  # a number, an entity
)
def test_bytes_that_are_not_utf8_are_refused_naming_the_line(
    tmp_path: Path, bad_row: bytes, line: int
) -> None:
    rows = [f"{_t(i)},m1,{i},2".encode() for i in range(6)]
    rows[line - 2] = b"2024-01-01 " + bad_row
    path = _file(tmp_path, HEAD.encode() + b"".join(r + b"\n" for r in rows))
    assert _refusal(path) == (
        f"{path}, line {line}: bytes b'\\xff' are not UTF-8 text; expected a UTF-8 "
        "file (convert it, e.g. with iconv)"
    )


def test_files_with_different_columns_are_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    first = _file(tmp_path, _rows(f"{_t(0)},m1,1,2"), "in/a.csv")
    second = _file(
        tmp_path, f"timestamp,machine_id,temp,flow\n{_t(0)},m2,1,2\n", "in/b.csv"
    )
    assert _refusal(tmp_path / "in") == (
        f"{second}: columns differ from {first}: missing ['pres'], extra ['flow']; "
        "expected every file to have the same columns"
    )


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f"timestamp,machine_id,temp,temp\n{_t(0)},m1,1,2\n")
    assert _refusal(path) == (
        f"{path}: column name 'temp' appears more than once in the header; "
        "expected unique column names"
    )


def test_sensor_named_like_an_output_column_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f"timestamp,machine_id,anomaly_score\n{_t(0)},m1,1\n")
    assert _refusal(path) == (
        f"{path}: sensor column(s) ['anomaly_score'] use a reserved output name; "
        "rename them or set sensor_columns (reserved: ['anomaly_score', "
        "'in_reference', 'is_anomaly', 'label', 'machine_id', 'threshold', "
        "'timestamp', 'top_sensor'] and names starting with '__')"
    )


def test_column_named_like_the_label_but_not_mapped_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f"timestamp,machine_id,temp,label\n{_t(0)},m1,1,7\n")
    assert _refusal(path) == (
        f"{path}: column 'label' would be overwritten by the column mapped by "
        "label_column ('anomaly'); rename it, or set label_column: label"
    )


def test_entity_column_missing_while_machine_id_exists_says_both(
    tmp_path: Path,
) -> None:
    path = _file(tmp_path, f"timestamp,machine_id,temp\n{_t(0)},m1,1\n")
    assert _refusal(path, entity_column="nope") == (
        f"{path}: column 'machine_id' would be overwritten by the column mapped by "
        "entity_column ('nope') (no column 'nope' in this file, so the file name "
        "would be used); rename it, or set entity_column: machine_id"
    )


def test_more_sensors_than_max_sensors_are_refused(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(1001)]
    header = "timestamp,machine_id," + ",".join(names) + "\n"
    row = f"{_t(0)},m1," + ",".join("1.0" for _ in names) + "\n"
    path = _file(tmp_path, header + row)
    assert _refusal(path) == (
        f"{path}: 1001 sensor columns, more than max_sensors=1000; choose them with "
        "sensor_columns or raise max_sensors"
    )


def test_many_columns_within_max_sensors_are_read(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(400)]
    header = "timestamp,machine_id," + ",".join(names) + "\n"
    rows = "".join(
        f"{_t(m)},m1," + ",".join(str(m + i) for i in range(400)) + "\n"
        for m in range(3)
    )
    data = _load(_file(tmp_path, header + rows))
    assert data.sensors == names
    assert data.frame.shape == (3, 402)
    assert data.frame["s399"].to_list() == [399.0, 400.0, 401.0]


def test_text_column_is_not_a_sensor_and_is_reported(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "timestamp,machine_id,temp,note\n"
        f"{_t(0)},m1,1,ok\n{_t(1)},m1,2,check valve\n{_t(2)},m1,3,\n",
    )
    data = _load(path)
    assert data.sensors == ["temp"]
    assert data.quality["ignored_columns"] == ["note"]


# ----------------------------------------------------------------------------- time


def test_missing_timestamp_column_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f"time,machine_id,temp\n{_t(0)},m1,1\n")
    assert _refusal(path) == (
        f"{path}: timestamp column 'timestamp' not found; columns are ['time', "
        "'machine_id', 'temp']; set timestamp_column"
    )


def test_unparseable_timestamp_names_the_first_bad_value(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", "yesterday,m1,1,2", "soon,m1,1,2"))
    assert _refusal(path) == (
        f"{path}, line 3, entity 'm1', column 'timestamp': cannot parse 'yesterday' "
        f"as a timestamp; {ISO_HINT}"
    )


def test_empty_timestamp_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", ",m1,1,2"))
    assert _refusal(path) == (
        f"{path}, line 3, entity 'm1', column 'timestamp': cannot parse an empty "
        f"value as a timestamp; {ISO_HINT}"
    )


def test_numeric_timestamps_are_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows("1704067200,m1,1,2", "1704067260,m1,1,2"))
    assert _refusal(path) == (
        f"{path}, line 2, entity 'm1', column 'timestamp': holds numbers "
        "(1704067200); expected date-time text such as 2024-01-01 00:00:00"
    )


def test_day_month_order_is_never_guessed(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows("01/02/2024 10:00,m1,1,2"))
    assert "cannot parse '01/02/2024 10:00' as a timestamp" in _refusal(path)
    data = _load(path, timestamp_format="%d/%m/%Y %H:%M")
    assert data.frame["timestamp"].to_list() == [_utc(2024, 2, 1, 10)]


def test_mixed_utc_offsets_across_a_dst_change_parse_to_utc(tmp_path: Path) -> None:
    # Europe/Berlin leaves summer time at 03:00 CEST on 2024-10-27: 02:xx twice.
    stamps = [
        "2024-10-27T01:30:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T02:30:00+01:00",
    ]
    data = _load(_file(tmp_path, _rows(*(f"{s},m1,1,2" for s in stamps))))
    assert data.frame["timestamp"].to_list() == [
        _utc(2024, 10, 26, 23, 30),
        _utc(2024, 10, 27, 0, 0),
        _utc(2024, 10, 27, 0, 30),
        _utc(2024, 10, 27, 1, 0),
        _utc(2024, 10, 27, 1, 30),
    ]
    assert data.quality["out_of_order_rows"] == 0
    assert data.quality["duplicate_timestamps"] == 0
    assert data.quality["dropped"] == {}


def test_ambiguous_local_time_in_a_dst_change_is_refused(tmp_path: Path) -> None:
    path = _file(
        tmp_path, _rows("2024-10-27 01:30:00,m1,1,2", "2024-10-27 02:30:00,m1,1,2")
    )
    assert _refusal(path, timezone="Europe/Berlin") == (
        f"{path}, line 3, entity 'm1', column 'timestamp': local time "
        "2024-10-27 02:30:00 is ambiguous or does not exist in timezone "
        "'Europe/Berlin' (a daylight-saving change); expected timestamps with UTC "
        "offsets, or in UTC"
    )


def test_local_time_skipped_by_a_dst_change_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows("2024-03-31 02:30:00,m1,1,2"))
    assert "2024-03-31 02:30:00 is ambiguous or does not exist" in _refusal(
        path, timezone="Europe/Berlin"
    )


def test_naive_local_time_is_converted_from_the_timezone(tmp_path: Path) -> None:
    data = _load(
        _file(tmp_path, _rows("2024-07-01 12:00:00,m1,1,2")), timezone="Europe/Berlin"
    )
    assert data.frame["timestamp"].to_list() == [_utc(2024, 7, 1, 10)]


def test_mixing_timestamps_with_and_without_offset_is_refused(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        _rows("2024-01-01T00:00:00+01:00,m1,1,2", "2024-01-01T01:00:00,m1,1,2"),
    )
    assert _refusal(path) == (
        f"{path}, line 3, entity 'm1', column 'timestamp': '2024-01-01T01:00:00' has "
        "no UTC offset while '2024-01-01T00:00:00+01:00' has one; expected every "
        "timestamp with an offset or none"
    )


# ----------------------------------------------------------------------------- rows


def test_unsorted_rows_within_an_entity_are_sorted_and_counted(tmp_path: Path) -> None:
    path = _file(
        tmp_path, _rows(f"{_t(2)},m1,3,0", f"{_t(0)},m1,1,0", f"{_t(1)},m1,2,0")
    )
    data = _load(path)
    assert data.frame["temp"].to_list() == [1.0, 2.0, 3.0]
    assert data.quality["out_of_order_rows"] == 1
    assert data.quality["repaired"] == {"sorted_rows": 1}
    assert data.quality["dropped"] == {}


def test_unsorted_rows_are_refused_when_sort_rows_is_off(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(2)},m1,3,0", f"{_t(0)},m1,1,0"))
    assert _refusal(path, sort_rows=False) == (
        f"{path}, line 3, entity 'm1': timestamp 2024-01-01 00:00:00+00:00 is earlier "
        "than the row before it; expected rows in time order within each entity (or "
        "set sort_rows: true)"
    )


def test_concatenated_entities_with_a_duplicated_timestamp(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        _rows(
            f"{_t(0)},m2,100,0",
            f"{_t(1)},m2,101,0",
            f"{_t(0)},m1,1,0",
            f"{_t(1)},m1,2,0",
            f"{_t(1)},m1,5,0",
            f"{_t(2)},m1,3,0",
        ),
    )
    data = _load(path, max_drop_fraction=0.5)
    frame = data.frame
    assert frame["machine_id"].to_list() == ["m1"] * 3 + ["m2"] * 2
    assert frame["temp"].to_list() == [1.0, 5.0, 3.0, 100.0, 101.0]  # last one kept
    assert data.quality["dropped"] == {"duplicate_timestamps": 1}
    assert data.quality["duplicate_timestamps"] == 1
    assert data.quality["out_of_order_rows"] == 0
    assert data.quality["entity_rows"] == {"m1": 3, "m2": 2}
    features = build_features(frame, data.sensors, _settings().features)
    # Windows restart at each entity: m2's first mean is its own first reading.
    assert features["temp__mean"].to_list() == [1.0, 3.0, 3.0, 100.0, 100.5]
    assert features["temp__change"].to_list() == [0.0, 4.0, -2.0, 0.0, 1.0]


def test_duplicated_timestamp_is_refused_when_set_to_error(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,0", f"{_t(0)},m1,2,0"))
    assert _refusal(path, duplicate_timestamps="error") == (
        f"{path}, line 2, entity 'm1': timestamp 2024-01-01 00:00:00+00:00 appears "
        f"again with other readings ({path}, line 3, entity 'm1'); expected one row "
        "per entity and timestamp (or set duplicate_timestamps: keep_last)"
    )


def test_exact_duplicate_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [f"{_t(0)},m1,1,0", f"{_t(1)},m1,2,0", f"{_t(1)},m1,2,0", f"{_t(2)},m1,3,0"]
    data = _load(_file(tmp_path, _rows(*rows * 2)), max_drop_fraction=0.7)
    assert data.frame["temp"].to_list() == [1.0, 2.0, 3.0]
    assert data.quality["dropped"] == {"exact_duplicate_rows": 5}
    assert data.quality["rows_in"] == 8
    assert data.quality["rows_out"] == 3


def test_exact_duplicates_fall_to_the_timestamp_rule_when_kept(tmp_path: Path) -> None:
    path = _file(
        tmp_path, _rows(f"{_t(0)},m1,1,0", f"{_t(0)},m1,1,0", f"{_t(1)},m1,2,0")
    )
    data = _load(path, drop_duplicate_rows=False, max_drop_fraction=0.5)
    assert data.quality["exact_duplicate_rows"] == 1
    assert data.quality["dropped"] == {"duplicate_timestamps": 1}


def test_too_many_dropped_rows_are_refused(tmp_path: Path) -> None:
    # Two machines in one file without an entity column: half the rows collide.
    text = "timestamp,temp\n" + "".join(
        f"{_t(m)},{machine * 10 + m}\n" for machine in (1, 2) for m in range(4)
    )
    path = _file(tmp_path, text)
    assert _refusal(path) == (
        f"{path}: the repair rules would drop 4 of 8 rows ({{'duplicate_timestamps': "
        "4}), more than max_drop_fraction=0.1; check entity_column and the input, "
        "or raise max_drop_fraction"
    )


def test_empty_entity_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,0", f"{_t(1)},,1,0"))
    assert _refusal(path) == (
        f"{path}, line 3, column 'machine_id': empty entity; expected a name or "
        "number for every row"
    )


# ----------------------------------------------------------------------------- values


def test_non_numeric_sensor_value_is_refused(tmp_path: Path) -> None:
    path = _file(
        tmp_path, _rows(f"{_t(0)},m1,1,0", f"{_t(1)},m1,1,0", f"{_t(2)},m1,hot,0")
    )
    assert _refusal(path) == (
        f"{path}, line 4, entity 'm1', column 'temp': value 'hot' is not a number; "
        "expected a decimal number such as 12.5 (or empty / NaN for a missing "
        "reading)"
    )


def test_missing_markers_are_missing_readings(tmp_path: Path) -> None:
    rows = [f"{_t(0)},m1,1,0", f"{_t(1)},m1,NA,0", f"{_t(2)},m1,,0", f"{_t(3)},m1,4,0"]
    data = _load(_file(tmp_path, _rows(*rows)))
    assert data.frame["temp"].to_list() == [1.0, 1.0, 1.0, 4.0]
    assert data.quality["sensors"]["temp"] == {
        "missing": 2,
        "non_finite": 0,
        "out_of_range": 0,
        "filled": 2,
    }


def test_nan_inf_and_absurd_magnitudes_are_filled_and_counted(tmp_path: Path) -> None:
    values = ["1.0", "NaN", "2.0", "inf", "-inf", "1e300", "3.0"]
    rows = [f"{_t(m)},m1,{v},0" for m, v in enumerate(values)]
    data = _load(_file(tmp_path, _rows(*rows)))
    assert data.frame["temp"].to_list() == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0]
    assert data.quality["sensors"]["temp"] == {
        "missing": 0,
        "non_finite": 3,
        "out_of_range": 1,
        "filled": 4,
    }
    assert data.quality["repaired"] == {"forward_filled_values": 4}
    assert data.quality["dropped"] == {}


def test_gap_longer_than_max_fill_gap_drops_the_rest(tmp_path: Path) -> None:
    rows = [f"{_t(0)},m1,1,0", f"{_t(1)},m1,,0", f"{_t(2)},m1,,0", f"{_t(3)},m1,4,0"]
    data = _load(_file(tmp_path, _rows(*rows)), max_fill_gap=1, max_drop_fraction=0.5)
    assert data.frame["temp"].to_list() == [1.0, 1.0, 4.0]
    assert data.quality["dropped"] == {"rows_with_unfilled_gaps": 1}
    assert data.quality["repaired"] == {"forward_filled_values": 1}


def test_unfilled_gap_is_refused_when_dropping_is_off(tmp_path: Path) -> None:
    rows = [f"{_t(0)},m1,1,0", f"{_t(1)},m1,,0", f"{_t(2)},m1,,0"]
    path = _file(tmp_path, _rows(*rows))
    assert _refusal(path, max_fill_gap=1, drop_unfilled_rows=False) == (
        f"{path}, line 4, entity 'm1', column 'temp': missing reading that no earlier "
        "reading within max_fill_gap=1 rows can fill; expected a number (or set "
        "drop_unfilled_rows: true)"
    )


def test_max_fill_gap_zero_never_fills(tmp_path: Path) -> None:
    rows = [f"{_t(m)},m1,{m if m != 5 else ''},0" for m in range(10)]
    data = _load(_file(tmp_path, _rows(*rows)), max_fill_gap=0)
    assert data.frame["temp"].to_list() == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0]
    assert data.quality["dropped"] == {"rows_with_unfilled_gaps": 1}
    assert "forward_filled_values" not in data.quality["repaired"]


def test_leading_missing_reading_cannot_be_filled(tmp_path: Path) -> None:
    rows = [f"{_t(0)},m1,,5"] + [f"{_t(m)},m1,{m},5" for m in range(1, 10)]
    data = _load(_file(tmp_path, _rows(*rows)))
    assert data.frame.height == 9
    assert data.frame["timestamp"][0] == _utc(2024, 1, 1, 0, 1)
    assert data.quality["dropped"] == {"rows_with_unfilled_gaps": 1}


def test_all_nan_sensor_is_left_out_and_reported(tmp_path: Path) -> None:
    rows = [f"{_t(m)},m1,{m},NaN" for m in range(3)]
    data = _load(_file(tmp_path, _rows(*rows)))
    assert data.sensors == ["temp"]
    assert data.frame.columns == ["timestamp", "machine_id", "temp"]
    assert data.quality["empty_sensors"] == ["pres"]
    assert data.quality["dropped"] == {}


def test_every_sensor_empty_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,,nan", f"{_t(1)},m1,,inf"))
    assert _refusal(path) == (
        f"{path}: every sensor column (['temp', 'pres']) is empty or non-finite; "
        "expected readings in at least one"
    )


def test_label_other_than_0_or_1_is_refused(tmp_path: Path) -> None:
    text = "timestamp,machine_id,temp,anomaly\n" + "".join(
        f"{_t(m)},m1,1,{v}\n" for m, v in enumerate(["0", "1", "2"])
    )
    path = _file(tmp_path, text)
    assert _refusal(path) == (
        f"{path}, line 4, entity 'm1', column 'anomaly': label 2; expected 0 or 1"
    )


def test_missing_label_is_refused(tmp_path: Path) -> None:
    text = f"timestamp,machine_id,temp,anomaly\n{_t(0)},m1,1,0\n{_t(1)},m1,1,\n"
    path = _file(tmp_path, text)
    assert _refusal(path) == (
        f"{path}, line 3, entity 'm1', column 'anomaly': label missing; expected 0 or 1"
    )


def test_labels_written_as_floats_are_read(tmp_path: Path) -> None:
    text = f"timestamp,machine_id,temp,anomaly\n{_t(0)},m1,1,0.0\n{_t(1)},m1,1,1.0\n"
    data = _load(_file(tmp_path, text))
    assert data.frame["label"].to_list() == [0, 1]
    assert data.sensors == ["temp"]


# ----------------------------------------------------------------------------- model


def _features(frame: pl.DataFrame, **overrides: object) -> tuple:
    settings = _settings(**TINY_MODEL, **overrides)
    sensors = [c for c in frame.columns if c not in ("timestamp", "machine_id")]
    features = build_features(frame, sensors, settings.features)
    names = feature_names(sensors, settings.features.statistics)
    return features, names, settings


def _frame(**sensors: list[float]) -> pl.DataFrame:
    n = len(next(iter(sensors.values())))
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return pl.DataFrame(
        {
            "timestamp": pl.datetime_range(
                start, start.replace(minute=n - 1), "1m", eager=True
            ).dt.cast_time_unit("us"),
            "machine_id": ["m1"] * n,
            **sensors,
        }
    )


def test_constant_zero_sensor_gives_finite_sensible_scores() -> None:
    noise = np.random.default_rng(0).normal(50.0, 1.0, 40).round(3).tolist()
    frame = _frame(valve=[0.0] * 40, noise=noise)
    features, names, settings = _features(frame, rolling_window=4, train_rows=20)
    detector, _ = fit_detector(features, names, settings)
    scores = score_features(features, detector)
    assert np.isfinite(scores["anomaly_score"].to_numpy()).all()
    assert scores["anomaly_score"].max() < 100.0
    assert "valve" not in scores["top_sensor"].to_list()


def test_near_constant_sensor_gives_a_bounded_score() -> None:
    noise = np.random.default_rng(1).normal(50.0, 1.0, 40).round(3).tolist()
    level = [96.0] * 40
    level[30] = 93.0  # twenty 96.0 in the reference period, one 93.0 after it
    features, names, settings = _features(
        _frame(level=level, noise=noise), rolling_window=4, train_rows=20
    )
    detector, _ = fit_detector(features, names, settings)
    scores = score_features(features, detector)
    score = scores["anomaly_score"].to_numpy()
    assert np.isfinite(score).all()
    # The detector scores sequences of rows, so the peak comes at or after row 30.
    assert int(score.argmax()) >= 30
    assert score[30] > 5 * score[:30].max()
    assert scores["top_sensor"][30] == "level"
    assert scores["is_anomaly"][30] == 1
    # 3.0 below a level of 96 is ~31 scale units: hundreds, not the 1e5 a per-feature
    # floor (constant spread and change rate scaled by 1e-6) would give.
    assert 10.0 < score[30] < 2000.0
    assert score.max() < 2000.0


def test_entity_shorter_than_rolling_window_uses_partial_windows(
    tmp_path: Path,
) -> None:
    rows = [f"{_t(m)},m1,{v},0" for m, v in enumerate([1.0, 3.0, 8.0])]
    data = _load(_file(tmp_path, _rows(*rows)), rolling_window=5)
    assert data.quality["short_entities"] == {"m1": 3}
    features = build_features(
        data.frame, ["temp"], _settings(rolling_window=5).features
    )
    assert features["temp__mean"].to_list() == [1.0, 2.0, 4.0]
    assert features["temp__range"].to_list() == [0.0, 2.0, 7.0]
    assert features["temp__slope"].to_list() == pytest.approx([0.0, 2.0, 3.5])
    assert features["temp__std"][0] == 0.0


def test_single_row_entity_is_featured_and_scored(tmp_path: Path) -> None:
    rows = [f"{_t(m)},m1,{50 + m % 3},{m % 5}" for m in range(30)]
    path = _file(tmp_path, _rows(*rows, f"{_t(0)},m2,51,2"))
    settings = _settings(**TINY_MODEL, rolling_window=4)
    data = _load(path, rolling_window=4)
    assert data.quality["entity_rows"] == {"m1": 30, "m2": 1}
    features = build_features(data.frame, data.sensors, settings.features)
    single = features.filter(pl.col("machine_id") == "m2")
    assert single.select("temp__std", "temp__range", "temp__slope", "temp__change").row(
        0
    ) == (0.0, 0.0, 0.0, 0.0)
    names = feature_names(data.sensors, settings.features.statistics)
    detector, _ = fit_detector(features, names, settings)
    scores = score_features(features, detector)
    assert scores.height == 31
    assert np.isfinite(scores["anomaly_score"].to_numpy()).all()


def test_entity_without_reference_rows_is_scored_not_trained(tmp_path: Path) -> None:
    rows = [f"2024-01-01 00:{m:02d}:00,m1,{50 + m % 3},{m % 5}" for m in range(30)]
    rows += [f"2024-01-02 00:{m:02d}:00,m2,{50 + m % 4},{m % 5}" for m in range(10)]
    data = _load(_file(tmp_path, _rows(*rows)), rolling_window=4)
    features, names, settings = _features(
        data.frame, rolling_window=4, train_until="2024-01-01T00:19:00"
    )
    detector, info = fit_detector(features, names, settings)
    assert info["entities_without_reference"] == ["m2"]
    assert info["reference_rows"] == 20
    scores = score_features(features, detector)
    m2 = scores.filter(pl.col("machine_id") == "m2")
    assert m2.height == 10
    assert m2["in_reference"].to_list() == [0] * 10
    assert np.isfinite(m2["anomaly_score"].to_numpy()).all()


@pytest.fixture(scope="module")
def fitted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Detector, Path, pl.DataFrame]:
    noise = np.random.default_rng(2).normal(0.0, 1.0, (30, 2)).round(3)
    features, names, settings = _features(
        _frame(temp=noise[:, 0].tolist(), pres=noise[:, 1].tolist()), rolling_window=4
    )
    detector, _ = fit_detector(features, names, settings)
    folder = tmp_path_factory.mktemp("model")
    detector.save(str(folder))
    return detector, folder, features


def test_scoring_data_lacking_a_model_sensor_is_refused(fitted) -> None:
    detector, _, features = fitted
    with pytest.raises(SchemaMismatchError) as info:
        score_features(
            features.select(pl.exclude("^pres__.*$")), detector, source="new.parquet"
        )
    assert str(info.value) == (
        "new.parquet: the model needs sensor(s) ['pres'] (features ['pres__value', "
        "'pres__mean', 'pres__std', 'pres__range', 'pres__slope', 'pres__change']), "
        "which the data lacks"
    )


def test_scoring_data_with_an_extra_sensor_is_refused(fitted) -> None:
    detector, _, features = fitted
    extra = features.with_columns(
        pl.col("temp__value").alias("flow__value"),
        pl.col("temp__mean").alias("flow__mean"),
    )
    with pytest.raises(SchemaMismatchError) as info:
        score_features(extra, detector, source="new.parquet")
    assert str(info.value) == (
        "new.parquet: sensor(s) ['flow'] are not among the model's sensors ['temp', "
        "'pres']; expected the sensors it was trained on"
    )


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _edit_metadata(model: Path, **changes: object) -> None:
    meta = json.loads((model / "detector.json").read_text())
    meta.update(changes)
    (model / "detector.json").write_text(json.dumps(meta))


def _artifact_error(model: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        Detector.load(str(model))
    return str(info.value)


def test_artifact_of_another_format_version_is_refused(fitted, tmp_path: Path) -> None:
    model = _copy(fitted[1], tmp_path)
    _edit_metadata(model, format_version=1, sagewatch_version="9.0.0")
    assert _artifact_error(model) == (
        f"{model}/detector.json: artifact format 1, this sagewatch 0.1.0 reads "
        "format 3; retrain or use the version that wrote it (9.0.0)"
    )


def test_artifact_of_another_release_same_format_loads_with_a_warning(
    fitted, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _copy(fitted[1], tmp_path)
    _edit_metadata(model, sagewatch_version="0.0.9")
    with caplog.at_level(logging.WARNING, logger="sagewatch.artifact"):
        loaded = Detector.load(str(model))
    assert loaded.threshold_ == fitted[0].threshold_
    assert f"{model} was written by sagewatch 0.0.9, this is 0.1.0" in caplog.text


def test_truncated_weights_are_refused(fitted, tmp_path: Path) -> None:
    model = _copy(fitted[1], tmp_path)
    data = (model / "weights.pt").read_bytes()
    (model / "weights.pt").write_bytes(data[: len(data) // 2])
    assert _artifact_error(model) == (
        f"{model}/weights.pt: checksum differs from detector.json; the file is "
        "damaged or was replaced"
    )


def test_missing_weights_are_refused(fitted, tmp_path: Path) -> None:
    model = _copy(fitted[1], tmp_path)
    (model / "weights.pt").unlink()
    assert _artifact_error(model) == f"{model}: no weights.pt next to detector.json"


def test_detector_json_that_is_not_json_is_refused(fitted, tmp_path: Path) -> None:
    model = _copy(fitted[1], tmp_path)
    text = (model / "detector.json").read_text()
    (model / "detector.json").write_text(text[: len(text) // 2])
    assert _artifact_error(model).startswith(f"{model}/detector.json: not valid JSON (")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"threshold": {"value": "high"}}, "could not convert string to float"),
        ({"threshold": {"value": float("inf")}}, "threshold inf is not finite"),
        (
            {"scaler": {"center": [0.0], "scale": [1.0], "entity_center": {}}},
            "scaler center has shape (1,)",
        ),
        ({"feature_names": ["a__value"] * 12}, "feature_names must be a non-empty"),
    ],
)
def test_tampered_detector_json_is_refused(
    fitted, tmp_path: Path, change: dict, reason: str
) -> None:
    model = _copy(fitted[1], tmp_path)
    _edit_metadata(model, **change)
    message = _artifact_error(model)
    assert message.startswith(f"{model}: detector.json and weights do not fit together")
    assert reason in message


class _Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_weights_holding_pickled_code_are_refused_unexecuted(
    fitted, tmp_path: Path
) -> None:
    import hashlib
    import io

    model = _copy(fitted[1], tmp_path)
    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"encoder.0.weight": _Payload(marker)}, buffer)
    (model / "weights.pt").write_bytes(buffer.getvalue())
    _edit_metadata(model, weights_sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    message = _artifact_error(model)
    assert message.startswith(f"{model}/weights.pt: cannot load weights:")
    assert not marker.exists()


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file is empty"),
        (HEAD.encode(), "header but no data rows"),
        (_rows(f"{_t(0)},m1,1,2", "noon,m1,1,2").encode(), "line 3"),
        (_rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,1,2,3").encode(), "line 3: 5 fields"),
        (_rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,x,2").encode(), "value 'x'"),
        (b"\x00\x01\x02garbage\xff\xfe", "in.csv"),
    ],
    ids=["empty", "header-only", "bad-time", "ragged", "text-value", "binary"],
)
def test_cli_reports_bad_input_in_one_line_without_a_traceback(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = _file(tmp_path, content)
    result = CliRunner().invoke(
        main, ["-q", "features", "--input", str(path), "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}")
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [path]  # nothing written


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            ["train", "--model-dir", "{dir}/model"],
            "{path}: no '<sensor>__<statistic>' columns or no typed timestamps; "
            "expected a features table written by `sagewatch features` (Parquet)",
        ),
        (
            ["evaluate", "--output-dir", "{dir}/evaluation"],
            "{path}: columns ['anomaly_score', 'threshold', 'is_anomaly', "
            "'top_sensor'] not found; expected anomaly_scores.csv or .parquet written "
            "by `sagewatch score`",
        ),
    ],
    ids=["train-on-raw", "evaluate-on-raw"],
)
def test_cli_refuses_a_table_from_the_wrong_stage(
    tmp_path: Path, command: list[str], expected: str
) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,2,3"))
    args = [a.format(dir=tmp_path) for a in command]
    result = CliRunner().invoke(
        main, ["-q", *args[:1], "--input", str(path), *args[1:]]
    )
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: {expected.format(path=path)}\n"
    assert list(tmp_path.iterdir()) == [path]


def test_cli_output_folder_that_is_a_file_is_one_error_line(tmp_path: Path) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,2,3"))
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")

    result = CliRunner().invoke(
        main, ["-q", "features", "--input", str(path), "--output-dir", str(blocker)]
    )

    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {blocker}/")
    assert "Traceback" not in result.output
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"hidden_dims": [0]}, "model.hidden_dims.0"),
        ({"hidden_dims": [8, -3]}, "model.hidden_dims.1"),
        ({"seed": -1}, "model.seed"),
    ],
    ids=["zero-channels", "negative-channels", "negative-seed"],
)
def test_impossible_model_settings_are_refused(
    setting: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        Settings().with_overrides(setting)


@pytest.mark.parametrize("sep", ["::", "ab", "\\n"])
def test_cli_refuses_a_separator_longer_than_one_byte(tmp_path: Path, sep: str) -> None:
    path = _file(tmp_path, _rows(f"{_t(0)},m1,1,2", f"{_t(1)},m1,2,3"))
    result = CliRunner().invoke(
        main,
        ["features", "--input", str(path), "--output-dir", str(tmp_path), "--sep", sep],
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "error: invalid configuration from command-line options: data.sep: "
    )
    assert "expected one single-byte character" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("sep", ["\\t", "tab"])
def test_typed_tab_spellings_read_a_tab_separated_file(
    tmp_path: Path, sep: str
) -> None:
    # More commas than tabs in the header: only the given separator reads it right.
    text = "timestamp\tmachine_id\ttemp,C,max\n2024-01-01 00:00:00\tm1\t1.5\n"
    frame = _load(_file(tmp_path, text), sep=sep).frame
    assert frame["temp,C,max"].to_list() == [1.5]
    assert frame["machine_id"].to_list() == ["m1"]
