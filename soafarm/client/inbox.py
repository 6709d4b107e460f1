"""Where readers get response batches from: RabbitMQ through kombu.

The readers (`client.queue_reader`, `client.reader`) hold the policies (each response once,
completion, leases, resuming); these classes are their only contact with AMQP, so tests/unit
can hand the readers in-memory batches instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import amqp.exceptions
import structlog
from kombu import Connection, Consumer, Producer, Queue
from kombu.message import Message

from soafarm.config import Settings, mask_url
from soafarm.errors import ConnectionFailed
from soafarm.protocol import CONTENT_TYPE
from soafarm.transport.connections import (
    close_quietly,
    kombu_connection,
    reporting_lost_connection,
)
from soafarm.transport.identity import own_user

#: Deliveries in flight per reader: enough to keep a reader busy between round trips.
STREAM_PREFETCH = 64

log = structlog.get_logger(__name__)


class Authors:
    """Whom a client id accepts response batches from: the farm's users (the `user_id`
    each instance stamps, which RabbitMQ checks against its login) and its own user (a
    reader that was taken over gives batches back under it). A batch from anyone else is
    dropped and counted, so a user who may publish into the queue cannot forge results."""

    def __init__(self, responders: tuple[str, ...], own: str) -> None:
        """`responders` from the broker's attach reply (empty: accept every batch)."""
        self.accepted = frozenset((*responders, own)) if responders else None
        #: Batches dropped.
        self.forged = 0

    def accept(self, message: Message) -> bool:
        """Whether `message` comes from the farm or this user; counts and logs it if not."""
        if self.accepted is None:
            return True
        user = message.properties.get("user_id")
        if user in self.accepted:
            return True
        self.forged += 1
        log.warning("response_batch_dropped", why="not published by the farm", user_id=user)
        return False


