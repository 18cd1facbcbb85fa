"""The ``sagewatch`` command line: the main command and the stage commands.

The ``sagemaker`` group is in :mod:`sagewatch.cli_sagemaker`, what the commands
share in :mod:`sagewatch.cli_options`; these three modules are the only ones that
print.

Settings resolve as ``config.yaml`` < environment variables < the flags given here.
Expected failures (bad input, missing files, bad settings) print one line and exit
non-zero; ``-v`` adds the traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

from sagewatch import __version__
from sagewatch.cli_options import (
    State,
    config_option,
    handle_errors,
    input_options,
    overrides,
    reference_options,
    seed_option,
    settings_from,
)
from sagewatch.cli_sagemaker import sagemaker_group
from sagewatch.config import Settings

# The "user:password@" of a URL such as an endpoint given as http://user:pw@host.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/\"'<>]*@")


class _RedactingFormatter(logging.Formatter):
    """The usual format, with the user and password part of every URL dropped.

    Applied to the whole text, so it also covers the traceback ``-v`` adds, where
    botocore quotes the endpoint URL in full.
    """

    def format(self, record: logging.LogRecord) -> str:
        return _USERINFO.sub(r"\1", super().format(record))


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _progress() -> bool:
    return State.verbosity >= 0 and sys.stderr.isatty()


def _stage_manifest(settings: Settings, record: Any, output_dir: str) -> None:
    """Leave ``<stage>_manifest.json`` beside a single stage's outputs."""
    from datetime import UTC, datetime, timedelta

    from sagewatch import storage
    from sagewatch.manifest import store_info, write_manifest

    started = datetime.now(UTC) - timedelta(seconds=record.seconds)
    uri = storage.join(output_dir, f"{record.name}_manifest.json")
    touched = [f["uri"] for f in record.inputs + record.outputs]
    extra = store_info(output_dir, *touched)
    write_manifest(uri, settings, [record], started=started, extra=extra)


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
    State.verbosity = -1 if quiet else verbose
    _setup_logging(State.verbosity)


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
@handle_errors
def run(
    input_uri: str | None, data_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Run every stage: ingest, features, train, score, evaluate."""
    from sagewatch.pipeline import run as run_pipeline

    settings = settings_from(config, **overrides(kwargs))
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
        from sagewatch.evaluation import METRIC_KEYS

        for key in METRIC_KEYS[:-1]:  # all but the delay, which is in rows
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
@click.option(
    "--output-dir",
    default="data/raw",
    show_default=True,
    help="Folder or s3:// prefix for one CSV per machine.",
)
@config_option
@click.option("--n-samples", type=int, default=None, help="Rows per machine.")
@click.option("--n-machines", type=int, default=None, help="Number of machines.")
@seed_option
@handle_errors
def generate_cmd(output_dir: str, config: str | None, **kwargs: Any) -> None:
    """Write a synthetic data set with labelled anomalies."""
    from sagewatch.pipeline import stage_generate

    settings = settings_from(config, **overrides(kwargs))
    uri, record = stage_generate(settings, output_dir)
    _stage_manifest(settings, record, output_dir)
    click.echo(f"wrote {record.rows_out} rows to {uri}")


@main.command("features")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Raw data: file, folder, glob or s3:// URI.",
)
@click.option(
    "--output-dir",
    default="data/features",
    show_default=True,
    help="Folder or s3:// prefix for one Parquet file per entity.",
)
@config_option
@input_options
@handle_errors
def features_cmd(
    input_uri: str, output_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Validate raw data and compute rolling features."""
    from sagewatch.pipeline import stage_features

    settings = settings_from(config, **overrides(kwargs))
    _, record = stage_features(settings, input_uri, output_dir)
    _stage_manifest(settings, record, output_dir)
    click.echo(
        f"wrote {record.rows_out} feature rows in {len(record.outputs)} file(s) "
        f"under {output_dir}"
    )


@main.command("train")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Features: Parquet file, folder or glob, local or s3://.",
)
@click.option(
    "--model-dir",
    default="data/model",
    show_default=True,
    help="Folder or s3:// prefix to save the detector to.",
)
@config_option
@seed_option
@reference_options
@handle_errors
def train_cmd(
    input_uri: str, model_dir: str, config: str | None, **kwargs: Any
) -> None:
    """Fit a detector on the reference period of a features table."""
    from sagewatch.pipeline import stage_train

    settings = settings_from(config, **overrides(kwargs))
    detector, record = stage_train(settings, input_uri, model_dir, progress=_progress())
    _stage_manifest(settings, record, model_dir)
    sample = record.details["sample"]
    click.echo(
        f"fitted on {record.details['reference_rows']} reference rows "
        f"({sample['training']['used']} training samples of "
        f"{record.rows_out} training rows); threshold "
        f"{detector.threshold_:.6g} from {sample['calibration']['used']} rows; "
        f"saved to {model_dir}"
    )


@main.command("score")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Features: Parquet file, folder or glob, local or s3://.",
)
@click.option(
    "--model-dir",
    default="data/model",
    show_default=True,
    help="Folder or s3:// prefix of a detector saved by train.",
)
@click.option(
    "--output-dir",
    default="data/scores",
    show_default=True,
    help="Folder or s3:// prefix for anomaly_scores.csv and .parquet.",
)
@config_option
@handle_errors
def score_cmd(
    input_uri: str, model_dir: str, output_dir: str, config: str | None
) -> None:
    """Score a features table with a saved detector."""
    from sagewatch.pipeline import stage_score

    settings = settings_from(config)
    _, record = stage_score(
        settings, input_uri, model_dir, output_dir, progress=_progress()
    )
    _stage_manifest(settings, record, output_dir)
    click.echo(
        f"scored {record.rows_out} rows, {record.details['flagged']} flagged "
        "(reference period included); "
        f"wrote {record.outputs[0]['uri']}"
    )


@main.command("evaluate")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Scores: anomaly_scores.csv or .parquet, a folder or glob of parts; "
    "local or s3://.",
)
@click.option(
    "--output-dir",
    default="data/evaluation",
    show_default=True,
    help="Folder or s3:// prefix for the JSON and HTML report.",
)
@click.option("--top-n", type=int, default=None, help="Rows in the top-scores table.")
@click.option(
    "--percentiles",
    default=None,
    help="Comma-separated score percentiles, e.g. 50,90,95,99.",
)
@config_option
@handle_errors
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
    settings = settings_from(config, top_n=top_n, percentiles=parsed)
    report, record = stage_evaluate(settings, input_uri, output_dir)
    _stage_manifest(settings, record, output_dir)
    click.echo(
        f"{report['anomalies']} of {report['evaluated_rows']} evaluated rows flagged"
        f"{_left_out(report)}; "
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


main.add_command(sagemaker_group)


if __name__ == "__main__":  # pragma: no cover
    main()


def _left_out(report: dict[str, Any]) -> str:
    """What the evaluated rows leave out, for the summary line."""
    if report["evaluated_rows"] == report["rows"]:
        return ""
    return f" ({report['rows'] - report['evaluated_rows']} reference rows left out)"
