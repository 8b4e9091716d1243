/* wrapguard shim: preloaded into the wrapped program (LD_PRELOAD).
 *
 * This file: the one init (environment read once), the real calls resolved with
 * dlsym(RTLD_NEXT), address helpers and the per-fd table. The hooks are in tcp.c, the control
 * channel client in ctl.c (docs/channel.md, docs/shim.md).
 * When WRAPGUARD_ANNOUNCE_FD names an open file descriptor, the constructor writes one line
 * "wrapguard-shim <version> pid=<pid>\n" to it. Without WRAPGUARD_CTL every hook is inert.
 */
#include <dlfcn.h>
#include <stddef.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "shim.h"

WG_EXPORT const char wrapguard_shim_version[] = WG_SHIM_VERSION;

struct wg_real wg_real;
struct wg_config wg_cfg;

/* Per-fd state. Zero-filled BSS: only the pages of fds actually used become resident. */
static struct wg_fd wg_fds[WG_MAX_FDS];

struct wg_fd *wg_slot(int fd) {
    if (fd < 0 || fd >= WG_MAX_FDS) return NULL;
    return &wg_fds[fd];
}

static int wg_fds_max = -1;

static void note_max(int fd) {
    int cur = __atomic_load_n(&wg_fds_max, __ATOMIC_RELAXED);
    while (fd > cur &&
           !__atomic_compare_exchange_n(&wg_fds_max, &cur, fd, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
}

int wg_slot_max(void) { return __atomic_load_n(&wg_fds_max, __ATOMIC_RELAXED); }

struct wg_fd *wg_slot_set(int fd) {
    struct wg_fd *s = wg_slot(fd);
    if (s != NULL) note_max(fd);
    return s;
}

void wg_slot_clear(int fd) {
    struct wg_fd *s = wg_slot(fd);
    if (s == NULL || (s->kind == WG_NONE && !s->has_local && !s->udp_cache)) return;
    __atomic_store_n(&s->kind, WG_NONE, __ATOMIC_RELEASE);
    s->state = WG_OPEN;
    s->has_local = 0;
    s->udp_conn = 0;
    s->udp_cache = WG_UC_NONE;
    s->udp_data = 0;
}

void wg_slot_copy(int from, int to) {
    struct wg_fd *a = wg_slot(from), *b = wg_slot_set(to);
    if (b == NULL) return;
    if (a == NULL || (a->kind == WG_NONE && !a->has_local && !a->udp_cache)) {
        wg_slot_clear(to);
        return;
    }
    memcpy(b, a, sizeof *b);
}

/* Out of the way of the program's own numbers (a shell's `exec 5>f`, code that expects the
 * lowest free fd): the top quarter below the fd limit (and the table's end), close-on-exec. */
int wg_move_high(int u) {
    struct rlimit rl;
    rlim_t lim = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
    if (lim > WG_MAX_FDS) lim = WG_MAX_FDS;
    if (lim < 64) return u;
    int h = wg_real.fcntl(u, F_DUPFD_CLOEXEC, (int)(lim - lim / 4));
    if (h < 0) return u;
    wg_real.close(u);
    return h;
}

/* A thread inside dlsym must not re-enter it through a hook (dlsym may call into libc). */
static __thread int wg_resolving;

/* The next definition of `name`, or NULL. Never one of ours: were the shim's own hook handed
 * back (a second copy of it mapped, a loader quirk), calling it would recurse for ever. */
void *wg_next_sym(const char *name) {
    void *p = dlsym(RTLD_NEXT, name);
    Dl_info mine, theirs;
    if (p != NULL && dladdr((void *)&wg_next_sym, &mine) != 0 && dladdr(p, &theirs) != 0 &&
        theirs.dli_fbase == mine.dli_fbase)
        return NULL;
    return p;
}

void *wg_lazy_sym(void **slot, const char *name) {
    void *p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (p == NULL) {
        p = wg_next_sym(name);
        __atomic_store_n(slot, p, __ATOMIC_RELEASE);
    }
    return p;
}

#define WG_RESOLVE(name)                                                        \
    do {                                                                        \
        if (wg_real.name == NULL) {                                             \
            void *p = wg_next_sym(#name);                                          \
            __atomic_store_n((void **)&wg_real.name, p, __ATOMIC_RELEASE);      \
        }                                                                       \
        if (wg_real.name == NULL) missing++;                                    \
    } while (0)

int wg_resolve(void) {
    if (wg_real.fcntl != NULL) return 0; /* resolved last: everything else is there */
    if (wg_resolving) return -1;
    wg_resolving = 1;
    int saved = errno, missing = 0;
    WG_RESOLVE(socket);
    WG_RESOLVE(connect);
    WG_RESOLVE(bind);
    WG_RESOLVE(listen);
    WG_RESOLVE(accept);
    WG_RESOLVE(accept4);
    WG_RESOLVE(getpeername);
    WG_RESOLVE(getsockname);
    WG_RESOLVE(getsockopt);
    WG_RESOLVE(close);
    WG_RESOLVE(dup);
    WG_RESOLVE(dup2);
    WG_RESOLVE(dup3);
    WG_RESOLVE(sendto);
    WG_RESOLVE(sendmsg);
    WG_RESOLVE(sendmmsg);
    WG_RESOLVE(send);
    WG_RESOLVE(write);
    WG_RESOLVE(recvfrom);
    WG_RESOLVE(recvmsg);
    WG_RESOLVE(recvmmsg);
    WG_RESOLVE(recv);
    WG_RESOLVE(read);
    WG_RESOLVE(readv);
    WG_RESOLVE(writev);
    WG_RESOLVE(setsockopt);
    WG_RESOLVE(fcntl64);
    if (wg_real.fcntl64 == NULL) missing--; /* older glibc: fcntl only */
    WG_RESOLVE(fcntl);
    errno = saved;
    wg_resolving = 0;
    return missing ? -1 : 0;
}

static int parse_fd(const char *s) {
    if (s == NULL || *s == '\0') return -1;
    long v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        v = v * 10 + (*p - '0');
        if (v > 65535) return -1;
    }
    return (int)v;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int parse_secret(const char *s, uint8_t out[32]) {
    if (s == NULL || strlen(s) != 64) return -1;
    for (int i = 0; i < 32; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

/* WRAPGUARD_ADDRS: "10.150.0.2,fd15::2" (an optional /len is ignored). */
static void parse_addrs(const char *s) {
    char item[64];
    while (s != NULL && *s && wg_cfg.naddrs < WG_MAX_ADDRS) {
        size_t n = strcspn(s, ",");
        if (n > 0 && n < sizeof item) {
            memcpy(item, s, n);
            item[n] = '\0';
            item[strcspn(item, "/")] = '\0';
            uint8_t *dst = wg_cfg.addrs[wg_cfg.naddrs].addr;
            memset(dst, 0, 16);
            if (inet_pton(AF_INET, item, dst) == 1) {
                wg_cfg.addrs[wg_cfg.naddrs++].family = 4;
            } else if (inet_pton(AF_INET6, item, dst) == 1) {
                wg_cfg.addrs[wg_cfg.naddrs++].family = 6;
            }
        }
        s += n;
        if (*s == ',') s++;
    }
}

/* A decimal id from the environment (WRAPGUARD_CTL_PID, WRAPGUARD_CTL_UID); -1 if absent or
 * malformed. */
static long parse_id(const char *s) {
    if (s == NULL || *s == '\0') return -1;
    long v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9' || v > 0x7fffffffL / 10) return -1;
        v = v * 10 + (*p - '0');
    }
    return v;
}

/* ctl.sock's directory is the launcher's own (docs/channel.md, "Security"): a real directory
 * (lstat: not a symlink) of the launcher's uid with mode 0700, and ctl.sock in it a socket of
 * the same owner. Whoever can write the parent (XDG_RUNTIME_DIR or TMPDIR of another user,
 * after `su` without `-`) could otherwise put a directory of their own in its place. Checked
 * once per process; SO_PEERCRED is checked on every connection (ctl.c), so a directory
 * swapped later still fails closed. */
static int ctl_dir_trusted(const char *ctl, uid_t uid) {
    char dir[sizeof wg_cfg.ctl.sun_path];
    const char *slash = strrchr(ctl, '/');
    if (slash == NULL || slash == ctl) return 0;
    size_t n = (size_t)(slash - ctl);
    memcpy(dir, ctl, n);
    dir[n] = '\0';
    struct stat st;
    if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != uid ||
        (st.st_mode & 07777) != 0700)
        return 0;
    return lstat(ctl, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_uid == uid;
}

static pthread_once_t wg_init_once = PTHREAD_ONCE_INIT;

/* The one init: the environment, read once per process image (pthread_once). */
static void init_once(void) {
    int saved = errno;
    wg_resolve();
    const char *ctl = getenv("WRAPGUARD_CTL");
    if (ctl != NULL && *ctl != '\0' && strlen(ctl) < sizeof wg_cfg.ctl.sun_path) {
        memset(&wg_cfg.ctl, 0, sizeof wg_cfg.ctl);
        wg_cfg.ctl.sun_family = AF_UNIX;
        strcpy(wg_cfg.ctl.sun_path, ctl);
        wg_cfg.ctl_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(ctl) + 1);
        wg_cfg.have_secret = parse_secret(getenv("WRAPGUARD_SECRET"), wg_cfg.secret) == 0;
        long cap = 0;
        const char *t = getenv("WRAPGUARD_CONNECT_TIMEOUT");
        if (t != NULL) cap = strtol(t, NULL, 10);
        if (cap <= 0 || cap > 3600) cap = 120;
        wg_cfg.status_timeout_ms = (int)(30 + cap) * 1000;
        wg_cfg.naddrs = 0;
        parse_addrs(getenv("WRAPGUARD_ADDRS"));
        /* WRAPGUARD_UDP: "<port>" (127.0.0.1 and ::1) or "<port>/4" (127.0.0.1 only). */
        const char *u = getenv("WRAPGUARD_UDP");
        char *end = NULL;
        long up = u != NULL ? strtol(u, &end, 10) : 0;
        if (up > 0 && up < 65536 && end != NULL && (*end == '\0' || strcmp(end, "/4") == 0)) {
            wg_cfg.udp_port = (uint16_t)up;
            wg_cfg.udp_v6 = *end == '\0';
        }
        const char *d = getenv("WRAPGUARD_DNS");
        wg_cfg.dns = d != NULL && strcmp(d, "1") == 0;
        /* Who must serve ctl.sock; without both, nothing is trusted (fail closed). */
        long pid = parse_id(getenv("WRAPGUARD_CTL_PID"));
        long uid = parse_id(getenv("WRAPGUARD_CTL_UID"));
        wg_cfg.ctl_pid = (pid_t)pid;
        wg_cfg.ctl_uid = (uid_t)uid;
        wg_cfg.ctl_trusted = (uint8_t)(pid > 0 && uid >= 0 && ctl_dir_trusted(ctl, (uid_t)uid));
        /* UDP data connections: udp.sock in the directory of ctl.sock (docs/channel.md). */
        const char *slash = strrchr(ctl, '/');
        size_t dir = slash != NULL ? (size_t)(slash - ctl) + 1 : 0;
        if (dir + sizeof WG_UDP_DATA_SOCKET <= sizeof wg_cfg.udp_data.sun_path) {
            memset(&wg_cfg.udp_data, 0, sizeof wg_cfg.udp_data);
            wg_cfg.udp_data.sun_family = AF_UNIX;
            memcpy(wg_cfg.udp_data.sun_path, ctl, dir);
            memcpy(wg_cfg.udp_data.sun_path + dir, WG_UDP_DATA_SOCKET, sizeof WG_UDP_DATA_SOCKET);
            wg_cfg.udp_data_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + dir +
                                              sizeof WG_UDP_DATA_SOCKET);
        }
        /* A set but broken channel still makes the shim active: in-scope connects then
         * fail closed (ENETUNREACH) instead of leaking out directly. */
        wg_cfg.active = 1;
    }
    errno = saved;
}

void wg_init(void) { pthread_once(&wg_init_once, init_once); }

static void announce(void) {
    int fd = parse_fd(getenv("WRAPGUARD_ANNOUNCE_FD"));
    if (fd < 0) return;
    char line[96];
    int n = snprintf(line, sizeof line, "wrapguard-shim %s pid=%ld\n", WG_SHIM_VERSION,
                     (long)getpid());
    if (n > 0 && (size_t)n < sizeof line) {
        ssize_t w = write(fd, line, (size_t)n);
        (void)w;
    }
}

static void hello(void) {
    uint8_t body[4 + 1 + sizeof WG_SHIM_VERSION];
    uint32_t pid = htonl((uint32_t)getpid());
    uint8_t n = (uint8_t)(sizeof WG_SHIM_VERSION - 1);
    memcpy(body, &pid, 4);
    body[4] = n;
    memcpy(body + 5, WG_SHIM_VERSION, n);
    struct wg_reply rep;
    (void)wg_ctl_request(WG_HELLO, 0, body, 5u + n, &rep, WG_CTL_TIMEOUT_MS);
}

__attribute__((constructor)) static void wrapguard_shim_init(void) {
    int saved = errno;
    wg_init();
    (void)pthread_atfork(NULL, NULL, wg_ctl_atfork_child);
    announce();
    if (wg_cfg.active) hello(); /* best effort: one channel round trip */
    errno = saved;
}

/* -- addresses ------------------------------------------------------------------------------ */

static const uint8_t v4mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

int wg_addr_from_sockaddr(const struct sockaddr *sa, socklen_t len, struct wg_addr *out) {
    if (sa == NULL) return -1;
    memset(out, 0, sizeof *out);
    if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        out->family = 4;
        memcpy(out->addr, &in->sin_addr, 4);
        out->port = ntohs(in->sin_port);
        return 0;
    }
    /* The kernel accepts a sockaddr_in6 without sin6_scope_id (SIN6_LEN_RFC2133, 24 bytes):
     * so must we, or such a connect would bypass the tunnel. */
    if (sa->sa_family == AF_INET6 && len >= 24) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (memcmp(&in6->sin6_addr, v4mapped_prefix, 12) == 0) {
            out->family = 4;
            memcpy(out->addr, (const uint8_t *)&in6->sin6_addr + 12, 4);
        } else {
            out->family = 6;
            memcpy(out->addr, &in6->sin6_addr, 16);
        }
        out->port = ntohs(in6->sin6_port);
        return 0;
    }
    return -1;
}

