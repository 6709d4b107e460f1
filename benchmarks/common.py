"""Shared helpers: repeated measurements, CPU accounting per process, the results table."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figure:
    """One measured quantity: its samples, unit, whether higher is better, and how it was made."""

    name: str
    system: str
    unit: str
    higher_is_better: bool
    setup: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median sample."""
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, object]:
        """Plain data for --json."""
        return {
            "figure": self.name,
            "system": self.system,
            "unit": self.unit,
            "median": self.median,
            "min": min(self.samples),
            "max": max(self.samples),
            "runs": len(self.samples),
            "higher_is_better": self.higher_is_better,
            "setup": self.setup,
        }


def repeat(figure: Figure, runs: int, measure: Callable[[], float], warmup: bool = True) -> Figure:
    """Run `measure` once to warm up (unless told not to), then `runs` times into `figure`."""
    if warmup:
        measure()
    for _ in range(runs):
        figure.samples.append(measure())
    return figure


def add_percentiles(samples: list[float], p50: Figure, p99: Figure) -> None:
    """Add the p50 and p99 of one run's latency `samples` to their figures."""
    xs = sorted(samples)
    p50.samples.append(xs[len(xs) // 2])
    p99.samples.append(xs[int(len(xs) * 0.99)])


def machine() -> str:
    """A one-line description of this machine."""
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def pids_of(name: str) -> list[int]:
    """Process ids whose command name is `name` (for RabbitMQ's beam.smp, redis-server)."""
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, its own only.

    Not its reaped children's: the worker host reaps the instances of closed sessions, and
    their whole lifetime's CPU would land in whatever window was being measured (the
    durable profile showed 1.3 CPU-seconds in a 0.6 s batch on 2 cores).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _number(value: float) -> str:
    """Two decimals below 10 (sub-millisecond latencies, ratios near 1), else one."""
    return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"


def render(figures: list[Figure], title: str) -> str:
    """The results table, with each peer's ratio to soafarm's figure of the same name."""
    lines = [title, ""]
    header = f"{'figure':<44} {'system':<26} {'median':>12} {'min-max':>22} {'soafarm vs':>11}"
    lines += [header, "-" * len(header)]
    ours = {f.name: f for f in figures if f.system == "soafarm"}
    for f in figures:
        ratio = ""
        base = ours.get(f.name)
        if base is not None and f.system != "soafarm" and f.median:
            value = base.median / f.median if f.higher_is_better else f.median / base.median
            ratio = f"{_number(value)}x"
        spread = f"{_number(min(f.samples))}-{_number(max(f.samples))}"
        median = _number(f.median)
        lines.append(f"{f.name:<44} {f.system:<26} {median:>12} {spread:>22} {ratio:>11}")
    lines.append("")
    lines.append(
        "'soafarm vs': how many times better soafarm's median is (throughput: ours/theirs,"
    )
    lines.append("latency: theirs/ours). Setups:")
    seen: set[tuple[str, str]] = set()
    for f in figures:
        if (f.name, f.system) not in seen:
            seen.add((f.name, f.system))
            lines.append(f"  - {f.name} / {f.system}: {f.setup}")
    return "\n".join(lines)


def render_pair(figures: dict[tuple[str, str], list[float]], sides: list[str], title: str) -> str:
    """Two sides measured in turns: each figure's median (min-max) on each side, and the
    second side's median over the first's. `figures` maps (figure, side) to its samples."""
    lines = [title]
    width = max(len(f) for f, _ in figures)
    lines.append(f"{'figure':{width}} {sides[0]:>24} {sides[1]:>24} {'ratio':>7}")
    for figure in dict.fromkeys(f for f, _ in figures):
        cells = []
        for side in sides:
            values = figures[(figure, side)]
            low, high = _number(min(values)), _number(max(values))
            cells.append(f"{_number(statistics.median(values))} ({low}-{high})")
        ratio = statistics.median(figures[(figure, sides[1])]) / statistics.median(
            figures[(figure, sides[0])]
        )
        lines.append(f"{figure:{width}} {cells[0]:>24} {cells[1]:>24} {ratio:>7.2f}")
    return "\n".join(lines)
