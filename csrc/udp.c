/* wrapguard shim: the UDP hooks (docs/shim.md, docs/channel.md "UDP").
 *
 * An AF_INET/AF_INET6 datagram socket sending to a non-loopback destination asks the launcher
 * once per destination (UDP_ASSOC): DIRECT -> the real call, FAIL -> -1/errno (fail closed),
 * TUNNEL -> the datagram goes to the launcher with a 21-byte header naming the real
 * destination, over the socket's data connection (a unix SOCK_SEQPACKET connection whose full
 * send buffer blocks the sender or gives EAGAIN, as the kernel would; the relay port only when
 * there is none). Datagrams from the loopback relay port carry a header naming the real
 * source; the receive hooks strip it. The program's socket stays a real UDP socket (poll/epoll
 * see replies). errno is preserved on every path that does not fail; no malloc anywhere.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shim.h"

#define REAL(name)                                                             \
    do {                                                                       \
        if (wg_real.name == NULL && (wg_resolve(), wg_real.name == NULL)) {    \
            errno = ENOSYS;                                                    \
            return -1;                                                         \
        }                                                                      \
    } while (0)

#define HDR_LEN 21 /* u8 version | u8 kind | 19-byte address */
#define HDR_IN_LEN 37 /* from the relay: the same, then the association's 16-byte token */
#define KIND_DATA 0
#define KIND_ERROR 1
#define MAX_IOV 128 /* iovecs per datagram we handle (the copy lives on the stack) */

static int fail(int err) {
    errno = err;
    return -1;
}

/* The socket's domain when it is an AF_INET/AF_INET6 datagram socket, else 0. errno kept. */
static int inet_dgram(int fd) {
    if (wg_real.getsockopt == NULL) return 0;
    int saved = errno, domain = 0, type = 0;
    socklen_t l1 = sizeof domain, l2 = sizeof type;
    int ok = wg_real.getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &l1) == 0 &&
             wg_real.getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l2) == 0 &&
             type == SOCK_DGRAM && (domain == AF_INET || domain == AF_INET6);
    errno = saved;
    return ok ? domain : 0;
}

static int is_udp(const struct wg_fd *s) { return s != NULL && s->kind == WG_UDP; }

static int same_addr(const struct wg_addr *a, const struct wg_addr *b) {
    return a->family == b->family && a->port == b->port &&
           memcmp(a->addr, b->addr, a->family == 4 ? 4 : 16) == 0;
}

/* The relay's address as seen from a socket of `domain`, and the family of the loopback side
 * the launcher then sees (the association key). -1 if this socket cannot reach the relay. */
static int relay_addr(int fd, int domain, union wg_sa *sa, socklen_t *len, uint8_t *key_family) {
    struct wg_addr lo = {.family = 4, .addr = {127, 0, 0, 1}, .port = wg_cfg.udp_port};
    if (wg_cfg.udp_port == 0) return -1;
    if (domain == AF_INET6) {
        if (wg_cfg.udp_v6) {
            struct wg_addr lo6 = {.family = 6, .addr = {[15] = 1}, .port = wg_cfg.udp_port};
            *len = wg_addr_to_sockaddr(&lo6, AF_INET6, sa);
            *key_family = 6;
            return 0;
        }
        int v6only = 0;
        socklen_t vl = sizeof v6only;
        if (wg_real.getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &vl) != 0 || v6only)
            return -1;
    }
    *len = wg_addr_to_sockaddr(&lo, domain, sa); /* ::ffff:127.0.0.1 on a dual-stack socket */
    *key_family = 4;
    return 0;
}

/* From the relay: exactly 127.0.0.1 or ::1 (as the launcher binds them) at the relay's port.
 * Not any 127/8 address: another user may bind 127.0.0.2 at that port number. */
static int from_relay(const union wg_sa *sa, socklen_t len) {
    static const uint8_t v4lo[4] = {127, 0, 0, 1};
    struct wg_addr a;
    if (wg_cfg.udp_port == 0 || wg_addr_from_sockaddr(&sa->sa, len, &a) != 0 ||
        a.port != wg_cfg.udp_port)
        return 0;
    return a.family == 4 ? memcmp(a.addr, v4lo, 4) == 0 : wg_addr_is_loopback(&a);
}

/* The socket's loopback side (what the launcher sees): bind the wildcard first if unbound
 * (the kernel would autobind on the first send anyway). */
