/* exec hooks: the program's children stay wrapped even when it clears its environment.
 *
 * A wrapped shell running `env -i cmd`, or a program that drops LD_PRELOAD before exec, would
 * start a child without the shim, whose traffic would then leave on the host network. So the
 * exec family and posix_spawn put back what the shim needs (LD_PRELOAD with this library
 * first, and the WRAPGUARD_* variables), as captured when the shim loaded. Only when the shim
 * is active (WRAPGUARD_CTL was set); exec is not a hot path, so allocation is fine here.
 * Not covered: glibc-internal execs (system(), popen(), execl() and execlp() pass `environ`,
 * which still has them unless the program removed them itself), and setuid children (the
 * loader drops LD_PRELOAD; --doctor reports those). The fixed environment is built on the
 * caller's stack: these hooks may run in a vfork() child, where malloc is not allowed.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shim.h"

extern char **environ;

#define WG_ENV_LEN 4096

static const char *const wg_env_names[] = {
    "WRAPGUARD_CTL",    "WRAPGUARD_SECRET", "WRAPGUARD_UDP",
    "WRAPGUARD_DNS",    "WRAPGUARD_ADDRS",  "WRAPGUARD_CONNECT_TIMEOUT",
};
#define WG_NVARS (sizeof wg_env_names / sizeof wg_env_names[0])

static char wg_env_saved[WG_NVARS][WG_ENV_LEN]; /* "NAME=value", or "" when unset */
static char wg_shim_path[WG_ENV_LEN];
static int wg_env_ready;

__attribute__((constructor)) static void wg_exec_init(void) {
    const char *ctl = getenv("WRAPGUARD_CTL");
    if (ctl == NULL || *ctl == '\0') return;
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

typedef int (*execve_fn)(const char *, char *const[], char *const[]);
typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);
static execve_fn real_execve, real_execvpe;
static spawn_fn real_spawn, real_spawnp;

__attribute__((constructor)) static void wg_exec_resolve(void) {
    real_execve = (execve_fn)dlsym(RTLD_NEXT, "execve");
    real_execvpe = (execve_fn)dlsym(RTLD_NEXT, "execvpe");
    real_spawn = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawn");
    real_spawnp = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawnp");
}

static int no_symbol(void) {
    errno = ENOSYS;
    return -1;
}

WG_EXPORT int execve(const char *path, char *const argv[], char *const envp[]) {
    if (real_execve == NULL) return no_symbol();
    WITH_ENV(envp, env, real_execve(path, argv, env));
}

WG_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[]) {
    if (real_execvpe == NULL) return no_symbol();
    WITH_ENV(envp, env, real_execvpe(file, argv, env));
}

WG_EXPORT int execv(const char *path, char *const argv[]) {
    return execve(path, argv, environ);
}

WG_EXPORT int execvp(const char *file, char *const argv[]) {
    return execvpe(file, argv, environ);
}

/* execle(path, arg0, ..., NULL, envp): the exec call that takes an explicit environment. */
WG_EXPORT int execle(const char *path, const char *arg, ...) {
    va_list ap;
    size_t n = 1;
    va_start(ap, arg);
    while (va_arg(ap, const char *) != NULL) n++;
    va_end(ap);
    char *argv[n + 1];
    argv[0] = (char *)arg;
    va_start(ap, arg);
    for (size_t i = 1; i <= n; i++) argv[i] = va_arg(ap, char *); /* argv[n] is the NULL */
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, argv, envp);
}

WG_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                          const posix_spawnattr_t *attr, char *const argv[],
                          char *const envp[]) {
    if (real_spawn == NULL) return ENOSYS;
    WITH_ENV(envp, env, real_spawn(pid, path, fa, attr, argv, env));
}

WG_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                           const posix_spawnattr_t *attr, char *const argv[],
                           char *const envp[]) {
    if (real_spawnp == NULL) return ENOSYS;
    WITH_ENV(envp, env, real_spawnp(pid, file, fa, attr, argv, env));
}
