/*
 * Session frames over a vchan ring (see mux.h).
 *
 * Everything about the ring goes through its zero-copy calls
 * (reserve/commit, peek/consume), which validate the peer's indexes: the
 * pieces we copy from and to always lie inside our mapping of the ring.
 * The header is copied into private memory before any field is used: the
 * peer may change the shared bytes at any moment.
 */
#include "mux.h"

#include <string.h>

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

/* Copy n bytes into the two free pieces (a, alen), (b, ...) at offset off. */
static void scatter(uint8_t *a, uint32_t alen, uint8_t *b, uint32_t off, const uint8_t *src,
                    uint32_t n)
{
    if (off < alen) {
        uint32_t first = alen - off < n ? alen - off : n;

        memcpy(a + off, src, first);
        src += first;
        n -= first;
        off = alen;
    }
    if (n)
        memcpy(b + (off - alen), src, n);
}

/* Copy the next n bytes of an iovec (from piece *i, offset *off) into the
 * two free pieces at offset at, and move the cursor past them. */
static void scatter_iov(uint8_t *a, uint32_t alen, uint8_t *b, uint32_t at,
                        const struct vchan_iov *iov, uint32_t *i, uint32_t *off, uint32_t n)
{
    while (n) {
        uint32_t part = iov[*i].len - *off;

        if (part > n)
            part = n;
        scatter(a, alen, b, at, (const uint8_t *)iov[*i].base + *off, part);
        at += part;
        n -= part;
        *off += part;
        if (*off == iov[*i].len) {
            ++*i;
            *off = 0;
        }
    }
}

/* Copy n bytes out of the two ready pieces, starting at offset off. */
static void gather(const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t off,
                   uint8_t *dst, uint32_t n)
{
    if (off < alen) {
        uint32_t first = alen - off < n ? alen - off : n;

        memcpy(dst, a + off, first);
        dst += first;
        n -= first;
        off = alen;
    }
    if (n)
        memcpy(dst, b + (off - alen), n);
}

int vchan_mux_write(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                    uint32_t arg, const void *data, uint32_t len, uint32_t min_payload,
                    uint32_t max_payload, int *notify)
{
    return vchan_mux_write_ex(r, type, flags, stream, arg, data, len, min_payload,
                              max_payload, 0, notify);
}

/* One frame whose payload is the next bytes of an iovec, from the cursor
 * (*i, *off), which moves past what was written (see vchan_mux_write_ex). */
static int write_frame(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                       uint32_t arg, const struct vchan_iov *iov, uint32_t *i, uint32_t *off,
                       uint32_t len, uint32_t min_payload, uint32_t max_payload, int quiet,
                       int *notify)
{
    uint8_t *a, *b, hdr[VCHAN_MUX_HEADER];
    uint32_t alen, blen, room, n, need;
    int space;

    need = len < min_payload ? len : min_payload;
    /* Arms the "tell me on read" request only if the frame does not fit. */
    space = vchan_ring_reserve_min(r, VCHAN_MUX_HEADER + (size_t)need, &a, &alen, &b, &blen);
    if (space < 0)
        return space;
    room = (uint32_t)space;
    if (room < VCHAN_MUX_HEADER || room - VCHAN_MUX_HEADER < need)
        return VCHAN_MUX_FULL;      /* reserve armed the "tell me on read" request */
    n = room - VCHAN_MUX_HEADER;
    if (n > len)
        n = len;
    if (n > max_payload)
        n = max_payload;
    /* End a frame that would wrap at the end of the ring instead, when the
     * piece left there is worth a frame: its payload then lies in one piece
     * and the reader copies it once. */
    if (alen > VCHAN_MUX_HEADER && VCHAN_MUX_HEADER + n > alen &&
        alen - VCHAN_MUX_HEADER >= need)
        n = alen - VCHAN_MUX_HEADER;
    memset(hdr, 0, sizeof hdr);
    hdr[0] = type;
    hdr[1] = flags;
    put_u32(hdr + 4, stream);
    put_u32(hdr + 8, n);
    put_u32(hdr + 12, arg);
    scatter(a, alen, b, 0, hdr, VCHAN_MUX_HEADER);
    scatter_iov(a, alen, b, VCHAN_MUX_HEADER, iov, i, off, n);
    /* write the frame /then/ publish it: commit's fence orders the two */
    space = quiet ? vchan_ring_commit_quiet(r, VCHAN_MUX_HEADER + n)
                  : vchan_ring_commit(r, VCHAN_MUX_HEADER + n, notify);
    if (space < 0)
        return space;
    return (int)n;
}

int vchan_mux_write_ex(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                       uint32_t arg, const void *data, uint32_t len, uint32_t min_payload,
                       uint32_t max_payload, int quiet, int *notify)
{
    struct vchan_iov one = { data, len };
    uint32_t i = 0, off = 0;

    return write_frame(r, type, flags, stream, arg, &one, &i, &off, len, min_payload,
                       max_payload, quiet, notify);
}

