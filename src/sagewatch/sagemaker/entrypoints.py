"""What runs inside the SageMaker job containers (and locally, on the same paths).

``python -m sagewatch.sagemaker.entrypoints <stage>`` with ``stage`` one of
``features``, ``train``, ``score`` or ``evaluate``. Every path is an option whose
default is the SageMaker container contract (see :mod:`.contract`), mapped under
``SAGEMAKER_BASE_DIR`` when that is set. Each stage calls the same ``stage_*``
function as ``sagewatch run``; nothing here computes anything itself.

Settings: the built-in defaults (or ``--config``), then the environment variables
``load_settings`` reads, then overrides. Processing jobs pass overrides as
``--set key=value`` arguments (values are JSON, or plain text); the training job takes
them from its hyperparameters (``SM_HPS`` when the toolkit runs it, else
``hyperparameters.json``) and from ``--key value`` arguments. Values are parsed
against the declared types, unknown keys are refused by name, and the toolkit's own
``sagemaker_*`` keys are ignored.

Scale-out: processing instances read ``resourceconfig.json`` for their host name and
suffix every file they write with it, so instances sharing an output prefix never
overwrite each other. With ``ShardedByS3Key`` over per-entity part files, an instance
can receive no file at all when there are more instances than entities; it then
logs a warning and writes nothing.

Failures: the reason goes to ``/opt/ml/output/failure`` in training jobs (SageMaker
reports its first 1024 bytes as ``FailureReason``) and to ``/opt/ml/output/message``
in processing jobs (reported as ``ExitMessage``); the exit status is non-zero.

Notes:
    An entity's raw rows must sit in one input object when ``instance_count > 1``:
    sharding splits by object, and rolling windows never look across instances.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sagewatch import storage
from sagewatch.config import Settings, load_settings
from sagewatch.errors import ArtifactError, InputError, NotFoundError
from sagewatch.sagemaker import contract

log = logging.getLogger(__name__)

METRIC_PREFIX = "epoch="


# ----------------------------------------------------------------------------- settings


def parse_setting_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``["epochs=3", "hidden_dims=[64, 32]"]`` -> ``{"epochs": 3, ...}``.

    A value is read as JSON when it parses (``3``, ``[64, 32]``, ``null``,
    ``"text"``), else kept as text for :meth:`Settings.with_overrides` to parse.

    Raises:
        InputError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = _decode(value)
    return out


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_cli_pairs(args: Sequence[str]) -> dict[str, str]:
    """``["--epochs", "3", "--hidden-dims", "[64, 32]"]`` -> ``{"epochs": "3", ...}``.

    The toolkit passes every hyperparameter this way; dashes in keys become
    underscores. A flag without a value means ``"true"``.

    Raises:
        InputError: an argument that is not ``--key``.
    """
    out: dict[str, str] = {}
    items = list(args)
    while items:
        token = items.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise InputError(f"unexpected argument {token!r}; expected --key value")
        value = "true"
        if items and not items[0].startswith("--"):
            value = items.pop(0)
        out[token[2:].replace("-", "_")] = value
    return out


def read_hyperparameters(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The training job's hyperparameters, without the toolkit's ``sagemaker_*`` keys.

    ``SM_HPS`` (set by the toolkit, values already JSON-decoded) wins; else
    ``hyperparameters.json`` (all values strings, as SageMaker writes it).

    Raises:
        InputError: either source is not a JSON object.
    """
    env = os.environ if environ is None else environ
    source = "SM_HPS"
    if env.get("SM_HPS"):
        raw = env["SM_HPS"]
    else:
        path = contract.local(contract.HYPERPARAMETERS_FILE)
        if not path.is_file():
            return {}
        source, raw = str(path), path.read_text(encoding="utf-8")
    try:
        hps = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(hps, dict):
        raise InputError(f"{source}: expected a JSON object of hyperparameters")
    return {
        k.replace("-", "_"): v for k, v in hps.items() if not k.startswith("sagemaker_")
    }


def resolve_settings(config: str | None, overrides: dict[str, Any]) -> Settings:
    """Defaults (or ``config``) < environment < ``overrides``; None values kept."""
    settings = load_settings(config)
    return settings.with_overrides(overrides) if overrides else settings


# ----------------------------------------------------------------------------- hosts


