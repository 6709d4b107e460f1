"""`python -m benchmarks.latency_ab TREE_A TREE_B`: sequential latency of two checkouts,
interleaved.

On a shared VM the round trip drifts by 30% from one minute to the next, more than most
changes are worth, so two runs one after the other cannot compare two versions. This starts
one farm per checkout (each its own process, importing soafarm from its own tree, in its
own namespace), then alternates blocks of sequential echo requests between them, and
prints each side's percentiles and the per-block ratio B/A.

Make the second tree with `git worktree add /tmp/base HEAD~1`, for instance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

READY = "ready"
SERVICES = Path(__file__).resolve().parent / "services"
#: The child loads this file by path, so that only soafarm comes from the checkout measured.
CHILD = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('latency_ab', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
    "module.serve(int(sys.argv[2]))"
)


def serve(units: int) -> None:
    """Child side: a farm and an echo session; each line `N` on stdin runs N sequential
    requests and prints their latencies (ms) as one JSON line; `0` ends."""
    from soafarm import BrokerClient, Session, SessionStartInfo
    from soafarm.config import load_settings

    try:
        from soafarm.local.farm import LocalFarm, delete_namespace
    except ImportError:  # a checkout from before the one-namespace layout (issue 12)
        from soafarm.farm import LocalFarm, delete_namespace  # type: ignore[import-not-found,no-redef]

    settings = load_settings().replace(
        namespace=f"bench-ab-{os.getpid()}",
        log_level="warning",
        service_registration_path=(SERVICES,),  # this checkout's echo service, for both
    )
    try:
        with (
            LocalFarm(settings, workers=1, cores=2),
            Session.create(
                SessionStartInfo("echo", min_units=units, max_units=units), settings
            ) as session,
        ):
            session.wait_for_instances(units)
            with BrokerClient(session) as client:

                def once() -> float:
                    start = time.perf_counter()
                    client.send_request("echo", "x")
                    list(client.get_responses(timeout=30))
                    return (time.perf_counter() - start) * 1000

                for _ in range(100):
                    once()  # warm-up
                sys.stdout.write(READY + "\n")
                sys.stdout.flush()
                for line in sys.stdin:
                    n = int(line)
                    if n == 0:
                        break
                    sys.stdout.write(json.dumps([once() for _ in range(n)]) + "\n")
                    sys.stdout.flush()
    finally:
        delete_namespace(settings)


class Side:
    """One checkout's farm, driven over the child's stdin/stdout."""

    def __init__(self, tree: Path, units: int) -> None:
        """Start the child with `tree` first on its import path; wait until it is warm."""
        self.tree = tree
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(Path(__file__).resolve()), str(units)],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._line(lambda line: line == READY)
        self.samples: list[float] = []
        self.block_p50s: list[float] = []

    def _line(self, wanted: object) -> str:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise SystemExit(f"{self.tree}: the farm process ended; run it alone to see why")
            line = line.strip()
            if wanted(line):  # type: ignore[operator]
                return line  # the farm's own log lines are skipped

    def block(self, n: int) -> None:
        """Run n sequential requests on this side."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        xs = sorted(json.loads(self._line(lambda line: line.startswith("["))))
        self.samples += xs
        self.block_p50s.append(xs[len(xs) // 2])

    def close(self) -> None:
        """End the child (it stops its farm and deletes its namespace)."""
        if self.process.stdin is not None:
            self.process.stdin.write("0\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)

    def summary(self) -> str:
        """Percentiles over every sample of this side."""
        xs = sorted(self.samples)

        def pc(q: float) -> float:
            return xs[min(int(len(xs) * q), len(xs) - 1)]

        return (
            f"p50 {pc(0.5):.3f}  p90 {pc(0.9):.3f}  p99 {pc(0.99):.3f}  p99.9 {pc(0.999):.3f} ms"
            f"  ({len(xs):,} requests)"
        )


def main() -> None:
    """Compare two checkouts' sequential interactive latency, interleaved."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="two checkouts: A and B")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per side (20)")
    parser.add_argument("--per-block", type=int, default=100, help="requests per block (100)")
    parser.add_argument("--units", type=int, default=2, help="service instances (2)")
    args = parser.parse_args()
    if len(args.trees) != 2:
        parser.error("give two checkouts, A and B")
    sides = [Side(tree.resolve(), args.units) for tree in args.trees]
    try:
        for block in range(args.blocks):
            for side in sides if block % 2 == 0 else reversed(sides):  # neither always goes first
                side.block(args.per_block)
    finally:
        for side in sides:
            side.close()
    a, b = sides
    for name, side in (("A", a), ("B", b)):
        print(f"{name} {side.tree}: {side.summary()}")
    ratios = [y / x for x, y in zip(a.block_p50s, b.block_p50s, strict=True)]
    print(
        f"B/A of each block's p50: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