static int loopback_side(int fd, int domain, struct wg_addr *key) {
    union wg_sa sa;
    socklen_t len = sizeof sa;
    struct wg_addr a;
    if (wg_real.getsockname(fd, &sa.sa, &len) != 0 || wg_addr_from_sockaddr(&sa.sa, len, &a) != 0)
        return -1;
    if (a.port == 0) {
        union wg_sa any;
        memset(&any, 0, sizeof any);
        any.sa.sa_family = (sa_family_t)domain;
        if (wg_real.bind(fd, &any.sa, domain == AF_INET ? sizeof any.in : sizeof any.in6) != 0)
            return -1;
        len = sizeof sa;
        if (wg_real.getsockname(fd, &sa.sa, &len) != 0 ||
            wg_addr_from_sockaddr(&sa.sa, len, &a) != 0)
            return -1;
    }
    union wg_sa relay;
    socklen_t rl;
    uint8_t fam;
    if (relay_addr(fd, domain, &relay, &rl, &fam) != 0) return -1;
    memset(key, 0, sizeof *key);
    key->family = fam;
    if (fam == 4) {
        key->addr[0] = 127;
        key->addr[3] = 1;
    } else {
        key->addr[15] = 1;
    }
    key->port = a.port;
    return 0;
}

/* -- the data connection: program -> launcher with the kernel's flow control -------------- *
 * One SOCK_SEQPACKET connection per associated socket to udp.sock in the launcher's private
 * directory, opened on the first tunnelled send; its first record is the association's token,
 * answered by one byte 0 (EOF: unknown token). Every later record is one datagram: header +
 * payload. The fd is ours: high, close-on-exec, blocking, with the program socket's SO_SNDBUF
 * and SO_SNDTIMEO, and its slot says WG_UDPDATA + the token, so that a program that closed or
 * dup2()ed over it is noticed (docs/shim.md). A fork()ed child shares it: records are atomic. */

/* s's data connection while it is still ours, else -1. */
static int data_valid(const struct wg_fd *s) {
    int d = __atomic_load_n(&s->udp_data, __ATOMIC_ACQUIRE) - 1;
    const struct wg_fd *ds = wg_slot(d);
    if (ds == NULL || __atomic_load_n(&ds->kind, __ATOMIC_ACQUIRE) != WG_UDPDATA ||
        memcmp(ds->udp_token, s->udp_token, 16) != 0)
        return -1;
    return d;
}

static void data_close(int d) {
    int saved = errno;
    wg_slot_clear(d);
    wg_real.close(d);
    errno = saved;
}

/* The program socket's send buffer and send timeout, on its data connection. A UDP socket's
 * SO_SNDBUF is what setsockopt doubled; so is the unix socket's: set half of it. */
static void data_mirror(int fd, int d) {
    int sb = 0;
    socklen_t sl = sizeof sb;
    if (wg_real.getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sb, &sl) == 0 && sb > 0) {
        int half = sb / 2;
        if (wg_real.setsockopt(d, SOL_SOCKET, SO_SNDBUFFORCE, &half, sizeof half) != 0)
            wg_real.setsockopt(d, SOL_SOCKET, SO_SNDBUF, &half, sizeof half);
    }
    struct timeval tv;
    socklen_t tl = sizeof tv;
    if (wg_real.getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &tl) == 0)
        wg_real.setsockopt(d, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Open s's data connection: its fd, -1 if the launcher does not know the token (the
 * association is gone), -2 if there can be none (no udp.sock, out of fds): use the relay. */
