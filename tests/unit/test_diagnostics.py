"""The pieces of `soafarm services test` and `soafarm diagnose` without servers: probe
records in (fake) Redis, the probe process on real registration files, the matrix and the
verdict lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from soafarm.cli.diagnose import (
    FAIL,
    OK,
    SKIP,
    Check,
    CheckFailed,
    CheckSkipped,
    Tally,
    Verdict,
    build_matrix,
    format_matrix,
    format_verdict,
    run_checks,
    summary,
)
from soafarm.config import child_environment, load_settings
from soafarm.errors import DecodeError, ServiceFault
from soafarm.protocol import Fault, Response
from soafarm.state.probes import ProbeReport, ProbeStore, ServiceLoad
from soafarm.workers.service_probe import run_probe
from tests.unit.fakes import NAMES

# --- probe records ----------------------------------------------------------------------------


def report(host: str, answers: tuple[str, ...] = (), **results: ServiceLoad) -> ProbeReport:
    return ProbeReport(host, 1000.0, dict(results), answers=answers)


def test_a_report_round_trips_through_json() -> None:
    original = ProbeReport(
        "h1",
        1234.5,
        {"echo": ServiceLoad(True, seconds=0.01), "pricer 1.0": ServiceLoad(False, "boom")},
        {"/srv/bad.toml": "entry: unknown key"},
        answers=("n1", "n2"),
        took=0.4,
    )
    assert ProbeReport.from_json(original.to_json()) == original
    assert original.answers_ask("n2") and not original.answers_ask("n3")
    # fields a newer host adds are ignored; missing ones take their defaults
    assert ProbeReport.from_json('{"host_id": "h", "probed_at": 1, "new": 2}') == ProbeReport(
        "h", 1.0
    )


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "corrupt service probe report"),
        (b"[1, 2]", "expected a map"),
        (b'{"host_id": "h"}', "missing 'probed_at'"),
        (b'{"host_id": "h", "probed_at": 1, "results": {"echo": {"ok": "yes"}}}', "ok"),
    ],
)
def test_a_corrupt_report_is_a_decode_error(raw: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        ProbeReport.from_json(raw)


def test_store_asks_and_takes_every_waiting_ask_at_once(r: redis.Redis) -> None:
    probes = ProbeStore(r, NAMES)
    probes.ask(["h1", "h2"], "n1", wait=30.0)
    probes.ask(["h1"], "n2", wait=30.0)

    assert probes.take_asks("h1", timeout=0.1) == ["n1", "n2"]
    assert probes.take_asks("h1", timeout=0.01) == []
    assert probes.take_asks("h2", timeout=0.1) == ["n1"]
    assert not r.exists(NAMES.host_probe_asks_key("h1"))  # taken asks leave nothing


def test_asks_expire_after_the_askers_wait(r: redis.Redis) -> None:
    ProbeStore(r, NAMES).ask(["h1"], "n1", wait=30.0)
    ttl = r.pttl(NAMES.host_probe_asks_key("h1"))
    assert 80_000 < ttl <= 90_000  # the wait and a margin: a dead host's ask goes away


def test_store_writes_renews_reads_and_forgets_reports(r: redis.Redis) -> None:
    probes = ProbeStore(r, NAMES)
    probes.write(report("h1", echo=ServiceLoad(True)), ttl=5.0)
    assert 0 < r.pttl(NAMES.host_probe_key("h1")) <= 5000

    probes.keep("h1", ttl=60.0)
    probes.keep("h2", ttl=60.0)  # no report: none is made up

    assert 5000 < r.pttl(NAMES.host_probe_key("h1")) <= 60_000
    assert not r.exists(NAMES.host_probe_key("h2"))
    assert probes.reports(["h1", "h2"]) == {"h1": report("h1", echo=ServiceLoad(True))}
    assert probes.reports([]) == {}

    probes.ask(["h1"], "n", wait=1.0)
    probes.forget("h1")
    assert probes.reports(["h1"]) == {}
    assert not r.exists(NAMES.host_probe_asks_key("h1"))


def test_garbage_reports_are_skipped(r: redis.Redis) -> None:
    probes = ProbeStore(r, NAMES)
    r.set(NAMES.host_probe_key("junk"), b"\xff not json")
    r.set(NAMES.host_probe_key("other"), report("someone-else").to_json())
    r.hset(NAMES.host_probe_key("hash"), "a", "b")
    probes.write(report("good"))

    assert list(probes.reports(["junk", "other", "hash", "good"])) == ["good"]


def test_an_asks_key_of_the_wrong_type_is_removed(r: redis.Redis) -> None:
    r.set(NAMES.host_probe_asks_key("h1"), "garbage")
    probes = ProbeStore(r, NAMES)
    assert probes.take_asks("h1", timeout=0.01) == []
    assert not r.exists(NAMES.host_probe_asks_key("h1"))
    probes.ask(["h1"], "n1", wait=1.0)
    assert probes.take_asks("h1", timeout=0.1) == ["n1"]


# --- the probe process ------------------------------------------------------------------------

SERVICES = {
    "good": ("good:Good", "class Good:\n    def __init__(self, context):\n        pass\n"),
    "broken": ("broken:Broken", "import no_such_module_here\n"),
    "crash": ("crash:Crash", "import os\nos._exit(3)\n"),
    "ctor": (
        "ctor:Ctor",
        "class Ctor:\n    def __init__(self, context):\n"
        "        raise RuntimeError('needs ' + context.environment['FILE'])\n",
    ),
    "data": (
        "data:Data",
        "class Data:\n    def __init__(self, context):\n"
        "        self.curves = context.common_data('curves')\n",
    ),
    "noisy": ("noisy:Noisy", "print('hello on stdout')\nclass Noisy:\n    pass\n"),
    "hang": ("hang:Hang", "import time\ntime.sleep(60)\n"),
}


def write_services(folder: Path) -> None:
    for name, (entry_point, source) in SERVICES.items():
        (folder / f"{entry_point.split(':')[0]}.py").write_text(source)
        extra = ""
        if name == "hang":
            extra = "service_init_timeout = 0.5\n"
        if name == "ctor":
            extra = '[environment]\nFILE = "/data/curves.csv"\n'
        (folder / f"{name}.toml").write_text(f'entry_point = "{entry_point}"\n{extra}')
    (folder / "bad.toml").write_text("entry_pont = 'x:Y'\n")


def probe_env(folder: Path, **extra: str) -> dict[str, str]:
    settings = load_settings(environ={}).replace(service_registration_path=(folder,))
    return {**child_environment(settings), **extra}


def test_the_probe_loads_each_service_as_an_instance_would(tmp_path: Path) -> None:
    write_services(tmp_path)

    probed = run_probe(probe_env(tmp_path), "h1", "box", answers=("n1",))

    assert probed.error == "", probed.error
    assert (probed.host_id, probed.answers) == ("h1", ("n1",))
    results = probed.results
    assert sorted(results) == sorted([*SERVICES, "echo", "faulty"])  # built-ins too
    assert {k for k, v in results.items() if v.ok} == {"good", "data", "noisy", "echo", "faulty"}
    assert "No module named 'no_such_module_here'" in results["broken"].error
    assert "broken.toml" in results["broken"].error
    assert "exited with code 3" in results["crash"].error
    assert results["ctor"].error == (
        "ctor:Ctor: the constructor raised RuntimeError: needs /data/curves.csv"
    )
    assert "common data 'curves'" in results["data"].note
    assert results["hang"].error == (
        "did not load within service_init_timeout (0.5s): its instances fail the same"
    )
    (bad,) = probed.invalid
    assert bad.endswith("bad.toml") and "entry_pont" in probed.invalid[bad]


def test_a_probe_process_that_fails_is_the_reports_error(tmp_path: Path) -> None:
    probed = run_probe(probe_env(tmp_path, SOAFARM_WORKER_CORES="many"), "h1", "box")

    assert probed.results == {}
    assert probed.error == (
        "the probe process failed (exit code 1): environment [worker]: cores: expected int, "
        "got 'many'"
    )


def test_a_probe_process_over_its_time_is_killed(tmp_path: Path) -> None:
    write_services(tmp_path)
    probed = run_probe(probe_env(tmp_path), "h1", "box", timeout=0.2)
    assert probed.error == "the probe process did not finish within 0.2s"


# --- the matrix -------------------------------------------------------------------------------


def matrix_example() -> Any:
    return build_matrix(
        wanted=[],
        registered=["echo", "broken", "gpu"],
        asked=["h1", "h2", "h3", "h4"],
        reports={
            "h1": report(
                "h1",
                echo=ServiceLoad(True),
                broken=ServiceLoad(False, "cannot import 'x'"),
                gpu=ServiceLoad(True, note="reads common data"),
            ),
            "h2": report(
                "h2", echo=ServiceLoad(True), broken=ServiceLoad(False, "cannot import 'x'")
            ),
            "h3": ProbeReport("h3", 1.0, error="the probe process failed"),
        },
        unanswered={"h4": "did not answer within 30s"},
    )


def test_the_matrix_says_what_loads_where() -> None:
    matrix = matrix_example()

    assert matrix.cell("echo", "h1") == "ok"
    assert matrix.cell("broken", "h2") == "error"
    assert matrix.cell("gpu", "h2") == "-"  # not registered there
    assert matrix.cell("echo", "h3") == "?" and matrix.cell("echo", "h4") == "?"
    assert matrix.loads_on("gpu") == ["h1"]
    assert matrix.nowhere() == ["broken"]
    assert matrix.problems() == [
        "service broken loads on no host",
        "host h4 did not answer within 30s",
        "host h3 could not probe: the probe process failed",
    ]


def test_the_matrix_as_text() -> None:
    assert format_matrix(matrix_example()) == [
        "service  h1     h2     h3  h4",
        "broken   error  error  ?   ?",
        "echo     ok     ok     ?   ?",
        "gpu      ok     -      ?   ?",
        "",
        "error: broken on h1: cannot import 'x'",
        "error: broken on h2: cannot import 'x'",
        "note: gpu on h1: reads common data",
        "error: host h3 could not probe: the probe process failed",
        "no answer: host h4 did not answer within 30s",
        "FAIL: broken loads on no host",
        "(-: not registered on that host)",
    ]


def test_the_matrix_of_named_services_only() -> None:
    matrix = build_matrix(
        wanted=["echo", "pricer 1.0", "nosuch"],
        registered=["echo", "pricer 1.0", "pricer 2.0", "other"],
        asked=["h1"],
        reports={"h1": report("h1", echo=ServiceLoad(True), **{"pricer 1.0": ServiceLoad(True)})},
        unanswered={},
    )
    assert list(matrix.rows) == ["echo", "pricer 1.0"]
    assert matrix.unknown == ("nosuch",)
    assert matrix.problems() == ["no registration of nosuch"]
    by_name = build_matrix(["pricer"], ["pricer 1.0", "pricer 2.0"], ["h1"], {}, {})
    assert list(by_name.rows) == ["pricer 1.0", "pricer 2.0"]


def test_a_service_only_a_host_registers_is_a_row() -> None:
    matrix = build_matrix([], [], ["h1"], {"h1": report("h1", local=ServiceLoad(True))}, {})
    assert list(matrix.rows) == ["local"] and matrix.problems() == []
    assert matrix.to_plain()["services"] == {"local": {"h1": {"ok": True, "error": "", "note": ""}}}


# --- verdicts ---------------------------------------------------------------------------------


def passes(detail: str) -> Any:
    return lambda: (detail, {"n": 1})


def fails(error: Exception) -> Any:
    def run() -> tuple[str, dict[str, Any]]:
        raise error

    return run


def test_checks_run_in_order_and_skip_what_needs_a_failure() -> None:
    seen: list[Verdict] = []
    verdicts = run_checks(
        [
            Check("server", fails(CheckFailed("cannot connect", {"up": False}))),
            Check("store", passes("fine")),
            Check("daemon", passes("answers"), ("server",)),
            Check("calls", passes("fast"), ("server", "store", "daemon")),
            Check("cleanup", fails(CheckSkipped("no session was created"))),
            Check("odd", fails(KeyError("x"))),
        ],
        seen.append,
    )
    assert seen == verdicts
    assert verdicts == [
        Verdict("server", FAIL, "cannot connect", {"up": False}),
        Verdict("store", OK, "fine", {"n": 1}),
        Verdict("daemon", SKIP, "skipped (needs server)"),
        Verdict("calls", SKIP, "skipped (needs server, daemon)"),
        Verdict("cleanup", SKIP, "skipped (no session was created)"),
        Verdict("odd", FAIL, "KeyError: 'x'"),
    ]
    assert summary(verdicts) == "diagnose: 2 of 6 checks failed (server, odd)"
    assert summary(verdicts[1:2]) is None


def test_ctrl_c_is_not_a_verdict() -> None:
    with pytest.raises(KeyboardInterrupt):
        run_checks([Check("slow", fails(KeyboardInterrupt()))], lambda _v: None)


def test_verdict_lines_are_aligned() -> None:
    lines = [
        format_verdict(Verdict("redis", OK, "Redis 7.0.15"), 12),
        format_verdict(Verdict("broker", FAIL, "no broker daemon"), 12),
        format_verdict(Verdict("round-trip", SKIP, "skipped (needs broker)"), 12),
    ]
    assert lines == [
        "ok    redis         Redis 7.0.15",
        "FAIL  broker        no broker daemon",
        "skip  round-trip    skipped (needs broker)",
    ]
    assert Verdict("broker", FAIL, "x", {"daemons": 0}).to_plain() == {
        "name": "broker",
        "status": "fail",
        "detail": "x",
        "daemons": 0,
    }


def test_the_throughput_tally_counts_each_response_once() -> None:
    tally = Tally(2)
    tally.take(Response(0, "box:0", None, 0))
    tally.take(Response(0, "box:0", None, 0))
    assert tally.count == 1 and not tally.done.is_set()
    tally.take(Response(1, "box:1", None, 1))
    assert tally.done.is_set() and tally.error == ""

    wrong = Tally(5)
    wrong.take(Response(3, "box:4", None, 3))
    assert wrong.done.is_set() and "request 3 was answered 'box:4'" in wrong.error

    faulted = Tally(5)
    faulted.take(Response(0, None, Fault("ValueError", "boom"), 0))
    assert faulted.error == f"ServiceFault: {ServiceFault('ValueError', 'boom')}"
