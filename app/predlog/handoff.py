"""Predictions that outlive the pod: a writer that stops with Postgres away hands its disk to the bucket.

A pod's data dir may be an emptyDir that is deleted with the pod (a rollout, a scale-down, an
eviction). If Postgres is away when the writer stops, the predictions waiting in its spool batches
and in the workers' overflow files would go with it. So the writer, at the end of its drain, uploads
each of those files to the model bucket (S3 is what every pod shares and keeps) under
``<SIRA_SPOOL_HANDOFF_PREFIX><instance>/<batches|overflow>/<file name>`` and removes the local file
once the bucket holds it whole (its sha256 travels with the upload and S3 checks it).

Any writer of any instance replays the handed-off objects once Postgres answers: it lists the
prefix and, for each object, takes a Postgres advisory lock named after the key (so two pods never
replay one object at once), inserts the records idempotently (``ON CONFLICT (prediction_id, created_at) DO
NOTHING``: a replay interrupted after its commit and repeated lands nothing twice), commits, and
deletes the object. The local model store (no MODEL_BUCKET) has no handoff: its spool stays in the
data dir, which on one machine is what outlives the process.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from app.predlog.files import decode_overflow
from app.predlog.spool import decode_batch

log = logging.getLogger("sira.writer")

BATCHES, OVERFLOW, CORRUPT = "batches", "overflow", "corrupt"


class HandoffError(Exception):
    """The bucket could not take or give an object now (one line: what and why)."""


@dataclasses.dataclass(frozen=True)
class HandedOff:
    """One object of the handoff prefix, read back: its key, its records, and damaged bytes after them."""

    key: str
    records: list[bytes]
    damaged: bytes = b""


class SpoolHandoff:
    """The handoff prefix of one bucket, through the model store's boto3 client."""

    def __init__(self, store: Any, prefix: str) -> None:
        self.store = store  # an S3ModelStore: .client, .bucket, .describe()
        self.prefix = prefix

    def describe(self) -> str:
        return f"{self.store.describe()}/{self.prefix}"

    # -- at stop: upload ---------------------------------------------------------------------------

    def hand_off(self, instance_id: str, kind: str, path: str) -> str:
        """Upload one spool or overflow file, check it, then remove it locally; returns its key."""
        with open(path, "rb") as handle:
            data = handle.read()
        key = f"{self.prefix}{instance_id}/{kind}/{os.path.basename(path)}"
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        with self._errors(f"uploading {path}"):
            self.store.client.put_object(Bucket=self.store.bucket, Key=key, Body=data,
                                         ChecksumSHA256=checksum, ContentType="application/octet-stream")
            stored = self.store.client.head_object(Bucket=self.store.bucket, Key=key)
        if stored.get("ContentLength") != len(data):
            raise HandoffError(f"{self.describe()}: {key} holds {stored.get('ContentLength')} bytes, not {len(data)}")
        os.unlink(path)
        return key

    # -- when Postgres answers: replay -------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every handed-off object, oldest instance first (names sort by kind, then sequence)."""
        keys: list[str] = []
        with self._errors("listing the handed-off spool"):
            pages = self.store.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.store.bucket, Prefix=self.prefix)
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(key for key in keys if not key.startswith(f"{self.prefix}{CORRUPT}/"))

    def read(self, key: str) -> HandedOff | None:
        """The records of one object; None when another writer replayed and deleted it meanwhile."""
        from botocore.exceptions import ClientError

        with self._errors(f"downloading {key}"):
            try:
                data = self.store.client.get_object(Bucket=self.store.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        return decode_object(key, data)

    def keep_damaged(self, key: str, data: bytes) -> str:
        """Damaged bytes of a replayed object stay in the bucket, under ``<prefix>corrupt/``, for a person."""
        kept = f"{self.prefix}{CORRUPT}/{key[len(self.prefix):]}"
        with self._errors(f"keeping the damaged part of {key}"):
            self.store.client.put_object(Bucket=self.store.bucket, Key=kept, Body=data)
        return kept

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key}"):
            self.store.client.delete_object(Bucket=self.store.bucket, Key=key)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """boto3 and botocore errors become one-line HandoffErrors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise HandoffError(f"{self.describe()}: {action}: {exc}") from None


def decode_object(key: str, data: bytes) -> HandedOff:
    """The records of a handed-off file, by its kind (the folder it came from)."""
    kind = key.rsplit("/", 2)[-2] if key.count("/") >= 2 else ""
    if kind == BATCHES:
        return HandedOff(key, decode_batch(data, key))
    if kind == OVERFLOW:
        found = decode_overflow(data)  # a torn last frame was never answered: it is dropped
        return HandedOff(key, found.records, b"" if found.torn else found.rest)
    raise HandoffError(f"{key}: not a batches/ or overflow/ object of the handoff prefix")
