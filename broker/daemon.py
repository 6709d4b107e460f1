"""The broker daemon's main loop: answer control RPCs, reallocate hosts four times a second.

It is not a hop on the data path: requests go from clients to RabbitMQ to service instances.
All its state is in Redis, so it can be restarted at any time; it reconnects to RabbitMQ by
itself when the connection drops.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any

import pika
import redis
import structlog

from soafarm.broker.assignment import reconcile
from soafarm.broker.lifecycle import expire_sessions
from soafarm.broker.sessions import SessionService
from soafarm.broker.store import BrokerStore
from soafarm.config import Settings, mask_url
from soafarm.errors import ConnectionFailed, DecodeError, SoafarmError
from soafarm.names import Names
from soafarm.protocol import CONTENT_TYPE, ControlReply, ControlRequest, decode, encode
from soafarm.registration import Registry
from soafarm.state.control import CloseArgs, decode_request
from soafarm.state.records import SessionRecord
from soafarm.transport.backoff import Backoff
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.errors import AMQP_LOST
from soafarm.transport.topology import control_queue, dead_letter_queue

log = structlog.get_logger(__name__)

RECONCILE_INTERVAL = 0.25


class BrokerDaemon:
    """One broker daemon process. `run()` blocks until `stop()` (or a signal) is called."""

    def __init__(self, settings: Settings) -> None:
        """Connect to Redis now, so a wrong URL fails fast with a clear error."""
        self.settings = settings
        self.names = Names(settings.namespace)
        self.store = BrokerStore(redis_client(settings), self.names)
        self.registry = Registry(settings.service_registration_path)
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self._dirty = True

    def stop(self) -> None:
        """Ask `run()` to return (safe from a signal handler or another thread)."""
        self.stopping.set()

    def run(self) -> None:
        """Serve until stopped, reconnecting to RabbitMQ after a lost connection."""
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                self._serve()
                backoff.reset()
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

    def _serve(self) -> None:
        connection = pika_connection(self.settings, f"soafarm-broker {self.settings.namespace}")
        try:
            channel = connection.channel()
            channel.queue_declare(**control_queue(self.names).declare_kwargs())
            channel.queue_declare(**dead_letter_queue(self.names).declare_kwargs())
            channel.basic_qos(prefetch_count=16)
            service = SessionService(
                self.settings, self.store, self.registry, channel, self._mark_dirty
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
            log.info("broker_started", namespace=self.settings.namespace)
            self.ready.set()
            last = 0.0
            while not self.stopping.is_set():
                connection.process_data_events(time_limit=0.2)
                now = time.monotonic()
                if self._dirty or now - last >= RECONCILE_INTERVAL:
                    self._dirty = False
                    last = now
                    try:
                        expire_sessions(self.store, partial(_expire, service), time.time())
                        reconcile(self.store)
                    except redis.RedisError as e:  # keep answering; the next round retries
                        log.warning("redis_unreachable", error=str(e))
        finally:
            if connection.is_open:
                connection.close()

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
