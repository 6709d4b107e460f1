"""The whole of a namespace: what lives in it, and deleting every queue and key of it.

RabbitMQ cannot list queues over AMQP (that needs the management plugin, which soafarm does
not require), so the queues are named from what Redis knows: the namespace's own queues,
then every session id found in a key (open, closed but readable, or any key left behind)
with its client ids' response queues. When Redis lost the namespace's state, the session id
mark in RabbitMQ (`soafarm.state.idmark`) bounds the ids that may have queues, and each of
them is tried with the `default` client id (the client library's and `soafarm submit`'s);
response queues of other client ids lost with Redis cannot be found this way
(`rabbitmqctl list_queues name | grep '^<namespace>\\.'` lists them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import redis

from soafarm.errors import DecodeError
from soafarm.names import Names
from soafarm.state.clients import read_client_users
from soafarm.state.idmark import id_mark_queue, read_id_mark
from soafarm.state.records import as_text
from soafarm.state.redis_accounts import RedisAccounts
from soafarm.state.sessions import SessionStore
from soafarm.transport.errors import is_queue_gone
from soafarm.transport.topology import control_queue, dead_letter_queue

#: The client id tried for every session id when Redis lost the namespace's client ids (the
#: client library's default; an interactive session's response queue for it is declared
#: with the session).
DEFAULT_CLIENT_ID = "default"


def delete_namespace_keys(client: redis.Redis, names: Names) -> int:
    """Delete every key of `names`' namespace (a private test or demo farm's), and the
    Redis accounts made for it; returns how many keys there were. Only for namespaces
    nobody else uses: it drops open sessions' state."""
    drop_namespace_accounts(client, names)
    keys = list(client.scan_iter(match=f"{names.namespace}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    return len(keys)


def drop_namespace_accounts(client: redis.Redis, names: Names) -> None:
    """Delete the Redis accounts (ACL users) made for `names`' namespace: those its hash
    lists, and any other named `<namespace>.*`."""
    accounts = RedisAccounts(client, names)
    try:
        made = set(accounts.accounts()) | {
            u for u in accounts.existing() if u.startswith(f"{names.namespace}.")
        }
    except redis.ResponseError:  # the account may not manage ACL users: none were made
        return
    accounts.drop(sorted(made))


def known_sessions(client: redis.Redis, names: Names) -> dict[int, set[str]]:
    """Every session id any key of the namespace names, with the client ids Redis knows."""
    found: dict[int, set[str]] = {}
    sessions = SessionStore(client, names)
    for sid in sessions.open_ids():
        found.setdefault(sid, set())
    prefix = re.escape(f"{names.namespace}:session:")
    # <ns>:session:<id>[:client:<client id>[:done|:read|:attempts]][:<anything else>]
    pattern = re.compile(prefix + r"(\d+)(?::client:([A-Za-z0-9._-]{1,64})(?::\w+)?)?(?::.*)?$")
    for key in client.scan_iter(match=f"{names.namespace}:session:*", count=1000):
        match = pattern.match(as_text(key))
        if match is None:
            continue
        clients = found.setdefault(int(match.group(1)), set())
        if match.group(2):
            clients.add(match.group(2))
    for sid, clients in found.items():
        clients.update(sessions.clients(sid))
    return found


def live_parties(
    client: redis.Redis, connection: pika.BlockingConnection, names: Names
) -> tuple[list[str], int]:
    """(ids of worker hosts whose heartbeat key still exists, broker daemons consuming the
    control queue): who would be hurt by deleting the namespace."""
    prefix, suffix = f"{names.namespace}:host:", ":heartbeat"
    hosts = sorted(
        as_text(k)[len(prefix) : -len(suffix)]
        for k in client.scan_iter(match=f"{prefix}*{suffix}", count=1000)
    )
    channel = connection.channel()
    try:
        ok = channel.queue_declare(queue=control_queue(names).name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if is_queue_gone(e):
            return hosts, 0
        raise
    brokers = int(ok.method.consumer_count)
    if channel.is_open:
        channel.close()
    return hosts, brokers


@dataclass(frozen=True)
class NamespaceDeleted:
    """What `delete_namespace_state` removed."""

    queues: int
    keys: int
    #: Session ids tried from the RabbitMQ id mark because Redis had lost their state.
    swept_ids: int


def delete_namespace_state(
    client: redis.Redis, connection: pika.BlockingConnection, names: Names, user: str
) -> NamespaceDeleted:
    """Delete every queue (see the module doc), exchange and key of `names`' namespace.

    Only for a namespace nobody uses any more: it deletes pending requests and unread
    responses. Queues that exist are deleted one by one (a passive declare first, so the
    count says what was there), then the keys. A response queue's name carries its
    client id's user: those Redis keeps are tried, and the session's owner and `user`
    (the deleter's, the farm's own in a one-user farm) where it keeps none."""
    queues: list[str] = [
        control_queue(names).name,
        dead_letter_queue(names).name,
        id_mark_queue(names).name,
    ]
    sessions = known_sessions(client, names)
    for sid, clients in sorted(sessions.items()):
        queues.append(names.request_queue(sid))
        # an interactive session's default response queue exists from its creation, with or
        # without a client attached by that id (soafarm.broker.sessions)
        queues += [
            names.response_queue(sid, c, u)
            for c in sorted({*clients, DEFAULT_CLIENT_ID})
            for u in _users(client, names, sid, c, user)
        ]
    swept = 0
    store = SessionStore(client, names)
    if store.lost_below() or not store.ids_known():
        # Redis lost (some of) this namespace's state: every id handed out may have queues
        mark = read_id_mark(connection, names) or 0
        for sid in range(1, mark):
            if sid not in sessions:
                swept += 1
                queues.append(names.request_queue(sid))
                queues.append(names.response_queue(sid, DEFAULT_CLIENT_ID, user))
    deleted = _delete_existing(connection, queues)
    _delete_exchanges(connection, [names.control_exchange, names.request_exchange])
    keys = delete_namespace_keys(client, names)
    return NamespaceDeleted(deleted, keys, swept)


def _users(client: redis.Redis, names: Names, sid: int, client_id: str, user: str) -> set[str]:
    """Whose response queue a client id of session `sid` may have: its kept user, else the
    session's owner and `user`."""
    kept = read_client_users(client, names, sid, [client_id])
    if kept:
        return set(kept.values())
    try:
        record = SessionStore(client, names).load(sid)
    except DecodeError:
        record = None
    return {user} | ({record.owner} if record is not None and record.owner else set())


def _delete_exchanges(connection: pika.BlockingConnection, exchanges: list[str]) -> None:
    """Delete the namespace's exchanges (a missing one is no error)."""
    for exchange in exchanges:
        channel = connection.channel()
        try:
            channel.exchange_delete(exchange=exchange)
        except pika.exceptions.ChannelClosedByBroker as e:
            if not is_queue_gone(e):  # 404: it was not there
                raise
        finally:
            if channel.is_open:
                channel.close()


def _delete_existing(connection: pika.BlockingConnection, queues: list[str]) -> int:
    """Delete those of `queues` that exist; returns how many did."""
    channel: Any = None
    deleted = 0
    for queue in dict.fromkeys(queues):
        if channel is None or not channel.is_open:
            channel = connection.channel()
        try:
            channel.queue_declare(queue=queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            channel = None  # a miss closes the channel
            if is_queue_gone(e):
                continue
            raise
        channel.queue_delete(queue=queue)
        deleted += 1
    if channel is not None and channel.is_open:
        channel.close()
    return deleted
