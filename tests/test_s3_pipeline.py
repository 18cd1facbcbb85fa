"""The whole job and single stages with every location on S3 (a moto server),
compared with the same job on a local folder; and the CLI's one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from sagewatch import _s3, storage
from sagewatch.cli import main
from sagewatch.pipeline import stage_generate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n-samples", "300", "--n-machines", "2", "--epochs", "3"]
FAKE_SECRET = "fake-secret-7Qz3xK9w"
FAKE_TOKEN = "fake-session-token-Lm4pR8"


def _sagewatch(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``, by key relative to it."""
    keys = _s3.keys(f"s3://{bucket}/{prefix}")
    return {k[len(prefix) :]: storage.read_bytes(f"s3://{bucket}/{k}") for k in keys}


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def raw_on_s3(tmp_path: Path, s3_bucket: str, small_settings) -> tuple[Path, str]:
    """A small synthetic raw folder, locally and uploaded to ``s3://bucket/raw/``."""
    settings = small_settings.with_overrides({"n_samples": 300})
    local = tmp_path / "raw"
    stage_generate(settings, str(local))
    storage.upload_dir(local, f"s3://{s3_bucket}/raw")
    return local, f"s3://{s3_bucket}/raw/"


def test_run_on_s3_writes_every_output_and_matches_local(
    tmp_path: Path, s3_bucket: str, raw_on_s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_raw, raw_uri = raw_on_s3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
    config = str(ROOT / "config.yaml")
    run_uri = f"s3://{s3_bucket}/run1"

    on_s3 = _sagewatch(
        "-v",
        "run",
        "--config",
        config,
        "--input",
        raw_uri,
        "--data-dir",
        run_uri,
        *SMALL,
    )
    local = _sagewatch(
        "run",
        "--config",
        config,
        "--input",
        str(local_raw),
        "--data-dir",
        str(tmp_path / "run1"),
        *SMALL,
    )

    assert on_s3.exit_code == 0, on_s3.output
    assert local.exit_code == 0, local.output
    remote = _objects(s3_bucket, "run1/")
    here = _files(tmp_path / "run1")
    assert sorted(remote) == sorted(here)
    assert remote["scores/anomaly_scores.csv"] == here["scores/anomaly_scores.csv"]
    assert remote["scores/anomaly_scores.csv"].count(b"\n") == 601
    manifest = json.loads(remote["run_manifest.json"])
    outputs = [o for s in manifest["stages"] for o in s["outputs"]]
    assert len(outputs) == len(remote) - 1  # everything but the manifest itself
    for out in outputs:
        data = remote[out["uri"][len(run_uri) + 1 :]]
        assert (out["bytes"], out["sha256"]) == (
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    features_inputs = manifest["stages"][0]["inputs"]
    assert [(i["uri"], i["rows"]) for i in features_inputs] == [
        (f"{raw_uri}sensor_data-machine_{n}.csv", 300) for n in ("001", "002")
    ]
    raw_bytes = (local_raw / "sensor_data-machine_001.csv").read_bytes()
    assert features_inputs[0]["sha256"] == hashlib.sha256(raw_bytes).hexdigest()
    assert manifest["s3_endpoint"].startswith("http://127.0.0.1:")
    assert "DEBUG" in on_s3.output  # -v really logged every read and write
    everything = on_s3.output + json.dumps(manifest)
    everything += "".join(d.decode("utf-8", "replace") for d in remote.values())
    for secret in (FAKE_SECRET, FAKE_TOKEN):
        assert secret not in everything


def test_single_stages_read_and_write_s3(
    tmp_path: Path, s3_bucket: str, raw_on_s3
) -> None:
    _, raw_uri = raw_on_s3
    base = f"s3://{s3_bucket}"
    config = str(ROOT / "config.yaml")

    features, model = f"{base}/features", f"{base}/model"
    steps = [
        ["features", "--input", raw_uri, "--output-dir", features],
        ["train", "--input", f"{features}/", "--model-dir", model, "--epochs", "2"],
        [
            "score",
            *("--input", f"{features}/*.parquet", "--model-dir", model),
            *("--output-dir", f"{base}/scores"),
        ],
        [
            "evaluate",
            *("--input", f"{base}/scores/anomaly_scores.parquet"),
            *("--output-dir", f"{base}/evaluation"),
        ],
    ]
    for step in steps:
        result = _sagewatch(step[0], "--config", config, *step[1:])
        assert result.exit_code == 0, result.output

    assert sorted(_objects(s3_bucket, "")) == sorted(
        [f"raw/sensor_data-machine_00{n}.csv" for n in (1, 2)]
        + [f"features/features-machine_00{n}.parquet" for n in (1, 2)]
        + ["model/detector.json", "model/weights.pt"]
        + ["scores/anomaly_scores.csv", "scores/anomaly_scores.parquet"]
        + ["evaluation/evaluation_report.json", "evaluation/evaluation_report.html"]
        + [
            "features/features_manifest.json",
            "model/train_manifest.json",
            "scores/score_manifest.json",
            "evaluation/evaluate_manifest.json",
        ]
    )
    report = storage.read_json(f"{base}/evaluation/evaluation_report.json")
    assert report["rows"] == 600
    for manifest in ("features/features_manifest.json", "model/train_manifest.json"):
        recorded = storage.read_json(f"{base}/{manifest}")
        assert recorded["s3_endpoint"].startswith("http://127.0.0.1:"), manifest


# ----------------------------------------------------------------------------- errors


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 4, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.output


def test_cli_missing_bucket(tmp_path: Path, s3_bucket: str) -> None:
    result = _sagewatch(
        "run", "--input", "s3://no-such-bucket-cli/raw/", "--data-dir", str(tmp_path)
    )
    _assert_one_line_error(
        result,
        "cannot list s3://no-such-bucket-cli/raw/",
        "bucket 'no-such-bucket-cli' does not exist",
        "check the bucket name and the endpoint",
    )


def test_cli_missing_output_bucket(tmp_path: Path, raw_on_s3) -> None:
    local_raw, _ = raw_on_s3
    result = _sagewatch(
        "run", "--input", str(local_raw), "--data-dir", "s3://no-such-bucket-out/run"
    )
    _assert_one_line_error(
        result,
        "error: cannot write s3://no-such-bucket-out/run/: bucket "
        "'no-such-bucket-out' does not exist at http://127.0.0.1:",
    )
    # Found before any feature was computed: no staged upload to name or clean up.
    assert not [line for line in result.output.splitlines() if " sagewatch." in line]


@pytest.mark.parametrize(
    "command", ["generate", "features", "train", "score", "evaluate"]
)
def test_a_missing_output_bucket_is_refused_before_the_work(
    tmp_path: Path, s3_bucket: str, command: str
) -> None:
    local = tmp_path / "local"
    done = _sagewatch("-q", "run", "--data-dir", str(local), *SMALL)
    assert done.exit_code == 0, done.output
    out = "s3://no-such-bucket-early/out"
    args = {
        "generate": ["--output-dir", out, *SMALL[:4]],
        "features": ["--input", str(local / "raw"), "--output-dir", out],
        "train": ["--input", str(local / "features"), "--model-dir", out],
        "score": [
            *("--input", str(local / "features")),
            *("--model-dir", str(local / "model"), "--output-dir", out),
        ],
        "evaluate": ["--input", str(local / "scores"), "--output-dir", out],
    }[command]

    result = _sagewatch(command, *args)

    _assert_one_line_error(
        result,
        f"error: cannot write {out}/: bucket 'no-such-bucket-early' does not exist",
    )
    assert not [line for line in result.output.splitlines() if " sagewatch." in line]


def test_cli_missing_key_and_empty_prefix(tmp_path: Path, s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/raw/readme.md", b"no tables")

    for uri in (f"s3://{s3_bucket}/raw/missing.csv", f"s3://{s3_bucket}/raw/"):
        result = _sagewatch("run", "--input", uri, "--data-dir", str(tmp_path))
        _assert_one_line_error(
            result, f"no input files at {uri} ", "check the path, prefix or glob"
        )


def test_cli_access_denied_on_read_and_write(
    tmp_path: Path, raw_on_s3, s3_denied: str
) -> None:
    local_raw, raw_uri = raw_on_s3
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    read = _sagewatch("run", "--input", raw_uri, "--data-dir", str(tmp_path))
    write = _sagewatch(
        "run", "--input", str(local_raw), "--data-dir", f"s3://{s3_denied}/run"
    )

    _assert_one_line_error(
        read,
        f"cannot read {raw_uri}sensor_data-machine_001.csv: access denied",
        "check that the credentials in use",
    )
    _assert_one_line_error(
        write,
        f"cannot write s3://{s3_denied}/run/features/",
        "access denied",
    )
    assert secret not in read.output + write.output
    error = next(line for line in write.output.splitlines() if line.startswith("error"))
    assert ".incoming" not in error  # the file asked for, not its stage


def test_cli_unreachable_endpoint(tmp_path: Path, monkeypatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)

    result = _sagewatch("run", "--input", "s3://data/raw/", "--data-dir", str(tmp_path))
    verbose = _sagewatch(
        "-v", "run", "--input", "s3://data/raw/", "--data-dir", str(tmp_path)
    )

    _assert_one_line_error(
        result,
        f"the endpoint http://127.0.0.1:{port} is unreachable",
        "check AWS_ENDPOINT_URL",
    )
    assert verbose.exit_code == 4
    assert "Traceback" in verbose.output
    assert "EndpointConnectionError" in verbose.output
    assert FAKE_SECRET not in result.output + verbose.output


def test_cli_endpoint_that_never_answers(tmp_path: Path, monkeypatch) -> None:
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(
        target=lambda: accepted.append(listener.accept()[0]), daemon=True
    )
    thread.start()
    port = listener.getsockname()[1]
    monkeypatch.setattr(_s3, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    try:
        result = _sagewatch(
            "run", "--input", "s3://data/raw/", "--data-dir", str(tmp_path)
        )
    finally:
        for sock in (*accepted, listener):
            sock.close()

    _assert_one_line_error(
        result,
        f"cannot list s3://data/raw/: the endpoint http://127.0.0.1:{port} took the "
        "connection but sent no answer within 0.5 s, on every attempt",
        "check that the store is healthy",
    )


def test_cli_verbose_output_hides_the_endpoint_user_and_password(
    tmp_path: Path, monkeypatch
) -> None:
    user, password = "sw-user-K2p9", "sw-pass-V7m4"
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{user}:{password}@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)

    verbose = _sagewatch(
        "-v", "run", "--input", "s3://data/raw/", "--data-dir", str(tmp_path)
    )

    assert verbose.exit_code == 4
    # botocore's own message, quoting the URL it could not reach, is in the trace.
    assert f'endpoint URL: "http://127.0.0.1:{port}/data?' in verbose.output
    assert "Traceback" in verbose.output
    assert user not in verbose.output
    assert password not in verbose.output


def _refuse(monkeypatch: pytest.MonkeyPatch, name: str, action: str) -> None:
    """Make ``_s3.upload`` or ``_s3.copy`` fail for keys whose file name holds
    ``name``, as a store that refuses those keys would."""
    real = getattr(_s3, action)

    def refused(source: str, uri: str, **options: int) -> None:
        if name in uri.rsplit("/", 1)[-1]:
            raise storage.AccessDeniedError(f"cannot write {uri}: access denied")
        real(source, uri, **options)

    monkeypatch.setattr(_s3, action, refused)


def test_a_stage_whose_upload_fails_leaves_its_previous_output_whole(
    s3_bucket: str, raw_on_s3, small_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sagewatch.pipeline import stage_features, stage_score, stage_train

    _, raw_uri = raw_on_s3
    base = f"s3://{s3_bucket}/run"
    settings = small_settings.with_overrides({"rolling_window": 5})
    stage_features(settings, raw_uri, f"{base}/features")
    stage_train(settings, f"{base}/features", f"{base}/model")
    stage_score(settings, f"{base}/features", f"{base}/model", f"{base}/scores")
    before = _objects(s3_bucket, "run/")
    other = small_settings.with_overrides({"rolling_window": 6, "detector": "pca"})

    _refuse(monkeypatch, "machine_002", "upload")
    with pytest.raises(storage.AccessDeniedError):
        stage_features(other, raw_uri, f"{base}/features")
    _refuse(monkeypatch, "detector.json", "upload")
    with pytest.raises(storage.AccessDeniedError):
        stage_train(other, f"{base}/features", f"{base}/model")
    _refuse(monkeypatch, "anomaly_scores.parquet", "upload")
    with pytest.raises(storage.AccessDeniedError):
        stage_score(other, f"{base}/features", f"{base}/model", f"{base}/scores")

    assert _objects(s3_bucket, "run/") == before  # no upload left behind either


def test_a_copy_failing_part_way_names_the_files_already_replaced(
    s3_bucket: str, raw_on_s3, small_settings, monkeypatch, caplog
) -> None:
    from sagewatch.pipeline import stage_features

    _, raw_uri = raw_on_s3
    out = f"s3://{s3_bucket}/features"
    stage_features(small_settings, raw_uri, out)
    _refuse(monkeypatch, "machine_002", "copy")

    with pytest.raises(storage.AccessDeniedError):
        stage_features(
            small_settings.with_overrides({"rolling_window": 6}), raw_uri, out
        )

    assert "1 of 2 new files were put in place before the failure" in caplog.text
    assert "features-machine_001.parquet" in caplog.text
    assert sorted(_objects(s3_bucket, "features/")) == [
        "features-machine_001.parquet",
        "features-machine_002.parquet",
    ]