static int data_open(int fd, struct wg_fd *s) {
    if (wg_cfg.udp_data_len == 0) return -2;
    int saved = errno;
    int u = wg_real.socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (u < 0) { /* out of fds or memory, for now: this send fails, the next one tries again */
        errno = saved;
        return -1;
    }
    wg_slot_clear(u);
    /* Blocking, but never longer than a control request for the connect, token and answer. */
    struct timeval tv = {.tv_sec = WG_CTL_TIMEOUT_MS / 1000, .tv_usec = 0};
    wg_real.setsockopt(u, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    wg_real.setsockopt(u, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int rc = -1, r; /* any failure from here is for this attempt only (a slow launcher) */
    do {
        r = wg_real.connect(u, (const struct sockaddr *)&wg_cfg.udp_data, wg_cfg.udp_data_len);
    } while (r != 0 && errno == EINTR);
    if (r == 0 && !wg_peer_is_launcher(u)) r = -1; /* never hand the token to anyone else */
    ssize_t w = -1, n = -1;
    uint8_t ack = 1;
    if (r == 0) {
        do {
            w = wg_real.send(u, s->udp_token, 16, MSG_NOSIGNAL);
        } while (w < 0 && errno == EINTR);
    }
    if (w == 16) {
        do {
            n = wg_real.recv(u, &ack, 1, 0);
        } while (n < 0 && errno == EINTR);
    }
    if (r != 0 || n == 0 || (n == 1 && ack != 0)) rc = -1; /* refused, or the launcher is gone */
    if (n != 1 || ack != 0) {
        wg_real.close(u);
        errno = saved;
        return rc;
    }
    data_mirror(fd, u);
    u = wg_move_high(u);
    struct wg_fd *ds = wg_slot_set(u);
    if (ds == NULL) { /* beyond the table: it could not be told from a reused number */
        wg_real.close(u);
        errno = saved;
        return -2;
    }
    wg_slot_clear(u);
    memcpy(ds->udp_token, s->udp_token, 16);
    __atomic_store_n(&ds->kind, WG_UDPDATA, __ATOMIC_RELEASE);
    errno = saved;
    return u;
}

/* A new token for s (UDP_ASSOC, LISTEN): another association's data connection goes. */
static void set_token(struct wg_fd *s, const uint8_t token[16]) {
    if (s->kind == WG_UDP && memcmp(s->udp_token, token, 16) == 0) return;
    if (s->kind == WG_UDP) {
        int d = data_valid(s);
        if (d >= 0) data_close(d);
    }
    __atomic_store_n(&s->udp_data, 0, __ATOMIC_RELEASE);
    memcpy(s->udp_token, token, 16);
}

/* One datagram on s's data connection (v[0] is the 21-byte header): 1 sent or failed as the
 * kernel would fail it (*ret), 0 none to use (the relay port then), -1 the launcher refused
 * the token. Blocks like the program's socket: MSG_DONTWAIT or O_NONBLOCK give EAGAIN. */
static int data_send(int fd, struct wg_fd *s, const struct iovec *v, size_t vlen, int flags,
                     ssize_t *ret) {
    int seen = __atomic_load_n(&s->udp_data, __ATOMIC_ACQUIRE);
    if (seen == -1) return 0;
    int d = data_valid(s);
    for (int retry = 1;; retry = 0) {
        if (d < 0) {
            d = data_open(fd, s);
            if (d == -2) {
                __atomic_store_n(&s->udp_data, -1, __ATOMIC_RELEASE);
                return 0;
            }
            if (d == -1) return -1;
            /* Another thread may have opened one meanwhile: keep the first. */
            if (!__atomic_compare_exchange_n(&s->udp_data, &seen, d + 1, 0, __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE)) {
                data_close(d);
                d = data_valid(s);
                if (d < 0) return 0;
            }
        }
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = (struct iovec *)v;
        m.msg_iovlen = vlen;
        /* Without waiting first: there is room nearly always, and then whether the program's
         * socket blocks does not matter (no fcntl per datagram). Full: wait only if it does. */
        ssize_t n = wg_real.sendmsg(d, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !(flags & MSG_DONTWAIT)) {
            int fl = wg_real.fcntl(fd, F_GETFL);
            if (fl >= 0 && !(fl & O_NONBLOCK)) n = wg_real.sendmsg(d, &m, MSG_NOSIGNAL);
            else errno = EAGAIN;
        }
        if (n >= 0) {
            *ret = n >= HDR_LEN ? n - HDR_LEN : 0;
            return 1;
        }
        int e = errno;
        if (!retry || (e != EPIPE && e != ECONNRESET && e != ENOTCONN && e != EBADF &&
                       e != ENOTSOCK && e != ECONNREFUSED)) {
            *ret = -1;
            return 1;
        }
        /* Gone: the launcher closed it (the association was released) or the program closed
         * our fd behind our back (EBADF, ENOTSOCK: then the number is not ours to close). */
        if (e == EBADF || e == ENOTSOCK) {
            wg_slot_clear(d);
        } else {
            data_close(d);
        }
        seen = d + 1;
        if (__atomic_compare_exchange_n(&s->udp_data, &seen, 0, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            seen = 0;
        d = -1;
    }
}

/* Route `dst` for fd: 0 DIRECT, 1 TUNNEL (fd is now WG_UDP; *src = our tunnel source when
 * asked), or -errno. One UDP_ASSOC per new destination (cached per fd). */
static int udp_route(int fd, int domain, const struct wg_addr *dst, struct wg_addr *src) {
    struct wg_fd *s = wg_slot(fd);
    if (s != NULL && s->udp_cache != WG_UC_NONE && same_addr(&s->udp_last, dst)) {
        if (s->udp_cache == WG_UC_DIRECT) return 0;
        if (s->kind == WG_UDP && src == NULL) return 1;
    }
    struct wg_addr key;
    int have_key = loopback_side(fd, domain, &key) == 0;
    if (!have_key) { /* no relay reachable: port 0 asks for the route only (DIRECT works) */
        struct wg_addr none = {.family = 4, .addr = {127, 0, 0, 1}, .port = 0};
        key = none;
    }
    uint8_t body[38];
    wg_addr_encode(&key, body);
    wg_addr_encode(dst, body + 19);
    struct wg_reply rep;
    if (wg_ctl_request(WG_UDP_ASSOC, 0, body, sizeof body, &rep, WG_CTL_TIMEOUT_MS) != 0)
        return -ENETUNREACH; /* fail closed */
    s = wg_slot_set(fd);
    if (rep.action == WG_ACT_DIRECT) {
        if (s != NULL) {
            s->udp_last = *dst;
            s->udp_cache = WG_UC_DIRECT;
        }
        return 0;
    }
    struct wg_tunnel_reply tr;
    if (rep.action != WG_ACT_TUNNEL || !have_key)
        return -(rep.err > 0 ? rep.err : ENETUNREACH);
    if (wg_assoc_reply_decode(&rep, &tr) != 0) return -ENETUNREACH;
    if (src != NULL) *src = tr.addr;
    if (s == NULL) return -ENETUNREACH; /* beyond the table: no state, fail closed */
    s->udp_key = key;
    set_token(s, tr.token);
    s->udp_domain = domain == AF_INET ? 4 : 6;
    s->udp_pid = (int)getpid();
    s->udp_last = *dst;
    s->udp_cache = WG_UC_TUNNEL;
    __atomic_store_n(&s->kind, WG_UDP, __ATOMIC_RELEASE);
    return 1;
}

/* One datagram to the launcher: header + the caller's iovecs (control messages dropped), on
 * the data connection (there is no other way in). */
static ssize_t relay_send(int fd, struct wg_fd *s, const struct wg_addr *dst,
                          const struct iovec *iov, size_t iovlen, int flags) {
    if (iovlen >= MAX_IOV) return fail(EMSGSIZE);
    int domain = s->udp_domain == 4 ? AF_INET : AF_INET6;
    uint8_t hdr[HDR_LEN];
    hdr[0] = 1;
    hdr[1] = KIND_DATA;
    wg_addr_encode(dst, hdr + 2);
    struct iovec v[MAX_IOV];
    v[0].iov_base = hdr;
    v[0].iov_len = HDR_LEN;
    for (size_t i = 0; i < iovlen; i++) v[i + 1] = iov[i];
    ssize_t sent;
    int r = data_send(fd, s, v, iovlen + 1, flags, &sent);
    if (r < 0) { /* the association is gone (its process released it): associate again */
        struct wg_addr to = *dst;
        s->udp_cache = WG_UC_NONE;
        int act = udp_route(fd, domain, &to, NULL);
        if (act != 1) return fail(act < 0 ? -act : ENETUNREACH);
        s = wg_slot(fd);
        r = data_send(fd, s, v, iovlen + 1, flags, &sent);
        if (r < 0) return fail(ENETUNREACH);
    }
    if (r > 0) return sent;
    /* No data connection could be had: fail closed. (Never the relay's UDP port: after the
     * launcher is gone, another user may hold it; docs/channel.md, "UDP".) */
    return fail(ENETUNREACH);
}

/* A send on fd: 1 handled (*ret set), 0 not ours (make the real call). */
static int udp_out(int fd, const struct sockaddr *sa, socklen_t salen, const struct iovec *iov,
                   size_t iovlen, int flags, ssize_t *ret) {
    wg_init();
    if (!wg_cfg.active) return 0;
    struct wg_fd *s = wg_slot(fd);
    if (sa == NULL) { /* connected send */
        if (s == NULL || s->kind != WG_UDP || !s->udp_conn) return 0;
        int saved = errno;
        *ret = relay_send(fd, s, &s->udp_peer, iov, iovlen, flags);
        if (*ret >= 0) errno = saved;
        return 1;
    }
    struct wg_addr dst;
    if (wg_addr_from_sockaddr(sa, salen, &dst) != 0 || wg_dst_is_local(&dst)) return 0;
    int cached = s != NULL && s->udp_cache != WG_UC_NONE && same_addr(&s->udp_last, &dst);
    if (cached && s->udp_cache == WG_UC_DIRECT) return 0; /* hot path: no syscall, no request */
    int domain = is_udp(s) ? (s->udp_domain == 4 ? AF_INET : AF_INET6) : inet_dgram(fd);
    if (domain == 0) return 0;
    if (domain == AF_INET && sa->sa_family != AF_INET) return 0; /* the kernel's error */
    int saved = errno;
    int act = udp_route(fd, domain, &dst, NULL);
    if (act == 0) {
        errno = saved;
        return 0;
    }
    if (act < 0) {
        *ret = fail(-act);
        return 1;
    }
    *ret = relay_send(fd, wg_slot(fd), &dst, iov, iovlen, flags);
    if (*ret >= 0) errno = saved;
    return 1;
}

/* TCP Fast Open (sendto/sendmsg with MSG_FASTOPEN) is an implicit connect(): route it
 * through the connect hook, then send normally. 1 handled. */
static int fastopen(int fd, const struct sockaddr *sa, socklen_t salen, int flags,
                    const struct iovec *iov, size_t iovlen, ssize_t *ret) {
    struct wg_addr dst;
    if (!(flags & MSG_FASTOPEN) || sa == NULL || !wg_cfg.active ||
        wg_addr_from_sockaddr(sa, salen, &dst) != 0 || wg_dst_is_local(&dst))
        return 0;
    if (connect(fd, sa, salen) != 0) {
        *ret = -1;
        return 1;
    }
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = (struct iovec *)iov;
    m.msg_iovlen = iovlen;
    *ret = wg_real.sendmsg(fd, &m, flags & ~MSG_FASTOPEN);
    return 1;
}

/* A tunnelled TCP fd whose loopback connection was reset by the launcher: the tunnel flow
 * died, and STATUS says why (ETIMEDOUT after unanswered retransmissions or zero-window
 * probes, EHOSTUNREACH, ...). Report that instead of the loopback's ECONNRESET/EPIPE, as the
 * kernel would. Only on this error path; `r` and errno pass through otherwise. */
static ssize_t tcp_err(int fd, ssize_t r) {
    if (r >= 0 || (errno != ECONNRESET && errno != EPIPE)) return r;
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || s->kind != WG_TUNNEL || s->state != WG_OPEN) return r;
    int saved = errno, st = wg_status(s->token, 0);
    errno = (st == ETIMEDOUT || st == EHOSTUNREACH || st == ENETUNREACH) ? st : saved;
    return r;
}

WG_EXPORT ssize_t sendto(int fd, const void *buf, size_t len, int flags,
                         const struct sockaddr *sa, socklen_t salen) {
    REAL(sendto);
    if (wg_real.sendmsg == NULL) return wg_real.sendto(fd, buf, len, flags, sa, salen);
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    ssize_t ret;
    if (udp_out(fd, sa, salen, &iov, 1, flags, &ret)) return ret;
    if (fastopen(fd, sa, salen, flags, &iov, 1, &ret)) return ret;
    return tcp_err(fd, wg_real.sendto(fd, buf, len, flags, sa, salen));
}

WG_EXPORT ssize_t send(int fd, const void *buf, size_t len, int flags) {
    REAL(send);
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || s->kind != WG_UDP || !s->udp_conn)
        return tcp_err(fd, wg_real.send(fd, buf, len, flags));
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    ssize_t ret;
    if (udp_out(fd, NULL, 0, &iov, 1, flags, &ret)) return ret;
    return wg_real.send(fd, buf, len, flags);
}

WG_EXPORT ssize_t write(int fd, const void *buf, size_t len) {
    REAL(write);
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || s->kind != WG_UDP || !s->udp_conn) return tcp_err(fd, wg_real.write(fd, buf, len));
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    ssize_t ret;
    if (udp_out(fd, NULL, 0, &iov, 1, 0, &ret) && !(ret < 0 && errno == ENOTSOCK)) return ret;
    wg_slot_clear(fd); /* stale state: the fd was closed behind our back and reused */
    return wg_real.write(fd, buf, len);
}

WG_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    REAL(sendmsg);
    ssize_t ret;
    if (msg == NULL) return wg_real.sendmsg(fd, msg, flags);
    const struct sockaddr *sa = msg->msg_name;
    if (udp_out(fd, sa, msg->msg_namelen, msg->msg_iov, msg->msg_iovlen, flags, &ret)) return ret;
    if (fastopen(fd, sa, msg->msg_namelen, flags, msg->msg_iov, msg->msg_iovlen, &ret)) return ret;
    return tcp_err(fd, wg_real.sendmsg(fd, msg, flags));
}

