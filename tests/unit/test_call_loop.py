"""The call loop's policies, on an in-memory channel and counters (tests/unit/memory_amqp.py).

The same behaviours run against the real RabbitMQ and Redis in tests/integration
(test_sessions, test_durable, test_policies); these reach the corners in milliseconds.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pika
import pytest
import redis

from soafarm.names import check_client_id
from soafarm.protocol import (
    Request,
    RequestBatch,
    ResponseBatch,
    decode_as,
    encode_request,
    encode_request_batch,
)
from soafarm.service import CallRunner
from soafarm.workers.calls import CallLoop, CallWatch, Link
from soafarm.workers.dispatch import CallTimes
from tests.unit.memory_amqp import SENDER, MemoryBroker
from tests.waiting import wait_until

LIMIT = 1 << 20
QUEUE = "requests"
REPLY = "responses"


class Service:
    """Echoes; `fail` raises; `slow` sleeps (for hand-back); records the order of calls."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.release = threading.Event()

    def echo(self, value: Any) -> Any:
        self.calls.append(value)
        return value

    def fail(self) -> None:
        raise ValueError("no")

    def wait(self, value: Any) -> Any:
        self.calls.append(value)
        self.release.wait(10)
        return value


@dataclass
class MemoryCounts:
    """The session's counters in Redis (soafarm.state.clients.DoneMarker), in memory."""

    done: dict[tuple[int, str], dict[int, bool]] = field(default_factory=dict)
    attempts: dict[tuple[int, str, int], int] = field(default_factory=dict)
    clients: set[tuple[int, str]] = field(default_factory=lambda: {(1, "c")})
    marks: int = 0
    users: dict[tuple[int, str], str] = field(default_factory=dict)
    accepted_counts: dict[tuple[int, str], int] = field(default_factory=dict)
    accepted_reads: int = 0

    def answered(self, session_id: int, client_id: str, ids: list[int]) -> set[int]:
        return set(ids) & set(self.done.get((session_id, client_id), {}))

    def count_attempt(self, session_id: int, client_id: str, request_id: int) -> int:
        key = (session_id, client_id, request_id)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]

    def mark(self, session_id: int, client_id: str, outcomes: list[tuple[int, bool]]) -> int:
        self.marks += 1
        seen = self.done.setdefault((session_id, client_id), {})
        new = [i for i, _ in outcomes if i not in seen]
        seen.update({i: f for i, f in outcomes if i not in seen})
        return len(new)

    def client_exists(self, session_id: int, client_id: str) -> bool:
        return (session_id, client_id) in self.clients

    def client_user(self, session_id: int, client_id: str) -> str | None:
        return self.users.get((session_id, client_id), SENDER)

    def session_exists(self, session_id: int) -> bool:
        return any(s == session_id for s, _ in self.clients)

    def accepted(self, session_id: int, client_id: str) -> int:
        self.accepted_reads += 1
        return self.accepted_counts.get((session_id, client_id), 0)


def batch(*requests: Request) -> bytes:
    return encode_request_batch(1, "c", REPLY, [encode_request(r, LIMIT) for r in requests])


