"""Live progress on stderr (`submit`, `attach --follow`, `responses --follow`): how many of how
many, faults, the rate over the last seconds and the time left at that rate (ETA).

Three renderings of the same figures: rich bars in a terminal; when stderr is not a terminal,
a plain line per task every few seconds and at the end (a log file must not fill with bar
redraws); with `log_format = json`, the same as `progress` log events with the figures as
fields, so stderr stays JSON lines.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from soafarm.cli.rates import RateMeter, format_eta, format_rate
from soafarm.logs import current_format, say

#: Seconds between plain progress lines (stderr not a terminal, or JSON logs).
LINE_INTERVAL = 5.0
#: Seconds between two updates of a rich bar's figures (it redraws 10 times a second).
REDRAW = 0.1


@dataclass
class _Task:
    description: str
    completed: int = 0
    total: int | None = None
    #: The total may still grow (a batch not sealed yet): no ETA.
    open_ended: bool = False
    faults: int | None = None
    meter: RateMeter = field(default_factory=RateMeter)
    rich_id: TaskID | None = None
    #: When its figures last went to the rich bar (monotonic seconds).
    pushed: float = 0.0

    def eta(self) -> float | None:
        if self.total is None or self.open_ended:
            return None
        return self.meter.eta(self.total - self.completed)


class LiveProgress:
    """Tasks shown live on stderr (see the module's docstring); `unit` names what is counted
    ("responses", "requests"). Use as a context manager; `add` a task, then `update` it."""

    def __init__(
        self, unit: str = "responses", mode: str | None = None, interval: float = LINE_INTERVAL
    ) -> None:
        """`mode`: "rich", "lines" or "events" (default: from the log format and stderr)."""
        self.unit = unit
        self.mode = mode or (
            "events" if current_format() == "json" else "rich" if sys.stderr.isatty() else "lines"
        )
        self.interval = interval
        self._tasks: dict[str, _Task] = {}
        self._rich: Progress | None = None
        self._last_report = time.monotonic()

    def __enter__(self) -> LiveProgress:
        """Start the bars (in a terminal)."""
        if self.mode == "rich":
            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._rich.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the bars, or print each task's last figures once more."""
        if self._rich is not None:
            now = time.monotonic()
            for task in self._tasks.values():
                self._push(task, now)
            self._rich.stop()
        else:
            self._report()

    def add(
        self, key: str, description: str, total: int | None = None, faults: bool = True
    ) -> None:
        """A task `key` (shown as `description`); `faults`: it counts faults too."""
        # no sample yet: the first update's count is where the rate starts (attaching to a
        # batch half done must not count its first half as done in no time)
        task = _Task(description, total=total, faults=0 if faults else None)
        if self._rich is not None:
            task.rich_id = self._rich.add_task(description, total=total, extra=self.extra(task))
        self._tasks[key] = task

    def __contains__(self, key: str) -> bool:
        """Whether a task `key` was added."""
        return key in self._tasks

    def update(
        self,
        key: str,
        *,
        completed: int | None = None,
        total: int | None = None,
        faults: int | None = None,
        description: str | None = None,
        open_ended: bool = False,
    ) -> None:
        """New figures for task `key` (None: unchanged); `open_ended`: `total` may still grow
        (no ETA)."""
        task = self._tasks[key]
        now = time.monotonic()
        if completed is not None:
            task.completed = completed
            task.meter.add(now, completed)
        task.total = total if total is not None else task.total
        task.open_ended = open_ended
        if faults is not None and task.faults is not None:
            task.faults = faults
        if description is not None:
            task.description = description
        if self._rich is not None:
            # the bar redraws 10 times a second: no need to format it for every request
            if description is not None or now - task.pushed >= REDRAW:
                self._push(task, now)
        elif now - self._last_report >= self.interval:
            self._report()

    def _push(self, task: _Task, now: float) -> None:
        if self._rich is not None and task.rich_id is not None:
            task.pushed = now
            self._rich.update(
                task.rich_id,
                completed=task.completed,
                total=task.total,
                description=task.description,
                extra=self.extra(task),
            )

    def extra(self, task: _Task) -> str:
        """The figures after the bar: faults, rate, ETA."""
        parts = [] if task.faults is None else [f"{task.faults:,} fault(s)"]
        parts.append(f"{format_rate(task.meter.rate())} {self.unit}/s")
        parts.append(f"ETA {format_eta(task.eta())}")
        return ", ".join(parts)

    def line(self, task: _Task) -> str:
        """One task's figures as a plain line."""
        total = "?" if task.total is None else f"{task.total:,}"
        return f"{task.description}: {task.completed:,}/{total} {self.unit}, {self.extra(task)}"

    def _report(self) -> None:
        self._last_report = time.monotonic()
        for task in self._tasks.values():
            rate = task.meter.rate()
            fields: dict[str, Any] = {
                "task": task.description,
                "completed": task.completed,
                "total": task.total,
                "unit": self.unit,
                "rate": None if rate is None else round(rate, 3),
                "eta": task.eta(),
            }
            if task.faults is not None:
                fields["faults"] = task.faults
            say("progress", self.line(task), **fields)
