"""The moto fixture works with the storage layer."""

from sagewatch import storage


def test_bytes_round_trip_on_s3(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/a/b.txt"
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.list_files(f"s3://{s3_bucket}/a/", suffixes=(".txt",)) == [uri]
