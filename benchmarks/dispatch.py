"""`python -m benchmarks.dispatch [--quick] [--json FILE]`: parallel dispatch of calls that
take time.

Three figures, on a local farm in a private namespace (one worker host offering 2 cores, one
interactive session of 2 core units) on the local RabbitMQ and Redis:

1. makespan / ideal for N x S calls of `nap(S)` (benchmarks/services/nap.py, which sleeps),
   N in {C, 4C, 50C}, S in {0.05, 0.25, 1.0} s, C = 2 units, plus a heavy-tailed mix (one 5 s
   call among 200 of 50 ms). Makespan runs from `end_requests()` (all requests sent in one go,
   no flush between) to the last response; ideal is ceil(N/C)*S, or for the mix max(longest
   call, total work / C). The calls' own [pid, start, end] give how many instances served
   and how many calls ran at once.
2. the same sleeps as Dramatiq (2 processes x 1 thread) and Celery (prefork pool of 2,
   acks_late + worker_prefetch_multiplier=1) tasks, timed from the first enqueue to the last
   result.
3. LongRunning pattern: at most 10 echo requests outstanding, a Semaphore released by the
   response handler, no flush(); requests/s beside raw pika with the same window. A client
   that keeps requests buffered until a flush never gets a response here: the run reports
   "stalled" after a bounded wait instead of hanging.

Figures are printed, never asserted. `--quick` runs a reduced set in well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

from benchmarks.common import Figure, machine, render
from benchmarks.figures import SERVICES
from benchmarks.peers.raw_pika import RAW_PIKA, RAW_SETUP, RawPika
from benchmarks.peers.task_queues import TaskQueuePeer
from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.protocol import Response

#: Units of work the farm and each peer run at once: 2 instances, processes or threads.
UNITS = 2
#: Seconds of ideal makespan one shape's repeats may take in all (at least one run each):
#: the 50 x 1 s shape alone is 50 s ideal, so a fixed 3 repeats would triple the run.
RUN_BUDGET = 20.0
#: Outstanding requests the LongRunning client allows (its Semaphore).
WINDOW = 10
SOAFARM_SETUP = "1 interactive session, 2 core units (1 worker host, 2 cores)"
DRAMATIQ_NAP = "Dramatiq"
DRAMATIQ_NAP_SETUP = "RabbitMQ broker, Redis results, 2 processes x 1 thread (prefetch 2 each)"
CELERY_NAP = "Celery acks_late"
CELERY_NAP_SETUP = (
    "RabbitMQ broker, Redis results, prefork pool of 2, "
    "task_acks_late + worker_prefetch_multiplier=1"
)

#: Runs one batch of nap calls (seconds each, in sending order): (makespan in seconds, each
#: call's [pid, start, end]).
Batch = Callable[[Sequence[float]], tuple[float, list[list[float]]]]


@dataclass(frozen=True)
class Shape:
    """One batch of nap calls: each call's seconds in sending order, and its ideal makespan."""

    label: str
    seconds: tuple[float, ...]
    ideal: float


def uniform(n: int, seconds: float, units: int = UNITS) -> Shape:
    """`n` calls of `seconds` each: ideal ceil(n/units) * seconds."""
    return Shape(f"{n} x {seconds:g} s", (seconds,) * n, math.ceil(n / units) * seconds)


def heavy_tail(long: float, n_short: int, short: float, units: int = UNITS) -> Shape:
    """One `long` call sent first, then `n_short` calls of `short`: ideal is the longest call
    or the total work spread over the units, whichever is longer."""
    seconds = (long,) + (short,) * n_short
    # first in the batch: the calls sent after it must not wait behind it
    ideal = max(long, sum(seconds) / units)
    return Shape(f"1 x {long:g} s + {n_short} x {short:g} s", seconds, ideal)


def shapes(quick: bool) -> list[Shape]:
    """The shapes measured: N in {C, 4C, 50C} x S in {0.05, 0.25, 1.0} s and the heavy tail;
    with `quick`, N in {C, 4C} x S in {0.05, 0.25} and a smaller tail."""
    counts = (1, 4) if quick else (1, 4, 50)
    lengths = (0.05, 0.25) if quick else (0.05, 0.25, 1.0)
    out = [uniform(k * UNITS, s) for s in lengths for k in counts]
    out.append(heavy_tail(2.0, 60, 0.05) if quick else heavy_tail(5.0, 200, 0.05))
    return out


