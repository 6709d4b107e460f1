"""The RabbitMQ permissions of a farm's user: what fences one user's data path from another's.

A client's user may publish only to the namespace's control and request exchanges (never
to the default exchange, which reaches every queue), only with routing keys that start
with its own `user_word` (topic permissions on the request exchange; the broker daemon
binds a session's request queue to the keys of the users it admits), read only response
queues whose names carry its own user, and declare, delete or purge nothing. The farm's
own user (broker daemons, worker hosts) keeps every permission.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from soafarm.names import Names, user_word


@dataclass(frozen=True)
class Permissions:
    """A user's permission patterns on one vhost, and its topic permissions on one exchange."""

    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str

    def rabbitmqctl(self, user: str, vhost: str) -> list[list[str]]:
        """The `rabbitmqctl` argument lists that set them (after `add_user`)."""
        return [
            ["set_permissions", "-p", vhost, user, self.configure, self.write, self.read],
            [
                "set_topic_permissions",
                "-p",
                vhost,
                user,
                self.topic_exchange,
                self.topic_write,
                self.topic_read,
            ],
        ]


def client_permissions(namespace: str, user: str) -> Permissions:
    """What a client's `user` may do in `namespace` (see the module docstring)."""
    names = Names(namespace)
    ns = re.escape(namespace)
    word = re.escape(user_word(user))
    return Permissions(
        configure="^$",
        write=f"^({re.escape(names.control_exchange)}|{re.escape(names.request_exchange)})$",
        read=f"^{ns}\\.session\\.[0-9]+\\.responses\\.{word}\\.",
        topic_exchange=names.request_exchange,
        topic_write=f"^{word}\\.",
        topic_read="^$",
    )
