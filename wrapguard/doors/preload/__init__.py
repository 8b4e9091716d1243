"""The preload door: the C shim (csrc/) preloaded into the wrapped program, and its launcher
side on the flow API — the local channel server (`channel.py`, docs/channel.md), the backend
it calls (`door.py`), split into the outbound part (`outbound.py`: connect, the gate of a
non-blocking connect, STATUS, names; UDP associations in `udp.py`) and the inbound part
(`inbound.py`: the program's listeners reachable from the tunnel)."""
