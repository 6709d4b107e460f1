"""A private Redis master, its replica and three Sentinels, for failover tests (never the
machine's Redis). Both data servers run with AOF (`appendfsync everysec`), as compose runs
Redis; the Sentinels fail the master over one second after it stops answering."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from soafarm.local.embedded import free_port
from tests.waiting import wait_until

MASTER_NAME = "soafarm"


@dataclass
class RedisSentinels:
    """The servers' processes (by port) and the URL clients use."""

    folder: Path
    data: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    sentinels: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """`redis+sentinel://` naming the three Sentinels and the master."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def master_port(self) -> int:
        """The master's port, as the Sentinels name it now."""
        port = next(iter(self.sentinels))
        asked = redis.Redis(port=port, decode_responses=True, socket_timeout=2)
        try:
            _, master = asked.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        finally:
            asked.close()
        return int(master)

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_port()
        self.data[port].send_signal(signal.SIGKILL)
        self.data[port].wait()
        return port

    def wait_for_failover(self, old: int, timeout: float = 30.0) -> int:
        """Wait until every Sentinel names a master other than `old`; its port."""

        def promoted() -> bool:
            for port in self.sentinels:
                asked = redis.Redis(port=port, decode_responses=True, socket_timeout=2)
                try:
                    _, master = asked.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME
                    )
                finally:
                    asked.close()
                if int(master) == old:
                    return False
            return True

        wait_until("the Sentinels' failover", promoted, timeout=timeout)
        return self.master_port()


def _launch(folder: Path, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed"
    log = (folder / f"{name}.log").open("ab")
    with log:
        return subprocess.Popen(
            [binary, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def _answers(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def redis_sentinels() -> Iterator[RedisSentinels]:
    """Start the master, the replica and three Sentinels; stop them all afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="soafarm-sentinel-"))
    servers = RedisSentinels(folder)
    used: set[int] = set()

    def port() -> int:
        chosen = free_port(frozenset(used))
        used.add(chosen)
        return chosen

    try:
        master, replica = port(), port()
        for p, extra in ((master, []), (replica, ["--replicaof", "127.0.0.1", str(master)])):
            data = folder / str(p)
            data.mkdir()
            servers.data[p] = _launch(
                folder,
                f"redis-{p}",
                [
                    "--port", str(p), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data),
                    *extra,
                ],
            )  # fmt: skip
        # each Sentinel told of the replica and of the others up front: found by themselves,
        # through the master's INFO every 10 s, they would take 10-15 s to be ready
        ids = {port(): secrets.token_hex(20) for _ in range(3)}
        for p, myid in ids.items():
            conf = folder / f"sentinel-{p}.conf"
            others = "".join(
                f"sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {q} {other}\n"
                for q, other in ids.items()
                if q != p
            )
            conf.write_text(
                f"port {p}\nbind 127.0.0.1\nsentinel myid {myid}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 4000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                f"sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica}\n" + others
            )
            servers.sentinels[p] = _launch(folder, f"sentinel-{p}", [str(conf), "--sentinel"])
        for p in (*servers.data, *servers.sentinels):
            wait_until(f"Redis on port {p}", lambda p=p: _answers(p), timeout=30)

        def ready() -> bool:
            asked = redis.Redis(port=replica, decode_responses=True)
            try:
                linked = asked.info("replication")
            finally:
                asked.close()
            if linked.get("master_link_status") != "up":
                return False
            for s in servers.sentinels:
                asked = redis.Redis(port=s, decode_responses=True)
                try:
                    state = asked.execute_command("SENTINEL", "MASTER", MASTER_NAME)
                finally:
                    asked.close()
                facts = state  # redis-py answers SENTINEL MASTER as a dict
                if int(facts["num-slaves"]) < 1 or int(facts["num-other-sentinels"]) < 2:
                    return False
            return True

        wait_until("the replica and the Sentinels ready", ready, timeout=60)
        yield servers
    finally:
        for proc in (*servers.sentinels.values(), *servers.data.values()):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in (*servers.sentinels.values(), *servers.data.values()):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
