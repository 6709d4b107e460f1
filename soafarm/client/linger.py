"""Sending what a client buffered without an explicit flush, a few milliseconds late.

A client buffers requests so that requests sent close together travel in one message. A
client that sends a few requests and then waits for a response handler (HPC Pack's
LongRunning pattern keeps ten outstanding) would wait forever on a buffer that never fills:
`client.linger` seconds after the first request entered an empty buffer, the buffer is sent.
The same thread records the accepted count a little after the last flush, so the counts
others read (throttling, the allocator, the autoscaler) lag a flush by at most that much.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Linger:
    """A background thread that calls `on_due()` when a deadline set by the client passes."""

    def __init__(self, on_due: Callable[[], None], name: str) -> None:
        """`on_due()` runs on the thread (the client flushes and records there)."""
        self.on_due = on_due
        self.cond = threading.Condition()
        self.due: float | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def arm(self, at: float) -> None:
        """Run `on_due()` at monotonic time `at`, unless an earlier deadline is set."""
        with self.cond:
            if self.due is None or at < self.due:
                self.due = at
                self.cond.notify()

    def stop(self) -> None:
        """End the thread (what is due is not run: the client flushes on close itself)."""
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopped:
                    if self.due is None:
                        self.cond.wait()
                        continue
                    left = self.due - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                if self.stopped:
                    return
                self.due = None
            try:
                self.on_due()
            except Exception as e:  # the client keeps the error for its caller; never die
                log.debug("linger_failed", error=repr(e))
