"""End to end, the stream road (issue 15): UDP from the client namespace to the peer is dropped
by nftables; `wrapguard relay` runs beside the rig's wireguard-go in the peer namespace, behind
a real nginx and a real Caddy doing TLS with a private CA this test makes.

A wrapped curl fetches and uploads 64 MiB (sha256) through each of them; wireguard-go sees
the relay's session socket as our endpoint; a SOCKS5 client goes through the same road; a
wrong key and an untrusted certificate are one clear line each; nginx restarted mid-run:
new connections work again, an open flow resumes or fails, never hangs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.harness import MiB, Rig
from roads import streamrig
from roads.streamrig import KEY, StreamRig, wait_for

RIG_OPTIONS = {"file_sizes": (100_000, 64 * MiB)}
BIG, SMALL = "64MiB.bin", "100000B.bin"
SIZE = 64 * MiB
SOCKS_PORT = 1080


@pytest.fixture(scope="module")
def road(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StreamRig]:
    sr = streamrig.build(module_rig, tmp_path_factory.mktemp("streams"))
    try:
        yield sr
    finally:
        streamrig.close(sr)


def wrapped(
    sr: StreamRig, conf: Path, *cmd: str, timeout: float = 240, level: str = "warn"
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", level, "--"]
    return sr.rig.client.run(
        [*argv, *cmd], check=False, timeout=timeout, env=sr.rig.client.python_env()
    )


def fetch_and_check(sr: StreamRig, conf: Path, out: Path) -> None:
    r = wrapped(sr, conf, "curl", "-sS", "--max-time", "200", "-o", str(out), sr.rig.url(BIG))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # --log-level warn: a clean run says nothing
    size, sha = sr.rig.files[BIG]
    data = out.read_bytes()
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == sha
    out.unlink()


def upload_and_check(sr: StreamRig, conf: Path, tmp_path: Path) -> None:
    up = tmp_path / "up.bin"
    up.write_bytes(bytes(range(256)) * (SIZE // 256))
    url = f"http://{sr.rig.peer_tunnel_v4}:{sr.rig.http_port}/upload"
    r = wrapped(sr, conf, "curl", "-sS", "--max-time", "200", "-T", str(up), url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "sha256": hashlib.sha256(up.read_bytes()).hexdigest(),
        "length": SIZE,
    }


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["nginx", "caddy"])
def test_64mib_both_ways_through_the_reverse_proxy(
    road: StreamRig, tmp_path: Path, kind: str
) -> None:
    blocked = road.blocked_udp()
    probe = road.rig.client.socket(2, 2)  # AF_INET, SOCK_DGRAM: prove the rule drops UDP
    with pytest.raises(PermissionError):  # nftables' drop on output: EPERM to the sender
        probe.sendto(b"probe", road.rig.peer_endpoint)
    probe.close()
    assert road.blocked_udp() > blocked

    conf = road.config(tmp_path / "wg0.conf", kind)
    fetch_and_check(road, conf, tmp_path / "down.bin")
    # wireguard-go's endpoint for us is one of the relay's session sockets, on its loopback.
    st = road.rig.peer_status()
    assert st.endpoint is not None
    host, _, port = st.endpoint.rpartition(":")
    assert host == "127.0.0.1"
    assert int(port) in road.udp_ports()
    upload_and_check(road, conf, tmp_path)
    front_log = (road.fronts[kind].d / f"{kind}.out").read_text()
    if kind == "nginx":
        access = (road.fronts["nginx"].d / "access.log").read_text()
        assert '"GET /wg HTTP/1.1" 200' in access
        assert '"PUT /wg HTTP/1.1"' in access
    assert KEY not in front_log  # Authorization is a credential: proxies do not log it
    client = road.rig.client_veth_v4.split("/")[0]
    opened = [x for x in road.relay_lines() if x.get("message") == "session opened"]
    assert any(f" for {client}" in str(x["client"]) for x in opened), opened


@pytest.mark.timeout(300)
def test_socks5_through_the_road(road: StreamRig, tmp_path: Path) -> None:
    conf = road.config(tmp_path / "wg0.conf")
    log = tmp_path / "daemon.log"
    proc = road.rig.client.popen(
        [
            sys.executable, "-m", "wrapguard", "--config", str(conf),
            "--socks5", f"127.0.0.1:{SOCKS_PORT}", "--log-level", "debug",
            "--log-file", str(log), "--control", str(tmp_path / "ctl.sock"),
        ],
        env=road.rig.client.python_env(),
    )  # fmt: skip
    try:
        wait_for(lambda: log.exists() and "socks5 proxy listening" in log.read_text(), 30, "socks")
        r = road.rig.client.run(
            [
                "curl", "-sS", "--max-time", "120", "--socks5", f"127.0.0.1:{SOCKS_PORT}",
                "-o", str(tmp_path / "s.bin"), road.rig.url(BIG),
            ],
            check=False,
            timeout=180,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        sha = road.rig.files[BIG][1]
        assert hashlib.sha256((tmp_path / "s.bin").read_bytes()).hexdigest() == sha
        # `wrapguard show` names the road and its state.
        show = road.rig.client.run(
            [sys.executable, "-m", "wrapguard", "show", "--control", str(tmp_path / "ctl.sock")],
            env=road.rig.client.python_env(),
        )
        assert f"endpoint: {road.url('nginx')}" in show.stdout, show.stdout
        assert "transport: https stream (up, " in show.stdout, show.stdout
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


@pytest.mark.timeout(300)
def test_wrong_key_is_one_line_and_exits_as_an_unreachable_peer(
    road: StreamRig, tmp_path: Path
) -> None:
    cmd = ["curl", "-sS", "--max-time", "8", road.rig.url(SMALL)]
    bad = road.config(tmp_path / "bad.conf", key="not-the-key")
    r = wrapped(road, bad, *cmd, timeout=60)
    lines = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    errors = [x for x in lines if x["level"] == "error"]
    assert len(errors) == 1, r.stderr
    assert "refused the TransportKey (HTTP 401)" in str(errors[0]["message"])
    assert "not-the-key" not in r.stderr  # the key itself is never logged
    # The same program against a peer that does not answer at all (a port nobody serves).
    gone = road.config(tmp_path / "gone.conf", url=f"https://{streamrig.RELAY_NAME}:1/wg")
    r2 = wrapped(road, gone, *cmd, timeout=60)
    assert r.returncode == r2.returncode == 28, (r.stderr, r2.stderr)  # curl: timed out
    assert any("refused: wrong or missing key" in str(x["message"]) for x in road.relay_lines())


@pytest.mark.timeout(300)
def test_untrusted_certificate_is_one_line(road: StreamRig, tmp_path: Path) -> None:
    conf = road.config(tmp_path / "wg0.conf", ca=road.other_ca)
    r = wrapped(road, conf, "curl", "-sS", "--max-time", "8", road.rig.url(SMALL), timeout=60)
    assert r.returncode == 28, r.stderr
    errors = [json.loads(x) for x in r.stderr.splitlines() if x.startswith('{"')]
    errors = [x for x in errors if x["level"] == "error"]
    assert len(errors) == 1, r.stderr
    msg = str(errors[0]["message"])
    assert f"the TLS certificate of {streamrig.RELAY_NAME} is not trusted" in msg
    assert "unable to get local issuer certificate" in msg


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["nginx", "caddy"])
def test_proxy_restart_mid_run(road: StreamRig, tmp_path: Path, kind: str) -> None:
    """The reverse proxy stops and starts while a download runs through a SOCKS5 daemon: new
    connections work again within seconds, the open download resumes or fails, never hangs."""
    conf = road.config(tmp_path / "wg0.conf", kind)
    log = tmp_path / "daemon.log"
    port = SOCKS_PORT + (1 if kind == "nginx" else 2)
    env = road.rig.client.python_env({**os.environ, "WRAPGUARD_TEST_TCP_RETRIES": "8"})
    proc = road.rig.client.popen(
        [
            sys.executable, "-m", "wrapguard", "--config", str(conf),
            "--socks5", f"127.0.0.1:{port}", "--log-level", "debug", "--log-file", str(log),
        ],
        env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: log.exists() and "socks5 proxy listening" in log.read_text(), 30, "socks")
        out = tmp_path / "long.bin"
        long = road.rig.client.popen(
            [
                "curl", "-sS", "--limit-rate", "4M", "--socks5", f"127.0.0.1:{port}",
                "-o", str(out), road.rig.url(BIG),
            ],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(lambda: out.exists() and out.stat().st_size > 2 * MiB, 60, "download under way")
        stopped = time.monotonic()
        road.fronts[kind].restart()
        started = time.monotonic()
        small = ["curl", "-sS", "--max-time", "5", "--socks5", f"127.0.0.1:{port}"]
        while True:
            r = road.rig.client.run([*small, "-o", "/dev/null", road.rig.url(SMALL)], check=False)
            if r.returncode == 0:
                break
            assert time.monotonic() - started < 60, f"no new connection after 60 s: {r.stderr}"
        recovered = time.monotonic() - started
        rc = long.wait(240)  # ends one way or the other: a hang fails the test here
        _, err = long.communicate()
        if rc == 0:
            assert hashlib.sha256(out.read_bytes()).hexdigest() == road.rig.files[BIG][1]
        else:
            assert err.strip(), "the download failed without saying why"
        print(
            f"{kind} down and up again in {started - stopped:.1f} s; new connections worked "
            f"{recovered:.1f} s later; the open download: rc={rc}"
        )
        text = log.read_text()
        assert "stream road reconnected" in text
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


@pytest.mark.timeout(200)
def test_doctor_checks_the_relay(road: StreamRig, tmp_path: Path) -> None:
    def doctor(conf: Path) -> str:
        argv = [sys.executable, "-m", "wrapguard", "--doctor", "--config", str(conf)]
        r = road.rig.client.run(argv, check=False, timeout=90, env=road.rig.client.python_env())
        return r.stdout + r.stderr

    good = doctor(road.config(tmp_path / "good.conf"))
    assert "relay reachable, TLS certificate valid, key accepted" in good, good
    bad = doctor(road.config(tmp_path / "bad.conf", key="wrong"))
    assert "refused the TransportKey (HTTP 401)" in bad, bad
    untrusted = doctor(road.config(tmp_path / "ca.conf", ca=road.other_ca))
    assert "not trusted: unable to get local issuer certificate" in untrusted, untrusted


@pytest.mark.timeout(300)
def test_https_proxy_connect(road: StreamRig, tmp_path: Path) -> None:
    """HTTPS_PROXY: the streams go through a CONNECT proxy, TLS to nginx inside the tunnel."""
    script = Path(__file__).with_name("connectproxy.py")
    proxy = road.rig.client.popen(
        [sys.executable, str(script), "3128"], stdout=subprocess.PIPE, text=True,
        env=road.rig.client.python_env(),
    )  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "listening"
        conf = road.config(tmp_path / "wg0.conf")
        env = road.rig.client.python_env({**os.environ, "HTTPS_PROXY": "http://127.0.0.1:3128"})
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        argv = [sys.executable, "-m", "wrapguard", "--config", str(conf), "--log-level", "info"]
        r = road.rig.client.run(
            [*argv, "--", "curl", "-sS", "--max-time", "60", "-o", "/dev/null",
             "-w", "%{size_download}", road.rig.url(SMALL)],
            check=False, timeout=120, env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == road.rig.files[SMALL][0]
        assert '"proxy": "http://127.0.0.1:3128"' in r.stderr
    finally:
        proxy.terminate()
        out, _ = proxy.communicate(timeout=10)
    assert out.count(f"CONNECT {streamrig.RELAY_NAME}:{streamrig.NGINX_PORT}") >= 2


@pytest.mark.timeout(200)
def test_self_test_over_the_road(road: StreamRig, tmp_path: Path) -> None:
    conf = road.config(tmp_path / "wg0.conf")
    argv = [sys.executable, "-m", "wrapguard", "--self-test", "--config", str(conf)]
    r = road.rig.client.run(argv, check=False, timeout=90, env=road.rig.client.python_env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"with peer 1 at {road.url('nginx')} in " in out, out
