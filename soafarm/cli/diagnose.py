"""`soafarm services test` (which live host can load which service) and `soafarm diagnose`
(a farm self-check: servers, broker, hosts, an echo round trip and throughput).

`services test` asks every live worker host to probe its registered services again (a nonce
pushed onto each host's asks list, `soafarm.state.probes`; the host's prober in
`soafarm.workers.service_probe` imports and constructs each service in a child process),
waits for every host's fresh report, and prints a matrix service x host.

`diagnose` runs its checks in order, each one line `ok|FAIL|skip  name  detail`; a check
whose prerequisite failed is skipped, saying which. The echo checks use one interactive
session, closed afterwards whatever happens (a failure, the timeout, Ctrl-C, SIGTERM), and
the last check verifies that no session of the run is left open.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
import pika
import pika.exceptions
import redis
import structlog

from soafarm.cli import cli, with_settings
from soafarm.cli.info import services
from soafarm.cli.output import emit_json
from soafarm.config import Settings, mask_url
from soafarm.errors import BrokerNoAnswer, SoafarmError
from soafarm.names import Names
from soafarm.protocol import Response
from soafarm.registration import Registration, Registry
from soafarm.state.control import ListArgs, PingArgs
from soafarm.state.hosts import HostStore
from soafarm.state.probes import ProbeReport, ProbeStore, ServiceLoad
from soafarm.state.records import HostRecord
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.errors import is_queue_gone
from soafarm.transport.topology import control_queue

if TYPE_CHECKING:
    from soafarm.client.broker_client import BrokerClient
    from soafarm.client.control import ControlClient
    from soafarm.client.session import Session

log = structlog.get_logger(__name__)

# --- services test ---------------------------------------------------------------------------

#: Seconds between looks at the hosts' reports while `services test` waits for them.
REPORT_POLL = 0.1

#: Cells of the matrix.
CELL_OK = "ok"
CELL_ERROR = "error"
CELL_ABSENT = "-"
CELL_NO_ANSWER = "?"


@dataclass(frozen=True)
class ServiceMatrix:
    """What `services test` found: service label x host -> how it loaded."""

    #: The hosts asked, in column order.
    hosts: tuple[str, ...]
    #: Service label -> host id -> its load there (None: not registered on that host).
    rows: dict[str, dict[str, ServiceLoad | None]]
    #: Host id -> why it has no fresh report (no answer in time, stopped meanwhile).
    unanswered: dict[str, str] = field(default_factory=dict)
    #: Host id -> why its probe itself failed (its probe process crashed, say).
    probe_errors: dict[str, str] = field(default_factory=dict)
    #: Host id -> registration file -> why that host cannot read it.
    invalid: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Names asked for that no registry (this one's or a host's) has.
    unknown: tuple[str, ...] = ()

    def cell(self, label: str, host_id: str) -> str:
        """The matrix cell of `label` on `host_id`."""
        if host_id in self.unanswered or host_id in self.probe_errors:
            return CELL_NO_ANSWER
        load = self.rows[label].get(host_id)
        if load is None:
            return CELL_ABSENT
        return CELL_OK if load.ok else CELL_ERROR

    def loads_on(self, label: str) -> list[str]:
        """Hosts where `label` loaded."""
        return [h for h, load in self.rows[label].items() if load is not None and load.ok]

    def nowhere(self) -> list[str]:
        """Services that loaded on no host."""
        return [label for label in self.rows if not self.loads_on(label)]

    def problems(self) -> list[str]:
        """What makes the test fail, one phrase each (empty: it passed)."""
        out = [f"service {label} loads on no host" for label in self.nowhere()]
        out += [f"host {h} {why}" for h, why in self.unanswered.items()]
        out += [f"host {h} could not probe: {why}" for h, why in self.probe_errors.items()]
        if self.unknown:
            out.append(f"no registration of {', '.join(self.unknown)}")
        return out

    def to_plain(self) -> dict[str, Any]:
        """The matrix as JSON-ready data."""
        return {
            "ok": not self.problems(),
            "hosts": list(self.hosts),
            "services": {
                label: {
                    h: None
                    if load is None
                    else {"ok": load.ok, "error": load.error, "note": load.note}
                    for h, load in row.items()
                }
                for label, row in self.rows.items()
            },
            "nowhere": self.nowhere(),
            "unanswered": self.unanswered,
            "probe_errors": self.probe_errors,
            "invalid": self.invalid,
            "unknown": list(self.unknown),
        }


def _matches(label: str, wanted: Sequence[str]) -> bool:
    name = label.split(" ", 1)[0]
    return not wanted or label in wanted or name in wanted


def build_matrix(
    wanted: Sequence[str],
    registered: Sequence[str],
    asked: Sequence[str],
    reports: dict[str, ProbeReport],
    unanswered: dict[str, str],
) -> ServiceMatrix:
    """The matrix of the services `wanted` (names or labels; empty: all), from this
    process's `registered` labels and the fresh `reports` of the hosts `asked`."""
    probe_errors = {h: r.error for h, r in reports.items() if r.error}
    answered = {h: r for h, r in reports.items() if not r.error}
    labels = set(registered)
    for report in answered.values():
        labels.update(report.results)
    rows: dict[str, dict[str, ServiceLoad | None]] = {}
    for label in sorted(label for label in labels if _matches(label, wanted)):
        rows[label] = {h: answered[h].results.get(label) for h in asked if h in answered}
    known = {label.split(" ", 1)[0] for label in labels} | labels
    return ServiceMatrix(
        hosts=tuple(asked),
        rows=rows,
        unanswered={h: unanswered[h] for h in asked if h in unanswered},
        probe_errors=probe_errors,
        invalid={h: dict(r.invalid) for h, r in sorted(answered.items()) if r.invalid},
        unknown=tuple(w for w in wanted if w not in known),
    )


