"""Client-side throttling: keep a session's outstanding requests under its thresholds.

When `message_throttle_start_threshold` requests of a session are sent and unanswered,
`send_request` blocks until fewer than `message_throttle_stop_threshold` are (or raises
Throttled after `client.throttle_timeout` seconds, when set). That bounds what RabbitMQ
holds for the session, and the client's own memory, however many requests are sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from soafarm.config import BrokerSettings
from soafarm.errors import Throttled
from soafarm.state.clients import ProgressStore

#: Seconds between checks of the other clients' load while this client is under the threshold.
CHECK_INTERVAL = 0.5


class Throttle:
    """One client id's view of its session's load."""

    def __init__(
        self,
        progress: ProgressStore,
        broker: BrokerSettings,
        timeout: float,
    ) -> None:
        """`broker` is the session's effective broker settings; `timeout` 0 waits forever."""
        self.progress = progress
        self.start = broker.message_throttle_start_threshold
        self.stop = broker.message_throttle_stop_threshold
        self.timeout = timeout
        self.done_seen = 0
        self.others = 0
        self.checked_at = 0.0
        #: Called with the session's outstanding count while a send waits (and with 0 when it
        #: may go on), so a progress display can say why it stopped.
        self.on_wait: Callable[[int], None] = lambda outstanding: None

    def session_outstanding(self, own_sent: int) -> int:
        """Sent-but-unanswered requests of the session; this client's sends counted exactly."""
        self.done_seen, self.others = self.progress.session_counts()
        self.checked_at = time.monotonic()
        return max(own_sent - self.done_seen, 0) + self.others

    def wait(self, own_sent: int) -> None:
        """Return when the session may take more requests; called before each flush."""
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
            time.sleep(pause)  # waiting for workers, whose progress is only visible in Redis
            pause = min(pause * 2, 0.2)
            outstanding = self.session_outstanding(own_sent)
        self.on_wait(0)
