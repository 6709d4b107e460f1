"""RPC to the broker daemon's session service over AMQP (the control path)."""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Protocol

from kombu import Connection, Consumer, Producer, Queue
from kombu.message import Message

from soafarm import errors
from soafarm.config import Settings, mask_url
from soafarm.errors import (
    BrokerNoAnswer,
    BrokerUnavailable,
    ConnectionFailed,
    DecodeError,
    SoafarmError,
)
from soafarm.names import Names
from soafarm.protocol import CONTENT_TYPE, ControlReply, ControlRequest, decode, encode
from soafarm.state.control import ControlCall, R, decode_request
from soafarm.transport.connections import close_quietly, kombu_connection, reporting_lost_connection
from soafarm.transport.identity import own_user
from soafarm.transport.topology import control_queue

#: Control operations safe to send twice.
IDEMPOTENT_OPS = frozenset(
    {"get", "list", "hosts", "ping", "attach_client", "templates", "host_action"}
)

#: RabbitMQ's pseudo-queue for RPC replies: consumed (no-ack) and named as `reply_to` on the
#: same channel, the reply is delivered to that consumer without any queue.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def _error_class(name: str) -> type[SoafarmError]:
    """Map an error name from the wire to a SoafarmError subclass (allow-list, never eval)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, SoafarmError) and cls is not errors.ServiceFault:
        return cls
    return SoafarmError


class ControlClient:
    """A connection to the broker daemon: `request(args)` returns its typed reply or raises
    the broker's error (`call(op, **params)` the same as plain data)."""

    def __init__(self, settings: Settings) -> None:
        """Connect to RabbitMQ (ConnectionFailed if unreachable) and open a reply queue."""
        self.settings = settings
        self.names = Names(settings.namespace)
        self.creator = f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}"
        #: The RabbitMQ user this client is (each request carries it as `user_id`, which
        #: RabbitMQ checks, and the broker daemon takes as the caller).
        self.user = own_user(settings)
        self.replies: dict[str, bytes] = {}
        self._open()

    def _open(self) -> None:
        self.connection: Connection = kombu_connection(self.settings)
        self.channel = self.connection.channel()
        # RabbitMQ's direct reply-to: replies come straight to this channel's consumer, with
        # no reply queue to declare (a queue declare costs ~5 ms of RabbitMQ's time, and its
        # delete as much again when the connection closes)
        self.reply_queue = Queue(DIRECT_REPLY_TO, no_declare=True, channel=self.channel)
        self.consumer = Consumer(
            self.channel,
            queues=[self.reply_queue],
            on_message=self._on_reply,
            no_ack=True,  # direct reply-to requires it
            accept=[CONTENT_TYPE],
            auto_declare=False,
        )
        self.consumer.consume()
        self.producer = Producer(self.channel, auto_declare=False)

    def _on_reply(self, message: Message) -> None:
        self.replies[message.properties.get("correlation_id", "")] = message.body

    def _broker_consumers(self) -> int:
        # passive: a read-only command must not create the control queue of a namespace no
        # broker serves (or one `soafarm namespace delete` just removed)
        spec = control_queue(self.names)
        try:
            _name, _count, consumers = self.channel.queue_declare(queue=spec.name, passive=True)
        except self.connection.channel_errors:
            # no such queue, so no broker; the 404 closed our channel: start afresh
            close_quietly(self.connection)
            self._open()
            return 0
        return int(consumers)

    def call(self, op: str, timeout: float | None = None, **params: Any) -> Any:
        """Send control request `op` with `params`; return its reply as plain data.

        The untyped form of `request` (the CLI prints replies as JSON): the arguments are
        checked here as the broker daemon would check them, and the reply before it is
        returned.
        """
        args: ControlCall[Any] = decode_request(ControlRequest(op, params))
        return self.request(args, timeout).to_wire()

    def request(self, args: ControlCall[R], timeout: float | None = None) -> R:
        """Send a typed control request; wait for the broker's reply up to `timeout` seconds.

        Read-only requests are retried once on a fresh connection if RabbitMQ dropped this one
        (it restarted, say): a long-lived session keeps working.
        """
        try:
            result = self._call(args.envelope(), timeout)
        except ConnectionFailed:
            if args.op not in IDEMPOTENT_OPS:
                raise
            close_quietly(self.connection)
            self._open()
            result = self._call(args.envelope(), timeout)
        return args.decode_reply(result)

    def _call(self, request: ControlRequest, timeout: float | None) -> Any:
        op = request.op
        timeout = self.settings.client.control_timeout if timeout is None else timeout
        where = f"on queue {self.names.control_queue} at {mask_url(self.settings.amqp_urls[0])}"
        hint = "start one with `soafarm broker` or `soafarm up`"
        try:
            consumers = self._broker_consumers()
        except self.connection.connection_errors:
            # dropped while idle (RabbitMQ restarted): nothing was sent yet, so reconnect
            close_quietly(self.connection)
            self._open()
            consumers = self._broker_consumers()
        with reporting_lost_connection(self.connection, self.settings.amqp_url):
            if consumers == 0:
                raise BrokerUnavailable(f"no broker daemon is running {where}; {hint}")
            corr = uuid.uuid4().hex
            self.producer.publish(
                encode(request),
                # its exchange, not the default one: a user may publish to this and to the
                # request exchange only (docs/security.md)
                routing_key=self.names.control_queue,
                exchange=self.names.control_exchange,
                content_type=CONTENT_TYPE,
                content_encoding="binary",
                reply_to=self.reply_queue.name,
                correlation_id=corr,
                user_id=self.user,
                delivery_mode=1,
            )
            deadline = time.monotonic() + timeout
            while corr not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerNoAnswer(
                        f"the broker daemon did not answer {op!r} within {timeout:g}s {where}; "
                        f"is it overloaded or stuck? check its log, or {hint}"
                    )
                try:
                    self.connection.drain_events(timeout=min(left, 1.0))
                except TimeoutError:
                    continue
        reply = decode(self.replies.pop(corr), self.settings.max_message_bytes)
        if not isinstance(reply, ControlReply):
            raise DecodeError(f"expected a control reply, got {type(reply).__name__}")
        if not reply.ok:
            raise _error_class(reply.error_type)(reply.error)
        return reply.result

    def close(self) -> None:
        """Close the connection (the reply queue goes with it)."""
        close_quietly(self.connection)  # a dead connection must not mask the caller's error