def format_matrix(matrix: ServiceMatrix) -> list[str]:
    """The matrix as text lines: a table service x host, then every error and note."""
    header = ["service", *matrix.hosts]
    table = [header] + [
        [label, *(matrix.cell(label, h) for h in matrix.hosts)] for label in matrix.rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    if not matrix.rows:
        lines.append("(no registered service)")
    details: list[str] = []
    for label, row in matrix.rows.items():
        for h, load in row.items():
            if load is not None and not load.ok:
                details.append(f"error: {label} on {h}: {load.error}")
            elif load is not None and load.note:
                details.append(f"note: {label} on {h}: {load.note}")
    for h, why in matrix.probe_errors.items():
        details.append(f"error: host {h} could not probe: {why}")
    for h, why in matrix.unanswered.items():
        details.append(f"no answer: host {h} {why}")
    for h, files in matrix.invalid.items():
        details += [f"invalid: on {h}: {why}" for why in files.values()]
    for label in matrix.nowhere():
        details.append(f"FAIL: {label} loads on no host")
    if details:
        lines.append("")
        lines += details
    if any(matrix.cell(label, h) == CELL_ABSENT for label in matrix.rows for h in matrix.hosts):
        lines.append(f"({CELL_ABSENT}: not registered on that host)")
    return lines


def wait_for_reports(
    probes: ProbeStore,
    hosts: HostStore,
    host_ids: Sequence[str],
    nonce: str,
    timeout: float,
) -> tuple[dict[str, ProbeReport], dict[str, str]]:
    """(each host's report answering `nonce`, host -> why it has none) once every host
    answered or stopped, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    fresh: dict[str, ProbeReport] = {}
    missing: dict[str, str] = {}
    waiting = list(host_ids)
    while waiting:
        for h, report in probes.reports(waiting).items():
            if report.answers_ask(nonce):
                fresh[h] = report
        waiting = [h for h in waiting if h not in fresh]
        if not waiting:
            break
        alive = hosts.alive(waiting)
        for h in waiting:
            if h not in alive:
                missing[h] = "stopped before it answered"
        waiting = [h for h in waiting if h in alive]
        if time.monotonic() >= deadline:
            for h in waiting:
                missing[h] = f"did not answer within {timeout:g}s (is it overloaded or stuck?)"
            break
        time.sleep(REPORT_POLL)  # the reports are written by other processes
    return fresh, missing


def services_matrix(
    settings: Settings, wanted: Sequence[str], timeout: float
) -> tuple[ServiceMatrix, list[str]]:
    """Ask every live host to probe, wait for their reports; (the matrix, ids of live hosts
    left out because they are stopping)."""
    client = redis_client(settings)
    try:
        names = Names(settings.namespace)
        hosts = HostStore(client, names)
        records = hosts.hosts()
        live = sorted(hosts.alive(list(records)))
        stopping = [h for h in live if records[h].draining]
        asked = [h for h in live if not records[h].draining]
        if not asked:
            raise SoafarmError(
                f"no live worker host in namespace {settings.namespace!r} to test on; start "
                "one with `soafarm worker` or `soafarm up`"
            )
        probes = ProbeStore(client, names)
        nonce = uuid.uuid4().hex
        probes.ask(asked, nonce, timeout)
        fresh, missing = wait_for_reports(probes, hosts, asked, nonce, timeout)
    finally:
        client.close()
    registered, _problems = Registry(settings.service_registration_path).scan()
    matrix = build_matrix(wanted, [r.label for r in registered], asked, fresh, missing)
    return matrix, stopping


@services.command("test")
@with_settings
@click.argument("names", nargs=-1)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for every live host's report.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def services_test(
    settings: Settings, names: tuple[str, ...], timeout: float, as_json: bool
) -> None:
    """Ask every live worker host to load each registered service (or the NAMES given) as
    an instance would, and print which loads where, with each error.

    Exits 1 if a service loads on no host or a host did not answer.
    """
    matrix, stopping = services_matrix(settings, names, timeout)
    if as_json:
        emit_json({**matrix.to_plain(), "stopping": stopping})
    else:
        for line in format_matrix(matrix):
            click.echo(line)
        for h in stopping:
            click.echo(f"skipped: host {h} is stopping")
    problems = matrix.problems()
    if problems:
        raise SoafarmError(f"services test failed: {'; '.join(problems)}")


# --- diagnose --------------------------------------------------------------------------------

OK = "ok"
FAIL = "FAIL"
SKIP = "skip"
#: Echo calls timed one by one for the round trip's latency.
ROUND_TRIPS = 5
#: The client id of the throughput check's batch (the round trip's is `default`).
THROUGHPUT_CLIENT_ID = "throughput"


class Tally:
    """The throughput check's response handler: counts correct echo responses, once each."""

    def __init__(self, expected: int) -> None:
        """Expect responses to requests 0..expected-1, whose user data is their index."""
        self.expected = expected
        self.seen: set[int] = set()
        self.error = ""
        #: Set once every response arrived, or on the first error.
        self.done = threading.Event()

    @property
    def count(self) -> int:
        """Distinct correct responses so far."""
        return len(self.seen)

    def take(self, response: Response) -> None:
        """Count one response (a fault or a wrong echo is the check's error)."""
        try:
            result = response.result
        except SoafarmError as e:
            self.fail(e)
            return
        if not str(result).endswith(f":{response.user_data}"):
            self.fail(ValueError(f"request {response.user_data} was answered {result!r}"))
            return
        self.seen.add(response.user_data)
        if len(self.seen) >= self.expected:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        """Record the first error (a fault, the session failing...) and stop waiting."""
        if not self.error:
            self.error = f"{type(error).__name__}: {error}"
        self.done.set()


@dataclass(frozen=True)
class Verdict:
    """One check's outcome."""

    name: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        """JSON-ready: name, status (`ok`, `fail`, `skip`), detail and the check's figures."""
        return {
            "name": self.name,
            "status": self.status.lower(),
            "detail": self.detail,
            **self.data,
        }


class CheckFailed(SoafarmError):
    """A check's verdict is FAIL: `detail` says why (one line)."""

    def __init__(self, detail: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.data = data or {}


class CheckSkipped(SoafarmError):
    """A check has nothing to look at (no session was created, say)."""


@dataclass(frozen=True)
class Check:
    """A check: its name, the checks it needs to have passed, and what it runs (returns its
    detail and figures, or raises CheckFailed)."""

    name: str
    run: Callable[[], tuple[str, dict[str, Any]]]
    needs: tuple[str, ...] = ()


def run_checks(checks: Sequence[Check], report: Callable[[Verdict], None]) -> list[Verdict]:
    """Run `checks` in order, calling `report` with each verdict as it is reached; a check
    whose needs did not all pass is skipped. An error is its check's FAIL line, never a
    traceback (logged with it at debug level); Ctrl-C goes through."""
    done: dict[str, Verdict] = {}
    for check in checks:
        missing = [n for n in check.needs if n not in done or done[n].status != OK]
        if missing:
            verdict = Verdict(check.name, SKIP, f"skipped (needs {', '.join(missing)})")
        else:
            try:
                detail, data = check.run()
                verdict = Verdict(check.name, OK, detail, data)
            except CheckFailed as e:
                verdict = Verdict(check.name, FAIL, e.detail, e.data)
            except CheckSkipped as e:
                verdict = Verdict(check.name, SKIP, f"skipped ({e})")
            except SoafarmError as e:
                verdict = Verdict(check.name, FAIL, str(e))
            except Exception as e:  # a diagnosis reports what broke, whatever it is
                log.debug("check_error", check=check.name, exc_info=True)
                verdict = Verdict(check.name, FAIL, f"{type(e).__name__}: {e}")
        done[check.name] = verdict
        report(verdict)
    return list(done.values())


def format_verdict(verdict: Verdict, width: int) -> str:
    """`ok|FAIL|skip  name  detail`, the name padded to `width`."""
    return f"{verdict.status:<4}  {verdict.name:<{width}}  {verdict.detail}"


def summary(verdicts: Sequence[Verdict]) -> str | None:
    """The error line for failed checks, None if none failed."""
    failed = [v.name for v in verdicts if v.status == FAIL]
    if not failed:
        return None
    return f"diagnose: {len(failed)} of {len(verdicts)} checks failed ({', '.join(failed)})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds * 1000:.0f} ms"


def _host_line(record: HostRecord, admin: str) -> str:
    marks = [f"{record.cores} core{'s' if record.cores != 1 else ''}"]
    if admin:
        marks.append(admin)
    elif record.draining:
        marks.append("stopping")
    return f"{record.id} ({', '.join(marks)})"


@contextlib.contextmanager
def _signals(handler: Any, *signums: signal.Signals) -> Iterator[None]:
    """Handle `signums` with `handler` inside the block (main thread only: elsewhere
    Python cannot set handlers, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class Diagnosis:
    """The checks of `soafarm diagnose` and what they share (connections, the session)."""

    def __init__(self, settings: Settings, requests: int, timeout: float) -> None:
        """Nothing connects until the checks run."""
        self.settings = settings
        self.names = Names(settings.namespace)
        self.requests = requests
        self.timeout = timeout
        self.amqp: pika.BlockingConnection | None = None
        self.redis: redis.Redis | None = None
        self.control: ControlClient | None = None
        self.live: list[HostRecord] = []
        self.echo: Registration | None = None
        #: the control connection's token sessions of this run are created with
        self.creator: str | None = None
        self.session: Session | None = None
        self.clients: list[BrokerClient] = []
        self.session_id: int | None = None
        #: why the session could not be closed ("" once closed)
        self.close_error: str | None = None
        self.deadline = 0.0

    def checks(self) -> list[Check]:
        """Every check, in order, with what it needs."""
        return [
            Check("rabbitmq", self.check_rabbitmq),
            Check("redis", self.check_redis),
            Check("broker", self.check_broker, ("rabbitmq",)),
            Check("hosts", self.check_hosts, ("redis",)),
            Check("echo-service", self.check_echo_service),
            Check(
                "round-trip",
                self.check_round_trip,
                ("rabbitmq", "redis", "broker", "hosts", "echo-service"),
            ),
            Check("throughput", self.check_throughput, ("round-trip",)),
            Check("session-closed", self.check_session_closed),
        ]

    # --- servers --------------------------------------------------------------------------
    def check_rabbitmq(self) -> tuple[str, dict[str, Any]]:
        """RabbitMQ answers; its version."""
        started = time.perf_counter()
        self.amqp = pika_connection(self.settings, "soafarm-diagnose")
        took = time.perf_counter() - started
        # pika keeps the server's connection.start properties on its connection object
        props: dict[str, Any] = dict(self.amqp._impl.server_properties or {})
        product = _text(props.get("product", "RabbitMQ"))
        version = _text(props.get("version", "?"))
        platform = _text(props.get("platform", ""))
        where = mask_url(self.settings.amqp_url)
        detail = f"{product} {version}" + (f" ({platform})" if platform else "")
        return (
            f"{detail} at {where}; connected in {_ms(took)}",
            {"version": version, "platform": platform, "connect_ms": round(took * 1000, 1)},
        )

    def check_redis(self) -> tuple[str, dict[str, Any]]:
        """Redis answers; its version."""
        self.redis = redis_client(self.settings)
        info: dict[str, Any] = self.redis.info("server")
        started = time.perf_counter()
        self.redis.ping()
        took = time.perf_counter() - started
        version = _text(info.get("redis_version", "?"))
        where = mask_url(self.settings.redis_url)
        return (
            f"Redis {version} at {where}; ping {_ms(took)}",
            {"version": version, "ping_ms": round(took * 1000, 2)},
        )

    # --- the farm -------------------------------------------------------------------------
    def _broker_daemons(self) -> int:
        """Consumers of the control queue: broker daemons serving the namespace."""
        assert self.amqp is not None
        channel = self.amqp.channel()
        try:
            declared = channel.queue_declare(queue=control_queue(self.names).name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            if is_queue_gone(e):
                return 0  # no broker ever served it (or it was deleted): the channel closed
            raise
        with contextlib.suppress(pika.exceptions.AMQPError):
            channel.close()
        return int(declared.method.consumer_count)

    def check_broker(self) -> tuple[str, dict[str, Any]]:
        """A broker daemon consumes the namespace's control queue and answers a ping."""
        from soafarm.client.control import ControlClient

        queue = self.names.control_queue
        daemons = self._broker_daemons()
        if daemons == 0:
            raise CheckFailed(
                f"no broker daemon consumes {queue}; start one with `soafarm broker` or "
                "`soafarm up` (or check --namespace)",
                {"daemons": 0},
            )
        self.control = ControlClient(self.settings)
        started = time.perf_counter()
        self.control.request(PingArgs(), timeout=min(self.settings.client.control_timeout, 10.0))
        took = time.perf_counter() - started
        return (
            f"{daemons} broker daemon(s) on {queue}; ping answered in {_ms(took)}",
            {"daemons": daemons, "ping_ms": round(took * 1000, 1)},
        )

    def check_hosts(self) -> tuple[str, dict[str, Any]]:
        """Live worker hosts (heartbeat fresh), their cores, and whether any takes work."""
        assert self.redis is not None
        store = HostStore(self.redis, self.names)
        records = store.hosts()
        alive = store.alive(list(records))
        admin = store.admin_states()
        self.live = [records[h] for h in sorted(alive)]
        if not self.live:
            raise CheckFailed(
                f"no live worker host in namespace {self.settings.namespace!r}; start one "
                "with `soafarm worker` or `soafarm up`",
                {"hosts": 0, "cores": 0},
            )
        cores = sum(h.cores for h in self.live)
        usable = [h for h in self.live if not h.draining and h.id not in admin]
        shown = [_host_line(h, admin.get(h.id, "")) for h in self.live[:5]]
        more = f", +{len(self.live) - 5} more" if len(self.live) > 5 else ""
        detail = f"{len(self.live)} live host(s), {cores} core(s): {', '.join(shown)}{more}"
        data = {"hosts": len(self.live), "cores": cores, "usable": len(usable)}
        if not usable:
            raise CheckFailed(
                f"{detail}; none takes new instances (offline, draining or stopping)", data
            )
        return detail, data

    def check_echo_service(self) -> tuple[str, dict[str, Any]]:
        """`echo` resolves here, and loads on the live hosts that reported a probe."""
        self.echo = Registry(self.settings.service_registration_path).resolve("echo")
        detail = f"echo -> {self.echo.entry_point} ({self.echo.path})"
        if self.redis is None or not self.live:
            return detail, {"entry_point": self.echo.entry_point}
        reports = ProbeStore(self.redis, self.names).reports([h.id for h in self.live])
        loads = {h: r.results.get(self.echo.label) for h, r in reports.items() if not r.error}
        good = sorted(h for h, load in loads.items() if load is not None and load.ok)
        data = {"entry_point": self.echo.entry_point, "loads_on": good, "reported": len(loads)}
        if not loads:
            return f"{detail}; no host probed it yet (`soafarm services test` asks them)", data
        if not good:
            bad = next(
                (f"{h}: {load.error}" for h, load in sorted(loads.items()) if load is not None),
                "not registered on any of them",
            )
            raise CheckFailed(
                f"{detail}; loads on none of the {len(loads)} host(s) that probed it ({bad})",
                data,
            )
        return f"{detail}; loads on {len(good)} of {len(loads)} host(s) (their last probe)", data

    # --- the echo session -----------------------------------------------------------------
    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(
                f"out of time: the echo checks took longer than --timeout {self.timeout:g}s"
            )
        return left

    def _open_session(self) -> Session:
        from soafarm.client.control import PooledControl
        from soafarm.client.session import (
            Session,
            SessionStartInfo,
            close_best_effort,
            close_owned,
        )

        control = PooledControl(self.settings)
        self.creator = control.creator
        args = SessionStartInfo("echo", min_units=1).to_args(control.creator)
        try:
            described = control.request(args, timeout=min(self._left(), 30.0))
        except (KeyboardInterrupt, BrokerNoAnswer):
            # the broker may have made it and the answer not reached us: close what this
            # owner has, never leave it to an idle timeout
            with _signals(signal.SIG_IGN, signal.SIGINT, signal.SIGTERM):
                close_owned(self.settings, control.creator, "echo")
            raise
        self.session_id = described.record.id
        try:
            self.session = Session(control, described, self.settings)
        except BaseException as e:
            with _signals(signal.SIG_IGN, signal.SIGINT, signal.SIGTERM):
                error = close_best_effort(self.settings, self.session_id)
            self.close_error = (
                "" if error is None else f"session {self.session_id} not closed: {error}"
            )
            raise e
        return self.session

    def _first_instance(self, session: Session) -> tuple[float, str]:
        """Seconds from now until the session's first instance runs, and its host."""
        started = time.perf_counter()
        while True:
            info = session.refresh()
            if info.instances:
                return time.perf_counter() - started, info.instances[0].host_id
            if info.record.error:
                raise CheckFailed(f"session {session.id} failed: {info.record.error}")
            if time.monotonic() >= self.deadline:
                why = (info.status.waiting if info.status is not None else "") or "; ".join(
                    f"{h}: {e}" for h, e in sorted(info.load_errors.items())
                )
                raise CheckFailed(
                    f"session {session.id} got no service instance within --timeout "
                    f"{self.timeout:g}s" + (f": {why}" if why else "")
                )
            time.sleep(0.05)  # the broker and a host start it, elsewhere

    def check_round_trip(self) -> tuple[str, dict[str, Any]]:
        """An echo session: its first instance, then ROUND_TRIPS calls one at a time."""
        from soafarm.client.broker_client import BrokerClient

        self.deadline = time.monotonic() + self.timeout
        session = self._open_session()
        ready, host = self._first_instance(session)
        client = BrokerClient(session)
        self.clients.append(client)
        latencies = []
        for i in range(ROUND_TRIPS):
            started = time.perf_counter()
            client.send_request("echo", f"diagnose {i}")
            responses = list(client.get_responses(timeout=self._left()))
            latencies.append(time.perf_counter() - started)
            result = [r.result for r in responses]
            if len(result) != 1 or not str(result[0]).endswith(f":diagnose {i}"):
                raise CheckFailed(f"echo call {i} answered {result!r}, not '<host>:diagnose {i}'")
        median = statistics.median(latencies)
        return (
            f"{_ms(median)} a call (median of {ROUND_TRIPS}, max {_ms(max(latencies))}); "
            f"session {session.id}'s first instance ran {_ms(ready)} after create, on {host}",
            {
                "session": session.id,
                "latency_ms": round(median * 1000, 2),
                "max_ms": round(max(latencies) * 1000, 2),
                "first_instance_ms": round(ready * 1000, 1),
            },
        )

    def check_throughput(self) -> tuple[str, dict[str, Any]]:
        """`requests` echo calls sent as one batch by a client id of their own, read by a
        response handler while they are sent; responses per second."""
        from soafarm.client.broker_client import BrokerClient

        assert self.session is not None
        count = self.requests
        client = BrokerClient(self.session, THROUGHPUT_CLIENT_ID)
        self.clients.append(client)
        tally = Tally(count)
        client.set_response_handler(tally.take, on_error=tally.fail)
        started = time.perf_counter()
        for i in range(count):
            client.send_request("echo", i, user_data=i)
            if i % 1000 == 999 and (tally.error or time.monotonic() > self.deadline):
                break  # the verdict below says why
        client.end_requests()
        # in slices: Ctrl-C and SIGTERM get through between them
        while not tally.done.wait(0.1) and time.monotonic() <= self.deadline:
            pass
        elapsed = time.perf_counter() - started
        if tally.error:
            raise CheckFailed(f"after {tally.count:,} of {count:,} responses: {tally.error}")
        if tally.count < count:
            raise CheckFailed(
                f"{tally.count:,} of {count:,} responses within --timeout {self.timeout:g}s"
            )
        instances = len(self.session.refresh().instances)
        rate = count / elapsed
        return (
            f"{count:,} requests in {elapsed:.2f} s: {rate:,.0f} responses/s "
            f"({instances} instance(s))",
            {"requests": count, "seconds": round(elapsed, 3), "per_second": round(rate, 1)},
        )

    def end_session(self) -> None:
        """Close the echo session, if one was made, whatever state it is in (retrying for
        a while if a server is restarting); Ctrl-C and SIGTERM wait meanwhile."""
        from soafarm.cli.call import close_after_failure

        if self.session is None or self.close_error is not None:
            return
        with _signals(signal.SIG_IGN, signal.SIGINT, signal.SIGTERM):
            for client in self.clients:
                try:
                    client.close(discard=True)
                except Exception:  # the session's close below is what matters
                    log.debug("client_close_failed", exc_info=True)
            self.close_error = close_after_failure(self.session)

    def check_session_closed(self) -> tuple[str, dict[str, Any]]:
        """The echo session is closed, and no session this run created is open."""
        if self.session_id is None:
            raise CheckSkipped("no session was created")
        self.end_session()
        if self.close_error:
            raise CheckFailed(self.close_error)
        if self.control is None:
            return f"session {self.session_id} closed", {"session": self.session_id}
        left = [
            s.record.id
            for s in self.control.request(ListArgs("echo")).items
            if s.record.creator == self.creator
        ]
        if left:
            raise CheckFailed(
                f"session(s) {', '.join(map(str, left))} still open; close with "
                "`soafarm sessions close ID`"
            )
        return (
            f"session {self.session_id} closed; no session of this run is open",
            {"session": self.session_id},
        )

    def close(self) -> None:
        """Close the session (if still open) and every connection."""
        try:
            self.end_session()
        finally:
            if self.control is not None:
                self.control.close()
            if self.redis is not None:
                with contextlib.suppress(redis.RedisError):
                    self.redis.close()
            if self.amqp is not None and self.amqp.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    self.amqp.close()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@cli.command()
@with_settings
@click.option(
    "--requests",
    default=2000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Echo requests of the throughput check.",
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="Seconds the echo checks (session, round trip, throughput) may take in all.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diagnose(settings: Settings, requests: int, timeout: float, as_json: bool) -> None:
    """Check the farm: RabbitMQ and Redis (versions), a broker daemon, live worker hosts,
    the echo service, an echo round trip and throughput through a session, and that the
    session was closed. One line per check; exits 1 if any failed.
    """
    diagnosis = Diagnosis(settings, requests, timeout)
    checks = diagnosis.checks()
    width = max(len(c.name) for c in checks)

    def report(verdict: Verdict) -> None:
        if not as_json:
            click.echo(format_verdict(verdict, width))

    try:
        with _signals(_interrupt, signal.SIGTERM):  # SIGTERM closes the session as Ctrl-C does
            verdicts = run_checks(checks, report)
    finally:
        diagnosis.close()
    if as_json:
        emit_json({"ok": summary(verdicts) is None, "checks": [v.to_plain() for v in verdicts]})
    error = summary(verdicts)
    if error is not None:
        raise SoafarmError(error)
