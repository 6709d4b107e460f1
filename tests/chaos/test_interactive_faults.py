"""The interactive side: what a client of an interactive session sees for each fault. Every
response exactly once, or one clear SoafarmError; never a batch that ends short without a
word, a response handed out twice, or a raw pika/redis exception."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.chaos.harness import (
    Fault,
    Stage,
    kill,
    rabbitmq_kill,
    rabbitmq_stop_app,
    redis_restart,
    run_interactive,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]


@pytest.mark.parametrize(
    ("name", "fault"),
    [
        ("interactive: SIGKILL an instance", lambda: kill("instance")),
        ("interactive: SIGKILL a worker host", lambda: kill("worker")),
        ("interactive: SIGKILL the broker daemon", lambda: kill("broker")),
        ("interactive: RabbitMQ stop_app/start_app", rabbitmq_stop_app),
        ("interactive: RabbitMQ kill -9", rabbitmq_kill),
        ("interactive: Redis (AOF) shutdown/start", lambda: redis_restart(kill=False)),
        ("interactive: Redis (AOF) kill -9", lambda: redis_restart(kill=True)),
    ],
    ids=[
        "instance",
        "worker",
        "broker",
        "rabbitmq-stop-app",
        "rabbitmq-kill",
        "redis",
        "redis-kill",
    ],
)
def test_what_an_interactive_client_sees(
    name: str, fault: Callable[[], Fault], stage: Stage
) -> None:
    run_interactive(stage, name, fault())


@pytest.mark.parametrize(
    ("name", "fault"),
    [
        ("interactive, while sending: RabbitMQ stop_app", rabbitmq_stop_app),
        ("interactive, while sending: Redis kill -9", lambda: redis_restart(kill=True)),
    ],
    ids=["rabbitmq-stop-app", "redis-kill"],
)
def test_what_an_interactive_client_sees_while_sending(
    name: str, fault: Callable[[], Fault], stage: Stage
) -> None:
    # 12,000 requests: the throttle holds the sender back, so the fault lands mid-send
    run_interactive(stage, name, fault(), while_sending=True)
