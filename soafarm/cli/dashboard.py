"""`soafarm dashboard` (a read-only web page) and `soafarm top` (the same in a terminal).

Both show one `FarmView` (soafarm.cli.farmview) after another: sessions with each client
id's progress, responses/s and ETA, and a heat map of the worker hosts by utilisation. The
dashboard's main thread takes a view every `--interval` seconds and an HTTP server thread
hands the latest one out as JSON (`/api/farm`), so however many browsers watch, the broker
daemon answers two control requests per interval.
"""

from __future__ import annotations

import colorsys
import ipaddress
import json
import os
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import click
import structlog
from rich import box
from rich.columns import Columns
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderableType, RenderResult
from rich.progress_bar import ProgressBar
from rich.style import Style
from rich.table import Table
from rich.text import Text

from soafarm.cli import cli, with_settings
from soafarm.cli.dashboard_page import page
from soafarm.cli.farmview import FarmView, FarmWatcher, HostView
from soafarm.cli.rates import format_eta
from soafarm.config import Settings
from soafarm.errors import ConfigError
from soafarm.logs import say
from soafarm.processes import stop_on_signals

log = structlog.get_logger(__name__)

_INTERVAL = click.FloatRange(min=0.1)

#: Sent with every reply: the page loads nothing from elsewhere and nothing may frame it.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class _DashboardServer(ThreadingHTTPServer):
    """The HTTP server, holding the page and the latest view's JSON for its handlers."""

    def __init__(self, address: tuple[str, int], page_html: str) -> None:
        if ":" in address[0]:  # an IPv6 address (`--bind ::1`); the socket is made in super
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.page = page_html.encode()
        self._lock = threading.Lock()
        self._farm = b"{}"

    def publish(self, view: FarmView) -> None:
        """Serve `view` from now on."""
        body = json.dumps(view.to_wire(), separators=(",", ":")).encode()
        with self._lock:
            self._farm = body

    def farm(self) -> bytes:
        """The latest view's JSON."""
        with self._lock:
            return self._farm


class _Handler(BaseHTTPRequestHandler):
    """GET `/` (the page) and `/api/farm` (the latest view); nothing else, nothing written."""

    server_version = "soafarm-dashboard"

    def do_GET(self) -> None:
        """Answer with the page, the view's JSON, or 404."""
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        """As GET, without the body (for monitoring probes)."""
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        server = cast(_DashboardServer, self.server)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", server.page, with_body)
        elif path == "/api/farm":
            self._send(HTTPStatus.OK, "application/json", server.farm(), with_body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", with_body)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, with_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Requests go to the debug log, not stderr (a page polling every second is noise)."""
        log.debug("dashboard_request", client=self.address_string(), line=format % args)


def _listen(bind: str, port: int, interval: float) -> _DashboardServer:
    try:
        return _DashboardServer((bind, port), page(interval))
    except OSError as e:
        raise ConfigError(
            f"cannot serve the dashboard on {bind}:{port}: {e.strerror or e}; "
            "pick another --port (or --bind)"
        ) from None


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


@cli.command()
@with_settings
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="TCP port (0: any free one; the URL printed says which).",
)
@click.option(
    "--interval", default=1.0, show_default=True, type=_INTERVAL, help="Seconds between updates."
)
def dashboard(settings: Settings, bind: str, port: int, interval: float) -> None:
    """Serve a read-only web page of the farm's sessions (progress per client id, rate, ETA,
    faults) and a heat map of its hosts by utilisation, updated every --interval seconds;
    Ctrl-C stops it."""
    watcher = FarmWatcher(settings)
    server = _listen(bind, port, interval)
    try:
        # the first view fails like `soafarm sessions list` does (no broker: exit 3); later
        # failures show on the page, above the last view that could be read
        server.publish(watcher.snapshot())
        stopping = threading.Event()
        stop_on_signals(stopping.set)
        serving = threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True)
        serving.start()
        host, actual_port = server.server_address[:2]
        shown = f"[{host!s}]" if ":" in str(host) else str(host)
        url = f"http://{shown}:{actual_port}/"
        log.info("dashboard_serving", url=url, namespace=settings.namespace, interval=interval)
        if not _is_loopback(bind):
            log.warning("dashboard_not_loopback", bind=bind, why="read-only, no authentication")
        say("dashboard_url", f"soafarm dashboard at {url} (Ctrl-C stops it)", url=url)
        while not stopping.wait(interval):
            server.publish(watcher.snapshot_or_last())
        server.shutdown()
        say("dashboard_stopped", "dashboard stopped")
    finally:
        server.server_close()
        watcher.close()


# -- soafarm top -------------------------------------------------------------------------


def _rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.0f}/s" if rate >= 100 else f"{rate:.1f}/s"


def _eta(seconds: float | None) -> str:
    return format_eta(seconds, nothing_left="done")


