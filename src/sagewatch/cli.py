"""The ``sagewatch`` command line: every command, and the only module that prints.

Settings resolve as ``config.yaml`` < environment variables < the flags given here.
Expected failures (bad input, missing files, bad settings) print one line and exit
non-zero; ``-v`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from sagewatch import __version__
from sagewatch.config import Settings, load_settings
from sagewatch.errors import SagewatchError

log = logging.getLogger("sagewatch")


class _State:
    verbosity = 0


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SagewatchError as exc:
            if _State.verbosity > 0:
                log.exception("failed")
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _settings(config: str | None, **flags: Any) -> Settings:
    return load_settings(config, overrides=flags)


def _progress() -> bool:
    return _State.verbosity >= 0 and sys.stderr.isatty()


# ----------------------------------------------------------------------------- options

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


def input_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Column mapping and reading options shared by commands that read raw data."""
    options = [
        click.option(
            "--timestamp-column",
            default=None,
            help="Timestamp column (default timestamp).",
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
            help="CSV separator (default: guessed from the header).",
        ),
        click.option(
            "--label-windows",
            default=None,
            help="JSON of labelled [start, end] windows, e.g. NAB's.",
        ),
        click.option(
            "--rolling-window", type=int, default=None, help="Rows per rolling window."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def reference_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
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
        click.option("--epochs", type=int, default=None),
        click.option("--batch-size", type=int, default=None),
        click.option("--encoding-dim", type=int, default=None),
        click.option(
            "--detector",
            type=click.Choice(["autoencoder", "pca", "iforest"]),
            default=None,
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    """CLI keyword arguments -> flat setting overrides."""
    out = dict(kwargs)
    if out.get("sensor_columns"):
        out["sensor_columns"] = [
            c.strip() for c in out["sensor_columns"].split(",") if c.strip()
        ]
    return out


# ----------------------------------------------------------------------------- commands


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="sagewatch")
@click.option(
    "-v", "--verbose", count=True, help="More logging (-v debug and tracebacks)."
)
@click.option(
    "-q", "--quiet", is_flag=True, help="Warnings and errors only; no progress bars."
)
def main(verbose: int, quiet: bool) -> None:
    """Unsupervised anomaly detection on multivariate sensor time series."""
    _State.verbosity = -1 if quiet else verbose
    _setup_logging(_State.verbosity)


@main.command()
@click.option(
    "--input",
    "input_uri",
    default=None,
    help="Raw data: file, folder, glob or s3:// URI (default: synthetic data).",
)
@click.option(
    "--data-dir",
    default="data",
    show_default=True,
    help="Where every output goes (local or s3://).",
)
@config_option
@click.option("--n-samples", type=int, default=None, help="Synthetic rows per machine.")
@click.option("--n-machines", type=int, default=None, help="Synthetic machines.")
@seed_option
@input_options
@reference_options
@_handle_errors
def run(
    input_uri: str | None, data_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Run every stage: ingest, features, train, score, evaluate."""
    from sagewatch.pipeline import run as run_pipeline

    settings = _settings(config, **_flags(kwargs))
    result = run_pipeline(
        settings, data_dir=data_dir, input_uri=input_uri, progress=_progress()
    )
    _print_summary(result)


def _print_summary(result: Any) -> None:
    click.echo("")
    click.echo("stage      rows in    rows out  seconds")
    for stage in result.stages:
        rows_in = "" if stage.rows_in is None else stage.rows_in
        rows_out = "" if stage.rows_out is None else stage.rows_out
        click.echo(f"{stage.name:<9}{rows_in:>9} {rows_out:>11} {stage.seconds:>8.2f}")
        for reason, count in stage.dropped.items():
            click.echo(f"  dropped {count} rows: {reason}")
    report = result.report
    click.echo("")
    click.echo(f"threshold        {report['threshold']:.6g}")
    rate = report["anomaly_rate"] or 0.0
    click.echo(
        f"flagged          {report['anomalies']} of {report['evaluated_rows']} "
        f"evaluated rows ({100 * rate:.2f} %)"
    )
    metrics = report.get("metrics")
    if metrics:
        for key in (
            "precision",
            "recall",
            "f1",
            "far",
            "mar",
            "pr_auc",
            "roc_auc",
            "event_recall",
        ):
            value = metrics.get(key)
            unit = " %" if key in {"far", "mar"} else ""
            click.echo(
                f"{key:<16} {'undefined' if value is None else f'{value:.4f}{unit}'}"
            )
    click.echo("")
    click.echo(f"outputs under    {result.data_dir}")
    click.echo(f"report           {result.stages[-1].outputs[-1]['uri']}")
    click.echo(f"manifest         {result.manifest_uri}")


@main.command("generate")
@click.option("--output-dir", default="data/raw", show_default=True)
@config_option
@click.option("--n-samples", type=int, default=None)
@click.option("--n-machines", type=int, default=None)
@seed_option
@_handle_errors
def generate_cmd(output_dir: str, config: str | None, **kwargs: Any) -> None:
    """Write a synthetic data set with labelled anomalies."""
    from sagewatch.pipeline import stage_generate

    uri, record = stage_generate(_settings(config, **_flags(kwargs)), output_dir)
    click.echo(f"wrote {record.rows_out} rows to {uri}")


@main.command("features")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Raw data: file, folder, glob or s3:// URI.",
)
@click.option("--output-dir", default="data/features", show_default=True)
@config_option
@input_options
@_handle_errors
def features_cmd(
    input_uri: str, output_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Validate raw data and compute rolling features."""
    from sagewatch.pipeline import stage_features

    _, record = stage_features(
        _settings(config, **_flags(kwargs)), input_uri, output_dir
    )
    click.echo(f"wrote {record.rows_out} feature rows to {record.outputs[0]['uri']}")


@main.command("train")
@click.option(
    "--input", "input_uri", required=True, help="Features (Parquet file or folder)."
)
@click.option("--model-dir", default="data/model", show_default=True)
@config_option
@seed_option
@reference_options
@_handle_errors
def train_cmd(
    input_uri: str, model_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Fit a detector on the reference period of a features table."""
    from sagewatch.pipeline import stage_train

    detector, record = stage_train(
        _settings(config, **_flags(kwargs)), input_uri, model_dir, progress=_progress()
    )
    click.echo(
        f"trained on {record.rows_out} rows; threshold {detector.threshold_:.6g}; "
        f"saved to {model_dir}"
    )


@main.command("score")
@click.option(
    "--input", "input_uri", required=True, help="Features (Parquet file or folder)."
)
@click.option("--model-dir", default="data/model", show_default=True)
@click.option("--output-dir", default="data/scores", show_default=True)
@config_option
@_handle_errors
def score_cmd(
    input_uri: str, model_dir: str, output_dir: str, config: str | None
) -> None:
    """Score a features table with a saved detector."""
    from sagewatch.pipeline import stage_score

    _, record = stage_score(
        _settings(config), input_uri, model_dir, output_dir, progress=_progress()
    )
    click.echo(
        f"scored {record.rows_out} rows, {record.details['flagged']} flagged; "
        f"wrote {record.outputs[0]['uri']}"
    )


@main.command("evaluate")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Scores (anomaly_scores.csv or .parquet).",
)
@click.option("--output-dir", default="data/evaluation", show_default=True)
@click.option("--top-n", type=int, default=None, help="Rows in the top-scores table.")
@click.option(
    "--percentiles",
    default=None,
    help="Comma-separated score percentiles, e.g. 50,90,95,99.",
)
@config_option
@_handle_errors
def evaluate_cmd(
    input_uri: str,
    output_dir: str,
    top_n: int | None,
    percentiles: str | None,
    config: str | None,
) -> None:
    """Write the JSON and HTML report for a scores table."""
    from sagewatch.errors import ConfigError
    from sagewatch.pipeline import stage_evaluate

    parsed = None
    if percentiles:
        try:
            parsed = [float(p) for p in percentiles.split(",")]
        except ValueError as exc:
            raise ConfigError(
                "--percentiles: expected numbers separated by commas, "
                f"got {percentiles!r}"
            ) from exc
    settings = _settings(config, top_n=top_n, percentiles=parsed)
    report, record = stage_evaluate(settings, input_uri, output_dir)
    click.echo(
        f"{report['anomalies']} of {report['evaluated_rows']} rows flagged; "
        f"report at {record.outputs[-1]['uri']}"
    )
    if report.get("metrics"):
        m = report["metrics"]
        click.echo(
            "  ".join(
                f"{k}={'undefined' if m.get(k) is None else format(m[k], '.4f')}"
                for k in ("precision", "recall", "f1", "far", "mar", "pr_auc")
            )
        )


if __name__ == "__main__":  # pragma: no cover
    main()
