"""Child process for the crash tests: sends a durable batch, printing progress as it goes.

Usage: python -m tests.integration.helpers.durable_sender SESSION_ID COUNT
Prints `accepted N` after every confirmed flush (settings from SOAFARM_* variables).
"""

import sys

from soafarm import BrokerClient, DurableSession, SessionAttachInfo

session_id, count = int(sys.argv[1]), int(sys.argv[2])
with (
    DurableSession.attach(SessionAttachInfo(session_id)) as session,
    BrokerClient(session, "crashy") as client,
):
    for i in range(client.sent, count):
        client.send_request("echo", i, user_data=i)
        if client.sent % client.settings.client.request_batch_size == 0:
            print("accepted", client.status().accepted, flush=True)
    client.end_requests()
    print("sealed", flush=True)
