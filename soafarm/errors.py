"""The soafarm exception hierarchy: everything user-facing derives from `SoafarmError`.

Each class carries a one-line message that says what is wrong and what to do; the CLI prints
exactly that line and exits with the class's `exit_code`.
"""

from __future__ import annotations

from typing import ClassVar

#: CLI exit codes (documented in docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_INTERRUPTED = 130


class SoafarmError(Exception):
    """Root of every error soafarm raises on purpose."""

    exit_code: ClassVar[int] = EXIT_ERROR


class ConfigError(SoafarmError):
    """A configuration file, environment variable or option is invalid."""

    exit_code = EXIT_USAGE


class TemplateLimitExceeded(ConfigError):
    """A session asks for more than its job template allows (units, unit, priority, node
    groups): the message names the limit and the template."""


class ConnectionFailed(SoafarmError):
    """RabbitMQ or Redis could not be reached (the message names the masked URL)."""

    exit_code = EXIT_CONNECT


class BrokerUnavailable(ConnectionFailed):
    """No broker daemon answered a control request in time."""


class BrokerNoAnswer(BrokerUnavailable):
    """A broker daemon took a control request and did not answer in time: it may have
    acted on it (a `create` may have made a session nobody holds)."""


class ConnectionLost(ConnectionFailed):
    """RabbitMQ or Redis went away and did not come back within `client.reconnect_timeout`
    (the client retried with back-off until then)."""


class PermissionDenied(SoafarmError):
    """The caller's RabbitMQ user may not do this: the session is another user's and not
    shared with them, or the operation is an admin's (the message names the user, the
    session and its owner)."""


class RegistrationError(SoafarmError):
    """A service registration file is malformed, or a service cannot be resolved."""


class ServiceNotFound(RegistrationError):
    """No registration file matches the requested service name (and version)."""


class PackageError(RegistrationError):
    """A service package cannot be made or deployed: no single registration file, too
    large, an entry that would land outside the package."""


class SessionError(SoafarmError):
    """A session operation failed."""


class SessionNotFound(SessionError):
    """No session has the given id."""


class SessionFailed(SessionError):
    """The session cannot run: its service could not be loaded on any host."""


class ResourcesUnavailable(SessionError):
    """The farm cannot give a session its minimum now (`SessionStartInfo(fail_if_queued=
    True)`): the message says why (too few live hosts in its node groups, units held by
    other sessions...). The session was closed."""


class Throttled(SessionError):
    """send_request waited longer than its throttle timeout for the session's queue to drain."""


class SessionClosed(SessionError):
    """The session was closed; it cannot be used any more."""


class ClientIdleTimeout(SessionError):
    """The broker disconnected this client: it sent nothing, read nothing and had nothing
    outstanding for the session's `client_idle_timeout`. Its responses are kept; attach the
    client id again (a new BrokerClient), or raise the limit (the message says how)."""


class ReaderTakenOver(SessionError):
    """Another reader took over this client id's responses (one reader at a time)."""


class ResponseHandlerError(SessionError):
    """A response handler set with `set_response_handler` raised; its exception is the cause.
    The handler went on with the remaining responses."""


class ResponseTimeout(SessionError):
    """Responses did not all arrive within the caller's timeout."""


class ResponsesLost(SessionError):
    """Responses of an interactive session were lost with a dropped RabbitMQ connection (an
    auto-acknowledged response on its way to the client is not kept); the message says how
    many."""


class PayloadError(SoafarmError):
    """A message cannot be encoded, decoded, or is over the size limit."""


class EncodeError(PayloadError):
    """A value cannot be encoded with msgpack (only plain data crosses the wire)."""


class DecodeError(PayloadError):
    """Bytes from the wire are not a valid soafarm message."""


class ControlRequestError(DecodeError):
    """A control request names an unknown operation, or its arguments have the wrong shape or
    types (checked where it arrives, before the broker daemon acts on it)."""

    exit_code = EXIT_USAGE


class MessageTooLarge(PayloadError):
    """A request or response is larger than `max_message_bytes`."""


class ServiceFault(SoafarmError):
    """A request failed in the service; raised by `Response.result`.

    `fault_type` is the service exception's class name. When the registration sets
    `include_exception_detail_in_faults = true`, `message` is the exception's message and
    `detail` its traceback; by default (false, as WCF's IncludeExceptionDetailInFaults)
    `message` only names the type and says how to see more, and `detail` is empty (the
    worker host logs the full error). The farm's own faults (RetryLimitExceeded,
    UnknownOperation, an unencodable result) always say what happened.
    """

    def __init__(self, fault_type: str, message: str, detail: str = "", retries: int = 0) -> None:
        super().__init__(f"{fault_type}: {message}")
        self.fault_type = fault_type
        self.message = message
        self.detail = detail
        self.retries = retries


class ProvisionerError(SoafarmError):
    """A provisioner could not start or stop hosts."""


class RetryOperationError(SoafarmError):
    """Raised by a service to ask the farm to run the request again (counts as a retry)."""
