/* wrapguard shim: declarations shared by the C files (all hidden, see -fvisibility=hidden). */
#ifndef WRAPGUARD_SHIM_H
#define WRAPGUARD_SHIM_H

#include <stdint.h>
#include <time.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/un.h>

#define WG_SHIM_VERSION "0.2.0"
#define WG_EXPORT __attribute__((visibility("default")))

/* -- real calls (shim.c): resolved once with dlsym(RTLD_NEXT) ----------------------------- */
struct wg_real {
    int (*socket)(int, int, int);
    int (*connect)(int, const struct sockaddr *, socklen_t);
    int (*bind)(int, const struct sockaddr *, socklen_t);
    int (*listen)(int, int);
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*close)(int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...); /* what _FILE_OFFSET_BITS=64 programs call */
    /* UDP (udp.c) */
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    int (*sendmmsg)(int, struct mmsghdr *, unsigned int, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*readv)(int, const struct iovec *, int);
    ssize_t (*writev)(int, const struct iovec *, int);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
};
extern struct wg_real wg_real;
/* dlsym(RTLD_NEXT, name), NULL if that is the shim's own (calling it would recurse). */
void *wg_next_sym(const char *name);
/* The same, resolved once into *slot (the hooks of dns.c and syscall.c). */
void *wg_lazy_sym(void **slot, const char *name);
/* Resolve every real call not resolved yet; 0 when all are there. Safe to call often. */
int wg_resolve(void);

/* -- configuration from the environment (shim.c), read once ------------------------------- */
#define WG_MAX_ADDRS 16
struct wg_config {
    int active;                       /* WRAPGUARD_CTL set: the hooks work, else all inert */
    int have_secret;                  /* WRAPGUARD_SECRET was 64 valid hex characters */
    uint8_t secret[32];
    struct sockaddr_un ctl;           /* the control socket path */
    socklen_t ctl_len;
    int status_timeout_ms;            /* STATUS+WAIT: 30 s + the launcher's connect timeout */
    int naddrs;                       /* WRAPGUARD_ADDRS: our tunnel addresses */
    struct { uint8_t family; uint8_t addr[16]; } addrs[WG_MAX_ADDRS];
    uint16_t udp_port;                /* WRAPGUARD_UDP: the launcher's UDP relay port (0: none) */
    uint8_t udp_v6;                   /* the relay also listens on ::1 */
    uint8_t dns;                      /* WRAPGUARD_DNS=1: names are resolved by the launcher */
    uint8_t ctl_trusted;              /* ctl.sock's directory is the launcher's (wg_init) */
    pid_t ctl_pid;                    /* WRAPGUARD_CTL_PID: the launcher, who serves ctl.sock */
    uid_t ctl_uid;                    /* WRAPGUARD_CTL_UID: its uid, the directory's owner */
    struct sockaddr_un udp_data;      /* udp.sock beside ctl.sock: UDP data connections */
    socklen_t udp_data_len;           /* 0: none (datagrams go to the relay port) */
};
extern struct wg_config wg_cfg;
void wg_init(void);

/* -- addresses: family 4 or 6, 16 bytes (IPv4 in the first 4), port in host order ---------- */
struct wg_addr {
    uint8_t family;
    uint8_t addr[16];
    uint16_t port;
};
/* sockaddr -> wg_addr (v4-mapped IPv6 becomes family 4); -1 if not AF_INET/AF_INET6. */
int wg_addr_from_sockaddr(const struct sockaddr *sa, socklen_t len, struct wg_addr *out);
/* wg_addr -> sockaddr in the given socket family (IPv4 in an AF_INET6 socket is v4-mapped). */
union wg_sa {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};
socklen_t wg_addr_to_sockaddr(const struct wg_addr *a, int sock_family, union wg_sa *out);
int wg_addr_is_loopback(const struct wg_addr *a);
int wg_addr_is_ours(const struct wg_addr *a);
/* A destination the hooks leave to the kernel: loopback, except port 53 while WRAPGUARD_DNS=1
 * (the launcher answers DNS queries to servers outside the tunnel, such as a 127.0.0.53 from
 * resolv.conf, through the tunnel DNS: docs/channel.md "DNS"). */
static inline int wg_dst_is_local(const struct wg_addr *a) {
    return wg_addr_is_loopback(a) && !(wg_cfg.dns && a->port == 53);
}
/* Copy a sockaddr to a caller's buffer as the kernel does: truncate, report the full size. */
void wg_copy_out(struct sockaddr *dst, socklen_t *dstlen, const void *src, socklen_t srclen);

/* -- per-fd state (shim.c): a fixed table indexed by fd, plain stores only ------------------ */
enum wg_kind { WG_NONE = 0, WG_TUNNEL = 1, WG_LISTENER = 2, WG_ACCEPTED = 3, WG_UDP = 4,
               WG_UDPDATA = 5 /* our own fd: a UDP socket's data connection (udp.c) */ };
