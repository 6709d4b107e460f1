"""The instance's side of an isolated service (soafarm.workers.sandbox): frames are bounded,
and an answer that is not the request's own response is a fault, never published as one."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Iterator

import msgpack
import pytest

from soafarm.errors import DecodeError
from soafarm.protocol import Request, Response, encode_response
from soafarm.workers.sandbox import (
    FRAME,
    IsolatedRunner,
    Sandbox,
    SandboxSpec,
    child_environment,
    recv_frame,
    send_frame,
)

LIMIT = 1 << 16


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_frame_over_the_limit_is_refused_before_it_is_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    send_frame(a, b"hello")
    assert recv_frame(b, 10) == b"hello"
    a.sendall(FRAME.pack(LIMIT + 1))  # announces more than allowed, sends none of it
    with pytest.raises(DecodeError, match="over the"):
        recv_frame(b, LIMIT)
    a.close()
    assert recv_frame(b, LIMIT) is None  # the other end closed


@contextlib.contextmanager
def runner_answering(answer: bytes) -> Iterator[IsolatedRunner]:
    """An IsolatedRunner whose 'service process' answers every call with `answer`."""
    ours, theirs = socket.socketpair()
    sandbox = Sandbox.__new__(Sandbox)
    sandbox.spec = SandboxSpec(
        service="s",
        version=None,
        registration_path=[],
        session_id=1,
        host_name="h",
        instance_id="i",
        include_detail=True,
        max_message_bytes=LIMIT,
        max_common_data_bytes=LIMIT,
        resend_limit=3,
        log_format="console",
        log_level="info",
    )
    sandbox.limit = LIMIT + 4096
    sandbox.calls = queue.SimpleQueue()
    sandbox.calls.put(ours)

    def child() -> None:
        while recv_frame(theirs, LIMIT) is not None:
            send_frame(theirs, answer)

    thread = threading.Thread(target=child, daemon=True)
    thread.start()
    try:
        yield IsolatedRunner(sandbox, frozenset({"echo"}), True, LIMIT, 3)
    finally:
        ours.close()  # the child reads the end of its input, and stops
        thread.join(timeout=5)
        theirs.close()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (msgpack.packb([False, encode_response(Response(99, "x", None, None))]), "request 99"),
        (msgpack.packb("garbage"), "garbage"),
        (b"\xc1", "undecodable"),
        (msgpack.packb([False, b"\xc1"]), "undecodable"),
    ],
    ids=["another request's response", "wrong shape", "not msgpack", "bad response"],
)
def test_an_answer_that_is_not_the_requests_response_is_a_fault(answer: bytes, why: str) -> None:
    with runner_answering(answer) as runner:
        outcome = runner.run(Request(7, "echo", ("x",), {}, None))
    assert outcome.request_id == 7 and outcome.faulted
    assert b"ServiceProcessError" in outcome.body and why.encode() in outcome.body


def test_the_requests_own_response_is_passed_through() -> None:
    body = encode_response(Response(7, "x", None, "tag"))
    with runner_answering(msgpack.packb([False, body])) as runner:
        outcome = runner.run(Request(7, "echo", ("x",), {}, "tag"))
        unknown = runner.run(Request(8, "nope", (), {}, None))  # answered here
    assert outcome == (7, False, body)
    assert unknown.faulted and b"UnknownOperation" in unknown.body


def test_the_service_process_environment_holds_none_of_the_hosts_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOAFARM_AMQP_URL", "amqp://farm:secret@host/")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = child_environment({"SERVICE_FLAG": "1"})
    assert env["PATH"] == "/usr/bin" and env["SERVICE_FLAG"] == "1"
    assert "SOAFARM_AMQP_URL" not in env and "AWS_SECRET_ACCESS_KEY" not in env
