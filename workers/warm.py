"""Warm instances: fork servers that keep the interpreter, soafarm and used services imported.

A new interpreter that imports soafarm, pika and redis costs about half a second of a core
before a service's own import; a fork of a process that has done it costs a few
milliseconds. So a worker host keeps fork servers (`python -m soafarm.workers.warm`):

- one *generic* server, with soafarm imported: a service's first use on this host forks an
  instance from it, which imports the service itself (a "cold" start: fork + the service's
  import + its constructor);
- one *service* server per service used here recently (`worker.warm_instances` of them,
  least recently used first to go), forked from the generic one, with the service's
  registration environment set and its module imported: an instance forked from it only
  runs the constructor (a "warm" start).

A fork server never constructs a service, opens a connection or serves a request, so an
instance forked from it holds nothing of any session: each runs its service's constructor
with its own session's context, as a new interpreter would. A service whose import leaves
threads running is not kept warm (a fork copies only the forking thread, so the copy of
what the others hold would be inconsistent); nor is one whose registration or module file
changed since it was imported (the server exits at the next request, and the next instance
imports the new code).

Forks are double: the server's child forks the instance and exits, so the instance is
adopted by the host, a child subreaper (`soafarm.processes.become_subreaper`). The host
waits for it, reads its exit code and signals it exactly as one it started itself, and a
fork server can exit (evicted, crashed, killed) without touching its instances. An
instance arms its parent-death signal only once adopted, since it fires when the
intermediate exits too.

Host and servers talk over a Unix SOCK_SEQPACKET pair, one JSON message per packet; a
service server's socket is created by the host and passed through the generic one
(SCM_RIGHTS). Both ends are processes of the same host started from its own code.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import redis
import structlog

from soafarm.config import Settings, load_settings
from soafarm.errors import SoafarmError
from soafarm.logs import configure_logging
from soafarm.processes import (
    INSTANCE_PROCESS_NAME,
    SPARE_PROCESS_NAME,
    WARM_PROCESS_NAME,
    AdoptedProcess,
    ChildProcess,
    RestartPolicy,
    become_subreaper,
    follow_parent,
    follow_pid,
    name_process,
)
from soafarm.registration import Registration
from soafarm.registration.packages import farm_registry
from soafarm.registration.registry import load_service_class
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.workers import instance as instance_module
from soafarm.workers.instance import InstanceSpec, Prepared

log = structlog.get_logger(__name__)

#: Bytes one message may take (a spec is a few hundred).
MAX_MESSAGE = 65536
#: Seconds the host waits for a fork server to answer a fork; past it the server is killed
#: and the instance starts as a new interpreter.
REPLY_TIMEOUT = 5.0
#: Seconds between a waiting spare's turns of its AMQP connection (RabbitMQ drops a
#: connection that misses two heartbeats, 60 s apart by default).
SPARE_KEEPALIVE = 10.0
#: Seconds before a service whose import could not be kept warm is tried again.
REFUSED_RETRY = 60.0
#: Back-off for restarting the generic server when it keeps dying.
#: how far a file's mtime may lag the clock: the kernel stamps files from a coarse clock
#: (one tick, at most 10 ms), so a write just after a reading of time.time_ns() can carry
#: an earlier mtime
FILE_CLOCK_SLACK_NS = 20_000_000
#: the mtime recorded for a file that changed while it was imported: equal to no real
#: mtime, so the server reports itself stale at its first request
CHANGED_WHILE_IMPORTING = -2
GENERIC_RESTART_POLICY = RestartPolicy(base=1.0, cap=60.0, free_restarts=1, healthy_after=60.0)

ServiceKey = tuple[str, str | None]


def _send(channel: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(channel, [data], fds)
    else:
        channel.send(data)


def _receive(channel: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors passed with it; (None, []) at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 1)
    if not data:
        return None, fds
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError(f"expected a JSON object, got {type(message).__name__}")
    return message, fds


# --- the fork server's side ----------------------------------------------------------------


def _await_adoption(host: int) -> None:
    """In a freshly forked grandchild: wait (on a pidfd, no polling) until the
    intermediate has exited and the host adopted this process, then follow the host."""
    parent = os.getppid()
    if parent != host:
        try:
            fd = os.pidfd_open(parent)
        except ProcessLookupError:  # gone and reaped already
            fd = -1
        if fd >= 0:
            try:
                select.select([fd], [], [])
            finally:
                os.close(fd)
    if os.getppid() != host:  # not a subreaper, or the host died: nobody would wait for us
        os._exit(1)
    follow_pid(host)


def _reseed() -> None:
    """A fork copies the random generators' state: `random` reseeds itself at fork (CPython
    registers it); NumPy's global generator does not, and Monte Carlo instances forked
    from one server would draw the same numbers."""
    numpy_random = sys.modules.get("numpy.random")
    seed = getattr(numpy_random, "seed", None)
    if callable(seed):
        seed()


@dataclass
class Spare:
    """A process forked ahead of need, adopted by the host, waiting for a spec."""

    pid: int
    #: the write end of its pipe: the spec goes here, then it is closed
    pipe: int


@dataclass
class ForkServer:
    """Answers a host's fork requests on `channel` until it closes.

    It keeps one spare forked ahead (adopted by the host, waiting on a pipe), so a request
    costs a pipe write, not two forks; the next spare is forked after the answer, off the
    instance's path.
    """

    settings: Settings
    channel: socket.socket
    host: int
    #: file -> its mtime when imported: a change makes this server stale
    watched: dict[str, int] = field(default_factory=dict)
    #: a service server's registration, resolved once for all its instances
    registration: Registration | None = None
    spare: Spare | None = None

    def serve(self) -> int:
        """Answer until the host closes the channel (or this server goes stale)."""
        self._make_spare()
        while True:
            try:
                message, fds = _receive(self.channel)
            except ConnectionError:  # the host closed its end with our answer unread
                return 0
            if message is None:
                return 0
            op = message.get("op")
            if op == "instance":
                if self._stale():
                    _send(self.channel, {"stale": True})
                    return 0
                pid = self._hand_to_spare(message["spec"])
                if pid is None:
                    pid = self._fork(partial(self._run_instance, InstanceSpec(**message["spec"])))
                _send(self.channel, {"pid": pid})
                if self.spare is None:
                    self._make_spare()
            elif op == "service" and fds:
                service, version = message["service"], message.get("version")
                pid = self._fork(partial(self._run_service_server, fds[0], service, version))
                os.close(fds[0])
                _send(self.channel, {"pid": pid})
            else:
                _send(self.channel, {"error": f"unknown request {op!r}"})

    def _stale(self) -> bool:
        for path, mtime in self.watched.items():
            try:
                now = os.stat(path).st_mtime_ns
            except OSError:
                now = -1
            if now != mtime:
                return True
        return False

    def _fork(self, child: Callable[[], NoReturn]) -> int | None:
        """Fork a grandchild that runs `child()` (never returning) once the host adopted
        it; its pid, or None if a fork failed."""
        read, write = os.pipe()
        middle = os.fork()
        if middle == 0:
            try:
                os.close(read)
                pid = os.fork()
                if pid == 0:
                    os.close(write)
                    self.channel.close()
                    if self.spare is not None:  # its pipe must close when this server's does
                        os.close(self.spare.pipe)
                    _await_adoption(self.host)
                    child()
                os.write(write, pid.to_bytes(4, "little"))
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            raw = pipe.read(4)
        os.waitpid(middle, 0)  # once reaped, the grandchild is the host's
        return int.from_bytes(raw, "little") if len(raw) == 4 else None

    def _make_spare(self) -> None:
        read, write = os.pipe()
        pid = self._fork(partial(self._wait_as_spare, read, write))
        os.close(read)
        if pid is None:
            os.close(write)
        else:
            self.spare = Spare(pid, write)

    def _hand_to_spare(self, spec: dict[str, Any]) -> int | None:
        """Give `spec` to the spare; its pid, or None if there is none (or it died)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        try:
            os.write(spare.pipe, json.dumps(spec).encode())  # < PIPE_BUF: one write
        except OSError:  # killed meanwhile (the host reaps it as a stray)
            return None
        finally:
            os.close(spare.pipe)
        return spare.pid

    def _wait_as_spare(self, read: int, write: int) -> NoReturn:
        os.close(write)
        name_process(SPARE_PROCESS_NAME)
        prepared = _prepare(self.settings, self.registration)
        chunks = []
        with contextlib.suppress(OSError):
            while True:
                ready, _, _ = select.select([read], [], [], SPARE_KEEPALIVE)
                if not ready:  # idle: let RabbitMQ see its heartbeats
                    _keep_alive(prepared)
                    continue
                if not (chunk := os.read(read, MAX_MESSAGE)):
                    break
                chunks.append(chunk)
        os.close(read)
        if not chunks:  # its server closed the pipe unused: leave
            _flush()
            os._exit(0)
        self._run_instance(InstanceSpec(**json.loads(b"".join(chunks))), prepared)

    def _run_instance(self, spec: InstanceSpec, prepared: Prepared | None = None) -> NoReturn:
        code = 1
        try:
            name_process(INSTANCE_PROCESS_NAME)
            _reseed()
            code = instance_module.serve(self.settings, spec, prepared)
        except BaseException as e:  # never return into the server's loop
            log.exception("instance_failed", instance=spec.instance_id, error=repr(e))
        finally:
            _flush()
            os._exit(code)

    def _run_service_server(self, fd: int, service: str, version: str | None) -> NoReturn:
        code = 1
        try:
            name_process(WARM_PROCESS_NAME)
            channel = socket.socket(fileno=fd)
            imported = _import_service(self.settings, service, version, channel)
            if imported is not None:
                _send(channel, {"ready": True})
                registration, watched = imported
                code = ForkServer(self.settings, channel, self.host, watched, registration).serve()
            else:
                code = 0
        except BaseException as e:
            log.exception("warm_server_failed", service=service, error=repr(e))
        finally:
            _flush()
            os._exit(code)


