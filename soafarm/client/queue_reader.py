"""Reading an interactive client id's responses from its RabbitMQ queue, each exactly once.

An interactive response queue is consumed destructively (`client.inbox.QueueInbox`). A
request an instance ran twice (it was killed mid-batch) is answered twice; the reader keeps
a bitmap of the ids it handed out and drops the second answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from soafarm.client.reader import Bitmap, StreamTarget
from soafarm.errors import ResponseTimeout
from soafarm.protocol import Response, ResponseBatch, decode_as
from soafarm.state.clients import ClientProgress

#: Seconds between looks at the session (closed? failed?) while no response arrives.
IDLE_TICK = 0.5


class Inbox(Protocol):
    """A response queue (`client.inbox.QueueInbox`)."""

    def start(self, on_body: Callable[[bytes], None]) -> None:
        """Start delivering bodies to `on_body` during `drain`."""
        ...

    def drain(self, timeout: float) -> None:
        """Deliver what arrives within `timeout` seconds; TimeoutError if nothing did."""
        ...


class QueueReader:
    """A cursor over an interactive client id's response queue."""

    def __init__(
        self,
        inbox: Inbox,
        *,
        max_bytes: int,
        progress: Callable[[], ClientProgress],
        describe: Callable[[], str],
        check: Callable[[], None],
    ) -> None:
        """`progress()` reads the client id's counters, `describe()` gives the session status
        line of timeout errors, and `check()` raises if the session failed or closed."""
        self.inbox = inbox
        self.max_bytes = max_bytes
        self.progress = progress
        self.describe = describe
        self.check = check
        self.seen = Bitmap()
        self.duplicates = 0
        self.ready: deque[Response] = deque()

    def responses(
        self,
        timeout: float | None,
        target: StreamTarget,
        before_wait: Callable[[], None] = lambda: None,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[Response]:
        """Yield each response once until `target` is met (the rule of StreamReader), or
        `stop()` says so; `timeout` bounds the wait for the next response (None: no bound).
        `before_wait()` runs before each wait (the client records its accepted count)."""
        last = time.monotonic()
        self.inbox.start(self._on_body)
        meta = self.progress() if target.sent_here == 0 else None
        while not self._complete(meta, target) and not stop():
            while self.ready:
                last = time.monotonic()
                yield self.ready.popleft()
            if self._complete(meta, target):
                return
            if timeout is not None and time.monotonic() - last > timeout:
                meta = self.progress()
                raise ResponseTimeout(
                    f"no response for {timeout:g}s; {meta.outstanding} of {meta.accepted} "
                    f"requests still outstanding; {self.describe()}"
                )
            before_wait()
            try:
                self.inbox.drain(IDLE_TICK)
            except TimeoutError:
                self.check()
            if target.sent_here == 0 and not self.ready:
                meta = self.progress()  # reading another process's batch: is it sealed?

    def _complete(self, meta: ClientProgress | None, target: StreamTarget) -> bool:
        if self.ready:
            return False
        if target.until_done is not None:
            return self.seen.count >= target.until_done
        goal = target.sent_here or (meta.total if meta is not None and meta.sealed else None)
        return goal is not None and self.seen.count_below(goal) >= goal

    def _on_body(self, body: bytes) -> None:
        batch = decode_as(body, self.max_bytes, ResponseBatch)
        for response in batch.responses:
            if self.seen.add(response.id):
                self.ready.append(response)
            else:
                self.duplicates += 1
