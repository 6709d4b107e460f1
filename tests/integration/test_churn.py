"""Session churn (issue 14): one client creates and closes 1,000 sessions, one in twenty of
them sending a request and reading its response (so instances start and stop too), and
nothing of them is left behind: no RabbitMQ queue, no Redis key, no instance process."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest
import redis

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.processes import farm_processes
from soafarm.state.idmark import id_mark_queue
from soafarm.state.leases import leader_key
from soafarm.state.records import as_text
from soafarm.state.sessions import CLOSED_TOMBSTONE_SECONDS
from soafarm.state.usage import UsageRecord
from soafarm.transport.topology import control_queue, dead_letter_queue
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

SESSIONS = 1_000
#: Threads of the one client process. One thread creates and closes ~11 sessions a second
#: here (90 s for 1,000); four keep the test near a minute, and closes race creates too.
THREADS = 4
#: Every WITH_REQUEST-th session sends one echo request and reads its response.
WITH_REQUEST = 20
#: Seconds the farm may take to finish closing after the last close() returned.
SETTLE = 30.0


def _churn(settings: Settings, first: int, ids: list[int], answered: list[int]) -> None:
    """Create and close sessions first, first + THREADS, ... below SESSIONS; record their ids
    and the user data of the responses read."""
    info = SessionStartInfo("echo", min_units=0, max_units=1)
    for i in range(first, SESSIONS, THREADS):
        with Session.create(info, settings) as session:
            ids.append(session.id)
            if i % WITH_REQUEST == 0:
                with BrokerClient(session) as client:
                    client.send_request("echo", i, user_data=i)
                    responses = list(client.get_responses(timeout=60))
                assert [r.user_data for r in responses] == [i], responses
                assert str(responses[0].result).endswith(f":{i}"), responses[0]
                answered.append(i)


def _queues(namespace: str) -> list[str]:
    """The namespace's RabbitMQ queues (rabbitmqctl: the management plugin is not enabled)."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "--no-table-headers", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [q for q in out.stdout.split() if q.startswith(f"{namespace}.")]


def _farm_keys(names: Names) -> list[re.Pattern[str]]:
    """Keys a farm keeps with no session open: its hosts' records, heartbeats, assignments,
    wake lists, load and service probe reports (soafarm.names), the session id counter and
    its ceilings (soafarm.state.sessions), the allocator lease (soafarm.state.leases), the
    closed sessions' usage records (soafarm.state.usage, pruned by age). Closed sessions'
    tombstones are checked on their own."""
    ns = re.escape(names.namespace)
    return [
        re.compile(f"^{re.escape(names.hosts_key)}$"),
        re.compile(f"^{ns}:host:[^:]+:(heartbeat|assignments|wake|load|probe)$"),
        re.compile(f"^{re.escape(names.session_counter_key)}$"),
        re.compile(f"^{ns}:session-ids:(ceiling|lost_below)$"),
        re.compile(f"^{re.escape(leader_key(names))}$"),
        re.compile(f"^{re.escape(names.usage_records_key)}$"),
    ]


def _leftovers(settings: Settings, r: redis.Redis, closed: set[int]) -> list[str]:
    """Everything of the closed sessions still there: instance processes, keys other than
    the farm's own and the tombstones, fields of the farm's hashes naming a session or an
    instance, queues other than the farm's own."""
    names = Names(settings.namespace)
    found = [
        f"instance process {p.pid}"
        for p in farm_processes(settings.namespace)
        if p.role == "instance"
    ]
    farm_keys = _farm_keys(names)
    tombstone = re.compile(f"^{re.escape(settings.namespace)}:session:(\\d+):closed$")
    for raw in r.scan_iter(match=f"{settings.namespace}:*", count=1000):
        key = as_text(raw)
        if (m := tombstone.match(key)) is not None:
            ttl = r.ttl(key)
            if int(m.group(1)) not in closed or not 0 < ttl <= CLOSED_TOMBSTONE_SECONDS:
                found.append(f"key {key} (ttl {ttl})")
        elif not any(p.match(key) for p in farm_keys):
            found.append(f"key {key} ({as_text(r.type(key))})")
        elif key.endswith((":assignments", ":load")):
            # a host's hashes: session id -> instances, instance id -> load
            found += [f"field {as_text(f)} of {key}" for f in r.hkeys(key)]
    found += [
        f"queue {q}"
        for q in _queues(settings.namespace)
        if q
        not in {
            control_queue(names).name,
            dead_letter_queue(names).name,
            id_mark_queue(names).name,
        }
    ]
    return found


def test_thousand_sessions_created_and_closed_leave_nothing_behind(
    settings: Settings, farm: LocalFarm
) -> None:
    ids: list[int] = []
    answered: list[int] = []
    errors: list[BaseException] = []

    def run(first: int) -> None:
        try:
            _churn(settings, first, ids, answered)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    churned = time.monotonic() - start
    if errors:
        raise errors[0]
    assert len(set(ids)) == SESSIONS
    assert sorted(answered) == list(range(0, SESSIONS, WITH_REQUEST))

    r = redis.Redis.from_url(settings.redis_url)
    names = Names(settings.namespace)
    try:
        last: list[str] = []

        def clean() -> bool:
            last[:] = _leftovers(settings, r, set(ids))
            return not last

        try:
            wait_until("nothing left of the closed sessions", clean, timeout=SETTLE)
        except pytest.fail.Exception:
            shown = "\n  ".join(last[:50])
            pytest.fail(f"{len(last)} left behind after {SETTLE:g}s:\n  {shown}")
        settled = time.monotonic() - start - churned
        tombstones = list(r.scan_iter(match=f"{settings.namespace}:session:*:closed", count=1000))
        assert len(tombstones) == SESSIONS  # every session was closed through the broker
        # and each close wrote one usage record, of its own session
        usage = [UsageRecord.from_json(m).session for m in r.zrange(names.usage_records_key, 0, -1)]
        assert sorted(usage) == sorted(ids)
    finally:
        r.close()
    # the host's fork servers are bounded: a generic one and one per recently used service
    warm = [p for p in farm_processes(settings.namespace) if p.role == "warm"]
    assert len(warm) <= settings.worker.warm_instances + 1, warm
    # shown with -s: the figures the closing note quotes
    print(
        f"\n{SESSIONS:,} sessions created and closed in {churned:.1f} s "
        f"({SESSIONS / churned:.1f}/s, {THREADS} threads); nothing left {settled:.1f} s later"
    )
