"""`python -m benchmarks.isolation [--rounds N]`: what isolated services cost
(`worker.isolate_services`: the service code in a process of its own, calls over a local
socket), beside the same farm with services in the instance process.

Two farms run side by side (one worker host of 4 units each, 2 for echo and 2 for naps, in
namespaces of their own), and each figure is measured in turns, in-process then isolated, so
both see the same minutes of a VM whose speed drifts: sequential echo latency (p50 of 200
calls), echo throughput (a batch of 5,000) and calls that take time (200 naps of 10 ms on 2
units). Prints each side's median and the ratio isolated / in-process.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import uuid
from contextlib import ExitStack

from benchmarks.common import render_pair
from benchmarks.figures import SERVICES
from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace


def latency_p50(session: Session, n: int) -> float:
    """p50 of `n` sequential echo round trips, in ms."""
    samples = []
    with BrokerClient(session, f"l{uuid.uuid4().hex[:6]}") as client:
        for i in range(n):
            began = time.perf_counter()
            client.send_request("echo", i)
            list(client.get_responses(timeout=60))
            samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def batch_rate(session: Session, n: int, op: str, arg: object) -> float:
    """Requests per second of a batch of `n`, sent then read."""
    began = time.perf_counter()
    with BrokerClient(session, f"b{uuid.uuid4().hex[:6]}") as client:
        for _ in range(n):
            client.send_request(op, arg)
        client.end_requests()
        got = sum(1 for _ in client.get_responses(timeout=300))
    assert got == n, got
    return n / (time.perf_counter() - began)


def main() -> None:
    """Measure in turns and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = load_settings().replace(
        log_level="warning",
        service_registration_path=(SERVICES, *load_settings().service_registration_path),
    )
    modes: dict[str, Settings] = {}
    for name, isolate in (("in-process", False), ("isolated", True)):
        modes[name] = base.replace(
            namespace=f"bench-iso-{name[:3]}-{uuid.uuid4().hex[:6]}",
            worker=dataclasses.replace(base.worker, isolate_services=isolate),
        )
    figures: dict[tuple[str, str], list[float]] = {}
    with ExitStack() as stack:
        echo: dict[str, Session] = {}
        nap: dict[str, Session] = {}
        for name, settings in modes.items():
            stack.callback(delete_namespace, settings)
            stack.enter_context(LocalFarm(settings, workers=1, cores=4))  # echo 2, nap 2
            for kind, sessions in (("echo", echo), ("nap", nap)):
                info = SessionStartInfo(kind, min_units=2, max_units=2)
                sessions[name] = stack.enter_context(Session.create(info, settings))
                sessions[name].wait_for_instances(2)
        for _ in range(args.rounds):
            for name in modes:
                e, z = echo[name], nap[name]
                for figure, value in (
                    ("echo latency p50 (ms)", latency_p50(e, 200)),
                    ("echo throughput (req/s)", batch_rate(e, 5000, "echo", "x")),
                    ("10 ms naps on 2 units (req/s)", batch_rate(z, 200, "nap", 0.01)),
                ):
                    figures.setdefault((figure, name), []).append(value)
    title = f"isolated services vs in-process, {args.rounds} rounds in turns (median, min-max)"
    print(render_pair(figures, list(modes), title))


if __name__ == "__main__":
    main()
