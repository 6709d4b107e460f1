"""What the CLI prints for programs: the JSON presenter, plain tables in a pipe, progress
figures, options before the command, and JSON-only stderr with `--log-format json`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from soafarm import logs
from soafarm.cli import cli
from soafarm.cli.output import emit_table, iso_time, plain_table, present
from soafarm.cli.progress import LiveProgress, RateMeter, format_eta, format_rate
from soafarm.local.embedded import free_port
from soafarm.resources import UNBOUNDED_UNITS

ROOT = Path(__file__).resolve().parents[2]
T = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo `configure_logging` (a CLI command calls it, with click's streams) and the
    CLI's format hint after the test."""
    hooks = sys.excepthook, threading.excepthook
    yield
    sys.excepthook, threading.excepthook = hooks
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_soafarm_handler", False):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    structlog.reset_defaults()
    logs._configured = None
    logs._hint = None


# --- the JSON presenter ------------------------------------------------------------------
def test_times_become_iso_utc_strings_and_unset_times_null() -> None:
    assert iso_time(T) == "2026-01-01T00:00:00.250Z"
    assert iso_time(0.0) is None
    shown = present(
        {
            "id": 7,
            "created": T,
            "idle_since": 0.0,
            "quiet_since": T + 1,
            "instances": [{"id": "i1", "started": T, "capacity": 1}],
            "status": {"target": 2, "changed": T, "written": T, "load_ratio": None},
            "load_error": {"why": "boom", "at": T, "tries": 2},
            "record": {"beat": T, "started": T},
            "uptime": 12.5,
            "heartbeat_age": 0.4,
            "age": 3,
        }
    )
    assert shown["created"] == "2026-01-01T00:00:00.250Z"
    assert shown["idle_since"] is None
    assert shown["quiet_since"] == "2026-01-01T00:00:01.250Z"
    assert shown["instances"][0]["started"] == "2026-01-01T00:00:00.250Z"
    assert shown["instances"][0]["capacity"] == 1
    assert shown["status"] == {
        "target": 2,
        "changed": "2026-01-01T00:00:00.250Z",
        "written": "2026-01-01T00:00:00.250Z",
        "load_ratio": None,
    }
    assert shown["load_error"]["at"] == "2026-01-01T00:00:00.250Z"
    assert shown["record"]["beat"] == "2026-01-01T00:00:00.250Z"
    # durations stay seconds
    assert (shown["uptime"], shown["heartbeat_age"], shown["age"]) == (12.5, 0.4, 3)
    assert datetime.fromisoformat(shown["created"]).timestamp() == T


def test_unbounded_sentinels_become_null_and_real_limits_stay() -> None:
    session = present({"min_units": 0, "max_units": UNBOUNDED_UNITS, "status": {"target": 3}})
    assert session == {"min_units": 0, "max_units": None, "status": {"target": 3}}
    assert present({"max_units": 4})["max_units"] == 4
    template = present({"name": "Default", "min_units": 1, "max_units": 0, "units_limit": 0})
    assert (template["max_units"], template["units_limit"]) == (None, None)
    assert present({"units_limit": 8})["units_limit"] == 8
    broker = present({"broker_settings": {"client_idle_timeout": 0.0, "session_idle_timeout": 0.0}})
    # client_idle_timeout 0 is "no idle limit"; session_idle_timeout 0 is "at once": kept
    assert broker == {"broker_settings": {"client_idle_timeout": None, "session_idle_timeout": 0.0}}
    assert present({"client_idle_timeout": 300.0}) == {"client_idle_timeout": 300.0}


def test_presenter_leaves_other_values_alone() -> None:
    data = {
        "created": "already text",
        "started": True,  # not a number
        "labels": {"zone": "a"},
        "clients": [{"client_id": "c", "done": 3, "total": None}],
        # another clock's reading (a monotonic time), not a moment since the epoch
        "at": 1234.5,
    }
    assert present(data) == data
    assert present([1, "x", None]) == [1, "x", None]


def test_json_output_is_presented_unless_raw(capsys: pytest.CaptureFixture[str]) -> None:
    from soafarm.cli.output import emit_json

    emit_json({"created": T, "max_units": UNBOUNDED_UNITS})
    assert json.loads(capsys.readouterr().out) == {
        "created": "2026-01-01T00:00:00.250Z",
        "max_units": None,
    }
    emit_json({"created": T}, raw=True)  # a service's result is its own data
    assert json.loads(capsys.readouterr().out) == {"created": T}


