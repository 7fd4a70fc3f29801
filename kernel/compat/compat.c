/*
 * kernel/compat/compat.c -- helpers every drop-in library links in.
 */
#define _GNU_SOURCE
#include "compat.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int compat_domid(void)
{
    const char *raw = getenv("VCHAN_DOMID");
    char *end;
    long v;

    if (!raw || !*raw)
        return 0;
    errno = 0;
    v = strtol(raw, &end, 10);
    /* The same rule as vchan.addresses: a domain id below DOMID_FIRST_RESERVED. */
    if (errno || *end || v < 0 || v >= VK_DOMID_FIRST_RESERVED) {
        errno = EINVAL;
        return -1;
    }
    return (int)v;
}

int compat_tracing(void)
{
    static int tracing = -1;

    if (tracing < 0) {
        const char *v = getenv("VCHAN_COMPAT_TRACE");
        tracing = v && *v && *v != '0';
    }
    return tracing;
}

void compat_trace(const char *fmt, ...)
{
    int saved = errno;
    char line[512];
    va_list ap;
    int n;

    n = snprintf(line, sizeof(line), "vchan-compat[%d]: ", (int)getpid());
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof(line))
        vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", line);
    errno = saved;
}

void compat_note(const char *fmt, ...)
{
    int saved = errno;
    char line[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "vchan sim: %s\n", line);
    errno = saved;
}
