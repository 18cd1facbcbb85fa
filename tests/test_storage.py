"""Storage: tables, JSON, bytes and folders at local paths and on S3 (a moto server),
atomic writes, the read log, and one clear error per failure."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import traceback
from pathlib import Path

import polars as pl
import pytest
from botocore.exceptions import ClientError

from sagewatch import _s3, storage
from sagewatch.errors import (
    AccessDeniedError,
    EndpointError,
    InputError,
    NotFoundError,
    StorageError,
)

FRAME = pl.DataFrame({"machine_id": ["a", "a", "b"], "temp": [1.5, 2.0, -3.25]})


def _keys(bucket: str, prefix: str = "") -> list[str]:
    answer = _s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in answer.get("Contents", []))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_read_table_csv_guesses_any_separator(tmp_path: Path, sep: str) -> None:
    path = tmp_path / "x.csv"
    path.write_text(f"machine_id{sep}temp\na{sep}1.5\na{sep}2.0\nb{sep}-3.25\n")

    assert storage.read_table(str(path)).equals(FRAME)


def test_read_table_csv_gz_with_explicit_separator(tmp_path: Path) -> None:
    path = tmp_path / "x.csv.gz"
    path.write_bytes(gzip.compress(b"machine_id;temp\na;1.5\na;2.0\nb;-3.25\n"))

    assert storage.read_table(str(path), sep=";").equals(FRAME)


def test_read_table_folder_concatenates_parts_in_name_order(tmp_path: Path) -> None:
    FRAME[2:].write_parquet(tmp_path / "part-2.parquet")
    FRAME[:2].write_parquet(tmp_path / "part-1.parquet")
    (tmp_path / ".hidden.parquet").write_bytes(b"junk")
    (tmp_path / "part-3.parquet.tmp-1234abcd").write_bytes(b"junk")
    (tmp_path / "notes.md").write_text("not a table")

    assert storage.read_table(str(tmp_path)).equals(FRAME)


def test_glob_star_stays_in_one_level_and_double_star_spans(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.csv", "sub/b.csv"):
        (tmp_path / name).write_text("x\n1\n")

    assert storage.list_files(f"{tmp_path}/*.csv") == [f"{tmp_path}/a.csv"]
    assert storage.list_files(f"{tmp_path}/**/*.csv") == [
        f"{tmp_path}/a.csv",
        f"{tmp_path}/sub/b.csv",
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".csv.gz", ".tsv", ".txt"])
def test_write_table_round_trip_describes_the_file(tmp_path: Path, suffix) -> None:
    uri = str(tmp_path / f"out{suffix}")

    info = storage.write_table(FRAME, uri)

    data = Path(uri).read_bytes()
    assert (info.uri, info.bytes, info.rows) == (uri, len(data), 3)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.read_table(uri).equals(FRAME)


def test_write_table_csv_gz_is_byte_stable(tmp_path: Path) -> None:
    first = storage.write_table(FRAME, str(tmp_path / "a.csv.gz"))
    second = storage.write_table(FRAME, str(tmp_path / "b.csv.gz"))

    assert first.sha256 == second.sha256


def test_write_table_refuses_an_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"out\.xlsx.*expected a name ending in"):
        storage.write_table(FRAME, str(tmp_path / "out.xlsx"))
    assert list(tmp_path.iterdir()) == []


def test_read_table_empty_csv_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("\n")

    with pytest.raises(InputError, match=r"empty\.csv: the file is empty"):
        storage.read_table(str(path))


def test_read_table_broken_parquet_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really")

    with pytest.raises(InputError, match=r"bad\.parquet: not a readable Parquet"):
        storage.read_table(str(path))


def test_scan_and_sink_table_locally(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("machine_id|temp\na|1.5\na|2.0\nb|-3.25\n")
    target = str(tmp_path / "out.parquet")

    info = storage.sink_table(storage.scan_table(str(source)), target)

    assert info.rows == 3
    assert info.sha256 == hashlib.sha256(Path(target).read_bytes()).hexdigest()
    assert storage.read_table(target).equals(FRAME)


# ----------------------------------------------------------------------------- read log


def test_track_reads_describes_files_from_the_bytes_already_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FRAME[:2].write_parquet(tmp_path / "p1.parquet")
    (tmp_path / "p2.csv").write_text("machine_id,temp\nb,-3.25\n")
    (tmp_path / "w.json").write_text('{"k": 1}')
    fetched: list[str] = []
    fetch = storage._fetch
    monkeypatch.setattr(storage, "_fetch", lambda u: fetched.append(u) or fetch(u))

    with storage.track_reads() as reads:
        storage.read_table(str(tmp_path))
        storage.read_json(str(tmp_path / "w.json"))

    assert fetched == [str(tmp_path / n) for n in ("p1.parquet", "p2.csv", "w.json")]
    assert [(Path(r.uri).name, r.rows) for r in reads] == [
        ("p1.parquet", 2),
        ("p2.csv", 1),
        ("w.json", None),
    ]
    for r in reads:
        data = Path(r.uri).read_bytes()
        assert (r.bytes, r.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_track_reads_is_empty_outside_and_after_the_block(tmp_path: Path) -> None:
    (tmp_path / "w.json").write_text("[]")
    storage.read_json(str(tmp_path / "w.json"))
    with storage.track_reads() as reads:
        pass
    storage.read_json(str(tmp_path / "w.json"))

    assert reads == []


# ----------------------------------------------------------------------------- atomic


def _half_written_parquet(self: pl.DataFrame, file, **_: object) -> None:
    Path(file).write_bytes(b"PAR1 half of a file")
    raise RuntimeError("disk vanished half-way")


def test_interrupted_local_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "scores.parquet")
    storage.write_table(FRAME, uri)
    before = Path(uri).read_bytes()
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _half_written_parquet)

    with pytest.raises(RuntimeError, match="half-way"):
        storage.write_table(FRAME.head(1), uri)

    assert Path(uri).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]


def test_interrupted_local_write_leaves_no_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _half_written_parquet)

    with pytest.raises(RuntimeError):
        storage.write_table(FRAME, str(tmp_path / "new" / "scores.parquet"))

    assert list((tmp_path / "new").iterdir()) == []


def test_interrupted_s3_write_keeps_the_previous_object(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/scores/scores.parquet"
    storage.write_table(FRAME, uri)
    before = storage.read_bytes(uri)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", _half_written_parquet)

    with pytest.raises(RuntimeError, match="half-way"):
        storage.write_table(FRAME.head(1), uri)
    with pytest.raises(RuntimeError):
        storage.write_table(FRAME, f"s3://{s3_bucket}/scores/other.parquet")

    assert storage.read_bytes(uri) == before
    assert _keys(s3_bucket) == ["scores/scores.parquet"]


def test_s3_upload_failing_between_parts_leaves_no_object(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ConnectionClosedError

    mib = 1024 * 1024
    small_parts = TransferConfig(
        multipart_threshold=5 * mib, multipart_chunksize=5 * mib
    )
    monkeypatch.setattr(_s3, "transfer_config", lambda: small_parts)
    uri = f"s3://{s3_bucket}/model/weights.pt"
    storage.write_bytes(uri, b"previous weights")
    parts: list[int] = []

    def fail_second_part(params: dict, **_: object) -> None:
        parts.append(params["PartNumber"])
        if params["PartNumber"] == 2:
            raise ConnectionClosedError(endpoint_url="http://127.0.0.1/part-2")

    events = _s3.client().meta.events
    events.register("provide-client-params.s3.UploadPart", fail_second_part)
    try:
        with pytest.raises(StorageError, match=r"cannot write s3://.*weights\.pt"):
            storage.write_bytes(uri, bytes(11 * mib))
    finally:
        events.unregister("provide-client-params.s3.UploadPart", fail_second_part)

    assert 2 in parts
    assert storage.read_bytes(uri) == b"previous weights"
    assert _keys(s3_bucket) == ["model/weights.pt"]
    uploads = _s3.client().list_multipart_uploads(Bucket=s3_bucket)
    assert uploads.get("Uploads", []) == []


# ----------------------------------------------------------------------------- S3 I/O


def test_tables_on_s3_in_every_format_and_layout(s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/raw"
    storage.write_bytes(f"{base}/semi.csv", b"machine_id;temp\na;1.5\na;2.0\nb;-3.25\n")
    storage.write_bytes(
        f"{base}/zipped.csv.gz", gzip.compress(b"machine_id,temp\na,1.5\na,2.0\n")
    )
    storage.write_partitioned(FRAME, f"{base}/parts", by="machine_id")
    storage.write_bytes(f"{base}/parts/sub/deeper.parquet", b"not matched by *")

    assert storage.read_table(f"{base}/semi.csv").equals(FRAME)
    assert storage.read_table(f"{base}/zipped.csv.gz").equals(FRAME[:2])
    assert storage.list_files(f"{base}/parts/*.parquet") == [
        f"{base}/parts/part-a.parquet",
        f"{base}/parts/part-b.parquet",
    ]
    assert storage.read_table(f"{base}/parts/*.parquet").equals(FRAME)
    assert storage.scan_table(f"{base}/parts/*.parquet").collect().equals(FRAME)
    assert storage.scan_table(f"{base}/semi.csv").collect().equals(FRAME)


def test_s3_write_describes_the_object(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/out/scores.csv"

    info = storage.write_table(FRAME, uri)

    data = storage.read_bytes(uri)
    assert (info.uri, info.bytes, info.rows) == (uri, len(data), 3)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.file_info(uri) == storage.FileInfo(uri, len(data), info.sha256)
    assert pl.read_csv(io.BytesIO(data)).equals(FRAME)


def test_sink_table_to_s3(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/features/features.parquet"

    info = storage.sink_table(FRAME.lazy().filter(pl.col("temp") > 0), uri)

    assert info.rows == 2
    assert storage.read_table(uri).equals(FRAME[:2])
    assert _keys(s3_bucket) == ["features/features.parquet"]


def test_json_and_exists_on_s3(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/eval/report.json"
    storage.write_json(uri, {"b": [1, 2], "a": None})

    assert storage.read_json(uri) == {"a": None, "b": [1, 2]}
    assert storage.exists(uri)
    assert storage.exists(f"s3://{s3_bucket}/eval")
    assert not storage.exists(f"s3://{s3_bucket}/ev")
    assert not storage.exists(f"s3://{s3_bucket}/eval/other.json")


def test_model_folder_round_trip_local_s3_local(tmp_path: Path, s3_bucket: str) -> None:
    model = tmp_path / "model"
    (model / "extra").mkdir(parents=True)
    (model / "weights.pt").write_bytes(bytes(range(256)))
    (model / "detector.json").write_text('{"threshold": 0.5}')
    (model / "extra" / "notes.txt").write_text("nested")
    uri = f"s3://{s3_bucket}/runs/1/model"

    infos = storage.upload_dir(model, uri)
    back = storage.download_dir(uri, tmp_path / "back")

    assert [i.uri for i in infos] == [
        f"{uri}/detector.json",
        f"{uri}/extra/notes.txt",
        f"{uri}/weights.pt",
    ]
    assert infos[2].sha256 == hashlib.sha256(bytes(range(256))).hexdigest()
    for name in ("weights.pt", "detector.json", "extra/notes.txt"):
        assert (back / name).read_bytes() == (model / name).read_bytes()
    assert sorted(p.name for p in back.rglob("*") if ".tmp-" in p.name) == []
    assert storage.local_copy(str(model), tmp_path) == model


def test_download_dir_of_an_empty_prefix_says_so(tmp_path: Path, s3_bucket) -> None:
    with pytest.raises(NotFoundError, match=r"nothing under s3://.*/model"):
        storage.download_dir(f"s3://{s3_bucket}/model", tmp_path)


# ----------------------------------------------------------------------------- config


def test_endpoint_url_s3_takes_precedence(
    s3_bucket: str, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)

    storage.write_bytes(f"s3://{s3_bucket}/x.txt", b"1")

    assert storage.endpoint() == moto_server


def test_endpoint_region_and_credentials_from_a_profile(
    tmp_path: Path, s3_bucket: str, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile store]\n"
        f"endpoint_url = {moto_server}\n"
        "region = eu-west-1\n"
        "aws_access_key_id = profilekey\n"
        "aws_secret_access_key = profilesecret\n"
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "store")

    storage.write_bytes(f"s3://{s3_bucket}/p.txt", b"via profile")

    assert storage.read_bytes(f"s3://{s3_bucket}/p.txt") == b"via profile"
    assert storage.s3_client().meta.region_name == "eu-west-1"
    assert storage.storage_options()["storage_options"] == {
        "aws_region": "eu-west-1",
        "aws_endpoint_url": moto_server,
        "aws_allow_http": "true",
    }


def test_endpoint_hides_user_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://admin:minio123@127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")

    assert storage.endpoint() == "http://127.0.0.1:9000"


# ----------------------------------------------------------------------------- errors


def _message_and_trace(exc_info: pytest.ExceptionInfo) -> tuple[str, str]:
    return str(exc_info.value), "".join(traceback.format_exception(exc_info.value))


def test_missing_bucket_names_bucket_and_endpoint(s3_bucket: str) -> None:
    with pytest.raises(NotFoundError) as read:
        storage.read_bytes("s3://no-such-bucket-zz/raw/a.csv")
    with pytest.raises(NotFoundError) as write:
        storage.write_bytes("s3://no-such-bucket-zz/run/x.json", b"{}")
    with pytest.raises(NotFoundError) as listing:
        storage.list_files("s3://no-such-bucket-zz/raw/")

    for exc, action in ((read, "read"), (write, "write"), (listing, "list")):
        assert str(exc.value).startswith(f"cannot {action} s3://no-such-bucket-zz/")
        assert "bucket 'no-such-bucket-zz' does not exist at http://127.0.0.1:" in str(
            exc.value
        )
        assert "check the bucket name and the endpoint" in str(exc.value)
    assert isinstance(read.value.__cause__, ClientError)


def test_missing_key_names_the_uri(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/raw/missing.csv"
    with pytest.raises(NotFoundError) as exc:
        storage.read_bytes(uri)
    assert str(exc.value) == (
        f"cannot read {uri}: no such object; check the key and that bucket "
        f"'{s3_bucket}' holds it"
    )
    with pytest.raises(NotFoundError, match="no such object"):
        storage.file_info(uri)


def test_empty_prefix_names_the_prefix(s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/raw/readme.md", b"no tables here")

    with pytest.raises(NotFoundError) as exc:
        storage.read_table(f"s3://{s3_bucket}/raw/")
    assert str(exc.value).startswith(f"no input files at s3://{s3_bucket}/raw/ ")
    assert "check the path, prefix or glob" in str(exc.value)


def test_access_denied_names_uri_and_what_to_check(s3_denied: str) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    uri = f"s3://{s3_denied}/raw/a.csv"

    with pytest.raises(AccessDeniedError) as read:
        storage.read_bytes(uri)
    with pytest.raises(AccessDeniedError) as write:
        storage.write_bytes(uri, b"x")

    for exc, action in ((read, "read"), (write, "write")):
        message, trace = _message_and_trace(exc)
        assert message.startswith(f"cannot {action} {uri}: access denied")
        assert "check that the credentials in use" in message
        assert secret not in trace


def test_refused_credentials_are_access_denied_without_the_secret(
    s3_denied: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-4f1c9e")

    with pytest.raises(AccessDeniedError) as exc:
        storage.list_files(f"s3://{s3_denied}/raw/")

    message, trace = _message_and_trace(exc)
    assert "refused the credentials (InvalidAccessKeyId)" in message
    assert "fake-secret-4f1c9e" not in trace


def test_unreachable_endpoint_fails_fast_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    with pytest.raises(EndpointError) as exc:
        storage.read_table("s3://bucket/raw/")

    assert str(exc.value) == (
        f"cannot list s3://bucket/raw/: the endpoint http://127.0.0.1:{port} is "
        "unreachable (EndpointConnectionError); check AWS_ENDPOINT_URL / "
        "AWS_ENDPOINT_URL_S3 and that the store is running"
    )


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"cannot read .*nope\.json: no such file"):
        storage.read_json(str(tmp_path / "nope.json"))
    with pytest.raises(NotFoundError, match=r"no input files at .*nothing"):
        storage.list_files(str(tmp_path / "nothing"))


def test_invalid_json_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")

    with pytest.raises(StorageError, match=r"bad\.json is not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))


def test_s3_uri_without_bucket_is_refused() -> None:
    with pytest.raises(StorageError, match="has no bucket name"):
        storage.read_bytes("s3:///key")


def test_aws_region_is_read_though_botocore_does_not(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    assert _s3.region() == "eu-west-1"
    assert storage.s3_client().meta.region_name == "eu-west-1"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("AWS_ENDPOINT_URL", "127.0.0.1:9000", "AWS_ENDPOINT_URL='127.0.0.1:9000' is"),
        ("AWS_ENDPOINT_URL_S3", "localhost", "AWS_ENDPOINT_URL_S3='localhost' is"),
        ("AWS_MAX_ATTEMPTS", "abc", "AWS_MAX_ATTEMPTS='abc' is not a whole number"),
    ],
)
def test_malformed_aws_variables_are_storage_errors(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(StorageError, match=expected):
        storage.read_bytes(f"s3://{s3_bucket}/x.txt")


def test_a_missing_profile_is_a_storage_error(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")

    with pytest.raises(StorageError, match="no-such-profile"):
        storage.list_files(f"s3://{s3_bucket}/raw/")


def test_a_folder_marker_object_is_not_read_as_a_file(s3_bucket: str) -> None:
    client = _s3.client()
    client.put_object(Bucket=s3_bucket, Key="raw/", Body=b"")
    storage.write_table(FRAME, f"s3://{s3_bucket}/raw/m1.csv")

    assert storage.list_files(f"s3://{s3_bucket}/raw/") == [
        f"s3://{s3_bucket}/raw/m1.csv"
    ]
    assert storage.read_table(f"s3://{s3_bucket}/raw/").height == 3


def test_an_empty_object_is_refused_as_an_empty_file(s3_bucket: str) -> None:
    _s3.client().put_object(Bucket=s3_bucket, Key="empty/a.csv", Body=b"")

    with pytest.raises(InputError, match=r"empty/a.csv: the file is empty"):
        storage.scan_table(f"s3://{s3_bucket}/empty/")


@pytest.mark.parametrize("on_s3", [False, True])
def test_stale_parts_are_removed_only_from_the_folder_itself(
    tmp_path: Path, s3_bucket: str, on_s3: bool
) -> None:
    base = f"s3://{s3_bucket}/out" if on_s3 else str(tmp_path / "out")
    keep = storage.write_table(FRAME, storage.join(base, "features-a.parquet")).uri
    old = storage.write_table(FRAME, storage.join(base, "features-b.parquet")).uri
    archived = storage.join(base, "archive", "features-2023.parquet")
    storage.write_table(FRAME, archived)

    removed = storage.remove_stale(base, stem="features", keep=[keep])

    assert removed == [old]
    assert storage.list_files(base) == sorted([keep, archived])


def test_a_full_disk_in_a_polars_writer_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: pl.DataFrame, file: object, **_: object) -> None:
        raise pl.exceptions.ComputeError("No space left on device (os error 28)")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    target = tmp_path / "x.parquet"

    with pytest.raises(StorageError, match=r"cannot write .*x.parquet: No space left"):
        storage.write_table(FRAME, str(target))
    assert list(tmp_path.iterdir()) == []


def test_uploads_a_store_will_not_delete_are_reported(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = _s3.client()

    def refuse(**request: object) -> dict:
        keys = [o["Key"] for o in request["Delete"]["Objects"]]  # type: ignore[index]
        return {"Errors": [{"Key": k, "Code": "AccessDenied"} for k in keys]}

    monkeypatch.setattr(client, "delete_objects", refuse)
    with storage.replacing(f"s3://{s3_bucket}/out"):
        storage.write_bytes(f"s3://{s3_bucket}/out/a.txt", b"a")

    assert storage.read_bytes(f"s3://{s3_bucket}/out/a.txt") == b"a"
    assert "could not delete" in caplog.text and "AccessDenied" in caplog.text


def test_an_unknown_retry_mode_is_a_storage_error(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_RETRY_MODE", "bogus")
    with pytest.raises(StorageError, match="AWS_RETRY_MODE='bogus' is not a retry"):
        storage.read_bytes(f"s3://{s3_bucket}/x.txt")


def test_parallel_copies_fit_the_connection_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    seen: list[int] = []
    running, most = [0], [0]
    lock, full = threading.Lock(), threading.Event()

    class Client:
        def copy(self, source, bucket, key, Config) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                seen.append(Config.max_concurrency)
                if running[0] == _s3.COPY_OBJECTS:
                    full.set()
            full.wait(10)  # the first copies wait until as many run as may
            with lock:
                running[0] -= 1

    monkeypatch.setattr(_s3, "client", Client)
    for objects, parts in ((1, 10), (2, 10), (7, 9), (16, 4), (40, 4)):
        seen.clear()
        if objects < _s3.COPY_OBJECTS:
            full.set()
        else:
            full.clear()
        moves = [(f"s3://b/.incoming/{i}", f"s3://b/{i}") for i in range(objects)]
        done: list[str] = []
        storage._copy_all(moves, done)
        assert sorted(done) == sorted(final for _, final in moves)
        assert set(seen) == {parts}
        assert min(objects, _s3.COPY_OBJECTS) * parts <= _s3.COPY_PARTS
    assert most[0] == _s3.COPY_OBJECTS  # and never more
    assert _s3._POOL_CONNECTIONS > _s3.COPY_PARTS
