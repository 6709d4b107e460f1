"""The broker daemon's main loop: answer control RPCs, reallocate hosts four times a second.

It is not a hop on the data path: requests go from clients to RabbitMQ to service instances.
All its state is in Redis, so it can be restarted at any time; it reconnects to RabbitMQ by
itself when the connection drops.

Several daemons may serve one namespace: they share the control queue, so any of them
answers a control RPC, and the one holding the allocator lease (`soafarm.state.leases`)
runs the rounds: the allocator four times a second, and at once after a create or close it
answered itself (no poll interval on the path create -> assignment); the life-cycle sweep
once a second; the check for vanished queues in slices (see QUEUE_CHECK_INTERVAL). A
change answered by another daemon reaches the allocator at the leader's next round (a
quarter of a second at most). A daemon killed while leading is replaced within the lease's
few seconds; one stopped cleanly hands the lease over at once.

A round's Redis reads do not grow with the number of open sessions: a few script calls
read every session's record, outstanding work and handles (`SessionStore.open_sessions`,
`demand_facts`, `activity`), and what did not change since the previous round is not read
again (`RoundMemo`).

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

from soafarm.broker.assignment import RoundMemo, reconcile
from soafarm.broker.lifecycle import expire_sessions, fail_vanished_sessions
from soafarm.broker.metrics import BrokerMetrics, round_timer
from soafarm.broker.queues import QueueOps, QueueProbe
from soafarm.broker.redis_fence import RedisFence
from soafarm.broker.sessions import SessionService
from soafarm.broker.store import RECORDS_MAX_AGE, BrokerStore
from soafarm.config import Settings, mask_url
from soafarm.errors import ConnectionFailed, DecodeError, SoafarmError
from soafarm.metrics import Health, MetricsServer, serve_metrics
from soafarm.names import Names
from soafarm.protocol import CONTENT_TYPE, ControlReply, ControlRequest, decode, encode
from soafarm.registration.packages import farm_registry
from soafarm.state.control import CloseArgs, decode_request
from soafarm.state.idmark import QueueIdMark, id_mark_queue
from soafarm.state.leases import Lease, holder_id
from soafarm.state.records import SessionRecord
from soafarm.transport.backoff import Backoff
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.errors import AMQP_LOST
from soafarm.transport.topology import (
    control_queue,
    dead_letter_queue,
    declare_exchanges,
    declare_farm_queue,
)

log = structlog.get_logger(__name__)

RECONCILE_INTERVAL = 0.25

#: Seconds between the leader's life-cycle sweeps (idle and connection timeouts, durable
#: releases). Timeouts are seconds to days (a timeout of 0 means "at the next sweep"), so a
#: second is soon enough, and a sweep reads a few keys of every open session: running it
#: with every allocation round cost four times as much with many idle sessions.
SWEEP_INTERVAL = 1.0

#: A leader that renewed its lease this recently runs an allocation a control request
#: asked for without renewing it first (a lease lasts `LEASE_SECONDS`, 3 s): the path
#: create -> assignment saves a Redis round trip.
LEASE_FRESH = 1.0

#: Seconds between the starts of the leader's passes over every open session's request
#: queue, to find one deleted by hand. Every queue is also checked at once whenever the
#: leader (re)connects to RabbitMQ or starts leading, which is when a RabbitMQ restart shows
#: (every connection drops), so lost interactive queues are found within a round of the
#: restart; and a queue found missing is checked again each round (a durable one is failed
#: after DURABLE_QUEUE_GRACE). A check costs a passive declare per open session (~0.2 ms of
#: the daemon's CPU each, in pika): every 5 s, as it was, 1,000 idle sessions cost 4% of a
#: core, and the whole pass held every control request for 0.4 s.
QUEUE_CHECK_INTERVAL = 30.0

#: Queues a round checks at most, outside the pass at once after a (re)connect: a pass over
#: 1,000 sessions is spread over 10 rounds, none holding control requests for more than
#: ~20 ms.
QUEUE_CHECK_SLICE = 100

#: `/healthz` fails when the serve loop has not turned for this long (it turns at least
#: every 0.2 s while connected): RabbitMQ lost, or the daemon stuck.
HEALTHY_LOOP_AGE = 10.0


class BrokerDaemon:
    """One broker daemon process. `run()` blocks until `stop()` (or a signal) is called."""

    def __init__(self, settings: Settings) -> None:
        """Connect to Redis now, so a wrong URL fails fast with a clear error."""
        self.settings = settings
        self.names = Names(settings.namespace)
        client = redis_client(settings)
        self.store = BrokerStore(client, self.names)
        self.store.records_max_age = RECORDS_MAX_AGE
        self.fence = RedisFence.for_farm(settings, client, self.store.sessions)
        self.registry = farm_registry(settings, client)
        self.id = holder_id()
        self.lease = Lease(client, self.names, self.id)
        self.leading = False
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self._dirty = True
        self._next_queue_check = 0.0
        self._next_sweep = 0.0
        self._held_at = -LEASE_FRESH  # monotonic time of the last renewal of the lease
        self.memo = RoundMemo()
        self._missing_since: dict[int, float] = {}
        #: Sessions whose queue the current pass has still to check.
        self._queue_pass: list[int] = []
        #: Phase name -> its failure as last logged, while it keeps failing.
        self._failing: dict[str, str] = {}
        self.backoff = Backoff()
        #: Monotonic time the serve loop last turned (its RabbitMQ connection is alive).
        self.alive_at = -float("inf")
        self.metrics = (
            BrokerMetrics(settings, self.store, lambda: self.leading)
            if settings.metrics.enabled
            else None
        )
        self.metrics_server: MetricsServer | None = None

    def health(self) -> Health:
        """Healthy while connected to RabbitMQ and turning its loop (`/healthz`)."""
        age = time.monotonic() - self.alive_at
        ok = self.ready.is_set() and age < HEALTHY_LOOP_AGE
        return ok, {
            "broker_id": self.id,
            "leading": self.leading,
            "loop_age": round(age, 3) if age != float("inf") else None,
        }

    def stop(self) -> None:
        """Ask `run()` to return (safe from a signal handler or another thread)."""
        self.stopping.set()

    def run(self) -> None:
        """Serve until stopped, reconnecting to RabbitMQ after a lost connection."""
        backoff = self.backoff
        if self.metrics is not None:
            m = self.settings.metrics
            self.metrics_server = serve_metrics(
                self.metrics.registry, self.health, m.bind, m.broker_port, "broker"
            )
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
            if self.metrics_server is not None:
                self.metrics_server.close()
            if self.metrics is not None:
                self.metrics.close()

    def _serve(self) -> None:
        connection = pika_connection(self.settings, f"soafarm-broker {self.settings.namespace}")
        try:
            channel = connection.channel()
            channel.queue_declare(**control_queue(self.names).declare_kwargs())
            declare_exchanges(channel, self.names)
            declare_farm_queue(connection, dead_letter_queue(self.names))
            declare_farm_queue(connection, id_mark_queue(self.names))
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
                queue_ops=QueueOps(connection),
                fence=self.fence,
            )

            def on_control(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
                reply = self._answer(service, body, props.user_id)
                if not props.reply_to:
                    ch.basic_ack(method.delivery_tag)
                    return
                # the ack goes out in the reply's write (the blocking channel flushes the
                # socket once per call): queued on the wrapped channel, sent by the publish
                ch._impl.basic_ack(method.delivery_tag)
                ch.basic_publish(
                    "",
                    props.reply_to,
                    encode(reply),
                    pika.BasicProperties(
                        content_type=CONTENT_TYPE, correlation_id=props.correlation_id
                    ),
                )

            channel.basic_consume(self.names.control_queue, on_control)
            log.info("broker_started", namespace=self.settings.namespace, broker_id=self.id)
            self.ready.set()
            self.backoff.reset()  # serving again: the next outage starts its back-off afresh
            self._next_queue_check = 0.0  # a reconnect may follow a RabbitMQ restart
            last = 0.0
            while not self.stopping.is_set():
                # returns as soon as control requests were answered, at the latest when the
                # next periodic round is due
                wait = min(max(last + RECONCILE_INTERVAL - time.monotonic(), 0.0), 0.2)
                connection.process_data_events(time_limit=wait)
                now = self.alive_at = time.monotonic()
                if now - last >= RECONCILE_INTERVAL:
                    self._dirty = False
                    last = now
                    self.round(service, probe)
                elif self._dirty:
                    # a session was created or closed: allocate now (no poll interval on the
                    # path create -> assignment), without the periodic phases
                    self._dirty = False
                    self.allocate_now(service, probe)
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
            self._failed("lease", f"redis_unreachable: {e}", None)
            leading = False
        else:
            self._failing.pop("lease", None)
        if leading:
            self._held_at = time.monotonic()
        if leading != self.leading:
            self.leading = leading
            if leading:
                self._next_queue_check = 0.0
                self._next_sweep = 0.0
                self.memo = RoundMemo()  # another daemon led meanwhile: read afresh
                log.info("broker_leading", broker_id=self.id)
            else:
                log.info("broker_following", broker_id=self.id, leader=self._leader())
        if not leading:
            return
        with round_timer(self.metrics):
            self._lead(service, probe)

    def _lead(self, service: SessionService, probe: QueueProbe) -> None:
        """The leader's phases of a round."""
        now = time.time()
        # each phase on its own: a failing sweep must not stop allocation, or the reverse
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            self._run_phase(
                "sweep", partial(expire_sessions, self.store, partial(_expire, service), now)
            )
            self._run_phase("redis accounts", self.fence.sweep)
        if self._queue_pass or self._missing_since or time.monotonic() >= self._next_queue_check:
            self._run_phase("queues", partial(self._check_queues, probe, now))
        self._run_phase(
            "allocate", partial(reconcile, self.store, self.memo, self.settings.scheduler.mode)
        )

    def allocate_now(self, service: SessionService, probe: QueueProbe) -> None:
        """The allocator alone, at once (after a control request changed the sessions), if
        this daemon leads; a daemon that has not renewed its lease lately runs a whole
        round, which renews (or takes) the lease first."""
        if not (self.leading and time.monotonic() - self._held_at < LEASE_FRESH):
            self.round(service, probe)
            return
        self._run_phase(
            "allocate", partial(reconcile, self.store, self.memo, self.settings.scheduler.mode)
        )

    def _run_phase(self, name: str, phase: Callable[[], object]) -> None:
        """Run one phase of a round; its failure is logged (see `_failed`), not raised."""
        try:
            phase()
        except AMQP_LOST:
            raise
        except redis.ResponseError as e:  # Redis answered: a value no store expected
            self._failed(name, f"broker_round_failed: {e!r}", e)
        except redis.RedisError as e:  # keep answering; the next round retries
            self._failed(name, f"redis_unreachable: {e}", None)
        except Exception as e:  # a bug: never stop the daemon for it
            self._failed(name, f"broker_round_failed: {e!r}", e)
        else:
            self._failing.pop(name, None)

    def _check_queues(self, probe: QueueProbe, now: float) -> None:
        """Check the next slice of the current pass (the whole pass at once after a
        (re)connect), and the queues found missing before; start a pass when one is due."""
        size = QUEUE_CHECK_SLICE
        if not self._queue_pass and time.monotonic() >= self._next_queue_check:
            if self._next_queue_check == 0.0:  # (re)connected, or leading afresh
                size = 0
            self._next_queue_check = time.monotonic() + QUEUE_CHECK_INTERVAL
            self._queue_pass = self.store.sessions.open_ids(prune=True)  # junk members go
        if size:
            checked, self._queue_pass = self._queue_pass[:size], self._queue_pass[size:]
        else:
            checked, self._queue_pass = self._queue_pass, []
        only = {*checked, *self._missing_since}
        present = probe.exists_many([self.names.request_queue(sid) for sid in sorted(only)])

        def exists(queue: str) -> bool:
            known = present.get(queue)
            return probe.exists(queue) if known is None else known

        failed = fail_vanished_sessions(self.store, exists, now, self._missing_since, only)
        if failed:
            self._dirty = True

    def _failed(self, phase: str, what: str, error: Exception | None) -> None:
        """Log a failed phase once until it succeeds or fails otherwise (4 rounds a second),
        and a failure another phase reported already (Redis down) not again."""
        if what in self._failing.values():
            self._failing[phase] = what
            return
        self._failing[phase] = what
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

    def _answer(self, service: SessionService, body: bytes, user_id: str | None) -> ControlReply:
        try:
            request = decode(body, self.settings.max_message_bytes)
            if not isinstance(request, ControlRequest):
                raise DecodeError(f"expected a control request, got {type(request).__name__}")
            args = decode_request(request)
            caller = service.access.caller(user_id)
            return ControlReply(True, service.handle(args, caller).to_wire())
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
