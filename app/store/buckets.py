"""The model store: where published model files live, addressed by their sha256.

Two stores with one small interface (`ModelStore`): `LocalModelStore`, a folder in the data dir
(the embedded default), and `S3ModelStore`, a bucket through boto3 (AWS, or MinIO and other
S3-compatible stores through `S3_ENDPOINT_URL`). `open_model_store(settings)` picks one.

Objects live under `models/<sha256>.onnx`. A fetch streams the object into a temporary file beside
its destination, hashing as it writes, and renames it into place only when sha256 and size match
what the registry recorded; the temporary file is fsynced first and the folder after, so a crash
leaves either the old state or the whole verified file, never a torn one.

Every failure of a store is a `ModelStoreError` whose `reason` names it for metrics and logs:
`unavailable` (unreachable, timed out, no credentials, access denied, no such bucket), `missing`
(no such object), `integrity` (the bytes are not the ones the registry records).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from conf.datadir import STORE_DIR, data_path, write_atomically
from conf.settings import Settings

CHUNK = 1 << 20
FILE_MODE = 0o644

# A storage key is a relative object name: segments of safe characters, no '.', '..' or empty ones.
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,254}")
MAX_KEY_LENGTH = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelStoreError(Exception):
    """A store could not put, find or fetch an object; `reason` labels it for metrics."""

    reason = "store_error"


class ModelStoreUnavailable(ModelStoreError):
    """The store cannot be reached or refuses us: network, timeout, credentials, missing bucket."""

    reason = "unavailable"


class ModelStoreAccessDenied(ModelStoreUnavailable):
    """The store refuses our credentials or this request (S3 403); its reason stays `unavailable`."""


class ModelObjectMissing(ModelStoreError):
    """The store answers, but holds no object under the key."""

    reason = "missing"


class ModelIntegrityError(ModelStoreError):
    """A fetched model file does not have the sha256 or size the registry records."""

    reason = "integrity"


class ModelStore(Protocol):
    """What the CLI, the master and the supervisor need of a store."""

    def put_file(self, path: str) -> tuple[str, str, int]:
        """Store a model file (idempotent); returns (key, sha256, size)."""

    def put_as(self, key: str, path: str) -> tuple[str, int]:
        """Store a file under key, replacing what was there; returns (sha256, size)."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under key."""

    def fetch(self, key: str, dest_path: str, sha256: str, size: int) -> None:
        """Put the object at dest_path, verified against sha256 and size, atomically."""

    def describe(self) -> str:
        """Where the store is, for log lines and error messages."""


