"""The request queue's depth, as a service instance's main thread sees it.

Call loops hand the unstarted requests of a slow batch back to the queue only when no other
batch waits there (`Link.queue_empty`), so slow work spreads over idle instances without
churning a busy queue. The monitor looks every QUEUE_CHECK_INTERVAL on a connection of its own
(the call loops' connections belong to their threads), and stops the instance when the queue
is gone (its session was closed).
"""

from __future__ import annotations

import contextlib
import time

import pika
import structlog

from soafarm.config import Settings
from soafarm.transport.backoff import Backoff
from soafarm.transport.connections import pika_connection
from soafarm.transport.errors import LOST, is_queue_gone
from soafarm.workers.calls import Link

log = structlog.get_logger(__name__)



class QueueMonitor:
    """Keeps `link.queue_empty` up to date; reconnects by itself when RabbitMQ goes away."""

    def __init__(self, settings: Settings, link: Link, instance_id: str) -> None:
        """Nothing connects until the first `look`."""
        self.settings = settings
        self.link = link
        self.instance_id = instance_id
        self.connection: pika.BlockingConnection | None = None
        self.channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self.retry_at = 0.0
        self.backoff = Backoff()

    def look(self, interval: float) -> None:
        """Wait up to `interval` seconds (serving the connection), then look at the queue."""
        try:
            if self.channel is None or not self.channel.is_open:
                if time.monotonic() < self.retry_at:
                    self.link.draining.wait(interval)
                    return
                self.close()
                self.connection = pika_connection(
                    self.settings, f"soafarm-instance {self.instance_id} monitor"
                )
                self.channel = self.connection.channel()
            assert self.connection is not None
            self.connection.process_data_events(time_limit=interval)
            waiting = self.channel.queue_declare(self.link.request_queue, passive=True)
        except LOST as e:
            if is_queue_gone(e):
                log.info("session_queue_gone", instance=self.instance_id)
                self.link.stop()
                return
            self._lost(e)
            return
        self.backoff.reset()
        if waiting.method.message_count:
            self.link.queue_empty.clear()
        else:
            self.link.queue_empty.set()

    def _lost(self, error: BaseException) -> None:
        # the call loops reconnect on their own; until this one is back, slow batches are
        # not split (queue_empty keeps its last value)
        delay = self.backoff.next()
        log.warning("monitor_connection_lost", error=repr(error), retry_in=round(delay, 2))
        self.close()
        self.retry_at = time.monotonic() + delay

    def close(self) -> None:
        """Close the monitor's connection, whatever state it is in."""
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()
