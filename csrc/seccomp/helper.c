/* wrapguard's seccomp helper (docs/seccomp.md): the one step between the launcher and a
 * program the preload shim cannot see (a static or Go binary).
 *
 *   _seccomp_helper SOCKET PATH ARGV0 [ARGS...]
 *
 * 1. connect to the launcher's unix socket SOCKET (before the filter: our own connect
 *    would otherwise wait for a supervisor that does not have the listener yet);
 * 2. no_new_privs, then a seccomp filter that sends the socket calls needing a decision
 *    to a user-notification listener (SECCOMP_RET_USER_NOTIF, SECCOMP_FILTER_FLAG_NEW_LISTENER);
 * 3. tell the launcher the listener's fd number (it takes it with pidfd_getfd) and wait for
 *    its one-byte answer;
 * 4. exec PATH. The filter stays on the program and on everything it starts.
 * Any failure before the exec ends here with exit status 126 and one line on stderr: the
 * program never runs without its filter (fail closed). */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

#if defined(__x86_64__)
#define WG_ARCH AUDIT_ARCH_X86_64
#define WG_X32_BIT 0x40000000u
#elif defined(__aarch64__)
#define WG_ARCH AUDIT_ARCH_AARCH64
#define WG_X32_BIT 0xffffffffu
#else
#error "the seccomp helper knows x86_64 and aarch64 only"
#endif

#define WG_WAIT_KILLABLE_RECV (1UL << 5) /* SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV */
#define WG_SOL_SOCKET 1
#define WG_SO_ERROR 4
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#define ARG_HI(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)

static void die(const char *what) {
    fprintf(stderr, "wrapguard: seccomp helper: %s: %s\n", what, strerror(errno));
    _exit(126);
}

#define LD(off) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (off))
#define RET(v) BPF_STMT(BPF_RET | BPF_K, (v))
#define JEQ(k, t, f) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (k), (t), (f))
#define NOTIFY SECCOMP_RET_USER_NOTIF
#define ALLOW SECCOMP_RET_ALLOW
#define ENOSYS_RET (SECCOMP_RET_ERRNO | ENOSYS)

/* Trapped (docs/seccomp.md "What stops"): connect, bind, listen, accept/accept4,
 * getpeername, getsockname, getsockopt(SOL_SOCKET, SO_ERROR), sendto/sendmsg/sendmmsg with
 * an address (sendto with a NULL address passes; sendmsg's address is inside its struct, so
 * every sendmsg stops) and recvfrom asking for the source address (for unconnected UDP into
 * the tunnel: the door reports the tunnel source). io_uring is refused (ENOSYS): its socket
 * operations would not pass through here. Another ABI (32-bit int 0x80, x32) gets ENOSYS
 * for everything. */
static struct sock_filter filter[] = {
    /*  0 */ LD(offsetof(struct seccomp_data, arch)),
    /*  1 */ JEQ(WG_ARCH, 1, 0),
    /*  2 */ RET(ENOSYS_RET),
    /*  3 */ LD(offsetof(struct seccomp_data, nr)),
    /*  4 */ BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, WG_X32_BIT, 0, 1),
    /*  5 */ RET(ENOSYS_RET),
    /*  6 */ JEQ(__NR_connect, 20, 0), /* -> 27 NOTIFY */
    /*  7 */ JEQ(__NR_getpeername, 19, 0),
    /*  8 */ JEQ(__NR_getsockname, 18, 0),
    /*  9 */ JEQ(__NR_bind, 17, 0),
    /* 10 */ JEQ(__NR_listen, 16, 0),
    /* 11 */ JEQ(__NR_accept, 15, 0),
    /* 12 */ JEQ(__NR_accept4, 14, 0),
    /* 13 */ JEQ(__NR_sendmsg, 13, 0),
    /* 14 */ JEQ(__NR_sendmmsg, 12, 0),
    /* 15 */ JEQ(__NR_getsockopt, 3, 0),  /* -> 19 */
    /* 16 */ JEQ(__NR_sendto, 6, 0),      /* -> 23 */
    /* 17 */ JEQ(__NR_recvfrom, 5, 0),    /* -> 23 */
    /* 18 */ JEQ(__NR_io_uring_setup, 10, 9), /* -> 29 ENOSYS, else 28 ALLOW */
    /* 19 */ LD(ARG_LO(1)), /* getsockopt: SOL_SOCKET/SO_ERROR only */
    /* 20 */ JEQ(WG_SOL_SOCKET, 0, 7),
    /* 21 */ LD(ARG_LO(2)),
    /* 22 */ JEQ(WG_SO_ERROR, 4, 5),
    /* 23 */ LD(ARG_LO(4)), /* sendto, recvfrom: only with an address (args[4] != NULL) */
    /* 24 */ JEQ(0, 0, 2),
    /* 25 */ LD(ARG_HI(4)),
    /* 26 */ JEQ(0, 1, 0),
    /* 27 */ RET(NOTIFY),
    /* 28 */ RET(ALLOW),
    /* 29 */ RET(ENOSYS_RET),
};

