"""The path create -> first response, hop by hop: where a session's start-up time goes.

Runs a local farm (one 2-core host) with JSON logs, creates `--sessions` interactive echo
sessions one after another (each sends one request, reads its response and closes), and
matches each session's log events across the processes (one machine, one clock):

    client     Session.create() called
    broker     session_created      (the control RPC arrived and was handled)
    broker     host_assigned        (the allocation round that placed it)
    host       instance_starting    (woken, forked the instance: warm=true)
    instance   instance_started     (loaded the service, ran its constructor, registered)
    client     first response       (the call loop connected, consumed, called, published)

and the client's own steps (create returned, BrokerClient attached, request flushed), which
run while the farm starts the instance.

and prints the median and p90 of each hop, for warm starts (all but the first session).
`python -m benchmarks.startpath [--sessions N] [--warm-instances N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from benchmarks.figures import SERVICES
from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings, load_settings, with_section
from soafarm.local.farm import LocalFarm, delete_namespace

HOPS = (
    ("create RPC -> session_created", "create", "session_created"),
    ("session_created -> host_assigned", "session_created", "host_assigned"),
    ("host_assigned -> instance forked", "host_assigned", "instance_starting"),
    ("forked -> instance_started", "instance_starting", "instance_started"),
    ("instance_started -> first response", "instance_started", "first"),
    ("client: create() returned", "create", "created"),
    ("client: BrokerClient attached", "created", "attached"),
    ("client: request sent (flushed)", "attached", "sent"),
    ("client: sent -> first response", "sent", "first"),
    ("total: create -> first response", "create", "first"),
)


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send this process's stderr (and so its children's) to `path` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("wb") as out:
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_sessions(settings: Settings, n: int) -> list[dict[str, float]]:
    """`n` sessions, one after another; the client's own timestamps of each."""
    out = []
    for _ in range(n):
        began = time.time()
        with Session.create(SessionStartInfo("echo", max_units=1), settings) as session:
            created = time.time()
            with BrokerClient(session) as client:
                attached = time.time()
                client.send_request("echo", "x")
                client.flush()
                sent = time.time()
                list(client.get_responses(timeout=60))
                out.append(
                    {
                        "session": session.id,
                        "create": began,
                        "created": created,
                        "attached": attached,
                        "sent": sent,
                        "first": time.time(),
                    }
                )
    return out


def events(log: Path) -> Iterator[dict[str, object]]:
    """The JSON log lines of `log` (others skipped)."""
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                yield record


def stamp(record: dict[str, object]) -> float:
    """A log record's time as seconds since the epoch."""
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def match(log: Path, client: list[dict[str, float]]) -> list[dict[str, float]]:
    """Each session's timestamps, the client's and the farm's events."""
    by_session = {c["session"]: dict(c) for c in client}
    instance_session: dict[str, float] = {}
    for record in events(log):
        event = record.get("event")
        if event == "session_created":
            sid = float(str(record["session_id"]))
            if sid in by_session:
                by_session[sid]["session_created"] = stamp(record)
        elif event == "host_assigned":
            assignment = record.get("assignment")
            for sid in assignment if isinstance(assignment, dict) else {}:
                s = by_session.get(float(sid))
                if s is not None and "host_assigned" not in s:
                    s["host_assigned"] = stamp(record)
        elif event == "instance_starting":
            iid = str(record["instance"])
            sid = float(iid.split(".")[-2])
            instance_session[iid] = sid
            s = by_session.get(sid)
            if s is not None and "instance_starting" not in s:
                s["instance_starting"] = stamp(record)
                s["warm"] = 1.0 if record.get("warm") else 0.0
        elif event == "instance_started":
            s = by_session.get(instance_session.get(str(record["instance"]), -1.0))
            if s is not None and "instance_started" not in s:
                s["instance_started"] = stamp(record)
    return list(by_session.values())


def main() -> None:
    """Run the sessions and print each hop's median and p90 in ms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=51)
    parser.add_argument("--warm-instances", type=int, default=4)
    args = parser.parse_args()
    settings = with_section(
        load_settings().replace(
            namespace=f"bench-path-{os.getpid()}",
            log_level="info",
            log_format="json",
            service_registration_path=(SERVICES,),
        ),
        "worker",
        {"warm_instances": args.warm_instances},
    )
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "farm.log"
        try:
            with stderr_to(log), LocalFarm(settings, workers=1, cores=2):
                client = run_sessions(settings, args.sessions)
        finally:
            delete_namespace(settings)
        sessions = match(log, client)[1:]  # the first is the service's first use here
    warm = sum(s.get("warm", 0.0) for s in sessions)
    print(f"{len(sessions)} sessions after the first ({warm:.0f} started warm), ms:")
    print(f"{'hop':40} {'p50':>8} {'p90':>8}")
    for name, a, b in HOPS:
        spans = sorted(1000 * (s[b] - s[a]) for s in sessions if a in s and b in s)
        if not spans:
            print(f"{name:40} {'-':>8} {'-':>8}")
            continue
        p90 = spans[min(len(spans) - 1, int(len(spans) * 0.9))]
        print(f"{name:40} {statistics.median(spans):8.1f} {p90:8.1f}")


if __name__ == "__main__":
    main()
