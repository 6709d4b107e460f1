"""Redis Sentinel (issue 19): every component on a `redis+sentinel://` URL, and the master
killed mid-batch. Private servers: a master, a replica and three Sentinels (tests.sentinel)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import pytest

from soafarm import BrokerClient, DurableSession, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.transport.connections import redis_client
from tests.sentinel import RedisSentinels, redis_sentinels
from tests.waiting import counted

pytestmark = pytest.mark.integration

N = 4000


@pytest.fixture(scope="module")
def servers() -> Iterator[RedisSentinels]:
    """One master, replica and three Sentinels for the module (~12 s to start): the test
    that only reads runs first, the one that kills the master last."""
    with redis_sentinels() as running:
        yield running


def test_every_component_finds_the_master_through_the_sentinels(
    settings: Settings, servers: RedisSentinels
) -> None:
    client = redis_client(settings.replace(redis_url=servers.url))
    try:
        server = client.info("server")
        assert server["tcp_port"] == servers.master_port()
        assert client.info("replication")["role"] == "master"
    finally:
        client.close()


def test_a_durable_batch_completes_exactly_once_through_a_redis_failover(
    settings: Settings, servers: RedisSentinels
) -> None:
    s = settings.replace(
        redis_url=servers.url,
        client=dataclasses.replace(settings.client, request_batch_size=20),
    )
    with LocalFarm(s, workers=1, cores=2):
        session = DurableSession.create(SessionStartInfo("faulty"), s)
        killed: list[int] = []
        outstanding: list[int] = []
        promoted: list[int] = []
        with BrokerClient(session, "batch") as client:
            for i in range(N):
                client.send_request("sleep", 0.002, user_data=i)
            client.end_requests()
            seen: list[int] = []

            def fail_over() -> None:
                outstanding.append(N - client.status().done)
                killed.append(servers.kill_master())
                promoted.append(servers.wait_for_failover(killed[0]))

            failover = threading.Thread(target=fail_over)
            for response in client.get_responses(timeout=120):
                seen.append(response.user_data)
                if len(seen) == N // 4:  # a quarter answered: the master dies
                    failover.start()
            failover.join(timeout=60)
            status = counted(client, N)
        session.close()
    assert killed and promoted and promoted[0] != killed[0]
    assert outstanding[0] > N // 4, "the master died after the batch was done"
    assert len(seen) == len(set(seen)), "a response was handed out twice"
    assert sorted(seen) == list(range(N))
    assert (status.accepted, status.done, status.finished) == (N, N, True)
