"""Unit-testing a service class in-process, the way a service instance runs it.

For service authors (the farm's own tests always use the real servers):

    from soafarm.testing import ServiceHarness

    def test_price() -> None:
        pricer = ServiceHarness(Pricer, environment={"RATE": "0.02"})
        assert pricer.call("call_price", 100, 95, 0.2, 1).result > 0

Arguments and results go through the same msgpack encoding and size limit as on the farm,
so a result the farm could not send fails here too, as the same fault.
"""

from __future__ import annotations

from typing import Any

from soafarm.config import MiB
from soafarm.errors import DecodeError
from soafarm.protocol import (
    BATCH_HEADER_ALLOWANCE,
    Request,
    RequestBatch,
    Response,
    ResponseBatch,
    decode,
    encode_request,
    encode_request_batch,
    encode_response_batch,
)
from soafarm.service import CallRunner, ServiceContext, construct, operations_of


class ServiceHarness:
    """One service instance, constructed once, called in this process."""

    def __init__(
        self,
        cls: type,
        environment: dict[str, str] | None = None,
        include_exception_detail: bool = True,
        max_message_bytes: int = 4 * MiB,
        common_data: dict[str, Any] | None = None,
    ) -> None:
        """Construct `cls` with a test `ServiceContext` (session 0, host "test"), whose
        `common_data(name)` reads from `common_data`."""
        data = dict(common_data or {})
        self.context = ServiceContext(
            session_id=0,
            host_name="test",
            instance_id="test.0.0",
            service_name=cls.__name__,
            environment=dict(environment or {}),
            data_loader=data.__getitem__,
        )
        self.limit = max_message_bytes
        self.service = construct(cls, self.context)
        self.runner = CallRunner(
            self.service, operations_of(cls), include_exception_detail, max_message_bytes
        )
        self._next_id = 0

    def _wire(self, body: bytes, kind: type[RequestBatch] | type[ResponseBatch]) -> Any:
        message = decode(body, self.limit + BATCH_HEADER_ALLOWANCE)
        if not isinstance(message, kind):
            raise DecodeError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    def call(self, op: str, *args: Any, user_data: Any = None, **kwargs: Any) -> Response:
        """Run one request; returns its Response (`.result` raises ServiceFault on a fault)."""
        request = Request(self._next_id, op, args, kwargs, user_data)
        self._next_id += 1
        sent = encode_request(request, self.limit)  # the same checks as BrokerClient
        received: RequestBatch = self._wire(encode_request_batch(0, "t", "t", [sent]), RequestBatch)
        answer = self.runner.run(received.requests[0]).body
        back: ResponseBatch = self._wire(
            encode_response_batch(0, "t", "t", [answer]), ResponseBatch
        )
        return back.responses[0]
