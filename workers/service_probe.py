"""Which registered services this worker host can load: the host's half of `soafarm services
test` (HPC Pack's service repository test).

A host's prober thread probes every service of its registration path whenever `soafarm
services test` asks (never on its own: probing constructs each service, which may load
gigabytes) (a nonce pushed onto the host's asks list,
`soafarm.state.probes`), and stores a report per host in Redis: service label -> ok, or the
error an instance would hit.

Probing loads a service the way an instance does: the registration's environment set, its
entry point imported with its python_path, the class constructed with a `ServiceContext`
(session 0, instance `<host>.probe`; a constructor that reads common data stops there,
which counts as loaded). None of that runs in the host: one probe process
(`python -m soafarm.workers.service_probe`) scans the registration path, then forks once
per service (a few at a time), so each service is imported into a fresh copy that no other
service's import touched, and a crashing or hanging import is killed at its time limit
(`service_init_timeout`, at most `PROBE_LIMIT`) without hurting the host or the other
services' probes. The probe process writes one JSON report on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from soafarm.config import Settings, load_settings
from soafarm.errors import ConnectionFailed, DecodeError, SoafarmError
from soafarm.logs import configure_logging
from soafarm.names import Names
from soafarm.plain import from_plain, to_plain
from soafarm.processes import follow_parent, follow_pid, name_process
from soafarm.registration import Registration
from soafarm.registration.packages import farm_registry
from soafarm.registration.registry import load_service_class
from soafarm.service import ServiceContext, construct
from soafarm.state.probes import ProbeReport, ProbeStore, ServiceLoad
from soafarm.transport.connections import redis_client

log = structlog.get_logger(__name__)

#: Seconds one service's import and constructor may take in a probe, at most (less if its
#: service_init_timeout is less): a report must come back within `soafarm services test`'s
#: default wait (30 s) even when a service hangs.
PROBE_LIMIT = 25.0
#: Services loaded at once by one probe (each a forked process).
PARALLEL = 4
#: Seconds the host gives the whole probe process before it kills it.
PROCESS_LIMIT = 120.0
#: Seconds the prober blocks on its asks list between renewals of its report's TTL.
ASK_WAIT = 2.0
#: Seconds the prober waits after an unexpected error of its own before it goes on.
PROBER_RETRY = 10.0
#: Characters of an error kept in a report (a traceback-sized message is cut).
MAX_ERROR = 2000
#: The probe process's name in `ps` and /proc/PID/comm.
PROBE_PROCESS_NAME = "sf-probe"


class NeedsCommonData(SoafarmError):
    """A probed constructor asked for session common data, which a probe does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(f"common data {name!r} is a session's, not a probe's")
        self.name = name


def _no_common_data(name: str) -> Any:
    raise NeedsCommonData(name)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "..."


def load_for_probe(registration: Registration, host_id: str, hostname: str) -> ServiceLoad:
    """Import and construct `registration`'s service here, as an instance would; call it
    only in a process of its own (it changes os.environ and sys.path, and imports)."""
    started = time.monotonic()

    def took() -> float:
        return round(time.monotonic() - started, 3)

    os.environ.update(registration.environment)
    try:
        cls = load_service_class(registration)
    except SoafarmError as e:  # the import failed: the message names file and module
        return ServiceLoad(False, _cut(str(e)), seconds=took())
    except BaseException as e:  # SystemExit from the module, say
        why = f"{registration.path}: importing raised {type(e).__name__}: {e}"
        return ServiceLoad(False, _cut(why), seconds=took())
    context = ServiceContext(
        session_id=0,
        host_name=hostname,
        instance_id=f"{host_id}.probe",
        service_name=registration.name,
        service_version=registration.version,
        environment=dict(registration.environment),
        data_loader=_no_common_data,
    )
    try:
        construct(cls, context)
    except NeedsCommonData as e:
        note = (
            f"its constructor reads common data {e.name!r}, which only a session has: "
            "it ran up to there"
        )
        return ServiceLoad(True, note=note, seconds=took())
    except BaseException as e:
        why = f"{registration.entry_point}: the constructor raised {type(e).__name__}: {e}"
        return ServiceLoad(False, _cut(why), seconds=took())
    return ServiceLoad(True, seconds=took())


@dataclass
class _Loading:
    """One forked process loading one service, as the probe process watches it."""

    registration: Registration
    pid: int
    fd: int
    started: float
    limit: float
    data: bytearray = field(default_factory=bytearray)


