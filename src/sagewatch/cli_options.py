"""What the command line's commands share: options, settings and error handling.

Part of the command line (:mod:`sagewatch.cli`), so it may print: an expected
failure prints one line and exits non-zero; ``-v`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from sagewatch.config import Settings, load_settings
from sagewatch.errors import SagewatchError

log = logging.getLogger("sagewatch")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class State:
    """The verbosity the main command was given (-1 quiet, 0 default, 1+ verbose)."""

    verbosity = 0


class _Terminated(BaseException):
    """SIGTERM, raised where the command is, so it unwinds as Ctrl-C does."""


def _terminate(signum: int, frame: Any) -> None:
    # Raised wherever the program is, as Ctrl-C is; should that be somewhere it
    # cannot unwind from (inside an import), a second SIGTERM ends it outright.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise _Terminated


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn sagewatch's errors, Ctrl-C and SIGTERM into one line on stderr and an
    exit code.

    SIGTERM (sent by ``timeout``, ``docker stop``, a cancelled CI job) unwinds the
    command like Ctrl-C, so a stage's temporary files and uploads are removed.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return func(*args, **kwargs)
        except _Terminated:
            click.echo("terminated", err=True)
            sys.exit(143)
        except SagewatchError as exc:
            if State.verbosity > 0:
                log.exception("failed")
            lines = [line.strip() for line in str(exc).splitlines()]
            click.echo(f"error: {' '.join(line for line in lines if line)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def settings_from(config: str | None, **flags: Any) -> Settings:
    """Settings from the file, the environment and then the flags given."""
    return load_settings(config, overrides=flags)


def options(*decorators: Decorator) -> Decorator:
    """The decorators as one, applied in the order listed (the order of --help)."""

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="Settings file (default: ./config.yaml when present).",
)
seed_option = click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed for data generation, sampling and weights.",
)

# Column mapping and reading options shared by commands that read raw data.
input_options = options(
    click.option(
        "--timestamp-column",
        default=None,
        help="Timestamp column (default timestamp).",
    ),
    click.option(
        "--timezone",
        default=None,
        help="Zone of timestamps without a UTC offset (default UTC).",
    ),
    click.option(
        "--timestamp-format",
        default=None,
        help="strftime layout of non-ISO timestamps, e.g. '%d/%m/%Y %H:%M'.",
    ),
    click.option(
        "--entity-column",
        default=None,
        help="Entity column (default machine_id; absent = one entity per file).",
    ),
    click.option(
        "--label-column",
        default=None,
        help="0/1 label column, used only for evaluation (default anomaly).",
    ),
    click.option(
        "--sensor-columns",
        default=None,
        help="Comma-separated sensor columns (default: every numeric column).",
    ),
    click.option(
        "--sep",
        default=None,
        help="CSV separator, one character; \\t or tab for a tab "
        "(default: guessed from the header).",
    ),
    click.option(
        "--label-windows",
        default=None,
        help="JSON of labelled [start, end] windows, e.g. NAB's.",
    ),
    click.option(
        "--rolling-window", type=int, default=None, help="Rows per rolling window."
    ),
)

reference_options = options(
    click.option(
        "--train-rows",
        type=int,
        default=None,
        help="Reference period: first N rows of each entity.",
    ),
    click.option(
        "--train-until",
        default=None,
        help="Reference period: rows up to this timestamp.",
    ),
    click.option(
        "--train-fraction",
        type=float,
        default=None,
        help="Reference period: first share of each entity (default 0.5).",
    ),
    click.option(
        "--epochs",
        type=int,
        default=None,
        help="Most training epochs; early stopping may end sooner (default 60).",
    ),
    click.option(
        "--batch-size",
        type=int,
        default=None,
        help="Training sequences per optimiser step (default 128).",
    ),
    click.option(
        "--encoding-dim",
        type=int,
        default=None,
        help="Width of the autoencoder's code (default: half the features).",
    ),
    click.option(
        "--detector",
        type=click.Choice(["autoencoder", "pca", "iforest"]),
        default=None,
        help="Detector to fit (default autoencoder).",
    ),
)


def overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """CLI keyword arguments -> flat setting overrides.

    Raises:
        ConfigError: more than one reference period rule is given.
    """
    from sagewatch.errors import ConfigError

    out = dict(kwargs)
    rules = [
        k
        for k in ("train_rows", "train_until", "train_fraction")
        if out.get(k) is not None
    ]
    if len(rules) > 1:
        given = " and ".join("--" + r.replace("_", "-") for r in rules)
        raise ConfigError(f"{given} both given; choose one reference period rule")
    if out.get("sensor_columns") is not None:
        given = out["sensor_columns"]
        out["sensor_columns"] = [c.strip() for c in given.split(",") if c.strip()]
        if not out["sensor_columns"]:
            raise ConfigError(
                f"--sensor-columns {given!r} names no column; expected column names "
                "separated by commas (leave the option out for every numeric column)"
            )
    return out
