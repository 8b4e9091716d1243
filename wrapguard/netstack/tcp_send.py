"""The sending half of a TCP connection: ACK processing, output, loss recovery, timers.

Loss recovery is RFC 6675-lite on top of RFC 5681/6582: a pipe estimate bounded by cwnd,
holes below the "lost" boundary (3 MSS SACKed above, or 3 duplicate ACKs) resent first,
new data after. The RTO follows RFC 6298 with Karn's rule and exponential backoff; zero
windows are probed by the persist timer (RFC 9293 3.8.6.1); sender SWS avoidance per
RFC 9293 3.8.6.2.1. Slow start uses byte counting (RFC 3465, no L cap) while cwnd limits
the flight (RFC 7661). A retransmission is deemed lost, and resent, when DupThresh segments
sent after it are SACKed (RFC 8985's lost-retransmission rule by send order).
"""

from __future__ import annotations

import errno

from wrapguard.netstack.events import Reset, Writable
from wrapguard.netstack.ranges import sb_add, sb_bytes_above, sb_bytes_between, sb_trim
from wrapguard.netstack.tcp_base import (
    DUP_THRESH,
    M32,
    MAX_RETX_LOG,
    MAX_SACK_RANGES,
    RCV_WSCALE,
    SND_COMPACT,
    SYNCHRONIZED_SEND,
    Recovery,
    S,
    Seg,
    TcpBase,
)
from wrapguard.wire.tcp import ACK, FIN, PSH, SYN, TcpOptions, emit_options

__all__ = ["TcpSender"]


