"""A host that failed to load a session's service is excluded for the session long enough
for the leader to see it, however short the session's retry period."""

from __future__ import annotations

import time

import redis

from soafarm.broker.assignment import MIN_LOAD_EXCLUSION, reconcile
from soafarm.broker.store import BrokerStore
from soafarm.config import BrokerSettings
from tests.unit.fakes import NAMES
from tests.unit.test_robust_records import assigned, live_host, open_session


def test_a_short_retry_period_still_excludes_the_host_until_the_leader_has_seen_it(
    r: redis.Redis,
) -> None:
    store = BrokerStore(r, NAMES)
    live_host(r)
    period = BrokerSettings(client_connection_timeout=1e9, end_point_not_found_retry_period=1)
    sid = open_session(store, broker_settings=period)
    reconcile(store)
    assert assigned(r) == {sid: 1}
    store.sessions.record_load_error(sid, "h1", "no module named never_there")
    failed_at = time.time()
    # the leader reads load errors up to a second late: 1.5 s on, past the session's own
    # 1 s period, the host must still be left out, or its assignment would never drop
    reconcile(store, now=failed_at + 1.5)
    assert assigned(r) == {}
    reconcile(store, now=failed_at + MIN_LOAD_EXCLUSION + 0.5)
    assert assigned(r) == {sid: 1}  # tried again once the exclusion is over
