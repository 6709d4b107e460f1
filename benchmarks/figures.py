"""soafarm's own figures, on a local farm: one worker host with 2 cores."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import Figure, add_percentiles, repeat
from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings

SERVICES = Path(__file__).resolve().parent / "services"
ECHO_SETUP = "echo service, 2 service instances (1 worker host, 2 cores), batches of 100"


def _batch(session: Session, n: int, op: str = "echo", arg: object = "x") -> tuple[float, float]:
    """Send `n` requests, read them all: (requests/s end to end, end_requests->last ms)."""
    with BrokerClient(session, f"b{uuid.uuid4().hex[:6]}") as client:
        start = time.perf_counter()
        for i in range(n):
            client.send_request(op, arg, user_data=i)
        client.end_requests()
        sealed = time.perf_counter()
        got = sum(1 for _ in client.get_responses(timeout=300))
        last = time.perf_counter()
    assert got == n, f"{got} responses for {n} requests"
    return n / (last - start), (last - sealed) * 1000


def throughput(settings: Settings, n: int, runs: int) -> list[Figure]:
    """Figures 1, 2 and 5b: echo throughput and end_requests->last response."""
    out = []
    for kind, label in ((Session, "interactive"), (DurableSession, "durable")):
        rate = Figure(
            f"{label} echo throughput (req/s)",
            "soafarm",
            "req/s",
            True,
            f"{n:,} requests; {ECHO_SETUP}",
        )
        lag = Figure(
            f"{label} end_requests -> last response (ms)",
            "soafarm",
            "ms",
            False,
            f"{n:,} requests; {ECHO_SETUP}",
        )
        with kind.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as s:
            s.wait_for_instances(2)
            _batch(s, min(n, 2000))  # warm-up
            for _ in range(runs):
                per_second, lag_ms = _batch(s, n)
                rate.samples.append(per_second)
                lag.samples.append(lag_ms)
            if kind is DurableSession:
                s.close()
        out += [rate, lag]
    return out


#: Sequential requests per block when soafarm and its peers take turns.
BLOCK = 100


@dataclass
class LatencyPeer:
    """A peer whose sequential latency is measured in turns with soafarm's."""

    name: str
    setup: str
    latencies: Callable[[int], list[float]]  # milliseconds of `n` sequential round trips


