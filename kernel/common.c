/*
 * kernel/common.c -- backend-neutral entry points of the device layer.
 *
 * Argument checks that do not depend on the backend live here, so both
 * backends refuse the same mistakes with the same errno.
 */
#define _GNU_SOURCE
#include "kernel.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* More pages than a grant table could ever hand out at once. */
#define VK_MAX_PAGES (1u << 20)

const struct vk_ops *vk_backend(const char *name)
{
    if (name && strcmp(name, "xen") == 0)
        return &vk_xen_ops;
    if (name && strcmp(name, "sim") == 0)
        return &vk_sim_ops;
    return NULL;
}

int vk_open(struct vk_dev *d, const struct vk_ops *ops, int kind, uint32_t domid)
{
    if (!ops || kind < VK_GNTSHR || kind > VK_EVTCHN)
        return -EINVAL;
    memset(d, 0, sizeof(*d));
    d->ops = ops;
    d->kind = kind;
    d->fd = d->epfd = -1;
    d->pid = getpid();
    d->domid = domid;
    return ops->open(d, kind);
}

void vk_close(struct vk_dev *d)
{
    if (d->ops && d->fd >= 0)
        d->ops->close(d);
}

static int usable(struct vk_dev *d, int kind)
{
    if (!d->ops || d->fd < 0)
        return -EBADF;
    if (d->kind != kind)
        return -EINVAL;
    return 0;
}

static int check_notify(uint32_t count, int notify_offset, int notify_port)
{
    if (notify_offset < -1 || (notify_offset >= 0 &&
                               (uint64_t)notify_offset >= (uint64_t)count * VK_PAGE_SIZE))
        return -EINVAL;
    if (notify_port < -1)
        return -EINVAL;
    return 0;
}

static void new_map(struct vk_map *m, struct vk_dev *d, uint32_t count, int writable,
                    int shared)
{
    memset(m, 0, sizeof(*m));
    m->dev = d;
    m->count = count;
    m->writable = writable ? 1 : 0;
    m->shared = shared;
    m->token = -1;
}

int vk_share(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
             uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m)
{
    int rc = usable(d, VK_GNTSHR);

    if (rc)
        return rc;
    if (count == 0 || count > VK_MAX_PAGES || domid > VK_DOMID_FIRST_RESERVED)
        return -EINVAL;
    if ((rc = check_notify(count, notify_offset, notify_port)))
        return rc;
    new_map(m, d, count, writable, 1);
    return d->ops->share(d, domid, count, writable, refs, notify_offset, notify_port, m);
}

int vk_map(struct vk_dev *d, uint32_t count, const uint32_t *domids, const uint32_t *refs,
           int writable, int notify_offset, int notify_port, struct vk_map *m)
{
    int rc = usable(d, VK_GNTTAB);

    if (rc)
        return rc;
    if (count == 0 || count > VK_MAX_PAGES)
        return -EINVAL;
    if ((rc = check_notify(count, notify_offset, notify_port)))
        return rc;
    new_map(m, d, count, writable, 0);
    return d->ops->map(d, count, domids, refs, writable, notify_offset, notify_port, m);
}

int vk_map_view(struct vk_map *m, void **addr)
{
    int rc;

    if (m->nviews == 0)
        return -EBADF;
    if (m->nviews >= VK_MAX_VIEWS)
        return -ENOMEM;
    rc = m->dev->ops->map_view(m, addr);
    if (rc == 0)
        m->views[m->nviews++] = *addr;
    return rc;
}

int vk_unmap(struct vk_map *m)
{
    if (m->nviews == 0)
        return -EBADF;
    return m->dev->ops->unmap(m);
}

int vk_release(struct vk_map *m)
{
    if (!m->dev || !m->dev->ops)
        return -EBADF;
    m->nviews = 0;              /* gone already: nothing to munmap */
    return m->dev->ops->unmap(m);
}

int vk_set_max_grants(struct vk_dev *d, uint32_t count)
{
    int rc = usable(d, VK_GNTTAB);

    return rc ? rc : d->ops->set_max_grants(d, count);
}

int vk_bind_unbound(struct vk_dev *d, uint32_t remote_domid)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->bind_unbound(d, remote_domid);
}

int vk_bind_interdomain(struct vk_dev *d, uint32_t remote_domid, uint32_t remote_port)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->bind_interdomain(d, remote_domid, remote_port);
}

int vk_unbind(struct vk_dev *d, uint32_t port)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->unbind(d, port);
}

int vk_notify(struct vk_dev *d, uint32_t port)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->notify(d, port);
}

int vk_pending(struct vk_dev *d)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->pending(d);
}

int vk_unmask(struct vk_dev *d, uint32_t port)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->unmask(d, port);
}

int vk_take_events(struct vk_dev *d, uint32_t *ports, int max)
{
    int rc = usable(d, VK_EVTCHN);

    if (rc)
        return rc;
    if (max <= 0)
        return -EINVAL;
    return d->ops->take_events(d, ports, max);
}

int vk_fd(struct vk_dev *d)
{
    int rc = usable(d, VK_EVTCHN);

    return rc ? rc : d->ops->fd(d);
}

int vk_port_fd(struct vk_dev *d, uint32_t port)
{
    int rc = usable(d, VK_EVTCHN);

    if (rc)
        return rc;
    return d->ops->port_fd ? d->ops->port_fd(d, port) : -EOPNOTSUPP;
}

int vk_port_unwatch(struct vk_dev *d, uint32_t port)
{
    int rc = usable(d, VK_EVTCHN);

    if (rc)
        return rc;
    return d->ops->port_unwatch ? d->ops->port_unwatch(d, port) : -EOPNOTSUPP;
}

int vk_fd_consume(int fd)
{
    uint64_t count;

    if (read(fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return -errno;
    return 0;
}
