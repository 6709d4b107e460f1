"""Calls that take time run in parallel on every unit a session holds, on the real servers.

Functional, not timing: the service records when and where each call ran, and the tests
assert that calls overlapped on different units, that short calls did not wait behind a
long one while another unit was idle, and that clients which never flush get answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import ReaderTakenOver, ResponseHandlerError
from soafarm.local.farm import LocalFarm
from soafarm.protocol import Response
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

# records (instance, thread, start, end) of each call
NAPPER = """
import threading, time

class Napper:
    def __init__(self, context):
        self.instance = context.instance_id

    def nap(self, seconds):
        began = time.time()
        time.sleep(seconds)
        return [self.instance, threading.get_ident(), began, time.time()]
"""

Span = tuple[str, int, float, float]


@pytest.fixture
def napper(settings: Settings) -> str:
    folder: Path = settings.service_registration_path[0]
    (folder / "napper.py").write_text(NAPPER)
    (folder / "napper.toml").write_text('entry_point = "napper:Napper"\n')
    return "napper"


def spans(responses: list[Response]) -> dict[int, Span]:
    return {r.id: (r.result[0], r.result[1], r.result[2], r.result[3]) for r in responses}


def overlapping_units(ran: dict[int, Span]) -> set[tuple[str, int]]:
    """Units (instance, call thread) whose calls overlapped in time with another unit's."""
    out: set[tuple[str, int]] = set()
    items = list(ran.values())
    for i, (inst_a, thread_a, start_a, end_a) in enumerate(items):
        for inst_b, thread_b, start_b, end_b in items[i + 1 :]:
            if (inst_a, thread_a) != (inst_b, thread_b) and start_a < end_b and start_b < end_a:
                out |= {(inst_a, thread_a), (inst_b, thread_b)}
    return out


def ready(session: Session, instances: int) -> None:
    wait_until(
        f"{instances} instance(s) serving",
        lambda: len(session.status()["instances"]) >= instances,
    )


def run_batch(
    session: Session, seconds: list[float], client_id: str = "default"
) -> dict[int, Span]:
    """Send every call in one go (one batch, no flush between) and collect where they ran."""
    with BrokerClient(session, client_id) as client:
        for s in seconds:
            client.send_request("nap", s)
        client.end_requests()
        return spans(list(client.get_responses(timeout=60)))


@pytest.fixture
def two_hosts(settings: Settings) -> Iterator[LocalFarm]:
    with LocalFarm(settings, workers=2, cores=1) as running:
        yield running


@pytest.mark.parametrize(
    ("unit", "instances"), [("core", 2), ("node", 1)], ids=["core-units", "node-unit"]
)
def test_calls_of_one_batch_overlap_on_every_unit(
    settings: Settings, farm: LocalFarm, napper: str, unit: str, instances: int
) -> None:
    """Two core units (two instances), or one node unit (one instance, two call threads)."""
    info = SessionStartInfo(napper, min_units=instances, max_units=instances, resource_unit=unit)
    with Session.create(info, settings) as session:
        ready(session, instances)
        ran = run_batch(session, [0.4] * 6)
    assert len(ran) == 6
    assert len(overlapping_units(ran)) == 2, ran


def test_calls_of_one_batch_overlap_across_two_hosts(
    settings: Settings, two_hosts: LocalFarm, napper: str
) -> None:
    info = SessionStartInfo(napper, min_units=2, max_units=2)
    with Session.create(info, settings) as session:
        ready(session, 2)
        hosts = {i["host_id"] for i in session.status()["instances"]}
        ran = run_batch(session, [0.4] * 6)
    assert len(hosts) == 2
    assert len({inst for inst, *_ in ran.values()}) == 2
    assert len(overlapping_units(ran)) == 2, ran


def test_a_long_call_does_not_hold_short_ones_of_its_batch(
    settings: Settings, farm: LocalFarm, napper: str
) -> None:
    info = SessionStartInfo(napper, min_units=2, max_units=2)
    with Session.create(info, settings) as session:
        ready(session, 2)
        # teach both units that naps are short, so a batch is kept whole at first and the
        # long call must be noticed while it runs
        run_batch(session, [0.001] * 60, "warm-up")
        ran = run_batch(session, [0.001] * 5 + [2.0] + [0.001] * 20)
    long_unit = ran[5][:2]
    long_end = ran[5][3]
    late = {i: s for i, s in ran.items() if i != 5 and s[3] > long_end}
    assert not late, f"short calls finished after the long one: {late}"
    assert any(s[:2] != long_unit for i, s in ran.items() if i > 5)