/* UDP route cache (udp.c): the last destination asked about and the answer. */
enum wg_ucache { WG_UC_NONE = 0, WG_UC_DIRECT = 1, WG_UC_TUNNEL = 2 };
enum wg_tstate { WG_OPEN = 0, WG_PENDING = 1, WG_FAILED = 2 };
/* A tunnelled fd's state after a STATUS answer (tcp.c: the transitions, unit-tested). */
uint8_t wg_tunnel_next(uint8_t state, int st, int *err);
struct wg_fd {
    uint8_t kind;        /* enum wg_kind */
    uint8_t state;       /* enum wg_tstate, for WG_TUNNEL */
    uint8_t has_local;   /* `local` is valid (what getsockname reports) */
    uint8_t gated;       /* WG_TUNNEL: TCP_NOTSENT_LOWAT holds writability (gate_lowat saved) */
    int gate_lowat;      /* the program's TCP_NOTSENT_LOWAT before the gate */
    uint8_t token[16];   /* WG_TUNNEL: the data connection's token (for STATUS) */
    union wg_sa peer;              /* what getpeername reports (caller's form) */
    socklen_t peer_len;
    struct wg_addr local;          /* tunnel source (WG_TUNNEL) or requested bind (WG_LISTENER) */
    struct wg_addr announced;      /* WG_LISTENER: what LISTEN announced (for UNLISTEN) */
    /* UDP (udp.c) */
    uint8_t udp_conn;              /* WG_UDP: connect()ed through the tunnel (to the relay) */
    uint8_t udp_cache;             /* enum wg_ucache for udp_last (valid for any kind) */
    uint8_t udp_domain;            /* WG_UDP: 4 (AF_INET) or 6 (AF_INET6) */
    struct wg_addr udp_key;        /* WG_UDP: the socket's loopback side (the association) */
    uint8_t udp_token[16];         /* WG_UDP: proves our datagrams to the relay (channel.md) */
    struct wg_addr udp_peer;       /* WG_UDP + udp_conn: the tunnel destination */
    struct wg_addr udp_last;       /* the destination of udp_cache */
    int udp_pid;                   /* WG_UDP: the process that associated it (releases it) */
    int udp_data;                  /* WG_UDP: its data connection's fd + 1; 0 none yet, -1 the
                                      launcher has none (use the relay port) */
};
#define WG_MAX_FDS 65536
struct wg_fd *wg_slot(int fd);     /* NULL when fd is out of the table's range */
struct wg_fd *wg_slot_set(int fd); /* the same, for a slot about to be written */
void wg_slot_clear(int fd);
void wg_slot_copy(int from, int to);
int wg_slot_max(void); /* highest fd whose slot was ever set, for rare scans */

/* -- control channel (ctl.c) ---------------------------------------------------------------- */
/* The frame format is wrapguard/wire/ipc.py's: tests/test_shim_contract.py checks every
 * constant below against it (names: WG_<ipc name>). */
#define WG_VERSION 1
#define WG_MAX_BODY 512
#define WG_PREFIX_LEN 4                /* u32 body_len */
#define WG_SECRET_LEN 32
#define WG_TOKEN_LEN 16
#define WG_ADDR_LEN 19                 /* u8 family | 16 B address | u16 port */
#define WG_REQ_HDR_LEN 36              /* u8 version | u8 op | u16 flags | 32 B secret */
#define WG_REP_HDR_LEN 8               /* u8 version | u8 op | u16 action | i32 errno */
#define WG_UDP_HDR_LEN 21              /* relayed datagram: u8 version | u8 kind | address */
enum wg_op { WG_HELLO = 1, WG_CONNECT = 2, WG_STATUS = 3, WG_LISTEN = 4, WG_UNLISTEN = 5,
             WG_PEER = 6, WG_UDP_ASSOC = 7, WG_UDP_RELEASE = 8, WG_RESOLVE = 9, WG_GATE = 10 };
/* CONNECT and UDP_ASSOC reply actions (ipc.Action), STATUS (ipc.StatusAction) */
enum wg_action { WG_ACT_DIRECT = 0, WG_ACT_TUNNEL = 1, WG_ACT_FAIL = 2 };
enum wg_status_action { WG_ST_DONE = 0, WG_ST_PENDING = 1 };
enum wg_peer_action { WG_PEER_FOUND = 0, WG_PEER_UNKNOWN = 2 };
#define WG_PROTO_TCP 6
#define WG_PROTO_UDP 17
#define WG_FLAG_WAIT 1 /* STATUS */
#define WG_FLAG_GATE 1 /* CONNECT: non-blocking, a GATE request follows */
#define WG_FLAG_CONNECT_WAIT 2 /* CONNECT: blocking, a TUNNEL reply is followed by STATUS's */
#define WG_FLAG_CONNECT_LO4 4 /* CONNECT: an AF_INET socket (data connection to 127.0.0.1) */
#define WG_FLAG_V6ONLY 1 /* LISTEN: an AF_INET6 socket with IPV6_V6ONLY */
#define WG_GATE_MAX (4u << 20) /* filler cap: past it the gate is given up (see tcp.c) */
#define WG_GATE_SLACK (32 << 10) /* filler left unsent by a shut gate (see tcp.c) */
#define WG_CTL_TIMEOUT_MS 5000
#define WG_UDP_DATA_SOCKET "udp.sock" /* beside ctl.sock (wire/ipc.py UDP_DATA_SOCKET) */
struct wg_reply {
    uint8_t op;
    uint16_t action;
    int32_t err;
    uint32_t body_len;
    uint8_t body[WG_MAX_BODY];
};
/* Frame codec (ctl.c). The request's prefix and header into out[0..40); returns the frame's
 * whole length (prefix + header + body_len). */
