/* exec hooks: the program's children stay wrapped even when it clears its environment.
 *
 * A wrapped shell running `env -i cmd`, or a program that drops LD_PRELOAD before exec, would
 * start a child without the shim, whose traffic would then leave on the host network. So the
 * exec family and posix_spawn put back what the shim needs (LD_PRELOAD with this library
 * first, and the WRAPGUARD_* variables), as captured when the shim loaded. Only when the shim
 * is active (WRAPGUARD_CTL was set); exec is not a hot path, so allocation is fine here.
 * Not covered: glibc-internal execs (system(), popen() pass `environ`, which still has them
 * unless the program removed them itself), execl*-family calls (glibc routes them to internal
 * symbols), and setuid children (the loader drops LD_PRELOAD; --doctor reports those).
 */
#include <dlfcn.h>
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

/* envp with what the shim needs put back; envp itself when nothing is missing. The result
 * (and any string made for it) is in one allocation, freed by wg_env_free. */
static char **wg_env_fix(char *const envp[]) {
    if (!wg_env_ready) return (char **)envp;
    size_t n = 0;
    while (envp != NULL && envp[n] != NULL) n++;
    int missing[WG_NVARS];
    int any = 0;
    for (size_t i = 0; i < WG_NVARS; i++) {
        missing[i] = 0;
        if (wg_env_saved[i][0] == '\0') continue;
        size_t nl = strlen(wg_env_names[i]);
        missing[i] = 1;
        for (size_t k = 0; k < n; k++)
            if (has_name(envp[k], wg_env_names[i], nl)) missing[i] = 0;
        any |= missing[i];
    }
    const char *preload = NULL;
    for (size_t k = 0; k < n; k++)
        if (has_name(envp[k], "LD_PRELOAD", 10)) preload = envp[k] + 11;
    int fix_preload = preload == NULL || !preload_has_shim(preload);
    if (!any && !fix_preload) return (char **)envp;

    size_t plen = 11 + strlen(wg_shim_path) + 1 + (preload ? strlen(preload) : 0) + 1;
    size_t bytes = (n + WG_NVARS + 2) * sizeof(char *) + plen;
    char **out = malloc(bytes);
    if (out == NULL) return (char **)envp;
    char *pre = (char *)(out + n + WG_NVARS + 2);
    size_t m = 0;
    for (size_t k = 0; k < n; k++)
        if (!(fix_preload && has_name(envp[k], "LD_PRELOAD", 10))) out[m++] = envp[k];
    for (size_t i = 0; i < WG_NVARS; i++)
        if (missing[i]) out[m++] = wg_env_saved[i];
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

static void wg_env_free(char **fixed, char *const envp[]) {
    if (fixed != (char **)envp) free(fixed);
}

#define NEXT(type, name) ((type)dlsym(RTLD_NEXT, name))

WG_EXPORT int execve(const char *path, char *const argv[], char *const envp[]) {
    typedef int (*fn)(const char *, char *const[], char *const[]);
    fn real = NEXT(fn, "execve");
    char **env = wg_env_fix(envp);
    int rc = real(path, argv, env);
    wg_env_free(env, envp);
    return rc;
}

WG_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[]) {
    typedef int (*fn)(const char *, char *const[], char *const[]);
    fn real = NEXT(fn, "execvpe");
    char **env = wg_env_fix(envp);
    int rc = real(file, argv, env);
    wg_env_free(env, envp);
    return rc;
}

WG_EXPORT int execv(const char *path, char *const argv[]) {
    return execve(path, argv, environ);
}

WG_EXPORT int execvp(const char *file, char *const argv[]) {
    return execvpe(file, argv, environ);
}

typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);

WG_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                          const posix_spawnattr_t *attr, char *const argv[],
                          char *const envp[]) {
    spawn_fn real = NEXT(spawn_fn, "posix_spawn");
    char **env = wg_env_fix(envp);
    int rc = real(pid, path, fa, attr, argv, env);
    wg_env_free(env, envp);
    return rc;
}

WG_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                           const posix_spawnattr_t *attr, char *const argv[],
                           char *const envp[]) {
    spawn_fn real = NEXT(spawn_fn, "posix_spawnp");
    char **env = wg_env_fix(envp);
    int rc = real(pid, file, fa, attr, argv, env);
    wg_env_free(env, envp);
    return rc;
}
