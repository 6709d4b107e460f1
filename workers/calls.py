"""The call threads of a service instance: consume request batches, run them, publish the
responses and acknowledge, each thread on a connection of its own (see CallLoop).

How a redelivered batch runs is `workers.retries`; how answered requests are counted,
`workers.done`. This module is the transport and batching around them.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pika
import redis
import structlog

from soafarm.config import BrokerSettings
from soafarm.errors import DecodeError, SoafarmError
from soafarm.names import word_user
from soafarm.protocol import (
    BATCH_HEADER_ALLOWANCE,
    CONTENT_TYPE,
    Request,
    RequestBatch,
    decode_as,
    encode_request,
    encode_request_batch,
    encode_response_batch,
)
from soafarm.service import CallRunner, Outcome
from soafarm.transport.backoff import Backoff
from soafarm.transport.connections import publish_routed
from soafarm.transport.errors import LOST, REDIS_LOST, is_queue_gone
from soafarm.workers.call_stats import CallStats
from soafarm.workers.dispatch import KEEP_WORK, CallTimes
from soafarm.workers.done import Counts, DoneCounter, refused
from soafarm.workers.retries import Retries

log = structlog.get_logger(__name__)

#: Responses of a long batch are published at least this often (seconds), so progress flows.
RESPONSE_LINGER = 0.05
#: A call running this long while requests of its batch wait has the main thread hand
#: those back (the loop expected it to be short; see workers/dispatch.py).
HAND_BACK_AFTER = KEEP_WORK
#: Seconds an idle call loop waits for a delivery before looking at the instance's state.
IDLE_POLL = 0.1
#: A call running this many seconds has the main thread tend its loop's connection.
KEEPALIVE_AFTER = 0.5
#: Refused batches whose deliveries a loop counts (`CallLoop._refused`); beyond it the
#: oldest are forgotten, so what is kept stays small whatever Redis refuses.
MAX_REFUSALS_KEPT = 1024

#: How far a request id may run ahead of its client id's recorded accepted count. A sender
#: records the count after its flushes, and its throttle stops it once the session has
#: message_throttle_start_threshold requests outstanding, so a legitimate id stays within
#: that and a batch of it; an id far beyond is crafted (4,000,000,000 grew the client id's
#: done bitmap, and Redis, by 512 MB) and is dead-lettered. A million ids cost a bitmap of
#: 125 KB at most.
MIN_ID_SLACK = 1_000_000


def id_slack(broker: BrokerSettings) -> int:
    """The ids a session's client ids may run ahead of their accepted counts."""
    return max(MIN_ID_SLACK, 4 * broker.message_throttle_start_threshold)


Delivery = tuple[int, bytes, bool, str]  # delivery tag, body, redelivered, sender's user

#: Header of a batch an instance hands back (through the default exchange, which only the
#: farm may publish to): the user who sent it, whose response queue it answers to.
SENDER_HEADER = "soafarm-sender"


class CallWatch:
    """What a call thread runs now, so the main thread can enforce service_operation_timeout
    and keep the connection alive during a long call."""

    def __init__(self) -> None:
        """Nothing is running yet."""
        self.started: float | None = None
        self.request_id = -1
        self.busy = 0.0  # seconds spent in finished calls

    def begin(self, request_id: int) -> None:
        """A call starts."""
        self.request_id = request_id
        self.started = time.monotonic()

    def end(self) -> float:
        """The call returned (or raised): how long it took."""
        started, self.started = self.started, None
        if started is None:
            return 0.0
        took = time.monotonic() - started
        self.busy += took
        return took

    def busy_seconds(self) -> float:
        """Seconds spent in calls so far, the running one included."""
        started = self.started
        return self.busy + (0.0 if started is None else time.monotonic() - started)

    def overdue(self, timeout: float) -> int | None:
        """The id of a call running longer than `timeout` seconds (0: no limit), else None."""
        started = self.started
        if timeout > 0 and started is not None and time.monotonic() - started > timeout:
            return self.request_id
        return None


