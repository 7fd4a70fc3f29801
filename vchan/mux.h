/*
 * vchan/mux.h -- frames of the session protocol over one libxenvchan ring.
 *
 * A listener-mode session carries many connections ("streams") over one
 * ring pair.  Each side writes frames into its write ring:
 *
 *     offset 0  u8   type      (VCHAN_MUX_*)
 *            1  u8   flags
 *            2  u16  reserved  (0)
 *            4  u32  stream    stream id (0: the session itself)
 *            8  u32  length    payload bytes that follow the header
 *           12  u32  arg       type-specific (a window increment, a version)
 *
 * little-endian, 16 bytes, followed by the payload.  A writer commits a
 * header and its payload together (one producer-index update), so a
 * correct peer never shows half a frame; a reader still treats half a
 * frame as "not yet" (it waits for the rest) and a frame that could never
 * fit as corruption.  The rules of the conversation live in vchan/mux.py.
 *
 * Like ring.c, this is pure memory work: the header is copied out of the
 * shared page before it is looked at, and every length is checked before it
 * is used.
 */
#ifndef VCHAN_MUX_H
#define VCHAN_MUX_H

#include <stddef.h>
#include <stdint.h>

#include "ring.h"

#define VCHAN_MUX_HEADER        16
#define VCHAN_MUX_DATA          3       /* the frame type vchan_mux_write_data writes */
#define VCHAN_MUX_FULL          (-40)   /* not enough free space for the frame */
#define VCHAN_MUX_EFRAME        (-41)   /* the peer wrote an impossible frame */

struct vchan_mux_frame {
    uint8_t type;
    uint8_t flags;
    uint32_t stream;
    uint32_t length;
    uint32_t arg;
};

/* Write one frame: a header and up to len bytes of data.
 *
 * The payload is cut to what fits in the free space (and to max_payload),
 * but never below min(len, min_payload): returns the payload bytes written
 * (a frame was written), VCHAN_MUX_FULL when even that does not fit (the
 * "tell me on read" request is armed), or a ring error. */
int vchan_mux_write(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                    uint32_t arg, const void *data, uint32_t len, uint32_t min_payload,
                    uint32_t max_payload, int *notify);

/* vchan_mux_write; with quiet set, the frame is published without waking
 * the peer (see vchan_ring_commit_quiet). */
int vchan_mux_write_ex(struct vchan_ring *r, uint8_t type, uint8_t flags, uint32_t stream,
                       uint32_t arg, const void *data, uint32_t len, uint32_t min_payload,
                       uint32_t max_payload, int quiet, int *notify);

/* Write up to len bytes of data as DATA frames of at most max_payload
 * bytes each, while they fit (a piece no smaller than min(rest,
 * min_payload)).  Stops after the frame that sets *notify (the peer is
 * waiting for it: wake it, then call again for the rest).  Returns
 * the bytes written (> 0), VCHAN_MUX_FULL when not even the first frame
 * fits (the "tell me on read" request is armed) or len is 0, or a ring
 * error.  Every frame carries at least one byte (a min_payload of 0 counts
 * as 1); a max_payload of 0 with data to write is VCHAN_EINVAL. */
int vchan_mux_write_data(struct vchan_ring *r, uint32_t stream, const void *data, uint32_t len,
                         uint32_t min_payload, uint32_t max_payload, int *notify);

/* A piece of a gathered write. */
struct vchan_iov {
    const void *base;
    uint32_t len;
};

/* vchan_mux_write_data of the next len bytes of the pieces iov, from piece
 * *i at offset *off (len no more than the pieces hold from there): a frame
 * gathers its payload across pieces.  The cursor (*i, *off) moves past
 * what was written. */
int vchan_mux_write_datav(struct vchan_ring *r, uint32_t stream, const struct vchan_iov *iov,
                          uint32_t *i, uint32_t *off, uint32_t len, uint32_t min_payload,
                          uint32_t max_payload, int *notify);

