"""`python -m benchmarks.fence [--rounds N]`: what the per-user fences cost a session.

A user that is not the farm's gets a Redis account per session (`broker.redis_fence`) and
sends through the RabbitMQ-fenced path; the farm's own user does neither. This starts a
private RabbitMQ and Redis (`EmbeddedServers`), a farm on them and a user `alice`, then
measures in turns, farm user then alice: a session's life (create, one echo call, close)
and 100 sequential echo calls in an open session. Prints each side's median and the ratio
alice / farm.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from benchmarks.common import render_pair
from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.local.embedded import EmbeddedServers, free_port
from soafarm.local.farm import LocalFarm, delete_namespace


def session_life_ms(settings: Settings) -> float:
    """Create a session, run one echo call, close it: milliseconds."""
    began = time.perf_counter()
    with (
        Session.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("echo", "x")
        list(client.get_responses(timeout=60))
    return (time.perf_counter() - began) * 1000


def sequential_p50_ms(settings: Settings, n: int) -> float:
    """p50 of `n` sequential echo calls in one open session, in ms."""
    samples = []
    with Session.create(SessionStartInfo("echo"), settings) as session:
        session.wait_for_instances(1)
        with BrokerClient(session) as client:
            for _ in range(n):
                began = time.perf_counter()
                client.send_request("echo", "x")
                list(client.get_responses(timeout=60))
                samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def main() -> None:
    """Measure in turns and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    base = load_settings().replace(
        namespace=f"bench-fence-{uuid.uuid4().hex[:6]}",
        log_level="warning",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    embedded = EmbeddedServers(base)
    with embedded as farm:
        users = {"farm user": farm, "alice (fenced)": embedded.add_user(farm, "alice")}
        try:
            with LocalFarm(farm, workers=1, cores=2):
                for settings in users.values():  # warm-up: the service is imported once
                    session_life_ms(settings)
                figures: dict[tuple[str, str], list[float]] = {}
                for _ in range(args.rounds):
                    for who, settings in users.items():
                        life = ("session life: create, 1 call, close (ms)", who)
                        figures.setdefault(life, []).append(session_life_ms(settings))
                for _ in range(3):
                    for who, settings in users.items():
                        calls = ("sequential echo p50, 100 calls (ms)", who)
                        figures.setdefault(calls, []).append(sequential_p50_ms(settings, 100))
        finally:
            delete_namespace(farm)
    title = f"fenced user vs the farm's, in turns (median, min-max), {args.rounds} session lives"
    print(render_pair(figures, list(users), title))


if __name__ == "__main__":
    main()
