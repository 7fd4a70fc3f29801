/*
 * tests/fuzz/mux_fuzz.c -- libFuzzer harness for vchan/mux.c, the session
 * framing: the fuzzer is a hostile peer writing frames into our read ring.
 *
 * Build:  clang -g -O1 -fsanitize=fuzzer,address,undefined \
 *             -fno-sanitize-recover=all -Ivchan \
 *             tests/fuzz/mux_fuzz.c vchan/mux.c vchan/ring.c -o mux_fuzz
 * Run:    ./mux_fuzz -max_total_time=60 -timeout=5 corpus_dir/
 *         VCHAN_FUZZ_TRACE=1 ./mux_fuzz crash-file     (print every op)
 *
 * The input sets up one server endpoint (ring orders 10..16 each way: in
 * page 0 or separate buffers) and then drives a sequence of operations.
 * The peer's: produce bytes into our read ring (raw, or shaped as frame
 * headers -- mostly plausible, sometimes not -- with payloads), rewrite
 * bytes it has already published, set its producer index to anything,
 * consume our write ring, poke any byte of page 0.  Ours, as a session
 * does: vchan_mux_peek with payload limits from 0 to UINT32_MAX, then
 * (right after a peek that found a frame) vchan_mux_take, vchan_mux_take_run
 * with any credit and buffer length, vchan_mux_run_length with any limit,
 * and a StreamReader's direct run of it (vchan_direct_take in parts of any
 * length, vchan_direct_find, vchan_direct_rest);
 * and vchan_mux_write_ex / vchan_mux_write_data of any length, with any
 * minimum and maximum payload, quiet or not, then vchan_ring_publish.
 *
 * Memory: page 0, each separate ring buffer and every buffer handed to a
 * call is its own malloc of exactly the bytes it may touch, so ASan sees
 * any access outside them.
 *
 * Invariants (violation -> abort()):
 *   - return values are the documented ones: peek 1 / 0 / VCHAN_MUX_EFRAME
 *     or a ring error; a remote ring error is sticky (every later call
 *     returns it);
 *   - a frame from peek is the ring's bytes at our consumer index: its
 *     header fields, a length within the limit, pieces that lie inside the
 *     read ring at consumer + 16 (wrapping once) and hold the payload; an
 *     EFRAME is a header that breaks the rules; a 0 from peek left the
 *     "tell me on write" request armed, and while the producer index is a
 *     valid one, a 0 means there is no whole frame;
 *   - take copies exactly the payload and consumes exactly the frame;
 *     take_run copies, and consumes, exactly the run of whole frames a
 *     reference parser of the ring's bytes finds (same type, flags and
 *     stream, within the buffer and the credit, no broken header);
 *     run_length returns what the reference parser finds and changes no
 *     byte of shared memory;
 *   - our frames land at our producer index as written: header, payload
 *     (the caller's bytes), at least min(len, min_payload) and at most
 *     max_payload of them, a frame that would wrap ended at the ring's end
 *     only when that piece holds the minimum.
 */
#define FUZZ_NAME "mux_fuzz"
#include "harness.h"
#include "mux.h"
#include "ring.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE        VCHAN_PAGE_SIZE
#define HDR         VCHAN_MUX_HEADER
#define MAX_OPS     512

#define OFF_LEFT_CONS       offsetof(struct vchan_interface, left.cons)
#define OFF_LEFT_PROD       offsetof(struct vchan_interface, left.prod)
#define OFF_RIGHT_CONS      offsetof(struct vchan_interface, right.cons)
#define OFF_RIGHT_PROD      offsetof(struct vchan_interface, right.prod)
#define OFF_CLI_LIVE        offsetof(struct vchan_interface, cli_live)
#define OFF_CLI_NOTIFY      offsetof(struct vchan_interface, cli_notify)

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    if (!p)
        abort();
    return p;
}

/* ------------------------------------------------------------------ */
/* State.                                                              */
/* ------------------------------------------------------------------ */

struct frame {
    uint8_t type, flags;
    int reserved;           /* the reserved bytes are not zero */
    uint32_t stream, length, arg;
};