WG_EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags) {
    REAL(sendmmsg);
    wg_init();
    if (!wg_cfg.active || vec == NULL || n == 0) return wg_real.sendmmsg(fd, vec, n, flags);
    struct wg_fd *s = wg_slot(fd);
    int ours = s != NULL && s->kind == WG_UDP;
    for (unsigned int i = 0; !ours && i < n; i++) {
        struct wg_addr dst;
        const struct sockaddr *sa = vec[i].msg_hdr.msg_name;
        if (sa != NULL && wg_addr_from_sockaddr(sa, vec[i].msg_hdr.msg_namelen, &dst) == 0 &&
            !wg_dst_is_local(&dst))
            ours = 1;
    }
    if (!ours) return wg_real.sendmmsg(fd, vec, n, flags);
    unsigned int i = 0;
    for (; i < n; i++) { /* one at a time through the sendmsg hook */
        ssize_t r = sendmsg(fd, &vec[i].msg_hdr, flags);
        if (r < 0) return i == 0 ? -1 : (int)i;
        vec[i].msg_len = (unsigned int)r;
    }
    return (int)i;
}

/* -- receive ---------------------------------------------------------------------------------- */

/* Undo the header split for a datagram that did not come from the relay: its first bytes
 * landed in `hdr`; move them back in front of the rest in the caller's iovecs. */
