"""Doors: how traffic gets into the engine (architecture.md, "Where
it grows"). Each door owns only its own protocol and maps it onto the flow API of
`wrapguard.runtime.service.TunnelService`:

- `preload/`: the shim's door (the local channel, outbound and inbound parts);
- `socks5.py`: a SOCKS5 proxy (RFC 1928, RFC 1929 user/password), CONNECT and UDP ASSOCIATE;
- `httpproxy.py`: an HTTP proxy (CONNECT and absolute-URI requests, h11).

A door is started with `await start(service, spec)` and returns a `Door` (its address,
`close()`); the launcher closes every door on every exit path.
"""

from __future__ import annotations

from typing import Protocol

from wrapguard.frontends import ProxySpec


class Door(Protocol):
    """A running door."""

    @property
    def address(self) -> str: ...  # "host:port" (or a path) it serves, for logs and /state

    async def close(self) -> None: ...


__all__ = ["Door", "ProxySpec"]
