"""The servers fail mid-batch: RabbitMQ stop_app/start_app and kill -9, Redis (AOF everysec)
restarted cleanly and killed. Each a durable batch of 20,000 calls, every response exactly once
afterwards; the module's private servers, never the machine's."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.chaos.harness import Fault, Stage, rabbitmq_kill, rabbitmq_stop_app, redis_restart

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]


@pytest.mark.parametrize(
    ("name", "fault"),
    [
        ("RabbitMQ stop_app/start_app x2", rabbitmq_stop_app),
        ("RabbitMQ kill -9, started again x2", rabbitmq_kill),
        ("Redis (AOF) shutdown, started again x2", lambda: redis_restart(kill=False)),
        ("Redis (AOF) kill -9, started again x2", lambda: redis_restart(kill=True)),
    ],
    ids=["rabbitmq-stop-app", "rabbitmq-kill", "redis-restart", "redis-kill"],
)
def test_server_fails_twice_mid_batch(name: str, fault: Callable[[], Fault], stage: Stage) -> None:
    stage.durable(name, [(0.2, fault()), (0.6, fault())])
