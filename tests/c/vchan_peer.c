/*
 * tests/c/vchan_peer.c -- a libxenvchan program for the compatibility tests.
 *
 * Linked against Debian's libxenvchan and run unmodified on the emulator
 * (`vchan sim run`, kernel/compat) against a vchan peer in Python
 * (tests/test_compat.py, tests/compat_peer.py):
 *
 *   vchan_peer server PEER PATH READ_MIN WRITE_MIN SEND EXPECT CLOSER
 *   vchan_peer client SERVER PATH SEND EXPECT CLOSER
 *
 * 1. Set up the ring as a server (libxenvchan_server_init with READ_MIN /
 *    WRITE_MIN) or a client (libxenvchan_client_init, retried until the
 *    server has published).  A server reports libxenvchan_is_open() == 2,
 *    then waits (libxenvchan_wait) until it is 1: the client connected.
 * 2. Blocking, write the contents of file SEND in chunks of varying sizes,
 *    libxenvchan_write and libxenvchan_send in turn.  Rings are smaller
 *    than the data: this only ends if the peer's reads wake us up.
 * 3. Blocking, read as many bytes as file EXPECT holds, libxenvchan_read and
 *    libxenvchan_recv in turn, and compare.  This only ends if the peer's
 *    writes wake us up.
 * 4. Write "DONE".  CLOSER "self": close.  CLOSER "peer": wait until
 *    libxenvchan_is_open() is 0, check that a blocking read and a write
 *    then fail, and close.
 *
 * Progress goes to stdout as JSON lines; a failure is a message on stderr
 * and exit status 1; a stall (a lost wake-up) ends the program after
 * VCHAN_PEER_TIMEOUT seconds (default 60) with status 3.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libxenvchan.h>

static const char *phase = "start";

static void fail(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "vchan_peer: %s: ", phase);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static void on_alarm(int sig)
{
    static const char msg[] = "vchan_peer: stalled (a lost wake-up?)\n";

    (void)sig;
    (void)!write(2, msg, sizeof(msg) - 1);
    _exit(3);
}

static void report(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;

    if (!f)
        fail("cannot open %s: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) < 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) < 0)
        fail("cannot size %s", path);
    buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n)
        fail("cannot read %s", path);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Chunk sizes: 1 .. 3x the ring, from a fixed LCG (reproducible runs). */
static size_t next_chunk(unsigned *state, size_t ring)
{
    *state = *state * 1103515245u + 12345u;
    switch ((*state >> 16) % 4) {
    case 0: return 1 + (*state >> 8) % 64;
    case 1: return 1 + (*state >> 4) % ring;
    case 2: return ring;
    default: return 1 + (*state >> 2) % (3 * ring);
    }
}

static void send_all(struct libxenvchan *ctrl, const unsigned char *data, size_t len)
{
    size_t ring = (size_t)1 << ctrl->write.order, pos = 0;
    unsigned state = 1, turn = 0;

    phase = "write";
    while (pos < len) {
        size_t n = next_chunk(&state, ring);
        int rc;

        int whole;

        if (n > len - pos)
            n = len - pos;
        whole = turn++ % 2 && n <= ring;
        if (whole)      /* all or nothing; blocking: waits for room */
            rc = libxenvchan_send(ctrl, data + pos, n);
        else            /* blocking: loops until all n are in */
            rc = libxenvchan_write(ctrl, data + pos, n);
        if (rc != (int)n)
            fail("%s of %zu bytes at offset %zu returned %d", whole ? "send" : "write", n,
                 pos, rc);
        pos += n;
    }
}

static void receive_all(struct libxenvchan *ctrl, const unsigned char *expect, size_t len)
{
    size_t ring = (size_t)1 << ctrl->read.order, pos = 0;
    unsigned char *buf = malloc(len + 1);
    unsigned state = 2, turn = 0;

    phase = "read";
    if (!buf)
        fail("out of memory");
    while (pos < len) {
        size_t n = next_chunk(&state, ring);
        int rc;

        if (n > len - pos)
            n = len - pos;
        if (turn++ % 2 && n <= ring) {
            rc = libxenvchan_recv(ctrl, buf + pos, n);      /* exactly n */
            if (rc != (int)n)
                fail("recv of %zu bytes at offset %zu returned %d", n, pos, rc);
        } else {
            rc = libxenvchan_read(ctrl, buf + pos, n);      /* 1 .. n */
            if (rc <= 0 || (size_t)rc > n)
                fail("read of up to %zu bytes at offset %zu returned %d", n, pos, rc);
        }
        pos += (size_t)rc;
    }
    for (size_t i = 0; i < len; i++)
        if (buf[i] != expect[i])
            fail("byte %zu of %zu is 0x%02x, expected 0x%02x", i, len, buf[i], expect[i]);
    free(buf);
}

