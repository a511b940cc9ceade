/*
 * A minimal test harness: each test file defines `static void test_x(void)`
 * functions and calls TEST_RUN(test_x) for each from main, then returns
 * TEST_FINISH(). Checks record a failure with both values and go on; the
 * file ends with "N passed, M failed" and exits non-zero if any test failed.
 * TEST_ONLY=test_x in the environment runs that one test alone.
 */
#ifndef TOPIARY_TEST_H
#define TOPIARY_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_passed, test_failed, test_current_failures;
static const char *test_current_name;

#define TEST_FAIL_AT(...)                                                          \
    do {                                                                           \
        test_current_failures++;                                                   \
        fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__);                          \
        fprintf(stderr, __VA_ARGS__);                                              \
        fputc('\n', stderr);                                                       \
    } while (0)

#define CHECK(cond)                                                                \
    do {                                                                           \
        if (!(cond))                                                               \
            TEST_FAIL_AT("check failed: %s", #cond);                               \
    } while (0)

#define CHECK_MSG(cond, ...)                                                       \
    do {                                                                           \
        if (!(cond))                                                               \
            TEST_FAIL_AT(__VA_ARGS__);                                             \
    } while (0)

#define CHECK_INT_EQ(actual, expected)                                             \
    do {                                                                           \
        long long a_ = (long long)(actual), e_ = (long long)(expected);            \
        if (a_ != e_)                                                              \
            TEST_FAIL_AT("%s = %lld, expected %lld", #actual, a_, e_);             \
    } while (0)

/* |actual - expected| <= tol, with the index i in the message. */
#define CHECK_CLOSE_AT(actual, expected, tol, i)                                   \
    do {                                                                           \
        double a_ = (double)(actual), e_ = (double)(expected);                     \
        if (!(fabs(a_ - e_) <= (tol)))                                             \
            TEST_FAIL_AT("%s[%ld] = %.9g, expected %.9g (tolerance %.3g)",        \
                         #actual, (long)(i), a_, e_, (double)(tol));               \
    } while (0)

#define CHECK_CLOSE(actual, expected, tol) CHECK_CLOSE_AT(actual, expected, tol, 0)

#define TEST_RUN(fn)                                                               \
    do {                                                                           \
        const char *test_only_ = getenv("TEST_ONLY");                              \
        if (test_only_ && *test_only_ && strcmp(test_only_, #fn) != 0)             \
            break;                                                                 \
        test_current_name = #fn;                                                   \
        test_current_failures = 0;                                                 \
        fn();                                                                      \
        if (test_current_failures) {                                               \
            test_failed++;                                                         \
            printf("FAIL %s\n", test_current_name);                                \
        } else {                                                                   \
            test_passed++;                                                         \
            printf("ok   %s\n", test_current_name);                                \
        }                                                                          \
        fflush(stdout);                                                            \
    } while (0)

#define TEST_FINISH()                                                              \
    (printf("%d passed, %d failed\n", test_passed, test_failed), test_failed ? 1 : 0)

#endif
