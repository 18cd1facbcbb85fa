"""Table formats for :mod:`sagewatch.storage`: parsing bytes and writing files.

CSV (any separator, gzip too) and Parquet. Only :mod:`sagewatch.storage` imports
this module; it never touches a URI's location, only bytes and local paths.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Callable
from typing import Any

import polars as pl

from sagewatch.errors import InputError, StorageError

log = logging.getLogger("sagewatch.storage")

_SEPARATORS = (",", ";", "\t", "|")


def parse(uri: str, data: bytes, sep: str | None) -> pl.DataFrame:
    """The table in ``data``, read by the suffix of ``uri``.

    Raises:
        InputError: the bytes are not a readable Parquet, gzip or CSV file.
    """
    log.debug("parse %s (%d bytes)", uri, len(data))
    if uri.endswith(".parquet"):
        try:
            return pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # polars raises several foreign types here
            raise InputError(f"{uri}: not a readable Parquet file: {exc}") from exc
    return _parse_csv(uri, _gunzip(uri, data), sep)


def _gunzip(uri: str, data: bytes) -> bytes:
    if not uri.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise InputError(f"{uri}: not a readable gzip file: {exc}") from exc


def _parse_csv(uri: str, data: bytes, sep: str | None) -> pl.DataFrame:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{uri}: the file is UTF-16 text; expected UTF-8")
    check_first_line(uri, data)
    separator = choose_separator(uri, data, sep)
    data = _without_trailing_blank_lines(data, separator)
    _check_quotes(uri, data, separator)
    options: dict[str, Any] = {"separator": separator, "try_parse_dates": False}
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema_length=10_000, **options)
    except pl.exceptions.ComputeError:
        # A column that looked numeric early on holds text later: read all as text
        # and let schema validation name the first bad value.
        frame = None
    except pl.exceptions.PolarsError as exc:
        raise _csv_error(uri, data, separator, exc) from exc
    if frame is None:
        try:
            frame = pl.read_csv(io.BytesIO(data), infer_schema_length=0, **options)
        except pl.exceptions.PolarsError as exc:
            raise _csv_error(uri, data, separator, exc) from exc
    if frame.width and frame[frame.columns[-1]].null_count():
        # Polars pads a short line with nulls; only then is the slow check needed.
        _check_field_counts(uri, data, separator)
        _check_blank_lines(uri, frame)
    return frame


def _without_trailing_blank_lines(data: bytes, separator: str) -> bytes:
    """``data`` ending in one line break, without the lines at the end that hold
    nothing but whitespace, separators and quotes (they are no rows)."""
    sep = separator.encode()

    def blank(line: bytes) -> bool:
        return not line.replace(sep, b"").replace(b'"', b"").strip()

    end = len(data)
    while (cut := data.rfind(b"\n", 0, end)) >= 0 and blank(data[cut + 1 : end]):
        end = cut
    return data[:end] + b"\n"


def check_first_line(uri: str, data: bytes) -> None:
    """Refuse an empty file, or one whose first line is blank: the header must be
    line 1, or every line number in later messages would be off. ``data`` may be
    the file's head."""
    if not data.strip():
        raise InputError(
            f"{uri}: the file is empty; expected a header row and data rows"
        )
    first = data.removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0]
    if not first.strip():
        raise InputError(
            f"{uri}, line 1: the line is blank; expected the header row (remove "
            "blank lines before it)"
        )


def _check_blank_lines(uri: str, frame: pl.DataFrame) -> None:
    """Refuse a line with no value at all (a blank line inside the file)."""
    empty = frame.select(pl.all_horizontal(pl.all().is_null())).to_series()
    if empty.any():
        line = int(empty.arg_max() or 0) + 2  # the header is line 1
        raise InputError(
            f"{uri}, line {line}: the line has no values; expected a row of readings "
            "(remove blank lines)"
        )


