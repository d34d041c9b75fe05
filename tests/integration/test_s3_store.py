"""S3ModelStore over HTTP: against moto's S3 server, and against small misbehaving servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
from collections.abc import Callable, Iterator

import pytest

from app.store.buckets import (
    ModelIntegrityError,
    ModelObjectMissing,
    ModelStoreAccessDenied,
    ModelStoreUnavailable,
    S3ModelStore,
    storage_key,
)
from tests.fixtures.server import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    return str(path)


def file_facts(path) -> tuple[str, int]:
    data = open(path, "rb").read()
    return hashlib.sha256(data).hexdigest(), len(data)


def store_for(bucket, **options) -> S3ModelStore:
    return S3ModelStore(bucket.name, bucket.endpoint_url, **options)


def test_put_then_fetch_round_trips_through_the_bucket(s3_bucket, model_file, tmp_path):
    store = store_for(s3_bucket)
    key, sha256, size = store.put_file(model_file)
    assert (sha256, size) == file_facts(model_file)
    assert key == storage_key(sha256)
    assert s3_bucket.keys() == [key]
    head = s3_bucket.client().head_object(Bucket=s3_bucket.name, Key=key)
    assert head["ContentLength"] == size and head["Metadata"]["sha256"] == sha256
    dest = tmp_path / "models" / f"{sha256}.onnx"
    store.fetch(key, str(dest), sha256, size)
    assert file_facts(dest) == (sha256, size)
    assert os.listdir(dest.parent) == [dest.name]


def test_a_large_model_streams_in_chunks(s3_bucket, tmp_path):
    path = tmp_path / "large.onnx"
    path.write_bytes(os.urandom(24 * 1024 * 1024 + 3))
    store = store_for(s3_bucket)
    key, sha256, size = store.put_file(str(path))
    store.fetch(key, str(tmp_path / "copy.onnx"), sha256, size)
    assert file_facts(tmp_path / "copy.onnx") == (sha256, size)


def test_publishing_the_same_file_twice_keeps_one_object(s3_bucket, model_file):
    store = store_for(s3_bucket)
    assert store.put_file(model_file) == store.put_file(model_file)
    assert len(s3_bucket.keys()) == 1


def test_a_truncated_object_is_replaced_on_the_next_put(s3_bucket, model_file):
    store = store_for(s3_bucket)
    key, sha256, size = store.put_file(model_file)
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key=key, Body=b"truncated")
    store.put_file(model_file)
    body = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256


def test_exists_tells_present_from_absent(s3_bucket, model_file):
    store = store_for(s3_bucket)
    key, _, _ = store.put_file(model_file)
    assert store.exists(key)
    assert not store.exists(storage_key("b" * 64))


def test_fetch_of_a_missing_object_is_missing(s3_bucket, tmp_path):
    store = store_for(s3_bucket)
    with pytest.raises(ModelObjectMissing, match="no such object"):
        store.fetch(storage_key("c" * 64), str(tmp_path / "m.onnx"), "c" * 64, 100)
    assert os.listdir(tmp_path) == []


def test_a_tampered_object_never_reaches_its_destination(s3_bucket, model_file, tmp_path):
    store = store_for(s3_bucket)
    key, sha256, size = store.put_file(model_file)
    tampered = bytearray(open(model_file, "rb").read())
    tampered[1000] ^= 0xFF  # same size, one byte flipped
    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key=key, Body=bytes(tampered))
    dest = tmp_path / "models" / "m.onnx"
    with pytest.raises(ModelIntegrityError, match=sha256):
        store.fetch(key, str(dest), sha256, size)
    assert os.listdir(dest.parent) == [], "neither the file nor a temporary one may stay"


def test_a_missing_bucket_is_named(s3_endpoint, s3_credentials, model_file):
    store = S3ModelStore("sira-no-such-bucket", s3_endpoint)
    with pytest.raises(ModelStoreUnavailable, match="bucket 'sira-no-such-bucket' does not exist"):
        store.put_file(model_file)


def test_missing_credentials_are_a_clear_error(s3_bucket, monkeypatch, model_file):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ModelStoreUnavailable, match="no AWS credentials found") as caught:
        store_for(s3_bucket, max_attempts=1).put_file(model_file)
    assert caught.value.reason == "unavailable"


def test_an_endpoint_that_refuses_connections_fails_after_its_retries(s3_credentials, model_file):
    port = free_port()  # bound once and released: nothing listens there
    store = S3ModelStore("sira-models", f"http://127.0.0.1:{port}", connect_timeout_s=1, max_attempts=3)
    with pytest.raises(ModelStoreUnavailable, match="cannot connect to the endpoint .after up to 3 attempts"):
        store.put_file(model_file)


# Small S3 impostors: each request is answered by a function of its number, and counted.

class ScriptedS3(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: Callable[[int, http.server.BaseHTTPRequestHandler], None]):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.answer = answer
        self.requests = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def do_any(self):
        with self.server.lock:
            self.server.requests += 1
            number = self.server.requests
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.answer(number, self)

    do_GET = do_HEAD = do_PUT = do_any

    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def scripted_s3(answer) -> Iterator[ScriptedS3]:
    server = ScriptedS3(answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def send(handler, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def slow_down(handler) -> None:
    send(handler, 503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
         {"Content-Type": "application/xml"})


def test_transient_errors_are_retried_until_one_succeeds(s3_credentials):
    def answer(number, handler):
        if number <= 2:
            slow_down(handler)
        else:
            send(handler, 200, headers={"Content-Type": "application/octet-stream", "ETag": '"x"'})

    with scripted_s3(answer) as server:
        store = S3ModelStore("sira-models", server.url, max_attempts=4)
        assert store.exists(storage_key("d" * 64))
        assert server.requests == 3


def test_a_store_that_keeps_failing_is_tried_max_attempts_times(s3_credentials):
    with scripted_s3(lambda number, handler: slow_down(handler)) as server:
        store = S3ModelStore("sira-models", server.url, max_attempts=3)
        with pytest.raises(ModelStoreUnavailable, match=r"answered 503: .* \(after up to 3 attempts\)"):
            store.exists(storage_key("e" * 64))
        assert server.requests == 3


def test_a_store_that_never_answers_times_out(s3_credentials):
    def hang(number, handler):
        handler.server.release.wait(60)
        handler.close_connection = True

    with scripted_s3(hang) as server:
        store = S3ModelStore("sira-models", server.url, read_timeout_s=0.5, max_attempts=2)
        with pytest.raises(ModelStoreUnavailable, match="timed out waiting for the endpoint"):
            store.exists(storage_key("f" * 64))
        assert server.requests == 2


def test_a_download_cut_short_leaves_no_file(s3_credentials, tmp_path):
    body = os.urandom(300_000)
    sha256 = hashlib.sha256(body).hexdigest()

    def cut(number, handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        handler.wfile.write(body[:100_000])
        handler.wfile.flush()
        handler.close_connection = True

    with scripted_s3(cut) as server:
        store = S3ModelStore("sira-models", server.url, max_attempts=2)
        dest = tmp_path / "models" / "m.onnx"
        with pytest.raises(ModelStoreUnavailable, match="less than the object's length|connection broke"):
            store.fetch(storage_key(sha256), str(dest), sha256, len(body))
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def denied(handler) -> None:
    send(handler, 403, headers={"Content-Type": "application/xml"})


def test_a_publisher_without_list_permission_still_uploads(s3_credentials, model_file):
    """Without s3:ListBucket, S3 answers 403 (not 404) to a HEAD of a missing object."""
    sha256, size = file_facts(model_file)
    uploaded = []

    def answer(number, handler):
        if handler.command == "PUT":
            uploaded.append(handler.path)
            send(handler, 200, headers={"ETag": '"x"'})
        elif handler.command == "HEAD" and uploaded:
            send(handler, 200, headers={"Content-Type": "application/octet-stream", "ETag": '"x"',
                                        "Content-Length": str(size)})
        else:
            denied(handler)

    with scripted_s3(answer) as server:
        store = S3ModelStore("sira-models", server.url, max_attempts=1)
        assert store.put_file(model_file) == (storage_key(sha256), sha256, size)
    assert uploaded == [f"/sira-models/{storage_key(sha256)}"]


def test_denied_access_is_named_and_counts_as_unavailable(s3_credentials, tmp_path):
    with scripted_s3(lambda number, handler: denied(handler)) as server:
        with pytest.raises(ModelStoreAccessDenied, match="access denied") as caught:
            S3ModelStore("sira-models", server.url).fetch(storage_key("a" * 64), str(tmp_path / "m"), "a" * 64, 1)
    assert caught.value.reason == "unavailable"
