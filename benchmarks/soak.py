"""Soak: a long durable batch with every farm process's memory sampled, to show it stays flat.

    nice python -m benchmarks.soak [--requests 1000000] [--interval 2] [--json FILE]

Starts a local farm (a broker daemon and one worker host of 2 cores, so two echo instances)
on the machine's RabbitMQ and Redis in a namespace of its own, and sends a durable batch of
`--requests` echo requests from this process while a response handler reads them as they come
(each checked to arrive once). Every `--interval` seconds it samples the resident memory
(VmRSS in /proc) of each farm process, found by the namespace in its environment (the broker,
the host, the instances, restarted ones too) and of this client. At the end it prints, per
process, RSS after start-up, after the warm-up (the first tenth of the batch), the peak and
the last sample, and calls a process flat when its last sample is within 10% (and 16 MiB) of
its size after the warm-up. The namespace is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from soafarm import BrokerClient, DurableSession, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.processes import farm_processes
from soafarm.protocol import Response

#: The warm-up: samples before this fraction of the batch is answered are not the baseline.
WARM_UP = 0.1
#: Growth after the warm-up that still counts as flat: this fraction, and at least this much.
FLAT_FRACTION = 0.10
FLAT_MIB = 16.0
#: No response for this long ends the soak with an error instead of waiting forever.
STALL_SECONDS = 120.0


@dataclass
class Series:
    """One process's RSS samples: (seconds since start, responses so far, MiB)."""

    role: str
    pid: int
    samples: list[tuple[float, int, float]] = field(default_factory=list)

    def after_warm_up(self, total: int) -> float:
        """The first sample once the warm-up fraction of the batch was answered."""
        for _t, done, mib in self.samples:
            if done >= WARM_UP * total:
                return mib
        return self.samples[-1][2]

    def peak(self) -> float:
        """The largest sample."""
        return max(mib for _t, _d, mib in self.samples)

    def flat(self, total: int) -> bool:
        """The last sample is within FLAT_FRACTION (and FLAT_MIB) of the warm size."""
        warm, last = self.after_warm_up(total), self.samples[-1][2]
        return last - warm <= max(warm * FLAT_FRACTION, FLAT_MIB)


def rss_mib(pid: int) -> float | None:
    """A process's resident memory (VmRSS) in MiB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


#: How the soak's table names each farm role.
ROLE_NAMES = {"broker": "broker daemon", "worker": "worker host", "instance": "instance"}


def farm_pids(namespace: str) -> dict[int, str]:
    """pid -> role of every live broker, host and instance of `namespace`."""
    return {p.pid: ROLE_NAMES[p.role] for p in farm_processes(namespace) if p.role in ROLE_NAMES}


class Sampler(threading.Thread):
    """Samples the RSS of this process and of the farm's every `interval` seconds."""

    def __init__(self, namespace: str, interval: float, progress: list[int]) -> None:
        """`progress[0]` is the count of responses read so far (updated by the handler)."""
        super().__init__(name="rss-sampler", daemon=True)
        self.namespace = namespace
        self.interval = interval
        self.progress = progress
        self.began = time.monotonic()
        self.series: dict[int, Series] = {}
        self.stopping = threading.Event()

    def sample(self) -> None:
        """One sample of every process."""
        now = round(time.monotonic() - self.began, 1)
        pids = {os.getpid(): "client", **farm_pids(self.namespace)}
        for pid, role in pids.items():
            mib = rss_mib(pid)
            if mib is not None:
                series = self.series.setdefault(pid, Series(role, pid))
                series.samples.append((now, self.progress[0], round(mib, 1)))

    def run(self) -> None:
        """Sample until stopped."""
        while True:
            self.sample()
            if self.stopping.wait(self.interval):
                return