def _csv_error(uri: str, data: bytes, separator: str, exc: Exception) -> InputError:
    _check_field_counts(uri, data, separator)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = data.count(b"\n", 0, bad.start) + 1
        return InputError(
            f"{uri}, line {line}: bytes {data[bad.start : bad.end]!r} are not UTF-8 "
            "text; expected a UTF-8 file (convert it, e.g. with iconv)"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
    return InputError(
        f"{uri}: cannot parse as CSV with separator {separator!r}: {first}"
    )


def _check_field_counts(uri: str, data: bytes, separator: str) -> None:
    """Refuse the first line whose field count differs from the header's."""
    import csv

    text = io.StringIO(data.decode("utf-8", errors="replace"), newline="")
    reader = csv.reader(text, delimiter=separator)
    header = next(reader, [])
    for row in reader:
        if row and len(row) != len(header):
            raise InputError(
                f"{uri}, line {reader.line_num}: {len(row)} fields, the header has "
                f"{len(header)}; expected one field per column (a line cut short, or "
                "the wrong separator?)"
            )


def _check_quotes(uri: str, data: bytes, separator: str) -> None:
    """Refuse a stray quote character, naming its line.

    Sensor rows never need a quoted field that runs over several lines, and a stray
    quote makes one: the lines up to the next quote, or the rest of the file, would
    become one field. A quote inside an unquoted field (``m"1``) is refused too; a
    field wholly in quotes, with inner quotes doubled, is read as CSV defines it.
    Runs only when the file holds a quote character.
    """
    import csv

    if b'"' not in data:
        return
    text = data.decode("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
    lines: list[str] = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:
            closes = "expected after" in str(exc)  # else: the data ends inside it
            if closes and reader.line_num == start:
                raise InputError(
                    f"{uri}, line {reader.line_num}: a quoted field has more text "
                    "after its closing quote; expected a value wholly in quotes (a "
                    "stray quote character?)"
                ) from None
            if closes:
                raise InputError(
                    f"{uri}, line {start}: a quoted field opens here and runs to "
                    f"line {reader.line_num}; expected each row on one line (a stray "
                    "quote character?)"
                ) from None
            raise InputError(
                f"{uri}, line {start}: a quoted field opens here and never closes; "
                "expected each row on one line (a stray quote character?)"
            ) from None
        if row is None:
            return
        if reader.line_num > start:
            raise InputError(
                f"{uri}, line {start}: a quoted field opens here and runs to line "
                f"{reader.line_num}; expected each row on one line (a stray quote "
                "character?)"
            )
        quoted = [field for field in row if '"' in field]
        if not quoted:
            continue
        lines = lines or text.split("\n")
        raw = lines[start - 1]
        for field in quoted:
            if '"' + field.replace('"', '""') + '"' not in raw:
                raise InputError(
                    f"{uri}, line {start}: the field {field[:60]!r} holds a quote "
                    "character; expected plain values, or values wholly in quotes "
                    "with inner quotes doubled"
                )


def sniff_separator(data: bytes) -> str:
    """Pick the separator that splits the header line into the most columns."""
    header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return max(_SEPARATORS, key=header.count)


def choose_separator(uri: str, data: bytes, sep: str | None) -> str:
    """``sep``, or the one the header line suggests; ``data`` may be the file's head.

    Raises:
        InputError: ``sep`` does not occur in the header line while another
            separator does (it would read the whole line as one column).
    """
    sniffed = sniff_separator(data)
    if sep is None:
        return sniffed
    header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    if sep not in header and sniffed in header:
        raise InputError(
            f"{uri}, line 1: the header holds no {sep!r} (the sep setting) but "
            f"{header.count(sniffed)} {sniffed!r}; expected columns separated by "
            f"{sep!r} (set sep to {sniffed!r}, or leave it unset to detect it)"
        )
    return sep


def parquet_rows(path: str) -> int:
    return int(pl.scan_parquet(path).select(pl.len()).collect().item())


def csv_rows(path: str) -> int:
    return int(pl.scan_csv(path).select(pl.len()).collect().item())


def writer(uri: str) -> Callable[[pl.DataFrame, str], None]:
    def csv(df: pl.DataFrame, path: str, sep: str, gz: bool) -> None:
        if not gz:
            df.write_csv(path, separator=sep)
            return
        # No name and no time in the gzip header: equal tables give equal bytes.
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh,
        ):
            df.write_csv(fh, separator=sep)

    writers: dict[str, Callable[[pl.DataFrame, str], None]] = {
        ".parquet": lambda df, p: df.write_parquet(p, statistics=True),
        ".csv.gz": lambda df, p: csv(df, p, ",", True),
        ".tsv.gz": lambda df, p: csv(df, p, "\t", True),
        ".csv": lambda df, p: csv(df, p, ",", False),
        ".txt": lambda df, p: csv(df, p, ",", False),
        ".tsv": lambda df, p: csv(df, p, "\t", False),
    }
    for suffix, writer in writers.items():
        if uri.endswith(suffix):
            return writer
    raise StorageError(
        f"cannot write table {uri}: expected a name ending in {', '.join(writers)}"
    )
