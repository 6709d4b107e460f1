"""TLS for `amqps://` and `rediss://` URLs, from the `[tls]` settings, for each of the three
client libraries (pika, kombu/py-amqp, redis-py). Servers are always verified: against
`tls.ca_file`, or the system's CAs; `tls.cert_file`/`key_file` are this process's own
certificate for servers that ask for one."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika

from soafarm.config import Settings, TlsSettings
from soafarm.errors import ConfigError


def _checked(tls: TlsSettings) -> TlsSettings:
    """`tls` if its files exist and make sense together, else one ConfigError naming them."""
    if tls.key_file and not tls.cert_file:
        raise ConfigError("tls.key_file is set without tls.cert_file: set both, or neither")
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"tls.{name}: no such file {path!r}")
    return tls


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """A client context that verifies the server (hostname included) and, with
    `tls.cert_file`, presents this process's certificate."""
    tls = _checked(settings.tls)
    try:
        context = ssl.create_default_context(cafile=tls.ca_file or None)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"[tls] settings: cannot load the certificates: {e}") from None
    return context


def pika_ssl_options(settings: Settings, url: str) -> pika.SSLOptions | None:
    """pika's TLS options for `url` (None unless it is `amqps://`)."""
    if urlsplit(url).scheme != "amqps":
        return None
    return pika.SSLOptions(ssl_context(settings), server_hostname=urlsplit(url).hostname)


def kombu_ssl(settings: Settings) -> dict[str, Any] | bool:
    """py-amqp's `ssl` argument for `amqps://` URLs: its wrap_socket options (False for
    plain `amqp://`)."""
    if not any(urlsplit(u).scheme == "amqps" for u in settings.amqp_urls):
        return False
    tls = _checked(settings.tls)
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED}
    if tls.ca_file:
        options["ca_certs"] = tls.ca_file
    if tls.cert_file:
        options["certfile"] = tls.cert_file
        options["keyfile"] = tls.key_file or tls.cert_file
    return options


def redis_ssl_kwargs(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS keyword arguments for a `rediss://` URL (none for `redis://`)."""
    if urlsplit(settings.redis_url).scheme != "rediss":
        return {}
    tls = _checked(settings.tls)
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if tls.ca_file:
        kwargs["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        kwargs["ssl_certfile"] = tls.cert_file
        kwargs["ssl_keyfile"] = tls.key_file or tls.cert_file
    return kwargs
