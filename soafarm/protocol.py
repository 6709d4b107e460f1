"""The wire protocol: msgpack envelopes as frozen dataclasses, one decoder, size limits.

Every AMQP body soafarm sends is a msgpack array whose first two items are a kind tag and
the protocol version. Requests sent close together travel as one `RequestBatch` (one AMQP
message), each keeping its own id, retry count, user data and response: that is how the data
path beats one RabbitMQ round trip per request. Nothing from the wire is ever unpickled or
evaluated; `decode()` turns every malformed body into a single `DecodeError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from soafarm.errors import DecodeError, EncodeError, MessageTooLarge, ServiceFault

CONTENT_TYPE = "application/x-soafarm-msgpack"
VERSION = 1

#: Room left in a batch body for its header (ids, reply queue name) beside the items.
BATCH_HEADER_ALLOWANCE = 1024

#: Largest request id: ids are bit offsets of a client id's done bitmap in Redis, whose
#: offsets stop at 2**32 - 1. A negative id made Redis refuse the batch (and an instance
#: take that for a lost connection, forever); the bound makes both a DecodeError.
MAX_REQUEST_ID = 2**32 - 1
#: Largest session id and retry count a message may carry (ids count up from 1; retries
#: stop at message_resend_limit).
MAX_SESSION_ID = 2**53
MAX_RETRIES = 1_000_000

KIND_REQUESTS = "rq"
KIND_RESPONSES = "rs"
KIND_CONTROL = "ct"
KIND_CONTROL_REPLY = "cr"


@dataclass(frozen=True)
class Fault:
    """Why a request failed: the exception type name, its message, an optional traceback,
    and how many times the farm retried it (RetryLimitExceeded faults)."""

    type: str
    message: str
    detail: str = ""
    retries: int = 0


@dataclass(frozen=True)
class Request:
    """One call of a service operation."""

    id: int
    op: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    user_data: Any = None
    retries: int = 0


@dataclass(frozen=True)
class Response:
    """The outcome of one request: a value or a fault, with the request's id and user data."""

    id: int
    value: Any = None
    fault: Fault | None = None
    user_data: Any = None

    @property
    def is_fault(self) -> bool:
        """True when the service raised (or the farm gave up on) this request."""
        return self.fault is not None

    @property
    def result(self) -> Any:
        """The operation's return value; raises `ServiceFault` if the request faulted."""
        if self.fault is not None:
            raise ServiceFault(
                self.fault.type, self.fault.message, self.fault.detail, self.fault.retries
            )
        return self.value


@dataclass(frozen=True)
class RequestBatch:
    """Requests of one client id of one session, travelling together in one message."""

    session_id: int
    client_id: str
    reply_to: str
    requests: tuple[Request, ...]


@dataclass(frozen=True)
class ResponseBatch:
    """Responses produced by one service instance for one client id."""

    session_id: int
    client_id: str
    instance: str
    responses: tuple[Response, ...]


@dataclass(frozen=True)
class ControlRequest:
    """A client's (or CLI's) request to the broker daemon's session service."""

    op: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlReply:
    """The broker daemon's answer: a result, or the name and message of a SoafarmError."""

    ok: bool
    result: Any = None
    error_type: str = ""
    error: str = ""


Message = RequestBatch | ResponseBatch | ControlRequest | ControlReply


def _packb(value: Any) -> bytes:
    try:
        body: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"cannot encode payload with msgpack: {e}") from None
    return body


def check_size(body: bytes, limit: int, what: str) -> bytes:
    """Return `body`, or raise MessageTooLarge if it is over `limit` bytes."""
    if len(body) > limit:
        raise MessageTooLarge(
            f"{what} is {len(body):,} bytes, over the {limit:,}-byte limit "
            "(raise max_message_bytes, or send the data as common data / a reference)"
        )
    return body


def encode_request(request: Request, limit: int) -> bytes:
    """Encode one request for a batch, checking it alone against the size limit.

    Only plain data (None, bool, int, float, str, bytes, lists, dicts) can be sent.
    """
    item = [
        request.id,
        request.op,
        list(request.args),
        request.kwargs,
        request.user_data,
        request.retries,
    ]
    return check_size(_packb(item), limit, f"request {request.id} ({request.op})")


def _join_batch(header: tuple[Any, ...], encoded_items: list[bytes]) -> bytes:
    """An array of `header` fields then an array of already-encoded items.

    msgpack is self-delimiting, so an array header followed by encoded items is a valid
    array: each request or response is encoded exactly once, when it is produced.
    """
    packer = msgpack.Packer(use_bin_type=True)
    parts: list[bytes] = [packer.pack_array_header(len(header) + 1)]
    parts += [packer.pack(x) for x in header]
    parts.append(packer.pack_array_header(len(encoded_items)))
    return b"".join(parts + encoded_items)


def encode_request_batch(
    session_id: int, client_id: str, reply_to: str, encoded_requests: list[bytes]
) -> bytes:
    """Join requests already encoded by `encode_request` into one batch body."""
    return _join_batch((KIND_REQUESTS, VERSION, session_id, client_id, reply_to), encoded_requests)


def encode_response_batch(
    session_id: int, client_id: str, instance: str, encoded_responses: list[bytes]
) -> bytes:
    """Join responses already encoded by `encode_response` into one batch body."""
    return _join_batch(
        (KIND_RESPONSES, VERSION, session_id, client_id, instance), encoded_responses
    )


