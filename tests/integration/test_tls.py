"""A whole session over TLS to both servers: private RabbitMQ and Redis that speak TLS only
and require client certificates (made by the test), a farm and a client using `[tls]`; and
the one-line errors of a client that cannot prove itself or verify the server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings, TlsSettings, load_settings
from soafarm.errors import ConfigError, ConnectionFailed
from soafarm.local.embedded import EmbeddedServers, ServerTls, free_port
from soafarm.local.farm import LocalFarm
from soafarm.transport.connections import pika_connection, redis_client
from tests.certs import Certs, make_certs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Certs]]:
    """Private TLS-only servers and the settings of a client holding a valid certificate."""
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    settings = load_settings(environ={}).replace(
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        amqp_url=f"amqps://guest:guest@127.0.0.1:{free_port()}/",
        redis_url=f"rediss://127.0.0.1:{free_port()}/0",
        tls=TlsSettings(str(certs.ca), str(certs.client_cert), str(certs.client_key)),
    )
    servers = EmbeddedServers(
        settings, tls=ServerTls(certs.ca, certs.server_cert, certs.server_key)
    )
    with servers as effective:
        yield effective, certs


def test_a_session_runs_over_tls_to_both_servers(tls_farm: tuple[Settings, Certs]) -> None:
    settings, _ = tls_farm
    assert settings.amqp_url.startswith("amqps://") and settings.redis_url.startswith("rediss://")
    with (
        LocalFarm(settings, workers=1, cores=2),
        Session.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        for i in range(200):
            client.send_request("echo", i)
        client.end_requests()
        assert sorted(r.id for r in client.get_responses(timeout=60)) == list(range(200))


def test_without_a_client_certificate_both_servers_refuse(tls_farm: tuple[Settings, Certs]) -> None:
    settings, certs = tls_farm
    anonymous = settings.replace(tls=TlsSettings(ca_file=str(certs.ca)))
    with pytest.raises(ConnectionFailed, match="Redis"):
        redis_client(anonymous)
    with pytest.raises(ConnectionFailed, match="RabbitMQ"):
        pika_connection(anonymous, "test")


def test_a_server_not_signed_by_the_ca_is_refused(
    tls_farm: tuple[Settings, Certs], tmp_path: Path
) -> None:
    settings, certs = tls_farm
    other = make_certs(tmp_path / "other")  # another CA: the servers' certificates fail it
    doubting = settings.replace(
        tls=TlsSettings(str(other.ca), str(certs.client_cert), str(certs.client_key))
    )
    with pytest.raises(ConnectionFailed, match="certificate verify failed"):
        redis_client(doubting)
    with pytest.raises(ConnectionFailed, match="RabbitMQ"):
        pika_connection(doubting, "test")


def test_missing_certificate_files_are_one_config_error(tls_farm: tuple[Settings, Certs]) -> None:
    settings, _ = tls_farm
    with pytest.raises(ConfigError, match=r"tls\.ca_file: no such file '/nonexistent/ca\.pem'"):
        redis_client(settings.replace(tls=TlsSettings(ca_file="/nonexistent/ca.pem")))
    with pytest.raises(ConfigError, match=r"tls\.key_file is set without tls\.cert_file"):
        pika_connection(settings.replace(tls=TlsSettings(key_file=__file__)), "test")
