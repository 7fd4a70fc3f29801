/*
 * tests/fuzz/ring_fuzz.c -- libFuzzer harness for vchan/ring.c: the fuzzer
 * is a hostile peer.
 *
 * Build:  clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *             -fno-sanitize-recover=all -Ivchan \
 *             tests/fuzz/ring_fuzz.c vchan/ring.c vchan/splice.c -o ring_fuzz
 * Run:    ./ring_fuzz -max_total_time=60 -timeout=5 corpus_dir/
 *         VCHAN_FUZZ_TRACE=1 ./ring_fuzz crash-file     (print every op)
 *
 * The input drives ONE endpoint (server or client, from the first byte;
 * orders from the input, invalid ones included: the client's go through
 * vchan_client_orders) through a sequence of operations -- write, read,
 * send, recv, writev, peek, consume, reserve (then filling a prefix of the
 * pieces through the returned pointers), commit (of the validated space, one
 * byte more, a small count or any u32, after writing the bytes it publishes),
 * data_ready, buffer_space, peer_live, peer_eof, peer_flags, write_eof,
 * close, and splice.c's vchan_splice_to_fd / vchan_splice_from_fd over a
 * non-blocking AF_UNIX socketpair or pipe made once per process (empty,
 * filled until EAGAIN, holding some bytes, or at end of file), with lengths
 * from 0 to far beyond the ring (SIZE_MAX included) -- interleaved with
 * whatever a hostile peer
 * can do to shared memory: arbitrary bytes at any offset of the control page
 * (indices, orders, live bytes, notify bytes, grants, in-page ring data),
 * rewrites of the separate ring buffers, and -- so the fuzzer also reaches
 * deep, valid states -- well-behaved peer steps (produce into our read ring,
 * consume from our write ring, request notifications).
 *
 * Memory: page 0 is malloc(4096) and every separate ring buffer is its own
 * malloc of exactly the ring size; every user buffer handed to the ring is
 * an exact-size malloc of the bytes the call may touch; so ASan sees any
 * out-of-bounds access (in-page rings are checked by the byte-for-byte
 * comparison of page 0 below).  Nothing is ever "fixed up" between
 * operations.  Operations per input are bounded (MAX_OPS); libFuzzer's
 * -timeout catches a call that does not return.
 *
 * Invariants (checked after every operation; violation -> abort()):
 *   - a return value is a byte count within the requested length and the
 *     ring size, or one of the documented negative codes;
 *   - once a remote error (VCHAN_EINDEX / EORDER / ELIVE) is returned, every
 *     later I/O call returns that same error, and vchan_ring_error() says so;
 *   - a stream/all-or-nothing call that returns 0 for a non-empty request
 *     has armed the matching notify request in the peer's notify byte (a
 *     caller may now sleep);
 *   - beyond those, the result is compared with a reference model of the
 *     protocol described in ring.c's "theory of operation": the peer's index
 *     is validated against the documented window (a violation MUST be
 *     reported, a valid index MUST be accepted), counts are
 *     min(requested, available), data read is exactly the ring bytes at our
 *     consumer index, data written lands exactly at our producer index, and
 *     the endpoint changes no byte of shared memory other than the ones the
 *     protocol gives it (own index, notify bits, own live byte, its own write
 *     ring), checked byte for byte on page 0 after every operation and on the
 *     separate buffers (after every operation for rings <= 64 KiB, else at
 *     the end of the input);
 *   - *notify is set exactly when the peer had asked, and is otherwise left
 *     untouched;
 *   - zero-copy pieces (peek, reserve) lie exactly at our index inside our
 *     own ring, wrapping once, and are (buffer, 0, buffer, 0) on error;
 *   - splice: the kernel moves between 1 byte and min(max, ring, queued)
 *     bytes, exactly the ring's (to_fd) or the channel's (from_fd), the rest
 *     stays queued; a full / empty channel gives VCHAN_SPLICE_ERRNO with
 *     EAGAIN, a closed one VCHAN_SPLICE_EOF, and neither touches the ring.
 *     Every operation leaves its channel empty, so runs stay reproducible.
 */
#define _GNU_SOURCE     /* pipe2 */
#define FUZZ_NAME "ring_fuzz"
#include "harness.h"
#include "ring.h"
#include "splice.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PAGE        VCHAN_PAGE_SIZE
#define MAX_OPS     2048
#define MAX_IOV     8                   /* writev pieces */
#define FULL_CHECK_MAX  (64u * 1024)    /* per-op compare of separate buffers */

static uint64_t u64(struct input *in)
{
    uint64_t v = u32(in);
    return v | (uint64_t)u32(in) << 32;
}

/* Random bytes for data, made once: cheap slices for any size. */
#define TABLE_SIZE  ((size_t)2 << 20)
static uint8_t table[TABLE_SIZE + VCHAN_MAX_RING_SIZE];

static const uint8_t *data_at(struct input *in)
{
    return table + (u32(in) % TABLE_SIZE);
}

/* A length for a call: small, near the ring size, or absurd. */
static size_t get_len(struct input *in, uint32_t size)
{
    static const size_t huge[] = {
        SIZE_MAX, SIZE_MAX - 1, SIZE_MAX / 2, (size_t)INT_MAX,
        (size_t)INT_MAX + 1, (size_t)UINT32_MAX, (size_t)UINT32_MAX + 1,
        VCHAN_MAX_RING_SIZE, VCHAN_MAX_RING_SIZE + 1, (size_t)1 << 40,
    };
    uint8_t k = u8(in);

    switch (k & 7) {
    case 0: return k >> 3;                              /* 0..31 */
    case 1: return u8(in);
    case 2: return u16(in);
    case 3: return (size_t)size + (size_t)(k >> 3);     /* size .. size+31 */
    case 4: return size >= (k >> 3) ? size - (k >> 3) : 0; /* size-31 .. size */
    case 5: return huge[(k >> 3) % (sizeof(huge) / sizeof(huge[0]))];
    case 6: return u32(in);
    default: return (size_t)u64(in);
    }
}

/* ------------------------------------------------------------------ */
/* Page layout.                                                        */
/* ------------------------------------------------------------------ */

#define OFF_LEFT_CONS       offsetof(struct vchan_interface, left.cons)
#define OFF_LEFT_PROD       offsetof(struct vchan_interface, left.prod)
#define OFF_RIGHT_CONS      offsetof(struct vchan_interface, right.cons)
#define OFF_RIGHT_PROD      offsetof(struct vchan_interface, right.prod)
#define OFF_LEFT_ORDER      offsetof(struct vchan_interface, left_order)
#define OFF_RIGHT_ORDER     offsetof(struct vchan_interface, right_order)
#define OFF_CLI_LIVE        offsetof(struct vchan_interface, cli_live)
#define OFF_SRV_LIVE        offsetof(struct vchan_interface, srv_live)
#define OFF_CLI_NOTIFY      offsetof(struct vchan_interface, cli_notify)
#define OFF_SRV_NOTIFY      offsetof(struct vchan_interface, srv_notify)

static uint32_t get32(const uint8_t *p, size_t off)
{
    uint32_t v;
    memcpy(&v, p + off, 4);
    return v;
}

static void put32(uint8_t *p, size_t off, uint32_t v)
{
    memcpy(p + off, &v, 4);
}

static uint16_t get16(const uint8_t *p, size_t off)
{
    uint16_t v;
    memcpy(&v, p + off, 2);
    return v;
}

static void put16(uint8_t *p, size_t off, uint16_t v)
{
    memcpy(p + off, &v, 2);
}

/* The documented order rule (vchan_client_orders / init). */
static int model_orders_valid(long a, long b)
{
    if (a < VCHAN_MIN_ORDER || a > VCHAN_MAX_ORDER)
        return 0;
    if (b < VCHAN_MIN_ORDER || b > VCHAN_MAX_ORDER)
        return 0;
    if (a == b && a < VCHAN_PAGE_SHIFT)
        return 0;
    return 1;
}

