"""--doctor as a user runs it: real binaries, one line per check, exit 0/1."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrapguard.keys import PrivateKey

WG = [sys.executable, "-m", "wrapguard"]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WG, "--doctor", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_doctor_passes_curl() -> None:
    r = doctor("curl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(ln.startswith("doctor: ") for ln in r.stdout.splitlines())
    assert "[ok] shim" in r.stdout
    assert "dynamically linked" in r.stdout


def test_doctor_flags_static_ldconfig() -> None:
    r = doctor("/sbin/ldconfig", "--intercept", "preload")
    assert r.returncode == 1
    assert "statically linked" in r.stdout and "[FAIL] target" in r.stdout


def test_doctor_says_static_programs_get_the_seccomp_door() -> None:
    r = doctor("/sbin/ldconfig")
    assert r.returncode == 0, r.stdout
    assert "statically linked" in r.stdout and "seccomp door" in r.stdout, r.stdout


def test_doctor_flags_go_binaries() -> None:
    go = shutil.which("wireguard-go")
    assert go is not None, "wireguard-go is needed (make test installs it)"
    r = doctor(go, "--intercept", "preload")
    assert r.returncode == 1
    assert "Go program" in r.stdout


@pytest.fixture
def exec_dir() -> Iterator[Path]:
    """A world-readable directory on a mount that honours setuid bits and file capabilities
    (on a nosuid /tmp the kernel ignores them, and the doctor rightly says so)."""
    for base in (tempfile.gettempdir(), "/var/tmp", str(Path(__file__).resolve().parents[1])):
        if os.path.isdir(base) and not os.statvfs(base).f_flag & os.ST_NOSUID:
            d = Path(tempfile.mkdtemp(prefix="wg-doctor-", dir=base))
            d.chmod(0o755)
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
    pytest.fail("no directory on a mount without nosuid")


def copy_of(src: str, dst: Path, mode: int = 0o755, uid: int = 0) -> Path:
    shutil.copy(shutil.which(src) or src, dst)
    os.chown(dst, uid, uid)
    dst.chmod(mode)
    return dst


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def doctor_as_nobody(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NOBODY, *WG, "--doctor", str(target)],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip


@pytest.mark.root
def test_doctor_flags_setuid_and_setgid_to_another_id(exec_dir: Path) -> None:
    """A setuid bit that changes our effective uid puts the program in secure-execution mode
    (the loader ignores LD_PRELOAD); one naming our own uid changes nothing."""
    r = doctor(str(copy_of("true", exec_dir / "suid-nobody", 0o4755, uid=65534)))
    assert r.returncode == 1, r.stdout
    assert "[FAIL] target" in r.stdout and "is setuid to uid 65534" in r.stdout
    assert "secure-execution mode" in r.stdout and "a plain `cp`" in r.stdout
    assert "the shim can load into it" not in r.stdout
    r = doctor(str(copy_of("true", exec_dir / "sgid-nogroup", 0o2755, uid=65534)))
    assert r.returncode == 1 and "is setgid to gid 65534" in r.stdout, r.stdout
    r = doctor(str(copy_of("true", exec_dir / "suid-root", 0o4755)))  # root runs it: no change
    assert r.returncode == 0, r.stdout
    assert "the setuid bit, but runs in normal mode here (the bit names our own id)" in r.stdout


@pytest.mark.root
def test_doctor_flags_file_capabilities(exec_dir: Path) -> None:
    """A copy of curl with cap_net_bind_service=ep: secure-execution mode for any caller but
    root; an inheritable-only capability grants nothing to a caller without it."""
    setcap = shutil.which("setcap") or "/usr/sbin/setcap"
    assert os.path.exists(setcap), "setcap is installed by scripts/install-system-deps.sh"
    cap = copy_of("curl", exec_dir / "capcurl")
    subprocess.run([setcap, "cap_net_bind_service=ep", str(cap)], check=True, timeout=30)
    r = doctor_as_nobody(cap)
    assert r.returncode == 1, r.stdout + r.stderr
    [line] = [ln for ln in r.stdout.splitlines() if "] target:" in ln]
    assert line.startswith("doctor: [FAIL] target: ") and str(cap) in line, line
    assert "has file capabilities (cap_net_bind_service=ep)" in line, line
    assert "secure-execution mode" in line and "-- run a copy without them" in line, line
    r = doctor(str(cap))  # as root: the kernel keeps normal mode, LD_PRELOAD works
    assert r.returncode == 0, r.stdout
    assert "runs in normal mode here (we run as root)" in r.stdout
    inh = copy_of("curl", exec_dir / "inhcurl")
    subprocess.run([setcap, "cap_net_bind_service=i", str(inh)], check=True, timeout=30)
    r = doctor_as_nobody(inh)
    assert r.returncode == 0, r.stdout + r.stderr


def elf32_i386(path: Path) -> Path:
    """A 32-bit i386 ELF header asking for /lib/ld-linux.so.2 (a 64-bit shim cannot load in)."""
    interp = b"/lib/ld-linux.so.2\0"
    ehdr = struct.pack(
        "<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + bytes(9), 2, 3, 1, 0x8048000, 52, 0, 0,
        52, 32, 1, 0, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<IIIIIIII", 3, 84, 0x8048054, 0, len(interp), len(interp), 4, 1)
    path.write_bytes(ehdr + phdr + interp)
    path.chmod(0o755)
    return path


def test_doctor_flags_a_program_of_another_elf_class(tmp_path: Path) -> None:
    r = doctor(str(elf32_i386(tmp_path / "prog32")))
    assert r.returncode == 1, r.stdout
    assert "is a 32-bit i386 program and the shim is 64-bit" in r.stdout, r.stdout


def test_doctor_follows_script_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/usr/bin/env sh\necho hi\n")
    script.chmod(0o755)
    r = doctor(str(script))
    assert r.returncode == 0, r.stdout
    assert "script run by" in r.stdout


def test_doctor_missing_target() -> None:
    r = doctor("no-such-program-wrapguard")
    assert r.returncode == 1
    assert "not found" in r.stdout


def test_doctor_warns_without_dns_and_checks_config(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\nAddress = 10.150.0.2\n"
        f"[Peer]\nPublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "Endpoint = 127.0.0.1:51820\nAllowedIPs = 10.150.0.0/24\n"
    )
    conf.chmod(0o600)
    r = subprocess.run(
        [*WG, "--config", str(conf), "--doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[warn] dns" in r.stdout and "host resolver" in r.stdout
    assert "[ok] config" in r.stdout


def test_doctor_reports_broken_config(tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text("[Interface]\nAddress = 10.150.0.2\n")
    conf.chmod(0o600)
    r = subprocess.run(
        [*WG, "--config", str(conf), "--doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "[FAIL] config" in r.stdout and "PrivateKey" in r.stdout


def write_conf(path: Path, dns: bool) -> Path:
    path.write_text(
        f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\nAddress = 10.150.0.2\n"
        + ("DNS = 10.150.0.1\n" if dns else "")
        + f"[Peer]\nPublicKey = {PrivateKey.generate().public_key().to_base64()}\n"
        "Endpoint = 127.0.0.1:51820\nAllowedIPs = 10.150.0.0/24\n"
    )
    path.chmod(0o600)
    return path


def resolver_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in r.stdout.splitlines() if "] resolver:" in ln]


def test_doctor_reports_c_ares_and_what_dns_does_to_it(tmp_path: Path) -> None:
    aria2c, node = shutil.which("aria2c"), shutil.which("node")
    assert aria2c and node, "aria2c and node are installed by scripts/install-system-deps.sh"
    with_dns = write_conf(tmp_path / "dns.conf", dns=True)
    r = doctor(aria2c, "--config", str(with_dns))
    assert r.returncode == 0, r.stdout + r.stderr
    # aria2c links c-ares through libaria2: found by walking DT_NEEDED as the loader would.
    [line] = resolver_lines(r)
    assert "[ok] resolver" in line and "c-ares (libcares.so" in line and "via libaria2" in line
    assert "answered through the tunnel" in line
    r = doctor(node, "--config", str(write_conf(tmp_path / "plain.conf", dns=False)))
    [line] = resolver_lines(r)  # node carries c-ares inside its own binary
    assert "[warn] resolver" in line and "c-ares (built in)" in line, line
    assert "host resolver" in line and "outside the tunnel" in line, line
    r = doctor(aria2c)  # no config: both outcomes are spelled out
    [line] = resolver_lines(r)
    assert "with DNS=" in line and "without DNS=" in line, line


def test_doctor_reports_bind_tools_and_glibc_resolver_calls(tmp_path: Path) -> None:
    dig = shutil.which("dig")
    assert dig, "dig is installed by scripts/install-system-deps.sh (bind9-dnsutils)"
    [line] = resolver_lines(doctor(dig, "--config", str(write_conf(tmp_path / "c.conf", True))))
    assert "[ok] resolver" in line and "BIND 9's libdns" in line, line
    # A program calling res_query: answered inside libc, out of the shim's sight (a real leak).
    src = tmp_path / "resq.c"
    src.write_text(
        "#include <resolv.h>\nint main(void) {\n"
        '  unsigned char buf[512];\n  return res_query("x.test", 1, 1, buf, sizeof buf) < 0;\n}\n'
    )
    exe = tmp_path / "resq"
    subprocess.run(["cc", "-o", str(exe), str(src), "-lresolv"], check=True, timeout=60)
    [line] = resolver_lines(doctor(str(exe)))
    assert "[warn] resolver" in line and "res_query" in line and "outside the tunnel" in line
    assert resolver_lines(doctor(shutil.which("true") or "/bin/true")) == []


def test_file_capabilities_are_read_as_the_kernel_reads_them() -> None:
    """vfs_cap_data revisions 1-3 (linux/capability.h); what the kernel rejects is no caps."""
    from wrapguard.elf import parse_file_caps

    bind, raw = 1 << 10, 1 << 13  # cap_net_bind_service, cap_net_raw
    v2 = struct.pack("<IIIII", 0x02000001, bind | raw, 0, 0, 0)
    caps = parse_file_caps(v2)
    assert caps is not None and str(caps) == "cap_net_bind_service,cap_net_raw=ep"
    assert caps.grants(0)
    v3 = struct.pack("<IIIIII", 0x03000000, 0, bind, 1 << 8, 0, 1000)  # + root uid
    caps = parse_file_caps(v3)
    assert caps is not None and str(caps) == "cap_net_bind_service=i cap_checkpoint_restore=p"
    v1 = struct.pack("<III", 0x01000000, 0, bind)  # inheritable only: needs it in pI
    caps = parse_file_caps(v1)
    assert caps is not None and not caps.grants(0) and caps.grants(bind)
    empty = parse_file_caps(struct.pack("<IIIII", 0x02000000, 0, 0, 0, 0))
    assert empty is not None and not empty.grants(-1) and str(empty) == "none"
    only_e = parse_file_caps(struct.pack("<IIIII", 0x02000001, 0, 0, 0, 0))
    assert only_e is not None and only_e.grants(0) and str(only_e) == "=e"  # the flag alone
    assert parse_file_caps(b"\x00\x00\x00\x02\x01") is None  # short
    assert parse_file_caps(struct.pack("<III", 0x07000000, bind, 0)) is None  # unknown revision
