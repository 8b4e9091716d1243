"""Local channel frames (docs/channel.md): exact bytes, round trips, garbage -> DecodeError."""

from __future__ import annotations

import contextlib
import errno
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire.ipc import (
    MAX_BODY,
    Action,
    Address,
    ConnectReply,
    ConnectRequest,
    HelloReply,
    HelloRequest,
    ListenReply,
    ListenRequest,
    PeerAction,
    PeerReply,
    PeerRequest,
    Proto,
    Reply,
    Request,
    StatusAction,
    StatusReply,
    StatusRequest,
    UnlistenReply,
    UnlistenRequest,
    emit_address,
    emit_reply,
    emit_request,
    frame_body_len,
    parse_address,
    parse_reply,
    parse_request,
    secret_matches,
)

SECRET = bytes(range(32))
TOKEN = bytes(range(100, 116))
V4 = Address(IPv4Address("10.150.0.1"), 8080)
V6 = Address(IPv6Address("fd15::1"), 443)


def test_address_bytes_exact() -> None:
    assert emit_address(V4) == b"\x04" + bytes([10, 150, 0, 1]) + bytes(12) + b"\x1f\x90"
    raw6 = emit_address(V6)
    assert raw6[0] == 6 and raw6[1:17] == IPv6Address("fd15::1").packed
    assert raw6[17:] == b"\x01\xbb"
    assert parse_address(raw6) == V6


def test_connect_request_bytes_exact() -> None:
    frame = emit_request(ConnectRequest(Proto.TCP, V4), SECRET)
    body = b"\x01\x02\x00\x00" + SECRET + b"\x06" + emit_address(V4)
    assert frame == struct.pack("!I", len(body)) + body
    assert parse_request(frame) == (SECRET, ConnectRequest(Proto.TCP, V4))


def test_status_wait_flag_is_bit_zero() -> None:
    frame = emit_request(StatusRequest(TOKEN, wait=True), SECRET)
    assert frame[4:8] == b"\x01\x03\x00\x01"
    assert parse_request(frame)[1] == StatusRequest(TOKEN, True)


def test_tunnel_reply_bytes_exact() -> None:
    lo = Address(IPv4Address("127.0.0.1"), 40000)
    rep = ConnectReply(Action.TUNNEL, 0, lo, TOKEN)
    frame = emit_reply(rep)
    body = b"\x01\x02\x00\x01" + bytes(4) + emit_address(lo) + TOKEN
    assert frame == struct.pack("!I", len(body)) + body
    assert parse_reply(frame) == rep


def test_fail_reply_carries_errno() -> None:
    frame = emit_reply(ConnectReply(Action.FAIL, errno.ECONNREFUSED))
    assert struct.unpack("!i", frame[8:12])[0] == errno.ECONNREFUSED
    assert parse_reply(frame) == ConnectReply(Action.FAIL, errno.ECONNREFUSED)


REQUESTS: list[Request] = [
    HelloRequest(1234, "0.1.0"),
    HelloRequest(0, ""),
    ConnectRequest(Proto.TCP, V4),
    ConnectRequest(Proto.UDP, V6),
    StatusRequest(TOKEN, wait=False),
    StatusRequest(TOKEN, wait=True),
    ListenRequest(Proto.TCP, Address(IPv4Address("0.0.0.0"), 9000)),
    UnlistenRequest(Proto.TCP, Address(IPv6Address("::"), 9000)),
    PeerRequest(Address(IPv4Address("127.0.0.1"), 51000)),
]

REPLIES: list[Reply] = [
    HelloReply(),
    ConnectReply(Action.DIRECT),
    ConnectReply(Action.FAIL, errno.ENETUNREACH),
    ConnectReply(Action.TUNNEL, 0, Address(IPv6Address("::1"), 1), TOKEN),
    ConnectReply(Action.TUNNEL, 0, Address(IPv4Address("127.0.0.1"), 2), TOKEN, V4),
    StatusReply(StatusAction.DONE, 0),
    StatusReply(StatusAction.DONE, errno.ETIMEDOUT),
    StatusReply(StatusAction.PENDING),
    ListenReply(),
    UnlistenReply(),
    PeerReply(PeerAction.FOUND, V6),
    PeerReply(PeerAction.UNKNOWN),
]


@pytest.mark.parametrize("req", REQUESTS, ids=repr)
def test_request_round_trip(req: Request) -> None:
    assert parse_request(emit_request(req, SECRET)) == (SECRET, req)


