"""Benchmark service: `spin(ms)` burns `ms` milliseconds of CPU, like a short pricing call."""

from __future__ import annotations

import os
import time


class Spin:
    """CPU-bound work of a known length."""

    def spin(self, ms: float) -> list[float]:
        """Busy-loop until this process has used `ms` more milliseconds of CPU; return
        [pid, wall start, wall end] so a benchmark can tell how busy each instance was."""
        began = time.time()
        end = time.process_time() + ms / 1000
        while time.process_time() < end:
            pass
        return [os.getpid(), began, time.time()]
