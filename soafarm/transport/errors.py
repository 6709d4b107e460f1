"""One table of what the servers' client libraries raise and what it means to soafarm.

pika (broker daemon, service instances), kombu/py-amqp (client library) and redis-py each have
their own exception trees; every reconnect loop and every "is the connection gone?" test
uses the tuples below, so the processes agree on what a lost connection is.
"""

from __future__ import annotations

import amqp.exceptions
import pika.exceptions
import redis

from soafarm.errors import ConnectionFailed

#: AMQP reply code of a channel closed because its queue does not exist (deleted session).
NOT_FOUND = 404
#: AMQP reply code of a declare whose arguments differ from the existing queue's.
PRECONDITION_FAILED = 406
#: AMQP reply code of a message published with `mandatory` that no queue took.
NO_ROUTE = 312

#: "The AMQP connection is gone": reconnect, and RabbitMQ redelivers what was unacknowledged.
AMQP_LOST: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPError,
    amqp.exceptions.RecoverableConnectionError,
    ConnectionError,
    OSError,
)
#: "Redis did not answer": retry later; nothing in Redis is the only copy of a request.
REDIS_LOST: tuple[type[BaseException], ...] = (redis.RedisError,)
#: Everything after which a serving loop reconnects instead of failing.
LOST: tuple[type[BaseException], ...] = (ConnectionFailed, *AMQP_LOST, *REDIS_LOST)


def is_queue_gone(error: BaseException) -> bool:
    """True for a channel RabbitMQ closed because the queue it used was deleted."""
    return (
        isinstance(error, pika.exceptions.ChannelClosedByBroker) and error.reply_code == NOT_FOUND
    )


def is_inequivalent_queue(error: BaseException) -> bool:
    """True for a channel RabbitMQ closed because a declare's arguments differ from those
    of the queue that exists (another queue type, other dead-lettering)."""
    return (
        isinstance(error, pika.exceptions.ChannelClosedByBroker)
        and error.reply_code == PRECONDITION_FAILED
    )


def is_unroutable_return(error: BaseException) -> bool:
    """True for a `mandatory` publish RabbitMQ returned because no queue took it."""
    if isinstance(error, pika.exceptions.UnroutableError):
        return True
    return isinstance(error, amqp.exceptions.ChannelError) and (
        getattr(error, "reply_code", None) == NO_ROUTE
    )
