"""A RabbitMQ cluster (issue 19): every component on the `;` list of the cluster's AMQP URLs,
and the node that leads a session's queues stopped mid-batch. Private servers: three
RabbitMQ nodes on this machine (tests.rabbit_cluster, compose/rabbitmq-cluster.sh)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import SessionFailed
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.state.idmark import id_mark_queue
from soafarm.transport.connections import pika_connection
from soafarm.transport.topology import dead_letter_queue, declare_farm_queue
from tests.rabbit_cluster import RabbitCluster, rabbitmq_cluster
from tests.waiting import counted, wait_until

pytestmark = pytest.mark.integration

N = 20_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with rabbitmq_cluster(3) as running:
        yield running


def on_cluster(settings: Settings, cluster: RabbitCluster) -> Settings:
    return settings.replace(
        amqp_url=cluster.urls,
        client=dataclasses.replace(settings.client, request_batch_size=50),
    )


def stalls(samples: list[tuple[float, int]]) -> Iterator[float]:
    """How long each count in `samples` stayed unchanged before it grew."""
    since, count = samples[0]
    for when, now in samples[1:]:
        if now > count:
            yield when - since
            since, count = when, now


def test_the_cluster_replicates_a_durable_sessions_queues_on_every_node(
    settings: Settings, cluster: RabbitCluster
) -> None:
    s = on_cluster(settings, cluster)
    with LocalFarm(s, workers=1, cores=1):
        session = DurableSession.create(SessionStartInfo("echo"), s)
        with BrokerClient(session, "one") as client:
            client.send_request("echo", 1, user_data="only")
            client.end_requests()
            assert [r.user_data for r in client.get_responses(timeout=60)] == ["only"]
        names = Names(s.namespace)
        out = cluster.ctl(1, "list_queues", "name", "type", "members", "--no-table-headers")
        rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
        requests = rows[names.request_queue(session.id)]
        (responses,) = (row for name, row in rows.items() if ".responses." in name)
        assert requests[0] == "quorum" and responses[0] == "stream"
        for kind, members in (("requests", requests[1]), ("responses", responses[1])):
            assert all(f"-{i}@localhost" in members for i in (1, 2, 3)), (kind, members)
        session.close()


def test_a_durable_batch_completes_exactly_once_with_its_queues_leader_stopped(
    settings: Settings, cluster: RabbitCluster
) -> None:
    s = on_cluster(settings, cluster)
    stopped: list[int] = []
    outstanding: list[int] = []
    samples: list[tuple[float, int]] = []  # (when, done) from just before the stop
    with LocalFarm(s, workers=1, cores=2):
        session = DurableSession.create(SessionStartInfo("faulty"), s)
        # its queues' leader: the node the broker daemon declared them through
        node = cluster.node_of(Names(s.namespace).request_queue(session.id))
        try:
            with BrokerClient(session, "batch") as client:
                seen: list[int] = []

                def stop_the_leader() -> None:
                    wait_until("a tenth done", lambda: client.status().done >= N // 10)
                    samples.append((time.monotonic(), client.status().done))
                    cluster.stop(node)
                    stopped.append(node)
                    outstanding.append(N - client.status().done)
                    # how long the farm's progress stalls: sampled, until done or the
                    # reader's own deadline has long passed (the reader then fails the test)
                    deadline = time.monotonic() + 300
                    while samples[-1][1] < N and time.monotonic() < deadline:
                        time.sleep(0.05)  # the sampling interval, not a synchronisation
                        samples.append((time.monotonic(), client.status().done))

                fault = threading.Thread(target=stop_the_leader)
                began = time.monotonic()
                fault.start()
                for i in range(N):
                    client.send_request("sleep", 0.001, user_data=i)
                client.end_requests()
                arrived: list[float] = []
                for response in client.get_responses(timeout=300):
                    seen.append(response.user_data)
                    arrived.append(time.monotonic())
                fault.join(timeout=120)
                status = counted(client, N)
            # the session goes on: a second client id, through the nodes left
            with BrokerClient(session, "after") as client:
                client.send_request("echo", 1, user_data="still here")
                client.end_requests()
                after = [r.user_data for r in client.get_responses(timeout=120)]
        finally:
            session.close()
            if stopped:
                cluster.start(stopped[0])
    assert stopped, "the leader's node was not stopped"
    assert outstanding[0] > 0, "the node stopped after the batch was done"
    assert len(seen) == len(set(seen)), "a response was handed out twice"
    assert sorted(seen) == list(range(N))
    assert (status.accepted, status.done, status.finished) == (N, N, True)
    assert after == ["still here"]
    stalled = max(stalls(samples))
    print(  # the figures, shown with -s
        f"\ncluster, durable: {N} requests, node {stopped[0]} stopped with {outstanding[0]} "
        f"outstanding: lost {N - len(set(seen))}, duplicated {len(seen) - len(set(seen))}, "
        f"progress stalled {stalled:.2f}s, batch {arrived[-1] - began:.1f}s"
    )


def test_an_interactive_session_survives_its_node_or_fails_clearly_and_frees_its_units(
    settings: Settings, cluster: RabbitCluster
) -> None:
    s = on_cluster(settings, cluster)
    with LocalFarm(s, workers=1, cores=2):
        session = Session.create(SessionStartInfo("faulty", max_units=2), s)
        request_queue = Names(s.namespace).request_queue(session.id)
        node = cluster.node_of(request_queue)
        failed: list[SessionFailed] = []
        seen: list[int] = []
        try:
            with BrokerClient(session) as client:
                for i in range(2000):
                    client.send_request("sleep", 0.001, user_data=i)
                client.end_requests()
                try:
                    for response in client.get_responses(timeout=120):
                        seen.append(response.user_data)
                        if len(seen) == 200:
                            began = time.monotonic()
                            cluster.stop(node)
                except SessionFailed as e:
                    failed.append(e)
        finally:
            session.close()
            cluster.start(node)
        print(
            f"\ncluster, interactive: node {node} stopped after 200 of 2000: {failed or 'complete'}"
        )
        if failed:
            assert "gone from RabbitMQ" in str(failed[0]), failed[0]
            assert time.monotonic() - began < 60
        else:
            assert sorted(seen) == list(range(2000))
        # either way its units are free: a new session gets both
        with Session.create(SessionStartInfo("echo", min_units=2, max_units=2), s) as fresh:
            assert fresh.wait_for_instances(2, timeout=60) == 2


def test_a_namespace_made_with_classic_farm_queues_keeps_them_and_serves(
    settings: Settings,
) -> None:
    names = Names(settings.namespace)
    classic = [dead_letter_queue(names), id_mark_queue(names)]
    connection = pika_connection(settings, "test")
    try:
        channel = connection.channel()
        for spec in classic:  # as soafarm made them before they were quorum queues
            channel.queue_declare(queue=spec.name, durable=True)
        channel.basic_publish("", classic[0].name, b"kept")
        with structlog.testing.capture_logs() as logs:
            counts = [declare_farm_queue(connection, spec) for spec in classic]
        assert counts[0] == 1
        kept = [e["queue"] for e in logs if e["event"] == "queue_kept_as_made"]
        assert kept == [spec.name for spec in classic]
    finally:
        connection.close()
    with (
        LocalFarm(settings, workers=1, cores=1),
        Session.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("echo", 1, user_data="served")
        assert [r.user_data for r in client.get_responses(timeout=60)] == ["served"]
