/*
 * kernel/compat/gnttab.c -- libxengnttab.so.1 over the emulated hypervisor.
 *
 * The whole API of Xen's libxengnttab (xengnttab.h) with Debian's symbol
 * versions (libxengnttab.map), on the device layer of kernel/sim.c:
 *
 *   xengntshr_*   share our pages (gntalloc): vk_share
 *   xengnttab_*   map a peer's pages (gntdev): vk_map
 *
 * Semantics kept from libxengnttab on Linux (tools/libs/gnttab/linux.c):
 *
 *   - An unmap notification is asked for by notify_offset < the mapping's
 *     size (clear that byte) and notify_port != -1 (signal that local port);
 *     either may be absent.  A clear-byte notification on a read-only map
 *     fails (EINVAL), as gntdev refuses it.
 *   - A mapping is read-write iff prot has PROT_WRITE; read-only mappings
 *     can never be written (the emulator hands out read-only descriptors).
 *   - xengnttab_unmap(addr, count) unmaps exactly one earlier mapping, by
 *     its start address, and count must be its size (EINVAL otherwise).
 *   - xengntshr_unshare(addr, count) is munmap(addr, count pages), as on
 *     Linux: what is unmapped ends its grants.
 *   - Mappings survive closing their handle, as an mmap of a closed device
 *     file does; they go when unmapped (or at exit).
 *
 * Pages the program unmaps with plain munmap() -- libxenvchan does so with
 * its ring buffers -- end their grants on Linux when the vma goes.  Here the
 * emulator learns it when this library next looks: every share, map, unmap,
 * unshare and close first releases the mappings whose pages are all gone
 * (mincore() says ENOMEM for each page).
 *
 * Not emulated: grant copy and dma-buf export/import (ENOSYS).
 */
#define _GNU_SOURCE
#include "compat.h"

#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xengnttab.h>

/* xengnttab_handle and xengntshr_handle are both this structure. */
struct xengntdev_handle {
    struct vk_dev dev;          /* VK_GNTTAB or VK_GNTSHR */
    int closed;                 /* closed by its user: freed with its last mapping */
    unsigned nmaps;             /* entries made through it still in the table */
};

