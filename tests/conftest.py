"""Shared fixtures. Integration tests use the real RabbitMQ and Redis, each test in its own
namespace (queue and key prefix), which it deletes afterwards; nothing shared is flushed."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import redis

from soafarm.config import Settings, load_settings
from soafarm.local.embedded import EmbeddedServers, free_port
from soafarm.local.farm import LocalFarm, delete_namespace

START_HINT = (
    "integration tests need the real servers: start RabbitMQ with `rabbitmq-server -detached && "
    "rabbitmqctl await_startup` and Redis with `redis-server --daemonize yes --bind 127.0.0.1 "
    "--port 6379 --save '' --appendonly no` (or run .ci/run, which does both)"
)


def _base_settings() -> Settings:
    # tests never depend on the developer's own SOAFARM_* variables
    return load_settings(environ={})


@pytest.fixture(scope="session")
def servers() -> None:
    """Fail loudly (never skip) when RabbitMQ or Redis is not reachable."""
    s = _base_settings()
    try:
        redis.Redis.from_url(s.redis_url, socket_connect_timeout=2).ping()
        pika.BlockingConnection(pika.URLParameters(s.amqp_url)).close()
    except Exception as e:
        pytest.fail(f"{type(e).__name__}: {e}; {START_HINT}", pytrace=False)


@pytest.fixture
def settings(servers: None, tmp_path: Path) -> Iterator[Settings]:
    """Settings in a fresh namespace, with `tmp_path/services` on the registration path."""
    (tmp_path / "services").mkdir()
    s = _base_settings().replace(
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        service_registration_path=(tmp_path / "services",),
        package_cache=str(tmp_path / "packages"),
    )
    yield s
    delete_namespace(s)


@pytest.fixture
def farm(settings: Settings) -> Iterator[LocalFarm]:
    """A broker and one 2-core worker host in the test's namespace."""
    with LocalFarm(settings, workers=1, cores=2) as running:
        yield running


class PrivateServers:
    """A private RabbitMQ and Redis of a test's own, and settings that point at them.

    Fault tests stop, kill and restart these (`kill`, `stop`, `start`, `restart` with
    "RabbitMQ" or "Redis"; `rabbitmqctl(...)` for `stop_app` and the like), never the
    machine's servers. Redis runs with AOF (`appendfsync everysec`), as compose runs it.
    """

    def __init__(self, servers: EmbeddedServers, settings: Settings) -> None:
        self.servers = servers
        self.settings = settings

    def kill(self, name: str) -> None:
        """SIGKILL the server `name` ("RabbitMQ" or "Redis")."""
        self.servers.kill(name)

    def stop(self, name: str) -> None:
        """Stop the server `name` cleanly."""
        self.servers.stop(name)

    def start(self, name: str) -> None:
        """Start the server `name` again (same port, same data); returns once it answers."""
        self.servers.start(name)

    def restart(self, name: str, kill: bool = False) -> None:
        """Stop (or kill) and start the server `name`."""
        self.servers.restart(name, kill=kill)

    def rabbitmqctl(self, *args: str, timeout: float = 120.0) -> str:
        """Run rabbitmqctl against the private RabbitMQ."""
        return self.servers.rabbitmqctl(*args, timeout=timeout)


@contextlib.contextmanager
def private_servers_for(settings: Settings) -> Iterator[PrivateServers]:
    """Start a private RabbitMQ and Redis for `settings` (its namespace and registration path
    are kept) and stop them afterwards."""
    nowhere = settings.replace(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    servers = EmbeddedServers(nowhere)
    with servers as effective:
        yield PrivateServers(servers, effective)


@pytest.fixture
def private_servers(settings: Settings) -> Iterator[PrivateServers]:
    """A private RabbitMQ and Redis for one test, in the test's namespace (see
    `PrivateServers`); `private_servers.settings` points at them."""
    with private_servers_for(settings) as private:
        yield private


def cli_env(settings: Settings) -> dict[str, str]:
    """Environment for running the `soafarm` CLI as a subprocess against `settings`."""
    from soafarm.config import child_environment

    return child_environment(settings, os.environ)
