"""The model store: where published model files live, addressed by their sha256.

`LocalModelStore` (a folder in the data dir) is the embedded default. Every store has the same
small interface: `put_file`, `fetch`, `exists`.
"""

from __future__ import annotations

import hashlib
import os
import shutil

CHUNK = 1 << 20


class ModelIntegrityError(Exception):
    """A fetched model file does not have the sha256 or size the registry records."""


def sha256_of(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def storage_key(sha256: str) -> str:
    return f"models/{sha256}.onnx"


def install_verified(source_path: str, dest_path: str, sha256: str, size: int) -> None:
    """Copy to a temporary file beside dest, check sha256 and size, fsync, then rename atomically."""
    os.makedirs(os.path.dirname(dest_path), exist_ok=True)
    tmp_path = f"{dest_path}.tmp-{os.getpid()}"
    try:
        shutil.copyfile(source_path, tmp_path)
        verify_and_publish(tmp_path, dest_path, sha256, size)
    finally:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


def verify_and_publish(tmp_path: str, dest_path: str, sha256: str, size: int) -> None:
    actual_sha, actual_size = sha256_of(tmp_path)
    if actual_sha != sha256 or actual_size != size:
        raise ModelIntegrityError(
            f"{os.path.basename(dest_path)}: expected sha256 {sha256} ({size} bytes), "
            f"got {actual_sha} ({actual_size} bytes)")
    with open(tmp_path, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_path, dest_path)
    directory = os.open(os.path.dirname(dest_path), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class LocalModelStore:
    """A folder store: objects under root/models/<sha256>.onnx."""

    def __init__(self, root: str):
        self.root = root

    def object_path(self, key: str) -> str:
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

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.object_path(key))

    def fetch(self, key: str, dest_path: str, sha256: str, size: int) -> None:
        """Put the object at dest_path, verified against sha256 and size, atomically."""
        install_verified(self.object_path(key), dest_path, sha256, size)
