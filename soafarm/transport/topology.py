"""How each RabbitMQ queue is declared: one spec per queue, shared by pika and kombu users.

Queue arguments must match on every declare (RabbitMQ refuses a redeclare with different
arguments), so the broker daemon, worker hosts and the client all take them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pika
import structlog

from soafarm.names import Names
from soafarm.transport.errors import is_inequivalent_queue

log = structlog.get_logger(__name__)

#: Queues that must outlive a RabbitMQ node: replicated on every node of a cluster and usable
#: while a majority of them runs (a classic durable queue is unusable while its one node is
#: down: every declare of it is refused, and a daemon declaring it at start could not start).
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


@dataclass(frozen=True)
class QueueSpec:
    """A queue's name and declare arguments, in the keyword form pika and kombu both accept."""

    name: str
    durable: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)

    def declare_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `channel.queue_declare` (pika's and kombu's alike)."""
        return {
            "queue": self.name,
            "durable": self.durable,
            "exclusive": False,
            "auto_delete": False,
            "arguments": self.arguments or None,
        }


def control_queue(names: Names) -> QueueSpec:
    """The broker daemon's RPC queue. Control messages are transient RPCs: not durable."""
    return QueueSpec(names.control_queue)


def dead_letter_queue(names: Names) -> QueueSpec:
    """Where undecodable request batches go, kept intact for an operator to inspect."""
    return QueueSpec(f"{names.namespace}.dead-letters", durable=True, arguments=QUORUM)


def declare_farm_queue(connection: pika.BlockingConnection, spec: QueueSpec) -> int:
    """Declare one of a namespace's own durable queues (dead letters, the session id mark)
    on a channel of its own; its message count. The same queue made as a classic queue by
    an earlier soafarm is used as it is (RabbitMQ refuses to change a queue's type), with a
    warning: it is unusable while its node is down."""
    channel = connection.channel()
    try:
        ok = channel.queue_declare(**spec.declare_kwargs())
    except pika.exceptions.ChannelClosedByBroker as e:
        if not is_inequivalent_queue(e):
            raise
        log.warning(
            "queue_kept_as_made",
            queue=spec.name,
            why=e.reply_text,
            fix="delete it (rabbitmqctl delete_queue) while no broker daemon runs to have it "
            "made again replicated",
        )
        channel = connection.channel()
        ok = channel.queue_declare(queue=spec.name, passive=True)
    if channel.is_open:
        channel.close()
    return int(ok.method.message_count)


def request_queue(names: Names, session_id: int, durable: bool = False) -> QueueSpec:
    """A session's request queue, dead-lettered. Interactive: a classic queue, fastest.
    Durable: a quorum queue (replicated, persisted, survives a RabbitMQ restart)."""
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(names).name,
    }
    if durable:
        arguments.update(QUORUM)
    return QueueSpec(names.request_queue(session_id), durable=durable, arguments=arguments)


def response_queue(
    names: Names, session_id: int, client_id: str, user: str, durable: bool = False
) -> QueueSpec:
    """A client id's responses (`user`'s). Interactive: a classic queue, read once. Durable:
    a stream, persisted and re-readable from any offset until the client id or session is
    purged."""
    name = names.response_queue(session_id, client_id, user)
    if durable:
        return QueueSpec(name, durable=True, arguments={"x-queue-type": "stream"})
    # lazy: responses nobody reads yet go to disk, not RabbitMQ's memory
    return QueueSpec(name, arguments={"x-queue-mode": "lazy"})


def declare_exchanges(channel: Any, names: Names) -> None:
    """Declare the exchanges clients publish through and bind the control queue (the broker
    daemon, at start; idempotent): clients need no write permission on the default
    exchange, so RabbitMQ's permissions decide which queues a user reaches."""
    channel.exchange_declare(exchange=names.control_exchange, exchange_type="direct", durable=True)
    channel.queue_bind(
        queue=names.control_queue, exchange=names.control_exchange, routing_key=names.control_queue
    )
    channel.exchange_declare(exchange=names.request_exchange, exchange_type="topic", durable=True)
