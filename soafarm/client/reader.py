"""Reading a durable client id's responses from its RabbitMQ stream, each exactly once.

A stream is never consumed destructively: a reader starts at the first offset (every
response) or at the offset its predecessor committed (`new_only`), and skips responses it has
already handed out with a bitmap of request ids, so a request that ran twice (an instance
killed mid-batch) still shows once. After each batch the reader commits the ids and the next
offset to Redis, guarded by a reader lease: a second reader of the same client id takes over
and the first one's next commit fails with `ReaderTakenOver`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog

from soafarm.client.inbox import Delivery
from soafarm.errors import ConnectionFailed, ConnectionLost, ReaderTakenOver, ResponseTimeout
from soafarm.protocol import Response, ResponseBatch, decode_as
from soafarm.state.clients import ClientProgress
from soafarm.transport.backoff import Outage
from soafarm.transport.errors import LOST, REDIS_LOST

log = structlog.get_logger(__name__)

T = TypeVar("T")

IDLE_TICK = 0.5
#: Ids per commit when a reader re-commits what a restarted Redis lost: bounds the time one
#: Lua call holds Redis (a SETBIT per id).
RESYNC_CHUNK = 10_000
#: `client.reconnect_timeout`'s default, for readers built without settings (tests).
DEFAULT_RECONNECT_TIMEOUT = 90.0


def default_outage() -> Outage:
    """A retry window with the default limit (the client passes one from its settings)."""
    return Outage(
        DEFAULT_RECONNECT_TIMEOUT,
        lambda error, seconds: ConnectionLost(f"gave up after {seconds:.0f}s: {error}"),
    )


#: Seconds without deliveries, while the counters show unread responses, before re-consuming.
RESUBSCRIBE_AFTER = 5.0


class Bitmap:
    """A growable bit set with Redis's bit order (bit 0 is the high bit of byte 0)."""

    def __init__(self, data: bytes = b"") -> None:
        """Start from a Redis bitmap value (GET of a SETBIT key), or empty."""
        self.bits = bytearray(data)
        self.count = int.from_bytes(self.bits, "big").bit_count()

    def add(self, index: int) -> bool:
        """Set bit `index`; True if it was not set before."""
        byte, bit = divmod(index, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits) + len(self.bits) // 2))
        mask = 0x80 >> bit
        if self.bits[byte] & mask:
            return False
        self.bits[byte] |= mask
        self.count += 1
        return True

    def minus(self, other: Bitmap) -> Iterator[int]:
        """The indexes set here and not in `other`, in order."""
        theirs = other.bits
        for index, byte in enumerate(self.bits):
            extra = byte & ~(theirs[index] if index < len(theirs) else 0)
            if extra:
                for bit in range(8):
                    if extra & (0x80 >> bit):
                        yield index * 8 + bit

    def count_below(self, limit: int) -> int:
        """How many bits < `limit` are set."""
        whole, rest = divmod(limit, 8)
        n = int.from_bytes(self.bits[:whole], "big").bit_count()
        if rest and whole < len(self.bits):
            n += (self.bits[whole] >> (8 - rest)).bit_count()
        return n


@dataclass(frozen=True)
class StreamTarget:
    """When a read is complete.

    `sent_here`: requests this process sent before reading (HPC-style "flush then get"),
    used while the batch is not sealed; `until_done`: stop once this many distinct responses
    were seen (`soafarm responses` without --follow: what is there now).
    """

    sent_here: int = 0
    until_done: int | None = None


class Stream(Protocol):
    """A response stream read from an offset (`client.inbox.StreamInbox`)."""

    stream: str

    @property
    def is_open(self) -> bool:
        """True while reading."""
        ...

    def open(self, offset: int, on_delivery: Callable[[Delivery], None]) -> None:
        """Start reading at `offset`."""
        ...

    def drain(self, timeout: float) -> bool:
        """Wait for deliveries; False if the connection is gone."""
        ...

    def close(self) -> None:
        """Stop reading; what was not acknowledged goes to the next reader."""
        ...