def current_host(resource_config: str) -> tuple[str, list[str]]:
    """This instance's name and all instances' names, from ``resourceconfig.json``.

    Outside SageMaker (no file) the host is ``local``.
    """
    path = Path(resource_config)
    if not path.is_file():
        return "local", ["local"]
    config = json.loads(path.read_text(encoding="utf-8"))
    host = str(config["current_host"])
    return host, [str(h) for h in config.get("hosts", [host])]


def _has_tables(folder: str) -> bool:
    try:
        storage.list_files(folder)
    except NotFoundError:
        return False
    return True


def _shard_is_empty(folder: str, host: str, hosts: list[str]) -> bool:
    """True when sharding left this instance without input (then it writes nothing).

    Raises:
        NotFoundError: a single instance has no input at all.
    """
    if _has_tables(folder):
        return False
    if len(hosts) > 1:
        log.warning(
            "%s received no input files under %s (%d instances share the input); "
            "writing nothing",
            host,
            folder,
            len(hosts),
        )
        return True
    storage.list_files(folder)  # raises NotFoundError naming the folder
    return False


def publish(staging: Path, output_dir: str, host: str) -> list[str]:
    """Copy each staged file to ``output_dir`` as ``<stem>-<host><suffix>``."""
    written = []
    for path in sorted(p for p in staging.iterdir() if p.is_file()):
        target = storage.join(output_dir, f"{path.stem}-{host}{path.suffix}")
        storage.write_bytes(target, path.read_bytes())
        written.append(target)
    return written


def _write_record(record: Any, output_dir: str, host: str) -> None:
    uri = storage.join(output_dir, f"stage-{record.name}-{host}.json")
    storage.write_json(uri, asdict(record))


# ----------------------------------------------------------------------------- stages


def run_features(args: argparse.Namespace) -> int:
    """Processing: raw part files in, per-entity feature files out (host-suffixed)."""
    from sagewatch.pipeline import stage_features

    settings = resolve_settings(args.config, parse_setting_args(args.set))
    host, hosts = current_host(args.resource_config)
    if _shard_is_empty(args.input, host, hosts):
        return 0
    with tempfile.TemporaryDirectory(prefix="sagewatch-features-") as tmp:
        features, record = stage_features(settings, args.input, tmp)
        written = publish(Path(tmp), args.output, host)
    _write_record(record, args.output, host)
    log.info(
        "%s: %d feature rows from %d raw rows in %d files under %s",
        host,
        features.height,
        record.rows_in or 0,
        len(written),
        args.output,
    )
    return 0


def run_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Training: the ``train`` channel in, the detector out to ``SM_MODEL_DIR``."""
    from sagewatch.pipeline import stage_train

    overrides = {**read_hyperparameters(), **parse_cli_pairs(extra)}
    settings = resolve_settings(args.config, overrides)
    _log_epochs_at_info()
    detector, record = stage_train(settings, args.train, args.model_dir)
    Path(args.output_data_dir).mkdir(parents=True, exist_ok=True)
    _write_record(
        record, args.output_data_dir, os.environ.get("SM_CURRENT_HOST", "local")
    )
    log.info(
        "trained %s on %d rows; threshold %.6g; detector in %s",
        settings.model.detector,
        record.rows_out or 0,
        detector.threshold_,
        args.model_dir,
    )
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Processing: ``model.tar.gz`` and features in, host-suffixed scores out."""
    from sagewatch.pipeline import stage_score

    settings = resolve_settings(args.config, parse_setting_args(args.set))
    host, hosts = current_host(args.resource_config)
    if _shard_is_empty(args.input, host, hosts):
        return 0
    with tempfile.TemporaryDirectory(prefix="sagewatch-score-") as tmp:
        model_dir = unpack_model(args.model, Path(tmp, "model"))
        staging = Path(tmp, "scores")
        scores, record = stage_score(settings, args.input, str(model_dir), str(staging))
        publish(staging, args.output, host)
    _write_record(record, args.output, host)
    log.info(
        "%s: scored %d rows, %d flagged, into %s",
        host,
        scores.height,
        record.details["flagged"],
        args.output,
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Processing (one instance): every host's Parquet scores in, the report out."""
    from sagewatch.pipeline import stage_evaluate

    settings = resolve_settings(args.config, parse_setting_args(args.set))
    host, _ = current_host(args.resource_config)
    scores = os.path.join(args.input, "**", "*.parquet")
    report, record = stage_evaluate(
        settings, scores, args.output, context={"input": args.input}
    )
    _write_record(record, args.output, host)
    log.info(
        "%d of %d rows flagged; report in %s",
        report["anomalies"],
        report["evaluated_rows"],
        args.output,
    )
    return 0


def unpack_model(folder: str, target: Path) -> Path:
    """The detector folder inside ``folder``: ``model.tar.gz`` unpacked, or as is.

    Raises:
        ArtifactError: neither ``model.tar.gz`` nor ``detector.json`` is there.
    """
    archive = Path(folder, contract.MODEL_ARCHIVE)
    if archive.is_file():
        target.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive, mode="r:gz") as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ArtifactError(f"{archive}: cannot unpack: {exc}") from exc
        log.info("unpacked %s", archive)
        return target
    if Path(folder, "detector.json").is_file():
        return Path(folder)
    found = (
        sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []
    )
    raise ArtifactError(
        f"{folder}: expected {contract.MODEL_ARCHIVE} or detector.json, found "
        f"{found or 'nothing'}"
    )


