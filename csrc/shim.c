/* wrapguard shim: preloaded into the wrapped program (LD_PRELOAD).
 *
 * For now it only loads and announces itself: when WRAPGUARD_ANNOUNCE_FD names an open
 * file descriptor, the constructor writes one line "wrapguard-shim <version> pid=<pid>\n"
 * to it. It must never change what the program prints or how it behaves otherwise.
 * Later hooks resolve the real calls once with dlsym(RTLD_NEXT) and fall through early.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WRAPGUARD_SHIM_VERSION "0.1.0"

__attribute__((visibility("default"))) const char wrapguard_shim_version[] = WRAPGUARD_SHIM_VERSION;

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

__attribute__((constructor)) static void wrapguard_shim_init(void) {
    int saved_errno = errno;
    int fd = parse_fd(getenv("WRAPGUARD_ANNOUNCE_FD"));
    if (fd >= 0) {
        char line[96];
        int n = snprintf(line, sizeof line, "wrapguard-shim %s pid=%ld\n",
                         WRAPGUARD_SHIM_VERSION, (long)getpid());
        if (n > 0 && (size_t)n < sizeof line) {
            ssize_t w = write(fd, line, (size_t)n);
            (void)w;
        }
    }
    errno = saved_errno;
}
