"""Protocol timing constants of WireGuard [W 6.1], bundled so tests can shorten them.

`TimerConfig` holds the production constants as defaults. It is passed to `Device(...,
timers=TimerConfig(...))`; a shortened config is the only test knob (there is no environment
or global override in production code). The message limits live here too so that a test can
reach Rekey-After-Messages without sending 2^60 packets.
"""

from __future__ import annotations

from dataclasses import dataclass

from wrapguard.noise.session import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """The protocol's timers and message limits [W 6.1]; tests shorten them."""

    rekey_after_time: float = 120.0  # [W 6.1] Rekey-After-Time
    reject_after_time: float = 180.0  # [W 6.1] Reject-After-Time
    rekey_attempt_time: float = 90.0  # [W 6.1] Rekey-Attempt-Time
    rekey_timeout: float = 5.0  # [W 6.1] Rekey-Timeout
    rekey_timeout_jitter: float = 0.333  # [W 6.1] jitter up to 333 ms added to retries
    keepalive_timeout: float = 10.0  # [W 6.1] Keepalive-Timeout
    rekey_after_messages: int = REKEY_AFTER_MESSAGES  # [W 6.1]
    reject_after_messages: int = REJECT_AFTER_MESSAGES  # [W 6.1]
    handshake_initiation_rate: float = 1.0 / 50  # min spacing of consumed initiations per peer
    staged_queue_len: int = 128  # packets kept per peer while a handshake is in flight
    # Handshake retries between two "resolve the endpoint hostname again" events: every
    # unanswered attempt (tunnel/reresolve.py keeps it to one lookup at a time).
    resolve_every_attempts: int = 1

    @property
    def zero_keys_after(self) -> float:
        """[W 6.3] all keys are zeroed after 3 x Reject-After-Time without a new session."""
        return 3 * self.reject_after_time

    @property
    def rekey_on_receive_age(self) -> float:
        """[W 6.2] initiator rekeys on receive at Reject - Keepalive - Rekey-Timeout (165 s)."""
        return self.reject_after_time - self.keepalive_timeout - self.rekey_timeout
