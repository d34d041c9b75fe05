"""The local model store and the verified, atomic write every fetch goes through."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import threading

import pytest

from app.store.buckets import (
    LocalModelStore,
    ModelIntegrityError,
    ModelObjectMissing,
    ModelStoreAccessDenied,
    ModelStoreError,
    ModelStoreUnavailable,
    S3ModelStore,
    check_key,
    open_model_store,
    storage_key,
    write_verified,
)
from conf.datadir import TMP_SUFFIX
from conf.settings import load_settings


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several chunks and a partial one
    return str(path)


def digest(path) -> tuple[str, int]:
    data = open(path, "rb").read()
    return hashlib.sha256(data).hexdigest(), len(data)


def test_put_file_stores_the_object_under_its_sha256(tmp_path, model_file):
    store = LocalModelStore(str(tmp_path / "store"))
    key, sha256, size = store.put_file(model_file)
    assert (sha256, size) == digest(model_file)
    assert key == f"models/{sha256}.onnx" == storage_key(sha256)
    assert store.exists(key)
    assert open(store.object_path(key), "rb").read() == open(model_file, "rb").read()


def test_put_file_twice_keeps_one_object(tmp_path, model_file):
    store = LocalModelStore(str(tmp_path / "store"))
    assert store.put_file(model_file) == store.put_file(model_file)
    assert len(os.listdir(tmp_path / "store" / "models")) == 1


def test_fetch_writes_a_verified_readable_file(tmp_path, model_file):
    store = LocalModelStore(str(tmp_path / "store"))
    key, sha256, size = store.put_file(model_file)
    dest = tmp_path / "models" / "new" / f"{sha256}.onnx"
    store.fetch(key, str(dest), sha256, size)
    assert digest(dest) == (sha256, size)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644
    assert os.listdir(dest.parent) == [dest.name]


@pytest.mark.parametrize("wrong", ["sha256", "size_smaller", "size_larger"])
def test_fetch_with_wrong_facts_fails_and_leaves_nothing(tmp_path, model_file, wrong):
    store = LocalModelStore(str(tmp_path / "store"))
    key, sha256, size = store.put_file(model_file)
    if wrong == "sha256":
        sha256 = "0" * 64
    else:
        size += -1 if wrong == "size_smaller" else 1
    dest = tmp_path / "models" / "model.onnx"
    with pytest.raises(ModelIntegrityError) as caught:
        store.fetch(key, str(dest), sha256, size)
    assert caught.value.reason == "integrity"
    assert os.listdir(dest.parent) == [], "no partial or temporary file may stay behind"


def test_failed_fetch_keeps_the_previous_file(tmp_path, model_file):
    store = LocalModelStore(str(tmp_path / "store"))
    key, sha256, size = store.put_file(model_file)
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"previous generation")
    with pytest.raises(ModelIntegrityError):
        store.fetch(key, str(dest), "f" * 64, size)
    assert dest.read_bytes() == b"previous generation"


def test_fetch_of_a_missing_object_says_so(tmp_path):
    store = LocalModelStore(str(tmp_path / "store"))
    with pytest.raises(ModelObjectMissing) as caught:
        store.fetch(storage_key("a" * 64), str(tmp_path / "m.onnx"), "a" * 64, 10)
    assert caught.value.reason == "missing"
    assert "a" * 64 in str(caught.value)
    assert not store.exists(storage_key("a" * 64))


def test_an_endless_object_is_cut_at_the_recorded_size(tmp_path):
    endless = itertools.repeat(b"x" * 4096)
    with pytest.raises(ModelIntegrityError, match="more than the 10000 bytes"):
        write_verified(endless, str(tmp_path / "m.onnx"), "0" * 64, 10000)
    assert os.listdir(tmp_path) == []


def test_concurrent_fetches_of_one_file_do_not_collide(tmp_path, model_file):
    store = LocalModelStore(str(tmp_path / "store"))
    key, sha256, size = store.put_file(model_file)
    dest = str(tmp_path / "models" / "m.onnx")
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            store.fetch(key, dest, sha256, size)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert digest(dest) == (sha256, size)
    assert not [name for name in os.listdir(tmp_path / "models") if name.endswith(TMP_SUFFIX)]


@pytest.mark.parametrize("key", ["../outside.onnx", "/etc/passwd", "models/../../outside.onnx", "", "models//x",
                                 "models/./x", "models\\x", "a\x00b", ".hidden", "models/" + "x" * 1100])
def test_keys_that_could_leave_the_store_are_refused(tmp_path, key):
    store = LocalModelStore(str(tmp_path / "store"))
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        store.fetch(key, str(tmp_path / "dest.onnx"), "0" * 64, 1)
    assert not os.path.exists(tmp_path / "dest.onnx")


@pytest.mark.parametrize("key", ["models/" + "a" * 64 + ".onnx", "fraud_score/v1/model.onnx", "m-1_2.onnx"])
def test_plain_relative_keys_are_accepted(key):
    assert check_key(key) == key


def test_a_symlink_inside_the_store_cannot_lead_out_of_it(tmp_path):
    outside = tmp_path / "secret.onnx"
    outside.write_bytes(b"secret")
    (tmp_path / "store").mkdir()
    os.symlink(tmp_path, tmp_path / "store" / "models")
    store = LocalModelStore(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="leaves the model store"):
        store.fetch("models/secret.onnx", str(tmp_path / "copy.onnx"), hashlib.sha256(b"secret").hexdigest(), 6)


def test_storage_key_needs_a_hex_sha256():
    with pytest.raises(ValueError):
        storage_key("../../etc/passwd")


def test_every_store_failure_is_a_model_store_error_with_a_reason():
    classes = (ModelStoreUnavailable, ModelStoreAccessDenied, ModelObjectMissing, ModelIntegrityError)
    assert all(issubclass(cls, ModelStoreError) for cls in classes)
    assert sorted(cls.reason for cls in classes) == ["integrity", "missing", "unavailable", "unavailable"]


def test_factory_picks_the_local_store_without_a_bucket(tmp_path):
    store = open_model_store(load_settings({"SIRA_DATA_DIR": str(tmp_path)}))
    assert isinstance(store, LocalModelStore)
    assert store.root == str(tmp_path / "store")


def test_factory_picks_s3_with_a_bucket(tmp_path):
    settings = load_settings({"SIRA_DATA_DIR": str(tmp_path), "MODEL_BUCKET": "sira-models",
                              "S3_ENDPOINT_URL": "http://127.0.0.1:9000"})
    store = open_model_store(settings)
    assert isinstance(store, S3ModelStore)
    assert (store.bucket, store.endpoint_url) == ("sira-models", "http://127.0.0.1:9000")
    assert store.describe() == "s3://sira-models at http://127.0.0.1:9000"


def test_s3_client_is_rebuilt_in_a_forked_child(tmp_path):
    """A child must not share the parent's connection pool."""
    store = S3ModelStore("sira-models", "http://127.0.0.1:9")
    parent_client = store.client
    assert store.client is parent_client
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running pytest's teardown
        try:
            fresh = store.client is not parent_client and store.client is store.client
            os.write(write_end, b"1" if fresh else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"1"