/* ------------------------------------------------------------------ */
/* The endpoint under test and its reference model.                    */
/* ------------------------------------------------------------------ */

struct half {
    uint8_t *buf;           /* the ring's memory (in page 0 or separate) */
    uint8_t *exp;           /* separate buffers: expected contents */
    size_t page_off;        /* in-page rings: offset in page 0, else 0 */
    int in_page;
    uint32_t size, mask;
    uint32_t own, peer;     /* model: our index, last validated peer index */
    size_t own_off;         /* our index in page 0 */
    size_t peer_off;        /* the peer's index in page 0 */
};

static struct {
    struct vchan_ring ring;
    uint8_t *page;
    uint8_t *dummy[2];      /* buffers passed with invalid orders */
    struct half rd, wr;
    int is_server;
    uint16_t left_order, right_order;
    size_t own_notify, peer_notify, own_live, peer_live;
    int error;              /* model's sticky remote error */
    int eof_sent;
    struct {                /* the last successful reserve, as the user keeps it */
        int valid;
        uint8_t *a, *b;
        uint32_t alen, blen;
        uint32_t own;       /* wr.own then: the pieces are stale once it moves */
    } resv;
} M;

/* Snapshots for one operation: pre is page 0 before the call, exp what it
 * must be after. */
static uint8_t pre[PAGE], exp_page[PAGE];

/* A ring's bytes as they were before the current op, and as they must be
 * after it. */
static const uint8_t *ring_before(const struct half *h)
{
    return h->in_page ? pre + h->page_off : h->exp;
}

static uint8_t *ring_after(struct half *h)
{
    return h->in_page ? exp_page + h->page_off : h->exp;
}

/* Copy n <= size bytes into a ring at free-running index i (wrapping). */
static void ring_copy_in(uint8_t *ring, const struct half *h, uint32_t i,
                         const uint8_t *src, uint32_t n)
{
    uint32_t at = i & h->mask, first = h->size - at < n ? h->size - at : n;

    memcpy(ring + at, src, first);
    memcpy(ring, src + first, n - first);
}

/* Does got[0..n) equal the ring's bytes from index i (before the op)?
 * Returns the first differing offset, or n. */
static uint32_t ring_compare(const struct half *h, uint32_t i, const uint8_t *got,
                             uint32_t n)
{
    const uint8_t *ring = ring_before(h);
    uint32_t at = i & h->mask, first = h->size - at < n ? h->size - at : n, k;

    if (memcmp(got, ring + at, first) == 0 && memcmp(got + first, ring, n - first) == 0)
        return n;
    for (k = 0; k < n && got[k] == ring[(at + k) & h->mask]; k++)
        ;
    return k;
}

/* --- model primitives (mirroring the documented protocol) --- */

static int m_usable(void)
{
    if (M.error)
        return M.error;
    if (get16(pre, OFF_LEFT_ORDER) != M.left_order ||
        get16(pre, OFF_RIGHT_ORDER) != M.right_order)
        return M.error = VCHAN_EORDER;
    return 0;
}

/* read ring: rd.peer - rd.own <= prod - rd.own <= size */
static int64_t m_rd_ready(void)
{
    uint32_t prod = get32(pre, M.rd.peer_off);
    uint32_t ready = prod - M.rd.own;

    if (ready > M.rd.size || ready < M.rd.peer - M.rd.own) {
        if (!M.error)
            M.error = VCHAN_EINDEX;
        return M.error;
    }
    M.rd.peer = prod;
    return ready;
}

/* write ring: wr.own - cons <= wr.own - wr.peer */
static int64_t m_wr_space(void)
{
    uint32_t cons = get32(pre, M.wr.peer_off);
    uint32_t used = M.wr.own - cons;

    if (used > M.wr.own - M.wr.peer) {
        if (!M.error)
            M.error = VCHAN_EINDEX;
        return M.error;
    }
    M.wr.peer = cons;
    return (int64_t)M.wr.size - used;
}

static void m_arm(uint8_t bit)
{
    exp_page[M.peer_notify] |= bit;
}

/* After moving our index: test-and-clear the peer's request. */
static void m_publish(struct half *h, uint8_t bit, int *exp_notify)
{
    put32(exp_page, h->own_off, h->own);
    if (exp_page[M.own_notify] & bit)
        *exp_notify = 1;
    exp_page[M.own_notify] &= (uint8_t)~bit;
}

static void m_put(const uint8_t *src, uint32_t n)
{
    ring_copy_in(ring_after(&M.wr), &M.wr, M.wr.own, src, n);
    M.wr.own += n;
}

/* ------------------------------------------------------------------ */
/* Checks after a call.                                                */
/* ------------------------------------------------------------------ */

static int is_remote(int rc)
{
    return rc == VCHAN_EINDEX || rc == VCHAN_EORDER || rc == VCHAN_ELIVE;
}

/* Generic invariants, before the comparison with the model. */
static void check_generic(int rc, size_t len, uint32_t size, int io)
{
    if (rc >= 0) {
        CHECK((size_t)rc <= len);
        CHECK((uint32_t)rc <= size);
    } else {
        CHECK(rc == VCHAN_EINVAL || rc == VCHAN_EMSGSIZE || rc == VCHAN_ECLOSED ||
              is_remote(rc));
    }
    if (io && M.error)     /* sticky: the same error forever */
        CHECK_EQ(M.error, rc);
}

static void check_buffer(const struct half *h, int full)
{
    if (h->in_page || (!full && h->size > FULL_CHECK_MAX))
        return;
    if (memcmp(h->buf, h->exp, h->size) != 0) {
        uint32_t i = 0;
        while (h->buf[i] == h->exp[i])
            i++;
        report(__LINE__, "%s ring buffer byte %u is 0x%02x, expected 0x%02x",
               h == &M.rd ? "read" : "write", i, h->buf[i], h->exp[i]);
    }
}

/* Compare the whole shared state with the model's expectation. */
static void check_memory(int full)
{
    if (memcmp(M.page, exp_page, PAGE) != 0) {
        size_t i = 0;
        while (M.page[i] == exp_page[i])
            i++;
        report(__LINE__, "page 0 byte %zu is 0x%02x, expected 0x%02x (was 0x%02x)",
               i, M.page[i], exp_page[i], pre[i]);
    }
    check_buffer(&M.rd, full);
    check_buffer(&M.wr, full);
    CHECK_EQ(M.error, vchan_ring_error(&M.ring));
}

static void begin_op(const char *name)
{
    op_name = name;
    memcpy(pre, M.page, PAGE);
    memcpy(exp_page, pre, PAGE);
}

static void check_notify(int before, int expected_set, int after)
{
    if (expected_set)
        CHECK_EQ(1, after);
    else
        CHECK_EQ(before, after);    /* untouched */
}

/* Exact-size allocations of a whole ring size (>= 4 KiB), kept across
 * executions: the large ones would otherwise be mmapped and unmapped for
 * every input, which costs more than the fuzzing.  Each is still its own
 * malloc of exactly 1 << order bytes, so ASan sees any access beyond it.
 * Slots: 0 / 1 the separate read / write ring, 2 / 3 their expected copies,
 * 4.. user buffers (one per writev piece). */
#define CACHE_SLOTS (4 + MAX_IOV)
#define SLOT_USER   4
static uint8_t *cache[CACHE_SLOTS][VCHAN_MAX_ORDER + 1];

static uint8_t *cached(int slot, uint32_t size)
{
    int order = 0;

    while (((uint32_t)1 << order) < size)
        order++;
    if (!cache[slot][order] && !(cache[slot][order] = malloc(size)))
        abort();
    return cache[slot][order];
}

