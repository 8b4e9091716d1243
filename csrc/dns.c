/* wrapguard shim: name lookups answered by the launcher (docs/shim.md, docs/channel.md "DNS").
 *
 * Only when WRAPGUARD_DNS=1 (the config has DNS=): getaddrinfo, gethostbyname[2][_r] send
 * RESOLVE; a numeric host (or AI_NUMERICHOST) goes to the real call, which never asks DNS for
 * it. getaddrinfo builds its list with the real getaddrinfo of each numeric address (so the
 * service, socktype and protocol handling and the memory are glibc's own, and the real
 * freeaddrinfo frees it node by node). Reverse lookups answer numerically (no PTR query leaves
 * through the host). A failed channel gives EAI_AGAIN / TRY_AGAIN: never the host resolver.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>

#include "shim.h"

#define RESOLVE_TIMEOUT_MS 30000
#define MAX_ADDRS 12
#define FLAG_ADDRCONFIG 1

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
typedef struct hostent *(*ghbn_fn)(const char *);
typedef struct hostent *(*ghbn2_fn)(const char *, int);
typedef int (*ghbnr_fn)(const char *, struct hostent *, char *, size_t, struct hostent **, int *);
typedef int (*ghbn2r_fn)(const char *, int, struct hostent *, char *, size_t, struct hostent **,
                         int *);
typedef int (*gni_fn)(const struct sockaddr *, socklen_t, char *, socklen_t, char *, socklen_t,
                      int);
typedef struct hostent *(*ghba_fn)(const void *, socklen_t, int);
typedef int (*ghbar_fn)(const void *, socklen_t, int, struct hostent *, char *, size_t,
                        struct hostent **, int *);

#define REAL_FN(type, name)                                                    \
    static void *real_##name##_p;                                              \
    static type real_##name(void) { return (type)wg_lazy_sym(&real_##name##_p, #name); }

REAL_FN(gai_fn, getaddrinfo)
REAL_FN(ghbn_fn, gethostbyname)
REAL_FN(ghbn2_fn, gethostbyname2)
REAL_FN(ghbnr_fn, gethostbyname_r)
REAL_FN(ghbn2r_fn, gethostbyname2_r)
REAL_FN(gni_fn, getnameinfo)
REAL_FN(ghba_fn, gethostbyaddr)
REAL_FN(ghbar_fn, gethostbyaddr_r)

static int dns_on(void) {
    wg_init();
    return wg_cfg.active && wg_cfg.dns;
}

/* A literal the real call resolves without any lookup (IPv4 in inet_aton forms, IPv6). */
static int numeric(const char *node) {
    struct in_addr a4;
    uint8_t a6[16];
    char buf[64];
    if (inet_aton(node, &a4) == 1) return 1;
    size_t n = strcspn(node, "%");
    if (n >= sizeof buf) return 0;
    memcpy(buf, node, n);
    buf[n] = '\0';
    return inet_pton(AF_INET6, buf, a6) == 1;
}

struct answer {
    int n;
    struct wg_addr addrs[MAX_ADDRS];
    char canon[256];
};

/* RESOLVE: 0 with *out filled, or an EAI_* code (negative). */
static int ask(const char *name, int family, int flags, struct answer *out) {
    size_t len = strlen(name);
    if (len == 0 || len > 255) return EAI_NONAME;
    uint8_t body[3 + 255];
    body[0] = (uint8_t)family;
    body[1] = (uint8_t)flags;
    body[2] = (uint8_t)len;
    memcpy(body + 3, name, len);
    struct wg_reply rep;
    int saved = errno;
    int rc = wg_ctl_request(WG_RESOLVE, 0, body, (uint32_t)(3 + len), &rep, RESOLVE_TIMEOUT_MS);
    errno = saved;
    if (rc != 0) return EAI_AGAIN; /* fail closed: never the host resolver */
    if (rep.action != 0) return rep.err > 0 && rep.err < 100 ? -rep.err : EAI_FAIL;
    if (rep.body_len < 1 || rep.body[0] == 0 || rep.body[0] > MAX_ADDRS) return EAI_FAIL;
    out->n = rep.body[0];
    uint32_t pos = 1 + (uint32_t)out->n * 19;
    if (rep.body_len < pos + 1 || rep.body_len != pos + 1 + rep.body[pos]) return EAI_FAIL;
    for (int i = 0; i < out->n; i++)
        if (wg_addr_decode(rep.body + 1 + i * 19, &out->addrs[i]) != 0) return EAI_FAIL;
    memcpy(out->canon, rep.body + pos + 1, rep.body[pos]);
    out->canon[rep.body[pos]] = '\0';
    return 0;
}

