/* exec hooks: the program's children stay wrapped, and nothing is exec'ed that would not be.
 *
 * A wrapped shell running `env -i cmd`, or a program that drops LD_PRELOAD before exec, would
 * start a child without the shim, whose traffic would then leave on the host network. So the
 * exec family and posix_spawn put back what the shim needs (LD_PRELOAD with this library
 * first, and the WRAPGUARD_* variables), as captured when the shim loaded. Only when the shim
 * is active (WRAPGUARD_CTL was set). Not covered: glibc-internal execs (system() and popen()
 * run /bin/sh with `environ`, which still has them unless the program removed them itself).
 *
 * A program the shim cannot load into would run with the tunnel's addresses but without the
 * shim, and send what the tunnel should carry straight out. The hooks refuse those (see
 * "What the shim cannot load into" below; docs/shim.md "Children").
 *
 * Everything here is built on the caller's stack and uses plain system calls: these hooks may
 * run in a vfork() child, where malloc is not allowed.
 */
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <linux/capability.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "shim.h"

extern char **environ;

#define WG_ENV_LEN 4096

static const char *const wg_env_names[] = {
    "WRAPGUARD_CTL",    "WRAPGUARD_SECRET", "WRAPGUARD_UDP",
    "WRAPGUARD_DNS",    "WRAPGUARD_ADDRS",  "WRAPGUARD_CONNECT_TIMEOUT",
    "WRAPGUARD_CTL_PID", "WRAPGUARD_CTL_UID", /* who serves ctl.sock (ctl.c) */
    "WRAPGUARD_SECCOMP_HELPER", "WRAPGUARD_SECCOMP_SOCK", /* the seccomp door (issue 13) */
};
#define WG_ENV_HELPER 8 /* indexes of the two above */
#define WG_ENV_SECCOMP_SOCK 9
#define WG_NVARS (sizeof wg_env_names / sizeof wg_env_names[0])

static char wg_env_saved[WG_NVARS][WG_ENV_LEN]; /* "NAME=value", or "" when unset */
static char wg_shim_path[WG_ENV_LEN];
static int wg_env_ready;

static int wg_exec_active; /* WRAPGUARD_CTL was set: exec is checked (wg_exec_check) */
static void wg_exec_identity(void);

__attribute__((constructor)) static void wg_exec_init(void) {
    const char *ctl = getenv("WRAPGUARD_CTL");
    if (ctl == NULL || *ctl == '\0') return;
    wg_exec_active = 1;
    wg_exec_identity();
    for (size_t i = 0; i < WG_NVARS; i++) {
        const char *v = getenv(wg_env_names[i]);
        wg_env_saved[i][0] = '\0';
        if (v == NULL) continue;
        size_t nl = strlen(wg_env_names[i]), vl = strlen(v);
        if (nl + 1 + vl + 1 > WG_ENV_LEN) return; /* absurdly long: leave exec alone */
        memcpy(wg_env_saved[i], wg_env_names[i], nl);
        wg_env_saved[i][nl] = '=';
        memcpy(wg_env_saved[i] + nl + 1, v, vl + 1);
    }
    Dl_info info;
    if (dladdr((void *)wg_exec_init, &info) == 0 || info.dli_fname == NULL ||
        strlen(info.dli_fname) + 1 > sizeof wg_shim_path)
        return;
    strcpy(wg_shim_path, info.dli_fname);
    wg_env_ready = 1;
}

static int has_name(const char *entry, const char *name, size_t nl) {
    return strncmp(entry, name, nl) == 0 && entry[nl] == '=';
}

/* Does the LD_PRELOAD value list our library? (separated by spaces or colons) */
static int preload_has_shim(const char *value) {
    size_t sl = strlen(wg_shim_path);
    for (const char *p = value; (p = strstr(p, wg_shim_path)) != NULL; p += sl) {
        int start = p == value || p[-1] == ' ' || p[-1] == ':';
        int end = p[sl] == '\0' || p[sl] == ' ' || p[sl] == ':';
        if (start && end) return 1;
    }
    return 0;
}

/* What envp lacks: 0 if nothing (use envp as it is), else the number of pointer slots and
 * the size of the LD_PRELOAD string the fixed copy needs. */
