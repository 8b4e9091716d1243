"""cffi builder for the small C helpers of the hot path (checksum, batched UDP I/O).

Python is slow at summing 16-bit words over 1400 bytes (performance.md: 2.3 us in Python,
0.4 us in C), so the one's-complement sum lives here. Python's socket module has no
recvmmsg/sendmmsg, and one syscall per datagram is a large share of the data path, so thin
wrappers move up to 64 datagrams per syscall; the sending one can hand runs of equal-sized
datagrams to the kernel as one UDP_SEGMENT message (one trip through routing and the device
instead of one per datagram). Sealing a batch of packets calls libcrypto's ChaCha20-Poly1305
once per packet from C (cryptography's encrypt() costs about 1.1 us per call beyond the
cipher). Built at install time by setup.py. The sealing part needs libcrypto's headers
(libssl-dev, which scripts/install-system-deps.sh installs); without them the module is built
without it and packets are sealed one at a time in Python (noise/session.py HAVE_SEAL_BATCH).
"""

import os
import shutil
import subprocess
import sysconfig
import tempfile

from cffi import FFI

_PROBE = "#include <openssl/evp.h>\nint main(void) { return EVP_chacha20_poly1305() == 0; }\n"


def _have_libcrypto() -> bool:
    """Whether a program using libcrypto's EVP interface compiles and links here."""
    if os.environ.get("WRAPGUARD_NO_LIBCRYPTO"):
        return False
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write(_PROBE)
        r = subprocess.run(
            [*cc, src, "-o", os.path.join(d, "probe"), "-lcrypto"], capture_output=True
        )
    return r.returncode == 0


HAVE_LIBCRYPTO = _have_libcrypto()

ffibuilder = FFI()
ffibuilder.cdef(
    """
    uint32_t wg_csum_partial(const uint8_t *buf, size_t len, uint32_t sum);
    int wg_recvmmsg(int fd, uint8_t *buf, size_t slot, int n, uint32_t *lens, uint8_t *addrs);
    int wg_sendmmsg(int fd, const uint8_t *base, const uint32_t *offs, const uint32_t *lens,
                    int n, const uint8_t *addr, uint32_t addrlen);
    int wg_sendmmsg_gso(int fd, const uint8_t *base, const uint32_t *offs,
                        const uint32_t *lens, int n, const uint8_t *addr, uint32_t addrlen,
                        int max_segs);
    """
)
if HAVE_LIBCRYPTO:
    ffibuilder.cdef(
        """
        int wg_seal_batch(const uint8_t *key, uint32_t receiver, uint64_t counter,
                          const uint8_t *src, const uint32_t *slens, int n, uint32_t mtu,
                          uint8_t *dst, uint32_t *dlens);
        """
    )
