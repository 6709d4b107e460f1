"""Control RPC contracts: each operation's arguments and reply checked at the edge."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from soafarm.config import BrokerSettings, JobTemplate
from soafarm.errors import ControlRequestError, DecodeError
from soafarm.protocol import ControlRequest, decode, encode
from soafarm.state.control import (
    OPS,
    AddDataArgs,
    AdminsArgs,
    AttachClientArgs,
    Attached,
    ClientPurged,
    ClientStatus,
    CloseArgs,
    Closed,
    ControlCall,
    CreateArgs,
    DataAdded,
    GetArgs,
    HostActionArgs,
    HostActionDone,
    HostInfo,
    HostList,
    HostsArgs,
    ListArgs,
    PingArgs,
    Pong,
    PurgeClientArgs,
    Reply,
    SessionInfo,
    SessionList,
    TemplateList,
    TemplatesArgs,
    decode_request,
)
from soafarm.state.records import (
    HostRecord,
    InstanceRecord,
    SessionRecord,
    SessionState,
    SessionStatus,
)

SESSION = SessionRecord(
    id=3,
    service="echo",
    version="1.0",
    state=SessionState.RUNNING,
    min_units=1,
    max_units=4,
    priority=2000,
    resource_unit="core",
    created=1000.0,
    owner="me",
    broker_settings=BrokerSettings(message_resend_limit=0),
)
INFO = SessionInfo(
    record=SESSION,
    request_queue="ns.session.3.requests",
    instances=(InstanceRecord("i1", "h1", 42, 1001.0),),
    clients=(ClientStatus("c", 10, 4, 1, 6, False, None, False),),
    load_errors={"h2": "ImportError: nope"},
    allocated_units=1,
    target_units=2,
    outstanding=6,
)
HOST = HostInfo(
    record=HostRecord("h1", "box", 9, 2, 900.0, utilisation=0.5, beat=1000.0),
    assignments={"3": 1},
    instances={"3": 1},
    uptime=100.0,
    heartbeat_age=0.2,
)


def over_the_wire(request: ControlRequest) -> ControlRequest:
    message = decode(encode(request), 1 << 20)
    assert isinstance(message, ControlRequest)
    return message


ARGS: list[ControlCall[Any]] = [
    CreateArgs("echo", "1.0", 1, 4, "socket", 10, {"message_resend_limit": 0}, "me", True, True),
    CreateArgs("echo"),
    GetArgs(3),
    ListArgs(),
    ListArgs("echo"),
    CloseArgs(3, purge=False),
    AttachClientArgs(3, "client-a"),
    PurgeClientArgs(3, "client-a"),
    AddDataArgs(3, {"curves": "ns.data.abc"}),
    HostsArgs(),
    HostActionArgs("h1", "drain"),
    PingArgs(),
    TemplatesArgs(),
    AdminsArgs(),
    AdminsArgs("grant", "alice"),
    CreateArgs("echo", share_with=("alice", "bob")),
    CreateArgs("echo", priority=4000, job_template="gpu", node_groups=("gpu", "zone=a")),
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: type(a).__name__)
def test_every_request_round_trips_through_msgpack(args: ControlCall[Any]) -> None:
    assert decode_request(over_the_wire(args.envelope())) == args


def test_every_operation_has_a_record() -> None:
    assert {type(a).op for a in ARGS} == set(OPS)


def test_plain_params_of_create_keep_their_names() -> None:
    params = CreateArgs("echo", durable=True).params()
    assert params["service"] == "echo"
    assert params["durable"] is True
    assert params["broker_settings"] == {}
    assert params["max_units"] is None


def test_omitted_arguments_take_defaults() -> None:
    got = decode_request(ControlRequest("create", {"service": "echo"}))
    # unset: the job template supplies them at the broker
    assert got == CreateArgs("echo", min_units=None, max_units=None, priority=None)
    assert got.job_template == "" and got.node_groups is None
    assert decode_request(ControlRequest("close", {"session_id": 1})) == CloseArgs(1, True)


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("explode", {}, r"unknown control operation 'explode'; known: create, get"),
        ("get", {}, r"control request 'get': missing 'session_id'"),
        ("get", {"session_id": "3"}, r"'get': session_id: expected int, got '3'"),
        ("get", {"session_id": True}, r"session_id: expected int, got True"),
        (
            "get",
            {"session_id": 3, "sesion": 1},
            r"unknown key\(s\) sesion; allowed: redis_account, session_id",
        ),
        ("close", {"session_id": 3, "purge": 1}, r"purge: expected bool, got 1"),
        ("create", {"service": ""}, r"'create': service must be a non-empty string"),
        ("create", {"service": 5}, r"service: expected str, got 5"),
        ("create", {"service": "e", "version": 1.0}, r"version: expected str, got 1.0"),
        ("create", {"service": "e", "broker_settings": []}, r"broker_settings: expected a map"),
        ("create", {"service": "e", "data": {"a": 1}}, r"data\['a'\]: expected str, got 1"),
        ("add_data", {"session_id": 3, "data": None}, r"data: expected a map"),
        ("attach_client", {"session_id": 3}, r"missing 'client_id'"),
        ("purge_client", {"session_id": 3, "client_id": b"x"}, r"client_id: expected str"),
        ("list", {"service": ["echo"]}, r"service: expected str"),
        ("hosts", {"all": True}, r"unknown key\(s\) all; allowed: none"),
        ("host_action", {"host_id": "h"}, r"'host_action': missing 'action'"),
        ("host_action", {"host_id": "h", "action": "reboot"}, r"one of offline, drain, online"),
        ("host_action", {"host_id": "", "action": "drain"}, r"host_id must be a non-empty"),
        ("ping", {"x": 1}, r"'ping': unknown key\(s\) x"),
    ],
)
def test_bad_requests_are_one_control_request_error(
    op: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ControlRequestError, match=message):
        decode_request(ControlRequest(op, params))


def test_control_request_error_is_a_decode_error_and_a_usage_error() -> None:
    assert issubclass(ControlRequestError, DecodeError)
    assert ControlRequestError.exit_code == 2


REPLIES: list[tuple[ControlCall[Any], Reply]] = [
    (CreateArgs("echo"), INFO),
    (GetArgs(3), INFO),
    (ListArgs(), SessionList((INFO, INFO))),
    (ListArgs(), SessionList()),
    (CloseArgs(3), Closed(3, SessionState.CLOSED, True)),
    (AttachClientArgs(3, "a"), Attached("ns.r.3.a", "ns.q.3", False, SessionState.QUEUED)),
    (PurgeClientArgs(3, "a"), ClientPurged(3, "a", True)),
    (AddDataArgs(3, {}), DataAdded(3, ("a", "b"))),
    (HostsArgs(), HostList((HOST,))),
    (HostActionArgs("h1", "online"), HostActionDone("h1", "", "offline")),
    (PingArgs(), Pong("ns")),
    (
        TemplatesArgs(),
        TemplateList((JobTemplate(), JobTemplate("gpu", node_groups="gpu", broker={"a": 1}))),
    ),
    (
        GetArgs(3),
        dataclasses.replace(INFO, status=SessionStatus(4, "grew", "waiting", 200, 1.0, 2.0)),
    ),
]


@pytest.mark.parametrize(("args", "reply"), REPLIES, ids=lambda x: type(x).__name__)
def test_every_reply_round_trips_through_msgpack(args: ControlCall[Any], reply: Reply) -> None:
    wire = over_the_wire(ControlRequest("x", {"r": reply.to_wire()})).params["r"]
    assert args.decode_reply(wire) == reply


def test_session_description_is_the_flat_map_of_before() -> None:
    wire = INFO.to_wire()
    assert list(wire)[:3] == ["id", "service", "version"]
    assert list(wire)[-10:] == [
        "request_queue",
        "instances",
        "clients",
        "load_errors",
        "allocated_units",
        "target_units",
        "status",
        "outstanding",
        "redis_user",
        "redis_password",
    ]
    assert wire["state"] == "running"
    assert type(wire["state"]) is str
    assert wire["broker_settings"]["message_resend_limit"] == 0
    assert wire["broker_settings"]["durable_session_idle_timeout"] == 172_800.0
    assert wire["instances"] == [
        {"id": "i1", "host_id": "h1", "pid": 42, "started": 1001.0, "capacity": 1}
    ]
    assert wire["clients"][0]["outstanding"] == 6


def test_host_list_is_a_list_of_flat_maps() -> None:
    wire = HostList((HOST,)).to_wire()
    assert isinstance(wire, list)
    assert wire[0]["id"] == "h1"
    assert wire[0]["assignments"] == {"3": 1}
    assert wire[0]["heartbeat_age"] == 0.2
    assert wire[0]["admin"] == ""  # no operator state: `soafarm hosts --json` says ""


def test_replies_ignore_keys_a_newer_broker_adds() -> None:
    wire = {**Closed(3, SessionState.CLOSED, False).to_wire(), "later": 1}
    assert CloseArgs(3).decode_reply(wire) == Closed(3, SessionState.CLOSED, False)


def test_old_session_descriptions_take_setting_defaults() -> None:
    wire = INFO.to_wire()
    wire["broker_settings"] = {"message_resend_limit": 1}
    got = GetArgs(3).decode_reply(wire).record.broker_settings
    assert got.message_resend_limit == 1
    assert got.durable_session_idle_timeout == 172_800.0
    assert got.service_operation_timeout == 86_400.0


@pytest.mark.parametrize(
    ("args", "wire", "message"),
    [
        (GetArgs(3), [], r"control reply to 'get': expected a map, got list"),
        (GetArgs(3), {"id": 3}, r"missing 'service'"),
        (ListArgs(), {"id": 3}, r"'list': items: expected a list"),
        (CloseArgs(3), {"session_id": 3, "state": "gone", "purged": True}, r"state: expected one"),
        (PingArgs(), None, r"'ping': expected a map, got nothing"),
        (HostsArgs(), [{"id": "h"}], r"'hosts': items\[0\]: missing 'hostname'"),
    ],
)
def test_malformed_replies_are_one_decode_error(
    args: ControlCall[Any], wire: Any, message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        args.decode_reply(wire)
