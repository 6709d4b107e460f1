"""Private RabbitMQ / Redis servers started by `EmbeddedServers`, against the real binaries."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pytest
import redis

from soafarm.config import Settings, load_settings
from soafarm.errors import ConnectionFailed
from soafarm.local.embedded import EmbeddedServers, answers, free_port

pytestmark = pytest.mark.integration


def require_binaries() -> None:
    """The embedded servers are a promise of `soafarm up`: test them, never skip them."""
    assert shutil.which("redis-server"), "redis-server is not installed (apt-get install redis)"
    assert (
        shutil.which("rabbitmq-server") or Path("/usr/lib/rabbitmq/bin/rabbitmq-server").is_file()
    ), "rabbitmq-server is not installed (apt-get install rabbitmq-server)"


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


@pytest.fixture
def real_servers(servers: None) -> Settings:
    """Default settings, whose localhost RabbitMQ and Redis are running (else the suite fails)."""
    require_binaries()
    return Settings()


def test_private_redis_keeps_its_data_across_a_restart(real_servers: Settings) -> None:
    settings = real_servers.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    servers = EmbeddedServers(settings)
    with servers as effective:
        client = redis.Redis.from_url(effective.redis_url)
        try:
            client.set("kept", "1")
            servers.restart("Redis")  # a clean stop writes the AOF
            assert client.get("kept") == b"1"
            client.set("kept", "2")
            client.execute_command("BGREWRITEAOF")  # on disk now, whatever the fsync timer
            servers.restart("Redis", kill=True)
            assert client.get("kept") == b"2"
        finally:
            client.close()
        with pytest.raises(ConnectionFailed, match="no private RabbitMQ"):
            servers.kill("RabbitMQ")


def test_private_redis_started_and_stopped(real_servers: Settings) -> None:
    dead = free_port()
    settings = real_servers.replace(redis_url=f"redis://127.0.0.1:{dead}/3")
    servers = EmbeddedServers(settings)
    with servers as effective:
        port = port_of(effective.redis_url)
        password = urlsplit(effective.redis_url).password
        assert password and len(password) >= 24
        assert effective.redis_url == f"redis://:{password}@127.0.0.1:{port}/3"
        # another local user, who knows only the port, gets nothing
        stranger = redis.Redis(host="127.0.0.1", port=port)
        with pytest.raises(redis.AuthenticationError):
            stranger.keys("*")
        stranger.close()
        assert effective.amqp_url == settings.amqp_url  # the real RabbitMQ answered
        assert len(servers.started) == 1
        assert f"private Redis on 127.0.0.1:{port}" in servers.started[0]
        client = redis.Redis.from_url(effective.redis_url)
        try:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()
        temp_dir = servers.temp_dir
        assert temp_dir is not None
        assert temp_dir.is_dir()
    assert not answers("127.0.0.1", port)
    assert not temp_dir.exists()


def test_private_rabbitmq_started_and_stopped(real_servers: Settings) -> None:
    dead = free_port()
    settings = real_servers.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{dead}/")
    servers = EmbeddedServers(settings)
    with servers as effective:
        port = port_of(effective.amqp_url)
        user, password = (
            urlsplit(effective.amqp_url).username,
            urlsplit(effective.amqp_url).password,
        )
        assert user == "soafarm" and password and len(password) >= 24
        assert effective.amqp_url == f"amqp://soafarm:{password}@127.0.0.1:{port}/"
        # guest, whom any local user may be over loopback, does not exist there
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/"))
        assert effective.redis_url == settings.redis_url  # the real Redis answered
        assert len(servers.started) == 1
        assert f"private RabbitMQ on 127.0.0.1:{port}" in servers.started[0]
        conn = pika.BlockingConnection(pika.URLParameters(effective.amqp_url))
        try:
            channel = conn.channel()
            channel.queue_declare("embedded-test", auto_delete=True)
            channel.basic_publish("", "embedded-test", b"hello")
            _, _, body = channel.basic_get("embedded-test", auto_ack=True)
            assert body == b"hello"
        finally:
            conn.close()
        temp_dir = servers.temp_dir
        assert temp_dir is not None
    assert not answers("127.0.0.1", port)
    assert not temp_dir.exists()


def test_the_farms_config_file_holds_its_urls_for_its_owner_only(real_servers: Settings) -> None:
    settings = real_servers.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    servers = EmbeddedServers(settings)
    with servers as effective:
        path = servers.write_config(effective)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        again = load_settings(path, environ={})
        assert (again.redis_url, again.amqp_url, again.namespace) == (
            effective.redis_url,
            effective.amqp_url,
            effective.namespace,
        )
        conf = next(servers.temp_dir.glob("redis/redis.conf"))  # type: ignore[union-attr]
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert not path.exists()


def test_answering_servers_are_left_alone(real_servers: Settings) -> None:
    servers = EmbeddedServers(real_servers)
    with servers as effective:
        assert effective == real_servers
        assert servers.started == []
        assert servers.temp_dir is None


def test_disabled_starts_nothing() -> None:
    dead_amqp, dead_redis = free_port(), free_port()
    settings = Settings(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{dead_amqp}/",
        redis_url=f"redis://127.0.0.1:{dead_redis}/0",
    )
    servers = EmbeddedServers(settings, enabled=False)
    with servers as effective:
        assert effective == settings
        assert servers.started == []
        assert servers.temp_dir is None


def test_start_timeout_stops_the_server_and_names_the_log(real_servers: Settings) -> None:
    settings = real_servers.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    servers = EmbeddedServers(settings, startup_timeout=0.0)
    try:
        with pytest.raises(ConnectionFailed, match=r"private Redis .*redis\.log"):
            servers.__enter__()
        assert servers.started == []
        assert servers.temp_dir is not None
        assert (servers.temp_dir / "redis" / "redis.log").exists()  # kept for the user to read
    finally:
        servers.__exit__(None, None, None)