# --- plain tables ------------------------------------------------------------------------
def test_plain_table_is_a_header_and_tab_separated_rows_uncut() -> None:
    long = "interactive, shared " + "x" * 300
    text = plain_table(["id", "kind", "why"], [(1, long, ""), (2, "a\tb", "two\nlines")])
    lines = text.split("\n")
    assert lines == ["id\tkind\twhy", f"1\t{long}\t", "2\ta b\ttwo lines"]
    assert [len(x.split("\t")) for x in lines] == [3, 3, 3]


def test_table_in_a_pipe_has_no_box_and_no_title(capsys: pytest.CaptureFixture[str]) -> None:
    long = "interactive, shared, " + "y" * 200
    emit_table("Sessions in namespace 'x'", ["id", "kind"], [(1, long)])
    out = capsys.readouterr().out
    assert out == f"id\tkind\n1\t{long}\n"
    assert "…" not in out and "│" not in out and "Sessions in" not in out


# --- progress figures --------------------------------------------------------------------
def test_rate_meter_measures_the_recent_pace_and_the_time_left() -> None:
    meter = RateMeter(window=10.0)
    assert meter.rate() is None and meter.eta(100) is None
    meter.add(0.0, 0)
    meter.add(2.0, 100)
    assert meter.rate() == 50.0
    assert meter.eta(100) == 2.0
    assert meter.eta(0) == 0.0
    assert meter.eta(None) is None
    meter.add(30.0, 100)  # nothing for a long time: the old pace is forgotten
    meter.add(31.0, 110)
    assert meter.rate() == pytest.approx(10 / 10.0)  # 10 in the last 10 s
    meter.add(31.5, 130)
    assert meter.rate() == pytest.approx(30 / 10.0)
    for i in range(1000):  # a sample per request is coalesced
        meter.add(31.0 + i / 10_000, 110 + i)
    assert len(meter._samples) < 10


def test_rate_and_eta_formats() -> None:
    assert (format_rate(None), format_rate(1234.56)) == ("-", "1,234.6")
    assert [format_eta(x) for x in (None, 0.4, 45, 185, 7380)] == [
        "-",
        "0s",
        "45s",
        "3m05s",
        "2h03m",
    ]


def test_plain_progress_lines_show_faults_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    with LiveProgress("responses", mode="lines", interval=3600) as bar:
        bar.add("c", "client c")
        bar.update("c", completed=10, total=40, faults=2)
        assert capsys.readouterr().err == ""  # before the interval: nothing
        bar.update("c", completed=40, total=40, faults=3)
    err = capsys.readouterr().err
    assert err.startswith("client c: 40/40 responses, 3 fault(s), ")
    assert "responses/s" in err and err.rstrip().endswith("ETA 0s")


def test_the_rate_starts_at_the_first_figures(capsys: pytest.CaptureFixture[str]) -> None:
    with LiveProgress("responses", mode="lines", interval=3600) as bar:
        bar.add("c", "client c")
        bar.update("c", completed=5000, total=10_000, faults=0)  # attached half way
        bar.update("c", completed=5000, total=10_000, faults=0)
    assert "client c: 5,000/10,000 responses, 0 fault(s), 0.0 responses/s, ETA -" in (
        capsys.readouterr().err
    )


def test_open_ended_batch_has_no_eta(capsys: pytest.CaptureFixture[str]) -> None:
    with LiveProgress("responses", mode="lines", interval=3600) as bar:
        bar.add("c", "client c")
        bar.update("c", completed=5, total=10, faults=0, open_ended=True)
    assert capsys.readouterr().err.rstrip().endswith("ETA -")


def test_progress_as_json_events(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    logs.configure_logging("json", "info")
    with LiveProgress("requests") as bar:
        assert bar.mode == "events"
        bar.add("send", "sending", total=3, faults=False)
        bar.update("send", completed=3)
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert (event["event"], event["completed"], event["total"], event["eta"]) == (
        "progress",
        3,
        3,
        0.0,
    )
    assert "faults" not in event


# --- options before the command ----------------------------------------------------------
def namespace_of(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args], env={"SOAFARM_NAMESPACE": "from-env"})
    assert result.exit_code == 0, result.output
    shown: str = json.loads(result.output)["namespace"]
    return shown


def test_settings_options_before_the_command_reach_it() -> None:
    assert namespace_of("config", "show") == "from-env"
    assert namespace_of("--namespace", "first", "config", "show") == "first"
    # nearer the command wins
    assert namespace_of("--namespace", "first", "config", "show", "--namespace", "last") == "last"


def test_config_file_before_the_command(tmp_path: Path) -> None:
    config = tmp_path / "farm.toml"
    config.write_text('namespace = "from-file"\nlog_level = "warning"\n')
    result = CliRunner().invoke(cli, ["--config", str(config), "config", "show"], env={})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["namespace"], shown["log_level"]) == ("from-file", "warning")


