"""Private RabbitMQ and Redis instances for `soafarm up` / `soafarm demo` on a bare machine.

When nothing answers at a configured localhost URL and the server binary is installed, we start
our own instance on a free port, with its data and logs in a temp dir, and point the settings at
it. We only ever stop processes we started ourselves; a server that already answers is left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import redis
import structlog

from soafarm.config import Settings, mask_url
from soafarm.errors import ConfigError, ConnectionFailed
from soafarm.names import Names
from soafarm.state.redis_accounts import RedisAccounts
from soafarm.transport.connections import redis_client, with_redis_account
from soafarm.transport.permissions import client_permissions
from soafarm.transport.redis_urls import is_sentinel
from soafarm.transport.tls import pika_ssl_options, redis_ssl_kwargs

log = structlog.get_logger(__name__)

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Debian's /usr/sbin/rabbitmq-* wrappers `su` to the rabbitmq user, which could neither write
#: our private temp dir nor be signalled as our child, so we run the real scripts from here.
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
STOP_TIMEOUT = 30.0


#: What a user name made by `add_user` may hold.
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


#: Where `free_port` looks: below Linux's ephemeral range (32768-60999), so that between
#: the choice and the server's bind no outgoing connection is given the port by the kernel
#: (a RabbitMQ node once failed to start: `dist_port_already_used`).
_PORTS = (20000, 32000)


def free_port(avoid: frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral
    range, and not in `avoid`."""
    for _ in range(200):
        port = _PORTS[0] + secrets.randbelow(_PORTS[1] - _PORTS[0])
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the range is crowded
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_endpoint(url: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of `url` when its host is this machine, else None (Sentinels: None,
    a private server is never started for them)."""
    if is_sentinel(url):
        return None
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS:
        return None
    return parts.hostname or "localhost", parts.port or default_port


#: What to do when a server is neither reachable nor startable here.
_SERVERS_HINT = (
    "install the servers (Debian/Ubuntu: `sudo apt-get install rabbitmq-server redis-server`) "
    "or point soafarm at running ones with SOAFARM_AMQP_URL / SOAFARM_REDIS_URL "
    "(--amqp-url / --redis-url)"
)
#: Exit status of a shell that could not find a command (the server's own script, or one it
#: runs: Erlang's `erl` for RabbitMQ).
_COMMAND_NOT_FOUND = 127


def _last_line(path: Path, limit: int = 200) -> str:
    """The last non-empty line of a server's log (what it said before it exited), shortened."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - 8192, 0))
            lines = [x.strip() for x in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((x for x in reversed(lines) if x), "")
    return last if len(last) <= limit else last[: limit - 3] + "..."


def _script(name: str) -> str | None:
    """Path of a server script we can run as our own child, or None if it is not installed."""
    real = RABBITMQ_SCRIPTS / name
    if name.startswith("rabbitmq") and real.is_file():
        return str(real)
    return shutil.which(name)


@dataclass
class _Server:
    """A private server process we started, and how to talk to and stop it."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    url: str
    probe: Callable[[], None]  # raises until the server answers
    graceful_stop: Callable[[], None]
    #: starts the server again on the same port and data (after a stop or a kill)
    relaunch: Callable[[], subprocess.Popen[bytes]]


@dataclass(frozen=True)
class ServerTls:
    """Certificates for private servers that speak TLS only: the CA clients must present
    certificates signed by (mutual TLS), and the servers' own certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class EmbeddedServers:
    """Context manager. On enter, for each of RabbitMQ and Redis: if the configured URL's host is
    localhost/127.0.0.1/::1 and nothing accepts a TCP connection on its host:port, and the server
    binary is on PATH (rabbitmq-server / redis-server), start a private instance on a free port of
    its own, with its own data directory under a temp dir, and wait until it answers. Returns
    (from __enter__) the Settings with the URLs pointed at the private instances (unchanged where
    the configured server answered). On exit, stop what it started (gracefully, then kill after a
    deadline) and remove the temp dir. Never touches a server it did not start."""

    def __init__(
        self,
        settings: Settings,
        enabled: bool = True,
        startup_timeout: float = 60.0,
        tls: ServerTls | None = None,
    ) -> None:
        """With `tls`, the servers listen with TLS only and require client certificates;
        their URLs are `amqps://` / `rediss://` and clients use `settings.tls`."""
        self.settings = settings
        self.enabled = enabled
        self.startup_timeout = startup_timeout
        self.tls = tls
        #: One human line per private server started.
        self.started: list[str] = []
        #: How to run rabbitmqctl against the private RabbitMQ (None: none was started).
        self._rabbitmqctl: tuple[list[str], dict[str, str]] | None = None
        self.temp_dir: Path | None = None
        self._servers: list[_Server] = []

    def __enter__(self) -> Settings:
        """Start what is missing and return the settings that point at it."""
        if not self.enabled:
            return self.settings
        result = self.settings
        self._check_installed()
        try:
            # Launch both first, then wait: their start-up times overlap.
            if (redis_server := self._maybe_start_redis()) is not None:
                result = result.replace(redis_url=redis_server.url)
            if (rabbit := self._maybe_start_rabbitmq()) is not None:
                result = result.replace(amqp_url=rabbit.url)
            for server in self._servers:
                self._wait_ready(server)
        except BaseException:
            # The temp dir is kept on failure: the error message points at the logs in it.
            self._stop_all()
            raise
        return result

    def _check_installed(self) -> None:
        """ConnectionFailed, before anything starts, when a server is needed here (a local
        URL where nothing answers) and its binary is not installed: the one line says which
        package to install and how to use a server that runs elsewhere."""
        missing: list[str] = []
        redis_at = _local_endpoint(self.settings.redis_url, 6379)
        if redis_at is not None and not answers(*redis_at) and _script("redis-server") is None:
            missing.append(f"Redis at {mask_url(self.settings.redis_url)}")
        amqp_at = [_local_endpoint(u, 5672) for u in self.settings.amqp_urls]
        local = bool(amqp_at) and all(e is not None for e in amqp_at)
        if (
            local
            and not any(e is not None and answers(*e) for e in amqp_at)
            and _script("rabbitmq-server") is None
        ):
            missing.insert(0, f"RabbitMQ at {mask_url(self.settings.amqp_url)}")
        if not missing:
            return
        binaries = [
            b
            for b, what in (("rabbitmq-server", "RabbitMQ"), ("redis-server", "Redis"))
            if any(m.startswith(what) for m in missing)
        ]
        raise ConnectionFailed(
            f"nothing answers for {' and '.join(missing)}, and {' and '.join(binaries)} "
            f"{'is' if len(binaries) == 1 else 'are'} not installed, so soafarm cannot start "
            f"{'a private one' if len(binaries) == 1 else 'private ones'}: " + _SERVERS_HINT
        )

    def __exit__(self, *exc: object) -> None:
        """Stop every server we started and remove the temp dir."""
        self._stop_all()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    @property
    def rabbitmq_started(self) -> bool:
        """Whether this started a private RabbitMQ (which `rabbitmqctl` and `add_user` act on)."""
        return self._rabbitmqctl is not None

    def rabbitmqctl(self, *args: str, timeout: float = 120.0) -> str:
        """Run `rabbitmqctl ARGS` against the private RabbitMQ this started (the fault tests
        stop and restart it: never the machine's own) and return its output."""
        if self._rabbitmqctl is None:
            raise ConnectionFailed("no private RabbitMQ was started (or rabbitmqctl is missing)")
        command, env = self._rabbitmqctl
        done = subprocess.run(
            [*command, "-q", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ConnectionFailed(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _server(self, name: str) -> _Server:
        for server in self._servers:
            if server.name == name:
                return server
        raise ConnectionFailed(f"no private {name} was started")

    def kill(self, name: str) -> None:
        """SIGKILL the private server `name` ("RabbitMQ" or "Redis") and its process group, as
        a crash would; `start(name)` brings it back on the same port with the same data."""
        server = self._server(name)
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        log.info("embedded_server_killed", server=name.lower(), port=server.port)

    def stop(self, name: str) -> None:
        """Stop the private server `name` the clean way (Redis writes its AOF, RabbitMQ shuts
        its node down); `start(name)` brings it back on the same port with the same data."""
        _stop(self._server(name))

    def start(self, name: str) -> None:
        """Start the private server `name` again after `kill` or `stop`; return once it
        answers."""
        server = self._server(name)
        if server.proc.poll() is None:
            return
        server.proc = server.relaunch()
        self._wait_ready(server, announce=False)

    def restart(self, name: str, kill: bool = False) -> None:
        """`stop` (or with `kill`, `kill`) then `start` the private server `name`."""
        if kill:
            self.kill(name)
        else:
            self.stop(name)
        self.start(name)

    def write_config(self, settings: Settings, name: str = "farm") -> Path:
        """A settings file `<name>.toml` (readable by this user only) with the URLs of the
        servers started, passwords included, and `settings`' namespace, for other commands
        to use with `--config` while they run; removed with them."""
        assert self.temp_dir is not None, "no private server was started"
        lines = [
            f"amqp_url = {json.dumps(settings.amqp_url)}",
            f"redis_url = {json.dumps(settings.redis_url)}",
            f"namespace = {json.dumps(settings.namespace)}",
        ]
        return _private_file(self.temp_dir / f"{name}.toml", "\n".join(lines) + "\n")

    def add_user(self, settings: Settings, user: str) -> Settings:
        """Make RabbitMQ user `user` (a random password, a client's permissions in
        `settings.namespace`: `transport.permissions`) on the private RabbitMQ, and its own
        Redis account (common data only: `state.redis_accounts`; the broker daemon hands it
        one per session), and return `settings` logging in as it to both."""
        if not user or not set(user) <= _USER_CHARS:
            raise ConfigError(f"user name {user!r} must be letters, digits, '-', '_' or '.'")
        # never a leading '-': rabbitmqctl would take the password for an option (1 in 32
        # of token_urlsafe's begin with one; CI met it)
        password = "p" + secrets.token_urlsafe(24)
        self.rabbitmqctl("add_user", user, password)
        parts = urlsplit(settings.amqp_urls[0])
        vhost = unquote(parts.path[1:]) or "/"
        for command in client_permissions(settings.namespace, user).rabbitmqctl(user, vhost):
            self.rabbitmqctl(*command)
        host = parts.hostname or "127.0.0.1"
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}:{parts.port or 5672}"
        made = settings.replace(amqp_url=urlunsplit((parts.scheme, netloc, parts.path, "", "")))
        client = redis_client(settings)
        try:
            account = RedisAccounts(client, Names(settings.namespace)).user_account(user)
        except redis.ResponseError as e:  # the farm's account may not manage ACL users
            log.warning("redis_not_fenced", user=user, error=str(e))
            return made
        finally:
            client.close()
        return with_redis_account(made, account.name, account.password)

    def _dir(self, name: str) -> Path:
        if self.temp_dir is None:
            self.temp_dir = Path(tempfile.mkdtemp(prefix="soafarm-embedded-"))
        path = self.temp_dir / name
        path.mkdir()
        return path

    def _launch(
        self, argv: list[str], log_path: Path, env: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:  # the child keeps its own copy of the descriptor
            # A session of its own, so the whole process tree can be signalled as one group.
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def _maybe_start_redis(self) -> _Server | None:
        url = self.settings.redis_url
        endpoint = _local_endpoint(url, 6379)
        binary = _script("redis-server")
        if endpoint is None or answers(*endpoint) or binary is None:
            return None
        port, data = free_port(), self._dir("redis")
        log_path = data / "redis.log"
        # A password of its own, in a file only this user reads (on the command line, `ps`
        # would show it to everyone): another local user cannot read or change the farm.
        password = secrets.token_urlsafe(24)
        conf = _private_file(data / "redis.conf", f"requirepass {password}\n")
        # AOF with an fsync a second, as compose and Kubernetes run it: a restart keeps every
        # session's state, a crash of the machine loses at most the last second of writes.
        listen = ["--port", str(port)]
        if self.tls is not None:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(self.tls.cert_file),
                "--tls-key-file",
                str(self.tls.key_file),
                "--tls-ca-cert-file",
                str(self.tls.ca_file),
                "--tls-auth-clients",
                "yes",
            ]
        argv = [
            binary,
            str(conf),
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(data),
            "--logfile",
            str(log_path),
        ]
        # Appending to the same file as --logfile: start-up errors on stderr land there too.
        proc = self._launch(argv, log_path, None)
        db = urlsplit(url).path.strip("/") or "0"
        scheme = "rediss" if self.tls is not None else "redis"
        redis_url = f"{scheme}://:{password}@127.0.0.1:{port}/{db}"
        server: _Server

        def terminate() -> None:
            server.proc.terminate()  # the current process: after a restart, not the first

        server = _Server(
            "Redis",
            proc,
            port,
            log_path,
            redis_url,
            lambda: _ping_redis(self.settings.replace(redis_url=redis_url)),
            terminate,
            lambda: self._launch(argv, log_path, None),
        )
        self._servers.append(server)
        return server

    def _maybe_start_rabbitmq(self) -> _Server | None:
        endpoints = [_local_endpoint(u, 5672) for u in self.settings.amqp_urls]
        binary = _script("rabbitmq-server")
        # With failover URLs, start ours only if every one is local and none answers.
        if not endpoints or binary is None:
            return None
        if any(e is None or answers(*e) for e in endpoints):
            return None
        ctl = _script("rabbitmqctl")
        base = self._dir("rabbitmq")
        node = f"soafarm-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        port = free_port()
        dist_port = free_port(avoid=frozenset({port}))
        (base / "enabled_plugins").write_text("[].\n")  # no management plugin: no port clash
        (base / "rabbitmq-env.conf").write_text("")  # instead of the system node's NODENAME etc.
        # The system rabbitmq.conf pins its listener to 5672, so we need a config file of our own.
        # Its first boot makes a user of its own with a random password instead of guest,
        # whom any local user may log in as over loopback.
        user, password = "soafarm", secrets.token_urlsafe(24)
        listen = f"listeners.tcp.local = 127.0.0.1:{port}\n"
        if self.tls is not None:
            listen = (
                f"listeners.tcp = none\nlisteners.ssl.local = 127.0.0.1:{port}\n"
                f"ssl_options.cacertfile = {self.tls.ca_file}\n"
                f"ssl_options.certfile = {self.tls.cert_file}\n"
                f"ssl_options.keyfile = {self.tls.key_file}\n"
                "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
            )
        _private_file(
            base / "rabbitmq.conf",
            f"{listen}default_user = {user}\ndefault_pass = {password}\n",
        )
        env = {
            **os.environ,
            "HOME": str(base),  # a private Erlang cookie, shared with our rabbitmqctl
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        log_path = base / "console.log"
        proc = self._launch([binary], log_path, env)
        server: _Server

        def stop() -> None:
            # `rabbitmqctl stop` shuts the node down cleanly; SIGTERM to the start script (which
            # forwards it to the VM) covers a missing rabbitmqctl or a node still booting.
            done = (
                ctl is not None
                and subprocess.run(
                    [ctl, "-n", node, "stop"],
                    env=env,
                    timeout=STOP_TIMEOUT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                ).returncode
                == 0
            )
            if not done:
                server.proc.terminate()

        if ctl is not None:
            self._rabbitmqctl = ([ctl, "-n", node], env)
        scheme = "amqps" if self.tls is not None else "amqp"
        url = f"{scheme}://{user}:{password}@127.0.0.1:{port}/"
        server = _Server(
            "RabbitMQ",
            proc,
            port,
            log_path,
            url,
            lambda: _open_amqp(self.settings.replace(amqp_url=url)),
            stop,
            lambda: self._launch([binary], log_path, env),
        )
        self._servers.append(server)
        return server

    def _wait_ready(self, server: _Server, announce: bool = True) -> None:
        began = time.monotonic()
        deadline = began + self.startup_timeout
        why = f"no answer within {self.startup_timeout:g}s"
        while time.monotonic() < deadline:
            if (code := server.proc.poll()) is not None:
                why = f"exited with code {code}"
                if code == _COMMAND_NOT_FOUND:
                    needs = " (Erlang?)" if server.name == "RabbitMQ" else ""
                    why += f", a command it needs is missing{needs}"
                said = _last_line(server.log_path)
                if said:
                    why += f": {said!r}"
                break
            try:
                server.probe()
            except Exception as e:  # not up yet: keep polling until the deadline
                why = f"no answer within {self.startup_timeout:g}s ({e or type(e).__name__})"
                time.sleep(0.2)
                continue
            seconds = round(time.monotonic() - began, 2)
            log.info(
                "embedded_server_started",
                server=server.name.lower(),
                port=server.port,
                seconds=seconds,
                log=str(server.log_path),
            )
            if announce:
                self.started.append(
                    f"private {server.name} on 127.0.0.1:{server.port} "
                    f"(data in {server.log_path.parent})"
                )
            return
        rabbit = server.name == "RabbitMQ"
        setting = "SOAFARM_AMQP_URL (--amqp-url)" if rabbit else "SOAFARM_REDIS_URL (--redis-url)"
        package = "rabbitmq-server`, which brings Erlang" if rabbit else "redis-server`"
        raise ConnectionFailed(
            f"cannot start a private {server.name} on 127.0.0.1:{server.port}: {why}; see "
            f"{server.log_path}; check its install (Debian/Ubuntu: `sudo apt-get install "
            f"{package}) or point soafarm at a running {server.name} with {setting}"
        )

    def _stop_all(self) -> None:
        while self._servers:
            server = self._servers.pop()
            _stop(server)


def _private_file(path: Path, text: str) -> Path:
    """Write `text` to a new file only this user can read (it holds a password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def _ping_redis(settings: Settings) -> None:
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=1,
        socket_timeout=1,
        **redis_ssl_kwargs(settings),
    )
    try:
        client.ping()
    finally:
        client.close()


def _open_amqp(settings: Settings) -> None:
    params = pika.URLParameters(settings.amqp_url)
    params.ssl_options = pika_ssl_options(settings, settings.amqp_url)
    params.connection_attempts = 1
    params.socket_timeout = 2
    pika.BlockingConnection(params).close()


def _stop(server: _Server) -> None:
    """Stop gracefully, then kill the process group after a deadline; never raises."""
    proc = server.proc
    if proc.poll() is None:
        try:
            server.graceful_stop()
            proc.wait(STOP_TIMEOUT)
        except (OSError, subprocess.SubprocessError):
            log.warning("embedded_server_kill", server=server.name.lower(), port=server.port)
            # Only while our child is alive is its pid still its (and its children's) group id.
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.info("embedded_server_stopped", server=server.name.lower(), port=server.port)
