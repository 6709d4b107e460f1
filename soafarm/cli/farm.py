"""Commands that run farm processes: broker, worker, up, demo."""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import click

from soafarm.cli import cli, with_settings
from soafarm.config import Settings, with_section
from soafarm.errors import ConfigError, SoafarmError
from soafarm.local.embedded import EmbeddedServers
from soafarm.logs import configure_logging, say
from soafarm.processes import follow_parent, stop_on_signals
from soafarm.state.control import HostsArgs


@cli.command()
@with_settings
def broker(settings: Settings) -> None:
    """Run the broker daemon (session service and allocator) until SIGTERM or Ctrl-C."""
    from soafarm.broker.daemon import BrokerDaemon

    follow_parent()
    daemon = BrokerDaemon(settings)
    stop_on_signals(daemon.stop)
    daemon.run()


def _add_users(servers: EmbeddedServers, settings: Settings, users: tuple[str, ...]) -> None:
    """`up --user`: make each user on the private RabbitMQ and say where its settings are."""
    if users and not servers.rabbitmq_started:
        raise ConfigError(
            "--user makes users on the private RabbitMQ `soafarm up` starts, and none was "
            "started (one answers at amqp_url); make users on your RabbitMQ with rabbitmqctl "
            "(see docs/security.md)"
        )
    for user in users:
        config = servers.write_config(servers.add_user(settings, user), user)
        say(
            "embedded_user",
            f"user {user!r} reaches this farm with: soafarm --config {config} ...",
            user=user,
            config=str(config),
        )


@cli.command()
@with_settings
@click.option("--name", help="Host id (default: <hostname>-<pid>-<random>).")
@click.option("--cores", type=click.IntRange(min=0), help="Cores to offer (default: all).")
@click.option("--sockets", type=click.IntRange(min=0), help="Sockets to report (default: detect).")
@click.option("--pool", help="The pool this host belongs to (default: worker.pool).")
@click.option("--labels", help="Labels shown by `soafarm hosts`, as key=value,key=value.")
@click.option("--stop-with-parent", is_flag=True, hidden=True)
def worker(  # noqa: PLR0917 - click passes every option by name
    settings: Settings,
    name: str | None,
    cores: int | None,
    sockets: int | None,
    pool: str | None,
    labels: str | None,
    stop_with_parent: bool,
) -> None:
    """Run a worker host: register, heartbeat, run service instances it is assigned.

    SIGTERM drains it: running calls finish, requests not started go back to their queue.
    """
    from soafarm.workers.host import WorkerHost

    supervised = follow_parent() is not None
    given = {"cores": cores, "sockets": sockets, "pool": pool, "labels": labels}
    changes = {k: v for k, v in given.items() if v is not None}
    if changes:
        settings = with_section(settings, "worker", changes)
    host = WorkerHost(settings, name, stop_with_parent or supervised)
    stop_on_signals(host.stop)
    host.run()


@cli.command()
@with_settings
def autoscaler(settings: Settings) -> None:
    """Grow and shrink the pools of worker hosts with the load, until SIGTERM or Ctrl-C.

    Pools come from the [[autoscaler.pools]] tables of the settings file (default: one local
    pool of up to 2 single-core hosts). Stopping it stops the hosts of local pools (drained).
    """
    from soafarm.broker.autoscaler import Autoscaler
    from soafarm.workers.provisioners import make_provisioner

    follow_parent()
    provisioners = [make_provisioner(p, settings) for p in settings.autoscaler.pools]
    try:
        scaler = Autoscaler(settings, provisioners)
        stop_on_signals(scaler.stop)
        scaler.run()
    finally:
        for p in provisioners:
            p.close()


