/*
 * kernel/sim.c -- the device layer on the emulated hypervisor.
 *
 * The emulator (vchan/sim/hypervisor.py) keeps the grant tables and the
 * event-channel tables of every emulated domain; this file is the client
 * side a process links in.  The data path never goes through the emulator:
 *
 *   - Granted pages are memfd pages.  The sharer gets the memfd and maps it;
 *     a mapper gets the same pages (read-only mappers get a read-only file
 *     descriptor, so not even mprotect can make them writable).
 *   - An event channel is a pair of eventfds created when the port is
 *     bound.  Notifying writes the peer's eventfd directly.  A handle's
 *     pollable fd is an epoll set of its ports' eventfds, each registered
 *     EPOLLONESHOT: a port fires once and stays quiet until unmasked, and
 *     events that arrive meanwhile coalesce into one, as Xen's do.
 *   - Every mapping carries a "token", the write end of a pipe whose read
 *     end the emulator watches.  munmap through this API closes it; fork
 *     duplicates it; exec and death close it.  When the last copy goes the
 *     emulator sees EOF: that is "the last user of the pages went away", and
 *     it performs the unmap notification (clear a byte, send an event) and
 *     ends the grant -- exactly when the Linux drivers would, crash included.
 *
 * Requests are synchronous RPCs over a SOCK_SEQPACKET connection per handle
 * (kernel/sim_proto.h, docs/sim-protocol.md).  After fork() a child opens
 * its own connection before its first request, so parent and child never
 * read each other's replies.
 *
 * The emulator is a process that can die or be stopped: no request waits
 * for it without bound.  While a reply is due, the daemon's process (its
 * pid comes from SO_PEERCRED at connect time) is looked at every
 * WAIT_SLICE_MS: gone is -ECONNRESET, stopped (SIGSTOP, a debugger) is
 * -EHOSTDOWN, and no reply within $VCHAN_SIM_TIMEOUT seconds (default 5) is
 * -ETIMEDOUT.  After any of these (or a malformed reply, -EBADMSG) the
 * handle keeps that error for good: a late reply could otherwise be taken
 * for the answer to the next request.  Mappings and eventfds already set up
 * keep working -- the data path never needed the daemon.
 */
#define _GNU_SOURCE
#include "kernel.h"
#include "sim_proto.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define WAIT_SLICE_MS 20                /* how often a waiting request looks at the daemon */
#define PF_EXITING 0x4                  /* include/linux/sched.h: the process is exiting */
#define DEFAULT_TIMEOUT_MS 5000         /* a running daemon that answers nothing for this long */

static char sim_socket[sizeof(((struct sockaddr_un *)0)->sun_path)];

int vk_sim_set_socket(const char *path)
{
    if (!path || strlen(path) >= sizeof(sim_socket))
        return -ENAMETOOLONG;
    strcpy(sim_socket, path);
    return 0;
}

/* The default location, for C programs that did not set one: the same rule
 * as vchan.sim.state_dir(). */
static int default_socket(void)
{
    const char *dir = getenv("VCHAN_SIM_DIR");
    const char *run = getenv("XDG_RUNTIME_DIR");
    int n;

    if (dir && *dir)
        n = snprintf(sim_socket, sizeof(sim_socket), "%s/hypervisor.sock", dir);
    else if (run && *run)
        n = snprintf(sim_socket, sizeof(sim_socket), "%s/vchan-sim/hypervisor.sock", run);
    else
        n = snprintf(sim_socket, sizeof(sim_socket), "/tmp/vchan-sim-%u/hypervisor.sock",
                     (unsigned)getuid());
    return n < 0 || (size_t)n >= sizeof(sim_socket) ? -ENAMETOOLONG : 0;
}

/* ------------------------------------------------------------------ */
/* The daemon's health.                                                */
/* ------------------------------------------------------------------ */

/* The failures of the connection itself (never a status the daemon sends). */
static int link_failure(int rc)
{
    return rc == -ECONNRESET || rc == -EHOSTDOWN || rc == -ETIMEDOUT || rc == -EBADMSG;
}