def sha256_of(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def storage_key(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a lower-case hex sha256: {sha256!r}")
    return f"models/{sha256}.onnx"


def check_key(key: str) -> str:
    """The key itself, or ValueError when it is not a plain relative object name.

    Keys come from the registry, which any database user can write: a key such as `../x` or
    `/etc/passwd` must never name a file outside the store, nor a surprising object.
    """
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise ValueError(f"storage key must be 1 to {MAX_KEY_LENGTH} characters, got {key!r}")
    if not all(_KEY_SEGMENT.fullmatch(segment) for segment in key.split("/")):
        raise ValueError(f"storage key {key!r} is not a relative name of letters, digits, '.', '_', '-' "
                         f"segments joined by '/'")
    return key


def write_verified(chunks: Iterable[bytes], dest_path: str, sha256: str, size: int) -> None:
    """Write chunks to dest_path whole, checking sha256 and size as they stream (conf/datadir.py).

    Stops reading as soon as there are more bytes than `size`, so a wrong object cannot fill the
    disk. On any failure the temporary file is removed and dest_path is left as it was.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest_path)), exist_ok=True)
    write_atomically(dest_path, _verified(chunks, os.path.basename(dest_path), sha256, size), FILE_MODE)


def _verified(chunks: Iterable[bytes], name: str, sha256: str, size: int) -> Iterator[bytes]:
    """The chunks, then ModelIntegrityError (before the file is renamed) unless they are the object."""
    digest, written = hashlib.sha256(), 0
    for chunk in chunks:
        written += len(chunk)
        if written > size:
            raise ModelIntegrityError(f"{name}: the object has more than the {size} bytes the registry records")
        digest.update(chunk)
        yield chunk
    if (digest.hexdigest(), written) != (sha256, size):
        raise ModelIntegrityError(f"{name}: expected sha256 {sha256} ({size} bytes), "
                                  f"got {digest.hexdigest()} ({written} bytes)")


def file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def install_verified(source_path: str, dest_path: str, sha256: str, size: int) -> None:
    """Copy a local file to dest_path through `write_verified`."""
    write_verified(file_chunks(source_path), dest_path, sha256, size)


class LocalModelStore:
    """A folder store: objects under root/models/<sha256>.onnx."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def describe(self) -> str:
        return f"local store {self.root}"

    def object_path(self, key: str) -> str:
        check_key(key)
        path = os.path.realpath(os.path.join(self.root, key))
        if not path.startswith(os.path.realpath(self.root) + os.sep):
            raise ValueError(f"storage key {key!r} leaves the model store")
        return path

    def put_file(self, path: str) -> tuple[str, str, int]:
        """Store a model file; returns (key, sha256, size)."""
        sha256, size = sha256_of(path)
        key = storage_key(sha256)
        if not self.exists(key):
            install_verified(path, self.object_path(key), sha256, size)
        return key, sha256, size

    def put_as(self, key: str, path: str) -> tuple[str, int]:
        """Store a file under ``key`` (an archive), replacing what was there; returns (sha256, size)."""
        sha256, size = sha256_of(path)
        install_verified(path, self.object_path(key), sha256, size)
        return sha256, size

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.object_path(key))

    def fetch(self, key: str, dest_path: str, sha256: str, size: int) -> None:
        """Put the object at dest_path, verified against sha256 and size, atomically."""
        source = self.object_path(key)
        try:
            chunks = file_chunks(source)
            write_verified(chunks, dest_path, sha256, size)
        except FileNotFoundError as exc:
            if exc.filename != source:
                raise
            raise ModelObjectMissing(f"{self.describe()} has no object {key}") from None


# S3 client settings: a dead endpoint must fail in seconds, not hang a sync; a slow read of a large
# model may take longer. Standard retry mode backs off exponentially with jitter between attempts.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 4  # the first try included

# S3 error codes that mean "no such object"; every other client error makes the store unavailable.
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                           "ExpiredToken", "InvalidToken"})