#: Ids a response may have beyond the farm's accepted count (which a sender records every
#: so often, not at each flush): a response past it is not one of this client id's requests.
ID_SLACK = 1 << 20


class IdBound:
    """Which response ids are plausible for a client id: below the accepted count (or the
    sealed total) plus ID_SLACK, read again only when an id passes the last bound. A forged
    response with an id of 4e9 would otherwise grow the reader's bitmap to 512 MB."""

    def __init__(self, load: Callable[[], ClientProgress]) -> None:
        """`load` reads the client id's counters (one Redis round trip)."""
        self.load = load
        self.top = 0

    def plausible(self, response_id: int) -> bool:
        """True for an id below the bound (read afresh once an id reaches it); True too when
        Redis cannot say: a real response is never dropped for an outage."""
        if response_id < self.top:
            return True
        try:
            progress = self.load()
        except REDIS_LOST:
            return True
        self.top = max(progress.accepted, progress.total or 0) + ID_SLACK
        return response_id < self.top


class ReadProgress(Protocol):
    """A client id's read state in Redis (`state.clients.ProgressStore`)."""

    client_id: str

    def load(self) -> ClientProgress:
        """The client id's counters."""
        ...

    def take_reader(self) -> str:
        """Become the reader; returns the lease token."""
        ...

    def is_reader(self, token: str) -> bool:
        """True while `token` holds the lease."""
        ...

    def commit_read(self, token: str, next_offset: int, ids: Iterable[int]) -> bool:
        """Record ids handed out and the next offset; False if the lease was lost."""
        ...

    def read_bitmap(self) -> bytes:
        """Ids handed out so far (a Redis bitmap)."""
        ...


class Receiver(Protocol):
    """A client id's receive path, chosen when the client is built: `QueueReader` for an
    interactive session (client/queue_reader.py), `StreamReader` for a durable one."""

    seen: Bitmap
    duplicates: int
    forged: int

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
        """Each response once, until `target` is met or `stop()`; `after()` when the read
        returns with handed-out ids still to commit (then `commit_due`/`commit_pending`)."""
        ...

    def commit_due(self) -> float | None:
        """When what earlier reads handed out should be committed (monotonic time), or None."""
        ...

    def commit_pending(self) -> None:
        """Commit what earlier reads handed out (safe from another thread)."""
        ...

    def close(self) -> None:
        """Commit what is pending and release the connection."""
        ...


