"""Printing data for people (rich tables) or programs (`--json`, plain tables in a pipe).

Tables: in a terminal, a rich table; when stdout is not a terminal (a pipe, a file), plain
tab-separated columns, one header line then one line per row, nothing cut, wrapped or drawn,
so `cut -f3` or `awk -F'\\t' '{print $1}'` read them (a tab or newline inside a cell becomes a
space).

JSON (`present`): the farm's records are shown with their times (seconds since the epoch in
Redis) as ISO-8601 UTC strings, `null` for a time not set yet (stored as 0), and `null` for a
limit stored as its "unbounded" sentinel; durations (`age`, `uptime`, `heartbeat_age`) stay
seconds. The rules go by field name, wherever the field is in the data.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from soafarm.resources import UNBOUNDED_UNITS

#: Fields that hold a moment as seconds since the epoch: session `created`, `idle_since`,
#: `quiet_since`; host and instance `started`; host `beat`; status `changed` and `written`;
#: load error `at`.
TIME_FIELDS = frozenset(
    {"created", "idle_since", "quiet_since", "started", "beat", "changed", "written", "at"}
)


def _units_unbounded(value: float) -> bool:
    # a session's max_units (and a target derived from it) stores "all" as UNBOUNDED_UNITS; a
    # job template's max_units and units_limit store it as 0 (a session's is always >= 1)
    return value >= UNBOUNDED_UNITS or value == 0


#: Fields whose value means "no bound" when the test is true: shown as null.
UNBOUNDED_FIELDS: Mapping[str, Callable[[float], bool]] = {
    "max_units": _units_unbounded,
    "target": lambda v: v >= UNBOUNDED_UNITS,
    # job template: "the most units a session may ask for (0: no limit)"
    "units_limit": lambda v: v == 0,
    # broker setting: "0: no idle limit"
    "client_idle_timeout": lambda v: v == 0,
}


#: Below this (2001-09-09), a number in a time field is not a moment since the epoch but the
#: reading of another clock (a process's monotonic clock): it is left as it is.
EPOCH_FLOOR = 1e9


def iso_time(seconds: float) -> str | float | None:
    """Seconds since the epoch as ISO-8601 UTC with milliseconds (`2024-05-01T12:00:00.250Z`);
    None for 0 or less, which the records store for "not yet"; a number below `EPOCH_FLOOR`
    unchanged."""
    if seconds <= 0:
        return None
    if seconds < EPOCH_FLOOR:
        return seconds
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def present(data: Any) -> Any:
    """`data` (plain JSON-able data: dicts, lists, scalars) as the CLI prints it: times as
    ISO-8601 strings, unbounded limits as None (see the module's docstring)."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in TIME_FIELDS and _number(value):
                out[key] = iso_time(value)
            elif key in UNBOUNDED_FIELDS and _number(value) and UNBOUNDED_FIELDS[key](value):
                out[key] = None
            else:
                out[key] = present(value)
        return out
    if isinstance(data, list | tuple):
        return [present(x) for x in data]
    return data


def emit_json(data: Any, raw: bool = False) -> None:
    """Print `data` as indented JSON on stdout, through `present` unless `raw` (a service's
    own result, the settings as configured: values that are not the farm's records)."""
    click.echo(json.dumps(data if raw else present(data), indent=2, default=str))


def _cell(value: Any) -> str:
    return " ".join(str(value).replace("\t", " ").splitlines())


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The table as tab-separated lines: the header, then one line per row."""
    lines = ["\t".join(_cell(c) for c in columns)]
    lines.extend("\t".join(_cell(x) for x in row) for row in rows)
    return "\n".join(lines)


def emit_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table on stdout: rich in a terminal, else plain tab-separated lines (without
    the title: a pipe gets the header and the rows only)."""
    if not sys.stdout.isatty():
        click.echo(plain_table(columns, rows))
        return
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(str(x) for x in row))
    Console().print(table)
