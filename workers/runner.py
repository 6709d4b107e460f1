"""Run one request against a service object and encode its response (or fault) once."""

from __future__ import annotations

import traceback
from typing import Any

from soafarm.errors import PayloadError
from soafarm.protocol import Fault, Request, Response, check_size, encode_response


class CallRunner:
    """Dispatches requests to a constructed service's public methods."""

    def __init__(
        self, service: Any, operations: frozenset[str], include_detail: bool, limit: int
    ) -> None:
        """`limit` is the largest encoded response allowed (max_message_bytes)."""
        self.service = service
        self.operations = operations
        self.include_detail = include_detail
        self.limit = limit

    def run(self, request: Request) -> bytes:
        """Call the operation; return the encoded response, a fault if the service raised."""
        if request.op not in self.operations:
            known = ", ".join(sorted(self.operations))
            fault = Fault("UnknownOperation", f"no operation {request.op!r}; operations: {known}")
            return self._fault(request, fault)
        try:
            value = getattr(self.service, request.op)(*request.args, **request.kwargs)
        except Exception as e:  # the service's failure becomes the caller's fault response
            detail = traceback.format_exc() if self.include_detail else ""
            return self._fault(request, Fault(type(e).__name__, str(e), detail))
        try:
            body = encode_response(Response(request.id, value, None, request.user_data))
            return check_size(body, self.limit, f"response to request {request.id}")
        except PayloadError as e:
            return self._fault(request, Fault(type(e).__name__, str(e)))

    def _fault(self, request: Request, fault: Fault) -> bytes:
        return encode_response(Response(request.id, None, fault, request.user_data))
