/* wrapguard shim: the syscall() hook (docs/shim.md "Raw syscalls").
 *
 * Some libraries make socket calls through libc's generic syscall() instead of its wrappers:
 * libuv sends UDP with syscall(SYS_sendmmsg, ...) and receives with syscall(SYS_recvmmsg, ...)
 * (BIND's dig, host and nslookup send every query that way). Those calls would bypass the
 * hooks, so this hook hands the socket-related numbers the shim hooks to the same hooks, the
 * variadic arguments read as longs (the kernel ABI: six register-sized words), and every other
 * number to the real syscall() with all six words unchanged. Return values and errno follow
 * syscall()'s convention, which is the wrappers' too: -1 with errno set on failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "shim.h"

typedef long (*syscall_fn)(long, ...);
static void *real_syscall_p;

static syscall_fn real_syscall(void) {
    return (syscall_fn)wg_lazy_sym(&real_syscall_p, "syscall");
}

/* read, write and close matter to the shim only on an fd with state; any other fd goes
 * straight to the kernel. jemalloc (linked into dig) calls syscall(SYS_read / SYS_close)
 * inside malloc's own initialisation, where resolving the real calls must not happen. */
static int has_state(long fd) {
    const struct wg_fd *s = fd >= 0 && fd < WG_MAX_FDS ? wg_slot((int)fd) : NULL;
    return s != NULL && (s->kind != WG_NONE || s->has_local || s->udp_cache != WG_UC_NONE);
}

WG_EXPORT long syscall(long nr, ...) {
    va_list ap;
    va_start(ap, nr);
    long a = va_arg(ap, long), b = va_arg(ap, long), c = va_arg(ap, long);
    long d = va_arg(ap, long), e = va_arg(ap, long), f = va_arg(ap, long);
    va_end(ap);
    int fd = (int)a;
    switch (nr) {
    case SYS_socket: return socket((int)a, (int)b, (int)c);
    case SYS_connect: return connect(fd, (const struct sockaddr *)b, (socklen_t)c);
    case SYS_bind: return bind(fd, (const struct sockaddr *)b, (socklen_t)c);
    case SYS_listen: return listen(fd, (int)b);
    case SYS_accept4: return accept4(fd, (struct sockaddr *)b, (socklen_t *)c, (int)d);
#ifdef SYS_accept
    case SYS_accept: return accept(fd, (struct sockaddr *)b, (socklen_t *)c);
#endif
    case SYS_getpeername: return getpeername(fd, (struct sockaddr *)b, (socklen_t *)c);
    case SYS_getsockname: return getsockname(fd, (struct sockaddr *)b, (socklen_t *)c);
    case SYS_getsockopt:
        return getsockopt(fd, (int)b, (int)c, (void *)d, (socklen_t *)e);
    case SYS_setsockopt:
        return setsockopt(fd, (int)b, (int)c, (const void *)d, (socklen_t)e);
    case SYS_sendto:
        return sendto(fd, (const void *)b, (size_t)c, (int)d, (const struct sockaddr *)e,
                      (socklen_t)f);
    case SYS_sendmsg: return sendmsg(fd, (const struct msghdr *)b, (int)c);
    case SYS_sendmmsg: return sendmmsg(fd, (struct mmsghdr *)b, (unsigned int)c, (int)d);
    case SYS_recvfrom:
        return recvfrom(fd, (void *)b, (size_t)c, (int)d, (struct sockaddr *)e, (socklen_t *)f);
    case SYS_recvmsg: return recvmsg(fd, (struct msghdr *)b, (int)c);
    case SYS_recvmmsg:
        return recvmmsg(fd, (struct mmsghdr *)b, (unsigned int)c, (int)d, (struct timespec *)e);
    case SYS_dup: return dup(fd);
#ifdef SYS_dup2
    case SYS_dup2: return dup2(fd, (int)b);
#endif
    case SYS_dup3: return dup3(fd, (int)b, (int)c);
    case SYS_fcntl: return fcntl(fd, (int)b, (void *)c);
    case SYS_close:
        if (has_state(a)) return close(fd);
        break;
    case SYS_read:
        if (has_state(a)) return read(fd, (void *)b, (size_t)c);
        break;
    case SYS_write:
        if (has_state(a)) return write(fd, (const void *)b, (size_t)c);
        break;
    default:
        break;
    }
    syscall_fn real = real_syscall();
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    return real(nr, a, b, c, d, e, f);
}
