/*
 * kernel/xen.c -- the device layer on the real Linux Xen devices.
 *
 * /dev/xen/gntalloc shares our pages with a peer domain, /dev/xen/gntdev
 * maps a peer's, /dev/xen/evtchn carries event channels.  The ioctl ABI
 * comes from the kernel's own uapi headers (<xen/gntalloc.h>, <xen/gntdev.h>,
 * <xen/evtchn.h>, Debian's linux-libc-dev), so this file builds on every
 * install; it only runs where the devices exist.
 *
 * Conventions kept from libxengnttab / libxenevtchn:
 *   - devices are opened O_RDWR | O_CLOEXEC (evtchn also O_NONBLOCK, so the
 *     pollable fd never blocks an event loop);
 *   - gntalloc: ALLOC_GREF, optional SET_UNMAP_NOTIFY, mmap; the grants live
 *     until the pages are unmapped and DEALLOC_GREF'd (or the handle closed);
 *   - gntdev mmap may fail with EAGAIN (paged-out grant): retry;
 *   - ENOTTY from GNTDEV_SET_MAX_GRANTS means "no limit" on current kernels.
 *
 * Where the devices alone would not keep the device layer's rules (those the
 * emulator keeps, tests/test_devices.py on the Xen rig), this file does:
 *   - every gntdev mapping is made on a gntdev file of its own, closed as
 *     soon as the mapping exists: the mapping alone then holds the grants
 *     (munmap or exit is the whole teardown), whatever the handle does;
 *   - gntdev mmaps a MAP_GRANT_REF index only once, so another view of
 *     mapped pages is a new mapping of the same grants; gntalloc mmaps an
 *     index as often as asked while it is allocated, so shared pages keep
 *     theirs until they are unmapped;
 *   - a read-only mapping comes from a read-only file: without VM_MAYWRITE
 *     no mprotect() can make it writable (gntdev would let it try);
 *   - Xen refuses every bad grant map alike (GNTST_general_error, EINVAL
 *     from gntdev); a writable map of a read-only grant is told apart by
 *     mapping it read-only instead, and fails with EPERM as on the emulator;
 *   - EVTCHNOP_alloc_unbound does not check that the remote domain exists:
 *     binding for a missing domain is refused here with ESRCH.
 */
#define _GNU_SOURCE
#include "kernel.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* The uapi headers use the hypervisor's names without defining them. */
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;

#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>

static const char *device_path(int kind)
{
    switch (kind) {
    case VK_GNTSHR:
        return "/dev/xen/gntalloc";
    case VK_GNTTAB:
        return "/dev/xen/gntdev";
    case VK_EVTCHN:
        return "/dev/xen/evtchn";
    default:
        return NULL;
    }
}

static int xen_open(struct vk_dev *d, int kind)
{
    const char *path = device_path(kind);
    int flags = O_RDWR | O_CLOEXEC | (kind == VK_EVTCHN ? O_NONBLOCK : 0);

    if (!path)
        return -EINVAL;
    d->fd = open(path, flags);
    if (d->fd < 0)
        return -errno;
    d->epfd = -1;
    d->priv = NULL;
    return 0;
}

static void xen_close(struct vk_dev *d)
{
    if (d->fd >= 0)
        close(d->fd);
    d->fd = -1;
}

static int xioctl(int fd, unsigned long req, void *arg)
{
    int rc;

    do {
        rc = ioctl(fd, req, arg);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -errno : rc;
}

/* mmap of a grant mapping may say EAGAIN while the hypervisor pages the
 * granted frame back in: retry for a while, as libxengnttab does. */
static void *mmap_retry(size_t len, int prot, int fd, off_t offset)
{
    struct timespec pause = { 0, 1000000 };    /* 1 ms */
    void *p;

    for (int tries = 0; tries < 1000; tries++) {
        p = mmap(NULL, len, prot, MAP_SHARED, fd, offset);
        if (p != MAP_FAILED || errno != EAGAIN)
            return p;
        nanosleep(&pause, NULL);
    }
    return MAP_FAILED;
}

/* Fill an unmap notification (gntalloc's and gntdev's structures differ
 * only in name): clear the byte at base + offset and/or signal the port when
 * the last mapping of the pages goes. */
#define FILL_UNMAP_NOTIFY(n, base, offset, port) do {                         \
        memset(&(n), 0, sizeof(n));                                             \
        (n).index = (base) + ((offset) >= 0 ? (uint64_t)(offset) : 0);          \
        if ((offset) >= 0)                                                      \
            (n).action |= UNMAP_NOTIFY_CLEAR_BYTE;                              \
        if ((port) >= 0) {                                                      \
            (n).action |= UNMAP_NOTIFY_SEND_EVENT;                              \
            (n).event_channel_port = (uint32_t)(port);                          \
        }                                                                       \
    } while (0)

