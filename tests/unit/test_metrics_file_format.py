"""app/telemetry/request_metrics.py writes prometheus_client's multiprocess files itself (for speed), so it
depends on a private format; setup.cfg pins prometheus_client's minor version, and these tests fail
when a new version reads or lays out the files differently."""

from __future__ import annotations

import json
import os
import struct

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from app.telemetry.metrics import LATENCY, REQUESTS
from app.telemetry.request_metrics import HotValueFile

LABELS = {"product": "fraud_score", "model_id": "m-1", "model_role": "production", "decision": "allow",
          "status": "200"}
LATENCY_LABELS = {name: LABELS[name] for name in LATENCY.labels}


def write_some(folder: str) -> None:
    hot = HotValueFile(folder, 4242)
    count = hot.counter(REQUESTS, tuple(LABELS[name] for name in REQUESTS.labels))
    count()
    count(2)
    observe = hot.histogram(LATENCY, tuple(LATENCY_LABELS.values()))
    observe(0.0031)
    observe(0.2)


def test_prometheus_clients_own_collector_reads_what_the_request_path_writes(tmp_path):
    write_some(str(tmp_path))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(tmp_path))
    sample = registry.get_sample_value
    assert sample("sira_inference_requests_total", LABELS) == 3
    assert sample("sira_inference_latency_seconds_count", LATENCY_LABELS) == 2
    assert abs(sample("sira_inference_latency_seconds_sum", LATENCY_LABELS) - 0.2031) < 1e-9
    assert sample("sira_inference_latency_seconds_bucket", {**LATENCY_LABELS, "le": "+Inf"}) == 2


def read_entries(path: str) -> dict[str, float]:
    """The file as this code expects it: i32 bytes used, 4 bytes of padding, then entries of an i32 key
    length, the UTF-8 key (a JSON list), padding to 8 bytes, an f64 value and an f64 timestamp."""
    with open(path, "rb") as handle:
        data = handle.read()
    (used,) = struct.unpack_from("i", data, 0)
    entries, pos = {}, 8
    while pos < used:
        (length,) = struct.unpack_from("i", data, pos)
        key = data[pos + 4:pos + 4 + length].decode("utf-8")
        pos += 4 + length + (8 - (length + 4) % 8)
        value, _timestamp = struct.unpack_from("dd", data, pos)
        entries[key] = value
        pos += 16
    assert pos == used
    return entries


def test_the_files_have_the_layout_this_code_was_written_for(tmp_path):
    write_some(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["counter_4242-requests.db", "histogram_4242-requests.db"]
    counters = read_entries(str(tmp_path / "counter_4242-requests.db"))
    key = json.dumps(["sira_inference_requests", "sira_inference_requests_total", LABELS, REQUESTS.documentation],
                     sort_keys=True)
    assert counters == {key: 3.0}
    histograms = read_entries(str(tmp_path / "histogram_4242-requests.db"))
    sums = [value for key, value in histograms.items() if json.loads(key)[1] == "sira_inference_latency_seconds_sum"]
    assert len(sums) == 1 and abs(sums[0] - 0.2031) < 1e-9
