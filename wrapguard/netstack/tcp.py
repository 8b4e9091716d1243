"""One TCP connection as a sans-IO state machine (RFC 9293 3.10 event processing).

Theory of operation: sequence numbers are turned into unbounded stream offsets at the edge
(our SYN is offset 0, our first data byte offset 1; the same for the peer), so no modular
comparisons appear below. Inbound segments go through `on_segment` in RFC 9293 3.10.7.4
order (sequence check, RST, SYN, ACK, text, FIN); the sender side (tcp_send.py) handles
ACKs, output and timers. Segments leave through a `FlowOut`; events go to the stack's
deque; pure ACKs are deferred (`ack_due`) so the stack can batch them.
"""

from __future__ import annotations

import errno

from wrapguard.netstack.events import (
    Accepted,
    Connected,
    PeerClosed,
    Readable,
    Reset,
)
from wrapguard.netstack.ranges import ooo_insert
from wrapguard.netstack.tcp_base import (
    FIN_WAIT2_TIMEOUT,
    M32,
    MAX_OOO_BLOCKS,
    RCV_WSCALE,
    RECEIVES_TEXT,
    SYNCHRONIZED_SEND,
    S,
    Seg,
    TcpState,
    rst_for,
)
from wrapguard.netstack.tcp_send import TcpSender
from wrapguard.wire.tcp import ACK, FIN, PSH, RST, SYN, emit_options

__all__ = ["Seg", "TcpConn", "TcpState", "rst_for"]


_APP_SENDS = frozenset({S.SYN_SENT, S.SYN_RECEIVED, S.ESTABLISHED, S.CLOSE_WAIT})


