"""`soafarm admin`: who the caller is to the broker, and the admin role (list, grant, revoke).

RabbitMQ users themselves are made with `rabbitmqctl` on the RabbitMQ machine
(`soafarm admin permissions USER` prints the commands that fence a user's data path; see
docs/security.md), or by `soafarm up --user NAME` on its private servers.
"""

from __future__ import annotations

import shlex
from urllib.parse import unquote, urlsplit

import click

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.names import Names
from soafarm.state.control import Admins, AdminsArgs, PingArgs
from soafarm.state.redis_accounts import acl_rules, user_account_name, user_patterns
from soafarm.transport.permissions import client_permissions


@cli.group()
def admin() -> None:
    """Identity and the admin role: whoami, list, grant, revoke, permissions."""


@admin.command()
@with_settings
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def whoami(settings: Settings, as_json: bool) -> None:
    """The RabbitMQ user the broker daemon sees this client as, and whether it is an admin."""
    control = ControlClient(settings)
    try:
        pong = control.request(PingArgs())
    finally:
        control.close()
    if as_json:
        emit_json(pong.to_wire())
        return
    role = "admin" if pong.admin else "user"
    click.echo(f"{pong.user} ({role}) in namespace {pong.namespace!r}")


def _admins(settings: Settings, args: AdminsArgs) -> Admins:
    control = ControlClient(settings)
    try:
        return control.request(args)
    finally:
        control.close()


def _show(admins: Admins, as_json: bool) -> None:
    if as_json:
        emit_json(admins.to_wire())
        return
    rows = [(admins.broker_user, "the broker daemon's own user")]
    rows += [(u, "security.admins") for u in admins.configured]
    rows += [(u, "granted (soafarm admin grant)") for u in admins.granted]
    emit_table("Admins", ["user", "why"], rows)


@admin.command("list")
@with_settings
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def admin_list(settings: Settings, as_json: bool) -> None:
    """List the users with the admin role and why they have it."""
    _show(_admins(settings, AdminsArgs()), as_json)


@admin.command()
@with_settings
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def grant(settings: Settings, user: str, as_json: bool) -> None:
    """Give RabbitMQ user USER the admin role (an admin's command)."""
    _show(_admins(settings, AdminsArgs("grant", user)), as_json)


@admin.command()
@with_settings
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def revoke(settings: Settings, user: str, as_json: bool) -> None:
    """Take the granted admin role from USER (an admin's command; the broker's own user and
    `security.admins` keep theirs)."""
    _show(_admins(settings, AdminsArgs("revoke", user)), as_json)


@admin.command()
@with_settings
@click.argument("user")
@click.option("--vhost", default=None, help="The vhost (default: the amqp_url's, else /).")
def permissions(settings: Settings, user: str, vhost: str | None) -> None:
    """Print the commands that give user USER a client's permissions in this namespace:
    rabbitmqctl's (its own sessions' queues only; run them on the RabbitMQ machine, after
    `rabbitmqctl add_user USER PASSWORD`), and redis-cli's making its own Redis account
    (common data only; the broker daemon hands it one per session). Put a password of your
    own in place of PASSWORD, and give the user `redis://<account>:PASSWORD@host` as its
    redis_url."""
    if vhost is None:
        vhost = unquote(urlsplit(settings.amqp_urls[0]).path[1:]) or "/"
    for command in client_permissions(settings.namespace, user).rabbitmqctl(user, vhost):
        click.echo(shlex.join(["rabbitmqctl", *command]))
    names = Names(settings.namespace)
    account = user_account_name(names, user)
    rules = acl_rules("PASSWORD", user_patterns(names))
    click.echo(shlex.join(["redis-cli", "ACL", "SETUSER", account, *rules]))
