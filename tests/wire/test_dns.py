"""The DNS codec: exact bytes, compression, CNAME chains, and garbage -> DecodeError only."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wrapguard.errors import DecodeError
from wrapguard.wire.dns import (
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    Message,
    Question,
    Rcode,
    Record,
    RType,
    answer_addresses,
    emit_message,
    emit_query,
    encode_name,
    parse_message,
)


def test_query_bytes_exact() -> None:
    q = emit_query(0x1234, "web.wg.test", RType.AAAA)
    assert q == (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x02wg\x04test\x00\x00\x1c\x00\x01"
    )
    msg = parse_message(q)
    assert msg.questions == (Question("web.wg.test", RType.AAAA),)
    assert msg.flags == FLAG_RD and not msg.is_response


def test_compressed_response_and_cname_chain() -> None:
    # www.wg.test CNAME web.wg.test (compressed against the question), web A 10.150.0.1
    hdr = b"\xab\xcd\x81\x80\x00\x01\x00\x02\x00\x00\x00\x00"
    question = b"\x03www\x02wg\x04test\x00\x00\x01\x00\x01"  # name at offset 12
    cname = b"\xc0\x0c\x00\x05\x00\x01\x00\x00\x00\x3c\x00\x06\x03web\xc0\x10"  # -> "wg.test"
    a = b"\x03web\xc0\x10\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x0a\x96\x00\x01"
    msg = parse_message(hdr + question + cname + a)
    assert msg.is_response and msg.rcode == Rcode.NOERROR and not msg.truncated
    assert msg.answers[0] == Record("www.wg.test", RType.CNAME, 1, 60, "web.wg.test")
    assert answer_addresses(msg, "WWW.wg.test.", RType.A) == (
        "web.wg.test",
        [IPv4Address("10.150.0.1")],
    )
    assert answer_addresses(msg, "www.wg.test", RType.AAAA) == ("web.wg.test", [])


def test_nxdomain_and_truncation_flags() -> None:
    msg = Message(7, FLAG_QR | FLAG_TC | Rcode.NXDOMAIN, (Question("x.test", RType.A),))
    parsed = parse_message(emit_message(msg))
    assert parsed == msg and parsed.truncated and parsed.rcode == Rcode.NXDOMAIN


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 11,  # short header
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03ab",  # label past the end
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # self ptr
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\xc0\x0c\x00\x01\x00\x01",  # loop
        b"\x00\x01\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00"
        b"\x00\x05\x01\x02\x03\x04\x05",  # A record of 5 bytes
        b"\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # trailing byte
        b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40"
        + b"a" * 64
        + b"\x00\x00\x01\x00\x01",
    ],
    ids=["short", "label", "self-pointer", "pointer-loop", "bad-a", "trailing", "label-type"],
)
def test_malformed_messages_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_message(data)


def test_name_limits() -> None:
    assert encode_name("") == b"\x00" and encode_name("a.") == b"\x01a\x00"
    for bad in ("a..b", "x" * 64, ".".join(["abcdefg"] * 40)):
        with pytest.raises(ValueError):
            encode_name(bad)


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
names = st.lists(labels, max_size=5).map(".".join)
records = st.one_of(
    st.builds(
        Record,
        names,
        st.just(RType.A),
        st.just(1),
        st.integers(0, 2**32 - 1),
        st.ip_addresses(v=4).map(lambda a: IPv4Address(int(a))),
    ),
    st.builds(
        Record,
        names,
        st.just(RType.AAAA),
        st.just(1),
        st.integers(0, 2**32 - 1),
        st.ip_addresses(v=6).map(lambda a: IPv6Address(int(a))),
    ),
    st.builds(Record, names, st.just(RType.CNAME), st.just(1), st.integers(0, 2**31), names),
    st.builds(
        Record,
        names,
        st.just(99),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**31),
        st.binary(max_size=40),
    ),
)
messages = st.builds(
    Message,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.lists(
        st.builds(Question, names, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), max_size=3
    ).map(tuple),
    st.lists(records, max_size=4).map(tuple),
    st.lists(records, max_size=2).map(tuple),
    st.lists(records, max_size=2).map(tuple),
)


@given(messages)
def test_any_message_round_trips(msg: Message) -> None:
    assert parse_message(emit_message(msg)) == msg


@given(st.binary(max_size=300))
def test_garbage_gives_decode_error_only(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_message(data)


@given(messages, st.data())
def test_mutated_messages_decode_or_raise_decode_error(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(emit_message(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(DecodeError):
        parse_message(bytes(raw))
