"""An in-memory stand-in for the slice of pika's BlockingConnection the call loop uses.

Only for tests/unit: it lets the call loop's policies (batching, hand-back, retries,
done-marking, dead-lettering, mandatory publishes) run in milliseconds. The same behaviours
are tested against the real RabbitMQ in tests/integration.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions

#: The user every delivered batch was sent by.
SENDER = "tester"


@dataclass
class Message:
    """A message in a queue, and whether RabbitMQ would mark it redelivered."""

    body: bytes
    redelivered: bool = False


@dataclass
class MemoryBroker:
    """Queues by name; `unroutable` names queues that return mandatory publishes."""

    queues: dict[str, deque[Message]] = field(default_factory=dict)
    dead_letters: list[bytes] = field(default_factory=list)
    unroutable: dict[str, int] = field(default_factory=dict)  # queue -> returns left
    lock: threading.Condition = field(default_factory=threading.Condition)

    def put(self, queue: str, body: bytes, redelivered: bool = False) -> None:
        """Enqueue a message (as a client's publish would)."""
        with self.lock:
            self.queues.setdefault(queue, deque()).append(Message(body, redelivered))
            self.lock.notify_all()

    def bodies(self, queue: str) -> list[bytes]:
        """The bodies waiting in `queue`, oldest first."""
        with self.lock:
            return [m.body for m in self.queues.get(queue, ())]

    def take(self, queue: str) -> Message | None:
        """Remove and return the oldest message of `queue`."""
        with self.lock:
            waiting = self.queues.get(queue)
            return waiting.popleft() if waiting else None

    def connect(self) -> MemoryConnection:
        """A new connection (what the call loop's `connect` returns)."""
        return MemoryConnection(self)


class MemoryConnection:
    """One connection with one channel at most, like the call loop uses it."""

    def __init__(self, broker: MemoryBroker) -> None:
        """Open at once."""
        self.broker = broker
        self.is_open = True
        self.channels: list[MemoryChannel] = []
        self.slept = 0.0

    def channel(self) -> MemoryChannel:
        """Open a channel."""
        ch = MemoryChannel(self)
        self.channels.append(ch)
        return ch

    def check_open(self) -> None:
        """What pika raises on a connection the broker dropped."""
        if not self.is_open:
            raise pika.exceptions.StreamLostError("connection lost (memory broker)")

    def process_data_events(self, time_limit: float = 0) -> None:
        """Deliver what prefetch allows to each consumer, waiting up to `time_limit` for a
        message when there is none."""
        self.check_open()
        deadline = time.monotonic() + time_limit
        with self.broker.lock:
            while True:
                if any(ch.deliver() for ch in self.channels):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.broker.lock.wait(left)

    def sleep(self, duration: float) -> None:
        """pika's sleep serves I/O; here it only counts the time asked for."""
        self.slept += duration

    def close(self) -> None:
        """Close; unacknowledged messages go back to their queue marked redelivered."""
        if not self.is_open:
            return
        self.is_open = False
        for ch in self.channels:
            ch.requeue_unacked()


class MemoryChannel:
    """Consume, ack, reject and publish, with prefetch and mandatory returns."""

    def __init__(self, connection: MemoryConnection) -> None:
        """No consumer yet."""
        self.connection = connection
        self.broker = connection.broker
        self.is_open = True
        self.prefetch = 0
        self.consumer: tuple[str, Callable[..., None]] | None = None
        self.unacked: dict[int, tuple[str, Message]] = {}
        self.next_tag = 1
        self.acked: list[bytes] = []
        self.confirming = False

    def confirm_delivery(self) -> None:
        """Publisher confirms on (the memory broker takes every routable publish at once)."""
        self.confirming = True

    def basic_qos(self, prefetch_count: int = 0) -> None:
        """At most `prefetch_count` unacknowledged deliveries."""
        self.prefetch = prefetch_count

    def basic_consume(self, queue: str, on_message_callback: Callable[..., None]) -> str:
        """Start consuming `queue`."""
        self.consumer = (queue, on_message_callback)
        return "ctag"

    def add_on_cancel_callback(self, callback: Callable[[Any], None]) -> None:
        """The memory broker never cancels consumers."""

    def basic_cancel(self, consumer_tag: str) -> None:
        """Stop consuming."""
        self.consumer = None

    def deliver(self) -> bool:
        """Hand one message to the consumer if prefetch allows (broker lock held)."""
        if self.consumer is None or (self.prefetch and len(self.unacked) >= self.prefetch):
            return False
        queue, callback = self.consumer
        waiting = self.broker.queues.get(queue)
        if not waiting:
            return False
        message = waiting.popleft()
        tag, self.next_tag = self.next_tag, self.next_tag + 1
        self.unacked[tag] = (queue, message)
        method = pika.spec.Basic.Deliver(delivery_tag=tag, redelivered=message.redelivered)
        # every batch as sent by one user: the call loop answers to its sender (workers.calls)
        callback(self, method, pika.BasicProperties(user_id=SENDER), message.body)
        return True

    def basic_ack(self, delivery_tag: int) -> None:
        """Acknowledge a delivery: it leaves the broker."""
        self.connection.check_open()
        _queue, message = self.unacked.pop(delivery_tag)
        self.acked.append(message.body)

    def basic_reject(self, delivery_tag: int, requeue: bool = True) -> None:
        """Reject: back to the queue, or (requeue=False) to the dead letters."""
        self.connection.check_open()
        queue, message = self.unacked.pop(delivery_tag)
        if requeue:
            self.broker.put(queue, message.body, redelivered=True)
        else:
            self.broker.dead_letters.append(message.body)

    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Any = None,
        mandatory: bool = False,
    ) -> None:
        """Publish to the default exchange; a mandatory publish to a queue listed in
        `broker.unroutable` is returned (pika raises UnroutableError)."""
        self.connection.check_open()
        with self.broker.lock:
            left = self.broker.unroutable.get(routing_key, 0)
            if mandatory and left:
                self.broker.unroutable[routing_key] = left - 1
                raise pika.exceptions.UnroutableError([])
        self.broker.put(routing_key, body)

    def requeue_unacked(self) -> None:
        """What a closed channel held goes back to its queue, redelivered."""
        unacked, self.unacked = self.unacked, {}
        for queue, message in unacked.values():
            self.broker.put(queue, message.body, redelivered=True)
