"""`soafarm submit`, `attach`, `responses` and `sessions close --purge` as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, Response, SessionAttachInfo, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import SessionNotFound
from soafarm.local.farm import LocalFarm
from tests.integration.test_cli import assert_one_line_error, soafarm

pytestmark = pytest.mark.integration


def test_submit_sweep_then_collect_as_jsonl_and_csv(settings: Settings, farm: LocalFarm) -> None:
    submitted = soafarm(
        settings, "submit", "echo", "--durable", "--sweep", "echo", "1:3000", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    info = json.loads(submitted.stdout)
    assert info["requests"] == 3000 and info["durable"] is True
    sid = str(info["session_id"])

    followed = soafarm(settings, "attach", sid, "--follow", "--json")
    assert followed.returncode == 0, followed.stderr
    (client,) = json.loads(followed.stdout)["clients"]
    assert (client["done"], client["finished"]) == (3000, True)

    lines = soafarm(settings, "responses", sid).stdout.splitlines()
    records = [json.loads(x) for x in lines]
    assert sorted(r["user_data"] for r in records) == list(range(1, 3001))
    assert all(r["result"].endswith(f":{r['user_data']}") for r in records)

    again = soafarm(settings, "responses", sid, "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(again)))
    assert len(rows) == 3000 and {r["status"] for r in rows} == {"ok"}
    assert soafarm(settings, "responses", sid, "--new-only").stdout == ""

    closed = soafarm(settings, "sessions", "close", sid)
    assert "responses stay readable" in closed.stdout
    assert len(soafarm(settings, "responses", sid).stdout.splitlines()) == 3000
    assert soafarm(settings, "sessions", "close", sid, "--purge").returncode == 0
    gone = soafarm(settings, "responses", sid)
    assert_one_line_error(gone, 1, f"session {sid} is closed")


def test_bad_input_is_refused_before_any_session_and_an_interrupted_batch_resumes(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    good = [{"op": "ok", "args": [i], "user_data": i} for i in range(50)]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([*map(json.dumps, good[:30]), "{not json", ""]))
    failed = soafarm(settings, "submit", "faulty", "--durable", "--input", str(broken))
    assert_one_line_error(failed, 2, "broken.jsonl:31: not valid JSON")
    empty = soafarm(settings, "submit", "faulty", "--durable", "--sweep", "ok", "10:1")
    assert_one_line_error(empty, 2, "--sweep ok 10:1 has no index")
    listed = soafarm(settings, "sessions", "list", "--json")
    assert json.loads(listed.stdout) == []  # nothing was created, nothing holds a unit

    # a submit stopped after 30 requests (the client was killed): resume with its command
    with DurableSession.create(SessionStartInfo("faulty"), settings) as session:
        with BrokerClient(session, "b") as client:
            for item in good[:30]:
                client.send_request(item["op"], *item["args"], user_data=item["user_data"])
        sid = str(session.id)
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text(
        "\n".join(json.dumps(x) for x in [*good, {"op": "fail", "args": ["no"], "user_data": "f"}])
    )
    resumed = soafarm(
        settings, "submit", "faulty", "--session", sid, "--client-id", "b", "--input", str(fixed)
    )
    assert resumed.returncode == 0, resumed.stderr
    out = soafarm(settings, "responses", sid, "--client-id", "b", "--follow", "--timeout", "30")
    records = [json.loads(x) for x in out.stdout.splitlines()]
    assert sorted(r["id"] for r in records) == list(range(51))
    assert [r["fault"]["type"] for r in records if "fault" in r] == ["ValueError"]
    assert "50 response(s)" not in out.stderr and "51 response(s), 1 fault(s)" in out.stderr


def test_submit_from_stdin_is_checked_whole_first(settings: Settings, farm: LocalFarm) -> None:
    lines = [json.dumps({"op": "ok", "args": [i]}) for i in range(20)]
    bad = soafarm(
        settings,
        "submit",
        "faulty",
        "--durable",
        "--input",
        "-",
        input_text="\n".join([*lines, "[1, 2]"]),
    )
    assert_one_line_error(bad, 2, "stdin:21: expected a JSON object")
    assert json.loads(soafarm(settings, "sessions", "list", "--json").stdout) == []
    ok = soafarm(
        settings,
        "submit",
        "faulty",
        "--durable",
        "--input",
        "-",
        "--json",
        input_text="\n".join(lines),
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["requests"] == 20


def test_unknown_session_is_named(settings: Settings, farm: LocalFarm) -> None:
    assert_one_line_error(soafarm(settings, "attach", "98765"), 1, "no session 98765")
    with pytest.raises(SessionNotFound, match="no session 98765"):
        DurableSession.attach(SessionAttachInfo(98765), settings)


def test_durable_response_handler_and_status(settings: Settings, farm: LocalFarm) -> None:
    got: list[Response] = []
    done = threading.Event()

    def on_response(response: Response) -> None:
        got.append(response)
        if len(got) == 1000:
            done.set()

    with DurableSession.create(SessionStartInfo("echo"), settings) as session:
        with BrokerClient(session, "h") as client:
            client.set_response_handler(on_response)
            for i in range(1000):
                client.send_request("echo", i, user_data=i)
            client.end_requests()
            assert done.wait(30)
            status = client.status()
        assert sorted(r.id for r in got) == list(range(1000))
        assert (status.accepted, status.total, status.sealed) == (1000, 1000, True)
        clients = session.status()["clients"]
        assert [(c["client_id"], c["done"]) for c in clients] == [("h", 1000)]
        session.close()


def test_responses_new_only_resumes_exactly_after_a_kill(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import cli_env
    from tests.waiting import wait_until

    submitted = soafarm(
        settings, "submit", "echo", "--durable", "--sweep", "echo", "1:20000", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    sid = str(json.loads(submitted.stdout)["session_id"])
    assert soafarm(settings, "attach", sid, "--follow", timeout=120).returncode == 0

    def ids(path: Path) -> list[int]:
        return [json.loads(x)["id"] for x in path.read_text().splitlines() if x.endswith("}")]

    parts: list[Path] = []
    for kill in range(3):  # SIGKILLed three times while reading, like the run
        part = tmp_path / f"part{kill}.jsonl"
        parts.append(part)
        command = ["responses", sid, "--new-only", "--output", str(part)]
        reader = subprocess.Popen(
            [sys.executable, "-m", "soafarm", *command],
            env=cli_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def written(part: Path = part) -> bool:
            return part.exists() and len(ids(part)) > 2000

        wait_until("a few thousand responses written", written)
        reader.send_signal(signal.SIGKILL)
        reader.wait(10)
    last = tmp_path / "last.jsonl"
    parts.append(last)
    done = soafarm(settings, "responses", sid, "--new-only", "--output", str(last), timeout=120)
    assert done.returncode == 0, done.stderr
    got = [i for part in parts for i in ids(part)]
    assert set(got) == set(range(20000))
    # each kill can land between writing a response and recording it: at most one again
    assert len(got) - 20000 <= 3, len(got) - 20000
    assert soafarm(settings, "sessions", "close", sid, "--purge").returncode == 0