static struct {
    struct vchan_ring ring;
    uint8_t *page;
    uint8_t *rbuf, *wbuf;   /* separate buffers, or NULL */
    uint8_t *rd, *wr;       /* the rings' memory */
    uint32_t rsize, wsize;
    uint32_t prod;          /* the peer's producer index, as last written */
    int prod_valid;         /* it only ever moved on within the ring's size */
    uint32_t wpos;          /* where our next frame starts in the write ring */
    int error;              /* a sticky remote error returned */
    /* The last peek that found a frame, while nothing changed since. */
    int peeked;
    struct vchan_mux_frame f;
    const uint8_t *a, *b;
    uint32_t alen, blen, max_payload;
} M;

static uint32_t cons(void)
{
    return get32(M.page + OFF_LEFT_CONS);
}

static void ring_get(const uint8_t *ring, uint32_t size, uint32_t i, uint8_t *dst, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++)
        dst[k] = ring[(i + k) & (size - 1)];
}

static void ring_put(uint8_t *ring, uint32_t size, uint32_t i, const uint8_t *src, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++)
        ring[(i + k) & (size - 1)] = src[k];
}

static struct frame parse(const uint8_t *ring, uint32_t size, uint32_t at)
{
    uint8_t h[HDR];
    struct frame fr;

    ring_get(ring, size, at, h, HDR);
    fr.type = h[0];
    fr.flags = h[1];
    fr.reserved = h[2] || h[3];
    fr.stream = get32(h + 4);
    fr.length = get32(h + 8);
    fr.arg = get32(h + 12);
    return fr;
}

static int is_remote(int rc)
{
    return rc == VCHAN_EINDEX || rc == VCHAN_EORDER || rc == VCHAN_ELIVE;
}

/* Any call: a remote error is sticky, and is remembered. */
static void check_error(int rc)
{
    if (M.error)
        CHECK_EQ(M.error, rc);
    else if (is_remote(rc))
        M.error = rc;
}

/* Bytes ready for us, when the peer's index is one the ring must accept. */
static int known_ready(uint32_t *ready)
{
    if (!M.prod_valid || M.error)
        return 0;
    *ready = M.prod - cons();
    CHECK(*ready <= M.rsize);
    return 1;
}

static void inside_read_ring(const uint8_t *p, uint32_t n)
{
    CHECK(p >= M.rd && p <= M.rd + M.rsize);
    CHECK(n <= (uint32_t)(M.rd + M.rsize - p));
}

/* ------------------------------------------------------------------ */
/* The peer.                                                           */
/* ------------------------------------------------------------------ */

static void peer_changed(void)
{
    M.peeked = 0;
}

/* Produce bytes at the peer's index, within the free space: raw bytes, or
 * a frame header (mostly plausible) and its payload. */
static void peer_produce(struct input *in)
{
    uint8_t mode = u8(in), h[HDR], data[512];
    uint32_t used = M.prod - cons(), room = used <= M.rsize ? M.rsize - used : 0, n;

    peer_changed();
    op_name = "peer_produce";
    if (mode & 1) {
        n = u16(in) % (sizeof data + 1);
        for (uint32_t k = 0; k < n; k++)
            data[k] = u8(in);
        if (n > room)
            n = room;
        ring_put(M.rd, M.rsize, M.prod, data, n);
    } else {
        uint32_t length = mode & 2 ? u32(in) : u16(in) % 600u;
        uint32_t body = length < sizeof data ? length : (uint32_t)sizeof data;

        memset(h, 0, sizeof h);
        h[0] = mode & 4 ? u8(in) : VCHAN_MUX_DATA;
        h[1] = mode & 8 ? u8(in) : 0;
        if (mode & 16)
            h[2 + (mode >> 7)] = u8(in) | 1;
        put32(h + 4, mode & 32 ? u32(in) : 1u + (mode >> 6));
        put32(h + 8, length);
        put32(h + 12, u32(in));
        for (uint32_t k = 0; k < body; k++)
            data[k] = (uint8_t)(u8(in) + k);
        n = HDR < room ? HDR : room;
        ring_put(M.rd, M.rsize, M.prod, h, n);
        if (room > n) {
            uint32_t more = body < room - n ? body : room - n;

            ring_put(M.rd, M.rsize, M.prod + n, data, more);
            n += more;
        }
    }
    M.prod += n;
    put32(M.page + OFF_LEFT_PROD, M.prod);
    TRACE("#%u peer produces %u bytes (prod %u)\n", op_index, n, M.prod);
}