class StreamReader:
    """One pass over a durable client id's responses."""

    def __init__(  # noqa: PLR0917 - positional since before `outage`
        self,
        source: Stream,
        progress: ReadProgress,
        max_bytes: int,
        describe: Callable[[], str],
        check: Callable[[], None],
        outage: Callable[[], Outage] = default_outage,
    ) -> None:
        """`describe()` gives the session status line used in timeout errors; `check()` raises
        if the session failed or closed (called once per idle tick); `outage()` makes the
        retry window of one server (`client.reconnect_timeout`)."""
        self.source = source
        self.progress = progress
        self.max_bytes = max_bytes
        self.describe = describe
        self.check = check
        self.next_offset = 0
        self.resubscribes = 0
        self.token: str | None = None
        self.seen = Bitmap()
        self.inbox: deque[Delivery] = deque()
        #: Commit each response as the caller takes the next (`soafarm responses --new-only`).
        self.commit_each = False
        self.duplicates = 0
        #: Responses dropped for an id this client id never sent (`IdBound`).
        self.forged = 0
        self.ids = IdBound(progress.load)
        #: One retry window per server: a reader waiting for RabbitMQ while Redis answers
        #: (or the reverse) must still give up on the one that stays away.
        self.amqp_outage = outage()
        self.redis_outage = outage()
        #: Redis failed since the last commit: re-commit what it may have lost before going on.
        self.unsynced = False

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
        """Yield each response once; see the module docstring. `timeout` bounds the wait for
        the next response while the servers answer (None: no bound; an outage is bounded by
        `client.reconnect_timeout` instead); `stop()` ends the read early (response
        handlers); `before_wait()` runs before each wait for deliveries. `after` is the
        Receiver interface's: a durable read commits as it goes and leaves nothing behind.

        The reader is a cursor: a second call continues where the first stopped (a client
        that sends and reads in turns never re-reads the stream). `new_only` matters on the
        first call, which decides where the cursor starts.

        It rides out a RabbitMQ or Redis restart: it reopens the stream at the offset after
        the last batch it handed out whole (ids it already handed out are skipped), and hands
        out nothing more until Redis has every id it handed out, re-committing those the
        restart lost (`_resync`). Past `client.reconnect_timeout` it raises ConnectionLost.
        """
        token = self._start(new_only)
        meta = self._redis(self.progress.load)
        last_progress = last_meta = last_delivery = time.monotonic()
        while not self._complete(meta, self.seen, target):
            if stop():
                return
            try:
                self._receive(token, before_wait)
                while self.inbox:
                    last_delivery = time.monotonic()
                    self.resubscribes = 0
                    fresh = yield from self._hand_out(self.inbox.popleft(), self.seen, token)
                    if fresh:
                        last_progress = time.monotonic()
                now = time.monotonic()
                if now - last_meta >= IDLE_TICK:
                    meta, last_meta = self.progress.load(), now
                    if self._tick(token, meta, now - last_delivery):
                        last_delivery = now
            except LOST as e:
                self._retry(e)
                # time without a server is bounded by the outage, not the response timeout
                last_progress = last_delivery = last_meta = time.monotonic()
                continue
            if timeout is not None and now - last_progress > timeout:
                raise ResponseTimeout(
                    f"no response for {timeout:g}s; {meta.done} of {meta.accepted} "
                    f"requests answered; {self.describe()}"
                )

    def _start(self, new_only: bool) -> str:
        """Take the reader lease on the first read (and with `new_only`, start the cursor
        where the previous reader's commits stopped); the lease token."""
        if self.token is None:
            self.token = self._redis(self.progress.take_reader)
            if new_only:
                self.seen = Bitmap(self._redis(self.progress.read_bitmap))
                self.next_offset = self._redis(self.progress.load).read_offset or 0
        return self.token

    def _receive(self, token: str, before_wait: Callable[[], None]) -> None:
        """Wait up to IDLE_TICK for deliveries (into `inbox`), reopening the stream (and
        first re-committing what Redis lost) after an outage."""
        if self.unsynced:
            self._resync(token)
        if not self.source.is_open:
            self.source.open(self.next_offset, self.inbox.append)
        before_wait()
        if not self.source.drain(IDLE_TICK):
            raise ConnectionFailed(f"lost the connection to RabbitMQ ({self.source.stream})")
        self.amqp_outage.recovered()

    def _retry(self, error: BaseException) -> None:
        """After a lost server: wait (or give up with ConnectionLost) before trying again."""
        if isinstance(error, REDIS_LOST):
            self.unsynced = True
            self.redis_outage.retry(error)
            return
        # the connection is gone: deliveries not handed out come again from `next_offset`
        self.close()
        self.amqp_outage.retry(error)

    def _redis(self, call: Callable[[], T]) -> T:
        """`call()` (one Redis request), retried through a Redis outage."""
        return self.redis_outage.run(call, REDIS_LOST)

    def _resync(self, token: str) -> None:
        """Redis failed since the last commit and answers again: it may have missed the
        commit that failed, and, restarted from an AOF written once a second, the commits of
        the last second before it went down. Re-commit every id this reader handed out that
        Redis lacks (this process's `seen` is the record), with the cursor's offset, before
        handing out anything else: a later `new_only` read then repeats nothing."""
        self.check()  # the session may be gone (closed, or a Redis that came back empty)
        stored = Bitmap(self.progress.read_bitmap())
        missing = list(self.seen.minus(stored))
        for at in range(0, len(missing), RESYNC_CHUNK):
            chunk = missing[at : at + RESYNC_CHUNK]
            if not self.progress.commit_read(token, self.next_offset, chunk):
                raise self._taken_over()
        if not missing and not self.progress.commit_read(token, self.next_offset, []):
            raise self._taken_over()
        self.unsynced = False
        self.redis_outage.recovered()
        log.info("reader_resynced", recommitted=len(missing), offset=self.next_offset)

    def _tick(self, token: str, meta: ClientProgress, quiet: float) -> bool:
        """Once per idle tick: check the lease and the session; re-consume if responses exist
        that this consumer has not been given for RESUBSCRIBE_AFTER seconds (True then)."""
        if not self.progress.is_reader(token):
            raise self._taken_over()
        self.check()
        if meta.done <= self.seen.count or quiet <= RESUBSCRIBE_AFTER:
            return False
        # after a RabbitMQ restart a stream consumer can be cancelled, or never served,
        # silently: first re-consume from where this reader stopped, then from the start
        # of the stream (seen ids are skipped, so nothing is handed out twice)
        self.resubscribes += 1
        if self.resubscribes > 1:
            self.next_offset = 0
        log.warning("stream_resubscribe", stream=self.source.stream, offset=self.next_offset)
        self.close()
        return True

    def commit_due(self) -> float | None:
        """Never: a durable read commits as it hands out."""
        return None

    def commit_pending(self) -> None:
        """Nothing is left to commit (see `commit_due`)."""

    def close(self) -> None:
        """Release the consumer; deliveries not handed out are redelivered to the next one."""
        self.source.close()
        self.inbox.clear()

    def _hand_out(
        self, delivery: Delivery, seen: Bitmap, token: str
    ) -> Generator[Response, None, int]:
        """Yield a batch's first-seen responses, then commit them; returns how many.

        A caller that stops in the middle of a batch has exactly the responses it was given
        committed, and the batch goes back to the front of the cursor: `new_only` is exact
        per response, not per batch. With `commit_each`, every response is committed as the
        caller takes the next one (exact even when the caller is killed). A commit Redis
        did not take is raised after the cursor moved: `_resync` makes it up.
        """
        offset = self.next_offset if delivery.offset is None else delivery.offset
        batch = decode_as(delivery.body, self.max_bytes, ResponseBatch)
        given: list[int] = []
        handed = 0
        finished = False
        try:
            for response in batch.responses:
                if not self.ids.plausible(response.id):
                    self.forged += 1
                    log.warning("response_dropped", id=response.id, why="never sent")
                    continue
                if not seen.add(response.id):
                    self.duplicates += 1
                    continue
                given.append(response.id)  # before the yield: the caller has it
                handed += 1
                yield response
                if self.commit_each:
                    committed, given = given, []
                    self._commit(token, offset, committed)
            finished = True
        finally:
            if not finished:
                self.inbox.appendleft(delivery)  # its other responses are handed out next
                try:
                    self.progress.commit_read(token, offset, given)
                except REDIS_LOST:
                    self.unsynced = True  # the next read re-commits them (from `seen`)
        self.next_offset = offset + 1
        try:
            self._commit(token, offset + 1, given)
        finally:
            delivery.ack()  # the stream's credit, also when Redis failed
        return handed

    def _commit(self, token: str, next_offset: int, ids: list[int]) -> None:
        try:
            taken = self.progress.commit_read(token, next_offset, ids)
        except REDIS_LOST:
            self.unsynced = True
            raise
        if not taken:
            raise self._taken_over()

    def _complete(self, meta: ClientProgress, seen: Bitmap, target: StreamTarget) -> bool:
        if target.until_done is not None:
            return seen.count >= target.until_done
        goal = meta.total if meta.sealed else (target.sent_here or None)
        if goal is None:
            return False
        return seen.count >= goal and seen.count_below(goal) >= goal

    def _taken_over(self) -> ReaderTakenOver:
        return ReaderTakenOver(
            f"another reader took over client id {self.progress.client_id!r}; "
            "only one reader per client id at a time"
        )
