"""Expand a file, a folder (or S3 prefix) or a glob into the files it names.

Private to :mod:`sagewatch.storage`. A glob's ``*`` and ``?`` stay within one folder
level and ``**`` spans levels, on local disks and S3 alike; hidden files and temporary
names (``.tmp-``) are skipped and results are sorted. An empty list means nothing
matched; :func:`sagewatch.storage.list_files` turns that into an error.
"""

from __future__ import annotations

import glob as globlib
import re
from pathlib import Path

from sagewatch import _s3


def _visible(name: str, suffixes: tuple[str, ...], below: str | None = None) -> bool:
    """A table file to list: ``name`` ends in a suffix, and neither its own name
    nor a folder between ``below`` and it is hidden or temporary (a stage's
    uploads wait in a hidden folder until they are copied into place)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith(".") or ".tmp-" in base or not base.endswith(suffixes):
        return False
    if below is None:  # a local glob: its wildcards skip hidden folders already
        return True
    inner = name.removeprefix(below)
    return not any(part.startswith(".") for part in inner.split("/")[:-1])


def is_glob(text: str) -> bool:
    """Whether ``text`` holds a wildcard (``*``, ``?`` or ``[``)."""
    return any(ch in text for ch in "*?[")


def local(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    if is_glob(uri):
        return sorted(
            p
            for p in globlib.glob(uri, recursive=True)
            if Path(p).is_file() and _visible(p, suffixes)
        )
    path = Path(uri)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file()
            and _visible(p.relative_to(path).as_posix(), suffixes, below="")
        )
    return []


def s3(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    bucket, key = _s3.split(uri)
    if is_glob(key):
        prefix = re.split(r"[*?\[]", key, maxsplit=1)[0]
        pattern = _glob_regex(key)
        keys = _s3.keys(f"s3://{bucket}/{prefix}")
        below = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        return [
            f"s3://{bucket}/{k}"
            for k in keys
            if pattern.fullmatch(k) and _visible(k, suffixes, below)
        ]
    keys = _s3.keys(uri)
    if key in keys and not key.endswith("/"):  # "raw/" may be a folder marker
        return [uri]
    folder = key.rstrip("/") + "/" if key else ""
    return [
        f"s3://{bucket}/{k}"
        for k in keys
        if k.startswith(folder) and _visible(k, suffixes, folder)
    ]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A shell glob as a regular expression over ``/``-separated keys."""
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]+\])", pattern)
    parts = []
    for token in tokens:
        if token == "**/":
            parts.append("(?:.*/)?")
        elif token == "**":
            parts.append(".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        elif token.startswith("[") and len(token) > 2:
            body = token[1:-1]
            body = "^" + body[1:] if body.startswith("!") else body
            parts.append(f"[{body}]")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))
