"""The client's receive paths, on in-memory inboxes and counters.

client.queue_reader (interactive) and client.reader (durable) hold the policies: each response
handed out once, completion, the reader lease, resuming after a lost connection. Here they
read in-memory batches; tests/integration runs the same paths against RabbitMQ and Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
import redis

from soafarm.client.inbox import Delivery
from soafarm.client.queue_reader import QueueReader
from soafarm.client.reader import ID_SLACK, Bitmap, IdBound, StreamReader, StreamTarget
from soafarm.errors import (
    ConnectionFailed,
    ConnectionLost,
    ReaderTakenOver,
    ResponsesLost,
    ResponseTimeout,
    SessionFailed,
)
from soafarm.protocol import Response, encode_response, encode_response_batch
from soafarm.state.clients import ClientProgress
from soafarm.transport.backoff import Outage

LIMIT = 1 << 20


def batch(*ids: int) -> bytes:
    return encode_response_batch(1, "c", "i", [encode_response(Response(i, i * 2)) for i in ids])


@dataclass
class Counters:
    """A client id's progress hash and read bitmap, in memory."""

    accepted: int = 0
    done: int = 0
    sealed: bool = False
    total: int | None = None
    reader: str = ""
    read_offset: int | None = None
    read: Bitmap = field(default_factory=Bitmap)
    client_id: str = "c"

    def load(self) -> ClientProgress:
        return ClientProgress(
            "c", self.accepted, self.done, 0, self.sealed, self.total, self.read_offset
        )

    def take_reader(self) -> str:
        self.reader = uuid.uuid4().hex
        return self.reader

    def is_reader(self, token: str) -> bool:
        return self.reader == token

    def commit_read(self, token: str, next_offset: int, ids: Iterable[int]) -> bool:
        for i in ids:  # recorded even past a takeover, as the Lua script does
            self.read.add(i)
        if token != self.reader:
            return False
        self.read_offset = max(self.read_offset or 0, next_offset)
        return True

    def read_bitmap(self) -> bytes:
        return bytes(self.read.bits)


class MemoryQueue:
    """An interactive response queue (auto-ack): bodies pushed by the test, delivered on
    drain; `stop` delivers what was `in_flight` first, `give_back` puts bodies in front."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.waiting: list[bytes] = list(bodies)
        self.in_flight: list[bytes] = []  # sent to the consumer, not read by it yet
        self.on_delivery: Callable[[Delivery], None] | None = None
        self.given_back: list[bytes] = []

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self.on_delivery = on_delivery

    def drain(self, timeout: float) -> bool:
        if not self.waiting or self.on_delivery is None:
            return False
        self.on_delivery(Delivery(None, self.waiting.pop(0), lambda: None))
        return True

    def stop(self) -> None:
        assert self.on_delivery is not None
        for body in self.in_flight:  # RabbitMQ's deliveries come before its cancel-ok
            self.on_delivery(Delivery(None, body, lambda: None))
        self.in_flight = []
        self.on_delivery = None

    def give_back(self, bodies: list[bytes]) -> None:
        self.given_back += bodies
        self.waiting[:0] = bodies

    def close(self) -> None:
        self.on_delivery = None


class MemoryStream:
    """A response stream: batches by offset; `drop_after` loses the connection once."""

    stream = "stream"

    def __init__(self, bodies: list[bytes], drop_after: int | None = None) -> None:
        self.bodies = bodies
        self.position: int | None = None
        self.on_delivery: Callable[[Delivery], None] | None = None
        self.drop_after = drop_after
        self.opens: list[int] = []
        self.acked: list[int] = []

    @property
    def is_open(self) -> bool:
        return self.position is not None

    def open(self, offset: int, on_delivery: Callable[[Delivery], None]) -> None:
        self.opens.append(offset)
        self.position, self.on_delivery = offset, on_delivery

    def drain(self, timeout: float) -> bool:
        assert self.position is not None and self.on_delivery is not None
        if self.drop_after is not None and self.position >= self.drop_after:
            self.drop_after = None
            return False
        if self.position < len(self.bodies):
            at = self.position
            self.position += 1
            self.on_delivery(Delivery(at, self.bodies[at], lambda: self.acked.append(at)))
        return True

    def close(self) -> None:
        self.position = None


def fine() -> None:
    """The session is open."""


class FakeTime:
    """A clock that moves only when an outage waits: retries cost no real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def outage(self, limit: float = 30.0) -> Outage:
        def give_up(error: BaseException, seconds: float) -> ConnectionLost:
            return ConnectionLost(f"gave up after {seconds:.0f}s: {error}")

        return Outage(limit, give_up, clock=self.clock, sleep=self.sleep)