@dataclass
class Harness:
    broker: MemoryBroker
    service: Service
    counts: MemoryCounts
    link: Link
    loop: CallLoop

    def responses(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for body in self.broker.bodies(REPLY):
            for r in decode_as(body, LIMIT, ResponseBatch).responses:
                out[r.id] = r.fault.type if r.fault else r.value
        return out


def make(durable: bool = False, resend_limit: int = 3) -> Harness:
    broker = MemoryBroker()
    service = Service()
    counts = MemoryCounts()
    stopped = threading.Event()
    # every client id's responses go to REPLY here; a client id that is no name is refused
    link = Link(
        durable,
        QUEUE,
        threading.Event(),
        stopped.set,
        1,
        lambda c, user: check_client_id(c) and user == SENDER and REPLY,
    )
    runner = CallRunner(service, frozenset({"echo", "fail", "wait"}), False, LIMIT, resend_limit)
    loop = CallLoop(
        runner,
        counts,
        link,
        instance_id="i1",
        max_bytes=LIMIT,
        watch=CallWatch(),
        connect=broker.connect,  # type: ignore[arg-type]
    )
    return Harness(broker, service, counts, link, loop)


@pytest.fixture
def running() -> Iterator[Any]:
    started: list[tuple[Harness, threading.Thread]] = []

    def start(h: Harness) -> Harness:
        thread = threading.Thread(target=h.loop.run, daemon=True)
        thread.start()
        started.append((h, thread))
        return h

    yield start
    for h, thread in started:
        h.service.release.set()
        h.link.draining.set()
        thread.join(5)
        assert not thread.is_alive(), "the call loop did not stop when draining"


def test_fast_path_answers_each_request_acks_then_counts(running: Any) -> None:
    h = running(make())
    h.broker.put(QUEUE, batch(*(Request(i, "echo", (i * 10,)) for i in range(5))))
    wait_until("5 responses", lambda: len(h.responses()) == 5, timeout=5)
    assert h.responses() == {i: i * 10 for i in range(5)}
    # interactive counts are coalesced: they arrive within MARK_LINGER, in one call
    wait_until("done counted", lambda: len(h.counts.done.get((1, "c"), {})) == 5, timeout=5)
    assert h.counts.marks == 1
    assert h.broker.bodies(QUEUE) == []


def test_a_fault_is_a_response_and_the_batch_goes_on(running: Any) -> None:
    h = running(make())
    h.broker.put(QUEUE, batch(Request(0, "fail"), Request(1, "echo", ("x",))))
    wait_until("2 responses", lambda: len(h.responses()) == 2, timeout=5)
    assert h.responses() == {0: "ValueError", 1: "x"}
    wait_until("faulted counted", lambda: h.counts.done.get((1, "c"), {}).get(0), timeout=5)


def test_undecodable_batch_is_dead_lettered_and_later_ones_answered(running: Any) -> None:
    h = running(make())
    h.broker.put(QUEUE, b"\xc1 not msgpack")
    h.broker.put(QUEUE, batch(Request(0, "echo", (1,))))
    wait_until("the good batch answered", lambda: h.responses() == {0: 1}, timeout=5)
    assert h.broker.dead_letters == [b"\xc1 not msgpack"]


def test_a_batch_of_another_session_or_with_a_forged_reply_address_is_dead_lettered(
    running: Any,
) -> None:
    h = running(make())
    other_session = encode_request_batch(2, "c", REPLY, [encode_request(Request(0, "echo"), LIMIT)])
    forged_reply = encode_request_batch(
        1, "c", "someone-elses-responses", [encode_request(Request(1, "echo"), LIMIT)]
    )
    bad_client = encode_request_batch(
        1, "no/such id", REPLY, [encode_request(Request(2, "echo"), LIMIT)]
    )
    for body in (other_session, forged_reply, bad_client):
        h.broker.put(QUEUE, body)
    h.broker.put(QUEUE, batch(Request(3, "echo", (3,))))
    wait_until("the good batch answered", lambda: h.responses() == {3: 3}, timeout=5)
    assert h.broker.dead_letters == [other_session, forged_reply, bad_client]
    assert h.broker.bodies("someone-elses-responses") == []
    assert h.service.calls == [3]  # none of the rejected ran


def test_redelivered_batch_skips_answered_and_faults_past_the_limit(running: Any) -> None:
    h = make(resend_limit=1)
    h.counts.mark(1, "c", [(0, False)])  # request 0 was answered before the crash
    h.counts.attempts[(1, "c", 1)] = 1  # request 1 already came back once
    running(h)
    h.broker.put(QUEUE, batch(*(Request(i, "echo", (i,)) for i in range(3))), redelivered=True)
    wait_until("requests 1 and 2 answered", lambda: len(h.responses()) == 2, timeout=5)
    assert h.responses() == {1: "RetryLimitExceeded", 2: 2}
    assert h.service.calls == [2]  # 0 was skipped, 1 was not run again
    assert h.counts.attempts[(1, "c", 2)] == 1


def test_durable_publish_is_retried_while_returned_then_counted(running: Any) -> None:
    h = make(durable=True)
    h.broker.unroutable[REPLY] = 2  # RabbitMQ returns the first two publishes
    running(h)
    h.broker.put(QUEUE, batch(Request(0, "echo", ("d",))))
    wait_until("the response stored", lambda: h.responses() == {0: "d"}, timeout=5)
    assert h.counts.done[(1, "c")] == {0: False}
    assert h.loop.connection is not None and h.loop.connection.slept > 0


def test_durable_response_of_a_purged_client_is_dropped_not_retried(running: Any) -> None:
    h = make(durable=True)
    h.counts.clients.clear()  # the client id was purged: its stream is gone
    h.broker.unroutable[REPLY] = 1000
    running(h)
    h.broker.put(QUEUE, batch(Request(0, "echo", ("d",))))
    wait_until(
        "the batch acknowledged",
        lambda: (
            h.service.calls == ["d"]
            and not any(
                ch.unacked
                for ch in h.loop.connection.channels  # type: ignore[union-attr]
            )
        ),
        timeout=5,
    )
    assert h.responses() == {}
    assert (1, "c") not in h.counts.done


def test_draining_hands_back_unstarted_requests_before_the_ack(running: Any) -> None:
    h = running(make())
    h.broker.put(QUEUE, batch(*(Request(i, "wait", (i,)) for i in range(4))))
    wait_until("the first call running", lambda: h.service.calls == [0], timeout=5)
    h.link.draining.set()
    h.service.release.set()
    wait_until("the first response", lambda: h.responses() == {0: 0}, timeout=5)
    handed_back = wait_until("the rest handed back", lambda: h.broker.bodies(QUEUE), timeout=5)
    rest = decode_as(handed_back[0], LIMIT, RequestBatch)
    assert [r.id for r in rest.requests] == [1, 2, 3]
    assert h.service.calls == [0]


def test_lost_connection_reconnects_and_the_batch_comes_back(running: Any) -> None:
    h = running(make())
    h.broker.put(QUEUE, batch(Request(0, "wait", ("w",))))
    wait_until("the call running", lambda: h.service.calls == ["w"], timeout=5)
    first = h.loop.connection
    assert first is not None
    first.close()  # the broker drops the connection: the batch is requeued, redelivered
    h.service.release.set()
    wait_until("answered after the reconnect", lambda: h.responses().get(0) == "w", timeout=10)
    assert h.loop.connection is not first


def test_call_times_keep_what_fits_the_budget() -> None:
    times = CallTimes()
    requests = [Request(i, "op") for i in range(10)]
    assert times.keep(requests) == 1  # never seen: may be long
    times.record("op", 0.000_01)
    assert times.keep(requests) == 10  # echo-sized: the whole batch
    times.record("op", 0.05)
    times.record("op", 0.05)
    assert times.keep(requests, budget=0.02) == 1  # long calls: one at a time
    times = CallTimes()
    times.record("op", 0.004)
    assert times.keep(requests, budget=0.02) == 5


def test_a_batch_of_long_calls_is_shared_with_the_queue_at_once(running: Any) -> None:
    h = running(make())
    h.broker.put(QUEUE, batch(*(Request(i, "wait", (i,)) for i in range(4))))
    wait_until("the first call running", lambda: h.service.calls == [0], timeout=5)
    # while call 0 still runs, the rest is back in the queue for any idle unit
    rest = wait_until("the rest handed back", lambda: h.broker.bodies(QUEUE), timeout=5)
    assert [r.id for r in decode_as(rest[0], LIMIT, RequestBatch).requests] == [1, 2, 3]


def test_echo_sized_calls_keep_their_batch_whole(running: Any) -> None:
    h = make()
    h.loop.times.record("echo", 0.000_01)
    running(h)
    h.broker.put(QUEUE, batch(*(Request(i, "echo", (i,)) for i in range(50))))
    wait_until("50 responses", lambda: len(h.responses()) == 50, timeout=5)
    assert h.broker.bodies(QUEUE) == []
    assert h.service.calls == list(range(50))


def test_main_thread_hands_back_what_waits_behind_a_surprisingly_long_call(
    running: Any,
) -> None:
    h = make()
    h.loop.times.record("wait", 0.000_01)  # expected tiny: the loop keeps the whole batch
    running(h)
    h.broker.put(QUEUE, batch(*(Request(i, "wait", (i,)) for i in range(3))))
    wait_until("the first call running", lambda: h.service.calls == [0], timeout=5)
    assert h.broker.bodies(QUEUE) == []

    def handed_back() -> list[bytes]:
        h.loop.keep_alive()  # what the instance's main thread does every 0.1 s
        return h.broker.bodies(QUEUE)

    rest = wait_until("the waiting requests handed back", handed_back, timeout=5)
    assert [r.id for r in decode_as(rest[0], LIMIT, RequestBatch).requests] == [1, 2]
    h.service.release.set()
    wait_until("all answered", lambda: h.responses() == {0: 0, 1: 1, 2: 2}, timeout=5)


def test_two_loops_run_the_calls_of_one_batch_at_once(running: Any) -> None:
    first = make()
    second = make()
    # the second loop serves the same queue of the same broker, with the same service
    second.broker, second.service = first.broker, first.service
    second.loop.connect = first.broker.connect  # type: ignore[method-assign]
    second.loop.runner = first.loop.runner
    running(first)
    running(second)
    first.broker.put(QUEUE, batch(*(Request(i, "wait", (i,)) for i in range(4))))
    wait_until("two calls running at once", lambda: len(first.service.calls) == 2, timeout=5)
    first.service.release.set()
    wait_until("all answered", lambda: len(first.responses()) == 4, timeout=5)


def test_each_outage_starts_its_back_off_afresh_once_consuming_again(running: Any) -> None:
    h = running(make())
    for turn in range(3):  # without a reset, the third outage would wait ~0.5 s + jitter more
        connection = h.loop.connection
        assert connection is not None
        connection.close()
        wait_until(
            f"consuming again after outage {turn}",
            lambda c=connection: (
                h.loop.connection is not c and h.loop.backoff.current == h.loop.backoff.first
            ),
            timeout=5,
        )


class RefusingCounts(MemoryCounts):
    """Redis refuses every count of client id "bad" (its keys hold another type)."""

    def mark(self, session_id: int, client_id: str, outcomes: list[tuple[int, bool]]) -> int:
        if client_id == "bad":
            raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
        return super().mark(session_id, client_id, outcomes)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "interactive"])