@pytest.mark.parametrize("rep", REPLIES, ids=repr)
def test_reply_round_trip(rep: Reply) -> None:
    assert parse_reply(emit_reply(rep)) == rep


def test_frame_length_limits() -> None:
    assert frame_body_len(struct.pack("!I", MAX_BODY)) == MAX_BODY
    with pytest.raises(DecodeError):
        frame_body_len(struct.pack("!I", MAX_BODY + 1))
    with pytest.raises(DecodeError):
        frame_body_len(b"\0\0")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f[:4] + b"\x02" + f[5:],  # version 2
        lambda f: f[:5] + b"\x09" + f[6:],  # unknown op
        lambda f: f[:-1],  # short body (prefix no longer matches)
        lambda f: struct.pack("!I", len(f) - 5) + f[4:-1],  # short body, consistent prefix
        lambda f: struct.pack("!I", len(f) - 3) + f[4:] + b"\0",  # trailing byte
        lambda f: f[:41] + b"\x05" + f[42:],  # address family 5
        lambda f: f[:40] + b"\x07" + f[41:],  # protocol 7
        lambda f: f[:6] + b"\x00\x08" + f[8:],  # unknown flags on CONNECT
    ],
)
def test_malformed_requests_raise_decode_error(mutate: object) -> None:
    frame = emit_request(ConnectRequest(Proto.TCP, V4), SECRET)
    assert callable(mutate)
    with pytest.raises(DecodeError):
        parse_request(mutate(frame))


def test_ipv4_padding_must_be_zero() -> None:
    raw = bytearray(emit_address(V4))
    raw[10] = 1
    with pytest.raises(DecodeError):
        parse_address(bytes(raw))


def test_reply_with_unknown_action_or_negative_errno() -> None:
    frame = bytearray(emit_reply(ConnectReply(Action.DIRECT)))
    frame[7] = 3
    with pytest.raises(DecodeError):
        parse_reply(bytes(frame))
    bad = emit_reply(HelloReply())[:8] + struct.pack("!i", -1)
    with pytest.raises(DecodeError):
        parse_reply(bad)


def test_secret_compare() -> None:
    assert secret_matches(SECRET, bytes(SECRET))
    assert not secret_matches(SECRET, bytes(32))
    assert not secret_matches(SECRET, SECRET[:31])


addresses = st.builds(
    Address,
    st.one_of(
        st.ip_addresses(v=4).map(lambda a: IPv4Address(int(a))),
        st.ip_addresses(v=6).map(lambda a: IPv6Address(int(a))),
    ),
    st.integers(0, 0xFFFF),
)
tokens = st.binary(min_size=16, max_size=16)
requests = st.one_of(
    st.builds(HelloRequest, st.integers(0, 2**32 - 1), st.text(max_size=60)),
    st.builds(ConnectRequest, st.sampled_from(Proto), addresses),
    st.builds(
        ConnectRequest,
        st.sampled_from(Proto),
        addresses,
        st.booleans(),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
    ),
    st.builds(StatusRequest, tokens, st.booleans()),
    st.builds(ListenRequest, st.sampled_from(Proto), addresses),
    st.builds(UnlistenRequest, st.sampled_from(Proto), addresses),
    st.builds(PeerRequest, addresses),
)
errnos = st.integers(0, 2**31 - 1)
replies = st.one_of(
    st.builds(HelloReply, errnos),
    st.builds(ConnectReply, st.sampled_from([Action.DIRECT, Action.FAIL]), errnos),
    st.builds(
        ConnectReply,
        st.just(Action.TUNNEL),
        errnos,
        addresses,
        tokens,
        st.one_of(st.none(), addresses),
    ),
    st.builds(StatusReply, st.sampled_from(StatusAction), errnos),
    st.builds(ListenReply, errnos),
    st.builds(UnlistenReply, errnos),
    st.builds(PeerReply, st.just(PeerAction.FOUND), addresses),
    st.builds(PeerReply, st.just(PeerAction.UNKNOWN)),
)


@given(requests, st.binary(min_size=32, max_size=32))
def test_any_request_round_trips(req: Request, secret: bytes) -> None:
    assert parse_request(emit_request(req, secret)) == (secret, req)


@given(replies)
def test_any_reply_round_trips(rep: Reply) -> None:
    assert parse_reply(emit_reply(rep)) == rep