class _EpochLinesAtInfo(logging.Filter):
    """Let the training loop's per-epoch DEBUG lines through as INFO, drop the rest.

    SageMaker metric definitions read ``epoch=E train_loss=X val_loss=Y`` from the
    job log; the training module logs it at DEBUG so local runs stay quiet.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        if str(record.msg).startswith(METRIC_PREFIX):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        return False


def _log_epochs_at_info() -> None:
    training_log = logging.getLogger("sagewatch.training")
    training_log.setLevel(logging.DEBUG)
    if not any(isinstance(f, _EpochLinesAtInfo) for f in training_log.filters):
        training_log.addFilter(_EpochLinesAtInfo())


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = contract.local
    parser = argparse.ArgumentParser(
        prog="python -m sagewatch.sagemaker.entrypoints", allow_abbrev=False
    )
    stages = parser.add_subparsers(dest="stage", required=True)
    paths = {
        "features": (contract.RAW_INPUT, contract.FEATURES_OUTPUT),
        "score": (contract.FEATURES_INPUT, contract.SCORES_OUTPUT),
        "evaluate": (contract.SCORES_INPUT, contract.EVALUATION_OUTPUT),
    }
    for name, (source, target) in paths.items():
        sub = stages.add_parser(name, allow_abbrev=False)
        sub.add_argument("--input", default=str(p(source)))
        sub.add_argument("--output", default=str(p(target)))
        sub.add_argument(
            "--resource-config", default=str(p(contract.PROCESSING_RESOURCE_CONFIG))
        )
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--config", default=None)
        if name == "score":
            sub.add_argument("--model", default=str(p(contract.MODEL_INPUT)))
    train = stages.add_parser("train", allow_abbrev=False)
    env = os.environ
    train.add_argument(
        "--train", default=env.get("SM_CHANNEL_TRAIN", str(p(contract.TRAINING_INPUT)))
    )
    train.add_argument(
        "--model-dir", default=env.get("SM_MODEL_DIR", str(p(contract.MODEL_DIR)))
    )
    train.add_argument(
        "--output-data-dir",
        default=env.get("SM_OUTPUT_DATA_DIR", str(p(contract.OUTPUT_DATA_DIR))),
    )
    train.add_argument("--config", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; on failure write the reason to the failure file, return 1."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.stage == "train":
            return run_train(args, extra)
        if extra:
            raise InputError(f"unexpected arguments {extra}")
        runners = {"features": run_features, "score": run_score}
        return runners.get(args.stage, run_evaluate)(args)
    except Exception as exc:  # every failure must reach SageMaker as a reason
        reason = f"{args.stage} failed: {type(exc).__name__}: {exc}"
        log.error("%s", reason, exc_info=True)
        write_failure(reason, training=args.stage == "train")
        return 1


def write_failure(reason: str, *, training: bool) -> None:
    """Write ``reason`` where SageMaker reads it (its first 1024 bytes)."""
    name = contract.FAILURE_FILE if training else contract.EXIT_MESSAGE_FILE
    path = contract.local(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Cut at 1024 bytes without splitting a character: the file must stay UTF-8.
        text = reason.encode("utf-8")[:1024].decode("utf-8", errors="ignore")
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        log.error("cannot write failure reason to %s: %s", path, exc)


if __name__ == "__main__":
    sys.exit(main())
