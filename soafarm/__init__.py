"""soafarm: an open SOA job farm on RabbitMQ and Redis.

from soafarm import Session, SessionStartInfo, BrokerClient
with Session.create(SessionStartInfo("echo", min_units=1, max_units=4)) as session:
    with BrokerClient(session) as client:
        client.send_request("echo", "hello", user_data=1)
        client.end_requests()
        for response in client.get_responses(timeout=60):
            print(response.user_data, response.result)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from soafarm.config import Settings, load_settings
from soafarm.errors import RetryOperationError, ServiceFault, SoafarmError
from soafarm.protocol import Fault, Response
from soafarm.service import ServiceContext

if TYPE_CHECKING:
    from soafarm.client import BrokerClient
    from soafarm.client.session import (
        DurableSession,
        Session,
        SessionAttachInfo,
        SessionStartInfo,
    )

#: The client library is imported on first use: a service instance or a worker host, which
#: import soafarm too, never load it (kombu and the client's modules are a fifth of their
#: start-up).
_CLIENT = {
    "BrokerClient": "soafarm.client",
    "DurableSession": "soafarm.client.session",
    "Session": "soafarm.client.session",
    "SessionAttachInfo": "soafarm.client.session",
    "SessionStartInfo": "soafarm.client.session",
}


def __getattr__(name: str) -> Any:
    """Import the client library's names when they are first asked for."""
    if name in _CLIENT:
        value = getattr(importlib.import_module(_CLIENT[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soafarm' has no attribute {name!r}")


__all__ = [
    "BrokerClient",
    "DurableSession",
    "Fault",
    "Response",
    "RetryOperationError",
    "ServiceContext",
    "ServiceFault",
    "Session",
    "SessionAttachInfo",
    "SessionStartInfo",
    "Settings",
    "SoafarmError",
    "load_settings",
]
__version__ = "0.1.0"
