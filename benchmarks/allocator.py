"""`python -m benchmarks.allocator [--hosts 10,100,1000] [--sessions 100] [--rounds 40]`:
the leading broker daemon's allocation round against the number of worker hosts.

On the local Redis, in a namespace of its own, it registers N hosts of 100 cores each (as
their heartbeats do) and S open sessions that want up to 1,000 cores each, then times the
allocator (`broker.assignment.reconcile`, with the leader's `RoundMemo`) as the daemon runs
it four times a second: the first round, which assigns everything, and the rounds after it,
with every host's record rewritten between rounds as its heartbeat does. Prints one row per
N: milliseconds per round (median, p95) and the share of a core at 4 rounds a second.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import uuid

import structlog

from soafarm.broker.assignment import RoundMemo, reconcile
from soafarm.broker.store import BrokerStore
from soafarm.config import BrokerSettings, load_settings
from soafarm.local.farm import delete_namespace
from soafarm.names import Names
from soafarm.state.hosts import HostStore
from soafarm.state.records import HostRecord, SessionRecord, SessionState
from soafarm.transport.connections import redis_client

CORES = 100
WANTED = 1000
ROUNDS_PER_SECOND = 4


def _session(sid: int) -> SessionRecord:
    return SessionRecord(
        id=sid,
        service="echo",
        version=None,
        state=SessionState.QUEUED,
        min_units=1,
        max_units=WANTED,
        priority=2000,
        resource_unit="core",
        created=time.time(),
        owner="bench",
        broker_settings=BrokerSettings(client_connection_timeout=1e9),
    )


def measure(hosts: int, sessions: int, rounds: int) -> dict[str, float]:
    """Time the allocator with `hosts` hosts and `sessions` sessions in a fresh namespace."""
    settings = load_settings().replace(namespace=f"bench-alloc-{uuid.uuid4().hex[:8]}")
    client = redis_client(settings)
    names = Names(settings.namespace)
    store, host_store = BrokerStore(client, names), HostStore(client, names)
    records = [HostRecord(f"h{i:04d}", "box", 1, CORES, time.time()) for i in range(hosts)]
    try:
        for record in records:
            host_store.beat(record, timeout=600.0)
        for _ in range(sessions):
            store.save_session(_session(store.new_session_id()))
        memo = RoundMemo()
        began = time.perf_counter()
        reconcile(store, memo)
        first = time.perf_counter() - began
        spent = []
        for _ in range(rounds):
            for record in records:  # every host beats between two rounds
                host_store.beat(record, timeout=600.0)
            began = time.perf_counter()
            reconcile(store, memo)
            spent.append(time.perf_counter() - began)
        assigned = sum(sum(store.assignments([r.id]).get(r.id, {}).values()) for r in records)
    finally:
        client.close()
        delete_namespace(settings)
    spent.sort()
    return {
        "first_ms": first * 1000,
        "median_ms": statistics.median(spent) * 1000,
        "p95_ms": spent[int(0.95 * (len(spent) - 1))] * 1000,
        "core_share": statistics.median(spent) * ROUNDS_PER_SECOND,
        "assigned": assigned,
    }


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,100,1000")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    # a line per host and change would be the figure: the allocator logs at info
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(
        f"allocation round, {args.sessions} sessions wanting {WANTED} cores each, "
        f"hosts of {CORES} cores"
    )
    print(f"{'hosts':>6} {'cores':>8} {'assigned':>9} {'first ms':>9} {'median ms':>10} "
          f"{'p95 ms':>8} {'core at 4/s':>12}")  # fmt: skip
    for n in (int(x) for x in args.hosts.split(",")):
        got = measure(n, args.sessions, args.rounds)
        print(
            f"{n:>6} {n * CORES:>8} {int(got['assigned']):>9} {got['first_ms']:>9.1f} "
            f"{got['median_ms']:>10.2f} {got['p95_ms']:>8.2f} {got['core_share']:>11.1%}"
        )


if __name__ == "__main__":
    main()
