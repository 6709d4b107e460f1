"""Child process for the crash tests: sends a durable batch, printing progress as it goes.

Usage: python -m tests.integration.helpers.durable_sender SESSION_ID COUNT
Prints `sent N` after every confirmed flush (settings from SOAFARM_* variables); takes
0.1 ms per request, like a producer reading its input, so a kill lands mid-batch.
"""

import sys
import time

from soafarm import BrokerClient, DurableSession, SessionAttachInfo

session_id, count = int(sys.argv[1]), int(sys.argv[2])
with (
    DurableSession.attach(SessionAttachInfo(session_id)) as session,
    BrokerClient(session, "crashy") as client,
):
    for i in range(client.sent, count):
        client.send_request("echo", i, user_data=i)
        time.sleep(0.0001)  # a producer doing some work per request: the kill lands mid-send
        if client.sent % client.settings.client.request_batch_size == 0:
            print("sent", client.sent, flush=True)
    client.end_requests()
    print("sealed", flush=True)
