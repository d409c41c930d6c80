"""Where payloads (what a node runs) and results (what it returns) travel.

Two real stores: a directory (default; the local backend mounts it into the
container) and S3 through boto3 (any S3-compatible endpoint). Objects are
framed with their SHA-256 so a truncated or altered object is detected on
read, and payloads are content-addressed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from skyvm.errors import PayloadError

MAGIC = b"SKYVM1\n"
DEFAULT_HOME = Path(os.environ.get("SKYVM_HOME", Path.home() / ".skyvm"))


def frame(data: bytes) -> bytes:
    return MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def unframe(blob: bytes, where: str) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 65:
        raise PayloadError(f"{where} is corrupt: not a skyvm object (bad header)")
    digest = blob[len(MAGIC) : len(MAGIC) + 64].decode(errors="replace")
    data = blob[len(MAGIC) + 65 :]
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise PayloadError(f"{where} is corrupt: checksum mismatch (expected sha256 {digest}, got {actual})")
    return data


def content_key(data: bytes, prefix: str = "payloads") -> str:
    return f"{prefix}/{hashlib.sha256(data).hexdigest()}"


class Store:
    """A place objects go by key. ``url`` is what a node is told to read from."""

    url: str

    def put(self, key: str, data: bytes) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, key: str) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def exists(self, key: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def delete(self, key: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def put_payload(self, data: bytes) -> str:
        """Store by content; an identical payload is stored once. Returns the object's URL."""
        key = content_key(data)
        if not self.exists(key):
            self.put(key, data)
        return self.url_for(key)

    def url_for(self, key: str) -> str:
        return self.url.rstrip("/") + "/" + key

    def key_of(self, url: str) -> str:
        base = self.url.rstrip("/") + "/"
        if not url.startswith(base):
            raise PayloadError(f"{url} is not in store {self.url}")
        return url[len(base) :]


@dataclass
class LocalStore(Store):
    root: Path

    def __post_init__(self):
        self.root = Path(self.root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise PayloadError(f"key {key!r} escapes the store at {self.root}")
        return path

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half an object.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(frame(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return self.url_for(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise PayloadError(f"object {self.url_for(key)} does not exist") from None
        return unframe(blob, self.url_for(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


@dataclass
class S3Store(Store):
    bucket: str
    prefix: str = ""
    endpoint_url: Optional[str] = None
    _client: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.prefix = self.prefix.strip("/")
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def client(self):
        if self._client is None:
            try:
                import boto3
            except ImportError:  # pragma: no cover - depends on the install
                raise PayloadError("an s3:// payload store needs boto3: pip install 'skyvm[s3]'") from None
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=frame(data))
        return self.url_for(key)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            blob = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise PayloadError(f"object {self.url_for(key)} does not exist") from None
            if code == "NoSuchBucket":
                raise PayloadError(f"bucket {self.bucket!r} does not exist (reading {self.url_for(key)})") from None
            raise PayloadError(f"cannot read {self.url_for(key)}: {exc}") from None
        return unframe(blob, self.url_for(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_store(url: Optional[str], endpoint_url: Optional[str] = None) -> Store:
    """A store for a URL: None (the default directory), a path, file://PATH, or s3://BUCKET[/PREFIX]."""
    if url is None:
        return LocalStore(DEFAULT_HOME / "store")
    if url.startswith("s3://"):
        parsed = urlparse(url)
        if not parsed.netloc:
            raise PayloadError(f"{url!r} names no bucket; use s3://BUCKET[/PREFIX]")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url or os.environ.get("SKYVM_S3_ENDPOINT_URL"))
    if url.startswith("file://"):
        return LocalStore(Path(url[len("file://") :]))
    if "://" in url:
        raise PayloadError(f"unsupported payload store {url!r}; use a directory, file://PATH or s3://BUCKET[/PREFIX]")
    return LocalStore(Path(url))


def store_for_object(url: str, endpoint_url: Optional[str] = None) -> tuple[Store, str]:
    """Split an object URL into (its store, its key): how a node finds what it was sent."""
    if url.startswith("s3://"):
        parsed = urlparse(url)
        key = parsed.path.lstrip("/")
        return S3Store(parsed.netloc, "", endpoint_url=endpoint_url or os.environ.get("SKYVM_S3_ENDPOINT_URL")), key
    if url.startswith("file://"):
        path = Path(url[len("file://") :])
        return LocalStore(path.parent), path.name
    raise PayloadError(f"unsupported object URL {url!r}; expected file://PATH or s3://BUCKET/KEY")