static void gntalloc_dealloc(int fd, uint64_t index, uint32_t count)
{
    struct ioctl_gntalloc_dealloc_gref dealloc;

    dealloc.index = index;
    dealloc.count = count;
    xioctl(fd, IOCTL_GNTALLOC_DEALLOC_GREF, &dealloc);
}

static int xen_share(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
                     uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m)
{
    struct ioctl_gntalloc_alloc_gref *arg;
    size_t len = (size_t)count * VK_PAGE_SIZE;
    void *addr = MAP_FAILED;
    int rc;

    arg = calloc(1, sizeof(*arg) + count * sizeof(arg->gref_ids[0]));
    if (!arg)
        return -ENOMEM;
    arg->domid = (uint16_t)domid;
    arg->flags = writable ? GNTALLOC_FLAG_WRITABLE : 0;
    arg->count = count;
    rc = xioctl(d->fd, IOCTL_GNTALLOC_ALLOC_GREF, arg);
    if (rc < 0)
        goto out;
    if (notify_offset >= 0 || notify_port >= 0) {
        struct ioctl_gntalloc_unmap_notify notify;
        FILL_UNMAP_NOTIFY(notify, arg->index, notify_offset, notify_port);
        rc = xioctl(d->fd, IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, &notify);
        if (rc < 0)
            goto dealloc;
    }
    addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, (off_t)arg->index);
    if (addr == MAP_FAILED) {
        rc = -errno;
        goto dealloc;
    }
    /* The index stays allocated for more views (xen_map_view) until
     * xen_unmap; the grants live as long as it or any mapping does. */
    memcpy(refs, arg->gref_ids, count * sizeof(refs[0]));
    m->views[0] = addr;
    m->nviews = 1;
    m->index = arg->index;
    m->token = -1;
    goto out;
dealloc:
    gntalloc_dealloc(d->fd, arg->index, count);
out:
    free(arg);
    return rc;
}

/* The grants of a gntdev mapping, kept for more views of it. */
struct xen_grants {
    uint32_t count;
    struct ioctl_gntdev_grant_ref refs[];
};

/* Map count grants on a gntdev file of their own, closed before returning:
 * from then on the mapping alone holds them (munmap or exit ends it).  A
 * read-only mapping comes from a read-only file, so it never has
 * VM_MAYWRITE.  The unmap notification is set before the file closes. */
