"""Reading a durable client id's responses from its RabbitMQ stream, each exactly once.

A stream is never consumed destructively: a reader starts at the first offset (every
response) or at the offset its predecessor committed (`new_only`), and skips responses it has
already handed out with a bitmap of request ids, so a request that ran twice (an instance
killed mid-batch) still shows once. After each batch the reader commits the ids and the next
offset to Redis, guarded by a reader lease: a second reader of the same client id takes over
and the first one's next commit fails with `ReaderTakenOver`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import structlog
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from soafarm.config import Settings
from soafarm.errors import DecodeError, ReaderTakenOver, ResponseTimeout
from soafarm.protocol import CONTENT_TYPE, Response, ResponseBatch, decode
from soafarm.state.clients import ClientProgress, ProgressStore
from soafarm.transport.connections import close_quietly, kombu_connection

log = structlog.get_logger(__name__)

STREAM_PREFETCH = 64
IDLE_TICK = 0.5
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


class StreamReader:
    """One pass over a durable client id's responses."""

    def __init__(
        self,
        settings: Settings,
        stream: str,
        progress: ProgressStore,
        describe: Callable[[], str],
        check: Callable[[], None],
    ) -> None:
        """`describe()` gives the session status line used in timeout errors; `check()` raises
        if the session failed or closed (called once per idle tick)."""
        self.settings = settings
        self.stream = stream
        self.progress = progress
        self.describe = describe
        self.check = check
        self.next_offset = 0
        self.resubscribes = 0
        self.token: str | None = None
        self.seen = Bitmap()
        self.inbox: deque[Message] = deque()
        self.connection: Connection | None = None

    def responses(
        self,
        timeout: float | None,
        new_only: bool = False,
        target: StreamTarget | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[Response]:
        """Yield each response once; see the module docstring. `timeout` bounds the wait for
        the next response (None: no bound); `stop` ends the read early (response handlers).

        The reader is a cursor: a second call continues where the first stopped (a client
        that sends and reads in turns never re-reads the stream). `new_only` matters on the
        first call, which decides where the cursor starts.
        """
        target = target or StreamTarget()
        if self.token is None:
            self.token = self.progress.take_reader()
            meta = self.progress.load()
            if new_only:
                self.seen = Bitmap(self.progress.read_bitmap())
                self.next_offset = meta.read_offset or 0
        token = self.token
        meta = self.progress.load()
        last_progress = last_meta = last_delivery = time.monotonic()
        while not self._complete(meta, self.seen, target):
            if stop is not None and stop.is_set():
                return
            if self.connection is None:
                self.connection = self._consume(self.next_offset, self.inbox)
            if not self._drain(self.connection):
                # RabbitMQ restarted or the link dropped: resume after the last batch read
                self.close()
                continue
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
            if timeout is not None and now - last_progress > timeout:
                raise ResponseTimeout(
                    f"no response for {timeout:g}s; {meta.done} of {meta.accepted} "
                    f"requests answered; {self.describe()}"
                )

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
        log.warning("stream_resubscribe", stream=self.stream, offset=self.next_offset)
        self.close()
        return True

    def close(self) -> None:
        """Release the consumer; deliveries not handed out are redelivered to the next one."""
        if self.connection is not None:
            close_quietly(self.connection)
        self.connection = None
        self.inbox.clear()

    @staticmethod
    def _drain(connection: Connection) -> bool:
        """Wait up to one tick for deliveries; False if the connection is gone."""
        try:
            connection.drain_events(timeout=IDLE_TICK)
        except TimeoutError:
            pass
        except connection.connection_errors:
            return False
        return True

    def _hand_out(
        self, message: Message, seen: Bitmap, token: str
    ) -> Generator[Response, None, int]:
        """Yield a batch's first-seen responses, then commit them; returns how many."""
        offset = int(message.headers.get("x-stream-offset", self.next_offset))
        fresh = [r for r in _batch(message.body, self.settings) if seen.add(r.id)]
        yield from fresh
        if not self.progress.commit_read(token, offset + 1, [r.id for r in fresh]):
            raise self._taken_over()
        message.ack()
        self.next_offset = offset + 1
        return len(fresh)

    def _complete(self, meta: ClientProgress, seen: Bitmap, target: StreamTarget) -> bool:
        if target.until_done is not None:
            return seen.count >= target.until_done
        goal = meta.total if meta.sealed else (target.sent_here or None)
        if goal is None:
            return False
        return seen.count >= goal and seen.count_below(goal) >= goal

    def _consume(self, offset: int, inbox: deque[Message]) -> Connection:
        connection = kombu_connection(self.settings)
        consumer = Consumer(
            connection.channel(),
            queues=[
                Queue(self.stream, no_declare=True, consumer_arguments={"x-stream-offset": offset})
            ],
            on_message=inbox.append,
            accept=[CONTENT_TYPE],
            prefetch_count=STREAM_PREFETCH,
        )
        consumer.consume()
        return connection

    def _taken_over(self) -> ReaderTakenOver:
        return ReaderTakenOver(
            f"another reader took over client id {self.progress.client_id!r}; "
            "only one reader per client id at a time"
        )


def _batch(body: bytes, settings: Settings) -> tuple[Response, ...]:
    batch = decode(body, settings.max_message_bytes)
    if not isinstance(batch, ResponseBatch):
        raise DecodeError(f"expected a response batch, got {type(batch).__name__}")
    return batch.responses
