/*
 * tests/fuzz/harness.h -- what the libFuzzer harnesses share: reporting a
 * violated invariant (with the operation it happened in), tracing, and
 * reading the fuzzer's input.  Define FUZZ_NAME ("ring_fuzz") first.
 */
#ifndef VCHAN_FUZZ_HARNESS_H
#define VCHAN_FUZZ_HARNESS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* ------------------------------------------------------------------ */
/* Reporting.                                                          */
/* ------------------------------------------------------------------ */

static int trace;
static unsigned op_index;
static const char *op_name = "setup";

static void report(int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 2, 3)));

static void report(int line, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, FUZZ_NAME ": invariant violated (" FUZZ_NAME ".c:%d) at op #%u %s: ",
            line, op_index, op_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond))                                                         \
            report(__LINE__, "%s", #cond);                                   \
    } while (0)

#define CHECK_EQ(expected, actual)                                           \
    do {                                                                     \
        long long e_ = (long long)(expected), a_ = (long long)(actual);      \
        if (e_ != a_)                                                        \
            report(__LINE__, "%s: expected %lld, got %lld", #actual, e_, a_);\
    } while (0)

#define TRACE(...)                                                           \
    do {                                                                     \
        if (trace)                                                           \
            fprintf(stderr, __VA_ARGS__);                                    \
    } while (0)

/* ------------------------------------------------------------------ */
/* Input.                                                              */
/* ------------------------------------------------------------------ */

struct input {
    const uint8_t *p;
    size_t n;
};

static uint8_t u8(struct input *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static uint16_t u16(struct input *in)
{
    uint16_t v = u8(in);
    return (uint16_t)(v | (uint16_t)u8(in) << 8);
}

static uint32_t u32(struct input *in)
{
    uint32_t v = u16(in);
    return v | (uint32_t)u16(in) << 16;
}

#endif /* VCHAN_FUZZ_HARNESS_H */
