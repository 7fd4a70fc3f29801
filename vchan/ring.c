/*
 * vchan/ring.c -- the libxenvchan ring protocol, hardened against its peer.
 *
 * THEORY OF OPERATION
 * ===================
 *
 * Two endpoints share one control page (struct vchan_interface, see ring.h)
 * and two byte rings.  The server's read ring is "left" (client -> server),
 * its write ring "right" (server -> client).  For each ring:
 *
 *   - prod is written only by the ring's writer, cons only by its reader;
 *     both are free-running u32 indices masked with size - 1, so the whole
 *     ring is usable and  0 <= prod - cons <= size  always holds.
 *   - the writer copies data into [prod, prod + n), then publishes prod + n;
 *     the reader copies out of [cons, cons + n), then publishes cons + n.
 *
 * Who writes which byte of the control page:
 *
 *   left.cons, right.prod, left_order, right_order, srv_live  -- server
 *   left.prod, right.cons, cli_live                           -- client
 *   cli_notify  -- server ORs in requests, client tests-and-clears them
 *   srv_notify  -- client ORs in requests, server tests-and-clears them
 *
 * Notification (how nobody sleeps through a wake-up):
 *
 *   - A side about to sleep because its read ring is empty (or its write
 *     ring full) first ORs VCHAN_NOTIFY_WRITE (or _READ) into the PEER's
 *     notify byte, issues a full fence, and RE-READS the peer's index.  Only
 *     if the re-read still shows nothing to do may it sleep.
 *   - A side that has just moved its index issues a full fence, then
 *     atomically fetches-and-clears the matching bit in its OWN notify byte;
 *     if the bit was set, an event must be sent.  These functions never send
 *     it: they set *notify and the caller does (ring.c makes no system call).
 *   The fences make the two sequences "store request; load index" and
 *   "store index; load request" each see the other's store, so at least one
 *   side notices: either the sleeper's re-read sees the new index, or the
 *   mover sees the request.
 *
 * Live bytes: 0 closed or crashed, 1 connected, 2 client not yet connected.
 * The kernel's unmap notification clears a dead side's byte, which is how a
 * crash is seen.
 *
 * Extensions (bits of the notify bytes libxenvchan never reads or clears;
 * a plain libxenvchan peer neither sets nor notices them):
 *
 *   HELLO   set at set-up: "I speak these extensions"
 *   EOF     half-close: ORed into the peer's byte after the last index
 *           update; the peer sees EOF once it has read everything
 *   CLOSED  graceful close: ORed in just before the live byte goes to 0,
 *           so a vchan peer can tell a close (CLOSED, live 0) from a crash
 *           (live 0 alone, cleared by the kernel's unmap notification)
 *
 * The peer is not trusted.  Our own indices and the ring geometry live in
 * private memory (struct vchan_ring) and are never read back from the shared
 * page.  Each of the peer's indices is loaded exactly once per operation and
 * validated before use:
 *
 *   read ring:   rd.peer - rd.own <= prod - rd.own <= size
 *                (data can only appear, and never more than fits)
 *   write ring:  wr.own - cons <= wr.own - wr.peer
 *                (space can only appear, and never more than we wrote)
 *
 * Orders are checked against their agreed values on every operation and a
 * live byte must be 0..2.  Any violation is a remote protocol error: it is
 * returned as a distinct code and latched, so the ring fails loudly and
 * never touches memory outside its buffers, whatever the peer writes.
 */
#include "ring.h"

#include <limits.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Fences, as libxenvchan orders them.                                 */
/* ------------------------------------------------------------------ */

#if defined(__x86_64__)
/* A locked add to the stack is a full fence, cheaper than mfence. */
#  define vchan_mb()  __asm__ __volatile__("lock; addl $0,-4(%%rsp)" ::: "memory", "cc")
/* x86 keeps loads after loads and stores after stores in order. */
#  define vchan_rmb() __asm__ __volatile__("" ::: "memory")
#  define vchan_wmb() __asm__ __volatile__("" ::: "memory")
#else
#  define vchan_mb()  __atomic_thread_fence(__ATOMIC_SEQ_CST)
#  define vchan_rmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#  define vchan_wmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif

