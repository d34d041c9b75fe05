"""Prediction ids (app/ids.py): UUIDv7, monotonic in a process, distinct across a fork, their time read back."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from app.ids import id_time_ms, new_prediction_id


def test_an_id_is_a_canonical_version_7_rfc_9562_uuid():
    value = new_prediction_id()
    parsed = uuid.UUID(value)
    assert str(parsed) == value  # lower-case hex with hyphens, what the API and Postgres show
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122  # the variant bits are 10


def test_ids_made_one_after_another_sort_in_that_order():
    ids = [new_prediction_id() for _ in range(100_000)]
    assert all(earlier < later for earlier, later in zip(ids, ids[1:]))
    assert len(set(ids)) == len(ids)


def test_a_forked_child_never_repeats_its_parents_ids():
    new_prediction_id()  # the generator's state exists before the fork, as in gunicorn's master
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids go to the parent through the pipe
        try:
            os.close(read_end)
            data = "\n".join(new_prediction_id() for _ in range(2000)).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(write_end)
    parent = {new_prediction_id() for _ in range(2000)}
    with os.fdopen(read_end, "rb") as pipe:
        child = set(pipe.read().decode().split("\n"))
    os.waitpid(pid, 0)
    assert len(child) == 2000
    assert not parent & child
    # Equal ids need the same millisecond, which fork's timing makes rare; the random low 32 bits
    # of each id show whether the child drew its own: with its parent's generator state it would
    # repeat the parent's draws, whatever the clock.
    assert len({value[-8:] for value in parent} & {value[-8:] for value in child}) <= 2


def test_the_time_of_an_id_is_the_wall_clock_when_it_was_made():
    before = time.time() * 1000
    value = new_prediction_id()
    after = time.time() * 1000
    assert before - 2 <= id_time_ms(value) <= after + 2
    assert id_time_ms(value.encode()) == id_time_ms(value)  # as sliced out of a record's bytes


def test_the_time_of_a_known_id_is_its_first_48_bits():
    assert id_time_ms("01890a5d-ac96-774b-bcce-b302099a8057") == 0x01890A5DAC96


@pytest.mark.parametrize("value", [
    str(uuid.uuid4()),                          # rows made before ids were v7
    "01890a5d-ac96-774b-7cce-b302099a8057",     # version 7 but not the RFC variant
    "01890A5D-AC96-774B-BCCE-B302099A8057",     # not canonical (the API lower-cases ids first)
    "01890a5d-ac96-774b-bcce-b302099a805",      # short
    "+1890a5d-ac96-774b-bcce-b302099a8057",     # int() would take it
    "", "nope",
])
def test_an_id_that_is_not_a_canonical_v7_has_no_time(value):
    assert id_time_ms(value) is None
