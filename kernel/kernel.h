/*
 * kernel/kernel.h -- the device layer vchan stands on.
 *
 * Three things are needed from below: share pages with a peer domain
 * (gntalloc), map a peer's pages (gntdev) and event channels (evtchn).  This
 * header is the one interface; there are two implementations:
 *
 *   kernel/xen.c   the real Linux devices /dev/xen/{gntalloc,gntdev,evtchn}
 *   kernel/sim.c   the emulated hypervisor's client side (vchan/sim/)
 *
 * Every function returns 0 (or a port number) on success and a negative
 * errno on failure; nothing here prints or aborts.
 */
#ifndef VCHAN_KERNEL_H
#define VCHAN_KERNEL_H

#include <stdint.h>
#include <sys/types.h>

#define VK_PAGE_SIZE 4096u

/* Xen's DOMID_FIRST_RESERVED (and DOMID_SELF): domain ids are below it.
 * Written here only: vchan's Python reads it through the cffi build
 * (vchan/addresses.py), the compat libraries include this header. */
#define VK_DOMID_FIRST_RESERVED 0x7FF0

/* What kind of device a handle is. */
enum vk_kind {
    VK_GNTSHR = 1,      /* gntalloc: share our pages with a peer */
    VK_GNTTAB = 2,      /* gntdev: map a peer's pages */
    VK_EVTCHN = 3,      /* evtchn: event channels */
};

struct vk_ops;

/* An open device handle.  Its owner keeps the structure alive as long as a
 * mapping made through it exists; the device itself may be closed first
 * (the mapping stays valid, as an mmap of a closed file does). */
struct vk_dev {
    const struct vk_ops *ops;
    int kind;
    int fd;             /* the device, or the emulator connection; -1 closed */
    pid_t pid;          /* the process that opened it (sim: fork detection) */
    uint32_t domid;     /* sim: the emulated domain of this process */
    int epfd;           /* sim evtchn: the pollable fd (epoll of port fds) */
    void *priv;         /* backend state */
    pid_t server;       /* sim: the emulator daemon's pid (SO_PEERCRED), 0 unknown */
    int failed;         /* sim: -errno once the emulator died (-ECONNRESET), was
                           stopped (-EHOSTDOWN), stopped answering (-ETIMEDOUT) or
                           answered garbage (-EBADMSG): every later request fails
                           so at once (the connection's replies can no longer be
                           trusted to match its requests) */
};

#define VK_MAX_VIEWS 8

/* Pages shared by us or mapped from a peer. */
struct vk_map {
    struct vk_dev *dev;
    void *views[VK_MAX_VIEWS];  /* views[0] is the mapping; more via map_view */
    int nviews;
    uint32_t count;             /* pages */
    int writable;
    int shared;                 /* 1: our pages (gntalloc), 0: a peer's (gntdev) */
    uint64_t index;             /* xen: gntalloc index; sim: the emulator's id */
    int token;                  /* sim: lifetime token fd (see sim.c); -1 */
    void *xen;                  /* xen gntdev: the grants, for more views */
};

