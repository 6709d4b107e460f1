"""`python -m benchmarks.metrics_cost`: what the metrics cost on the hot path, side by side.

Two farms run at once, each one worker host with 2 cores in a namespace of its own: one with
metrics on and its broker and host scraped every second (five times Prometheus' usual
rate), one with metrics off (no endpoint, the instances count nothing). Blocks of the same
work alternate between them, so the VM's drift hits both alike, and each block's ratio
on/off is printed: echo throughput (batches of 100, the hot path at its thinnest), and
calls that take time (`nap` 0.01 s) to show where the counting disappears in the work.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import uuid
from contextlib import ExitStack

from benchmarks.common import machine
from benchmarks.figures import SERVICES, _batch
from soafarm import Session, SessionStartInfo
from soafarm.config import MetricsSettings, Settings, load_settings
from soafarm.local.embedded import free_port
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.names import Names
from soafarm.state.hosts import HostStore
from soafarm.transport.connections import redis_client

#: The scraper's loop, run in a process of its own (as Prometheus is): a thread in the
#: benchmark's process would take the client's GIL and count against the metrics.
SCRAPE_LOOP = """
import sys, time, urllib.request
interval, urls = float(sys.argv[1]), sys.argv[2:]
n = 0
try:
    while True:
        time.sleep(interval)
        for url in urls:
            urllib.request.urlopen(url, timeout=10).read()
            n += 1
except KeyboardInterrupt:
    print(n)
"""


class Scraper:
    """Scrapes URLs every `interval` seconds from a process of its own."""

    def __init__(self, urls: list[str], interval: float) -> None:
        """Start scraping at once."""
        self.process = subprocess.Popen(
            [sys.executable, "-c", SCRAPE_LOOP, str(interval), *urls],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.scrapes = 0

    def stop(self) -> None:
        """Stop scraping (again: nothing); `scrapes` is how many it made."""
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=30)
        self.scrapes = int(out.strip() or 0)


def main() -> None:
    """Alternate blocks between the two farms and print each side and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="blocks per side (8)")
    parser.add_argument("--echo", type=int, default=20_000, help="echo requests a block")
    parser.add_argument("--sleeps", type=int, default=400, help="0.01 s calls a block")
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        help="seconds between scrapes of the 'on' farm (1; 0: never scraped)",
    )
    args = parser.parse_args()
    base = load_settings().replace(log_level="warning", service_registration_path=(SERVICES,))
    on = base.replace(
        namespace=f"bench-metrics-on-{uuid.uuid4().hex[:6]}",
        metrics=MetricsSettings(broker_port=free_port()),
    )
    off = base.replace(
        namespace=f"bench-metrics-off-{uuid.uuid4().hex[:6]}",
        metrics=MetricsSettings(enabled=False),
    )
    # (label, requests a block, service, operation, argument)
    shapes = (
        ("echo", args.echo, "echo", "echo", "x"),
        ("nap 0.01 s", args.sleeps, "nap", "nap", 0.01),
    )
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        with ExitStack() as stack:
            sessions: dict[tuple[str, str], Session] = {}
            for side, settings in (("on", on), ("off", off)):
                stack.enter_context(LocalFarm(settings, workers=1, cores=2))
                for service in ("echo", "nap"):
                    # one unit each: the echo and nap sessions share the host's 2 cores
                    s = stack.enter_context(
                        Session.create(
                            SessionStartInfo(service, min_units=1, max_units=1), settings
                        )
                    )
                    s.wait_for_instances(1)
                    sessions[(side, service)] = s
                _batch(sessions[(side, "echo")], 2000)  # warm-up
            scraper = Scraper(_urls(on), interval=args.scrape_interval or 1e6)
            stack.callback(scraper.stop)
            for block in range(args.blocks):
                order = ("on", "off") if block % 2 == 0 else ("off", "on")
                for label, n, service, op, arg in shapes:
                    for side in order:
                        rate, _ = _batch(sessions[(side, service)], n, op, arg)
                        rates.setdefault((label, side), []).append(rate)
            scraper.stop()
            scrapes = scraper.scrapes
    finally:
        delete_namespace(on)
        delete_namespace(off)
    _print(rates, shapes, args.blocks, scrapes)


def _urls(settings: Settings) -> list[str]:
    hosts = HostStore(redis_client(settings), Names(settings.namespace)).hosts()
    return [
        f"http://127.0.0.1:{settings.metrics.broker_port}/metrics",
        *(h.metrics_url for h in hosts.values()),
    ]


def _print(
    rates: dict[tuple[str, str], list[float]],
    shapes: tuple[tuple[str, int, str, str, object], ...],
    blocks: int,
    scrapes: int,
) -> None:
    print(f"# Metrics on vs off, interleaved ({blocks} blocks a side)\n")
    print(
        f"{machine()}; per farm one worker host with 2 cores, an echo and a nap session of"
        " one unit each; both farms running\n"
    )
    print("| work | metrics on (req/s) | metrics off (req/s) | on/off, median of blocks |")
    print("| --- | --- | --- | --- |")
    for label, n, *_ in shapes:
        a, b = rates[(label, "on")], rates[(label, "off")]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(
            f"| {label} ({n:,} requests) | {statistics.median(a):,.0f} | "
            f"{statistics.median(b):,.0f} | {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f}) |"
        )
    print(f"\n{scrapes} scrapes of the 'on' farm's broker and host during the run.")


if __name__ == "__main__":
    main()