def report(series: list[Series], total: int) -> str:
    """The per-process table."""
    header = (
        f"{'process':<14} {'pid':>7} {'samples':>7} {'start MiB':>10} {'warm MiB':>9} "
        f"{'peak MiB':>9} {'last MiB':>9} {'growth':>8}  flat"
    )
    lines = [header, "-" * len(header)]
    for s in sorted(series, key=lambda s: (s.role, s.pid)):
        warm, last = s.after_warm_up(total), s.samples[-1][2]
        lines.append(
            f"{s.role:<14} {s.pid:>7} {len(s.samples):>7} {s.samples[0][2]:>10.1f} "
            f"{warm:>9.1f} {s.peak():>9.1f} {last:>9.1f} {last - warm:>+8.1f}  "
            f"{'yes' if s.flat(total) else 'NO'}"
        )
    return "\n".join(lines)


class Checker:
    """The response handler: counts responses and notes any handed out twice."""

    def __init__(self, total: int) -> None:
        """A batch of `total` requests, ids 0..total-1."""
        self.total = total
        self.seen = bytearray(total)
        self.twice = 0
        #: responses so far, in a list the sampler reads
        self.progress = [0]
        self.lock = threading.Lock()
        self.done = threading.Event()

    def __call__(self, response: Response) -> None:
        """Count one response."""
        with self.lock:
            self.twice += self.seen[response.id]
            self.seen[response.id] = 1
            self.progress[0] += 1
            if self.progress[0] >= self.total:
                self.done.set()

    def wait(self) -> None:
        """Until every response arrived; SystemExit if none comes for STALL_SECONDS."""
        last, moved = -1, time.monotonic()
        while not self.done.wait(5):
            if self.progress[0] != last:
                last, moved = self.progress[0], time.monotonic()
            elif time.monotonic() - moved > STALL_SECONDS:
                raise SystemExit(
                    f"soak: stalled at {last:,} of {self.total:,} responses for {STALL_SECONDS:g} s"
                )


def soak(settings: Settings, checker: Checker, sampler: Sampler) -> tuple[float, float]:
    """The batch through a local farm; (seconds to send it, seconds until all was read)."""
    with LocalFarm(settings, workers=1, cores=2):
        info = SessionStartInfo("echo", min_units=2, max_units=2)
        with DurableSession.create(info, settings) as session:
            session.wait_for_instances(2)
            sampler.start()
            began = time.perf_counter()
            with BrokerClient(session, "soak") as client:
                client.set_response_handler(checker)
                for i in range(checker.total):
                    client.send_request("echo", "x", user_data=i)
                client.end_requests()
                sent = time.perf_counter() - began
                checker.wait()
                elapsed = time.perf_counter() - began
            sampler.sample()  # the last sample, before anything stops
            sampler.stopping.set()
            sampler.join()
            session.close()
    return sent, elapsed


def main() -> None:
    """Run the soak and print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--interval", type=float, default=2.0, help="Seconds between samples.")
    parser.add_argument("--json", dest="json_file", help="Also write every sample here.")
    args = parser.parse_args()
    total: int = args.requests
    settings = load_settings().replace(namespace=f"bench-soak-{os.getpid()}", log_level="warning")
    checker = Checker(total)
    sampler = Sampler(settings.namespace, args.interval, checker.progress)
    try:
        sent, elapsed = soak(settings, checker, sampler)
    finally:
        sampler.stopping.set()
        delete_namespace(settings)
    missing = total - sum(checker.seen)
    print(
        f"soak: {total:,} durable echo requests, sent in {sent:.1f} s, every response read in "
        f"{elapsed:.1f} s ({total / elapsed:,.0f} req/s); {missing} missing, "
        f"{checker.twice} twice; RSS sampled every {args.interval:g} s"
    )
    series = list(sampler.series.values())
    print(report(series, total))
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(
                {
                    "requests": total,
                    "seconds": elapsed,
                    "missing": missing,
                    "twice": checker.twice,
                    "processes": [s.__dict__ for s in series],
                },
                fh,
            )
    if missing or checker.twice:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
