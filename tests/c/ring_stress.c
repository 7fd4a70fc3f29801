/*
 * tests/c/ring_stress.c -- two-thread stress test (and C benchmark) of the
 * vchan ring in vchan/ring.c.
 *
 * One writer thread and one reader thread share one control page (page 0)
 * and, for orders >= 12, separately allocated ring buffers.  The server is
 * initialised on one side and the client on the other, exactly as two
 * libxenvchan peers would be.  The writer sends a deterministic
 * pseudo-random byte stream; the reader regenerates it and compares every
 * byte.
 *
 * Sleeping follows the ring's notify protocol with an emulated event
 * channel per side (mutex + condvar + a coalescing "pending" flag, like a
 * Xen event channel port):
 *
 *   - a side sleeps only right after a ring call returned 0 (the ring armed
 *     a notify request and re-checked the peer's index before returning);
 *   - a side sends an event only when a ring call set *notify;
 *   - before sleeping a side retries a random few times (spinning), then
 *     drains its port and makes one last call, so a stale event cannot mask
 *     a missing one (see would_block()).
 *
 * A lost wake-up therefore shows up as both sides asleep: the watchdog (a
 * timed wait with no event for --watchdog seconds) prints a diagnostic and
 * exits 2.  There is no other timeout or polling anywhere.
 *
 * The stream is cut into segments by a PRNG both threads seed identically:
 *   STREAM segments: writer uses vchan_ring_write / vchan_ring_writev and
 *     vchan_ring_buffer_space, reader uses vchan_ring_read,
 *     vchan_ring_peek + vchan_ring_consume (bytes checked in place) and
 *     vchan_ring_data_ready, each with independently random chunk sizes
 *     (1 byte .. --chunk-mult times the ring size);
 *   MESSAGE segments (1 .. ring size bytes): writer uses vchan_ring_send,
 *     reader vchan_ring_recv (all or nothing).  Because both sides agree on
 *     the segment boundaries, neither can wait for the other forever.
 * After the last byte the writer half-closes (vchan_ring_write_eof) and the
 * reader waits for the EOF mark through the same notify protocol; then the
 * extension flags (HELLO, EOF, CLOSED) and live bytes are checked.
 *
 * Exit status: 0 success, 1 data mismatch / ring error / bad usage,
 * 2 watchdog (suspected lost wake-up).
 *
 * Build (stress):    clang -fsanitize=thread -O1 -g -pthread -Ivchan \
 *                        tests/c/ring_stress.c vchan/ring.c -o ring_stress
 * Build (benchmark): clang -O2 -pthread -Ivchan tests/c/ring_stress.c \
 *                        vchan/ring.c -o ring_stress
 *                    ./ring_stress --order 16 --bytes 4G --mode stream --json
 */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Options.                                                            */
/* ------------------------------------------------------------------ */

enum mode { MODE_MIXED, MODE_STREAM };

static struct {
    int order;              /* order of the ring that carries the stream */
    int other_order;        /* order of the unused reverse ring */
    int writer_is_server;
    uint64_t bytes;
    uint64_t seed;
    unsigned chunk_mult;    /* chunks up to chunk_mult * ring size */
    unsigned spin;          /* retries before sleeping: random 0..spin */
    int spin_yield;         /* sched_yield() between retries (else pause) */
    unsigned spin_pause;    /* pause instructions between retries */
    unsigned spin_idle_us;  /* stop spinning when the (awake) peer is idle this long */
    unsigned spin_wake_us;  /* ... or the sleeping peer, which we may just have woken */
    unsigned watchdog;      /* seconds without an event -> exit 2 */
    unsigned yield_permille;/* random sched_yield()s to vary interleavings */
    int verify;
    int quiet;
    int json;
    enum mode mode;
} opt = {
    .order = 12,
    .other_order = -1,
    .writer_is_server = 1,
    .bytes = 1ull << 30,
    .seed = 1,
    .chunk_mult = 4,
    .spin = 128,
    .spin_pause = 16,
    .spin_idle_us = 10,
    .spin_wake_us = 60,
    .watchdog = 10,
    .yield_permille = 2,
    .verify = 1,
    .mode = MODE_MIXED,
};

static void die(int status, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 2, 3)));

