"""Scoring: feature specs, the ONNX runner, runs with deadlines, canary routing, the prediction cache."""
