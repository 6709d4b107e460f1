"""Opening connections to RabbitMQ and Redis, with one clear error when they are unreachable.

The client library uses kombu (failover across URLs, retry policies); the broker daemon and
worker hosts use pika (explicit channels, tight consume loops). Both go through here so the
error a user sees names the URL (password masked) and what to do.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import redis
import structlog
from kombu import Connection
from redis.sentinel import Sentinel

from soafarm.config import Settings, TlsSettings, mask_url
from soafarm.errors import ConnectionFailed, ConnectionLost
from soafarm.transport.backoff import Outage
from soafarm.transport.errors import REDIS_LOST, is_unroutable_return
from soafarm.transport.redis_urls import is_sentinel, parse_sentinel_url
from soafarm.transport.tls import kombu_ssl, pika_ssl_options, redis_ssl_kwargs

log = structlog.get_logger(__name__)

T = TypeVar("T")

RABBITMQ_HINT = (
    "is RabbitMQ running? start it with `rabbitmq-server -detached`, or use `soafarm up`"
)
REDIS_HINT = "is Redis running? start it with `redis-server --daemonize yes`, or use `soafarm up`"


def rabbitmq_unreachable(url: str, error: BaseException) -> ConnectionFailed:
    """The error for a RabbitMQ URL that cannot be reached."""
    why = str(error) or type(error).__name__
    return ConnectionFailed(
        f"cannot connect to RabbitMQ at {mask_url(url)}: {why}; {RABBITMQ_HINT}"
    )


@contextlib.contextmanager
def reporting_lost_connection(connection: Connection, url: str) -> Iterator[None]:
    """Turn a kombu connection failure inside the block into one ConnectionFailed line."""
    try:
        yield
    except connection.connection_errors as e:
        raise ConnectionFailed(
            f"lost the connection to RabbitMQ at {mask_url(url)}: {e or type(e).__name__}; "
            f"{RABBITMQ_HINT}"
        ) from None


def lost_for_good(settings: Settings) -> Callable[[BaseException, float], ConnectionLost]:
    """What a client raises when RabbitMQ or Redis stayed away `client.reconnect_timeout`
    seconds: one line naming the server, its masked URL, the last error and the setting."""

    def give_up(error: BaseException, seconds: float) -> ConnectionLost:
        # a ConnectionFailed of redis_client() names Redis (REDIS_HINT); the rest is AMQP
        if isinstance(error, REDIS_LOST) or REDIS_HINT in str(error):
            server, url = "Redis", settings.redis_url
        else:
            server, url = "RabbitMQ", settings.amqp_url
        why = str(error) or type(error).__name__
        if isinstance(error, ConnectionFailed):  # already a line naming the server
            why = why.split(";", 1)[0]
        return ConnectionLost(
            f"lost the connection to {server} at {mask_url(url)}: gave up after "
            f"{seconds:.0f}s of retries (client.reconnect_timeout = "
            f"{settings.client.reconnect_timeout:g}): {why}"
        )

    return give_up


def outage(settings: Settings) -> Outage:
    """A retry window of `client.reconnect_timeout` seconds for one of the client's loops."""
    return Outage(settings.client.reconnect_timeout, lost_for_good(settings))


#: Seconds a durable publish keeps retrying a queue that does not take messages.
UNROUTABLE_RETRY_SECONDS = 60.0


def unroutable_retries(what: str) -> Iterator[float]:
    """Delays between retries of a durable publish no queue took, for at most
    UNROUTABLE_RETRY_SECONDS (then the iterator ends).

    Right after a RabbitMQ restart a durable queue or stream takes no messages for a moment
    (`rabbitmqctl start_app` returns before queues recover), and a publish to it is confirmed
    all the same and dropped: durable publishes are `mandatory`, so RabbitMQ returns them
    instead, and they are sent again.
    """
    deadline = time.monotonic() + UNROUTABLE_RETRY_SECONDS
    delay = 0.05
    while time.monotonic() < deadline:
        log.warning("publish_unroutable", queue=what, retry_in=delay)
        yield delay
        delay = min(delay * 2, 1.0)