static int wg_env_need(char *const envp[], size_t *slots, size_t *plen) {
    if (!wg_env_ready) return 0;
    size_t n = 0;
    while (envp != NULL && envp[n] != NULL) n++;
    int any = 0;
    const char *preload = NULL;
    for (size_t k = 0; k < n; k++)
        if (has_name(envp[k], "LD_PRELOAD", 10)) preload = envp[k] + 11;
    for (size_t i = 0; i < WG_NVARS && !any; i++) {
        if (wg_env_saved[i][0] == '\0') continue;
        size_t nl = strlen(wg_env_names[i]);
        int found = 0;
        for (size_t k = 0; k < n && !found; k++) found = has_name(envp[k], wg_env_names[i], nl);
        any = !found;
    }
    if (!any && preload != NULL && preload_has_shim(preload)) return 0;
    *slots = n + WG_NVARS + 2;
    *plen = 11 + strlen(wg_shim_path) + 1 + (preload ? strlen(preload) : 0) + 1;
    return 1;
}

/* Build the fixed environment into caller-provided storage (the caller's stack: no malloc,
 * which matters in a vfork() child). */
static char **wg_env_build(char *const envp[], char **out, char *pre) {
    size_t n = 0;
    while (envp != NULL && envp[n] != NULL) n++;
    const char *preload = NULL;
    for (size_t k = 0; k < n; k++)
        if (has_name(envp[k], "LD_PRELOAD", 10)) preload = envp[k] + 11;
    int fix_preload = preload == NULL || !preload_has_shim(preload);
    size_t m = 0;
    for (size_t k = 0; k < n; k++)
        if (!(fix_preload && has_name(envp[k], "LD_PRELOAD", 10))) out[m++] = envp[k];
    for (size_t i = 0; i < WG_NVARS; i++) {
        if (wg_env_saved[i][0] == '\0') continue;
        size_t nl = strlen(wg_env_names[i]);
        int found = 0;
        for (size_t k = 0; k < n && !found; k++) found = has_name(envp[k], wg_env_names[i], nl);
        if (!found) out[m++] = wg_env_saved[i];
    }
    if (fix_preload) {
        strcpy(pre, "LD_PRELOAD=");
        strcat(pre, wg_shim_path);
        if (preload != NULL && *preload != '\0') {
            strcat(pre, " ");
            strcat(pre, preload);
        }
        out[m++] = pre;
    }
    out[m] = NULL;
    return out;
}

/* Call `expr` with `env` set to envp, or to a fixed copy on this frame's stack. */
#define WITH_ENV(envp, env, expr)                                                          \
    do {                                                                                   \
        size_t slots_ = 0, plen_ = 0;                                                      \
        if (!wg_env_need((envp), &slots_, &plen_)) {                                       \
            char *const *env = (envp);                                                     \
            return (expr);                                                                 \
        }                                                                                  \
        char *out_[slots_];                                                                \
        char pre_[plen_];                                                                  \
        char *const *env = wg_env_build((envp), out_, pre_);                               \
        return (expr);                                                                     \
    } while (0)

/* -- What the shim cannot load into ------------------------------------------------------
 * An exec of one of these is refused with EPERM, printing nothing (the caller reports it:
 * bash says "Operation not permitted" and gives 126):
 *  - secure-execution mode (AT_SECURE; ld.so(8) then ignores LD_PRELOAD). The kernel picks it
 *    when the exec changes the effective ids: a setuid or setgid bit it honours (not on a
 *    nosuid mount, not under no_new_privs) whose owner differs from the caller's real id, or
 *    a caller whose effective and real ids already differ; and, for a caller whose real uid
 *    is not 0, when the file's capabilities grant anything (security/commoncap.c,
 *    cap_bprm_creds_from_file; capabilities(7) "File capabilities").
 *  - no ELF interpreter (static, static-pie): no loader, so nothing preloads the shim. The
 *    loader itself is the exception (ldd runs it; it honours LD_PRELOAD).
 *  - a Go program (the build-id note its linker writes): it makes its own system calls.
 *  - another ELF class, byte order or machine (a 32-bit program): the loader cannot load this
 *    library into it and runs the program without.
 * A #! script is judged by its interpreter (Linux ignores a script's own setuid bits), up to
 * the kernel's four levels. Anything else (not ELF, not a regular file) is left to the
 * kernel, and so is the content of a file we cannot read (its ids and capabilities are still
 * checked). EPERM is the kernel's own answer to an exec that may not gain privileges;
 * it also ends execvp's PATH search (EACCES would try the next directory: another program).
 * The seam for the seccomp door (issue 13) is wg_exec_refusal(). */