def test_log_format_option_sets_the_setting(restore_logging: None) -> None:
    result = CliRunner().invoke(cli, ["config", "show", "--log-format", "json"], env={})
    assert json.loads(result.output)["log_format"] == "json"
    result = CliRunner().invoke(cli, ["--log-format", "json", "config", "show"], env={})
    assert json.loads(result.output)["log_format"] == "json"
    bad = CliRunner().invoke(cli, ["--log-format", "xml", "config", "show"], env={})
    assert bad.exit_code == 2


# --- JSON logs: stderr carries JSON lines only --------------------------------------------
def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of `text` parsed as a JSON object (fails on a line that is not one)."""
    lines = [x for x in text.splitlines() if x.strip()]
    parsed = [json.loads(x) for x in lines]
    assert all(isinstance(p, dict) for p in parsed), text
    return parsed


def test_errors_and_banners_are_json_events(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure_logging("json", "info")
    logs.say("farm_up", "soafarm is up", workers=2)
    logs.report_error("cannot connect to Redis", 3)
    up, error = json_lines(capsys.readouterr().err)
    assert (up["event"], up["message"], up["workers"], up["level"]) == (
        "farm_up",
        "soafarm is up",
        2,
        "info",
    )
    assert (error["event"], error["error"], error["exit_code"]) == (
        "error",
        "cannot connect to Redis",
        3,
    )
    logs.configure_logging("console", "info")
    logs.report_error("plain", 1)
    assert capsys.readouterr().err == "soafarm: error: plain\n"


def test_stdlib_records_and_warnings_are_json_lines(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure_logging("json", "info")
    logging.getLogger("pika.adapters.blocking_connection").warning("socket %s closed", "x")
    logging.getLogger("pika").info("chatter")  # below WARNING: not the operator's
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    pika, warned = json_lines(capsys.readouterr().err)
    assert (pika["event"], pika["logger"], pika["level"]) == (
        "socket x closed",
        "pika.adapters.blocking_connection",
        "warning",
    )
    assert warned["logger"] == "py.warnings" and "old API" in str(warned["event"])
    logs.configure_logging("json", "info")  # again (the demo does): still one handler
    logging.getLogger("kombu").error("once")
    assert len(json_lines(capsys.readouterr().err)) == 1


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "SOAFARM_LOG_FORMAT": "json"},
    )


def test_pika_connection_errors_come_out_as_json_lines() -> None:
    port = free_port()  # nothing listens there
    done = run_python(
        "from soafarm.logs import configure_logging\n"
        "from soafarm.config import load_settings\n"
        "from soafarm.transport.connections import pika_connection\n"
        "s = load_settings()\n"
        "configure_logging(s.log_format, s.log_level)\n"
        f"s = s.replace(amqp_url='amqp://guest:guest@127.0.0.1:{port}/')\n"
        "try:\n"
        "    pika_connection(s, 'test')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
    )
    assert done.stdout.strip() == "ConnectionFailed", done.stderr
    events = json_lines(done.stderr)
    pika = [e for e in events if str(e.get("logger", "")).startswith("pika")]
    assert pika, done.stderr
    assert all(e["level"] in {"warning", "error"} for e in pika)


def test_uncaught_exceptions_are_json_events() -> None:
    done = run_python(
        "import threading\n"
        "from soafarm.logs import configure_logging\n"
        "configure_logging('json')\n"
        "def fail():\n"
        "    raise RuntimeError('in a thread')\n"
        "t = threading.Thread(target=fail, name='worker-1')\n"
        "t.start(); t.join()\n"
        "raise ValueError('boom')\n"
    )
    assert done.returncode == 1
    thread, main = json_lines(done.stderr)
    assert (thread["event"], thread["level"], thread["thread"]) == (
        "uncaught_exception",
        "critical",
        "worker-1",
    )
    assert "RuntimeError: in a thread" in str(thread["exception"])
    assert "ValueError: boom" in str(main["exception"])


def test_cli_error_before_settings_load_is_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("entry_point = 3\n")
    validated = run_python("", "-m", "soafarm", "services", "validate", str(bad))
    assert validated.returncode == 1
    invalid, error = json_lines(validated.stderr)
    assert invalid["event"] == "invalid_registration" and invalid["path"] == str(bad)
    assert error["event"] == "error" and error["exit_code"] == 1
    missing = run_python("", "-m", "soafarm", "--config", str(tmp_path / "no.toml"), "hosts")
    assert missing.returncode == 2
    (error,) = json_lines(missing.stderr)
    assert "no.toml" in str(error["error"])