class PublishWatch:
    """How long a call thread has been inside a publish (waiting for RabbitMQ's confirm).

    pika's blocking publish has no timeout, and a confirm can be held back while a queue
    recovers from a RabbitMQ restart; the instance's watchdog ends a process stuck too long,
    and the batch is redelivered.
    """

    def __init__(self) -> None:
        """No publish in progress."""
        self.started: float | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Mark a publish in progress for the duration of the block."""
        self.started = time.monotonic()
        try:
            yield
        finally:
            self.started = None

    def stuck_for(self) -> float:
        """Seconds the current publish has been waiting (0 when none is)."""
        started = self.started
        return 0.0 if started is None else time.monotonic() - started


@dataclass(frozen=True)
class Link:
    """What every call loop of an instance shares with its supervising main thread."""

    durable: bool
    request_queue: str
    draining: threading.Event  # set when the instance stops: hand back what has not started
    stop: Callable[[], None]  # stops the whole instance (its queue is gone)
    #: The instance's own session, and its client ids' response queues by client id: a
    #: batch is checked against them, never trusted for where its responses go.
    session_id: int
    reply_queue: Callable[[str, str], str]  # (client id, its user) -> queue name
    #: The exchange clients publish request batches through: a delivery from it names its
    #: sender in its routing key, which RabbitMQ's topic permissions checked.
    request_exchange: str = ""


class CallLoop:
    """One call thread and its own connection: it consumes one batch at a time (prefetch 1),
    runs it, publishes the responses and acknowledges it, all on this thread.

    No thread hand-off on the request path (issue 6: the hop cost ~0.25 ms per sequential
    request). pika is not thread-safe, so the connection belongs to whoever holds `io`: this
    thread, except while a service call runs, when the instance's main thread keeps its
    heartbeats flowing (`keep_alive`), so RabbitMQ still notices a dead machine holding
    unacknowledged work, and a long call does not lose its connection.

    A batch is acknowledged only after its responses are published (and confirmed and
    counted, in a durable session), so a killed instance loses nothing. When the connection
    drops, the loop reconnects with the service kept loaded; RabbitMQ redelivers the batch
    it held.
    """

    def __init__(
        self,
        runner: CallRunner,
        counts: Counts,
        link: Link,
        *,
        instance_id: str,
        max_bytes: int,
        watch: CallWatch,
        connect: Callable[[], pika.BlockingConnection],
        stats: CallStats | None = None,
        user_id: str = "",
        id_slack: int = MIN_ID_SLACK,
    ) -> None:
        """`runner.resend_limit` is the session's message_resend_limit; `counts` is the
        session's counters in Redis; `connect` opens the loop's connection; `stats`, when
        given, counts the calls for the host's metrics; `user_id` is stamped on each
        response; `id_slack`: how far ids may run ahead of the accepted count."""
        self.runner = runner
        self.counts = counts
        self.done = DoneCounter(counts)
        self.stats = stats
        self.retries = Retries(counts, runner, instance_id, stats)
        self.link = link
        self.instance_id = instance_id
        self.max_bytes = max_bytes
        self.watch = watch
        self.connect = connect
        self.publish_watch = PublishWatch()
        # `user_id` (the user `connect` logs in as, which RabbitMQ checks) is how a client
        # tells the farm's responses from forged ones
        self.props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=2 if link.durable else 1,
            user_id=user_id or None,
        )
        # the connection belongs to whoever holds `io` (see the class docstring)
        self.io = threading.Lock()
        self.connection: pika.BlockingConnection | None = None
        self.channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self.deliveries: deque[Delivery] = deque()
        #: Each client id's user, as Redis keeps it (it never changes).
        self.client_users: dict[tuple[int, str], str] = {}
        self.id_slack = id_slack
        #: Each client id's bound on request ids, from its accepted count when last read.
        self.id_bounds: dict[tuple[int, str], int] = {}
        #: Who sent the batch being run (`_sender`).
        self.sender = ""
        #: Batches Redis refused, by digest: deliveries seen here (`_refused`).
        self.refusals: dict[bytes, int] = {}
        self.times = CallTimes()
        # the batch being run and its requests not started yet; both belong to whoever
        # holds `io` (the main thread may hand the requests back during a long call)
        self.batch: RequestBatch | None = None
        self.unstarted: deque[Request] = deque()
        self.backoff = Backoff()

    def run(self) -> None:
        """Serve until the instance drains, reconnecting when the connection drops."""
        backoff = self.backoff
        with self.io:
            try:
                while not self.link.draining.is_set():
                    try:
                        self._serve()
                    except LOST as e:
                        if is_queue_gone(e):
                            log.info("session_queue_gone", instance=self.instance_id)
                            self.link.stop()
                            break
                        # no ack for the batch held: RabbitMQ redelivers it once this
                        # connection is closed
                        delay = backoff.next()
                        log.warning("connection_lost", error=repr(e), retry_in=round(delay, 2))
                        self._close()
                        self.deliveries.clear()
                        self.link.draining.wait(delay)
            finally:
                try:
                    with contextlib.suppress(*REDIS_LOST):
                        self.done.flush()
                finally:
                    self._close()

    def _serve(self) -> None:
        """One connection's life: consume until the instance drains, then hand back or
        finish what this loop holds."""
        self.connection = self.connect()
        self.channel = channel = self.connection.channel()
        if self.link.durable:
            channel.confirm_delivery()  # a response counts only once RabbitMQ has it
        channel.basic_qos(prefetch_count=1)  # one batch held: a slow loop never hoards work
        tag = channel.basic_consume(self.link.request_queue, self._on_delivery)
        channel.add_on_cancel_callback(lambda _frame: self.link.stop())
        # consuming again: the next outage starts its back-off afresh, not where this one's
        # doubling left off (each RabbitMQ blip would otherwise idle the farm longer)
        self.backoff.reset()
        while not self.link.draining.is_set():
            due = self.done.due_in()
            if due == 0.0:
                self.done.flush()
                due = None
            if self.deliveries:
                self._run(*self.deliveries.popleft())
                continue
            self.connection.process_data_events(time_limit=IDLE_POLL if due is None else due)
        if channel.is_open:
            channel.basic_cancel(tag)  # pika requeues what came before the cancel-ok
        while self.deliveries:  # handed back: draining is set
            self._run(*self.deliveries.popleft())

    def describe(self) -> dict[str, object]:
        """What this loop is doing, for a log line about a slow drain: a call running (for
        how long), a publish waiting for its confirm, batches held, the connection's state."""
        started = self.watch.started
        connection = self.connection
        return {
            "call_running_s": None if started is None else round(time.monotonic() - started, 1),
            "publish_waiting_s": round(self.publish_watch.stuck_for(), 1),
            "batches_held": len(self.deliveries),
            "connected": connection is not None and connection.is_open,
        }

    def _on_delivery(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        sender = self._sender(method, props)
        self.deliveries.append((method.delivery_tag, body, bool(method.redelivered), sender))

    def _sender(self, method: Any, props: Any) -> str:
        """Who sent a delivered batch: the first word of its routing key through the request
        exchange; through the default exchange (a batch handed back by an instance), the
        header it carries, else its `user_id`; "" when nothing says."""
        if method.exchange and method.exchange == self.link.request_exchange:
            return word_user(str(method.routing_key).split(".", 1)[0])
        named = (props.headers or {}).get(SENDER_HEADER)
        if isinstance(named, bytes):
            named = named.decode(errors="replace")
        if isinstance(named, str) and named:
            return named
        return str(props.user_id or "")

    def _close(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def keep_alive(self) -> None:
        """Called by the instance's main thread about every 0.1 s: during a call that has run
        HAND_BACK_AFTER seconds, hand back the requests of its batch that wait behind it, and
        after KEEPALIVE_AFTER seconds, process the connection's I/O (heartbeats) in the call
        thread's place."""
        started = self.watch.started
        if started is None:
            return
        running = time.monotonic() - started
        if running < HAND_BACK_AFTER or (running < KEEPALIVE_AFTER and not self.unstarted):
            return
        if not self.io.acquire(blocking=False):
            return  # the call just ended: the call thread has the connection again
        try:
            connection = self.connection
            if connection is None or not connection.is_open:
                return
            if self.unstarted and self.batch is not None:
                self._hand_back(self.batch)
            if running >= KEEPALIVE_AFTER:
                connection.process_data_events(time_limit=0)
        except Exception as e:  # the call thread meets the failure at its next publish
            log.debug("keep_alive_failed", error=repr(e))
        finally:
            self.io.release()

    def _run(self, tag: int, body: bytes, redelivered: bool, sender: str) -> None:
        """Run one delivered batch and acknowledge it (or dead-letter it, if undecodable)."""
        try:
            batch = decode_as(body, self.max_bytes, RequestBatch)
        except DecodeError as e:
            log.error("request_batch_undecodable", error=str(e), dead_lettered=True)
            self._reject(tag)
            return
        foreign = self._foreign(batch, sender)
        if foreign:
            log.error("request_batch_rejected", error=foreign, dead_lettered=True)
            self._reject(tag)
            return
        try:
            taken = self._taken(batch, sender) or self._beyond(batch)
            if taken:
                log.error("request_batch_rejected", error=taken, dead_lettered=True)
                self._reject(tag)
                return
            self.sender = sender
            if self.retries.careful(batch, redelivered):
                self._careful(tag, batch)
            else:
                self._fast(tag, batch)
        except redis.ResponseError as e:
            if not refused(e):
                raise
            self._refused(tag, body, e)

    def _refused(self, tag: int, body: bytes, error: redis.ResponseError) -> None:
        """Redis refused a command of this batch (not a lost connection: reconnecting would
        meet the same refusal, for ever). Requeue it, up to `message_resend_limit` times
        here, then dead-letter it; the loop goes on with the next batch."""
        key = hashlib.blake2b(body, digest_size=16).digest()
        seen = self.refusals.pop(key, 0) + 1
        if seen > self.runner.resend_limit:
            log.error(
                "request_batch_refused", error=str(error), deliveries=seen, dead_lettered=True
            )
            self._reject(tag)
            return
        self.refusals[key] = seen
        while len(self.refusals) > MAX_REFUSALS_KEPT:
            self.refusals.pop(next(iter(self.refusals)))
        log.warning("request_batch_refused", error=str(error), deliveries=seen, requeued=True)
        assert self.channel is not None
        self.channel.basic_reject(tag, requeue=True)

    def _foreign(self, batch: RequestBatch, sender: str) -> str:
        """Why `batch` cannot be this session's ("" when it is): it names another session,
        or a reply address other than its client id's response queue for the user who sent
        it (a forged request would run here and count there, or send its responses to
        someone else's queue)."""
        if batch.session_id != self.link.session_id:
            return (
                f"a batch for session {batch.session_id} in session "
                f"{self.link.session_id}'s request queue"
            )
        if not sender:
            return "its sender is unknown (no routing key, header or user_id names one)"
        try:
            expected = self.link.reply_queue(batch.client_id, sender)
        except SoafarmError as e:
            return f"bad client id: {e}"
        if batch.reply_to != expected:
            return (
                f"reply address {batch.reply_to!r} is not client id {batch.client_id!r}'s "
                f"response queue {expected!r}"
            )
        return ""

    def _taken(self, batch: RequestBatch, sender: str) -> str:
        """Why `sender` may not send under the batch's client id ("" when it may): the client
        id is another user's (in a session shared with the sender)."""
        key = (batch.session_id, batch.client_id)
        user = self.client_users.get(key)
        if user is None:
            user = self.counts.client_user(*key)
            if user is None:
                return ""  # attached before users were kept, or being purged
            self.client_users[key] = user
        if user != sender:
            return f"client id {batch.client_id!r} is {user!r}'s, sent by {sender!r}"
        return ""

    def _beyond(self, batch: RequestBatch) -> str:
        """Why the batch's ids cannot be its client id's ("" when they can): one runs more
        than `id_slack` past the client id's accepted count, read again before refusing."""
        if not batch.requests:
            return ""
        top = max(r.id for r in batch.requests)
        key = (batch.session_id, batch.client_id)
        if top < self.id_bounds.get(key, 0):
            return ""
        accepted = self.counts.accepted(*key)
        self.id_bounds[key] = accepted + self.id_slack
        if top < accepted + self.id_slack:
            return ""
        return (
            f"request id {top:,} is more than {self.id_slack:,} past client id "
            f"{batch.client_id!r}'s accepted count ({accepted:,})"
        )

    def _ack(self, tag: int) -> None:
        assert self.channel is not None
        self.channel.basic_ack(tag)

    def _reject(self, tag: int) -> None:
        assert self.channel is not None
        self.channel.basic_reject(tag, requeue=False)  # to the dead-letter queue, intact

    def _send(
        self,
        queue: str,
        body: bytes,
        wanted: Callable[[], object],
        props: pika.BasicProperties | None = None,
    ) -> bool:
        """Publish (with `props`, else the responses'); durable publishes are `mandatory`
        and sent again while RabbitMQ returns them and `wanted()` says the queue should
        exist (see `publish_routed`). False when the queue is gone for good (the client id
        was purged, the session closed)."""
        channel, connection = self.channel, self.connection
        assert channel is not None and connection is not None
        props = props or self.props
        with self.publish_watch.running():
            return publish_routed(
                partial(channel.basic_publish, "", queue, body, props, self.link.durable),
                queue,
                wanted=wanted,
                pause=connection.sleep,  # serving heartbeats meanwhile
            )

    def _send_responses(self, batch: RequestBatch, outcomes: list[Outcome]) -> bool:
        """Publish one response batch; False when its client id is gone for good."""
        body = encode_response_batch(
            batch.session_id, batch.client_id, self.instance_id, [o.body for o in outcomes]
        )
        wanted = partial(self.counts.client_exists, batch.session_id, batch.client_id)
        return self._send(batch.reply_to, body, wanted)

    def _publish(self, batch: RequestBatch, outcomes: list[Outcome]) -> None:
        """Publish responses and count them at once (before the batch is acknowledged)."""
        if self._send_responses(batch, outcomes):
            self.done.now(batch.session_id, batch.client_id, _pairs(outcomes))

    def _finish(self, tag: int, batch: RequestBatch, outcomes: list[Outcome]) -> None:
        if outcomes and not self.link.durable:
            # interactive: ack first and count later, so a capacity-1 instance gets its next
            # batch without waiting on Redis; dying before the count leaves only the
            # informational done counter short (the batch is not redelivered, the client has
            # its responses)
            if self._send_responses(batch, outcomes):
                self._ack(tag)
                self.done.later(batch.session_id, batch.client_id, _pairs(outcomes))
                return
        elif outcomes:
            self._publish(batch, outcomes)
        self._ack(tag)

    def _hand_back(self, batch: RequestBatch, keep: int = 0) -> None:
        """Send the unstarted requests past the first `keep` back to the session's queue for
        idle units to take, in pieces that each fit KEEP_WORK (a unit that takes one starts
        all of it, rather than handing most of it back again). Always before the batch's
        ack: a crash now re-runs requests, never loses them."""
        if len(self.unstarted) <= keep:
            return
        rest = list(self.unstarted)[keep:]
        pieces: list[list[Request]] = []
        while rest:
            size = self.times.piece(rest)
            pieces.append(rest[:size])
            rest = rest[size:]
        wanted = partial(self.counts.session_exists, batch.session_id)
        # its sender goes with it: the instance that takes it answers to that user's queue
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=self.props.delivery_mode,
            user_id=self.props.user_id,
            headers={SENDER_HEADER: self.sender},
        )
        for piece in reversed(pieces):  # from the end: a failed publish leaves the rest here
            body = encode_request_batch(
                batch.session_id,
                batch.client_id,
                batch.reply_to,
                [encode_request(r, self.max_bytes) for r in piece],
            )
            self._send(self.link.request_queue, body, wanted, props)
            for _ in piece:
                self.unstarted.pop()

    def _call(self, request_run: Callable[[], Outcome], request_id: int) -> Outcome:
        """Run one call with the connection left to `keep_alive`."""
        self.watch.begin(request_id)
        self.io.release()
        try:
            outcome = request_run()
        finally:
            took = self.watch.end()
            self.io.acquire()
        if self.stats is not None:
            self.stats.record(took, outcome.faulted)
        return outcome

    def _fast(self, tag: int, batch: RequestBatch) -> None:
        pending: list[Outcome] = []
        size = 0
        last = time.monotonic()
        self.batch, self.unstarted = batch, deque(batch.requests)
        # what to keep is decided at the start, and again after any call that was not tiny,
        # so an echo batch costs one pass over its requests
        self._hand_back(batch, self.times.keep(self.unstarted))
        try:
            while self.unstarted:
                if self.link.draining.is_set():
                    self._hand_back(batch)  # being stopped: a drain takes one call
                    break
                request = self.unstarted.popleft()
                began = time.monotonic()
                outcome = self._call(partial(self.runner.run, request), request.id)
                now = time.monotonic()
                self.times.record(request.op, now - began)
                if now - began > KEEP_WORK / 4 and self.unstarted:
                    self._hand_back(batch, self.times.keep(self.unstarted))
                if pending and size + len(outcome.body) > self.max_bytes - BATCH_HEADER_ALLOWANCE:
                    self._publish(batch, pending)
                    pending, size = [], 0
                pending.append(outcome)
                size += len(outcome.body)
                if now - last >= RESPONSE_LINGER:
                    self._publish(batch, pending)
                    pending, size, last = [], 0, now
        finally:
            self.batch = None
            self.unstarted.clear()
        self._finish(tag, batch, pending)

    def _careful(self, tag: int, batch: RequestBatch) -> None:
        for request, fault in self.retries.plan(batch):
            outcome = fault or self._call(partial(self.runner.run, request), request.id)
            self._publish(batch, [outcome])  # before the next request: it may be the culprit
        self._finish(tag, batch, [])


def _pairs(outcomes: list[Outcome]) -> list[tuple[int, bool]]:
    """(request id, faulted) of each outcome, as the done counters take them."""
    return [(o.request_id, o.faulted) for o in outcomes]