enum wg_exec_kind { WG_EXEC_OK = 0, WG_EXEC_SECURE, WG_EXEC_STATIC, WG_EXEC_GO, WG_EXEC_FOREIGN };

#define WG_BINPRM_BUF 256   /* what the kernel reads of a file to recognise it (#!, ELF) */
#define WG_SCRIPT_DEPTH 4   /* nested #! interpreters the kernel follows */
#define WG_ST_VALID 0x0020  /* statfs f_flags are valid (include/linux/statfs.h) */
#define WG_GO_NOTE_TYPE 4   /* ELF_NOTE_GOBUILDID_TAG, owner "Go" (Go's cmd/link) */

int capget(cap_user_header_t hdrp, cap_user_data_t datap); /* in glibc, declared by libcap */

static unsigned char wg_self_class, wg_self_data; /* this library's ELF identity */
static ElfW(Half) wg_self_machine;
static int wg_loader_known; /* the loader of this process (its PT_INTERP), by file */
static dev_t wg_loader_dev;
static ino_t wg_loader_ino;

static int wg_find_loader(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size, (void)data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        if (info->dlpi_phdr[i].p_type != PT_INTERP) continue;
        struct stat st;
        if (stat((const char *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr), &st) == 0) {
            wg_loader_dev = st.st_dev;
            wg_loader_ino = st.st_ino;
            wg_loader_known = 1;
        }
    }
    return 1; /* the first object is the program itself */
}

static void wg_exec_identity(void) {
    Dl_info info;
    if (dladdr((void *)wg_exec_identity, &info) != 0 && info.dli_fbase != NULL) {
        const ElfW(Ehdr) *self = info.dli_fbase; /* our first page: the ELF header */
        wg_self_class = self->e_ident[EI_CLASS];
        wg_self_data = self->e_ident[EI_DATA];
        wg_self_machine = self->e_machine;
    }
    dl_iterate_phdr(wg_find_loader, NULL);
}