def encode(message: Message) -> bytes:
    """Encode any envelope (request batches are usually built with `encode_request_batch`)."""
    if isinstance(message, RequestBatch):
        limit = 2**63
        items = [encode_request(r, limit) for r in message.requests]
        return encode_request_batch(message.session_id, message.client_id, message.reply_to, items)
    if isinstance(message, ResponseBatch):
        return encode_response_batch(
            message.session_id,
            message.client_id,
            message.instance,
            [encode_response(r) for r in message.responses],
        )
    if isinstance(message, ControlRequest):
        return _packb([KIND_CONTROL, VERSION, message.op, message.params])
    return _packb(
        [KIND_CONTROL_REPLY, VERSION, message.ok, message.result, message.error_type, message.error]
    )


def _response_item(r: Response) -> list[Any]:
    fault = (
        None
        if r.fault is None
        else [r.fault.type, r.fault.message, r.fault.detail, r.fault.retries]
    )
    return [r.id, r.value, fault, r.user_data]


def encode_response(response: Response) -> bytes:
    """Encode one response alone (used to check a service's result is encodable and small)."""
    return _packb(_response_item(response))


class _Shape(Exception):
    """Internal: the decoded value does not have the expected shape."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise _Shape(what)


def _in(value: Any, top: int) -> bool:
    """An int (not a bool) from 0 to `top`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


def _request(item: Any) -> Request:
    _check(isinstance(item, list) and len(item) == 6, "request item")
    rid, op, args, kwargs, user_data, retries = item
    _check(_in(rid, MAX_REQUEST_ID) and isinstance(op, str), "request id/op")
    _check(isinstance(args, list) and isinstance(kwargs, dict), "request args/kwargs")
    _check(all(isinstance(k, str) for k in kwargs), "request kwargs keys")
    _check(_in(retries, MAX_RETRIES), "request retries")
    return Request(rid, op, tuple(args), kwargs, user_data, retries)


def _response(item: Any) -> Response:
    _check(isinstance(item, list) and len(item) == 4, "response item")
    rid, value, fault, user_data = item
    _check(_in(rid, MAX_REQUEST_ID), "response id")
    if fault is not None:
        _check(isinstance(fault, list) and len(fault) == 4, "fault")
        _check(all(isinstance(x, str) for x in fault[:3]), "fault fields")
        _check(_in(fault[3], MAX_RETRIES), "fault retries")
        return Response(rid, None, Fault(*fault), user_data)
    return Response(rid, value, None, user_data)


def _build(data: Any) -> Message:
    _check(isinstance(data, list) and len(data) >= 2, "envelope")
    kind, version = data[0], data[1]
    _check(version == VERSION, f"protocol version {version!r} (expected {VERSION})")
    if kind == KIND_REQUESTS:
        _check(len(data) == 6, "request batch")
        _, _, sid, cid, reply_to, items = data
        _check(
            _in(sid, MAX_SESSION_ID) and isinstance(cid, str) and isinstance(reply_to, str),
            "request batch header",
        )
        _check(isinstance(items, list), "request list")
        return RequestBatch(sid, cid, reply_to, tuple(_request(i) for i in items))
    if kind == KIND_RESPONSES:
        _check(len(data) == 6, "response batch")
        _, _, sid, cid, instance, items = data
        _check(
            _in(sid, MAX_SESSION_ID) and isinstance(cid, str) and isinstance(instance, str),
            "response batch header",
        )
        _check(isinstance(items, list), "response list")
        return ResponseBatch(sid, cid, instance, tuple(_response(i) for i in items))
    if kind == KIND_CONTROL:
        _check(
            len(data) == 4 and isinstance(data[2], str) and isinstance(data[3], dict),
            "control request",
        )
        return ControlRequest(data[2], data[3])
    if kind == KIND_CONTROL_REPLY:
        _check(len(data) == 6 and isinstance(data[2], bool), "control reply")
        _check(isinstance(data[4], str) and isinstance(data[5], str), "control reply error")
        return ControlReply(data[2], data[3], data[4], data[5])
    raise _Shape(f"message kind {kind!r}")


def decode(body: bytes, limit: int) -> Message:
    """Decode a body from the wire; every failure becomes one `DecodeError`.

    Bodies over `limit` bytes are refused before any parsing.
    """
    if len(body) > limit:
        raise DecodeError(f"message of {len(body):,} bytes is over the {limit:,}-byte limit")
    try:
        data = msgpack.unpackb(body, raw=False, strict_map_key=False)
        return _build(data)
    except _Shape as e:
        raise DecodeError(f"malformed soafarm message: bad {e}") from None
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise DecodeError(f"undecodable message: {type(e).__name__}: {e}") from None


def decode_request(body: bytes, limit: int) -> Request:
    """Decode one request encoded by `encode_request` (not a batch); one `DecodeError`."""
    return _decode_item(body, limit, _request)


def decode_response(body: bytes, limit: int) -> Response:
    """Decode one response encoded by `encode_response` (not a batch); one `DecodeError`."""
    return _decode_item(body, limit, _response)


Item = TypeVar("Item")


def _decode_item(body: bytes, limit: int, build: Callable[[Any], Item]) -> Item:
    if len(body) > limit:
        raise DecodeError(f"item of {len(body):,} bytes is over the {limit:,}-byte limit")
    try:
        return build(msgpack.unpackb(body, raw=False, strict_map_key=False))
    except _Shape as e:
        raise DecodeError(f"malformed soafarm item: bad {e}") from None
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise DecodeError(f"undecodable item: {type(e).__name__}: {e}") from None


M = TypeVar("M")


def decode_as(body: bytes, limit: int, kind: type[M]) -> M:
    """Decode a body that must be a `kind` message: the decode-then-check every receiver
    does, with one `DecodeError` for a body of the wrong kind too."""
    message = decode(body, limit)
    if not isinstance(message, kind):
        wanted = "".join(f" {c.lower()}" if c.isupper() else c for c in kind.__name__).strip()
        raise DecodeError(f"expected a {wanted}, got {type(message).__name__}")
    return message
