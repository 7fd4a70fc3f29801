/*
 * Ring <-> file descriptor in one copy (see splice.h).
 *
 * Everything about the ring goes through its zero-copy calls (peek/consume,
 * reserve/commit), which validate the peer's indexes: the pieces handed to
 * the kernel always lie inside our mapping of the ring.  The peer may
 * scribble on those bytes while the kernel copies them; that only changes
 * what is forwarded, never where we read or write.
 */
#include "splice.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* Clip two pieces (a, alen) and (b, blen) to max bytes: how many iovecs. */
static int clip(struct iovec *iov, void *a, uint32_t alen, void *b, uint32_t blen,
                size_t max)
{
    int n = 0;

    if (alen > max)
        alen = (uint32_t)max;
    if (alen) {
        iov[n].iov_base = a;
        iov[n++].iov_len = alen;
    }
    max -= alen;
    if (blen > max)
        blen = (uint32_t)max;
    if (blen) {
        iov[n].iov_base = b;
        iov[n++].iov_len = blen;
    }
    return n;
}

int vchan_splice_to_fd(struct vchan_ring *r, int fd, size_t max, int *notify, int *err)
{
    const uint8_t *a, *b;
    uint32_t alen, blen;
    struct iovec iov[2];
    struct msghdr msg = {0};
    ssize_t sent;
    int rc, n;

    *err = 0;
    rc = vchan_ring_peek(r, &a, &alen, &b, &blen);
    if (rc <= 0)
        return rc;
    n = clip(iov, (void *)a, alen, (void *)b, blen, max);
    if (n == 0)
        return 0;
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)n;
    /* MSG_NOSIGNAL: a closed socket is an EPIPE error, not a signal. */
    sent = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0 && errno == ENOTSOCK)
        sent = writev(fd, iov, n);
    if (sent < 0) {
        *err = errno;
        return VCHAN_SPLICE_ERRNO;
    }
    if (sent == 0)
        return 0;
    return vchan_ring_consume(r, (uint32_t)sent, notify);
}

int vchan_splice_from_fd(struct vchan_ring *r, int fd, size_t max, int *notify, int *err)
{
    uint8_t *a, *b;
    uint32_t alen, blen;
    struct iovec iov[2];
    ssize_t got;
    int rc, n;

    *err = 0;
    rc = vchan_ring_reserve(r, &a, &alen, &b, &blen);
    if (rc <= 0)
        return rc;
    n = clip(iov, a, alen, b, blen, max);
    if (n == 0)
        return 0;
    got = readv(fd, iov, n);
    if (got < 0) {
        *err = errno;
        return VCHAN_SPLICE_ERRNO;
    }
    if (got == 0)
        return VCHAN_SPLICE_EOF;
    return vchan_ring_commit(r, (uint32_t)got, notify);
}
