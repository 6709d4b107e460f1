"""soafarm's own figures, on a local farm: one worker host with 2 cores."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from benchmarks.common import Figure, repeat
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


def latency(settings: Settings, n: int, runs: int) -> list[Figure]:
    """Figure 3: round-trip latency of sequential requests, p50 and p99."""
    out = []
    for kind, label in ((Session, "interactive"), (DurableSession, "durable")):
        p50 = Figure(
            f"{label} latency p50 (ms)",
            "soafarm",
            "ms",
            False,
            f"{n:,} sequential echo requests, one at a time; {ECHO_SETUP}",
        )
        p99 = Figure(f"{label} latency p99 (ms)", "soafarm", "ms", False, p50.setup)
        with kind.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as s:
            s.wait_for_instances(2)
            with BrokerClient(s) as client:

                def once() -> float:
                    start = time.perf_counter()
                    client.send_request("echo", "x")
                    list(client.get_responses(timeout=30))
                    return (time.perf_counter() - start) * 1000

                for _ in range(50):
                    once()  # warm-up
                for _ in range(runs):
                    samples = sorted(once() for _ in range(n))
                    p50.samples.append(samples[len(samples) // 2])
                    p99.samples.append(samples[int(len(samples) * 0.99)])
            if kind is DurableSession:
                s.close()
        out += [p50, p99]
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
