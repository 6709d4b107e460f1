"""Readers and senders ride out RabbitMQ and Redis restarts, exactly once; when they give up
it is one line, exit 3 and a resume command; interactive clients learn their session is lost.

Every fault here lands on private servers (`private_servers_for`), started once for the
module and restarted by the tests; each test has a namespace and a farm of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import soafarm.client.session
from soafarm import BrokerClient, DurableSession, Response, Session, SessionStartInfo
from soafarm.cli import cli
from soafarm.config import Settings, load_settings
from soafarm.errors import BrokerUnavailable, SessionFailed
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.names import Names
from soafarm.state.sessions import SessionStore
from soafarm.transport.connections import redis_client
from tests.conftest import PrivateServers, cli_env, private_servers_for
from tests.integration.test_cli import assert_one_line_error
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

N = 3000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def servers_of_module() -> Iterator[PrivateServers]:
    """One private RabbitMQ and Redis for the module (each starts in ~5 s)."""
    base = load_settings(environ={}).replace(namespace=f"test-{uuid.uuid4().hex[:10]}")
    with private_servers_for(base) as private:
        yield private


@pytest.fixture
def private(servers_of_module: PrivateServers) -> Iterator[PrivateServers]:
    """The module's servers, both up, with settings in a namespace of this test's own."""
    servers = servers_of_module
    for name in ("RabbitMQ", "Redis"):  # an earlier test that failed may have left one down
        servers.start(name)
    with contextlib.suppress(Exception):
        servers.rabbitmqctl("start_app")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    s = servers.settings.replace(
        namespace=namespace,
        # more, smaller messages: a fault lands mid-batch, and both instances work
        client=dataclasses.replace(servers.settings.client, request_batch_size=20),
    )
    yield PrivateServers(servers.servers, s)
    with contextlib.suppress(Exception):
        delete_namespace(s)


def with_client(s: Settings, **values: object) -> Settings:
    return s.replace(client=dataclasses.replace(s.client, **values))


def sealed_batch(session: Session, client_id: str, seconds: float = 0.001) -> BrokerClient:
    client = BrokerClient(session, client_id)
    for i in range(N):
        client.send_request("sleep", seconds, user_data=i)
    client.end_requests()
    return client


def assert_each_once(ids: list[int], n: int = N) -> None:
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} responses handed out twice"
    assert sorted(ids) == list(range(n)), f"{n - len(set(ids))} responses missing"


def soafarm_child(
    s: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "soafarm", *args],
        env={**cli_env(s), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def broker_answers(session: Session) -> bool:
    try:
        session.refresh()
    except BrokerUnavailable:
        return False
    return True


def ids_in(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


class Handler:
    """A response handler that records what it is given, and any error."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.errors: list[BaseException] = []

    def __call__(self, response: Response) -> None:
        self.ids.append(response.id)


def test_durable_readers_and_a_handler_ride_out_rabbitmq_stop_app(
    private: PrivateServers,
) -> None:
    s = private.settings
    with (
        LocalFarm(s, workers=1, cores=2),
        DurableSession.create(SessionStartInfo("faulty"), s) as session,
    ):
        reader = sealed_batch(session, "reader")
        handled = sealed_batch(session, "handled")
        handler = Handler()
        handled.set_response_handler(handler, on_error=handler.errors.append)
        reading = reader.get_responses(timeout=60)
        got = [next(reading).id for _ in range(300)]
        wait_until("the handler's first responses", lambda: len(handler.ids) >= 300)
        assert reader.status().done < N, "the batch finished before the fault"
        private.rabbitmqctl("stop_app")
        private.rabbitmqctl("start_app")
        got += [r.id for r in reading]
        wait_until("every response handled", lambda: len(handler.ids) >= N or handler.errors)
        assert handler.errors == []
        assert_each_once(got)
        assert_each_once(handler.ids)
        reader.close()
        handled.close()
        session.close()


def test_responses_follow_and_get_responses_ride_out_a_rabbitmq_kill(
    private: PrivateServers, tmp_path: Path
) -> None:
    s = private.settings
    out = tmp_path / "a.jsonl"
    with (
        LocalFarm(s, workers=1, cores=2),
        DurableSession.create(SessionStartInfo("faulty"), s) as session,
    ):
        sealed_batch(session, "a", seconds=0.002).close()
        library = sealed_batch(session, "b", seconds=0.002)
        follow = soafarm_child(
            s, "responses", str(session.id), "--client-id", "a", "--follow", "--output", str(out)
        )
        reading = library.get_responses(timeout=60)
        got = [next(reading).id for _ in range(300)]
        wait_until("the CLI's first responses", lambda: len(ids_in(out)) >= 300)
        assert library.status().done < N, "the batch finished before the fault"
        private.kill("RabbitMQ")
        private.start("RabbitMQ")
        got += [r.id for r in reading]
        _, stderr = follow.communicate(timeout=90)
        assert follow.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert f"{N} response(s), 0 fault(s)" in stderr
        assert_each_once(ids_in(out))
        assert_each_once(got)
        library.close()
        session.close()


