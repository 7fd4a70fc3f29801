/* A session's per-message fast paths: see session.h. */
#include "session.h"

int vchan_session_sendv(struct vchan_ring *r, uint32_t stream, const struct vchan_iov *iov,
                        uint32_t len, uint32_t min_payload, uint32_t max_payload, int *notify,
                        struct vk_dev *dev, uint32_t port, uint64_t *woken, int now_only)
{
    uint32_t done = 0, i = 0, off = 0;
    int n;

    if (now_only && vchan_ring_write_now(r) == 0)
        return VCHAN_SESSION_LATER;

    while (done < len) {
        n = vchan_mux_write_datav(r, stream, iov, &i, &off, len - done, min_payload,
                                  max_payload, notify);
        if (n == VCHAN_MUX_FULL)
            break;
        if (n < 0)
            return n;
        done += (uint32_t)n;
        if (*notify) {
            if (vk_notify(dev, port) < 0)
                break;              /* *notify stays set: the caller reports it */
            *notify = 0;
            ++*woken;
        }
    }
    return (int)done;
}

int vchan_session_send(struct vchan_ring *r, uint32_t stream, const void *data, uint32_t len,
                       uint32_t min_payload, uint32_t max_payload, int *notify,
                       struct vk_dev *dev, uint32_t port, uint64_t *woken, int now_only)
{
    struct vchan_iov one = { data, len };

    return vchan_session_sendv(r, stream, &one, len, min_payload, max_payload, notify, dev,
                               port, woken, now_only);
}

int vchan_session_writev(const struct vchan_session_out *o, uint32_t stream,
                         const struct vchan_iov *iov, uint32_t len)
{
    return vchan_session_sendv(o->ring, stream, iov, len, o->min_payload, o->max_payload,
                               o->notify, o->dev, o->port, o->woken, 0);
}