static long timeout_ms(void)
{
    static long cached = -1;
    const char *env;
    char *end;
    double s;

    if (cached >= 0)
        return cached;
    cached = DEFAULT_TIMEOUT_MS;
    env = getenv("VCHAN_SIM_TIMEOUT");
    if (env && *env) {
        s = strtod(env, &end);
        if (end != env && *end == '\0' && s > 0 && s < 86400)
            cached = (long)(s * 1000);
    }
    return cached;
}

static long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* What became of the daemon's process: 0 running (or not known), -EHOSTDOWN
 * stopped, -ECONNRESET gone.  One read of /proc/<pid>/stat. */
static int daemon_state(pid_t pid)
{
    char path[40], buf[512], *p, state;
    unsigned flags;
    ssize_t n;
    int fd;

    if (pid <= 0)
        return 0;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -ECONNRESET : 0;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return n < 0 && errno == ESRCH ? -ECONNRESET : 0;
    buf[n] = '\0';
    /* "pid (comm) S ppid pgrp session tty tpgid flags ...": after the last ')'. */
    p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return 0;
    state = p[2];
    if (sscanf(p + 3, "%*d %*d %*d %*d %*d %u", &flags) == 1 && (flags & PF_EXITING))
        return -ECONNRESET;     /* dying: its descriptors may be closed already */
    switch (state) {
    case 'T':           /* stopped by a signal */
    case 't':           /* stopped by a debugger */
        return -EHOSTDOWN;
    case 'Z':
    case 'X':
    case 'x':
        return -ECONNRESET;
    default:
        return 0;
    }
}

/* Wait until sock is ready for events, looking at the daemon meanwhile. */
static int wait_daemon(int sock, short events, pid_t server)
{
    struct pollfd p = { .fd = sock, .events = events };
    long deadline = now_ms() + timeout_ms();
    int n, state;

    for (;;) {
        n = poll(&p, 1, WAIT_SLICE_MS);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return -errno;
        if ((state = daemon_state(server)) < 0)
            return state;
        if (now_ms() >= deadline)
            return -ETIMEDOUT;
    }
}

/* ------------------------------------------------------------------ */
/* RPC.                                                                */
/* ------------------------------------------------------------------ */

static void close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* One request, one reply.  Returns the reply status (0 or -errno); on
 * success *rlen bytes of payload are in reply and *nfds fds in fds.  The
 * connection's own failures are link_failure() errnos. */
static int rpc(int sock, pid_t server, uint32_t op, const void *req, uint32_t len,
               void *reply, uint32_t cap, uint32_t *rlen, int *fds, int *nfds)
{
    char buf[VS_MAX_MSG];
    struct vs_request *hdr = (struct vs_request *)buf;
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(sizeof(int) * VS_MAX_FDS)];
    } control;
    struct iovec iov;
    struct msghdr msg;
    struct vs_reply rep;
    ssize_t n;
    int got = 0;

    if (len > sizeof(buf) - sizeof(*hdr))
        return -EMSGSIZE;
    hdr->op = op;
    hdr->len = len;
    if (len)
        memcpy(buf + sizeof(*hdr), req, len);
    for (;;) {
        n = send(sock, buf, sizeof(*hdr) + len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0 || (errno != EINTR && errno != EAGAIN))
            break;
        if (errno == EAGAIN && (got = wait_daemon(sock, POLLOUT, server)) < 0)
            return got;
    }
    if (n < 0)
        return errno == EPIPE || errno == ECONNRESET ? -ECONNRESET : -errno;

    iov.iov_base = buf;
    iov.iov_len = sizeof(buf);
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof(control.space);
    for (;;) {
        if ((got = wait_daemon(sock, POLLIN, server)) < 0)
            return got;
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n >= 0 || (errno != EINTR && errno != EAGAIN))
            break;
    }
    if (n < 0)
        return errno == ECONNRESET ? -ECONNRESET : -errno;
    got = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *in = (int *)CMSG_DATA(c);
            for (int i = 0; i < k; i++) {
                if (fds && got < VS_MAX_FDS)
                    fds[got++] = in[i];
                else
                    close(in[i]);
            }
        }
    }
    if (n == 0) {
        close_fds(fds, got);
        return -ECONNRESET;     /* the emulator went away */
    }
    if ((size_t)n < sizeof(rep) || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        close_fds(fds, got);
        return -EBADMSG;
    }
    memcpy(&rep, buf, sizeof(rep));
    if (rep.len != (size_t)n - sizeof(rep) || rep.len > cap || rep.status > 0) {
        close_fds(fds, got);
        return -EBADMSG;
    }
    if (rep.status < 0) {
        close_fds(fds, got);
        return rep.status;
    }
    if (rep.len)
        memcpy(reply, buf + sizeof(rep), rep.len);
    if (rlen)
        *rlen = rep.len;
    if (nfds)
        *nfds = got;
    else
        close_fds(fds, got);
    return 0;
}

