"""Child processes the way soafarm's daemons expect them: stopped with SIGTERM (drain) then a
deadline, tied to their parent's life, and restarted with back-off by a supervisor.

A supervisor (`soafarm up`, a worker host, the local provisioner) starts each child with
`with_parent(env)`; the child calls `follow_parent()` first thing, which asks Linux for a
signal when its parent dies (`PR_SET_PDEATHSIG`). So a parent killed with SIGKILL, which
runs no code of its own, still leaves no orphan: each child gets SIGTERM and drains.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

#: Set by a supervisor to its own pid in the environment of each child it starts. Not a
#: `SOAFARM_*` name: those are settings, and an unknown one is rejected.
PARENT_ENV = "_SOAFARM_PARENT_PID"
#: prctl(2) options: the signal this process gets when its parent thread exits; adopt
#: orphaned descendants (instead of init); name the calling thread (`/proc/PID/comm`).
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int | bytes) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        log.warning("prctl_failed", option=option, errno=ctypes.get_errno())
        return False
    return True


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux `PR_SET_CHILD_SUBREAPER`), so a
    grandchild whose parent exits becomes this process's child; False where unsupported.

    A worker host does this so that instances forked by its fork servers are its own
    children: it waits for them and reads their exit codes as for ones it started itself.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def name_process(name: str) -> None:
    """Set this process's name as `ps`, `top` and `/proc/PID/comm` show it (15 bytes at
    most): forked processes share their fork server's command line, not its role."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


def process_name(pid: int) -> str:
    """The name `name_process` set for `pid` (its command name otherwise; "" if gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def children() -> set[int]:
    """This process's live and zombie children (Linux /proc; empty elsewhere)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{os.getpid()}/task"):
            with contextlib.suppress(OSError):
                found.update(int(p) for p in Path(task.path, "children").read_text().split())
    return found


def reap_strays(known: set[int]) -> list[int]:
    """Collect the exit status of children not in `known` that have exited (a subreaper
    adopts orphans it never started: a dead instance's own subprocesses), so they do not
    linger as zombies; the pids reaped."""
    reaped = []
    for pid in children() - known:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                reaped.append(pid)
    return reaped


