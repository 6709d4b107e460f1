"""Stopping child processes the way soafarm's daemons expect: SIGTERM (drain), then a deadline."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence

import structlog

log = structlog.get_logger(__name__)


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
