"""The models this worker serves: one ONNX runner per product, built once from files it is handed.

How the files got onto the disk (model store, downloads, verification) is not this module's
business: the serving process gives the app a list of `ModelFile`s that are already in place.
"""

from __future__ import annotations

import logging
import time

from app.config import ModelFile
from app.scoring.features import FeatureSpec
from app.scoring.runner import ModelRunner

log = logging.getLogger("sira.models")


class ServingModel:
    """A loaded model with everything the request path needs, built once."""

    __slots__ = ("model_id", "name", "version", "product", "role", "spec", "runner", "threshold",
                 "loaded_at", "row")

    def __init__(self, model_file: ModelFile):
        self.model_id = model_file.model_id
        self.name = model_file.name
        self.version = model_file.version
        self.product = model_file.product
        self.role = model_file.role
        self.spec = FeatureSpec.from_dict(model_file.spec)
        self.runner = ModelRunner(model_file.path, self.spec)
        self.runner.smoke_check()
        self.threshold = float(model_file.threshold)
        self.loaded_at = time.time()
        # The runner's own input buffer: features are built straight into the tensor the session
        # reads (no copy). Safe to reuse: a worker scores one request at a time on its event loop.
        self.row = self.runner.input_row


class ModelTable:
    """product -> production ServingModel for this worker, and which products still lack one."""

    def __init__(self, expected_products: list[str]):
        self.expected_products = sorted(set(expected_products))
        self.production: dict[str, ServingModel] = {}
        self.load_errors: dict[str, str] = {}

    def load(self, model_files: list[ModelFile]) -> None:
        """Build a runner per file; a file that fails is logged and its product stays not ready."""
        for model_file in model_files:
            try:
                model = ServingModel(model_file)
            except Exception as exc:  # any load failure keeps the other products serving
                self.load_errors[model_file.product] = f"{type(exc).__name__}: {exc}"
                log.error("model %s (%s) failed to load: %s", model_file.model_id, model_file.product, exc)
                continue
            self.production[model.product] = model
            log.info("loaded model %s %s for %s", model.model_id, model.version, model.product)

    def get(self, product: str) -> ServingModel | None:
        return self.production.get(product)

    def route(self, product: str, event_id: str) -> tuple[ServingModel | None, ServingModel | None,
                                                         ServingModel | None]:
        """(the model that answers, a shadow model or None, a skipped canary or None).

        A table loaded from files has no canary; app/model_swap.LiveModelTable routes.
        """
        return self.production.get(product), None, None

    def missing_products(self) -> list[str]:
        return [product for product in self.expected_products if product not in self.production]

    # A table loaded once from files; app/model_swap.LiveModelTable follows the supervisor instead.

    def refresh(self) -> None:
        """Nothing to follow."""

    def generation(self) -> int | None:
        return None

    def loaded_at(self, model_id: str) -> str | None:
        return None

    def waiting_reason(self) -> str | None:
        """Why the table cannot be ready yet (beyond missing products), or None."""
        return None
