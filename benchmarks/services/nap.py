"""Benchmark service: `nap(seconds)` sleeps, like a call that waits on I/O or a slow library."""

from __future__ import annotations

import os
import time


class Nap:
    """Work of a known wall-clock length that uses no CPU, so instances never compete for it."""

    def nap(self, seconds: float) -> list[float]:
        """Sleep `seconds`; return [pid, wall start, wall end] so a benchmark can tell which
        instance ran the call and how many ran at once."""
        began = time.time()
        time.sleep(seconds)
        return [os.getpid(), began, time.time()]
