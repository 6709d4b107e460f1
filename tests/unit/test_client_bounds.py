"""The client's bounds: how long it retries a lost server (`transport.backoff.Outage`), and
how much an interactive client may send without reading (`client.throttle`)."""

from __future__ import annotations

import threading

import pytest

import soafarm.client.throttle
from soafarm.client.throttle import Throttle, UnreadBound
from soafarm.config import BrokerSettings, Settings
from soafarm.errors import ConnectionFailed, ConnectionLost, SessionFailed, Throttled
from soafarm.transport.backoff import Outage
from soafarm.transport.connections import lost_for_good


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def test_an_outage_backs_off_and_gives_up_at_its_limit_with_one_line() -> None:
    time = FakeTime()
    settings = Settings().replace(amqp_url="amqp://guest:sekret@127.0.0.1:5/")
    outage = Outage(20.0, lost_for_good(settings), clock=time.clock, sleep=time.sleep)
    error = ConnectionFailed("cannot connect to RabbitMQ at amqp://guest:**@127.0.0.1:5/: x; hint")
    with pytest.raises(ConnectionLost) as raised:
        while True:
            outage.retry(error)
    message = str(raised.value)
    assert message.startswith(
        "lost the connection to RabbitMQ at amqp://guest:**@127.0.0.1:5/: gave up after 20s"
    )
    assert "client.reconnect_timeout = 90" in message and "sekret" not in message
    assert "; hint" not in message  # one line: the connection hint is not repeated
    assert time.waits[0] < time.waits[3] <= 2.0 * 1.25  # doubling, capped (with jitter)
    assert time.now == pytest.approx(20.0)


def test_an_outage_that_recovers_starts_its_limit_afresh() -> None:
    time = FakeTime()
    outage = Outage(5.0, lambda e, s: ConnectionLost(str(s)), clock=time.clock, sleep=time.sleep)
    for _ in range(3):
        outage.retry(OSError("reset"))
    assert outage.down and outage.recovered() and not outage.recovered()
    time.now += 100.0  # long after: a new outage has its own 5 s
    outage.retry(OSError("reset"))
    assert outage.elapsed() < 5.0


class Counts:
    """The throttle's view of the session in Redis: nothing outstanding elsewhere."""

    client_id = "c"

    def session_counts(self) -> tuple[int, int]:
        return 0, 0


def unread_throttle(read: list[int], reading: bool = True, limit: int = 100) -> Throttle:
    bound = UnreadBound(
        limit=limit,
        read_here=lambda: read[0],
        read_anywhere=lambda: 0,
        reading=lambda: reading,
    )
    return Throttle(Counts(), BrokerSettings(), 0.0, unread=bound)  # type: ignore[arg-type]


def test_a_send_blocks_on_unread_responses_until_reading_brings_them_down() -> None:
    read = [0]
    throttle = unread_throttle(read)
    waits: list[int] = []
    throttle.on_wait = waits.append
    throttle.wait(99)  # under the bound: at once
    assert waits == []
    done = threading.Event()
    sender = threading.Thread(target=lambda: (throttle.wait(100), done.set()))
    sender.start()
    assert not done.wait(0.2), "it went on with 100 sent and none read"
    read[0] = 20  # 80 unread: not yet three quarters of the bound
    assert not done.wait(0.3)
    read[0] = 25  # 75 unread
    assert done.wait(5)
    sender.join()
    assert waits[0] == 100 and waits[-1] == 0  # the progress line says why, then that it goes on


def test_a_send_nobody_reads_for_raises_instead_of_waiting_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(soafarm.client.throttle, "UNREAD_STALL", 0.2)
    throttle = unread_throttle([0], reading=False)
    with pytest.raises(Throttled, match="client id 'c' has 150 requests sent and not read back"):
        throttle.wait(150)


def test_durable_clients_and_a_zero_bound_are_not_held_by_unread_responses() -> None:
    assert unread_throttle([0], limit=0).unread is None
    unread_throttle([0], limit=0).wait(1_000)  # returns at once: no bound on unread


class Stuck(Counts):
    """A session whose outstanding requests will never be answered."""

    def session_counts(self) -> tuple[int, int]:
        return 0, 10_000


def test_a_throttled_send_hears_that_its_session_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soafarm.client.throttle, "SESSION_CHECK_INTERVAL", 0.05)
    failed = threading.Event()

    def check() -> None:
        if failed.is_set():
            raise SessionFailed("session 1 failed: its request queue is gone")

    throttle = Throttle(Stuck(), BrokerSettings(), 0.0, check_session=check)  # type: ignore[arg-type]
    raised: list[BaseException] = []

    def send() -> None:
        try:
            throttle.wait(0)
        except SessionFailed as e:
            raised.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    sender.join(0.3)
    assert sender.is_alive(), "a send went on while the session was throttled"
    failed.set()
    sender.join(5)
    assert not sender.is_alive(), "a throttled send waited on after its session failed"
    assert "request queue is gone" in str(raised[0])
