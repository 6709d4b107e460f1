"""Isolated services (worker.isolate_services, worker.service_user): the service code runs in
a process of its own that holds none of the farm's credentials, real servers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import site
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.processes import farm_processes
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import os

class Probe:
    def __init__(self, context):
        self.context = context
        self.table = context.common_data("table")

    def probe(self):
        try:
            with open(f"/proc/{os.getppid()}/environ", "rb") as f:
                parent_environ = "read" if f.read() is not None else ""
        except OSError as e:
            parent_environ = type(e).__name__
        return {
            "uid": os.getuid(),
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "environment": dict(os.environ),
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "parent_environ": parent_environ,
            "table": self.table,
        }

    def later(self):  # common data read in a call, after the constructor
        return self.context.common_data("table")

    def boom(self):
        raise ValueError("boom")

    def die_once(self, marker):  # the service process dies mid-call, the first time
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return os.getpid()
"""


@pytest.fixture
def services() -> Iterator[Path]:
    """A service folder every user may read (a service user must import from it)."""
    folder = Path(tempfile.mkdtemp(prefix="soafarm-isolated-"))
    folder.chmod(0o755)
    (folder / "probe.py").write_text(PROBE)
    (folder / "probe.toml").write_text('entry_point = "probe:Probe"\n')
    for path in folder.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def readable(root: Path) -> Iterator[None]:
    """Let every user list `root` (Python's importer lists the folders on its path) and pass
    through its parents while the block runs: a clean clone may sit in a 0700 temporary
    folder. The modes are put back."""
    changed: list[tuple[Path, int]] = []
    for folder, bits in [(root, stat.S_IROTH | stat.S_IXOTH)] + [
        (parent, stat.S_IXOTH) for parent in root.parents
    ]:
        mode = folder.stat().st_mode
        if mode & bits != bits:
            folder.chmod(mode | bits)
            changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in changed:
            folder.chmod(stat.S_IMODE(mode))


def isolated(settings: Settings, folder: Path, **worker: Any) -> Settings:
    return settings.replace(
        service_registration_path=(folder, *settings.service_registration_path),
        worker=dataclasses.replace(settings.worker, **worker),
    )


def probe(settings: Settings) -> dict[str, Any]:
    """What the service reports, and (as `instances`) the farm's instance processes while
    its session is open (an instance exits when its session closes)."""
    info = SessionStartInfo("probe", max_units=1, common_data={"table": [1, 2, 3]})
    with Session.create(info, settings) as session, BrokerClient(session) as client:
        client.send_request("probe")
        client.send_request("boom")
        client.send_request("nothing")
        client.send_request("later")
        client.end_requests()
        responses = {r.id: r for r in client.get_responses(timeout=60)}
        instances = [p.pid for p in farm_processes(settings.namespace) if p.role == "instance"]
    assert responses[1].fault is not None and responses[1].fault.type == "ValueError"
    assert responses[2].fault is not None and responses[2].fault.type == "UnknownOperation"
    assert responses[3].result == [1, 2, 3]
    result: dict[str, Any] = {**responses[0].result, "instances": instances}
    return result


def test_isolated_service_code_holds_none_of_the_farms_credentials(
    settings: Settings, services: Path
) -> None:
    s = isolated(settings, services, isolate_services=True)
    with LocalFarm(s, workers=1, cores=2):
        seen = probe(s)
    # a process of its own, the instance's child
    assert seen["ppid"] in seen["instances"] and seen["pid"] not in seen["instances"]
    # nothing of the host's environment, no URL, no settings file
    environment: dict[str, str] = seen["environment"]
    assert not [k for k in environment if k.startswith("SOAFARM")]
    assert not [v for v in environment.values() if "amqp" in v or "redis://" in v]
    # stdin, stdout, stderr, its control socket, one socket per call, and listdir's own
    assert len(seen["fds"]) <= 3 + 1 + 2 + 1, seen["fds"]
    # common data comes through the instance
    assert seen["table"] == [1, 2, 3]


def test_a_service_user_runs_the_service_code_as_another_os_user(
    settings: Settings, services: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs the service as another user: run the suite as root")
    # an interpreter the other user may run (the suite's may be under /root), with the
    # suite's packages and soafarm on its path
    python = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    path = os.pathsep.join([*site.getsitepackages(), str(ROOT)])
    (services / "probe.toml").write_text(
        f'entry_point = "probe:Probe"\n[environment]\nPYTHONPATH = "{path}"\n'
    )
    s = isolated(settings, services, service_user="nobody", service_python=python)
    with readable(ROOT), LocalFarm(s, workers=1, cores=2):
        seen = probe(s)
    assert seen["uid"] == 65534
    # the instance (root, not dumpable) is out of reach
    assert seen["parent_environ"] == "PermissionError"
    assert not [k for k in seen["environment"] if k.startswith("SOAFARM")]


@pytest.mark.parametrize(
    ("worker", "why"),
    [
        (
            {"service_user": "no-such-user-here"},
            "worker.service_user 'no-such-user-here' is not a user on this host",
        ),
        (
            {"isolate_services": True, "service_python": "/bin/false"},
            "the service process (/bin/false) exited with code 1 before its service loaded",
        ),
    ],
    ids=["unknown user", "interpreter that cannot start it"],
)
def test_a_service_process_that_cannot_start_is_a_clear_load_error(
    settings: Settings, services: Path, worker: dict[str, Any], why: str
) -> None:
    s = isolated(settings, services, **worker)
    with (
        LocalFarm(s, workers=1, cores=2),
        Session.create(SessionStartInfo("probe", common_data={"table": []}), s) as session,
    ):
        wait_until("the load error recorded", lambda: session.refresh().load_errors, timeout=30)
        (error,) = session.refresh().load_errors.values()
    assert why in error


def test_a_service_process_that_dies_mid_call_is_replaced_and_the_request_answered(
    settings: Settings, services: Path, tmp_path: Path
) -> None:
    s = isolated(settings, services, isolate_services=True)
    marker = tmp_path / "died"
    info = SessionStartInfo("probe", max_units=1, common_data={"table": []})
    with (
        LocalFarm(s, workers=1, cores=2),
        Session.create(info, s) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("die_once", str(marker))
        client.end_requests()
        (response,) = list(client.get_responses(timeout=60))
    # the instance exited with its service process; the host started another, and RabbitMQ
    # redelivered the request to it
    assert marker.exists()
    assert response.fault is None and isinstance(response.result, int)