/* Rewrite bytes it already published (anywhere in the ring). */
static void peer_rewrite(struct input *in)
{
    uint32_t at = u32(in), n = u8(in) % 24u;

    peer_changed();
    op_name = "peer_rewrite";
    for (uint32_t k = 0; k < n; k++)
        M.rd[(at + k) & (M.rsize - 1)] = u8(in);
}

static void peer_poke_prod(struct input *in)
{
    uint32_t v = u32(in);

    peer_changed();
    op_name = "peer_poke_prod";
    if ((uint32_t)(v - cons()) > M.rsize || (uint32_t)(v - M.prod) > M.rsize)
        M.prod_valid = 0;   /* outside the window, or backwards */
    M.prod = v;
    put32(M.page + OFF_LEFT_PROD, v);
    TRACE("#%u peer sets prod %u\n", op_index, v);
}

static void peer_consume(struct input *in)
{
    uint8_t mode = u8(in);

    peer_changed();
    op_name = "peer_consume";
    if (mode & 1)
        put32(M.page + OFF_RIGHT_CONS, u32(in));      /* anything */
    else
        memcpy(M.page + OFF_RIGHT_CONS, M.page + OFF_RIGHT_PROD, 4);
}

static void peer_poke_page(struct input *in)
{
    uint16_t at = u16(in) % PAGE;
    uint8_t v = u8(in);

    peer_changed();
    op_name = "peer_poke_page";
    if (at >= OFF_LEFT_PROD && at < OFF_LEFT_PROD + 4)
        M.prod_valid = 0;
    if (at >= offsetof(struct vchan_interface, left_order) &&
        at < offsetof(struct vchan_interface, grants))
        M.prod_valid = 0;   /* orders and live bytes: errors to come */
    if (at < offsetof(struct vchan_interface, left_order) &&
        (at < OFF_LEFT_PROD || at >= OFF_LEFT_PROD + 4))
        return;             /* our own indexes are ours: the peer cannot write them */
    M.page[at] = v;
    if (at >= OFF_LEFT_PROD && at < OFF_LEFT_PROD + 4)
        M.prod = get32(M.page + OFF_LEFT_PROD);
}

/* ------------------------------------------------------------------ */
/* Ours: reading.                                                      */
/* ------------------------------------------------------------------ */

static uint32_t pick_limit(struct input *in)
{
    switch (u8(in) % 8) {
    case 0: return 0;
    case 1: return 1;
    case 2: return 64;
    case 3: return M.rsize - HDR;
    case 4: return M.rsize;
    case 5: return UINT32_MAX;
    case 6: return u16(in);
    default: return u32(in);
    }
}