def test_a_batch_redis_refuses_is_dead_lettered_after_the_resend_limit(
    running: Any, durable: bool
) -> None:
    h = make(durable=durable, resend_limit=2)
    h.counts = h.loop.counts = h.loop.done.counts = RefusingCounts()
    h.counts.clients.add((1, "bad"))
    refused = encode_request_batch(
        1, "bad", REPLY, [encode_request(Request(0, "echo", (0,)), LIMIT)]
    )
    running(h)
    h.broker.put(QUEUE, refused)
    h.broker.put(QUEUE, batch(Request(1, "echo", (1,))))
    wait_until("the other client id answered", lambda: 1 in h.responses(), timeout=5)
    if durable:  # counted before the ack: refused, requeued twice, then dead-lettered
        wait_until("the refused batch dead-lettered", lambda: h.broker.dead_letters, timeout=5)
        assert h.broker.dead_letters == [refused]
        assert h.service.calls.count(0) == 3
    else:  # acknowledged before it is counted: answered once, the refused count logged
        wait_until("its count refused", lambda: h.counts.done.get((1, "c")), timeout=5)
        assert h.broker.dead_letters == [] and h.service.calls.count(0) == 1
    assert h.counts.done[(1, "c")] == {1: False}


def test_a_batchs_sender_is_its_routing_key_or_the_farms_header() -> None:
    h = make()
    h.loop.link = dataclasses.replace(h.link, request_exchange="ns.requests")
    props = pika.BasicProperties
    sender = h.loop._sender
    assert sender(SimpleNamespace(exchange="ns.requests", routing_key="a%2Eb.7"), props()) == "a.b"
    # a routing key names its sender even when user_id claims another (RabbitMQ checked it)
    assert (
        sender(SimpleNamespace(exchange="ns.requests", routing_key="bob.7"), props(user_id="x"))
        == "bob"
    )
    handed_back = props(user_id="farm", headers={"soafarm-sender": "alice"})
    assert sender(SimpleNamespace(exchange="", routing_key="q"), handed_back) == "alice"
    assert sender(SimpleNamespace(exchange="", routing_key="q"), props(user_id="farm")) == "farm"
    assert sender(SimpleNamespace(exchange="", routing_key="q"), props()) == ""


