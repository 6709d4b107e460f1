"""Warm instances against the real servers: a worker host forks instances from fork servers
that have soafarm and the service imported; each still runs its constructor with its own
session's context and shares nothing with earlier sessions; the servers are bounded by
`worker.warm_instances` (0: off), follow changed service code, and losing one costs its
instances nothing."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings, with_section
from soafarm.local.farm import LocalFarm
from soafarm.processes import farm_processes
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

#: A service that reports what a fork server could carry over: module state, the process,
#: its random generator, its environment.
PROBE = """
import os, random, threading

CONSTRUCTED = []  # module state: the session ids whose constructor ran in this process


class Probe:
    def __init__(self, context):
        CONSTRUCTED.append(context.session_id)
        self.context = context

    def probe(self, _value=None):
        with open("/proc/self/comm") as comm:
            name = comm.read().strip()
        with open("/proc/self/cmdline", "rb") as cmdline:
            argv = cmdline.read().decode().split("\\0")
        return {
            "session": self.context.session_id,
            "constructed": list(CONSTRUCTED),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "name": name,
            "argv": argv,
            "random": random.random(),
            "flag": os.environ.get("PROBE_FLAG"),
            "version": VERSION,
        }

VERSION = "v1"
"""


def write_service(folder: Path, name: str, code: str = PROBE, environment: str = "") -> None:
    (folder / f"{name}.py").write_text(code)
    (folder / f"{name}.toml").write_text(
        f'entry_point = "{name}:Probe"\n'
        + (f"[environment]\n{environment}\n" if environment else "")
    )


def probe(settings: Settings, service: str) -> dict[str, Any]:
    """One session of `service`, one call: what its instance reports."""
    with (
        Session.create(SessionStartInfo(service, max_units=1), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("probe", None)
        (response,) = list(client.get_responses(timeout=60))
        result: dict[str, Any] = response.result
        return result


def roles(namespace: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in farm_processes(namespace):
        out.setdefault(p.role, []).append(p.pid)
    return out


def host_pid(namespace: str) -> int:
    (pid,) = roles(namespace)["worker"]
    return pid


def warm_servers(namespace: str) -> int:
    return len(roles(namespace).get("warm", []))


def farm_with(settings: Settings, warm_instances: int) -> LocalFarm:
    return LocalFarm(
        with_section(settings, "worker", {"warm_instances": warm_instances}), workers=1, cores=2
    )


@pytest.fixture
def folder(settings: Settings) -> Path:
    path: Path = settings.service_registration_path[0]
    return path


@pytest.fixture
def warm_farm(settings: Settings) -> Iterator[LocalFarm]:
    with farm_with(settings, 4) as running:
        yield running


def test_sessions_start_warm_and_share_nothing(
    settings: Settings, folder: Path, warm_farm: LocalFarm
) -> None:
    write_service(folder, "probe", environment='PROBE_FLAG = "set"')
    seen = [probe(settings, "probe") for _ in range(4)]
    host = host_pid(settings.namespace)
    for result in seen:
        # the constructor ran once in this process, with this session's context: nothing
        # of an earlier session's instance is here, though the module was imported before
        assert result["constructed"] == [result["session"]]
        assert result["flag"] == "set"
        assert result["ppid"] == host  # adopted by the host, which waits for it
    assert len({r["pid"] for r in seen}) == 4
    assert len({r["random"] for r in seen}) == 4  # each fork draws its own numbers
    # once the service was used here, its instances are forked from its own warm server
    assert all(r["name"] == "sf-instance" for r in seen[1:])
    wait_until("a generic and a service fork server", lambda: warm_servers(settings.namespace) == 2)


def test_warm_instances_bounds_the_servers(settings: Settings, folder: Path) -> None:
    for name in ("alpha", "beta", "gamma"):
        write_service(folder, name)
    with farm_with(settings, 1):
        for name in ("alpha", "beta", "gamma", "alpha"):
            assert probe(settings, name)["constructed"]
            # the generic server and one service's, whatever was used before: the one
            # evicted for it exits once its channel closes
            wait_until("at most two fork servers", lambda: warm_servers(settings.namespace) <= 2)
        wait_until("two fork servers", lambda: warm_servers(settings.namespace) == 2)


def test_zero_warm_instances_starts_every_instance_afresh(settings: Settings, folder: Path) -> None:
    write_service(folder, "probe")
    with farm_with(settings, 0):
        for _ in range(2):
            result = probe(settings, "probe")
            assert result["name"] != "sf-instance"
            assert "soafarm.workers.instance" in result["argv"]
        assert warm_servers(settings.namespace) == 0


def test_changed_service_code_is_imported_afresh(
    settings: Settings, folder: Path, warm_farm: LocalFarm
) -> None:
    write_service(folder, "probe")
    assert probe(settings, "probe")["version"] == "v1"
    assert probe(settings, "probe")["version"] == "v1"  # warm, from the service's server
    module = folder / "probe.py"
    module.write_text(PROBE.replace('VERSION = "v1"', 'VERSION = "v2"'))
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert probe(settings, "probe")["version"] == "v2"
    assert probe(settings, "probe")["version"] == "v2"


def test_a_service_that_starts_threads_on_import_stays_cold_and_serves(
    settings: Settings, folder: Path, warm_farm: LocalFarm
) -> None:
    code = (
        "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n"
    )
    write_service(folder, "threaded", code + PROBE)
    results = [probe(settings, "threaded") for _ in range(3)]
    assert all(r["constructed"] == [r["session"]] for r in results)
    # forked from the generic server each time: its own server was refused
    assert warm_servers(settings.namespace) == 1


def test_killed_fork_servers_leave_instances_serving(
    settings: Settings, folder: Path, warm_farm: LocalFarm
) -> None:
    write_service(folder, "probe")
    probe(settings, "probe")
    with (
        Session.create(SessionStartInfo("probe", max_units=1), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("probe", None)
        (first,) = list(client.get_responses(timeout=60))
        assert first.result["name"] == "sf-instance"
        servers = roles(settings.namespace)["warm"]
        assert len(servers) >= 2  # the generic server and probe's own
        for pid in servers:
            # a server's double fork shows its middle process (and the new child, until it
            # renames itself) under the server's name for an instant: already gone is fine
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            client.send_request("probe", None)
        later = list(client.get_responses(timeout=60))
        assert len(later) == 50
        assert {r.result["pid"] for r in later} == {first.result["pid"]}
    # the generic server comes back; new sessions are served
    wait_until("the generic server back", lambda: warm_servers(settings.namespace) >= 1)
    assert probe(settings, "probe")["constructed"]
