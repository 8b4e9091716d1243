"""The SOCKS5 core without I/O (RFC 1928, RFC 1929): exact bytes per state, round trips, and
garbage in any state giving a reply code or a close, never an exception."""

from __future__ import annotations

import contextlib
import errno
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrapguard.doors.socks5_proto import (
    EARLY_MAX,
    HANDSHAKE_TIMEOUT,
    Close,
    Cmd,
    Greeting,
    Rep,
    Reply,
    Request,
    Requested,
    RequestError,
    Send,
    ServerConn,
    State,
    UdpDatagram,
    UserPass,
    emit_greeting,
    emit_reply,
    emit_request,
    emit_udp_datagram,
    emit_userpass,
    host_ip,
    parse_greeting,
    parse_reply,
    parse_request,
    parse_udp_datagram,
    parse_userpass,
    rep_for_errno,
)
from wrapguard.errors import DecodeError

CREDS = (b"alice", b"s3cret")


def sends(outs: list[object]) -> bytes:
    return b"".join(o.data for o in outs if isinstance(o, Send))


def closes(outs: list[object]) -> list[str]:
    return [o.reason for o in outs if isinstance(o, Close)]


# -- exact bytes, state by state (RFC 1928 3, 4, 6; RFC 1929 2) ----------------------------------


def test_no_auth_connect_ipv4_then_success_reply() -> None:
    c = ServerConn(None, 0.0)
    assert c.receive(b"\x05\x01\x00", 0.1) == [Send(b"\x05\x00")]
    assert c.state is State.REQUEST
    outs = c.receive(b"\x05\x01\x00\x01\x0a\x96\x00\x01\x1f\x90", 0.2)
    assert outs == [Requested(Cmd.CONNECT, IPv4Address("10.150.0.1"), 8080)]
    assert c.state is State.WAITING and c.next_deadline() is None
    assert c.reply(Rep.SUCCEEDED, IPv4Address("10.150.0.2"), 40000) == [
        Send(b"\x05\x00\x00\x01\x0a\x96\x00\x02\x9c\x40")
    ]
    assert c.state is State.RELAY


