"""`include_exception_detail_in_faults`: what a fault carries with it off (the default) and
on, and that the full error is logged either way."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from soafarm.errors import RetryOperationError, ServiceFault
from soafarm.examples.faulty import FaultyService
from soafarm.service import hidden_message
from soafarm.testing import ServiceHarness


def test_detail_off_sends_the_type_and_a_generic_message_and_logs_the_error() -> None:
    harness = ServiceHarness(FaultyService, include_exception_detail=False)
    with capture_logs() as logs:
        response = harness.call("fail", "card 4242 declined")
    with pytest.raises(ServiceFault) as e:
        _ = response.result
    assert e.value.fault_type == "ValueError"
    assert e.value.message == hidden_message("ValueError")
    assert "the service raised ValueError" in e.value.message
    assert "include_exception_detail_in_faults = true" in e.value.message
    assert "4242" not in str(e.value) and e.value.detail == ""
    [event] = [entry for entry in logs if entry["event"] == "service_fault"]
    assert event["log_level"] == "warning"
    assert event["fault_type"] == "ValueError" and event["error"] == "card 4242 declined"
    assert event["op"] == "fail" and isinstance(event["exc_info"], ValueError)


def test_detail_on_sends_the_message_and_the_traceback() -> None:
    harness = ServiceHarness(FaultyService, include_exception_detail=True)
    with pytest.raises(ServiceFault) as e:
        _ = harness.call("fail", "card 4242 declined").result
    assert e.value.fault_type == "ValueError" and e.value.message == "card 4242 declined"
    assert "Traceback" in e.value.detail and "in fail" in e.value.detail


def test_farm_faults_keep_their_message_with_detail_off() -> None:
    """Only what the service raised is hidden: the farm's own faults say what happened."""
    harness = ServiceHarness(FaultyService, include_exception_detail=False)
    unknown = harness.call("nosuch").fault
    assert unknown is not None and "no operation 'nosuch'" in unknown.message
    encode = harness.call("unencodable").fault
    assert encode is not None and encode.type == "EncodeError" and encode.message


class Retrier:
    """Asks for a retry every time."""

    def again(self) -> None:
        raise RetryOperationError("token secret-123 expired")


def test_a_retry_request_hides_the_services_reason_with_detail_off() -> None:
    for detail, shown in ((False, False), (True, True)):
        harness = ServiceHarness(Retrier, include_exception_detail=detail)
        with capture_logs() as logs:
            fault = harness.call("again").fault
        assert fault is not None and fault.type == "RetryLimitExceeded"
        assert "failed after 3 retries" in fault.message
        assert ("secret-123" in fault.message) is shown
        assert [e["error"] for e in logs if e["event"] == "service_fault"] == [
            "token secret-123 expired"
        ]
