"""soafarm: an open SOA job farm on RabbitMQ and Redis.

from soafarm import Session, SessionStartInfo, BrokerClient
with Session.create(SessionStartInfo("echo", min_units=1, max_units=4)) as session:
    with BrokerClient(session) as client:
        client.send_request("echo", "hello", user_data=1)
        client.end_requests()
        for response in client.get_responses(timeout=60):
            print(response.user_data, response.result)
"""

from soafarm.client import BrokerClient
from soafarm.client.session import DurableSession, Session, SessionAttachInfo, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.errors import RetryOperationError, ServiceFault, SoafarmError
from soafarm.protocol import Fault, Response
from soafarm.service import ServiceContext

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
