/* wrapguard shim: the control channel client (docs/channel.md, "Framing").
 *
 * One fresh unix stream connection (SOCK_CLOEXEC) per request: safe across fork() and threads
 * with no shared state. Every step (connect, write, read) runs against one deadline with
 * poll(); EINTR is retried. Only real calls are used, never our own hooks. Nothing, not even
 * the secret, is sent before SO_PEERCRED shows that the launcher serves the socket.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

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
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
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

static int read_all(int fd, uint8_t *buf, size_t len, long long deadline) {
    while (len > 0) {
        ssize_t r = read(fd, buf, len);
        if (r > 0) {
            buf += r;
            len -= (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wg_wait_fd(fd, POLLIN, deadline) < 0) return -1;
        } else {
            return -1; /* EOF: the launcher dropped the request (wrong secret or uid) */
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

int wg_ctl_request(uint8_t op, uint16_t flags, const void *body, uint32_t body_len,
                   struct wg_reply *rep, int timeout_ms) {
    if (wg_resolve() != 0 || !wg_cfg.active || !wg_cfg.have_secret || !wg_cfg.ctl_trusted)
        return -1;
    if (body_len > WG_MAX_BODY - 36) return -1;
    long long deadline = wg_now_ms() + timeout_ms;
    uint8_t req[4 + WG_MAX_BODY];
    uint32_t n = 36 + body_len;
    uint32_t be = htonl(n);
    uint16_t fl = htons(flags);
    memcpy(req, &be, 4);
    req[4] = 1; /* version */
    req[5] = op;
    memcpy(req + 6, &fl, 2);
    memcpy(req + 8, wg_cfg.secret, 32);
    if (body_len) memcpy(req + 40, body, body_len);

    int fd = ctl_connect(deadline);
    if (fd < 0) return -1;
    int ok = -1;
    uint8_t hdr[12];
    if (wg_write_all(fd, req, 4 + n, deadline) == 0 && read_all(fd, hdr, 12, deadline) == 0) {
        uint32_t len;
        int32_t err;
        uint16_t action;
        memcpy(&len, hdr, 4);
        len = ntohl(len);
        memcpy(&action, hdr + 6, 2);
        memcpy(&err, hdr + 8, 4);
        if (len >= 8 && len - 8 <= WG_MAX_BODY && hdr[4] == 1 && hdr[5] == op) {
            rep->op = op;
            rep->action = ntohs(action);
            rep->err = (int32_t)ntohl((uint32_t)err);
            rep->body_len = len - 8;
            if (read_all(fd, rep->body, rep->body_len, deadline) == 0 && rep->err >= 0) ok = 0;
        }
    }
    wg_real.close(fd);
    return ok;
}

void wg_addr_encode(const struct wg_addr *a, uint8_t out[19]) {
    out[0] = a->family;
    memset(out + 1, 0, 16);
    memcpy(out + 1, a->addr, a->family == 4 ? 4 : 16);
    out[17] = (uint8_t)(a->port >> 8);
    out[18] = (uint8_t)(a->port & 0xff);
}

int wg_addr_decode(const uint8_t in[19], struct wg_addr *a) {
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
    if (rep.action == 1) return wait ? -2 : -1;
    if (rep.action != 0) return -2;
    return rep.err;
}
