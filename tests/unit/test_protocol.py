"""Wire protocol: round trips, one DecodeError for any bad body, size and encoding limits."""

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from soafarm.errors import ConfigError, DecodeError, EncodeError, MessageTooLarge, ServiceFault
from soafarm.names import check_client_id
from soafarm.protocol import (
    MAX_REQUEST_ID,
    ControlReply,
    ControlRequest,
    Fault,
    Request,
    RequestBatch,
    Response,
    ResponseBatch,
    decode,
    encode,
    encode_request,
)

LIMIT = 1 << 20


@pytest.mark.parametrize(
    "message",
    [
        RequestBatch(3, "c1", "q", (Request(0, "echo", ("a", 1), {"k": [1, 2]}, {"u": 1}, 2),)),
        ResponseBatch(
            3,
            "c1",
            "inst",
            (Response(0, "x", None, 5), Response(1, None, Fault("ValueError", "bad", "tb"), None)),
        ),
        ControlRequest("create", {"service": "echo"}),
        ControlReply(False, None, "SessionNotFound", "no session 9"),
    ],
)
def test_round_trip(message: object) -> None:
    assert decode(encode(message), LIMIT) == message  # type: ignore[arg-type]


def test_fault_response_raises_service_fault() -> None:
    r = Response(1, None, Fault("ValueError", "boom", "Traceback..."), "ud")
    assert r.is_fault
    with pytest.raises(ServiceFault) as e:
        _ = r.result
    assert (e.value.fault_type, e.value.message, e.value.detail) == (
        "ValueError",
        "boom",
        "Traceback...",
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb(["rq", 99]),
        msgpack.packb(["rq", 1, "sid-not-int", "c", "q", []]),
        msgpack.packb(["rs", 1, 1, "c", "i", [[1, 2]]]),
        msgpack.packb({"a": 1}),
    ],
)
def test_malformed_bodies_raise_one_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(body, LIMIT)


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="over the 100-byte limit"):
        decode(b"\x90" * 101, 100)


def test_unencodable_payload_is_a_clear_error() -> None:
    with pytest.raises(EncodeError, match="cannot encode"):
        encode_request(Request(0, "echo", (object(),)), LIMIT)


def test_oversized_request_names_the_limit() -> None:
    with pytest.raises(MessageTooLarge, match="over the 2,048-byte limit"):
        encode_request(Request(0, "echo", ("x" * 4096,)), 2048)


def test_client_ids_are_checked() -> None:
    assert check_client_id("batch-1.a_b") == "batch-1.a_b"
    for bad in ("", "a b", "x" * 65, "é"):
        with pytest.raises(ConfigError):
            check_client_id(bad)


@given(st.binary(max_size=512))
def test_decode_never_raises_anything_but_decode_error(body: bytes) -> None:
    # anything else (TypeError, ValueError, msgpack's own errors) would fail the test
    with contextlib.suppress(DecodeError):
        decode(body, LIMIT)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )
)
def test_any_plain_value_survives_a_request_round_trip(value: object) -> None:
    batch = RequestBatch(1, "c", "q", (Request(7, "op", (value,), {"k": value}, value),))
    decoded = decode(encode(batch), LIMIT)
    assert isinstance(decoded, RequestBatch)
    assert decoded.requests[0].args == (value,)
    assert decoded.requests[0].user_data == value


def _raw_request_batch(sid: object, rid: object, retries: object = 0) -> bytes:
    body: bytes = msgpack.packb(["rq", 1, sid, "c", "q", [[rid, "op", [], {}, None, retries]]])
    return body


@given(st.integers(-(2**63), 2**64 - 1) | st.booleans() | st.floats())
def test_a_request_id_outside_the_done_bitmap_is_refused(rid: object) -> None:
    # ids are bit offsets in Redis: outside 0..2**32-1 Redis refuses them (or a 4e9 id grows
    # the bitmap by 512 MB); a bool or float is no id at all
    body = _raw_request_batch(1, rid)
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_REQUEST_ID:
        decoded = decode(body, LIMIT)
        assert isinstance(decoded, RequestBatch) and decoded.requests[0].id == rid
    else:
        with pytest.raises(DecodeError, match="request id"):
            decode(body, LIMIT)


@pytest.mark.parametrize(
    ("sid", "rid", "retries", "what"),
    [
        (-1, 0, 0, "header"),
        (2**60, 0, 0, "header"),
        (1, 0, -3, "retries"),
        (1, 0, 2**40, "retries"),
    ],
)
def test_session_ids_and_retry_counts_are_bounded(
    sid: int, rid: int, retries: int, what: str
) -> None:
    with pytest.raises(DecodeError, match=what):
        decode(_raw_request_batch(sid, rid, retries), LIMIT)


@given(st.integers(-(2**63), 2**64 - 1))
def test_a_response_id_is_bounded_as_a_request_id(rid: int) -> None:
    body = msgpack.packb(["rs", 1, 1, "c", "i", [[rid, "v", None, None]]])
    if 0 <= rid <= MAX_REQUEST_ID:
        assert isinstance(decode(body, LIMIT), ResponseBatch)
    else:
        with pytest.raises(DecodeError, match="response id"):
            decode(body, LIMIT)
