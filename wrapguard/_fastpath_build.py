"""cffi builder for the small C helpers of the hot path (checksum, batched UDP I/O).

Python is slow at summing 16-bit words over 1400 bytes (performance.md: 2.3 us in Python,
0.4 us in C), so the one's-complement sum lives here. Python's socket module has no
recvmmsg/sendmmsg, and one syscall per datagram is a large share of the data path, so two thin
wrappers move up to 64 datagrams per syscall. Built at install time by setup.py.
"""

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    uint32_t wg_csum_partial(const uint8_t *buf, size_t len, uint32_t sum);
    int wg_recvmmsg(int fd, uint8_t *buf, size_t slot, int n, uint32_t *lens, uint8_t *addrs);
    int wg_sendmmsg(int fd, const uint8_t *base, const uint32_t *offs, const uint32_t *lens,
                    int n, const uint8_t *addr, uint32_t addrlen);
    """
)
ffibuilder.set_source(
    "wrapguard._fastpath",
    """
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    #include <stdint.h>
    #include <stddef.h>
    #include <string.h>
    #include <errno.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    /* One's-complement sum of 16-bit big-endian words (RFC 1071), not folded. */
    static uint32_t wg_csum_partial(const uint8_t *buf, size_t len, uint32_t sum32) {
        uint64_t sum = sum32;
        while (len >= 8) {
            uint64_t w; memcpy(&w, buf, 8);
            w = __builtin_bswap64(w);
            sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
            buf += 8; len -= 8;
        }
        while (len >= 2) { sum += ((uint32_t)buf[0] << 8) | buf[1]; buf += 2; len -= 2; }
        if (len) sum += (uint32_t)buf[0] << 8;
        while (sum >> 32) sum = (sum & 0xffffffffu) + (sum >> 32);
        while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
        return (uint32_t)sum;
    }

    #define WG_MMSG_MAX 64
    #define WG_ADDR_SLOT 28 /* sizeof(struct sockaddr_in6) */

    /* Receive up to n datagrams without blocking: datagram i goes to buf + i*slot, its length
       to lens[i] (0xFFFFFFFF if it was truncated), its source sockaddr to addrs + i*28.
       Returns how many were received, or -errno (-EAGAIN: nothing queued). */
    static int wg_recvmmsg(int fd, uint8_t *buf, size_t slot, int n, uint32_t *lens,
                           uint8_t *addrs) {
        struct mmsghdr msgs[WG_MMSG_MAX];
        struct iovec iov[WG_MMSG_MAX];
        int i, r;
        if (n > WG_MMSG_MAX) n = WG_MMSG_MAX;
        if (n <= 0) return 0;
        memset(msgs, 0, sizeof(msgs[0]) * (size_t)n);
        for (i = 0; i < n; i++) {
            iov[i].iov_base = buf + (size_t)i * slot;
            iov[i].iov_len = slot;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = addrs + (size_t)i * WG_ADDR_SLOT;
            msgs[i].msg_hdr.msg_namelen = WG_ADDR_SLOT;
        }
        r = recvmmsg(fd, msgs, (unsigned int)n, MSG_DONTWAIT, NULL);
        if (r < 0) return -errno;
        for (i = 0; i < r; i++)
            lens[i] = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0xFFFFFFFFu : msgs[i].msg_len;
        return r;
    }

    /* Send n datagrams (datagram i is base[offs[i] .. offs[i]+lens[i]]) to one destination
       sockaddr, without blocking. Returns how many were sent, or -errno if none was. */
    static int wg_sendmmsg(int fd, const uint8_t *base, const uint32_t *offs,
                           const uint32_t *lens, int n, const uint8_t *addr, uint32_t addrlen) {
        struct mmsghdr msgs[WG_MMSG_MAX];
        struct iovec iov[WG_MMSG_MAX];
        int i, r;
        if (n > WG_MMSG_MAX) n = WG_MMSG_MAX;
        if (n <= 0) return 0;
        memset(msgs, 0, sizeof(msgs[0]) * (size_t)n);
        for (i = 0; i < n; i++) {
            iov[i].iov_base = (void *)(base + offs[i]);
            iov[i].iov_len = lens[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (void *)addr;
            msgs[i].msg_hdr.msg_namelen = addrlen;
        }
        r = sendmmsg(fd, msgs, (unsigned int)n, MSG_DONTWAIT);
        return r < 0 ? -errno : r;
    }
    """,
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
