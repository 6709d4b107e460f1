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
