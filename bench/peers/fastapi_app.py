"""The seeds' stack: FastAPI + pydantic on uvicorn, same model, same request, same work."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from bench.peers.common import load_demo_model, score_body

MODEL = load_demo_model()
app = FastAPI()


class Payload(BaseModel):
    amount: float
    currency: str
    country: str
    payment_method: str
    features: dict = {}


class InferRequest(BaseModel):
    event_id: str
    product: str
    payload: Payload


@app.post("/v1/infer")
async def infer(request: InferRequest) -> dict:
    return score_body(MODEL, request.model_dump())
