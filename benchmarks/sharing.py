"""`python -m benchmarks.sharing [--quick] [--json FILE]`: a busy session beside an idle one.

What the scheduler's modes and per-session grow/shrink cost or save when sessions share a
farm: the makespan of a batch of calls that take time (`nap(S)`, which sleeps) sent by a
busy session while an idle session, created just before it, is open on the same farm (two
local worker hosts of 2 cores: 4 core units, private namespaces, the local RabbitMQ and
Redis). Each figure is makespan / ideal (ideal: the batch alone on every unit):

- `alone`: no other session (the reference);
- `queued, neighbour just created`: the seeds' default mode; the idle session came first, so
  it holds up to its maximum until its target shrinks, `allocation_adjust_interval` after its
  creation (60 s by default: longer than the batch);
- `queued, neighbour shrunk`: the same after the idle session's target shrank to its minimum
  (`allocation_adjust_interval` 1 s here, and the batch starts once it has);
- `balanced, neighbour just created`: spare units shared by outstanding work, so the busy
  session gets them at once whatever the neighbour's target.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from functools import partial
from pathlib import Path

from benchmarks.common import Figure, machine, render
from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import SchedulerSettings, Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace

SERVICES = Path(__file__).resolve().parent / "services"
HOSTS, CORES = 2, 2
UNITS = HOSTS * CORES
SETUP = f"{HOSTS} worker hosts x {CORES} cores; the busy session sends its batch in one go"


def _settle(session: Session, check: str, timeout: float = 30.0) -> None:
    """Wait until the idle session holds its maximum ("max") or its minimum ("min")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = session.refresh()
        status = info.status
        if status is not None and (
            (check == "max" and info.allocated_units >= UNITS)
            or (check == "min" and status.target == 1)
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the idle session did not reach its {check} within {timeout:g}s")


def _makespan(settings: Settings, calls: int, seconds: float) -> float:
    """Seconds from end_requests() to the last response of `calls` x nap(seconds)."""
    with (
        Session.create(SessionStartInfo("nap"), settings) as busy,
        BrokerClient(busy) as client,
    ):
        for _ in range(calls):
            client.send_request("nap", seconds)
        start = time.perf_counter()
        client.end_requests()
        got = sum(1 for _ in client.get_responses(timeout=600))
        elapsed = time.perf_counter() - start
    if got != calls:
        raise RuntimeError(f"{got} responses for {calls} calls")
    return elapsed


def scenario(
    name: str, mode: str, neighbour: str, *, calls: int, seconds: float, runs: int
) -> Figure:
    """One figure: makespan / ideal of the busy batch, `runs` times, each on a fresh farm."""
    ideal = math.ceil(calls / UNITS) * seconds
    figure = Figure(
        f"{calls} x nap({seconds:g} s): {name}",
        "soafarm",
        "x ideal",
        higher_is_better=False,
        setup=f"{SETUP}; mode {mode}; ideal {ideal:g} s",
    )
    for _ in range(runs):
        settings = load_settings(environ={}).replace(
            namespace=f"bench-sharing-{uuid.uuid4().hex[:8]}",
            service_registration_path=(SERVICES,),
            scheduler=SchedulerSettings(mode=mode),
        )
        try:
            with LocalFarm(settings, workers=HOSTS, cores=CORES):
                if neighbour == "none":
                    figure.samples.append(_makespan(settings, calls, seconds) / ideal)
                    continue
                interval = 1.0 if neighbour == "shrunk" else 60.0
                info = SessionStartInfo(
                    "nap", broker_settings={"allocation_adjust_interval": interval}
                )
                with Session.create(info, settings) as idle:
                    _settle(idle, "min" if neighbour == "shrunk" else "max")
                    figure.samples.append(_makespan(settings, calls, seconds) / ideal)
        finally:
            delete_namespace(settings)
    return figure


def main() -> None:
    """Run the scenarios and print the table (optionally also JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One run each, a shorter batch.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    calls, seconds, runs = (40, 0.25, 1) if args.quick else (80, 0.25, 3)
    batch = partial(scenario, calls=calls, seconds=seconds, runs=runs)
    figures = [
        batch("alone", "queued", "none"),
        batch("queued, neighbour just created", "queued", "created"),
        batch("queued, neighbour shrunk", "queued", "shrunk"),
        batch("balanced, neighbour just created", "balanced", "created"),
    ]
    print(render(figures, f"Busy beside idle sessions ({machine()})"))
    if args.json:
        args.json.write_text(json.dumps([f.as_dict() for f in figures], indent=2))


if __name__ == "__main__":
    main()
