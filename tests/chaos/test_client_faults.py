"""The client killed mid-submit and mid-read, then resumed as README and docs/cli.md say.
Each a durable batch of 20,000 calls, every response exactly once afterwards."""

from __future__ import annotations

import signal

import pytest

from tests.chaos.harness import CliSubmitter, Stage, kill_reader

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]


def test_submit_killed_and_interrupted_then_resumed(stage: Stage) -> None:
    # SIGKILL prints nothing: the session is found with `soafarm sessions list` and the
    # documented command resumes it; Ctrl-C prints the command, which is run as printed
    submitter = CliSubmitter([(0.15, signal.SIGKILL), (0.45, signal.SIGINT)])
    row = stage.durable("soafarm submit SIGKILLed, then Ctrl-C; resumed", [], submitter)
    assert len(row.faults) == 2


def test_reader_killed_mid_read_then_resumed(stage: Stage) -> None:
    faults = [(f, kill_reader()) for f in (0.2, 0.45, 0.7)]
    stage.durable("soafarm responses --follow SIGKILLed x3", faults)