static int sim_connect(uint32_t domid, int kind, pid_t *server)
{
    struct sockaddr_un addr;
    struct ucred cred;
    socklen_t credlen = sizeof(cred);
    uint32_t hello[4] = { VS_VERSION, domid, (uint32_t)kind, (uint32_t)getpid() };
    uint32_t version;
    int sock, rc;

    if (!sim_socket[0] && (rc = default_socket()) < 0)
        return rc;
    /* Non-blocking: a stopped daemon's full backlog must not hold us. */
    sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sock < 0)
        return -errno;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, sim_socket);
    for (long deadline = now_ms() + timeout_ms();;) {
        if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) == 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN && now_ms() < deadline) {
            poll(NULL, 0, WAIT_SLICE_MS);       /* the backlog is full: try again */
            continue;
        }
        rc = errno == EAGAIN ? -ETIMEDOUT : -errno;
        close(sock);
        return rc;
    }
    /* The process that listens: the daemon, whose health requests watch. */
    *server = getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) == 0 ? cred.pid : 0;
    rc = rpc(sock, *server, VS_HELLO, hello, sizeof(hello), &version, sizeof(version),
             NULL, NULL, NULL);
    if (rc < 0) {
        close(sock);
        return rc;
    }
    return sock;
}

/* The connection this process may use: after fork() a child gets its own. */
static int conn(struct vk_dev *d)
{
    pid_t me = getpid(), server = 0;

    if (d->fd < 0)
        return -EBADF;
    if (d->pid != me) {
        int sock = sim_connect(d->domid, d->kind, &server);
        if (sock < 0)
            return sock;
        close(d->fd);           /* our copy only: the parent keeps its own */
        d->fd = sock;
        d->pid = me;
        d->server = server;
        d->failed = 0;          /* a new connection: the parent's failure is not ours */
    } else if (d->failed) {
        return d->failed;
    }
    return d->fd;
}

/* A request on the handle's connection; a failure of the connection itself
 * stays with the handle. */
static int dev_rpc(struct vk_dev *d, uint32_t op, const void *req, uint32_t len,
                   void *reply, uint32_t cap, uint32_t *rlen, int *fds, int *nfds)
{
    int sock = conn(d), rc;

    if (sock < 0)
        return sock;
    rc = rpc(sock, d->server, op, req, len, reply, cap, rlen, fds, nfds);
    if (link_failure(rc))
        d->failed = rc;
    return rc;
}

