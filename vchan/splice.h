/*
 * Moving bytes between a vchan ring and a file descriptor (a socket, a
 * pipe) with one system call and one copy: the kernel copies straight out of
 * the ring's shared pages into the socket, or from the socket into them.
 * Used by the proxy (vchan/splice.py) so that forwarded bytes never pass
 * through Python objects.
 *
 * Both calls are non-blocking if the descriptor is; they make one system
 * call at most and return:
 *   n > 0                 bytes moved (and consumed from / published to
 *                         the ring; *notify set when the peer must be told)
 *   0                     nothing to move: the ring is empty (to_fd) or full
 *                         (from_fd); the matching wake-up request is armed
 *   VCHAN_SPLICE_EOF      from_fd: the descriptor reached end of file
 *   VCHAN_SPLICE_ERRNO    the system call failed; *err holds errno (EAGAIN
 *                         when the descriptor is not ready)
 *   VCHAN_E* (< 0)        a ring error, as for the other ring calls
 */
#ifndef VCHAN_SPLICE_H
#define VCHAN_SPLICE_H

#include <stddef.h>

#include "ring.h"

#define VCHAN_SPLICE_EOF        (-30)
#define VCHAN_SPLICE_ERRNO      (-31)

/* Send up to max ready bytes of the read ring to fd. */
int vchan_splice_to_fd(struct vchan_ring *r, int fd, size_t max, int *notify, int *err);
/* Receive up to max bytes from fd into the write ring's free space. */
int vchan_splice_from_fd(struct vchan_ring *r, int fd, size_t max, int *notify, int *err);

#endif /* VCHAN_SPLICE_H */
