"""Figure 7: peak memory of client, broker and worker for a large durable batch.

    python -m benchmarks.memory [--requests 1000000]

Sends the batch through a durable session on a local farm (2 instances), reads every
response, and prints each process's peak resident memory (VmHWM) next to its size after
start-up, so growth with batch size is visible.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.common import peak_rss_mib
from soafarm import BrokerClient, DurableSession, SessionStartInfo
from soafarm.config import load_settings
from soafarm.local.farm import LocalFarm, delete_namespace


def main() -> None:
    """Run the batch and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    args = parser.parse_args()
    settings = load_settings().replace(namespace=f"bench-mem-{os.getpid()}", log_level="warning")
    rows: list[tuple[str, float, float]] = []
    try:
        with LocalFarm(settings, workers=1, cores=2) as farm:
            broker = next(p.pid for what, p in farm.procs if what == "broker")
            host = next(p.pid for what, p in farm.procs if what.startswith("worker"))
            info = SessionStartInfo("echo", min_units=2, max_units=2)
            with DurableSession.create(info, settings) as session:
                session.wait_for_instances(2)
                instances = [i["pid"] for i in session.status()["instances"]]
                pids = {"client": os.getpid(), "broker daemon": broker, "worker host": host}
                pids |= {f"instance {n}": pid for n, pid in enumerate(instances)}
                start = {name: peak_rss_mib(pid) for name, pid in pids.items()}
                began = time.perf_counter()
                with BrokerClient(session) as client:
                    for i in range(args.requests):
                        client.send_request("echo", "x", user_data=i)
                    client.end_requests()
                    count = sum(1 for _ in client.get_responses(timeout=600))
                elapsed = time.perf_counter() - began
                rows = [(n, start[n], peak_rss_mib(p)) for n, p in pids.items()]
                session.close()
    finally:
        delete_namespace(settings)
    print(
        f"durable echo batch of {args.requests:,} requests: {count:,} responses in "
        f"{elapsed:.1f} s ({count / elapsed:,.0f} req/s)"
    )
    print(f"{'process':<16} {'after start-up MiB':>20} {'peak MiB':>10}")
    for name, before, peak in rows:
        print(f"{name:<16} {before:>20.1f} {peak:>10.1f}")


if __name__ == "__main__":
    main()
