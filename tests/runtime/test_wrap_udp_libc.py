"""End to end: UDP through the libc entry points that distro builds and odd programs use -
the _FORTIFY_SOURCE variants (__recvfrom_chk, __recv_chk, __read_chk) and readv/writev on a
connected socket. Before they were hooked, such a program received the relay's header and
token as data, from 127.0.0.1 (review of issue 11)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from rig.harness import Rig
from runtime.wraphelp import explain, run_wrapped

PROGRAM = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_in peer = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &peer.sin_addr);
    struct timeval tv = {.tv_sec = 5};
    char buf[256];
    size_t want = (size_t)strtol(argv[3], 0, 10); /* not a constant: the _chk variants */
    /* 1: sendto + fortified recvfrom */
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    sendto(s, "one", 3, 0, (struct sockaddr *)&peer, sizeof peer);
    struct sockaddr_in from;
    socklen_t fl = sizeof from;
    ssize_t n = recvfrom(s, buf, want, 0, (struct sockaddr *)&from, &fl);
    printf("recvfrom %zd %.*s %s\n", n, n > 0 ? (int)n : 0, buf, inet_ntoa(from.sin_addr));
    /* 2: connected: writev + readv, then write + fortified read */
    int c = socket(AF_INET, SOCK_DGRAM, 0);
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    connect(c, (struct sockaddr *)&peer, sizeof peer);
    struct iovec out[2] = {{"tw", 2}, {"o", 1}};
    writev(c, out, 2);
    char a[1], b[64];
    struct iovec in[2] = {{a, 1}, {b, sizeof b}};
    n = readv(c, in, 2);
    printf("readv %zd %c%.*s\n", n, a[0], n > 1 ? (int)n - 1 : 0, b);
    write(c, "three", 5);
    n = read(c, buf, want);
    printf("read %zd %.*s\n", n, n > 0 ? (int)n : 0, buf);
    return 0;
}
"""


def test_fortified_and_vector_calls_see_only_the_payload(module_rig: Rig, tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        pytest.fail("no C compiler: run `make test` (scripts/install-system-deps.sh)")
    src, exe = tmp_path / "u.c", tmp_path / "u"
    src.write_text(PROGRAM.replace("atoi", "(int)strtol").replace("(argv[2])", "(argv[2], 0, 10)"))
    subprocess.run(
        ["cc", "-O2", "-D_FORTIFY_SOURCE=2", "-include", "stdlib.h", "-o", str(exe), str(src)],
        check=True,
    )
    nm = subprocess.run(["nm", "-D", str(exe)], capture_output=True, text=True).stdout
    assert "__recvfrom_chk" in nm and "__read_chk" in nm, nm  # the build really is fortified
    rig = module_rig
    conf = rig.write_client_config(tmp_path / "c.conf")
    r = run_wrapped(rig.client, conf, [str(exe), rig.peer_tunnel_v4, str(rig.udp_echo_port), "200"])
    assert r.returncode == 0, explain(r)
    assert r.stdout.splitlines() == [
        f"recvfrom 3 one {rig.peer_tunnel_v4}",
        "readv 3 two",
        "read 5 three",
    ], explain(r)