static uint32_t le32(const uint8_t *p) {
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Do the file capabilities of `path` raise privileges (for a caller whose real uid is not
 * 0)? security.capability holds a vfs_cap_data (linux/capability.h): le32 magic_etc (the
 * revision, VFS_CAP_FLAGS_EFFECTIVE), then le32 permitted and inheritable, once (revision 1)
 * or twice (2; 3 adds the root uid). The new permitted set is fP | (fI & pI): the kernel
 * uses secure-execution mode when it is not empty or the effective flag is set. No xattr,
 * an empty one, or one the kernel would reject itself (it then fails the exec): no. */
static int wg_caps_grant(const char *path) {
    uint8_t b[XATTR_CAPS_SZ_3];
    ssize_t n = getxattr(path, "security.capability", b, sizeof b);
    if (n < (ssize_t)XATTR_CAPS_SZ_1) return 0;
    uint32_t magic = le32(b), rev = magic & VFS_CAP_REVISION_MASK;
    int words = rev == VFS_CAP_REVISION_1 ? 1 : 2;
    if (rev != VFS_CAP_REVISION_1 && rev != VFS_CAP_REVISION_2 && rev != VFS_CAP_REVISION_3)
        return 0;
    if (words == 2 && n < (ssize_t)XATTR_CAPS_SZ_2) return 0;
    if (magic & VFS_CAP_FLAGS_EFFECTIVE) return 1;
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct cur[2];
    memset(cur, 0xff, sizeof cur); /* unknown pI: assume it has them all */
    if (capget(&hdr, cur) != 0) memset(cur, 0xff, sizeof cur);
    for (int i = 0; i < words; i++)
        if (le32(b + 4 + 8 * i) != 0 || (le32(b + 8 + 8 * i) & cur[i].inheritable) != 0) return 1;
    return 0;
}

/* Will the kernel run `path` (status `st`) in secure-execution mode for this caller? */
static int wg_secure_exec(const char *path, const struct stat *st) {
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;
    if (getresuid(&ruid, &euid, &suid) != 0 || getresgid(&rgid, &egid, &sgid) != 0) return 0;
    struct statfs fs;
    int nosuid = statfs(path, &fs) == 0 && (fs.f_flags & WG_ST_VALID) && (fs.f_flags & ST_NOSUID);
    int honoured = !nosuid && prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1;
    /* fs/exec.c bprm_fill_uid: setgid counts only with group execute (else it marks locking) */
    uid_t new_euid = honoured && (st->st_mode & S_ISUID) ? st->st_uid : euid;
    gid_t new_egid = honoured && (st->st_mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP)
                         ? st->st_gid
                         : egid;
    if (new_euid != ruid || new_egid != rgid) return 1;
    return ruid != 0 && !nosuid && wg_caps_grant(path);
}

/* Does this PT_NOTE segment hold Go's build-id note? */
static int wg_go_note(int fd, const ElfW(Phdr) *ph) {
    uint8_t buf[512];
    size_t len = ph->p_filesz < sizeof buf ? ph->p_filesz : sizeof buf;
    if (pread(fd, buf, len, ph->p_offset) != (ssize_t)len) return 0;
    size_t align = ph->p_align == 8 ? 8 : 4;
    for (size_t off = 0; off + sizeof(ElfW(Nhdr)) <= len;) {
        ElfW(Nhdr) nh;
        memcpy(&nh, buf + off, sizeof nh);
        size_t name = off + sizeof nh;
        if (nh.n_namesz > len || nh.n_descsz > len) return 0;
        if (nh.n_type == WG_GO_NOTE_TYPE && (nh.n_namesz == 3 || nh.n_namesz == 4) &&
            name + 3 <= len && memcmp(buf + name, "Go", 3) == 0)
            return 1;
        off = name + ((nh.n_namesz + align - 1) & ~(align - 1)) +
              ((nh.n_descsz + align - 1) & ~(align - 1));
    }
    return 0;
}

/* An ELF file (its first bytes in `head`): what the loader can do with it. */
static enum wg_exec_kind wg_elf_kind(int fd, const uint8_t *head, const struct stat *st) {
    ElfW(Ehdr) eh;
    memcpy(&eh, head, sizeof eh); /* e_ident, e_type, e_machine: the same place in every class */
    if (eh.e_ident[EI_CLASS] != wg_self_class || eh.e_ident[EI_DATA] != wg_self_data ||
        eh.e_machine != wg_self_machine)
        return wg_self_class != 0 ? WG_EXEC_FOREIGN : WG_EXEC_OK;
    if ((eh.e_type != ET_EXEC && eh.e_type != ET_DYN) || eh.e_phentsize != sizeof(ElfW(Phdr)))
        return WG_EXEC_OK; /* the kernel refuses it */
    int interp = 0, go = 0, notes = 0;
    ElfW(Phdr) ph[16];
    for (unsigned i = 0; i < eh.e_phnum;) {
        unsigned k = eh.e_phnum - i < 16 ? eh.e_phnum - i : 16;
        ssize_t want = (ssize_t)(k * sizeof ph[0]);
        if (pread(fd, ph, (size_t)want, (off_t)(eh.e_phoff + i * sizeof ph[0])) != want)
            return WG_EXEC_OK; /* the kernel cannot read them either */
        for (unsigned j = 0; j < k; j++) {
            if (ph[j].p_type == PT_INTERP) interp = 1;
            if (ph[j].p_type == PT_NOTE && !go && notes++ < 4) go = wg_go_note(fd, &ph[j]);
        }
        i += k;
    }
    if (!interp && !(wg_loader_known && st->st_dev == wg_loader_dev && st->st_ino == wg_loader_ino))
        return WG_EXEC_STATIC;
    return go ? WG_EXEC_GO : WG_EXEC_OK;
}

/* The interpreter a #! line names (binfmt_script: blanks, then up to a blank or the end of
 * the line, or of a file shorter than the buffer), into out[WG_BINPRM_BUF]; 0 if there is
 * none the kernel would run (a name cut off by the end of the buffer: ENOEXEC). */
static int wg_script_interp(const uint8_t *head, size_t n, char *out) {
    size_t i = 2, o = 0;
    while (i < n && (head[i] == ' ' || head[i] == '\t')) i++;
    while (i < n && head[i] != ' ' && head[i] != '\t' && head[i] != '\n' && head[i] != '\0')
        out[o++] = (char)head[i++];
    out[o] = '\0';
    return o > 0 && (i < n || n < WG_BINPRM_BUF);
}

/* Our own descriptor goes with the real close(), not the hook: a stale slot of the program's
 * for the same number (docs/shim.md, "Known limits") must not be acted on. */
static void wg_close_own(int fd) {
    if (fd < 0) return;
    if (wg_real.close == NULL) wg_resolve();
    if (wg_real.close != NULL)
        wg_real.close(fd);
    else
        close(fd);
}

static enum wg_exec_kind wg_exec_kind(const char *path, int depth) {
    struct stat st;
    if (path == NULL || stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return WG_EXEC_OK;
    uint8_t head[WG_BINPRM_BUF];
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    ssize_t n = fd >= 0 ? pread(fd, head, sizeof head, 0) : -1;
    if (n >= 2 && head[0] == '#' && head[1] == '!') {
        wg_close_own(fd);
        char interp[WG_BINPRM_BUF];
        if (depth >= WG_SCRIPT_DEPTH || !wg_script_interp(head, (size_t)n, interp))
            return WG_EXEC_OK;
        return wg_exec_kind(interp, depth + 1);
    }
    enum wg_exec_kind kind = wg_secure_exec(path, &st) ? WG_EXEC_SECURE : WG_EXEC_OK;
    if (kind == WG_EXEC_OK && n >= (ssize_t)sizeof(ElfW(Ehdr)) &&
        memcmp(head, ELFMAG, SELFMAG) == 0)
        kind = wg_elf_kind(fd, head, &st);
    wg_close_own(fd);
    return kind;
}

/* What execvp() would run for `file`: as glibc's execvpe, the first entry of this process's
 * PATH ("/bin:/usr/bin" without one; an empty entry is the current directory) where it is a
 * regular file the caller may execute. */
static enum wg_exec_kind wg_exec_kind_search(const char *file, char *found) {
    if (file == NULL || *file == '\0') return WG_EXEC_OK;
    if (strchr(file, '/') != NULL) {
        if (found != NULL && strlen(file) < PATH_MAX) strcpy(found, file);
        return wg_exec_kind(file, 0);
    }
    const char *path = getenv("PATH");
    if (path == NULL) path = "/bin:/usr/bin";
    size_t fl = strlen(file);
    char buf[PATH_MAX];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        size_t dl = (size_t)(end - p);
        if (dl + 1 + fl + 1 <= sizeof buf) {
            memcpy(buf, p, dl);
            if (dl > 0) buf[dl++] = '/';
            memcpy(buf + dl, file, fl + 1);
            struct stat st;
            if (stat(buf, &st) == 0 && S_ISREG(st.st_mode) &&
                faccessat(AT_FDCWD, buf, X_OK, AT_EACCESS) == 0) {
                if (found != NULL) strcpy(found, buf);
                return wg_exec_kind(buf, 0);
            }
        }
        if (*end == '\0') return WG_EXEC_OK;
        p = end;
    }
}

/* The seccomp door's helper and its socket (WRAPGUARD_SECCOMP_*), or NULL without them. */
static const char *wg_saved_value(size_t i) {
    const char *v = wg_env_saved[i];
    if (!wg_env_ready || v[0] == '\0') return NULL;
    v += strlen(wg_env_names[i]) + 1;
    return *v != '\0' ? v : NULL;
}

static int wg_seccomp_ready(void) {
    return wg_saved_value(WG_ENV_HELPER) != NULL && wg_saved_value(WG_ENV_SECCOMP_SOCK) != NULL;
}

#define WG_HANDOFF (-1) /* run it through the seccomp door's helper */

/* 0: go ahead; WG_HANDOFF: a static or Go program, run through the seccomp helper
 * (docs/seccomp.md), which installs the filter that sends its socket calls to the
 * launcher; else the errno of the refusal (secure-execution and foreign programs, and
 * static/Go ones when the launcher has no seccomp door). */
static int wg_exec_refusal(enum wg_exec_kind kind) {
    if (kind == WG_EXEC_OK) return 0;
    if ((kind == WG_EXEC_STATIC || kind == WG_EXEC_GO) && wg_seccomp_ready()) return WG_HANDOFF;
    return EPERM;
}

/* Check what an exec of `path` (searched in PATH when `search`, the file found copied to
 * `found`, PATH_MAX bytes, if not NULL) would run; errno kept. */
static int wg_exec_check_at(const char *path, int search, char *found) {
    if (!wg_exec_active) return 0;
    int saved = errno;
    if (found != NULL) found[0] = '\0';
    int err = wg_exec_refusal(search ? wg_exec_kind_search(path, found) : wg_exec_kind(path, 0));
    if (err == WG_HANDOFF && found != NULL && found[0] == '\0') err = EPERM; /* no path */
    errno = saved;
    return err;
}

static int wg_exec_check(const char *path, int search) {
    int err = wg_exec_check_at(path, search, NULL);
    return err == WG_HANDOFF ? EPERM : err; /* by descriptor: no path to hand over */
}

/* argv for the helper: HELPER SOCKET PATH ARGV0 ARGS... (in `out`, n + 4 slots). */
static char **wg_helper_argv(const char *path, char *const argv[], char **out) {
    size_t n = 0;
    out[0] = (char *)wg_saved_value(WG_ENV_HELPER);
    out[1] = (char *)wg_saved_value(WG_ENV_SECCOMP_SOCK);
    out[2] = (char *)path;
    while (argv != NULL && argv[n] != NULL) {
        out[3 + n] = argv[n];
        n++;
    }
    if (n == 0) out[3 + n++] = (char *)path; /* an empty argv still needs an argv[0] */
    out[3 + n] = NULL;
    return out;
}

static size_t wg_argc(char *const argv[]) {
    size_t n = 0;
    while (argv != NULL && argv[n] != NULL) n++;
    return n;
}

/* -- the hooks ------------------------------------------------------------------------------ */
typedef int (*execve_fn)(const char *, char *const[], char *const[]);
typedef int (*fexecve_fn)(int, char *const[], char *const[]);
typedef int (*execveat_fn)(int, const char *, char *const[], char *const[], int);
typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);
static execve_fn real_execve, real_execvpe;
static fexecve_fn real_fexecve;
static execveat_fn real_execveat;
static spawn_fn real_spawn, real_spawnp;