/* A user buffer of exactly the bytes a call may touch. */
static uint8_t *user_buf(size_t len, uint32_t size, const uint8_t *fill, int slot)
{
    size_t n = len < size ? len : size;
    uint8_t *p = n == size && size >= PAGE ? cached(SLOT_USER + slot, size)
                                           : malloc(n ? n : 1);

    if (!p)
        abort();
    if (fill)
        memcpy(p, fill, n);
    return p;
}

static void user_free(uint8_t *p, size_t len, uint32_t size)
{
    if (!((len < size ? len : size) == size && size >= PAGE))
        free(p);
}

/* ------------------------------------------------------------------ */
/* Endpoint operations.                                                */
/* ------------------------------------------------------------------ */

enum xfer { X_WRITE, X_SEND, X_READ, X_RECV };

static void op_write(struct input *in, enum xfer kind)
{
    size_t len = get_len(in, M.wr.size);
    const uint8_t *src = data_at(in);
    int notify0 = u8(in) & 1, notify = notify0, exp_notify = 0;
    int64_t exp, space;
    uint8_t *buf;
    int rc;

    begin_op(kind == X_SEND ? "send" : "write");
    TRACE("#%u %s(len=%zu)\n", op_index, op_name, len);
    buf = user_buf(len, M.wr.size, src, 0);

    /* model */
    if ((exp = m_usable()) != 0)
        goto call;
    if (M.eof_sent) {
        exp = VCHAN_ECLOSED;
        goto call;
    }
    if (kind == X_SEND && len > M.wr.size) {
        exp = VCHAN_EMSGSIZE;
        goto call;
    }
    if (len == 0) {
        exp = 0;
        goto call;
    }
    space = m_wr_space();
    if (space >= 0 && (uint64_t)space < len) {
        m_arm(VCHAN_NOTIFY_READ);
        space = m_wr_space();
    }
    if (space < 0 || space == 0 || (kind == X_SEND && (uint64_t)space < len)) {
        exp = space < 0 ? space : 0;
        goto call;
    }
    exp = (uint64_t)space < len ? space : (int64_t)len;
    m_put(buf, (uint32_t)exp);
    m_publish(&M.wr, VCHAN_NOTIFY_WRITE, &exp_notify);

call:
    rc = kind == X_SEND ? vchan_ring_send(&M.ring, buf, len, &notify)
                        : vchan_ring_write(&M.ring, buf, len, &notify);
    TRACE("    -> %d (model %lld)\n", rc, (long long)exp);
    check_generic(rc, len, M.wr.size, 1);
    if (rc == 0 && len > 0 && len <= M.wr.size && !M.eof_sent)
        CHECK(M.page[M.peer_notify] & VCHAN_NOTIFY_READ);   /* may sleep */
    if (rc == 0 && len > 0 && kind == X_WRITE && !M.eof_sent)
        CHECK(M.page[M.peer_notify] & VCHAN_NOTIFY_READ);
    CHECK_EQ(exp, rc);
    check_notify(notify0, exp_notify, notify);
    check_memory(0);
    user_free(buf, len, M.wr.size);
}

static void op_read(struct input *in, enum xfer kind)
{
    size_t len = get_len(in, M.rd.size);
    int notify0 = u8(in) & 1, notify = notify0, exp_notify = 0;
    int64_t exp, ready;
    uint32_t start = M.rd.own;
    uint8_t *buf;
    int rc;

    begin_op(kind == X_RECV ? "recv" : "read");
    TRACE("#%u %s(len=%zu)\n", op_index, op_name, len);
    buf = user_buf(len, M.rd.size, NULL, 0);

    if ((exp = m_usable()) != 0)
        goto call;
    if (kind == X_RECV && len > M.rd.size) {
        exp = VCHAN_EMSGSIZE;
        goto call;
    }
    if (len == 0) {
        exp = 0;
        goto call;
    }
    ready = m_rd_ready();
    if (ready >= 0 && (uint64_t)ready < len) {
        m_arm(VCHAN_NOTIFY_WRITE);
        ready = m_rd_ready();
    }
    if (ready <= 0 || (kind == X_RECV && (uint64_t)ready < len)) {
        exp = ready < 0 ? ready : 0;
        goto call;
    }
    exp = (uint64_t)ready < len ? ready : (int64_t)len;
    M.rd.own += (uint32_t)exp;
    m_publish(&M.rd, VCHAN_NOTIFY_READ, &exp_notify);

call:
    rc = kind == X_RECV ? vchan_ring_recv(&M.ring, buf, len, &notify)
                        : vchan_ring_read(&M.ring, buf, len, &notify);
    TRACE("    -> %d (model %lld)\n", rc, (long long)exp);
    check_generic(rc, len, M.rd.size, 1);
    if (rc == 0 && len > 0 && (kind == X_READ || len <= M.rd.size))
        CHECK(M.page[M.peer_notify] & VCHAN_NOTIFY_WRITE);  /* may sleep */
    CHECK_EQ(exp, rc);
    /* the bytes are exactly the ring's, from our consumer index */
    if (rc > 0) {
        uint32_t k = ring_compare(&M.rd, start, buf, (uint32_t)rc);
        if (k != (uint32_t)rc)
            report(__LINE__, "read byte %u (ring index %u) is 0x%02x, expected 0x%02x",
                   k, start + k, buf[k], ring_before(&M.rd)[(start + k) & M.rd.mask]);
    }
    check_notify(notify0, exp_notify, notify);
    check_memory(0);
    user_free(buf, len, M.rd.size);
}

static void op_writev(struct input *in)
{
    size_t n = u8(in) % (MAX_IOV + 1), i;
    const void *bufs[MAX_IOV];
    uint8_t *own[MAX_IOV];
    size_t lens[MAX_IOV];
    unsigned __int128 total = 0;
    int notify0, notify, exp_notify = 0, rc;
    int64_t exp, space;

    for (i = 0; i < n; i++) {
        lens[i] = get_len(in, M.wr.size);
        own[i] = user_buf(lens[i], M.wr.size, data_at(in), (int)i);
        bufs[i] = own[i];
        total += lens[i];
    }
    notify0 = notify = u8(in) & 1;
    begin_op("writev");
    TRACE("#%u writev(n=%zu, total=%llu%s)\n", op_index, n,
          (unsigned long long)(total > UINT64_MAX ? UINT64_MAX : total),
          total > SIZE_MAX ? " or more: overflows size_t" : "");

    if ((exp = m_usable()) != 0)
        goto call;
    if (M.eof_sent) {
        exp = VCHAN_ECLOSED;
        goto call;
    }
    if (total == 0) {
        exp = 0;
        goto call;
    }
    space = m_wr_space();
    if (space >= 0 && (unsigned __int128)space < total) {
        m_arm(VCHAN_NOTIFY_READ);
        space = m_wr_space();
    }
    if (space <= 0) {
        exp = space;
        goto call;
    }
    {
        uint32_t left = (uint32_t)space, done = 0;
        for (i = 0; i < n && left; i++) {
            uint32_t k = lens[i] < left ? (uint32_t)lens[i] : left;
            m_put(own[i], k);
            left -= k;
            done += k;
        }
        exp = done;
    }
    m_publish(&M.wr, VCHAN_NOTIFY_WRITE, &exp_notify);

call:
    rc = vchan_ring_writev(&M.ring, bufs, lens, n, &notify);
    TRACE("    -> %d (model %lld)\n", rc, (long long)exp);
    check_generic(rc, total > SIZE_MAX ? SIZE_MAX : (size_t)total, M.wr.size, 1);
    if (rc == 0 && total > 0 && !M.eof_sent)
        CHECK(M.page[M.peer_notify] & VCHAN_NOTIFY_READ);   /* may sleep */
    CHECK_EQ(exp, rc);
    check_notify(notify0, exp_notify, notify);
    check_memory(0);
    for (i = 0; i < n; i++)
        user_free(own[i], lens[i], M.wr.size);
}