int vk_sim_check(struct vk_dev *d)
{
    struct pollfd p;
    char byte;
    int state;

    if (d->ops != &vk_sim_ops || d->fd < 0)
        return 0;
    if (d->failed || d->pid != getpid())
        return d->failed;
    /* No request is in flight between calls: anything to read is the end
     * of the connection (or a reply that came after its request gave up). */
    p.fd = d->fd;
    p.events = POLLIN;
    p.revents = 0;
    if (poll(&p, 1, 0) > 0) {
        if (p.revents & (POLLHUP | POLLERR) ||
            recv(d->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0)
            return d->failed = -ECONNRESET;
        return d->failed = -EBADMSG;
    }
    if ((state = daemon_state(d->server)) < 0)
        d->failed = state;
    return d->failed;
}

/* ------------------------------------------------------------------ */
/* Handles.                                                            */
/* ------------------------------------------------------------------ */

/* Per evtchn handle: the eventfds of each bound port, indexed by port. */
struct sim_evtchn {
    int *rx;            /* ours: registered in the epoll set */
    int *tx;            /* the peer's: written to notify */
    uint32_t cap;
};

static int sim_open(struct vk_dev *d, int kind)
{
    pid_t server = 0;
    int sock = sim_connect(d->domid, kind, &server);

    d->server = server;         /* known even when HELLO failed: the error names it */
    if (sock < 0)
        return sock;
    d->fd = sock;
    d->failed = 0;
    d->epfd = -1;
    d->priv = NULL;
    if (kind == VK_EVTCHN) {
        struct sim_evtchn *ev = calloc(1, sizeof(*ev));
        d->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (!ev || d->epfd < 0) {
            int rc = ev ? -errno : -ENOMEM;
            free(ev);
            if (d->epfd >= 0)
                close(d->epfd);
            close(sock);
            d->fd = d->epfd = -1;
            return rc;
        }
        d->priv = ev;
    }
    return 0;
}

static void drop_port(struct sim_evtchn *ev, int epfd, uint32_t port)
{
    if (port >= ev->cap || ev->rx[port] < 0)
        return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, ev->rx[port], NULL);
    close(ev->rx[port]);
    close(ev->tx[port]);
    ev->rx[port] = ev->tx[port] = -1;
}

static void sim_close(struct vk_dev *d)
{
    struct sim_evtchn *ev = d->priv;

    if (ev) {
        /* Closing the handle unbinds its ports.  Only the process that
         * opened it says so explicitly; a forked copy closing just lets go,
         * as closing a shared device file does. */
        int owner = d->pid == getpid();
        for (uint32_t p = 0; p < ev->cap; p++) {
            if (ev->rx[p] >= 0) {
                if (owner && !d->failed)
                    dev_rpc(d, VS_EVT_UNBIND, &p, sizeof(p), NULL, 0, NULL, NULL, NULL);
                drop_port(ev, d->epfd, p);
            }
        }
        free(ev->rx);
        free(ev->tx);
        free(ev);
        d->priv = NULL;
    }
    if (d->epfd >= 0)
        close(d->epfd);
    if (d->fd >= 0)
        close(d->fd);
    d->fd = d->epfd = -1;
}

/* ------------------------------------------------------------------ */
/* Grants.                                                             */
/* ------------------------------------------------------------------ */

static int sim_share(struct vk_dev *d, uint32_t domid, uint32_t count, int writable,
                     uint32_t *refs, int notify_offset, int notify_port, struct vk_map *m)
{
    int32_t req[5] = { (int32_t)domid, (int32_t)count, writable ? 1 : 0,
                       notify_offset, notify_port };
    struct {
        uint64_t id;
        uint32_t refs[(VS_MAX_MSG - 16) / 4];
    } rep;
    uint32_t rlen = 0;
    int fds[VS_MAX_FDS], nfds = 0, rc;
    void *addr;

    rc = dev_rpc(d, VS_GNT_SHARE, req, sizeof(req), &rep, sizeof(rep), &rlen, fds, &nfds);
    if (rc < 0)
        return rc;
    if (nfds != 2 || rlen != 8 + 4 * count) {
        close_fds(fds, nfds);
        return d->failed = -EBADMSG;
    }
    addr = mmap(NULL, (size_t)count * VK_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                fds[0], 0);
    rc = addr == MAP_FAILED ? -errno : 0;
    close(fds[0]);
    if (rc < 0) {
        close(fds[1]);          /* the emulator ends the grants */
        return rc;
    }
    memcpy(refs, rep.refs, 4 * count);
    m->views[0] = addr;
    m->nviews = 1;
    m->index = rep.id;
    m->token = fds[1];
    return 0;
}

