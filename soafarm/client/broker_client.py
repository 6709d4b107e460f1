"""BrokerClient: send requests to a session and get their responses back.

Requests are buffered and sent together as one AMQP message (a batch) when the buffer holds
`client.request_batch_size` requests, would pass `max_message_bytes`, or on `flush()`,
`end_requests()` and `get_responses()`. Each request keeps its own id and user data, and each
response is delivered to the caller exactly once, even if an instance ran it twice.

In a durable session a request id is its position in the client id's batch: `flush()`
returns only once RabbitMQ has confirmed the requests, and a client that reattaches continues
from `accepted`, so a request sent again after a crash keeps its id and is answered once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

import amqp.exceptions
from kombu import Consumer, Producer, Queue
from kombu.message import Message

from soafarm.client.heartbeat import Heartbeat
from soafarm.client.reader import Bitmap, StreamReader, StreamTarget
from soafarm.client.session import Session
from soafarm.client.throttle import Throttle
from soafarm.errors import (
    DecodeError,
    ResponseTimeout,
    SessionClosed,
    SessionError,
    SessionFailed,
)
from soafarm.names import Names, check_client_id
from soafarm.protocol import (
    BATCH_HEADER_ALLOWANCE,
    CONTENT_TYPE,
    Request,
    Response,
    ResponseBatch,
    decode,
    encode_request,
    encode_request_batch,
)
from soafarm.state.clients import ClientProgress, ProgressStore
from soafarm.state.records import SessionRecord
from soafarm.transport.connections import (
    NO_ROUTE,
    UNROUTABLE_RETRY_SECONDS,
    close_quietly,
    kombu_connection,
    redis_client,
    reporting_lost_connection,
    unroutable_retries,
)

RESPONSE_PREFETCH = 64
#: Seconds between writes of the confirmed-request count to Redis (and at seal and close).
ACCEPTED_RECORD_INTERVAL = 0.2
#: kombu's retry policy for durable publishes: rides out a RabbitMQ restart of ~a minute.
DURABLE_RETRY_POLICY = {
    "max_retries": 60,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 2.0,
}


class BrokerClient:
    """One client id's batch of requests in a session, and its responses."""

    def __init__(self, session: Session, client_id: str = "default") -> None:
        """Attach `client_id` to the session (its response queue is declared by the broker).

        In a durable session, attaching an existing client id resumes it: `accepted` requests
        are already in, and the next `send_request` gets id `accepted`.
        """
        self.session = session
        self.settings = session.settings
        self.client_id = check_client_id(client_id)
        info = session.control.call(
            "attach_client", session_id=session.id, client_id=self.client_id
        )
        self.request_queue: str = info["request_queue"]
        self.response_queue: str = info["response_queue"]
        self.durable: bool = bool(info.get("durable", False))
        self.closed_session = info.get("state") == "closed"
        self._names = Names(self.settings.namespace)
        self.progress = ProgressStore(
            redis_client(self.settings), self._names, session.id, client_id
        )
        start = self.progress.load()
        self.heartbeat = Heartbeat(
            self.progress.r,
            self._names.session_handles_key(session.id),
            float(session.record.get("broker_settings", {}).get("client_idle_timeout", 300.0)),
            "client",
        )
        self.throttle = Throttle(
            self.progress,
            self._names,
            session.id,
            session.record.get("broker_settings", {}),
            self.settings.client.throttle_timeout,
        )
        self.connection = kombu_connection(self.settings, confirm=self.durable)
        self.channel = self.connection.channel()
        self.producer = Producer(self.channel)
        self._buffer: list[bytes] = []
        self._buffer_bytes = 0
        self._next_id = start.accepted if self.durable else 0
        self._sent_here = 0
        self._recorded_at = 0.0
        self._recorded = -1  # the accepted count last recorded
        # interactive: which of this client's requests have been answered (bit N = id N)
        self._received = Bitmap()
        self._lock = threading.Lock()
        self._ready: deque[Response] = deque()
        self._sealed = start.sealed
        self._consumer: Consumer | None = None
        self._handler_thread: threading.Thread | None = None
        self._reader: StreamReader | None = None
        self._stop = threading.Event()
        self.duplicates = 0

    # --- sending --------------------------------------------------------------------------
    def send_request(self, op: str, *args: Any, user_data: Any = None, **kwargs: Any) -> int:
        """Queue a call of operation `op`; returns the request id.

        Raises EncodeError / MessageTooLarge at once (nothing is sent) if the request cannot
        be encoded or is over `max_message_bytes`.
        """
        if self.closed_session:
            raise SessionClosed(f"session {self.session.id} is closed: it takes no requests")
        if self._sealed:
            raise SessionError(
                f"client id {self.client_id!r} is sealed (end_requests() was called)"
            )
        limit = self.settings.max_message_bytes
        body = encode_request(Request(self._next_id, op, args, kwargs, user_data), limit)
        if self._buffer and self._buffer_bytes + len(body) > limit - BATCH_HEADER_ALLOWANCE:
            self.flush()
        request_id = self._next_id
        self._next_id += 1
        self._buffer.append(body)
        self._buffer_bytes += len(body)
        if len(self._buffer) >= self.settings.client.request_batch_size:
            self.flush()
        return request_id

    def flush(self) -> None:
        """Send the buffered requests now, as one message; in a durable session, return once
        RabbitMQ has confirmed them."""
        if not self._buffer:
            return
        self.throttle.wait(self._next_id - len(self._buffer))  # what is already published
        body = encode_request_batch(
            self.session.id, self.client_id, self.response_queue, self._buffer
        )
        options: dict[str, Any] = {"delivery_mode": 1}
        if self.durable:
            # a retried publish may duplicate the batch: same ids, answered once
            options = {"delivery_mode": 2, "retry": True, "retry_policy": DURABLE_RETRY_POLICY}
        self._publish(body, options)
        self._sent_here += len(self._buffer)
        self._buffer = []
        self._buffer_bytes = 0
        self._record_accepted()

    def _publish(self, body: bytes, options: dict[str, Any]) -> None:
        """Publish one batch; a durable one is `mandatory` and sent again while RabbitMQ
        returns it (see `unroutable_retries`)."""
        retries = unroutable_retries(self.request_queue)
        while True:
            try:
                with reporting_lost_connection(self.connection, self.settings.amqp_url):
                    self.producer.publish(
                        body,
                        routing_key=self.request_queue,
                        exchange="",
                        content_type=CONTENT_TYPE,
                        content_encoding="binary",
                        mandatory=self.durable,
                        **options,
                    )
                return
            except amqp.exceptions.ChannelError as e:
                if getattr(e, "reply_code", None) != NO_ROUTE:
                    raise
                # the return came before the publish's confirm, which is still on its way:
                # a fresh channel, or that confirm would be taken for the next publish's
                with contextlib.suppress(Exception):
                    self.channel.close()
                self.channel = self.connection.channel()
                self.producer = Producer(self.channel)
                delay = next(retries, None)
                if delay is None:
                    raise SessionError(
                        f"RabbitMQ has no queue {self.request_queue} to take requests after "
                        f"{UNROUTABLE_RETRY_SECONDS:g}s; was session {self.session.id} closed?"
                    ) from None
                time.sleep(delay)

    def _record_accepted(self) -> None:
        """Record the accepted count in Redis, at most every ACCEPTED_RECORD_INTERVAL."""
        now = time.monotonic()
        if self._recorded != self._next_id and now - self._recorded_at >= ACCEPTED_RECORD_INTERVAL:
            # a Redis write per flush would cost more than the flush; a lagging count only
            # means a resumed client re-sends a few requests (which keep their ids) and the
            # autoscaler sees the work up to 0.2 s late
            self.progress.record_accepted(self._next_id)
            self._recorded, self._recorded_at = self._next_id, now

    def end_requests(self) -> None:
        """Send what is buffered and seal the batch: it has exactly `sent` requests."""
        self.flush()
        self.progress.seal(self._next_id)
        self._sealed = True

    @property
    def sent(self) -> int:
        """Requests of this client id sent so far (in a durable session, across reattaches)."""
        return self._next_id

    @property
    def outstanding(self) -> int:
        """Requests sent whose response has not been received yet (this process's view)."""
        with self._lock:
            return self._next_id - self._received.count

    def status(self) -> ClientProgress:
        """Progress of this client id from the farm's counters: accepted, done, faulted..."""
        return self.progress.load()

    def purge(self) -> None:
        """Delete this client id's responses and counters (the session goes on)."""
        self.session.control.call(
            "purge_client", session_id=self.session.id, client_id=self.client_id
        )

    # --- receiving ------------------------------------------------------------------------
    def get_responses(
        self, timeout: float | None = None, new_only: bool = False, available_only: bool = False
    ) -> Iterator[Response]:
        """Yield responses, each once, in arrival order; ends when the batch is complete.

        Complete means: every request of the sealed batch answered, or (before end_requests)
        every request this client sent. A durable client id can be read again after any
        reattach: all responses, or with `new_only` those no reader has handed out yet.
        `available_only` ends once the responses that exist now are read (`soafarm
        responses` without --follow). `timeout` is how many seconds to wait for the next
        response before raising ResponseTimeout (None waits forever). Sends anything still
        buffered first.
        """
        if self._handler_thread is not None:
            raise SessionError("a response handler is set; get_responses() cannot be used too")
        self.flush()
        until_done = self.progress.load().done if available_only else None
        if self.durable:
            yield from self._stream_reader().responses(
                timeout,
                new_only,
                StreamTarget(
                    sent_here=self._next_id if self._sent_here else 0, until_done=until_done
                ),
            )
            return
        if not self._sent_here:  # reading another process's interactive batch (the CLI)
            yield from self._read_others(timeout, until_done)
            return
        while True:
            while self._ready:
                yield self._ready.popleft()
            if not self.outstanding:
                return
            if not self._sealed:  # the last flushes' count, for the autoscaler
                self._record_accepted()
            with reporting_lost_connection(self.connection, self.settings.amqp_url):
                self._consume()
                self._wait(timeout)

    def _read_others(self, timeout: float | None, until_done: int | None) -> Iterator[Response]:
        """Consume an interactive response queue this client did not send to: each id once,
        until the sealed total (or `until_done` distinct responses) has been read."""
        seen = Bitmap()
        last = time.monotonic()
        with reporting_lost_connection(self.connection, self.settings.amqp_url):
            self._consume()
            while True:
                meta = self.progress.load()
                goal = (
                    until_done if until_done is not None else (meta.total if meta.sealed else None)
                )
                if goal is not None and seen.count >= goal:
                    return
                if timeout is not None and time.monotonic() - last > timeout:
                    raise ResponseTimeout(
                        f"no response for {timeout:g}s; {meta.done} of {meta.accepted} "
                        f"requests answered; {self._describe()}"
                    )
                try:
                    self.connection.drain_events(timeout=0.5)
                except TimeoutError:
                    self._check_session()
                while self._ready:
                    response = self._ready.popleft()
                    if seen.add(response.id):
                        last = time.monotonic()
                        yield response

    def _stream_reader(self) -> StreamReader:
        """This client's cursor over its response stream (made on first use)."""
        if self._reader is None:
            self._reader = StreamReader(
                self.settings,
                self.response_queue,
                self.progress,
                self._describe,
                self._check_session,
            )
        return self._reader

    def _check_session(self) -> None:
        """Raise if the session failed or was closed while this client waits for it."""
        raw = self.progress.r.get(self._names.session_key(self.session.id))
        if raw is None:
            raise SessionClosed(f"session {self.session.id} was closed while waiting")
        record = SessionRecord.from_json(raw)
        if record.state == "failed":
            raise SessionFailed(f"session {self.session.id} failed: {record.error}")

    def _describe(self) -> str:
        try:
            status = self.session.status()
        except Exception as e:  # the timeout is the error to report; status is a hint
            return f"session status unavailable ({e})"
        where = f"session {self.session.id} has {len(status['instances'])} service instance(s)"
        for host, why in sorted(status.get("load_errors", {}).items())[:1]:
            where += f"; the service failed to load on {host}: {why}"
        return where + "; are worker hosts running (`soafarm hosts`)?"

    def _accept(self, body: bytes) -> list[Response]:
        """Decode a response batch and keep only first-seen responses of this client."""
        batch = decode(body, self.settings.max_message_bytes)
        if not isinstance(batch, ResponseBatch):
            raise DecodeError(f"expected a response batch, got {type(batch).__name__}")
        if not self._sent_here:
            return list(batch.responses)  # not our requests: _read_others de-duplicates
        fresh = []
        with self._lock:
            for response in batch.responses:
                if response.id < self._next_id and self._received.add(response.id):
                    fresh.append(response)
                else:
                    self.duplicates += 1
        return fresh

    def _on_message(self, message: Message) -> None:
        self._ready.extend(self._accept(message.body))

    def _consume(self) -> None:
        if self._consumer is None:
            # auto-ack: an interactive session's responses live only as long as its client
            # anyway (DESIGN.md), and an ack frame per batch is on the latency path
            self._consumer = Consumer(
                self.channel,
                queues=[Queue(self.response_queue, no_declare=True)],
                on_message=self._on_message,
                accept=[CONTENT_TYPE],
                no_ack=True,
            )
            self._consumer.consume()

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                meta = self.progress.load()
                raise ResponseTimeout(
                    f"no response for {timeout:g}s; {meta.outstanding} of {meta.accepted} "
                    f"requests still outstanding; {self._describe()}"
                )
            try:
                self.connection.drain_events(timeout=min(left, 1.0))
            except TimeoutError:
                self._check_session()

    def set_response_handler(self, callback: Callable[[Response], None]) -> None:
        """Call `callback(response)` for each response, on a background thread of its own.

        Exceptions in the callback stop the handler; `close()` stops it too.
        """
        if self._handler_thread is not None or self._consumer is not None:
            raise SessionError("responses are already being received by this client")
        self.flush()
        target = self._handle_stream if self.durable else self._handle_queue
        self._handler_thread = threading.Thread(
            target=target, args=(callback,), name="responses", daemon=True
        )
        self._handler_thread.start()

    def _handle_stream(self, callback: Callable[[Response], None]) -> None:
        for response in self._stream_reader().responses(None, stop=self._stop):
            callback(response)

    def _handle_queue(self, callback: Callable[[Response], None]) -> None:
        def on_message(message: Message) -> None:
            for response in self._accept(message.body):
                callback(response)
            message.ack()

        with kombu_connection(self.settings) as connection:
            consumer = Consumer(
                connection.channel(),
                queues=[Queue(self.response_queue, no_declare=True)],
                on_message=on_message,
                accept=[CONTENT_TYPE],
                prefetch_count=RESPONSE_PREFETCH,
            )
            with consumer:
                while not self._stop.is_set():
                    try:
                        connection.drain_events(timeout=0.2)
                    except TimeoutError:
                        continue

    def close(self, discard: bool = False) -> None:
        """Send what is buffered (or with `discard`, drop it) and release the connection; the
        session stays open."""
        if discard:
            self._buffer, self._buffer_bytes = [], 0
        try:
            self.flush()
            if self._sent_here and not self._sealed:
                self.progress.record_accepted(self._next_id)
        finally:
            self._stop.set()
            self.heartbeat.stop()
            if self._handler_thread is not None:
                self._handler_thread.join(timeout=5)
            if self._reader is not None:
                self._reader.close()
            close_quietly(self.connection)
            self.progress.r.close()

    def __enter__(self) -> Self:
        """Use as a context manager: the client closes on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client."""
        self.close()