@cli.command()
@with_settings
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Worker hosts to start (besides those the autoscaler starts).",
)
@click.option(
    "--cores",
    default=0,
    type=click.IntRange(min=0),
    help="Cores each worker host offers (default: all).",
)
@click.option(
    "--autoscale",
    is_flag=True,
    help="Also run the autoscaler: hosts of the configured pools come and go with the load "
    "(combine with --workers 0 to start from zero hosts).",
)
@click.option(
    "--embedded/--no-embedded",
    default=True,
    show_default=True,
    help="Start private RabbitMQ/Redis when none answers at a localhost URL.",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    help="Make RabbitMQ user USER on the private RabbitMQ, with a settings file of its own "
    "(repeat for more users; each owns the sessions it creates).",
)
def up(  # noqa: PLR0917 - click passes every option by name
    settings: Settings,
    workers: int,
    cores: int,
    autoscale: bool,
    embedded: bool,
    users: tuple[str, ...],
) -> None:
    """Run a broker and local worker hosts in the foreground; Ctrl-C stops everything.

    A broker, worker host or autoscaler that crashes is started again (with back-off); they
    all stop when this process stops, however it stops. Refuses to start when a broker daemon
    already answers in the namespace.
    """
    from soafarm.local.farm import LocalFarm

    servers = EmbeddedServers(settings, enabled=embedded)
    with servers as effective:
        for line in servers.started:
            say("embedded_server_up", f"started {line} for the farm's lifetime", server=line)
        if servers.started:
            # their passwords are the farm's keys: in a file only this user reads, not on screen
            config = servers.write_config(effective)
            say(
                "embedded_config",
                f"other soafarm commands reach this farm with: soafarm --config {config} ...",
                config=str(config),
            )
        _add_users(servers, effective, users)
        farm = LocalFarm(
            effective, workers=workers, cores=cores, autoscale=autoscale, supervise=True
        )
        farm.start()
        scaling = ", autoscaler" if autoscale else ""

        def interrupt(signum: int, _frame: FrameType | None) -> None:
            # a terminal's Ctrl-C reaches every child too: none may be restarted as it stops
            farm.stop_supervising()
            raise KeyboardInterrupt

        # SIGTERM (a service manager, `kill`) stops the farm the way Ctrl-C does
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        try:
            # said once Ctrl-C is handled: one pressed as soon as it shows stops the farm
            say(
                "farm_up",
                f"soafarm is up: broker + {workers} worker host(s){scaling}, namespace "
                f"{effective.namespace!r}; crashed processes are restarted. Press Ctrl-C to stop.",
                workers=workers,
                autoscale=autoscale,
                namespace=effective.namespace,
            )
            farm.wait()
        except KeyboardInterrupt:
            say("farm_stopping", "stopping...")
        finally:
            restarts = farm.restarts
            farm.stop()
        if restarts:
            say(
                "farm_restarts",
                f"{restarts} crashed process(es) were restarted during this run",
                "warning",
                restarts=restarts,
            )


@cli.command()
@with_settings
@click.option(
    "--requests",
    "count",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Echo requests to send.",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--embedded/--no-embedded",
    default=True,
    show_default=True,
    help="Start private RabbitMQ/Redis when none answers at a localhost URL.",
)
def demo(settings: Settings, count: int, workers: int, embedded: bool) -> None:
    """Start a farm, push echo requests through a session, print the throughput, stop."""
    from soafarm.client.broker_client import BrokerClient
    from soafarm.client.session import Session, SessionStartInfo
    from soafarm.local.farm import LocalFarm, delete_namespace

    servers = EmbeddedServers(settings, enabled=embedded)
    with servers as reachable:
        for line in servers.started:
            say("embedded_server_up", f"started {line} for this demo", server=line)
        # a private namespace: the demo never touches another farm's sessions or hosts
        effective = reachable.replace(
            namespace=f"{reachable.namespace}.demo-{os.getpid()}",
            # the farm's own info lines would drown the demo's output; warnings still show
            log_level="warning" if settings.log_level == "info" else settings.log_level,
        )
        configure_logging(effective.log_format, effective.log_level)
        click.echo(f"starting a local farm ({workers} worker host(s))...")
        try:
            with (
                LocalFarm(effective, workers=workers),
                Session.create(SessionStartInfo("echo"), effective) as session,
            ):
                units = sum(h.record.cores for h in session.control.request(HostsArgs()).items)
                session.wait_for_instances(units)
                click.echo(
                    f"session {session.id}: {units} echo service instance(s) ready; "
                    f"sending {count:,} requests"
                )
                start = time.perf_counter()
                with BrokerClient(session) as client:
                    for i in range(count):
                        client.send_request("echo", f"hello {i}", user_data=i)
                    client.end_requests()
                    seen = [
                        r.user_data
                        for r in client.get_responses(timeout=60)
                        if r.result.endswith(f":hello {r.user_data}")
                    ]
                elapsed = time.perf_counter() - start
        finally:
            delete_namespace(effective)
        if sorted(seen) != list(range(count)):
            raise SoafarmError(f"demo got {len(seen)} correct responses of {count}")
        click.echo(
            f"{count:,} requests, every response received once, in {elapsed:.2f} s: "
            f"{count / elapsed:,.0f} requests/s end to end"
        )