static int sim_map(struct vk_dev *d, uint32_t count, const uint32_t *domids,
                   const uint32_t *refs, int writable, int notify_offset, int notify_port,
                   struct vk_map *m)
{
    uint32_t req[(VS_MAX_MSG - 64) / 4];
    struct {
        uint64_t id;
        uint32_t nseg;
        uint32_t pad;
        struct vs_segment seg[VS_MAX_FDS];
    } rep;
    uint32_t rlen = 0;
    int fds[VS_MAX_FDS], nfds = 0, rc = 0, prot;
    size_t len = (size_t)count * VK_PAGE_SIZE;
    uint8_t *area;

    if (4 + 2 * (size_t)count > sizeof(req) / 4)
        return -E2BIG;
    req[0] = count;
    req[1] = writable ? 1 : 0;
    req[2] = (uint32_t)notify_offset;
    req[3] = (uint32_t)notify_port;
    for (uint32_t i = 0; i < count; i++) {
        req[4 + 2 * i] = domids[i];
        req[5 + 2 * i] = refs[i];
    }
    rc = dev_rpc(d, VS_GNT_MAP, req, 16 + 8 * count, &rep, sizeof(rep), &rlen, fds, &nfds);
    if (rc < 0)
        return rc;
    if (rlen < 16 || rep.nseg == 0 || rep.nseg > VS_MAX_FDS - 1 ||
        rlen != 16 + rep.nseg * sizeof(struct vs_segment) || nfds < 2) {
        close_fds(fds, nfds);
        return d->failed = -EBADMSG;
    }
    /* Reserve the whole range, then put each segment in place. */
    area = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) {
        rc = -errno;
        close_fds(fds, nfds);
        return rc;
    }
    prot = PROT_READ | (writable ? PROT_WRITE : 0);
    for (uint32_t i = 0; i < rep.nseg && rc == 0; i++) {
        struct vs_segment *s = &rep.seg[i];
        if (s->fd == 0 || s->fd >= (uint32_t)nfds || s->first + s->npages > count ||
            s->npages == 0) {
            rc = -EPROTO;
            break;
        }
        if (mmap(area + (size_t)s->first * VK_PAGE_SIZE, (size_t)s->npages * VK_PAGE_SIZE,
                 prot, MAP_SHARED | MAP_FIXED, fds[s->fd], (off_t)s->offset) == MAP_FAILED)
            rc = -errno;
    }
    close_fds(fds + 1, nfds - 1);
    if (rc < 0) {
        munmap(area, len);
        close(fds[0]);          /* the emulator forgets the mapping */
        return rc;
    }
    m->views[0] = area;
    m->nviews = 1;
    m->index = rep.id;
    m->token = fds[0];
    return 0;
}

static int sim_map_view(struct vk_map *m, void **addr)
{
    size_t len = (size_t)m->count * VK_PAGE_SIZE;
    /* mremap with old size 0 makes a second mapping of the same shared
     * pages; the token already covers it. */
    void *p = mremap(m->views[0], 0, len, MREMAP_MAYMOVE);

    if (p == MAP_FAILED)
        return -errno;
    *addr = p;
    return 0;
}

static int sim_unmap(struct vk_map *m)
{
    struct vk_dev *d = m->dev;
    uint64_t id = m->index;
    uint32_t released;

    for (int i = 0; i < m->nviews; i++)
        munmap(m->views[i], (size_t)m->count * VK_PAGE_SIZE);
    m->nviews = 0;
    if (m->token >= 0) {
        close(m->token);
        m->token = -1;
        /* Let the emulator settle it now rather than when it next polls,
         * so grant accounting is synchronous as gntalloc's is. */
        if (d && d->fd >= 0 && !d->failed)
            dev_rpc(d, VS_GNT_RELEASE, &id, sizeof(id), &released, sizeof(released),
                    NULL, NULL, NULL);
    }
    return 0;
}

static int sim_set_max_grants(struct vk_dev *d, uint32_t count)
{
    (void)d;
    (void)count;
    return 0;   /* like current kernels: there is no per-handle limit */
}

/* ------------------------------------------------------------------ */
/* Event channels.                                                     */
/* ------------------------------------------------------------------ */

/* Put a port in the handle's epoll set (op ADD) or re-arm it (MOD): it
 * fires once, then stays quiet until armed again. */
