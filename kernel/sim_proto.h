/*
 * kernel/sim_proto.h -- the emulated hypervisor's wire protocol.
 *
 * Documented in docs/sim-protocol.md; vchan/sim/hypervisor.py is the other
 * end.  This is the one place the numbers are written: Python reads them
 * through the cffi build (vchan/_cdefs.h, vchan/sim/protocol.py).  All
 * integers are little-endian (host order: the emulator only ever runs on
 * one machine).
 *
 * Transport: a Unix SOCK_SEQPACKET socket; one request, one reply, each a
 * single message.  File descriptors travel as SCM_RIGHTS on either.
 */
#ifndef VCHAN_SIM_PROTO_H
#define VCHAN_SIM_PROTO_H

#include <stdint.h>

#define VS_VERSION              1
#define VS_MAX_MSG              65536
#define VS_MAX_FDS              64

enum vs_op {
    VS_HELLO = 1,               /* u32 version, domid, kind, pid -> u32 version */
    VS_GNT_SHARE = 2,           /* u32 peer, count, writable; i32 notify_offset, notify_port
                                   -> u64 id, u32 refs[count]; fds [memfd, token] */
    VS_GNT_MAP = 3,             /* u32 count, writable; i32 notify_offset, notify_port;
                                   {u32 domid, ref}[count]
                                   -> u64 id, u32 nseg, {u32 first, npages, fd, pad;
                                   u64 offset}[nseg]; fds [token, seg fds...] */
    VS_GNT_RELEASE = 4,         /* u64 id -> u32 released_now */
    VS_EVT_BIND_UNBOUND = 6,    /* u32 remote_domid -> u32 port; fds [rx, tx] */
    VS_EVT_BIND_INTERDOMAIN = 7,/* u32 remote_domid, remote_port -> u32 port; fds [rx, tx] */
    VS_EVT_UNBIND = 8,          /* u32 port -> (nothing) */
    VS_CONTROL = 9,             /* JSON text -> JSON text (status, set, stop) */
};

/* VS_HELLO's kind: a device, one of enum vk_kind (kernel.h), or this: a
 * control connection (VS_CONTROL only), which makes no domain exist. */
#define VS_KIND_CONTROL         0

/* Every request starts with this; every reply with vs_reply. */
struct vs_request {
    uint32_t op;
    uint32_t len;               /* bytes of payload that follow */
};

struct vs_reply {
    int32_t status;             /* 0 or a negative errno */
    uint32_t len;
};

struct vs_segment {
    uint32_t first;             /* first page of the mapping this covers */
    uint32_t npages;
    uint32_t fd;                /* index into the reply's fds */
    uint32_t pad;
    uint64_t offset;            /* byte offset of the pages in that fd */
};

#endif /* VCHAN_SIM_PROTO_H */
