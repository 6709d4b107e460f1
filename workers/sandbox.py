"""Service code in a process of its own, without the farm's credentials
(`worker.isolate_services`, `worker.service_user`).

An instance holds the farm's AMQP and Redis credentials: it consumes the session's queue,
counts responses and publishes them. Service code run in that process could read them (its
environment, its settings in memory, its open sockets). Isolated, the instance starts the
service in a child interpreter (`python -m soafarm.workers.sandbox`) that gets:

- an environment of its own: the registration's `[environment]` and the few variables an
  interpreter needs, none of the host's (no `SOAFARM_*` URLs or settings file);
- no descriptor but its sockets to the instance: one for start-up and common data, one per
  call thread;
- optionally another OS user (`worker.service_user`), so it cannot read the host's files
  (its settings file) either.

The instance marks itself non-dumpable (`PR_SET_DUMPABLE` 0), so a process of the same
user, the service's among them, cannot read its memory or environment through `/proc`.

Each call goes to the child as one encoded request; the child runs it with the
registration's CallRunner and answers the encoded response, which the instance checks is
for that request (a service cannot answer, or count, another request) before it publishes
it. Frames are a 4-byte length and a body no larger than `max_message_bytes` (plus room
for the framing); nothing from the child is unpickled or evaluated. The child follows the
instance: SIGKILLed when the instance dies, it exits when its sockets close.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import queue
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import msgpack
import structlog

from soafarm.errors import DecodeError, RegistrationError, SoafarmError
from soafarm.logs import configure_logging
from soafarm.processes import follow_parent, with_parent
from soafarm.protocol import Fault, Request, decode_request, decode_response, encode_request
from soafarm.registration import Registry
from soafarm.registration.registry import load_service_class, service_context
from soafarm.service import CallRunner, Outcome, construct, operations_of

log = structlog.get_logger(__name__)

FRAME = struct.Struct("!I")
#: Room for a frame's own fields beside the largest request or response it carries.
FRAME_ALLOWANCE = 4096
#: The variables of the host's environment an interpreter needs; nothing else is passed.
KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "HOME", "TMPDIR")
#: Exit code of an instance whose service process died under it (as if the service had
#: crashed the instance itself: the host restarts it, RabbitMQ redelivers the batch).
EXIT_SERVICE_DIED = 7
_PR_SET_DUMPABLE = 4


class SandboxFailed(SoafarmError):
    """The isolated service process could not start its service (its reason is the
    message), or died."""


@dataclass(frozen=True)
class SandboxSpec:
    """What the isolated process is told at start-up (as JSON over its first socket)."""

    service: str
    version: str | None
    registration_path: list[str]
    session_id: int
    host_name: str
    instance_id: str
    include_detail: bool
    max_message_bytes: int
    max_common_data_bytes: int
    resend_limit: int
    log_format: str
    log_level: str


def send_frame(sock: socket.socket, body: bytes) -> None:
    """Send one frame: its length, then its body."""
    sock.sendall(FRAME.pack(len(body)) + body)


def recv_frame(sock: socket.socket, limit: int) -> bytes | None:
    """Receive one frame (None when the other end closed); a frame over `limit` bytes is a
    DecodeError, before any of it is read."""
    head = _recv_exactly(sock, FRAME.size)
    if head is None:
        return None
    (size,) = FRAME.unpack(head)
    if size > limit:
        raise DecodeError(f"frame of {size:,} bytes is over the {limit:,}-byte limit")
    return _recv_exactly(sock, size) if size else b""


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _pack(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return body


def _unpack(body: bytes, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            body, raw=False, strict_map_key=False, max_bin_len=limit, max_str_len=limit
        )
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise DecodeError(f"undecodable frame: {type(e).__name__}: {e}") from None


def make_non_dumpable() -> None:
    """Keep processes of this user (the isolated service's) out of this one's memory and
    environment: /proc/<pid>/mem, environ and ptrace need a dumpable process."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def child_environment(registration_environment: dict[str, str]) -> dict[str, str]:
    """The isolated process's environment: what an interpreter needs, then the
    registration's variables; none of the host's settings or credentials."""
    env = {k: os.environ[k] for k in KEPT_VARIABLES if k in os.environ}
    env.update(registration_environment)
    return with_parent(env)


class Sandbox:
    """The instance's side: starts the isolated process, serves its common-data reads, and
    hands out one call channel per call thread (`IsolatedRunner`)."""

    def __init__(
        self,
        spec: SandboxSpec,
        environment: dict[str, str],
        data_loader: Callable[[str], bytes],
        channels: int,
        *,
        user: str = "",
        python: str = "",
    ) -> None:
        """`data_loader(name)` returns common data `name` encoded (or raises SoafarmError);
        `channels`: how many calls may run at once; `user`: the OS user to run as;
        `python`: the interpreter (default: this process's)."""
        self.spec = spec
        self.data_loader = data_loader
        self.limit = spec.max_message_bytes + FRAME_ALLOWANCE
        ours, theirs = socket.socketpair()
        self.control = ours
        pairs = [socket.socketpair() for _ in range(channels)]
        self.calls: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        for mine, _ in pairs:
            self.calls.put(mine)
        passed = [theirs, *(other for _, other in pairs)]
        self.python = python or sys.executable
        argv = [self.python, "-m", "soafarm.workers.sandbox"]
        argv += [str(s.fileno()) for s in passed]
        make_non_dumpable()
        env = child_environment(environment)
        try:
            as_user = _as_user(user, env)
            self.process = subprocess.Popen(
                argv,
                env=env,
                pass_fds=[s.fileno() for s in passed],
                stdin=subprocess.DEVNULL,
                **as_user,
            )
        except OSError as e:  # the interpreter cannot be run (by that user)
            self._close_ours(pairs)
            who = f" as user {user!r}" if user else ""
            raise SandboxFailed(
                f"cannot start the service process{who} with {argv[0]}: {e.strerror or e}; "
                "set worker.service_python to an interpreter it can run"
            ) from None
        except BaseException:
            self._close_ours(pairs)
            raise
        finally:
            for s in passed:
                s.close()

    def _close_ours(self, pairs: list[tuple[socket.socket, socket.socket]]) -> None:
        self.control.close()
        for mine, _ in pairs:
            mine.close()

    def start(self) -> frozenset[str]:
        """Send the spec, serve common-data reads while the service loads; its operations,
        or SandboxFailed with why it did not load."""
        try:
            return self._start()
        except OSError:  # it exited first (its interpreter could not even import soafarm)
            raise self._exited() from None

    def _exited(self) -> SandboxFailed:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return SandboxFailed(
            f"the service process ({self.python}) exited with code {code} before "
            "its service loaded; its error is in the worker host's log (with "
            "worker.service_user, can that user read the interpreter, soafarm and the "
            "service's files?)"
        )

    def _start(self) -> frozenset[str]:
        send_frame(self.control, json.dumps(asdict(self.spec)).encode())
        while True:
            message = self._receive()
            if "operations" in message:
                operations = message["operations"]
                if not isinstance(operations, list) or not all(
                    isinstance(o, str) for o in operations
                ):
                    raise SandboxFailed("the service process sent no operation list")
                threading.Thread(target=self._serve_data, name="sandbox-data", daemon=True).start()
                return frozenset(operations)
            if "error" in message:
                raise SandboxFailed(str(message["error"]))
            self._answer_data(message)

    def _receive(self) -> dict[str, Any]:
        body = recv_frame(self.control, self.limit)
        if body is None:
            raise self._exited()
        message = _unpack(body, self.limit)
        if not isinstance(message, dict):
            raise SandboxFailed("the service process sent garbage")
        return message

    def _answer_data(self, message: dict[str, Any]) -> None:
        name = message.get("data")
        if not isinstance(name, str):
            raise SandboxFailed("the service process sent an unknown request")
        try:
            reply: dict[str, Any] = {"value": self.data_loader(name)}
        except SoafarmError as e:
            reply = {"error": str(e)}
        send_frame(self.control, _pack(reply))

    def _serve_data(self) -> None:
        """Common data asked for after the constructor (by a call): until the child ends."""
        with contextlib.suppress(OSError, SandboxFailed, DecodeError):
            while True:
                self._answer_data(self._receive())

    def call(self, request: Request) -> Outcome:
        """Run `request` in the isolated process; its outcome, checked to be for it."""
        body = encode_request(request, self.spec.max_message_bytes)
        sock = self.calls.get()
        try:
            send_frame(sock, body)
            reply = recv_frame(sock, self.limit)
        except OSError:
            reply = None
        finally:
            self.calls.put(sock)
        if reply is None:
            self._died()
        answer = _unpack(reply, self.limit)
        if not (isinstance(answer, list) and len(answer) == 2 and isinstance(answer[1], bytes)):
            raise DecodeError("the service process sent garbage for a call")
        faulted, response = answer
        decoded = decode_response(response, self.limit)
        if decoded.id != request.id or decoded.user_data != request.user_data:
            raise DecodeError(
                f"the service process answered request {request.id} with request "
                f"{decoded.id}'s response"
            )
        return Outcome(request.id, (decoded.fault is not None) or bool(faulted), response)

    def _died(self) -> NoReturn:
        code = self.process.poll()
        log.error("service_process_died", code=code)
        os._exit(EXIT_SERVICE_DIED)

    def close(self) -> None:
        """End the isolated process (its sockets close; it exits)."""
        with contextlib.suppress(OSError):
            self.control.close()
        while True:
            try:
                self.calls.get_nowait().close()
            except queue.Empty:
                break
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class IsolatedRunner(CallRunner):
    """A CallRunner whose service runs in the isolated process (`Sandbox.call`)."""

    def __init__(
        self,
        sandbox: Sandbox,
        operations: frozenset[str],
        include_detail: bool,
        limit: int,
        resend_limit: int,
        *,
        where: dict[str, Any] | None = None,
    ) -> None:
        """Like CallRunner's; the service itself is the sandbox's."""
        super().__init__(None, operations, include_detail, limit, resend_limit, where=where)
        self.sandbox = sandbox

    def run(self, request: Request) -> Outcome:
        """Run the request in the isolated process (unknown operations are answered here)."""
        unknown = self.unknown_operation(request)
        if unknown is not None:
            return unknown
        try:
            return self.sandbox.call(request)
        except DecodeError as e:
            return self._fault(request, Fault("ServiceProcessError", str(e)))


def _as_user(user: str, env: dict[str, str]) -> dict[str, Any]:
    """Popen arguments that run the child as OS user `user` (and its group), with `env`'s
    HOME made that user's."""
    if not user:
        return {}
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RegistrationError(
            f"worker.service_user {user!r} is not a user on this host"
        ) from None
    env["HOME"] = entry.pw_dir
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


# --- the isolated process -------------------------------------------------------------------


class _RemoteData:
    """The service's `context.common_data(name)`: asked of the instance over the control
    socket (one request at a time)."""

    def __init__(self, control: socket.socket, limit: int, data_limit: int) -> None:
        self.control = control
        self.limit = limit
        self.data_limit = data_limit
        self.lock = threading.Lock()

    def __call__(self, name: str) -> Any:
        with self.lock:
            send_frame(self.control, _pack({"data": name}))
            body = recv_frame(self.control, self.data_limit + FRAME_ALLOWANCE)
        if body is None:
            raise SoafarmError("the instance is gone")
        reply = _unpack(body, self.data_limit + FRAME_ALLOWANCE)
        if not isinstance(reply, dict) or "value" not in reply:
            raise SoafarmError(str(reply.get("error")) if isinstance(reply, dict) else "garbage")
        return _unpack(reply["value"], self.data_limit)


def _serve_calls(sock: socket.socket, runner: CallRunner, limit: int) -> None:
    while True:
        body = recv_frame(sock, limit + FRAME_ALLOWANCE)
        if body is None:
            os._exit(0)  # the instance closed its end: it is done
        outcome = runner.run(decode_request(body, limit))
        send_frame(sock, _pack([outcome.faulted, outcome.body]))


def main(argv: list[str]) -> int:
    """Entry point of the isolated process: its control socket's descriptor, then one per
    call thread."""
    follow_parent(9)  # SIGKILL when the instance dies: nothing of the service may linger
    if len(argv) < 2 or not all(a.isdigit() for a in argv):
        sys.stderr.write("soafarm.workers.sandbox is started by a service instance\n")
        return 2
    control, *calls = (socket.socket(fileno=int(a)) for a in argv)
    head = recv_frame(control, 1 << 20)
    if head is None:
        return 0
    spec = SandboxSpec(**json.loads(head))
    configure_logging(spec.log_format, spec.log_level)
    try:
        registry = Registry(tuple(Path(p) for p in spec.registration_path))
        registration = registry.resolve(spec.service, spec.version)
        cls = load_service_class(registration)
        reader = _RemoteData(control, spec.max_message_bytes, spec.max_common_data_bytes)
        context = service_context(
            registration, spec.session_id, spec.host_name, spec.instance_id, reader
        )
        service = construct(cls, context)
    except Exception as e:  # reported as the service's load error, with the session
        why = str(e) if isinstance(e, SoafarmError) else f"{type(e).__name__}: {e}"
        send_frame(control, _pack({"error": why}))
        return 1
    runner = CallRunner(
        service,
        operations_of(cls),
        spec.include_detail,
        spec.max_message_bytes,
        spec.resend_limit,
        where={"session_id": spec.session_id, "instance": spec.instance_id},
    )
    send_frame(control, _pack({"operations": sorted(runner.operations)}))
    for i, sock in enumerate(calls):
        threading.Thread(
            target=_serve_calls,
            args=(sock, runner, spec.max_message_bytes),
            name=f"call-{i}",
            daemon=True,
        ).start()
    # a call thread exits the process when the instance closes its socket; the control
    # socket is the common-data reads' (no thread may read it but theirs)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