static void unsplit(const uint8_t *hdr, size_t got, const struct iovec *iov, size_t iovlen,
                    size_t total) {
    size_t hlen = got < HDR_IN_LEN ? got : HDR_IN_LEN;
    size_t rest = got - hlen; /* bytes already in the caller's buffers, at offset 0 */
    size_t keep = rest + hlen > total ? (total > hlen ? total - hlen : 0) : rest;
    /* Shift `keep` bytes right by hlen across the iovecs (backwards), then put hdr in front. */
    for (size_t k = keep; k-- > 0;) {
        size_t from = k, to = k + hlen;
        size_t fi = 0, ti = 0;
        while (fi < iovlen && from >= iov[fi].iov_len) from -= iov[fi++].iov_len;
        while (ti < iovlen && to >= iov[ti].iov_len) to -= iov[ti++].iov_len;
        if (fi < iovlen && ti < iovlen)
            ((uint8_t *)iov[ti].iov_base)[to] = ((uint8_t *)iov[fi].iov_base)[from];
    }
    size_t put = hlen < total ? hlen : total;
    for (size_t k = 0, i = 0, off = 0; k < put && i < iovlen; k++) {
        while (i < iovlen && off >= iov[i].iov_len) {
            i++;
            off = 0;
        }
        if (i < iovlen) ((uint8_t *)iov[i].iov_base)[off++] = hdr[k];
    }
}

