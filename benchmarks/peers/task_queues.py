"""Run the Celery and Dramatiq peers: start their workers, time echo tasks, stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pika

URL = "amqp://guest:guest@localhost:5672/"
#: How the benchmark table names the Dramatiq peer, and its set-up.
DRAMATIQ = "Dramatiq"
DRAMATIQ_SETUP = "RabbitMQ broker, Redis results, 2 processes (default threads)"


class TaskQueuePeer:
    """A Celery or Dramatiq worker (2 processes) and its client."""

    def __init__(self, kind: str, acks_late: bool = False, threads: int | None = None) -> None:
        """`kind` is 'celery' or 'dramatiq'; `threads`, Dramatiq's threads per process (its
        default, 8, when None)."""
        self.kind = kind
        self.queue = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "BENCH_QUEUE": self.queue,
            "BENCH_ACKS_LATE": "1" if acks_late else "0",
        }
        os.environ.update({"BENCH_QUEUE": self.queue, "BENCH_ACKS_LATE": env["BENCH_ACKS_LATE"]})
        if kind == "celery":
            cmd = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.peers.celery_app",
                "worker",
                "--pool",
                "prefork",
                "-c",
                "2",
                "-Q",
                self.queue,
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
            from benchmarks.peers import celery_app

            celery_app.app.conf.task_default_queue = self.queue
            self.task: Any = celery_app.echo
            self.nap_task: Any = celery_app.nap
        else:
            cmd = [
                sys.executable,
                "-m",
                "dramatiq",
                "benchmarks.peers.dramatiq_app",
                "--processes",
                "2",
                *(["--threads", str(threads)] if threads is not None else []),
            ]
            import importlib

            from benchmarks.peers import dramatiq_app

            importlib.reload(dramatiq_app)  # the actor's queue comes from BENCH_QUEUE
            self.task = dramatiq_app.echo
            self.nap_task = dramatiq_app.nap
        self.worker = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.call(0, timeout=60)  # ready when it answers

    def call(self, value: object, timeout: float = 60) -> object:
        """One task, waited for."""
        if self.kind == "celery":
            return self.task.delay(value).get(timeout=timeout)
        return self.task.send(value).get_result(block=True, timeout=int(timeout * 1000))

    def throughput(self, n: int) -> float:
        """Tasks/s for `n` tasks sent back to back, then every result read."""
        start = time.perf_counter()
        if self.kind == "celery":
            pending = [self.task.delay(i) for i in range(n)]
            for p in pending:
                p.get(timeout=300)
        else:
            messages = [self.task.send(i) for i in range(n)]
            for m in messages:
                m.get_result(block=True, timeout=300_000)
        return n / (time.perf_counter() - start)

    def nap_batch(self, seconds: Sequence[float]) -> tuple[float, list[list[float]]]:
        """Enqueue one `nap` task per entry of `seconds`, all at once, then read every result:
        (seconds from the first enqueue to the last result, each task's [pid, start, end])."""
        start = time.perf_counter()
        if self.kind == "celery":
            pending = [self.nap_task.delay(s) for s in seconds]
            spans = [p.get(timeout=300) for p in pending]
        else:
            messages = [self.nap_task.send(s) for s in seconds]
            spans = [m.get_result(block=True, timeout=300_000) for m in messages]
        # results are read in enqueue order, so the last read ends once every task is done
        return time.perf_counter() - start, spans

    def latencies(self, n: int) -> list[float]:
        """Milliseconds per task, one at a time."""
        out = []
        for i in range(n):
            start = time.perf_counter()
            self.call(i)
            out.append((time.perf_counter() - start) * 1000)
        return out

    def close(self) -> None:
        """Stop the worker and delete the queues it made."""
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()
        connection = pika.BlockingConnection(pika.URLParameters(URL))
        for queue in (self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"):
            channel = connection.channel()
            channel.queue_delete(queue)
        connection.close()