class ChildProcess(Protocol):
    """What a supervisor needs of a child: `subprocess.Popen`'s waiting and signalling."""

    @property
    def pid(self) -> int:
        """The child's process id."""
        ...

    def poll(self) -> int | None:
        """Its exit code (negative: the signal that ended it) or None while it runs."""
        ...

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit (`subprocess.TimeoutExpired` after `timeout` seconds)."""
        ...

    def send_signal(self, sig: int) -> None:
        """Send it `sig` unless it has been reaped."""
        ...

    def kill(self) -> None:
        """SIGKILL it."""
        ...


class AdoptedProcess:
    """A child this process did not start but adopted (see `become_subreaper`), with
    `subprocess.Popen`'s poll/wait/send_signal/kill; waits on a pidfd, not a poll loop."""

    def __init__(self, pid: int) -> None:
        """Wrap `pid`, which must already be this process's child."""
        self._pid = pid
        self.returncode: int | None = None
        # one thread reaps: a second waitpid would find no child and lose the exit code
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    def _reap(self, blocking: bool) -> int | None:
        if self.returncode is not None or not self._lock.acquire(blocking=blocking):
            return self.returncode
        try:
            if self.returncode is None:
                done, status = os.waitpid(self._pid, 0 if blocking else os.WNOHANG)
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # not our child (any more): nobody can tell its code
            self.returncode = -signal.SIGKILL
        finally:
            self._lock.release()
        return self.returncode

    def poll(self) -> int | None:
        """Its exit code, or None while it runs (reaps it once it has exited)."""
        return self._reap(blocking=False)

    def wait(self, timeout: float | None = None) -> int:
        """Block until it exits (raise `subprocess.TimeoutExpired` after `timeout`)."""
        if (code := self.poll()) is not None:
            return code
        try:
            fd = os.pidfd_open(self._pid)
        except ProcessLookupError:  # reaped meanwhile by another thread's poll
            return self._reap(blocking=True) or 0
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if not ready:
            raise subprocess.TimeoutExpired(f"pid {self._pid}", timeout or 0.0)
        code = self._reap(blocking=True)
        return -signal.SIGKILL if code is None else code

    def send_signal(self, sig: int) -> None:
        """Send `sig` unless it has been reaped (its pid may belong to someone else now)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

    def kill(self) -> None:
        """SIGKILL it."""
        self.send_signal(signal.SIGKILL)


def stop_on_signals(stop: Callable[[], object]) -> None:
    """Route SIGTERM and SIGINT to `stop()`, called on a thread of its own.

    A Python signal handler runs in the main thread between two bytecodes, which may be
    inside `Event.wait()` with the event's (non-reentrant) lock held; a `stop()` that sets
    that event from the handler would then wait for the lock its own thread holds, for
    ever. That is how a SIGTERMed instance (its host SIGKILLed) once stayed up draining
    nothing, with its main thread, the one that would have ended it, hung.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = f"on-{signal.Signals(signum).name}"
        threading.Thread(target=stop, name=name, daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def with_parent(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child that should stop when this process dies (see `follow_parent`).

    Start the child from a thread that lives as long as this process (the main thread, or
    one that outlives the child): Linux sends the signal when the *thread* that forked exits.
    """
    return {**env, PARENT_ENV: str(os.getpid())}


def _set_parent_death_signal(signum: int) -> bool:
    return _prctl(_PR_SET_PDEATHSIG, signum)


def follow_pid(parent: int, signum: int = signal.SIGTERM) -> None:
    """Like `follow_parent`, for a process whose parent is `parent` by adoption (forked
    instances): `signum` when it dies, at once if it already has."""
    _set_parent_death_signal(signum)
    if os.getppid() != parent:
        log.warning("parent_gone_at_start", parent=parent)
        os.kill(os.getpid(), signum)


def follow_parent(signum: int = signal.SIGTERM) -> int | None:
    """If a supervisor started this process (`with_parent`), arrange for `signum` when it
    dies, and return its pid (None when started by anyone else).

    Call it before starting anything: if the parent died before the signal was armed, the
    signal is sent to this process now (by default SIGTERM ends a process that has not
    installed its handler yet; one that has drains). The variable is removed, so processes
    this one starts (a service's own subprocesses) do not inherit it.
    """
    raw = os.environ.pop(PARENT_ENV, "")
    if not raw.isdigit():
        return None
    parent = int(raw)
    # if it died between our fork and the prctl, nobody will tell us: follow_pid checks
    follow_pid(parent, signum)
    return parent


@dataclass(frozen=True)
class Restart:
    """A supervisor's decision about a process that exited."""

    #: Seconds to wait before starting it again.
    delay: float
    #: Exits in a row without a healthy run, this one included (feeds the next decision).
    failures: int


@dataclass(frozen=True)
class RestartPolicy:
    """Back-off for restarting a process that exited on its own.

    The first `free_restarts` exits in a row restart at once; later ones wait `base`,
    doubling, up to `cap`. A process that ran `healthy_after` seconds or more starts the
    count afresh: its exit is news, not a crash loop.
    """

    base: float = 0.5
    cap: float = 10.0
    free_restarts: int = 1
    healthy_after: float = 30.0

    def decide(self, failures: int, ran_for: float) -> Restart:
        """The restart of a process that exited after `ran_for` seconds, `failures` being
        the exits in a row before it."""
        failures = 1 if ran_for >= self.healthy_after else failures + 1
        slow = failures - self.free_restarts
        delay = 0.0 if slow <= 0 else min(self.base * 2.0 ** (slow - 1), self.cap)
        return Restart(delay, failures)


def stop_processes(procs: Sequence[tuple[str, subprocess.Popen[bytes]]], timeout: float) -> None:
    """SIGTERM every `(name, process)` still running, wait up to `timeout` seconds in all for
    them to drain and exit, then kill the ones left (logging each by name)."""
    for _name, proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process_killed", process=name, pid=proc.pid)
            proc.kill()
            proc.wait()


#: What `farm_processes` reports: the `soafarm` subcommands that run as farm processes.
FARM_ROLES = frozenset({"up", "broker", "worker", "autoscaler", "instance", "warm", "spare"})


@dataclass(frozen=True)
class FarmProcess:
    """A live process of a farm: its pid, its parent's and its role (`FARM_ROLES`)."""

    pid: int
    ppid: int
    role: str


#: `name_process` names of processes forked by a fork server (which share its command line).
INSTANCE_PROCESS_NAME = "sf-instance"
WARM_PROCESS_NAME = "sf-warm"
#: a process a fork server forked ahead of need, waiting to become an instance
SPARE_PROCESS_NAME = "sf-spare"
_FORKED_ROLES = {INSTANCE_PROCESS_NAME: "instance", SPARE_PROCESS_NAME: "spare"}


def _role(argv: list[str], pid: int) -> str | None:
    """`python -m soafarm ROLE ...` -> ROLE; `python -m soafarm.workers.instance` -> instance;
    a fork server (`soafarm.workers.warm`) -> warm, or instance / spare for what it forked."""
    if "-m" not in argv:
        return None
    i = argv.index("-m")
    module = argv[i + 1] if i + 1 < len(argv) else ""
    if module == "soafarm.workers.instance":
        return "instance"
    if module == "soafarm.workers.warm":
        return _FORKED_ROLES.get(process_name(pid), "warm")
    if module == "soafarm" and i + 2 < len(argv):
        return argv[i + 2]
    return None


def farm_processes(namespace: str) -> list[FarmProcess]:
    """Every live farm process of `namespace` on this machine (Linux /proc), wherever its
    parent is: found by the `SOAFARM_NAMESPACE` its environment was started with, so
    orphans are found too (the chaos suite's orphan check, the soak's RSS samples)."""
    want = f"SOAFARM_NAMESPACE={namespace}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"soafarm" not in argv:
                continue
            state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state in ("Z", "X"):
                continue
            if want not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone meanwhile, or not ours
            continue
        role = _role([a.decode(errors="replace") for a in argv.split(b"\0") if a], pid)
        if role in FARM_ROLES:
            found.append(FarmProcess(pid, int(ppid), role))
    return found
