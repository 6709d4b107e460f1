"""The broker daemon's main loop: answer control RPCs, reallocate hosts four times a second.

It is not a hop on the data path: requests go from clients to RabbitMQ to service instances.
All its state is in Redis, so it can be restarted at any time; it reconnects to RabbitMQ by
itself when the connection drops.

Several daemons may serve one namespace: they share the control queue, so any of them
answers a control RPC, and the one holding the allocator lease (`soafarm.state.leases`)
runs the rounds: the life-cycle sweep, the check for vanished queues and the allocator. A
change answered by another daemon reaches the allocator at the leader's next round (a
quarter of a second at most). A daemon killed while leading is replaced within the lease's
few seconds; one stopped cleanly hands the lease over at once.

Nothing in Redis stops it: a record it cannot decode is logged once and skipped by the
stores, and any other failure of a round is logged and the next round tries again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pika
import redis
import structlog

from soafarm.broker.assignment import reconcile
from soafarm.broker.lifecycle import expire_sessions, fail_vanished_sessions
from soafarm.broker.queues import QueueProbe
from soafarm.broker.sessions import SessionService
from soafarm.broker.store import BrokerStore
from soafarm.config import Settings, mask_url
from soafarm.errors import ConnectionFailed, DecodeError, SoafarmError
from soafarm.names import Names
from soafarm.protocol import CONTENT_TYPE, ControlReply, ControlRequest, decode, encode
from soafarm.registration import Registry
from soafarm.state.control import CloseArgs, decode_request
from soafarm.state.idmark import QueueIdMark, id_mark_queue
from soafarm.state.leases import Lease, holder_id
from soafarm.state.records import SessionRecord
from soafarm.transport.backoff import Backoff
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.errors import AMQP_LOST
from soafarm.transport.topology import control_queue, dead_letter_queue

log = structlog.get_logger(__name__)

RECONCILE_INTERVAL = 0.25

#: Seconds between the leader's checks that open sessions' request queues still exist. Also
#: checked at once whenever the leader (re)connects to RabbitMQ, which is when a RabbitMQ
#: restart shows (every connection drops), so lost interactive queues are found within a
#: round of the restart; the periodic check covers a queue deleted by hand. A check costs a
#: passive declare per open session (0.2 ms each here).
QUEUE_CHECK_INTERVAL = 5.0


class BrokerDaemon:
    """One broker daemon process. `run()` blocks until `stop()` (or a signal) is called."""

    def __init__(self, settings: Settings) -> None:
        """Connect to Redis now, so a wrong URL fails fast with a clear error."""
        self.settings = settings
        self.names = Names(settings.namespace)
        client = redis_client(settings)
        self.store = BrokerStore(client, self.names)
        self.registry = Registry(settings.service_registration_path)
        self.id = holder_id()
        self.lease = Lease(client, self.names, self.id)
        self.leading = False
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self._dirty = True
        self._next_queue_check = 0.0
        self._missing_since: dict[int, float] = {}
        self._last_failure = ""
        self.backoff = Backoff()

    def stop(self) -> None:
        """Ask `run()` to return (safe from a signal handler or another thread)."""
        self.stopping.set()

    def run(self) -> None:
        """Serve until stopped, reconnecting to RabbitMQ after a lost connection."""
        backoff = self.backoff
        try:
            while not self.stopping.is_set():
                try:
                    self._serve()
                    continue
                except ConnectionFailed as e:
                    if not self.ready.is_set():
                        raise  # never connected: a configuration problem, say so at once
                    delay = backoff.next()
                    log.warning("rabbitmq_unreachable", error=str(e), retry_in=round(delay, 2))
                except AMQP_LOST as e:
                    delay = backoff.next()
                    log.warning("rabbitmq_connection_lost", error=repr(e), retry_in=round(delay, 2))
                self.stopping.wait(delay)
        finally:
            if self.leading:  # hand over at once rather than after the lease expires
                with contextlib.suppress(redis.RedisError):
                    self.lease.release()
                self.leading = False

    def _serve(self) -> None:
        connection = pika_connection(self.settings, f"soafarm-broker {self.settings.namespace}")
        try:
            channel = connection.channel()
            channel.queue_declare(**control_queue(self.names).declare_kwargs())
            channel.queue_declare(**dead_letter_queue(self.names).declare_kwargs())
            channel.queue_declare(**id_mark_queue(self.names).declare_kwargs())
            channel.basic_qos(prefetch_count=16)
            probe = QueueProbe(connection)
            service = SessionService(
                self.settings,
                self.store,
                self.registry,
                channel,
                self._mark_dirty,
                ids=QueueIdMark(connection, self.names),
                queue_exists=probe.exists,
            )

            def on_control(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
                reply = self._answer(service, body)
                if props.reply_to:
                    ch.basic_publish(
                        "",
                        props.reply_to,
                        encode(reply),
                        pika.BasicProperties(
                            content_type=CONTENT_TYPE, correlation_id=props.correlation_id
                        ),
                    )
                ch.basic_ack(method.delivery_tag)

            channel.basic_consume(self.names.control_queue, on_control)
            log.info("broker_started", namespace=self.settings.namespace, broker_id=self.id)
            self.ready.set()
            self.backoff.reset()  # serving again: the next outage starts its back-off afresh
            self._next_queue_check = 0.0  # a reconnect may follow a RabbitMQ restart
            last = 0.0
            while not self.stopping.is_set():
                connection.process_data_events(time_limit=0.2)
                now = time.monotonic()
                if self._dirty or now - last >= RECONCILE_INTERVAL:
                    self._dirty = False
                    last = now
                    self.round(service, probe)
        finally:
            if connection.is_open:
                connection.close()

    def round(self, service: SessionService, probe: QueueProbe) -> None:
        """One round: renew (or take) the lease; if held, sweep, check queues, allocate.

        Redis being unreachable and any bug are logged (a failure once until it changes) and
        the next round tries again; a lost RabbitMQ connection goes up to `run()`.
        """
        try:
            leading = self.lease.hold()
        except redis.RedisError as e:
            self._failed(f"redis_unreachable: {e}", None)
            leading = False
        if leading != self.leading:
            self.leading = leading
            if leading:
                self._next_queue_check = 0.0
                log.info("broker_leading", broker_id=self.id)
            else:
                log.info("broker_following", broker_id=self.id, leader=self._leader())
        if not leading:
            return
        now = time.time()
        # each phase on its own: a failing sweep must not stop allocation, or the reverse
        phases = [partial(expire_sessions, self.store, partial(_expire, service), now)]
        if time.monotonic() >= self._next_queue_check:
            phases.append(partial(self._check_queues, probe, now))
        phases.append(partial(reconcile, self.store))
        ok = True
        for phase in phases:
            ok = self._run_phase(phase) and ok
        if ok:
            self._last_failure = ""

    def _run_phase(self, phase: Callable[[], object]) -> bool:
        try:
            phase()
        except AMQP_LOST:
            raise
        except redis.ResponseError as e:  # Redis answered: a value no store expected
            self._failed(f"broker_round_failed: {e!r}", e)
        except redis.RedisError as e:  # keep answering; the next round retries
            self._failed(f"redis_unreachable: {e}", None)
        except Exception as e:  # a bug: never stop the daemon for it
            self._failed(f"broker_round_failed: {e!r}", e)
        else:
            return True
        return False

    def _check_queues(self, probe: QueueProbe, now: float) -> None:
        failed = fail_vanished_sessions(self.store, probe.exists, now, self._missing_since)
        self.store.sessions.open_ids(prune=True)  # junk members of the sessions set go
        self._next_queue_check = time.monotonic() + QUEUE_CHECK_INTERVAL
        if failed:
            self._dirty = True

    def _failed(self, what: str, error: Exception | None) -> None:
        """Log a failed round once until the failure changes (4 rounds a second)."""
        if what == self._last_failure:
            return
        self._last_failure = what
        if error is None:
            log.warning("broker_round_skipped", error=what)
        else:
            log.exception("broker_round_failed", error=repr(error))

    def _leader(self) -> str | None:
        with contextlib.suppress(redis.RedisError):
            return self.lease.current()
        return None

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _answer(self, service: SessionService, body: bytes) -> ControlReply:
        try:
            request = decode(body, self.settings.max_message_bytes)
            if not isinstance(request, ControlRequest):
                raise DecodeError(f"expected a control request, got {type(request).__name__}")
            return ControlReply(True, service.handle(decode_request(request)).to_wire())
        except SoafarmError as e:
            return ControlReply(False, None, type(e).__name__, str(e))
        except redis.RedisError as e:
            where = mask_url(self.settings.redis_url)
            return ControlReply(
                False,
                None,
                "ConnectionFailed",
                f"the broker daemon cannot reach Redis at {where}: {e}",
            )
        except AMQP_LOST:
            raise
        except Exception as e:  # a bug must not kill the daemon; the caller gets its text
            log.exception("control_request_failed")
            return ControlReply(False, None, "SoafarmError", f"internal broker error: {e!r}")


def _expire(service: SessionService, record: SessionRecord, reason: str) -> None:
    log.info("session_expired", session_id=record.id, reason=reason)
    service.close(CloseArgs(record.id, purge=True))
