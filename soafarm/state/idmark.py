"""The session id mark kept in RabbitMQ, so ids survive Redis coming back empty.

Session ids come from a Redis counter. If Redis restarts without persistence the counter is
gone, while the queues and streams of the old sessions are still in RabbitMQ: a counter
starting again at 1 gave a new session the name of an old one, and its reader the old
session's results (issue 15). So the ids handed out are also recorded in RabbitMQ, beside
those queues, where they share the queues' fate: if RabbitMQ keeps the queues, it keeps the
mark; if it loses them, no old queue is left to be mistaken for a new one.

The mark is a durable (quorum) queue, `<namespace>.session-ids`, whose message count times
`ID_BLOCK` is above every id handed out. Reading it is a passive declare (any number of
daemons at once, nothing consumed); raising it is publishing persistent messages with
confirms, one per block of `ID_BLOCK` ids, before any id of the block is used. The count
only grows, so two daemons raising it at once can only overshoot (a few unused ids), never
lower it. An operator sees it with `rabbitmqctl list_queues`.
"""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions

from soafarm.names import Names
from soafarm.state.sessions import ID_BLOCK
from soafarm.transport.errors import is_queue_gone
from soafarm.transport.topology import QUORUM, QueueSpec, declare_farm_queue


def id_mark_queue(names: Names) -> QueueSpec:
    """The durable queue whose message count records the session ids handed out."""
    return QueueSpec(f"{names.namespace}.session-ids", durable=True, arguments=QUORUM)


class QueueIdMark:
    """An `IdMark` (soafarm.state.sessions) on a broker daemon's RabbitMQ connection."""

    def __init__(self, connection: pika.BlockingConnection, names: Names) -> None:
        """Use a channel of its own on `connection` (with publisher confirms)."""
        self.connection = connection
        self.spec = id_mark_queue(names)
        self._channel: Any = None

    def _open(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            self._channel = self.connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def _blocks(self) -> int:
        return declare_farm_queue(self.connection, self.spec)

    def read(self) -> int:
        """Every session id handed out is below this (0 in a new namespace)."""
        return self._blocks() * ID_BLOCK

    def write(self, ceiling: int) -> None:
        """Record that ids below `ceiling` may be used: one persistent, confirmed message
        per block (never lowers the mark)."""
        channel = self._open()
        have = self._blocks()
        for block in range(have, -(-ceiling // ID_BLOCK)):
            channel.basic_publish(
                "",
                self.spec.name,
                str((block + 1) * ID_BLOCK).encode(),
                pika.BasicProperties(delivery_mode=2),
                mandatory=True,
            )


def read_id_mark(connection: pika.BlockingConnection, names: Names) -> int | None:
    """The mark of `names`' namespace without creating anything: None when its queue does
    not exist (a new namespace, or RabbitMQ lost its data too)."""
    channel = connection.channel()  # a passive declare's miss closes its channel
    try:
        ok = channel.queue_declare(queue=id_mark_queue(names).name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if is_queue_gone(e):
            return None
        raise
    if channel.is_open:
        channel.close()
    return int(ok.method.message_count) * ID_BLOCK
