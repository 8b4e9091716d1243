#!/usr/bin/env bash
# wrapguard against a real WireGuard server (wireguard-go) in network namespaces. Needs root.
#
#   server ns: wireguard-go at 10.150.0.1 with `python3 -m http.server` behind it
#   client ns: no default route, only a veth to the server; wrapguard runs here, unprivileged
#              in spirit: no TUN, no kernel module, just LD_PRELOAD and one UDP socket
#
# 1. a wrapped curl in the client ns fetches the server's page through the tunnel;
# 2. a wrapped `python3 -m http.server` in the client ns is fetched from the server ns:
#    two servers talking to each other through WireGuard.
# Names are unique per run (WGDEMO_ID=6 hex digits to choose them); everything is removed on
# exit. Only 198.18.x veth addresses and 10.150.x tunnel addresses, inside the namespaces.
# PYTHON picks the interpreter that runs wrapguard (default: python3).

set -euo pipefail

say() { printf '%s\n' "$*"; }
die() { printf 'netns demo failed: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (it creates network namespaces); try: sudo $0"
for tool in ip wg wireguard-go curl python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
ID=${WGDEMO_ID:-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
[[ $ID =~ ^[0-9a-f]{6}$ ]] || die "WGDEMO_ID must be 6 hex digits"
SRV=wgdemo-$ID-server
CLI=wgdemo-$ID-client
VS=wgd${ID}s   # veth end in the server ns
VC=wgd${ID}c   # veth end in the client ns
WG=wgd${ID}w   # wireguard-go's interface (its control socket is shared by all namespaces)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wrapguard-netns-$ID.XXXXXX")
PIDS=()  # background processes; started with `ip netns exec` itself (it execs), so $! is theirs

cleanup() {
    local pid ns
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    # Anything still running inside our own namespaces (e.g. a wrapped child) goes too.
    for ns in "$CLI" "$SRV"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    done
    ip netns del "$CLI" 2>/dev/null || true
    ip netns del "$SRV" 2>/dev/null || true
    rm -f "/var/run/wireguard/$WG.sock"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_srv() { ip netns exec "$SRV" "$@"; }
in_cli() { ip netns exec "$CLI" "$@"; }

# Retry "$@" (quietly) for up to $1 seconds.
wait_for() {
    local limit=$1 t=0
    shift
    until "$@" >/dev/null 2>&1; do
        t=$((t + 1))
        [ "$t" -le $((limit * 5)) ] || return 1
        sleep 0.2
    done
}

say "wrapguard netns demo (run $ID): a wireguard-go server and wrapped programs, in namespaces."

# --- namespaces and the wire between them ----------------------------------------------------
ip netns add "$SRV"
ip netns add "$CLI"
ip link add "$VS" netns "$SRV" type veth peer name "$VC" netns "$CLI"
in_srv ip link set lo up
in_cli ip link set lo up
in_srv ip addr add 198.18.250.2/24 dev "$VS"
in_cli ip addr add 198.18.250.1/24 dev "$VC"
in_srv ip link set "$VS" up
in_cli ip link set "$VC" up
say "1. Namespaces $SRV and $CLI, joined by a veth (198.18.250.2 <-> .1);"
say "   the client namespace has no default route: a leak would fail, not go out."

# --- the WireGuard server ---------------------------------------------------------------------
umask 077
wg genkey >"$WORK/server.key"
wg genkey >"$WORK/client.key"
SERVER_PUB=$(wg pubkey <"$WORK/server.key")
CLIENT_PUB=$(wg pubkey <"$WORK/client.key")
WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 LOG_LEVEL=error \
    ip netns exec "$SRV" wireguard-go -f "$WG" </dev/null >"$WORK/wireguard-go.log" 2>&1 &
PIDS+=($!)
wait_for 10 test -S "/var/run/wireguard/$WG.sock" || die "wireguard-go did not start"
in_srv wg set "$WG" listen-port 51820 private-key "$WORK/server.key" \
    peer "$CLIENT_PUB" allowed-ips 10.150.0.2/32,fd15::2/128
in_srv ip addr add 10.150.0.1/24 dev "$WG"
in_srv ip addr add fd15::1/64 dev "$WG" nodad
in_srv ip link set "$WG" mtu 1420 up
mkdir -p "$WORK/www"
echo "Hello from the server namespace, behind wireguard-go." >"$WORK/www/index.html"
ip netns exec "$SRV" python3 -m http.server 8080 --bind 10.150.0.1 --directory "$WORK/www" \
    >"$WORK/server-http.log" 2>&1 &
PIDS+=($!)
wait_for 10 in_srv curl -sf http://10.150.0.1:8080/ || die "the server's http.server did not start"
say "2. wireguard-go is up in $SRV at 198.18.250.2:51820 (tunnel 10.150.0.1),"
say "   serving http://10.150.0.1:8080/ with python3 -m http.server."

# --- our side: a wg-quick config, no root needed from here on ---------------------------------
cat >"$WORK/client.conf" <<EOF
[Interface]
PrivateKey = $(cat "$WORK/client.key")
Address = 10.150.0.2/24, fd15::2/64

[Peer]
PublicKey = $SERVER_PUB
Endpoint = 198.18.250.2:51820
AllowedIPs = 10.150.0.0/24, fd15::/64
PersistentKeepalive = 25
EOF
say "3. Wrote the client config (0600): $WORK/client.conf"

say "4. In $CLI: wrapguard --config client.conf -- curl -sS http://10.150.0.1:8080/"
PAGE=$(in_cli "$PY" -m wrapguard --config "$WORK/client.conf" --log-level warn -- \
    curl -sS --max-time 20 http://10.150.0.1:8080/) || die "the wrapped curl failed"
say "   curl got: $PAGE"
[[ $PAGE == *"server namespace"* ]] || die "unexpected page from the server"

# --- the other way round: a wrapped server, fetched from the server namespace -----------------
mkdir -p "$WORK/ours"
echo "Hello from a wrapped python3 -m http.server in the client namespace." \
    >"$WORK/ours/index.html"
say "5. In $CLI: wrapguard --config client.conf -- python3 -m http.server 8000"
ip netns exec "$CLI" "$PY" -m wrapguard --config "$WORK/client.conf" --log-level warn -- \
    python3 -m http.server 8000 --directory "$WORK/ours" >"$WORK/wrapped-http.log" 2>&1 &
PIDS+=($!)
wait_for 20 in_srv curl -sf --max-time 2 http://10.150.0.2:8000/ \
    || die "the wrapped http.server was not reachable through the tunnel (see below)
$(tail -n 5 "$WORK/wrapped-http.log")"
BACK=$(in_srv curl -sS --max-time 10 http://10.150.0.2:8000/)
say "   From $SRV, curl http://10.150.0.2:8000/ got: $BACK"
[[ $BACK == *"wrapped python3"* ]] || die "unexpected page from the wrapped server"

HANDSHAKE=$(in_srv wg show "$WG" latest-handshakes | awk '{print $2}')
[ "${HANDSHAKE:-0}" != 0 ] || die "wireguard-go reports no handshake"
say "6. wireguard-go confirms a handshake with our key; both directions went through the tunnel."
say "7. Cleaning up: processes stopped, namespaces and temp files removed."
