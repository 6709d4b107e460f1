"""A private 3-node RabbitMQ cluster on this machine, for failover tests (never the machine's
RabbitMQ), started by the script people use too: `compose/rabbitmq-cluster.sh`."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "compose" / "rabbitmq-cluster.sh"
#: node i's Erlang distribution listens on its AMQP port + this (the script's rule)
DIST_OFFSET = 20000


@dataclass
class RabbitCluster:
    """The cluster's folder, its nodes' AMQP ports (node i on ports[i - 1]) and the `;` list
    of AMQP URLs clients use."""

    folder: Path
    ports: list[int]
    urls: str

    def run(self, *args: str, timeout: float = 180) -> str:
        """`compose/rabbitmq-cluster.sh ARGS` on this cluster's folder; its output."""
        command, *rest = args
        done = subprocess.run(
            [str(SCRIPT), command, str(self.folder), *rest],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def ctl(self, node: int, *args: str) -> str:
        """rabbitmqctl ARGS on node `node` (1-based)."""
        return self.run("ctl", str(node), *args)

    def node_of(self, queue: str) -> int:
        """The node (1-based) that holds classic queue `queue`, or leads quorum queue or
        stream `queue`, now."""
        for alive in range(1, len(self.ports) + 1):
            with contextlib.suppress(RuntimeError):
                out = self.ctl(alive, "list_queues", "name", "pid", "--no-table-headers")
                for line in out.splitlines():
                    name, _, pid = line.partition("\t")
                    if name == queue:
                        found = re.match(r"<soafarm-\d+-(\d+)@", pid.strip())
                        assert found, f"no node for {queue}: {pid!r}"
                        return int(found.group(1))
                raise AssertionError(f"{queue} is not in the cluster")
        raise RuntimeError("no node of the cluster answers")

    def stop(self, node: int) -> None:
        """Stop node `node` cleanly (`rabbitmqctl stop`): its clients lose their connections."""
        self.run("stop", str(node))

    def start(self, node: int) -> None:
        """Start node `node` again; it rejoins the cluster."""
        self.run("start", str(node))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_run(nodes: int) -> int:
    """A first port such that each node's AMQP and distribution ports are free."""
    for _ in range(200):
        first = random.randrange(21000, 40000 - nodes)
        if all(_free(first + i) and _free(first + i + DIST_OFFSET) for i in range(nodes)):
            return first
    raise RuntimeError("no free run of ports for a RabbitMQ cluster")


@contextlib.contextmanager
def rabbitmq_cluster(nodes: int = 3) -> Iterator[RabbitCluster]:
    """Start a cluster of `nodes` nodes (about 15 s); stop every node and remove its data
    afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="soafarm-rabbit-cluster-"))
    first = _free_run(nodes)
    cluster = RabbitCluster(folder, [first + i for i in range(nodes)], "")
    try:
        cluster.urls = cluster.run("up", str(nodes), str(first)).strip()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.run("down")
        for pid_file in folder.glob("node*/rabbitmq.pid"):  # a node that would not stop
            with contextlib.suppress(ValueError, ProcessLookupError, OSError):
                pid = int(pid_file.read_text().strip())
                subprocess.run(["kill", "-9", str(pid)], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