static void op_peek(struct input *in)
{
    uint32_t max = pick_limit(in), c = cons(), ready;
    const uint8_t *a = NULL, *b = NULL;
    uint32_t alen = 0xdeadbeef, blen = 0xdeadbeef;
    struct vchan_mux_frame f;
    int rc;

    op_name = "peek";
    M.peeked = 0;
    memset(&f, 0xa5, sizeof f);
    rc = vchan_mux_peek(&M.ring, &f, max, &a, &alen, &b, &blen);
    TRACE("#%u peek(max %u) -> %d\n", op_index, max, rc);
    check_error(rc);
    CHECK(rc == 0 || rc == 1 || rc == VCHAN_MUX_EFRAME || is_remote(rc));
    CHECK_EQ(c, cons());                    /* peeking consumes nothing */
    if (rc == 0) {
        CHECK(M.page[OFF_CLI_NOTIFY] & VCHAN_NOTIFY_WRITE);     /* may sleep */
        if (known_ready(&ready) && ready >= HDR) {
            struct frame fr = parse(M.rd, M.rsize, c);

            /* not a broken header, and not whole yet */
            CHECK(!fr.reserved && fr.length <= max);
            CHECK(ready - HDR < fr.length);
        }
        return;
    }
    if (rc == VCHAN_MUX_EFRAME) {
        struct frame fr = parse(M.rd, M.rsize, c);

        CHECK(fr.reserved || fr.length > max);
        return;
    }
    if (rc < 0)
        return;
    {
        struct frame fr = parse(M.rd, M.rsize, c);
        uint8_t *want = xmalloc(fr.length <= M.rsize ? fr.length : 1);

        CHECK(!fr.reserved);
        CHECK_EQ(fr.type, f.type);
        CHECK_EQ(fr.flags, f.flags);
        CHECK_EQ(fr.stream, f.stream);
        CHECK_EQ(fr.length, f.length);
        CHECK_EQ(fr.arg, f.arg);
        CHECK(f.length <= max);
        CHECK(f.length <= M.rsize - HDR);
        CHECK_EQ(f.length, (uint64_t)alen + blen);
        inside_read_ring(a, alen);
        inside_read_ring(b, blen);
        if (known_ready(&ready))
            CHECK(ready >= HDR + f.length);
        /* the pieces are the payload's bytes, at consumer + 16 */
        ring_get(M.rd, M.rsize, c + HDR, want, f.length);
        if (alen)
            CHECK(a == M.rd + ((c + HDR) & (M.rsize - 1)));
        CHECK(memcmp(a, want, alen) == 0);
        if (blen)
            CHECK(b == M.rd);
        CHECK(memcmp(b, want + alen, blen) == 0);
        free(want);
    }
    M.peeked = 1;
    M.f = f;
    M.a = a;
    M.b = b;
    M.alen = alen;
    M.blen = blen;
    M.max_payload = max;
}

static void op_take(void)
{
    uint32_t c = cons(), n = M.f.length;
    uint8_t *buf = xmalloc(n), *want = xmalloc(n);
    int notify = 0, rc;

    op_name = "take";
    M.peeked = 0;
    ring_get(M.rd, M.rsize, c + HDR, want, n);
    rc = vchan_mux_take(&M.ring, &M.f, M.a, M.alen, M.b, M.blen, buf, &notify);
    TRACE("#%u take(%u) -> %d\n", op_index, n, rc);
    check_error(rc);
    if (M.error) {
        free(buf);
        free(want);
        return;
    }
    CHECK_EQ(HDR + n, rc);
    CHECK(memcmp(buf, want, n) == 0);
    CHECK_EQ(c + HDR + n, cons());
    free(buf);
    free(want);
}

/* What take_run must take: the frames after the head one, whole and of
 * its type, flags and stream, while they fit.  Returns the payload bytes
 * (the head's included) and the ring bytes they span. */
static uint32_t model_run(uint32_t c, uint32_t ready, uint32_t len, uint32_t credit,
                          uint32_t *span)
{
    uint32_t done = M.f.length, off = HDR + M.f.length;

    while (done < len && ready - off >= HDR) {
        struct frame g = parse(M.rd, M.rsize, c + off);

        if (g.reserved || g.length > M.max_payload || ready - off - HDR < g.length)
            break;
        if (g.type != M.f.type || g.stream != M.f.stream || g.flags != M.f.flags ||
            g.length > len - done || g.length > credit - done)
            break;
        done += g.length;
        off += HDR + g.length;
    }
    *span = off;
    return done;
}

static uint32_t pick_len(struct input *in, uint32_t base)
{
    switch (u8(in) % 6) {
    case 0: return base;
    case 1: return base ? base - 1 : 0;
    case 2: return base + u16(in) % 4096u;
    case 3: return u16(in);
    case 4: return 2 * M.rsize;
    default: return u32(in) % (4 * M.rsize + 1);
    }
}