/* Every shared access is a single atomic access: the compiler may neither
 * tear it nor re-load it.  Acquire/release cost nothing on x86 and tell
 * ThreadSanitizer what the fences mean. */
static inline uint32_t load_index(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store_index(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint8_t load_byte(const uint8_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store_byte(uint8_t *p, uint8_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------ */
/* Small accessors: which byte is whose.                               */
/* ------------------------------------------------------------------ */

/* The byte we OR requests into: the peer tests-and-clears it. */
static inline uint8_t *peer_notify(struct vchan_ring *r)
{
    return r->is_server ? &r->shr->cli_notify : &r->shr->srv_notify;
}

/* The byte the peer ORs requests into: we test-and-clear it. */
static inline uint8_t *own_notify(struct vchan_ring *r)
{
    return r->is_server ? &r->shr->srv_notify : &r->shr->cli_notify;
}

static inline uint8_t *own_live(struct vchan_ring *r)
{
    return r->is_server ? &r->shr->srv_live : &r->shr->cli_live;
}

static inline const uint8_t *peer_live(struct vchan_ring *r)
{
    return r->is_server ? &r->shr->cli_live : &r->shr->srv_live;
}

static inline int fail(struct vchan_ring *r, int code)
{
    if (!r->error)
        r->error = code;
    return r->error;
}

/* ------------------------------------------------------------------ */
/* Setup.                                                              */
/* ------------------------------------------------------------------ */

static int min_order(size_t size)
{
    int order = VCHAN_PAGE_SHIFT;
    while (size > ((size_t)1 << order))
        order++;
    return order;
}

int vchan_server_orders(size_t read_min, size_t write_min,
                        int *read_order, int *write_order)
{
    const size_t small = (size_t)1 << VCHAN_SMALL_ORDER;
    const size_t large = (size_t)1 << VCHAN_LARGE_ORDER;

    if (read_min > VCHAN_MAX_RING_SIZE || write_min > VCHAN_MAX_RING_SIZE)
        return VCHAN_EINVAL;
    *read_order = min_order(read_min);
    *write_order = min_order(write_min);
    /* Use the in-page rings when that avoids granting extra pages; only
     * one ring can take each in-page slot. */
    if (read_min <= small && write_min <= large) {
        *read_order = VCHAN_SMALL_ORDER;
        *write_order = VCHAN_LARGE_ORDER;
    } else if (read_min <= large && write_min <= small) {
        *read_order = VCHAN_LARGE_ORDER;
        *write_order = VCHAN_SMALL_ORDER;
    } else if (read_min <= large) {
        *read_order = VCHAN_LARGE_ORDER;
    } else if (write_min <= large) {
        *write_order = VCHAN_LARGE_ORDER;
    }
    return 0;
}

static int orders_valid(int a, int b)
{
    if (a < VCHAN_MIN_ORDER || a > VCHAN_MAX_ORDER)
        return 0;
    if (b < VCHAN_MIN_ORDER || b > VCHAN_MAX_ORDER)
        return 0;
    /* Both rings cannot occupy the same in-page slot. */
    if (a == b && a < VCHAN_PAGE_SHIFT)
        return 0;
    return 1;
}

int vchan_client_orders(const struct vchan_interface *page0,
                        int *read_order, int *write_order)
{
    /* Read each order once: the page may change under us. */
    int left = __atomic_load_n(&page0->left_order, __ATOMIC_RELAXED);
    int right = __atomic_load_n(&page0->right_order, __ATOMIC_RELAXED);

    if (!orders_valid(left, right))
        return VCHAN_EORDER;
    *write_order = left;    /* the client writes the left ring */
    *read_order = right;
    return 0;
}

int vchan_ring_offset(int order)
{
    if (order == VCHAN_SMALL_ORDER)
        return VCHAN_SMALL_OFFSET;
    if (order == VCHAN_LARGE_ORDER)
        return VCHAN_LARGE_OFFSET;
    return -1;
}

int vchan_ring_pages(int order)
{
    if (order < VCHAN_PAGE_SHIFT || order > VCHAN_MAX_ORDER)
        return 0;
    return 1 << (order - VCHAN_PAGE_SHIFT);
}

static void setup_half(struct vchan_half *h, struct vchan_ring_shared *s,
                       uint8_t *page0, int order, void *buf)
{
    int off = vchan_ring_offset(order);

    h->prod = &s->prod;
    h->cons = &s->cons;
    h->buffer = off >= 0 ? page0 + off : (uint8_t *)buf;
    h->size = (uint32_t)1 << order;
    h->mask = h->size - 1;
    h->own = 0;
    h->peer = 0;
}

static int check_buffers(int read_order, int write_order,
                         void *rd_buf, void *wr_buf)
{
    if (!orders_valid(read_order, write_order))
        return VCHAN_EINVAL;
    if (vchan_ring_offset(read_order) < 0 && !rd_buf)
        return VCHAN_EINVAL;
    if (vchan_ring_offset(write_order) < 0 && !wr_buf)
        return VCHAN_EINVAL;
    return 0;
}

int vchan_ring_init_server(struct vchan_ring *r, void *page0,
                           int read_order, int write_order,
                           void *rd_buf, void *wr_buf)
{
    struct vchan_interface *shr = page0;
    int rc = check_buffers(read_order, write_order, rd_buf, wr_buf);

    if (rc)
        return rc;
    memset(r, 0, sizeof(*r));
    memset(page0, 0, VCHAN_PAGE_SIZE);
    r->shr = shr;
    r->is_server = 1;
    r->left_order = (uint16_t)read_order;
    r->right_order = (uint16_t)write_order;
    setup_half(&r->rd, &shr->left, page0, read_order, rd_buf);
    setup_half(&r->wr, &shr->right, page0, write_order, wr_buf);

    shr->left_order = (uint16_t)read_order;
    shr->right_order = (uint16_t)write_order;
    shr->cli_live = VCHAN_LIVE_WAITING;
    shr->srv_live = VCHAN_LIVE_CONNECTED;
    /* Tell me when you write; and I speak the vchan extensions. */
    shr->cli_notify = VCHAN_NOTIFY_WRITE | VCHAN_NOTIFY_HELLO;
    vchan_wmb();    /* set up the page /before/ anyone is told of it */
    return 0;
}

int vchan_ring_init_client(struct vchan_ring *r, void *page0,
                           int read_order, int write_order,
                           void *rd_buf, void *wr_buf)
{
    struct vchan_interface *shr = page0;
    int rc = check_buffers(read_order, write_order, rd_buf, wr_buf);

    if (rc)
        return rc;
    memset(r, 0, sizeof(*r));
    r->shr = shr;
    r->is_server = 0;
    r->left_order = (uint16_t)write_order;
    r->right_order = (uint16_t)read_order;
    setup_half(&r->rd, &shr->right, page0, read_order, rd_buf);
    setup_half(&r->wr, &shr->left, page0, write_order, wr_buf);

    /* Start from where the page says we are (zero for a fresh server);
     * from here on our own indices are private. */
    r->rd.own = r->rd.peer = load_index(r->rd.cons);
    r->wr.own = r->wr.peer = load_index(r->wr.prod);

    store_byte(&shr->cli_live, VCHAN_LIVE_CONNECTED);
    /* Tell me on write (a plain store, as libxenvchan's); and I speak the
     * vchan extensions. */
    store_byte(&shr->srv_notify, VCHAN_NOTIFY_WRITE | VCHAN_NOTIFY_HELLO);
    vchan_mb();     /* connect /before/ the caller's first event */
    return 0;
}

/* ------------------------------------------------------------------ */
/* Indices.                                                            */
/* ------------------------------------------------------------------ */

/* The orders must never change once agreed (checked on every operation:
 * two loads from a line we touch anyway). */
static inline int check_orders(struct vchan_ring *r)
{
    if (__atomic_load_n(&r->shr->left_order, __ATOMIC_RELAXED) != r->left_order ||
        __atomic_load_n(&r->shr->right_order, __ATOMIC_RELAXED) != r->right_order)
        return fail(r, VCHAN_EORDER);
    return 0;
}

/* Bytes ready in the read ring: the peer's prod, read once, validated. */
static inline int64_t rd_ready(struct vchan_ring *r)
{
    uint32_t prod = load_index(r->rd.prod);
    uint32_t ready = prod - r->rd.own;

    vchan_mb();     /* read prod /once/, before anything that depends on it */
    if (ready > r->rd.size || ready < r->rd.peer - r->rd.own)
        return fail(r, VCHAN_EINDEX);
    r->rd.peer = prod;
    return ready;
}

/* Free space in the write ring: the peer's cons, read once, validated. */
static inline int64_t wr_space(struct vchan_ring *r)
{
    uint32_t cons = load_index(r->wr.cons);
    uint32_t used = r->wr.own - cons;

    vchan_mb();     /* read cons /once/, before anything that depends on it */
    if (used > r->wr.own - r->wr.peer)
        return fail(r, VCHAN_EINDEX);
    r->wr.peer = cons;
    return r->wr.size - used;
}

/* Ask the peer to tell us when it moves its index; the caller re-reads. */
static inline void request_notify(struct vchan_ring *r, uint8_t bit)
{
    __atomic_or_fetch(peer_notify(r), bit, __ATOMIC_SEQ_CST);
    vchan_mb();     /* post the request /before/ re-reading any index */
}

/* After moving our index: does the peer want to hear about it? */
static inline void send_notify(struct vchan_ring *r, uint8_t bit, int *notify)
{
    uint8_t prev;

    vchan_mb();     /* update the index /before/ looking at the request */
    prev = __atomic_fetch_and(own_notify(r), (uint8_t)~bit, __ATOMIC_SEQ_CST);
    if (prev & bit)
        *notify = 1;
}

static inline int usable(struct vchan_ring *r)
{
    if (r->error)
        return r->error;
    return check_orders(r);
}

/* Ready bytes; if fewer than want, arm a wake-up and look again. */
static inline int64_t fast_ready(struct vchan_ring *r, size_t want)
{
    int64_t ready = rd_ready(r);

    if (ready < 0 || (size_t)ready >= want)
        return ready;
    /* We plan to consume everything: tell us when more is written. */
    request_notify(r, VCHAN_NOTIFY_WRITE);
    /* prod may have moved between our read and the request. */
    return rd_ready(r);
}

/* Free space; if less than want, arm a wake-up and look again. */
static inline int64_t fast_space(struct vchan_ring *r, size_t want)
{
    int64_t space = wr_space(r);

    if (space < 0 || (size_t)space >= want)
        return space;
    /* We plan to fill the ring: tell us when it is read. */
    request_notify(r, VCHAN_NOTIFY_READ);
    /* cons may have moved between our read and the request. */
    return wr_space(r);
}

int vchan_ring_data_ready(struct vchan_ring *r)
{
    int rc = usable(r);

    if (rc)
        return rc;
    /* The value is used outside: ask to hear when it changes. */
    request_notify(r, VCHAN_NOTIFY_WRITE);
    return (int)rd_ready(r);
}

int vchan_ring_buffer_space(struct vchan_ring *r)
{
    int rc = usable(r);

    if (rc)
        return rc;
    if (r->eof_sent)
        return VCHAN_ECLOSED;
    request_notify(r, VCHAN_NOTIFY_READ);
    return (int)wr_space(r);
}

/* ------------------------------------------------------------------ */
/* Copies.                                                             */
/* ------------------------------------------------------------------ */

/* Copy n bytes (n <= free space, validated) into the ring at our prod. */
static inline void put(struct vchan_ring *r, const uint8_t *src, uint32_t n)
{
    uint32_t at = r->wr.own & r->wr.mask;
    uint32_t first = r->wr.size - at;

    if (first > n)
        first = n;
    memcpy(r->wr.buffer + at, src, first);
    if (first < n)      /* wrapped across the end of the ring */
        memcpy(r->wr.buffer, src + first, n - first);
    r->wr.own += n;
}

/* Copy n bytes (n <= ready, validated) out of the ring at our cons. */
static inline void get(struct vchan_ring *r, uint8_t *dst, uint32_t n)
{
    uint32_t at = r->rd.own & r->rd.mask;
    uint32_t first = r->rd.size - at;

    if (first > n)
        first = n;
    memcpy(dst, r->rd.buffer + at, first);
    if (first < n)
        memcpy(dst + first, r->rd.buffer, n - first);
    r->rd.own += n;
}

static inline void publish_prod(struct vchan_ring *r, int *notify)
{
    vchan_wmb();    /* write data /then/ publish the index */
    store_index(r->wr.prod, r->wr.own);
    r->quiet = 0;
    send_notify(r, VCHAN_NOTIFY_WRITE, notify);
}

static inline void publish_cons(struct vchan_ring *r, int *notify)
{
    vchan_mb();     /* copy the data out /then/ free the space */
    store_index(r->rd.cons, r->rd.own);
    send_notify(r, VCHAN_NOTIFY_READ, notify);
}

void vchan_ring_disarm(struct vchan_ring *r)
{
    if (!usable(r))
        __atomic_and_fetch(peer_notify(r), (uint8_t)~VCHAN_NOTIFY_WRITE, __ATOMIC_SEQ_CST);
}

int vchan_ring_write_now(struct vchan_ring *r)
{
    int64_t space;
    int rc = usable(r);

    if (rc)
        return rc;
    space = wr_space(r);
    if (space < 0)
        return (int)space;
    /* A hint, not a promise: read without asking for anything. */
    return space == r->wr.size || (load_byte(own_notify(r)) & VCHAN_NOTIFY_WRITE);
}

/* ------------------------------------------------------------------ */
/* I/O.                                                                */
/* ------------------------------------------------------------------ */

static inline int write_check(struct vchan_ring *r)
{
    int rc = usable(r);

    if (rc)
        return rc;
    if (r->eof_sent)
        return VCHAN_ECLOSED;
    return 0;
}

int vchan_ring_write(struct vchan_ring *r, const void *data, size_t len,
                     int *notify)
{
    int64_t space;
    uint32_t n;
    int rc = write_check(r);

    if (rc)
        return rc;
    if (len == 0)
        return 0;
    space = fast_space(r, len);
    if (space <= 0)
        return (int)space;
    n = (size_t)space < len ? (uint32_t)space : (uint32_t)len;
    vchan_mb();     /* read indexes /then/ write data */
    put(r, data, n);
    publish_prod(r, notify);
    return (int)n;
}

int vchan_ring_writev(struct vchan_ring *r, const void *const *bufs,
                      const size_t *lens, size_t nbufs, int *notify)
{
    size_t want = 0, i;
    int64_t space;
    uint32_t left, done = 0;
    int rc = write_check(r);

    if (rc)
        return rc;
    for (i = 0; i < nbufs; i++) {
        /* Saturate instead of wrapping: a sum that wrapped could look small
         * (or 0) and skip the wake-up request on a short write. */
        if (lens[i] > VCHAN_MAX_RING_SIZE - want) {
            want = (size_t)VCHAN_MAX_RING_SIZE + 1;    /* more than any ring */
            break;
        }
        want += lens[i];
    }
    if (want == 0)
        return 0;
    space = fast_space(r, want);
    if (space <= 0)
        return (int)space;
    left = (uint32_t)space;
    vchan_mb();     /* read indexes /then/ write data */
    for (i = 0; i < nbufs && left; i++) {
        uint32_t n = lens[i] < left ? (uint32_t)lens[i] : left;
        put(r, bufs[i], n);
        left -= n;
        done += n;
    }
    publish_prod(r, notify);
    return (int)done;
}

int vchan_ring_send(struct vchan_ring *r, const void *data, size_t len,
                    int *notify)
{
    int64_t space;
    int rc = write_check(r);

    if (rc)
        return rc;
    if (len > r->wr.size)
        return VCHAN_EMSGSIZE;
    if (len == 0)
        return 0;
    space = fast_space(r, len);
    if (space < 0)
        return (int)space;
    if ((size_t)space < len)
        return 0;
    vchan_mb();     /* read indexes /then/ write data */
    put(r, data, (uint32_t)len);
    publish_prod(r, notify);
    return (int)len;
}

int vchan_ring_read(struct vchan_ring *r, void *buf, size_t len, int *notify)
{
    int64_t ready;
    uint32_t n;
    int rc = usable(r);

    if (rc)
        return rc;
    if (len == 0)
        return 0;
    ready = fast_ready(r, len);
    if (ready <= 0)
        return (int)ready;
    n = (size_t)ready < len ? (uint32_t)ready : (uint32_t)len;
    vchan_rmb();    /* read prod /then/ the data it covers */
    get(r, buf, n);
    publish_cons(r, notify);
    return (int)n;
}

int vchan_ring_peek(struct vchan_ring *r, const uint8_t **a, uint32_t *alen,
                    const uint8_t **b, uint32_t *blen)
{
    /* wants it all: arms */
    return vchan_ring_peek_min(r, (size_t)r->rd.size + 1, a, alen, b, blen);
}

int vchan_ring_peek_min(struct vchan_ring *r, size_t want, const uint8_t **a, uint32_t *alen,
                        const uint8_t **b, uint32_t *blen)
{
    int64_t ready;
    uint32_t at, first;
    int rc = usable(r);

    *alen = *blen = 0;
    *a = *b = r->rd.buffer;
    if (rc)
        return rc;
    ready = fast_ready(r, want);
    if (ready <= 0)
        return (int)ready;
    vchan_rmb();    /* read prod /then/ the data it covers */
    at = r->rd.own & r->rd.mask;
    first = r->rd.size - at;
    if (first > (uint32_t)ready)
        first = (uint32_t)ready;
    *a = r->rd.buffer + at;
    *alen = first;
    *blen = (uint32_t)ready - first;
    return (int)ready;
}

int vchan_ring_consume(struct vchan_ring *r, uint32_t n, int *notify)
{
    int rc = usable(r);

    if (rc)
        return rc;
    /* Only what a peek validated: rd.peer is the last prod we accepted. */
    if (n > r->rd.peer - r->rd.own)
        return VCHAN_EINVAL;
    if (n == 0)
        return 0;
    r->rd.own += n;
    publish_cons(r, notify);
    return (int)n;
}

int vchan_ring_reserve(struct vchan_ring *r, uint8_t **a, uint32_t *alen,
                       uint8_t **b, uint32_t *blen)
{
    /* wants it all: arms */
    return vchan_ring_reserve_min(r, (size_t)r->wr.size + 1, a, alen, b, blen);
}

int vchan_ring_reserve_min(struct vchan_ring *r, size_t want, uint8_t **a, uint32_t *alen,
                           uint8_t **b, uint32_t *blen)
{
    int64_t space;
    uint32_t at, first;
    int rc = write_check(r);

    *alen = *blen = 0;
    *a = *b = r->wr.buffer;
    if (rc)
        return rc;
    space = fast_space(r, want);
    if (space <= 0)
        return (int)space;
    vchan_mb();     /* read cons /then/ let the caller write the space */
    at = r->wr.own & r->wr.mask;
    first = r->wr.size - at;
    if (first > (uint32_t)space)
        first = (uint32_t)space;
    *a = r->wr.buffer + at;
    *alen = first;
    *blen = (uint32_t)space - first;
    return (int)space;
}

static int commit(struct vchan_ring *r, uint32_t n, int *notify)
{
    int rc = write_check(r);

    if (rc)
        return rc;
    /* Only what a reserve validated: wr.peer is the last cons we accepted. */
    if (n > r->wr.size - (r->wr.own - r->wr.peer))
        return VCHAN_EINVAL;
    if (n == 0)
        return 0;
    r->wr.own += n;
    if (notify) {
        publish_prod(r, notify);
    } else {
        /* Quiet: publish without looking at the peer's request, which stays
         * armed for the next ordinary write (that wakes the peer for both). */
        vchan_wmb();    /* write data /then/ publish the index */
        store_index(r->wr.prod, r->wr.own);
        r->quiet = 1;
    }
    return (int)n;
}

int vchan_ring_commit(struct vchan_ring *r, uint32_t n, int *notify)
{
    return commit(r, n, notify);
}

int vchan_ring_commit_quiet(struct vchan_ring *r, uint32_t n)
{
    return commit(r, n, NULL);
}

int vchan_ring_publish(struct vchan_ring *r, int *notify)
{
    int64_t space;
    int rc = usable(r);

    if (rc)
        return rc;
    if (!r->quiet)
        return 0;
    space = wr_space(r);
    if (space < 0)
        return (int)space;
    if (space == r->wr.size) {
        /* It took them already (it looked without being woken): its
         * request is for what comes next. */
        r->quiet = 0;
        return 0;
    }
    publish_prod(r, notify);
    return 0;
}

int vchan_ring_recv(struct vchan_ring *r, void *buf, size_t len, int *notify)
{
    int64_t ready;
    int rc = usable(r);

    if (rc)
        return rc;
    if (len > r->rd.size)
        return VCHAN_EMSGSIZE;
    if (len == 0)
        return 0;
    ready = fast_ready(r, len);
    if (ready < 0)
        return (int)ready;
    if ((size_t)ready < len)
        return 0;
    vchan_rmb();    /* read prod /then/ the data it covers */
    get(r, buf, (uint32_t)len);
    publish_cons(r, notify);
    return (int)len;
}

/* ------------------------------------------------------------------ */
/* Liveness and shutdown.                                              */
/* ------------------------------------------------------------------ */

int vchan_ring_peer_live(struct vchan_ring *r)
{
    uint8_t live;

    if (r->error)
        return r->error;
    live = load_byte(peer_live(r));
    if (live > VCHAN_LIVE_WAITING)
        return fail(r, VCHAN_ELIVE);
    return live;
}

int vchan_ring_peer_eof(struct vchan_ring *r)
{
    return (load_byte(own_notify(r)) & VCHAN_NOTIFY_EOF) ? 1 : 0;
}

int vchan_ring_peer_flags(struct vchan_ring *r)
{
    return load_byte(own_notify(r)) & VCHAN_NOTIFY_EXTENSIONS;
}

int vchan_ring_write_eof(struct vchan_ring *r, int *notify)
{
    if (r->error)
        return r->error;
    if (r->eof_sent)
        return 0;
    r->eof_sent = 1;
    vchan_mb();     /* every index update /before/ the EOF mark */
    __atomic_or_fetch(peer_notify(r), VCHAN_NOTIFY_EOF, __ATOMIC_SEQ_CST);
    *notify = 1;
    return 0;
}

void vchan_ring_close(struct vchan_ring *r)
{
    vchan_mb();     /* every index update /before/ the close marks */
    __atomic_or_fetch(peer_notify(r), VCHAN_NOTIFY_CLOSED, __ATOMIC_SEQ_CST);
    store_byte(own_live(r), VCHAN_LIVE_CLOSED);
    r->eof_sent = 1;
}

int vchan_ring_error(const struct vchan_ring *r)
{
    return r->error;
}

const char *vchan_strerror(int code)
{
    switch (code) {
    case 0:
        return "no error";
    case VCHAN_EINVAL:
        return "invalid argument";
    case VCHAN_EMSGSIZE:
        return "message larger than the ring";
    case VCHAN_ECLOSED:
        return "endpoint closed for writing";
    case VCHAN_EINDEX:
        return "peer corrupted a ring index (producer/consumer outside the valid window)";
    case VCHAN_EORDER:
        return "peer changed or announced an invalid ring order";
    case VCHAN_ELIVE:
        return "peer wrote a live byte outside 0..2";
    default:
        return "unknown vchan ring error";
    }
}
