/*
 * kernel/compat/compat.h -- what the drop-in Xen libraries share.
 *
 * kernel/compat builds libxengnttab.so.1, libxenevtchn.so.1 and a minimal
 * libxenctrl.so.4.17 over the emulated hypervisor, so that unmodified
 * programs linked with Debian's libxenvchan (vchan-socket-proxy, Qubes'
 * tools, our tests' C peer) run on it: put the build directory first on
 * LD_LIBRARY_PATH (`vchan sim run` does).  Each library carries its own copy
 * of the device layer (kernel/common.c, sim.c, xen.c); its version script
 * exports only the Xen API, with the symbol versions of Debian's libraries.
 *
 * The process's emulated domain is $VCHAN_DOMID (default 0) and the
 * emulator is found through $VCHAN_SIM_DIR, exactly as for vchan's Python
 * side.  Loggers are accepted and ignored.  $VCHAN_COMPAT_TRACE=1 prints
 * every call and its result to stderr.
 */
#ifndef VCHAN_COMPAT_H
#define VCHAN_COMPAT_H

#include <errno.h>
#include <stdint.h>

#include "../kernel.h"

/* The emulated domain of this process: $VCHAN_DOMID, default 0.  -1 with
 * errno EINVAL if the variable is malformed. */
int compat_domid(void);

/* Turn a vk_* result (>= 0 or -errno) into the Xen libraries' convention:
 * the value, or -1 with errno set. */
static inline int compat_ret(int rc)
{
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return rc;
}

/* Tracing ($VCHAN_COMPAT_TRACE).  Keeps errno. */
int compat_tracing(void);
void compat_trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* One line on stderr, traced or not: a failure the program will not explain. */
void compat_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define TRACE(...) do { if (compat_tracing()) compat_trace(__VA_ARGS__); } while (0)

#endif /* VCHAN_COMPAT_H */