class QueueInbox:
    """An interactive response queue, consumed with auto-ack on a connection of its own.

    Auto-ack: an ack frame per batch was on the latency path, and interactive responses live
    only as long as their client anyway. A reader that another reader took over stops
    consuming (whatever was on its way arrives first) and gives back, by publishing them to
    the queue again, the batches it had received but not handed out.
    """

    def __init__(
        self,
        settings: Settings,
        queue: str,
        missing: Callable[[], BaseException] | None = None,
        authors: Authors | None = None,
        give_back_to: tuple[str, str] | None = None,
    ) -> None:
        """Consume `queue` once started, on a connection of its own: the client publishes on
        its own from another thread (the linger thread). `missing()` is the error raised
        when the queue does not exist (a RabbitMQ restart drops an interactive session's);
        `authors` drops batches not published by the farm; `give_back_to` (exchange, routing
        key) is where batches go back to the queue (by default straight to it)."""
        self.settings = settings
        self.give_back_to = give_back_to or ("", queue)
        self.authors = authors or Authors((), "")
        self.url = settings.amqp_url
        self.queue = queue
        self.missing = missing
        self.connection: Connection | None = None
        self.consumer: Consumer | None = None

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Start delivering to `on_delivery` (during `drain`); later calls do nothing."""
        if self.consumer is not None:
            return
        if self.connection is None:
            self.connection = kombu_connection(self.settings)
        with reporting_lost_connection(self.connection, self.url):
            try:
                consumer = Consumer(
                    self.connection.channel(),
                    queues=[Queue(self.queue, no_declare=True)],
                    on_message=lambda message: (
                        on_delivery(Delivery(None, message.body, _acked))
                        if self.authors.accept(message)
                        else None
                    ),
                    accept=[CONTENT_TYPE],
                    no_ack=True,
                )
                consumer.consume()
            except amqp.exceptions.NotFound:
                self.close()
                if self.missing is None:
                    raise
                raise self.missing() from None
            self.consumer = consumer

    def drain(self, timeout: float) -> bool:
        """Deliver what arrives within `timeout` seconds; False if nothing did."""
        assert self.connection is not None
        with reporting_lost_connection(self.connection, self.url):
            try:
                self.connection.drain_events(timeout=timeout)
            except TimeoutError:  # an OSError: kept from the lost-connection mapping
                return False
        return True

    def stop(self) -> None:
        """Stop consuming; deliveries RabbitMQ sent before it stopped reach `on_delivery`
        first (the cancel waits for RabbitMQ's answer, which comes after them)."""
        consumer, self.consumer = self.consumer, None
        if consumer is not None and self.connection is not None:
            with reporting_lost_connection(self.connection, self.url):
                consumer.cancel()

    def give_back(self, bodies: list[bytes]) -> None:
        """Publish response batches to the queue again, for the reader that took over."""
        if not bodies or self.connection is None:
            return
        with reporting_lost_connection(self.connection, self.url):
            producer = Producer(self.connection.channel())
            for body in bodies:
                producer.publish(
                    body,
                    routing_key=self.give_back_to[1],
                    exchange=self.give_back_to[0],
                    content_type=CONTENT_TYPE,
                    content_encoding="binary",
                    delivery_mode=1,
                    # the batches' author is now this user: the taking reader accepts its own
                    user_id=own_user(self.settings),
                )

    def close(self) -> None:
        """Stop consuming and close the connection."""
        connection, self.connection, self.consumer = self.connection, None, None
        if connection is not None:
            close_quietly(connection)


def _acked() -> None:
    """An auto-acked delivery needs no acknowledgement."""


@dataclass(frozen=True)
class Delivery:
    """One response batch: its stream offset (None from a queue), its body, and how to
    acknowledge it."""

    offset: int | None
    body: bytes
    ack: Callable[[], None]


class StreamInbox:
    """A durable client id's response stream, read from an offset on a connection of its own
    (reopened by the reader after RabbitMQ dropped it)."""

    def __init__(self, settings: Settings, stream: str, authors: Authors | None = None) -> None:
        """Nothing is open until `open`; `authors` drops batches not published by the farm."""
        self.settings = settings
        self.stream = stream
        self.authors = authors or Authors((), "")
        self.connection: Connection | None = None

    def open(self, offset: int, on_delivery: Callable[[Delivery], None]) -> None:
        """Start reading at `offset`; deliveries reach `on_delivery` during `drain`."""

        def on_message(message: Message) -> None:
            if not self.authors.accept(message):
                message.ack()  # read past it, for good
                return
            at = message.headers.get("x-stream-offset")
            on_delivery(Delivery(None if at is None else int(at), message.body, message.ack))

        connection = kombu_connection(self.settings)
        try:
            consumer = Consumer(
                connection.channel(),
                queues=[
                    Queue(
                        self.stream, no_declare=True, consumer_arguments={"x-stream-offset": offset}
                    )
                ],
                on_message=on_message,
                accept=[CONTENT_TYPE],
                prefetch_count=STREAM_PREFETCH,
            )
            consumer.consume()
        except (*connection.connection_errors, *connection.channel_errors) as e:
            # right after a RabbitMQ restart a stream may not take consumers yet: the reader
            # retries (and checks the session still exists) until `client.reconnect_timeout`
            close_quietly(connection)
            raise ConnectionFailed(
                f"RabbitMQ at {mask_url(self.settings.amqp_url)} cannot serve {self.stream} "
                f"now: {e or type(e).__name__}"
            ) from None
        self.connection = connection

    @property
    def is_open(self) -> bool:
        """True between `open` and `close` (or a lost connection)."""
        return self.connection is not None

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for deliveries; False if the connection is gone."""
        connection = self.connection
        assert connection is not None
        try:
            connection.drain_events(timeout=timeout)
        except TimeoutError:
            pass
        except connection.connection_errors:
            return False
        return True

    def close(self) -> None:
        """Release the consumer; deliveries not acknowledged go to the next one."""
        if self.connection is not None:
            close_quietly(self.connection)
        self.connection = None
