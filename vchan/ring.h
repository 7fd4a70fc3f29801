/*
 * vchan/ring.h -- the libxenvchan shared-memory ring: layout, constants, API.
 *
 * The layout below is the wire contract shared with every libxenvchan peer
 * (Xen's tools/libs/vchan, vchan-socket-proxy, Qubes, ocaml-vchan).  It is
 * written from the published layout in xen/include/public/io/libxenvchan.h
 * and must stay byte-identical to it; tests/test_layout.py checks it against
 * the system header.
 *
 * The code in ring.c is pure memory operations: it never makes a system
 * call.  Where libxenvchan would send an event, these functions set
 * *notify to 1 and the caller sends the event.
 *
 * This header is plain C99 + GCC atomics and is also read (through
 * vchan/_cdefs.h) by cffi.
 */
#ifndef VCHAN_RING_H
#define VCHAN_RING_H

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------ */
/* Shared control page (page 0, granted by the server).                */
/* ------------------------------------------------------------------ */

struct vchan_ring_shared {
    uint32_t cons;          /* written by the reader of this ring */
    uint32_t prod;          /* written by the writer of this ring */
};

struct vchan_interface {
    /* left: client -> server (client writes, server reads)
     * right: server -> client (server writes, client reads) */
    struct vchan_ring_shared left, right;
    /* log2 of each ring's size; written once by the server. */
    uint16_t left_order, right_order;
    /* 0 = closed or crashed, 1 = connected, 2 = client not yet connected */
    uint8_t cli_live, srv_live;
    /* Notification request bits.  cli_notify: the server ORs in what it
     * wants to hear about, the client tests-and-clears after acting.
     * srv_notify: the reverse. */
    uint8_t cli_notify, srv_notify;
    /* grant references of the separate ring pages: left's first, then
     * right's (only rings of order >= 12 have separate pages). */
    uint32_t grants[];
};

#define VCHAN_PAGE_SHIFT        12
#define VCHAN_PAGE_SIZE         4096u

#define VCHAN_NOTIFY_WRITE      0x1     /* tell me when data is written */
#define VCHAN_NOTIFY_READ       0x2     /* tell me when data is consumed */
/* vchan extension: set by a writer in the PEER's notify byte when it will
 * write no more (half-close).  libxenvchan only ever clears bits 0x1 and
 * 0x2 of its own byte and never reads other bits, so a plain libxenvchan
 * peer ignores it. */
#define VCHAN_NOTIFY_EOF        0x80
/* vchan extension: set in the peer's notify byte by vchan_ring_close()
 * before the live byte goes to 0, so that a vchan peer can tell a graceful
 * close from a crash (where the kernel clears the live byte alone). */
#define VCHAN_NOTIFY_CLOSED     0x20
/* vchan extension: set at connection set-up by a side that speaks these
 * extensions.  Absent from a plain libxenvchan peer. */
#define VCHAN_NOTIFY_HELLO      0x40
#define VCHAN_NOTIFY_EXTENSIONS (VCHAN_NOTIFY_EOF | VCHAN_NOTIFY_CLOSED | VCHAN_NOTIFY_HELLO)

#define VCHAN_LIVE_CLOSED       0
#define VCHAN_LIVE_CONNECTED    1
#define VCHAN_LIVE_WAITING      2

#define VCHAN_SMALL_ORDER       10      /* in page 0 at offset 1024 */
#define VCHAN_LARGE_ORDER       11      /* in page 0 at offset 2048 */
#define VCHAN_SMALL_OFFSET      1024
#define VCHAN_LARGE_OFFSET      2048
#define VCHAN_MIN_ORDER         10
#define VCHAN_MAX_ORDER         20      /* more grants would not fit page 0 */
#define VCHAN_MAX_RING_SIZE     (1u << VCHAN_MAX_ORDER)

/* Offsets of the live bytes, for unmap notifications. */
#define VCHAN_OFFSET_CLI_LIVE   20
#define VCHAN_OFFSET_SRV_LIVE   21

/* ------------------------------------------------------------------ */
/* Errors.  Negative return values of the functions below.             */
/* ------------------------------------------------------------------ */

/* The caller misused the API (local errors). */
#define VCHAN_EINVAL            (-1)    /* bad argument (order, size, ...) */
#define VCHAN_EMSGSIZE          (-2)    /* send/recv larger than the ring */
#define VCHAN_ECLOSED           (-3)    /* operation on a closed endpoint */
/* The peer broke the protocol (remote errors).  Once one is returned the
 * ring is dead: every later call returns the same error. */