static void op_data_ready(void)
{
    int64_t exp;
    int rc;

    begin_op("data_ready");
    if ((exp = m_usable()) == 0) {
        m_arm(VCHAN_NOTIFY_WRITE);
        exp = m_rd_ready();
    }
    rc = vchan_ring_data_ready(&M.ring);
    TRACE("#%u data_ready -> %d (model %lld)\n", op_index, rc, (long long)exp);
    check_generic(rc, M.rd.size, M.rd.size, 1);
    CHECK_EQ(exp, rc);
    check_memory(0);
}

static void op_buffer_space(void)
{
    int64_t exp;
    int rc;

    begin_op("buffer_space");
    if ((exp = m_usable()) == 0) {
        if (M.eof_sent) {
            exp = VCHAN_ECLOSED;
        } else {
            m_arm(VCHAN_NOTIFY_READ);
            exp = m_wr_space();
        }
    }
    rc = vchan_ring_buffer_space(&M.ring);
    TRACE("#%u buffer_space -> %d (model %lld)\n", op_index, rc, (long long)exp);
    check_generic(rc, M.wr.size, M.wr.size, 1);
    CHECK_EQ(exp, rc);
    check_memory(0);
}

static void op_peer_live(void)
{
    int exp, rc;

    begin_op("peer_live");
    if (M.error) {
        exp = M.error;
    } else if (pre[M.peer_live] > VCHAN_LIVE_WAITING) {
        exp = M.error = VCHAN_ELIVE;
    } else {
        exp = pre[M.peer_live];
    }
    rc = vchan_ring_peer_live(&M.ring);
    TRACE("#%u peer_live -> %d (model %d)\n", op_index, rc, exp);
    check_generic(rc, 2, 2, 1);
    CHECK_EQ(exp, rc);
    check_memory(0);
}

static void op_peer_eof(void)
{
    int rc;

    begin_op("peer_eof");
    rc = vchan_ring_peer_eof(&M.ring);
    TRACE("#%u peer_eof -> %d\n", op_index, rc);
    CHECK_EQ((pre[M.own_notify] & VCHAN_NOTIFY_EOF) ? 1 : 0, rc);
    check_memory(0);
}

static void op_peer_flags(void)
{
    int rc;

    begin_op("peer_flags");
    rc = vchan_ring_peer_flags(&M.ring);
    TRACE("#%u peer_flags -> 0x%02x\n", op_index, rc);
    CHECK_EQ(pre[M.own_notify] & VCHAN_NOTIFY_EXTENSIONS, rc);
    check_memory(0);
}

/* Zero-copy read, first step: the ready bytes in place, as two pieces. */
static void op_peek(void)
{
    const uint8_t *a = NULL, *b = NULL;
    uint32_t alen = 0xdeadbeef, blen = 0xdeadbeef, exp_alen = 0, exp_blen = 0;
    uint32_t at = M.rd.own & M.rd.mask;
    int64_t exp;
    int rc;

    begin_op("peek");
    if ((exp = m_usable()) == 0) {
        exp = m_rd_ready();
        if (exp >= 0) {
            /* it wants everything: always arms, then looks again */
            m_arm(VCHAN_NOTIFY_WRITE);
            exp = m_rd_ready();
        }
        if (exp > 0) {
            exp_alen = M.rd.size - at < (uint32_t)exp ? M.rd.size - at : (uint32_t)exp;
            exp_blen = (uint32_t)exp - exp_alen;
        }
    }
    rc = vchan_ring_peek(&M.ring, &a, &alen, &b, &blen);
    TRACE("#%u peek -> %d (%u + %u) (model %lld)\n", op_index, rc, alen, blen,
          (long long)exp);
    check_generic(rc, M.rd.size, M.rd.size, 1);
    if (rc == 0)
        CHECK(M.page[M.peer_notify] & VCHAN_NOTIFY_WRITE);  /* may sleep */
    CHECK_EQ(exp, rc);
    CHECK_EQ(exp_alen, alen);
    CHECK_EQ(exp_blen, blen);
    if (rc > 0) {
        CHECK(a == M.rd.buf + at);
        CHECK(b == M.rd.buf);
        /* the pieces are the ring's bytes from our consumer index */
        CHECK(ring_compare(&M.rd, M.rd.own, a, alen) == alen);
        CHECK(ring_compare(&M.rd, M.rd.own + alen, b, blen) == blen);
    } else {
        CHECK(a == M.rd.buf && b == M.rd.buf);
    }
    check_memory(0);
}

/* Zero-copy read, second step: release n bytes (at most what was validated). */
static void op_consume(struct input *in)
{
    uint8_t k = u8(in);
    uint32_t validated = M.rd.peer - M.rd.own, n;
    int notify0 = k & 1, notify = notify0, exp_notify = 0, rc;
    int64_t exp;

    switch ((k >> 1) & 3) {
    case 0: n = validated; break;
    case 1: n = validated + 1; break;
    case 2: n = (uint32_t)(k >> 3) < validated ? (uint32_t)(k >> 3) : validated; break;
    default: n = u32(in); break;
    }
    begin_op("consume");
    if ((exp = m_usable()) == 0) {
        if (n > validated) {
            exp = VCHAN_EINVAL;
        } else if (n > 0) {
            M.rd.own += n;
            m_publish(&M.rd, VCHAN_NOTIFY_READ, &exp_notify);
            exp = n;
        }
    }
    rc = vchan_ring_consume(&M.ring, n, &notify);
    TRACE("#%u consume(%u of %u validated) -> %d (model %lld)\n", op_index, n,
          validated, rc, (long long)exp);
    check_generic(rc, n, M.rd.size, 1);
    CHECK_EQ(exp, rc);
    check_notify(notify0, exp_notify, notify);
    check_memory(0);
}

/* The user writes n <= validated free bytes at our producer index, as a
 * reserve's caller does: through the pieces of the last reservation while
 * it is current (as far as they reach), else at the ring's own address.
 * The expected copy of a separate buffer is kept in step (page 0 is
 * snapshotted by the next begin_op). */
static void user_fill(const uint8_t *src, uint32_t n)
{
    uint32_t done = 0, k;

    if (M.resv.valid && M.resv.own == M.wr.own) {
        k = n < M.resv.alen ? n : M.resv.alen;
        memcpy(M.resv.a, src, k);
        done = k;
        k = n - done < M.resv.blen ? n - done : M.resv.blen;
        memcpy(M.resv.b, src + done, k);
        done += k;
    }
    ring_copy_in(M.wr.buf, &M.wr, M.wr.own + done, src + done, n - done);
    if (!M.wr.in_page)
        ring_copy_in(M.wr.exp, &M.wr, M.wr.own, src, n);
}

/* Zero-copy write, first step: the free space in place, as two pieces;
 * then the caller fills a prefix of it (any length up to the total). */
