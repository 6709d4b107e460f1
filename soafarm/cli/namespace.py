"""`soafarm namespace delete`: remove every queue and key of a namespace."""

from __future__ import annotations

import click

from soafarm.cli import cli, with_settings
from soafarm.config import Settings
from soafarm.errors import SoafarmError
from soafarm.names import Names
from soafarm.state.namespace import delete_namespace_state, live_parties
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.identity import own_user


@cli.group()
def namespace() -> None:
    """Manage a whole namespace (every queue and key with its prefix)."""


@namespace.command("delete")
@with_settings
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete even while worker hosts or broker daemons still use the namespace.",
)
def namespace_delete(settings: Settings, yes: bool, force: bool) -> None:
    """Delete every queue and key of the namespace: sessions (open ones too, with their
    pending requests and unread responses), hosts' records, counters, the session id mark.

    Refuses while a worker host or broker daemon uses it (stop them first), unless --force.
    Queues of sessions whose state Redis lost are found through the session id mark, for
    the `default` client id; see docs/cli.md for other client ids.
    """
    ns = settings.namespace
    names = Names(ns)
    client = redis_client(settings)
    try:
        connection = pika_connection(settings, f"soafarm-namespace-delete {ns}")
        try:
            hosts, brokers = live_parties(client, connection, names)
            if (hosts or brokers) and not force:
                shown = ", ".join(hosts[:3]) + (", ..." if len(hosts) > 3 else "")
                raise SoafarmError(
                    f"namespace {ns!r} is in use: {len(hosts)} live worker host(s)"
                    + (f" ({shown})" if hosts else "")
                    + f" and {brokers} broker daemon(s); stop them first (a host killed "
                    "less than worker.host_timeout ago still counts), or pass --force"
                )
            if not yes and not click.confirm(
                f"Delete every queue and key of namespace {ns!r}, open sessions included?",
                default=False,
            ):
                raise SoafarmError("nothing deleted")
            done = delete_namespace_state(client, connection, names, own_user(settings))
        finally:
            if connection.is_open:
                connection.close()
    finally:
        client.close()
    swept = f"; {done.swept_ids} session id(s) without state checked" if done.swept_ids else ""
    click.echo(f"namespace {ns!r} deleted: {done.queues} queue(s), {done.keys} key(s){swept}")
