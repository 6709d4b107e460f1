"""Child process for the life-cycle tests: opens a session and a client, then waits to die.

Usage: python -m tests.integration.helpers.idle_client CLIENT_IDLE_TIMEOUT
Prints the session id, then blocks reading stdin (the test SIGKILLs it).
"""

import sys

from soafarm import BrokerClient, Session, SessionStartInfo

info = SessionStartInfo("echo", broker_settings={"client_idle_timeout": float(sys.argv[1])})
session = Session.create(info)
client = BrokerClient(session)
print(session.id, flush=True)
sys.stdin.read()
