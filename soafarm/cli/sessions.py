"""Commands that ask the broker daemon: `sessions list|show|close`, `hosts
[offline|online|drain HOST]`."""

from __future__ import annotations

import time

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.resources import UNBOUNDED_UNITS
from soafarm.state.control import (
    CloseArgs,
    ControlCall,
    GetArgs,
    HostActionArgs,
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
    """List open sessions with state, units, age and why a session waits (or why its
    grow/shrink target is what it is)."""
    rows = _request(settings, ListArgs(service))
    if as_json:
        emit_json(rows.to_wire())
        return
    emit_table(
        f"Sessions in namespace {settings.namespace!r}",
        [
            "id",
            "service",
            "kind",
            "state",
            "activity",
            "units",
            "allocated/target",
            "age",
            "owner",
            "why",
        ],
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
                "" if s.status is None else (s.status.waiting or s.status.reason),
            )
            for s in rows.items
        ],
    )


@sessions.command("show")
@with_settings
@click.argument("session_id", type=int)
def sessions_show(settings: Settings, session_id: int) -> None:
    """Print one session's record, instances and clients as JSON (with allocated_units, the
    instances running, against target_units, what the allocator gives it; `status` holds
    its grow/shrink target, load ratio, and why it waits or last grew or shrank)."""
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


@cli.group(invoke_without_command=True)
@with_settings
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hosts(settings: Settings, as_json: bool) -> None:
    """List live worker hosts: pool, size, instances per session (running/assigned),
    utilisation over the last heartbeat, heartbeat age and uptime; `offline`, `drain` and
    `online` change what a host is given."""
    ctx = click.get_current_context()
    if ctx.invoked_subcommand is not None:
        if as_json:
            raise click.UsageError("--json lists hosts; it takes no subcommand", ctx)
        # the settings options given here reach the subcommand through `with_settings`
        return
    rows = _request(settings, HostsArgs())
    if as_json:
        emit_json(rows.to_wire())
        return
    emit_table(
        f"Worker hosts in namespace {settings.namespace!r}",
        ["id", "pool", "cores/sockets", "instances (session: run/assigned)", "busy", "beat", "up"],
        [
            (
                h.record.id + _marks(h),
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


def _marks(host: HostInfo) -> str:
    """The mark after a host's id: its operator's state, else "draining" if it is stopping."""
    if host.admin:
        return f" ({host.admin})"
    return " (draining)" if host.record.draining else ""


#: What each subcommand says once done.
_DONE = {
    "offline": "is offline: it gets no new instances and finishes those it runs",
    "drain": "is draining: its instances stop after their calls and their sessions move on",
    "online": "is online",
}


def _act(settings: Settings, host_id: str, action: str) -> None:
    if not host_id:
        raise click.BadParameter("must not be empty", param_hint="HOST_ID")
    done = _request(settings, HostActionArgs(host_id, action))
    was = f" (was {done.previous})" if done.previous and done.previous != done.state else ""
    click.echo(f"host {host_id} {_DONE[action]}{was}")


@hosts.command("offline")
@with_settings
@click.argument("host_id")
def hosts_offline(settings: Settings, host_id: str) -> None:
    """Give HOST_ID no new instances; those it runs stay until their sessions end or shrink
    (kept across a restart of the host under the same id, until `online`)."""
    _act(settings, host_id, "offline")


@hosts.command("drain")
@with_settings
@click.argument("host_id")
def hosts_drain(settings: Settings, host_id: str) -> None:
    """Give HOST_ID no new instances and stop those it runs gracefully: calls in flight
    finish, and their sessions get their units on other hosts (until `online`)."""
    _act(settings, host_id, "drain")


@hosts.command("online")
@with_settings
@click.argument("host_id")
def hosts_online(settings: Settings, host_id: str) -> None:
    """Return HOST_ID to normal after `offline` or `drain` (also clears the state of a host
    that is not running)."""
    _act(settings, host_id, "online")


def _per_session(host: HostInfo) -> str:
    running, assigned = host.instances, host.assignments
    sids = sorted(set(running) | set(assigned), key=int)
    return ", ".join(f"{s}: {running.get(s, 0)}/{assigned.get(s, 0)}" for s in sids) or "-"