@given(st.binary(max_size=600))
def test_garbage_gives_decode_error_only(data: bytes) -> None:
    for parse in (parse_request, parse_reply):
        with contextlib.suppress(DecodeError):
            parse(data)


@given(requests, st.data())
def test_mutated_requests_decode_or_raise_decode_error(req: Request, data: st.DataObject) -> None:
    frame = bytearray(emit_request(req, SECRET))
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    for candidate in (bytes(frame), bytes(frame[:cut])):
        with contextlib.suppress(DecodeError):
            parse_request(candidate)


def test_gate_request_and_connect_gate_flag_round_trip() -> None:
    from wrapguard.wire.ipc import GateReply, GateRequest

    token = bytes(range(16))
    for req in (
        GateRequest(token, 0),
        GateRequest(token, 70000),
        ConnectRequest(Proto.TCP, V4, True),
    ):
        assert parse_request(emit_request(req, SECRET)) == (SECRET, req)
    assert parse_reply(emit_reply(GateReply())) == GateReply()
    with pytest.raises(DecodeError):
        parse_request(emit_request(GateRequest(token, 1), SECRET)[:-1])


def test_connect_lo4_flag_is_bit_2_and_goes_with_gate_or_wait() -> None:
    for gate, wait in ((False, False), (True, False), (False, True)):
        req = ConnectRequest(Proto.TCP, V4, gate, 0, 41000, wait, lo4=True)
        frame = emit_request(req, SECRET)
        flags = int.from_bytes(frame[6:8], "big")
        assert flags == 4 | (1 if gate else 0) | (2 if wait else 0)
        assert parse_request(frame) == (SECRET, req)
        without = emit_request(ConnectRequest(Proto.TCP, V4, gate, 0, 41000, wait), SECRET)
        assert without == frame[:6] + (flags & ~4).to_bytes(2, "big") + frame[8:]
    both = emit_request(ConnectRequest(Proto.TCP, V4, lo4=True), SECRET)
    for bad in (8, 4 | 3):  # an unknown bit; GATE and WAIT together
        with pytest.raises(DecodeError):
            parse_request(both[:6] + bad.to_bytes(2, "big") + both[8:])


def test_connect_source_port_round_trips_and_zero_is_refused() -> None:
    req = ConnectRequest(Proto.TCP, V4, False, 41000)
    assert parse_request(emit_request(req, SECRET)) == (SECRET, req)
    frame = emit_request(ConnectRequest(Proto.TCP, V4), SECRET)
    bad = struct.pack("!I", len(frame) - 4 + 2) + frame[4:] + b"\0\0"
    with pytest.raises(DecodeError):
        parse_request(bad)


def test_connect_loopback_port_bytes_exact_and_zero_is_refused() -> None:
    # The port the data connection comes from (docs/channel.md, "Security"): after the source
    # port the program bound (0: none), so the frame is 4 bytes longer.
    req = ConnectRequest(Proto.TCP, V4, False, 0, 0xABCD)
    frame = emit_request(req, SECRET)
    assert frame[-4:] == b"\x00\x00\xab\xcd"
    assert len(frame) == len(emit_request(ConnectRequest(Proto.TCP, V4), SECRET)) + 4
    assert parse_request(frame) == (SECRET, req)
    both = ConnectRequest(Proto.TCP, V4, True, 41000, 41000)
    assert parse_request(emit_request(both, SECRET)) == (SECRET, both)
    zero = frame[:-2] + b"\0\0"
    with pytest.raises(DecodeError):
        parse_request(zero)


def test_connect_wait_flag_round_trips_and_never_with_the_gate() -> None:
    from wrapguard.wire.ipc import FLAG_CONNECT_WAIT, FLAG_GATE

    req = ConnectRequest(Proto.TCP, V4, False, 0, 41000, wait=True)
    frame = emit_request(req, SECRET)
    assert int.from_bytes(frame[6:8], "big") == FLAG_CONNECT_WAIT
    assert parse_request(frame) == (SECRET, req)
    with pytest.raises(ValueError):
        emit_request(ConnectRequest(Proto.TCP, V4, True, wait=True), SECRET)
    both = frame[:6] + (FLAG_GATE | FLAG_CONNECT_WAIT).to_bytes(2, "big") + frame[8:]
    unknown = frame[:6] + (8).to_bytes(2, "big") + frame[8:]
    for bad in (both, unknown):
        with pytest.raises(DecodeError):
            parse_request(bad)