/* Take our preload shim (the _shim.so next to this helper) out of LD_PRELOAD: under the
 * filter the door sees every socket call, and the shim would intercept them a second time.
 * The user's own preloads stay. */
static void drop_shim(void) {
    char self[4096], shim[4096 + 16];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    const char *pre = getenv("LD_PRELOAD");
    if (n <= 0 || pre == NULL) return;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL) return;
    *slash = '\0';
    snprintf(shim, sizeof shim, "%s/_shim.so", self);
    size_t len = strlen(pre);
    char kept[len + 1], copy[len + 1];
    memcpy(copy, pre, len + 1);
    kept[0] = '\0';
    for (char *save = NULL, *w = strtok_r(copy, " :", &save); w; w = strtok_r(NULL, " :", &save)) {
        if (strcmp(w, shim) == 0) continue;
        if (kept[0]) strcat(kept, " ");
        strcat(kept, w);
    }
    if (kept[0]) setenv("LD_PRELOAD", kept, 1);
    else unsetenv("LD_PRELOAD");
}

static int seccomp(unsigned op, unsigned flags, void *args) {
    return (int)syscall(__NR_seccomp, op, flags, args);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s SOCKET PATH ARGV0 [ARGS...]\n", argv[0]);
        return 2;
    }
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof sun.sun_path) {
        errno = ENAMETOOLONG;
        die("launcher socket");
    }
    strcpy(sun.sun_path, argv[1]);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) die("socket");
    if (connect(sock, (struct sockaddr *)&sun, sizeof sun) != 0) die("connect to the launcher");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs");
    struct sock_fprog prog = {.len = sizeof filter / sizeof filter[0], .filter = filter};
    /* WAIT_KILLABLE_RECV (5.19+): once the launcher has a call, only a fatal signal ends
     * its wait (Go's preemption signals would otherwise restart held calls over and over). */
    int listener = seccomp(SECCOMP_SET_MODE_FILTER,
                           SECCOMP_FILTER_FLAG_NEW_LISTENER | WG_WAIT_KILLABLE_RECV, &prog);
    if (listener < 0 && errno == EINVAL)
        listener = seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    if (listener < 0) die("seccomp user notification (Linux >= 5.9 needed)");

    /* The launcher takes the listener with pidfd_getfd(): sendmsg(SCM_RIGHTS) would itself
     * stop in the filter, waiting for the supervisor we are about to give it to. */
    char line[32];
    int len = snprintf(line, sizeof line, "L %d\n", listener);
    if (write(sock, line, (size_t)len) != len) die("hand the listener to the launcher");
    char ack = 0;
    ssize_t n;
    do n = read(sock, &ack, 1); while (n < 0 && errno == EINTR);
    if (n != 1 || ack != 'K') {
        errno = n < 0 ? errno : ECONNRESET;
        die("the launcher did not take the listener");
    }
    close(listener); /* the launcher has its own copy now */
    close(sock);
    drop_shim();
    /* The system call itself: if the shim is loaded into this helper, its exec hook must
     * not see (and hand over again) the program it is already running. */
    syscall(__NR_execve, argv[2], &argv[3], environ);
    int err = errno;
    fprintf(stderr, "wrapguard: cannot run %s: %s\n", argv[2], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}