socklen_t wg_addr_to_sockaddr(const struct wg_addr *a, int sock_family, union wg_sa *out) {
    memset(out, 0, sizeof *out);
    if (sock_family == AF_INET) {
        out->in.sin_family = AF_INET;
        memcpy(&out->in.sin_addr, a->addr, 4);
        out->in.sin_port = htons(a->port);
        return sizeof out->in;
    }
    out->in6.sin6_family = AF_INET6;
    if (a->family == 4) {
        memcpy(&out->in6.sin6_addr, v4mapped_prefix, 12);
        memcpy((uint8_t *)&out->in6.sin6_addr + 12, a->addr, 4);
    } else {
        memcpy(&out->in6.sin6_addr, a->addr, 16);
    }
    out->in6.sin6_port = htons(a->port);
    return sizeof out->in6;
}

int wg_addr_is_loopback(const struct wg_addr *a) {
    static const uint8_t v6lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    if (a->family == 4) return a->addr[0] == 127; /* 127/8, also as ::ffff:127/104 */
    return memcmp(a->addr, v6lo, 16) == 0;
}

int wg_addr_is_ours(const struct wg_addr *a) {
    for (int i = 0; i < wg_cfg.naddrs; i++) {
        if (wg_cfg.addrs[i].family == a->family &&
            memcmp(wg_cfg.addrs[i].addr, a->addr, a->family == 4 ? 4 : 16) == 0)
            return 1;
    }
    return 0;
}

void wg_copy_out(struct sockaddr *dst, socklen_t *dstlen, const void *src, socklen_t srclen) {
    if (dst == NULL || dstlen == NULL) return;
    socklen_t n = *dstlen < srclen ? *dstlen : srclen;
    memcpy(dst, src, n);
    *dstlen = srclen;
}