def test_sender_and_reader_ride_out_redis_restarts_and_a_resumed_read_repeats_nothing(
    private: PrivateServers,
) -> None:
    s = private.settings
    with (
        LocalFarm(s, workers=1, cores=2),
        DurableSession.create(SessionStartInfo("faulty"), s) as session,
    ):
        client = BrokerClient(session, "r")
        restart = threading.Thread(target=private.restart, args=("Redis",))
        for i in range(N):
            client.send_request("sleep", 0.0005, user_data=i)
            if i == N // 3:
                restart.start()  # a clean restart (the AOF is written) while sending
            time.sleep(0.0002)  # a producer's own work: the restart overlaps the sends
        restart.join()
        client.end_requests()
        reading = client.get_responses(timeout=60)
        got = [next(reading).id for _ in range(N // 3)]
        private.restart("Redis", kill=True)  # kill -9: the AOF lacks up to its last second
        got += [r.id for r in reading]
        assert_each_once(got)
        client.close()
        # what the reader committed survived: a new_only read repeats nothing
        with BrokerClient(session, "r") as again:
            assert list(again.get_responses(timeout=30, new_only=True)) == []
        session.close()


def test_responses_gives_up_with_exit_3_and_its_resume_command_finishes_exactly_once(
    private: PrivateServers, tmp_path: Path
) -> None:
    s = private.settings
    out = tmp_path / "out.jsonl"
    with (
        LocalFarm(s, workers=1, cores=2),
        DurableSession.create(SessionStartInfo("faulty"), s) as session,
    ):
        sealed_batch(session, "default", seconds=0.002).close()
        sid = str(session.id)
        follow = soafarm_child(
            s,
            "responses",
            sid,
            "--follow",
            "--output",
            str(out),
            env={"SOAFARM_CLIENT_RECONNECT_TIMEOUT": "2"},
        )
        wait_until("the first responses", lambda: len(ids_in(out)) >= 300)
        private.rabbitmqctl("stop_app")
        try:
            _, stderr = follow.communicate(timeout=60)
        finally:
            private.rabbitmqctl("start_app")
        gave_up = subprocess.CompletedProcess(follow.args, follow.returncode, "", stderr)
        assert_one_line_error(
            gave_up, 3, "lost the connection to RabbitMQ", "gave up after", "resume with:"
        )
        written = ids_in(out)
        assert 300 <= len(written) < N
        resume = re.search(r"resume with: (.+)$", stderr, re.MULTILINE)
        assert resume is not None
        command = shlex.split(resume.group(1))
        assert command[:2] == ["soafarm", "responses"]
        assert command[2:] == [
            sid, "--client-id", "default", "--new-only", "--follow", "--output", str(out),
            "--append",
        ]  # fmt: skip
        wait_until("the broker daemon back on RabbitMQ", lambda: broker_answers(session))
        resumed = soafarm_child(s, *command[1:])
        _, stderr = resumed.communicate(timeout=90)
        assert resumed.returncode == 0, stderr
        assert_each_once(ids_in(out))
        session.close()


def test_an_interactive_client_learns_its_session_is_lost_in_a_rabbitmq_restart(
    private: PrivateServers,
) -> None:
    s = private.settings
    with LocalFarm(s, workers=1, cores=2), Session.create(SessionStartInfo("faulty"), s) as session:
        client = BrokerClient(session, "i")
        for i in range(N):
            client.send_request("sleep", 0.002, user_data=i)
        client.flush()
        reading = client.get_responses(timeout=120)
        got = [next(reading).id for _ in range(100)]
        began = time.monotonic()
        private.rabbitmqctl("stop_app")
        private.rabbitmqctl("start_app")
        with pytest.raises(SessionFailed, match=f"session {session.id} .*(gone|lost)"):
            got += [r.id for r in reading]
        assert time.monotonic() - began < 30
        assert len(got) == len(set(got)) < N
        with pytest.raises(SessionFailed, match=f"session {session.id}"):
            client.send_request("sleep", 0.002)
            client.flush()
        client.close()  # drops what could not be sent, quietly


def test_a_call_that_fails_on_redis_closes_its_session(
    private: PrivateServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = with_client(private.settings, reconnect_timeout=1.0)
    closing = threading.Event()
    close = soafarm.client.session.close_best_effort

    def close_when_redis_is_back(
        settings: Settings, session_id: int, limit: float = 30.0
    ) -> BaseException | None:
        closing.set()  # the call failed: Redis comes back for the close
        return close(settings, session_id, limit)

    monkeypatch.setattr(soafarm.client.session, "close_best_effort", close_when_redis_is_back)
    store = SessionStore(redis_client(s), Names(s.namespace))
    result: list[Result] = []
    with LocalFarm(s, workers=1, cores=2):
        env = cli_env(s)
        call = threading.Thread(
            target=lambda: result.append(
                CliRunner().invoke(cli, ["call", "faulty", "sleep", "5"], env=env)
            )
        )
        call.start()
        wait_until("the call's session", store.open_ids)
        (sid,) = store.open_ids()
        # the create's answer is in: the call's client attaches right after it
        wait_until("the call's client", lambda: store.clients(sid))
        private.kill("Redis")  # wherever the call is now, it fails on Redis
        assert closing.wait(30), "the call did not fail"
        private.start("Redis")
        call.join(60)
        (invoked,) = result
        assert invoked.exit_code == 3, invoked.output
        assert "Traceback" not in invoked.output
        (line,) = [x for x in invoked.output.splitlines() if x.startswith("soafarm: error:")]
        assert "Redis" in line and "could not be closed" not in line
        assert sid not in store.open_ids()  # closed before the call exited
    store.close()
