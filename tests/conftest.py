"""Shared fixtures: small settings, the real data folder, logging quiet."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagewatch.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the caller's sagewatch variables or AWS endpoint."""
    from sagewatch.config import ENV_VARS

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def small_settings() -> Settings:
    """Fast settings: 2 machines x 400 rows, 5 epochs."""
    return load_settings(
        ROOT / "config.yaml",
        environ={},
        overrides={"n_samples": 400, "n_machines": 2, "epochs": 5},
    )


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def moto_server():
    """A moto server (S3, SageMaker, ...) on 127.0.0.1 at a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the moto server; the environment points at it.

    Returns the bucket's name. Credentials are fake and the endpoint is loopback.
    """
    import uuid

    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"sagewatch-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_denied(s3_bucket: str, moto_server: str, monkeypatch: pytest.MonkeyPatch):
    """Switch the environment to credentials that may list the bucket, nothing else.

    An IAM user with an explicit Deny on reads and writes is created, then the moto
    server is told to check every request's signature and policy (its
    ``/moto-api/reset-auth`` switch) until the test ends. Yields the bucket's name.
    """
    import json
    from urllib.request import Request, urlopen

    import boto3

    iam = boto3.client("iam", endpoint_url=moto_server)
    user = f"reader-{s3_bucket[-8:]}"
    iam.create_user(UserName=user)
    statements = [
        # AWS authorises listing as s3:ListBucket; moto 5.2 checks the operation
        # name s3:ListObjectsV2 instead, so the policy allows both.
        {
            "Effect": "Allow",
            "Action": ["s3:ListBucket", "s3:ListObjectsV2"],
            "Resource": "*",
        },
        {"Effect": "Deny", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "*"},
    ]
    iam.put_user_policy(
        UserName=user,
        PolicyName="list-only",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN")

    def check_requests(after: bytes) -> None:
        switch = f"{moto_server}/moto-api/reset-auth"
        headers = {"Content-Type": "text/plain"}
        urlopen(Request(switch, data=after, headers=headers), timeout=10).close()

    check_requests(b"0")
    try:
        yield s3_bucket
    finally:
        check_requests(b"inf")