def _fork_load(registration: Registration, host_id: str, hostname: str, limit: float) -> _Loading:
    read, write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: load, write one JSON message, never return
        code = 0
        try:
            os.close(read)
            follow_pid(parent, signal.SIGKILL)  # a killed probe takes its hung loads along
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(2, 1)  # what a service prints must not mix into the probe's report
            result = load_for_probe(registration, host_id, hostname)
            data = json.dumps(to_plain(result)).encode()
            while data:
                data = data[os.write(write, data) :]
        except BaseException:
            code = 70
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write)
    return _Loading(registration, pid, read, time.monotonic(), limit)


def _time_limit(registration: Registration, cap: float) -> float:
    return min(registration.service_init_timeout, cap)


def _timed_out(registration: Registration, limit: float) -> str:
    if limit < registration.service_init_timeout:
        return (
            f"did not load within {limit:g}s (the probe's limit; its service_init_timeout "
            f"is {registration.service_init_timeout:g}s)"
        )
    return f"did not load within service_init_timeout ({limit:g}s): its instances fail the same"


def _finished(loading: _Loading) -> ServiceLoad:
    """The result a child wrote, or why it wrote none (it crashed or exited)."""
    _pid, status = os.waitpid(loading.pid, 0)
    seconds = round(time.monotonic() - loading.started, 3)
    if loading.data:
        try:
            return from_plain(ServiceLoad, json.loads(loading.data), "probe result")
        except (ValueError, DecodeError) as e:
            return ServiceLoad(False, f"the probe's result cannot be read: {e}", seconds=seconds)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return ServiceLoad(
        False,
        f"the process loading it {how} before it was loaded (the import or the constructor "
        "ended the process)",
        seconds=seconds,
    )


def probe_registrations(
    registrations: Sequence[Registration],
    host_id: str,
    hostname: str,
    parallel: int = PARALLEL,
    cap: float = PROBE_LIMIT,
) -> dict[str, ServiceLoad]:
    """Load each registration in a forked process of its own (`parallel` at a time, each
    killed past its time limit); service label -> how it went. Call it from a process
    with a single thread (the probe process): a fork copies only the forking thread."""
    pending = list(registrations)
    running: dict[int, _Loading] = {}
    results: dict[str, ServiceLoad] = {}
    while pending or running:
        while pending and len(running) < parallel:
            registration = pending.pop(0)
            limit = _time_limit(registration, cap)
            loading = _fork_load(registration, host_id, hostname, limit)
            running[loading.fd] = loading
        now = time.monotonic()
        wait = min(r.started + r.limit for r in running.values()) - now
        ready, _, _ = select.select(list(running), [], [], max(0.0, wait))
        for fd in ready:
            loading = running[fd]
            chunk = os.read(fd, 65536)
            if chunk:
                loading.data += chunk
                continue
            del running[fd]
            os.close(fd)
            results[loading.registration.label] = _finished(loading)
        now = time.monotonic()
        for fd, loading in list(running.items()):
            if now >= loading.started + loading.limit:
                del running[fd]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(loading.pid, signal.SIGKILL)
                os.waitpid(loading.pid, 0)
                os.close(fd)
                results[loading.registration.label] = ServiceLoad(
                    False,
                    _timed_out(loading.registration, loading.limit),
                    seconds=round(now - loading.started, 3),
                )
    return dict(sorted(results.items()))


@dataclass(frozen=True)
class ProbeOutput:
    """What the probe process writes on stdout."""

    results: dict[str, ServiceLoad] = field(default_factory=dict)
    #: Registration file -> why it cannot be read.
    invalid: dict[str, str] = field(default_factory=dict)


def main(argv: list[str]) -> int:
    """Entry point of the probe process, started by a worker host with a JSON argument
    `{"host_id": ..., "hostname": ...}`; writes a `ProbeOutput` as JSON on stdout."""
    follow_parent()
    # Ctrl-C in a terminal reaches every process of the group: the host decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process(PROBE_PROCESS_NAME)
    if len(argv) != 1:
        sys.stderr.write("soafarm.workers.service_probe is started by a worker host\n")
        return 2
    spec = json.loads(argv[0])
    try:
        settings = load_settings()
    except SoafarmError as e:  # one line: the host puts it in its report
        sys.stderr.write(f"{e}\n")
        return 1
    configure_logging(settings.log_format, settings.log_level)
    client = redis_client(settings)
    try:
        registrations, problems = farm_registry(settings, client).scan()
    finally:
        client.close()
    output = ProbeOutput(
        probe_registrations(registrations, str(spec["host_id"]), str(spec["hostname"])),
        {str(p.path): p.error for p in problems},
    )
    sys.stdout.write(json.dumps(to_plain(output)))
    sys.stdout.flush()
    return 0


