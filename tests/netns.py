"""A Linux network namespace that looks like another machine to a worker host started in it:
its own loopback and address, and one veth link to this machine, which a test takes down
and up again. Servers are reached through proxies listening on this machine's end of the
link (they forward to the servers on 127.0.0.1, which the namespace cannot reach), so a
link taken down cuts the host off as a pulled cable would: no reset, just silence. Needs
root (`ip netns`)."""

from __future__ import annotations

import contextlib
import random
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from soafarm.config import Settings
from tests.proxy import CuttableProxy


def ip(*args: str) -> str:
    """`ip ARGS`; its output (fails the test with ip's message on an error)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class OtherMachine:
    """A network namespace `name`, linked to this machine by `outside` (this machine's end,
    `gateway`) and its own end at `address`."""

    name: str
    outside: str
    gateway: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def link(self, up: bool) -> None:
        """Take the link down (the machine falls silent) or up again."""
        ip("link", "set", self.outside, "up" if up else "down")

    def reachable(self) -> bool:
        """True if one ping from inside reaches this machine's end of the link."""
        done = subprocess.run(
            [*self.prefix, "ping", "-c1", "-W1", self.gateway], capture_output=True, check=False
        )
        return done.returncode == 0


def _free_subnet() -> int:
    used = ip("-o", "-4", "addr")
    for _ in range(100):
        k = random.randrange(1, 250)
        if f" 10.213.{k}." not in used:
            return k
    raise RuntimeError("no free 10.213.x.0/24 subnet")


@contextlib.contextmanager
def other_machine() -> Iterator[OtherMachine]:
    """Make the namespace and its link; remove both afterwards."""
    token = secrets.token_hex(3)
    k = _free_subnet()
    machine = OtherMachine(f"sf-{token}", f"sf{token}o", f"10.213.{k}.1", f"10.213.{k}.2")
    inside = f"sf{token}i"
    ip("netns", "add", machine.name)
    try:
        ip("link", "add", machine.outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", machine.name)
        ip("addr", "add", f"{machine.gateway}/24", "dev", machine.outside)
        ip("link", "set", machine.outside, "up")
        inner = ["netns", "exec", machine.name, "ip"]
        ip(*inner, "addr", "add", f"{machine.address}/24", "dev", inside)
        ip(*inner, "link", "set", inside, "up")
        ip(*inner, "link", "set", "lo", "up")
        yield machine
    finally:
        with contextlib.suppress(RuntimeError):
            ip("link", "del", machine.outside)  # takes its peer with it
        with contextlib.suppress(RuntimeError):
            ip("netns", "del", machine.name)


@contextlib.contextmanager
def servers_seen_from(machine: OtherMachine, settings: Settings) -> Iterator[dict[str, str]]:
    """Proxies on `machine`'s gateway to `settings`' RabbitMQ and Redis; the `SOAFARM_*`
    variables that point a process inside `machine` at them. AMQP heartbeats every 2 s, so
    RabbitMQ notices a silent host within seconds (the URL's `heartbeat`, as users set it)."""
    amqp, redis_url = urlsplit(settings.amqp_urls[0]), urlsplit(settings.redis_url)
    with (
        CuttableProxy((amqp.hostname or "127.0.0.1", amqp.port or 5672), machine.gateway) as a,
        CuttableProxy(
            (redis_url.hostname or "127.0.0.1", redis_url.port or 6379), machine.gateway
        ) as r,
    ):

        def through(url: str, port: int) -> str:
            parts = urlsplit(url)
            credentials = parts.netloc.rpartition("@")[0]
            at = f"{credentials}@" if credentials else ""
            return urlunsplit(parts._replace(netloc=f"{at}{machine.gateway}:{port}"))

        yield {
            "SOAFARM_AMQP_URL": with_query(through(settings.amqp_urls[0], a.port), "heartbeat=2"),
            "SOAFARM_REDIS_URL": through(settings.redis_url, r.port),
        }


def with_query(url: str, pair: str) -> str:
    """`url` with `pair` ("key=value") added to its query."""
    parts = urlsplit(url)
    query = f"{parts.query}&{pair}" if parts.query else pair
    return urlunsplit(parts._replace(query=query))