def runs_for(shape: Shape, runs: int) -> int:
    """Repeats of `shape`: `runs`, fewer for long shapes (see RUN_BUDGET)."""
    return max(1, min(runs, int(RUN_BUDGET // shape.ideal)))


def max_concurrency(spans: Sequence[Sequence[float]]) -> int:
    """The most calls running at one instant, from their [pid, start, end]."""
    # ends sort before starts at the same instant: back-to-back calls did not overlap
    events = sorted([(s[2], -1) for s in spans] + [(s[1], 1) for s in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@dataclass
class Evidence:
    """Who ran one shape's calls (its last run): distinct pids, calls per pid, overlap."""

    shape: str
    system: str
    pids: int
    calls_per_pid: list[int]
    max_concurrency: int

    @classmethod
    def of(cls, shape: str, system: str, spans: Sequence[Sequence[float]]) -> Evidence:
        """Evidence from the calls' [pid, start, end]."""
        per_pid = Counter(int(s[0]) for s in spans)
        return cls(
            shape,
            system,
            len(per_pid),
            sorted(per_pid.values(), reverse=True),
            max_concurrency(spans),
        )


@dataclass
class Stall:
    """A LongRunning run that got no response within `timeout` seconds."""

    system: str
    timeout: float
    sent: int
    answered: int
    #: What else went wrong (the response handler's error, if it had one).
    note: str = ""

    def __str__(self) -> str:
        """One line for the report."""
        return (
            f"{self.system}: stalled (no response within {self.timeout:g}s; "
            f"{self.sent:,} requests sent, {self.answered:,} answered)"
            + (f"; {self.note}" if self.note else "")
        )


class Stalled(Exception):
    """Raised by `long_running` when no response comes within its timeout."""

    def __init__(self, stall: Stall) -> None:
        """Carry the stall."""
        super().__init__(str(stall))
        self.stall = stall


@dataclass
class DispatchReport:
    """The dispatch figures, the evidence behind them and any stalled LongRunning run."""

    title: str
    makespans: list[Figure] = field(default_factory=list)
    window: list[Figure] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    #: Errors beside a figure that still stands (printed under the table).
    notes: list[str] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        """Every figure, in table order: the makespans, then the LongRunning pair."""
        return self.makespans + self.window

    def render(self) -> str:
        """The table, the evidence per shape and system, the stalls and the notes."""
        lines = [
            render(self.figures, self.title),
            "",
            "makespan / ideal: lower is better; 1.00 = every unit busy from the first call to "
            "the last. 'soafarm vs' on it: theirs / ours.",
        ]
        if self.evidence:
            lines += ["", "Who served each shape (last run), from the calls' [pid, start, end]:"]
            lines.append(
                f"  {'shape':<26} {'system':<18} {'pids':>4}  {'calls per pid':<15} "
                f"{'max at once':>11}"
            )
            for e in self.evidence:
                split = "/".join(str(c) for c in e.calls_per_pid)
                lines.append(
                    f"  {e.shape:<26} {e.system:<18} {e.pids:>4}  {split:<15} "
                    f"{e.max_concurrency:>11}"
                )
        for stall in self.stalls:
            lines += ["", f"LongRunning, window of {WINDOW}: {stall}"]
        for note in dict.fromkeys(self.notes):  # each distinct note once, in order
            lines += ["", f"LongRunning, window of {WINDOW}: {note}"]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        """Plain data for --json."""
        return {
            "title": self.title,
            "figures": [f.as_dict() for f in self.figures],
            "evidence": [asdict(e) for e in self.evidence],
            "stalls": [asdict(s) for s in self.stalls],
            "notes": self.notes,
        }


def measure_shapes(
    system: str, setup: str, batch: Batch, shape_list: Sequence[Shape], runs: int
) -> tuple[list[Figure], list[Evidence]]:
    """makespan / ideal of each shape on one system, and who served its last run."""
    figures, evidence = [], []
    for shape in shape_list:
        figure = Figure(
            f"makespan / ideal: {shape.label}",
            system,
            "x",
            False,
            f"ideal {shape.ideal:.2f} s; {setup}",
        )
        spans: list[list[float]] = []
        for _ in range(runs_for(shape, runs)):
            makespan, spans = batch(shape.seconds)
            if len(spans) != len(shape.seconds):
                raise RuntimeError(f"{system}: {len(spans)} results for {len(shape.seconds)}")
            figure.samples.append(makespan / shape.ideal)
        figures.append(figure)
        evidence.append(Evidence.of(shape.label, system, spans))
    return figures, evidence


def wait_until_serving(probe: Callable[[], list[list[float]]], timeout: float = 30.0) -> int:
    """Run `probe` (a few short naps) until UNITS distinct pids have answered; return how
    many did. An instance or worker process can be listed before it takes work; a shape
    timed then would measure its start-up, not dispatch."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while len(seen) < UNITS and time.monotonic() < deadline:
        seen |= {int(span[0]) for span in probe()}
    return len(seen)


# --- soafarm ---------------------------------------------------------------------------------
def soafarm_batch(session: Session) -> Batch:
    """A Batch on `session`: every request sent, then end_requests(), then every response."""

    def run(seconds: Sequence[float]) -> tuple[float, list[list[float]]]:
        with BrokerClient(session, f"d{uuid.uuid4().hex[:6]}") as client:
            for i, s in enumerate(seconds):
                client.send_request("nap", s, user_data=i)
            start = time.perf_counter()
            client.end_requests()
            # the wait for the next response is bounded by running every call in turn
            spans = [r.result for r in client.get_responses(timeout=sum(seconds) + 60)]
            return time.perf_counter() - start, spans

    return run


def soafarm_probe(session: Session) -> list[list[float]]:
    """UNITS naps of 0.2 s, each flushed as a message of its own, so RabbitMQ can hand them
    to different instances whatever the client's batching does."""
    with BrokerClient(session, f"r{uuid.uuid4().hex[:6]}") as client:
        for i in range(UNITS):
            client.send_request("nap", 0.2, user_data=i)
            client.flush()
        client.end_requests()
        return [r.result for r in client.get_responses(timeout=30)]


def long_running(session: Session, n: int, timeout: float, notes: list[str]) -> float:
    """Requests/s of the LongRunning pattern: at most WINDOW echo requests outstanding, a
    Semaphore the response handler releases, and no flush(). Raises Stalled when no
    response comes within `timeout` seconds; an error closing the client after every
    response came is added to `notes` (the figure stands, the error is printed beside it)."""
    window = threading.Semaphore(WINDOW)
    answered = 0
    faults: list[Response] = []

    def on_response(response: Response) -> None:
        nonlocal answered
        # only the handler thread writes these; an exception here would stop the handler
        if response.is_fault:
            faults.append(response)
        answered += 1
        window.release()

    client = BrokerClient(session, f"w{uuid.uuid4().hex[:6]}")
    stall: Stall | None = None
    try:
        client.set_response_handler(on_response)
        start = time.perf_counter()
        for i in range(n):
            if not window.acquire(timeout=timeout):
                stall = Stall("soafarm", timeout, i, answered)
                break
            client.send_request("echo", "x", user_data=i)
        else:
            for _ in range(WINDOW):  # all permits back: every response is in
                if not window.acquire(timeout=timeout):
                    stall = Stall("soafarm", timeout, n, answered)
                    break
        elapsed = time.perf_counter() - start
    except BaseException:
        with contextlib.suppress(Exception):  # the error to report is the one raised here
            client.close(discard=True)
        raise
    try:
        # a stalled client's buffer is dropped: sending it now would only feed a closing session
        client.close(discard=stall is not None)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        if stall is None:
            notes.append(f"soafarm: every response came, then close() raised {error}")
        else:  # a handler that failed explains the stall: report it with it
            stall.note = f"close() raised {error}"
    if stall is not None:
        raise Stalled(stall)
    if faults:
        raise RuntimeError(f"{len(faults)} echo requests faulted: {faults[0].fault}")
    return n / elapsed


def soafarm_figures(
    settings: Settings,
    shape_list: Sequence[Shape],
    runs: int,
    report: DispatchReport,
    *,
    n_window: int,
    stall_after: float,
) -> None:
    """Figure 1 on a local farm, and figure 3 for soafarm and raw pika in turns, into
    `report`."""
    with LocalFarm(settings, workers=1, cores=2):
        nap = SessionStartInfo("nap", min_units=UNITS, max_units=UNITS)
        with Session.create(nap, settings) as s:
            s.wait_for_instances(UNITS)
            serving = wait_until_serving(lambda: soafarm_probe(s))
            figures, evidence = measure_shapes(
                "soafarm",
                f"{SOAFARM_SETUP}; {serving} instance(s) had served before timing",
                soafarm_batch(s),
                shape_list,
                runs,
            )
            report.makespans += figures
            report.evidence += evidence
        # the nap session is closed: its 2 cores go to the echo session
        echo = SessionStartInfo("echo", min_units=UNITS, max_units=UNITS)
        with Session.create(echo, settings) as s:
            s.wait_for_instances(UNITS)
            window_figures(s, runs, n_window, stall_after, report)


def window_figures(
    session: Session, runs: int, n: int, stall_after: float, report: DispatchReport
) -> None:
    """Figure 3: soafarm's LongRunning pattern and raw pika's window of WINDOW, in turns (the
    VM's speed drifts from minute to minute; see docs/performance.md), into `report`."""
    name = f"LongRunning window of {WINDOW}, echo (req/s)"
    ours = Figure(
        name,
        "soafarm",
        "req/s",
        True,
        f"{n:,} echo requests, at most {WINDOW} outstanding (Semaphore released by the "
        f"set_response_handler callback), no flush(); {SOAFARM_SETUP}",
    )
    theirs = Figure(
        name,
        RAW_PIKA,
        "req/s",
        True,
        f"{n:,} requests, at most {WINDOW} outstanding, each reply sends the next; {RAW_SETUP}",
    )
    raw = RawPika()
    stalled = False
    try:
        raw.windowed(min(n, 200), WINDOW)  # warm-up
        for k in range(runs + 1):  # the first is a warm-up of at most 200
            if not stalled:
                try:
                    rate = long_running(session, n if k else min(n, 200), stall_after, report.notes)
                    if k:
                        ours.samples.append(rate)
                except Stalled as e:
                    # once is enough: the next run would wait out the same timeout
                    report.stalls.append(e.stall)
                    stalled = True
            if k:
                theirs.samples.append(raw.windowed(n, WINDOW))
    finally:
        raw.close()
    report.window += [f for f in (ours, theirs) if f.samples]


# --- the peers -------------------------------------------------------------------------------
def peer_probe(peer: TaskQueuePeer) -> list[list[float]]:
    """UNITS naps of 0.2 s as tasks (one message each already)."""
    return peer.nap_batch([0.2] * UNITS)[1]


def peer_figures(shape_list: Sequence[Shape], runs: int, report: DispatchReport) -> None:
    """Figure 2: the same naps as Dramatiq and Celery (acks_late) tasks, into `report`."""
    peers: list[tuple[str, str, Callable[[], TaskQueuePeer]]] = [
        (DRAMATIQ_NAP, DRAMATIQ_NAP_SETUP, lambda: TaskQueuePeer("dramatiq", threads=1)),
        (CELERY_NAP, CELERY_NAP_SETUP, lambda: TaskQueuePeer("celery", acks_late=True)),
    ]
    for name, setup, make in peers:
        peer = make()
        try:
            serving = wait_until_serving(partial(peer_probe, peer))
            more, why = measure_shapes(
                name,
                f"{setup}; {serving} process(es) had served before timing; timed from the "
                "first enqueue to the last result",
                peer.nap_batch,
                shape_list,
                runs,
            )
            report.makespans += more
            report.evidence += why
        finally:
            peer.close()


def run(quick: bool, with_peers: bool = True) -> DispatchReport:
    """Measure every dispatch figure; the farm runs in a private namespace, deleted after."""
    runs = 1 if quick else 3
    shape_list = shapes(quick)
    settings = load_settings().replace(
        namespace=f"bench-dispatch-{os.getpid()}",
        log_level="warning",
        service_registration_path=(SERVICES,),
    )
    began = time.time()
    report = DispatchReport(
        f"soafarm dispatch benchmarks, {'quick' if quick else 'full'} run of "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(began))} UTC on {machine()}; "
        f"median of up to {runs} run(s)"
    )
    try:
        soafarm_figures(
            settings,
            shape_list,
            runs,
            report,
            n_window=500 if quick else 2_000,
            stall_after=5.0 if quick else 10.0,
        )
    finally:
        delete_namespace(settings)
    if with_peers:
        peer_figures(shape_list, runs, report)
    # each shape's systems together (a stable sort keeps soafarm first)
    order = {s.label: i for i, s in enumerate(shape_list)}
    report.makespans.sort(key=lambda f: order[f.name.split(": ", 1)[1]])
    report.evidence.sort(key=lambda e: order[e.shape])
    return report


def main() -> None:
    """Run the dispatch figures and print them."""
    parser = argparse.ArgumentParser(
        description="Parallel dispatch of calls that take time: makespan / ideal, LongRunning."
    )
    parser.add_argument("--quick", action="store_true", help="Fewer shapes, one run each.")
    parser.add_argument("--json", dest="json_file", help="Also write the results here.")
    parser.add_argument("--no-peers", action="store_true", help="Only soafarm's figures.")
    args = parser.parse_args()
    report = run(args.quick, with_peers=not args.no_peers)
    print(report.render())
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(report.as_dict(), fh, indent=2)


if __name__ == "__main__":
    main()