static void op_reserve(struct input *in)
{
    uint8_t *a = NULL, *b = NULL;
    uint32_t alen = 0xdeadbeef, blen = 0xdeadbeef, exp_alen = 0, exp_blen = 0;
    uint32_t at = M.wr.own & M.wr.mask, fill = u16(in);
    const uint8_t *src = data_at(in);
    int64_t exp;
    int rc;

    begin_op("reserve");
    if ((exp = m_usable()) == 0) {
        if (M.eof_sent) {
            exp = VCHAN_ECLOSED;
        } else {
            exp = m_wr_space();
            if (exp >= 0) {
                /* it wants everything: always arms, then looks again */
                m_arm(VCHAN_NOTIFY_READ);
                exp = m_wr_space();
            }
            if (exp > 0) {
                exp_alen = M.wr.size - at < (uint32_t)exp ? M.wr.size - at : (uint32_t)exp;
                exp_blen = (uint32_t)exp - exp_alen;
            }
        }
    }
    rc = vchan_ring_reserve(&M.ring, &a, &alen, &b, &blen);
    TRACE("#%u reserve -> %d (%u + %u) (model %lld)\n", op_index, rc, alen, blen,
          (long long)exp);
    check_generic(rc, M.wr.size, M.wr.size, 1);
    if (rc == 0)
        CHECK(M.page[M.peer_notify] & VCHAN_NOTIFY_READ);   /* may sleep */
    CHECK_EQ(exp, rc);
    CHECK_EQ(exp_alen, alen);
    CHECK_EQ(exp_blen, blen);
    if (rc > 0) {
        /* inside our write ring, from our producer index, wrapping once */
        CHECK(a == M.wr.buf + at);
        CHECK(b == M.wr.buf);
    } else {
        CHECK(a == M.wr.buf && b == M.wr.buf);
    }
    check_memory(0);
    if (rc > 0) {
        M.resv.valid = 1;
        M.resv.a = a;
        M.resv.b = b;
        M.resv.alen = alen;
        M.resv.blen = blen;
        M.resv.own = M.wr.own;
        fill %= (uint32_t)rc + 1;
        TRACE("    fill %u\n", fill);
        user_fill(src, fill);
    }
}

/* Zero-copy write, second step: publish n bytes (at most the validated
 * free space).  Unless told not to, the harness first writes the bytes it
 * is about to publish, so their content is known exactly. */
static void op_commit(struct input *in)
{
    uint8_t k = u8(in);
    uint32_t validated = M.wr.size - (M.wr.own - M.wr.peer), n, start = M.wr.own;
    const uint8_t *src = data_at(in);
    int notify0 = k & 1, notify = notify0, exp_notify = 0, rc, wrote = 0;
    uint32_t small = (k >> 3) & 15;
    int64_t exp;

    switch ((k >> 1) & 3) {
    case 0: n = validated; break;
    case 1: n = validated + 1; break;
    case 2: n = small < validated ? small : validated; break;
    default: n = u32(in); break;
    }
    if (!(k & 0x80) && n <= validated) {
        user_fill(src, n);      /* the stream's next bytes */
        wrote = 1;
    }
    begin_op("commit");
    if ((exp = m_usable()) == 0) {
        if (M.eof_sent) {
            exp = VCHAN_ECLOSED;
        } else if (n > validated) {
            exp = VCHAN_EINVAL;
        } else if (n > 0) {
            M.wr.own += n;
            m_publish(&M.wr, VCHAN_NOTIFY_WRITE, &exp_notify);
            exp = n;
        }
    }
    rc = vchan_ring_commit(&M.ring, n, &notify);
    TRACE("#%u commit(%u of %u validated%s) -> %d (model %lld)\n", op_index, n,
          validated, wrote ? ", written" : "", rc, (long long)exp);
    check_generic(rc, n, M.wr.size, 1);
    CHECK_EQ(exp, rc);
    check_notify(notify0, exp_notify, notify);
    /* what was published is exactly what the harness wrote there */
    if (rc > 0 && wrote)
        CHECK(ring_compare(&M.wr, start, src, (uint32_t)rc) == (uint32_t)rc);
    check_memory(0);
}

/* ------------------------------------------------------------------ */
/* Ring <-> descriptor (splice.c), over a non-blocking socketpair or   */
/* pipe made once per process.  Each operation leaves its channel      */
/* empty, so the kernel's side is deterministic: an empty channel      */
/* accepts at least one byte, a full one (filled until EAGAIN) none,   */
/* a channel with m bytes queued yields between 1 and m of them.       */
/* ------------------------------------------------------------------ */

struct chan {
    int w, r;               /* the harness or splice writes w, reads r */
};
static struct chan chans[2];    /* 0: AF_UNIX stream socketpair, 1: pipe */
static uint8_t spill[VCHAN_MAX_RING_SIZE + 1];
static uint8_t junk[64 * 1024];

/* Small channels (tens of KiB, not the default hundreds): filling one is
 * cheap, and a ring's worth of data often moves in several partial calls. */
#define CHAN_BUF    (16 * 1024)

static void chan_open(int i)
{
    int fds[2], sndbuf = CHAN_BUF;

    if (i == 0) {
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) ||
            setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)))
            abort();
        chans[0].w = fds[0];
        chans[0].r = fds[1];
    } else {
        if (pipe2(fds, O_NONBLOCK | O_CLOEXEC))
            abort();
        (void)fcntl(fds[1], F_SETPIPE_SZ, CHAN_BUF);  /* best effort */
        chans[1].r = fds[0];
        chans[1].w = fds[1];
    }
}

/* Read everything queued (until EAGAIN); the first cap bytes into dst. */
static size_t chan_drain(struct chan *c, uint8_t *dst, size_t cap)
{
    size_t total = 0;

    for (;;) {
        ssize_t got = total < cap ? read(c->r, dst + total, cap - total)
                                  : read(c->r, junk, sizeof(junk));
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            CHECK(errno == EAGAIN);
            return total;
        }
        CHECK(got > 0);     /* the write end is never closed here */
        total += (size_t)got;
    }
}

/* Queue up to n bytes of src (as many as the channel accepts). */
static size_t chan_put(struct chan *c, const uint8_t *src, size_t n)
{
    size_t done = 0;

    while (done < n) {
        ssize_t put = write(c->w, src + done, n - done);
        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0) {
            CHECK(errno == EAGAIN);
            break;
        }
        done += (size_t)put;
    }
    return done;
}

/* Fill the channel until not even one more byte fits. */
static size_t chan_fill(struct chan *c)
{
    size_t total = 0, put;

    while ((put = chan_put(c, junk, sizeof(junk))) == sizeof(junk))
        total += put;
    total += put;
    while ((put = chan_put(c, junk, 1)) == 1)
        total += put;
    return total;
}

#define SPLICE_MOVED    INT64_MIN   /* model: some bytes, count from the kernel */

