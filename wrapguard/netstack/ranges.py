"""Byte-range bookkeeping for TCP: out-of-order reassembly and the SACK scoreboard.

Ranges are stream offsets (Python ints, no wrap-around). Reassembly blocks are sorted,
disjoint and non-adjacent `(start, bytearray)` pairs; the scoreboard is a sorted list of
disjoint `[start, end]` pairs of SACKed bytes above SND.UNA (RFC 2018, RFC 6675 2).
Both lists are capped in length by the caller so a hostile peer cannot make them grow.
"""

from __future__ import annotations

__all__ = ["ooo_insert", "sb_add", "sb_bytes_above", "sb_bytes_between", "sb_trim"]


def ooo_insert(blocks: list[tuple[int, bytearray]], start: int, data: bytes) -> int:
    """Insert data at `start` into reassembly blocks; return the start of the merged block."""
    end = start + len(data)
    n = len(blocks)
    i = 0
    while i < n and blocks[i][0] + len(blocks[i][1]) < start:
        i += 1
    j = i
    while j < n and blocks[j][0] <= end:
        j += 1
    if i == j:
        blocks.insert(i, (start, bytearray(data)))
        return start
    first_start: int = blocks[i][0]
    if first_start <= start:
        base_start = first_start
        buf: bytearray = blocks[i][1]
        cur_end = base_start + len(buf)
        if end > cur_end:
            buf += data[cur_end - start :]
            cur_end = end
        absorb = range(i + 1, j)
    else:
        base_start = start
        buf = bytearray(data)
        cur_end = end
        absorb = range(i, j)
    for k in absorb:
        bstart: int = blocks[k][0]
        bbuf: bytearray = blocks[k][1]
        bend = bstart + len(bbuf)
        if bend > cur_end:
            buf += bbuf[cur_end - bstart :]
            cur_end = bend
    blocks[i:j] = [(base_start, buf)]
    return base_start


def sb_add(board: list[list[int]], start: int, end: int) -> None:
    """Merge the SACKed range [start, end) into the scoreboard."""
    if end <= start:
        return
    n = len(board)
    i = 0
    while i < n and board[i][1] < start:
        i += 1
    j = i
    while j < n and board[j][0] <= end:
        j += 1
    if i == j:
        board.insert(i, [start, end])
        return
    board[i:j] = [[min(start, board[i][0]), max(end, board[j - 1][1])]]


def sb_trim(board: list[list[int]], una: int) -> None:
    """Forget scoreboard bytes below the cumulative ACK point."""
    while board and board[0][1] <= una:
        del board[0]
    if board and board[0][0] < una:
        board[0][0] = una


def sb_bytes_above(board: list[list[int]], x: int) -> int:
    """SACKed bytes at or above offset x."""
    return sum(e - max(s, x) for s, e in board if e > x)


def sb_bytes_between(board: list[list[int]], lo: int, hi: int) -> int:
    """SACKed bytes inside [lo, hi)."""
    total = 0
    for s, e in board:
        if e <= lo:
            continue
        if s >= hi:
            break
        total += min(e, hi) - max(s, lo)
    return total
