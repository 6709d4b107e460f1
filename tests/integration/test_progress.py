"""Exact counting in Redis under at-least-once execution, checked against a Python model."""

from __future__ import annotations

import random

import pytest
import redis

from soafarm.client.reader import Bitmap
from soafarm.config import Settings
from soafarm.names import Names
from soafarm.state.clients import DoneMarker, ProgressStore

pytestmark = pytest.mark.integration


def test_done_counts_each_request_once_however_often_it_is_marked(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    names = Names(settings.namespace)
    store = ProgressStore(r, names, 1, "c")
    store.create()
    marker = DoneMarker(r, names)
    rng = random.Random(7)
    done: set[int] = set()
    faulted: set[int] = set()
    for _ in range(300):  # batches, redeliveries (overlaps) and stray single ids
        start = rng.randrange(0, 5000)
        ids = list(range(start, start + rng.randrange(1, 120)))
        if rng.random() < 0.2:
            ids = rng.sample(ids, k=max(1, len(ids) // 3))  # not consecutive
        outcomes = [(i, i % 7 == 0) for i in ids]
        expected_new = len(set(ids) - done)
        assert marker.mark(1, "c", outcomes) == expected_new
        done |= set(ids)
        faulted |= {i for i in ids if i % 7 == 0}
    progress = store.load()
    assert (progress.done, progress.faulted) == (len(done), len(faulted))
    raw = r.get(names.client_done_key(1, "c"))
    assert isinstance(raw, bytes)
    bitmap = Bitmap(raw)  # the reader's bit order is Redis's
    assert bitmap.count == len(done)
    assert all(not bitmap.add(i) for i in done)
    r.close()


def test_marking_a_purged_client_recreates_nothing(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    names = Names(settings.namespace)
    assert DoneMarker(r, names).mark(9, "gone", [(0, False)]) == 0
    assert not r.exists(names.client_done_key(9, "gone"))
    r.close()
