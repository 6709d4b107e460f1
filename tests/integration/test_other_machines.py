"""Worker hosts on other machines (issue 19): a host in a Linux network namespace of its own,
which reaches RabbitMQ and Redis only over a veth link (tests.netns). Its link goes down in
the middle of a durable batch, as a pulled cable would, and comes back."""

from __future__ import annotations

import time

import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.state.hosts import HostStore
from soafarm.transport.connections import redis_client
from tests.netns import other_machine, servers_seen_from
from tests.waiting import counted, wait_until

pytestmark = pytest.mark.integration

N = 3000
AWAY = "far-host"


def hosts_of(session: Session) -> dict[str, int]:
    """How many of `session`'s instances each host runs, as the broker records them."""
    out: dict[str, int] = {}
    for instance in session.refresh().instances:
        out[instance.host_id] = out.get(instance.host_id, 0) + 1
    return out


def test_a_host_cut_off_mid_batch_is_forgotten_its_work_finished_elsewhere_then_rejoins(
    settings: Settings,
) -> None:
    hosts = HostStore(redis_client(settings), Names(settings.namespace))
    with (
        other_machine() as machine,
        servers_seen_from(machine, settings) as env,
        LocalFarm(settings, workers=1, cores=2) as farm,
    ):
        farm.add_worker(AWAY, cores=2, env=env, prefix=tuple(machine.prefix))
        session = DurableSession.create(SessionStartInfo("faulty", max_units=4), settings)
        try:
            wait_until("4 instances", lambda: sum(hosts_of(session).values()) == 4)
            assert hosts_of(session)[AWAY] == 2
            with BrokerClient(session, "batch") as client:
                for i in range(N):
                    client.send_request("sleep", 0.01, user_data=i)
                client.end_requests()
                wait_until("a quarter done", lambda: client.status().done >= N // 4)
                machine.link(up=False)
                cut = time.monotonic()
                outstanding = N - client.status().done
                wait_until("the host forgotten", lambda: not hosts.alive([AWAY]), timeout=30)
                wait_until("its instances forgotten", lambda: AWAY not in hosts_of(session))
                forgotten = time.monotonic() - cut
                seen = [r.user_data for r in client.get_responses(timeout=180)]
                finished = time.monotonic() - cut
                status = counted(client, N)
            session.close()  # its units, on the host left, are free for the next session
            assert not machine.reachable()
            machine.link(up=True)
            back = time.monotonic()
            wait_until("the host back", lambda: hosts.alive([AWAY]), timeout=60)
            rejoined = time.monotonic() - back
            # and it serves again: a session that needs all four cores gets them
            with Session.create(
                SessionStartInfo("echo", min_units=4, max_units=4), settings
            ) as full:
                wait_until("4 instances", lambda: sum(hosts_of(full).values()) == 4, timeout=60)
                assert hosts_of(full)[AWAY] == 2
        finally:
            session.close()
            hosts.close()
    assert outstanding > 0, "the link went down after the batch was done"
    assert len(seen) == len(set(seen)), "a response was handed out twice"
    assert sorted(seen) == list(range(N))
    assert (status.accepted, status.done, status.finished) == (N, N, True)
    print(  # the figures, shown with -s
        f"\nhost link down: {N} requests, {outstanding} outstanding at the cut: lost "
        f"{N - len(set(seen))}, duplicated {len(seen) - len(set(seen))}; forgotten after "
        f"{forgotten:.1f}s, batch done {finished:.1f}s after the cut; rejoined {rejoined:.1f}s "
        "after the link came back"
    )