struct vk_ops {
    const char *name;
    int (*open)(struct vk_dev *d, int kind);
    void (*close)(struct vk_dev *d);
    /* gntalloc: share count fresh zeroed pages with domid.  refs[count]
     * receives the grant references.  An unmap notification can be set at
     * the same time: notify_offset (byte offset in the mapping, or -1) is
     * cleared and notify_port (a local event-channel port, or -1) is
     * signalled when the last user of the mapping goes away. */
    int (*share)(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
                 uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m);
    /* gntdev: map count grants (domids[i], refs[i]); notify as above
     * (clearing a byte is refused on a read-only mapping). */
    int (*map)(struct vk_dev *d, uint32_t count, const uint32_t *domids,
               const uint32_t *refs, int writable, int notify_offset, int notify_port,
               struct vk_map *m);
    /* Another view of the same pages (mmap again). */
    int (*map_view)(struct vk_map *m, void **addr);
    /* Unmap every view; the pages go when their last user does. */
    int (*unmap)(struct vk_map *m);
    int (*set_max_grants)(struct vk_dev *d, uint32_t count);
    /* Event channels. */
    int (*bind_unbound)(struct vk_dev *d, uint32_t remote_domid);
    int (*bind_interdomain)(struct vk_dev *d, uint32_t remote_domid, uint32_t remote_port);
    int (*unbind)(struct vk_dev *d, uint32_t port);
    int (*notify)(struct vk_dev *d, uint32_t port);
    int (*pending)(struct vk_dev *d);       /* a fired port, or -EAGAIN */
    int (*unmask)(struct vk_dev *d, uint32_t port);
    /* Up to max fired ports into ports[], each unmasked again at once (the
     * caller looks at the rings after this); the count, 0 if none. */
    int (*take_events)(struct vk_dev *d, uint32_t *ports, int max);
    int (*fd)(struct vk_dev *d);            /* pollable: readable when pending */
    /* Optional (NULL where all ports share one descriptor, as on Xen): a
     * descriptor of the caller's own for one port, readable (level) while
     * the port has fired; the port leaves the handle's fd until
     * port_unwatch.  The caller consumes events with vk_fd_consume and
     * closes the descriptor (it stays valid after the port is unbound). */
    int (*port_fd)(struct vk_dev *d, uint32_t port);
    int (*port_unwatch)(struct vk_dev *d, uint32_t port);
};

extern const struct vk_ops vk_xen_ops;
extern const struct vk_ops vk_sim_ops;

/* Backend-neutral entry points (kernel/common.c).  backend: "xen"/"sim". */
const struct vk_ops *vk_backend(const char *name);
int vk_open(struct vk_dev *d, const struct vk_ops *ops, int kind, uint32_t domid);
void vk_close(struct vk_dev *d);
int vk_share(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
             uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m);
int vk_map(struct vk_dev *d, uint32_t count, const uint32_t *domids, const uint32_t *refs,
           int writable, int notify_offset, int notify_port, struct vk_map *m);
int vk_map_view(struct vk_map *m, void **addr);
int vk_unmap(struct vk_map *m);
/* Let go of a mapping whose views its user has unmapped behind our back
 * (plain munmap, as libxenvchan does with its ring buffers): the rest of
 * what vk_unmap does. */
int vk_release(struct vk_map *m);
int vk_set_max_grants(struct vk_dev *d, uint32_t count);
int vk_bind_unbound(struct vk_dev *d, uint32_t remote_domid);
int vk_bind_interdomain(struct vk_dev *d, uint32_t remote_domid, uint32_t remote_port);
int vk_unbind(struct vk_dev *d, uint32_t port);
int vk_notify(struct vk_dev *d, uint32_t port);
int vk_pending(struct vk_dev *d);
int vk_unmask(struct vk_dev *d, uint32_t port);
int vk_take_events(struct vk_dev *d, uint32_t *ports, int max);
int vk_fd(struct vk_dev *d);
/* A port's own descriptor (see vk_ops.port_fd), -EOPNOTSUPP without one. */
int vk_port_fd(struct vk_dev *d, uint32_t port);
/* The port back on the handle's fd (after vk_port_fd). */
int vk_port_unwatch(struct vk_dev *d, uint32_t port);
/* Consume what made a port's descriptor readable: 0, or -errno. */
int vk_fd_consume(int fd);

/* Sim backend: where the emulator listens (set before the first open;
 * default $VCHAN_SIM_DIR/hypervisor.sock). */
int vk_sim_set_socket(const char *path);
/* Sim backend: one CONTROL request (JSON text, see docs/sim-protocol.md) on
 * a control connection of its own.  The reply's JSON text goes to reply,
 * NUL-terminated; returns its length or a negative errno. */
int vk_sim_control(const char *request, char *reply, size_t cap);
/* Sim backend: whether the emulator behind handle d is still there, looked
 * at without a request (its connection at end of file, its process
 * stopped): 0, or the handle's failure (see vk_dev.failed), which it then
 * keeps.  Cheap enough to call a few times a second. */
int vk_sim_check(struct vk_dev *d);

#endif /* VCHAN_KERNEL_H */
