"""The prediction log on a real `sira serve`: every prediction a client received lands in Postgres once.

The proof of issue 5: 50,000 predictions from concurrent clients while the writer is SIGKILLed
twice and Postgres restarted once; afterwards siramodel_predictions holds exactly the ids the
clients received. Plus GET /v1/infer/{prediction_id}, which finds a prediction made a moment ago
even when the writer has not written it (here: the writer is frozen with SIGSTOP).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid

import httpx
import psycopg

from tests.fixtures.metrics import scrape, total
from tests.fixtures.server import bearer
from tests.fixtures.waiting import wait_for

ERROR_FIELDS = {"error_code", "message", "request_id", "timestamp", "details"}
SEED_FIELDS = {"prediction_id", "model_id", "event_id", "product", "score", "decision", "explain",
               "latency_ms", "model_role", "created_at"}


def event(amount: float = 150.5, explain: bool = True, event_id: str | None = None) -> dict:
    """A small event: 250 of them stay under 64 KiB (gunicorn's asgi worker drops some larger bodies)."""
    return {"event_id": event_id or str(uuid.uuid4()), "product": "fraud_score",
            "payload": {"amount": amount, "currency": "USD", "country": "US", "payment_method": "card"},
            "options": {"include_explanation": explain}}


def writer_pid(server) -> int | None:
    """The live writer named by writer.pid, or None while the master restarts it."""
    try:
        with open(os.path.join(server.data_dir, "writer.pid"), encoding="ascii") as handle:
            pid = int(handle.read().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}") else None



def logged_ids(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT prediction_id::text FROM siramodel_predictions")]


@contextlib.contextmanager
def frozen(pid: int):
    """SIGSTOP a process for the block: it writes nothing, and SIGCONT always follows."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_get_finds_a_prediction_made_a_moment_ago_on_any_worker(server_factory, fresh_db):
    server = server_factory(workers=2)
    pid = wait_for(lambda: writer_pid(server), "the writer")
    made = []
    with frozen(pid):  # nothing reaches Postgres: GET must read the rings
        for _ in range(8):
            with httpx.Client(base_url=server.url, headers=bearer("sira_service"), timeout=10) as client:
                response = client.post("/v1/infer", json=event(), headers={"X-Request-ID": "rid-1"})
                assert response.status_code == 200, response.text
                made.append(response.json())
        assert logged_ids(fresh_db) == []
        for answer in made:  # a new connection each time: both workers answer some
            response = httpx.get(f"{server.url}/v1/infer/{answer['prediction_id']}",
                                 headers=bearer("fraud_analyst"), timeout=10)
            assert response.status_code == 200, response.text
            found = response.json()
            assert SEED_FIELDS <= set(found)
            assert {key: found[key] for key in ("prediction_id", "model_id", "model_role", "score", "decision",
                                                "latency_ms", "cached")} == \
                {key: answer[key] for key in ("prediction_id", "model_id", "model_role", "score", "decision",
                                              "latency_ms", "cached")}
            assert found["explain"] == answer["explain_summary"]
            assert found["product"] == "fraud_score" and found["request_id"] == "rid-1"
            assert found["created_at"].endswith("Z")
    wait_for(lambda: len(logged_ids(fresh_db)) == len(made), "the writer to catch up")
    response = httpx.get(f"{server.url}/v1/infer/{made[0]['prediction_id']}", headers=bearer("ml_ops"))
    assert response.status_code == 200 and response.json()["prediction_id"] == made[0]["prediction_id"]


def test_a_full_ring_spills_and_get_still_finds_the_spilled_predictions(server_factory, fresh_db):
    server = server_factory(workers=1, SIRA_QUEUE_RING_BYTES="65536")
    pid = wait_for(lambda: writer_pid(server), "the writer")
    ids = []
    with frozen(pid), httpx.Client(base_url=server.url, headers=bearer(), timeout=30) as client:
        for _ in range(4):  # ~1000 records: far more than a 64 KiB ring holds
            response = client.post("/v1/infer/batch", json={"events": [event(explain=False) for _ in range(250)]})
            assert response.status_code == 200, response.text
            ids += [result["prediction_id"] for result in response.json()["results"]]
        assert os.listdir(os.path.join(server.data_dir, "spool", "overflow"))
        for prediction_id in (ids[0], ids[-1]):  # one in the ring, one in an overflow file
            assert client.get(f"/v1/infer/{prediction_id}").status_code == 200
        stuck = scrape(server.url)  # the writer is frozen: everything waits in the ring or on disk
        in_ring = total(stuck, "sira_prediction_queue_depth")
        spilled = total(stuck, "sira_prediction_queue_overflow_total")
        assert in_ring > 0 and spilled > 0 and in_ring + spilled == len(ids)
        assert total(stuck, "sira_prediction_rows_written_total") == 0
    wait_for(lambda: len(logged_ids(fresh_db)) == len(ids), "the writer to take the ring and the spill")
    assert sorted(logged_ids(fresh_db)) == sorted(ids)
    assert "is full; spilling" in server.log()
    wait_for(lambda: total(scrape(server.url), "sira_prediction_overflow_files") == 0, "the counters to settle")
    done = scrape(server.url)
    assert total(done, "sira_prediction_queue_depth") == 0
    assert total(done, "sira_prediction_queue_overflow_total") == spilled  # a counter: it never goes down
    assert total(done, "sira_prediction_rows_written_total") == len(ids)
    assert total(done, "sira_prediction_rows_replayed_total") == spilled  # the overflow files went in
    assert total(done, "sira_prediction_batch_rows_sum") == len(ids)
    batches = total(done, "sira_prediction_flush_seconds_count")
    assert batches == total(done, "sira_prediction_batch_rows_count") and batches >= 2
    assert total(done, "sira_prediction_flush_seconds_sum") > 0


def test_a_killed_workers_ring_is_drained_and_its_successor_takes_its_slot(server_factory, fresh_db):
    from shm.ring import QueueRings

    server = server_factory(workers=2)
    writer = wait_for(lambda: writer_pid(server), "the writer")
    (segment,) = [name for name in server.segments(server.master_pid) if name.endswith("-predlog")]
    rings = QueueRings.attach(segment)
    try:
        def producers() -> dict[int, tuple[int, int]]:
            return {slot: rings.reader(slot).producer() for slot in range(rings.slots)}

        wait_for(lambda: all(pid for pid, _epoch in producers().values()), "both workers to take a slot")
        assert {pid for pid, _epoch in producers().values()} == set(server.worker_pids())
        ids = []
        with frozen(writer):
            for _ in range(6):  # new connections: both workers answer some
                with httpx.Client(base_url=server.url, headers=bearer(), timeout=10) as client:
                    response = client.post("/v1/infer/batch", json={"events": [event() for _ in range(20)]})
                    ids += [result["prediction_id"] for result in response.json()["results"]]
            victim_slot, (victim, _epoch) = next((slot, p) for slot, p in producers().items()
                                                 if rings.reader(slot).depth_records())
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: producers()[victim_slot][0] not in (victim, 0) and
                     len(server.worker_pids()) == 2, "the successor to take the slot")
            assert producers()[victim_slot][1] == 2  # the second producer of that slot
            assert rings.reader(victim_slot).depth_records()  # the dead one's records wait for the writer
            with httpx.Client(base_url=server.url, headers=bearer(), timeout=10) as client:
                for _ in range(10):
                    ids.append(client.post("/v1/infer", json=event()).json()["prediction_id"])
        wait_for(lambda: len(logged_ids(fresh_db)) == len(ids), "the writer to drain both rings")
        assert sorted(logged_ids(fresh_db)) == sorted(ids)
    finally:
        rings.close()


def test_get_of_an_unknown_id_is_404_and_a_malformed_one_400(server_factory):
    server = server_factory(workers=1)
    with httpx.Client(base_url=server.url, headers=bearer("fraud_analyst"), timeout=10) as client:
        missing = client.get(f"/v1/infer/{uuid.uuid4()}")
        malformed = client.get("/v1/infer/not-a-uuid")
    for response, status, code in ((missing, 404, "NOT_FOUND"), (malformed, 400, "INVALID_REQUEST")):
        assert response.status_code == status, response.text
        assert set(response.json()) == ERROR_FIELDS and response.json()["error_code"] == code
    forbidden = httpx.get(f"{server.url}/v1/infer/{uuid.uuid4()}", headers=bearer("pay_admin"))
    assert forbidden.status_code == 403
    assert httpx.get(f"{server.url}/v1/infer/{uuid.uuid4()}").status_code == 401


class Clients:
    """Concurrent clients that keep every prediction id they receive (any other answer fails the test)."""

    def __init__(self, url: str, threads: int = 4):
        self.url = url
        self.threads = threads
        self.received: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def run(self, batches: int, singles: int, during=None) -> None:
        """Send ``batches`` batches of 250 and ``singles`` single events; call ``during`` meanwhile."""
        work = [("batch", i) for i in range(batches)] + [("single", i) for i in range(singles)]
        chunks = [work[i::self.threads] for i in range(self.threads)]
        started = threading.Barrier(self.threads + 1)
        workers = [threading.Thread(target=self._client, args=(chunk, started)) for chunk in chunks]
        for thread in workers:
            thread.start()
        started.wait()
        try:
            if during is not None:
                during()
        finally:
            for thread in workers:
                thread.join()
        assert not self.errors, self.errors[:3]

    def _client(self, work: list, started: threading.Barrier) -> None:
        repeated = event(amount=77.0)  # singles repeat one event: cache hits are logged too
        with httpx.Client(base_url=self.url, headers=bearer(), timeout=60) as client:
            started.wait()
            for kind, _ in work:
                try:
                    if kind == "batch":
                        response = client.post("/v1/infer/batch", json={
                            "events": [event(amount=10.0 + i, explain=i % 50 == 0) for i in range(250)]})
                        ids = [result.get("prediction_id") for result in response.json()["results"]]
                    else:
                        response = client.post("/v1/infer", json=dict(repeated, event_id=str(uuid.uuid4())))
                        ids = [response.json().get("prediction_id")]
                except (httpx.HTTPError, ValueError) as exc:
                    self.errors.append(repr(exc))
                    continue
                if response.status_code != 200 or None in ids:
                    self.errors.append(f"{response.status_code}: {response.text[:300]}")
                    continue
                with self.lock:
                    self.received.extend(ids)

    def count(self) -> int:
        with self.lock:
            return len(self.received)


def test_fifty_thousand_predictions_survive_two_writer_kills_and_a_postgres_restart(server_factory,
                                                                                    own_postgres):
    dsn = own_postgres.url
    server = server_factory(workers=2, database_url=dsn, SIRA_QUEUE_RING_BYTES="1048576")
    first_writer = wait_for(lambda: writer_pid(server), "the writer")
    clients = Clients(server.url)

    def when_received(count: int) -> None:
        wait_for(lambda: clients.count() >= count, f"{count} predictions", timeout=120)

    def kill_writer(after: int, previous: int | None = None) -> int:
        """SIGKILL the writer (a new one, if ``previous`` names the last one killed)."""
        pid = wait_for(lambda: (writer_pid(server) or previous) != previous and writer_pid(server),
                       "a restarted writer")
        when_received(after)
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_postgres(after: int) -> None:
        when_received(after)
        own_postgres.close()  # stops it (pg_ctl -m fast): the writer's session is cut
        # Down until the writer has met the outage (traffic keeps coming): a fixed pause raced with
        # the writer's restart backoff, and then the writer never saw Postgres away.
        wait_for(lambda: "Postgres is away" in server.log(), "the writer to meet the outage", timeout=60)
        own_postgres.open()
        wait_for(lambda: "Postgres is back" in server.log(), "the writer to replay its spool", timeout=60)

    # 196 batches of 250 plus 1,000 single requests: 50,000 predictions, in two rounds so that each
    # disruption meets traffic.
    clients.run(98, 500, during=lambda: (kill_writer(after=5_000), restart_postgres(after=12_000)))
    clients.run(98, 500, during=lambda: kill_writer(after=32_000, previous=first_writer))
    assert clients.count() == 50_000
    with httpx.Client(base_url=server.url, headers=bearer(), timeout=10) as client:
        for prediction_id in clients.received[-3:]:  # made a moment ago
            assert client.get(f"/v1/infer/{prediction_id}").status_code == 200
    wait_for(lambda: total(scrape(server.url), "sira_prediction_spool_batches") == 0, "the spool to empty")
    figures = scrape(server.url)
    assert total(figures, "sira_prediction_rows_spooled_total") > 0  # the Postgres restart was met
    assert total(figures, "sira_prediction_rows_replayed_total") >= total(figures, "sira_prediction_rows_spooled_total")
    assert total(figures, "sira_prediction_writer_database_up") == 1

    assert server.stop() == 0  # SIGTERM: workers stop, then the writer drains everything
    logged = logged_ids(dsn)
    assert len(logged) == len(set(logged)) == 50_000
    assert set(logged) == set(clients.received)
    log = server.log()
    assert log.count("writer was killed by SIGKILL") == 2
    assert "Postgres is away" in log and "Postgres is back" in log