static void op_splice(struct input *in)
{
    uint8_t k = u8(in);
    int to_fd = k & 1, mode = (k >> 2) & 3;
    struct chan *c = &chans[(k >> 1) & 1];
    int notify0 = (k >> 4) & 1, notify = notify0, exp_notify = 0, err = -1, exp_err = 0;
    size_t max = get_len(in, to_fd ? M.rd.size : M.wr.size), queued = 0, left;
    uint32_t m = to_fd ? 0 : u16(in);
    const uint8_t *src = to_fd ? NULL : data_at(in);
    int64_t exp, avail = 0;
    int rc;

    /* to_fd: mode 3 a full channel, else an empty one;
     * from_fd: modes 0-1 m bytes queued, 2 nothing, 3 end of file */
    if (to_fd && mode == 3)
        queued = chan_fill(c);
    else if (!to_fd && mode < 2)
        queued = chan_put(c, src, m);
    else if (!to_fd && mode == 3) {
        close(c->w);
        c->w = -1;
    }
    begin_op(to_fd ? "splice_to_fd" : "splice_from_fd");
    if (to_fd) {
        /* peek (always arms), sendmsg, consume */
        if ((exp = m_usable()) == 0) {
            exp = m_rd_ready();
            if (exp >= 0) {
                m_arm(VCHAN_NOTIFY_WRITE);
                exp = m_rd_ready();
            }
            avail = exp;
            if (exp > 0 && max == 0)
                exp = 0;
            else if (exp > 0 && mode == 3)
                exp = VCHAN_SPLICE_ERRNO, exp_err = EAGAIN;
            else if (exp > 0)
                exp = SPLICE_MOVED;
        }
    } else {
        /* reserve (always arms), readv, commit */
        if ((exp = m_usable()) == 0) {
            if (M.eof_sent) {
                exp = VCHAN_ECLOSED;
            } else {
                exp = m_wr_space();
                if (exp >= 0) {
                    m_arm(VCHAN_NOTIFY_READ);
                    exp = m_wr_space();
                }
                avail = exp;
                if (exp > 0 && max == 0)
                    exp = 0;
                else if (exp > 0 && mode == 3)
                    exp = VCHAN_SPLICE_EOF;
                else if (exp > 0 && queued == 0)
                    exp = VCHAN_SPLICE_ERRNO, exp_err = EAGAIN;
                else if (exp > 0)
                    exp = SPLICE_MOVED;
            }
        }
    }

    rc = to_fd ? vchan_splice_to_fd(&M.ring, c->w, max, &notify, &err)
               : vchan_splice_from_fd(&M.ring, c->r, max, &notify, &err);
    if (exp == SPLICE_MOVED)
        TRACE("#%u %s(%s, max=%zu, mode %d, queued %zu) -> %d, err %d (model 1..%lld)\n",
              op_index, op_name, c == &chans[0] ? "socket" : "pipe", max, mode, queued,
              rc, err, (long long)avail);
    else
        TRACE("#%u %s(%s, max=%zu, mode %d, queued %zu) -> %d, err %d (model %lld)\n",
              op_index, op_name, c == &chans[0] ? "socket" : "pipe", max, mode, queued,
              rc, err, (long long)exp);

    if (rc == VCHAN_SPLICE_EOF || rc == VCHAN_SPLICE_ERRNO)
        CHECK(!M.error);
    else
        check_generic(rc, max, to_fd ? M.rd.size : M.wr.size, 1);
    if (rc == 0 && max > 0)     /* may sleep: the wake-up is armed */
        CHECK(M.page[M.peer_notify] & (to_fd ? VCHAN_NOTIFY_WRITE : VCHAN_NOTIFY_READ));
    if (exp == SPLICE_MOVED) {
        /* between 1 byte and all that fits (max, the ring, the channel) */
        size_t limit = max < (size_t)avail ? max : (size_t)avail;

        if (!to_fd && queued < limit)
            limit = queued;
        if (rc <= 0 || (size_t)rc > limit)
            report(__LINE__, "moved %d bytes, expected 1..%zu", rc, limit);
        exp = rc;
        if (to_fd) {
            /* the channel holds exactly the ring's bytes from our consumer index */
            size_t got = chan_drain(c, spill, sizeof(spill));
            CHECK_EQ(rc, got);
            CHECK(ring_compare(&M.rd, M.rd.own, spill, (uint32_t)rc) == (uint32_t)rc);
            M.rd.own += (uint32_t)rc;
            m_publish(&M.rd, VCHAN_NOTIFY_READ, &exp_notify);
        } else {
            /* the ring holds the channel's first bytes, the rest is still queued */
            m_put(src, (uint32_t)rc);
            m_publish(&M.wr, VCHAN_NOTIFY_WRITE, &exp_notify);
            left = chan_drain(c, spill, sizeof(spill));
            CHECK_EQ(queued - (size_t)rc, left);
            CHECK(memcmp(spill, src + rc, left) == 0);
        }
    } else if (c->w >= 0) {
        /* nothing moved: the channel holds what the harness put there */
        left = chan_drain(c, spill, sizeof(spill));
        CHECK_EQ(queued, left);
        if (!to_fd)
            CHECK(memcmp(spill, src, left) == 0);
    }
    CHECK_EQ(exp, rc);
    CHECK_EQ(exp_err, err);
    check_notify(notify0, exp_notify, notify);
    check_memory(0);
    if (c->w < 0) {
        /* end of file was tested: a fresh channel */
        close(c->r);
        chan_open(c == &chans[0] ? 0 : 1);
    }
}

static void op_write_eof(struct input *in)
{
    int notify0 = u8(in) & 1, notify = notify0, exp_notify = 0, exp, rc;

    begin_op("write_eof");
    if (M.error) {
        exp = M.error;
    } else if (M.eof_sent) {
        exp = 0;
    } else {
        exp = 0;
        M.eof_sent = 1;
        m_arm(VCHAN_NOTIFY_EOF);
        exp_notify = 1;
    }
    rc = vchan_ring_write_eof(&M.ring, &notify);
    TRACE("#%u write_eof -> %d (model %d)\n", op_index, rc, exp);
    check_generic(rc, 0, 0, 1);
    CHECK_EQ(exp, rc);
    check_notify(notify0, exp_notify, notify);
    check_memory(0);
}

static void op_close(void)
{
    begin_op("close");
    TRACE("#%u close\n", op_index);
    exp_page[M.peer_notify] |= VCHAN_NOTIFY_CLOSED;   /* graceful, not a crash */
    exp_page[M.own_live] = VCHAN_LIVE_CLOSED;
    M.eof_sent = 1;
    vchan_ring_close(&M.ring);
    check_memory(0);
}

static void op_error(void)
{
    begin_op("error");
    CHECK_EQ(M.error, vchan_ring_error(&M.ring));
    CHECK(vchan_strerror(vchan_ring_error(&M.ring)) != NULL);
}

/* Pure functions: server order choice, offsets, strerror. */
static void op_server_orders(struct input *in)
{
    size_t rmin = get_len(in, VCHAN_MAX_RING_SIZE);
    size_t wmin = get_len(in, VCHAN_MAX_RING_SIZE);
    int ro = -100, wo = -100, rc, code = (int8_t)u8(in);

    op_name = "server_orders";
    rc = vchan_server_orders(rmin, wmin, &ro, &wo);
    TRACE("#%u server_orders(%zu, %zu) -> %d (%d, %d)\n", op_index, rmin, wmin,
          rc, ro, wo);
    if (rmin > VCHAN_MAX_RING_SIZE || wmin > VCHAN_MAX_RING_SIZE) {
        CHECK_EQ(VCHAN_EINVAL, rc);
    } else {
        CHECK_EQ(0, rc);
        CHECK(model_orders_valid(ro, wo));
        CHECK(((size_t)1 << ro) >= rmin);
        CHECK(((size_t)1 << wo) >= wmin);
        /* never more than the next power of two (>= a page) or an in-page ring */
        CHECK(ro <= VCHAN_PAGE_SHIFT || ((size_t)1 << (ro - 1)) < rmin);
        CHECK(wo <= VCHAN_PAGE_SHIFT || ((size_t)1 << (wo - 1)) < wmin);
        /* the in-page rings never overlap the grants of the other ring */
        {
            size_t grants = (size_t)(vchan_ring_pages(ro) + vchan_ring_pages(wo)) * 4;
            size_t end = offsetof(struct vchan_interface, grants) + grants;
            if (vchan_ring_offset(ro) >= 0)
                CHECK(end <= (size_t)vchan_ring_offset(ro));
            if (vchan_ring_offset(wo) >= 0)
                CHECK(end <= (size_t)vchan_ring_offset(wo));
        }
    }
    CHECK(vchan_strerror(code) != NULL);
    for (int o = 0; o <= 24; o++) {
        int off = vchan_ring_offset(o), pages = vchan_ring_pages(o);
        CHECK(off == (o == 10 ? 1024 : o == 11 ? 2048 : -1));
        CHECK(pages == (o >= 12 && o <= 20 ? 1 << (o - 12) : 0));
    }
}

/* ------------------------------------------------------------------ */
/* Peer operations (the fuzzer's side).  They change shared memory     */
/* only, and keep the expected copies of separate buffers in step.     */
/* ------------------------------------------------------------------ */

static void peer_ring_write(struct half *h, uint32_t at, const uint8_t *src, uint32_t n)
{
    ring_copy_in(h->buf, h, at, src, n);
    if (!h->in_page)
        ring_copy_in(h->exp, h, at, src, n);
}