int vchan_mux_write_datav(struct vchan_ring *r, uint32_t stream, const struct vchan_iov *iov,
                          uint32_t *i, uint32_t *off, uint32_t len, uint32_t min_payload,
                          uint32_t max_payload, int *notify)
{
    uint32_t done = 0;
    int n;

    /* Every DATA frame carries at least one byte: an empty one is no progress. */
    if (len && max_payload == 0)
        return VCHAN_EINVAL;
    if (min_payload == 0)
        min_payload = 1;
    while (done < len) {
        n = write_frame(r, VCHAN_MUX_DATA, 0, stream, 0, iov, i, off, len - done,
                        min_payload, max_payload, 0, notify);
        if (n == VCHAN_MUX_FULL)
            break;
        if (n < 0)
            return n;
        done += (uint32_t)n;
        /* The reader is waiting for this frame: stop, so that the caller
         * wakes it now and it copies while we write the next frames. */
        if (*notify)
            break;
    }
    return done ? (int)done : VCHAN_MUX_FULL;
}

int vchan_mux_write_data(struct vchan_ring *r, uint32_t stream, const void *data, uint32_t len,
                         uint32_t min_payload, uint32_t max_payload, int *notify)
{
    struct vchan_iov one = { data, len };
    uint32_t i = 0, off = 0;

    return vchan_mux_write_datav(r, stream, &one, &i, &off, len, min_payload, max_payload,
                                 notify);
}

int vchan_mux_peek(struct vchan_ring *r, struct vchan_mux_frame *f, uint32_t max_payload,
                   const uint8_t **a, uint32_t *alen, const uint8_t **b, uint32_t *blen)
{
    const uint8_t *ra, *rb;
    uint32_t ralen, rblen, length, first;
    uint8_t hdr[VCHAN_MUX_HEADER];
    int ready;

    *alen = *blen = 0;
    /* The wake-up request is armed only when what we need is not there:
     * a header, then the whole frame. */
    ready = vchan_ring_peek_min(r, VCHAN_MUX_HEADER, &ra, &ralen, &rb, &rblen);
    if (ready < 0)
        return ready;
    if ((uint32_t)ready < VCHAN_MUX_HEADER)
        return 0;                   /* empty or half a header: armed */
    gather(ra, ralen, rb, 0, hdr, VCHAN_MUX_HEADER);
    length = get_u32(hdr + 8);
    if (length > max_payload || hdr[2] || hdr[3])
        return VCHAN_MUX_EFRAME;
    f->type = hdr[0];
    f->flags = hdr[1];
    f->stream = get_u32(hdr + 4);
    f->length = length;
    f->arg = get_u32(hdr + 12);
    if ((uint32_t)ready - VCHAN_MUX_HEADER < length) {
        /* The rest of the frame is not there yet: arm, and look again. */
        ready = vchan_ring_peek_min(r, VCHAN_MUX_HEADER + (size_t)length, &ra, &ralen, &rb,
                                    &rblen);
        if (ready < 0)
            return ready;
        if ((uint32_t)ready - VCHAN_MUX_HEADER < length)
            return 0;
    }
    /* The payload as pieces of the ring, after the header. */
    if (ralen > VCHAN_MUX_HEADER) {
        first = ralen - VCHAN_MUX_HEADER;
        if (first > length)
            first = length;
        *a = ra + VCHAN_MUX_HEADER;
        *alen = first;
        *b = rb;
        *blen = length - first;
    } else {
        *a = rb + (VCHAN_MUX_HEADER - ralen);
        *alen = length;
        *b = rb;
        *blen = 0;
    }
    return 1;
}

int vchan_mux_take(struct vchan_ring *r, const struct vchan_mux_frame *f, const uint8_t *a,
                   uint32_t alen, const uint8_t *b, uint32_t blen, void *buf, int *notify)
{
    uint8_t *dst = buf;

    if (alen + blen != f->length)
        return VCHAN_EINVAL;
    if (alen)
        memcpy(dst, a, alen);
    if (blen)
        memcpy(dst + alen, b, blen);
    return vchan_ring_consume(r, VCHAN_MUX_HEADER + f->length, notify);
}

int vchan_mux_take_run(struct vchan_ring *r, const struct vchan_mux_frame *f,
                       const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                       uint32_t max_payload, uint32_t credit, void *buf, uint32_t len,
                       int *notify)
{
    struct vchan_mux_frame g;
    uint8_t *dst = buf;
    uint32_t done;
    int rc;

    if (f->length > len || f->length > credit)
        return VCHAN_EINVAL;
    /* The first frame as the caller saw it (its header is private memory):
     * taking it is always progress, whatever the peer does meanwhile. */
    rc = vchan_mux_take(r, f, a, alen, b, blen, dst, notify);
    if (rc < 0)
        return rc;
    done = f->length;
    while (done < len) {
        /* A frame that is not whole yet, broken, of another kind or stream,
         * or too big for what is left is not ours to judge here: the
         * caller looks at it next. */
        if (vchan_mux_peek(r, &g, max_payload, &a, &alen, &b, &blen) <= 0)
            break;
        if (g.type != f->type || g.stream != f->stream || g.flags != f->flags ||
            g.length > len - done || g.length > credit - done)
            break;
        rc = vchan_mux_take(r, &g, a, alen, b, blen, dst + done, notify);
        if (rc < 0)
            return rc;
        done += g.length;
    }
    return (int)done;
}