/* -- getaddrinfo --------------------------------------------------------------------------- */

WG_EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                          struct addrinfo **res) {
    gai_fn real = real_getaddrinfo();
    if (real == NULL) return EAI_SYSTEM;
    int flags = hints != NULL ? hints->ai_flags : 0;
    int family = hints != NULL ? hints->ai_family : AF_UNSPEC;
    if (node == NULL || res == NULL || !dns_on() || (flags & AI_NUMERICHOST) || numeric(node) ||
        (family != AF_UNSPEC && family != AF_INET && family != AF_INET6))
        return real(node, service, hints, res);
    int mapped = family == AF_INET6 && (flags & AI_V4MAPPED);
    int want = family == AF_INET ? 4 : family == AF_INET6 && !mapped ? 6 : 0;
    struct answer ans;
    int rc = ask(node, want, (flags & AI_ADDRCONFIG) ? FLAG_ADDRCONFIG : 0, &ans);
    if (rc != 0) return rc;

    int have6 = 0;
    for (int i = 0; i < ans.n; i++) have6 |= ans.addrs[i].family == 6;
    struct addrinfo h;
    memset(&h, 0, sizeof h);
    if (hints != NULL) {
        h.ai_socktype = hints->ai_socktype;
        h.ai_protocol = hints->ai_protocol;
    }
    h.ai_flags = (flags & (AI_PASSIVE | AI_NUMERICSERV | AI_CANONNAME)) | AI_NUMERICHOST;
    struct addrinfo *head = NULL, **tail = &head;
    for (int i = 0; i < ans.n; i++) {
        const struct wg_addr *a = &ans.addrs[i];
        char text[INET6_ADDRSTRLEN + 8];
        if (a->family == 4 && family == AF_INET6) {
            if (!mapped || (have6 && !(flags & AI_ALL))) continue;
            memcpy(text, "::ffff:", 7);
            inet_ntop(AF_INET, a->addr, text + 7, sizeof text - 7);
        } else if (a->family == 6 && family == AF_INET) {
            continue;
        } else {
            inet_ntop(a->family == 4 ? AF_INET : AF_INET6, a->addr, text, sizeof text);
        }
        h.ai_family = family == AF_INET6 ? AF_INET6 : AF_UNSPEC;
        struct addrinfo *part = NULL;
        int r = real(text, service, &h, &part);
        if (r != 0) {
            if (head != NULL) freeaddrinfo(head);
            return r; /* e.g. EAI_SERVICE: the same answer as for any host */
        }
        *tail = part;
        while (*tail != NULL) {
            if ((*tail)->ai_canonname != NULL) { /* only the first node has the real one */
                free((*tail)->ai_canonname);
                (*tail)->ai_canonname = NULL;
            }
            tail = &(*tail)->ai_next;
        }
    }
    if (head == NULL) return EAI_NONAME;
    if (flags & AI_CANONNAME) head->ai_canonname = strdup(ans.canon[0] ? ans.canon : node);
    *res = head;
    return 0;
}

/* -- gethostbyname family -------------------------------------------------------------------- */

/* Fill a hostent in `buf` (aliases empty); 0, or ERANGE if buf is too small. */
static int fill_hostent(const struct answer *ans, int af, struct hostent *he, char *buf,
                        size_t buflen) {
    int want = af == AF_INET ? 4 : 6, alen = af == AF_INET ? 4 : 16, n = 0;
    for (int i = 0; i < ans->n; i++) n += ans->addrs[i].family == want;
    size_t name_len = strlen(ans->canon) + 1;
    size_t ptrs = sizeof(char *) * (size_t)(n + 2); /* addr list + NULL, aliases NULL */
    size_t need = ptrs + (size_t)n * (size_t)alen + name_len + sizeof(char *);
    if (buflen < need) return ERANGE;
    char *p = buf;
    size_t mis = (uintptr_t)p % sizeof(char *);
    if (mis) {
        if (buflen < need + sizeof(char *)) return ERANGE;
        p += sizeof(char *) - mis;
    }
    char **list = (char **)(void *)p;
    char **aliases = list + n + 1;
    char *data = (char *)(aliases + 1);
    int k = 0;
    for (int i = 0; i < ans->n; i++) {
        if (ans->addrs[i].family != want) continue;
        memcpy(data, ans->addrs[i].addr, (size_t)alen);
        list[k++] = data;
        data += alen;
    }
    list[k] = NULL;
    aliases[0] = NULL;
    memcpy(data, ans->canon, name_len);
    he->h_name = data;
    he->h_aliases = aliases;
    he->h_addrtype = af;
    he->h_length = alen;
    he->h_addr_list = list;
    return 0;
}