uint32_t wg_req_header_encode(uint8_t *out, uint8_t op, uint16_t flags,
                              const uint8_t secret[WG_SECRET_LEN], uint32_t body_len);
/* A reply's prefix and header (12 bytes) for a request of `op`: 0 with rep's op, action, err
 * and body_len set, -1 if malformed (length, version, op). */
int wg_rep_header_decode(const uint8_t in[WG_PREFIX_LEN + WG_REP_HDR_LEN], uint8_t op,
                         struct wg_reply *rep);
/* A CONNECT (or UDP_ASSOC: `addr` is the source) TUNNEL reply's body, by name. */
struct wg_tunnel_reply {
    struct wg_addr addr;             /* CONNECT: the loopback data address; UDP_ASSOC: source */
    uint8_t token[WG_TOKEN_LEN];
    int have_source;                 /* CONNECT: our tunnel source address follows */
    struct wg_addr source;
};
/* CONNECT TUNNEL: address, token, optional address. 0, or -1 if malformed. */
int wg_connect_reply_decode(const struct wg_reply *rep, struct wg_tunnel_reply *out);
/* UDP_ASSOC TUNNEL: source address, token. 0, or -1 if malformed. */
int wg_assoc_reply_decode(const struct wg_reply *rep, struct wg_tunnel_reply *out);
/* PEER FOUND: the tunnel client, then optionally our tunnel address. 0, or -1. */
int wg_peer_reply_decode(const struct wg_reply *rep, struct wg_addr *peer, struct wg_addr *local,
                         int *have_local);
/* In the child after fork() (registered with pthread_atfork by the constructor). */
void wg_ctl_atfork_child(void);
/* Move a fd of ours out of the program's way (high, close-on-exec); the fd to use. */
int wg_move_high(int fd);
/* One request on the process's control connection; 0 with *rep filled, or -1 (unreachable,
 * timeout, malformed reply, rejected). errno is not preserved: callers save and restore it. */
int wg_ctl_request(uint8_t op, uint16_t flags, const void *body, uint32_t body_len,
                   struct wg_reply *rep, int timeout_ms);
/* A request whose connection stays held for more replies (CONNECT with WAIT: its STATUS reply
 * follows). wg_ctl_begin as wg_ctl_request (rep NULL: a request that is never answered, GATE,
 * only written); then wg_ctl_next for each further reply (-1 also
 * drops the connection: it is out of step); always wg_ctl_end, in_step 0 when replies the
 * launcher will still send are not read (the connection is then closed, never reused). */
struct wg_ctl {
    int fd;
    int held; /* the process's persistent connection (its busy flag is ours) */
};
int wg_ctl_begin(struct wg_ctl *c, uint8_t op, uint16_t flags, const void *body,
                 uint32_t body_len, struct wg_reply *rep, int timeout_ms);
int wg_ctl_next(struct wg_ctl *c, uint8_t op, struct wg_reply *rep, int timeout_ms);
void wg_ctl_end(struct wg_ctl *c, int in_step);
/* The peer of a connected unix socket is the launcher (SO_PEERCRED pid and uid, and its
 * directory checked at start-up): 1, or 0 and nothing may be sent (docs/channel.md). */
int wg_peer_is_launcher(int fd);
long long wg_now_ms(void);
/* poll() one fd for `events` until the deadline (EINTR retried); 0 ready, -1 timeout/error. */
int wg_wait_fd(int fd, short events, long long deadline);
int wg_write_all(int fd, const uint8_t *buf, size_t len, long long deadline);
/* Encode an address in the 19-byte wire form. */
void wg_addr_encode(const struct wg_addr *a, uint8_t out[WG_ADDR_LEN]);
int wg_addr_decode(const uint8_t in[WG_ADDR_LEN], struct wg_addr *a);
/* STATUS for a token: 0 = open, >0 = errno of the failure, -1 = pending (only !wait),
 * -2 = the channel failed. */
int wg_status(const uint8_t token[16], int wait);

/* -- UDP (udp.c), called from the hooks in tcp.c ------------------------------------------ */
/* connect()/bind() on an inet datagram socket: 1 handled (*rc set), 0 not ours. */
int wg_udp_connect(int fd, const struct sockaddr *sa, socklen_t len, int *rc);
int wg_udp_bind(int fd, const struct sockaddr *sa, socklen_t len, int *rc);
/* close() of an fd in state WG_UDP (call before the real close, `s` is about to be cleared):
 * when no other fd of this process uses the association, its data connection is closed, and
 * 1 is returned if this process associated it (UDP_RELEASE is due). */
int wg_udp_closing(int fd, const struct wg_fd *s);
void wg_udp_release(const struct wg_addr *key);

#endif
