"""wrapguard: run one program inside a WireGuard tunnel (no root, TUN device or kernel module)."""

__version__ = "0.1.0"
