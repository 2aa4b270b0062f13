"""Object storage for checkpoints, datasets and artifacts: a local directory (embedded default) or
an S3-compatible bucket. Bytes stream both ways; nothing is read whole into memory."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from service.errors import NotFound
from service.settings import Settings

CHUNK = 1024 * 1024


class ObjectStore(Protocol):
    def put_file(self, key: str, path: str | Path) -> None: ...
    def put_stream(self, key: str, fileobj: BinaryIO) -> None: ...
    def get_to_file(self, key: str, path: str | Path) -> None: ...
    def open_stream(self, key: str) -> Iterator[bytes]: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def ping(self) -> None: ...


class LocalStore:
    """Objects as files under `root`; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not key or key.startswith("/") or not path.is_relative_to(self.root) \
                or path == self.root:
            raise ValueError(f"object key {key!r} escapes the store root")
        return path

    def put_stream(self, key: str, fileobj: BinaryIO) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(fileobj, out, CHUNK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as f:
            self.put_stream(key, f)

    def get_to_file(self, key: str, path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"object {key} not found in the store")
        shutil.copyfile(src, path)

    def open_stream(self, key: str) -> Iterator[bytes]:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"object {key} not found in the store")
        f = open(src, "rb")  # noqa: SIM115 - closed by the generator

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(CHUNK):
                    yield block

        return chunks()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"store root {self.root} is not writable")


class S3Store:
    """Objects in `s3://bucket/prefix/<key>` (AWS credentials from the usual variables)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=Config(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60))

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key {key!r} is not a relative path")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def put_stream(self, key: str, fileobj: BinaryIO) -> None:
        self.client.upload_fileobj(fileobj, self.bucket, self._key(key))

    def put_file(self, key: str, path: str | Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_to_file(self, key: str, path: str | Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as exc:
            if self._missing(exc):
                raise NotFound(f"object {key} not found in the store") from exc
            raise

    def open_stream(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if self._missing(exc):
                raise NotFound(f"object {key} not found in the store") from exc
            raise

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def store_from_url(url: str, endpoint_url: str | None = None) -> ObjectStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} needs a bucket: s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, endpoint_url)
    raise ValueError(f"unsupported storage URL {url!r}: use file:///dir or s3://bucket/prefix")


def store_from_settings(settings: Settings) -> ObjectStore:
    return store_from_url(settings.storage_url, settings.s3_endpoint_url)