static void put_name(struct msghdr *msg, const union wg_sa *sa, socklen_t len) {
    if (msg->msg_name == NULL) return;
    socklen_t n = msg->msg_namelen < len ? msg->msg_namelen : len;
    memcpy(msg->msg_name, sa, n);
    msg->msg_namelen = len;
}

/* recvmsg on a WG_UDP fd: strip the relay's header and report the real source. */
static ssize_t udp_in(int fd, struct wg_fd *s, struct msghdr *msg, int flags) {
    if (msg->msg_iovlen >= MAX_IOV) return wg_real.recvmsg(fd, msg, flags);
    size_t total = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++) total += msg->msg_iov[i].iov_len;
    int domain = s->udp_domain == 4 ? AF_INET : AF_INET6;
    for (;;) {
        uint8_t hdr[HDR_IN_LEN];
        struct iovec v[MAX_IOV];
        v[0].iov_base = hdr;
        v[0].iov_len = HDR_IN_LEN;
        for (size_t i = 0; i < msg->msg_iovlen; i++) v[i + 1] = msg->msg_iov[i];
        union wg_sa from;
        struct msghdr m = *msg;
        m.msg_name = &from;
        m.msg_namelen = sizeof from;
        m.msg_iov = v;
        m.msg_iovlen = msg->msg_iovlen + 1;
        ssize_t n = wg_real.recvmsg(fd, &m, flags & ~MSG_TRUNC);
        if (n < 0) return -1;
        msg->msg_controllen = m.msg_controllen;
        msg->msg_flags = m.msg_flags;
        if (!from_relay(&from, m.msg_namelen)) { /* real loopback traffic: pass it unchanged */
            unsplit(hdr, (size_t)n, msg->msg_iov, msg->msg_iovlen, total);
            put_name(msg, &from, m.msg_namelen);
            if (!(m.msg_flags & MSG_TRUNC) && (size_t)n <= total) return n;
            msg->msg_flags |= MSG_TRUNC;
            return (ssize_t)((size_t)n < total ? (size_t)n : total);
        }
        struct wg_addr src;
        /* The token proves the launcher sent it: whoever holds the relay's port after the
         * launcher is gone cannot forge tunnel datagrams (docs/channel.md, "UDP"). */
        int ok = n >= HDR_IN_LEN && hdr[0] == 1 && wg_addr_decode(hdr + 2, &src) == 0 &&
                 memcmp(hdr + HDR_LEN, s->udp_token, 16) == 0;
        int drop = !ok || (s->udp_conn && !same_addr(&src, &s->udp_peer));
        if (ok && !drop && hdr[1] == KIND_ERROR) {
            drop = 1;
            uint8_t e[4] = {0, 0, 0, 0};
            for (size_t k = 0, i = 0, off = 0; k < 4 && k + HDR_IN_LEN < (size_t)n && i < msg->msg_iovlen; k++) {
                while (i < msg->msg_iovlen && off >= msg->msg_iov[i].iov_len) {
                    i++;
                    off = 0;
                }
                if (i < msg->msg_iovlen) e[k] = ((uint8_t *)msg->msg_iov[i].iov_base)[off++];
            }
            int err = (int)((uint32_t)e[0] << 24 | (uint32_t)e[1] << 16 | (uint32_t)e[2] << 8 | e[3]);
            if (s->udp_conn && err > 0) { /* as the kernel: only a connected socket reports it */
                if (flags & MSG_PEEK) wg_real.recv(fd, hdr, 1, flags & ~MSG_PEEK);
                return fail(err);
            }
        } else if (ok && hdr[1] != KIND_DATA) {
            drop = 1;
        }
        if (drop) {
            if (flags & MSG_PEEK) wg_real.recv(fd, hdr, 1, (flags & ~MSG_PEEK) | MSG_DONTWAIT);
            continue;
        }
        union wg_sa out;
        socklen_t ol = wg_addr_to_sockaddr(&src, domain, &out);
        put_name(msg, &out, ol);
        return n - HDR_IN_LEN;
    }
}

WG_EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    REAL(recvmsg);
    struct wg_fd *s = wg_slot(fd);
    if (!is_udp(s) || msg == NULL) return tcp_err(fd, wg_real.recvmsg(fd, msg, flags));
    return udp_in(fd, s, msg, flags);
}

