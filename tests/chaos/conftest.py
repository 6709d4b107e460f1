"""Fixtures of the chaos suite: one private RabbitMQ + Redis pair per module, a fresh
namespace and `soafarm up` farm per scenario, and the results table at the end of the run
(printed, and written as JSON to $SOAFARM_CHAOS_RESULTS or <pytest basetemp>/chaos.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soafarm.config import Settings, load_settings
from tests.chaos.harness import RESULTS, SEED, Farm, Stage, delete_whole_namespace
from tests.conftest import PrivateServers, private_servers_for


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServers]:
    """The module's private RabbitMQ and Redis (Redis with AOF everysec)."""
    services = tmp_path_factory.mktemp("services")
    base = load_settings(environ={}).replace(
        namespace=f"chaos-{uuid.uuid4().hex[:8]}", service_registration_path=(services,)
    )
    with private_servers_for(base) as private:
        yield private


@pytest.fixture
def scenario_settings(pair: PrivateServers) -> Iterator[Settings]:
    """A fresh namespace on the module's private servers; deleted afterwards."""
    settings = pair.settings.replace(
        namespace=f"chaos-{uuid.uuid4().hex[:10]}",
        # a sender throttled for this long means the batch stalled: say so, do not hang
        client=dataclasses.replace(pair.settings.client, throttle_timeout=60.0),
    )
    yield settings
    with contextlib.suppress(Exception):  # the scenario checked what deleting leaves
        delete_whole_namespace(settings)


@pytest.fixture
def farm(scenario_settings: Settings, tmp_path: Path) -> Iterator[Farm]:
    """`soafarm up` with 2 worker hosts of 2 cores each in the scenario's namespace."""
    running = Farm(scenario_settings, tmp_path / "farm.log")
    running.start()
    yield running
    running.stop()


@pytest.fixture
def stage(pair: PrivateServers, scenario_settings: Settings, farm: Farm, tmp_path: Path) -> Stage:
    """The module's servers, the scenario's namespace and farm, a temp dir."""
    return Stage(pair, scenario_settings, farm, tmp_path)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render(rows: list[dict[str, Any]]) -> str:
    """The results table: scenario, requests, faults, lost, duplicated, time to recover."""
    header = (
        f"{'scenario':<44} {'requests':>8} {'faults':>6} {'lost':>5} {'dup':>5} "
        f"{'recover max s':>13} {'batch s':>8} {'total s':>8}  outcome"
    )
    lines = [f"chaos suite (seed {SEED})", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['scenario'][:44]:<44} {r['requests']:>8,} {len(r['faults']):>6} "
            f"{_cell(r['lost']):>5} {_cell(r['duplicated']):>5} {_cell(r['recover_max']):>13} "
            f"{_cell(r['batch_seconds']):>8} {_cell(r['scenario_seconds']):>8}  "
            f"{r['outcome'][:100]}"
        )
        for extra in ("client_errors", "reader_exits", "leftovers", "orphans"):
            for item in r[extra][:5]:
                lines.append(f"    {extra[:-1].replace('_', ' ')}: {item[:160]}")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the chaos table and write it as JSON."""
    if not RESULTS:
        return
    terminalreporter.write_sep("=", "chaos results")
    terminalreporter.write_line(render(RESULTS))
    target = os.environ.get("SOAFARM_CHAOS_RESULTS")
    if target is None:
        factory = getattr(terminalreporter.config, "_tmp_path_factory", None)
        base = factory.getbasetemp() if factory is not None else Path(tempfile.gettempdir())
        target = str(Path(base) / "chaos.json")
    Path(target).write_text(json.dumps({"seed": SEED, "scenarios": RESULTS}, indent=2))
    terminalreporter.write_line(f"chaos results written to {target}")
