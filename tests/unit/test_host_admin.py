"""An operator's host states (`soafarm hosts offline|drain|online`) in Redis: kept apart from
the record the host rewrites, outliving the host, read in a batch, tolerant of garbage."""

from __future__ import annotations

import pytest
import redis
import structlog.testing

from soafarm.state.batch import Batch
from soafarm.state.hosts import DRAINING, OFFLINE, HostStore
from soafarm.state.namespace import delete_namespace_keys
from soafarm.state.records import HostRecord
from tests.unit.fakes import NAMES


@pytest.fixture
def hosts(r: redis.Redis) -> HostStore:
    return HostStore(r, NAMES)


def test_set_read_and_clear_return_the_state_before(hosts: HostStore) -> None:
    assert hosts.admin_states() == {}
    assert hosts.set_admin("h1", OFFLINE) is None
    assert hosts.set_admin("h2", DRAINING) is None
    assert hosts.admin_states() == {"h1": "offline", "h2": "draining"}
    assert hosts.set_admin("h1", DRAINING) == "offline"
    assert hosts.set_admin("h1", None) == "draining"
    assert hosts.set_admin("h1", None) is None  # clearing twice is harmless
    assert hosts.admin_states() == {"h2": "draining"}


def test_unknown_state_is_refused_before_anything_is_written(
    r: redis.Redis, hosts: HostStore
) -> None:
    with pytest.raises(ValueError, match="one of offline, draining, not 'maintenance'"):
        hosts.set_admin("h1", "maintenance")
    assert not r.exists(NAMES.host_admin_key)


def test_the_state_outlives_the_hosts_record_beats_and_removal(hosts: HostStore) -> None:
    hosts.set_admin("h1", OFFLINE)
    record = HostRecord("h1", "box", 1, 2, 0.0)
    hosts.beat(record, timeout=30.0)  # the host rewrites its record every beat
    hosts.deregister("h1")  # stopped
    hosts.beat(record, timeout=30.0)  # started again with the same id
    hosts.forget("h1")  # lost, as the broker forgets it
    assert hosts.admin_states() == {"h1": "offline"}
    assert NAMES.host_admin_key == f"{NAMES.namespace}:hosts:admin"


def test_read_admin_in_a_batch_with_other_reads(r: redis.Redis, hosts: HostStore) -> None:
    hosts.beat(HostRecord("h1", "box", 1, 2, 0.0), timeout=30.0)
    hosts.set_admin("h1", DRAINING)
    batch = Batch(r)
    admin = hosts.read_admin(batch)
    registered = hosts.read_hosts(batch)
    assert len(batch) == 2
    batch.run()
    assert admin.value == {"h1": "draining"}
    assert set(registered.value[0]) == {"h1"}


def test_garbage_values_are_skipped_and_reported_once(r: redis.Redis, hosts: HostStore) -> None:
    hosts.set_admin("h1", OFFLINE)
    r.hset(NAMES.host_admin_key, "h2", "maintenance")
    r.hset(NAMES.host_admin_key, "h3", b"\xff\xfe")
    with structlog.testing.capture_logs() as logs:
        assert hosts.admin_states() == {"h1": "offline"}
        assert hosts.admin_states() == {"h1": "offline"}
    skipped = [e for e in logs if e["event"] == "redis_garbage_skipped"]
    assert len(skipped) == 2
    assert all(e["key"] == NAMES.host_admin_key for e in skipped)
    # a garbage state is not a state before: set_admin says there was none
    assert hosts.set_admin("h2", None) is None


def test_a_key_of_the_wrong_type_reads_empty_and_is_replaced_on_write(
    r: redis.Redis, hosts: HostStore
) -> None:
    r.set(NAMES.host_admin_key, "not a hash")
    with structlog.testing.capture_logs() as logs:
        assert hosts.admin_states() == {}
        batch = Batch(r)
        later = hosts.read_admin(batch)
        batch.run()
        assert later.value == {}
        assert hosts.set_admin("h1", DRAINING) is None
    assert [e["key"] for e in logs if e["event"] == "redis_garbage_skipped"] == [
        NAMES.host_admin_key
    ]
    assert hosts.admin_states() == {"h1": "draining"}


def test_namespace_delete_removes_the_states(r: redis.Redis, hosts: HostStore) -> None:
    hosts.set_admin("h1", OFFLINE)
    delete_namespace_keys(r, NAMES)
    assert hosts.admin_states() == {}
