"""Child processes the way soafarm's daemons expect them: stopped with SIGTERM (drain) then a
deadline, tied to their parent's life, and restarted with back-off by a supervisor.

A supervisor (`soafarm up`, a worker host, the local provisioner) starts each child with
`with_parent(env)`; the child calls `follow_parent()` first thing, which asks Linux for a
signal when its parent dies (`PR_SET_PDEATHSIG`). So a parent killed with SIGKILL, which
runs no code of its own, still leaves no orphan: each child gets SIGTERM and drains.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

#: Set by a supervisor to its own pid in the environment of each child it starts. Not a
#: `SOAFARM_*` name: those are settings, and an unknown one is rejected.
PARENT_ENV = "_SOAFARM_PARENT_PID"
#: prctl(2) option: the signal this process gets when its parent thread exits.
_PR_SET_PDEATHSIG = 1


def with_parent(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child that should stop when this process dies (see `follow_parent`).

    Start the child from a thread that lives as long as this process (the main thread, or
    one that outlives the child): Linux sends the signal when the *thread* that forked exits.
    """
    return {**env, PARENT_ENV: str(os.getpid())}


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        log.warning("parent_death_signal_failed", errno=ctypes.get_errno())
        return False
    return True


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
    _set_parent_death_signal(signum)
    if os.getppid() != parent:  # it died between our fork and the prctl: nobody will tell us
        log.warning("parent_gone_at_start", parent=parent)
        os.kill(os.getpid(), signum)
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
FARM_ROLES = frozenset({"up", "broker", "worker", "autoscaler", "instance"})


@dataclass(frozen=True)
class FarmProcess:
    """A live process of a farm: its pid, its parent's and its role (`FARM_ROLES`)."""

    pid: int
    ppid: int
    role: str


def _role(argv: list[str]) -> str | None:
    """`python -m soafarm ROLE ...` -> ROLE; `python -m soafarm.workers.instance` -> instance."""
    if "-m" not in argv:
        return None
    i = argv.index("-m")
    module = argv[i + 1] if i + 1 < len(argv) else ""
    if module == "soafarm.workers.instance":
        return "instance"
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
        role = _role([a.decode(errors="replace") for a in argv.split(b"\0") if a])
        if role in FARM_ROLES:
            found.append(FarmProcess(pid, int(ppid), role))
    return found