class TcpSender(TcpBase):
    """Output, ACK processing, congestion control and timers."""

    # The lean paths (rx_pure_ack, full-segment runs in _output) do what the general paths
    # do, only faster; tests switch them off to compare the two transcripts.
    LEAN_PATHS = True

    def _synack_opts(self) -> TcpOptions:
        # RFC 7323 2.2 / RFC 2018 2: echo window scaling and SACK only if the SYN had them.
        return TcpOptions(self.rcv_mss, RCV_WSCALE if self.rcv_ws else None, self.sack_ok)

    def _send_syn(self, now: float) -> None:
        flags = SYN
        ack = 0
        if self.state is S.SYN_RECEIVED:
            flags |= ACK
            ack = (self.irs + 1) & M32
            opts = self._synack_opts()
        else:
            opts = TcpOptions(self.rcv_mss, RCV_WSCALE, True)
        wnd = min(self.rcv_limit, 0xFFFF)
        self.out.tcp(self.iss, ack, flags, wnd, emit_options(opts), b"")
        self.snd_nxt = self.snd_max = 1
        if self.t_rto is None:
            self.t_rto = now + self._cur_rto()

    def _on_ack(self, seg: Seg, seg_off: int, ack_off: int, text: int, now: float) -> None:
        """ACK processing: window, SACK, cumulative ACK, RTT, congestion control."""
        una = self.snd_una
        self.probes_out = 0  # the peer is alive: zero-window probes start counting anew
        win_changed = self._take_window(seg_off, ack_off, seg.window << self.snd_ws)
        if self.sack_ok and seg.options.sack_blocks:
            self._take_sack(seg.options.sack_blocks, ack_off)
        if ack_off > una:
            self._advance(ack_off, now)
        elif ack_off == una and text == 0 and not win_changed and self.snd_max > una:
            self.dupacks += 1  # RFC 5681 2: a duplicate acknowledgment
        if self.snd_max > self.snd_una:
            lost = self._lost_boundary()
            if self.recovery is None:
                if lost > self.snd_una and self.snd_una >= self.recover:
                    self._enter_fast_recovery(lost)
            else:
                if self.recovery is Recovery.FAST and lost > self.lost_end:
                    self.lost_end = lost
                if self.retx_log and self.sacked:
                    self._lost_retransmits()
        if ack_off > una or win_changed or self.recovery is not None:
            self._output(now)  # nothing else can open the windows or need a retransmission

    def rx_pure_ack(self, seq: int, ack: int, window: int, now: float) -> bool:
        """The lean path of the sender's most common segment: a pure ACK without options
        that advances SND.UNA while we may send (ESTABLISHED, CLOSE-WAIT), in sequence,
        outside recovery and with no SACK scoreboard. Does what `on_segment` does for it
        (acceptability, `_on_ack`, output) without building a `Seg`; False (nothing
        changed) for the full path.
        """
        a = (ack - self.iss - self.snd_una) & M32
        if (
            not a
            or a >= 0x80000000
            or (self.state is not S.ESTABLISHED and self.state is not S.CLOSE_WAIT)
            or (seq - self.irs - self.rcv_nxt) & M32
            or self.recovery is not None
            or self.sacked
            or a > self.snd_max - self.snd_una
            or not self.LEAN_PATHS
        ):
            return False
        # Any in-sequence zero-length segment is acceptable (RFC 9293 3.10.7.4 first); with
        # no SACK scoreboard and the duplicate ACK count reset, nothing is deemed lost.
        self.probes_out = 0
        self._take_window(self.rcv_nxt, self.snd_una + a, window << self.snd_ws)
        self._advance(self.snd_una + a, now)
        self._output(now)
        return True

    def _take_window(self, seg_off: int, ack_off: int, wnd: int) -> bool:
        """RFC 9293 3.10.7.4: update the send window only from newer segments (WL1/WL2);
        True if it changed."""
        if self.snd_wl1 < seg_off or (self.snd_wl1 == seg_off and self.snd_wl2 <= ack_off):
            changed = wnd != self.snd_wnd
            self.snd_wnd = wnd
            self.snd_wl1 = seg_off
            self.snd_wl2 = ack_off
            if wnd > self.max_snd_wnd:
                self.max_snd_wnd = wnd
            if wnd:
                self.t_persist = None
            return changed
        return False

    def _advance(self, ack_off: int, now: float) -> None:
        """A cumulative ACK moved SND.UNA to ack_off: buffers, RTT, congestion control."""
        acked = ack_off - self.snd_una
        flight = self.snd_max - self.snd_una  # before this ACK
        mss = self.snd_mss
        self.snd_una = ack_off
        dead = min(ack_off, self.snd_buf_off + len(self.snd_buf)) - self.snd_buf_off
        if dead > 0:
            # Acked bytes leave the front of the buffer only when they are all of it or at
            # least half of it: CPython copies a bytearray's live bytes whenever it grows
            # after losing its front, so deleting each ACK's worth copied the whole buffer
            # on every append (several bytes copied per byte sent).
            if dead == len(self.snd_buf) or (dead >= SND_COMPACT and 2 * dead >= len(self.snd_buf)):
                del self.snd_buf[:dead]
                self.snd_buf_off += dead
                self.snd_dead = 0
            else:
                self.snd_dead = dead
        if self.sacked:
            sb_trim(self.sacked, ack_off)
        if self.rexmit_ptr < ack_off:
            self.rexmit_ptr = ack_off
        if self.rtt_off is not None and ack_off >= self.rtt_off:
            self._rtt_sample(now - self.rtt_time)
            self.rtt_off = None
        self.backoff = 0
        self.retries = 0
        if self.recovery is not None:
            if ack_off >= self.recover:
                if self.recovery is Recovery.FAST:
                    self.cwnd = self.ssthresh  # RFC 6582 3.2 step 3, full ACK
                self.recovery = None
                self.retx_log.clear()
                self.relost.clear()
            else:
                # Partial ACK (RFC 6582 3.2 step 4): resend the next unacked segment.
                self.dupacks = 0
                if not self.sack_ok:
                    self.lost_end = max(self.lost_end, ack_off + mss)
                if self.recovery is Recovery.RTO and self.cwnd < self.ssthresh:
                    self.cwnd += acked
        elif self.cwnd < self.ssthresh:
            # Slow start counting every acked byte (RFC 3465 without the L cap, as Linux
            # does): the peer and our own stack batch ACKs, so stretch ACKs are normal.
            # Only while cwnd is below twice the flight (RFC 7661's point, Linux's
            # tcp_is_cwnd_limited): a flow held back by the peer's window grew cwnd to
            # several MB on the rig's uploads and burst it out when the window opened.
            if self.cwnd < 2 * flight:
                self.cwnd += acked
        elif self.cwnd < 2 * flight:  # (RFC 7661 here too: no growth while not cwnd-limited)
            self.ca_acc += acked  # congestion avoidance by byte counting (RFC 5681 3.1)
            if self.ca_acc >= self.cwnd:
                self.ca_acc -= self.cwnd
                self.cwnd += mss
        self.dupacks = 0
        # RFC 6298 5.2 / 5.3: stop the timer when all is acked, else restart it.
        self.t_rto = now + self._cur_rto() if ack_off < self.snd_max else None
        room = self.cfg.snd_buf - self.snd_queued()
        if self.want_writable and room >= self.cfg.snd_buf // 4:
            self.want_writable = False
            self.events.append(Writable(self.id))

    def _take_sack(self, blocks: tuple[tuple[int, int], ...], ack_off: int) -> None:
        base = self.iss + self.snd_una
        lo = max(ack_off, self.snd_una)
        for left, right in blocks:
            s = self.snd_una + ((left - base) & M32)
            e = self.snd_una + ((right - base) & M32)
            # RFC 2018 / RFC 6675 5.1: ignore blocks outside (SND.UNA, SND.MAX].
            if lo <= s < e <= self.snd_max and len(self.sacked) < MAX_SACK_RANGES:
                sb_add(self.sacked, s, e)

    def _lost_boundary(self) -> int:
        """Everything unSACKed below this offset is deemed lost (RFC 6675 IsLost, lite)."""
        need = DUP_THRESH * self.snd_mss
        acc = 0
        for s, e in reversed(self.sacked):
            acc += e - s
            if acc >= need:
                return s
        if self.dupacks >= DUP_THRESH:
            return self.snd_una + self.snd_mss
        return self.snd_una

    def _lost_retransmits(self) -> None:
        """A retransmission is deemed lost once DupThresh segments' worth of data sent after
        it is SACKed (RFC 6675's IsLost applied to the retransmission: more than
        (DupThresh - 1) * SMSS bytes SACKed above SND.MAX as it was when the retransmission
        left), the way RFC 8985 (2, 6.2) finds lost retransmissions by send order. Its
        range goes on `relost`, sent again ahead of the holes and out of the pipe until
        then; retransmissions not deemed lost stay in flight. Without this a lost
        retransmission waited for the RTO: on the rig's uploads 2 MB were SACKed above a
        single hole for 200 ms."""
        log = self.retx_log
        need = DUP_THRESH * self.snd_mss
        una = self.snd_una
        found = False
        # The log is in send order, so SND.MAX-then grows along it: once the oldest entry
        # is not lost, none after it is.
        while log and sb_bytes_above(self.sacked, log[0][2]) >= need:
            start, end, _ = log.popleft()
            if end > una:  # (acked ones are not lost; SACKed parts are skipped on resend)
                self.relost.append((max(start, una), end))
                found = True
        if found:
            self.n_lost_retransmits += 1

    def _take_relost(self) -> tuple[int, int] | None:
        """The next segment of a retransmission deemed lost (`_lost_retransmits`) that is
        neither acked nor SACKed by now, taken off `relost`; None when there is none."""
        mss = self.snd_mss
        relost = self.relost
        while relost:
            start, end = self._unsacked(max(relost[0][0], self.snd_una), relost[0][1])
            if start >= end:
                relost.pop(0)
                continue
            stop = min(end, start + mss)
            if stop >= relost[0][1]:
                relost.pop(0)
            else:
                relost[0] = (stop, relost[0][1])
            return start, stop
        return None

    def _enter_fast_recovery(self, lost: int) -> None:
        """RFC 5681 3.2 steps 2-3 / RFC 6675 5: halve, then resend what is lost."""
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.snd_mss)
        self.cwnd = self.ssthresh
        self.recovery = Recovery.FAST
        self.force_rexmit = True
        self.n_recoveries += 1
        self.recover = self.snd_max
        self.lost_end = lost
        self.rexmit_ptr = self.snd_una
        self.retx_log.clear()
        self.relost.clear()
        self.rtt_off = None

    def _xmit(self, start: int, end: int, now: float) -> None:
        """Send [start, end) of our sequence space with the current ACK and window."""
        flags = ACK
        data_end = self.snd_buf_off + len(self.snd_buf)
        dend = min(end, data_end)
        boff = self.snd_buf_off
        payload = bytes(self.snd_buf[start - boff : dend - boff]) if dend > start else b""
        if self.fin_off is not None and end > self.fin_off:
            flags |= FIN
        if dend == data_end and payload:
            flags |= PSH
        opts = self._sack_option() if self.ooo and self.sack_ok else b""
        self.out.tcp(
            (self.iss + start) & M32,
            (self.irs + self.rcv_nxt) & M32,
            flags,
            self._window_field(),
            opts,
            payload,
        )
        self._segment_sent(now)

    def _segment_sent(self, now: float) -> None:
        """A segment carrying our ACK and data left: no ACK owed, the RTO timer running."""
        self.ack_due = False
        self.unacked_rcv = 0
        self.t_delack = None
        if self.t_rto is None:
            self.t_rto = now + self._cur_rto()

    def send_ack(self) -> None:
        """Send a pure ACK now (with SACK blocks when there is out-of-order data)."""
        opts = self._sack_option() if self.ooo and self.sack_ok else b""
        self.out.tcp(
            (self.iss + self.snd_nxt) & M32,
            (self.irs + self.rcv_nxt) & M32,
            ACK,
            self._window_field(),
            opts,
            b"",
        )
        self.ack_due = False
        self.unacked_rcv = 0
        self.t_delack = None

    def _pipe(self) -> int:
        """RFC 6675 4 SetPipe, lite: bytes deemed in flight during recovery."""
        una = self.snd_una
        above = self.snd_max - self.lost_end - sb_bytes_above(self.sacked, self.lost_end)
        if not self.sacked:
            above -= self.dupacks * self.snd_mss  # dup ACKs stand in for SACKs (RFC 5681 3.2)
        retx = (self.rexmit_ptr - una) - sb_bytes_between(self.sacked, una, self.rexmit_ptr)
        for s, e in self.relost:  # retransmissions deemed lost are no longer in flight
            s = max(s, una)
            if e > s:
                retx -= (e - s) - sb_bytes_between(self.sacked, s, e)
        return max(0, above) + retx

    def _unsacked(self, start: int, limit: int) -> tuple[int, int]:
        """The first run of [start, limit) that no SACK block covers, as (start, end);
        empty (start >= end) when the blocks cover it all."""
        for s, e in self.sacked:
            if e <= start:
                continue
            if s <= start:
                start = e
                continue
            limit = min(limit, s)
            break
        return start, limit

    def _next_hole(self) -> tuple[int, int] | None:
        start, limit = self._unsacked(
            max(self.rexmit_ptr, self.snd_una), min(self.lost_end, self.snd_max)
        )
        if start >= limit:
            return None
        return start, min(limit, start + self.snd_mss)

    def _output(self, now: float) -> None:
        """Send what cwnd, the peer's window and recovery allow (RFC 5681, RFC 6675 5)."""
        if self.state is not S.ESTABLISHED and self.state not in SYNCHRONIZED_SEND:
            return
        mss = self.snd_mss
        data_end = self.snd_buf_off + len(self.snd_buf)
        wnd_edge = self.snd_una + self.snd_wnd
        if self.recovery is not None:
            pipe = self._pipe()
            while pipe < self.cwnd or self.force_rexmit:
                hole = self._take_relost() if self.relost else None
                again = hole is not None
                if hole is None:
                    hole = self._next_hole()
                    if hole is None:
                        break
                # RFC 6675 5 (3): the first retransmission on entering recovery is unconditional.
                self.force_rexmit = False
                s, e = hole
                self._xmit(s, e, now)
                self.n_retransmits += 1
                if len(self.retx_log) < MAX_RETX_LOG:
                    self.retx_log.append((s, e, self.snd_max))
                self.rtt_off = None  # Karn: no RTT sample across a retransmission
                if not again:
                    self.rexmit_ptr = e
                pipe += e - s
            budget = self.cwnd - pipe
        else:
            budget = self.cwnd - (self.snd_nxt - self.snd_una)
            if self.LEAN_PATHS and self.fin_off is None and not self.ooo:
                budget = self._send_full_run(min(data_end - 1, wnd_edge, self.snd_nxt + budget),
                                             budget, now)  # fmt: skip
        while True:
            nxt = self.snd_nxt
            if nxt < data_end:
                end = min(nxt + mss, data_end, wnd_edge, nxt + max(0, budget))
                n = end - nxt
                if n <= 0:
                    break
                if n < mss and end < data_end and self.snd_max > self.snd_una:
                    # Sender SWS avoidance (RFC 9293 3.8.6.2.1): with data in flight, wait
                    # until a full segment fits in the windows.
                    break
                if end == data_end and self.fin_off is not None:
                    end += 1  # the FIN rides on the last segment
                self._xmit(nxt, end, now)
                if self.rtt_off is None and self.recovery is None and end > self.snd_max:
                    self.rtt_off = end
                    self.rtt_time = now
                budget -= n
                self.snd_nxt = end
                if end > self.snd_max:
                    self.snd_max = end
            elif self.fin_off is not None and nxt == self.fin_off:
                self._xmit(nxt, nxt + 1, now)
                self.snd_nxt = self.snd_max = nxt + 1
            else:
                break
        if (
            self.snd_max == self.snd_una
            and self.snd_nxt < data_end
            and self.snd_una + self.snd_wnd <= self.snd_nxt
            and self.t_persist is None
        ):
            # RFC 9293 3.8.6.1: a zero window with data waiting arms the persist timer.
            self.t_persist = now + self._cur_rto()

    def _send_full_run(self, limit: int, budget: int, now: float) -> int:
        """The lean path of `_output` in steady state: the full segments that fit below
        `limit` (short of the last byte queued, which carries PSH), sent as the loop below
        would send them one by one. Returns what is left of the budget."""
        nxt = self.snd_nxt
        mss = self.snd_mss
        count = (limit - nxt) // mss
        if count <= 0:
            return budget
        end = nxt + count * mss
        self.out.tcp_run(
            (self.iss + nxt) & M32,
            (self.irs + self.rcv_nxt) & M32,
            self._window_field(),
            self.snd_buf,
            nxt - self.snd_buf_off,
            count,
            mss,
        )
        self._segment_sent(now)
        if self.rtt_off is None:
            first = (self.snd_max - nxt) // mss  # the first segment beyond SND.MAX is timed
            if first < count:
                self.rtt_off = nxt + (first + 1) * mss
                self.rtt_time = now
        self.snd_nxt = end
        if end > self.snd_max:
            self.snd_max = end
        return budget - count * mss

    def next_deadline(self) -> float | None:
        """The earliest armed timer."""
        best: float | None = None
        for t in (self.t_rto, self.t_persist, self.t_delack, self.t_wait):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def on_timeout(self, now: float) -> None:
        """Run every timer that is due."""
        if self.t_wait is not None and now >= self.t_wait:
            self.t_wait = None
            if self.state is S.TIME_WAIT:
                self.state = S.CLOSED
                return
            if self.state is S.FIN_WAIT_2:
                self._finish()
                return
        if self.t_rto is not None and now >= self.t_rto:
            self.t_rto = None
            self._on_rto(now)
            if self.state is S.CLOSED:
                return
        if self.t_persist is not None and now >= self.t_persist:
            self.t_persist = None
            if self.snd_max == self.snd_una and self.snd_nxt < self.snd_buf_off + len(self.snd_buf):
                # RFC 9293 3.8.6.1: stay open while the receiver answers the probes; a peer
                # that stopped answering is given up like an unanswered retransmission
                # (Linux: tcp_probe_timer against tcp_retries2).
                if self.probes_out >= self.cfg.max_retries:
                    if not self.released:
                        self.events.append(Reset(self.id, errno.ETIMEDOUT))
                    self._finish()
                    return
                self.probes_out += 1
                # A probe beyond the window: <SEQ=SND.UNA-1>, like Linux; it elicits an ACK.
                self.out.tcp(
                    (self.iss + self.snd_una - 1) & M32,
                    (self.irs + self.rcv_nxt) & M32,
                    ACK,
                    self._window_field(),
                    b"",
                    b"",
                )
                self.backoff = min(self.backoff + 1, 16)
                self.t_persist = now + self._cur_rto()
        if self.t_delack is not None and now >= self.t_delack:
            self.t_delack = None
            self.ack_due = True

    def _on_rto(self, now: float) -> None:
        st = self.state
        if st is S.SYN_SENT:
            if now - self.started >= self.cfg.connect_timeout - 1e-9:
                self._fail(errno.ETIMEDOUT)
                return
            self.retries += 1
            self.backoff += 1
            self._send_syn(now)
            self.t_rto = min(self.t_rto or now, self.started + self.cfg.connect_timeout)
            return
        if st is S.SYN_RECEIVED:
            self.retries += 1
            if self.retries > self.cfg.synack_retries:
                self._finish()
                return
            self.backoff += 1
            self._send_syn(now)
            return
        if self.snd_max <= self.snd_una or st not in SYNCHRONIZED_SEND:
            return
        self.retries += 1
        if self.retries > self.cfg.max_retries:
            if not self.released:
                self.events.append(Reset(self.id, errno.ETIMEDOUT))
            self._finish()
            return
        mss = self.snd_mss
        self.n_timeouts += 1
        # RFC 5681 3.1 eq. 4 (only on the first timeout of a series), RFC 6298 5.5-5.7.
        if self.backoff == 0:
            self.ssthresh = max((self.snd_max - self.snd_una) // 2, 2 * mss)
        else:
            self.sacked.clear()  # RFC 2018 8: the receiver may have reneged
        self.cwnd = mss
        self.recovery = Recovery.RTO
        self.recover = self.snd_max
        self.lost_end = self.snd_max
        self.rexmit_ptr = self.snd_una
        self.retx_log.clear()
        self.relost.clear()
        self.dupacks = 0
        self.rtt_off = None
        self.backoff = min(self.backoff + 1, 16)
        self._output(now)
        self.t_rto = now + self._cur_rto()
