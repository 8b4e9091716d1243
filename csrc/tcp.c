/* wrapguard shim: the TCP hooks (docs/shim.md, docs/channel.md "One outbound TCP connect").
 *
 * Every hook falls through early to the real call when out of scope: the shim is inert
 * (WRAPGUARD_CTL unset), the socket is not AF_INET/AF_INET6 SOCK_STREAM, the destination is
 * loopback, or the fd carries no state of ours. errno is preserved on every path that does
 * not fail. In-scope connects fail closed (ENETUNREACH) when the channel is unreachable.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

#include "shim.h"

#define REAL(name)                                                             \
    do {                                                                       \
        if (wg_real.name == NULL && (wg_resolve(), wg_real.name == NULL)) {    \
            errno = ENOSYS;                                                    \
            return -1;                                                         \
        }                                                                      \
    } while (0)

/* Domain and type of a socket fd; -1 if not a socket. errno preserved. */
static int sock_kind(int fd, int *domain, int *type) {
    if (wg_real.getsockopt == NULL) return -1;
    int saved = errno;
    socklen_t l1 = sizeof *domain, l2 = sizeof *type;
    int r = (wg_real.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, domain, &l1) == 0 &&
             wg_real.getsockopt(fd, SOL_SOCKET, SO_TYPE, type, &l2) == 0)
                ? 0
                : -1;
    errno = saved;
    return r;
}

static int is_inet_stream(int fd, int *domain) {
    int type = 0;
    if (sock_kind(fd, domain, &type) != 0) return 0;
    return (*domain == AF_INET || *domain == AF_INET6) && type == SOCK_STREAM;
}

/* -- connect -------------------------------------------------------------------------------- */

/* Connect fd (temporarily non-blocking, so the 5 s deadline holds) to one loopback address. */
static int local_connect(int fd, const union wg_sa *sa, socklen_t len, long long deadline) {
    if (wg_real.connect(fd, &sa->sa, len) == 0) return 0;
    if (errno != EINPROGRESS && errno != EINTR && errno != EALREADY) return -1;
    /* On loopback the handshake is usually over when connect() returns: asking again says
     * so (0, or EISCONN) in one call instead of poll() and SO_ERROR; a failure shows too. */
    if (wg_real.connect(fd, &sa->sa, len) == 0 || errno == EISCONN) return 0;
    if (errno != EALREADY && errno != EINPROGRESS && errno != EINTR) return -1;
    int err = 0;
    socklen_t el = sizeof err;
    if (wg_wait_fd(fd, POLLOUT, deadline) != 0) return -1;
    if (wg_real.getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err != 0) return -1;
    return 0;
}

/* Steps 2 of docs/channel.md: connect the program's own fd to the launcher's loopback data
 * port and send the token. File status flags (fl: connect() read them) are restored
 * afterwards. */
static int local_attach(int fd, int fl, int domain, uint16_t port, const uint8_t token[16]) {
    if (!(fl & O_NONBLOCK) && wg_real.fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) return -1;
    long long deadline = wg_now_ms() + WG_CTL_TIMEOUT_MS;
    struct wg_addr lo = {.family = 4, .addr = {127, 0, 0, 1}, .port = port};
    union wg_sa sa;
    socklen_t len;
    int rc = -1;
    if (domain == AF_INET6) {
        struct wg_addr lo6 = {.family = 6, .addr = {[15] = 1}, .port = port};
        len = wg_addr_to_sockaddr(&lo6, AF_INET6, &sa);
        rc = local_connect(fd, &sa, len, deadline);
        int v6only = 0;
        socklen_t vl = sizeof v6only;
        if (rc != 0 &&
            wg_real.getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &vl) == 0 && !v6only) {
            len = wg_addr_to_sockaddr(&lo, AF_INET6, &sa); /* ::ffff:127.0.0.1 */
            rc = local_connect(fd, &sa, len, deadline);
        }
    } else {
        len = wg_addr_to_sockaddr(&lo, AF_INET, &sa);
        rc = local_connect(fd, &sa, len, deadline);
    }
    if (rc == 0) rc = wg_write_all(fd, token, 16, deadline);
    if (!(fl & O_NONBLOCK)) wg_real.fcntl(fd, F_SETFL, fl);
    return rc;
}