class TcpConn(TcpSender):
    """A TCP connection; the Stack owns it and drives it with segments, calls and timers."""

    def open_active(self, now: float) -> None:
        """Send the SYN (RFC 9293 3.10.1, CLOSED -> SYN-SENT)."""
        self.state = S.SYN_SENT
        self.started = now
        self.rcv_ws = RCV_WSCALE
        self._send_syn(now)

    def open_passive(self, seg: Seg, now: float) -> None:
        """Answer a SYN that arrived on a listener (RFC 9293 3.10.7.2, LISTEN -> SYN-RECEIVED)."""
        self.state = S.SYN_RECEIVED
        self.started = now
        self._take_syn(seg)
        self.snd_wnd = seg.window  # never scaled in a SYN (RFC 7323 2.2)
        self._send_syn(now)

    def _take_syn(self, seg: Seg) -> None:
        opts = seg.options
        self.irs = seg.seq
        self.rcv_nxt = 1
        if opts.mss is not None:
            self.snd_mss = max(64, min(opts.mss, self.rcv_mss))
        else:
            self.snd_mss = min(self.snd_mss, self.rcv_mss)
        # RFC 7323 2.2: scaling is on only if both SYNs carry the option; shift capped at 14.
        if opts.wscale is not None:
            self.snd_ws = min(opts.wscale, 14)
            self.rcv_ws = RCV_WSCALE
        else:
            self.snd_ws = 0
            self.rcv_ws = 0
            self.rcv_limit = min(self.rcv_limit, 0xFFFF)
        self.sack_ok = opts.sack_permitted
        # RFC 5681 3.1 / RFC 6928: initial window of 10 segments.
        self.cwnd = 10 * self.snd_mss

    def on_segment(self, seg: Seg, now: float) -> bool:
        """Process one inbound segment; False if it was dropped as unacceptable."""
        st = self.state
        if st is S.SYN_SENT:
            return self._on_syn_sent(seg, now)
        if st is S.CLOSED:
            return False
        flags = seg.flags
        rcv_nxt = self.rcv_nxt
        d = (seg.seq - self.irs - rcv_nxt) & M32
        payload = seg.payload
        if d == 0 and st is S.ESTABLISHED and flags & ~PSH == ACK and self._predicted(seg, now):
            return True
        if d >= 0x80000000:
            d -= 0x100000000
        plen = len(payload)
        seg_len = plen + (flags & SYN and 1) + (flags & FIN and 1)
        wnd = self.rcv_limit - len(self.rcv_buf)
        if st is S.SYN_RECEIVED and flags & SYN and d == -1:
            # A retransmitted SYN (or the peer's SYN-ACK in a simultaneous open).
            if flags & ACK and self._ack_off(seg.ack) == self.snd_max:
                return self._establish(seg, now, rcv_nxt)
            self.out.tcp(
                self.iss,
                (self.irs + 1) & M32,
                SYN | ACK,
                min(wnd, 0xFFFF),
                emit_options(self._synack_opts()),
                b"",
            )
            return True
        # RFC 9293 3.10.7.4 first: the acceptability test.
        if seg_len == 0:
            ok = d == 0 if wnd == 0 else 0 <= d < wnd
        elif wnd == 0:
            ok = False
        else:
            ok = 0 <= d < wnd or 0 <= d + seg_len - 1 < wnd
        if not ok:
            if wnd == 0 and d == 0 and not flags & SYN:
                # "special allowance ... to accept valid ACKs, URGs, and RSTs": keep going
                # with the text dropped; the ACK below tells the peer the window is closed.
                payload, plen, flags = b"", 0, flags & ~FIN
                self.ack_due = True
            else:
                if not flags & RST:
                    self.ack_due = True
                return False
        # Second: RST. RFC 5961 3.2: only an exact match resets; else a challenge ACK.
        if flags & RST:
            if d == 0:
                self._on_rst()
            else:
                self.ack_due = True
            return True
        # Fourth: a SYN in a synchronized state gets a challenge ACK (RFC 5961 4.2).
        if flags & SYN:
            self.ack_due = True
            return True
        # Fifth: the ACK field.
        if not flags & ACK:
            return False
        if st is S.SYN_RECEIVED:
            ack_off = self._ack_off(seg.ack)
            if not self.snd_una < ack_off <= self.snd_max:
                self.out.tcp(seg.ack, 0, RST, 0, b"", b"")  # <SEQ=SEG.ACK><CTL=RST>
                return False
            return self._establish(seg, now, rcv_nxt + d)
        return self._after_ack_check(seg, rcv_nxt + d, payload, flags, now)

    def rx_predicted(self, seq: int, ack: int, window: int, payload: bytes, now: float) -> bool:
        """Header prediction straight from header fields, for a segment with no options and
        only ACK (and maybe PSH) set: what `on_segment` does through `_predicted`, without
        building a `Seg`. False (nothing changed) when the full path must handle it.
        """
        n = len(payload)
        if (
            self.state is not S.ESTABLISHED
            or not n
            or (seq - self.irs - self.rcv_nxt) & M32
            or self.ooo
            or self.app_closed
            or self.peer_fin_off is not None
            or (ack - self.iss - self.snd_una) & M32
            or window << self.snd_ws != self.snd_wnd
            or n > self.rcv_limit - len(self.rcv_buf)
        ):
            return False
        self._take_in_order(payload, now)
        return True

    def _predicted(self, seg: Seg, now: float) -> bool:
        """Header prediction (RFC 1323 appendix A / Jacobson): the next in-order data
        segment, acking nothing new, same window, no SACK, no hole to fill. Does exactly
        what the full path would do for it, minus the checks; False to take the full path.
        """
        payload = seg.payload
        n = len(payload)
        if (
            not n
            or self.ooo
            or self.app_closed
            or self.peer_fin_off is not None
            or (seg.ack - self.iss - self.snd_una) & M32
            or seg.window << self.snd_ws != self.snd_wnd
            or seg.options.sack_blocks
            or n > self.rcv_limit - len(self.rcv_buf)
        ):
            return False
        self._take_in_order(payload, now)
        return True

    def _take_in_order(self, payload: bytes, now: float) -> None:
        """What both header-prediction paths do with the next in-order data."""
        n = len(payload)
        self.snd_wl1 = self.rcv_nxt
        self.snd_wl2 = self.snd_una
        self.probes_out = 0
        self.rcv_buf += payload
        self.rcv_nxt += n
        if not self.readable_pending:
            self.readable_pending = True
            self.events.append(Readable(self.id))
        self.unacked_rcv += n
        if self.unacked_rcv >= 2 * self.rcv_mss:
            self.ack_due = True  # RFC 5681 4.2: at least every second full-sized segment
        elif self.t_delack is None:
            self.t_delack = now + self.cfg.delayed_ack

    def _establish(self, seg: Seg, now: float, seg_off: int) -> bool:
        """SYN-RECEIVED -> ESTABLISHED on an acceptable ACK (RFC 9293 3.10.7.4 fifth)."""
        self.state = S.ESTABLISHED
        self.snd_wl1 = seg_off
        self.snd_wl2 = 0
        if self.retries == 0:
            self._rtt_sample(now - self.started)
        self.t_rto = None
        if self.listener is not None:
            self.reported = True
            self.events.append(Accepted(self.listener, self.id))
        else:
            self.events.append(Connected(self.id))
        if self.fin_wanted:
            self._queue_fin()
        flags = seg.flags & ~SYN
        payload = seg.payload if not seg.flags & SYN else b""
        return self._after_ack_check(seg, seg_off, payload, flags, now)

    def _after_ack_check(
        self, seg: Seg, seg_off: int, payload: bytes, flags: int, now: float
    ) -> bool:
        ack_off = self._ack_off(seg.ack)
        if ack_off > self.snd_max or ack_off < self.snd_una - self.max_snd_wnd - 1:
            # Acks something not yet sent (RFC 9293 3.10.7.4 fifth) or far behind SND.UNA
            # (RFC 5961 5.2, blind data injection): send an ACK, drop the segment.
            self.ack_due = True
            return False
        if ack_off >= self.snd_una:
            self._on_ack(seg, seg_off, ack_off, len(seg.payload) + (seg.flags & FIN), now)
            if self.state is S.CLOSED:
                return True
        st = self.state
        fin_acked = self.fin_off is not None and self.snd_una > self.fin_off
        if fin_acked:
            if st is S.FIN_WAIT_1:
                st = self.state = S.FIN_WAIT_2
                if self.app_closed:
                    self.t_wait = now + FIN_WAIT2_TIMEOUT
            elif st is S.CLOSING:
                self._enter_time_wait(now)
                return True
            elif st is S.LAST_ACK:
                self._finish(graceful=True)
                return True
        # Seventh and eighth: the segment text and FIN.
        if payload or flags & FIN:
            if st is S.ESTABLISHED or st in RECEIVES_TEXT:
                self._on_text(seg_off, payload, bool(flags & FIN), now)
            elif flags & FIN:
                # A retransmitted FIN in CLOSE-WAIT, CLOSING, LAST-ACK or TIME-WAIT.
                self.ack_due = True
                if st is S.TIME_WAIT:
                    self.t_wait = now + self.cfg.time_wait
        return True

    def _on_syn_sent(self, seg: Seg, now: float) -> bool:
        """RFC 9293 3.10.7.3: SYN-SENT."""
        flags = seg.flags
        if flags & ACK:
            ack_off = self._ack_off(seg.ack)
            if ack_off != 1:
                if not flags & RST:
                    self.out.tcp(seg.ack, 0, RST, 0, b"", b"")
                return False
            if flags & RST:
                self._fail(errno.ECONNREFUSED)
                return True
        elif flags & RST:
            return False
        if not flags & SYN:
            return False
        self._take_syn(seg)
        if flags & ACK:
            self.snd_una = 1
            self.snd_wnd = seg.window << self.snd_ws
            self.max_snd_wnd = self.snd_wnd
            self.snd_wl1 = 0
            self.snd_wl2 = 1
            self.state = S.ESTABLISHED
            self.t_rto = None
            self.backoff = 0
            if self.srtt is None and self.retries == 0:
                self._rtt_sample(now - self.started)
            self.events.append(Connected(self.id))
            self.ack_due = True
            if self.fin_wanted:
                self._queue_fin()
            self._output(now)
        else:
            # Simultaneous open: SYN-SENT -> SYN-RECEIVED, resend our SYN with an ACK.
            self.state = S.SYN_RECEIVED
            self.snd_wnd = seg.window
            self._send_syn(now)
        return True

    def _on_rst(self) -> None:
        st = self.state
        if st is S.SYN_RECEIVED:
            if self.listener is None:
                self._fail(errno.ECONNREFUSED)
            else:
                self._finish()
        elif st in (S.CLOSING, S.LAST_ACK, S.TIME_WAIT):
            self._finish(graceful=True)  # the peer's FIN came before: all data is here
        else:
            if not self.released:
                self.events.append(Reset(self.id, errno.ECONNRESET))
            self._finish()

    def _on_text(self, off: int, payload: bytes, fin: bool, now: float) -> None:
        """Seventh and eighth steps: queue in-order data, reassemble, FIN (RFC 9293 3.10.7.4)."""
        if payload and self.app_closed:
            # Data for an application that closed: RFC 9293 3.6.1 / RFC 2525 2.17, reset.
            self.abort()
            return
        rcv_nxt = self.rcv_nxt
        if fin:
            self.peer_fin_off = off + len(payload)
        right = rcv_nxt + self.rcv_limit - len(self.rcv_buf)
        if off < rcv_nxt:
            payload = payload[rcv_nxt - off :]
            off = rcv_nxt
        if off + len(payload) > right:
            payload = payload[: max(0, right - off)]
        if payload:
            n = len(payload)
            if off == rcv_nxt:
                self.rcv_buf += payload
                rcv_nxt += n
                immediate = False
                if self.ooo:
                    immediate = True  # filled (part of) a hole: ACK at once (RFC 5681 4.2)
                    ooo = self.ooo
                    while ooo and ooo[0][0] <= rcv_nxt:
                        bstart, bbuf = ooo.pop(0)
                        bend = bstart + len(bbuf)
                        if bend > rcv_nxt:
                            self.rcv_buf += memoryview(bbuf)[rcv_nxt - bstart :]
                            rcv_nxt = bend
                self.rcv_nxt = rcv_nxt
                if not self.readable_pending and not self.app_closed:
                    self.readable_pending = True
                    self.events.append(Readable(self.id))
                # RFC 9293 3.8.6.3 / RFC 5681 4.2: ACK at least every second full segment.
                self.unacked_rcv += n
                if immediate or self.unacked_rcv >= 2 * self.rcv_mss:
                    self.ack_due = True
                elif self.t_delack is None:
                    self.t_delack = now + self.cfg.delayed_ack
            else:
                if len(self.ooo) < MAX_OOO_BLOCKS or any(
                    s <= off <= s + len(b) for s, b in self.ooo
                ):
                    self.last_ooo = ooo_insert(self.ooo, off, payload)
                self.ack_due = True  # out of order: a duplicate ACK with SACK at once
        elif not fin:
            self.ack_due = True  # an old duplicate: re-ACK
        if self.peer_fin_off is not None and self.rcv_nxt == self.peer_fin_off:
            self._on_fin(now)

    def _on_fin(self, now: float) -> None:
        self.peer_fin_off = None
        self.rcv_nxt += 1
        self.fin_received = True
        self.ack_due = True
        self.t_delack = None
        if not self.app_closed:
            self.events.append(PeerClosed(self.id))
        st = self.state
        if st is S.ESTABLISHED:
            self.state = S.CLOSE_WAIT
        elif st is S.FIN_WAIT_1:
            # Our FIN is not acked yet (else we would be in FIN-WAIT-2): simultaneous close.
            self.state = S.CLOSING
        elif st is S.FIN_WAIT_2:
            self._enter_time_wait(now)

    def send(self, data: bytes | bytearray | memoryview, now: float) -> int:
        """Queue bytes to send; returns how many fit into the send buffer."""
        if (
            self.fin_off is not None
            or self.fin_wanted
            or (self.state is not S.ESTABLISHED and self.state not in _APP_SENDS)
        ):
            raise OSError(errno.EPIPE, "connection is shut down for writing")
        room = self.cfg.snd_buf - self.snd_queued()
        n = min(room, len(data))
        if n < len(data):
            self.want_writable = True
        if n > 0:
            self.snd_buf += data[:n]
            self._output(now)
        return n

    def recv(self, max_bytes: int) -> bytes:
        """Take up to max_bytes of in-order data; reopen the window if it grew enough."""
        self.readable_pending = False
        buf = self.rcv_buf
        if not buf:
            return b""
        data = bytes(buf[:max_bytes])
        del buf[: len(data)]
        if not buf and self.closed_pending:
            self._flush_closed()
        if self.state is S.ESTABLISHED or self.state in RECEIVES_TEXT:
            # RFC 9293 3.8.6.2.2 (receiver SWS avoidance): update the window when the
            # right edge moves by at least one MSS and the usable window at least doubles.
            cur = self.rcv_adv - self.rcv_nxt
            wnd = self.rcv_limit - len(buf)
            new_adv = self.rcv_nxt + ((min(wnd >> self.rcv_ws, 0xFFFF)) << self.rcv_ws)
            if new_adv - self.rcv_adv >= self.rcv_mss and wnd >= 2 * cur:
                self.ack_due = True
        return data

    def shutdown_write(self, now: float) -> None:
        """Send a FIN after the queued data (half-close)."""
        st = self.state
        if st in (S.SYN_SENT, S.SYN_RECEIVED):
            self.fin_wanted = True
            return
        if st not in (S.ESTABLISHED, S.CLOSE_WAIT) or self.fin_off is not None:
            return
        self._queue_fin()
        self._output(now)

    def _queue_fin(self) -> None:
        self.fin_wanted = False
        self.fin_off = self.snd_buf_off + len(self.snd_buf)
        if self.state is S.ESTABLISHED:
            self.state = S.FIN_WAIT_1
        elif self.state is S.CLOSE_WAIT:
            self.state = S.LAST_ACK

    def close(self, now: float) -> None:
        """The application is done: FIN after the data, or RST if it left data unread."""
        if self.released:
            self.rcv_buf = bytearray()
            self._flush_closed()
            return
        self.app_closed = True
        if self.state is S.SYN_SENT:
            self._finish()
        elif self.rcv_buf:
            self.abort()  # RFC 9293 3.10.4 / RFC 2525 2.17: unread data means RST
        else:
            self.shutdown_write(now)
            if self.state is S.FIN_WAIT_2:
                self.t_wait = now + FIN_WAIT2_TIMEOUT

    def abort(self) -> None:
        """Send a RST if synchronized and forget the connection (RFC 9293 3.10.5)."""
        if self.released:
            self.rcv_buf = bytearray()
            self._flush_closed()
            return
        if self.state in SYNCHRONIZED_SEND or self.state in (S.FIN_WAIT_2, S.SYN_RECEIVED):
            self.out.tcp((self.iss + self.snd_nxt) & M32, 0, RST, 0, b"", b"")
        self._finish()

    def on_icmp_error(self, err: int, seq: int) -> None:
        """A hard ICMP error about our SYN fails the connect (RFC 5927 4.1 check on seq)."""
        if self.state is S.SYN_SENT and seq == self.iss:
            self._fail(err)
