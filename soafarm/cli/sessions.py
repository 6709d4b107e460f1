"""Commands that ask the broker daemon: `sessions list|show|close`, `hosts`."""

from __future__ import annotations

import time

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.client.control import ControlClient
from soafarm.client.session import UNBOUNDED_UNITS
from soafarm.config import Settings
from soafarm.state.control import (
    CloseArgs,
    ControlCall,
    GetArgs,
    HostInfo,
    HostsArgs,
    ListArgs,
    R,
)
from soafarm.state.records import SessionRecord


def _request(settings: Settings, args: ControlCall[R]) -> R:
    control = ControlClient(settings)
    try:
        return control.request(args)
    finally:
        control.close()


def _age(created: float) -> str:
    seconds = int(time.time() - created)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds}s"


def _units(session: SessionRecord) -> str:
    top = "all" if session.max_units >= UNBOUNDED_UNITS else session.max_units
    return f"{session.min_units}..{top}"


@cli.group()
def sessions() -> None:
    """List, show and close sessions."""


@sessions.command("list")
@with_settings
@click.option("--service", help="Only sessions of this service.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sessions_list(settings: Settings, service: str | None, as_json: bool) -> None:
    """List open sessions with state, units and age."""
    rows = _request(settings, ListArgs(service))
    if as_json:
        emit_json(rows.to_wire())
        return
    emit_table(
        f"Sessions in namespace {settings.namespace!r}",
        ["id", "service", "kind", "state", "activity", "units", "allocated/target", "age", "owner"],
        [
            (
                s.record.id,
                s.record.service + (f" {s.record.version}" if s.record.version else ""),
                ("durable" if s.record.durable else "interactive")
                + (", shared" if s.record.shared else ""),
                s.record.state,
                s.record.activity,
                f"{s.record.resource_unit} {_units(s.record)}",
                f"{s.allocated_units}/{s.target_units}",
                _age(s.record.created),
                s.record.owner,
            )
            for s in rows.items
        ],
    )


@sessions.command("show")
@with_settings
@click.argument("session_id", type=int)
def sessions_show(settings: Settings, session_id: int) -> None:
    """Print one session's record, instances and clients as JSON (with allocated_units, the
    instances running, against target_units, what the allocator gives it)."""
    emit_json(_request(settings, GetArgs(session_id)).to_wire())


@sessions.command("close")
@with_settings
@click.argument("session_id", type=int)
@click.option(
    "--purge", is_flag=True, help="Also delete a durable session's responses (interactive: always)."
)
def sessions_close(settings: Settings, session_id: int, purge: bool) -> None:
    """Close a session: no more requests, its hosts are freed and pending requests deleted."""
    result = _request(settings, CloseArgs(session_id, purge))
    kept = "" if result.purged else "; its responses stay readable until closed with --purge"
    click.echo(f"session {session_id} closed{kept}")


@cli.command()
@with_settings
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hosts(settings: Settings, as_json: bool) -> None:
    """List live worker hosts: pool, size, instances per session (running/assigned),
    utilisation over the last heartbeat, heartbeat age and uptime."""
    rows = _request(settings, HostsArgs())
    if as_json:
        emit_json(rows.to_wire())
        return
    emit_table(
        f"Worker hosts in namespace {settings.namespace!r}",
        ["id", "pool", "cores/sockets", "instances (session: run/assigned)", "busy", "beat", "up"],
        [
            (
                h.record.id + (" (draining)" if h.record.draining else ""),
                h.record.pool,
                f"{h.record.cores}/{h.record.sockets}",
                _per_session(h),
                "-" if h.record.utilisation is None else f"{100 * h.record.utilisation:.0f}%",
                f"{h.heartbeat_age:.1f}s ago",
                f"{h.uptime:.0f}s",
            )
            for h in rows.items
        ],
    )


def _per_session(host: HostInfo) -> str:
    running, assigned = host.instances, host.assignments
    sids = sorted(set(running) | set(assigned), key=int)
    return ", ".join(f"{s}: {running.get(s, 0)}/{assigned.get(s, 0)}" for s in sids) or "-"
