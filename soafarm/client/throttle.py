"""Client-side throttling: keep a session's outstanding requests under its thresholds.

When `message_throttle_start_threshold` requests of a session are sent and unanswered,
`send_request` blocks until fewer than `message_throttle_stop_threshold` are (or raises
Throttled after `client.throttle_timeout` seconds, when set). That bounds what RabbitMQ
holds for the session, and the client's own memory, however many requests are sent.

An interactive client id is also bounded in what it sent and has not read back: a response
is "done" as soon as it is in the client's response queue, so a client that sends and never
reads would pile its responses up in RabbitMQ (1,000,000 of them took 352 MB). Past
`client.max_unread_responses` requests sent and not read, `send_request` blocks until reading
brings it to three quarters of that. A client that blocks there while nothing reads (no
response handler, no `get_responses()` under way, no other reader of the client id) would
wait forever: after UNREAD_STALL seconds it raises Throttled, saying so.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from soafarm.config import BrokerSettings
from soafarm.errors import Throttled
from soafarm.state.clients import ProgressStore
from soafarm.transport.backoff import Outage
from soafarm.transport.errors import REDIS_LOST

#: Seconds between checks of the other clients' load while this client is under the threshold.
CHECK_INTERVAL = 0.5
#: Seconds a send blocked on unread responses waits while nothing reads them before raising.
UNREAD_STALL = 10.0
#: Seconds between checks that the session is still alive while a send waits: a session
#: that failed (its queues lost in a RabbitMQ restart) or was closed will never catch up.
SESSION_CHECK_INTERVAL = 1.0


@dataclass
class UnreadBound:
    """How an interactive client counts what it sent and has not read back."""

    #: Requests sent and not read at which sending blocks (`client.max_unread_responses`).
    limit: int
    #: Responses this process's reader handed out (free to ask).
    read_here: Callable[[], int]
    #: Responses any reader of the client id committed as read (a Redis round trip).
    read_anywhere: Callable[[], int]
    #: True while a response handler or a `get_responses()` of this client is under way.
    reading: Callable[[], bool]


class Throttle:
    """One client id's view of its session's load."""

    def __init__(
        self,
        progress: ProgressStore,
        broker: BrokerSettings,
        timeout: float,
        *,
        outage: Outage | None = None,
        unread: UnreadBound | None = None,
        check_session: Callable[[], None] | None = None,
    ) -> None:
        """`broker` is the session's effective broker settings; `timeout` 0 waits forever;
        `outage` retries the Redis reads through a Redis restart; `unread` bounds an
        interactive client's requests sent and not read back (None: not bounded);
        `check_session` raises if the session failed or was closed, and is called every
        SESSION_CHECK_INTERVAL while a send waits."""
        self.progress = progress
        self.start = broker.message_throttle_start_threshold
        self.stop = broker.message_throttle_stop_threshold
        self.timeout = timeout
        self.outage = outage
        self.unread = unread if unread is not None and unread.limit > 0 else None
        self.done_seen = 0
        self.others = 0
        self.checked_at = 0.0
        self.check_session = check_session
        self._session_checked = 0.0
        #: Called with the session's outstanding count while a send waits (and with 0 when it
        #: may go on), so a progress display can say why it stopped.
        self.on_wait: Callable[[int], None] = lambda outstanding: None

    def session_outstanding(self, own_sent: int) -> int:
        """Sent-but-unanswered requests of the session; this client's sends counted exactly."""
        while True:
            try:
                self.done_seen, self.others = self.progress.session_counts()
                break
            except REDIS_LOST as e:
                if self.outage is None:
                    raise
                self.outage.retry(e)  # waits, or raises ConnectionLost past the limit
        if self.outage is not None:
            self.outage.recovered()
        self.checked_at = time.monotonic()
        return max(own_sent - self.done_seen, 0) + self.others

    def wait(self, own_sent: int) -> None:
        """Return when the session may take more requests; called before each flush."""
        self._wait_unread(own_sent)
        estimate = own_sent - self.done_seen + self.others
        if estimate < self.start and time.monotonic() - self.checked_at < CHECK_INTERVAL:
            return
        outstanding = self.session_outstanding(own_sent)
        if outstanding < self.start:
            return
        began = time.monotonic()
        pause = 0.01
        while outstanding >= self.stop:
            self.on_wait(outstanding)
            waited = time.monotonic() - began
            if self.timeout and waited >= self.timeout:
                raise Throttled(
                    f"the session still has {outstanding:,} outstanding requests after "
                    f"{waited:.1f}s (throttle thresholds {self.start:,}/{self.stop:,}); "
                    "the service instances are not keeping up"
                )
            self._still_alive()
            time.sleep(pause)  # waiting for workers, whose progress is only visible in Redis
            pause = min(pause * 2, 0.2)
            outstanding = self.session_outstanding(own_sent)
        self.on_wait(0)

    def _wait_unread(self, own_sent: int) -> None:
        """Block while this interactive client id has `unread.limit` requests sent and not
        read back, until reading brings it to three quarters of that."""
        bound = self.unread
        if bound is None or own_sent - bound.read_here() < bound.limit:
            return
        resume = bound.limit * 3 // 4
        began = quiet_since = time.monotonic()
        last_read = -1
        pause = 0.01
        while True:
            read = max(bound.read_here(), self._read_anywhere(bound))
            unread = own_sent - read
            if unread <= resume:
                break
            now = time.monotonic()
            if read != last_read or bound.reading():
                last_read, quiet_since = read, now
            self.on_wait(unread)
            if now - quiet_since >= UNREAD_STALL:
                raise Throttled(
                    f"client id {self.progress.client_id!r} has {unread:,} requests sent and "
                    f"not read back (client.max_unread_responses = {bound.limit:,}) and nothing "
                    f"read them for {UNREAD_STALL:g}s: read responses while sending "
                    "(set_response_handler(), or get_responses() on another thread)"
                )
            if self.timeout and now - began >= self.timeout:
                raise Throttled(
                    f"client id {self.progress.client_id!r} still has {unread:,} requests sent "
                    f"and not read back after {now - began:.1f}s "
                    f"(client.max_unread_responses = {bound.limit:,})"
                )
            self._still_alive()
            time.sleep(pause)  # the reader may be on another thread or in another process
            pause = min(pause * 2, 0.2)
        self.on_wait(0)

    def _still_alive(self) -> None:
        """Raise the session's error (SessionFailed, SessionClosed) if it has one; checked
        at most every SESSION_CHECK_INTERVAL, and quietly skipped while Redis is away."""
        now = time.monotonic()
        if self.check_session is None or now - self._session_checked < SESSION_CHECK_INTERVAL:
            return
        self._session_checked = now
        # the wait's own Redis reads ride out an outage (or give up) themselves
        with contextlib.suppress(*REDIS_LOST):
            self.check_session()

    def _read_anywhere(self, bound: UnreadBound) -> int:
        try:
            return bound.read_anywhere()
        except REDIS_LOST:
            return 0  # this process's own count still moves; Redis is retried next round
