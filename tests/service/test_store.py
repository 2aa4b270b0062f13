from __future__ import annotations

import io
import uuid

import boto3
import pytest

from service.errors import NotFound
from service.store import LocalStore, S3Store, store_from_url


def round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 500_000)  # 1.5 MB: more than one chunk
    store.ping()
    assert not store.exists("models/t/x.safetensors")
    store.put_file("models/t/x.safetensors", src)
    assert store.exists("models/t/x.safetensors")
    assert b"".join(store.open_stream("models/t/x.safetensors")) == src.read_bytes()
    out = tmp_path / "out.bin"
    store.get_to_file("models/t/x.safetensors", out)
    assert out.read_bytes() == src.read_bytes()
    store.put_stream("a/b.json", io.BytesIO(b"{}"))
    assert b"".join(store.open_stream("a/b.json")) == b"{}"
    store.delete("models/t/x.safetensors")
    assert not store.exists("models/t/x.safetensors")
    with pytest.raises(NotFound):
        store.open_stream("models/t/x.safetensors")
    with pytest.raises(NotFound):
        store.get_to_file("nope", out)


def test_local_store(tmp_path):
    store = store_from_url((tmp_path / "objects").as_uri())
    assert isinstance(store, LocalStore)
    round_trip(store, tmp_path)
    assert not [p for p in (tmp_path / "objects").rglob(".tmp-*")]


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../x", ""])
def test_local_store_refuses_keys_outside_root(tmp_path, key):
    with pytest.raises(ValueError):
        LocalStore(tmp_path).exists(key)


def test_s3_store_against_moto_server(s3_endpoint, tmp_path, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    store = store_from_url(f"s3://{bucket}/objects", s3_endpoint)
    assert isinstance(store, S3Store)
    round_trip(store, tmp_path)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["objects/a/b.json"]
    with pytest.raises(Exception):  # noqa: B017 - botocore's ClientError
        store_from_url("s3://no-such-bucket-x/p", s3_endpoint).ping()


def test_unsupported_url():
    with pytest.raises(ValueError):
        store_from_url("ftp://x/y")
