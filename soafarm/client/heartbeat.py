"""Client heartbeats: how the broker tells a connected client from one that went away.

Every open `Session` and `BrokerClient` keeps a member in its session's handle set in Redis,
scored with the time it last beat. The broker's life-cycle monitor treats a handle silent for
`client_idle_timeout` as gone, and closes a session with no handle left after its idle
timeout. A daemon thread per handle beats every third of the client idle timeout (at most
every 10 s), so a crashed client stops beating on its own.

A `BrokerClient`'s handle names its client id (`client_handle`), and the monitor also
disconnects a client id that sent nothing, read nothing and had nothing outstanding for
`client_idle_timeout`: it drops the handle and records why. The handle's next beat finds
that out and stops, and `IdleGuard` turns it into `ClientIdleTimeout` at the client's next
send or read.
"""

from __future__ import annotations

import threading
import time
import uuid

import redis
import structlog

from soafarm.errors import ClientIdleTimeout
from soafarm.state.clients import ProgressStore
from soafarm.state.sessions import SessionStore, client_handle
from soafarm.transport.errors import REDIS_LOST

log = structlog.get_logger(__name__)

#: Seconds between beats when `client_idle_timeout` is 0 (no idle limit): the broker then
#: still drops a handle silent for `broker.lifecycle.SILENT_HANDLE_LIMIT` (300 s).
UNLIMITED_BEAT_INTERVAL = 10.0


class IdleGuard:
    """What one BrokerClient knows of its client id's `client_idle_timeout`.

    `disconnected` is set by the heartbeat when the broker disconnected the client id;
    `check` raises it. `before_publish` covers the beat interval in between: a send after a
    quiet spell of half the limit or more first asks Redis (`ProgressStore.touch_sent`, one
    script that also moves the client id's last send to now), so a request never leaves a
    client the broker has just disconnected. A client sending more often never pays it.
    """

    def __init__(
        self, progress: ProgressStore, session_id: int, client_id: str, limit: float
    ) -> None:
        """`limit` is the session's `client_idle_timeout` (0: no limit)."""
        self.progress = progress
        self.session_id = session_id
        self.client_id = client_id
        self.limit = limit
        #: Seconds the client id was idle when the broker disconnected it (None: connected).
        self.idle_for: float | None = None
        #: Monotonic time of the last send Redis recorded (attaching counts as one).
        self.recorded_at = time.monotonic()

    def disconnected(self, idle_for: float) -> None:
        """The broker disconnected the client id after `idle_for` seconds idle."""
        if self.idle_for is None:
            log.warning(
                "client_idle_disconnected",
                session_id=self.session_id,
                client_id=self.client_id,
                idle_for=idle_for,
                limit=self.limit,
            )
        self.idle_for = idle_for

    def error(self) -> ClientIdleTimeout:
        """The error a disconnected client raises."""
        idle = self.idle_for if self.idle_for is not None else self.limit
        return ClientIdleTimeout(
            f"client id {self.client_id!r} of session {self.session_id} was disconnected by "
            f"the broker: idle for {idle:.0f}s (nothing sent, read or outstanding; "
            f"client_idle_timeout {self.limit:g}s); its responses are kept: "
            f"attach it again with a new BrokerClient, or raise the limit with "
            f'SessionStartInfo(broker_settings={{"client_idle_timeout": ...}}) (or the '
            f"service registration's [broker] table; 0: no limit)"
        )

    def check(self) -> None:
        """Raise ClientIdleTimeout if the broker disconnected this client id."""
        if self.idle_for is not None:
            raise self.error()

    def sent(self) -> None:
        """Redis recorded a send of this client id just now (with its accepted count)."""
        self.recorded_at = time.monotonic()

    def before_publish(self) -> None:
        """Raise ClientIdleTimeout instead of publishing if the broker disconnected this
        client id (asking Redis only after a quiet spell of half the limit)."""
        self.check()
        now = time.monotonic()
        if self.limit <= 0 or now - self.recorded_at < self.limit / 2:
            return  # the broker's clock for it started less than half the limit ago
        try:
            idle = self.progress.touch_sent()
        except REDIS_LOST as e:  # Redis restarting: sending goes on, as it does then
            log.warning("idle_check_skipped", error=repr(e))
            return
        if idle is not None:
            self.disconnected(idle)
            raise self.error()
        self.recorded_at = now


class Heartbeat:
    """One handle's beating thread; `stop()` removes the handle at once.

    With `guard` (a BrokerClient's), the handle names its client id, and a beat that finds
    the client id disconnected for `client_idle_timeout` tells the guard and stops beating.
    """

    def __init__(
        self,
        sessions: SessionStore,
        session_id: int,
        idle_timeout: float,
        kind: str,
        guard: IdleGuard | None = None,
    ) -> None:
        """Register the handle in session `session_id` now and start beating."""
        self.sessions = sessions
        self.session_id = session_id
        self.guard = guard
        tag = uuid.uuid4().hex[:12]
        self.member = f"{kind}:{tag}" if guard is None else client_handle(guard.client_id, tag)
        self.interval = (
            min(max(idle_timeout / 3, 0.1), 10.0) if idle_timeout > 0 else UNLIMITED_BEAT_INTERVAL
        )
        self.stopped = threading.Event()
        # the first beat attaches (it clears an earlier idle disconnection); Redis down now
        # must not fail the caller with a raw redis error: the beating thread attaches at
        # its first beat that gets through, and the caller's own Redis reads ride the outage
        self.attached = False
        try:
            self._beat(attaching=True)
            self.attached = True
        except redis.RedisError as e:
            log.warning("heartbeat_failed", error=str(e))
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self, attaching: bool = False) -> bool:
        """One beat; False once the client id was disconnected (the handle is out)."""
        if self.guard is None:
            self.sessions.beat(self.session_id, self.member)
            return True
        idle = self.sessions.beat_client(
            self.session_id, self.member, self.guard.client_id, attaching
        )
        if idle is None:
            return True
        self.guard.disconnected(idle)
        return False

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                if not self._beat(attaching=not self.attached):
                    return  # disconnected: beating again would count it as connected
                self.attached = True
            except redis.RedisError as e:  # the next beat retries; missing one is harmless
                log.warning("heartbeat_failed", error=str(e))

    def stop(self) -> None:
        """Stop beating and remove the handle (the session may become idle)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.thread.join(timeout=2)
        try:
            self.sessions.drop_handle(self.session_id, self.member)
        except redis.RedisError as e:  # the broker drops it after client_idle_timeout anyway
            log.warning("heartbeat_remove_failed", error=str(e))
