"""Every reason a WireGuard datagram or a packet is dropped, in one enum.

The noise layer returns these instead of raising; the tunnel layer turns them into
`PacketDropped(reason, peer)` outputs and counts them in `Device.counters`. Remote input
reasons come first, then local ones (no route, full staging queue, give-up).
"""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    # -- malformed or unknown datagrams [W 5.4]
    MALFORMED = "malformed"  # wrong length, reserved bits set, unknown type
    # -- handshake messages [W 5.4.2, 5.4.3, 5.4.4]
    INVALID_MAC1 = "invalid_mac1"
    UNDER_LOAD = "under_load"  # valid mac1, missing/invalid mac2 while under load: cookie sent
    HANDSHAKE_DECRYPT_FAILED = "handshake_decrypt_failed"
    UNKNOWN_PEER = "unknown_peer"  # the initiator's static key is not one of our peers
    REPLAYED_TIMESTAMP = "replayed_timestamp"  # TAI64N not greater than the last accepted
    HANDSHAKE_FLOOD = "handshake_flood"  # initiations from one peer faster than 50/s
    UNEXPECTED_RESPONSE = "unexpected_response"  # index known, but no initiation pending
    INVALID_COOKIE_REPLY = "invalid_cookie_reply"
    # -- transport data [W 5.4.6]
    UNKNOWN_INDEX = "unknown_index"
    DECRYPT_FAILED = "decrypt_failed"
    REPLAYED_COUNTER = "replayed_counter"  # already seen or behind the sliding window
    KEYPAIR_EXPIRED = "keypair_expired"  # older than Reject-After-Time or counter exhausted
    INVALID_INNER_PACKET = "invalid_inner_packet"  # not an IPv4/IPv6 packet after decryption
    DISALLOWED_SOURCE = "disallowed_source"  # inner source not in the peer's AllowedIPs [W 3]
    # -- local causes
    NO_ROUTE = "no_route"  # outbound destination matches no peer's AllowedIPs
    NO_ENDPOINT = "no_endpoint"  # the peer has no known endpoint to send to
    STAGED_QUEUE_FULL = "staged_queue_full"  # oldest staged packet dropped
    HANDSHAKE_GAVE_UP = "handshake_gave_up"  # staged packets discarded after Rekey-Attempt-Time
