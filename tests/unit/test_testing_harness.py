"""soafarm.testing: service authors can unit-test a service class without a farm."""

import pytest

from soafarm.errors import EncodeError, ServiceFault
from soafarm.examples.faulty import FaultyService
from soafarm.testing import ServiceHarness


def test_results_and_faults_come_back_as_on_the_farm() -> None:
    harness = ServiceHarness(FaultyService)
    assert harness.call("ok", {"a": [1, 2]}, user_data=5).result == {"a": [1, 2]}
    with pytest.raises(ServiceFault) as e:
        _ = harness.call("fail", "nope").result
    assert e.value.fault_type == "ValueError" and "Traceback" in e.value.detail
    assert harness.call("unencodable").fault.type == "EncodeError"  # type: ignore[union-attr]
    assert harness.call("nosuch").fault.type == "UnknownOperation"  # type: ignore[union-attr]


def test_arguments_are_checked_like_the_client_does() -> None:
    with pytest.raises(EncodeError):
        ServiceHarness(FaultyService).call("ok", object())


def test_constructor_sees_the_environment() -> None:
    with pytest.raises(RuntimeError, match="fail at start-up"):
        ServiceHarness(FaultyService, environment={"FAULTY_FAIL_INIT": "1"})