int main(int argc, char **argv)
{
    struct libxenvchan *ctrl = NULL;
    unsigned char *out, *in;
    size_t out_len, in_len;
    const char *closer, *timeout = getenv("VCHAN_PEER_TIMEOUT");
    int server, domid, live;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 9 && strcmp(argv[1], "server") == 0)
        server = 1;
    else if (argc == 7 && strcmp(argv[1], "client") == 0)
        server = 0;
    else {
        fprintf(stderr, "usage: %s server PEER PATH READ_MIN WRITE_MIN SEND EXPECT CLOSER\n"
                        "       %s client SERVER PATH SEND EXPECT CLOSER\n", argv[0], argv[0]);
        return 2;
    }
    domid = atoi(argv[2]);
    out = slurp(argv[server ? 6 : 4], &out_len);
    in = slurp(argv[server ? 7 : 5], &in_len);
    closer = argv[server ? 8 : 6];
    signal(SIGALRM, on_alarm);
    alarm(timeout ? (unsigned)atoi(timeout) : 60);

    phase = "init";
    if (server) {
        ctrl = libxenvchan_server_init(NULL, domid, argv[3], strtoul(argv[4], NULL, 0),
                                       strtoul(argv[5], NULL, 0));
        if (!ctrl)
            fail("libxenvchan_server_init: %s", strerror(errno));
    } else {
        /* The server may not have published yet: try again for a while. */
        for (int i = 0; !ctrl && i < 1000; i++) {
            ctrl = libxenvchan_client_init(NULL, domid, argv[3]);
            if (!ctrl)
                usleep(10000);
        }
        if (!ctrl)
            fail("libxenvchan_client_init: no server at %s", argv[3]);
    }
    ctrl->blocking = 1;
    live = libxenvchan_is_open(ctrl);
    report("{\"event\": \"init\", \"is_open\": %d, \"read_order\": %d, \"write_order\": %d}",
           live, ctrl->read.order, ctrl->write.order);
    if (server) {
        phase = "accept";
        if (live != 2)
            fail("a fresh server's is_open is %d, not 2", live);
        while ((live = libxenvchan_is_open(ctrl)) == 2)
            if (libxenvchan_wait(ctrl) < 0)
                fail("libxenvchan_wait: %s", strerror(errno));
        if (live != 1)
            fail("is_open went from 2 to %d, not 1", live);
        report("{\"event\": \"connected\", \"is_open\": %d}", live);
    } else if (live != 1) {
        fail("a connected client's is_open is %d, not 1", live);
    }

    send_all(ctrl, out, out_len);
    report("{\"event\": \"sent\", \"bytes\": %zu}", out_len);
    receive_all(ctrl, in, in_len);
    report("{\"event\": \"received\", \"bytes\": %zu}", in_len);
    phase = "ack";
    if (libxenvchan_write(ctrl, "DONE", 4) != 4)
        fail("writing the acknowledgement");

    if (strcmp(closer, "peer") == 0) {
        char c;
        phase = "wait for the peer to close";
        while ((live = libxenvchan_is_open(ctrl)) != 0)
            if (libxenvchan_wait(ctrl) < 0)
                fail("libxenvchan_wait: %s", strerror(errno));
        if (libxenvchan_data_ready(ctrl) != 0)
            fail("%d unread bytes after the peer closed", libxenvchan_data_ready(ctrl));
        if (libxenvchan_read(ctrl, &c, 1) != -1)
            fail("a blocking read after the peer closed did not fail");
        if (libxenvchan_write(ctrl, "x", 1) != -1)
            fail("a write after the peer closed did not fail");
        report("{\"event\": \"peer closed\", \"is_open\": %d}", live);
    }
    libxenvchan_close(ctrl);
    report("{\"event\": \"closed\"}");
    free(out);
    free(in);
    return 0;
}