def run_probe(
    env: Mapping[str, str],
    host_id: str,
    hostname: str,
    answers: Sequence[str] = (),
    timeout: float = PROCESS_LIMIT,
) -> ProbeReport:
    """Host side: run the probe process with `env` (the host's instance environment: its
    settings, its registration path) and turn its output into the host's report."""
    started = time.monotonic()
    spec = json.dumps({"host_id": host_id, "hostname": hostname})

    def report(error: str = "", output: ProbeOutput | None = None) -> ProbeReport:
        return ProbeReport(
            host_id,
            time.time(),
            {} if output is None else output.results,
            {} if output is None else output.invalid,
            error=_cut(error),
            answers=tuple(answers),
            took=round(time.monotonic() - started, 3),
        )

    try:
        done = subprocess.run(
            [sys.executable, "-m", "soafarm.workers.service_probe", spec],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return report(f"the probe process did not finish within {timeout:g}s")
    except OSError as e:
        return report(f"the probe process could not start: {e}")
    try:
        output = from_plain(ProbeOutput, json.loads(done.stdout), "probe output")
    except (ValueError, DecodeError) as e:
        # the exit code may be lost (the host reaps stray children), the output is not
        # its last line: the error that ended it (the one line above, or a traceback's)
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        why = tail[0] if tail else f"no output ({e})"
        return report(f"the probe process failed (exit code {done.returncode}): {why}")
    return report(output=output)


class ServiceProber:
    """A worker host's prober: probes whenever asked, until `stopping`."""

    def __init__(
        self,
        settings: Settings,
        host_id: str,
        hostname: str,
        env: Mapping[str, str],
        stopping: threading.Event,
    ) -> None:
        """Nothing runs until `start()`; `env` is the environment probe processes get."""
        self.settings = settings
        self.host_id = host_id
        self.hostname = hostname
        self.env = dict(env)
        self.stopping = stopping
        self.names = Names(settings.namespace)
        self.thread = threading.Thread(target=self._run, name="service-probe", daemon=True)

    def start(self) -> None:
        """Start the prober thread (it ends when `stopping` is set)."""
        self.thread.start()

    def _run(self) -> None:
        store: ProbeStore | None = None
        pending: ProbeReport | None = None  # made, not yet stored (Redis was away)
        asks: list[str] = []
        # only when asked: a probe constructs every registered service, and a constructor may
        # load gigabytes (it is what instances do at start-up), which no host start should pay
        probe = False
        while not self.stopping.is_set():
            try:
                if probe:
                    pending = run_probe(self.env, self.host_id, self.hostname, asks)
                    probe, asks = False, []
                    if self.stopping.is_set():
                        break
                store = store or ProbeStore(redis_client(self.settings), self.names)
                if pending is not None:
                    store.write(pending)
                    self._logged(pending)
                    pending = None
                asks = store.take_asks(self.host_id, ASK_WAIT)
                probe = bool(asks)
                if not probe:
                    store.keep(self.host_id)
            except (redis.RedisError, ConnectionFailed) as e:
                log.warning("probe_redis_unreachable", host_id=self.host_id, error=str(e))
                self.stopping.wait(1.0)
            except Exception:  # a bug here must not end the thread: the host goes on either way
                log.exception("service_prober_failed", host_id=self.host_id)
                probe = False
                self.stopping.wait(PROBER_RETRY)
        if store is not None:
            with contextlib.suppress(redis.RedisError):
                store.forget(self.host_id)

    def _logged(self, report: ProbeReport) -> None:
        failed = sorted(label for label, r in report.results.items() if not r.ok)
        if report.error:
            log.warning("services_probe_failed", host_id=self.host_id, error=report.error)
        else:
            (log.warning if failed else log.info)(
                "services_probed",
                host_id=self.host_id,
                services=len(report.results),
                failed=failed,
                asked=len(report.answers),
                took=report.took,
            )


def start_prober(
    settings: Settings,
    host_id: str,
    hostname: str,
    env: Mapping[str, str],
    stopping: threading.Event,
) -> ServiceProber:
    """Start a worker host's prober thread (see `ServiceProber`)."""
    prober = ServiceProber(settings, host_id, hostname, env, stopping)
    prober.start()
    return prober


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