def test_domain_and_ipv6_requests() -> None:
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x02\x02\x00", 0)
    name = b"web.wg.test"
    outs = c.receive(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50", 0)
    assert outs == [Requested(Cmd.CONNECT, "web.wg.test", 80)]
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x01\x00", 0)
    outs = c.receive(b"\x05\x03\x00\x04" + IPv6Address("fd15::1").packed + b"\x23\x29", 0)
    assert outs == [Requested(Cmd.UDP_ASSOCIATE, IPv6Address("fd15::1"), 9001)]
    assert c.reply(Rep.SUCCEEDED, IPv4Address("127.0.0.1"), 5000)[0].data[1] == 0
    assert c.state is State.ASSOCIATED
    assert c.receive(b"anything at all", 1.0) == []  # the TCP side only marks the association


def test_byte_at_a_time_gives_the_same_outputs() -> None:
    c = ServerConn(CREDS, 0.0)
    wire = (
        b"\x05\x01\x02"
        + emit_userpass(UserPass(*CREDS))
        + emit_request(Request(1, "x.test", 443))
        + b"early"
    )
    outs: list[object] = []
    for i in range(len(wire)):
        outs += c.receive(wire[i : i + 1], 0.0)
    assert outs == [Send(b"\x05\x02"), Send(b"\x01\x00"), Requested(Cmd.CONNECT, "x.test", 443)]
    assert c.take_early() == b"early" and c.take_early() == b""


def test_without_credentials_a_client_offering_only_userpass_gets_ff() -> None:
    c = ServerConn(None, 0.0)
    outs = c.receive(b"\x05\x01\x02", 0)
    assert sends(outs) == b"\x05\xff" and closes(outs) == ["no_acceptable_method"]
    assert c.state is State.CLOSED


def test_with_credentials_no_auth_is_not_acceptable() -> None:
    c = ServerConn(CREDS, 0.0)
    outs = c.receive(b"\x05\x01\x00", 0)  # offers only "no authentication"
    assert sends(outs) == b"\x05\xff" and closes(outs) == ["no_acceptable_method"]
    c = ServerConn(CREDS, 0.0)
    assert c.receive(b"\x05\x00", 0) == [Send(b"\x05\xff"), Close("no_acceptable_method")]


@pytest.mark.parametrize(
    "user, password",
    [(b"alice", b"wrong"), (b"bob", b"s3cret"), (b"", b""), (b"alice", b"s3cret" + b"x")],
)
def test_wrong_credentials_get_status_1_and_close(user: bytes, password: bytes) -> None:
    c = ServerConn(CREDS, 0.0)
    c.receive(b"\x05\x02\x00\x02", 0)
    outs = c.receive(emit_userpass(UserPass(user, password)) + b"\x05\x01\x00", 0)
    assert outs == [Send(b"\x01\x01"), Close("auth_failed")]
    assert c.state is State.CLOSED
    assert c.receive(b"more", 0) == []


def test_right_credentials_go_on_to_the_request() -> None:
    c = ServerConn(CREDS, 0.0)
    assert c.receive(b"\x05\x02\x00\x02", 0) == [Send(b"\x05\x02")]
    assert c.receive(b"\x01\x05alice\x06s3cret", 0) == [Send(b"\x01\x00")]
    assert c.state is State.REQUEST


def test_bind_is_not_supported_and_unknown_atyp_is_08() -> None:
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x01\x00", 0)
    outs = c.receive(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", 0)
    assert outs == [Send(emit_reply(Rep.COMMAND_NOT_SUPPORTED)), Close("unsupported_cmd")]
    assert outs[0].data == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x01\x00", 0)
    outs = c.receive(b"\x05\x01\x00\x05", 0)
    assert sends(outs)[:2] == b"\x05\x08" and closes(outs) == ["bad_request"]


def test_a_name_that_cannot_be_one_is_host_unreachable() -> None:
    for raw in (b"", b"\xff\xfe", b"a\x00b"):
        c = ServerConn(None, 0.0)
        c.receive(b"\x05\x01\x00", 0)
        outs = c.receive(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\x00\x50", 0)
        assert sends(outs)[:2] == b"\x05\x04", raw


def test_not_socks5_is_closed_without_a_reply() -> None:
    c = ServerConn(None, 0.0)
    assert c.receive(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", 0) == [Close("bad_greeting")]
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x01\x00", 0)
    assert c.receive(b"GET / HTTP/1.1\r\n", 0) == [Close("bad_request")]


def test_handshake_timeout() -> None:
    c = ServerConn(None, 100.0)
    assert c.next_deadline() == 100.0 + HANDSHAKE_TIMEOUT
    c.receive(b"\x05\x01", 101.0)  # half a greeting
    assert c.handle_timeout(105.0) == []
    assert c.handle_timeout(100.0 + HANDSHAKE_TIMEOUT) == [Close("handshake_timeout")]
    assert c.state is State.CLOSED and c.next_deadline() is None
    # A late byte after the deadline closes too, even before the timer fires.
    c = ServerConn(None, 0.0)
    assert c.receive(b"\x05", HANDSHAKE_TIMEOUT + 1) == [Close("handshake_timeout")]


def test_failure_reply_closes_and_early_data_is_bounded() -> None:
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x01\x00", 0)
    c.receive(emit_request(Request(1, IPv4Address("10.150.0.1"), 9)), 0)
    assert c.receive(b"x" * EARLY_MAX, 0) == []
    assert c.receive(b"y", 0) == [Close("early_data_overflow")]
    c = ServerConn(None, 0.0)
    c.receive(b"\x05\x01\x00", 0)
    c.receive(emit_request(Request(1, IPv4Address("10.150.0.1"), 9)), 0)
    outs = c.reply(Rep.CONNECTION_REFUSED)
    refused = b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    assert outs == [Send(refused), Close("rep_connection_refused")]
    with pytest.raises(RuntimeError):
        c.reply(Rep.SUCCEEDED)


def test_reply_codes_say_what_happened() -> None:
    assert rep_for_errno(errno.ECONNREFUSED) == Rep.CONNECTION_REFUSED == 5
    assert rep_for_errno(errno.EHOSTUNREACH) == Rep.HOST_UNREACHABLE == 4
    assert rep_for_errno(errno.ENETUNREACH) == Rep.NETWORK_UNREACHABLE == 3
    assert rep_for_errno(errno.ETIMEDOUT) == Rep.TTL_EXPIRED == 6
    assert rep_for_errno(errno.ECONNRESET) == Rep.GENERAL_FAILURE == 1


def test_password_never_in_a_repr() -> None:
    assert "s3cret" not in repr(UserPass(b"alice", b"s3cret"))


def test_udp_header_exact_bytes() -> None:
    data = emit_udp_datagram(IPv4Address("10.150.0.1"), 9001, b"ping")
    assert data == b"\x00\x00\x00\x01\x0a\x96\x00\x01\x23\x29ping"
    assert parse_udp_datagram(data) == UdpDatagram(0, IPv4Address("10.150.0.1"), 9001, b"ping")
    frag = b"\x00\x00\x01\x03\x04a.bc\x00\x35q"
    assert parse_udp_datagram(frag) == UdpDatagram(1, "a.bc", 53, b"q")


def test_host_ip() -> None:
    assert host_ip("10.0.0.1") == IPv4Address("10.0.0.1")
    assert host_ip("[fd15::1]") == IPv6Address("fd15::1")
    assert host_ip("web.wg.test") is None


# -- properties ----------------------------------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255),
)
ports = st.integers(0, 65535)
short = st.binary(max_size=255)


@given(hosts, ports, st.integers(0, 255))
def test_request_and_reply_round_trip(host: object, port: int, code: int) -> None:
    req = Request(code, host, port)  # type: ignore[arg-type]
    wire = emit_request(req)
    assert parse_request(wire) == (req, len(wire))
    assert parse_request(wire[:-1]) is None
    rep = emit_reply(code, host, port)  # type: ignore[arg-type]
    assert parse_reply(rep + b"tail") == (Reply(code, host, port), len(rep))  # type: ignore[arg-type]


@given(hosts, ports, st.binary(max_size=200))
def test_udp_round_trip(host: object, port: int, payload: bytes) -> None:
    wire = emit_udp_datagram(host, port, payload)  # type: ignore[arg-type]
    assert parse_udp_datagram(wire) == UdpDatagram(0, host, port, payload)  # type: ignore[arg-type]


@given(st.lists(st.integers(0, 255), max_size=255), short, short)
def test_greeting_and_userpass_round_trip(methods: list[int], u: bytes, p: bytes) -> None:
    g = Greeting(tuple(methods))
    assert parse_greeting(emit_greeting(g)) == (g, 2 + len(methods))
    up = UserPass(u, p)
    assert parse_userpass(emit_userpass(up)) == (up, 3 + len(u) + len(p))


@given(st.binary(max_size=600))
def test_garbage_into_any_parser_is_decode_error_or_none(data: bytes) -> None:
    for parse in (parse_greeting, parse_userpass, parse_request, parse_reply, parse_udp_datagram):
        with contextlib.suppress(DecodeError):
            parse(data)


def _prefix(state: State) -> bytes:
    return {
        State.GREETING: b"",
        State.AUTH: b"\x05\x01\x02",
        State.REQUEST: b"\x05\x01\x02\x01\x05alice\x06s3cret",
    }[state]


@settings(max_examples=300)
@given(
    st.sampled_from([State.GREETING, State.AUTH, State.REQUEST]),
    st.lists(st.binary(max_size=300), max_size=8),
    st.booleans(),
)
def test_garbage_in_any_state_is_a_reply_or_a_close(
    state: State, chunks: list[bytes], auth: bool
) -> None:
    c = ServerConn(CREDS if auth or state is not State.GREETING else None, 0.0)
    c.receive(_prefix(state), 0.0)
    assert c.state is state
    outs: list[object] = []
    for chunk in chunks:
        outs += c.receive(chunk, 1.0)
    for o in outs:
        assert isinstance(o, Send | Requested | Close)
    # Every Close comes last, and nothing comes after the connection closed.
    if any(isinstance(o, Close) for o in outs):
        assert isinstance(outs[-1], Close) and c.state is State.CLOSED
    if c.state is State.WAITING:
        assert isinstance(outs[-1], Requested)
        assert c.reply(Rep.GENERAL_FAILURE)[-1] == Close("rep_general_failure")
    assert c.handle_timeout(1e9) in ([], [Close("handshake_timeout")])


def test_request_error_is_a_decode_error() -> None:
    assert issubclass(RequestError, DecodeError)