def publish_routed(
    publish: Callable[[], None],
    queue: str,
    *,
    wanted: Callable[[], object] = lambda: True,
    pause: Callable[[float], None] = time.sleep,
    after_return: Callable[[], None] | None = None,
) -> bool:
    """Run `publish` (a `mandatory` publish to `queue`) until RabbitMQ routes it.

    While RabbitMQ returns it unroutable and `wanted()` says the queue should exist, it is
    sent again after the delays of `unroutable_retries`; past them the return is re-raised.
    False, with nothing sent, when `wanted()` says the queue is gone for good (a closed
    session, a purged client id). `after_return` runs before each retry (a kombu channel
    must be replaced: the returned publish's confirm is still on its way), and `pause` waits
    (a pika connection's `sleep` serves heartbeats meanwhile).
    """
    retries = unroutable_retries(queue)
    while True:
        try:
            publish()
            return True
        except Exception as e:
            if not is_unroutable_return(e):
                raise
            if not wanted():
                log.warning("publish_dropped", queue=queue, reason="queue deleted")
                return False
            delay = next(retries, None)
            if delay is None:
                raise
            if after_return is not None:
                after_return()
            pause(delay)


def close_quietly(connection: Connection) -> None:
    """Close a kombu connection whatever state it is in.

    kombu swallows errors from the AMQP close handshake (for instance after the server
    cancelled a consumer of a deleted queue) and then forgets the socket without closing it,
    so the underlying py-amqp connection is collected explicitly as well.
    """
    raw = getattr(connection, "_connection", None)  # not `.connection`: that reconnects
    try:
        connection.release()
    except Exception:
        with contextlib.suppress(Exception):
            connection.collect()
    if raw is not None:
        with contextlib.suppress(Exception):
            raw.collect()


def abandon(connection: Connection) -> None:
    """Close a kombu connection's socket without the AMQP close handshake: for a connection
    whose frames were cut mid-read (a Ctrl-C while a publish waited for its confirm), where
    the handshake would wait for a reply it cannot parse."""
    raw = getattr(connection, "_connection", None)
    with contextlib.suppress(Exception):
        connection.collect()
    if raw is not None:
        with contextlib.suppress(Exception):
            raw.collect()


def close_quietly_channel(channel: Any) -> None:
    """Close an AMQP channel, ignoring a connection or channel already gone."""
    with contextlib.suppress(Exception):
        channel.close()


def kombu_connection(settings: Settings, confirm: bool = False) -> Connection:
    """An open kombu connection to the first reachable AMQP URL (`;`-separated for failover).

    With `confirm`, every publish returns only once RabbitMQ has confirmed it.
    """
    conn = Connection(
        settings.amqp_urls,
        connect_timeout=settings.client.connect_timeout,
        heartbeat=0,
        ssl=kombu_ssl(settings),
        transport_options={"max_retries": 1, "confirm_publish": confirm},
    )
    try:
        conn.ensure_connection(max_retries=1, timeout=settings.client.connect_timeout)
    except Exception as e:
        conn.release()
        raise rabbitmq_unreachable(settings.amqp_url, e) from None
    return conn


def pika_connection(
    settings: Settings, name: str, heartbeat: int | None = None
) -> pika.BlockingConnection:
    """An open pika connection to the first reachable AMQP URL; `name` shows in RabbitMQ.

    `heartbeat=0` turns heartbeats off, for a connection that idles while a call runs.
    """
    last: BaseException | None = None
    for url in settings.amqp_urls:
        params = pika.URLParameters(url)
        params.ssl_options = pika_ssl_options(settings, url)
        params.client_properties = {"connection_name": name}
        params.socket_timeout = settings.client.connect_timeout
        params.blocked_connection_timeout = 300
        if heartbeat is not None:
            params.heartbeat = heartbeat
        try:
            return pika.BlockingConnection(params)
        except Exception as e:
            last = e
    assert last is not None
    raise rabbitmq_unreachable(settings.amqp_url, last)


def _driver_info() -> dict[str, Any]:
    """The client's name and version for CLIENT SETINFO, worked out once per process.

    redis-py 8 reads its own version from the package metadata (importlib.metadata, ~4 ms
    here) for every new connection unless it is given; older versions, which read it once
    at import, have no `driver_info` and need nothing.
    """
    global _DRIVER_INFO  # noqa: PLW0603 - a per-process cache
    if _DRIVER_INFO is None:
        try:
            from redis.driver_info import DriverInfo  # redis-py >= 7.1
        except ImportError:
            _DRIVER_INFO = {}
        else:
            _DRIVER_INFO = {"driver_info": DriverInfo(lib_version=redis.__version__)}
    return _DRIVER_INFO