def latency(
    settings: Settings, n: int, runs: int, beside: Sequence[LatencyPeer] = ()
) -> list[Figure]:
    """Figure 3: round-trip latency of sequential requests, p50 and p99.

    The interactive figure and each peer in `beside` take turns in blocks of `BLOCK`
    requests, so all are measured in the same minutes: the VM's speed drifts by 30% from one
    minute to the next, more than the 1.5x target leaves, and a peer measured minutes later
    moves the ratio either way.
    """
    out = []
    for kind, label in ((Session, "interactive"), (DurableSession, "durable")):
        peers = list(beside) if kind is Session else []
        setup = f"{n:,} sequential echo requests, one at a time"
        if peers:
            setup += f", in turns of {BLOCK}: {', '.join(['soafarm'] + [p.name for p in peers])}"
        pairs = [
            (
                Figure(f"{label} latency p50 (ms)", system, "ms", False, f"{setup}; {detail}"),
                Figure(f"{label} latency p99 (ms)", system, "ms", False, f"{setup}; {detail}"),
            )
            for system, detail in [("soafarm", ECHO_SETUP)] + [(p.name, p.setup) for p in peers]
        ]
        with kind.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as s:
            s.wait_for_instances(2)
            with BrokerClient(s) as client:

                def ours(k: int) -> list[float]:
                    out = []
                    for _ in range(k):
                        start = time.perf_counter()
                        client.send_request("echo", "x")
                        list(client.get_responses(timeout=30))
                        out.append((time.perf_counter() - start) * 1000)
                    return out

                turns = [ours] + [p.latencies for p in peers]
                for turn in turns:
                    turn(50)  # warm-up
                for _ in range(runs):
                    samples: list[list[float]] = [[] for _ in turns]
                    for block in range(-(-n // BLOCK)):
                        size = min(BLOCK, n - block * BLOCK)
                        shift = block % len(turns)  # each side goes first in turn
                        for side in [*range(shift, len(turns)), *range(shift)]:
                            samples[side] += turns[side](size)
                    for (p50, p99), xs in zip(pairs, samples, strict=True):
                        add_percentiles(xs, p50, p99)
            if kind is DurableSession:
                s.close()
        out += [figure for pair in pairs for figure in pair]
    return out


def _spin_batch(session: Session, n: int) -> tuple[float, float]:
    """(requests/s, instance-busy fraction summed over instances) for n spin(10) requests."""
    with BrokerClient(session, f"s{uuid.uuid4().hex[:6]}") as client:
        start = time.perf_counter()
        for i in range(n):
            client.send_request("spin", 10, user_data=i)
        client.end_requests()
        spans = [r.result for r in client.get_responses(timeout=300)]
        elapsed = time.perf_counter() - start
    assert len(spans) == n
    first, last = min(s[1] for s in spans), max(s[2] for s in spans)
    return n / elapsed, sum(s[2] - s[1] for s in spans) / (last - first)


def scaling(settings: Settings, n: int, runs: int) -> list[Figure]:
    """Figure 4: 10 ms CPU-bound requests on 1 and 2 instances, and instance utilisation:
    the time instances spent inside calls over the span of the backlog."""
    out = []
    for units in (1, 2):
        rate = Figure(
            f"10 ms CPU requests, {units} instance(s) (req/s)",
            "soafarm",
            "req/s",
            True,
            f"{n:,} requests of spin(10 ms CPU)",
        )
        util = Figure(
            f"utilisation, {units} instance(s) (%)",
            "soafarm",
            "%",
            True,
            f"time in calls / (instances x span of the backlog), {n:,} x 10 ms queued at once",
        )
        info = SessionStartInfo("spin", min_units=units, max_units=units)
        with Session.create(info, settings) as s:
            s.wait_for_instances(units)
            _spin_batch(s, 20)
            for _ in range(runs):
                per_second, busy = _spin_batch(s, n)
                rate.samples.append(per_second)
                util.samples.append(100 * busy / units)
        out += [rate, util]
    return out


def session_start(settings: Settings, runs: int) -> Figure:
    """Figure 5a: Session.create -> first response (includes starting the instance)."""
    fig = Figure(
        "session create -> first response (ms)",
        "soafarm",
        "ms",
        False,
        "interactive echo session, 1 instance started for it",
    )

    def once() -> float:
        start = time.perf_counter()
        with (
            Session.create(SessionStartInfo("echo", max_units=1), settings) as s,
            BrokerClient(s) as client,
        ):
            client.send_request("echo", "x")
            list(client.get_responses(timeout=60))
            elapsed = (time.perf_counter() - start) * 1000
        return elapsed

    return repeat(fig, runs, once)


def many_sessions(settings: Settings, sessions: int, per: int, runs: int) -> Figure:
    """Figure 6: `sessions` concurrent sessions, each sending `per` requests."""
    fig = Figure(
        f"{sessions} concurrent sessions x {per} requests (req/s)",
        "soafarm",
        "req/s",
        True,
        f"{sessions} threads, each its own interactive echo session (min 0 units)",
    )

    def once() -> float:
        errors: list[BaseException] = []

        def one() -> None:
            try:
                with Session.create(
                    SessionStartInfo("echo", min_units=0, max_units=1), settings
                ) as s:
                    _batch(s, per)
            except BaseException as e:  # reported after the run
                errors.append(e)

        threads = [threading.Thread(target=one) for _ in range(sessions)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return sessions * per / (time.perf_counter() - start)

    return repeat(fig, runs, once, warmup=False)
