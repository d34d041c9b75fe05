"""SIRA's benchmark: scenarios under wrk (closed loop), k6 (open loop) and locust, peers side by side.

    python -m bench                                   # every scenario, about 6 minutes on 2 cores
    python -m bench --scenarios uncached,cached --seconds 10
    python -m bench --url http://127.0.0.1:8080 --token "$(sira token --role sira_service --sub bench)"

Starts a real `sira serve` (own data dir, embedded Postgres) on a free port for each block, or loads
--url. Prints a table and writes JSON (--json, default bench/results/bench-<time>.json): req/s, p50,
p95, p99, max, errors and PASS/FAIL against the seed's SLOs, SIRA's ratios to FastAPI+uvicorn and to
bare Falcon+gunicorn on the same model and request, and the issue's goals. See bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from bench.runner.cpus import plan_cpus
from bench.runner.report import print_report, write_json
from bench.runner.session import ALL_SCENARIOS, BenchRun
from bench.runner.targets import EXTRA_PEERS, PEERS

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def names(value: str, known: tuple[str, ...]) -> list[str]:
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=lambda v: names(v, ALL_SCENARIOS), default=list(ALL_SCENARIOS),
                        help=f"comma-separated, from {','.join(ALL_SCENARIOS)} (default: all)")
    parser.add_argument("--targets", type=lambda v: names(v, ("sira", *PEERS, *EXTRA_PEERS)),
                        default=["sira", *PEERS],
                        help="servers for the uncached scenario (the others run on sira only); default "
                             f"sira,{','.join(PEERS)}; also {','.join(EXTRA_PEERS)}")
    parser.add_argument("--seconds", type=float, default=10, help="length of each measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="closed-loop warm-up before each target (s)")
    parser.add_argument("--rate", type=int, default=500, help="open-loop requests/s (default 500)")
    parser.add_argument("--batch-rate", type=int, default=50, help="open-loop batch requests/s (default 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="events per batch request (default 32)")
    parser.add_argument("--hot-set", type=int, default=64, help="distinct rows of the cached scenario")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each measurement, report medians")
    parser.add_argument("--workers", type=int, help="workers of every server (default: the server's CPUs)")
    parser.add_argument("--pin", choices=("auto", "on", "off"), default="auto",
                        help="taskset server and load generator apart: auto does from 4 CPUs")
    parser.add_argument("--swap-seconds", type=float, default=20, help="length of the swap run (default 20)")
    parser.add_argument("--scaling-workers", type=lambda v: [int(x) for x in v.split(",")],
                        help="worker counts to scale over (default 1,2,4... up to the server's CPUs)")
    parser.add_argument("--memory-hidden", type=int, default=4096, help="dense model width (4096: ~192 MiB)")
    parser.add_argument("--memory-layers", type=int, default=4, help="dense model hidden layers")
    parser.add_argument("--locust-users", type=int, default=30, help="simulated locust users")
    parser.add_argument("--url", help="load this running SIRA instead of starting one (needs --token)")
    parser.add_argument("--token", help="sira_service token for --url")
    parser.add_argument("--role-token", action="append", default=[], metavar="ROLE=TOKEN",
                        help="with --url, the locust mix's token for another role (fraud_analyst, ml_ops); "
                             "a role without one uses --token")
    parser.add_argument("--max-minutes", type=float, default=30, help="skip the steps left after this budget")
    parser.add_argument("--json", help="where to write the results (default bench/results/bench-<time>.json)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep server data dirs and logs")
    args = parser.parse_args(argv)
    if args.url and not args.token:
        parser.error("--url needs --token")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_cpus(args.pin)
    print(f"cpus: {plan.describe()}", flush=True)
    run = BenchRun(args, plan, say=lambda line: print(line, flush=True))
    document = run.run(args.scenarios, args.targets)
    print_report(document)
    path = args.json or os.path.join(RESULTS_DIR, f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    write_json(document, path)
    print(f"\nwrote {path}")
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
