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
 *   - gntalloc: ALLOC_GREF, optional SET_UNMAP_NOTIFY, mmap, then
 *     DEALLOC_GREF at once: the grants live until the pages are unmapped;
 *   - gntdev mmap may fail with EAGAIN (paged-out grant): retry;
 *   - ENOTTY from GNTDEV_SET_MAX_GRANTS means "no limit" on current kernels.
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

static int xen_share(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
                     uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m)
{
    struct ioctl_gntalloc_alloc_gref *arg;
    struct ioctl_gntalloc_dealloc_gref dealloc;
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
    if (addr == MAP_FAILED)
        rc = -errno;
dealloc:
    /* Done with the index: the grants now live exactly as long as the
     * mapping (or die here if mmap failed). */
    dealloc.index = arg->index;
    dealloc.count = count;
    xioctl(d->fd, IOCTL_GNTALLOC_DEALLOC_GREF, &dealloc);
    if (rc == 0) {
        memcpy(refs, arg->gref_ids, count * sizeof(refs[0]));
        m->views[0] = addr;
        m->nviews = 1;
        m->index = arg->index;
        m->token = -1;
    }
out:
    free(arg);
    return rc;
}

static int xen_map(struct vk_dev *d, uint32_t count, const uint32_t *domids,
                   const uint32_t *refs, int writable, int notify_offset, int notify_port,
                   struct vk_map *m)
{
    struct ioctl_gntdev_map_grant_ref *arg;
    struct ioctl_gntdev_unmap_grant_ref unmap;
    size_t len = (size_t)count * VK_PAGE_SIZE;
    void *addr;
    int rc;

    arg = calloc(1, sizeof(*arg) + count * sizeof(arg->refs[0]));
    if (!arg)
        return -ENOMEM;
    arg->count = count;
    for (uint32_t i = 0; i < count; i++) {
        arg->refs[i].domid = domids[i];
        arg->refs[i].ref = refs[i];
    }
    rc = xioctl(d->fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg);
    if (rc < 0)
        goto out;
    addr = mmap_retry(len, PROT_READ | (writable ? PROT_WRITE : 0), d->fd, (off_t)arg->index);
    if (addr == MAP_FAILED) {
        rc = -errno;
        goto unmap;
    }
    if (notify_offset >= 0 || notify_port >= 0) {
        struct ioctl_gntdev_unmap_notify notify;
        FILL_UNMAP_NOTIFY(notify, arg->index, notify_offset, notify_port);
        rc = xioctl(d->fd, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &notify);
        if (rc < 0) {
            munmap(addr, len);
            goto unmap;
        }
    }
    m->views[0] = addr;
    m->nviews = 1;
    m->index = arg->index;
    m->token = -1;
    goto out;
unmap:
    unmap.index = arg->index;
    unmap.count = count;
    unmap.pad = 0;
    xioctl(d->fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &unmap);
out:
    free(arg);
    return rc;
}

static int xen_map_view(struct vk_map *m, void **addr)
{
    void *p;

    /* gntdev's index stays valid until UNMAP_GRANT_REF: mmap it again.
     * gntalloc's index is released right after the first mmap. */
    if (m->shared || !m->dev || m->dev->fd < 0)
        return -EOPNOTSUPP;
    p = mmap_retry((size_t)m->count * VK_PAGE_SIZE, PROT_READ | (m->writable ? PROT_WRITE : 0),
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
    if (!m->shared && m->dev && m->dev->fd >= 0) {
        struct ioctl_gntdev_unmap_grant_ref unmap = { m->index, m->count, 0 };
        return xioctl(m->dev->fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &unmap);
    }
    return 0;
}

static int xen_set_max_grants(struct vk_dev *d, uint32_t count)
{
    struct ioctl_gntdev_set_max_grants arg = { count };
    int rc = xioctl(d->fd, IOCTL_GNTDEV_SET_MAX_GRANTS, &arg);

    return rc == -ENOTTY ? 0 : rc;
}

static int xen_bind_unbound(struct vk_dev *d, uint32_t remote_domid)
{
    struct ioctl_evtchn_bind_unbound_port arg = { remote_domid };

    return xioctl(d->fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &arg);
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