def queue_reader(
    source: list[bytes] | MemoryQueue, counters: Counters, time: FakeTime | None = None
) -> QueueReader:
    inbox = MemoryQueue(source) if isinstance(source, list) else source
    return QueueReader(
        inbox,
        max_bytes=LIMIT,
        progress=counters,
        describe=lambda: "described",
        check=fine,
        outage=(time or FakeTime()).outage,
    )


def stream_reader(
    stream: MemoryStream, counters: Counters, time: FakeTime | None = None
) -> StreamReader:
    return StreamReader(
        stream, counters, LIMIT, lambda: "described", fine, outage=(time or FakeTime()).outage
    )


def test_interactive_reader_drops_second_answers_and_stops_at_what_was_sent() -> None:
    reader = queue_reader([batch(0, 1), batch(1, 2), batch(3)], Counters())
    got = [r.id for r in reader.responses(5, StreamTarget(sent_here=4))]
    assert got == [0, 1, 2, 3]
    assert reader.duplicates == 1


def test_interactive_reader_of_another_process_waits_for_the_sealed_total() -> None:
    counters = Counters(accepted=3, done=3, sealed=True, total=3)
    reader = queue_reader([batch(0), batch(2), batch(1)], counters)
    assert sorted(r.id for r in reader.responses(5, StreamTarget())) == [0, 1, 2]


def test_interactive_reader_times_out_naming_what_is_outstanding() -> None:
    counters = Counters(accepted=2, done=1)
    reader = queue_reader([batch(0)], counters)
    with pytest.raises(ResponseTimeout, match="1 of 2 requests still outstanding; described"):
        list(reader.responses(0.01, StreamTarget(sent_here=2)))


def test_stream_reader_hands_out_each_response_once_and_commits() -> None:
    counters = Counters(accepted=3, done=3, sealed=True, total=3)
    stream = MemoryStream([batch(0, 1), batch(1), batch(2)])
    got = [r.id for r in stream_reader(stream, counters).responses(5, StreamTarget())]
    assert got == [0, 1, 2]
    assert counters.read_offset == 3 and counters.read.count == 3
    assert stream.acked == [0, 1, 2]


def test_stream_reader_new_only_is_exact_per_response() -> None:
    counters = Counters(accepted=5, done=5, sealed=True, total=5)
    stream = MemoryStream([batch(0, 1), batch(2, 3, 4)])
    first = stream_reader(stream, counters)
    for response in first.responses(5, StreamTarget()):
        if response.id == 3:
            break  # stopped in the middle of the second batch, with 0..3 in hand
    first.close()
    again = MemoryStream(stream.bodies)
    got = [r.id for r in stream_reader(again, counters).responses(5, StreamTarget(), new_only=True)]
    assert got == [4]
    assert again.opens == [1]  # the batch it stopped in is read again, its given ids skipped


def test_commit_each_records_a_response_once_the_caller_takes_the_next() -> None:
    counters = Counters(accepted=3, done=3, sealed=True, total=3)
    reader = stream_reader(MemoryStream([batch(0, 1, 2)]), counters)
    reader.commit_each = True
    reading = reader.responses(5, StreamTarget())
    assert next(reading).id == 0
    assert counters.read.count == 0  # the caller may not have stored it yet
    assert next(reading).id == 1
    assert counters.read.count == 1  # it asked for the next one: 0 is done with


def test_stream_reader_resumes_after_a_lost_connection_without_repeats() -> None:
    counters = Counters(accepted=3, done=3, sealed=True, total=3)
    stream = MemoryStream([batch(0), batch(1), batch(2)], drop_after=1)
    got = [r.id for r in stream_reader(stream, counters).responses(5, StreamTarget())]
    assert got == [0, 1, 2]
    assert stream.opens == [0, 1]  # reopened after the batch it had committed


def test_second_stream_reader_takes_over_and_the_first_fails() -> None:
    counters = Counters(accepted=2, done=2, sealed=True, total=2)
    first = stream_reader(MemoryStream([batch(0), batch(1)]), counters)
    reading = first.responses(5, StreamTarget())
    assert next(reading).id == 0
    second = stream_reader(MemoryStream([batch(0), batch(1)]), counters)
    assert [r.id for r in second.responses(5, StreamTarget())] == [0, 1]
    with pytest.raises(ReaderTakenOver, match="another reader took over client id 'c'"):
        next(reading)


