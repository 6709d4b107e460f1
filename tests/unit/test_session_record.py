"""Session records: typed broker settings and state enums, JSON in Redis, old records decode."""

from __future__ import annotations

import json

import pytest

from soafarm.config import BrokerSettings, broker_settings_with
from soafarm.errors import ConfigError, DecodeError
from soafarm.state.records import SessionActivity, SessionRecord, SessionState

OLD_RECORD = {
    "id": 7,
    "service": "echo",
    "version": None,
    "state": "running",
    "min_units": 1,
    "max_units": 2,
    "priority": 2000,
    "resource_unit": "core",
    "created": 1000.0,
    "owner": "me",
}


def record(**changes: object) -> SessionRecord:
    return SessionRecord.from_json(json.dumps({**OLD_RECORD, **changes}))


def test_defaults_when_read_back_from_a_record_without_settings() -> None:
    settings = record().broker_settings
    assert settings == BrokerSettings()
    assert settings.durable_session_idle_timeout == 172_800.0
    assert settings.service_operation_timeout == 86_400.0
    assert settings.client_idle_timeout == 300.0
    assert settings.message_resend_limit == 3


def test_partial_settings_map_takes_defaults_and_ignores_unknown_keys() -> None:
    settings = record(broker_settings={"message_resend_limit": 0, "from_the_future": 1})
    assert settings.broker_settings == BrokerSettings(message_resend_limit=0)
    assert settings.broker_settings.durable_session_idle_timeout == 172_800.0
    assert settings.broker_settings.service_operation_timeout == 86_400.0


def test_ints_are_widened_for_float_settings() -> None:
    got = record(broker_settings={"session_idle_timeout": 3}).broker_settings
    assert got.session_idle_timeout == 3.0
    assert isinstance(got.session_idle_timeout, float)


def test_round_trip_keeps_json_readable_strings() -> None:
    original = record(broker_settings={"client_idle_timeout": 12.5}, activity="idle")
    text = original.to_json()
    data = json.loads(text)
    assert data["state"] == "running"
    assert data["activity"] == "idle"
    assert data["broker_settings"]["client_idle_timeout"] == 12.5
    assert data["broker_settings"]["durable_session_idle_timeout"] == 172_800.0
    assert SessionRecord.from_json(text) == original


def test_state_and_activity_are_enums_equal_to_their_strings() -> None:
    r = record()
    assert r.state is SessionState.RUNNING
    assert r.state == "running"
    assert r.activity is SessionActivity.CREATED
    assert str(SessionState.CLOSED) == "closed"
    assert f"{SessionActivity.IDLE}" == "idle"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"state": "exploded"}, "state"),
        ({"activity": 3}, "activity"),
        (
            {"broker_settings": {"message_resend_limit": "three"}},
            "broker_settings: message_resend_limit: expected int",
        ),
        ({"broker_settings": [1, 2]}, "broker_settings"),
        ({"id": "7"}, "id"),
    ],
)
def test_corrupt_records_are_one_decode_error(changes: dict[str, object], words: str) -> None:
    with pytest.raises(DecodeError, match=rf"corrupt SessionRecord record in Redis: {words}"):
        record(**changes)


def test_missing_required_field_and_bad_json() -> None:
    data = dict(OLD_RECORD)
    del data["service"]
    with pytest.raises(DecodeError, match="missing 'service'"):
        SessionRecord.from_json(json.dumps(data))
    with pytest.raises(DecodeError, match="corrupt SessionRecord"):
        SessionRecord.from_json(b"{not json")


def test_layers_apply_in_order_and_unknown_keys_are_rejected() -> None:
    farm = BrokerSettings(message_resend_limit=5, client_idle_timeout=60.0)
    service = broker_settings_with(farm, {"message_resend_limit": 4}, "echo.toml [broker]")
    session = broker_settings_with(service, {"client_idle_timeout": 9}, "start info")
    assert session == BrokerSettings(message_resend_limit=4, client_idle_timeout=9.0)
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        broker_settings_with(farm, {"nope": 1}, "start info")


def test_idle_limit_depends_on_durability() -> None:
    settings = BrokerSettings(session_idle_timeout=5.0)
    assert settings.idle_limit(durable=False) == 5.0
    assert settings.idle_limit(durable=True) == 172_800.0
