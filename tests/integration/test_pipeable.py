"""Output an operator can pipe, and a fresh machine: plain tables in a pipe, JSON times and
limits, settings options before the command, live progress with rate and ETA, JSON-only
stderr, and the one-line error when the servers are neither running nor installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.embedded import free_port
from soafarm.local.farm import LocalFarm
from tests.conftest import cli_env
from tests.integration.test_cli import assert_one_line_error, soafarm

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Box drawing and the ellipsis rich puts where it cuts a cell.
DRAWN = re.compile("[\u2500-\u257f\u2026]")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object (fails on a line that is not one)."""
    parsed = [json.loads(x) for x in text.splitlines() if x.strip()]
    assert all(isinstance(p, dict) for p in parsed), text
    return parsed


def moment(text: str) -> float:
    """An ISO-8601 UTC time the CLI printed, as seconds since the epoch."""
    assert text.endswith("Z"), text
    when = datetime.fromisoformat(text)
    assert when.tzinfo is not None and when.utcoffset() == UTC.utcoffset(None)
    return when.timestamp()


def elsewhere(settings: Settings) -> dict[str, str]:
    """An environment naming another namespace: what is found comes from the option."""
    return {"SOAFARM_NAMESPACE": f"{settings.namespace}-elsewhere"}


def test_piped_tables_are_plain_tab_separated_and_uncut(
    settings: Settings, farm: LocalFarm
) -> None:
    with Session.create(SessionStartInfo("echo", max_units=1), settings) as session:
        session.wait_for_instances(1)
        listed = soafarm(settings, "sessions", "list")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()
        assert header.split("\t") == [
            "id",
            "service",
            "kind",
            "state",
            "activity",
            "units",
            "allocated/target",
            "age",
            "owner",
            "why",
        ]
        (row,) = rows
        cells = row.split("\t")
        assert len(cells) == 10
        assert cells[:4] == [str(session.id), "echo", "interactive", "running"]
        assert cells[5] == "core 1..1"
        assert not DRAWN.search(listed.stdout), listed.stdout

        hosts = soafarm(settings, "hosts")
        assert hosts.returncode == 0, hosts.stderr
        header, *rows = hosts.stdout.splitlines()
        assert header.split("\t")[3] == "instances (session: run/assigned)"
        host_ids = [h["id"] for h in json.loads(soafarm(settings, "hosts", "--json").stdout)]
        assert [r.split("\t")[0] for r in rows] == host_ids  # whole ids, however long
        assert rows[0].split("\t")[3] == f"{session.id}: 1/1"
        assert not DRAWN.search(hosts.stdout), hosts.stdout


def test_json_times_are_iso_utc_and_unbounded_limits_null(
    settings: Settings, farm: LocalFarm
) -> None:
    before = time.time()
    with Session.create(SessionStartInfo("echo"), settings) as session:
        session.wait_for_instances(1)
        (listed,) = json.loads(soafarm(settings, "sessions", "list", "--json").stdout)
        assert before - 1 <= moment(listed["created"]) <= time.time() + 1
        assert listed["max_units"] is None  # "all": no upper bound
        assert listed["min_units"] == 1

        shown = json.loads(soafarm(settings, "sessions", "show", str(session.id)).stdout)
        assert shown["created"] == listed["created"]
        assert shown["max_units"] is None
        started = [moment(i["started"]) for i in shown["instances"]]
        assert started and all(before - 1 <= t <= time.time() + 1 for t in started)
        assert moment(shown["status"]["written"]) >= moment(shown["created"])
        assert shown["broker_settings"]["client_idle_timeout"] == 300.0  # a real limit

        (host,) = json.loads(soafarm(settings, "hosts", "--json").stdout)
        assert moment(host["started"]) <= moment(host["beat"]) <= time.time() + 1
        # durations stay seconds
        assert isinstance(host["uptime"], float) and isinstance(host["heartbeat_age"], float)