static int map_grants(const struct xen_grants *g, int writable, int notify_offset,
                      int notify_port, void **addr)
{
    struct ioctl_gntdev_map_grant_ref *arg;
    size_t len = (size_t)g->count * VK_PAGE_SIZE;
    void *p;
    int fd, rc;

    fd = open("/dev/xen/gntdev", (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    arg = calloc(1, sizeof(*arg) + g->count * sizeof(arg->refs[0]));
    if (!arg) {
        rc = -ENOMEM;
        goto out;
    }
    arg->count = g->count;
    memcpy(arg->refs, g->refs, g->count * sizeof(arg->refs[0]));
    rc = xioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg);
    if (rc < 0)
        goto out;
    p = mmap_retry(len, PROT_READ | (writable ? PROT_WRITE : 0), fd, (off_t)arg->index);
    if (p == MAP_FAILED) {
        rc = -errno;
        goto out;       /* closing the file releases the grant index */
    }
    if (notify_offset >= 0 || notify_port >= 0) {
        struct ioctl_gntdev_unmap_notify notify;
        FILL_UNMAP_NOTIFY(notify, arg->index, notify_offset, notify_port);
        rc = xioctl(fd, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &notify);
        if (rc < 0) {
            munmap(p, len);
            goto out;
        }
    }
    *addr = p;
out:
    free(arg);
    close(fd);
    return rc;
}

static int xen_map(struct vk_dev *d, uint32_t count, const uint32_t *domids,
                   const uint32_t *refs, int writable, int notify_offset, int notify_port,
                   struct vk_map *m)
{
    struct xen_grants *g;
    void *addr;
    int rc;

    (void)d;
    g = calloc(1, sizeof(*g) + count * sizeof(g->refs[0]));
    if (!g)
        return -ENOMEM;
    g->count = count;
    for (uint32_t i = 0; i < count; i++) {
        g->refs[i].domid = domids[i];
        g->refs[i].ref = refs[i];
    }
    rc = map_grants(g, writable, notify_offset, notify_port, &addr);
    if (rc == -EINVAL && writable && map_grants(g, 0, -1, -1, &addr) == 0) {
        /* Ours, and mappable read-only: the grant is read-only. */
        munmap(addr, (size_t)count * VK_PAGE_SIZE);
        rc = -EPERM;
    }
    if (rc < 0) {
        free(g);
        return rc;
    }
    m->views[0] = addr;
    m->nviews = 1;
    m->index = 0;
    m->token = -1;
    m->xen = g;
    return 0;
}

static int xen_map_view(struct vk_map *m, void **addr)
{
    void *p;

    if (!m->shared) {
        if (!m->xen)
            return -EBADF;
        return map_grants(m->xen, m->writable, -1, -1, addr);
    }
    /* Our own pages: mmap their gntalloc index again (allocated until
     * xen_unmap, or until the handle is closed). */
    if (!m->dev || m->dev->fd < 0)
        return -EBADF;
    p = mmap(NULL, (size_t)m->count * VK_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
             m->dev->fd, (off_t)m->index);
    if (p == MAP_FAILED)
        return -errno;
    *addr = p;
    return 0;
}

static int xen_unmap(struct vk_map *m)
{
    size_t len = (size_t)m->count * VK_PAGE_SIZE;

    for (int i = 0; i < m->nviews; i++)
        munmap(m->views[i], len);
    m->nviews = 0;
    if (m->shared) {
        /* Our index goes too (if the handle still has it: a closed handle,
         * or a forked child's close, already let it go). */
        if (m->dev && m->dev->fd >= 0)
            gntalloc_dealloc(m->dev->fd, m->index, m->count);
    } else {
        free(m->xen);
        m->xen = NULL;
    }
    return 0;
}

static int xen_set_max_grants(struct vk_dev *d, uint32_t count)
{
    struct ioctl_gntdev_set_max_grants arg = { count };
    int rc = xioctl(d->fd, IOCTL_GNTDEV_SET_MAX_GRANTS, &arg);

    return rc == -ENOTTY ? 0 : rc;
}

static int xen_bind_interdomain(struct vk_dev *d, uint32_t remote_domid, uint32_t remote_port)
{
    struct ioctl_evtchn_bind_interdomain arg = { remote_domid, remote_port };

    return xioctl(d->fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, &arg);
}

static int xen_unbind(struct vk_dev *d, uint32_t port)
{
    struct ioctl_evtchn_unbind arg = { port };

    return xioctl(d->fd, IOCTL_EVTCHN_UNBIND, &arg);
}

static int xen_bind_unbound(struct vk_dev *d, uint32_t remote_domid)
{
    struct ioctl_evtchn_bind_unbound_port arg = { remote_domid };
    int rc;

    /* Xen allocates a port for any remote domid, existing or not.  Ask
     * first: port 0 of a domain is reserved, so binding it fails with ESRCH
     * when there is no such domain and EINVAL when there is. */
    rc = xen_bind_interdomain(d, remote_domid, 0);
    if (rc == -ESRCH)
        return rc;
    if (rc >= 0)
        xen_unbind(d, (uint32_t)rc);   /* never expected: port 0 is not bindable */
    return xioctl(d->fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &arg);
}

static int xen_notify(struct vk_dev *d, uint32_t port)
{
    struct ioctl_evtchn_notify arg = { port };

    return xioctl(d->fd, IOCTL_EVTCHN_NOTIFY, &arg);
}

static int xen_pending(struct vk_dev *d)
{
    uint32_t port;
    ssize_t n;

    do {
        n = read(d->fd, &port, sizeof(port));
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n != sizeof(port))
        return -EIO;
    return (int)port;
}

static int xen_unmask(struct vk_dev *d, uint32_t port)
{
    ssize_t n;

    do {
        n = write(d->fd, &port, sizeof(port));
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : 0;
}

static int xen_take_events(struct vk_dev *d, uint32_t *ports, int max)
{
    ssize_t n, w;

    /* One read takes every queued port; writing them back unmasks them. */
    do {
        n = read(d->fd, ports, (size_t)max * sizeof(uint32_t));
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    if (n % sizeof(uint32_t))
        return -EIO;
    do {
        w = write(d->fd, ports, (size_t)n);
    } while (w < 0 && errno == EINTR);
    if (w < 0)
        return -errno;
    return (int)(n / sizeof(uint32_t));
}

static int xen_fd(struct vk_dev *d)
{
    return d->fd;
}

const struct vk_ops vk_xen_ops = {
    .name = "xen",
    .open = xen_open,
    .close = xen_close,
    .share = xen_share,
    .map = xen_map,
    .map_view = xen_map_view,
    .unmap = xen_unmap,
    .set_max_grants = xen_set_max_grants,
    .bind_unbound = xen_bind_unbound,
    .bind_interdomain = xen_bind_interdomain,
    .unbind = xen_unbind,
    .notify = xen_notify,
    .pending = xen_pending,
    .unmask = xen_unmask,
    .take_events = xen_take_events,
    .fd = xen_fd,
};