/* 0 found (*he filled), or an h_errno value; *err is ERANGE when buf is too small. */
static int lookup_hostent(const char *name, int af, struct hostent *he, char *buf, size_t buflen,
                          int *err) {
    struct answer ans;
    *err = 0;
    int rc = ask(name, af == AF_INET ? 4 : 6, 0, &ans);
    if (rc == EAI_AGAIN) return TRY_AGAIN;
    if (rc == EAI_NONAME) return HOST_NOT_FOUND;
    if (rc != 0) return NO_RECOVERY;
    int any = 0;
    for (int i = 0; i < ans.n; i++) any |= ans.addrs[i].family == (af == AF_INET ? 4 : 6);
    if (!any) return NO_DATA;
    if (fill_hostent(&ans, af, he, buf, buflen) != 0) {
        *err = ERANGE;
        return NETDB_INTERNAL;
    }
    return 0;
}

static __thread struct hostent tls_he;
static __thread char tls_buf[1024];

WG_EXPORT struct hostent *gethostbyname2(const char *name, int af) {
    ghbn2_fn real = real_gethostbyname2();
    if (name == NULL || !dns_on() || numeric(name) || (af != AF_INET && af != AF_INET6))
        return real != NULL ? real(name, af) : NULL;
    int err, h = lookup_hostent(name, af, &tls_he, tls_buf, sizeof tls_buf, &err);
    h_errno = h;
    return h == 0 ? &tls_he : NULL;
}

WG_EXPORT struct hostent *gethostbyname(const char *name) {
    ghbn_fn real = real_gethostbyname();
    if (name == NULL || !dns_on() || numeric(name)) return real != NULL ? real(name) : NULL;
    return gethostbyname2(name, AF_INET);
}

WG_EXPORT int gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf,
                               size_t buflen, struct hostent **result, int *h_errnop) {
    ghbn2r_fn real = real_gethostbyname2_r();
    if (name == NULL || !dns_on() || numeric(name) || (af != AF_INET && af != AF_INET6) ||
        ret == NULL || buf == NULL || result == NULL) {
        if (real == NULL) return ENOSYS;
        return real(name, af, ret, buf, buflen, result, h_errnop);
    }
    int err, h = lookup_hostent(name, af, ret, buf, buflen, &err);
    if (h_errnop != NULL) *h_errnop = h;
    h_errno = h;
    *result = h == 0 ? ret : NULL;
    return err;
}

WG_EXPORT int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen,
                              struct hostent **result, int *h_errnop) {
    ghbnr_fn real = real_gethostbyname_r();
    if (name == NULL || !dns_on() || numeric(name)) {
        if (real == NULL) return ENOSYS;
        return real(name, ret, buf, buflen, result, h_errnop);
    }
    return gethostbyname2_r(name, AF_INET, ret, buf, buflen, result, h_errnop);
}

/* -- reverse lookups: numeric only while DNS= is set ----------------------------------------- */

WG_EXPORT int getnameinfo(const struct sockaddr *sa, socklen_t salen, char *host,
                          socklen_t hostlen, char *serv, socklen_t servlen, int flags) {
    gni_fn real = real_getnameinfo();
    if (real == NULL) return EAI_SYSTEM;
    if (dns_on() && host != NULL && hostlen > 0 && !(flags & NI_NUMERICHOST)) {
        if (flags & NI_NAMEREQD) return EAI_NONAME;
        flags |= NI_NUMERICHOST;
    }
    return real(sa, salen, host, hostlen, serv, servlen, flags);
}

WG_EXPORT struct hostent *gethostbyaddr(const void *addr, socklen_t len, int type) {
    ghba_fn real = real_gethostbyaddr();
    if (dns_on()) {
        h_errno = HOST_NOT_FOUND;
        return NULL;
    }
    return real != NULL ? real(addr, len, type) : NULL;
}

WG_EXPORT int gethostbyaddr_r(const void *addr, socklen_t len, int type, struct hostent *ret,
                              char *buf, size_t buflen, struct hostent **result, int *h_errnop) {
    ghbar_fn real = real_gethostbyaddr_r();
    if (dns_on()) {
        if (result != NULL) *result = NULL;
        if (h_errnop != NULL) *h_errnop = HOST_NOT_FOUND;
        h_errno = HOST_NOT_FOUND; /* some callers (CPython) read the global */
        return 0; /* glibc: 0 with *result NULL means "not found" */
    }
    if (real == NULL) return ENOSYS;
    return real(addr, len, type, ret, buf, buflen, result, h_errnop);
}
