"""Farm processes SIGKILLed mid-batch: instances, worker hosts, the broker daemon, the whole
farm. Each a durable batch of 20,000 calls, every response exactly once afterwards."""

from __future__ import annotations

import pytest

from tests.chaos.harness import Stage, kill, kill_any, kill_up_alone, kill_whole_farm

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]

#: Where in the batch (fraction of the requests answered) each fault lands.
FOUR = (0.1, 0.3, 0.5, 0.7)


def test_no_fault_baseline(stage: Stage) -> None:
    # the batch time without faults, for the table; and the harness checked on a clean run
    row = stage.durable("no fault (baseline)", [])
    assert row.lost == row.duplicated == 0


def test_instances_sigkilled(stage: Stage) -> None:
    stage.durable("SIGKILL a random instance x4", [(f, kill("instance")) for f in FOUR])


def test_worker_hosts_sigkilled(stage: Stage) -> None:
    stage.durable("SIGKILL a random worker host x3", [(f, kill("worker")) for f in FOUR[:3]])


def test_broker_daemon_sigkilled(stage: Stage) -> None:
    stage.durable("SIGKILL the broker daemon x3", [(f, kill("broker")) for f in FOUR[:3]])


def test_random_farm_processes_sigkilled(stage: Stage) -> None:
    # the first report: random SIGKILLs of farm processes stalled a 20,000 batch
    faults = [(f, kill_any()) for f in (0.08, 0.2, 0.32, 0.44, 0.56, 0.68)]
    stage.durable("SIGKILL a random farm process x6", faults)


def test_whole_farm_sigkilled_and_restarted(stage: Stage) -> None:
    # every process at once (a crash of the machine), then `soafarm up` alone: its children
    # must not outlive it; each time `soafarm up` is started again
    faults = [(0.2, kill_whole_farm()), (0.6, kill_up_alone())]
    stage.durable("SIGKILL the whole farm; then soafarm up alone", faults)
