"""`soafarm services test` and `soafarm diagnose` as a user runs them: real processes, real
servers, exit codes, and no session left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.state.hosts import HostStore
from soafarm.state.records import HostRecord
from soafarm.transport.connections import redis_client
from tests.conftest import cli_env
from tests.integration.test_cli import soafarm

pytestmark = pytest.mark.integration

CHECKS = [
    "rabbitmq",
    "redis",
    "broker",
    "hosts",
    "echo-service",
    "round-trip",
    "throughput",
    "session-closed",
]

GOOD = """
class Good:
    def __init__(self, context):
        self.host = context.host_name

    def ping(self):
        return "pong"
"""
BROKEN = "import nosuchmodule_for_diagnostics\n"
# a library only the hosts of pool "gpu" have: the import fails everywhere else
GPU_ONLY = """
import os

if os.environ.get("SOAFARM_WORKER_POOL") != "gpu":
    raise ImportError("libcuda.so.1: cannot open shared object file (no GPU on this host)")


class GpuOnly:
    def run(self):
        return "ran on a GPU host"
"""


def register(folder: Path, name: str, entry_point: str, module: str, source: str) -> None:
    (folder / f"{module}.py").write_text(source)
    (folder / f"{name}.toml").write_text(f'entry_point = "{entry_point}"\n')


def lines_of(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """Check name -> (status, detail) of diagnose's stdout; every line is a check's."""
    out: dict[str, tuple[str, str]] = {}
    for line in result.stdout.splitlines():
        status, name, detail = line.split(maxsplit=2)
        out[name] = (status, detail)
    return out


def open_sessions(settings: Settings) -> list[object]:
    listed = soafarm(settings, "sessions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    sessions: list[object] = json.loads(listed.stdout)
    return sessions


def test_services_test_shows_what_loads_where(settings: Settings, farm: LocalFarm) -> None:
    folder = settings.service_registration_path[0]
    register(folder, "good", "good:Good", "good", GOOD)
    register(folder, "broken", "broken_mod:Broken", "broken_mod", BROKEN)
    register(folder, "gpuonly", "gpu_only:GpuOnly", "gpu_only", GPU_ONLY)
    farm.add_worker("gpu-host", cores=1, pool="gpu")
    default_host = next(c.host_id for c in farm.children if c.host_id not in (None, "gpu-host"))

    result = soafarm(settings, "services", "test", "--json")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = [x for x in result.stderr.splitlines() if x.startswith("soafarm: error:")]
    assert "service broken loads on no host" in error
    assert "gpuonly" not in error and "good" not in error
    matrix = json.loads(result.stdout)
    assert sorted(matrix["hosts"]) == sorted([default_host, "gpu-host"])
    rows = matrix["services"]
    assert {h: cell["ok"] for h, cell in rows["good"].items()} == {
        default_host: True,
        "gpu-host": True,
    }
    assert rows["echo"]["gpu-host"]["ok"] is True
    for host in (default_host, "gpu-host"):
        assert rows["broken"][host]["ok"] is False
        assert "No module named 'nosuchmodule_for_diagnostics'" in rows["broken"][host]["error"]
    assert rows["gpuonly"]["gpu-host"] == {"ok": True, "error": "", "note": ""}
    assert rows["gpuonly"][default_host]["ok"] is False
    assert "libcuda.so.1" in rows["gpuonly"][default_host]["error"]
    assert matrix["nowhere"] == ["broken"]
    assert matrix["unanswered"] == {}

    table = soafarm(settings, "services", "test")
    assert table.returncode == 1
    row = next(x for x in table.stdout.splitlines() if x.startswith("broken "))
    assert row.split()[1:] == ["error", "error"]
    assert f"error: gpuonly on {default_host}: " in table.stdout
    assert "FAIL: broken loads on no host" in table.stdout

    chosen = soafarm(settings, "services", "test", "good", "gpuonly")
    assert chosen.returncode == 0, chosen.stderr
    assert [x.split()[0] for x in chosen.stdout.splitlines()[1:3]] == ["good", "gpuonly"]
    assert "broken" not in chosen.stdout


def test_services_test_names_a_host_that_does_not_answer(
    settings: Settings, farm: LocalFarm
) -> None:
    # a live host without a prober (an older soafarm, or one that is stuck)
    client = redis_client(settings)
    try:
        HostStore(client, Names(settings.namespace)).beat(
            HostRecord("silent-host", "nowhere", 1, 1, time.time()), timeout=60.0
        )
    finally:
        client.close()

    result = soafarm(settings, "services", "test", "echo", "--timeout", "3")

    assert result.returncode == 1, result.stderr
    assert "host silent-host did not answer within 3s" in result.stderr
    assert "loads on no host" not in result.stderr  # the real host loaded echo
    assert "no answer: host silent-host did not answer within 3s" in result.stdout
    echo_row = next(x for x in result.stdout.splitlines() if x.startswith("echo "))
    assert sorted(echo_row.split()[1:]) == ["?", "ok"]


def test_diagnose_on_a_healthy_farm(settings: Settings, farm: LocalFarm) -> None:
    result = soafarm(settings, "diagnose", "--requests", "500", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_of(result)
    assert list(checks) == CHECKS
    assert {status for status, _ in checks.values()} == {"ok"}, result.stdout
    assert "1 live host(s), 2 core(s)" in checks["hosts"][1]
    assert "500 requests in" in checks["throughput"][1]
    assert "responses/s" in checks["throughput"][1]
    assert "no session of this run is open" in checks["session-closed"][1]
    assert open_sessions(settings) == []

    as_json = soafarm(settings, "diagnose", "--requests", "200", "--json", timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    assert [c["status"] for c in report["checks"]] == ["ok"] * len(CHECKS)
    assert report["checks"][6]["requests"] == 200 and report["checks"][6]["per_second"] > 0
    assert open_sessions(settings) == []


def assert_failed_cleanly(result: subprocess.CompletedProcess[str], *failed: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list(lines_of(result)) == CHECKS  # one line per check, nothing else
    (error,) = [x for x in result.stderr.splitlines() if x.startswith("soafarm: error:")]
    assert f"checks failed ({', '.join(failed)})" in error


def test_diagnose_without_a_broker(settings: Settings) -> None:
    result = soafarm(settings, "diagnose")

    assert_failed_cleanly(result, "broker", "hosts")
    checks = lines_of(result)
    assert checks["rabbitmq"][0] == "ok" and checks["redis"][0] == "ok"
    assert checks["broker"] == (
        "FAIL",
        f"no broker daemon consumes {settings.namespace}.control; start one with "
        "`soafarm broker` or `soafarm up` (or check --namespace)",
    )
    assert checks["round-trip"] == ("skip", "skipped (needs broker, hosts)")
    assert checks["throughput"] == ("skip", "skipped (needs round-trip)")
    assert checks["session-closed"] == ("skip", "skipped (no session was created)")


def test_diagnose_with_a_bad_rabbitmq_url(settings: Settings, farm: LocalFarm) -> None:
    result = soafarm(settings, "diagnose", "--amqp-url", "amqp://guest:sekret@127.0.0.1:1/")

    assert_failed_cleanly(result, "rabbitmq")
    assert "sekret" not in result.stdout + result.stderr
    checks = lines_of(result)
    status, detail = checks["rabbitmq"]
    assert status == "FAIL"
    assert "cannot connect to RabbitMQ at amqp://guest:**@127.0.0.1:1/" in detail
    assert checks["broker"] == ("skip", "skipped (needs rabbitmq)")
    assert checks["hosts"][0] == "ok"  # Redis is fine, and so is the farm's host
    assert checks["round-trip"] == ("skip", "skipped (needs rabbitmq, broker)")
    assert checks["throughput"][0] == "skip"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_diagnose_stopped_mid_run_closes_its_session(
    settings: Settings, farm: LocalFarm, stop_signal: signal.Signals
) -> None:
    # a shell's background job starts with SIGINT ignored, and Python would keep it so:
    # the command runs through a wrapper that restores the default first
    wrapper = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    with subprocess.Popen(
        [sys.executable, "-c", wrapper, "-m", "soafarm", "diagnose", "--requests", "5000000"],
        env=cli_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            seen = ""
            for line in proc.stdout:  # blocks on the next line: the session exists after it
                seen += line
                if "round-trip" in line:
                    break
            assert "ok    round-trip" in seen, seen
            assert len(open_sessions(settings)) == 1  # the throughput batch is under way
            proc.send_signal(stop_signal)
            assert proc.wait(timeout=60) == 130
            err = proc.stderr.read()
            assert "soafarm: interrupted" in err and "Traceback" not in err
        finally:
            if proc.poll() is None:
                proc.kill()
    assert open_sessions(settings) == []