/* A well-behaved peer produces into our read ring. */
static void peer_produce(struct input *in)
{
    uint32_t prod = get32(M.page, M.rd.peer_off);
    uint32_t cons = get32(M.page, M.rd.own_off);
    uint32_t used = prod - cons, room, n;
    const uint8_t *src = data_at(in);
    uint32_t want = u32(in);

    room = used > M.rd.size ? 0 : M.rd.size - used;
    n = want % (room + 1);
    TRACE("#%u peer produces %u (prod %u)\n", op_index, n, prod + n);
    peer_ring_write(&M.rd, prod, src, n);
    put32(M.page, M.rd.peer_off, prod + n);
}

/* A well-behaved peer consumes from our write ring. */
static void peer_consume(struct input *in)
{
    uint32_t prod = get32(M.page, M.wr.own_off);
    uint32_t cons = get32(M.page, M.wr.peer_off);
    uint32_t avail = prod - cons, n;
    uint32_t want = u32(in);

    if (avail > M.wr.size)
        avail = 0;
    n = want % (avail + 1);
    TRACE("#%u peer consumes %u (cons %u)\n", op_index, n, cons + n);
    put32(M.page, M.wr.peer_off, cons + n);
}

/* Raw bytes anywhere in page 0. */
static void peer_poke_page(struct input *in)
{
    size_t off = u16(in) % PAGE, n = 1 + u8(in) % 16, i;

    TRACE("#%u poke page[%zu..+%zu]\n", op_index, off, n);
    for (i = 0; i < n && off + i < PAGE; i++)
        M.page[off + i] = u8(in);
}

/* One of the four indices, set relative to something meaningful. */
static void peer_poke_index(struct input *in)
{
    static const size_t offs[4] = {OFF_LEFT_CONS, OFF_LEFT_PROD, OFF_RIGHT_CONS,
                                   OFF_RIGHT_PROD};
    uint8_t sel = u8(in);
    size_t off = offs[sel & 3];
    uint32_t base, delta;

    switch ((sel >> 2) & 3) {
    case 0: base = get32(M.page, off); break;
    case 1: base = M.rd.own; break;
    case 2: base = M.wr.own; break;
    default: base = 0; break;
    }
    /* small steps, multiples of the ring size (wrap-arounds), or anything;
     * unsigned arithmetic: indices are free-running u32 */
    if (sel & 0x10)
        delta = (uint32_t)(int32_t)(int8_t)u8(in);
    else if (sel & 0x20)
        delta = (uint32_t)(int32_t)(int16_t)u16(in) * (sel & 0x40 ? M.rd.size : 1u);
    else
        delta = u32(in);
    TRACE("#%u poke index @%zu = %u\n", op_index, off, base + delta);
    put32(M.page, off, base + delta);
}

/* Scribble over either ring's data (our write ring too: never read). */
static void peer_poke_ring(struct input *in)
{
    struct half *h = u8(in) & 1 ? &M.wr : &M.rd;
    uint32_t at = u32(in), n = u16(in) % (h->size + 1);

    TRACE("#%u poke %s ring [%u..+%u]\n", op_index, h == &M.rd ? "read" : "write",
          at & h->mask, n);
    peer_ring_write(h, at, data_at(in), n);
}

static void peer_request(struct input *in)
{
    uint8_t b = u8(in);
    uint8_t bits = b & 0x80 ? u8(in)
                            : (uint8_t)(b & (VCHAN_NOTIFY_READ | VCHAN_NOTIFY_WRITE |
                                             VCHAN_NOTIFY_EOF));
    size_t which = b & 0x40 ? M.peer_notify : M.own_notify;

    TRACE("#%u notify byte @%zu %s 0x%02x\n", op_index, which,
          b & 0x20 ? "=" : "|=", bits);
    if (b & 0x20)
        M.page[which] = bits;
    else
        M.page[which] |= bits;
}

static void peer_poke_live(struct input *in)
{
    uint8_t b = u8(in);
    uint8_t v = b & 0x80 ? u8(in) : (uint8_t)(b % 3);

    TRACE("#%u peer live = %u\n", op_index, v);
    M.page[b & 0x40 ? M.own_live : M.peer_live] = v;
}

static void peer_poke_order(struct input *in)
{
    uint8_t b = u8(in);
    uint16_t v = b & 0x80 ? u16(in) : (uint16_t)(8 + b % 14);

    TRACE("#%u %s_order = %u\n", op_index, b & 1 ? "right" : "left", v);
    put16(M.page, b & 1 ? OFF_RIGHT_ORDER : OFF_LEFT_ORDER, v);
}

/* ------------------------------------------------------------------ */
/* Setup.                                                              */
/* ------------------------------------------------------------------ */

static int order_from(struct input *in)
{
    uint8_t b = u8(in);

    if (b & 0x80)           /* raw, mostly invalid */
        return (int)(int16_t)u16(in);
    return 8 + b % 14;      /* 8..21: valid 10..20 and a few invalid */
}

/* Separate buffer of exactly the ring size, or in page 0.  Invalid orders
 * get a one-byte dummy, so a wrongly accepted order is caught by ASan. */
static uint8_t *alloc_ring(int order, int slot, int drop)
{
    uint8_t *buf;
    size_t size;

    if (drop)
        return NULL;
    if (order >= VCHAN_MIN_ORDER && order <= VCHAN_MAX_ORDER && vchan_ring_offset(order) >= 0)
        return NULL;        /* in page 0: the pointer must be ignored */
    if (order >= 12 && order <= VCHAN_MAX_ORDER) {
        size = (size_t)1 << order;
        buf = cached(slot, (uint32_t)size);
    } else {
        size = 1;
        buf = M.dummy[slot] = malloc(1);
        if (!buf)
            abort();
    }
    memcpy(buf, table + ((size_t)order * 7919u) % TABLE_SIZE, size);
    return buf;
}

static void setup_half(struct half *h, int slot, int order, uint8_t *buf,
                       size_t own_off, size_t peer_off)
{
    int off = vchan_ring_offset(order);

    memset(h, 0, sizeof(*h));
    h->size = (uint32_t)1 << order;
    h->mask = h->size - 1;
    h->own_off = own_off;
    h->peer_off = peer_off;
    if (off >= 0) {
        h->in_page = 1;
        h->page_off = (size_t)off;
        h->buf = M.page + off;
    } else {
        h->buf = buf;
        h->exp = cached(slot + 2, h->size);
        memcpy(h->exp, buf, h->size);
    }
}

static void roles(void)
{
    if (M.is_server) {
        M.own_notify = OFF_SRV_NOTIFY;
        M.peer_notify = OFF_CLI_NOTIFY;
        M.own_live = OFF_SRV_LIVE;
        M.peer_live = OFF_CLI_LIVE;
    } else {
        M.own_notify = OFF_CLI_NOTIFY;
        M.peer_notify = OFF_SRV_NOTIFY;
        M.own_live = OFF_CLI_LIVE;
        M.peer_live = OFF_SRV_LIVE;
    }
}