static int fail(int err) {
    errno = err;
    return -1;
}

/* The socket's local address (port 0: not bound yet); -1 if unknown. */
static int local_addr(int fd, struct wg_addr *a) {
    union wg_sa sa;
    socklen_t len = sizeof sa;
    if (wg_real.getsockname(fd, &sa.sa, &len) != 0) return -1;
    return wg_addr_from_sockaddr(&sa.sa, len, a);
}

/* Bind an unbound socket to the wildcard of its family, port 0 (what connect() would do) and
 * return the port it got, or 0. A socket bound to an address but no port yet
 * (IP_BIND_ADDRESS_NO_PORT) is left alone: binding again would lose the program's address. */
static uint16_t bind_any(int fd, int domain, const struct wg_addr *now) {
    static const uint8_t zeros[16];
    union wg_sa any;
    struct wg_addr got;
    if (memcmp(now->addr, zeros, sizeof zeros) != 0) return 0;
    memset(&any, 0, sizeof any); /* INADDR_ANY, in6addr_any */
    any.sa.sa_family = (sa_family_t)domain;
    if (wg_real.bind(fd, &any.sa, domain == AF_INET ? sizeof any.in : sizeof any.in6) != 0 ||
        local_addr(fd, &got) != 0)
        return 0;
    return got.port;
}

/* The gate of a non-blocking connect (docs/channel.md): the program's socket must not become
 * writable before the tunnel's outcome is known, or its own connect timeout (poll, then
 * SO_ERROR) could never fire. With TCP_NOTSENT_LOWAT at 1, a TCP socket is writable only while
 * none of its data waits unsent; the launcher does not read, and its small receive window
 * fills with filler bytes, so some filler stays unsent. When the tunnel connection opens, the
 * launcher discards exactly `filler` bytes (the GATE request says how many) and the socket
 * becomes writable; when it fails, the launcher resets the loopback connection and SO_ERROR
 * reports the real errno. Returns 1 when the gate holds. */
static int gate_fd(int fd, const uint8_t token[16], int *old_lowat) {
    static const uint8_t zeros[4096];
    int old = 0, one = 1, slack = WG_GATE_SLACK, shut = 0;
    socklen_t ol = sizeof old;
    uint32_t total = 0;
    /* Fill until WG_GATE_SLACK bytes wait unsent, then hold writability at 1 byte. Filling
     * to the first unsent byte only is not enough: the launcher's receive window grows as
     * segments arrive (Linux tcp_grow_window), and a window update after the last write could
     * still take the few bytes left (seen with dig, which sets TCP_MAXSEG 1220): the socket
     * would turn writable before the outcome is known. The slack is well past anything the
     * launcher's small receive buffer can take. */
    if (wg_real.getsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &old, &ol) == 0 &&
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &slack, sizeof slack) == 0) {
        while (total < WG_GATE_MAX) {
            ssize_t n = wg_real.sendto(fd, zeros, sizeof zeros, MSG_DONTWAIT | MSG_NOSIGNAL,
                                       NULL, 0);
            if (n > 0) {
                total += (uint32_t)n;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else {
                shut = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
                break;
            }
        }
        if (shut) shut = setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &one, sizeof one) == 0;
        /* Top up the last queued segment: the kernel appends a send to a tail segment with
         * room without checking the low-water mark, so the program's own early send() would
         * go through instead of EAGAIN (as the kernel answers before the connection is up). */
        while (shut && total < WG_GATE_MAX) {
            ssize_t n = wg_real.sendto(fd, zeros, sizeof zeros, MSG_DONTWAIT | MSG_NOSIGNAL,
                                       NULL, 0);
            if (n > 0)
                total += (uint32_t)n;
            else if (!(n < 0 && errno == EINTR))
                break;
        }
        if (!shut) setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &old, sizeof old);
    }
    uint8_t body[20];
    memcpy(body, token, 16);
    body[16] = (uint8_t)(total >> 24);
    body[17] = (uint8_t)(total >> 16);
    body[18] = (uint8_t)(total >> 8);
    body[19] = (uint8_t)total;
    *old_lowat = old;
    /* GATE is never answered (docs/channel.md): written, the next request on the connection
     * is served after it. Not written: the launcher never learns the count, the connection
     * cannot be used. */
    struct wg_ctl ctl;
    int rc = wg_ctl_begin(&ctl, WG_GATE, 0, body, sizeof body, NULL, WG_CTL_TIMEOUT_MS);
    wg_ctl_end(&ctl, 1);
    return rc != 0 ? -1 : shut;
}