def test_a_batch_sent_under_another_users_client_id_is_dead_lettered(running: Any) -> None:
    h = make()
    h.counts.users[(1, "c")] = "alice"  # every batch here is sent by SENDER
    running(h)
    h.broker.put(QUEUE, batch(Request(0, "echo", (0,))))
    wait_until("the batch dead-lettered", lambda: h.broker.dead_letters, timeout=5)
    assert h.service.calls == [] and h.responses() == {}


def test_a_request_id_far_past_the_accepted_count_is_dead_lettered(running: Any) -> None:
    h = make()
    h.loop.id_slack = 1000
    running(h)
    crafted = batch(Request(4_000_000_000, "echo", (1,)))
    h.broker.put(QUEUE, crafted)
    h.broker.put(QUEUE, batch(Request(999, "echo", (2,))))  # within the slack: runs
    wait_until("the later batch answered", lambda: 999 in h.responses(), timeout=5)
    assert h.broker.dead_letters == [crafted]
    assert h.service.calls == [2]
    assert (1, "c") not in h.counts.done or 4_000_000_000 not in h.counts.done[(1, "c")]
    # the client recorded more: the bound is read again before a batch is refused
    h.counts.accepted_counts[(1, "c")] = 5000
    reads = h.counts.accepted_reads
    h.broker.put(QUEUE, batch(Request(5500, "echo", (3,))))
    wait_until("the id within the new bound answered", lambda: 5500 in h.responses(), timeout=5)
    assert h.counts.accepted_reads == reads + 1
    h.broker.put(QUEUE, batch(Request(5600, "echo", (4,))))  # below the bound it read
    wait_until("answered without a read", lambda: 5600 in h.responses(), timeout=5)
    assert h.counts.accepted_reads == reads + 1
