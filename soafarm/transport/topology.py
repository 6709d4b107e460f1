"""How each RabbitMQ queue is declared: one spec per queue, shared by pika and kombu users.

Queue arguments must match on every declare (RabbitMQ refuses a redeclare with different
arguments), so the broker daemon, worker hosts and the client all take them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soafarm.names import Names


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
    return QueueSpec(f"{names.namespace}.dead-letters", durable=True)


def request_queue(names: Names, session_id: int, durable: bool = False) -> QueueSpec:
    """A session's request queue, dead-lettered. Interactive: a classic queue, fastest.
    Durable: a quorum queue (replicated, persisted, survives a RabbitMQ restart)."""
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(names).name,
    }
    if durable:
        arguments["x-queue-type"] = "quorum"
    return QueueSpec(names.request_queue(session_id), durable=durable, arguments=arguments)


def response_queue(
    names: Names, session_id: int, client_id: str, durable: bool = False
) -> QueueSpec:
    """A client id's responses. Interactive: a classic queue, read once. Durable: a stream,
    persisted and re-readable from any offset until the client id or session is purged."""
    name = names.response_queue(session_id, client_id)
    if durable:
        return QueueSpec(name, durable=True, arguments={"x-queue-type": "stream"})
    # lazy: responses nobody reads yet go to disk, not RabbitMQ's memory
    return QueueSpec(name, arguments={"x-queue-mode": "lazy"})