def test_second_interactive_reader_takes_over_and_gets_the_rest() -> None:
    counters = Counters(accepted=5, done=5, sealed=True, total=5)
    queue = MemoryQueue([batch(0), batch(1), batch(2, 3)])
    first = queue_reader(queue, counters)
    reading = first.responses(5, StreamTarget())
    assert next(reading).id == 0
    queue.drain(0)  # batch 1 reaches the first reader before the takeover
    queue.in_flight.append(batch(4))  # and batch 4 is on its way to it
    counters.take_reader()  # a second reader (another process) takes the lease
    # the first learns at its next commit, and gives back what it did not hand out
    first.committed_at = 0.0
    with pytest.raises(ReaderTakenOver, match="another reader took over client id 'c'"):
        next(reading)
    assert queue.given_back == [batch(1), batch(4)]
    second = queue_reader(queue, counters)
    pending: list[bool] = []
    got = sorted(
        r.id for r in second.responses(5, StreamTarget(), after=lambda: pending.append(True))
    )
    assert got == [1, 2, 3, 4]
    assert pending == [True]  # the read left ids to commit: the client's linger thread does
    second.commit_pending()
    assert counters.read.count == 5  # every response once, across the two readers


def test_interactive_reader_counts_what_a_predecessor_handed_out() -> None:
    counters = Counters(accepted=3, done=3, sealed=True, total=3)
    counters.read.add(0)  # handed out by a reader that was taken over (its commit landed)
    reader = queue_reader([batch(1), batch(2)], counters)
    assert [r.id for r in reader.responses(5, StreamTarget())] == [1, 2]  # then complete


class RestartingRedis(Counters):
    """Counters whose commit number `fail_at` fails as Redis going away would, and that come
    back as Redis restarted from an AOF written once a second would: without the read
    commits after commit number `saved_at`."""

    def __init__(self, fail_at: int, saved_at: int, **counts: object) -> None:
        super().__init__(**counts)  # type: ignore[arg-type]
        self.fail_at, self.saved_at = fail_at, saved_at
        self.commits = 0
        self.saved = Bitmap()

    def commit_read(self, token: str, next_offset: int, ids: Iterable[int]) -> bool:
        self.commits += 1
        if self.commits == self.saved_at:
            self.saved = Bitmap(bytes(self.read.bits))
        if self.commits == self.fail_at:
            self.read = Bitmap(bytes(self.saved.bits))  # what the AOF had
            raise redis.ConnectionError("Connection reset by peer")
        return super().commit_read(token, next_offset, ids)


def test_stream_reader_rides_out_a_redis_restart_and_recommits_what_it_lost() -> None:
    counters = RestartingRedis(fail_at=4, saved_at=2, accepted=6, done=6, sealed=True, total=6)
    stream = MemoryStream([batch(i) for i in range(6)])
    time = FakeTime()
    got = [r.id for r in stream_reader(stream, counters, time).responses(5, StreamTarget())]
    assert got == [0, 1, 2, 3, 4, 5]  # each once: the reader's own record did not go away
    assert time.waits, "it waited before trying Redis again"
    assert counters.read.count == 6  # the commits Redis lost were made again
    again = stream_reader(MemoryStream(stream.bodies), counters)
    assert list(again.responses(5, StreamTarget(), new_only=True)) == []


def test_stream_reader_hands_out_nothing_while_redis_cannot_record_it() -> None:
    counters = RestartingRedis(fail_at=1, saved_at=0, accepted=2, done=2, sealed=True, total=2)
    stream = MemoryStream([batch(0), batch(1)])
    reader = stream_reader(stream, counters)
    reading = reader.responses(5, StreamTarget())
    assert next(reading).id == 0  # its commit (the first) fails when the caller asks again
    assert next(reading).id == 1
    assert counters.read.count == 1, "1 was handed out before Redis had 0"
    assert list(reading) == []
    assert counters.read.count == 2 and counters.read_offset == 2