#define VCHAN_EINDEX            (-10)   /* a peer index outside the window */
#define VCHAN_EORDER            (-11)   /* a ring order changed or is invalid */
#define VCHAN_ELIVE             (-12)   /* a live byte outside 0..2 */

/* ------------------------------------------------------------------ */
/* Private endpoint state.  Lives in private memory: nothing here is   */
/* ever read back from the shared page.                                */
/* ------------------------------------------------------------------ */

struct vchan_half {
    uint32_t *prod;         /* shared: producer index of this ring */
    uint32_t *cons;         /* shared: consumer index of this ring */
    uint8_t *buffer;        /* ring data, size bytes */
    uint32_t size;          /* 1 << order, private copy */
    uint32_t mask;          /* size - 1 */
    uint32_t own;           /* our own index (cons for rd, prod for wr) */
    uint32_t peer;          /* last validated value of the peer's index */
};

struct vchan_ring {
    struct vchan_interface *shr;
    struct vchan_half rd, wr;
    uint16_t left_order, right_order;   /* as agreed at setup */
    uint8_t is_server;
    uint8_t eof_sent;
    uint8_t quiet;                      /* quiet commits since the last publish */
    int error;                          /* sticky remote error, or 0 */
};

/* ------------------------------------------------------------------ */
/* Setup.                                                              */
/* ------------------------------------------------------------------ */

/* Orders a libxenvchan server picks for the requested minimum sizes of its
 * read (left) and write (right) rings.  VCHAN_EINVAL if either exceeds
 * VCHAN_MAX_RING_SIZE. */
int vchan_server_orders(size_t read_min, size_t write_min,
                        int *read_order, int *write_order);

/* The client's validation of the orders found in page 0.  Returns 0 and
 * the client's (read, write) orders, or VCHAN_EORDER. */
int vchan_client_orders(const struct vchan_interface *page0,
                        int *read_order, int *write_order);

/* Offset of an in-page ring inside page 0 (1024 or 2048), or -1 if a ring
 * of this order lives in 2^(order-12) separate pages. */
int vchan_ring_offset(int order);

/* Number of separate pages (and grants) a ring of this order needs. */
int vchan_ring_pages(int order);

/* Initialise a fresh control page as a server: zero it, write orders, live
 * bytes and the first notify request.  Grants are written by the caller
 * into page0->grants.  rd_buf / wr_buf are ignored for in-page orders. */
int vchan_ring_init_server(struct vchan_ring *r, void *page0,
                           int read_order, int write_order,
                           void *rd_buf, void *wr_buf);

/* Attach as a client to a mapped control page whose orders were checked
 * with vchan_client_orders; marks the client live and asks the server to
 * be told of writes.  The caller then sends one event. */
int vchan_ring_init_client(struct vchan_ring *r, void *page0,
                           int read_order, int write_order,
                           void *rd_buf, void *wr_buf);

/* ------------------------------------------------------------------ */
/* I/O.  All return a byte count >= 0 or a negative VCHAN_E* code.      */
/* *notify is set to 1 when the caller must send an event to the peer  */
/* (it is left untouched otherwise, so it can accumulate over calls).   */
/* ------------------------------------------------------------------ */

/* Bytes ready to read.  Arms a "tell me on write" request first. */
int vchan_ring_data_ready(struct vchan_ring *r);
/* Free space in the write ring.  Arms a "tell me on read" request. */
int vchan_ring_buffer_space(struct vchan_ring *r);
/* Whether a small write is best sent at once: 1 when the peer has taken
 * everything we wrote, or sleeps until our next write wakes it; 0 while it
 * has yet to read what is there (a small write may wait to be merged with
 * the next ones).  Asks for nothing; a ring error if the ring is broken. */
int vchan_ring_write_now(struct vchan_ring *r);
/* Withdraw our "tell me on write" request: a reader that polls the ring
 * spares the peer its notification.  It must ask again (any read that
 * finds the ring empty does) and look once more before it sleeps. */
void vchan_ring_disarm(struct vchan_ring *r);

/* Stream write: copy up to len bytes, return how many. */
int vchan_ring_write(struct vchan_ring *r, const void *data, size_t len,
                     int *notify);
