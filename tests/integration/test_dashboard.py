"""`soafarm dashboard` seen in a real headless browser (Debian's chromium), and `soafarm top
--once`, against a real farm with an open durable session."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, SessionStartInfo
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.local.embedded import free_port
from soafarm.local.farm import LocalFarm
from soafarm.state.control import HostsArgs
from tests.conftest import cli_env
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

#: The batch: N requests of the faulty service, every 10th a fault.
N = 40
FAULTS = 4


@pytest.fixture
def chromium() -> str:
    """Debian's chromium; the test fails (never skips) without it, before any farm starts."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: the dashboard tests load the page in a real headless "
            "browser; install it with `apt-get install chromium` (.ci/run does)",
            pytrace=False,
        )
    return path


def browse(chromium: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Load `url` in headless chromium, giving the page 5 s of its own time (several polls)."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class TextsById(HTMLParser):
    """The text inside each element that has an id, and the attributes of each."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        element_id = found.get("id")
        if element_id:
            self.texts.setdefault(element_id, "")
            self.attrs[element_id] = found
        if tag not in self.VOID:
            self._open.append(element_id)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id:
                self.texts[element_id] += data + " "


def rendered(html: str) -> TextsById:
    parser = TextsById()
    parser.feed(html)
    return parser


@dataclass
class OpenFarm:
    """A farm with one open durable session whose batch is answered (faults included)."""

    settings: Settings
    session_id: int
    host_id: str


@pytest.fixture
def open_farm(settings: Settings, farm: LocalFarm) -> Iterator[OpenFarm]:
    with (
        DurableSession.create(SessionStartInfo("faulty"), settings) as session,
        BrokerClient(session, "batch-a") as client,
    ):
        for i in range(N):
            if i % 10 == 3:
                client.send_request("fail", f"bad {i}")
            else:
                client.send_request("ok", i)
        client.end_requests()
        wait_until("every response", lambda: client.status().finished)
        control = ControlClient(settings)
        try:
            (host,) = control.request(HostsArgs()).items
        finally:
            control.close()
        yield OpenFarm(settings, session.id, host.record.id)
        session.close()


class Dashboard:
    """`soafarm dashboard` as a subprocess; its stderr is kept (read on a thread, so the
    pipe never fills)."""

    def __init__(self, settings: Settings, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "soafarm", "dashboard", "--port", str(self.port), *args],
            env=cli_env(settings),
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stderr is not None
        self.stderr = ""
        for line in self.proc.stderr:  # blocks on the next line: no sleeping, no polling
            self.stderr += line
            if "soafarm dashboard at" in line:
                break
        self.url = f"http://127.0.0.1:{self.port}/"
        assert f"soafarm dashboard at {self.url}" in self.stderr, self.stderr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr += line

    def stop(self) -> int:
        """Ctrl-C; its exit code."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        """Kill it if it still runs, and release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def test_dashboard_page_in_a_browser_shows_sessions_and_hosts(
    chromium: str, open_farm: OpenFarm, tmp_path: Path
) -> None:
    sid, host_id = open_farm.session_id, open_farm.host_id
    dashboard = Dashboard(open_farm.settings, "--interval", "0.5")
    try:
        # the JSON the page reads, and nothing else served
        with urllib.request.urlopen(f"{dashboard.url}api/farm", timeout=10) as reply:
            assert reply.headers["Content-Type"] == "application/json"
            farm = json.load(reply)
        assert farm["namespace"] == open_farm.settings.namespace
        assert [(s["id"], s["done"], s["total"], s["faulted"]) for s in farm["sessions"]] == [
            (sid, N, N, FAULTS)
        ]
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{dashboard.url}nothing-here", timeout=10)
        assert missing.value.code == 404
        missing.value.close()

        dom = browse(chromium, dashboard.url, tmp_path / "profile", "--dump-dom").stdout
        page = rendered(dom)
        assert page.texts.get("namespace", "").strip() == open_farm.settings.namespace, dom
        assert "loading" not in page.texts["status"], "the page never read /api/farm"
        assert "1 session, 1 host" in page.texts["status"], page.texts["status"]
        session_row = page.texts[f"session-{sid}"]
        for shown in (str(sid), "faulty (durable)", f"{N} / {N}", "done", str(FAULTS)):
            assert shown in session_row, (shown, session_row)
        client_row = page.texts[f"client-{sid}-batch-a"]
        assert "client batch-a" in client_row and f"{N} / {N}" in client_row, client_row
        assert "finished" in client_row, client_row
        cell = page.texts[f"host-{host_id}"]
        assert host_id in cell and "2 cores" in cell and "instance" in cell, cell
        assert "background" in (page.attrs[f"host-{host_id}"].get("style") or "")
        assert page.texts["session-count"].strip() == "1"
        assert not page.texts.get("error", "").strip(), page.texts["error"]

        png = tmp_path / "dashboard.png"
        browse(
            chromium,
            dashboard.url,
            tmp_path / "profile",
            f"--screenshot={png}",
            "--window-size=1280,900",
            "--hide-scrollbars",
        )
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == (1280, 900)
        # a blank 1280x900 page compresses to a few KB; tables, bars and cells do not
        assert len(data) > 20_000, f"screenshot of {len(data)} bytes: is the page empty?"

        assert dashboard.stop() == 0, dashboard.stderr
        assert "dashboard stopped" in dashboard.stderr
        assert "Traceback" not in dashboard.stderr, dashboard.stderr
    finally:
        dashboard.close()


def test_top_once_prints_the_session_and_host(open_farm: OpenFarm) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "soafarm", "top", "--once", "--interval", "0.2"],
        env=cli_env(open_farm.settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    (row,) = [x for x in lines if x.split()[:1] == [str(open_farm.session_id)]]
    for shown in ("faulty (durable)", f"{N}/{N}", "done", str(FAULTS)):
        assert shown in row, (shown, result.stdout)
    assert any(x.split()[:1] == ["batch-a"] and f"{N}/{N}" in x for x in lines), result.stdout
    assert open_farm.host_id in result.stdout
    assert "2 cores" in result.stdout
    assert "\x1b[" not in result.stdout  # a pipe gets plain text


def test_dashboard_without_a_broker_fails_in_one_line(settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "soafarm", "dashboard", "--port", str(free_port())],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "soafarm: error: no broker daemon is running" in result.stderr
    assert "Traceback" not in result.stderr


def test_dashboard_on_a_taken_port_fails_in_one_line(open_farm: OpenFarm) -> None:
    first = Dashboard(open_farm.settings)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "soafarm", "dashboard", "--port", str(first.port)],
            env=cli_env(open_farm.settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert f"cannot serve the dashboard on 127.0.0.1:{first.port}" in result.stderr
        assert "pick another --port" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        first.close()
