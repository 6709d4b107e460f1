"""`soafarm report`'s arithmetic: `--since` and the sums by service and owner."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from soafarm.cli.report import iso, parse_since, session_wire, summarise
from soafarm.errors import ConfigError
from soafarm.state.usage import UsageRecord

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()


def rec(sid: int, service: str, owner: str, unit_seconds: float, **kw: object) -> UsageRecord:
    fields: dict[str, object] = dict(
        session=sid,
        service=service,
        version=None,
        owner=owner,
        durable=False,
        job_template="Default",
        started=NOW - 100,
        ended=NOW - 10,
        unit_seconds=unit_seconds,
        requests=10,
        responses=9,
        faults=1,
        retries=0,
        state="running",
    )
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "ago"), [("90m", 5400), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("30s", 30)]
)
def test_since_takes_an_age(text: str, ago: float) -> None:
    assert parse_since(text, NOW) == NOW - ago


def test_since_takes_an_iso_time_in_utc_unless_it_says_otherwise() -> None:
    assert iso(parse_since("2026-12-01", NOW)) == "2026-12-01T00:00:00+00:00"
    assert iso(parse_since("2026-12-01T08:00+01:00", NOW)) == "2026-12-01T07:00:00+00:00"
    with pytest.raises(ConfigError, match="an age such as 90m"):
        parse_since("yesterday", NOW)


def test_sums_by_service_and_owner_largest_first() -> None:
    rs = [
        rec(1, "echo", "ann", 3600),
        rec(2, "pricer", "bob", 7200, faults=3, state="failed"),
        rec(3, "echo", "bob", 1800, started=NOW - 500),
    ]
    by_service = summarise(rs, "service")
    assert [line.key for line in by_service] == ["pricer", "echo"]
    echo = by_service[1].to_wire("service")
    assert echo["sessions"] == 2 and echo["unit_hours"] == 1.5 and echo["requests"] == 20
    assert echo["first_start"] == iso(NOW - 500)
    assert by_service[0].to_wire("service")["failed_sessions"] == 1
    by_owner = summarise(rs, "owner")
    assert [(line.key, line.sessions, line.faults) for line in by_owner] == [
        ("bob", 2, 4),
        ("ann", 1, 1),
    ]
    assert session_wire(rs[0])["ended"] == iso(NOW - 10)
