"""Metrics, traces and per-model stats."""