/* Look at the next frame without consuming it.
 *
 * Returns 1 when a whole frame is in the ring: *f holds its header (copied
 * out of the ring) and (a, alen), (b, blen) its payload as up to two pieces
 * of the ring.  Returns 0 when there is no whole frame yet (the wake-up
 * request is armed), VCHAN_MUX_EFRAME for a frame longer than max_payload
 * or with reserved bits set, or a ring error.  The caller consumes
 * VCHAN_MUX_HEADER + f->length bytes once done with the payload. */
int vchan_mux_peek(struct vchan_ring *r, struct vchan_mux_frame *f, uint32_t max_payload,
                   const uint8_t **a, uint32_t *alen, const uint8_t **b, uint32_t *blen);

/* Copy the payload of the frame just peeked into buf (which has room for
 * it) and consume the frame. */
int vchan_mux_take(struct vchan_ring *r, const struct vchan_mux_frame *f, const uint8_t *a,
                   uint32_t alen, const uint8_t *b, uint32_t blen, void *buf, int *notify);

/* Take the frame just peeked (as vchan_mux_take) and then every whole
 * frame after it of the same type, flags and stream, while its payload
 * fits in what is left of buf's len bytes and of credit: their payloads
 * end to end in buf, the frames consumed.  Stops quietly at anything else
 * (the caller's next peek judges it).  Returns the payload bytes copied, or
 * an error; VCHAN_EINVAL if the first frame does not fit. */
int vchan_mux_take_run(struct vchan_ring *r, const struct vchan_mux_frame *f,
                       const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen,
                       uint32_t max_payload, uint32_t credit, void *buf, uint32_t len,
                       int *notify);

/* The payload bytes of the run of whole, non-empty frames of f's type,
 * flags and stream that lie one after another from the head of the ring
 * (f is the head frame, just peeked, and counts first), while the total
 * stays within limit: what a reader may take later with vchan_mux_peek /
 * vchan_mux_take_run, nothing else in between.  Consumes nothing and never
 * arms a wake-up.  Returns the total (at least f->length), or a ring error;
 * VCHAN_EINVAL if f itself is empty or over limit. */
int vchan_mux_run_length(struct vchan_ring *r, const struct vchan_mux_frame *f,
                         uint32_t max_payload, uint32_t limit);

/* A stream's run of DATA frames announced to its reader, which takes its
 * bytes straight out of the ring (vchan/_reader.c): the frames stay in the
 * ring until their last byte is taken, so a frame may be taken in parts.
 * The session (vchan/mux.py) fills it in when it announces a run
 * (vchan_mux_run_length) and clears ring before the ring is unmapped. */
struct vchan_direct {
    struct vchan_ring *ring;    /* NULL: nothing to take (the session ended) */
    int *notify;                /* the session's: the writer waits for room */
    uint32_t max_payload;
    uint32_t stream;            /* the run's stream and flags */
    uint32_t flags;
    uint32_t left;              /* payload bytes of the run not taken yet */
    uint32_t offset;            /* of the head frame's payload, bytes taken */
    uint32_t freed;             /* ring bytes freed since the writer was woken */
    uint32_t wake_after;        /* wake a waiting writer once this many are free */
};

/* Copy the next len bytes of the run (len <= d->left) into buf: the head
 * frame's payload from d->offset on, then the frames after it; each frame
 * whose last byte is taken is consumed.  Every frame's header is read
 * again and must still be a DATA frame of the run that fits what is left
 * (a peer that rewrote a published frame: VCHAN_MUX_EFRAME).  Returns len,
 * or an error (the bytes copied before it are lost: the session fails). */
int vchan_direct_take(struct vchan_direct *d, void *buf, uint32_t len);

/* The bytes up to and including the first sep in the head frame's payload
 * from d->offset on, if it is there and starts at most limit bytes in;
 * 0 if it is not (or not within limit), or an error. */
int vchan_direct_find(struct vchan_direct *d, uint8_t sep, uint32_t limit);

/* The payload bytes of the head frame not taken yet (after d->offset),
 * or an error. */
int vchan_direct_rest(struct vchan_direct *d);

/* Whether a waiting writer is owed its wake-up now (a good share of the
 * ring is free, or the run is over), or the run is over: the session's
 * Python side then takes over (vchan_direct_take does not wake anyone). */
int vchan_direct_due(const struct vchan_direct *d);

#endif /* VCHAN_MUX_H */
