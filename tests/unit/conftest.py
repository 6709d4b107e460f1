"""Fixtures shared by the unit tests: an in-memory Redis, and garbage reports forgotten
around each test (a report is logged once per process, so each test starts afresh)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from soafarm.state import garbage
from tests.unit.fakes import fake_redis


@pytest.fixture(autouse=True)
def fresh_reports() -> Iterator[None]:
    """Forget which garbage was reported, before and after the test."""
    garbage.forget_reports()
    yield
    garbage.forget_reports()


@pytest.fixture
def r() -> redis.Redis:
    """An in-memory Redis (fakeredis) of the test's own."""
    return fake_redis()
