/* wrapguard shim: the control channel client (docs/channel.md, "Framing").
 *
 * One persistent unix stream connection per process (SOCK_CLOEXEC), one request at a time on
 * it; a second thread meanwhile, and a forked child, never share it (see `ch` below). Every
 * step (connect, write, read) runs against one deadline with poll(); EINTR is retried. Only
 * real calls are used, never our own hooks. Nothing, not even the secret, is sent before
 * SO_PEERCRED shows that the launcher serves the socket.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/stat.h>

#include "shim.h"

long long wg_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for `events` on fd until the deadline; 0 ready, -1 timeout or error. */
int wg_wait_fd(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - wg_now_ms();
        if (left <= 0) return -1;
        struct pollfd p = {.fd = fd, .events = events, .revents = 0};
        int r = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0) return 0;
        if (r < 0 && errno != EINTR) return -1;
    }
}

int wg_write_all(int fd, const uint8_t *buf, size_t len, long long deadline) {
    while (len > 0) {
        ssize_t w = wg_real.send != NULL ? wg_real.send(fd, buf, len, MSG_NOSIGNAL)
                                     : send(fd, buf, len, MSG_NOSIGNAL);
        if (w > 0) {
            buf += w;
            len -= (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wg_wait_fd(fd, POLLOUT, deadline) < 0) return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

/* Read exactly len bytes; *got counts them. EOF leaves errno 0. */
static int read_some(int fd, uint8_t *buf, size_t len, long long deadline, size_t *got) {
    *got = 0;
    while (len > 0) {
        ssize_t r = wg_real.read(fd, buf, len);
        if (r > 0) {
            buf += r;
            len -= (size_t)r;
            *got += (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wg_wait_fd(fd, POLLIN, deadline) < 0) return -1;
        } else {
            if (r == 0) errno = 0; /* EOF: the launcher dropped the request, or is gone */
            return -1;
        }
    }
    return 0;
}

int wg_peer_is_launcher(int fd) {
    /* The credentials the listening socket was created with (unix(7)): the launcher's pid,
     * shared by every process of the program, forked or not. A socket planted by anyone else
     * (another user, or another process of ours) has another pid. */
    struct ucred cr;
    socklen_t len = sizeof cr;
    return wg_cfg.ctl_trusted &&
           wg_real.getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 &&
           len == sizeof cr && cr.pid == wg_cfg.ctl_pid && cr.uid == wg_cfg.ctl_uid;
}

static int ctl_connect(long long deadline) {
    int fd = wg_real.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    wg_slot_clear(fd); /* read()/send() below go through our hooks: no stale state */
    int ok = wg_real.connect(fd, (const struct sockaddr *)&wg_cfg.ctl, wg_cfg.ctl_len) == 0;
    if (!ok && (errno == EINPROGRESS || errno == EAGAIN || errno == EINTR)) {
        int err = 0;
        socklen_t el = sizeof err;
        ok = wg_wait_fd(fd, POLLOUT, deadline) == 0 &&
             wg_real.getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) == 0 && err == 0;
    }
    if (ok && wg_peer_is_launcher(fd)) return fd;
    wg_real.close(fd); /* fail closed: the caller fails the call, never goes direct */
    return -1;
}

/* The process's persistent control connection (docs/channel.md, "Framing"). One request at a
 * time: `busy` is taken with an atomic exchange, and a thread that finds it taken (another
 * thread mid-request, a signal handler that interrupted one) uses a one-shot connection
 * instead. The connection belongs to the process that opened it (`pid`): a fork()ed child
 * shares the parent's socket, so it never writes to it; it drops its copy and opens its own.
 * `dev`/`ino` identify the socket: a program that closed the number (closefrom, a loop over
 * every fd) or dup2()ed something over it is noticed before anything is written to it, and the
 * number is then left alone, it is the program's. Close-on-exec: a new image starts without. */
static struct {
    int fd; /* -1: none */
    int busy;
    pid_t pid;
    dev_t dev;
    ino_t ino;
} ch = {.fd = -1, .busy = 0, .pid = 0, .dev = 0, .ino = 0};

/* Still our socket? (fstat: the number may have been closed or reused behind us) */
static int ch_same(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == ch.dev && st.st_ino == ch.ino;
}

static void ch_drop(void) {
    if (ch.fd >= 0 && ch_same(ch.fd)) wg_real.close(ch.fd);
    ch.fd = -1;
}

/* With `busy` held: the persistent connection, opened if there is none; -1 if it cannot be. */
static int ch_get(long long deadline, int *fresh) {
    pid_t me = getpid();
    *fresh = 0;
    if (ch.fd >= 0 && ch.pid != me) {
        if (ch_same(ch.fd)) wg_real.close(ch.fd); /* the child's copy of the parent's socket */
        ch.fd = -1;
    }
    if (ch.fd >= 0 && !ch_same(ch.fd)) ch.fd = -1; /* the number is the program's now */
    if (ch.fd >= 0) return ch.fd;
    int fd = ctl_connect(deadline);
    if (fd < 0) return -1;
    fd = wg_move_high(fd);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        wg_real.close(fd);
        return -1;
    }
    ch.fd = fd;
    ch.pid = me;
    ch.dev = st.st_dev;
    ch.ino = st.st_ino;
    *fresh = 1;
    return fd;
}

/* After fork() in the child (pthread_atfork): a thread of the parent that was mid-request
 * does not exist here, so its hold on `busy` must not outlive it. */
void wg_ctl_atfork_child(void) { __atomic_store_n(&ch.busy, 0, __ATOMIC_RELEASE); }

/* One request and its reply on fd (rep NULL: a request never answered, GATE): 0 with *rep
 * filled; -1 the connection is unusable (`*unanswered`: closed before a single reply byte,
 * the request was not served). */
static int exchange(int fd, const uint8_t *req, uint32_t n, uint8_t op, struct wg_reply *rep,
                    long long deadline, int *unanswered) {
    uint8_t hdr[WG_PREFIX_LEN + WG_REP_HDR_LEN];
    *unanswered = 0;
    if (wg_write_all(fd, req, n, deadline) != 0) {
        *unanswered = errno == EPIPE || errno == ECONNRESET;
        return -1;
    }
    if (rep == NULL) return 0;
    size_t got = 0;
    if (read_some(fd, hdr, sizeof hdr, deadline, &got) != 0) {
        *unanswered = got == 0 && (errno == 0 || errno == ECONNRESET);
        return -1;
    }
    if (wg_rep_header_decode(hdr, op, rep) != 0) return -1;
    if (read_some(fd, rep->body, rep->body_len, deadline, &got) != 0) return -1;
    return 0;
}

int wg_ctl_begin(struct wg_ctl *c, uint8_t op, uint16_t flags, const void *body,
                 uint32_t body_len, struct wg_reply *rep, int timeout_ms) {
    c->fd = -1;
    c->held = 0;
    if (wg_resolve() != 0 || !wg_cfg.active || !wg_cfg.have_secret || !wg_cfg.ctl_trusted)
        return -1;
    if (body_len > WG_MAX_BODY - WG_REQ_HDR_LEN) return -1;
    long long deadline = wg_now_ms() + timeout_ms;
    uint8_t req[WG_PREFIX_LEN + WG_MAX_BODY];
    uint32_t n = wg_req_header_encode(req, op, flags, wg_cfg.secret, body_len);
    if (body_len) memcpy(req + WG_PREFIX_LEN + WG_REQ_HDR_LEN, body, body_len);

    int ok = -1, unanswered = 0;
    if (!__atomic_exchange_n(&ch.busy, 1, __ATOMIC_ACQUIRE)) {
        c->held = 1;
        int fresh = 0, fd = ch_get(deadline, &fresh);
        if (fd >= 0) {
            ok = exchange(fd, req, n, op, rep, deadline, &unanswered);
            if (ok != 0) ch_drop(); /* a stream out of step is never used again */
            /* A connection held since an earlier request that was closed before answering
             * this one (the launcher drops nothing of ours: it ended it): one fresh try. */
            if (ok != 0 && !fresh && unanswered && (fd = ch_get(deadline, &fresh)) >= 0) {
                ok = exchange(fd, req, n, op, rep, deadline, &unanswered);
                if (ok != 0) ch_drop();
            }
        }
        c->fd = ok == 0 ? fd : -1;
    } else {
        int fd = ctl_connect(deadline); /* another request is under way: a one-shot */
        if (fd >= 0) {
            ok = exchange(fd, req, n, op, rep, deadline, &unanswered);
            c->fd = fd;
        }
    }
    return ok == 0 && (rep == NULL || rep->err >= 0) ? 0 : -1;
}

int wg_ctl_next(struct wg_ctl *c, uint8_t op, struct wg_reply *rep, int timeout_ms) {
    if (c->fd < 0) return -1;
    long long deadline = wg_now_ms() + timeout_ms;
    uint8_t hdr[WG_PREFIX_LEN + WG_REP_HDR_LEN];
    size_t got = 0;
    if (read_some(c->fd, hdr, sizeof hdr, deadline, &got) != 0 ||
        wg_rep_header_decode(hdr, op, rep) != 0 ||
        read_some(c->fd, rep->body, rep->body_len, deadline, &got) != 0) {
        wg_ctl_end(c, 0);
        return -1;
    }
    return rep->err >= 0 ? 0 : -1;
}

void wg_ctl_end(struct wg_ctl *c, int in_step) {
    if (c->held) {
        if (!in_step && c->fd >= 0) ch_drop();
        c->held = 0;
        __atomic_store_n(&ch.busy, 0, __ATOMIC_RELEASE);
    } else if (c->fd >= 0) {
        wg_real.close(c->fd);
    }
    c->fd = -1;
}

int wg_ctl_request(uint8_t op, uint16_t flags, const void *body, uint32_t body_len,
                   struct wg_reply *rep, int timeout_ms) {
    struct wg_ctl c;
    int rc = wg_ctl_begin(&c, op, flags, body, body_len, rep, timeout_ms);
    wg_ctl_end(&c, 1);
    return rc;
}

/* -- frames (docs/channel.md "Framing"; the codec of wrapguard/wire/ipc.py) ------------------ */

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

uint32_t wg_req_header_encode(uint8_t *out, uint8_t op, uint16_t flags,
                              const uint8_t secret[WG_SECRET_LEN], uint32_t body_len) {
    put32(out, WG_REQ_HDR_LEN + body_len);
    out[4] = WG_VERSION;
    out[5] = op;
    put16(out + 6, flags);
    memcpy(out + 8, secret, WG_SECRET_LEN);
    return WG_PREFIX_LEN + WG_REQ_HDR_LEN + body_len;
}

int wg_rep_header_decode(const uint8_t in[WG_PREFIX_LEN + WG_REP_HDR_LEN], uint8_t op,
                         struct wg_reply *rep) {
    uint32_t len = get32(in);
    if (len < WG_REP_HDR_LEN || len - WG_REP_HDR_LEN > WG_MAX_BODY || in[4] != WG_VERSION ||
        in[5] != op)
        return -1;
    rep->op = op;
    rep->action = (uint16_t)(in[6] << 8 | in[7]);
    rep->err = (int32_t)get32(in + 8);
    rep->body_len = len - WG_REP_HDR_LEN;
    return 0;
}

int wg_connect_reply_decode(const struct wg_reply *rep, struct wg_tunnel_reply *out) {
    const uint32_t bare = WG_ADDR_LEN + WG_TOKEN_LEN;
    if (rep->action != WG_ACT_TUNNEL ||
        (rep->body_len != bare && rep->body_len != bare + WG_ADDR_LEN) ||
        wg_addr_decode(rep->body, &out->addr) != 0)
        return -1;
    memcpy(out->token, rep->body + WG_ADDR_LEN, WG_TOKEN_LEN);
    out->have_source = rep->body_len > bare;
    if (out->have_source && wg_addr_decode(rep->body + bare, &out->source) != 0) return -1;
    return 0;
}

int wg_assoc_reply_decode(const struct wg_reply *rep, struct wg_tunnel_reply *out) {
    if (rep->action != WG_ACT_TUNNEL || rep->body_len != WG_ADDR_LEN + WG_TOKEN_LEN ||
        wg_addr_decode(rep->body, &out->addr) != 0)
        return -1;
    memcpy(out->token, rep->body + WG_ADDR_LEN, WG_TOKEN_LEN);
    out->have_source = 0;
    return 0;
}

int wg_peer_reply_decode(const struct wg_reply *rep, struct wg_addr *peer, struct wg_addr *local,
                         int *have_local) {
    if (rep->action != WG_PEER_FOUND ||
        (rep->body_len != WG_ADDR_LEN && rep->body_len != 2 * WG_ADDR_LEN) ||
        wg_addr_decode(rep->body, peer) != 0)
        return -1;
    *have_local = rep->body_len == 2 * WG_ADDR_LEN && wg_addr_decode(rep->body + WG_ADDR_LEN,
                                                                      local) == 0;
    return 0;
}

void wg_addr_encode(const struct wg_addr *a, uint8_t out[WG_ADDR_LEN]) {
    out[0] = a->family;
    memset(out + 1, 0, 16);
    memcpy(out + 1, a->addr, a->family == 4 ? 4 : 16);
    out[17] = (uint8_t)(a->port >> 8);
    out[18] = (uint8_t)(a->port & 0xff);
}

int wg_addr_decode(const uint8_t in[WG_ADDR_LEN], struct wg_addr *a) {
    if (in[0] != 4 && in[0] != 6) return -1;
    a->family = in[0];
    memcpy(a->addr, in + 1, 16);
    a->port = (uint16_t)(in[17] << 8 | in[18]);
    return 0;
}

int wg_status(const uint8_t token[16], int wait) {
    struct wg_reply rep;
    int timeout = wait ? wg_cfg.status_timeout_ms : WG_CTL_TIMEOUT_MS;
    if (wg_ctl_request(WG_STATUS, wait ? WG_FLAG_WAIT : 0, token, 16, &rep, timeout) != 0)
        return -2;
    if (rep.action == WG_ST_PENDING) return wait ? -2 : -1;
    if (rep.action != WG_ST_DONE) return -2;
    return rep.err;
}
