/*
 * A session's per-message fast paths: the mux framing of mux.c over the
 * ring of ring.c, and the event channel of the device layer (kernel/), in
 * one call, so that a small message costs one crossing from Python and not
 * one per step.  ring.c and mux.c stay pure memory operations; the system
 * call (the notify) is made here.
 */
#ifndef VCHAN_SESSION_H
#define VCHAN_SESSION_H

#include <stdint.h>

#include "kernel.h"
#include "mux.h"
#include "ring.h"

/* Write up to len bytes of data as DATA frames of stream (as
 * vchan_mux_write_data, called until everything is written or the ring is
 * full), and wake the peer through port of dev each time a frame asks for
 * it, so that a waiting reader copies out while the rest is written.
 *
 * Returns the bytes written (0 when not even the first frame fits: the
 * "tell me on read" request is armed) or a ring error (< 0).  *notify is 0
 * on return unless a wake-up failed: it is left set, and the caller
 * notifies again to learn (and report) why.  *woken counts the wake-ups
 * sent.
 *
 * With now_only set, nothing is written unless the write should go at once
 * (vchan_ring_write_now: the peer took everything, or sleeps until our next
 * write; a broken ring too, to fail there): VCHAN_SESSION_LATER otherwise,
 * and the caller keeps the bytes for a later, merged write. */
#define VCHAN_SESSION_LATER     (-60)

int vchan_session_send(struct vchan_ring *r, uint32_t stream, const void *data, uint32_t len,
                       uint32_t min_payload, uint32_t max_payload, int *notify,
                       struct vk_dev *dev, uint32_t port, uint64_t *woken, int now_only);

/* vchan_session_send of the first len bytes of the pieces iov (as many
 * as they hold, or fewer): each frame gathers its payload across pieces. */
int vchan_session_sendv(struct vchan_ring *r, uint32_t stream, const struct vchan_iov *iov,
                        uint32_t len, uint32_t min_payload, uint32_t max_payload, int *notify,
                        struct vk_dev *dev, uint32_t port, uint64_t *woken, int now_only);

/* A session's side of its writes, for callers that are handed one address
 * (vchan._reader's writev: StreamTransport.writelines). */
struct vchan_session_out {
    struct vchan_ring *ring;
    int *notify;
    struct vk_dev *dev;
    uint32_t port;
    uint64_t *woken;
    uint32_t min_payload;
    uint32_t max_payload;
};

/* vchan_session_sendv through o, never put off (now_only 0). */
int vchan_session_writev(const struct vchan_session_out *o, uint32_t stream,
                         const struct vchan_iov *iov, uint32_t len);

#endif /* VCHAN_SESSION_H */