static int arm(struct vk_dev *d, int op, uint32_t port)
{
    struct sim_evtchn *ev = d->priv;
    struct epoll_event e;

    if (port >= ev->cap || ev->rx[port] < 0)
        return -ENOTCONN;
    e.events = EPOLLIN | EPOLLONESHOT;
    e.data.u64 = port;
    if (epoll_ctl(d->epfd, op, ev->rx[port], &e) < 0)
        return -errno;
    return 0;
}

static int grow(struct sim_evtchn *ev, uint32_t port)
{
    uint32_t cap = ev->cap ? ev->cap : 64;
    int *rx, *tx;

    if (port < ev->cap)
        return 0;
    while (cap <= port)
        cap *= 2;
    rx = realloc(ev->rx, cap * sizeof(int));
    if (!rx)
        return -ENOMEM;
    ev->rx = rx;
    tx = realloc(ev->tx, cap * sizeof(int));
    if (!tx)
        return -ENOMEM;
    ev->tx = tx;
    for (uint32_t i = ev->cap; i < cap; i++)
        ev->rx[i] = ev->tx[i] = -1;
    ev->cap = cap;
    return 0;
}

static int bind_common(struct vk_dev *d, uint32_t op, const uint32_t *req, uint32_t len)
{
    struct sim_evtchn *ev = d->priv;
    uint32_t port;
    int fds[VS_MAX_FDS], nfds = 0, rc;

    rc = dev_rpc(d, op, req, len, &port, sizeof(port), NULL, fds, &nfds);
    if (rc < 0)
        return rc;
    if (nfds != 2 || port == 0 || port > INT_MAX || (rc = grow(ev, port)) < 0) {
        close_fds(fds, nfds);
        if (nfds == 2 && port && port <= INT_MAX)
            dev_rpc(d, VS_EVT_UNBIND, &port, sizeof(port), NULL, 0, NULL, NULL, NULL);
        return rc < 0 ? rc : (d->failed = -EBADMSG);
    }
    drop_port(ev, d->epfd, port);   /* stale fds of a port we unbound */
    ev->rx[port] = fds[0];
    ev->tx[port] = fds[1];
    if ((rc = arm(d, EPOLL_CTL_ADD, port)) < 0) {
        drop_port(ev, d->epfd, port);
        dev_rpc(d, VS_EVT_UNBIND, &port, sizeof(port), NULL, 0, NULL, NULL, NULL);
        return rc;
    }
    return (int)port;
}

static int sim_bind_unbound(struct vk_dev *d, uint32_t remote_domid)
{
    return bind_common(d, VS_EVT_BIND_UNBOUND, &remote_domid, sizeof(remote_domid));
}

static int sim_bind_interdomain(struct vk_dev *d, uint32_t remote_domid, uint32_t remote_port)
{
    uint32_t req[2] = { remote_domid, remote_port };

    return bind_common(d, VS_EVT_BIND_INTERDOMAIN, req, sizeof(req));
}

static int sim_unbind(struct vk_dev *d, uint32_t port)
{
    struct sim_evtchn *ev = d->priv;

    if (port >= ev->cap || ev->rx[port] < 0)
        return -ENOTCONN;
    drop_port(ev, d->epfd, port);
    return dev_rpc(d, VS_EVT_UNBIND, &port, sizeof(port), NULL, 0, NULL, NULL, NULL);
}

static int sim_notify(struct vk_dev *d, uint32_t port)
{
    struct sim_evtchn *ev = d->priv;
    uint64_t one = 1;

    if (port >= ev->cap || ev->tx[port] < 0)
        return -ENOTCONN;
    /* Straight to the peer's eventfd: the emulator is not involved. */
    if (write(ev->tx[port], &one, sizeof(one)) < 0 && errno != EAGAIN)
        return -errno;
    return 0;
}

