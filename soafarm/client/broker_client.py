"""BrokerClient: send requests to a session and get their responses back.

The client is two halves and a thread: the send side (`client.sender`: the buffer, batches,
linger, throttling, `accepted`), the one receive path its session's kind calls for
(`client.queue_reader` or `client.reader`, each response handed out once), and the linger
thread (`client.linger`) that runs what either half left due. Each request keeps its own id
and user data, and each response is delivered to the caller exactly once, even if an
instance ran it twice.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

import structlog
from kombu import Connection

from soafarm.client.heartbeat import Heartbeat, IdleGuard
from soafarm.client.inbox import Authors, QueueInbox, StreamInbox
from soafarm.client.linger import Linger
from soafarm.client.queue_reader import COMMIT_INTERVAL, QueueReader
from soafarm.client.reader import Bitmap, Receiver, StreamReader, StreamTarget
from soafarm.client.sender import RequestSender
from soafarm.client.session import Session
from soafarm.client.throttle import Throttle, UnreadBound
from soafarm.errors import (
    BrokerUnavailable,
    ConnectionFailed,
    ResponseHandlerError,
    SessionClosed,
    SessionError,
    SessionFailed,
)
from soafarm.names import Names, check_client_id
from soafarm.protocol import (
    Response,
)
from soafarm.state.clients import ClientProgress, ProgressStore
from soafarm.state.control import AttachClientArgs, Attached, GetArgs
from soafarm.state.records import SessionState
from soafarm.state.sessions import SessionStore
from soafarm.transport.backoff import Outage
from soafarm.transport.connections import Opening, close_quietly, kombu_connection, outage
from soafarm.transport.errors import REDIS_LOST
from soafarm.transport.identity import own_user

log = structlog.get_logger(__name__)

#: Seconds a client that found its interactive session's queue gone waits for the broker to
#: fail the session with its reason, before raising its own.
VERDICT_WAIT = 5.0


class BrokerClient:
    """One client id's batch of requests in a session, and its responses."""

    def __init__(self, session: Session, client_id: str = "default", create: bool = True) -> None:
        """Attach `client_id` to the session (its response queue is declared by the broker).

        In a durable session, attaching an existing client id resumes it: `accepted` requests
        are already in, and the next `send_request` gets id `accepted`. With `create=False`
        (a reader that only collects) the client id must exist already, and nothing is
        declared: reading never creates queues or counters.
        """
        self.session = session
        self.settings = session.settings
        self.client_id = check_client_id(client_id)
        # the sender's connection opens while the broker attaches the client id
        publishing = Opening(
            lambda: kombu_connection(self.settings, confirm=session.durable),
            close_quietly,
            "connect-sender",
        )
        try:
            attached = session.control.request(
                AttachClientArgs(session.id, self.client_id, create=create)
            )
        except BaseException:
            publishing.discard()
            raise
        try:
            self._start(session, client_id, attached, publishing)
        except BaseException:
            publishing.discard()
            raise

    def _start(
        self, session: Session, client_id: str, attached: Attached, publishing: Opening[Connection]
    ) -> None:
        """The rest of `__init__`, once the client id is attached (`publishing`: the sender's
        connection, opening)."""
        self.request_queue = attached.request_queue
        self.response_queue = attached.response_queue
        self.durable = attached.durable
        self._responders = attached.responders
        self._request_route = (attached.request_exchange, attached.request_key)
        self._return_route = (attached.request_exchange, attached.return_key)
        self.closed_session = attached.state == SessionState.CLOSED
        self._names = Names(self.settings.namespace)
        # the session's Redis client, not one of its own: a new client costs a TCP
        # connect and a handshake on the path from create to the first response
        self._redis = session.redis
        state = self._redis.share()
        self._released = False
        try:
            self.progress = ProgressStore(state, self._names, session.id, client_id)
            self.sessions = SessionStore(state, self._names)
            # through a Redis outage as every later read (the attach went through the
            # broker; Redis may go in between), never a raw redis error
            start = self._load()
            broker = session.broker_settings
            self.idle = IdleGuard(self.progress, session.id, client_id, broker.client_idle_timeout)
            # its first beat clears a previous idle disconnection of this client id
            self.heartbeat = Heartbeat(
                self.sessions, session.id, broker.client_idle_timeout, "client", self.idle
            )
        except BaseException:
            self._released = True
            self._redis.release()
            raise
        try:
            self._start_sender(session, start, publishing)
        except BaseException:
            self.heartbeat.stop()
            self._released = True
            self._redis.release()
            raise

    def _start_sender(
        self, session: Session, start: ClientProgress, publishing: Opening[Connection]
    ) -> None:
        """The send side and the receive path (the rest of `__init__`)."""
        broker = session.broker_settings
        if self.durable == session.durable:
            connection: Connection | None = publishing.result()
        else:  # the session's record says otherwise: the sender connects as it says
            publishing.discard()
            connection = None
        self.sender = RequestSender(
            self.settings,
            connection=connection,
            session_id=session.id,
            client_id=self.client_id,
            queues=(self.request_queue, self.response_queue),
            route=(self._request_route if self._request_route[0] else None),
            durable=self.durable,
            progress=self.progress,
            throttle=Throttle(
                self.progress,
                broker,
                self.settings.client.throttle_timeout,
                outage=self._outage(),
                unread=None if self.durable else self._unread_bound(),
                check_session=self._check_session,
            ),
            start=start,
            wake=self._wake,
            session_lost=self._session_lost,
            idle=self.idle,
        )
        self._linger: Linger | None = None
        self._handler_error: BaseException | None = None
        self._handler_thread: threading.Thread | None = None
        # the one receive path, chosen by the session's kind (it connects on first use)
        self.receiver: Receiver
        #: Drops response batches not published by the farm (counted in `forged`).
        self.authors = Authors(self._responders, own_user(self.settings))
        if self.durable:
            self.receiver = StreamReader(
                StreamInbox(self.settings, self.response_queue, self.authors),
                self.progress,
                self.settings.max_message_bytes,
                self._describe,
                self._check_session,
                outage=self._outage,
            )
        else:
            self.receiver = QueueReader(
                QueueInbox(
                    self.settings,
                    self.response_queue,
                    missing=lambda: self._session_lost("response queue"),
                    authors=self.authors,
                    give_back_to=self._return_route if self._return_route[0] else None,
                ),
                max_bytes=self.settings.max_message_bytes,
                progress=self.progress,
                describe=self._describe,
                check=self._check_session,
                outage=self._outage,
            )
        self._receiving = False  # get_responses or a handler has started
        self._reading_now = 0  # get_responses() iterations under way
        self._stop = threading.Event()

    def _unread_bound(self) -> UnreadBound:
        """What an interactive client id has sent and not read back: bounded."""
        return UnreadBound(
            limit=self.settings.client.max_unread_responses,
            read_here=lambda: self.receiver.seen.count,
            read_anywhere=lambda: Bitmap(self.progress.read_bitmap()).count,
            reading=self._reading,
        )

    def _reading(self) -> bool:
        """True while a response handler runs or a get_responses() is under way."""
        handler = self._handler_thread
        return self._reading_now > 0 or (handler is not None and handler.is_alive())

    def _outage(self) -> Outage:
        """A retry window of `client.reconnect_timeout` for one server of one loop."""
        return outage(self.settings)

    # --- sending --------------------------------------------------------------------------
    def send_request(self, op: str, *args: Any, user_data: Any = None, **kwargs: Any) -> int:
        """Queue a call of operation `op`; returns the request id.

        The request leaves with others when the buffer fills, on flush(), or `client.linger`
        seconds later at most. Raises EncodeError / MessageTooLarge at once (nothing is sent)
        if the request cannot be encoded or is over `max_message_bytes`.
        """
        if self.closed_session:
            raise SessionClosed(f"session {self.session.id} is closed: it takes no requests")
        return self.sender.send(op, args, kwargs, user_data)

    def flush(self) -> None:
        """Send the buffered requests now, as one message; in a durable session, return once
        RabbitMQ has confirmed them."""
        self.sender.flush()

    def end_requests(self) -> None:
        """Send what is buffered and seal the batch: it has exactly `sent` requests."""
        self.sender.seal()

    def on_throttled(self, callback: Callable[[int], None]) -> None:
        """Call `callback(outstanding)` while a send waits for the session's outstanding
        requests to fall below `message_throttle_stop_threshold`, and `callback(0)` when it
        goes on (for progress displays)."""
        self.sender.throttle.on_wait = callback

    @property
    def sent(self) -> int:
        """Requests of this client id sent so far (in a durable session, across reattaches)."""
        return self.sender.next_id

    def _wake(self, at: float) -> None:
        """Have the linger thread (started on first use) run what is due at `at`."""
        if self._linger is None:
            self._linger = Linger(self._on_linger, f"linger-{self.client_id}")
        self._linger.arm(at)

    def _on_linger(self) -> None:
        """On the linger thread: what is due of the sends and of the reader's commits."""
        self.sender.on_linger()
        commit_at = self.receiver.commit_due()
        if commit_at is None:
            return
        if time.monotonic() < commit_at:
            self._wake(commit_at)  # one commit per COMMIT_INTERVAL at most
            return
        try:
            self.receiver.commit_pending()
        except Exception as e:  # the reader commits again at its next read or close
            log.warning("response_commit_failed", error=repr(e))

    @property
    def outstanding(self) -> int:
        """Requests sent whose response has not been received yet (this process's view)."""
        return self.sender.next_id - self.receiver.seen.count

    @property
    def duplicates(self) -> int:
        """Responses received again and dropped (a request an instance ran twice)."""
        return self.receiver.duplicates

    @property
    def forged(self) -> int:
        """Responses dropped for an id this client id never sent (forged, or misrouted),
        plus response batches dropped for not being published by the farm's users."""
        return self.receiver.forged + self.authors.forged

    def status(self) -> ClientProgress:
        """Progress of this client id from the farm's counters: accepted, done, faulted...
        (retried through a Redis restart, up to `client.reconnect_timeout`)."""
        return self._load()

    def _load(self) -> ClientProgress:
        window = self._outage()
        while True:
            try:
                return self.progress.load()
            except REDIS_LOST as e:
                window.retry(e)  # waits, or raises ConnectionLost past the limit

    def purge(self) -> None:
        """Delete this client id's responses and counters (the session goes on)."""
        self.session.control.call(
            "purge_client", session_id=self.session.id, client_id=self.client_id
        )

    # --- receiving ------------------------------------------------------------------------
    def get_responses(
        self,
        timeout: float | None = None,
        new_only: bool = False,
        available_only: bool = False,
        commit_each: bool = False,
    ) -> Iterator[Response]:
        """Yield responses, each once, in arrival order; ends when the batch is complete.

        Complete means: every request of the sealed batch answered, or (before end_requests)
        every request this client sent. A durable client id can be read again after any
        reattach: all responses, or with `new_only` those no reader has handed out yet.
        `available_only` ends once the responses that exist now are read (`soafarm
        responses` without --follow). `timeout` is how many seconds to wait for the next
        response before raising ResponseTimeout (None waits forever). Sends anything still
        buffered first. A durable read records what was handed out per batch, and exactly
        where a caller stopped; with `commit_each`, each response is recorded as the caller
        asks for the next one, so a later `new_only` read is exact even after this process
        was killed (one Redis call per response).
        """
        if self._handler_thread is not None:
            raise SessionError("a response handler is set; get_responses() cannot be used too")
        self.idle.check()
        self.sender.raise_failed()
        self.sender.flush_unless_sending()  # a sending thread may wait for this very read
        target = StreamTarget(
            sent_here=self.sender.next_id if self.sender.sent_here else 0,
            until_done=self._load().done if available_only else None,
        )
        if isinstance(self.receiver, StreamReader):
            self.receiver.commit_each = commit_each
        self._receiving = True
        self._reading_now += 1
        try:
            yield from self.receiver.responses(
                timeout,
                target,
                new_only=new_only,
                before_wait=self.sender.record_pending,
                after=self._commit_soon,
            )
        finally:
            self._reading_now -= 1

    def _commit_soon(self) -> None:
        """What the interactive reader handed out is committed by the linger thread."""
        self._wake(time.monotonic() + COMMIT_INTERVAL)

    def _check_session(self) -> None:
        """Raise if the session failed or was closed while this client waits for it, or the
        broker disconnected this client for `client_idle_timeout`."""
        self.idle.check()
        record = self.sessions.get(self.session.id)
        if record is None:
            # closed, or its record lost with Redis: the broker's answer tells which
            with contextlib.suppress(ConnectionFailed, BrokerUnavailable):
                self.session.control.request(GetArgs(self.session.id))
            raise SessionClosed(f"session {self.session.id} was closed while waiting")
        if record.state == SessionState.FAILED:
            raise SessionFailed(f"session {self.session.id} failed: {record.error}")

    def _session_lost(self, what: str) -> SessionError:
        """The error for an interactive session whose `what` RabbitMQ no longer has (it
        restarted): the broker's verdict (it fails such a session, with a reason) if it
        comes within VERDICT_WAIT, else this client's own. Either way one clear error, never
        a wait for responses that cannot come."""
        deadline = time.monotonic() + VERDICT_WAIT
        while True:
            try:
                self._check_session()
            except SessionError as e:
                return e
            except REDIS_LOST:
                pass  # Redis restarting too: this client's own verdict below
            if time.monotonic() >= deadline:
                return SessionFailed(
                    f"session {self.session.id} lost its {what}: RabbitMQ no longer has this "
                    "interactive session's queues (it restarted?), so its requests and "
                    "responses are gone; create a new session"
                )
            time.sleep(0.1)  # the broker's verdict is in Redis, written by another process

    def _describe(self) -> str:
        try:
            status = self.session.status()
        except Exception as e:  # the timeout is the error to report; status is a hint
            return f"session status unavailable ({e})"
        where = f"session {self.session.id} has {len(status['instances'])} service instance(s)"
        waiting = (status.get("status") or {}).get("waiting", "")
        if waiting:  # the allocator's own words: why it has no unit (or too few)
            return f"{where}; it is {status.get('state', 'queued')}: {waiting}"
        for host, why in sorted(status.get("load_errors", {}).items())[:1]:
            where += f"; the service failed to load on {host}: {why}"
        return where + "; are worker hosts running (`soafarm hosts`)?"

    def set_response_handler(
        self,
        callback: Callable[[Response], None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Call `callback(response)` for each response, on a background thread of its own.

        If `callback` raises, the handler goes on with the next responses (none is lost) and
        the error is passed to `on_error(error)`; without `on_error`, `close()` raises the
        first one as ResponseHandlerError. An error of the reading itself (the session
        closed, another reader took over) ends the handler and reaches the caller the same
        way. `close()` stops the handler.
        """
        if self._handler_thread is not None or self._receiving:
            raise SessionError("responses are already being received by this client")
        self.idle.check()
        self._receiving = True
        self.sender.raise_failed()
        self.sender.flush_unless_sending()  # a sending thread may wait for this very handler
        self._handler_thread = threading.Thread(
            target=self._handle, args=(callback, on_error), name="responses", daemon=True
        )
        self._handler_thread.start()

    def _handle(
        self,
        callback: Callable[[Response], None],
        on_error: Callable[[BaseException], None] | None,
    ) -> None:
        def report(error: BaseException) -> None:
            if on_error is None:
                self._handler_error = self._handler_error or error
                return
            try:
                on_error(error)
            except Exception:
                log.exception("response_error_callback_failed")

        try:
            responses = self.receiver.responses(
                None, StreamTarget(), stop=self._stop.is_set, after=self._commit_soon
            )
            for response in responses:
                try:
                    callback(response)
                except Exception as e:  # the caller's error: keep going, report it
                    report(e)
        except Exception as e:
            report(e)

    def close(self, discard: bool = False) -> None:
        """Send what is buffered (or with `discard`, drop it) and release the connections;
        the session stays open. Raises ResponseHandlerError if the response handler raised
        and no `on_error` took the error."""
        try:
            self.sender.close(discard)
        finally:
            self._stop.set()
            if self._linger is not None:
                self._linger.stop()
            self.heartbeat.stop()
            if self._handler_thread is not None:
                self._handler_thread.join(timeout=5)
            self.receiver.close()
            if not self._released:  # close() may be called again
                self._released = True
                self._redis.release()
        error, self._handler_error = self._handler_error, None
        if error is not None:
            raise ResponseHandlerError(
                f"the response handler raised {type(error).__name__}: {error}"
            ) from error

    def __enter__(self) -> Self:
        """Use as a context manager: the client closes on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client (a handler's error is not raised over the block's own). Left by
        Ctrl-C, the buffered requests are dropped, not sent: the caller asked to stop, and a
        flush could wait on the throttle; they are not counted as accepted, so a resumed
        durable client sends them."""
        if exc is None:
            self.close()
            return
        with contextlib.suppress(ResponseHandlerError):
            self.close(discard=isinstance(exc, KeyboardInterrupt))