static void op_take_run(struct input *in)
{
    uint32_t c = cons(), len = pick_len(in, M.f.length), credit = pick_len(in, M.f.length);
    uint32_t ready = 0, span = 0, want_n = 0, k = 0;
    uint8_t *buf = xmalloc(len), *want = NULL;
    int notify = 0, rc, known = known_ready(&ready);

    op_name = "take_run";
    M.peeked = 0;
    if (known && M.f.length <= len && M.f.length <= credit) {
        want_n = model_run(c, ready, len, credit, &span);
        want = xmalloc(want_n);
        /* the payloads, end to end */
        for (uint32_t off = 0; k < want_n; ) {
            struct frame g = parse(M.rd, M.rsize, c + off);

            ring_get(M.rd, M.rsize, c + off + HDR, want + k, g.length);
            k += g.length;
            off += HDR + g.length;
        }
    }
    rc = vchan_mux_take_run(&M.ring, &M.f, M.a, M.alen, M.b, M.blen, M.max_payload, credit,
                            buf, len, &notify);
    TRACE("#%u take_run(len %u, credit %u) -> %d\n", op_index, len, credit, rc);
    if (M.f.length <= len && M.f.length <= credit)
        check_error(rc);        /* (a bad request is refused before the ring is looked at) */
    if (M.f.length > len || M.f.length > credit) {
        CHECK_EQ(VCHAN_EINVAL, rc);
        CHECK_EQ(c, cons());
    } else if (rc >= 0) {
        CHECK((uint32_t)rc >= M.f.length && (uint32_t)rc <= len && (uint32_t)rc <= credit);
        if (known) {
            CHECK_EQ(want_n, rc);
            CHECK(memcmp(buf, want, want_n) == 0);
            CHECK_EQ(c + span, cons());
        }
    } else {
        CHECK(is_remote(rc));
    }
    free(buf);
    free(want);
}

/* The reader of a StreamReader, straight from the ring: a direct run of the
 * frame just peeked and the ones after it (as run_length finds them), taken
 * in parts of any length, with find and rest between.  Each call returns its
 * documented value; what take copies is the run's payload in order (the
 * reference parser's, while the peer's index is a valid one); a frame is
 * consumed with its last byte. */
