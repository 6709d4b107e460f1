"""Reading an interactive client id's responses from its RabbitMQ queue, each exactly once.

The rules are a durable reader's (`client.reader`), on a queue instead of a stream:

- **Once each.** A request an instance ran twice (it was killed mid-batch) is answered
  twice; the reader keeps a bitmap of the ids it handed out and drops the second answer.
- **One reader per client id.** A reader takes the client id's reader lease; a second
  reader takes it over. The first one learns it at its next commit (every COMMIT_INTERVAL
  while reading, and on each idle tick), stops consuming, gives back what it received and
  did not hand out (publishes it to the queue again) and raises ReaderTakenOver, instead of
  the two silently splitting the responses.
- **Commits.** Handed-out ids go to the client id's read bitmap in Redis, coalesced every
  COMMIT_INTERVAL while reading; what is left when a read returns is committed within
  COMMIT_INTERVAL by the client's linger thread (`commit_pending`), never on the latency
  path of one request and its response. A reader that took over merges that bitmap into its
  own on idle ticks, to know when the batch is complete.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import Protocol, TypeVar

import structlog

from soafarm.client.inbox import Delivery
from soafarm.client.reader import Bitmap, IdBound, ReadProgress, StreamTarget, default_outage
from soafarm.errors import ReaderTakenOver, ResponsesLost, ResponseTimeout
from soafarm.protocol import Response, ResponseBatch, decode_as
from soafarm.state.clients import ClientProgress
from soafarm.transport.backoff import Outage
from soafarm.transport.errors import LOST, REDIS_LOST

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Seconds between looks at the session and the lease while no response arrives.
IDLE_TICK = 0.5
#: Seconds between commits of handed-out ids while responses flow.
COMMIT_INTERVAL = 0.05
#: Idle ticks in a row with responses counted as answered and not received, after a dropped
#: connection, before they count as lost.
LOST_AFTER_TICKS = 2


class Inbox(Protocol):
    """A response queue (`client.inbox.QueueInbox`)."""

    def start(self, on_delivery: Callable[[Delivery], None]) -> None:
        """Start delivering to `on_delivery` during `drain`."""
        ...

    def drain(self, timeout: float) -> bool:
        """Deliver what arrives within `timeout` seconds; False if nothing did."""
        ...

    def stop(self) -> None:
        """Stop consuming; what was on its way is delivered first."""
        ...

    def give_back(self, bodies: list[bytes]) -> None:
        """Put response batches back in the queue for another reader."""
        ...

    def close(self) -> None:
        """Stop consuming and release the connection."""
        ...


class QueueReader:
    """A cursor over an interactive client id's response queue."""

    def __init__(
        self,
        inbox: Inbox,
        *,
        max_bytes: int,
        progress: ReadProgress,
        describe: Callable[[], str],
        check: Callable[[], None],
        outage: Callable[[], Outage] = default_outage,
    ) -> None:
        """`progress` is the client id's counters, read bitmap and lease; `describe()` gives
        the session status line of timeout errors; `check()` raises if the session failed or
        closed; `outage()` makes the retry window of one server."""
        self.inbox = inbox
        self.max_bytes = max_bytes
        self.progress = progress
        self.describe = describe
        self.check = check
        self.seen = Bitmap()
        self.duplicates = 0
        #: Responses dropped for an id this client id never sent (`IdBound`).
        self.forged = 0
        self.ids = IdBound(progress.load)
        self.token: str | None = None
        self.ready: deque[tuple[Delivery, list[Response]]] = deque()
        self.uncommitted: list[int] = []
        self.committed_at = 0.0
        # the linger thread commits what a finished read left (`commit_pending`)
        self.commit_lock = threading.Lock()
        self.taken_over = False
        #: One retry window per server (see StreamReader).
        self.amqp_outage = outage()
        self.redis_outage = outage()
        self.started = False  # consuming began
        self.inbox_down = False  # the connection was lost: consume again before draining
        self.unsynced = False  # a Redis failure: re-commit what a restarted Redis lost
        #: The connection dropped once: auto-acked responses on their way may be lost.
        self.suspect = False
        self.lost_ticks = 0

    def responses(
        self,
        timeout: float | None,
        target: StreamTarget,
        *,
        new_only: bool = False,
        stop: Callable[[], bool] = lambda: False,
        before_wait: Callable[[], None] = lambda: None,
        after: Callable[[], None] = lambda: None,
    ) -> Iterator[Response]:
        """Yield each response once until `target` is met (the rule of StreamReader), or
        `stop()` says so; `timeout` bounds the wait for the next response (None: no bound).
        `before_wait()` runs before each wait (the client records its accepted count);
        `after()` when the read returns, if ids wait to be committed (the client has its
        linger thread call `commit_pending` soon). `new_only` means nothing here: an
        interactive queue holds only what no reader has taken."""
        if self.token is None:
            self.token = self._redis(self.progress.take_reader)
        last = time.monotonic()
        meta = self._redis(self._merge) if target.sent_here == 0 else None
        try:
            while not self._complete(meta, target) and not stop():
                try:
                    while self.ready:
                        yield from self._hand_out(*self.ready.popleft())
                        last = time.monotonic()
                        if last - self.committed_at >= COMMIT_INTERVAL:
                            self._commit()
                    if self._complete(meta, target):
                        return
                    now = time.monotonic()
                    if timeout is not None and now - last > timeout:
                        meta = self.progress.load()
                        raise ResponseTimeout(
                            f"no response for {timeout:g}s; {meta.outstanding} of "
                            f"{meta.accepted} requests still outstanding; {self.describe()}"
                        )
                    before_wait()
                    if not self._drain():
                        self._commit()
                        self.check()
                        meta = self._merge()
                        self._check_lost(meta)
                        continue
                    if target.sent_here == 0 and not self.ready:
                        meta = self.progress.load()  # reading another process's batch: sealed?
                except LOST as e:
                    self._retry(e)
                    last = time.monotonic()  # an outage is bounded by its own limit
        finally:
            if self.uncommitted:
                after()  # committed soon, off this thread: a caller that stops early has them

    def _drain(self) -> bool:
        """Deliver what arrives within IDLE_TICK (False if nothing did), consuming again
        after a lost connection."""
        if self.inbox_down:
            # consuming again raises the session's loss if its queue did not survive
            self.inbox.start(self._on_delivery)
            self.inbox_down = False
            # auto-acked responses on their way when the connection dropped are gone
            self.suspect = True
        elif not self.started:
            self.inbox.start(self._on_delivery)
        self.started = True
        got = self.inbox.drain(IDLE_TICK)
        self.amqp_outage.recovered()
        return got

    def _retry(self, error: BaseException) -> None:
        """After a lost server: wait (or give up with ConnectionLost) before trying again."""
        if isinstance(error, REDIS_LOST):
            self.unsynced = True
            self.redis_outage.retry(error)
            return
        self.inbox.close()
        self.inbox_down = True
        self.amqp_outage.retry(error)

    def _redis(self, call: Callable[[], T]) -> T:
        """`call()` (Redis requests), retried through a Redis outage."""
        return self.redis_outage.run(call, REDIS_LOST)

    def _check_lost(self, meta: ClientProgress) -> None:
        """After a dropped connection: responses the farm counts as answered that never
        arrived (two idle ticks in a row) were lost with it; say so instead of waiting."""
        if not self.suspect or self.ready:
            return
        missing = meta.done - self.seen.count
        self.lost_ticks = self.lost_ticks + 1 if missing > 0 else 0
        if self.lost_ticks >= LOST_AFTER_TICKS:
            raise ResponsesLost(
                f"{missing:,} response(s) of client id {self.progress.client_id!r} were lost "
                "with a dropped connection to RabbitMQ: an interactive session does not keep "
                "responses on their way to its client (send those requests again, or use a "
                "durable session)"
            )

    def _hand_out(
        self, delivery: Delivery, responses: list[Response]
    ) -> Generator[Response, None, None]:
        """Yield one batch's responses not handed out before."""
        given: list[int] = []
        try:
            for response in responses:
                if not self.ids.plausible(response.id):
                    self.forged += 1
                    log.warning("response_dropped", id=response.id, why="never sent")
                    continue
                if self.seen.add(response.id):
                    given.append(response.id)  # before the yield: it is given out
                    yield response
                else:
                    self.duplicates += 1
        finally:  # one lock per batch, also when the caller stops in its middle
            with self.commit_lock:
                self.uncommitted += given

    def _on_delivery(self, delivery: Delivery) -> None:
        batch = decode_as(delivery.body, self.max_bytes, ResponseBatch)
        self.ready.append((delivery, list(batch.responses)))

    def commit_due(self) -> float | None:
        """When the ids a finished read left should be committed, or None if there are none."""
        return self.committed_at + COMMIT_INTERVAL if self.uncommitted else None

    def close(self) -> None:
        """Commit what is pending and release the queue (undelivered responses stay in it)."""
        if self.token is not None:
            with contextlib.suppress(*REDIS_LOST):  # best effort: the lease ends here
                self.commit_pending()
        self.inbox.close()

    def commit_pending(self) -> None:
        """Record the ids handed out and not committed yet (safe from another thread; a
        takeover it finds is raised on the reading thread at its next commit). After a Redis
        failure, the ids a restarted Redis lost are recorded again first."""
        assert self.token is not None
        with self.commit_lock:
            if self.unsynced:
                stored = Bitmap(self.progress.read_bitmap())
                self.uncommitted = [*self.seen.minus(stored)]
                self.unsynced = False
            ids, self.uncommitted = self.uncommitted, []
            self.committed_at = time.monotonic()
            try:
                taken = not ids or self.progress.commit_read(self.token, 0, ids)
            except REDIS_LOST:
                self.uncommitted[:0] = ids  # kept for the next commit
                self.unsynced = True
                raise
            if not taken:
                # recorded even past a takeover: the new reader must not wait for these
                self.taken_over = True

    def _commit(self) -> None:
        """Record the ids handed out; if another reader holds the lease now, give back what
        was received and not handed out and raise ReaderTakenOver."""
        assert self.token is not None
        had = bool(self.uncommitted)
        self.commit_pending()
        if not had and not self.taken_over:
            self.taken_over = not self.progress.is_reader(self.token)
        if not self.taken_over:
            return
        self.inbox.stop()  # what was on its way lands in `ready` first
        self.inbox.give_back([delivery.body for delivery, _ in self.ready])
        self.ready.clear()
        self.inbox.close()
        raise ReaderTakenOver(
            f"another reader took over client id {self.progress.client_id!r}; "
            "only one reader per client id at a time"
        )

    def _merge(self) -> ClientProgress:
        """Count what other readers of this client id handed out as seen; the counters."""
        for index in _bits(self.progress.read_bitmap()):
            self.seen.add(index)
        return self.progress.load()

    def _complete(self, meta: ClientProgress | None, target: StreamTarget) -> bool:
        if self.ready:
            return False
        if target.until_done is not None:
            return self.seen.count >= target.until_done
        goal = target.sent_here or (meta.total if meta is not None and meta.sealed else None)
        return goal is not None and self.seen.count_below(goal) >= goal


def _bits(bitmap: bytes) -> Iterator[int]:
    """The indexes set in a Redis bitmap (bit 0 is the high bit of byte 0)."""
    for byte_index, byte in enumerate(bitmap):
        if byte:
            for bit in range(8):
                if byte & (0x80 >> bit):
                    yield byte_index * 8 + bit
