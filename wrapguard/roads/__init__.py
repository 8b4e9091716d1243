"""Roads: the ways WireGuard datagrams travel besides plain UDP (the stream road over HTTP(S)).

proto.py holds what both ends agree on (header names, key files); stream.py is the client
road the runtime sends a peer's datagrams through; streamrelay.py is `wrapguard relay`, the
server end that sits beside any WireGuard server. docs/streams.md describes the wire.
"""
