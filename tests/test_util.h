/* tests/test_util.h: the tiny assertion kit every test uses. A failed CHECK prints file:line
 * and the expression and counts a failure; test_finish() prints "N passed, N failed" and
 * returns non-zero if anything failed, so a test's main ends with `return test_finish();`. */
#ifndef QLR_TEST_UTIL_H
#define QLR_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

extern int test_n_pass, test_n_fail;

void test_fail_(const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int test_finish(void);

#define CHECK(cond)                                                           \
    do {                                                                      \
        if (cond) test_n_pass++;                                              \
        else test_fail_(__FILE__, __LINE__, "CHECK(%s)", #cond);              \
    } while (0)

#define CHECK_MSG(cond, ...)                                                  \
    do {                                                                      \
        if (cond) test_n_pass++;                                              \
        else test_fail_(__FILE__, __LINE__, __VA_ARGS__);                     \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                    \
    do {                                                                      \
        long long a_ = (long long)(a), b_ = (long long)(b);                   \
        if (a_ == b_) test_n_pass++;                                          \
        else test_fail_(__FILE__, __LINE__, "%s == %s: %lld != %lld", #a, #b, a_, b_); \
    } while (0)

/* |a-b| <= atol + rtol*|b| */
#define CHECK_NEAR(a, b, atol, rtol)                                          \
    do {                                                                      \
        double a_ = (double)(a), b_ = (double)(b);                            \
        if (fabs(a_ - b_) <= (atol) + (rtol) * fabs(b_)) test_n_pass++;       \
        else test_fail_(__FILE__, __LINE__, "%s ~ %s: %.9g vs %.9g", #a, #b, a_, b_); \
    } while (0)

/* Status must be QLR_OK; otherwise prints the error message. */
#define CHECK_OK(expr)                                                        \
    do {                                                                      \
        qlr_status st_ = (expr);                                              \
        if (st_ == QLR_OK) test_n_pass++;                                     \
        else test_fail_(__FILE__, __LINE__, "%s failed: %s (%s)", #expr,      \
                        qlr_error_msg(), qlr_error_where());                  \
    } while (0)

/* Deterministic PRNG for tests (splitmix64). */
uint64_t test_rng_u64(uint64_t *state);
float test_rng_uniform(uint64_t *state);   /* [0, 1) */
float test_rng_normal(uint64_t *state);    /* N(0, 1) */

/* A scratch directory unique to this test run (created on first call). */
const char *test_tmpdir(void);

/* The demo model: $QLR_DEMO_MODEL when set, else where scripts/setup.sh puts it. */
const char *test_demo_model(void);
/* test_demo_model() when the file exists; else a failed check that names it and how to get
 * it, and NULL. */
const char *test_demo_model_or_fail(void);

#endif
