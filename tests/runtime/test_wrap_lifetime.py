"""End to end, the tunnel's lifetime (issue 10): wrapguard returns the program's status when
the program exits, while the processes it left behind keep the tunnel until the last exits.

`bash -c '(sleep 3; curl ...) &'` returns at once and its background curl still downloads
through the tunnel; `ssh -f -N -L` to a real sshd in the peer namespace forwards a port after
wrapguard returned; SIGTERM to the background launcher ends what is left, and nothing of ours
stays behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rig.harness import MiB, Rig
from rig.netns import Netns, netns_pids
from rig.sshd import SSH_PORT
from runtime.wraphelp import popen_wrapped, read_line, wrap_argv

RIG_OPTIONS = {"file_sizes": {"4MiB.bin": 4 * MiB}}


@pytest.fixture(scope="module")
def conf(module_rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return module_rig.write_client_config(tmp_path_factory.mktemp("life") / "c.conf")


def _wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _ours(rig: Rig) -> list[str]:
    """Command lines of wrapguard launchers still running in the client namespace."""
    out = []
    for pid in netns_pids(rig.client.name):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "-m wrapguard" in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_background_child_keeps_the_tunnel_after_the_program_exits(
    module_rig: Rig, conf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bg.out"
    done = tmp_path / "bg.done"
    script = (
        f"(sleep 3; curl -sS --max-time 20 -o {out} {module_rig.url('4MiB.bin')}; "
        f"echo $? > {done}) >/dev/null 2>&1 &"
    )
    t0 = time.monotonic()
    proc = popen_wrapped(
        module_rig.client, conf, ["bash", "-c", script],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rc = proc.wait(15)
    took = time.monotonic() - t0
    assert rc == 0
    assert took < 2.5, f"wrapguard waited for the background job ({took:.1f} s)"
    assert proc.stderr is not None
    _wait_for(done.exists, 30, "the background curl")
    assert done.read_text().strip() == "0"
    size, sha = module_rig.files["4MiB.bin"]
    assert out.stat().st_size == size and _sha(out) == sha
    _wait_for(lambda: not _ours(module_rig), 10, "the background launcher to exit")
    err = proc.stderr.read()
    assert "stays up in the background" in err, err


def test_ssh_f_forwards_a_port_after_wrapguard_returned(
    module_rig: Rig, conf: Path, sshd: Path, tmp_path: Path
) -> None:
    local = 18080
    argv = [
        "ssh", "-f", "-N", "-i", str(sshd), "-p", str(SSH_PORT),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{local}:{module_rig.peer_tunnel_v4}:{module_rig.http_port}",
        f"root@{module_rig.peer_tunnel_v4}",
    ]  # fmt: skip
    log = tmp_path / "wg.log"
    proc = popen_wrapped(
        module_rig.client, conf, argv, extra=["--log-file", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.wait(30) == 0, log.read_text()
    # wrapguard returned; ssh (in the background) forwards through the tunnel.
    out = tmp_path / "fwd.out"
    r = module_rig.client.run(
        ["curl", "-sS", "--max-time", "20", "-o", str(out), f"http://127.0.0.1:{local}/4MiB.bin"],
        check=False,
    )
    assert r.returncode == 0, r.stderr + log.read_text()
    size, sha = module_rig.files["4MiB.bin"]
    assert out.stat().st_size == size and _sha(out) == sha
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    bg = [ln for ln in lines if "stays up in the background" in ln["message"]]
    assert len(bg) == 1, lines
    launcher = int(bg[0]["launcher_pid"])
    assert _ours(module_rig), "no background launcher"
    # SIGTERM to the background launcher ends ssh and the tunnel; nothing is left.
    os.kill(launcher, signal.SIGTERM)
    _wait_for(lambda: not _ours(module_rig), 15, "the background launcher to exit")
    ssh_left = [
        p for p in netns_pids(module_rig.client.name)
        if Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip() == "ssh"
    ]  # fmt: skip
    assert not ssh_left, ssh_left


def test_killed_launcher_takes_the_program_with_it(module_rig: Rig, conf: Path) -> None:
    """kill -9 of the launcher: the program does not run on without its tunnel; wrapguard
    (the waiter) says so in one line and exits 128+9."""
    proc = popen_wrapped(
        module_rig.client, conf, ["sleep", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def launcher() -> int | None:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def program_started() -> bool:
        pid = launcher()
        if pid is None:
            return False
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return any(Path(f"/proc/{k}/comm").read_text().strip() == "sleep" for k in kids)

    _wait_for(program_started, 15, "the wrapped sleep")
    pid = launcher()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(10) == 128 + signal.SIGKILL
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "launcher was killed by signal 9" in err, err
    _wait_for(
        lambda: (
            not any(
                Path(f"/proc/{p}/comm").exists()
                and Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
                for p in netns_pids(module_rig.client.name)
            )
        ),
        5,
        "the program to be stopped",
    )


def _launcher_and_program(waiter: int) -> tuple[int, int] | None:
    try:
        (launcher,) = map(int, Path(f"/proc/{waiter}/task/{waiter}/children").read_text().split())
        kids = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except (OSError, ValueError):
        return None
    return (launcher, int(kids[0])) if kids else None


def _execed(waiter: int) -> bool:
    """The wrapped program runs: the launcher's child has exec'd with the channel's variables
    (before its execve, a forked child's environ is still the launcher's)."""
    found = _launcher_and_program(waiter)
    try:
        return (
            found is not None
            and b"WRAPGUARD_CTL=" in Path(f"/proc/{found[1]}/environ").read_bytes()
        )
    except OSError:
        return False


def test_next_run_removes_what_a_killed_launcher_left(module_rig: Rig, conf: Path) -> None:
    """Issue 11: after kill -9 the private directory stays; the next run removes it. A second
    launcher with the same key says why the two will fight over the tunnel."""
    proc = popen_wrapped(
        module_rig.client, conf, ["sleep", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait_for(lambda: _execed(proc.pid), 15, "the wrapped sleep")
    found = _launcher_and_program(proc.pid)
    assert found is not None
    launcher, program = found
    environ = Path(f"/proc/{program}/environ").read_bytes().split(b"\0")
    ctl = next(e for e in environ if e.startswith(b"WRAPGUARD_CTL=")).split(b"=", 1)[1].decode()
    directory = Path(ctl).parent
    # While it runs, a second launcher with the same key warns.
    r = module_rig.client.run(
        [*wrap_argv(conf, ["true"])], check=False, timeout=30, env=Netns.python_env()
    )
    assert r.returncode == 0, r.stderr
    assert "another wrapguard uses this private key" in r.stderr, r.stderr
    assert directory.is_dir()
    os.kill(launcher, signal.SIGKILL)
    proc.wait(10)
    assert directory.is_dir(), "nothing left behind to test with"
    r = module_rig.client.run(
        [*wrap_argv(conf, ["true"])], check=False, timeout=30, env=Netns.python_env()
    )
    assert r.returncode == 0, r.stderr
    assert not directory.exists(), "the stale directory was not removed"
    assert "removed what earlier runs left behind" in r.stderr, r.stderr
    assert "another wrapguard uses this private key" not in r.stderr, r.stderr


def test_command_substitution_returns_while_the_background_runs(
    module_rig: Rig, conf: Path
) -> None:
    """`out=$(wrapguard -- sh -c 'job >/dev/null &')`: the background launcher must not hold
    the caller's stdout open."""
    t0 = time.monotonic()
    r = module_rig.client.run(
        wrap_argv(conf, ["sh", "-c", "echo hi; sleep 6 >/dev/null 2>&1 &"]),
        check=False, timeout=30, env=Netns.python_env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout == "hi\n", r
    assert time.monotonic() - t0 < 4.0, "the caller waited for the background job"


def test_orphans_do_not_pile_up_as_zombies(module_rig: Rig, conf: Path) -> None:
    """The launcher is a subreaper: orphans come to it while the program still runs, and it
    must reap them then, not only at the end (a long-running wrapped shell would otherwise
    exhaust the user's process limit)."""
    script = "for i in $(seq 100); do (true &); done; echo spawned; sleep 4"
    proc = popen_wrapped(
        module_rig.client, conf, ["bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert read_line(proc, 20) == "spawned"
        time.sleep(1.0)
        found = _launcher_and_program(proc.pid)
        assert found is not None
        launcher = found[0]
        kids = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        zombies = [
            k for k in kids
            if Path(f"/proc/{k}/stat").exists()
            and Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        ]  # fmt: skip
        assert len(zombies) < 5, f"{len(zombies)} zombies under the launcher"
    finally:
        proc.kill()
        proc.wait()