/* -- a tunnelled fd's outcome: one small state machine ---------------------------------- *
 *   PENDING --open (0)-------------------------> OPEN     (final)
 *   PENDING --errno (>0)-----------------------> FAILED   (final, that errno)
 *   PENDING --channel lost (-2)----------------> FAILED   (final, ENETUNREACH: fail closed)
 *   PENDING --still pending (-1)---------------> PENDING
 * `st` is what wg_status() answers. Returns the next state; *err is 0 (OPEN), the errno
 * (FAILED) or -1 (PENDING). A final state never changes (*err -1). Pure: unit-tested
 * (tests/test_shim_contract.py). */
uint8_t wg_tunnel_next(uint8_t state, int st, int *err) {
    *err = -1;
    if (state != WG_PENDING || st == -1) return state;
    if (st == 0) {
        *err = 0;
        return WG_OPEN;
    }
    *err = st > 0 ? st : ENETUNREACH;
    return WG_FAILED;
}

/* Apply a STATUS answer to a pending fd (wg_tunnel_next); a fd that leaves PENDING gets the
 * program's own TCP_NOTSENT_LOWAT back if the gate held it. Returns *err of the transition. */
static int settle(int fd, struct wg_fd *s, int st) {
    int err;
    s->state = wg_tunnel_next(s->state, st, &err);
    if (s->state != WG_PENDING && s->gated) {
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &s->gate_lowat, sizeof s->gate_lowat);
        s->gated = 0;
    }
    return err;
}

/* connect() again on a tunnelled fd: EALREADY while pending, then EISCONN (as the kernel). */
static int reconnect(int fd, struct wg_fd *s) {
    if (s->state == WG_PENDING) {
        int err = settle(fd, s, wg_status(s->token, 0));
        if (err < 0) return fail(EALREADY);
        if (err > 0) return fail(err);
    }
    return fail(EISCONN);
}