int vchan_mux_run_length(struct vchan_ring *r, const struct vchan_mux_frame *f,
                         uint32_t max_payload, uint32_t limit)
{
    const uint8_t *a, *b;
    uint32_t alen, blen, ready, off, length, done;
    uint8_t hdr[VCHAN_MUX_HEADER];
    int rc;

    if (f->length == 0 || f->length > limit)
        return VCHAN_EINVAL;
    /* want 0: look without asking to be woken */
    rc = vchan_ring_peek_min(r, 0, &a, &alen, &b, &blen);
    if (rc < 0)
        return rc;
    ready = (uint32_t)rc;
    /* The head frame as the caller saw it (its header is private memory). */
    if (ready < VCHAN_MUX_HEADER || ready - VCHAN_MUX_HEADER < f->length)
        return VCHAN_EINVAL;
    done = f->length;
    off = VCHAN_MUX_HEADER + f->length;
    while (ready - off >= VCHAN_MUX_HEADER) {
        gather(a, alen, b, off, hdr, VCHAN_MUX_HEADER);
        length = get_u32(hdr + 8);
        if (hdr[0] != f->type || hdr[1] != f->flags || hdr[2] || hdr[3] ||
            get_u32(hdr + 4) != f->stream || length == 0 || length > max_payload ||
            ready - off - VCHAN_MUX_HEADER < length || length > limit - done)
            break;
        done += length;
        off += VCHAN_MUX_HEADER + length;
    }
    return (int)done;
}

/* The head frame of a direct run, checked: 0, or an error. */
static int direct_head(struct vchan_direct *d, struct vchan_mux_frame *f, const uint8_t **a,
                       uint32_t *alen, const uint8_t **b, uint32_t *blen)
{
    int rc;

    if (d->ring == NULL || d->left == 0)
        return VCHAN_EINVAL;
    rc = vchan_mux_peek(d->ring, f, d->max_payload, a, alen, b, blen);
    if (rc < 0)
        return rc;
    /* Announced frames are whole: anything else was rewritten. */
    if (rc == 0 || f->type != VCHAN_MUX_DATA || f->stream != d->stream ||
        f->flags != d->flags || f->length <= d->offset ||
        f->length - d->offset > d->left)
        return VCHAN_MUX_EFRAME;
    return 0;
}

int vchan_direct_take(struct vchan_direct *d, void *buf, uint32_t len)
{
    struct vchan_mux_frame f;
    const uint8_t *a, *b;
    uint32_t alen, blen, done = 0, part;
    uint8_t *dst = buf;
    int rc;

    if (len > d->left)
        return VCHAN_EINVAL;
    while (done < len) {
        rc = direct_head(d, &f, &a, &alen, &b, &blen);
        if (rc < 0)
            return rc;
        part = f.length - d->offset;
        if (part > len - done)
            part = len - done;
        gather(a, alen, b, d->offset, dst + done, part);
        done += part;
        d->left -= part;
        d->offset += part;
        if (d->offset == f.length) {
            rc = vchan_ring_consume(d->ring, VCHAN_MUX_HEADER + f.length, d->notify);
            if (rc < 0)
                return rc;
            d->offset = 0;
            if (*d->notify)
                d->freed += VCHAN_MUX_HEADER + f.length;
        }
    }
    return (int)done;
}

int vchan_direct_find(struct vchan_direct *d, uint8_t sep, uint32_t limit)
{
    struct vchan_mux_frame f;
    const uint8_t *a, *b, *hit;
    uint32_t alen, blen, rest, at;
    int rc;

    rc = direct_head(d, &f, &a, &alen, &b, &blen);
    if (rc < 0)
        return rc;
    rest = f.length - d->offset;
    if (d->offset < alen) {
        hit = memchr(a + d->offset, sep, alen - d->offset);
        if (hit != NULL) {
            at = (uint32_t)(hit - (a + d->offset));
            return at <= limit ? (int)(at + 1) : 0;
        }
        at = alen - d->offset;
        hit = blen ? memchr(b, sep, blen) : NULL;
        if (hit != NULL)
            at += (uint32_t)(hit - b);
    } else {
        hit = memchr(b + (d->offset - alen), sep, rest);
        at = hit != NULL ? (uint32_t)(hit - (b + (d->offset - alen))) : 0;
    }
    if (hit == NULL || at > limit)
        return 0;
    return (int)(at + 1);
}

int vchan_direct_rest(struct vchan_direct *d)
{
    struct vchan_mux_frame f;
    const uint8_t *a, *b;
    uint32_t alen, blen;
    int rc = direct_head(d, &f, &a, &alen, &b, &blen);

    return rc < 0 ? rc : (int)(f.length - d->offset);
}

int vchan_direct_due(const struct vchan_direct *d)
{
    return d->left == 0 || (*d->notify && d->freed >= d->wake_after);
}