__attribute__((constructor)) static void wg_exec_resolve(void) {
    real_execve = (execve_fn)dlsym(RTLD_NEXT, "execve");
    real_execvpe = (execve_fn)dlsym(RTLD_NEXT, "execvpe");
    real_fexecve = (fexecve_fn)dlsym(RTLD_NEXT, "fexecve");
    real_execveat = (execveat_fn)dlsym(RTLD_NEXT, "execveat");
    real_spawn = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawn");
    real_spawnp = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawnp");
}

static int no_symbol(void) {
    errno = ENOSYS;
    return -1;
}

static int refused(int err) {
    errno = err;
    return -1;
}

WG_EXPORT int execve(const char *path, char *const argv[], char *const envp[]) {
    if (real_execve == NULL) return no_symbol();
    int err = wg_exec_check_at(path, 0, NULL);
    if (err == WG_HANDOFF) {
        char *hargv[wg_argc(argv) + 5];
        char **ha = wg_helper_argv(path, argv, hargv);
        WITH_ENV(envp, env, real_execve(ha[0], ha, env));
    }
    if (err != 0) return refused(err);
    WITH_ENV(envp, env, real_execve(path, argv, env));
}

WG_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[]) {
    if (real_execvpe == NULL) return no_symbol();
    char found[PATH_MAX];
    int err = wg_exec_check_at(file, 1, found);
    if (err == WG_HANDOFF) {
        char *hargv[wg_argc(argv) + 5];
        char **ha = wg_helper_argv(found, argv, hargv);
        WITH_ENV(envp, env, real_execve(ha[0], ha, env));
    }
    if (err != 0) return refused(err);
    WITH_ENV(envp, env, real_execvpe(file, argv, env));
}

