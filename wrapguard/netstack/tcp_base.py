"""Shared pieces of a TCP connection: states, constants, per-connection variables.

`TcpBase` holds every variable of RFC 9293 3.3.1 (as stream offsets, see tcp.py) plus the
congestion, RTT and timer state, and the helpers both halves use: sequence conversion, the
RTO estimator (RFC 6298 2), the advertised window (RFC 7323 2.3), SACK blocks to send
(RFC 2018 4) and the ways a connection ends. tcp_send.py adds the sender, tcp.py the
inbound state machine and the application calls.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import NamedTuple

from wrapguard.netstack.events import (
    Closed,
    ConnectFailed,
    ConnId,
    Event,
    ListenerId,
    TcpConfig,
)
from wrapguard.netstack.packet import FlowOut
from wrapguard.wire.tcp import ACK, FIN, RST, SYN, TcpOptions, TcpSegment, emit_options

__all__ = ["Recovery", "Seg", "TcpBase", "TcpState", "rst_for"]

M32 = 0xFFFFFFFF
# RFC 7323 2.3: our window scale; 65535 << 7 = 8 MiB covers the largest receive buffer.
RCV_WSCALE = 7
# RFC 9293 3.7.1: default send MSS when the peer sends no MSS option (536 v4, 1220 v6).
DEFAULT_MSS_V4 = 536
DEFAULT_MSS_V6 = 1220
# RFC 5681 3.2 / RFC 6675 2: DupThresh.
DUP_THRESH = 3
# Bounds on the per-connection range lists (memory and CPU under a hostile peer).
MAX_OOO_BLOCKS = 64
MAX_SACK_RANGES = 64
MAX_RETX_LOG = 1024  # retransmissions remembered per recovery (see TcpSender._lost_retransmits)
# Acked bytes kept at the front of the send buffer until they are this many and half of it.
SND_COMPACT = 64 * 1024
# Linux tcp_fin_timeout: an orphaned FIN-WAIT-2 (the app closed) does not wait forever.
FIN_WAIT2_TIMEOUT = 60.0


class TcpState(enum.Enum):
    """RFC 9293 3.3.2 connection states."""

    CLOSED = "CLOSED"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"


class Recovery(enum.Enum):
    """Which loss recovery is running: fast (RFC 6675 / 6582) or after an RTO (RFC 6298 5)."""

    FAST = "fast"
    RTO = "rto"


S = TcpState
SYNCHRONIZED_SEND = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})
RECEIVES_TEXT = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})


class Seg(NamedTuple):
    """An inbound segment as the state machine sees it (a tuple: cheap on the hot path)."""

    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes
    options: TcpOptions

    @classmethod
    def of(cls, seg: TcpSegment) -> Seg:
        """From a parsed `TcpSegment`."""
        return cls(seg.seq, seg.ack, seg.flags, seg.window, seg.payload, seg.options)


def rst_for(seg: Seg) -> tuple[int, int, int]:
    """(seq, ack, flags) of the RST answering `seg` with no connection (RFC 9293 3.10.7.1)."""
    if seg.flags & ACK:
        return seg.ack, 0, RST
    seg_len = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
    return 0, (seg.seq + seg_len) & M32, RST | ACK


class TcpBase:
    """The variables of one connection and the helpers shared by sender and receiver."""

    def __init__(
        self,
        cid: ConnId,
        out: FlowOut,
        events: deque[Event],
        cfg: TcpConfig,
        mtu: int,
        iss: int,
        listener: ListenerId | None = None,
    ) -> None:
        self.id = cid
        self.out = out
        self.events = events
        self.cfg = cfg
        self.listener = listener
        self.state = S.CLOSED
        self.reported = listener is None  # passive conns are reported once established
        self.released = False  # the protocol is done (Closed emitted or pending)
        self.closed_pending = False  # Closed waits for the app to read what is left
        self.app_closed = False
        v6 = out.v6
        self.rcv_mss = mtu - (60 if v6 else 40)
        self.snd_mss = DEFAULT_MSS_V6 if v6 else DEFAULT_MSS_V4
        # Send side (offsets; our SYN is 0).
        self.iss = iss
        self.snd_una = 0
        self.snd_nxt = 0
        self.snd_max = 0
        self.snd_buf = bytearray()
        self.snd_buf_off = 1  # the stream offset of snd_buf[0]
        self.snd_dead = 0  # acked bytes still at the front of snd_buf (see _advance)
        self.fin_off: int | None = None
        self.fin_wanted = False
        self.snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.max_snd_wnd = 0
        self.snd_ws = 0
        self.sack_ok = False
        self.want_writable = False
        # Receive side (offsets; the peer's SYN is 0).
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_buf = bytearray()
        self.rcv_limit = cfg.rcv_buf
        self.rcv_ws = 0
        self.rcv_adv = 0
        self.ooo: list[tuple[int, bytearray]] = []
        self.last_ooo = -1
        self.peer_fin_off: int | None = None
        self.fin_received = False
        self.readable_pending = False
        self.unacked_rcv = 0
        self.ack_due = False
        self.queued_ack = False  # on the stack's list of conns owing an ACK
        # Congestion control (RFC 5681) and loss recovery (RFC 6675-lite, RFC 6582).
        self.cwnd = 0
        self.ssthresh = 1 << 30
        self.ca_acc = 0
        self.dupacks = 0
        self.sacked: list[list[int]] = []
        self.recovery: Recovery | None = None
        self.force_rexmit = False
        self.recover = 0
        self.lost_end = 0
        self.rexmit_ptr = 0
        # (start, end, SND.MAX then) of each retransmission in this recovery, oldest first,
        # and the ranges of those since deemed lost, to be sent again first (`relost`).
        self.retx_log: deque[tuple[int, int, int]] = deque()
        self.relost: list[tuple[int, int]] = []
        # RTT and RTO (RFC 6298).
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = cfg.rto_initial
        self.backoff = 0
        self.retries = 0
        self.probes_out = 0  # zero-window probes since the peer's last ACK
        self.rtt_off: int | None = None
        self.rtt_time = 0.0
        self.started = 0.0
        # Timers (absolute times or None).
        self.t_rto: float | None = None
        self.t_persist: float | None = None
        self.t_delack: float | None = None
        self.t_wait: float | None = None
        self.sched: float | None = None  # the stack's heap bookkeeping
        # Counters for tests and logs.
        self.n_retransmits = 0
        self.n_timeouts = 0
        self.n_recoveries = 0
        self.n_lost_retransmits = 0

    def _ack_off(self, ack: int) -> int:
        a = (ack - self.iss - self.snd_una) & M32
        if a >= 0x80000000:
            a -= 0x100000000
        return self.snd_una + a

    def snd_queued(self) -> int:
        """Bytes the application queued that are not acknowledged yet (snd_buf less the
        acked front `_advance` leaves in it)."""
        return len(self.snd_buf) - self.snd_dead

    def _cur_rto(self) -> float:
        return min(self.rto * (1 << self.backoff), self.cfg.rto_max)

    def _rtt_sample(self, r: float) -> None:
        """RFC 6298 2.2-2.4 (G = 1 ms; the floor is cfg.rto_min)."""
        if self.srtt is None:
            self.srtt = r
            self.rttvar = r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        rto = self.srtt + max(0.001, 4 * self.rttvar)
        self.rto = min(max(rto, self.cfg.rto_min), self.cfg.rto_max)

    def _window_field(self) -> int:
        wnd = self.rcv_limit - len(self.rcv_buf)
        field = min(wnd >> self.rcv_ws, 0xFFFF)
        adv = self.rcv_nxt + (field << self.rcv_ws)
        if adv > self.rcv_adv:
            self.rcv_adv = adv
        return field

    def _sack_option(self) -> bytes:
        """RFC 2018 4: the block with the latest segment first, then the others."""
        base = self.irs
        first = [b for b in self.ooo if b[0] == self.last_ooo]
        rest = [b for b in reversed(self.ooo) if b[0] != self.last_ooo]
        blocks = tuple(((base + s) & M32, (base + s + len(b)) & M32) for s, b in (first + rest)[:4])
        return emit_options(TcpOptions(sack_blocks=blocks))

    def _fail(self, err: int) -> None:
        if not self.released:
            self.events.append(ConnectFailed(self.id, err))
        self._finish()

    def _enter_time_wait(self, now: float) -> None:
        self.state = S.TIME_WAIT
        self.t_rto = self.t_persist = self.t_delack = None
        self.t_wait = now + self.cfg.time_wait
        self._release(graceful=True)

    def _finish(self, graceful: bool = False) -> None:
        self.state = S.CLOSED
        self.t_rto = self.t_persist = self.t_delack = self.t_wait = None
        self.ack_due = False
        self._release(graceful)

    def _release(self, graceful: bool = False) -> None:
        """The protocol is done with the connection: report Closed (once).

        After a graceful end, Closed waits until the app has read the data still buffered,
        so that Closed always means "nothing more to read"; close()/abort() flush it.
        """
        if not self.released:
            self.released = True
            if self.reported:
                if graceful and self.rcv_buf and not self.app_closed:
                    self.closed_pending = True
                else:
                    self.events.append(Closed(self.id))
        self.snd_buf = bytearray()
        self.snd_buf_off += self.snd_dead
        self.snd_dead = 0
        self.ooo.clear()
        self.sacked.clear()
        self.retx_log.clear()
        self.relost.clear()

    def _flush_closed(self) -> None:
        if self.closed_pending:
            self.closed_pending = False
            self.events.append(Closed(self.id))