def test_settings_options_before_the_command(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    ns = settings.namespace
    with Session.create(SessionStartInfo("echo"), settings) as session:
        front = soafarm(
            settings, "--namespace", ns, "sessions", "list", "--json", env=elsewhere(settings)
        )
        assert front.returncode == 0, front.stderr
        assert [s["id"] for s in json.loads(front.stdout)] == [session.id]
        # given before and after, the one after (nearer the command) wins
        both = soafarm(
            settings,
            "--namespace",
            "nosuch",
            "sessions",
            "show",
            str(session.id),
            "--namespace",
            ns,
        )
        assert json.loads(both.stdout)["id"] == session.id

    config = tmp_path / "farm.toml"
    config.write_text(f'namespace = "{ns}"\n')
    # SOAFARM_NAMESPACE would win over the file: the environment has none
    env = {k: v for k, v in cli_env(settings).items() if k != "SOAFARM_NAMESPACE"}
    hosts = subprocess.run(
        [sys.executable, "-m", "soafarm", "--config", str(config), "hosts", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert hosts.returncode == 0, hosts.stderr
    (host,) = json.loads(hosts.stdout)

    # nested groups: the option before `hosts`, before the action, or after it
    drained = soafarm(
        settings, "--namespace", ns, "hosts", "drain", host["id"], env=elsewhere(settings)
    )
    assert drained.returncode == 0, drained.stderr
    assert f"host {host['id']} is draining" in drained.stdout
    back = soafarm(
        settings, "--namespace", "nosuch", "hosts", "--namespace", ns, "online", host["id"]
    )
    assert back.returncode == 0, back.stderr
    assert f"host {host['id']} is online" in back.stdout


def sleepy_batch(settings: Settings) -> int:
    """A durable batch of 60 calls of 0.1 s and 2 faults, sealed; the session id."""
    with DurableSession.create(SessionStartInfo("faulty"), settings) as session:
        with BrokerClient(session) as client:
            for i in range(60):
                client.send_request("sleep", 0.1, user_data=i)
            client.send_request("fail", "one", user_data="f1")
            client.send_request("fail", "two", user_data="f2")
            client.end_requests()
        return session.id


PROGRESS = re.compile(
    r"client default: 62/62 responses, 2 fault\(s\), ([\d,]+\.\d) responses/s, ETA 0s"
)


def test_follow_shows_faults_rate_and_eta(settings: Settings, farm: LocalFarm) -> None:
    sid = str(sleepy_batch(settings))  # 3 s of work on 2 cores: attach sees it run
    followed = soafarm(settings, "attach", sid, "--follow")
    assert followed.returncode == 0, followed.stderr
    final = PROGRESS.search(followed.stderr)
    assert final, followed.stderr
    assert float(final.group(1).replace(",", "")) > 0
    assert "default\t62\t62\t2\t0\tyes\tyes" in followed.stdout  # the table, piped

    read = soafarm(settings, "responses", sid, "--follow")
    assert read.returncode == 0, read.stderr
    assert len(json_lines(read.stdout)) == 62  # stdout carries the data only
    assert PROGRESS.search(read.stderr), read.stderr
    assert "62 response(s), 2 fault(s)" in read.stderr

    # the same as JSON events
    as_json = soafarm(settings, "--log-format", "json", "attach", sid, "--follow", "--json")
    assert as_json.returncode == 0, as_json.stderr
    events = json_lines(as_json.stderr)
    (last,) = [e for e in events if e["event"] == "progress"][-1:]
    assert (last["completed"], last["total"], last["faults"], last["eta"]) == (62, 62, 2, 0.0)
    assert moment(json.loads(as_json.stdout)["created"]) > 0


def test_json_logs_leave_nothing_but_json_on_stderr(settings: Settings) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nothing listens there
    result = soafarm(
        settings, "--log-format", "json", "namespace", "delete", "--yes", "--amqp-url", nowhere
    )
    assert result.returncode == 3, result.stderr
    events = json_lines(result.stderr)
    assert any(str(e.get("logger", "")).startswith("pika") for e in events), result.stderr
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["exit_code"] == 3 and "cannot connect to RabbitMQ" in error["error"]

    env = {"SOAFARM_LOG_FORMAT": "json"}
    demo = soafarm(settings, "demo", "--requests", "200", "--no-embedded", env=env, timeout=120)
    assert demo.returncode == 0, demo.stderr
    json_lines(demo.stderr)
    assert "200 requests, every response received once" in demo.stdout


def test_up_banners_are_json_events(settings: Settings) -> None:
    env = {**cli_env(settings), "SOAFARM_LOG_FORMAT": "json"}
    with subprocess.Popen(
        [sys.executable, "-m", "soafarm", "up", "--no-embedded", "--cores", "1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        lines = []
        try:
            for line in proc.stderr:  # blocks on the next line: no sleeping, no polling
                lines.append(line)
                if '"farm_up"' in line:
                    break
            proc.send_signal(2)  # SIGINT, as Ctrl-C
            lines.extend(proc.stderr.read().splitlines())
            assert proc.wait(timeout=60) == 0, lines
        finally:
            if proc.poll() is None:
                proc.kill()
    events = json_lines("\n".join(lines))
    up = next(e for e in events if e["event"] == "farm_up")
    assert up["namespace"] == settings.namespace and "soafarm is up" in up["message"]
    assert any(e["event"] == "farm_stopping" for e in events)


def test_fresh_machine_without_servers_names_the_packages(
    settings: Settings, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    nowhere = settings.replace(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    result = subprocess.run(
        [sys.executable, "-m", "soafarm", "demo", "--requests", "10"],
        env={**cli_env(nowhere), "PATH": str(empty)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # (Debian's RabbitMQ scripts are found off PATH, in /usr/lib/rabbitmq/bin, if installed)
    assert_one_line_error(
        result,
        3,
        "redis-server",
        "not installed",
        "apt-get install rabbitmq-server redis-server",
        "SOAFARM_AMQP_URL",
        "SOAFARM_REDIS_URL",
        "--redis-url",
    )


def test_a_server_that_cannot_start_says_what_to_install(
    settings: Settings, tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "rabbitmq-server"
    script.write_text('#!/bin/sh\necho "erl: not found" >&2\nexit 127\n')
    script.chmod(0o755)
    nowhere = settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    # the CLI in a process of its own, with Debian's script folder pointed away from the real
    # one, so the fake on PATH is the rabbitmq-server it finds
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import soafarm.local.embedded as embedded\n"
        f"embedded.RABBITMQ_SCRIPTS = Path({str(tmp_path / 'none')!r})\n"
        "from soafarm.cli import main\n"
        "sys.argv = ['soafarm', 'demo', '--requests', '10']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**cli_env(nowhere), "PATH": f"{fake}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert_one_line_error(
        result,
        3,
        "cannot start a private RabbitMQ",
        "exited with code 127",
        "erl: not found",
        "console.log",
        "apt-get install rabbitmq-server",
        "SOAFARM_AMQP_URL (--amqp-url)",
    )