static void op_direct(struct input *in)
{
    struct vchan_direct d;
    uint32_t ready, total = 0, pos = 0, off, steps = 1 + u8(in) % 16;
    uint8_t *want = NULL;
    int notify = 0, known = known_ready(&ready), sound;
    int rc = vchan_mux_run_length(&M.ring, &M.f, M.max_payload, UINT32_MAX);

    op_name = "direct";
    M.peeked = 0;
    if (M.f.length == 0) {
        /* refused before the ring is looked at (a session never starts a
         * run on an empty frame), even after a remote error */
        CHECK_EQ(VCHAN_EINVAL, rc);
        return;
    }
    check_error(rc);
    if (rc <= 0)
        return;
    if (known) {
        /* The run's payload, by the reference parser. */
        uint32_t c = cons();

        want = xmalloc((uint32_t)rc);
        off = 0;
        while (total < (uint32_t)rc) {
            struct frame g = parse(M.rd, M.rsize, c + off);

            CHECK(g.length <= (uint32_t)rc - total);
            ring_get(M.rd, M.rsize, c + off + HDR, want + total, g.length);
            total += g.length;
            off += HDR + g.length;
        }
    }
    /* The peer does nothing meanwhile: a DATA run whose frames the reference
     * parser read is taken as it is, never refused. */
    sound = want != NULL && M.f.type == VCHAN_MUX_DATA;
    memset(&d, 0, sizeof(d));
    d.ring = &M.ring;
    d.notify = &notify;
    d.max_payload = M.max_payload;
    d.stream = M.f.stream;
    d.flags = M.f.flags;
    d.left = (uint32_t)rc;
    d.wake_after = 1u + u16(in);
    for (uint32_t i = 0; i < steps && in->n; i++) {
        uint8_t what = u8(in) % 4;

        if (what == 0) {
            uint32_t r16 = u16(in), over = u8(in) & 1;
            uint32_t len = d.left ? 1u + r16 % d.left + over : 1u;   /* sometimes 1 too many */
            uint32_t left = d.left;
            uint8_t *buf = xmalloc(len);

            rc = vchan_direct_take(&d, buf, len);
            TRACE("#%u direct_take(%u of %u) -> %d\n", op_index, len, left, rc);
            if (len > left) {
                CHECK_EQ(VCHAN_EINVAL, rc);     /* refused before the ring is looked at */
                CHECK_EQ(left, d.left);
            } else {
                check_error(rc);
            }
            if (rc >= 0) {
                CHECK_EQ((int)len, rc);
                if (want != NULL && M.f.type == VCHAN_MUX_DATA) {
                    CHECK(memcmp(buf, want + pos, len) == 0);
                }
                pos += len;
                CHECK_EQ(left - len, d.left);
            } else {
                CHECK(len > left || rc == VCHAN_MUX_EFRAME || is_remote(rc));
                CHECK(len > left || !sound);    /* a run nobody touched is taken whole */
            }
            free(buf);
        } else if (what == 1) {
            uint8_t sep = u8(in);
            uint32_t limit = u16(in);

            rc = vchan_direct_find(&d, sep, limit);
            TRACE("#%u direct_find -> %d\n", op_index, rc);
            if (d.left)
                check_error(rc);
            CHECK(rc >= 0 || !sound || !d.left);
            CHECK(rc >= 0 ? (uint32_t)rc <= d.left && (rc == 0 || (uint32_t)rc <= limit + 1)
                          : (rc == VCHAN_EINVAL ? d.left == 0
                                                : rc == VCHAN_MUX_EFRAME || is_remote(rc)));
            if (rc > 0 && want != NULL && M.f.type == VCHAN_MUX_DATA) {
                CHECK_EQ(sep, want[pos + (uint32_t)rc - 1]);
                CHECK(memchr(want + pos, sep, (uint32_t)rc - 1) == NULL);
            }
        } else if (what == 2) {
            rc = vchan_direct_rest(&d);
            TRACE("#%u direct_rest -> %d\n", op_index, rc);
            if (d.left)
                check_error(rc);
            CHECK(rc > 0 || !sound || !d.left);
            CHECK(rc > 0 ? (uint32_t)rc <= d.left
                         : (rc == VCHAN_EINVAL ? d.left == 0
                                               : rc == VCHAN_MUX_EFRAME || is_remote(rc)));
        } else {
            (void)vchan_direct_due(&d);
        }
        if (M.f.type != VCHAN_MUX_DATA && want != NULL) {
            CHECK_EQ(0u, pos);          /* nothing but DATA is ever taken */
        }
    }
    free(want);
}

static void op_run_length(struct input *in)
{
    uint32_t limit = pick_len(in, M.f.length), c = cons(), ready, want = 0, off;
    uint8_t *before = xmalloc(PAGE);
    int rc, known = known_ready(&ready);

    op_name = "run_length";
    memcpy(before, M.page, PAGE);
    rc = vchan_mux_run_length(&M.ring, &M.f, M.max_payload, limit);
    TRACE("#%u run_length(limit %u) -> %d\n", op_index, limit, rc);
    CHECK(memcmp(before, M.page, PAGE) == 0);   /* consumes and arms nothing */
    free(before);
    if (M.f.length == 0 || M.f.length > limit) {
        CHECK_EQ(VCHAN_EINVAL, rc);             /* refused before the ring is looked at */
        return;
    }
    check_error(rc);
    if (rc < 0) {
        CHECK(is_remote(rc));
        return;
    }
    CHECK((uint32_t)rc >= M.f.length && (uint32_t)rc <= limit);
    if (!known)
        return;
    want = M.f.length;
    off = HDR + M.f.length;
    while (ready - off >= HDR) {
        struct frame g = parse(M.rd, M.rsize, c + off);

        if (g.type != M.f.type || g.flags != M.f.flags || g.reserved ||
            g.stream != M.f.stream || g.length == 0 || g.length > M.max_payload ||
            ready - off - HDR < g.length || g.length > limit - want)
            break;
        want += g.length;
        off += HDR + g.length;
    }
    CHECK_EQ(want, rc);
}

/* ------------------------------------------------------------------ */
/* Ours: writing.                                                      */
/* ------------------------------------------------------------------ */