/* Returns 1 if an endpoint is set up. */
static int setup_server(struct input *in, uint8_t flags)
{
    int ro = order_from(in), wo = order_from(in), rc, valid;
    uint8_t *rbuf = alloc_ring(ro, 0, flags & 0x10);
    uint8_t *wbuf = alloc_ring(wo, 1, flags & 0x20);

    op_name = "init_server";
    M.is_server = 1;
    roles();
    /* start from garbage: the server must initialise everything */
    memcpy(M.page, data_at(in), PAGE);
    memcpy(pre, M.page, PAGE);
    valid = model_orders_valid(ro, wo) &&
            (vchan_ring_offset(ro) >= 0 || rbuf) && (vchan_ring_offset(wo) >= 0 || wbuf);
    rc = vchan_ring_init_server(&M.ring, M.page, ro, wo, rbuf, wbuf);
    TRACE("init_server(%d, %d, %p, %p) -> %d\n", ro, wo, (void *)rbuf, (void *)wbuf, rc);
    if (!valid) {
        CHECK_EQ(VCHAN_EINVAL, rc);
        CHECK(memcmp(M.page, pre, PAGE) == 0);      /* untouched */
        return 0;
    }
    CHECK_EQ(0, rc);
    M.left_order = (uint16_t)ro;
    M.right_order = (uint16_t)wo;
    /* expected page: zero, then the header */
    memset(exp_page, 0, PAGE);
    put16(exp_page, OFF_LEFT_ORDER, (uint16_t)ro);
    put16(exp_page, OFF_RIGHT_ORDER, (uint16_t)wo);
    exp_page[OFF_CLI_LIVE] = VCHAN_LIVE_WAITING;
    exp_page[OFF_SRV_LIVE] = VCHAN_LIVE_CONNECTED;
    exp_page[OFF_CLI_NOTIFY] = VCHAN_NOTIFY_WRITE | VCHAN_NOTIFY_HELLO;
    CHECK(memcmp(M.page, exp_page, PAGE) == 0);
    setup_half(&M.rd, 0, ro, rbuf, OFF_LEFT_CONS, OFF_LEFT_PROD);
    setup_half(&M.wr, 1, wo, wbuf, OFF_RIGHT_PROD, OFF_RIGHT_CONS);
    return 1;
}

static int setup_client(struct input *in, uint8_t flags)
{
    int left, right, ro = -100, wo = -100, rc;
    uint8_t mode = u8(in);

    op_name = "client_orders";
    M.is_server = 0;
    roles();
    memcpy(M.page, data_at(in), PAGE);
    if (mode & 1) {
        /* a fresh server's header */
        memset(M.page, 0, 24);
        M.page[OFF_CLI_LIVE] = VCHAN_LIVE_WAITING;
        M.page[OFF_SRV_LIVE] = VCHAN_LIVE_CONNECTED;
        M.page[OFF_CLI_NOTIFY] = VCHAN_NOTIFY_WRITE;
    } else {
        /* anything at all */
        for (size_t i = 0; i < 24; i++)
            M.page[i] = u8(in);
    }
    if (!(mode & 2)) {
        put16(M.page, OFF_LEFT_ORDER, (uint16_t)order_from(in));
        put16(M.page, OFF_RIGHT_ORDER, (uint16_t)order_from(in));
    }
    left = get16(M.page, OFF_LEFT_ORDER);
    right = get16(M.page, OFF_RIGHT_ORDER);
    memcpy(pre, M.page, PAGE);
    rc = vchan_client_orders((const struct vchan_interface *)M.page, &ro, &wo);
    TRACE("client_orders(left %d, right %d) -> %d (%d, %d)\n", left, right, rc, ro, wo);
    CHECK(memcmp(M.page, pre, PAGE) == 0);
    if (!model_orders_valid(left, right)) {
        CHECK_EQ(VCHAN_EORDER, rc);
        return 0;
    }
    CHECK_EQ(0, rc);
    CHECK_EQ(right, ro);        /* the client reads the right ring */
    CHECK_EQ(left, wo);

    op_name = "init_client";
    {
        uint8_t *rbuf = alloc_ring(ro, 0, flags & 0x10);
        uint8_t *wbuf = alloc_ring(wo, 1, flags & 0x20);
        int valid = (vchan_ring_offset(ro) >= 0 || rbuf) && (vchan_ring_offset(wo) >= 0 || wbuf);

        rc = vchan_ring_init_client(&M.ring, M.page, ro, wo, rbuf, wbuf);
        TRACE("init_client(%d, %d) -> %d\n", ro, wo, rc);
        if (!valid) {
            CHECK_EQ(VCHAN_EINVAL, rc);
            CHECK(memcmp(M.page, pre, PAGE) == 0);
            return 0;
        }
        CHECK_EQ(0, rc);
        M.left_order = (uint16_t)wo;
        M.right_order = (uint16_t)ro;
        /* only the client's live byte and its request to the server change */
        memcpy(exp_page, pre, PAGE);
        exp_page[OFF_CLI_LIVE] = VCHAN_LIVE_CONNECTED;
        CHECK(M.page[OFF_SRV_NOTIFY] & VCHAN_NOTIFY_WRITE);
        CHECK(M.page[OFF_SRV_NOTIFY] & VCHAN_NOTIFY_HELLO);
        exp_page[OFF_SRV_NOTIFY] = M.page[OFF_SRV_NOTIFY];
        CHECK(memcmp(M.page, exp_page, PAGE) == 0);
        setup_half(&M.rd, 0, ro, rbuf, OFF_RIGHT_CONS, OFF_RIGHT_PROD);
        setup_half(&M.wr, 1, wo, wbuf, OFF_LEFT_PROD, OFF_LEFT_CONS);
        /* the client starts from the indices it finds */
        M.rd.own = M.rd.peer = get32(pre, OFF_RIGHT_CONS);
        M.wr.own = M.wr.peer = get32(pre, OFF_LEFT_PROD);
    }
    return 1;
}

/* ------------------------------------------------------------------ */
/* Entry points.                                                       */
/* ------------------------------------------------------------------ */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    uint64_t x = 0x9E3779B97F4A7C15ull;
    size_t i;

    (void)argc;
    (void)argv;
    trace = getenv("VCHAN_FUZZ_TRACE") != NULL;
    chan_open(0);
    chan_open(1);
    for (i = 0; i < sizeof(table); i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        table[i] = (uint8_t)((x * 0x2545F4914F6CDD1Dull) >> 56);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    uint8_t flags;
    int ok;

    memset(&M, 0, sizeof(M));
    op_index = 0;
    op_name = "setup";
    M.page = malloc(PAGE);
    if (!M.page)
        abort();
    flags = u8(&in);
    ok = flags & 1 ? setup_client(&in, flags) : setup_server(&in, flags);

    while (ok && in.n && op_index < MAX_OPS) {
        uint8_t op = u8(&in);
        op_index++;
        switch (op % 30) {
        case 0: case 1: op_write(&in, X_WRITE); break;
        case 2: case 3: op_read(&in, X_READ); break;
        case 4: op_write(&in, X_SEND); break;
        case 5: op_read(&in, X_RECV); break;
        case 6: op_writev(&in); break;
        case 7: op_data_ready(); break;
        case 8: op_buffer_space(); break;
        case 9: op_peer_live(); break;
        case 10: op_peer_eof(); break;
        case 11: op_write_eof(&in); break;
        case 12:
            if (op & 0x80)
                op_close();
            else if (op & 0x40)
                op_peer_flags();
            else
                op_error();
            break;
        case 13: case 14: peer_produce(&in); break;
        case 15: case 16: peer_consume(&in); break;
        case 17: peer_poke_page(&in); break;
        case 18: peer_poke_index(&in); break;
        case 19: peer_poke_ring(&in); break;
        case 20: peer_request(&in); break;
        case 21: peer_poke_live(&in); break;
        case 22: peer_poke_order(&in); break;
        case 23: op_server_orders(&in); break;
        case 24: case 25: op_peek(); break;
        case 26: op_consume(&in); break;
        case 27: op_reserve(&in); break;
        case 28: op_commit(&in); break;
        default: op_splice(&in); break;
        }
    }
    if (ok) {
        /* the separate buffers in full, whatever their size */
        op_name = "final";
        check_buffer(&M.rd, 1);
        check_buffer(&M.wr, 1);
    }
    free(M.dummy[0]);
    free(M.dummy[1]);
    free(M.page);
    return 0;
}
