"""Client heartbeats: how the broker tells a connected client from one that went away.

Every open `Session` and `BrokerClient` keeps a member in its session's handle set in Redis,
scored with the time it last beat. The broker's life-cycle monitor treats a handle silent for
`client_idle_timeout` as gone, and closes a session with no handle left after its idle
timeout. A daemon thread per handle beats every third of the client idle timeout (at most
every 10 s), so a crashed client stops beating on its own.
"""

from __future__ import annotations

import threading
import uuid

import redis
import structlog

from soafarm.state.sessions import SessionStore

log = structlog.get_logger(__name__)


class Heartbeat:
    """One handle's beating thread; `stop()` removes the handle at once."""

    def __init__(
        self, sessions: SessionStore, session_id: int, idle_timeout: float, kind: str
    ) -> None:
        """Register the handle in session `session_id` now and start beating."""
        self.sessions = sessions
        self.session_id = session_id
        self.member = f"{kind}:{uuid.uuid4().hex[:12]}"
        self.interval = min(max(idle_timeout / 3, 0.1), 10.0)
        self.stopped = threading.Event()
        self._beat()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        self.sessions.beat(self.session_id, self.member)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self._beat()
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
