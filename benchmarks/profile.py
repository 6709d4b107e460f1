"""Where the CPU goes: CPU seconds per component while a batch runs through the farm."""

from __future__ import annotations

import resource
import time

from benchmarks.common import cpu_seconds, pids_of
from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_profile(settings: Settings, farm: LocalFarm, n: int) -> dict[str, dict[str, float]]:
    """CPU seconds of client, broker, worker host + instances, RabbitMQ and Redis for one
    `n`-request echo batch, interactive and durable."""
    out: dict[str, dict[str, float]] = {}
    broker = next(p.pid for what, p in farm.procs if what == "broker")
    host = next(p.pid for what, p in farm.procs if what.startswith("worker"))
    for kind, label in ((Session, "interactive"), (DurableSession, "durable")):
        with kind.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as s:
            s.wait_for_instances(2)
            instances = [i["pid"] for i in s.status()["instances"]]
            groups = {
                "client": [],
                "broker daemon": [broker],
                "worker host + instances": [host, *instances],
                "RabbitMQ": pids_of("beam.smp"),
                "Redis": pids_of("redis-server"),
            }
            before = {g: sum(cpu_seconds(p) for p in ps) for g, ps in groups.items()}
            before["client"] = _client_cpu()
            start = time.perf_counter()
            with BrokerClient(s) as client:
                for i in range(n):
                    client.send_request("echo", "x", user_data=i)
                client.end_requests()
                assert sum(1 for _ in client.get_responses(timeout=300)) == n
            wall = time.perf_counter() - start
            after = {g: sum(cpu_seconds(p) for p in ps) for g, ps in groups.items()}
            after["client"] = _client_cpu()
            out[label] = {g: after[g] - before[g] for g in groups}
            out[label]["wall"] = wall
            if kind is DurableSession:
                s.close()
    return out


def render_profile(profile: dict[str, dict[str, float]], n: int) -> str:
    """The profile as text: CPU seconds and microseconds per request."""
    lines = [f"CPU per component for one {n:,}-request echo batch (2 cores in all):"]
    for label, row in profile.items():
        wall = row["wall"]
        parts = [
            f"{g} {cpu:.2f}s ({cpu / n * 1e6:.0f} us/req)" for g, cpu in row.items() if g != "wall"
        ]
        lines.append(f"  {label:<11} wall {wall:.2f}s: " + "; ".join(parts))
    return "\n".join(lines)
