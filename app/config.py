"""What the serving process hands each worker's app; importing it loads no model runtime.

The gunicorn master imports this before it forks. It must not import onnxruntime: a child forked
from a process that loaded onnxruntime hangs in onnxruntime's exit handlers (measured: a forked
worker never exits, so SIGTERM waits out the whole graceful timeout).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A verified model file on local disk with its registry facts."""

    model_id: str
    name: str
    version: str
    product: str
    path: str
    spec: dict
    threshold: float
    role: str = "production"


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """Everything a worker needs to build its app."""

    model_files: list[ModelFile]
    expected_products: list[str]
    authenticator: Any  # app.auth.Authenticator
    max_body_bytes: int = 1_048_576
    batch_max: int = 256