class S3ModelStore:
    """A bucket store through boto3: objects under models/<sha256>.onnx, credentials from AWS's chain.

    The client is built lazily and again after a fork (its connection pool must not be shared with
    the parent). Threads may share a store: boto3 clients are thread safe, and two threads racing on
    the lazy client at worst build it twice.
    """

    def __init__(self, bucket: str, endpoint_url: str | None = None, *,
                 connect_timeout_s: float = S3_CONNECT_TIMEOUT_S, read_timeout_s: float = S3_READ_TIMEOUT_S,
                 max_attempts: int = S3_MAX_ATTEMPTS):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max_attempts
        self._client: Any = None
        self._client_pid: int | None = None

    def describe(self) -> str:
        return f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    @property
    def client(self) -> Any:
        """This process's boto3 S3 client."""
        if self._client is None or self._client_pid != os.getpid():
            self._client = self._make_client()
            self._client_pid = os.getpid()
        return self._client

    def _make_client(self) -> Any:
        # Imported here: boto3 takes about 0.3 s to import, and only a bucket store needs it.
        import boto3.session
        from botocore.config import Config

        # botocore logs at INFO which credential source it found, on every client: noise in our logs.
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)

        config = Config(
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            # MinIO and most S3-compatible stores want path-style URLs (no bucket in the host name).
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def put_file(self, path: str) -> tuple[str, str, int]:
        """Upload a model file unless its object exists whole; returns (key, sha256, size).

        The sha256 travels with the upload, so S3 itself refuses bytes damaged on the way.
        """
        sha256, size = sha256_of(path)
        key = storage_key(sha256)
        try:
            stored = self._head(key)
        except ModelStoreAccessDenied:
            stored = None  # without s3:ListBucket, S3 answers 403 for a missing object: upload and see
        if stored is not None and stored.get("ContentLength") == size:
            return key, sha256, size  # a damaged object of the right size is caught by every fetch
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
        with self._translated_errors(f"uploading {path} to {key}"), open(path, "rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                                   ContentType="application/octet-stream", ChecksumSHA256=checksum,
                                   Metadata={"sha256": sha256})
        stored = self._head(key)
        if stored is None or stored.get("ContentLength") != size:
            raise ModelIntegrityError(f"{self.describe()}: {key} was uploaded with {size} bytes but the store "
                                      f"holds {None if stored is None else stored.get('ContentLength')}")
        return key, sha256, size

    def put_as(self, key: str, path: str) -> tuple[str, int]:
        """Upload a file under ``key`` (an archive, of any size: multipart when large); returns (sha256, size).

        Its sha256 rides along as metadata; the archive fetches the object back to check it.
        """
        from boto3.exceptions import S3UploadFailedError

        check_key(key)
        sha256, size = sha256_of(path)
        try:
            with self._translated_errors(f"uploading {path} to {key}"):
                self.client.upload_file(path, self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        except S3UploadFailedError as exc:  # boto3's transfer wraps the ClientError in its own
            raise ModelStoreUnavailable(f"{self.describe()}: uploading {path} to {key}: {exc}") from exc
        return sha256, size

    def exists(self, key: str) -> bool:
        return self._head(check_key(key)) is not None

    def _head(self, key: str) -> dict | None:
        """The object's metadata, or None when there is no such object."""
        try:
            with self._translated_errors(f"looking up {key}"):
                return self.client.head_object(Bucket=self.bucket, Key=key)
        except ModelObjectMissing:
            return None

    def fetch(self, key: str, dest_path: str, sha256: str, size: int) -> None:
        """Download into a temporary file beside dest_path; verified, fsynced, renamed into place."""
        check_key(key)
        with self._translated_errors(f"downloading {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                write_verified(body.iter_chunks(CHUNK), dest_path, sha256, size)
            finally:
                body.close()

    @contextlib.contextmanager
    def _translated_errors(self, action: str) -> Iterator[None]:
        """boto3 and botocore errors become ModelStoreErrors with one line that says what and where."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, action) from exc
        except BotoCoreError as exc:
            phrase, retried = transport_failure(exc)
            attempts = f" (after up to {self.max_attempts} attempts)" if retried else ""
            raise ModelStoreUnavailable(f"{self.describe()}: {action}: {phrase}{attempts}") from exc

    def _client_error(self, exc: Any, action: str) -> ModelStoreError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        where = f"{self.describe()}: {action}"
        if code in _MISSING_CODES:
            return ModelObjectMissing(f"{where}: no such object")
        if code == "NoSuchBucket":
            return ModelStoreUnavailable(f"{where}: bucket {self.bucket!r} does not exist")
        if code in _DENIED_CODES:
            return ModelStoreAccessDenied(f"{where}: access denied ({code}); check the AWS credentials "
                                         f"and the bucket policy")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = error.get("Message") or "no message"
        retried = f" (after up to {self.max_attempts} attempts)" if (status or 0) >= 500 else ""
        return ModelStoreUnavailable(f"{where}: the store answered {code or status}: {message}{retried}")


def transport_failure(exc: Exception) -> tuple[str, bool]:
    """A short phrase for a botocore transport or configuration error, and whether it was retried.

    The phrase never echoes the exception's text for credential errors.
    """
    from botocore import exceptions as errors

    phrases = (  # most specific first: ConnectTimeoutError is an EndpointConnectionError
        (errors.NoCredentialsError, "no AWS credentials found (environment, shared files, or instance role)", False),
        (errors.PartialCredentialsError, "incomplete AWS credentials", False),
        (errors.ConnectTimeoutError, "timed out connecting to the endpoint", True),
        (errors.ReadTimeoutError, "timed out waiting for the endpoint to answer", True),
        (errors.EndpointConnectionError, "cannot connect to the endpoint", True),
        (errors.ConnectionClosedError, "the endpoint closed the connection", True),
        (errors.ResponseStreamingError, "the connection broke while reading the object", False),
        (errors.IncompleteReadError, "the endpoint sent less than the object's length", False),
    )
    for error_type, phrase, retried in phrases:
        if isinstance(exc, error_type):
            return phrase, retried
    return f"{type(exc).__name__}: {exc}", False


def open_model_store(settings: Settings) -> ModelStore:
    """S3 when MODEL_BUCKET is set, else the local folder store under $SIRA_DATA_DIR/store."""
    if settings.model_bucket:
        return S3ModelStore(settings.model_bucket, settings.s3_endpoint_url)
    return LocalModelStore(data_path(settings.data_dir, STORE_DIR))
