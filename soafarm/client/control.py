"""RPC to the broker daemon's session service over AMQP (the control path)."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

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
from soafarm.transport.topology import control_queue

#: Control operations safe to send twice.
IDEMPOTENT_OPS = frozenset({"get", "list", "hosts", "ping", "attach_client"})


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
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}"
        self.replies: dict[str, bytes] = {}
        self._open()

    def _open(self) -> None:
        self.connection: Connection = kombu_connection(self.settings)
        self.channel = self.connection.channel()
        self.reply_queue = Queue(
            f"{self.settings.namespace}.reply.{uuid.uuid4().hex}",
            exclusive=True,
            auto_delete=True,
            channel=self.channel,
        )
        self.reply_queue.declare()
        self.consumer = Consumer(
            self.channel,
            queues=[self.reply_queue],
            on_message=self._on_reply,
            no_ack=True,
            accept=[CONTENT_TYPE],
        )
        self.consumer.consume()
        self.producer = Producer(self.channel)

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
                routing_key=self.names.control_queue,
                exchange="",
                content_type=CONTENT_TYPE,
                content_encoding="binary",
                reply_to=self.reply_queue.name,
                correlation_id=corr,
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
