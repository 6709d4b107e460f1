"""`python -m benchmarks [--quick] [--json FILE]`: soafarm beside its peers, in one run.

Starts a local farm in a private namespace on the local RabbitMQ and Redis, measures each
figure several times after a warm-up (the session figures of `benchmarks.sessions` once, over
many sessions), then the peers (raw pika request/reply, Celery 5 default
and acks_late, Dramatiq) doing the same echo work, and prints medians with min/max and the
ratio of soafarm's median to each peer's, plus a CPU profile per component. With `--dispatch`,
then the figures of `python -m benchmarks.dispatch` (calls that take time, the LongRunning
window) as a table of their own. Needs the peers: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from functools import partial

from benchmarks import dispatch
from benchmarks.common import Figure, add_percentiles, machine, render, repeat
from benchmarks.figures import SERVICES, LatencyPeer, latency, scaling, throughput
from benchmarks.peers.raw_pika import RAW_PIKA, RAW_SETUP, RawPika
from benchmarks.peers.task_queues import DRAMATIQ, DRAMATIQ_SETUP, TaskQueuePeer
from benchmarks.profile import cpu_profile, render_profile
from benchmarks.sessions import cold_services, session_figures, sizes, with_cold_services
from soafarm.config import Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace


def peers(n_raw: int, n_dramatiq: int, n_celery: int, n_latency: int, runs: int) -> list[Figure]:
    """The same echo work on raw pika, Dramatiq and Celery (the latency of raw pika and
    Dramatiq is measured in turns with soafarm's, in `latency_beside_peers`)."""
    out: list[Figure] = []
    # (name, factory, tasks for throughput, set-up, latency measured here rather than in turns)
    candidates: list[tuple[str, object, int, str, bool]] = [
        (RAW_PIKA, RawPika, n_raw, RAW_SETUP, False),
        (DRAMATIQ, lambda: TaskQueuePeer("dramatiq"), n_dramatiq, DRAMATIQ_SETUP, False),
        (
            "Celery",
            lambda: TaskQueuePeer("celery"),
            n_celery,
            "RabbitMQ broker, Redis results, prefork pool of 2",
            True,
        ),
        (
            "Celery acks_late",
            lambda: TaskQueuePeer("celery", acks_late=True),
            n_celery,
            "as Celery, task_acks_late + worker_prefetch_multiplier=1",
            True,
        ),
    ]
    for name, make, n, setup, with_latency in candidates:
        peer = make()  # type: ignore[operator]
        try:
            rate = Figure(
                "interactive echo throughput (req/s)",
                name,
                "req/s",
                True,
                f"{n:,} tasks sent back to back, then every result read; {setup}",
            )
            out.append(repeat(rate, runs, partial(peer.throughput, n)))
            if not with_latency:
                continue
            p50 = Figure(
                "interactive latency p50 (ms)",
                name,
                "ms",
                False,
                f"{n_latency:,} sequential tasks; {setup}",
            )
            p99 = Figure("interactive latency p99 (ms)", name, "ms", False, p50.setup)
            peer.latencies(20)
            for _ in range(runs):
                add_percentiles(peer.latencies(n_latency), p50, p99)
            out += [p50, p99]
        finally:
            peer.close()
    return out


def latency_beside_peers(settings: Settings, n: int, runs: int, with_peers: bool) -> list[Figure]:
    """Figure 3, soafarm's round trips in turns with raw pika's and Dramatiq's (the two
    latency targets), all three measured in the same minutes."""
    with ExitStack() as stack:
        beside = []
        if with_peers:
            raw = RawPika()
            stack.callback(raw.close)
            dramatiq = TaskQueuePeer("dramatiq")
            stack.callback(dramatiq.close)
            beside = [
                LatencyPeer(RAW_PIKA, RAW_SETUP, raw.latencies),
                LatencyPeer(DRAMATIQ, DRAMATIQ_SETUP, dramatiq.latencies),
            ]
        return latency(settings, n, runs, beside)


def main() -> None:
    """Run every figure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller batches, one run each.")
    parser.add_argument("--json", dest="json_file", help="Also write the results here.")
    parser.add_argument("--no-peers", action="store_true", help="Only soafarm's figures.")
    parser.add_argument(
        "--dispatch",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Also the dispatch figures (benchmarks.dispatch), after the others: about "
        "30 s with --quick, 10 minutes without.",
    )
    args = parser.parse_args()
    quick = args.quick
    runs = 1 if quick else 3
    n_echo = 5_000 if quick else 20_000
    n_latency = 200 if quick else 1_000
    session_sizes = sizes(quick)
    began = time.time()
    figures: list[Figure] = []
    # the services of the cold session starts: on the registration path before the farm starts
    with cold_services(session_sizes.starts + 1) as cold:
        settings = with_cold_services(
            load_settings().replace(
                namespace=f"bench-{os.getpid()}",
                log_level="warning",
                service_registration_path=(SERVICES,),
            ),
            cold,
        )
        try:
            with LocalFarm(settings, workers=1, cores=2) as farm:
                figures += throughput(settings, n_echo, runs)
                figures += latency_beside_peers(settings, n_latency, runs, not args.no_peers)
                figures += scaling(settings, 200 if quick else 1_000, runs)
                figures += session_figures(settings, cold, session_sizes)
                profile = cpu_profile(settings, farm, n_echo)
        finally:
            delete_namespace(settings)
    if not args.no_peers:
        figures += peers(
            n_echo, 1_000 if quick else 3_000, 500 if quick else 2_000, n_latency, runs
        )
    title = (
        f"soafarm benchmarks, {'quick' if quick else 'full'} run of "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(began))} UTC on {machine()}; "
        f"median of {runs} run(s) after a warm-up"
    )
    print(render(figures, title))
    print()
    print(render_profile(profile, n_echo))
    results: dict[str, object] = {
        "title": title,
        "figures": [f.as_dict() for f in figures],
        "profile": profile,
    }
    if args.dispatch:
        # its own farm and namespace: measured after the farm above has stopped
        report = dispatch.run(quick, with_peers=not args.no_peers)
        print()
        print(report.render())
        results["dispatch"] = report.as_dict()
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
