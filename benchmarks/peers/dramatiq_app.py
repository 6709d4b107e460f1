"""The Dramatiq peer: RabbitMQ broker, Redis results backend (`BENCH_QUEUE`)."""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

broker = RabbitmqBroker(url="amqp://guest:guest@localhost:5672/")
broker.add_middleware(
    Results(backend=RedisBackend(url="redis://localhost:6379/0", namespace="bench-dramatiq"))
)
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, queue_name=os.environ.get("BENCH_QUEUE", "bench-dramatiq"))
def echo(value: object) -> object:
    """Return the value."""
    return value


@dramatiq.actor(store_results=True, queue_name=os.environ.get("BENCH_QUEUE", "bench-dramatiq"))
def nap(seconds: float) -> list[float]:
    """Sleep `seconds`; return [pid, wall start, wall end] (as soafarm's nap service)."""
    began = time.time()
    time.sleep(seconds)
    return [os.getpid(), began, time.time()]
