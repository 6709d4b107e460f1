"""The raw AMQP limit: a minimal pika request/reply pair, one message per request.

One worker process (`python -m benchmarks.peers.raw_pika QUEUE`) answers each message on
its `reply_to` queue; transient messages, no publisher confirms, prefetch 100.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import pika

URL = "amqp://guest:guest@localhost:5672/"
#: How the benchmark table names this peer, and its set-up.
RAW_PIKA = "raw pika request/reply"
RAW_SETUP = "1 message per request, 1 worker process, transient, no confirms, prefetch 100"


def serve(queue: str) -> None:
    """The worker: echo every request back to its reply queue."""
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    channel.queue_declare(queue, auto_delete=True)
    channel.basic_qos(prefetch_count=100)

    def on_message(ch: object, method: object, props: pika.BasicProperties, body: bytes) -> None:
        channel.basic_publish(
            "", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id)
        )
        channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]

    channel.basic_consume(queue, on_message)
    print("ready", flush=True)
    channel.start_consuming()


class RawPika:
    """Client side, with its own worker process."""

    def __init__(self) -> None:
        """Start the worker and wait until it consumes."""
        self.queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peers.raw_pika", self.queue],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.worker.stdout is not None
        self.worker.stdout.readline()
        self.connection = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.connection.channel()
        self.reply = self.channel.queue_declare("", exclusive=True).method.queue
        self.got = 0
        #: Called after each reply (the windowed mode sends the next request from it).
        self._after_reply: Callable[[], None] | None = None
        self.channel.basic_consume(self.reply, self._on_reply, auto_ack=True)

    def _on_reply(self, *args: object) -> None:
        self.got += 1
        if self._after_reply is not None:
            self._after_reply()

    def _send(self, i: int) -> None:
        self.channel.basic_publish(
            "", self.queue, b"x", pika.BasicProperties(reply_to=self.reply, correlation_id=str(i))
        )

    def throughput(self, n: int) -> float:
        """Requests/s for `n` requests sent back to back, then all replies read."""
        self.got = 0
        start = time.perf_counter()
        for i in range(n):
            self._send(i)
        while self.got < n:
            self.connection.process_data_events(time_limit=1)
        return n / (time.perf_counter() - start)

    def windowed(self, n: int, window: int, timeout: float = 30.0) -> float:
        """Requests/s for `n` requests with at most `window` outstanding: each reply sends
        the next request (the LongRunning pattern of a client with a bounded window)."""
        self.got = 0
        sent = 0

        def top_up() -> None:
            nonlocal sent
            while sent < n and sent - self.got < window:
                self._send(sent)
                sent += 1

        # topping up from the reply callback keeps the window full without waiting for
        # process_data_events to return, as a response handler would
        self._after_reply = top_up
        try:
            start = time.perf_counter()
            top_up()
            deadline = start + timeout
            while self.got < n:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{self.got} of {n} replies after {timeout:g}s")
                self.connection.process_data_events(time_limit=1)
            return n / (time.perf_counter() - start)
        finally:
            self._after_reply = None

    def latencies(self, n: int) -> list[float]:
        """Milliseconds per round trip, one request at a time."""
        out = []
        for i in range(n):
            self.got = 0
            start = time.perf_counter()
            self._send(i)
            while not self.got:
                self.connection.process_data_events(time_limit=1)
            out.append((time.perf_counter() - start) * 1000)
        return out

    def close(self) -> None:
        """Stop the worker, drop the queues."""
        self.connection.close()
        self.worker.terminate()
        self.worker.wait()
        if self.worker.stdout is not None:
            self.worker.stdout.close()


if __name__ == "__main__":
    serve(sys.argv[1])