def _prepare(settings: Settings, registration: Registration | None) -> Prepared:
    """A spare's connections, opened while it waits (none if a server is down: the
    instance connects, and reports, by itself)."""
    prepared = Prepared(registration=registration)
    with contextlib.suppress(SoafarmError):
        prepared.redis = redis_client(settings)
        prepared.amqp = pika_connection(settings, f"soafarm-spare {os.getpid()}")
    return prepared


def _keep_alive(prepared: Prepared) -> None:
    if prepared.amqp is None:
        return
    try:
        prepared.amqp.process_data_events(0)
    except Exception:  # lost: the instance will open a new one
        prepared.amqp = None


def _import_service(
    settings: Settings, service: str, version: str | None, channel: socket.socket
) -> tuple[Registration, dict[str, int]] | None:
    """Import `service` with its registration's environment; its registration and the
    files to watch for changes, or None (after telling the host why) when it cannot be
    kept warm."""
    # A file written while the import runs may hold code newer than what was imported,
    # yet its mtime would be taken for the imported one's: such files count as changed.
    importing_since = time.time_ns() - FILE_CLOCK_SLACK_NS
    client: redis.Redis | None = None
    try:
        client = redis_client(settings)  # closed before any fork: instances open their own
        registry = farm_registry(settings, client)
        registration = registry.resolve(service, version)
        os.environ.update(registration.environment)
        cls = load_service_class(registration)
    except Exception as e:  # its instances report it, with the session; here it only stays cold
        _send(channel, {"error": f"{type(e).__name__}: {e}"})
        return None
    finally:
        if client is not None:
            client.close()
    if threading.active_count() > 1:
        _send(channel, {"error": "importing it starts threads, which a fork would not copy"})
        return None
    # the folders too: a registration file added there (a new version) may resolve instead
    watched = dict.fromkeys(map(str, registry.folders), 0)
    watched[str(registration.path)] = 0
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if module_file:
        watched[module_file] = 0
    for path in list(watched):
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:  # a folder on the path that does not exist: fine while it does not
            mtime = -1
        watched[path] = CHANGED_WHILE_IMPORTING if mtime >= importing_since else mtime
    return registration, watched


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def main(argv: list[str]) -> int:
    """Entry point of the generic fork server, started by a worker host with one end of a
    socket pair as its only argument."""
    host = follow_parent()
    if host is None or len(argv) != 1 or not argv[0].isdigit():
        sys.stderr.write("soafarm.workers.warm is started by a worker host, not by hand\n")
        return 2
    # Ctrl-C in a terminal reaches every process of the group: the host stops the servers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process(WARM_PROCESS_NAME)
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    channel = socket.socket(fileno=int(argv[0]))
    try:
        _send(channel, {"ready": True})
    except OSError:  # the host stopped (closing its end) before this server was up
        return 0
    return ForkServer(settings, channel, host).serve()


