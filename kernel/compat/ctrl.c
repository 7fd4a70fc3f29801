/*
 * kernel/compat/ctrl.c -- a minimal libxenctrl.so.4.17 for the emulator.
 *
 * Only what libxenvchan programs use beyond libxenvchan itself:
 * vchan-socket-proxy opens an xc handle to ask xc_domain_getinfo() whether
 * the server's domain still exists while it waits for it.  The real
 * library needs /dev/xen/privcmd; this one asks the emulator (CONTROL
 * "domains", docs/sim-protocol.md), where a domain exists while a process
 * of it is connected.  Everything else of libxenctrl is absent: a program
 * that needs more fails to load (an undefined symbol), rather than
 * misbehaving.
 */
#define _GNU_SOURCE
#include "compat.h"

#include <stdlib.h>
#include <string.h>

#include <xenctrl.h>

struct xc_interface_core {
    int domid;                  /* ours, for tracing */
};

#define REPLY_MAX 65536           /* the emulator's largest message */

/* The emulator's list of existing domains, ascending; the count or -1. */
static int list_domains(uint32_t *out, int cap)
{
    char *reply = malloc(REPLY_MAX + 1);
    const char *p;
    int n = 0, rc;

    if (!reply) {
        errno = ENOMEM;
        return -1;
    }
    rc = vk_sim_control("{\"cmd\": \"domains\"}", reply, REPLY_MAX + 1);
    /* {"domains": [0, 1, 5]} */
    p = rc < 0 ? NULL : strchr(reply, '[');
    if (!p) {
        free(reply);
        errno = rc < 0 ? -rc : EPROTO;
        return -1;
    }
    for (p++; *p && *p != ']';) {
        char *end;
        unsigned long v = strtoul(p, &end, 10);
        if (end == p) {
            p++;                /* ", " */
            continue;
        }
        if (n < cap)
            out[n++] = (uint32_t)v;
        p = end;
    }
    free(reply);
    return n;
}

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    uint32_t probe;
    xc_interface *xch;
    int domid = compat_domid();

    /* Like the real one, fail where there is no hypervisor to talk to. */
    if (domid < 0 || list_domains(&probe, 1) < 0)
        return NULL;
    xch = calloc(1, sizeof(*xch));
    if (!xch) {
        errno = ENOMEM;
        return NULL;
    }
    xch->domid = domid;
    TRACE("xc_interface_open() = %p", (void *)xch);
    return xch;
}

int xc_interface_close(xc_interface *xch)
{
    free(xch);
    return 0;
}

int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms,
                      xc_dominfo_t *info)
{
    const int cap = VK_DOMID_FIRST_RESERVED;     /* every possible domain id */
    uint32_t *domids = malloc(cap * sizeof(*domids));
    int n, got = 0;

    if (!domids) {
        errno = ENOMEM;
        return -1;
    }
    n = list_domains(domids, cap);
    /* From the first existing domain >= first_domid on, as Xen enumerates
     * them: callers asking for one must check it is the one they meant. */
    for (int i = 0; i < n && (unsigned)got < max_doms; i++) {
        if (domids[i] < first_domid)
            continue;
        memset(&info[got], 0, sizeof(info[got]));
        info[got].domid = domids[i];
        info[got].running = 1;
        info[got].nr_online_vcpus = 1;
        got++;
    }
    free(domids);
    if (n < 0)
        return -1;
    TRACE("xc_domain_getinfo(from %u, max %u) = %d%s", first_domid, max_doms, got,
          got && info[0].domid == first_domid ? " (it exists)" : "");
    return got;
}
