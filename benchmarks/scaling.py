"""`python -m benchmarks.scaling`: the per-component costs `docs/scaling.md` plans from.

On the local RabbitMQ and Redis (otherwise idle: the counts are differences), with a farm in
a namespace of its own, it measures:

- AMQP connections and channels: the broker daemon's, and per worker host with 4 busy
  instances of capacity 1 (`rabbitmqctl list_connections`), and RabbitMQ's memory per
  connection with a channel (`rabbitmqctl status`, over 200 of them);
- queues per session: an interactive and a durable session, each with 2 client ids
  (`rabbitmqctl list_queues`);
- Redis commands (`INFO commandstats`): per second for an idle broker daemon, per idle
  worker host, and per request of a durable and of an interactive batch of 20,000 echo
  calls (the idle rate over the batch's time taken off).

Prints one table; `--json FILE` writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid
from typing import Any

import redis

from benchmarks.figures import SERVICES
from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.transport.connections import pika_connection

IDLE_SECONDS = 10.0
BATCH = 20_000


def rabbitmqctl_json(*args: str) -> list[dict[str, Any]]:
    """A `rabbitmqctl ... --formatter json` listing."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", *args, "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows: list[dict[str, Any]] = json.loads(out or "[]")
    return rows


def connections() -> tuple[int, int]:
    """soafarm's AMQP connections (named `soafarm-...`) and their channels."""
    count = channels = 0
    for row in rabbitmqctl_json("list_connections", "client_properties", "channels"):
        # a list of [key, type, value]
        properties = {p[0]: p[2] for p in row.get("client_properties") or [] if len(p) == 3}
        if str(properties.get("connection_name", "")).startswith("soafarm"):
            count += 1
            channels += int(row.get("channels", 0))
    return count, channels


def connection_memory() -> int:
    """Bytes RabbitMQ holds for connections and their channels."""
    memory = rabbitmqctl_status()["memory"]
    keys = ("connection_readers", "connection_writers", "connection_channels", "connection_other")
    return sum(int(memory.get(k, 0)) for k in keys)


def rabbitmqctl_status() -> dict[str, Any]:
    """`rabbitmqctl status`, as JSON."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "status", "--formatter", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    status: dict[str, Any] = json.loads(out)
    return status


def memory_per_connection(settings: Settings, n: int = 200) -> float:
    """RabbitMQ's bytes per idle connection with one channel (as an instance's call loop
    holds), over `n` of them."""
    before = connection_memory()
    opened = [pika_connection(settings, f"bench-scaling {i}") for i in range(n)]
    for connection in opened:
        connection.channel()
    during = connection_memory()
    for connection in opened:
        connection.close()
    return (during - before) / n


def queues(namespace: str) -> int:
    """Queues (and streams) of `namespace`."""
    rows = rabbitmqctl_json("list_queues", "name")
    return sum(1 for row in rows if str(row.get("name", "")).startswith(f"{namespace}."))


def redis_calls(client: redis.Redis, but: str = "") -> int:
    """Commands Redis has run since it started (all clients, scripts' own included), less
    those of command `but`."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != f"cmdstat_{but}")


def commands_per_second(client: redis.Redis, seconds: float) -> float:
    """Redis commands per second over `seconds` of whatever runs now."""
    before = redis_calls(client)
    time.sleep(seconds)  # a rate over a wall-clock window: the window is the measurement
    return (redis_calls(client) - before) / seconds


def per_request(
    client: redis.Redis, settings: Settings, durable: bool, idle_rate: float
) -> tuple[float, float]:
    """Redis commands per request of a batch of BATCH echo calls, the idle rate taken off:
    all, and all but SETBIT (one per request, run by the done-mark script inside Redis; the
    rest are the round trips, one per batch or per flush)."""
    kind = DurableSession if durable else Session
    with kind.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as session:
        session.wait_for_instances(2)
        before, began = redis_calls(client), time.monotonic()
        others = redis_calls(client, but="setbit")
        with BrokerClient(session, f"b{uuid.uuid4().hex[:6]}") as sender:
            for i in range(BATCH):
                sender.send_request("echo", i)
            sender.end_requests()
            got = sum(1 for _ in sender.get_responses(timeout=300))
        assert got == BATCH, got
        idle = idle_rate * (time.monotonic() - began)
        spent = redis_calls(client) - before - idle
        round_trips = redis_calls(client, but="setbit") - others - idle
        if durable:
            session.close()
    return spent / BATCH, round_trips / BATCH


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_file", help="Also write the figures here.")
    args = parser.parse_args()
    settings = load_settings().replace(
        namespace=f"bench-scale-{uuid.uuid4().hex[:6]}",
        log_level="warning",
        service_registration_path=(SERVICES, *load_settings().service_registration_path),
    )
    r = redis.Redis.from_url(settings.redis_url)
    figures: dict[str, float] = {}
    try:
        base = connections()
        with LocalFarm(settings, workers=0, cores=4):
            figures["redis commands/s, idle broker daemon"] = commands_per_second(r, IDLE_SECONDS)
            broker = [now - was for now, was in zip(connections(), base, strict=True)]
            figures["AMQP connections, broker daemon"] = broker[0]
            figures["AMQP channels, broker daemon"] = broker[1]
        with LocalFarm(settings, workers=2, cores=4):
            idle = commands_per_second(r, IDLE_SECONDS)
            figures["redis commands/s per idle worker host"] = (
                idle - figures["redis commands/s, idle broker daemon"]
            ) / 2
            with Session.create(
                SessionStartInfo("echo", min_units=8, max_units=8), settings
            ) as busy:
                busy.wait_for_instances(8)
                farm = [now - was for now, was in zip(connections(), base, strict=True)]
            # an instance's first call loop takes the connection its spare opened while it
            # waited; the host keeps spares forked ahead (their connections open, no channel)
            figures["AMQP connections per host, 4 busy instances"] = (farm[0] - broker[0]) / 2
            figures["AMQP channels per host, 4 busy instances"] = (farm[1] - broker[1]) / 2
            figures["RabbitMQ KiB per connection with a channel"] = (
                memory_per_connection(settings) / 1024
            )
            before = queues(settings.namespace)
            for durable in (False, True):
                made = DurableSession if durable else Session
                with made.create(SessionStartInfo("echo"), settings) as session:
                    for client_id in ("a", "b"):
                        BrokerClient(session, client_id).close()
                    label = "durable" if durable else "interactive"
                    figures[f"queues per {label} session, 2 client ids"] = (
                        queues(settings.namespace) - before
                    )
                    if durable:
                        session.close()
            for durable in (True, False):
                label = "durable" if durable else "interactive"
                spent, round_trips = per_request(r, settings, durable, idle)
                figures[f"redis commands per request, {label}"] = spent
                figures[f"  of which not the done mark's SETBIT, {label}"] = round_trips
    finally:
        delete_namespace(settings)
        r.close()
    width = max(map(len, figures))
    print("per-component costs (benchmarks.scaling)")
    for name, value in figures.items():
        print(f"{name:{width}}  {value:,.2f}")
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