WG_EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len) {
    REAL(connect);
    wg_init();
    int saved = errno, domain = 0, type = 0;
    struct wg_addr dst;
    int urc;
    /* One look at the socket's kind (SO_DOMAIN, SO_TYPE) decides: UDP's connect (udp.c, which
     * looks again), ours for an inet stream, the real call for anything else. */
    if (!wg_cfg.active || sock_kind(fd, &domain, &type) != 0) return wg_real.connect(fd, sa, len);
    if (type == SOCK_DGRAM && wg_udp_connect(fd, sa, len, &urc)) return urc; /* udp.c */
    if (type != SOCK_STREAM || (domain != AF_INET && domain != AF_INET6) ||
        wg_addr_from_sockaddr(sa, len, &dst) != 0 || wg_dst_is_local(&dst) ||
        sa->sa_family != domain)
        return wg_real.connect(fd, sa, len);
    struct wg_fd *s = wg_slot(fd);
    if (s != NULL && s->kind == WG_TUNNEL && s->state != WG_FAILED) return reconnect(fd, s);

    uint8_t body[24];
    uint32_t body_len = 20;
    body[0] = WG_PROTO_TCP;
    wg_addr_encode(&dst, body + 1);
    /* A port the program bound before connect() is kept through the tunnel. And the port our
     * loopback data connection will come from is announced: the launcher's data listener lets
     * no other port in, so another user's flood of it cannot delay us (docs/channel.md,
     * "Security"). An unbound socket is bound now, as connect() would; one that cannot be
     * (bound to an address with IP_BIND_ADDRESS_NO_PORT, out of ports) announces none. */
    struct wg_addr here;
    int known = local_addr(fd, &here) == 0;
    uint16_t src_port = known ? here.port : 0, lo_port = src_port;
    if (known && lo_port == 0) lo_port = bind_any(fd, domain, &here);
    if (lo_port != 0) {
        body[20] = (uint8_t)(src_port >> 8);
        body[21] = (uint8_t)src_port;
        body[22] = (uint8_t)(lo_port >> 8);
        body[23] = (uint8_t)lo_port;
        body_len = 24;
    }
    struct wg_reply rep;
    struct wg_ctl ctl;
    int fl = wg_real.fcntl(fd, F_GETFL);
    if (fl < 0) return fail(ENETUNREACH);
    /* Non-blocking: gated (GATE follows). Blocking: the outcome follows the TUNNEL reply on
     * the same control connection (CONNECT with WAIT: no STATUS request). */
    int gate = (fl & O_NONBLOCK) != 0;
    /* An AF_INET socket's data connection goes to 127.0.0.1 only (local_attach): the
     * launcher then updates the filter of that listener alone. */
    uint16_t flags = (uint16_t)((gate ? WG_FLAG_GATE : WG_FLAG_CONNECT_WAIT) |
                                (domain == AF_INET ? WG_FLAG_CONNECT_LO4 : 0));
    if (wg_ctl_begin(&ctl, WG_CONNECT, flags, body, body_len, &rep, WG_CTL_TIMEOUT_MS) != 0) {
        wg_ctl_end(&ctl, 1);
        return fail(ENETUNREACH); /* fail closed: never fall back to a direct connect */
    }
    struct wg_tunnel_reply tr;
    if (rep.action != WG_ACT_TUNNEL || wg_connect_reply_decode(&rep, &tr) != 0) {
        /* DIRECT and FAIL have no second frame; a TUNNEL we cannot read leaves one unread */
        wg_ctl_end(&ctl, rep.action != WG_ACT_TUNNEL);
        if (rep.action == WG_ACT_DIRECT) {
            errno = saved;
            return wg_real.connect(fd, sa, len);
        }
        return fail(rep.action == WG_ACT_FAIL && rep.err > 0 ? rep.err : ENETUNREACH);
    }
    if (gate) wg_ctl_end(&ctl, 1); /* GATE is a request of its own */
    if (local_attach(fd, fl, domain, tr.addr.port, tr.token) != 0) {
        wg_ctl_end(&ctl, 0); /* the outcome would still come: the connection is out of step */
        return fail(ENETUNREACH);
    }

    int lowat = 0, gated = gate ? gate_fd(fd, tr.token, &lowat) : 0;
    if (gated < 0) { /* fail closed: the launcher will drop this flow after its deadline */
        shutdown(fd, SHUT_RDWR);
        return fail(ENETUNREACH);
    }
    s = wg_slot_set(fd);
    if (s != NULL) {
        memcpy(s->token, tr.token, WG_TOKEN_LEN);
        memset(&s->peer, 0, sizeof s->peer);
        s->peer_len = len < sizeof s->peer ? len : (socklen_t)sizeof s->peer;
        memcpy(&s->peer, sa, s->peer_len);
        s->has_local = (uint8_t)tr.have_source;
        if (tr.have_source) s->local = tr.source;
        s->state = WG_PENDING;
        s->gated = (uint8_t)gated;
        s->gate_lowat = lowat;
        __atomic_store_n(&s->kind, WG_TUNNEL, __ATOMIC_RELEASE);
    } /* else beyond the table: tunnelled, but without getpeername/SO_ERROR state */
    if (gate) return fail(EINPROGRESS);

    /* STATUS's reply to the CONNECT: 0 open, or the errno of the failure */
    int st = -2;
    if (wg_ctl_next(&ctl, WG_STATUS, &rep, wg_cfg.status_timeout_ms) == 0 &&
        rep.action == WG_ST_DONE)
        st = rep.err;
    wg_ctl_end(&ctl, 1);
    int err;
    uint8_t next = wg_tunnel_next(WG_PENDING, st == -1 ? -2 : st, &err); /* never pending */
    if (s != NULL) s->state = next;
    if (err == 0) {
        errno = saved;
        return 0;
    }
    return fail(err);
}

/* -- SO_ERROR, getpeername, getsockname ------------------------------------------------------- */

