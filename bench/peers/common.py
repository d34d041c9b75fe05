"""What every peer app shares: the demo model and its spec, loaded once per process."""

from __future__ import annotations

import uuid

from app.config import ModelFile
from app.scoring.features import decide
from app.scoring.models import ServingModel
from workers.bootstrap import demo_files


def load_demo_model() -> ServingModel:
    """The committed demo model, as SIRA's workers load it."""
    path, spec = demo_files()
    return ServingModel(ModelFile(model_id=str(uuid.uuid5(uuid.NAMESPACE_URL, path)), name=spec["name"],
                                  version="bench", product=spec["product"], path=path, spec=spec,
                                  threshold=spec["threshold"]))


def score_body(model: ServingModel, body: dict) -> dict:
    """Score one infer request with an explanation: the same work SIRA does, without auth, cache or log."""
    row = model.row
    model.spec.build_row(body["payload"], row)
    score, explanation = model.runner.explain_row(row)
    return {"prediction_id": str(uuid.uuid4()), "model_id": model.model_id, "model_role": "production",
            "score": score, "decision": decide(score, model.threshold), "explain_summary": explanation,
            "cached": False}
