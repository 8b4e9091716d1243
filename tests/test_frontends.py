"""frontends.py: --socks5/--http-proxy values and the [Socks5]/[http] config sections."""

from __future__ import annotations

import pytest

from wrapguard.config import parse_config
from wrapguard.errors import ConfigError, UsageError
from wrapguard.frontends import ProxySpec, parse_proxy_flag
from wrapguard.keys import PrivateKey

KEY = PrivateKey(bytes(range(32))).to_base64()
PEER = PrivateKey(bytes([1]) * 32).public_key().to_base64()


def test_flag_forms() -> None:
    assert parse_proxy_flag("socks5", "127.0.0.1:1080") == ProxySpec("socks5", "127.0.0.1", 1080)
    assert parse_proxy_flag("http", ":8118") == ProxySpec("http", "127.0.0.1", 8118)
    assert parse_proxy_flag("socks5", "[::1]:1080") == ProxySpec("socks5", "::1", 1080)
    assert parse_proxy_flag("socks5", "localhost:1080").host == "localhost"
    # The password may hold ':' and '@': the user name ends at the first ':', the host
    # starts after the last '@'.
    spec = parse_proxy_flag("socks5", "me:p@ss:w@rd@0.0.0.0:1080")
    assert (spec.username, spec.password, spec.host, spec.port) == (
        "me",
        "p@ss:w@rd",
        "0.0.0.0",
        1080,
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0.0.0.0:1080", "without credentials"),
        ("[::]:1080", "without credentials"),
        ("192.0.2.1:1080", "without credentials"),
        ("127.0.0.1", "HOST:PORT"),
        ("127.0.0.1:0", "1-65535"),
        ("127.0.0.1:99999", "1-65535"),
        ("::1:1080", "brackets"),
        ("example.com:1080", "not an IP address"),
        ("user@127.0.0.1:1080", "USER:PASS@"),
        (":secret@127.0.0.1:1080", "user name"),
    ],
)
def test_flag_errors_say_what(text: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_proxy_flag("socks5", text)
    assert why in str(info.value) and "--socks5" in str(info.value)


def test_password_never_in_repr() -> None:
    spec = parse_proxy_flag("http", "u:hunter2@127.0.0.1:8118")
    assert "hunter2" not in repr(spec) and "hunter2" not in str(spec)


def _conf(*extra: str) -> str:
    return "\n".join(
        ["[Interface]", f"PrivateKey = {KEY}", "Address = 10.150.0.2/32",
         "[Peer]", f"PublicKey = {PEER}", "AllowedIPs = 10.150.0.0/24", *extra, ""]
    )  # fmt: skip


def test_wireproxy_sections_parse() -> None:
    c = parse_config(
        _conf(
            "[Socks5]", "BindAddress = 127.0.0.1:25344",
            "[http]", "BindAddress = 0.0.0.0:25345", "Username = me", "Password = s3cret",
        ),
        "wg0.conf",
    )  # fmt: skip
    assert c.proxies == (
        ProxySpec("socks5", "127.0.0.1", 25344),
        ProxySpec("http", "0.0.0.0", 25345, "me", "s3cret"),
    )
    assert len(c.peers) == 1  # a [Peer] after a proxy section would still be a peer


@pytest.mark.parametrize(
    ("lines", "line", "key", "why"),
    [
        (("[Socks5]", "Username = me"), 7, "BindAddress", "missing"),
        (("[Socks5]", "BindAddress = 0.0.0.0:1080"), 8, "BindAddress", "without credentials"),
        (("[http]", "BindAddress = 127.0.0.1:1", "Username = me"), 8, "BindAddress", "both"),
        (("[Socks5]", "BindAddress = 1.2.3.4"), 8, "BindAddress", "HOST:PORT"),
    ],
)
def test_section_errors_name_the_line(
    lines: tuple[str, ...], line: int, key: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_conf(*lines), "wg0.conf")
    text = str(info.value)
    assert text.startswith(f"wg0.conf:{line}: {key}:"), text
    assert why in text, text
