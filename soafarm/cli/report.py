"""`soafarm report`: what closed sessions used, by service, owner or session.

The broker writes one usage record per closed session (`soafarm.state.usage`); this command
reads them from Redis and sums them. Times in JSON are ISO-8601 (UTC).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.config import Settings
from soafarm.errors import ConfigError
from soafarm.logs import say
from soafarm.names import Names
from soafarm.state.usage import UsageRecord, UsageStore
from soafarm.transport.connections import redis_client

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_since(text: str, now: float) -> float:
    """`--since`: an age (`90m`, `12h`, `7d`, `2w`) or an ISO-8601 date or time (UTC unless
    it says otherwise); seconds since the epoch."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: give an age such as 90m, 12h, 7d, 2w, or an ISO-8601 date or "
            "time such as 2026-12-01 or 2026-12-01T08:00"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def iso(seconds: float) -> str:
    """Seconds since the epoch as ISO-8601 UTC, to the second."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


@dataclass
class Line:
    """One row of a report: the sum of the sessions sharing a key."""

    key: str
    sessions: int = 0
    unit_seconds: float = 0.0
    requests: int = 0
    responses: int = 0
    faults: int = 0
    retries: int = 0
    failed: int = 0
    first_start: float = float("inf")
    last_end: float = 0.0

    def add(self, r: UsageRecord) -> None:
        """Count one session in."""
        self.sessions += 1
        self.unit_seconds += r.unit_seconds
        self.requests += r.requests
        self.responses += r.responses
        self.faults += r.faults
        self.retries += r.retries
        self.failed += r.state == "failed"
        self.first_start = min(self.first_start, r.started)
        self.last_end = max(self.last_end, r.ended)

    def to_wire(self, by: str) -> dict[str, object]:
        """Plain JSON data."""
        return {
            by: self.key,
            "sessions": self.sessions,
            "unit_hours": round(self.unit_seconds / 3600, 4),
            "requests": self.requests,
            "responses": self.responses,
            "faults": self.faults,
            "retries": self.retries,
            "failed_sessions": self.failed,
            "first_start": iso(self.first_start),
            "last_end": iso(self.last_end),
        }


def summarise(records: list[UsageRecord], by: str) -> list[Line]:
    """Records summed by `by` ("service", "owner"), largest use first."""
    lines: dict[str, Line] = {}
    for r in records:
        key = r.service if by == "service" else r.owner
        lines.setdefault(key, Line(key)).add(r)
    return sorted(lines.values(), key=lambda line: (-line.unit_seconds, line.key))


def session_wire(r: UsageRecord) -> dict[str, object]:
    """One session's record as JSON data."""
    return {
        "session": r.session,
        "service": r.service,
        "version": r.version,
        "owner": r.owner,
        "durable": r.durable,
        "job_template": r.job_template,
        "started": iso(r.started),
        "ended": iso(r.ended),
        "unit_hours": round(r.unit_seconds / 3600, 4),
        "requests": r.requests,
        "responses": r.responses,
        "faults": r.faults,
        "retries": r.retries,
        "state": r.state,
        "error": r.error,
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.4f}"


@cli.command()
@with_settings
@click.option(
    "--by",
    type=click.Choice(["service", "owner", "session"]),
    default="service",
    show_default=True,
    help="Sum the closed sessions by service or owner, or list each session.",
)
@click.option("--since", help="Sessions closed since an age (7d, 12h) or an ISO-8601 time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def report(settings: Settings, by: str, since: str | None, as_json: bool) -> None:
    """Usage of closed sessions: units x hours, requests, faults and retries, by service,
    owner or session (records are kept for `usage.retention`, 30 days)."""
    now = time.time()
    start = parse_since(since, now) if since else 0.0
    store = UsageStore(redis_client(settings), Names(settings.namespace))
    records, bad = store.since(start)
    if bad:
        say(
            "usage_records_corrupt",
            f"soafarm: warning: {bad} corrupt usage record(s) skipped",
            "warning",
            skipped=bad,
        )
    if by == "session":
        if as_json:
            emit_json([session_wire(r) for r in records], raw=True)  # times made ISO here
            return
        emit_table(
            f"Closed sessions in namespace {settings.namespace!r}",
            [
                "session",
                "service",
                "owner",
                "ended",
                "unit-hours",
                "requests",
                "faults",
                "retries",
                "state",
            ],
            [
                (
                    r.session,
                    r.service,
                    r.owner,
                    iso(r.ended),
                    _hours(r.unit_seconds),
                    r.requests,
                    r.faults,
                    r.retries,
                    r.state,
                )
                for r in records
            ],
        )
        return
    lines = summarise(records, by)
    if as_json:
        emit_json([line.to_wire(by) for line in lines], raw=True)
        return
    emit_table(
        f"Usage by {by} in namespace {settings.namespace!r}"
        + (f" since {iso(start)}" if since else ""),
        [by, "sessions", "unit-hours", "requests", "responses", "faults", "retries", "failed"],
        [
            (
                line.key,
                line.sessions,
                _hours(line.unit_seconds),
                line.requests,
                line.responses,
                line.faults,
                line.retries,
                line.failed,
            )
            for line in lines
        ],
    )
