#!/usr/bin/env bash
# Installs the Debian packages the tests need (wireguard-go, wg, ip, curl, node) when they are
# missing. Runs only as root on a Debian-like system; otherwise says what is missing and goes on
# (the tests that need them then skip when not root, or fail with this same advice).
set -euo pipefail

need=()
command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
command -v wg >/dev/null 2>&1 || need+=(wireguard-tools)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

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
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
