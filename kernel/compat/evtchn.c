/*
 * kernel/compat/evtchn.c -- libxenevtchn.so.1 over the emulated hypervisor.
 *
 * The API of Xen's libxenevtchn (xenevtchn.h) with Debian's symbol versions
 * (libxenevtchn.map), on the event channels of kernel/sim.c.  What Linux's
 * /dev/xen/evtchn does (tools/libs/evtchn/linux.c, drivers/xen/evtchn.c) is
 * kept:
 *
 *   - xenevtchn_fd() is pollable: readable while a port of the handle has
 *     fired and not been taken by xenevtchn_pending();
 *   - xenevtchn_pending() blocks until a port fires (it is a read() of the
 *     device, opened blocking), unless the descriptor was made O_NONBLOCK:
 *     then -1 with EAGAIN.  The port it returns stays masked -- later events
 *     coalesce into one -- until xenevtchn_unmask();
 *   - unmasking a port the handle does not hold is silently ignored (the
 *     driver's write() skips it); notify and unbind of such a port fail with
 *     ENOTCONN;
 *   - xenevtchn_restrict(domid) once per handle: afterwards only
 *     interdomain binds to that domain are allowed (EACCES otherwise);
 *   - closing the handle unbinds its ports.
 *
 * Not emulated: VIRQs (ENOSYS) and xenevtchn_fdopen (EOPNOTSUPP: there is
 * no device descriptor to adopt).  XENEVTCHN_NO_CLOEXEC is ignored.
 */
#define _GNU_SOURCE
#include "compat.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>

#include <xenevtchn.h>

#define UNRESTRICTED (-1)

struct xenevtchn_handle {
    struct vk_dev dev;
    int restrict_domid;         /* UNRESTRICTED, or the only domain we may bind to */
};

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    xenevtchn_handle *xce;
    int domid = compat_domid(), rc;

    if (domid < 0)
        return NULL;
    xce = calloc(1, sizeof(*xce));
    if (!xce) {
        errno = ENOMEM;
        return NULL;
    }
    xce->restrict_domid = UNRESTRICTED;
    rc = vk_open(&xce->dev, &vk_sim_ops, VK_EVTCHN, (uint32_t)domid);
    TRACE("xenevtchn_open() = %p (%d), domain %d", rc ? NULL : (void *)xce, rc, domid);
    if (rc < 0) {
        free(xce);
        errno = -rc;
        return NULL;
    }
    return xce;
}

xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd,
                                   unsigned open_flags)
{
    errno = EOPNOTSUPP;
    return NULL;
}

int xenevtchn_close(xenevtchn_handle *xce)
{
    TRACE("xenevtchn_close(%p)", (void *)xce);
    if (!xce)
        return 0;
    vk_close(&xce->dev);        /* unbinds its ports */
    free(xce);
    return 0;
}

int xenevtchn_fd(xenevtchn_handle *xce)
{
    return compat_ret(vk_fd(&xce->dev));
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    return compat_ret(vk_notify(&xce->dev, port));
}

xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    int rc = xce->restrict_domid == UNRESTRICTED ? vk_bind_unbound(&xce->dev, domid)
                                                 : -EACCES;

    TRACE("xenevtchn_bind_unbound_port(domain %u) = %d", domid, rc);
    if (rc == -ESRCH)
        /* Xen would grant to a domain that is not there yet; the emulator
         * knows a domain only while a process of it runs.  The program's own
         * error ("No such process") does not say what to do: this does. */
        compat_note("emulated domain %u does not exist: on the emulator a domain exists "
                    "while a process of it runs; start domain %u's program first, or run "
                    "this one with `vchan sim run --peer %u ...`", domid, domid, domid);
    return compat_ret(rc);
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port)
{
    int rc;

    if (xce->restrict_domid != UNRESTRICTED && (uint32_t)xce->restrict_domid != domid)
        rc = -EACCES;
    else
        rc = vk_bind_interdomain(&xce->dev, domid, remote_port);
    TRACE("xenevtchn_bind_interdomain(domain %u, port %u) = %d", domid, remote_port, rc);
    return compat_ret(rc);
}

xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
    errno = xce->restrict_domid == UNRESTRICTED ? ENOSYS : EACCES;
    return -1;
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    int rc = vk_unbind(&xce->dev, port);

    TRACE("xenevtchn_unbind(%u) = %d", port, rc);
    return compat_ret(rc);
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    for (;;) {
        int rc = vk_pending(&xce->dev), fd, flags;
        struct pollfd p;

        if (rc != -EAGAIN)
            return compat_ret(rc);
        fd = vk_fd(&xce->dev);
        flags = fd < 0 ? -1 : fcntl(fd, F_GETFL);
        if (flags < 0 || (flags & O_NONBLOCK))
            return compat_ret(-EAGAIN);
        /* A blocking read() of the device: wait for a port to fire. */
        p.fd = fd;
        p.events = POLLIN;
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            return -1;
    }
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    int rc = vk_unmask(&xce->dev, port);

    return compat_ret(rc == -ENOTCONN ? 0 : rc);
}

int xenevtchn_restrict(xenevtchn_handle *xce, domid_t domid)
{
    if (xce->restrict_domid != UNRESTRICTED) {
        errno = EACCES;
        return -1;
    }
    if (domid == 0 || domid >= DOMID_FIRST_RESERVED) {
        errno = EINVAL;
        return -1;
    }
    xce->restrict_domid = domid;
    return 0;
}
