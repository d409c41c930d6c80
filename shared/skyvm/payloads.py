"""Where payloads (what a node runs) and results (what it returns) travel.

Two kinds of store: a directory (the default; the local backend mounts it
into the container) and a bucket on any cloud through fsspec: ``s3://``
(s3fs, any S3-compatible endpoint), ``gs://``/``gcs://`` (gcsfs) and
``az://``/``abfs://`` (adlfs). Objects are framed with their SHA-256 so a
truncated or altered object is detected on read, and payloads are
content-addressed.

The launching host opens a store with ``open_store`` (storage options from a
connector, else the standard environment); a node finds an object with
``store_for_object``, which reads only these environment variables (the
contract by which a node is handed short-lived credentials):

  s3://  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION;
         the endpoint from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or SKYVM_S3_ENDPOINT_URL
  gs://  SKYVM_GCS_TOKEN (an OAuth2 access token, or "anon"), SKYVM_GCS_PROJECT,
         STORAGE_EMULATOR_HOST (an emulator; then no token means anonymous)
  az://  AZURE_STORAGE_CONNECTION_STRING (an account's, or BlobEndpoint=...;SharedAccessSignature=...)

Every failure is a ``PayloadError`` naming the node, the object's URL and
what to fix, with secrets redacted.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional
from urllib.parse import unquote, urlparse

from skyvm.clouds import BUCKET_SCHEMES
from skyvm.errors import PayloadError, SkyVMError
from skyvm.redact import redact, register

MAGIC = b"SKYVM1\n"


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


class Cloud(NamedTuple):
    """How one URL scheme maps onto fsspec, and what to tell a user who lacks something."""

    module: str  # the fsspec implementation to import
    cls: str  # its file system class
    extra: str  # skyvm's extra that installs it
    container: str  # what the URL's host part is called
    credentials: str  # how to give credentials


_S3 = Cloud("s3fs", "S3FileSystem", "aws", "bucket", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)")
# gcsfs.core's class, not the registry's: gcsfs's "extended" one asks a gRPC control API for
# every bucket's layout first (a minute's timeout against an emulator, and more permissions).
_GCS = Cloud("gcsfs.core", "GCSFileSystem", "gcp", "bucket", "set SKYVM_GCS_TOKEN (an OAuth2 access token) or GOOGLE_APPLICATION_CREDENTIALS")
_AZ = Cloud("adlfs", "AzureBlobFileSystem", "azure", "container", "set AZURE_STORAGE_CONNECTION_STRING (an account's, or BlobEndpoint=...;SharedAccessSignature=...)")
# Each bucket scheme's file system, by the cloud that serves it (skyvm.clouds says which).
CLOUDS = {scheme: {"aws": _S3, "gcp": _GCS, "azure": _AZ}[cloud] for scheme, cloud in BUCKET_SCHEMES.items()}

# Exceptions (by class name, so no SDK need be importable) that mean "no usable credentials".
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialUnavailableError"}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "BlobNotFound", "ContainerNotFound", "ResourceNotFound"}
_DENIED_CODES = {"401", "403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "AuthorizationFailure", "AuthenticationFailed"}
_NO_BUCKET_MARKERS = ("NoSuchBucket", "bucket does not exist", "ContainerNotFound", "container does not exist")


def env_storage_options(scheme: str, endpoint_url: Optional[str] = None) -> dict[str, Any]:
    """fsspec storage options from the standard environment (the node's contract), plus an endpoint.

    ``endpoint_url`` is the store's endpoint when it is not the cloud's own: the S3 endpoint,
    the GCS emulator's address, or the Azure blob endpoint.
    """
    env = os.environ
    cloud = CLOUDS[scheme]
    options: dict[str, Any] = {}
    # Whatever secret is read here is masked in every error and log line from now on.
    register(*(env.get(name) for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SKYVM_GCS_TOKEN")))
    register(*_connection_secrets(env.get("AZURE_STORAGE_CONNECTION_STRING", "")))
    if cloud is _S3:
        endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or env.get("SKYVM_S3_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        if env.get("AWS_ACCESS_KEY_ID"):
            options.update(key=env["AWS_ACCESS_KEY_ID"], secret=env.get("AWS_SECRET_ACCESS_KEY"), token=env.get("AWS_SESSION_TOKEN") or None)
        if env.get("AWS_DEFAULT_REGION"):
            options["client_kwargs"] = {"region_name": env["AWS_DEFAULT_REGION"]}
    elif cloud is _GCS:
        emulator = endpoint_url or env.get("STORAGE_EMULATOR_HOST")
        if emulator:
            options["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        token = env.get("SKYVM_GCS_TOKEN")
        if token and token != "anon":
            from google.oauth2.credentials import Credentials

            options["token"] = Credentials(token)
        elif token == "anon" or emulator:
            options["token"] = "anon"
        if env.get("SKYVM_GCS_PROJECT"):
            options["project"] = env["SKYVM_GCS_PROJECT"]
    else:
        connection = env.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection:
            options["connection_string"] = with_blob_endpoint(connection, endpoint_url) if endpoint_url else connection
        elif endpoint_url:
            # No secret given: the account's endpoint with Azure's default credential chain.
            host = urlparse(endpoint_url).netloc or endpoint_url
            options.update(account_host=host, account_name=env.get("AZURE_STORAGE_ACCOUNT_NAME") or host.split(".")[0])
    return options


def _connection_secrets(connection_string: str) -> list[str]:
    """The secret parts of an Azure connection string: itself, its key, its SAS and the SAS's signature."""
    if not connection_string:
        return []
    fields = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    sas = fields.get("SharedAccessSignature", "")
    signature = [q[len("sig=") :] for q in sas.lstrip("?").split("&") if q.startswith("sig=")]
    return [connection_string, fields.get("AccountKey", ""), sas, *signature, *map(unquote, signature)]


def with_blob_endpoint(connection_string: str, blob_endpoint: str) -> str:
    """A connection string with its BlobEndpoint set to ``blob_endpoint``."""
    parts = [p for p in connection_string.split(";") if p and not p.startswith("BlobEndpoint=")]
    return ";".join([*parts, f"BlobEndpoint={blob_endpoint}"])


def _split(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, path below the bucket) of a cloud URL."""
    parsed = urlparse(url)
    if parsed.scheme not in CLOUDS:
        raise PayloadError(f"unsupported store URL {url!r}; use a directory, file://PATH, s3://, gs:// or az://BUCKET[/PREFIX]")
    if not parsed.netloc:
        raise PayloadError(f"{url!r} names no {CLOUDS[parsed.scheme].container}; use {parsed.scheme}://{CLOUDS[parsed.scheme].container.upper()}[/PREFIX]")
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def _codes(exc: BaseException) -> set[str]:
    """The service's error codes and HTTP status, as text, wherever the SDK keeps them."""
    codes: set[str] = set()
    for source in (exc, exc.__cause__, exc.__context__):
        response = getattr(source, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            codes.add(str(response.get("Error", {}).get("Code", "")))
            codes.add(str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))
        for attr in ("error_code", "status_code", "code"):  # azure.core, gcsfs
            value = getattr(source, attr, None)
            codes.add(str(getattr(value, "value", value) or ""))  # azure's error codes are enums
    return codes - {"", "None"}


class FsspecStore(Store):
    """A bucket (or container) and prefix on S3, GCS or Azure Blob Storage, through fsspec."""

    def __init__(self, url: str, storage_options: "Optional[dict[str, Any] | Callable[[], tuple[dict[str, Any], Optional[float]]]]" = None, *, endpoint_url: Optional[str] = None, node: Optional[str] = None):
        self.scheme, self.bucket, self.prefix = _split(url)
        self.cloud = CLOUDS[self.scheme]
        self.url = f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url
        self.node = node
        # A dict, or a function giving options and when their credentials are due for renewal
        # (Connector.renewing_fs_options): a store held through a long node gets fresh keys.
        self._options = storage_options
        self._fs = None
        self._renew_at: Optional[float] = None

    def __repr__(self) -> str:  # never the options: they may hold secrets
        return f"FsspecStore({self.url!r})"

    @property
    def fs(self):
        """The fsspec file system, made on first use (a fresh instance: credentials may have changed),
        and made again once its minted credentials are due for renewal."""
        if self._fs is not None and self._renew_at is not None and time.time() >= self._renew_at:
            self._fs = None
        if self._fs is None:
            try:
                cls = getattr(importlib.import_module(self.cloud.module), self.cloud.cls)
            except ImportError:
                package = self.cloud.module.split(".")[0]
                raise PayloadError(
                    f"{self._who()}a {self.scheme}:// payload store needs {package}, which is not installed here: pip install 'skyvm[{self.cloud.extra}]'"
                ) from None
            if callable(self._options):
                options, self._renew_at = self._call("open", "", self._options)
            else:
                options = self._options if self._options is not None else env_storage_options(self.scheme, self.endpoint_url)
            self._fs = self._call("open", "", lambda: cls(skip_instance_cache=True, **options))
        return self._fs

    def _who(self) -> str:
        return f"node {self.node!r}: " if self.node else ""

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise PayloadError(f"key {key!r} is not a plain object key in store {self.url}")
        return "/".join(p for p in (self.bucket, self.prefix, key) if p)

    def _call(self, action: str, key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SkyVMError:
            raise  # already skyvm's own and classified (a credential reference that cannot be read: not a store fault)
        except Exception as exc:  # noqa: BLE001 - every SDK's errors become one clear PayloadError
            raise self._error(action, key, exc) from None

    def _error(self, action: str, key: str, exc: BaseException) -> PayloadError:
        where = self.url_for(key) if key else self.url
        cloud, codes = self.cloud, _codes(exc)
        text = f"{type(exc).__name__}: {exc} {exc.__cause__ or ''} {' '.join(codes)}"
        if type(exc).__name__ in _NO_CREDENTIALS or "Must provide either a connection_string" in text:
            why = f"no credentials: give the node a connector or {cloud.credentials}"
        elif isinstance(exc, FileNotFoundError) or codes & _MISSING_CODES:
            if any(m in text for m in _NO_BUCKET_MARKERS) or self._bucket_missing():
                why = f"{cloud.container} {self.bucket!r} does not exist: create it or fix payload_store"
            else:
                return PayloadError(redact(f"{self._who()}object {where} does not exist"))
        elif isinstance(exc, PermissionError) or codes & _DENIED_CODES or "Forbidden" in text:
            reason = ", ".join(sorted(codes & _DENIED_CODES)) or type(exc).__name__
            why = (
                f"access denied ({reason}): the credentials cannot {action} it; check that the connector "
                f"(or the token, SAS or keys given) covers {self.url} and has not expired"
            )
        else:
            why = f"{type(exc).__name__}: {exc}"
        return PayloadError(redact(f"{self._who()}cannot {action} {where}: {why}"))

    def _bucket_missing(self) -> bool:
        """Whether the bucket is known not to exist (False when it exists or cannot be told)."""
        try:
            with warnings.catch_warnings():  # adlfs warns when a SAS may not read the container's properties
                warnings.simplefilter("ignore")
                return not self.fs.exists(self.bucket)
        except Exception:  # noqa: BLE001 - credentials scoped to a prefix may not see the bucket
            return False

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        self._call("write", key, lambda: self.fs.pipe_file(path, frame(data)))
        return self.url_for(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        blob = self._call("read", key, lambda: self.fs.cat_file(path))
        return unframe(blob, self.url_for(key))

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return bool(self._call("look up", key, lambda: self.fs.exists(path)))

    def delete(self, key: str) -> None:
        path = self._path(key)

        def remove():
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:  # gone already (or its bucket is): nothing to delete
                pass

        self._call("delete", key, remove)


def open_store(
    url: Optional[str], endpoint_url: Optional[str] = None, *, storage_options: Optional[dict[str, Any]] = None, node: Optional[str] = None
) -> Store:
    """The launching host's store for a URL: None (the default directory), a path, file://PATH,
    s3://, gs://, gcs://, az:// or abfs://BUCKET[/PREFIX].

    ``storage_options`` (from a connector) go to fsspec as they are; without them the standard
    environment and ``endpoint_url`` (payload_store_endpoint) say how to reach the bucket.
    """
    if url is None:
        from skyvm.home import Home

        return LocalStore(Home.current().store)
    if url.startswith("file://"):
        return LocalStore(Path(url[len("file://") :]))
    if "://" in url:
        return FsspecStore(url, storage_options, endpoint_url=endpoint_url, node=node)
    return LocalStore(Path(url))


def store_for_object(url: str, endpoint_url: Optional[str] = None, *, node: Optional[str] = None) -> tuple[Store, str]:
    """Split an object URL into (its store, its key): how a node finds what it was sent.

    Credentials come only from the environment contract in this module's docstring; errors
    name ``node`` (default: $SKYVM_NODE, which a node's environment holds).
    """
    if url.startswith("file://"):
        path = Path(url[len("file://") :])
        return LocalStore(path.parent), path.name
    if "://" not in url:
        raise PayloadError(f"unsupported object URL {url!r}; expected file://PATH or s3://, gs:// or az://BUCKET/KEY")
    scheme, bucket, key = _split(url)
    if not key:
        raise PayloadError(f"object URL {url!r} names no object")
    store = FsspecStore(f"{scheme}://{bucket}", endpoint_url=endpoint_url, node=node or os.environ.get("SKYVM_NODE"))
    return store, key
