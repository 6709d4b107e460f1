"""The Celery peer: RabbitMQ broker, Redis result backend (`BENCH_QUEUE`, `BENCH_ACKS_LATE`)."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery(
    "bench", broker="amqp://guest:guest@localhost:5672//", backend="redis://localhost:6379/0"
)
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench-celery"),
    result_expires=120,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("BENCH_ACKS_LATE") == "1":
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1)


@app.task
def echo(value: object) -> object:
    """Return the value."""
    return value


@app.task
def nap(seconds: float) -> list[float]:
    """Sleep `seconds`; return [pid, wall start, wall end] (as soafarm's nap service)."""
    began = time.time()
    time.sleep(seconds)
    return [os.getpid(), began, time.time()]
