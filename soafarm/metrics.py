"""The Prometheus endpoint of a soafarm process: `/metrics`, and `/healthz` beside it.

Each daemon (broker, worker host, autoscaler) builds its own `CollectorRegistry` of
collectors that read what the process already knows at scrape time, so the hot path pays
nothing for a metric nobody scrapes; `serve_metrics` serves it on a thread of its own.
"""

from __future__ import annotations

import errno
import functools
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = structlog.get_logger(__name__)

# `*_created` series double what a scrape carries and no dashboard here uses them
disable_created_metrics()  # type: ignore[no-untyped-call]

#: `/healthz`'s verdict: healthy or not, and what it is based on (shown as JSON).
Health = tuple[bool, dict[str, Any]]
StartResponse = Callable[[str, list[tuple[str, str]]], object]


def new_registry() -> CollectorRegistry:
    """An empty registry for one process's metrics (without `*_created` series)."""
    return CollectorRegistry()


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: a scrape every few seconds would drown the process's log."""

    def log_message(self, format: str, *args: Any) -> None:
        """Say nothing."""


#: How often (seconds) a metrics server's thread checks whether it is asked to stop.
SHUTDOWN_POLL = 0.05


@dataclass
class MetricsServer:
    """A running endpoint; `close()` stops it."""

    url: str
    server: ThreadingWSGIServer
    thread: threading.Thread

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()


def metrics_app(registry: CollectorRegistry, health: Callable[[], Health]) -> Any:
    """A WSGI app: `/healthz` answers 200 or 503 with `health()` as JSON, anything else the
    registry in Prometheus' text format."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").rstrip("/") == "/healthz":
            try:
                ok, detail = health()
            except Exception as e:  # a broken check is an unhealthy process, not a 500
                ok, detail = False, {"error": repr(e)}
            body = json.dumps({"status": "ok" if ok else "unhealthy", **detail}).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


def serve_metrics(
    registry: CollectorRegistry,
    health: Callable[[], Health],
    bind: str,
    port: int,
    process: str,
) -> MetricsServer | None:
    """Serve `registry` and `health` on `bind:port`, or on a port the system picks when
    `port` is taken (or 0). None, logged, when nothing can be bound: metrics never stop the
    process they describe."""
    app = metrics_app(registry, health)
    try:
        server = make_server(bind, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or port == 0:
            log.warning("metrics_unavailable", process=process, bind=bind, port=port, error=str(e))
            return None
        log.info("metrics_port_taken", process=process, port=port)
        return serve_metrics(registry, health, bind, 0, process)
    host, actual = server.server_address[:2]
    url = f"http://{_url_host(str(host))}:{actual}/metrics"
    # serve_forever looks for a shutdown request between polls: at its default 0.5 s a
    # stopping process waited up to that long for its metrics thread
    serve = functools.partial(server.serve_forever, poll_interval=SHUTDOWN_POLL)
    thread = threading.Thread(target=serve, name=f"metrics-{process}", daemon=True)
    thread.start()
    log.info("metrics_serving", process=process, url=url)
    return MetricsServer(url, server, thread)


def _url_host(host: str) -> str:
    """A host part for a URL: IPv6 in brackets; a wildcard bind as this machine's name."""
    if host in ("0.0.0.0", "::"):
        import socket

        return socket.gethostname()
    return f"[{host}]" if ":" in host else host