static uint32_t wr_used(void)
{
    return M.wpos - get32(M.page + OFF_RIGHT_CONS);
}

/* The frame at wpos is type/flags/stream/arg with payload src[0..n). */
static void check_written(uint8_t type, uint8_t flags, uint32_t stream, uint32_t arg,
                          const uint8_t *src, uint32_t n)
{
    struct frame fr = parse(M.wr, M.wsize, M.wpos);
    uint8_t *got = xmalloc(n);

    CHECK(!fr.reserved);
    CHECK_EQ(type, fr.type);
    CHECK_EQ(flags, fr.flags);
    CHECK_EQ(stream, fr.stream);
    CHECK_EQ(n, fr.length);
    CHECK_EQ(arg, fr.arg);
    ring_get(M.wr, M.wsize, M.wpos + HDR, got, n);
    CHECK(memcmp(got, src, n) == 0);
    free(got);
    M.wpos += HDR + n;
}

static uint8_t *user_data(struct input *in, uint32_t len)
{
    uint8_t *src = xmalloc(len), seed = u8(in);

    for (uint32_t k = 0; k < len; k++)
        src[k] = (uint8_t)(seed + k * 7);
    return src;
}

static void op_write(struct input *in)
{
    uint8_t type = u8(in), flags = u8(in);
    uint32_t stream = u32(in), arg = u32(in), len = pick_len(in, 100);
    uint32_t min = pick_len(in, len), max = pick_limit(in), used = wr_used(), need;
    int quiet = u8(in) & 1, notify = 0, rc;
    uint8_t *src;

    op_name = "write";
    if (len > 4 * M.wsize)
        len = 4 * M.wsize;
    need = len < min ? len : min;
    src = user_data(in, len);
    rc = vchan_mux_write_ex(&M.ring, type, flags, stream, arg, src, len, min, max, quiet,
                            &notify);
    TRACE("#%u write(len %u, min %u, max %u) -> %d\n", op_index, len, min, max, rc);
    check_error(rc);
    if (rc >= 0) {
        uint32_t to_end = M.wsize - (M.wpos & (M.wsize - 1));

        CHECK((uint32_t)rc <= len && (uint32_t)rc <= max);
        CHECK((uint32_t)rc >= (need < max ? need : max));     /* (max wins over min) */
        CHECK(used <= M.wsize && HDR + (uint32_t)rc <= M.wsize - used);
        /* cut short of what fits only at the ring's end */
        if ((uint32_t)rc < len && (uint32_t)rc < max)
            CHECK(HDR + (uint32_t)rc == M.wsize - used || HDR + (uint32_t)rc == to_end);
        check_written(type, flags, stream, arg, src, (uint32_t)rc);
    } else if (rc == VCHAN_MUX_FULL) {
        if (used <= M.wsize)
            CHECK(M.wsize - used < HDR + need);
    } else {
        CHECK(is_remote(rc) || rc == VCHAN_ECLOSED);
    }
    if (quiet) {
        rc = vchan_ring_publish(&M.ring, &notify);
        check_error(rc);
        CHECK(rc == 0 || is_remote(rc));
    }
    free(src);
}

