"""Who a process is to RabbitMQ: the user its AMQP URL logs in as.

RabbitMQ refuses a message whose `user_id` property is not the user the connection logged in
as, so a `user_id` that reaches a consumer is that user's word, checked by the server: the
broker daemon takes a caller's identity from it, and a client the author of a response.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from soafarm.config import Settings

#: The user of an AMQP URL without one (RabbitMQ's and pika's default).
DEFAULT_USER = "guest"


def amqp_user(url: str) -> str:
    """The user `url` logs in as (`guest` when it names none)."""
    username = urlsplit(url).username
    return unquote(username) if username else DEFAULT_USER


def own_user(settings: Settings) -> str:
    """The RabbitMQ user this process connects as (the first failover URL's; every URL of
    the list is expected to name the same one)."""
    return amqp_user(settings.amqp_urls[0])