def test_stream_reader_gives_up_on_rabbitmq_after_the_reconnect_limit() -> None:
    class Unreachable(MemoryStream):
        def open(self, offset: int, on_delivery: Callable[[Delivery], None]) -> None:
            raise ConnectionFailed("cannot connect to RabbitMQ at amqp://x/: refused")

    counters = Counters(accepted=1, done=1, sealed=True, total=1)
    time = FakeTime()
    reader = StreamReader(
        Unreachable([batch(0)]), counters, LIMIT, str, fine, outage=lambda: time.outage(10)
    )
    with pytest.raises(ConnectionLost, match="gave up after 10s: cannot connect to RabbitMQ"):
        list(reader.responses(None, StreamTarget()))
    assert 10 <= time.now < 12 and len(time.waits) > 3  # backed off, up to the limit


class DroppingQueue(MemoryQueue):
    """A queue whose connection drops once after `drop_after` deliveries, losing what was on
    its way (auto-ack), and that is `gone` (RabbitMQ restarted) when consumed again."""

    def __init__(self, bodies: list[bytes], drop_after: int, lose: int, gone: bool) -> None:
        super().__init__(bodies)
        self.drop_after, self.lose, self.gone = drop_after, lose, gone
        self.delivered = 0
        self.starts = 0

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        self.starts += 1
        if self.starts > 1 and self.gone:
            raise SessionFailed("session 1 lost its response queue")
        super().start(on_delivery)

    def drain(self, timeout: float) -> bool:
        if self.delivered == self.drop_after:
            self.delivered += 1
            del self.waiting[: self.lose]  # in the socket when it closed
            raise ConnectionFailed("lost the connection to RabbitMQ at amqp://x/")
        self.delivered += 1
        return super().drain(timeout)


def test_interactive_reader_raises_the_sessions_loss_when_its_queue_is_gone() -> None:
    counters = Counters(accepted=4, done=4, sealed=True, total=4)
    queue = DroppingQueue([batch(i) for i in range(4)], drop_after=2, lose=0, gone=True)
    reading = queue_reader(queue, counters).responses(5, StreamTarget())
    assert [next(reading).id, next(reading).id] == [0, 1]
    with pytest.raises(SessionFailed, match="lost its response queue"):
        next(reading)


def test_interactive_reader_says_which_responses_a_dropped_connection_lost() -> None:
    counters = Counters(accepted=4, done=4, sealed=True, total=4)
    queue = DroppingQueue([batch(i) for i in range(4)], drop_after=1, lose=2, gone=False)
    reader = queue_reader(queue, counters)
    got: list[int] = []
    with pytest.raises(ResponsesLost, match=r"2 response\(s\) of client id 'c' were lost"):
        got.extend(r.id for r in reader.responses(5, StreamTarget()))
    assert got == [0, 3] and queue.starts == 2  # it consumed again and got what was left


def test_interactive_reader_rides_out_a_dropped_connection_that_lost_nothing() -> None:
    counters = Counters(accepted=4, done=4, sealed=True, total=4)
    queue = DroppingQueue([batch(i) for i in range(4)], drop_after=2, lose=0, gone=False)
    got = [r.id for r in queue_reader(queue, counters).responses(5, StreamTarget())]
    assert got == [0, 1, 2, 3]


def test_a_response_with_an_id_never_sent_is_dropped_and_counted() -> None:
    # an id far past what was accepted: forged (or another client's); it would grow the
    # reader's bitmap to 512 MB, and is not this client id's to hand out
    forged = 4_000_000_000
    counters = Counters(accepted=3, done=3, sealed=True, total=3)
    stream = MemoryStream([batch(0, forged), batch(1, 2)])
    reader = stream_reader(stream, counters)
    assert [r.id for r in reader.responses(5, StreamTarget())] == [0, 1, 2]
    assert reader.forged == 1
    interactive = queue_reader([batch(0, forged, 1)], Counters(accepted=2))
    assert [r.id for r in interactive.responses(5, StreamTarget(sent_here=2))] == [0, 1]
    assert interactive.forged == 1
    assert len(interactive.seen.bits) < 1024


def test_the_id_bound_is_read_again_when_an_id_passes_it_and_trusts_an_outage() -> None:
    loads = iter([1, ID_SLACK + 10, ID_SLACK + 10])
    bound = IdBound(lambda: ClientProgress("c", next(loads), 0, 0, False, None, None))
    assert bound.plausible(0)  # first read: accepted 1
    assert bound.plausible(ID_SLACK + 5)  # past it: read again, the sender recorded more
    assert not bound.plausible(2 * ID_SLACK + 10)  # still past: never sent

    def down() -> ClientProgress:
        raise redis.ConnectionError("restarting")

    assert IdBound(down).plausible(10**9)  # Redis cannot say: never drop a real response
