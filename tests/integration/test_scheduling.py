"""The seeds' scheduling semantics end to end, through the client library and the CLI, on
farms of local hosts with different pools and labels: job templates, node groups, the unmet
minimum reported at create, grow and shrink per session, named priorities, and a host that
could not load a service tried again after `end_point_not_found_retry_period`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.client.session import DurableSession, SessionAttachInfo
from soafarm.config import JobTemplate, SchedulerSettings, Settings
from soafarm.errors import (
    ResourcesUnavailable,
    ResponseTimeout,
    SessionFailed,
    TemplateLimitExceeded,
)
from soafarm.local.farm import LocalFarm
from soafarm.state.control import SessionInfo
from tests.integration.test_cli import assert_one_line_error, soafarm
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

TEMPLATES = SchedulerSettings(
    job_templates=(
        JobTemplate(max_units=1, description="one unit unless asked"),
        JobTemplate(
            "wide",
            max_units=2,
            units_limit=2,
            priority="above_normal",
            broker={"message_resend_limit": 5},
            description="up to two units",
        ),
    )
)


def open_sessions(settings: Settings) -> list[dict[str, object]]:
    """`soafarm sessions list --json`."""
    result = soafarm(settings, "sessions", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


def test_job_templates_fill_defaults_and_refuse_what_they_forbid(settings: Settings) -> None:
    settings = settings.replace(scheduler=TEMPLATES)
    with LocalFarm(settings, workers=1, cores=2):
        with Session.create(SessionStartInfo("echo"), settings) as plain:
            record = plain.refresh().record
            assert (record.job_template, record.min_units, record.max_units) == ("Default", 1, 1)
        wide = SessionStartInfo("echo", job_template="wide")
        with Session.create(wide, settings) as session:
            record = session.refresh().record
            assert (record.job_template, record.max_units, record.priority) == ("wide", 2, 3000)
            assert record.broker_settings.message_resend_limit == 5
        with pytest.raises(TemplateLimitExceeded, match="max_units 3 is above the 2 units"):
            Session.create(dataclasses.replace(wide, max_units=3), settings)

        listed = soafarm(settings, "templates", "list", env={"COLUMNS": "200"})
        assert listed.returncode == 0, listed.stderr
        assert "up to two units" in listed.stdout and "units <= 2" in listed.stdout
        as_json = json.loads(soafarm(settings, "templates", "list", "--json").stdout)
        assert [t["name"] for t in as_json] == ["Default", "wide"]
        refused = soafarm(
            settings, "submit", "echo", "--durable", "--job-template", "wide",
            "--max-units", "3", "--sweep", "echo", "1:2",
        )  # fmt: skip
        assert_one_line_error(refused, 2, "max_units 3 is above the 2 units job template 'wide'")
        unknown = soafarm(
            settings, "submit", "echo", "--durable", "--job-template", "huge",
            "--sweep", "echo", "1:2",
        )  # fmt: skip
        assert_one_line_error(unknown, 2, "no job template 'huge'", "known: Default, wide")
        assert open_sessions(settings) == []  # refused: nothing left open


def test_node_groups_place_a_session_only_on_hosts_of_its_groups(settings: Settings) -> None:
    with LocalFarm(settings, workers=0) as farm:
        farm.add_worker("cpu-1", cores=1)
        farm.add_worker("gpu-1", cores=1, labels="gpu=a100")
        farm.add_worker("burst-1", cores=1, pool="burst")
        for groups, host in ((["gpu"], "gpu-1"), (["gpu=a100"], "gpu-1"), (["burst"], "burst-1")):
            info = SessionStartInfo("echo", node_groups=groups)
            with Session.create(info, settings) as session, BrokerClient(session) as client:
                for i in range(10):
                    client.send_request("echo", i)
                client.end_requests()
                assert len(list(client.get_responses(timeout=30))) == 10
                served = {i.host_id for i in session.refresh().instances}
                assert served == {host}, (groups, served)

        nowhere = SessionStartInfo("echo", node_groups=["fpga"])
        with pytest.raises(ResourcesUnavailable, match="no live host is in node groups fpga"):
            Session.create(dataclasses.replace(nowhere, fail_if_queued=True), settings)
        assert open_sessions(settings) == []
        with Session.create(nowhere, settings) as waiting:
            info = wait_until("a reason", lambda: _waiting(waiting))
            assert info.record.state == "queued"
            assert info.status is not None
            assert "no live host is in node groups fpga" in info.status.waiting
            table = soafarm(settings, "sessions", "list", env={"COLUMNS": "250"})
            assert "no live host is in node groups fpga" in table.stdout
            farm.add_worker("fpga-1", cores=1, labels="fpga=xilinx")  # the group appears: it runs
            with BrokerClient(waiting) as client:
                client.send_request("echo", "late")
                client.end_requests()
                (response,) = client.get_responses(timeout=30)
                assert str(response.result).endswith(":late")
            assert {i.host_id for i in waiting.refresh().instances} == {"fpga-1"}

        submitted = soafarm(
            settings, "submit", "echo", "--durable", "--node-group", "gpu",
            "--priority", "highest", "--sweep", "echo", "1:3", "--json",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        sid = json.loads(submitted.stdout)["session_id"]
        shown = json.loads(soafarm(settings, "sessions", "show", str(sid)).stdout)
        assert (shown["node_groups"], shown["priority"]) == (["gpu"], 4000)
        DurableSession.attach(SessionAttachInfo(sid), settings).close(purge=True)


def _waiting(session: Session) -> SessionInfo | None:
    info = session.refresh()
    return info if info.status is not None and info.status.waiting else None


def test_an_unmet_minimum_is_reported_at_create_with_its_reason(
    settings: Settings, farm: LocalFarm
) -> None:
    big = SessionStartInfo("echo", min_units=5)
    with pytest.raises(ResourcesUnavailable, match=r"min_units 5 needs 5 core units.*offer 2"):
        Session.create(dataclasses.replace(big, fail_if_queued=True), settings)
    assert open_sessions(settings) == []
    refused = soafarm(
        settings, "submit", "echo", "--durable", "--min-units", "5",
        "--fail-if-queued", "--sweep", "echo", "1:2",
    )  # fmt: skip
    assert_one_line_error(refused, 1, "cannot start now: min_units 5 needs 5 core units")
    assert open_sessions(settings) == []

    with Session.create(big, settings) as session:
        info = wait_until("a reason", lambda: _waiting(session))
        assert info.record.state == "queued"
        shown = json.loads(soafarm(settings, "sessions", "show", str(session.id)).stdout)
        assert "min_units 5 needs 5 core units" in shown["status"]["waiting"]
        with BrokerClient(session) as client:
            client.send_request("echo", 1)
            # the client's timeout says why, not "are worker hosts running?"
            with pytest.raises(ResponseTimeout, match="queued: min_units 5 needs 5 core units"):
                list(client.get_responses(timeout=1))


def test_an_idle_session_hands_its_spare_units_to_a_busy_one(settings: Settings) -> None:
    quick = {"allocation_adjust_interval": 1.0}
    with LocalFarm(settings, workers=1, cores=4):
        with (
            Session.create(SessionStartInfo("echo", broker_settings=quick), settings) as idle,
            Session.create(SessionStartInfo("faulty", broker_settings=quick), settings) as busy,
            BrokerClient(busy) as client,
        ):
            for _ in range(12):
                client.send_request("sleep", 0.5)
            client.end_requests()
            # the older session got its maximum first (queued mode), then went quiet: one
            # interval later it shrinks to its minimum and the busy one takes the rest
            wait_until("the idle session shrinks", lambda: _target(idle) == 1, timeout=30)
            wait_until("the busy one grows", lambda: len(busy.refresh().instances) == 3)
            status = idle.refresh().status
            assert status is not None and "below 75%: shrank to 1" in status.reason
            assert len(list(client.get_responses(timeout=60))) == 12
        # idle again, then busy again: it grows at once, with the reason
        with (
            Session.create(SessionStartInfo("faulty", broker_settings=quick), settings) as s,
            BrokerClient(s) as client,
        ):
            wait_until("it shrinks when idle", lambda: _target(s) == 1, timeout=30)
            for _ in range(8):
                client.send_request("sleep", 0.3)
            client.end_requests()
            wait_until("it grows", lambda: _target(s) == 4, timeout=30)
            status = s.refresh().status
            assert status is not None and "above 125%: grew from 1 to 4" in status.reason
            assert len(list(client.get_responses(timeout=60))) == 8


def test_balanced_mode_gives_spare_units_to_the_busy_session_at_once(settings: Settings) -> None:
    settings = settings.replace(scheduler=SchedulerSettings(mode="balanced"))
    with LocalFarm(settings, workers=1, cores=4):
        named = SessionStartInfo("echo", priority="below_normal")
        with (
            Session.create(named, settings) as idle,
            Session.create(SessionStartInfo("faulty", priority="Highest"), settings) as busy,
            BrokerClient(busy) as client,
        ):
            assert (idle.refresh().record.priority, busy.refresh().record.priority) == (1000, 4000)
            for _ in range(12):
                client.send_request("sleep", 0.5)
            client.end_requests()
            # no shrink interval to wait for: spare units follow the outstanding work
            wait_until("the busy one holds 3", lambda: len(busy.refresh().instances) == 3)
            assert _target(idle) == 4  # its target did not shrink: the mode shared them
            assert len(list(client.get_responses(timeout=60))) == 12


def _target(session: Session) -> int:
    status = session.refresh().status
    return -1 if status is None else status.target


def test_a_host_that_could_not_load_the_service_is_tried_again_after_the_period(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    folder = settings.service_registration_path[0]
    (folder / "later.toml").write_text(
        f'entry_point = "later_mod:Later"\npython_path = ["{code}"]\n'
        "[broker]\nend_point_not_found_retry_period = 2\n"
    )
    with Session.create(SessionStartInfo("later"), settings) as session:
        info = wait_until("the load failure", lambda: _waiting(session))
        assert info.status is not None
        assert "could not be loaded on any host it may use" in info.status.waiting
        assert "later_mod" in info.status.waiting and "next try in" in info.status.waiting
        assert info.record.state == "queued"  # not failed: it will be tried again
        (code / "later_mod.py").write_text(
            "class Later:\n    def __init__(self, context):\n        pass\n"
            "    def double(self, x):\n        return 2 * x\n"
        )
        with BrokerClient(session) as client:
            client.send_request("double", 21)
            client.end_requests()
            (response,) = client.get_responses(timeout=60)
        assert response.result == 42


def test_a_service_that_fails_again_after_the_retry_fails_the_session(
    settings: Settings, farm: LocalFarm
) -> None:
    folder = settings.service_registration_path[0]
    (folder / "never.toml").write_text(
        'entry_point = "never_there:Nothing"\n[broker]\nend_point_not_found_retry_period = 1\n'
    )
    with (
        Session.create(SessionStartInfo("never"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("anything")
        with pytest.raises(SessionFailed, match=r"twice each .*never_there"):
            list(client.get_responses(timeout=60))