WG_EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len) {
    REAL(getsockopt);
    struct wg_fd *s = wg_slot(fd);
    if (level != SOL_SOCKET || name != SO_ERROR || s == NULL || s->kind != WG_TUNNEL ||
        s->state != WG_PENDING)
        return wg_real.getsockopt(fd, level, name, val, len);
    int rc = wg_real.getsockopt(fd, level, name, val, len);
    if (rc != 0 || val == NULL || len == NULL || *len < sizeof(int)) return rc;
    int saved = errno;
    /* Gated: writability already waits for the outcome, so never block here: while pending,
     * report what the kernel says of a connecting socket (0). Not gated: wait for it. */
    int err = settle(fd, s, wg_status(s->token, s->gated && *(int *)val == 0 ? 0 : 1));
    if (err > 0) *(int *)val = err; /* pending: 0, open: what the loopback socket says */
    errno = saved;
    return 0;
}

/* The real peer is loopback: our state for this fd is current (not from a reused fd). */
static int real_peer_is_loopback(const union wg_sa *sa, socklen_t len) {
    struct wg_addr a;
    return wg_addr_from_sockaddr(&sa->sa, len, &a) == 0 && wg_addr_is_loopback(&a);
}

WG_EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    REAL(getpeername);
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL ||
        (s->kind != WG_TUNNEL && s->kind != WG_ACCEPTED && !(s->kind == WG_UDP && s->udp_conn)) ||
        addr == NULL || addrlen == NULL)
        return wg_real.getpeername(fd, addr, addrlen);
    int saved = errno;
    union wg_sa real;
    socklen_t rl = sizeof real;
    if (wg_real.getpeername(fd, &real.sa, &rl) != 0) return -1;
    if (!real_peer_is_loopback(&real, rl)) { /* stale state: the fd was reused behind us */
        wg_slot_clear(fd);
        wg_copy_out(addr, addrlen, &real, rl);
        return 0;
    }
    if (s->kind == WG_TUNNEL && s->state == WG_PENDING &&
        settle(fd, s, wg_status(s->token, 0)) != 0)
        return fail(ENOTCONN); /* the kernel says so while connecting, and after a failure */
    if (s->kind == WG_TUNNEL && s->state == WG_FAILED) return fail(ENOTCONN);
    wg_copy_out(addr, addrlen, &s->peer, s->peer_len);
    errno = saved;
    return 0;
}

WG_EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    REAL(getsockname);
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || !s->has_local || addr == NULL || addrlen == NULL)
        return wg_real.getsockname(fd, addr, addrlen);
    union wg_sa real, out;
    socklen_t rl = sizeof real;
    if (wg_real.getsockname(fd, &real.sa, &rl) != 0) return -1;
    if (real.sa.sa_family != AF_INET && real.sa.sa_family != AF_INET6) {
        wg_copy_out(addr, addrlen, &real, rl);
        return 0;
    }
    struct wg_addr local = s->local;
    if (s->kind != WG_TUNNEL && !(s->kind == WG_UDP && s->udp_conn)) {
        /* a rebound listener: the requested address, the real port */
        struct wg_addr r;
        if (wg_addr_from_sockaddr(&real.sa, rl, &r) == 0) local.port = r.port;
    }
    socklen_t ol = wg_addr_to_sockaddr(&local, real.sa.sa_family, &out);
    wg_copy_out(addr, addrlen, &out, ol);
    return 0;
}

/* -- bind, listen, accept ------------------------------------------------------------------- */

