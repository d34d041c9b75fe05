"""Cost of the body deadline's ASGI wrapper (app/http/body_deadline.py) on the request path, in microseconds.

Run: ``python -m bench.bench_body_deadline [--rounds N]``. On a uvloop loop, like the workers,
an ASGI app that reads one body event and answers is called directly and through `BodyDeadline`,
alternating in blocks of 1000 calls; the receive returns at once, as it does for a body that
arrived with its headers (the common case). The difference of the two medians is what every
request pays for the wrapper. The deadline's timer (workers/http_worker.py) is armed only for a
body that did not come with its headers, so the common case pays nothing for it.
"""

from __future__ import annotations

import argparse
import statistics
from time import perf_counter_ns

import uvloop

from app.http.body_deadline import BodyDeadline

SCOPE = {"type": "http", "headers": []}
EVENT = {"type": "http.request", "body": b'{"event_id": "e"}', "more_body": False}
BLOCK = 1000


async def receive():
    return EVENT


async def send(message):
    pass


async def app(scope, receive_, send_):
    await receive_()
    await send_(EVENT)


async def block_ns(target) -> float:
    started = perf_counter_ns()
    for _ in range(BLOCK):
        await target(SCOPE, receive, send)
    return (perf_counter_ns() - started) / BLOCK


async def measure(rounds: int) -> dict[str, float]:
    wrapped = BodyDeadline(app, 10.0)
    direct, bounded = [], []
    for _ in range(rounds):
        direct.append(await block_ns(app))
        bounded.append(await block_ns(wrapped))
    return {"direct": statistics.median(direct) / 1000, "BodyDeadline": statistics.median(bounded) / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    result = uvloop.run(measure(args.rounds))
    for name, micros in result.items():
        print(f"{name:14} {micros:7.3f} us per request (median of {args.rounds} blocks of {BLOCK})")
    print(f"{'added':14} {result['BodyDeadline'] - result['direct']:7.3f} us per request")


if __name__ == "__main__":
    main()
