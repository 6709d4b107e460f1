"""What a service author sees: the context a service instance is constructed with.

A service is a plain Python class; its public methods are its operations. It is constructed
once per service instance, so it can load data at start-up:

    class Pricer:
        def __init__(self, context: ServiceContext) -> None:
            self.curves = load_curves(context.environment["CURVES"])

        def price(self, option: dict) -> float:
            ...
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from soafarm.errors import PayloadError, RetryOperationError, SoafarmError
from soafarm.protocol import Fault, Request, Response, check_size, encode_response

log = structlog.get_logger(__name__)


def hidden_message(fault_type: str) -> str:
    """A fault's message when the registration keeps exception detail out of faults (its
    default, as WCF's IncludeExceptionDetailInFaults=false): the type, and how to see more."""
    return (
        f"the service raised {fault_type}; set include_exception_detail_in_faults = true in "
        "its registration to see the message (the worker host's log has it)"
    )


@dataclass(frozen=True)
class ServiceContext:
    """Where a service instance runs: its session, host, instance id and environment."""

    session_id: int
    host_name: str
    instance_id: str
    service_name: str
    service_version: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    data_loader: Callable[[str], Any] | None = field(default=None, repr=False, compare=False)

    def common_data(self, name: str) -> Any:
        """The session's common data `name` (attached by the client when it created the
        session): read it in the constructor, once per instance."""
        if self.data_loader is None:
            raise SoafarmError(f"session {self.session_id} has no common data")
        return self.data_loader(name)


def operations_of(cls: type) -> frozenset[str]:
    """The operation names of a service class: its public callables."""
    return frozenset(
        name
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member)
    )


def construct(cls: type, context: ServiceContext) -> Any:
    """Build a service instance, passing the context if the constructor takes an argument."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    return cls(context) if params else cls()


class Outcome(NamedTuple):
    """One request's encoded response, and whether it is a fault (for the counters)."""

    request_id: int
    faulted: bool
    body: bytes


class CallRunner:
    """Dispatches requests to a constructed service's public methods."""

    def __init__(
        self,
        service: Any,
        operations: frozenset[str],
        include_detail: bool,
        limit: int,
        resend_limit: int = 3,
        *,
        where: dict[str, Any] | None = None,
    ) -> None:
        """`include_detail` (the registration's `include_exception_detail_in_faults`): a
        service exception's fault carries its message and traceback; without it, only its
        type and `hidden_message` (the full error is logged here either way). `limit` is the
        largest encoded response allowed (max_message_bytes); `resend_limit` how often a
        RetryOperationError may re-run a request; `where` names the session and instance
        in the log."""
        self.service = service
        self.log = log.bind(**(where or {}))
        self.operations = operations
        self.include_detail = include_detail
        self.limit = limit
        self.resend_limit = resend_limit

    def run(self, request: Request) -> Outcome:
        """Call the operation; return the encoded response, a fault if the service raised."""
        unknown = self.unknown_operation(request)
        if unknown is not None:
            return unknown
        retries = 0
        while True:
            try:
                value = getattr(self.service, request.op)(*request.args, **request.kwargs)
                break
            except RetryOperationError as e:
                if retries >= self.resend_limit:
                    why = f"the service asked: {e}" if self.include_detail else "the service asked"
                    self._log_service_error(request, e, retries)
                    return self.retry_limit_fault(request, retries, why)
                retries += 1
            except Exception as e:  # the service's failure becomes the caller's fault response
                return self._service_fault(request, e)
        try:
            body = encode_response(Response(request.id, value, None, request.user_data))
            checked = check_size(body, self.limit, f"response to request {request.id}")
            return Outcome(request.id, False, checked)
        except PayloadError as e:
            return self._fault(request, Fault(type(e).__name__, str(e)))

    def unknown_operation(self, request: Request) -> Outcome | None:
        """The fault for a request naming no operation of the service (None if it names one)."""
        if request.op in self.operations:
            return None
        known = ", ".join(sorted(self.operations))
        fault = Fault("UnknownOperation", f"no operation {request.op!r}; operations: {known}")
        return self._fault(request, fault)

    def retry_limit_fault(self, request: Request, retries: int, why: str) -> Outcome:
        """The fault for a request that failed again after `retries` retries."""
        message = (
            f"request {request.id} ({request.op}) failed after {retries} retries "
            f"(message_resend_limit {self.resend_limit}): {why}"
        )
        return self._fault(request, Fault("RetryLimitExceeded", message, "", retries))

    def _service_fault(self, request: Request, error: Exception) -> Outcome:
        """The fault for a service exception (call from its `except` block): its message
        and traceback only with `include_detail`, as WCF does; logged in full either way,
        so an operator sees what the client is not shown."""
        name = type(error).__name__
        self._log_service_error(request, error, 0)
        if self.include_detail:
            return self._fault(request, Fault(name, str(error), traceback.format_exc()))
        return self._fault(request, Fault(name, hidden_message(name)))

    def _log_service_error(self, request: Request, error: Exception, retries: int) -> None:
        """Log a service exception that became a fault, with its message and traceback."""
        self.log.warning(
            "service_fault",
            request_id=request.id,
            op=request.op,
            fault_type=type(error).__name__,
            error=str(error),
            retries=retries,
            exc_info=error,
        )

    def _fault(self, request: Request, fault: Fault) -> Outcome:
        body = encode_response(Response(request.id, None, fault, request.user_data))
        return Outcome(request.id, True, body)
