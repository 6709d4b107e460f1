"""Make docs/img/dashboard.png: the dashboard of a small local farm with work in progress.

Run from the repository: `.venv/bin/python docs/screenshots.py`. It needs RabbitMQ and
Redis (the `SOAFARM_*` settings, or the localhost defaults) and Debian's chromium
(`apt-get install chromium`). It starts a broker and four worker hosts in a private
namespace, three sessions (a durable batch half done with some faults, a finished echo
batch, one queued for more cores than the farm has), serves `soafarm dashboard`, takes the
screenshot with headless chromium, and stops and deletes everything it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings, child_environment, load_settings
from soafarm.local.embedded import free_port
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.logs import configure_logging

OUT = Path(__file__).resolve().parent / "img" / "dashboard.png"
#: Host ids and cores: a small farm of unequal hosts, as the heat map is meant for.
HOSTS = (("node-01", 4), ("node-02", 2), ("node-03", 2), ("node-04", 1))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `check` (the state lives in other processes) until true, or exit naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"screenshots: timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def screenshot(chromium: str, url: str, out: Path) -> None:
    """Load `url` in headless chromium (5 s of page time: several polls) and save a PNG."""
    with tempfile.TemporaryDirectory(prefix="soafarm-chromium-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--window-size=1280,900",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def make_work(settings: Settings) -> tuple[list[BrokerClient], list[Session], int]:
    """Three sessions: a finished echo batch, a durable batch in progress (with faults and a
    second client id still sending) and one queued; return their clients, the sessions, and
    the id of the one in progress."""
    echo = Session.create(SessionStartInfo("echo", max_units=2), settings)
    with BrokerClient(echo, "nightly") as client:
        for i in range(2000):
            client.send_request("echo", i)
        client.end_requests()
        wait_for("the echo batch", lambda: client.status().finished)
    # durable, 0.2 s calls, one in 40 a fault
    batch = DurableSession.create(SessionStartInfo("faulty", max_units=6), settings)
    risk = BrokerClient(batch, "risk-eod")
    for i in range(3000):
        if i % 40 == 7:
            risk.send_request("fail", f"bad input {i}")
        else:
            risk.send_request("sleep", 0.2)
    risk.end_requests()
    adhoc = BrokerClient(batch, "adhoc")
    for _ in range(120):
        adhoc.send_request("sleep", 0.05)
    adhoc.flush()
    # more cores than the farm has: it waits, and says why
    queued = Session.create(SessionStartInfo("echo", min_units=16), settings)
    wait_for("work in progress", lambda: risk.status().done >= 300)
    return [risk, adhoc], [queued, batch, echo], batch.id


def main() -> None:
    """Start the farm, make the work, take the screenshot, stop everything."""
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("screenshots: chromium is not installed; run `apt-get install chromium`")
    base = load_settings()
    settings = base.replace(
        # the batch's faults are on purpose: the farm's warnings about them are noise here
        namespace=f"{base.namespace}.screenshots-{os.getpid()}",
        log_level="error",
    )
    configure_logging(settings.log_format, settings.log_level)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    dashboard: subprocess.Popen[bytes] | None = None
    try:
        with LocalFarm(settings, workers=0) as farm:
            for host_id, cores in HOSTS:
                farm.add_worker(host_id, cores=cores)
            clients, sessions, busy = make_work(settings)
            port = free_port()
            dashboard = subprocess.Popen(
                [sys.executable, "-m", "soafarm", "dashboard", "--port", str(port)],
                env=child_environment(settings, os.environ),
                stderr=subprocess.PIPE,
            )
            assert dashboard.stderr is not None
            for line in dashboard.stderr:  # its URL line says it serves
                if b"soafarm dashboard at" in line:
                    break
            wait_for("the dashboard's rates", lambda: _rate_known(port, busy), 30)
            screenshot(chromium, f"http://127.0.0.1:{port}/", OUT)
            print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
            for client in clients:
                client.close(discard=True)
            for session in sessions:
                session.close()
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(timeout=30)
        delete_namespace(settings)


def _rate_known(port: int, session_id: int) -> bool:
    """True once the dashboard has seen the session's done count move (two views)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/farm", timeout=5) as reply:
        farm = json.load(reply)
    return any(s["id"] == session_id and s["rate"] for s in farm["sessions"])


if __name__ == "__main__":
    main()