static int sim_pending(struct vk_dev *d)
{
    struct sim_evtchn *ev = d->priv;
    struct epoll_event e;
    uint64_t count;
    uint32_t port;
    int n;

    do {
        n = epoll_wait(d->epfd, &e, 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n == 0)
        return -EAGAIN;
    port = (uint32_t)e.data.u64;
    /* The port is now masked (one-shot); consume what fired it so only
     * events after this point make it fire again once unmasked. */
    if (port < ev->cap && ev->rx[port] >= 0)
        (void)!read(ev->rx[port], &count, sizeof(count));
    return (int)port;
}

static int sim_unmask(struct vk_dev *d, uint32_t port)
{
    return arm(d, EPOLL_CTL_MOD, port);
}

static int sim_take_events(struct vk_dev *d, uint32_t *ports, int max)
{
    struct sim_evtchn *ev = d->priv;
    struct epoll_event e[64];
    uint64_t count;
    int n, got = 0;

    if (max > 64)
        max = 64;
    do {
        n = epoll_wait(d->epfd, e, max, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    for (int i = 0; i < n; i++) {
        uint32_t port = (uint32_t)e[i].data.u64;
        if (port >= ev->cap || ev->rx[port] < 0)
            continue;
        /* Consume what fired it, then re-arm: an event from now on fires
         * the port again. */
        (void)!read(ev->rx[port], &count, sizeof(count));
        e[i].events = EPOLLIN | EPOLLONESHOT;
        epoll_ctl(d->epfd, EPOLL_CTL_MOD, ev->rx[port], &e[i]);
        ports[got++] = port;
    }
    return got;
}

static int sim_fd(struct vk_dev *d)
{
    return d->epfd;
}

/* The port's eventfd, for a caller that watches it itself: one read per
 * wake-up instead of epoll_wait + read + epoll_ctl on the handle's set.  A
 * duplicate, so that unbinding the port (which closes ours) never closes a
 * descriptor an event loop still watches. */
static int sim_port_fd(struct vk_dev *d, uint32_t port)
{
    struct sim_evtchn *ev = d->priv;
    int fd;

    if (port >= ev->cap || ev->rx[port] < 0)
        return -ENOTCONN;
    fd = fcntl(ev->rx[port], F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (epoll_ctl(d->epfd, EPOLL_CTL_DEL, ev->rx[port], NULL) < 0 && errno != ENOENT) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

static int sim_port_unwatch(struct vk_dev *d, uint32_t port)
{
    int rc = arm(d, EPOLL_CTL_ADD, port);

    return rc == -EEXIST ? 0 : rc;      /* (never taken out: nothing to put back) */
}

const struct vk_ops vk_sim_ops = {
    .name = "sim",
    .open = sim_open,
    .close = sim_close,
    .share = sim_share,
    .map = sim_map,
    .map_view = sim_map_view,
    .unmap = sim_unmap,
    .set_max_grants = sim_set_max_grants,
    .bind_unbound = sim_bind_unbound,
    .bind_interdomain = sim_bind_interdomain,
    .unbind = sim_unbind,
    .notify = sim_notify,
    .pending = sim_pending,
    .unmask = sim_unmask,
    .take_events = sim_take_events,
    .fd = sim_fd,
    .port_fd = sim_port_fd,
    .port_unwatch = sim_port_unwatch,
};

/* ------------------------------------------------------------------ */
/* Control requests (kernel/compat's xc_domain_getinfo asks these).    */
/* ------------------------------------------------------------------ */

int vk_sim_control(const char *request, char *reply, size_t cap)
{
    uint32_t rlen = 0;
    pid_t server = 0;
    int sock, rc;

    if (!request || !reply || cap == 0)
        return -EINVAL;
    /* A control connection: it does not make domain 0 (or any) exist. */
    sock = sim_connect(0, VS_KIND_CONTROL, &server);
    if (sock < 0)
        return sock;
    rc = rpc(sock, server, VS_CONTROL, request, (uint32_t)strlen(request), reply,
             (uint32_t)(cap - 1 < VS_MAX_MSG ? cap - 1 : VS_MAX_MSG), &rlen, NULL, NULL);
    close(sock);
    if (rc < 0)
        return rc;
    reply[rlen] = '\0';
    return (int)rlen;
}
