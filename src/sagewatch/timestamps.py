"""Timestamps to UTC: ISO 8601 text with per-row offsets, a named layout, local time.

Text is read as ISO 8601 (``2024-01-01``, ``2024-01-01 00:00``, ``...T00:00:00.5``,
each optionally followed by ``Z``, ``+01:00`` or ``+0100``) unless a
``timestamp_format`` is given; day/month order is never guessed. An offset may change
from row to row (a daylight-saving change written with offsets is legal), but either
every timestamp has one or none has. Timestamps without an offset are local time in
``timezone``; a local time that a daylight-saving change makes ambiguous or skips is
refused rather than guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import polars as pl

from sagewatch.errors import InputError

ISO = re.compile(
    r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2})(:\d{2}(?:\.\d{1,9})?)?)?"
    r"(Z|[+-]\d{2}(?::?\d{2})?)?$"
)
ISO_EXAMPLES = "ISO 8601 such as 2024-01-01 00:00:00 or 2024-01-01T00:00:00+01:00"
_EXPECTED_ISO = f"expected {ISO_EXAMPLES} (set timestamp_format for other layouts)"

Locate = Callable[[int], str]


def to_utc(
    values: pl.Series,
    *,
    timezone: str = "UTC",
    timestamp_format: str | None = None,
    locate: Locate = lambda row: f"row {row + 1}",
    expected: str = _EXPECTED_ISO,
) -> pl.Series:
    """Parse a column of timestamps to ``Datetime("us", "UTC")``.

    ``locate(row)`` names where row ``row`` came from, and ``expected`` what an
    unparsable ISO 8601 value should have been, for error messages.

    Raises:
        InputError: a value that cannot be parsed, numbers instead of times, a mix of
            timestamps with and without offsets, or an ambiguous local time.
    """
    if values.dtype in (pl.Datetime, pl.Date):
        if values.null_count():
            raise InputError(
                f"{locate(_first(values.is_null()))}: empty timestamp; expected a "
                "date and time in every row"
            )
        if values.dtype == pl.Date or values.dtype.time_zone is None:  # type: ignore[union-attr]
            return _localise(values.cast(pl.Datetime("us")), timezone, locate)
        return values.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if values.dtype.is_numeric():
        raise InputError(
            f"{locate(0)}: holds numbers ({values[0]!r}); expected date-time text "
            "such as 2024-01-01 00:00:00"
        )
    text = values.cast(pl.String).str.strip_chars()
    if timestamp_format:
        return _parse_format(text, timestamp_format, timezone, locate)
    return _parse_iso(text, timezone, locate, expected)


def _parse_format(text: pl.Series, layout: str, zone: str, locate: Locate) -> pl.Series:
    parsed = text.str.to_datetime(format=layout, strict=False, time_unit="us")
    _refuse_unparsed(text, parsed, f"expected the layout {layout!r}", locate)
    if parsed.dtype.time_zone is None:  # type: ignore[union-attr]
        return _localise(parsed, zone, locate)
    return parsed.dt.convert_time_zone("UTC")


def _parse_iso(text: pl.Series, zone: str, locate: Locate, expected: str) -> pl.Series:
    parts = text.str.extract_groups(ISO.pattern)
    date, hm, sec, offset = (parts.struct.field(f) for f in ("1", "2", "3", "4"))
    local = (date + " " + hm.fill_null("00:00") + sec.fill_null(":00")).str.to_datetime(
        format="%Y-%m-%d %H:%M:%S%.f", strict=False, time_unit="us"
    )
    _refuse_unparsed(text, local, expected, locate)

    has_offset = offset.is_not_null()
    if not has_offset.any():
        return _localise(local, zone, locate)
    if not has_offset.all():
        row = _first(~has_offset)
        raise InputError(
            f"{locate(row)}: {text[row]!r} has no UTC offset while "
            f"{text[_first(has_offset)]!r} has one; expected every timestamp with "
            "an offset or none"
        )
    digits = offset.str.replace("Z", "+00:00").str.replace(":", "")
    sign = pl.when(digits.str.head(1) == "-").then(-1).otherwise(1)
    minutes = pl.select(
        sign
        * (
            digits.str.slice(1, 2).cast(pl.Int64) * 60
            + digits.str.slice(3, 2).cast(pl.Int64, strict=False).fill_null(0)
        )
    ).to_series()
    utc = local.cast(pl.Int64) - minutes * 60_000_000  # microseconds
    return utc.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _refuse_unparsed(
    text: pl.Series, parsed: pl.Series, expected: str, locate: Locate
) -> None:
    bad = parsed.is_null()
    if bad.any():
        row = _first(bad)
        shown = "an empty value" if not text[row] else repr(text[row])
        raise InputError(
            f"{locate(row)}: cannot parse {shown} as a timestamp; {expected}"
        )


def _localise(naive: pl.Series, zone: str, locate: Locate) -> pl.Series:
    """Read naive times as local time in ``zone``; refuse ambiguous or skipped ones."""
    if zone == "UTC":
        return naive.dt.replace_time_zone("UTC")
    local = naive.dt.replace_time_zone(zone, ambiguous="null", non_existent="null")
    bad = local.is_null() & naive.is_not_null()
    if bad.any():
        row = _first(bad)
        raise InputError(
            f"{locate(row)}: local time {naive[row]} is ambiguous or does not exist "
            f"in timezone {zone!r} (a daylight-saving change); expected timestamps "
            "with UTC offsets, or in UTC"
        )
    return local.dt.convert_time_zone("UTC")


def in_windows(
    sources: pl.Series, times: pl.Series, windows: Any, timezone: str = "UTC"
) -> pl.Series:
    """Whether each row lies inside a ``[start, end]`` window of its source file.

    ``windows`` is a list of windows for every file, or a mapping from file name (or
    path; only the last part counts) to that file's windows, as in NAB.

    Raises:
        InputError: a file the mapping does not name, or a malformed window.
    """
    inside = pl.Series("inside", [False] * len(times))
    for path in sources.unique(maintain_order=True).to_list():
        name = re.split(r"[/\\]", str(path))[-1]
        if isinstance(windows, list):
            spans = windows
        else:
            keys = [k for k in windows if re.split(r"[/\\]", k)[-1] == name]
            if not keys:
                raise InputError(
                    f"the label windows name no file called {name!r}; expected a "
                    "key ending in the input file's name"
                )
            spans = windows[keys[0]]
        rows = sources == path
        for span in spans:
            if not isinstance(span, list | tuple) or len(span) != 2:
                raise InputError(
                    f"label window {span!r} for {name!r}: expected [start, end]"
                )
            lo, hi = to_utc(
                pl.Series([str(t) for t in span]),
                timezone=timezone,
                locate=lambda i, s=span, n=name: f"label window {s!r} for {n!r}",
            )
            inside = inside | (rows & (times >= lo) & (times <= hi))
    return inside


def _first(mask: pl.Series) -> int:
    return int(mask.fill_null(True).arg_max() or 0)