WG_EXPORT int bind(int fd, const struct sockaddr *sa, socklen_t len) {
    REAL(bind);
    wg_init();
    int domain = 0, urc;
    struct wg_addr a;
    if (wg_cfg.active && wg_udp_bind(fd, sa, len, &urc)) return urc; /* udp.c */
    if (!wg_cfg.active || wg_cfg.naddrs == 0 || wg_addr_from_sockaddr(sa, len, &a) != 0 ||
        !wg_addr_is_ours(&a) || !is_inet_stream(fd, &domain) || sa->sa_family != domain)
        return wg_real.bind(fd, sa, len);
    /* One of our tunnel addresses: the host does not have it, so bind the loopback address of
     * the same family (same port), never the wildcard: a service meant for the tunnel must not
     * be reachable from the host's networks. The launcher listens on the tunnel address and
     * relays over loopback. */
    union wg_sa any;
    memset(&any, 0, sizeof any);
    memcpy(&any, sa, domain == AF_INET ? sizeof any.in : sizeof any.in6);
    if (domain == AF_INET)
        any.in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else
        any.in6.sin6_addr = in6addr_loopback;
    int rc = wg_real.bind(fd, &any.sa, domain == AF_INET ? sizeof any.in : sizeof any.in6);
    struct wg_fd *s = wg_slot_set(fd);
    if (rc == 0 && s != NULL) {
        s->local = a;
        s->has_local = 1;
    }
    return rc;
}

WG_EXPORT int listen(int fd, int backlog) {
    REAL(listen);
    wg_init();
    int rc = wg_real.listen(fd, backlog);
    struct wg_fd *s = wg_slot(fd);
    int domain = 0;
    if (rc != 0 || !wg_cfg.active || s == NULL || s->kind == WG_LISTENER ||
        !is_inet_stream(fd, &domain))
        return rc;
    int saved = errno;
    union wg_sa real;
    socklen_t rl = sizeof real;
    struct wg_addr a;
    if (wg_real.getsockname(fd, &real.sa, &rl) == 0 &&
        wg_addr_from_sockaddr(&real.sa, rl, &a) == 0 &&
        (!wg_addr_is_loopback(&a) || s->has_local)) {
        if (s->has_local) {
            uint16_t port = a.port;
            a = s->local;
            a.port = port;
        }
        uint8_t body[20];
        body[0] = WG_PROTO_TCP;
        wg_addr_encode(&a, body + 1);
        int v6only = 0;
        socklen_t vl = sizeof v6only;
        if (domain == AF_INET6)
            wg_real.getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &vl);
        struct wg_reply rep;
        if (wg_ctl_request(WG_LISTEN, v6only ? WG_FLAG_V6ONLY : 0, body, sizeof body, &rep,
                           WG_CTL_TIMEOUT_MS) == 0 &&
            rep.err == 0) {
            s = wg_slot_set(fd);
            s->announced = a;
            __atomic_store_n(&s->kind, WG_LISTENER, __ATOMIC_RELEASE);
        }
    }
    errno = saved;
    return rc;
}

/* After a real accept on an announced listener: map a loopback peer to the tunnel client. */
static void map_peer(int lfd, int cfd, struct sockaddr *addr, socklen_t *addrlen,
                     const union wg_sa *real, socklen_t rl) {
    struct wg_fd *ls = wg_slot(lfd), *cs = wg_slot_set(cfd);
    struct wg_addr peer;
    int mapped = 0;
    if (cs != NULL) wg_slot_clear(cfd);
    if (ls != NULL && ls->kind == WG_LISTENER && real_peer_is_loopback(real, rl) &&
        wg_addr_from_sockaddr(&real->sa, rl, &peer) == 0) {
        uint8_t body[19];
        wg_addr_encode(&peer, body);
        struct wg_reply rep;
        struct wg_addr here;
        int have_here = 0;
        if (wg_ctl_request(WG_PEER, 0, body, sizeof body, &rep, WG_CTL_TIMEOUT_MS) == 0 &&
            wg_peer_reply_decode(&rep, &peer, &here, &have_here) == 0) {
            union wg_sa out;
            socklen_t ol = wg_addr_to_sockaddr(&peer, real->sa.sa_family, &out);
            if (cs != NULL) {
                cs->peer = out;
                cs->peer_len = ol;
                /* our tunnel address the client connected to, for getsockname() */
                cs->has_local = (uint8_t)have_here;
                if (have_here) cs->local = here;
                __atomic_store_n(&cs->kind, WG_ACCEPTED, __ATOMIC_RELEASE);
            }
            wg_copy_out(addr, addrlen, &out, ol);
            mapped = 1;
        }
    }
    if (!mapped) wg_copy_out(addr, addrlen, real, rl);
}