@pytest.mark.parametrize("kind", [Session, DurableSession], ids=["interactive", "durable"])
def test_long_running_pattern_needs_no_flush(
    settings: Settings, farm: LocalFarm, kind: type[Session]
) -> None:
    """HPC Pack's LongRunning client: at most 10 outstanding, a response handler, no flush."""
    total = 100
    window = threading.Semaphore(10)
    received: list[int] = []
    done = threading.Event()

    def on_response(response: Response) -> None:
        received.append(response.result)
        window.release()
        if len(received) == total:
            done.set()

    with (
        kind.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.set_response_handler(on_response)
        for i in range(total):
            assert window.acquire(timeout=30), f"no response to a window of 10 after {i}"
            client.send_request("echo", i)
        assert done.wait(30), f"{len(received)} of {total} responses"
    assert len(received) == total


def test_accepted_count_follows_a_flush_without_another_call(
    settings: Settings, farm: LocalFarm
) -> None:
    info = SessionStartInfo("echo")
    with Session.create(info, settings) as session, BrokerClient(session) as client:
        for i in range(400):
            client.send_request("echo", i)
        client.flush()
        wait_until("accepted 400", lambda: client.status().accepted == 400, timeout=2)
        list(client.get_responses(timeout=60))


def test_second_interactive_reader_takes_over_the_first(
    settings: Settings, farm: LocalFarm, napper: str
) -> None:
    total = 60
    with Session.create(SessionStartInfo(napper, min_units=2, max_units=2), settings) as session:
        ready(session, 2)
        first = BrokerClient(session, "x")
        for _ in range(total):
            first.send_request("nap", 0.02)
        first.end_requests()
        reading = first.get_responses(timeout=60)
        mine = [next(reading).id for _ in range(5)]
        second_ids: list[int] = []
        second = BrokerClient(session, "x")
        takeover = threading.Thread(
            target=lambda: second_ids.extend(r.id for r in second.get_responses(timeout=60))
        )
        takeover.start()
        wait_until("the second reader reading", lambda: second_ids)
        with pytest.raises(ReaderTakenOver, match="another reader took over client id 'x'"):
            mine.extend(r.id for r in reading)
        takeover.join(60)
        first.close()
        second.close()
    assert not set(mine) & set(second_ids)
    assert sorted(mine + second_ids) == list(range(total))


def test_durable_new_only_is_exact_per_response(settings: Settings, farm: LocalFarm) -> None:
    total = 300
    with DurableSession.create(SessionStartInfo("echo"), settings) as session:
        with BrokerClient(session, "n") as client:
            for i in range(total):
                client.send_request("echo", i)
            client.end_requests()
            wait_until("all answered", lambda: client.status().done == total)
            first = []
            for response in client.get_responses(timeout=60):
                first.append(response.id)
                if len(first) == 150:
                    break
        with BrokerClient(session, "n") as again:
            rest = [r.id for r in again.get_responses(timeout=60, new_only=True)]
        session.close()
    assert len(rest) == total - 150
    assert sorted(first + rest) == list(range(total))


def test_a_raising_response_handler_loses_nothing_and_is_reported(
    settings: Settings, farm: LocalFarm
) -> None:
    seen: list[Any] = []
    errors: list[BaseException] = []

    def picky(response: Response) -> None:
        seen.append(response.id)
        if response.id == 7:
            raise ValueError("seven")

    with Session.create(SessionStartInfo("echo"), settings) as session:
        with BrokerClient(session, "a") as client:
            client.set_response_handler(picky, on_error=errors.append)
            for i in range(20):
                client.send_request("echo", i)
            client.end_requests()
            wait_until("20 handled", lambda: len(seen) == 20)
        assert [type(e) for e in errors] == [ValueError]

        client = BrokerClient(session, "b")
        client.set_response_handler(picky)
        for i in range(10):
            client.send_request("echo", i)
        client.end_requests()
        wait_until("10 handled", lambda: len(seen) == 30)
        with pytest.raises(ResponseHandlerError, match="ValueError: seven"):
            client.close()
