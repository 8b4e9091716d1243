"""The stream road's real parts for the namespace tests: a private CA (made with `cryptography`),
`wrapguard relay` beside the rig's wireguard-go (in the peer namespace), nginx and Caddy in
front of it doing TLS, nftables in the client namespace dropping UDP to the peer.

Fixed ports are fine: the namespaces are the test's own.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rig.harness import Rig
from rig.netns import Netns

RELAY_PORT = 8081  # wrapguard relay, plain HTTP on the peer's loopback
NGINX_PORT = 8443
CADDY_PORT = 8444
RELAY_NAME = "relay.test"  # the name in the certificate and in the client's /etc/hosts
KEY = "k3y-0f-the-relay_for.tests"


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True,
    crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


def make_ca(d: Path, name: str, hosts: list[str]) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem): a CA and a server certificate it signs for `hosts`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    ca_pem, cert_pem, key_pem = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_pem.chmod(0o600)
    return ca_pem, cert_pem, key_pem


NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {addr}:{port} ssl;
        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /wg {{
            proxy_pass http://127.0.0.1:{relay};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            client_body_timeout 1h;
            send_timeout 1h;
        }}
    }}
}}
"""

CADDYFILE = """\
{{
    admin off
    auto_https off
    storage file_system {d}/data
}}
https://{name}:{port} {{
    bind {addr}
    tls {cert} {key}
    reverse_proxy 127.0.0.1:{relay} {{
        flush_interval -1
    }}
}}
"""


@dataclass
class Front:
    """A reverse proxy (nginx or caddy) in the peer namespace; restart() it mid-run."""

    kind: str
    ns: Netns
    d: Path
    argv: list[str]
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Front:
        with open(self.d / f"{self.kind}.out", "ab") as log:
            self.proc = self.ns.popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_for(self._listening, 20, f"{self.kind} listening")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited: {(self.d / f'{self.kind}.out').read_text()}")
        r = self.ns.run(["ss", "-Htln", f"sport = :{self.port}"], check=False)
        return bool(r.stdout.strip())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class StreamRig:
    rig: Rig
    d: Path
    ca: Path
    other_ca: Path
    key_file: Path
    relay_log: Path
    relay: subprocess.Popen[bytes]
    fronts: dict[str, Front] = field(default_factory=dict)

    @property
    def peer_addr(self) -> str:
        return self.rig.peer_endpoint[0]

    def url(self, kind: str) -> str:
        return f"https://{RELAY_NAME}:{self.fronts[kind].port}/wg"

    def config(
        self,
        path: Path,
        kind: str = "nginx",
        key: str | None = None,
        ca: Path | None = None,
        url: str | None = None,
    ) -> Path:
        lines = [
            f"TransportKey = {key}" if key is not None else f"TransportKeyFile = {self.key_file}"
        ]
        lines.append(f"TransportCA = {ca or self.ca}")
        return self.rig.write_client_config(path, endpoint=url or self.url(kind), extra_lines=lines)

    def relay_lines(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.relay_log.read_text().splitlines() if x.strip()]

    def udp_ports(self) -> set[int]:
        """The local ports of the relay's session sockets (what wireguard-go sees)."""
        return {
            int(x["udp_port"]) for x in self.relay_lines() if x.get("message") == "session opened"
        }  # type: ignore[call-overload]

    def blocked_udp(self) -> int:
        """Packets the client namespace's nftables rule dropped so far."""
        r = self.rig.client.run(["nft", "-j", "list", "table", "inet", "wgblock"])
        total = 0
        for item in json.loads(r.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        total += int(expr["counter"]["packets"])
        return total


def block_udp(rig: Rig) -> None:
    """nftables in the client namespace: every UDP datagram to the peer's network is dropped."""
    v4 = rig.peer_endpoint[0]
    v6 = rig.peer_endpoint_v6[0]
    rules = f"""
table inet wgblock {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ip daddr {v4}/24 meta l4proto udp counter drop
        ip6 daddr {v6}/64 meta l4proto udp counter drop
    }}
}}
"""
    rig.client.run(["nft", "-f", "-"], input=rules)


def build(rig: Rig, d: Path, *, block: bool = True, caddy: bool = True) -> StreamRig:
    """The relay and its fronts beside `rig`'s peer; `block`: nftables drops the client's UDP."""
    peer_ns = rig.peer.ns
    addr = rig.peer_endpoint[0]
    ca, cert, key = make_ca(d / "pki", "wrapguard", [RELAY_NAME, addr])
    other_ca, _, _ = make_ca(d / "other", "someone else's", [RELAY_NAME])
    key_file = d / "relay.keys"
    key_file.write_text(f"# the relay's API keys\nanother-key\n{KEY}\n")
    key_file.chmod(0o600)
    client_key = d / "client.key"
    client_key.write_text(KEY + "\n")
    client_key.chmod(0o600)
    relay_log = d / "relay.log"
    argv = [
        sys.executable, "-m", "wrapguard", "relay", "--listen", f"127.0.0.1:{RELAY_PORT}",
        "--forward", f"127.0.0.1:{rig.peer.port}", "--key-file", str(key_file),
        "--log-level", "debug", "--log-file", str(relay_log),
    ]  # fmt: skip
    relay = peer_ns.popen(argv, env=peer_ns.python_env())
    wait_for(lambda: relay_log.exists() and "relay listening" in relay_log.read_text(), 20, "relay")
    sr = StreamRig(rig, d, ca, other_ca, client_key, relay_log, relay)
    ngx = d / "nginx"
    ngx.mkdir()
    (ngx / "nginx.conf").write_text(
        NGINX_CONF.format(
            d=ngx, addr=addr, port=NGINX_PORT, name=RELAY_NAME, cert=cert, key=key, relay=RELAY_PORT
        )
    )
    sr.fronts["nginx"] = Front(
        "nginx",
        peer_ns,
        ngx,
        ["nginx", "-p", str(ngx), "-c", str(ngx / "nginx.conf"), "-e", str(ngx / "error.log")],
        dict(os.environ),
        NGINX_PORT,
    ).start()
    rig.client.hosts(f"127.0.0.1 localhost\n::1 localhost\n{addr} {RELAY_NAME}\n")
    if block:
        block_udp(rig)
    if not caddy:
        return sr
    cdy = d / "caddy"
    cdy.mkdir()
    (cdy / "Caddyfile").write_text(
        CADDYFILE.format(
            d=cdy, addr=addr, port=CADDY_PORT, name=RELAY_NAME, cert=cert, key=key, relay=RELAY_PORT
        )
    )
    env = dict(os.environ)
    env.update(XDG_DATA_HOME=str(cdy / "xdg-data"), XDG_CONFIG_HOME=str(cdy / "xdg-config"))
    env["HOME"] = str(cdy)
    sr.fronts["caddy"] = Front(
        "caddy",
        peer_ns,
        cdy,
        ["caddy", "run", "--config", str(cdy / "Caddyfile"), "--adapter", "caddyfile"],
        env,
        CADDY_PORT,
    ).start()
    return sr


def close(sr: StreamRig) -> None:
    for front in sr.fronts.values():
        front.stop()
    if sr.relay.poll() is None:
        sr.relay.terminate()
        sr.relay.wait(10)