WG_EXPORT int execv(const char *path, char *const argv[]) {
    return execve(path, argv, environ);
}

WG_EXPORT int execvp(const char *file, char *const argv[]) {
    return execvpe(file, argv, environ);
}

/* fexecve and execveat name the file by descriptor: checked through /proc/self/fd. */
WG_EXPORT int fexecve(int fd, char *const argv[], char *const envp[]) {
    if (real_fexecve == NULL) return no_symbol();
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int err = wg_exec_check(path, 0);
    if (err != 0) return refused(err);
    WITH_ENV(envp, env, real_fexecve(fd, argv, env));
}

WG_EXPORT int execveat(int dirfd, const char *path, char *const argv[], char *const envp[],
                       int flags) {
    if (real_execveat == NULL) return no_symbol();
    char buf[PATH_MAX];
    const char *at = path;
    if (path[0] != '/' && dirfd != AT_FDCWD) { /* path: nonnull, as glibc declares it */
        if (path[0] == '\0') /* AT_EMPTY_PATH: dirfd itself */
            snprintf(buf, sizeof buf, "/proc/self/fd/%d", dirfd);
        else
            snprintf(buf, sizeof buf, "/proc/self/fd/%d/%s", dirfd, path);
        at = buf;
    }
    int err = wg_exec_check(at, 0);
    if (err != 0) return refused(err);
    WITH_ENV(envp, env, real_execveat(dirfd, path, argv, env, flags));
}

