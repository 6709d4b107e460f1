"""The client library: sessions, the broker client that sends requests and reads responses,
and the control-path RPC client. Users import these names from `soafarm` itself."""

from soafarm.client.broker_client import BrokerClient
from soafarm.client.session import DurableSession, Session, SessionAttachInfo, SessionStartInfo

__all__ = ["BrokerClient", "DurableSession", "Session", "SessionAttachInfo", "SessionStartInfo"]
