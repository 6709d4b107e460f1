"""Child process for the crash tests: reads a durable client id's responses slowly.

Usage: python -m tests.integration.helpers.durable_reader SESSION_ID CLIENT_ID
Prints each response's id as it is handed out; simulates 0.5 ms of work per response.
"""

import sys
import time

from soafarm import BrokerClient, DurableSession, SessionAttachInfo

session_id, client_id = int(sys.argv[1]), sys.argv[2]
with (
    DurableSession.attach(SessionAttachInfo(session_id)) as session,
    BrokerClient(session, client_id) as client,
):
    for response in client.get_responses(timeout=60):
        print(response.id, flush=True)
        time.sleep(0.0005)  # the work a real consumer does with each response
