"""`make demo`: a WireGuard peer on loopback and a wrapped curl through it, no root needed.

Generates two key pairs, starts the embedded peer (demo/peer.py) on 127.0.0.1, writes a
demo config (0600) in a temporary directory, runs `wrapguard --config demo.conf -- curl -sS
http://10.150.0.1/` as a subprocess and tells the user, step by step, what happened. Exit 0 on
success, 1 with one clear line on failure. The peer and the directory go away on every path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

from demo.peer import TUNNEL_V4, EmbeddedPeer, Visit, client_addresses
from wrapguard import log
from wrapguard.keys import PrivateKey

TIMEOUT = 30.0  # seconds for the wrapped curl
URL = f"http://{TUNNEL_V4.ip}/"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class DemoFailed(Exception):
    """One sentence for the user; the demo exits 1."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _child_env() -> dict[str, str]:
    # curl would send the request to a proxy named in the environment, not into the tunnel.
    return {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}


async def _run_wrapped(config: Path) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wrapguard",
        "--config",
        str(config),
        "--log-level",
        "warn",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "20",
        URL,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DemoFailed(f"the wrapped curl did not finish within {TIMEOUT:.0f} s") from None
    assert proc.returncode is not None
    return proc.returncode, out, err


def _last_line(err: bytes) -> str:
    lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


async def _demo(workdir: Path) -> None:
    ours, theirs = PrivateKey.generate(), PrivateKey.generate()
    visits: list[Visit] = []
    async with EmbeddedPeer(theirs, [ours.public_key()], on_visit=visits.append) as peer:
        host, port = peer.endpoint
        _say(f"1. A WireGuard peer is up at {host}:{port} (UDP), inside this process.")
        _say(f"   Its tunnel address is {TUNNEL_V4.ip}, where a tiny web server listens.")
        config = workdir / "demo.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(peer.client_config(ours))
        _say(f"2. Wrote our side's config with fresh keys: {config}")
        _say(f"3. Running: wrapguard --config demo.conf -- curl -sS --max-time 20 {URL}")
        code, out, err = await _run_wrapped(config)
        if code != 0:
            raise DemoFailed(f"the wrapped curl exited {code}: {_last_line(err)}")
        if not out:
            raise DemoFailed("curl printed nothing")
        _say("4. curl got this page through the tunnel:")
        _say(textwrap.indent(out.decode(errors="replace").rstrip("\n"), "     | "))
        mine = str(client_addresses(0)[0].ip)
        seen = [v.client for v in visits]
        if seen != [mine]:
            raise DemoFailed(f"the peer saw requests from {seen or 'nobody'}, expected {mine}")
        _say(f"5. The peer saw us as {mine}: the request really came through WireGuard.")


def main() -> int:
    log.setup("error")  # the peer's own logs would only clutter a demo
    if shutil.which("curl") is None:
        print("demo failed: curl is not installed (try: apt-get install curl)", file=sys.stderr)
        return 1
    _say("wrapguard demo: one program inside a WireGuard tunnel, no root needed.")
    workdir = Path(tempfile.mkdtemp(prefix="wrapguard-demo-"))
    try:
        asyncio.run(_demo(workdir))
    except DemoFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _say("6. Cleaned up: peer stopped, config and keys deleted. That's it!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