/* Gathered stream write of n buffers: as many bytes as fit, in order. */
int vchan_ring_writev(struct vchan_ring *r, const void *const *bufs,
                      const size_t *lens, size_t n, int *notify);
/* All or nothing: len bytes, or 0 if they do not fit now. */
int vchan_ring_send(struct vchan_ring *r, const void *data, size_t len,
                    int *notify);
/* Zero-copy read, in two steps.  peek: the ready bytes as up to two
 * contiguous pieces of the ring (the second is non-empty when the data
 * wraps); returns the total and, like a read that empties the ring, arms a
 * "tell me on write" request.  The peer may scribble on those bytes at any
 * time: copy them before trusting them.  consume: release n of the bytes
 * peek reported (n no larger than that total). */
int vchan_ring_peek(struct vchan_ring *r, const uint8_t **a, uint32_t *alen,
                    const uint8_t **b, uint32_t *blen);
int vchan_ring_consume(struct vchan_ring *r, uint32_t n, int *notify);
/* vchan_ring_peek, arming the wake-up only when fewer than want bytes are
 * ready (a reader that needs a whole frame). */
int vchan_ring_peek_min(struct vchan_ring *r, size_t want, const uint8_t **a, uint32_t *alen,
                        const uint8_t **b, uint32_t *blen);
/* Zero-copy write, in two steps.  reserve: the free space of the write
 * ring as up to two contiguous pieces (the second non-empty when it wraps);
 * returns the total and, like a write that fills the ring, arms a "tell me
 * on read" request.  Fill a prefix of the pieces, then commit: publish n
 * bytes (n no larger than the total reserve reported). */
int vchan_ring_reserve(struct vchan_ring *r, uint8_t **a, uint32_t *alen,
                       uint8_t **b, uint32_t *blen);
int vchan_ring_commit(struct vchan_ring *r, uint32_t n, int *notify);
/* vchan_ring_commit without waking the peer, even if it asked: for data
 * the peer needs only when something else wakes it. */
int vchan_ring_commit_quiet(struct vchan_ring *r, uint32_t n);
/* After quiet commits: wake the peer now if it asked to be woken on write
 * (*notify set, the request cleared), as an ordinary commit would have.
 * Nothing to do (0, *notify untouched) when an ordinary commit has been
 * published since the last quiet one (it covered them), or when the peer
 * has taken everything written (it looked on its own: a poller). */
int vchan_ring_publish(struct vchan_ring *r, int *notify);
/* vchan_ring_reserve, arming the wake-up only when less than want bytes
 * are free (a writer that needs room for a whole frame). */
int vchan_ring_reserve_min(struct vchan_ring *r, size_t want, uint8_t **a, uint32_t *alen,
                           uint8_t **b, uint32_t *blen);
/* Stream read: copy up to len bytes into buf, return how many. */
int vchan_ring_read(struct vchan_ring *r, void *buf, size_t len,
                    int *notify);
/* All or nothing: exactly len bytes, or 0 if fewer are ready. */
int vchan_ring_recv(struct vchan_ring *r, void *buf, size_t len,
                    int *notify);

/* The peer's live byte (0, 1 or 2), or VCHAN_ELIVE / another error. */
int vchan_ring_peer_live(struct vchan_ring *r);
/* Whether the peer half-closed (VCHAN_NOTIFY_EOF seen): 1 or 0. */
int vchan_ring_peer_eof(struct vchan_ring *r);
/* The extension bits the peer has set in our notify byte
 * (VCHAN_NOTIFY_EOF | VCHAN_NOTIFY_CLOSED | VCHAN_NOTIFY_HELLO). */
int vchan_ring_peer_flags(struct vchan_ring *r);
/* Half-close our write side: the peer sees EOF after the data already
 * written.  Sets *notify. */
int vchan_ring_write_eof(struct vchan_ring *r, int *notify);
/* Mark our side closed: VCHAN_NOTIFY_CLOSED for a vchan peer, then live
 * byte 0.  The caller then unmaps and sends one event, as libxenvchan_close
 * does. */
void vchan_ring_close(struct vchan_ring *r);

/* The sticky remote error, or 0. */
int vchan_ring_error(const struct vchan_ring *r);
/* A static, human-readable description of a VCHAN_E* code. */
const char *vchan_strerror(int code);

#endif /* VCHAN_RING_H */
