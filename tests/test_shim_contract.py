"""One channel format for both languages: csrc/shim.h and csrc/ctl.c against wrapguard/wire/ipc.py,
and the shim's pure parts (a tunnelled fd's state machine) as unit tests, without root.

The constants of shim.h are read from the header and compared with ipc.py's; the C codec
(request header, reply header, the named reply decoders) is compiled from csrc/ into a private
library (symbols visible, loaded RTLD_LOCAL: nothing in this process is interposed, and without
WRAPGUARD_CTL its hooks are inert) and fed the frames ipc.py emits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from wrapguard.wire import ipc
from wrapguard.wire.ipc import Action, Address, ConnectReply, PeerAction, PeerReply, UdpAssocReply

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SECRET = bytes(range(32))
TOKEN = bytes(range(100, 116))


def header_defines() -> dict[str, int | str]:
    """#define NAME value (integers and strings) and enum members of shim.h."""
    text = (CSRC / "shim.h").read_text()
    out: dict[str, int | str] = {}
    for name, value in re.findall(r"^#define (WG_\w+) (\S+)", text, re.M):
        if value.startswith('"'):
            out[name] = value.strip('"')
        elif re.fullmatch(r"\d+", value):
            out[name] = int(value)
    for body in re.findall(r"enum \w+ \{([^}]*)\}", text):
        for name, value in re.findall(r"(WG_\w+) = (\d+)", body):
            out[name] = int(value)
    return out


def test_header_constants_are_ipc_constants() -> None:
    h = header_defines()
    assert h["WG_VERSION"] == ipc.VERSION
    assert h["WG_MAX_BODY"] == ipc.MAX_BODY
    assert h["WG_PREFIX_LEN"] == ipc.PREFIX_LEN
    assert h["WG_SECRET_LEN"] == ipc.SECRET_LEN
    assert h["WG_TOKEN_LEN"] == ipc.TOKEN_LEN
    assert h["WG_ADDR_LEN"] == ipc.ADDR_LEN
    assert h["WG_REQ_HDR_LEN"] == ipc._REQ_HDR.size
    assert h["WG_REP_HDR_LEN"] == ipc._REP_HDR.size
    assert h["WG_UDP_HDR_LEN"] == ipc.UDP_HDR_LEN
    assert h["WG_UDP_DATA_SOCKET"] == ipc.UDP_DATA_SOCKET
    assert (h["WG_FLAG_WAIT"], h["WG_FLAG_GATE"]) == (ipc.FLAG_WAIT, ipc.FLAG_GATE)
    assert h["WG_FLAG_V6ONLY"] == ipc.FLAG_V6ONLY
    assert (h["WG_FLAG_CONNECT_WAIT"], h["WG_FLAG_CONNECT_LO4"]) == (
        ipc.FLAG_CONNECT_WAIT,
        ipc.FLAG_CONNECT_LO4,
    )
    assert (h["WG_PROTO_TCP"], h["WG_PROTO_UDP"]) == (ipc.Proto.TCP, ipc.Proto.UDP)
    for op in ipc.Op:
        assert h[f"WG_{op.name}"] == op.value, op
    for act in Action:
        assert h[f"WG_ACT_{act.name}"] == act.value, act
    assert (h["WG_ST_DONE"], h["WG_ST_PENDING"]) == (
        ipc.StatusAction.DONE,
        ipc.StatusAction.PENDING,
    )
    assert (h["WG_PEER_FOUND"], h["WG_PEER_UNKNOWN"]) == (PeerAction.FOUND, PeerAction.UNKNOWN)


class WgAddr(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
    ]

    def to_address(self) -> Address:
        raw = bytes(self.addr)
        ip = IPv4Address(raw[:4]) if self.family == 4 else IPv6Address(raw)
        return Address(ip, self.port)


class WgReply(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("action", ctypes.c_uint16),
        ("err", ctypes.c_int32),
        ("body_len", ctypes.c_uint32),
        ("body", ctypes.c_uint8 * 512),
    ]