_SOURCE = """
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

    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103 /* linux/udp.h, Linux 4.18 */
    #endif
    #define WG_GSO_MAX_BYTES 65000 /* below the 65507-byte UDP payload limit of IPv4 */

    /* wg_sendmmsg with UDP segmentation offload: each run of up to max_segs consecutive
       datagrams of one length (the run's last may be shorter), contiguous in base, goes as
       one message carrying a UDP_SEGMENT control message, so the kernel moves the run as one
       packet until the device or the receiving socket splits it into the same datagrams.
       max_segs <= 1 sends one message per datagram, like wg_sendmmsg. Returns how many
       datagrams were sent, or -errno if none was (-EIO or -EINVAL when the route cannot
       segment: the caller then sends without). */
    static int wg_sendmmsg_gso(int fd, const uint8_t *base, const uint32_t *offs,
                               const uint32_t *lens, int n, const uint8_t *addr,
                               uint32_t addrlen, int max_segs) {
        struct mmsghdr msgs[WG_MMSG_MAX];
        struct iovec iov[WG_MMSG_MAX];
        union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; }
            ctl[WG_MMSG_MAX];
        int segs[WG_MMSG_MAX];
        int i = 0, m = 0, r, done = 0;
        if (n > WG_MMSG_MAX) n = WG_MMSG_MAX;
        if (n <= 0) return 0;
        memset(msgs, 0, sizeof(msgs[0]) * (size_t)n);
        while (i < n) {
            uint32_t size = lens[i], total = lens[i];
            int k = 1;
            while (i + k < n && k < max_segs && lens[i + k] <= size
                   && offs[i + k] == offs[i + k - 1] + size
                   && total + lens[i + k] <= WG_GSO_MAX_BYTES) {
                total += lens[i + k];
                k++;
                if (lens[i + k - 1] < size) break; /* a shorter datagram ends the run */
            }
            iov[m].iov_base = (void *)(base + offs[i]);
            iov[m].iov_len = total;
            msgs[m].msg_hdr.msg_iov = &iov[m];
            msgs[m].msg_hdr.msg_iovlen = 1;
            msgs[m].msg_hdr.msg_name = (void *)addr;
            msgs[m].msg_hdr.msg_namelen = addrlen;
            if (k > 1) {
                struct cmsghdr *c;
                uint16_t gso_size = (uint16_t)size;
                memset(&ctl[m], 0, sizeof(ctl[m]));
                msgs[m].msg_hdr.msg_control = ctl[m].buf;
                msgs[m].msg_hdr.msg_controllen = sizeof(ctl[m].buf);
                c = CMSG_FIRSTHDR(&msgs[m].msg_hdr);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                memcpy(CMSG_DATA(c), &gso_size, sizeof(gso_size));
            }
            segs[m++] = k;
            i += k;
        }
        r = sendmmsg(fd, msgs, (unsigned int)m, MSG_DONTWAIT);
        if (r < 0) return -errno;
        for (i = 0; i < r; i++) done += segs[i];
        return done;
    }

"""

_SEAL_SOURCE = """
    #include <openssl/evp.h>

    /* Seal n IP packets into WireGuard transport messages [W 5.4.6] with OpenSSL's
       ChaCha20-Poly1305 (the cipher is libcrypto's, not ours): packet i (slens[i] bytes,
       the packets back to back in src) is padded with zeros to a multiple of 16 (never past
       mtu), sealed under key with the nonce of counter + i, and written with its 16-byte
       header (type 4, receiver, counter, little-endian) to dst, the messages back to back;
       dlens[i] is message i's length. dst must hold sum(slens) + 47 * n bytes. The counter
       checks (Reject-After-Messages) are the caller's. Returns 0, or -1 if the cipher
       failed. */
    static int wg_seal_batch(const uint8_t *key, uint32_t receiver, uint64_t counter,
                             const uint8_t *src, const uint32_t *slens, int n, uint32_t mtu,
                             uint8_t *dst, uint32_t *dlens) {
        static const uint8_t zeros[16];
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        int i, k, ok = ctx != NULL
            && EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL) == 1;
        for (i = 0; ok && i < n; i++, counter++) {
            uint32_t len = slens[i], pad = (16 - len % 16) % 16;
            uint8_t nonce[12] = {0};
            int l1 = 0, l2 = 0, l3 = 0;
            if (len + pad > mtu) pad = mtu > len ? mtu - len : 0;
            dst[0] = 4; dst[1] = dst[2] = dst[3] = 0;
            for (k = 0; k < 4; k++) dst[4 + k] = (uint8_t)(receiver >> (8 * k));
            for (k = 0; k < 8; k++) dst[8 + k] = nonce[4 + k] = (uint8_t)(counter >> (8 * k));
            ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) == 1
                && EVP_EncryptUpdate(ctx, dst + 16, &l1, src, (int)len) == 1
                && (pad == 0
                    || EVP_EncryptUpdate(ctx, dst + 16 + l1, &l2, zeros, (int)pad) == 1)
                && EVP_EncryptFinal_ex(ctx, dst + 16 + l1 + l2, &l3) == 1
                && (uint32_t)(l1 + l2 + l3) == len + pad
                && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, dst + 16 + len + pad) == 1;
            dlens[i] = 32 + len + pad;
            src += len;
            dst += dlens[i];
        }
        EVP_CIPHER_CTX_free(ctx);
        return ok ? 0 : -1;
    }
"""

ffibuilder.set_source(
    "wrapguard._fastpath",
    _SOURCE + (_SEAL_SOURCE if HAVE_LIBCRYPTO else ""),
    libraries=["crypto"] if HAVE_LIBCRYPTO else [],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
