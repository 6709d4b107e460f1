"""Echo throughput, interactive and durable, on a local farm with 2 service instances.

    python -m benchmarks.echo [--requests 20000] [--runs 3] [--json FILE]

Starts a broker and one 2-core worker host in a private namespace on the local RabbitMQ and
Redis, warms up, then for each session kind runs the batch `--runs` times and prints the
median (min-max) of: end-to-end throughput (first send to last response) and the time from
`end_requests()` to the last response.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid
from dataclasses import dataclass

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.farm import LocalFarm, delete_namespace


@dataclass(frozen=True)
class Run:
    """One batch's timings."""

    requests_per_second: float
    end_to_last_ms: float


def run_batch(session: Session, count: int) -> Run:
    """Send `count` echo requests, read every response, return the timings."""
    with BrokerClient(session, f"bench-{uuid.uuid4().hex[:6]}") as client:
        start = time.perf_counter()
        for i in range(count):
            client.send_request("echo", "x", user_data=i)
        client.end_requests()
        sealed = time.perf_counter()
        received = sum(1 for _ in client.get_responses(timeout=120))
        last = time.perf_counter()
    if received != count:
        raise SystemExit(f"benchmark error: {received} responses for {count} requests")
    return Run(count / (last - start), (last - sealed) * 1000)


def measure(settings: Settings, kind: type[Session], count: int, runs: int) -> list[Run]:
    """Warm up once, then time `runs` batches in one session of `kind`."""
    with kind.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as session:
        session.wait_for_instances(2)
        run_batch(session, min(count, 2000))  # warm-up: imports, connections, queues
        results = [run_batch(session, count) for _ in range(runs)]
        if kind is DurableSession:
            session.close()
    return results


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    """Run the figures and print them (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", dest="json_file")
    args = parser.parse_args()
    settings = load_settings().replace(namespace=f"bench-{os.getpid()}", log_level="warning")
    table: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with LocalFarm(settings, workers=1, cores=2):
            for name, kind in (("interactive", Session), ("durable", DurableSession)):
                runs = measure(settings, kind, args.requests, args.runs)
                table[name] = {
                    "requests_per_second": summary([r.requests_per_second for r in runs]),
                    "end_requests_to_last_response_ms": summary([r.end_to_last_ms for r in runs]),
                }
    finally:
        delete_namespace(settings)
    machine = f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"echo, {args.requests:,} requests, 2 service instances, {args.runs} runs ({machine})")
    print(f"{'session':<12} {'requests/s median (min-max)':>32} {'end_requests->last ms':>30}")
    for name, row in table.items():
        rps, lag = row["requests_per_second"], row["end_requests_to_last_response_ms"]
        print(
            f"{name:<12} {rps['median']:>12,.0f} ({rps['min']:,.0f}-{rps['max']:,.0f})"
            f"{lag['median']:>16,.1f} ({lag['min']:,.1f}-{lag['max']:,.1f})"
        )
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(
                {"machine": machine, "requests": args.requests, "figures": table}, fh, indent=2
            )


if __name__ == "__main__":
    main()