/* argv on this frame's stack from execl's NULL-terminated list (`ap` then points past it). */
#define WG_VA_ARGV(arg, argv, ap)                                                          \
    size_t n_ = 1;                                                                         \
    va_start(ap, arg);                                                                     \
    while (va_arg(ap, const char *) != NULL) n_++;                                         \
    va_end(ap);                                                                            \
    char *argv[n_ + 1];                                                                    \
    argv[0] = (char *)arg;                                                                 \
    va_start(ap, arg);                                                                     \
    for (size_t i_ = 1; i_ <= n_; i_++) argv[i_] = va_arg(ap, char *) /* argv[n_]: NULL */

/* glibc's execl and execlp call its internal execve/execvpe, out of our reach: hooked here
 * so that what they run is checked too. */
WG_EXPORT int execl(const char *path, const char *arg, ...) {
    va_list ap;
    WG_VA_ARGV(arg, argv, ap);
    va_end(ap);
    return execve(path, argv, environ);
}

WG_EXPORT int execlp(const char *file, const char *arg, ...) {
    va_list ap;
    WG_VA_ARGV(arg, argv, ap);
    va_end(ap);
    return execvpe(file, argv, environ);
}

/* execle(path, arg0, ..., NULL, envp): the exec call that takes an explicit environment. */
WG_EXPORT int execle(const char *path, const char *arg, ...) {
    va_list ap;
    WG_VA_ARGV(arg, argv, ap);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, argv, envp);
}

/* posix_spawn reports a refused exec as its return value, as glibc does a failed one. */
WG_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                          const posix_spawnattr_t *attr, char *const argv[],
                          char *const envp[]) {
    if (real_spawn == NULL) return ENOSYS;
    int err = wg_exec_check_at(path, 0, NULL);
    if (err == WG_HANDOFF) {
        char *hargv[wg_argc(argv) + 5];
        char **ha = wg_helper_argv(path, argv, hargv);
        WITH_ENV(envp, env, real_spawn(pid, ha[0], fa, attr, ha, env));
    }
    if (err != 0) return err;
    WITH_ENV(envp, env, real_spawn(pid, path, fa, attr, argv, env));
}

WG_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                           const posix_spawnattr_t *attr, char *const argv[],
                           char *const envp[]) {
    if (real_spawnp == NULL) return ENOSYS;
    char found[PATH_MAX];
    int err = wg_exec_check_at(file, 1, found);
    if (err == WG_HANDOFF) {
        char *hargv[wg_argc(argv) + 5];
        char **ha = wg_helper_argv(found, argv, hargv);
        WITH_ENV(envp, env, real_spawn(pid, ha[0], fa, attr, ha, env));
    }
    if (err != 0) return err;
    WITH_ENV(envp, env, real_spawnp(pid, file, fa, attr, argv, env));
}
