#!/usr/bin/env bash
# Installs the Debian packages the tests need (wireguard-go, wg, ip, curl, node, ...) when they are
# missing. Runs only as root on a Debian-like system; otherwise says what is missing and goes on
# (the tests that need them then skip when not root, or fail with this same advice).
set -euo pipefail

need=()
command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
command -v wg >/dev/null 2>&1 || need+=(wireguard-tools)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)  # dig, host, nslookup
command -v aria2c >/dev/null 2>&1 || need+=(aria2)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v git >/dev/null 2>&1 || need+=(git)  # git over http through the HTTP proxy door
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v busybox >/dev/null 2>&1 || need+=(busybox-static)  # busybox ping: tests/tun
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)  # setpriv: tests/tun drops caps
[ -x /usr/sbin/sshd ] || need+=(openssh-server)  # the tests start their own sshd; none is enabled
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)  # the fast path seals with libcrypto
[ -x /usr/sbin/setcap ] || need+=(libcap2-bin)  # setcap: the file-capability tests
command -v nginx >/dev/null 2>&1 || need+=(nginx)  # reverse proxy in front of the stream relay
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v nft >/dev/null 2>&1 || need+=(nftables)  # drop UDP in a namespace (stream road tests)
command -v go >/dev/null 2>&1 || need+=(golang-go)  # Go test programs for the seccomp door
[ -x /bin/busybox ] || need+=(busybox-static)
command -v rclone >/dev/null 2>&1 || need+=(rclone)  # a real Go tool wrapped end to end
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v go >/dev/null 2>&1 || need+=(golang-go)  # the seccomp door's Go test programs
[ -x /usr/bin/busybox ] && file -L /usr/bin/busybox 2>/dev/null | grep -q 'statically linked' \
  || need+=(busybox-static)  # a static program for the seccomp door
command -v rclone >/dev/null 2>&1 || need+=(rclone)  # a real Go tool, wrapped end to end

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
    exit 0
fi
echo "install-system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Packages with a service (openssh-server) must not start it on this host: the tests start
# their own, in namespaces. policy-rc.d exit 101 tells invoke-rc.d "not now".
made_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