class Control(Protocol):
    """What a session sends its control requests through: a `ControlClient` of its own, or
    a `PooledControl` (`Session.create`'s)."""

    settings: Settings
    #: This process's token on the sessions it creates (closed by `close_owned` if the
    #: broker's answer was lost).
    creator: str

    def request(self, args: ControlCall[R], timeout: float | None = None) -> R:
        """Send a typed control request; its reply or the broker's error."""
        ...

    def call(self, op: str, timeout: float | None = None, **params: Any) -> Any:
        """Send control request `op`; its reply as plain data."""
        ...

    def close(self) -> None:
        """Release what it holds."""
        ...


#: Idle control connections the pool keeps per settings (more are opened while more
#: requests run at once, and closed when they come back), and in all: a process that uses
#: many settings (a test suite, a namespace each) keeps those used last.
POOL_IDLE = 4
POOL_IDLE_TOTAL = 8


class _ControlPool:
    """The process's idle control connections, per settings. A connection is lent to one
    request at a time, so a session holds none between requests (1,000 open sessions do
    not hold 1,000 connections), and a create or close does not open one (~5 ms each)."""

    def __init__(self) -> None:
        # least recently given back first
        self._idle: OrderedDict[Settings, list[ControlClient]] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self, settings: Settings) -> ControlClient:
        """An idle connection for `settings`, or a new one (ConnectionFailed if RabbitMQ
        cannot be reached)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle, self._pid = OrderedDict(), os.getpid()
            idle = self._idle.get(settings)
            control = idle.pop() if idle else None
            if idle == []:
                del self._idle[settings]
        if control is None:
            return ControlClient(settings)
        control.replies.clear()  # answers to requests that gave up waiting
        return control

    def give(self, control: ControlClient, reusable: bool) -> None:
        """Take back a connection after a request (closed unless `reusable`)."""
        evicted: list[ControlClient] = [control]
        if reusable:
            with self._lock:
                idle = self._idle.setdefault(control.settings, [])
                self._idle.move_to_end(control.settings)
                if self._pid == os.getpid() and len(idle) < POOL_IDLE:
                    idle.append(control)
                    evicted = self._over_total()
        for old in evicted:
            old.close()

    def _over_total(self) -> list[ControlClient]:
        """Take the idle connections beyond POOL_IDLE_TOTAL out, the least recently used
        settings' first (under the lock; the caller closes them)."""
        out: list[ControlClient] = []
        while sum(len(v) for v in self._idle.values()) > POOL_IDLE_TOTAL:
            settings, idle = next(iter(self._idle.items()))
            out.append(idle.pop(0))
            if not idle:
                del self._idle[settings]
        return out

    def close_all(self) -> None:
        """Close every idle connection (at exit)."""
        with self._lock:
            idle, self._idle = self._idle, OrderedDict()
        for controls in idle.values():
            for control in controls:
                control.close()


_POOL = _ControlPool()
atexit.register(_POOL.close_all)


class PooledControl:
    """A session's control requests, each sent on a connection borrowed from the process's
    pool for its duration. Thread-safe: requests made at once borrow a connection each.

    A connection comes back to the pool after an answer (the broker's error included) or
    after the broker did not answer in time; after a lost connection or an unexpected error
    it is closed, and the next request opens a new one, as a session's own connection
    would be reopened.
    """

    def __init__(self, settings: Settings) -> None:
        """Requests for the broker daemons of `settings.namespace`; connects on first use."""
        self.settings = settings
        self.names = Names(settings.namespace)
        self.creator = f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}"

    def request(self, args: ControlCall[R], timeout: float | None = None) -> R:
        """`ControlClient.request` on a borrowed connection."""
        control = _POOL.take(self.settings)
        reusable = False
        try:
            result = control.request(args, timeout)
            reusable = True
            return result
        except SoafarmError as e:  # the broker answered, or did not in time: still usable
            reusable = not isinstance(e, ConnectionFailed)
            raise
        finally:
            _POOL.give(control, reusable)

    def call(self, op: str, timeout: float | None = None, **params: Any) -> Any:
        """`ControlClient.call` on a borrowed connection."""
        args: ControlCall[Any] = decode_request(ControlRequest(op, params))
        return self.request(args, timeout).to_wire()

    def close(self) -> None:
        """Nothing to release: no connection is held between requests."""
