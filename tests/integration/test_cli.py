"""The `soafarm` command as a user runs it: real processes, real servers, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from soafarm.config import AutoscalerSettings, PoolSettings, Settings
from soafarm.local.farm import LocalFarm
from tests.conftest import cli_env

pytestmark = pytest.mark.integration


def soafarm(
    settings: Settings,
    *args: str,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "soafarm", *args],
        env={**cli_env(settings), **(env or {})},
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *parts: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    error_lines = [x for x in result.stderr.splitlines() if x.startswith("soafarm: error:")]
    assert len(error_lines) == 1, result.stderr
    for part in parts:
        assert part in error_lines[0], (part, error_lines[0])


def test_unreachable_rabbitmq_names_masked_url(settings: Settings) -> None:
    result = soafarm(settings, "sessions", "list", "--amqp-url", "amqp://guest:sekret@127.0.0.1:1/")
    assert_one_line_error(result, 3, "cannot connect to RabbitMQ", "amqp://guest:**@127.0.0.1:1/")
    assert "sekret" not in result.stderr


def test_unreachable_redis_names_masked_url(settings: Settings) -> None:
    result = soafarm(settings, "broker", "--redis-url", "redis://:sekret@127.0.0.1:1/0")
    assert_one_line_error(result, 3, "cannot connect to Redis", "redis://:**@127.0.0.1:1/0")
    assert "sekret" not in result.stderr


def test_no_broker_daemon(settings: Settings) -> None:
    result = soafarm(settings, "call", "echo", "echo", "hi")
    assert_one_line_error(result, 3, "no broker daemon is running", "soafarm up")


def test_bad_config_file(settings: Settings, tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/bad.toml"
    with open(path, "w") as fh:
        fh.write("nmespace = 'x'\n")
    result = soafarm(settings, "config", "show", "--config", path)
    assert_one_line_error(result, 2, "unknown setting 'nmespace'", "allowed:")


def test_autoscaler_rejects_bad_pools_in_one_line(
    settings: Settings, tmp_path: os.PathLike[str]
) -> None:
    # pools travel to the child as SOAFARM_AUTOSCALER_POOLS (JSON), validated there
    ec2 = settings.replace(autoscaler=AutoscalerSettings(pools=(PoolSettings("a", "ec2"),)))
    bad = soafarm(ec2, "autoscaler")
    assert_one_line_error(bad, 2, "autoscaler pool 'a'", "'local' or 'kubernetes'")
    kube = settings.replace(
        autoscaler=AutoscalerSettings(
            pools=(PoolSettings("k", "kubernetes", kubernetes_context="nope"),)
        )
    )
    result = soafarm(kube, "autoscaler", env={"KUBECONFIG": f"{tmp_path}/missing-kubeconfig"})
    assert_one_line_error(result, 2, "kubernetes pool 'k'", "kubeconfig")


def test_worker_rejects_malformed_labels(settings: Settings) -> None:
    result = soafarm(settings, "worker", "--labels", "zone")
    assert_one_line_error(result, 2, "worker.labels", "key=value")


def test_call_sessions_and_hosts_against_a_farm(settings: Settings, farm: LocalFarm) -> None:
    ok = soafarm(settings, "call", "echo", "echo", "hello")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith(":hello")
    fault = soafarm(settings, "call", "faulty", "fail", "boom")
    assert_one_line_error(fault, 1, "ValueError: boom")
    unknown = soafarm(settings, "call", "nosuch", "op")
    assert_one_line_error(unknown, 1, "unknown service 'nosuch'", "registered:")
    hosts = soafarm(settings, "hosts", "--json")
    assert hosts.returncode == 0
    (host,) = json.loads(hosts.stdout)
    assert (host["cores"], host["pool"], host["draining"]) == (2, "default", False)
    assert 0 <= host["heartbeat_age"] < settings.worker.host_timeout
    table = soafarm(settings, "hosts")
    assert table.returncode == 0 and "default" in table.stdout, table.stdout
    assert json.loads(soafarm(settings, "sessions", "list", "--json").stdout) == []
    missing = soafarm(settings, "sessions", "close", "424242")
    assert_one_line_error(missing, 1, "no session 424242")


def test_demo_runs_and_reports_throughput(settings: Settings) -> None:
    result = soafarm(settings, "demo", "--requests", "3000", "--no-embedded", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3,000 requests, every response received once" in result.stdout
    assert "requests/s end to end" in result.stdout


def processes_of(namespace: str) -> list[int]:
    """Pids of live processes started with this test's namespace in their environment."""
    marker = f"SOAFARM_NAMESPACE={namespace}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return pids


@pytest.mark.parametrize(
    ("stop_signal", "extra"),
    [(signal.SIGINT, []), (signal.SIGTERM, ["--autoscale"])],
    ids=["ctrl-c", "sigterm-with-autoscaler"],
)
def test_up_runs_until_ctrl_c_then_stops_cleanly(
    settings: Settings, stop_signal: signal.Signals, extra: list[str]
) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "soafarm", "up", "--no-embedded", "--cores", "1", *extra],
        env=cli_env(settings),
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        try:
            seen = ""
            for line in proc.stderr:  # blocks on the next line: no sleeping, no polling
                seen += line
                if "soafarm is up" in line:
                    break
            assert "soafarm is up" in seen, seen
            up = soafarm(settings, "call", "echo", "echo", "through-up")
            assert up.returncode == 0 and up.stdout.strip().endswith(":through-up"), up.stderr
            proc.send_signal(stop_signal)
            rest = proc.stderr.read()
            assert proc.wait(timeout=60) == 0, rest
            assert "host_stopped" in rest and "Traceback" not in rest
        finally:
            if proc.poll() is None:
                proc.kill()
    after = soafarm(settings, "hosts", "--json")
    assert_one_line_error(after, 3, "no broker daemon is running")
    assert processes_of(settings.namespace) == [], "a farm process outlived `soafarm up`"


def test_tutorial_runs_as_written(settings: Settings) -> None:
    tutorial = Path(__file__).resolve().parents[2] / "docs" / "tutorial"
    with_tutorial = settings.replace(service_registration_path=(tutorial,))
    listed = soafarm(with_tutorial, "services", "list", "--json")
    assert "pricer" in [s["name"] for s in json.loads(listed.stdout)["services"]]
    with LocalFarm(with_tutorial, workers=1, cores=2):
        result = subprocess.run(
            [sys.executable, str(tutorial / "run_pricer.py")],
            env=cli_env(with_tutorial),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "200 options priced in session" in result.stdout
    first = float(result.stdout.splitlines()[0].split(":")[1])
    assert 20.0 < first < 30.0  # strike 80, spot 100, 20% vol, 1 year: about 24.6
