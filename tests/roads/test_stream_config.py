"""Config: `Endpoint = https://...` with TransportKey / TransportKeyFile / TransportCA; every
problem is one ConfigError naming file:line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from wrapguard.config import load_config, parse_config
from wrapguard.errors import ConfigError
from wrapguard.keys import PrivateKey
from wrapguard.roads.proto import bearer, key_matches

OUR = PrivateKey.generate()
THEIRS = PrivateKey.generate().public_key()


def conf(*peer_lines: str) -> str:
    return "\n".join(
        [
            "[Interface]",
            f"PrivateKey = {OUR.to_base64()}",
            "Address = 10.0.0.2/32",
            "[Peer]",
            f"PublicKey = {THEIRS.to_base64()}",
            "AllowedIPs = 10.0.0.0/24",
            *peer_lines,
        ]
    )


def test_https_endpoint_with_key() -> None:
    c = parse_config(conf("Endpoint = https://relay.example/wg?x=1", "TransportKey = s3cr3t"))
    p = c.peers[0]
    assert p.endpoint is None
    s = p.stream
    assert s is not None
    assert (s.scheme, s.host, s.port, s.target, s.key, s.line) == (
        "https", "relay.example", 443, "/wg?x=1", "s3cr3t", 7,
    )  # fmt: skip
    assert "s3cr3t" not in repr(p)


def test_http_ipv6_and_port() -> None:
    s = parse_config(conf("Endpoint = http://[fd00::1]:8080", "TransportKey = k")).peers[0].stream
    assert s is not None
    assert (s.scheme, s.host, s.port, s.target) == ("http", "fd00::1", 8080, "/")


@pytest.mark.parametrize(
    ("lines", "where", "text"),
    [
        (["Endpoint = https://relay.example/wg"], ":7: Endpoint:", "needs TransportKey"),
        (
            ["Endpoint = https://u:p@relay.example/", "TransportKey = k"],
            ":7: Endpoint:",
            "credentials",
        ),
        (["Endpoint = https:///wg", "TransportKey = k"], ":7: Endpoint:", "no host name"),
        (
            ["Endpoint = https://relay.example:99999/", "TransportKey = k"],
            ":7: Endpoint:",
            "valid URL",
        ),
        (
            ["Endpoint = 192.0.2.1:51820", "TransportKey = k"],
            ":8: TransportKey:",
            "only for a peer",
        ),
        (
            ["Endpoint = https://r.example/", "TransportKey = a b"],
            ":8: TransportKey:",
            "may hold only",
        ),
        (
            ["Endpoint = https://r.example/", "TransportKey = k", "TransportKeyFile = /x"],
            ":9: TransportKeyFile:",
            "both set",
        ),
        (
            ["Endpoint = https://r.example/", "TransportKeyFile = /nonexistent/k"],
            ":8: TransportKeyFile:",
            "no such key file",
        ),
        (
            ["Endpoint = http://r.example/", "TransportKey = k", "TransportCA = /etc/hostname"],
            ":9: TransportCA:",
            "only for an https://",
        ),
        (
            ["Endpoint = https://r.example/", "TransportKey = k", "TransportCA = /nonexistent.pem"],
            ":9: TransportCA:",
            "no such file",
        ),
        (
            ["Endpoint = https://r.example/", "TransportKey = k", "TransportCA = /etc/hostname"],
            ":9: TransportCA:",
            "no usable PEM certificate",
        ),
    ],
)
def test_errors_name_the_line_and_key(lines: list[str], where: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(conf(*lines), "wg0.conf")
    msg = str(info.value)
    assert msg.startswith("wg0.conf" + where), msg
    assert text in msg


def test_key_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "relay.key").write_text("# comment\n\nthe-key\n")
    path = tmp_path / "wg0.conf"
    path.write_text(conf("Endpoint = https://r.example/", "TransportKeyFile = keys/relay.key"))
    path.chmod(0o600)
    s = load_config(str(path)).peers[0].stream
    assert s is not None and s.key == "the-key"
    (tmp_path / "keys" / "relay.key").write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match=r"wg0.conf:8: TransportKeyFile: .*holds 2 keys"):
        load_config(str(path))


def test_bearer_and_constant_time_match() -> None:
    assert bearer(b"Bearer abc") == b"abc"
    assert bearer(b"bearer  abc ") == b"abc"
    assert bearer(b"Basic abc") is None
    assert bearer(None) is None
    keys = [b"one", b"two", b"two"]
    assert key_matches(b"two", keys) == 1
    assert key_matches(b"tw", keys) is None
    assert key_matches(b"", keys) is None