static void op_write_data(struct input *in)
{
    uint32_t stream = u32(in), len = pick_len(in, 300), min = pick_len(in, 16);
    uint32_t max = pick_limit(in), done = 0;
    uint32_t npieces, k, cut, at = 0, piece = 0, off = 0, before = 0;
    struct vchan_iov iov[8];
    int notify = 0, rc;
    uint8_t *src;

    op_name = "write_data";
    if (len > 4 * M.wsize)
        len = 4 * M.wsize;
    src = user_data(in, len);
    /* The bytes as 1 to 8 pieces cut anywhere (empty ones too): frames
     * gather across them (vchan_mux_write_datav; write_data is one piece). */
    npieces = 1 + u32(in) % 8;
    for (k = 0; k < npieces; k++) {
        cut = k + 1 == npieces ? len - at : u32(in) % (len - at + 1);
        iov[k].base = src + at;
        iov[k].len = cut;
        at += cut;
    }
    rc = vchan_mux_write_datav(&M.ring, stream, iov, &piece, &off, len, min, max, &notify);
    TRACE("#%u write_data(len %u in %u pieces, min %u, max %u) -> %d\n", op_index, len,
          npieces, min, max, rc);
    /* The cursor is just past what was written (nothing: where it was). */
    CHECK(piece < npieces || (piece == npieces && off == 0));
    for (k = 0; k < piece; k++)
        before += iov[k].len;
    CHECK_EQ(rc > 0 ? (uint32_t)rc : 0, before + off);
    if (len && !max) {
        CHECK_EQ(VCHAN_EINVAL, rc);     /* frames of no byte would be no progress */
        free(src);
        return;
    }
    if (!len) {
        CHECK_EQ(VCHAN_MUX_FULL, rc);   /* nothing to write: the ring is not looked at */
        free(src);
        return;
    }
    check_error(rc);
    if (rc >= 0) {
        CHECK(rc > 0 && (uint32_t)rc <= len);
        /* DATA frames end to end, each within max, holding src in order */
        while (done < (uint32_t)rc) {
            struct frame fr = parse(M.wr, M.wsize, M.wpos);

            CHECK(fr.length > 0);           /* every DATA frame carries a byte */
            CHECK(fr.length <= max && fr.length <= (uint32_t)rc - done);
            check_written(VCHAN_MUX_DATA, 0, stream, 0, src + done, fr.length);
            done += fr.length;
        }
    } else {
        CHECK(rc == VCHAN_MUX_FULL || is_remote(rc) || rc == VCHAN_ECLOSED);
    }
    free(src);
}

/* ------------------------------------------------------------------ */
/* Entry points.                                                       */
/* ------------------------------------------------------------------ */

static uint8_t *ring_memory(int order, uint8_t **separate)
{
    int off = vchan_ring_offset(order);

    if (off >= 0) {
        *separate = NULL;
        return M.page + off;
    }
    *separate = xmalloc((size_t)1 << order);
    memset(*separate, 0x5a, (size_t)1 << order);
    return *separate;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    trace = getenv("VCHAN_FUZZ_TRACE") != NULL;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    int ro, wo, rc;

    memset(&M, 0, sizeof M);
    op_index = 0;
    op_name = "setup";
    M.page = xmalloc(PAGE);
    memset(M.page, 0, PAGE);
    ro = 10 + u8(&in) % 7;
    wo = 10 + u8(&in) % 7;
    if (ro == wo && ro < 12)
        wo = 21 - ro;       /* two in-page rings of one size would share their place */
    M.rd = ring_memory(ro, &M.rbuf);
    M.wr = ring_memory(wo, &M.wbuf);
    M.rsize = 1u << ro;
    M.wsize = 1u << wo;
    rc = vchan_ring_init_server(&M.ring, M.page, ro, wo, M.rbuf, M.wbuf);
    TRACE("init_server(%d, %d) -> %d\n", ro, wo, rc);
    CHECK_EQ(0, rc);
    M.page[OFF_CLI_LIVE] = 1;   /* the client is there */
    M.prod_valid = 1;

    while (in.n && op_index < MAX_OPS) {
        uint8_t op = u8(&in);

        op_index++;
        switch (op % 16) {
        case 0: case 1: case 2: peer_produce(&in); break;
        case 3: peer_rewrite(&in); break;
        case 4: peer_poke_prod(&in); break;
        case 5: peer_consume(&in); break;
        case 6: peer_poke_page(&in); break;
        case 7: case 8: op_peek(&in); break;
        case 9: if (M.peeked) op_take(); break;
        case 10: case 11: if (M.peeked) op_take_run(&in); break;
        case 12:
            if (M.peeked && (op & 16))
                op_direct(&in);
            else if (M.peeked)
                op_run_length(&in);
            break;
        case 13: op_write(&in); break;
        case 14: op_write_data(&in); break;
        default:
            /* a well-behaved peer step: frames of one stream, then read them */
            peer_produce(&in);
            op_peek(&in);
            break;
        }
    }
    free(M.rbuf);
    free(M.wbuf);
    free(M.page);
    return 0;
}