/* One share or mapping made through this library. */
struct entry {
    struct vk_map m;            /* m.views[0] is the address the caller got */
    struct xengntdev_handle *h;
    struct entry *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry *entries;

/* ------------------------------------------------------------------ */
/* The table of mappings (lock held).                                  */
/* ------------------------------------------------------------------ */

static void put_handle(struct xengntdev_handle *h)
{
    h->nmaps--;
    if (h->closed && h->nmaps == 0)
        free(h);
}

static void add_entry(struct entry *e, struct xengntdev_handle *h)
{
    e->h = h;
    h->nmaps++;
    e->next = entries;
    entries = e;
}

/* Whether every page of [addr, addr + count pages) is unmapped. */
static int all_unmapped(void *addr, uint32_t count)
{
    unsigned char vec;

    for (uint32_t i = 0; i < count; i++) {
        if (mincore((char *)addr + (size_t)i * VK_PAGE_SIZE, VK_PAGE_SIZE, &vec) == 0 ||
            errno != ENOMEM)
            return 0;
    }
    return 1;
}

/* Release the entries whose pages the program has unmapped itself. */
static void sweep(void)
{
    struct entry **link = &entries;

    while (*link) {
        struct entry *e = *link;
        if (all_unmapped(e->m.views[0], e->m.count)) {
            *link = e->next;
            TRACE("released %p (%u pages), unmapped by the program", e->m.views[0],
                  e->m.count);
            vk_release(&e->m);
            put_handle(e->h);
            free(e);
        } else {
            link = &e->next;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Handles.                                                            */
/* ------------------------------------------------------------------ */

static struct xengntdev_handle *open_handle(int kind)
{
    struct xengntdev_handle *h;
    int domid = compat_domid(), rc;

    if (domid < 0)
        return NULL;
    h = calloc(1, sizeof(*h));
    if (!h) {
        errno = ENOMEM;
        return NULL;
    }
    rc = vk_open(&h->dev, &vk_sim_ops, kind, (uint32_t)domid);
    if (rc < 0) {
        free(h);
        errno = -rc;
        return NULL;
    }
    return h;
}

static int close_handle(struct xengntdev_handle *h)
{
    if (!h)
        return 0;
    pthread_mutex_lock(&lock);
    sweep();                    /* while we can still tell the emulator */
    vk_close(&h->dev);
    h->closed = 1;              /* its mappings stay valid, and keep it */
    if (h->nmaps == 0)
        free(h);
    pthread_mutex_unlock(&lock);
    return 0;
}

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    xengnttab_handle *h = open_handle(VK_GNTTAB);

    TRACE("xengnttab_open() = %p%s", (void *)h, h ? "" : " (failed)");
    return h;
}

int xengnttab_close(xengnttab_handle *xgt)
{
    TRACE("xengnttab_close(%p)", (void *)xgt);
    return close_handle(xgt);
}

int xengnttab_fd(xengnttab_handle *xgt)
{
    return xgt->dev.fd;
}

xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    xengntshr_handle *h = open_handle(VK_GNTSHR);

    TRACE("xengntshr_open() = %p%s", (void *)h, h ? "" : " (failed)");
    return h;
}

int xengntshr_close(xengntshr_handle *xgs)
{
    TRACE("xengntshr_close(%p)", (void *)xgs);
    return close_handle(xgs);
}

int xengntshr_fd(xengntshr_handle *xgs)
{
    return xgs->dev.fd;
}

/* ------------------------------------------------------------------ */
/* Mapping a peer's grants.                                            */
/* ------------------------------------------------------------------ */

static int notify_offset_of(uint32_t notify_offset, uint32_t count)
{
    return (uint64_t)notify_offset < (uint64_t)count * VK_PAGE_SIZE ? (int)notify_offset : -1;
}

static int notify_port_of(evtchn_port_t notify_port)
{
    if (notify_port == (evtchn_port_t)-1)
        return -1;
    return notify_port > INT_MAX ? -2 : (int)notify_port;     /* -2: EINVAL below */
}

static void *map(xengnttab_handle *xgt, uint32_t count, const uint32_t *domids,
                 const uint32_t *refs, int prot, uint32_t notify_offset,
                 evtchn_port_t notify_port)
{
    struct entry *e;
    int rc;

    if (!xgt || count == 0 || !domids || !refs) {
        errno = EINVAL;
        return NULL;
    }
    e = calloc(1, sizeof(*e));
    if (!e) {
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_lock(&lock);
    sweep();
    rc = vk_map(&xgt->dev, count, domids, refs, (prot & PROT_WRITE) != 0,
                notify_offset_of(notify_offset, count), notify_port_of(notify_port), &e->m);
    if (rc == 0)
        add_entry(e, xgt);
    pthread_mutex_unlock(&lock);
    TRACE("map %u grant(s) of domain %u from ref %u%s, notify %d/%d = %p (%d)", count,
          domids[0], refs[0], prot & PROT_WRITE ? " writable" : " read-only",
          notify_offset_of(notify_offset, count), notify_port_of(notify_port),
          rc ? NULL : e->m.views[0], rc);
    if (rc < 0) {
        free(e);
        errno = -rc;
        return NULL;
    }
    return e->m.views[0];
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    return map(xgt, 1, &domid, &ref, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                               uint32_t *refs, int prot)
{
    return map(xgt, count, domids, refs, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot)
{
    uint32_t *domids;
    void *addr;

    if (count == 0 || count > (1u << 20)) {
        errno = EINVAL;
        return NULL;
    }
    domids = malloc((size_t)count * sizeof(*domids));
    if (!domids) {
        errno = ENOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < count; i++)
        domids[i] = domid;
    addr = map(xgt, count, domids, refs, prot, (uint32_t)-1, (evtchn_port_t)-1);
    free(domids);
    return addr;
}

void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                     int prot, uint32_t notify_offset,
                                     evtchn_port_t notify_port)
{
    return map(xgt, 1, &domid, &ref, prot, notify_offset, notify_port);
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    struct entry **link, *e = NULL;
    int rc = -EINVAL;

    pthread_mutex_lock(&lock);
    for (link = &entries; start_address && *link; link = &(*link)->next) {
        if (!(*link)->m.shared && (*link)->m.views[0] == start_address) {
            e = *link;
            break;
        }
    }
    /* Exactly one whole mapping, as GNTDEV_GET_OFFSET_FOR_VADDR checks. */
    if (e && e->m.count == count) {
        *link = e->next;
        rc = vk_unmap(&e->m);
        put_handle(e->h);
        free(e);
    }
    sweep();
    pthread_mutex_unlock(&lock);
    TRACE("xengnttab_unmap(%p, %u) = %d", start_address, count, rc);
    return compat_ret(rc);
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    return compat_ret(vk_set_max_grants(&xgt->dev, nr_grants));
}

/* ------------------------------------------------------------------ */
/* Sharing our pages.                                                  */
/* ------------------------------------------------------------------ */

static void *share(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                   int writable, uint32_t notify_offset, evtchn_port_t notify_port)
{
    struct entry *e;
    int rc;

    if (!xgs || count <= 0 || !refs) {
        errno = EINVAL;
        return NULL;
    }
    e = calloc(1, sizeof(*e));
    if (!e) {
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_lock(&lock);
    sweep();                    /* pages unmapped since no longer count */
    rc = vk_share(&xgs->dev, domid, (uint32_t)count, writable, refs,
                  notify_offset_of(notify_offset, (uint32_t)count),
                  notify_port_of(notify_port), &e->m);
    if (rc == 0)
        add_entry(e, xgs);
    pthread_mutex_unlock(&lock);
    TRACE("share %d page(s) with domain %u%s, notify %d/%d = %p, first ref %u (%d)", count,
          domid, writable ? " writable" : " read-only",
          notify_offset_of(notify_offset, (uint32_t)count), notify_port_of(notify_port),
          rc ? NULL : e->m.views[0], rc ? 0 : refs[0], rc);
    if (rc < 0) {
        free(e);
        errno = -rc;
        return NULL;
    }
    return e->m.views[0];
}

void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable)
{
    return share(xgs, domid, count, refs, writable, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid, uint32_t *ref,
                                  int writable, uint32_t notify_offset,
                                  evtchn_port_t notify_port)
{
    return share(xgs, domid, 1, ref, writable, notify_offset, notify_port);
}

int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count)
{
    int rc = munmap(start_address, (size_t)count * VK_PAGE_SIZE);

    if (rc == 0) {
        pthread_mutex_lock(&lock);
        sweep();
        pthread_mutex_unlock(&lock);
    }
    TRACE("xengntshr_unshare(%p, %u) = %d", start_address, count, rc);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Not emulated.                                                       */
/* ------------------------------------------------------------------ */

int xengnttab_grant_copy(xengnttab_handle *xgt, uint32_t count,
                         xengnttab_grant_copy_segment_t *segs)
{
    errno = ENOSYS;
    return -1;
}

int xengnttab_dmabuf_exp_from_refs(xengnttab_handle *xgt, uint32_t domid, uint32_t flags,
                                   uint32_t count, const uint32_t *refs, uint32_t *fd)
{
    errno = ENOSYS;
    return -1;
}

int xengnttab_dmabuf_exp_wait_released(xengnttab_handle *xgt, uint32_t fd,
                                       uint32_t wait_to_ms)
{
    errno = ENOSYS;
    return -1;
}

int xengnttab_dmabuf_imp_to_refs(xengnttab_handle *xgt, uint32_t domid, uint32_t fd,
                                 uint32_t count, uint32_t *refs)
{
    errno = ENOSYS;
    return -1;
}

int xengnttab_dmabuf_imp_release(xengnttab_handle *xgt, uint32_t fd)
{
    errno = ENOSYS;
    return -1;
}