_DRIVER_INFO: dict[str, Any] | None = None


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client that has answered a PING, or ConnectionFailed naming the URL (a
    `redis+sentinel://` URL: the master its Sentinels name, found again after a failover)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.client.connect_timeout,
        "health_check_interval": 30,
        "decode_responses": False,
        **redis_ssl_kwargs(settings),
        **_driver_info(),
    }
    try:
        client: redis.Redis
        if is_sentinel(settings.redis_url):
            url = parse_sentinel_url(settings.redis_url)
            sentinel = Sentinel(
                url.sentinels,
                sentinel_kwargs={"socket_connect_timeout": settings.client.connect_timeout},
            )
            client = sentinel.master_for(
                url.master, db=url.db, username=url.username, password=url.password, **options
            )
        else:
            client = redis.Redis.from_url(settings.redis_url, **options)
        client.ping()
    except (redis.RedisError, ValueError, OSError) as e:
        raise ConnectionFailed(
            f"cannot connect to Redis at {mask_url(settings.redis_url)}: {e}; {REDIS_HINT}"
        ) from None
    return client


def with_redis_account(settings: Settings, user: str, password: str) -> Settings:
    """`settings` logging in to Redis as `user` (a session's fenced account)."""
    parts = urlsplit(settings.redis_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return settings.replace(redis_url=urlunsplit(parts._replace(netloc=netloc)))


_PROCESS_REDIS: dict[tuple[str, float, TlsSettings], redis.Redis] = {}
_PROCESS_REDIS_LOCK = threading.Lock()
_PROCESS_REDIS_PID = os.getpid()


def process_redis_client(settings: Settings) -> redis.Redis:
    """This process's Redis client for `settings.redis_url`, made at the first call and
    shared by every session after it (each command borrows a pooled connection: 1,000 open
    sessions do not hold 1,000 connections, and a new session opens none). Each call checks
    it with a PING, so an unreachable Redis is the same ConnectionFailed as `redis_client`'s.
    """
    global _PROCESS_REDIS_PID  # noqa: PLW0603 - reset in a forked child
    key = (settings.redis_url, settings.client.connect_timeout, settings.tls)
    with _PROCESS_REDIS_LOCK:
        if os.getpid() != _PROCESS_REDIS_PID:  # forked: the parent's sockets are not ours
            _PROCESS_REDIS.clear()
            _PROCESS_REDIS_PID = os.getpid()
        client = _PROCESS_REDIS.get(key)
    if client is None:
        made = redis_client(settings)
        with _PROCESS_REDIS_LOCK:
            client = _PROCESS_REDIS.setdefault(key, made)
        if client is not made:  # another thread made one first
            made.close()
        return client
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        raise ConnectionFailed(
            f"cannot connect to Redis at {mask_url(settings.redis_url)}: {e}; {REDIS_HINT}"
        ) from None
    return client


class SharedRedis:
    """One Redis client (its connection pool) used by a session and its BrokerClients.

    A `Session` makes it; each `BrokerClient` of the session `share()`s it instead of
    opening a client of its own (a new client costs a TCP connect and three commands per
    connection), and each `release()`s it when it closes. An `owned` client's connections
    close with the last release, whichever closes last; the process's client
    (`process_redis_client`) stays open for the next session. redis-py clients are
    thread-safe (each command takes a pooled connection), so heartbeat, linger and reader
    threads share it.
    """

    def __init__(self, client: redis.Redis, owned: bool = True) -> None:
        """Hold `client` for its first user (the caller)."""
        self.client = client
        self.owned = owned
        self._users = 1
        self._lock = threading.Lock()

    def share(self) -> redis.Redis:
        """The client, for one more user (who must `release()` it)."""
        with self._lock:
            self._users += 1
        return self.client

    def release(self) -> None:
        """One user is done with it; the last one closes its connections. A client used
        again after that (a BrokerClient closed after its session) reconnects by itself."""
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last and self.owned:
            self.client.close()


class Opening(Generic[T]):
    """A connection opened on a thread of its own while the caller does something else
    (sends a control request): connecting costs round trips to a server, not CPU, so the two
    overlap. `result()` waits for it and returns it (or raises what opening raised);
    `discard()` closes it, without waiting, if nobody took it."""

    def __init__(self, open_: Callable[[], T], close: Callable[[T], None], name: str) -> None:
        """Start opening with `open_()`; `close(it)` is how a discarded one is closed."""
        self._open, self._close = open_, close
        self._lock = threading.Lock()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._discarded = self._taken = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            value = self._open()
        except BaseException as e:  # the caller's result() raises it
            self._error = e
            return
        with self._lock:
            self._value = value
            discarded = self._discarded
        if discarded:
            self._close(value)

    def result(self) -> T:
        """The open connection, now the caller's (ConnectionFailed and the like as
        opening raised them)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        self._taken = True
        return self._value

    def discard(self) -> None:
        """Close the connection unless `result()` handed it out (at once if it is open
        already, else as soon as it is)."""
        with self._lock:
            if self._taken or self._discarded:
                return
            self._discarded = True
            value = self._value
        if value is not None:
            self._close(value)
