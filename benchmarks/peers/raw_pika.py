"""The raw AMQP limit: a minimal pika request/reply pair, one message per request.

One worker process (`python -m benchmarks.peers.raw_pika QUEUE`) answers each message on
its `reply_to` queue; transient messages, no publisher confirms, prefetch 100.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

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
        self.channel.basic_consume(self.reply, self._on_reply, auto_ack=True)

    def _on_reply(self, *args: object) -> None:
        self.got += 1

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