class WgTunnelReply(ctypes.Structure):
    _fields_ = [
        ("addr", WgAddr),
        ("token", ctypes.c_uint8 * 16),
        ("have_source", ctypes.c_int),
        ("source", WgAddr),
    ]


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("contract") / "codec.so"
    sources = sorted(str(p) for p in CSRC.glob("*.c"))
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-D_GNU_SOURCE", "-o", str(out), *sources, "-ldl",
         "-lpthread"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    lib = ctypes.CDLL(str(out), mode=os.RTLD_LOCAL)
    lib.wg_req_header_encode.restype = ctypes.c_uint32
    lib.wg_req_header_encode.argtypes = [
        ctypes.c_char_p, ctypes.c_uint8, ctypes.c_uint16, ctypes.c_char_p, ctypes.c_uint32,
    ]  # fmt: skip
    for name in ("wg_rep_header_decode", "wg_connect_reply_decode", "wg_assoc_reply_decode",
                 "wg_peer_reply_decode"):  # fmt: skip
        getattr(lib, name).restype = ctypes.c_int
    lib.wg_tunnel_next.restype = ctypes.c_uint8
    lib.wg_tunnel_next.argtypes = [ctypes.c_uint8, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    return lib


def c_reply(lib: ctypes.CDLL, frame: bytes, op: int) -> WgReply | None:
    """What the shim's reader makes of a reply frame: the header, then the body."""
    rep = WgReply()
    hdr = ctypes.create_string_buffer(frame[:12], 12)
    if lib.wg_rep_header_decode(hdr, ctypes.c_uint8(op), ctypes.byref(rep)) != 0:
        return None
    body = frame[12:]
    assert len(body) == rep.body_len
    ctypes.memmove(rep.body, body, len(body))
    return rep


def test_request_header_is_the_ipc_header(codec: ctypes.CDLL) -> None:
    for req in (
        ipc.StatusRequest(TOKEN, True),
        ipc.ConnectRequest(ipc.Proto.TCP, Address(IPv4Address("10.0.0.1"), 80), gate=True),
        ipc.GateRequest(TOKEN, 65536),
    ):
        frame = ipc.emit_request(req, SECRET)
        body = frame[ipc.PREFIX_LEN + ipc._REQ_HDR.size :]
        buf = ctypes.create_string_buffer(len(frame))
        n = codec.wg_req_header_encode(buf, frame[5], int.from_bytes(frame[6:8], "big"), SECRET,
                                       len(body))  # fmt: skip
        assert n == len(frame)
        assert buf.raw[: ipc.PREFIX_LEN + ipc._REQ_HDR.size] + body == frame
        assert ipc.parse_request(buf.raw[: n - len(body)] + body) == (SECRET, req)


def test_reply_decoders_read_what_ipc_emits(codec: ctypes.CDLL) -> None:
    lo4 = Address(IPv4Address("127.0.0.1"), 40000)
    src6 = Address(IPv6Address("fd15::2"), 41000)
    for source in (None, src6):
        frame = ipc.emit_reply(ConnectReply(Action.TUNNEL, 0, lo4, TOKEN, source))
        rep = c_reply(codec, frame, ipc.Op.CONNECT)
        assert rep is not None and rep.action == Action.TUNNEL and rep.err == 0
        tr = WgTunnelReply()
        assert codec.wg_connect_reply_decode(ctypes.byref(rep), ctypes.byref(tr)) == 0
        assert tr.addr.to_address() == lo4 and bytes(tr.token) == TOKEN
        assert bool(tr.have_source) == (source is not None)
        if source is not None:
            assert tr.source.to_address() == source
    fail = c_reply(codec, ipc.emit_reply(ConnectReply(Action.FAIL, 111)), ipc.Op.CONNECT)
    assert fail is not None and (fail.action, fail.err, fail.body_len) == (Action.FAIL, 111, 0)
    tr = WgTunnelReply()
    assert codec.wg_connect_reply_decode(ctypes.byref(fail), ctypes.byref(tr)) == -1

    frame = ipc.emit_reply(UdpAssocReply(Action.TUNNEL, 0, src6, TOKEN))
    rep = c_reply(codec, frame, ipc.Op.UDP_ASSOC)
    assert rep is not None
    assert codec.wg_assoc_reply_decode(ctypes.byref(rep), ctypes.byref(tr)) == 0
    assert tr.addr.to_address() == src6 and bytes(tr.token) == TOKEN

    client = Address(IPv4Address("10.150.0.1"), 5555)
    ours = Address(IPv4Address("10.150.0.2"), 80)
    for local in (None, ours):
        rep = c_reply(codec, ipc.emit_reply(PeerReply(PeerAction.FOUND, client, local)),
                      ipc.Op.PEER)  # fmt: skip
        assert rep is not None
        peer, here, have = WgAddr(), WgAddr(), ctypes.c_int(0)
        assert (
            codec.wg_peer_reply_decode(
                ctypes.byref(rep), ctypes.byref(peer), ctypes.byref(here), ctypes.byref(have)
            )
            == 0
        )
        assert peer.to_address() == client and bool(have.value) == (local is not None)
        if local is not None:
            assert here.to_address() == local


def test_reply_header_rejects_what_ipc_rejects(codec: ctypes.CDLL) -> None:
    good = ipc.emit_reply(ipc.StatusReply(ipc.StatusAction.DONE, 0))
    assert c_reply(codec, good, ipc.Op.STATUS) is not None
    assert c_reply(codec, good, ipc.Op.CONNECT) is None  # another op's reply
    assert c_reply(codec, good[:4] + bytes([2]) + good[5:], ipc.Op.STATUS) is None  # version
    too_long = (ipc.MAX_BODY + ipc._REP_HDR.size + 1).to_bytes(4, "big") + good[4:]
    assert c_reply(codec, too_long, ipc.Op.STATUS) is None
    short = (ipc._REP_HDR.size - 1).to_bytes(4, "big") + good[4:]
    assert c_reply(codec, short, ipc.Op.STATUS) is None


# -- a tunnelled fd's state machine (csrc/tcp.c wg_tunnel_next) --------------------------------

OPEN, PENDING, FAILED = 0, 1, 2  # enum wg_tstate
LOST, STILL = -2, -1  # wg_status(): the channel failed; no outcome yet


def test_header_tunnel_states() -> None:
    h = header_defines()
    assert (h["WG_OPEN"], h["WG_PENDING"], h["WG_FAILED"]) == (OPEN, PENDING, FAILED)


@pytest.mark.parametrize(
    ("state", "st", "want"),
    [
        (PENDING, 0, (OPEN, 0)),
        (PENDING, errno.ECONNREFUSED, (FAILED, errno.ECONNREFUSED)),
        (PENDING, errno.ETIMEDOUT, (FAILED, errno.ETIMEDOUT)),
        (PENDING, LOST, (FAILED, errno.ENETUNREACH)),  # fail closed, never "open"
        (PENDING, STILL, (PENDING, -1)),
        (OPEN, errno.ECONNRESET, (OPEN, -1)),  # final states never change
        (OPEN, LOST, (OPEN, -1)),
        (FAILED, 0, (FAILED, -1)),
        (FAILED, STILL, (FAILED, -1)),
    ],
)
def test_tunnel_state_transitions(codec: ctypes.CDLL, state: int, st: int, want: tuple) -> None:
    err = ctypes.c_int(12345)
    assert (codec.wg_tunnel_next(state, st, ctypes.byref(err)), err.value) == want
