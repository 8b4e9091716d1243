"""Row 1h of `make bench` (root): the download of row 1 by a wrapped curl over the stream road
(HTTPS to nginx, `wrapguard relay`, UDP to wireguard-go on the peer's loopback) against the
same download over the UDP road, in the same run, turns interleaved, the peer reset before each.

    python bench/stream_row.py [--rounds N] [--mib N]   (this row alone)
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
for _p in (str(_BENCH.parent / "tests"), str(_BENCH.parent), str(_BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from procs import Row, Stat, ratio  # noqa: E402
from rig_rows import RigBench  # noqa: E402

KEY = "1h"


def row_stream(bench: RigBench, rounds: int) -> Row:
    from roads import streamrig

    mib = bench.rig.files[bench.down_name][0] >> 20
    row = Row(KEY, f"Download {mib} MiB, wrapped curl over the HTTPS stream road vs UDP (MB/s)")
    sr = streamrig.build(bench.rig, bench.workdir / "streams", block=False, caddy=False)
    udp_conf = bench.conf
    stream_conf = sr.config(bench.workdir / "stream.conf")
    speeds: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(rounds):
            for stream in [True, False] if r % 2 == 0 else [False, True]:
                bench.rig.reset_peer()
                bench.conf = stream_conf if stream else udp_conf
                speeds[stream].append(bench._curl_down(True, check=r == 0)[0])
    finally:
        bench.conf = udp_conf
        streamrig.close(sr)
    o, k = Stat.of(speeds[True]), Stat.of(speeds[False])
    row.ours, row.ref, row.ratio = o.fmt(), k.fmt(), ratio(o.median, k.median)
    row.notes = f"stream {o.spread()}, UDP {k.spread()}; nginx TLS + relay on the peer side"
    return row


def main() -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wgbench-stream-"))
    bench = RigBench(work / "rig", args.mib, 1)
    try:
        row = row_stream(bench, args.rounds)
        print(f"| {row.key} | {row.what} | {row.ours} | {row.ref} | {row.ratio} | {row.notes} |")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