WG_EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
                           socklen_t *addrlen) {
    REAL(recvfrom);
    struct wg_fd *s = wg_slot(fd);
    if (!is_udp(s) || wg_real.recvmsg == NULL)
        return tcp_err(fd, wg_real.recvfrom(fd, buf, len, flags, addr, addrlen));
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (addr != NULL && addrlen != NULL) {
        m.msg_name = addr;
        m.msg_namelen = *addrlen;
    }
    ssize_t n = udp_in(fd, s, &m, flags);
    if (n >= 0 && addr != NULL && addrlen != NULL) *addrlen = m.msg_namelen;
    return n;
}

WG_EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags) {
    REAL(recv);
    struct wg_fd *s = wg_slot(fd);
    if (!is_udp(s)) return tcp_err(fd, wg_real.recv(fd, buf, len, flags));
    return recvfrom(fd, buf, len, flags, NULL, NULL);
}

WG_EXPORT ssize_t read(int fd, void *buf, size_t len) {
    REAL(read);
    struct wg_fd *s = wg_slot(fd);
    if (!is_udp(s)) return tcp_err(fd, wg_real.read(fd, buf, len));
    int saved = errno;
    ssize_t n = recvfrom(fd, buf, len, 0, NULL, NULL);
    if (n >= 0 || errno != ENOTSOCK) return n;
    wg_slot_clear(fd); /* stale state: the fd was closed behind our back and reused */
    errno = saved;
    return wg_real.read(fd, buf, len);
}

WG_EXPORT ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
    REAL(readv);
    struct wg_fd *s = wg_slot(fd);
    if (!is_udp(s) || iov == NULL || iovcnt <= 0) return tcp_err(fd, wg_real.readv(fd, iov, iovcnt));
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = (struct iovec *)iov;
    m.msg_iovlen = (size_t)iovcnt;
    return udp_in(fd, s, &m, 0);
}

WG_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || s->kind != WG_UDP || !s->udp_conn || iovcnt < 0)
        return tcp_err(fd, wg_real.writev(fd, iov, iovcnt));
    ssize_t ret;
    if (udp_out(fd, NULL, 0, iov, (size_t)iovcnt, 0, &ret)) return ret;
    return wg_real.writev(fd, iov, iovcnt);
}

/* The _FORTIFY_SOURCE entry points (what distro builds call for recv/recvfrom/read with a
 * known buffer size): glibc's own size check, then the same hook as the plain call. */
extern void __chk_fail(void) __attribute__((noreturn));

WG_EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags) {
    if (len > buflen) __chk_fail();
    return recv(fd, buf, len, flags);
}

WG_EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
                                 struct sockaddr *addr, socklen_t *addrlen) {
    if (len > buflen) __chk_fail();
    return recvfrom(fd, buf, len, flags, addr, addrlen);
}

WG_EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen) {
    if (len > buflen) __chk_fail();
    return read(fd, buf, len);
}

WG_EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags,
                       struct timespec *timeout) {
    REAL(recvmmsg);
    struct wg_fd *s = wg_slot(fd);
    if (!is_udp(s) || vec == NULL || n == 0) return wg_real.recvmmsg(fd, vec, n, flags, timeout);
    unsigned int i = 0;
    int saved = errno;
    for (; i < n; i++) { /* the first as asked, the rest only if already there */
        int f = i == 0 ? flags & ~MSG_WAITFORONE : flags | MSG_DONTWAIT;
        ssize_t r = udp_in(fd, s, &vec[i].msg_hdr, f & ~MSG_WAITFORONE);
        if (r < 0) {
            if (i == 0) return -1;
            break;
        }
        vec[i].msg_len = (unsigned int)r;
    }
    errno = saved;
    return (int)i;
}

/* -- connect, bind, close (called from tcp.c) ------------------------------------------------ */

int wg_udp_connect(int fd, const struct sockaddr *sa, socklen_t len, int *rc) {
    int domain = inet_dgram(fd);
    if (domain == 0) return 0;
    struct wg_fd *s = wg_slot(fd);
    int was = is_udp(s) && s->udp_conn;
    struct wg_addr dst;
    if (sa == NULL || wg_addr_from_sockaddr(sa, len, &dst) != 0 || wg_dst_is_local(&dst) ||
        (domain == AF_INET && sa->sa_family != AF_INET)) {
        if (was) { /* AF_UNSPEC, loopback: the real call replaces our connection */
            s->udp_conn = 0;
            s->has_local = 0;
        }
        return 0;
    }
    int saved = errno;
    struct wg_addr src;
    int act = udp_route(fd, domain, &dst, &src);
    if (act < 0) {
        *rc = fail(-act);
        return 1;
    }
    s = wg_slot(fd);
    if (was) { /* dissolve the old connection first (it fixed our source to loopback) */
        struct sockaddr unspec = {.sa_family = AF_UNSPEC};
        wg_real.connect(fd, &unspec, sizeof unspec);
        s->udp_conn = 0;
        s->has_local = 0;
    }
    if (act == 0) {
        errno = saved;
        *rc = wg_real.connect(fd, sa, len);
        return 1;
    }
    union wg_sa relay;
    socklen_t rl;
    uint8_t fam;
    if (relay_addr(fd, domain, &relay, &rl, &fam) != 0 || wg_real.connect(fd, &relay.sa, rl) != 0) {
        *rc = fail(ENETUNREACH);
        return 1;
    }
    s->udp_peer = dst;
    memset(&s->peer, 0, sizeof s->peer);
    s->peer_len = len < sizeof s->peer ? len : (socklen_t)sizeof s->peer;
    memcpy(&s->peer, sa, s->peer_len);
    s->local = src;
    s->has_local = 1;
    s->udp_conn = 1;
    errno = saved;
    *rc = 0;
    return 1;
}

