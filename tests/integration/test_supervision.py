"""Supervision against the real servers: crashed farm processes come back, nothing outlives
`soafarm up`, a namespace has one farm, killed instances are replaced at once, and an
instance that outgrows `worker.instance_max_memory` is recycled without losing a request."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.client.control import ControlClient
from soafarm.config import Settings, with_section
from soafarm.errors import BrokerUnavailable
from soafarm.local.farm import LocalFarm
from soafarm.processes import farm_processes
from soafarm.state.control import HostsArgs, PingArgs
from tests.conftest import cli_env
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# --- processes, read from /proc -------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def instances_of(host: int, settings: Settings) -> set[int]:
    """The live instance processes a worker host runs (not its fork servers)."""
    procs = farm_processes(settings.namespace)
    return {p.pid for p in procs if p.role == "instance" and p.ppid == host}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except FileNotFoundError:
        return ""


def broker_answers(settings: Settings) -> bool:
    control = ControlClient(settings)
    try:
        control.request(PingArgs(), timeout=2)
        return True
    except BrokerUnavailable:
        return False
    finally:
        control.close()


def host_ids(settings: Settings) -> list[str]:
    control = ControlClient(settings)
    try:
        return [h.record.id for h in control.request(HostsArgs()).items]
    except BrokerUnavailable:
        return []
    finally:
        control.close()


def assert_each_once(responses: list, n: int) -> None:  # type: ignore[type-arg]
    ids = [r.id for r in responses]
    assert len(ids) == len(set(ids)), "a response was handed out twice"
    assert sorted(ids) == list(range(n)), f"{n - len(set(ids))} responses missing"


# --- LocalFarm supervises -------------------------------------------------------------------
def test_a_killed_worker_host_and_broker_are_restarted_and_the_batch_goes_on(
    settings: Settings,
) -> None:
    n = 1200
    small = settings.replace(client=dataclasses.replace(settings.client, request_batch_size=20))
    with (
        LocalFarm(settings, workers=1, cores=2, supervise=True) as farm,
        DurableSession.create(SessionStartInfo("faulty"), small) as session,
    ):
        session.wait_for_instances(2)
        client = BrokerClient(session, "chaos")
        for i in range(n):
            client.send_request("sleep", 0.002, user_data=i)
        client.end_requests()
        wait_until("200 responses", lambda: client.status().done >= 200)

        host = dict(farm.procs)["worker 0"]
        (old_id,) = host_ids(settings)
        assert client.status().done < n, "the batch finished before the kill"
        host.send_signal(signal.SIGKILL)
        new_ids = wait_until(
            "the restarted worker host",
            lambda: (ids := host_ids(settings)) != [old_id] and ids,
            timeout=30,
        )
        assert new_ids == [f"{old_id}-restart1"], "the dead host is forgotten at once"

        broker = dict(farm.procs)["broker"]
        broker.send_signal(signal.SIGKILL)
        wait_until(
            "a new broker daemon",
            lambda: dict(farm.procs)["broker"].pid != broker.pid and broker_answers(settings),
            timeout=30,
        )
        assert_each_once(list(client.get_responses(timeout=120)), n)
        assert host_ids(settings) == new_ids
        assert farm.restarts == 2
        client.close()


# --- soafarm up -----------------------------------------------------------------------------
@pytest.fixture
def up(settings: Settings) -> Iterator[subprocess.Popen[str]]:
    """`soafarm up --no-embedded` (1 host of 1 core) in the test's namespace, as a subprocess
    with its stderr in a pipe."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "soafarm", "up", "--no-embedded", "--workers", "1", "--cores", "1"],
        env=cli_env(settings),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "soafarm is up" in line:
                break
        else:
            pytest.fail(f"soafarm up exited with {proc.wait()} before it was up")
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_soafarm_up_restarts_its_broker_refuses_a_second_farm_and_leaves_no_orphans(
    settings: Settings, up: subprocess.Popen[str]
) -> None:
    session = Session.create(SessionStartInfo("echo"), settings)
    try:
        session.wait_for_instances(1)
        # a second farm in the same namespace refuses, naming the namespace and the way out
        second = subprocess.run(
            [sys.executable, "-m", "soafarm", "up", "--no-embedded", "--workers", "0"],
            env=cli_env(settings),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1, second.stderr
        (message,) = second.stderr.strip().splitlines()
        assert settings.namespace in message and "--namespace" in message, message

        # the broker, SIGKILLed, comes back by itself
        children = descendants(up.pid)
        (broker,) = [p for p in children if cmdline(p).endswith("-m soafarm broker")]
        os.kill(broker, signal.SIGKILL)
        wait_until(
            "a new broker under soafarm up",
            lambda: (
                any(
                    cmdline(p).endswith("-m soafarm broker") for p in descendants(up.pid) - {broker}
                )
                and broker_answers(settings)
            ),
            timeout=20,
        )
        assert session.status()["state"] == "running"
        session.wait_for_instances(1)

        # SIGKILL soafarm up itself: broker, host and instance follow it
        everything = descendants(up.pid)
        kinds = {p.role for p in farm_processes(settings.namespace) if p.pid in everything}
        assert {"broker", "worker", "instance"} <= kinds, kinds
        assert len(everything) >= 3, [cmdline(p) for p in everything]
        up.kill()
        up.wait()
        started = time.monotonic()
        wait_until(
            "every child of soafarm up to stop",
            lambda: not any(alive(p) for p in everything),
            timeout=15,
        )
        assert time.monotonic() - started < 10
    finally:
        session.detach()
    assert up.stderr is not None
    assert "process_restarted" in up.stderr.read()


# --- instances ------------------------------------------------------------------------------
def test_a_killed_instance_is_replaced_within_a_second(settings: Settings, farm: LocalFarm) -> None:
    host = dict(farm.procs)["worker 0"].pid
    with Session.create(SessionStartInfo("echo", min_units=2, max_units=2), settings) as session:
        session.wait_for_instances(2)
        gaps = []
        for _ in range(3):  # killed again and again: no back-off builds up
            before = instances_of(host, settings)
            assert len(before) == 2, [cmdline(p) for p in before]
            victim = min(before)
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # the host starts the replacement process at once (how soon it serves is the
            # interpreter's and the service's start-up, which a loaded machine stretches)
            wait_until(
                "the replacement instance process",
                lambda b=before: instances_of(host, settings) - b,
                timeout=10,
            )
            gaps.append(time.monotonic() - killed)
            wait_until(
                "the replacement to serve",
                lambda v=victim: (
                    len(pids := {i["pid"] for i in session.status()["instances"]}) == 2
                    and v not in pids
                ),
                timeout=30,
            )
        assert max(gaps) < 1.0, gaps
        with BrokerClient(session) as client:
            for i in range(50):
                client.send_request("echo", i, user_data=i)
            client.end_requests()
            assert sorted(r.user_data for r in client.get_responses(timeout=30)) == list(range(50))


LEAKER = """
import os, time

class Leaker:
    def __init__(self, context):
        self.kept = []

    def grow(self, mb):
        self.kept.append(b"x" * (mb * 1024 * 1024))  # written, so resident
        time.sleep(0.15)  # the instance looks at its memory every 0.1 s
        return os.getpid()
"""


@pytest.fixture
def leaker(settings: Settings) -> str:
    folder: Path = settings.service_registration_path[0]
    (folder / "leaker.py").write_text(LEAKER)
    (folder / "leaker.toml").write_text('entry_point = "leaker:Leaker"\n')
    return "leaker"


def test_an_instance_over_its_memory_limit_is_recycled_after_its_call(
    settings: Settings, leaker: str
) -> None:
    limited = with_section(settings, "worker", {"instance_max_memory": 200})
    n = 12
    with (
        LocalFarm(limited, workers=1, cores=1),
        Session.create(SessionStartInfo(leaker), limited) as session,
        BrokerClient(session) as client,
    ):
        session.wait_for_instances(1)
        for i in range(n):  # one batch of 12 calls, 40 MiB each: about 530 MiB in all
            client.send_request("grow", 40, user_data=i)
        client.end_requests()
        responses = list(client.get_responses(timeout=60))
    assert sorted(r.user_data for r in responses) == list(range(n)), "each answered once"
    per_pid = Counter(r.result for r in responses)
    # an instance holds ~50 MiB before it leaks: it passes 200 MiB at its 4th call, drains,
    # and the next takes the rest of the batch
    assert len(per_pid) >= 3, per_pid
    assert max(per_pid.values()) <= 5, per_pid