static int do_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags, int four) {
    struct wg_fd *ls = wg_slot(fd);
    if (ls == NULL || ls->kind != WG_LISTENER) {
        int c = four ? wg_real.accept4(fd, addr, addrlen, flags) : wg_real.accept(fd, addr, addrlen);
        if (c >= 0) wg_slot_clear(c);
        return c;
    }
    union wg_sa real;
    socklen_t rl = sizeof real;
    int c = four ? wg_real.accept4(fd, &real.sa, &rl, flags) : wg_real.accept(fd, &real.sa, &rl);
    if (c < 0) return c;
    int saved = errno;
    map_peer(fd, c, addr, addrlen, &real, rl);
    errno = saved;
    return c;
}

WG_EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *addrlen) {
    REAL(accept);
    return do_accept(fd, addr, addrlen, 0, 0);
}

WG_EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags) {
    REAL(accept4);
    return do_accept(fd, addr, addrlen, flags, 1);
}

/* -- fd bookkeeping: socket, close, dup ------------------------------------------------------- */

WG_EXPORT int socket(int domain, int type, int protocol) {
    REAL(socket);
    int fd = wg_real.socket(domain, type, protocol);
    if (fd >= 0) wg_slot_clear(fd); /* no state survives from an fd closed behind our back */
    return fd;
}

/* The last fd of this process announcing `a`? (dup'ed listeners share one announcement.) */
static int last_listener(int fd, const struct wg_addr *a) {
    int max = wg_slot_max();
    for (int i = 0; i <= max; i++) {
        struct wg_fd *o = wg_slot(i);
        if (i != fd && o != NULL && o->kind == WG_LISTENER &&
            memcmp(&o->announced, a, sizeof *a) == 0)
            return 0;
    }
    return 1;
}

WG_EXPORT int close(int fd) {
    REAL(close);
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || (s->kind == WG_NONE && !s->has_local && !s->udp_cache))
        return wg_real.close(fd);
    int unlisten = s->kind == WG_LISTENER && last_listener(fd, &s->announced);
    int release = s->kind == WG_UDP && wg_udp_closing(fd, s); /* udp.c */
    struct wg_addr a = s->announced, key = s->udp_key;
    wg_slot_clear(fd);
    int rc = wg_real.close(fd);
    if (release) wg_udp_release(&key);
    if (unlisten) {
        int saved = errno;
        uint8_t body[20];
        body[0] = WG_PROTO_TCP;
        wg_addr_encode(&a, body + 1);
        struct wg_reply rep;
        (void)wg_ctl_request(WG_UNLISTEN, 0, body, sizeof body, &rep, WG_CTL_TIMEOUT_MS);
        errno = saved;
    }
    return rc;
}

WG_EXPORT int dup(int fd) {
    REAL(dup);
    int nfd = wg_real.dup(fd);
    if (nfd >= 0) wg_slot_copy(fd, nfd);
    return nfd;
}

WG_EXPORT int dup2(int fd, int nfd) {
    REAL(dup2);
    int rc = wg_real.dup2(fd, nfd);
    if (rc >= 0 && rc != fd) wg_slot_copy(fd, rc);
    return rc;
}

WG_EXPORT int dup3(int fd, int nfd, int flags) {
    REAL(dup3);
    int rc = wg_real.dup3(fd, nfd, flags);
    if (rc >= 0) wg_slot_copy(fd, rc);
    return rc;
}

/* F_DUPFD and F_DUPFD_CLOEXEC duplicate too (Python's socket.dup() uses the latter). */
static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, void *arg) {
    int rc = real(fd, cmd, arg);
    if (rc >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) wg_slot_copy(fd, rc);
    return rc;
}

WG_EXPORT int fcntl(int fd, int cmd, ...) {
    REAL(fcntl);
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *); /* as glibc does: every fcntl argument fits a pointer */
    va_end(ap);
    return fcntl_common(wg_real.fcntl, fd, cmd, arg);
}

WG_EXPORT int fcntl64(int fd, int cmd, ...) {
    REAL(fcntl);
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(wg_real.fcntl64 ? wg_real.fcntl64 : wg_real.fcntl, fd, cmd, arg);
}