def _heat(utilisation: float | None) -> Style:
    """The heat map's colour: blue (idle) through green and yellow to red (all busy), as on
    the dashboard's page; grey while no instance reports."""
    if utilisation is None:
        return Style(color="white", bgcolor="grey42")
    v = min(max(utilisation, 0.0), 1.0)
    r, g, b = colorsys.hls_to_rgb(220 * (1 - v) / 360, 0.40, 0.65)
    return Style(color="white", bgcolor=f"rgb({round(255 * r)},{round(255 * g)},{round(255 * b)})")


def _host_cell(host: HostView) -> Text:
    busy = "idle" if host.utilisation is None else f"{100 * host.utilisation:.0f}%"
    state = f" ({host.state})" if host.state else ""
    return Text(
        f" {host.id}{state} \n {busy}: {host.instances} inst, {host.cores} "
        f"{'core' if host.cores == 1 else 'cores'} ",
        style=_heat(host.utilisation),
    )


#: Narrower than this, a frame leaves out the progress bars (the counts stay).
_WIDE = 110
#: Columns of a frame written to a pipe or file, unless COLUMNS says otherwise: wide enough
#: that nothing is cut (rich's default there, 80, would cut names short).
_PIPE_WIDTH = 160


def _sessions_table(view: FarmView, wide: bool) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD, title="Sessions", title_justify="left", pad_edge=False, expand=False
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("id", "left"),
        ("service", "left"),
        ("state", "left"),
        ("units", "right"),
        ("progress", "left"),
        ("done/total", "right"),
        ("rate", "right"),
        ("ETA", "right"),
        ("faults", "right"),
    ]
    if not wide:
        columns.remove(("progress", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("why", overflow="fold")

    def cells(done: int, total: int, rate: float | None, left: float | None) -> list[Any]:
        bar = [ProgressBar(total=max(total, 1), completed=done, width=12)] if wide else []
        return [*bar, f"{done}/{total}", _rate(rate), _eta(left)]

    for s in view.sessions:
        service = f"{s.service} {s.version}" if s.version else s.service
        table.add_row(
            str(s.id),
            service + (" (durable)" if s.durable else ""),
            s.state,
            f"{s.allocated_units}/{s.target_units}",
            *cells(s.done, s.total, s.rate, s.eta),
            Text(str(s.faulted), style="bold red" if s.faulted else ""),
            s.why,
        )
        for c in s.clients:
            table.add_row(
                f"  {c.client_id}",
                "" if c.sealed else "(sending)",
                "finished" if c.finished else "",
                "",
                *cells(c.done, c.total, c.rate, c.eta),
                Text(str(c.faulted), style="bold red" if c.faulted else ""),
                "",
                style="dim",
            )
    return table


class TopFrame:
    """One frame of `soafarm top`: a status line, the sessions with their client ids, and
    the hosts' heat map; laid out for the width it is given (rich asks at each refresh)."""

    def __init__(self, view: FarmView) -> None:
        """Show `view`."""
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The frame's parts, top to bottom."""
        view = self.view
        taken = time.strftime("%H:%M:%S", time.localtime(view.taken)) if view.taken else "never"
        total_rate = sum(s.rate or 0.0 for s in view.sessions)
        yield Text(
            f"soafarm top: namespace {view.namespace!r}, {len(view.sessions)} session(s), "
            f"{len(view.hosts)} host(s), {_rate(total_rate)} in all, at {taken}",
            style="bold",
        )
        if view.error:
            yield Text(f"cannot read the farm: {view.error}", style="bold red")
        if view.sessions:
            yield _sessions_table(view, wide=options.max_width >= _WIDE)
        else:
            yield Text("No open sessions.", style="dim")
        yield Text("Hosts by utilisation", style="italic")
        if view.hosts:
            yield Columns([_host_cell(h) for h in view.hosts], padding=(0, 1))
        else:
            yield Text("No live worker hosts.", style="dim")


def render_top(view: FarmView) -> RenderableType:
    """One frame of `soafarm top` (see `TopFrame`)."""
    return TopFrame(view)


def _console() -> Console:
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        return Console(width=_PIPE_WIDTH)
    return console


@cli.command()
@with_settings
@click.option(
    "--interval", default=1.0, show_default=True, type=_INTERVAL, help="Seconds between updates."
)
@click.option(
    "--once",
    is_flag=True,
    help="Print one frame and exit (taken --interval seconds after a first look, for rates).",
)
def top(settings: Settings, interval: float, once: bool) -> None:
    """Show the farm's sessions (progress per client id, rate, ETA, faults) and a heat map of
    its hosts by utilisation, refreshed in place every --interval seconds; Ctrl-C stops it."""
    from rich.live import Live

    watcher = FarmWatcher(settings)
    console = _console()
    try:
        view = watcher.snapshot()  # no broker: the one-line error (exit 3), as everywhere
        if once:
            # a second look one interval later: rates and ETAs need two counts
            time.sleep(interval)
            console.print(render_top(watcher.snapshot()))
            return
        stopping = threading.Event()
        stop_on_signals(stopping.set)
        with Live(render_top(view), console=console, auto_refresh=False) as live:
            while not stopping.wait(interval):
                live.update(render_top(watcher.snapshot_or_last()), refresh=True)
    finally:
        watcher.close()