static void die(int status, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs("ring_stress: FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stdout);
    fflush(stderr);
    _exit(status);
}

/* ------------------------------------------------------------------ */
/* PRNG: splitmix64 for seeding, xorshift64* for streams.              */
/* ------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rng_seed(uint64_t seed, uint64_t stream)
{
    uint64_t s = seed * 0x100000001B3ull + stream;
    uint64_t v;

    do
        v = splitmix64(&s);
    while (v == 0);
    return v;
}

static inline uint64_t rnd(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1Dull;
}

/* Uniform-ish in [lo, hi] (hi - lo small compared to 2^64). */
static inline uint64_t rnd_range(uint64_t *x, uint64_t lo, uint64_t hi)
{
    return lo + rnd(x) % (hi - lo + 1);
}

/* ------------------------------------------------------------------ */
/* The byte stream.  Byte p of the stream is pattern[p % PERIOD]; the   */
/* pattern is pseudo-random from the seed and PERIOD is odd and larger  */
/* than any ring, so a byte misplaced by any multiple of the ring size  */
/* (or by any other amount below PERIOD) is detected.  The table holds   */
/* PERIOD + max_chunk bytes so every chunk is one contiguous slice.     */
/* ------------------------------------------------------------------ */

#define PERIOD 4194301u     /* 2^22 - 3, prime */

static uint8_t *pattern;

static void pattern_init(size_t max_chunk)
{
    size_t total = PERIOD + max_chunk + 8, i;
    uint64_t x = rng_seed(opt.seed, 0x5EED);

    pattern = malloc(total);
    if (!pattern)
        die(1, "out of memory (pattern of %zu bytes)", total);
    for (i = 0; i + 8 <= PERIOD; i += 8) {
        uint64_t v = rnd(&x);
        memcpy(pattern + i, &v, 8);
    }
    for (; i < PERIOD; i++)
        pattern[i] = (uint8_t)rnd(&x);
    for (i = PERIOD; i < total; i++)
        pattern[i] = pattern[i - PERIOD];
}

static inline const uint8_t *stream_at(uint64_t pos)
{
    return pattern + pos % PERIOD;
}

/* ------------------------------------------------------------------ */
/* Emulated event channel: coalescing pending flag.                    */
/* ------------------------------------------------------------------ */

struct evtchn {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int pending;            /* accessed atomically (read by diagnostics) */
};

static void evtchn_init(struct evtchn *e)
{
    pthread_condattr_t ca;

    pthread_mutex_init(&e->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&e->cv, &ca);
    pthread_condattr_destroy(&ca);
    e->pending = 0;
}

/* Discard a pending event (see would_block()). */
static void evtchn_drain(struct evtchn *e)
{
    pthread_mutex_lock(&e->mu);
    __atomic_store_n(&e->pending, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&e->mu);
}

static void evtchn_notify(struct evtchn *e)
{
    pthread_mutex_lock(&e->mu);
    __atomic_store_n(&e->pending, 1, __ATOMIC_RELAXED);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

/* ------------------------------------------------------------------ */
/* Endpoints.                                                          */
/* ------------------------------------------------------------------ */

struct side {
    const char *name;           /* "writer" / "reader" */
    const char *role;           /* "server" / "client" */
    struct vchan_ring ring;
    struct evtchn ev;           /* our port: the peer kicks it */
    struct side *peer;
    uint64_t rng;               /* chunk sizes, op choice */
    int drained;                /* port emptied since the last progress */
    uint64_t peer_seen;         /* peer's byte count at the last spin */
    uint64_t idle_since;        /* when we last saw it move (ns), 0: not spinning */
    int asleep;                 /* atomic: in sleep_on_event() */
    uint64_t sched;             /* segment schedule: same seed both sides */
    uint8_t *buf;               /* reader's destination buffer */
    /* statistics; bytes, state, sleeps and kicks are also read by the
     * watchdog diagnostic (from the other thread) */
    uint64_t bytes;             /* atomic */
    const char *state;          /* atomic */
    uint64_t sleeps, kicks;     /* atomic */
    uint64_t calls, spins, drains, wakeups;
    uint64_t writes, writevs, sends, reads, recvs, peeks, probes;
};

static struct vchan_interface *page0;
static struct side writer, reader;

static inline void set_state(struct side *s, const char *what)
{
    __atomic_store_n(&s->state, what, __ATOMIC_RELAXED);
}

/* Counters the watchdog diagnostic reads from the other thread: only the
 * owner writes them, always with an atomic store. */
static inline void bump(uint64_t *counter)
{
    __atomic_store_n(counter, *counter + 1, __ATOMIC_RELAXED);
}

static inline void add_bytes(struct side *s, uint64_t n)
{
    __atomic_store_n(&s->bytes, s->bytes + n, __ATOMIC_RELAXED);
}

static void diagnose(struct side *s, const char *why)
{
    static int reported;
    struct vchan_interface *p = page0;

    if (__atomic_exchange_n(&reported, 1, __ATOMIC_SEQ_CST)) {
        for (;;)            /* the other side is reporting and exiting */
            pause();
    }

    fprintf(stderr,
            "ring_stress: WATCHDOG: %s (%s) %s for %u s\n"
            "  writer: %s, %" PRIu64 " bytes, state '%s', pending %d, sleeps %"
            PRIu64 ", kicks %" PRIu64 "\n"
            "  reader: %s, %" PRIu64 " bytes, state '%s', pending %d, sleeps %"
            PRIu64 ", kicks %" PRIu64 "\n"
            "  page0: left cons %u prod %u, right cons %u prod %u, orders %u/%u,\n"
            "         cli_live %u srv_live %u cli_notify 0x%02x srv_notify 0x%02x\n"
            "  suspected lost wake-up (both sides asleep, no event pending)\n",
            s->name, s->role, why, opt.watchdog,
            writer.role, __atomic_load_n(&writer.bytes, __ATOMIC_RELAXED),
            __atomic_load_n(&writer.state, __ATOMIC_RELAXED),
            __atomic_load_n(&writer.ev.pending, __ATOMIC_RELAXED),
            __atomic_load_n(&writer.sleeps, __ATOMIC_RELAXED),
            __atomic_load_n(&writer.kicks, __ATOMIC_RELAXED),
            reader.role, __atomic_load_n(&reader.bytes, __ATOMIC_RELAXED),
            __atomic_load_n(&reader.state, __ATOMIC_RELAXED),
            __atomic_load_n(&reader.ev.pending, __ATOMIC_RELAXED),
            __atomic_load_n(&reader.sleeps, __ATOMIC_RELAXED),
            __atomic_load_n(&reader.kicks, __ATOMIC_RELAXED),
            __atomic_load_n(&p->left.cons, __ATOMIC_RELAXED),
            __atomic_load_n(&p->left.prod, __ATOMIC_RELAXED),
            __atomic_load_n(&p->right.cons, __ATOMIC_RELAXED),
            __atomic_load_n(&p->right.prod, __ATOMIC_RELAXED),
            __atomic_load_n(&p->left_order, __ATOMIC_RELAXED),
            __atomic_load_n(&p->right_order, __ATOMIC_RELAXED),
            __atomic_load_n(&p->cli_live, __ATOMIC_RELAXED),
            __atomic_load_n(&p->srv_live, __ATOMIC_RELAXED),
            __atomic_load_n(&p->cli_notify, __ATOMIC_RELAXED),
            __atomic_load_n(&p->srv_notify, __ATOMIC_RELAXED));
    fflush(stdout);
    fflush(stderr);
    _exit(2);
}

/* Block until our port is pending, then consume the event. */
static void sleep_on_event(struct side *s)
{
    struct timespec deadline;
    struct evtchn *e = &s->ev;

    bump(&s->sleeps);
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += opt.watchdog;
    __atomic_store_n(&s->asleep, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&e->mu);
    while (!__atomic_load_n(&e->pending, __ATOMIC_RELAXED)) {
        int rc = pthread_cond_timedwait(&e->cv, &e->mu, &deadline);
        if (rc == ETIMEDOUT && !__atomic_load_n(&e->pending, __ATOMIC_RELAXED)) {
            pthread_mutex_unlock(&e->mu);
            diagnose(s, "got no event");
        }
    }
    __atomic_store_n(&e->pending, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&e->mu);
    __atomic_store_n(&s->asleep, 0, __ATOMIC_RELAXED);
    s->wakeups++;
}

/* Send the event if (and only if) the ring asked for it. */
static inline void kick(struct side *s, int *notify)
{
    if (*notify) {
        *notify = 0;
        bump(&s->kicks);
        evtchn_notify(&s->peer->ev);
    }
}

static inline void maybe_yield(struct side *s)
{
    if (opt.yield_permille && rnd(&s->rng) % 1000 < opt.yield_permille)
        sched_yield();
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Called after a ring call returned 0; the caller then calls the ring again.
 *
 * First a random number of plain retries (spinning: cheaper than sleeping,
 * and it varies the interleavings).  Then the port is drained and the call
 * retried once more; only if that call also returns 0 does the side sleep.
 * Draining is sound -- an event the sleeper needs is sent after the arm of
 * the call that returned 0, hence after the drain -- and it makes lost
 * wake-ups visible: without it, a stale event (the peer kicks on every
 * request it sees, mostly while we are spinning) would wake the side and
 * hide a missing one. */
static inline void would_block(struct side *s, unsigned *spins)
{
    if (*spins) {
        /* Spinning only helps while the peer runs.  If it has not moved
         * for a while, stop: quickly if it is awake (then it is probably
         * waiting for a CPU, maybe the one we spin on), later if it is
         * asleep (our event is on its way: waking it costs tens of us). */
        uint64_t peer = __atomic_load_n(&s->peer->bytes, __ATOMIC_RELAXED);
        uint64_t t = now_ns();
        if (peer != s->peer_seen || !s->idle_since) {
            s->peer_seen = peer;
            s->idle_since = t;
        } else {
            unsigned limit = __atomic_load_n(&s->peer->asleep, __ATOMIC_RELAXED)
                             ? opt.spin_wake_us : opt.spin_idle_us;
            if (t - s->idle_since > (uint64_t)limit * 1000) {
                *spins = 0;
                return;     /* retry once more, then drain and sleep */
            }
        }
        (*spins)--;
        s->spins++;
        if (opt.spin_yield) {
            sched_yield();
        } else {
            /* give the peer a moment to move more than a few bytes:
             * fewer, larger calls (each costs a lot under TSan) */
            for (unsigned i = 0; i < opt.spin_pause; i++) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#else
                __atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
            }
        }
        return;
    }
    if (!s->drained) {
        evtchn_drain(&s->ev);
        s->drained = 1;
        s->drains++;
        return;
    }
    maybe_yield(s);     /* widen the window between the arm and the sleep */
    sleep_on_event(s);
    s->drained = 0;     /* events may have piled up since the drain */
}

/* A fresh retry budget, after progress or at the start of a transfer. */
static inline unsigned spin_budget(struct side *s)
{
    s->drained = 0;
    s->idle_since = 0;
    return opt.spin ? (unsigned)(rnd(&s->rng) % (opt.spin + 1)) : 0;
}

static void check_rc(struct side *s, const char *call, int rc, size_t len)
{
    if (rc < 0)
        die(1, "%s: %s(len=%zu) returned %d (%s) at stream byte %" PRIu64,
            s->name, call, len, rc, vchan_strerror(rc), s->bytes);
    if ((size_t)rc > len)
        die(1, "%s: %s(len=%zu) returned %d > len at stream byte %" PRIu64,
            s->name, call, len, rc, s->bytes);
}

/* ------------------------------------------------------------------ */
/* Segment schedule (identical on both sides).                         */
/* ------------------------------------------------------------------ */

enum seg_kind { SEG_STREAM, SEG_MESSAGE };

static enum seg_kind next_segment(struct side *s, uint32_t size,
                                  uint64_t left, uint64_t *len)
{
    uint64_t r = rnd(&s->sched) % 100;
    enum seg_kind kind;

    if (opt.mode == MODE_MIXED && r < 25) {
        kind = SEG_MESSAGE;
        /* mostly large messages (speed), sometimes tiny ones */
        if (r < 3)
            *len = rnd_range(&s->sched, 1, 32);
        else if (r < 8)
            *len = rnd_range(&s->sched, 1, size);
        else
            *len = rnd_range(&s->sched, size / 2, size);
    } else {
        kind = SEG_STREAM;
        *len = rnd_range(&s->sched, 1, (uint64_t)16 * size);
    }
    if (*len > left)
        *len = left;
    return kind;
}

/* A chunk size for one stream call: 1 byte .. chunk_mult * size, biased
 * to large so the ring is usually the limit. */
static size_t chunk(struct side *s, uint32_t size, uint64_t left)
{
    uint64_t r = rnd(&s->rng) % 32, n;

    if (r == 0)
        n = rnd_range(&s->rng, 1, 16);
    else if (r < 6)
        n = rnd_range(&s->rng, 1, size);
    else
        n = rnd_range(&s->rng, size / 2, (uint64_t)opt.chunk_mult * size);
    return n < left ? (size_t)n : (size_t)left;
}

/* ------------------------------------------------------------------ */
/* Writer.                                                             */
/* ------------------------------------------------------------------ */

static void writer_message(struct side *s, uint64_t len)
{
    struct vchan_ring *r = &s->ring;
    unsigned spins = spin_budget(s);
    int notify = 0;

    set_state(s, "send");
    for (;;) {
        int rc = vchan_ring_send(r, stream_at(s->bytes), len, &notify);
        s->calls++;
        s->sends++;
        kick(s, &notify);
        check_rc(s, "vchan_ring_send", rc, len);
        if ((uint64_t)rc == len)
            break;
        if (rc != 0)
            die(1, "writer: send(%" PRIu64 ") returned partial %d", len, rc);
        would_block(s, &spins);
    }
    add_bytes(s, len);
}

static void writer_stream(struct side *s, uint64_t len)
{
    struct vchan_ring *r = &s->ring;
    uint32_t size = r->wr.size;
    unsigned spins = spin_budget(s);
    int notify = 0;

    while (len) {
        size_t want = chunk(s, size, len);
        uint64_t op = opt.mode == MODE_MIXED ? rnd(&s->rng) % 10 : 0;
        int rc;

        maybe_yield(s);
        if (op < 6) {
            set_state(s, "write");
            rc = vchan_ring_write(r, stream_at(s->bytes), want, &notify);
            s->writes++;
            check_rc(s, "vchan_ring_write", rc, want);
        } else if (op < 9) {
            /* split the chunk into up to 4 pieces, some possibly empty */
            const void *bufs[4];
            size_t lens[4], off = 0;
            size_t n = (size_t)rnd_range(&s->rng, 1, 4), i;

            for (i = 0; i < n; i++) {
                size_t piece = i + 1 == n ? want - off
                                          : (size_t)(rnd(&s->rng) % (want - off + 1));
                bufs[i] = stream_at(s->bytes + off);
                lens[i] = piece;
                off += piece;
            }
            set_state(s, "writev");
            rc = vchan_ring_writev(r, bufs, lens, n, &notify);
            s->writevs++;
            check_rc(s, "vchan_ring_writev", rc, want);
        } else {
            /* probe the space first, then write what was promised */
            int space;
            set_state(s, "buffer_space");
            space = vchan_ring_buffer_space(r);
            s->probes++;
            check_rc(s, "vchan_ring_buffer_space", space, size);
            if (space == 0) {
                s->calls++;
                would_block(s, &spins);
                continue;
            }
            if ((size_t)space < want)
                want = (size_t)space;
            set_state(s, "write");
            rc = vchan_ring_write(r, stream_at(s->bytes), want, &notify);
            s->writes++;
            check_rc(s, "vchan_ring_write", rc, want);
            if ((size_t)rc != want)     /* space can only grow */
                die(1, "writer: buffer_space said %d, write(%zu) returned %d",
                    space, want, rc);
        }
        s->calls++;
        kick(s, &notify);
        if (rc == 0) {
            would_block(s, &spins);
            continue;
        }
        add_bytes(s, (uint64_t)rc);
        len -= (uint64_t)rc;
        spins = spin_budget(s);
    }
}

static void *writer_main(void *arg)
{
    struct side *s = arg;
    struct vchan_ring *r = &s->ring;
    int notify = 0, rc;

    while (s->bytes < opt.bytes) {
        uint64_t len;
        if (next_segment(s, r->wr.size, opt.bytes - s->bytes, &len) == SEG_MESSAGE)
            writer_message(s, len);
        else
            writer_stream(s, len);
    }
    set_state(s, "write_eof");
    rc = vchan_ring_write_eof(r, &notify);
    if (rc != 0)
        die(1, "writer: write_eof returned %d (%s)", rc, vchan_strerror(rc));
    if (!notify)
        die(1, "writer: write_eof did not ask for an event");
    kick(s, &notify);
    rc = vchan_ring_write(r, "x", 1, &notify);
    if (rc != VCHAN_ECLOSED)
        die(1, "writer: write after write_eof returned %d, expected %d",
            rc, VCHAN_ECLOSED);
    set_state(s, "done");
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Reader.                                                             */
/* ------------------------------------------------------------------ */

/* Compare n bytes with the stream from position pos. */
static void verify_at(uint64_t pos, const uint8_t *got, size_t n, const char *how)
{
    const uint8_t *want = stream_at(pos);
    size_t i;

    if (!opt.verify || memcmp(got, want, n) == 0)
        return;
    for (i = 0; i < n && got[i] == want[i]; i++)
        ;
    die(1, "reader: data mismatch at stream byte %" PRIu64 " (%s of %zu, "
        "offset %zu): got 0x%02x, expected 0x%02x",
        pos + i, how, n, i, got[i], want[i]);
}

static void verify(struct side *s, const uint8_t *got, size_t n)
{
    verify_at(s->bytes, got, n, "chunk");
}

static void reader_message(struct side *s, uint64_t len)
{
    struct vchan_ring *r = &s->ring;
    unsigned spins = spin_budget(s);
    int notify = 0;

    set_state(s, "recv");
    for (;;) {
        int rc = vchan_ring_recv(r, s->buf, len, &notify);
        s->calls++;
        s->recvs++;
        kick(s, &notify);
        check_rc(s, "vchan_ring_recv", rc, len);
        if ((uint64_t)rc == len)
            break;
        if (rc != 0)
            die(1, "reader: recv(%" PRIu64 ") returned partial %d", len, rc);
        would_block(s, &spins);
    }
    verify(s, s->buf, len);
    add_bytes(s, len);
}

static void reader_stream(struct side *s, uint64_t len)
{
    struct vchan_ring *r = &s->ring;
    uint32_t size = r->rd.size;
    unsigned spins = spin_budget(s);
    int notify = 0;

    while (len) {
        size_t want = chunk(s, size, len);
        uint64_t op = opt.mode == MODE_MIXED ? rnd(&s->rng) % 10 : 0;
        int rc;

        maybe_yield(s);
        if (op < 6) {
            set_state(s, "read");
            rc = vchan_ring_read(r, s->buf, want, &notify);
            s->reads++;
            check_rc(s, "vchan_ring_read", rc, want);
        } else if (op < 8) {
            /* zero copy: check the bytes in the ring, then release some */
            const uint8_t *a, *b;
            uint32_t alen, blen;
            int ready;

            set_state(s, "peek");
            ready = vchan_ring_peek(r, &a, &alen, &b, &blen);
            s->peeks++;
            check_rc(s, "vchan_ring_peek", ready, size);
            if ((uint64_t)alen + blen != (uint64_t)ready)
                die(1, "reader: peek returned %d as %u + %u bytes", ready, alen, blen);
            s->calls++;
            if (ready == 0) {
                would_block(s, &spins);
                continue;
            }
            if ((size_t)ready < want)
                want = (size_t)ready;
            if (want <= alen) {
                verify_at(s->bytes, a, want, "peek");
            } else {
                verify_at(s->bytes, a, alen, "peek");
                verify_at(s->bytes + alen, b, want - alen, "peek (wrapped)");
            }
            set_state(s, "consume");
            rc = vchan_ring_consume(r, (uint32_t)want, &notify);
            check_rc(s, "vchan_ring_consume", rc, want);
            if ((size_t)rc != want)
                die(1, "reader: consume(%zu) after peek returned %d", want, rc);
            kick(s, &notify);
            add_bytes(s, (uint64_t)rc);
            len -= (uint64_t)rc;
            spins = spin_budget(s);
            continue;
        } else {
            int ready;
            set_state(s, "data_ready");
            ready = vchan_ring_data_ready(r);
            s->probes++;
            check_rc(s, "vchan_ring_data_ready", ready, size);
            if (ready == 0) {
                s->calls++;
                would_block(s, &spins);
                continue;
            }
            if ((size_t)ready < want)
                want = (size_t)ready;
            set_state(s, "read");
            rc = vchan_ring_read(r, s->buf, want, &notify);
            s->reads++;
            check_rc(s, "vchan_ring_read", rc, want);
            if ((size_t)rc != want)     /* data can only grow */
                die(1, "reader: data_ready said %d, read(%zu) returned %d",
                    ready, want, rc);
        }
        s->calls++;
        kick(s, &notify);
        if (rc == 0) {
            would_block(s, &spins);
            continue;
        }
        verify(s, s->buf, (size_t)rc);
        add_bytes(s, (uint64_t)rc);
        len -= (uint64_t)rc;
        spins = spin_budget(s);
    }
}

static void *reader_main(void *arg)
{
    struct side *s = arg;
    struct vchan_ring *r = &s->ring;
    int notify = 0;

    while (s->bytes < opt.bytes) {
        uint64_t len;
        if (next_segment(s, r->rd.size, opt.bytes - s->bytes, &len) == SEG_MESSAGE)
            reader_message(s, len);
        else
            reader_stream(s, len);
    }
    /* Everything arrived: wait for the half-close, through the protocol. */
    set_state(s, "wait eof");
    for (;;) {
        int rc;
        evtchn_drain(&s->ev);   /* only events after this read's arm count */
        rc = vchan_ring_read(r, s->buf, 1, &notify);
        kick(s, &notify);
        if (rc != 0)
            die(1, "reader: read past the end of the stream returned %d", rc);
        if (vchan_ring_peer_eof(r))
            break;
        sleep_on_event(s);
    }
    if (vchan_ring_data_ready(r) != 0)
        die(1, "reader: data after EOF");
    set_state(s, "done");
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Main.                                                               */
/* ------------------------------------------------------------------ */

static uint64_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    uint64_t mult = 1;

    if (end == s || v < 0)
        die(1, "bad size '%s'", s);
    switch (*end) {
    case 'k': case 'K': mult = 1ull << 10; end++; break;
    case 'm': case 'M': mult = 1ull << 20; end++; break;
    case 'g': case 'G': mult = 1ull << 30; end++; break;
    case 't': case 'T': mult = 1ull << 40; end++; break;
    }
    if (*end == 'i')
        end++;
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end)
        die(1, "bad size '%s'", s);
    return (uint64_t)(v * (double)mult);
}

static void usage(FILE *f)
{
    fprintf(f,
"usage: ring_stress [options] [ORDER [BYTES [SEED]]]\n"
"  --order N         order of the ring carrying the stream (10..20, default 12)\n"
"  --other-order N   order of the unused reverse ring (default 11 for order 10,\n"
"                    else 10)\n"
"  --writer SIDE     'server' (default; stream on the right ring) or 'client'\n"
"  --bytes N         bytes to move, suffixes K/M/G (default 1G)\n"
"  --seed N          PRNG seed (default 1)\n"
"  --chunk-mult N    chunks up to N times the ring size (default 4)\n"
"  --spin N          retry up to N (random 0..N) times before sleeping (default 128)\n"
"  --spin-idle-us N  stop spinning once the awake peer made no progress for N us\n"
"                    (default 10)\n"
"  --spin-wake-us N  same, when the peer is asleep (being woken; default 60)\n"
"  --spin-pause N    pause instructions between retries (default 16)\n"
"  --spin-yield 0|1  sched_yield() between retries instead of pausing\n"
"  --yield PERMILLE  random sched_yield()s per thousand calls (default 2)\n"
"  --watchdog SEC    no event for SEC seconds while asleep -> exit 2 (default 10)\n"
"  --mode M          'mixed' (default: write/writev/send/recv/probes) or\n"
"                    'stream' (write/read only, for benchmarks)\n"
"  --no-verify       do not compare the data (benchmark)\n"
"  --quiet           print one line\n"
"  --json            print one JSON object\n");
}

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int order_arg(const char *s)
{
    char *end;
    long v = strtol(s, &end, 10);

    if (*s == '\0' || *end || v < 0 || v > 64)
        die(1, "bad order '%s'", s);
    return (int)v;
}

static void parse_args(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"order", required_argument, NULL, 'o'},
        {"other-order", required_argument, NULL, 'O'},
        {"writer", required_argument, NULL, 'w'},
        {"bytes", required_argument, NULL, 'b'},
        {"seed", required_argument, NULL, 's'},
        {"chunk-mult", required_argument, NULL, 'c'},
        {"spin", required_argument, NULL, 'S'},
        {"yield", required_argument, NULL, 'y'},
        {"spin-yield", required_argument, NULL, 'Y'},
        {"spin-pause", required_argument, NULL, 'P'},
        {"spin-idle-us", required_argument, NULL, 'I'},
        {"spin-wake-us", required_argument, NULL, 'K'},
        {"watchdog", required_argument, NULL, 'W'},
        {"mode", required_argument, NULL, 'm'},
        {"no-verify", no_argument, NULL, 'N'},
        {"quiet", no_argument, NULL, 'q'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;

    while ((c = getopt_long(argc, argv, "o:O:w:b:s:c:S:y:Y:P:I:K:W:m:Nqjh", longopts,
                            NULL)) != -1) {
        switch (c) {
        case 'o': opt.order = order_arg(optarg); break;
        case 'O': opt.other_order = order_arg(optarg); break;
        case 'w':
            if (!strcmp(optarg, "server"))
                opt.writer_is_server = 1;
            else if (!strcmp(optarg, "client"))
                opt.writer_is_server = 0;
            else
                die(1, "--writer must be 'server' or 'client'");
            break;
        case 'b': opt.bytes = parse_size(optarg); break;
        case 's': opt.seed = strtoull(optarg, NULL, 0); break;
        case 'c': opt.chunk_mult = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'S': opt.spin = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'I': opt.spin_idle_us = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'K': opt.spin_wake_us = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'P': opt.spin_pause = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'Y': opt.spin_yield = (int)strtol(optarg, NULL, 0); break;
        case 'y': opt.yield_permille = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'W': opt.watchdog = (unsigned)strtoul(optarg, NULL, 0); break;
        case 'm':
            if (!strcmp(optarg, "mixed"))
                opt.mode = MODE_MIXED;
            else if (!strcmp(optarg, "stream"))
                opt.mode = MODE_STREAM;
            else
                die(1, "--mode must be 'mixed' or 'stream'");
            break;
        case 'N': opt.verify = 0; break;
        case 'q': opt.quiet = 1; break;
        case 'j': opt.json = 1; break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(1);
        }
    }
    /* positional: ORDER [BYTES [SEED]] */
    if (optind < argc)
        opt.order = order_arg(argv[optind++]);
    if (optind < argc)
        opt.bytes = parse_size(argv[optind++]);
    if (optind < argc)
        opt.seed = strtoull(argv[optind++], NULL, 0);
    if (optind < argc) {
        usage(stderr);
        exit(1);
    }
    if (opt.other_order < 0)
        opt.other_order = opt.order == VCHAN_SMALL_ORDER ? VCHAN_LARGE_ORDER
                                                         : VCHAN_SMALL_ORDER;
    if (opt.chunk_mult < 1)
        opt.chunk_mult = 1;
    if (opt.watchdog < 1)
        opt.watchdog = 1;
}

static void *ring_buffer(int order)
{
    void *p;

    if (vchan_ring_offset(order) >= 0)
        return NULL;    /* in page 0 */
    p = aligned_alloc(VCHAN_PAGE_SIZE, (size_t)1 << order);
    if (!p)
        die(1, "out of memory (ring of order %d)", order);
    memset(p, 0xA5, (size_t)1 << order);
    return p;
}

int main(int argc, char **argv)
{
    struct vchan_ring *srv, *cli;
    int left_order, right_order, rd_order, wr_order, rc, live;
    void *left_buf, *right_buf;
    size_t size, max_chunk;
    pthread_t tw, tr;
    double t0, dt, gbps;

    parse_args(argc, argv);
    if (opt.order < VCHAN_MIN_ORDER || opt.order > VCHAN_MAX_ORDER)
        die(1, "order %d outside %d..%d", opt.order, VCHAN_MIN_ORDER,
            VCHAN_MAX_ORDER);
    size = (size_t)1 << opt.order;
    max_chunk = (size_t)opt.chunk_mult * size;
    if (max_chunk < size + 32)
        max_chunk = size + 32;
    pattern_init(max_chunk);

    /* Left is client -> server, right server -> client. */
    if (opt.writer_is_server) {
        right_order = opt.order;
        left_order = opt.other_order;
    } else {
        left_order = opt.order;
        right_order = opt.other_order;
    }
    page0 = aligned_alloc(VCHAN_PAGE_SIZE, VCHAN_PAGE_SIZE);
    if (!page0)
        die(1, "out of memory");
    left_buf = ring_buffer(left_order);
    right_buf = ring_buffer(right_order);

    writer.name = "writer";
    reader.name = "reader";
    writer.peer = &reader;
    reader.peer = &writer;
    srv = opt.writer_is_server ? &writer.ring : &reader.ring;
    cli = opt.writer_is_server ? &reader.ring : &writer.ring;
    (opt.writer_is_server ? &writer : &reader)->role = "server";
    (opt.writer_is_server ? &reader : &writer)->role = "client";
    evtchn_init(&writer.ev);
    evtchn_init(&reader.ev);
    writer.rng = rng_seed(opt.seed, 1);
    reader.rng = rng_seed(opt.seed, 2);
    writer.sched = reader.sched = rng_seed(opt.seed, 3);
    writer.state = reader.state = "init";

    rc = vchan_ring_init_server(srv, page0, left_order, right_order,
                                left_buf, right_buf);
    if (rc)
        die(1, "vchan_ring_init_server(%d, %d) returned %d (%s)", left_order,
            right_order, rc, vchan_strerror(rc));
    rc = vchan_client_orders(page0, &rd_order, &wr_order);
    if (rc || rd_order != right_order || wr_order != left_order)
        die(1, "vchan_client_orders returned %d (%d, %d)", rc, rd_order, wr_order);
    rc = vchan_ring_init_client(cli, page0, rd_order, wr_order, right_buf, left_buf);
    if (rc)
        die(1, "vchan_ring_init_client returned %d (%s)", rc, vchan_strerror(rc));
    /* "The caller then sends one event." */
    (opt.writer_is_server ? &writer : &reader)->ev.pending = 1;
    if ((live = vchan_ring_peer_live(srv)) != VCHAN_LIVE_CONNECTED ||
        vchan_ring_peer_live(cli) != VCHAN_LIVE_CONNECTED)
        die(1, "peers not connected after setup (%d)", live);

    reader.buf = malloc(max_chunk);
    if (!reader.buf)
        die(1, "out of memory");

    t0 = now();
    if (pthread_create(&tr, NULL, reader_main, &reader) ||
        pthread_create(&tw, NULL, writer_main, &writer))
        die(1, "pthread_create failed");
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    dt = now() - t0;

    /* Post-conditions on the page and the endpoints. */
    if (writer.bytes != opt.bytes || reader.bytes != opt.bytes)
        die(1, "moved %" PRIu64 " / %" PRIu64 " bytes, expected %" PRIu64,
            writer.bytes, reader.bytes, opt.bytes);
    {
        struct vchan_ring_shared *sh = opt.writer_is_server ? &page0->right
                                                            : &page0->left;
        if (sh->prod != (uint32_t)opt.bytes || sh->cons != (uint32_t)opt.bytes)
            die(1, "final indices prod %u cons %u, expected %u", sh->prod,
                sh->cons, (uint32_t)opt.bytes);
    }
    if (vchan_ring_error(srv) || vchan_ring_error(cli))
        die(1, "sticky error set: server %d client %d", vchan_ring_error(srv),
            vchan_ring_error(cli));
    if (vchan_ring_peer_eof(&writer.ring) != 0 || vchan_ring_peer_eof(&reader.ring) != 1)
        die(1, "EOF marks wrong after the run");
    if (vchan_ring_peer_flags(&writer.ring) != VCHAN_NOTIFY_HELLO ||
        vchan_ring_peer_flags(&reader.ring) != (VCHAN_NOTIFY_HELLO | VCHAN_NOTIFY_EOF))
        die(1, "extension flags wrong after the run: writer 0x%02x reader 0x%02x",
            vchan_ring_peer_flags(&writer.ring), vchan_ring_peer_flags(&reader.ring));
    vchan_ring_close(&writer.ring);
    if (vchan_ring_peer_live(&reader.ring) != VCHAN_LIVE_CLOSED)
        die(1, "reader does not see the writer closed");
    vchan_ring_close(&reader.ring);
    if (vchan_ring_peer_live(&writer.ring) != VCHAN_LIVE_CLOSED)
        die(1, "writer does not see the reader closed");
    if (!(vchan_ring_peer_flags(&writer.ring) & VCHAN_NOTIFY_CLOSED) ||
        !(vchan_ring_peer_flags(&reader.ring) & VCHAN_NOTIFY_CLOSED))
        die(1, "graceful close not marked (VCHAN_NOTIFY_CLOSED)");

    gbps = dt > 0 ? (double)opt.bytes / dt / 1e9 : 0.0;
    if (opt.json) {
        printf("{\"ok\": true, \"bytes\": %" PRIu64 ", \"seconds\": %.6f, "
               "\"gbps\": %.4f, \"order\": %d, \"other_order\": %d, "
               "\"writer\": \"%s\", \"mode\": \"%s\", \"verify\": %s, "
               "\"seed\": %" PRIu64 ", "
               "\"writer_calls\": %" PRIu64 ", \"reader_calls\": %" PRIu64 ", "
               "\"writer_sleeps\": %" PRIu64 ", \"reader_sleeps\": %" PRIu64 ", "
               "\"writer_kicks\": %" PRIu64 ", \"reader_kicks\": %" PRIu64 "}\n",
               opt.bytes, dt, gbps, opt.order, opt.other_order,
               writer.role, opt.mode == MODE_MIXED ? "mixed" : "stream",
               opt.verify ? "true" : "false", opt.seed,
               writer.calls, reader.calls, writer.sleeps, reader.sleeps,
               writer.kicks, reader.kicks);
    } else if (opt.quiet) {
        printf("%.4f GB/s\n", gbps);
    } else {
        printf("ring_stress: OK: moved %" PRIu64 " bytes in %.3f s: %.4f GB/s "
               "(order %d, other %d, writer=%s, mode %s, seed %" PRIu64 ")\n",
               opt.bytes, dt, gbps, opt.order, opt.other_order, writer.role,
               opt.mode == MODE_MIXED ? "mixed" : "stream", opt.seed);
        printf("  writer: %" PRIu64 " calls (write %" PRIu64 ", writev %" PRIu64
               ", send %" PRIu64 ", buffer_space %" PRIu64 "), %" PRIu64
               " spins, %" PRIu64 " drains, %" PRIu64 " sleeps, %" PRIu64
               " events sent\n",
               writer.calls, writer.writes, writer.writevs, writer.sends,
               writer.probes, writer.spins, writer.drains, writer.sleeps,
               writer.kicks);
        printf("  reader: %" PRIu64 " calls (read %" PRIu64 ", recv %" PRIu64
               ", peek %" PRIu64 ", data_ready %" PRIu64 "), %" PRIu64 " spins, %"
               PRIu64 " drains, %" PRIu64 " sleeps, %" PRIu64 " events sent\n",
               reader.calls, reader.reads, reader.recvs, reader.peeks, reader.probes,
               reader.spins, reader.drains, reader.sleeps, reader.kicks);
    }
    free(reader.buf);
    free(left_buf);
    free(right_buf);
    free(page0);
    free(pattern);
    return 0;
}