# --- the host's side -----------------------------------------------------------------------


@dataclass
class Server:
    """The host's handle on one fork server."""

    channel: socket.socket
    process: ChildProcess
    key: ServiceKey | None
    ready: bool = False
    started: float = field(default_factory=time.monotonic)

    def check_ready(self) -> bool:
        """Read its "ready" (or why it cannot be) without blocking; True once ready."""
        if self.ready:
            return True
        try:
            readable, _, _ = select.select([self.channel], [], [], 0)
            if not readable:
                return False
            message, _ = _receive(self.channel)
        except (OSError, ValueError) as e:
            raise ServerGone(str(e)) from e
        if message is None:
            raise ServerGone("it exited")
        if "error" in message:
            raise ServerGone(str(message["error"]))
        self.ready = bool(message.get("ready"))
        return self.ready

    def ask(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        """Send a request and wait for its answer (REPLY_TIMEOUT at most)."""
        try:
            _send(self.channel, message, fds)
            readable, _, _ = select.select([self.channel], [], [], REPLY_TIMEOUT)
            if not readable:
                raise ServerGone(f"no answer within {REPLY_TIMEOUT:g}s")
            reply, _ = _receive(self.channel)
        except (OSError, ValueError) as e:
            raise ServerGone(str(e)) from e
        if reply is None:
            raise ServerGone("it exited")
        return reply

    def close(self) -> None:
        """Close its channel: an idle server exits at once."""
        with contextlib.suppress(OSError):
            self.channel.close()


class ServerGone(Exception):
    """A fork server cannot serve (exited, stale, refused its service): start cold."""


class WarmPool:
    """A worker host's fork servers: `start` an instance warm if it can (None: start it as
    a new interpreter), keeping at most `limit` service servers."""

    def __init__(self, env: dict[str, str], limit: int, keep_services: bool = True) -> None:
        """Nothing starts until `open()`. Without `keep_services` (isolated services: a
        fork server would import them beside the farm's credentials) only the generic
        server forks instances."""
        self.env = env
        self.limit = limit
        self.keep_services = keep_services
        self.generic: Server | None = None
        self.services: OrderedDict[ServiceKey, Server] = OrderedDict()
        #: service -> when it may be tried again after it could not be kept warm
        self.refused: dict[ServiceKey, float] = {}
        #: servers told to go, until reaped
        self.leaving: list[Server] = []
        self.enabled = False
        self._generic_failures = 0
        self._next_generic = 0.0

    def open(self) -> bool:
        """Become a subreaper and start the generic server; False if warm starts are off
        (`worker.warm_instances` is 0, or Linux cannot adopt forked instances here)."""
        self.enabled = self.limit > 0 and become_subreaper()
        if self.enabled:
            self._start_generic()
        return self.enabled

    def _start_generic(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "soafarm.workers.warm", str(theirs.fileno())],
                env=self.env,
                pass_fds=(theirs.fileno(),),
            )
        except OSError as e:
            ours.close()
            log.warning("warm_server_not_started", error=str(e))
            return
        finally:
            theirs.close()
        self.generic = Server(ours, proc, None)
        log.info("warm_server_starting", pid=proc.pid)

    def pids(self) -> set[int]:
        """The fork servers' pids (children of this host)."""
        servers = [*self.services.values(), *self.leaving]
        if self.generic is not None:
            servers.append(self.generic)
        return {s.process.pid for s in servers}

    def start(self, spec: InstanceSpec, key: ServiceKey) -> ChildProcess | None:
        """Fork an instance for `spec` of service `key` from a ready server (the service's
        own, else the generic one); None when none can, so the caller starts it cold."""
        if not self.enabled:
            return None
        self.tend()
        server = self.services.get(key)
        if server is not None and self._usable(server):
            self.services.move_to_end(key)
        else:
            server = (
                self.generic if self.generic is not None and self._usable(self.generic) else None
            )
        if server is None:
            return None
        try:
            reply = server.ask({"op": "instance", "spec": spec.__dict__})
        except ServerGone as e:
            self._drop(server, str(e))
            return None
        if reply.get("stale"):
            self._drop(server, "its service's files changed")
            return None
        if not isinstance(reply.get("pid"), int):
            self._drop(server, f"unexpected answer {reply!r}")
            return None
        if server is self.generic and self.keep_services:
            self._add_service_server(key)
        return AdoptedProcess(reply["pid"])

    def _usable(self, server: Server) -> bool:
        try:
            return server.check_ready()
        except ServerGone as e:
            self._drop(server, str(e))
            return False

    def _add_service_server(self, key: ServiceKey) -> None:
        if key in self.services or self.refused.get(key, 0.0) > time.monotonic():
            return
        generic = self.generic
        if generic is None:
            return
        while len(self.services) >= self.limit:
            _, oldest = self.services.popitem(last=False)
            self._retire(oldest, "least recently used")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            reply = generic.ask(
                {"op": "service", "service": key[0], "version": key[1]}, [theirs.fileno()]
            )
        except ServerGone as e:
            ours.close()
            self._drop(generic, str(e))
            return
        finally:
            theirs.close()
        if not isinstance(reply.get("pid"), int):
            ours.close()
            return
        self.services[key] = Server(ours, AdoptedProcess(reply["pid"]), key)
        log.info("warm_server_starting", service=key[0], version=key[1], pid=reply["pid"])

    def _drop(self, server: Server, why: str) -> None:
        """Forget a server that cannot serve; a service's that refused is tried later."""
        if server is self.generic:
            self.generic = None
            ran_for = time.monotonic() - server.started
            decision = GENERIC_RESTART_POLICY.decide(self._generic_failures, ran_for)
            self._generic_failures = decision.failures
            self._next_generic = time.monotonic() + decision.delay
        elif server.key is not None and self.services.get(server.key) is server:
            del self.services[server.key]
            if not server.ready:
                self.refused[server.key] = time.monotonic() + REFUSED_RETRY
        log.info("warm_server_dropped", service=server.key and server.key[0], why=why)
        self._retire(server, why)

    def _retire(self, server: Server, why: str) -> None:
        server.close()
        server.process.send_signal(signal.SIGTERM)
        self.leaving.append(server)
        log.debug("warm_server_retired", service=server.key and server.key[0], why=why)

    def tend(self) -> None:
        """Reap servers that exited; restart the generic one (with back-off) if it died."""
        for server in list(self.leaving):
            if server.process.poll() is not None:
                self.leaving.remove(server)
        servers = list(self.services.values())
        if self.generic is not None:
            servers.append(self.generic)
        for server in servers:
            if server.process.poll() is not None:
                self._drop(server, f"exited with code {server.process.poll()}")
        if self.enabled and self.generic is None and time.monotonic() >= self._next_generic:
            self._start_generic()

    def close(self, timeout: float = 2.0) -> None:
        """Stop every fork server (they hold no work: an idle server exits at EOF)."""
        servers = [*self.services.values(), *self.leaving]
        if self.generic is not None:
            servers.append(self.generic)
        self.services.clear()
        self.generic = None
        self.leaving = []
        for server in servers:
            server.close()
        deadline = time.monotonic() + timeout
        for server in servers:
            try:
                server.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