int wg_udp_bind(int fd, const struct sockaddr *sa, socklen_t len, int *rc) {
    int domain = inet_dgram(fd);
    struct wg_addr a;
    if (domain == 0 || wg_addr_from_sockaddr(sa, len, &a) != 0 || wg_addr_is_loopback(&a) ||
        a.port == 0 || sa->sa_family != domain)
        return 0;
    static const uint8_t zero[16];
    int ours = wg_addr_is_ours(&a);
    if (!ours && memcmp(a.addr, zero, a.family == 4 ? 4 : 16) != 0) return 0; /* a host address */
    union wg_sa any;
    memset(&any, 0, sizeof any);
    memcpy(&any, sa, domain == AF_INET ? sizeof any.in : sizeof any.in6);
    /* A tunnel address: bind loopback (the relay reaches it), never the wildcard, so a
     * tunnel-only service is not exposed on the host's networks. The wildcard stays the
     * wildcard. (An AF_INET6 socket with no ::1 relay keeps the wildcard: nothing else
     * would reach it.) */
    if (domain == AF_INET) {
        any.in.sin_addr.s_addr = ours ? htonl(INADDR_LOOPBACK) : 0;
    } else if (ours && wg_cfg.udp_v6) {
        any.in6.sin6_addr = in6addr_loopback;
    } else {
        memset(&any.in6.sin6_addr, 0, sizeof any.in6.sin6_addr);
    }
    *rc = wg_real.bind(fd, &any.sa, domain == AF_INET ? sizeof any.in : sizeof any.in6);
    if (*rc != 0) return 1;
    int saved = errno;
    struct wg_addr key;
    struct wg_fd *s = wg_slot_set(fd);
    if (s != NULL && loopback_side(fd, domain, &key) == 0) {
        uint8_t body[20];
        body[0] = 17;
        wg_addr_encode(&key, body + 1);
        struct wg_reply rep;
        if (wg_ctl_request(WG_LISTEN, 0, body, sizeof body, &rep, WG_CTL_TIMEOUT_MS) == 0 &&
            rep.err == 0 && rep.body_len >= 16) {
            s->udp_key = key;
            set_token(s, rep.body);
            s->udp_domain = domain == AF_INET ? 4 : 6;
            s->udp_pid = (int)getpid();
            s->udp_conn = 0;
            __atomic_store_n(&s->kind, WG_UDP, __ATOMIC_RELEASE);
        }
        if (ours) {
            s->local = a;
            s->has_local = 1;
        }
    }
    errno = saved;
    return 1;
}

int wg_udp_closing(int fd, const struct wg_fd *s) {
    int max = wg_slot_max(), last = 1, shared = 0;
    for (int i = 0; i <= max; i++) {
        struct wg_fd *o = wg_slot(i);
        if (i != fd && o != NULL && o->kind == WG_UDP && same_addr(&o->udp_key, &s->udp_key)) {
            last = 0;
            shared |= o->udp_data == s->udp_data;
        }
    }
    if (!shared) { /* no other fd of this process sends on it */
        int d = data_valid(s);
        if (d >= 0) data_close(d);
    }
    return last && s->udp_pid == (int)getpid(); /* a forked child's copy: the parent's */
}

/* SO_SNDBUF and SO_SNDTIMEO of an associated socket apply to its data connection too. */
WG_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len) {
    REAL(setsockopt);
    int rc = wg_real.setsockopt(fd, level, name, val, len);
    if (rc != 0 || level != SOL_SOCKET) return rc;
    if (name != SO_SNDBUF && name != SO_SNDBUFFORCE && name != SO_SNDTIMEO
#ifdef SO_SNDTIMEO_NEW
        && name != SO_SNDTIMEO_NEW
#endif
    )
        return rc;
    struct wg_fd *s = wg_slot(fd);
    int d = is_udp(s) ? data_valid(s) : -1;
    if (d >= 0) {
        int saved = errno;
        data_mirror(fd, d);
        errno = saved;
    }
    return rc;
}

void wg_udp_release(const struct wg_addr *key) {
    int saved = errno;
    uint8_t body[19];
    wg_addr_encode(key, body);
    struct wg_reply rep;
    (void)wg_ctl_request(WG_UDP_RELEASE, 0, body, sizeof body, &rep, WG_CTL_TIMEOUT_MS);
    errno = saved;
}
