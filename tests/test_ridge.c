/*
 * Ridge classifier head: a problem solved by hand, the numpy fixture made by
 * tests/golden/make_ridge_golden.py (run from the repository root), the
 * effect of balanced weights, and input validation.
 */
#include <jansson.h>
#include <stdint.h>
#include <string.h>

#include "ridge.h"
#include "test.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double rng_uniform(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static double rng_normal(void)
{
    double u = rng_uniform(), v = rng_uniform();
    if (u < 1e-300)
        u = 1e-300;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/*
 * x = {1, 3}, labels {0, 1}, alpha 2: the centered features are -1, +1,
 * targets of class 0 are +1, -1, so B0 = (x^T y) / (x^T x + alpha) = -2 / 4,
 * B1 = +0.5, and intercept_k = y_mean - B_k * 2 = +1 and -1.
 */
static void test_ridge_by_hand(void)
{
    float x[2] = {1.0f, 3.0f};
    int32_t y[2] = {0, 1}, pred[3];
    ridge_model m;
    ridge_options o = {2.0, 0};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(ridge_fit(&m, x, y, 2, 1, 2, &o, &err), TOP_OK);
    CHECK_CLOSE_AT(m.coef[0], -0.5, 1e-15, 0);
    CHECK_CLOSE_AT(m.coef[1], 0.5, 1e-15, 1);
    CHECK_CLOSE_AT(m.intercept[0], 1.0, 1e-15, 0);
    CHECK_CLOSE_AT(m.intercept[1], -1.0, 1e-15, 1);

    float xt[3] = {0.0f, 2.5f, 10.0f};
    CHECK_INT_EQ(ridge_predict(pred, &m, xt, 3, &err), TOP_OK);
    CHECK_INT_EQ(pred[0], 0);
    CHECK_INT_EQ(pred[1], 1);
    CHECK_INT_EQ(pred[2], 1);
    double acc;
    CHECK_INT_EQ(ridge_accuracy(&acc, &m, x, y, 2, &err), TOP_OK);
    CHECK_CLOSE(acc, 1.0, 0.0);
    ridge_model_free(&m);
}

/* Reads a JSON array of numbers into floats or int32s. */
static size_t read_numbers(json_t *arr, float *f, int32_t *i, size_t max)
{
    size_t n = json_array_size(arr);
    for (size_t k = 0; k < n && k < max; k++) {
        if (f)
            f[k] = (float)json_number_value(json_array_get(arr, k));
        if (i)
            i[k] = (int32_t)json_integer_value(json_array_get(arr, k));
    }
    return n;
}

static void test_ridge_matches_numpy_fixture(void)
{
    enum { MAX_N = 64, MAX_D = 8 };
    json_error_t jerr;
    json_t *doc = json_load_file("tests/golden/ridge_small.json", 0, &jerr);
    CHECK_MSG(doc != NULL, "cannot load tests/golden/ridge_small.json: %s (run from the repo root)",
              jerr.text);
    if (!doc)
        return;

    float x[MAX_N * MAX_D], xt[MAX_N * MAX_D];
    int32_t y[MAX_N], pred[MAX_N];
    json_t *jx = json_object_get(doc, "x"), *jt = json_object_get(doc, "x_test");
    size_t n = json_array_size(jx), nt = json_array_size(jt);
    size_t d = json_array_size(json_array_get(jx, 0));
    size_t c = (size_t)json_integer_value(json_object_get(doc, "n_classes"));
    CHECK(n > 0 && n <= MAX_N);
    CHECK(nt <= MAX_N);
    CHECK(d > 0 && d <= MAX_D);
    CHECK(c >= 2);
    if (!(n > 0 && n <= MAX_N && nt <= MAX_N && d > 0 && d <= MAX_D)) {
        json_decref(doc);
        return;
    }
    for (size_t i = 0; i < n; i++)
        read_numbers(json_array_get(jx, i), x + i * d, NULL, d);
    for (size_t i = 0; i < nt; i++)
        read_numbers(json_array_get(jt, i), xt + i * d, NULL, d);
    CHECK_INT_EQ(read_numbers(json_object_get(doc, "y"), NULL, y, MAX_N), n);

    json_t *cases = json_object_get(doc, "cases");
    CHECK(json_array_size(cases) >= 4);
    for (size_t ci = 0; ci < json_array_size(cases); ci++) {
        json_t *cs = json_array_get(cases, ci);
        ridge_options o = {json_number_value(json_object_get(cs, "alpha")),
                           json_is_true(json_object_get(cs, "balanced"))};
        ridge_model m;
        top_error err;
        top_error_clear(&err);
        CHECK_INT_EQ(ridge_fit(&m, x, y, n, d, c, &o, &err), TOP_OK);
        if (err.status != TOP_OK)
            continue;

        /* Both sides solve in double: 1e-9 relative. */
        json_t *coef = json_object_get(cs, "coef"), *icp = json_object_get(cs, "intercept");
        for (size_t k = 0; k < c; k++) {
            for (size_t j = 0; j < d; j++) {
                double want = json_number_value(json_array_get(json_array_get(coef, k), j));
                CHECK_CLOSE_AT(m.coef[k * d + j], want, 1e-9 * (1 + fabs(want)), k * d + j);
            }
            double want = json_number_value(json_array_get(icp, k));
            CHECK_CLOSE_AT(m.intercept[k], want, 1e-9 * (1 + fabs(want)), k);
        }

        int32_t want_pred[MAX_N];
        read_numbers(json_object_get(cs, "predictions"), NULL, want_pred, MAX_N);
        CHECK_INT_EQ(ridge_predict(pred, &m, x, n, &err), TOP_OK);
        for (size_t i = 0; i < n; i++)
            CHECK_MSG(pred[i] == want_pred[i], "case %zu train sample %zu: %d, numpy %d", ci, i,
                      pred[i], want_pred[i]);
        read_numbers(json_object_get(cs, "predictions_test"), NULL, want_pred, MAX_N);
        CHECK_INT_EQ(ridge_predict(pred, &m, xt, nt, &err), TOP_OK);
        for (size_t i = 0; i < nt; i++)
            CHECK_MSG(pred[i] == want_pred[i], "case %zu test sample %zu: %d, numpy %d", ci, i,
                      pred[i], want_pred[i]);
        ridge_model_free(&m);
    }
    json_decref(doc);
}

/*
 * Two overlapping Gaussian classes, 9:1. Balanced weights raise the
 * minority class's weight, so more samples are predicted as class 1 and its
 * recall rises.
 */
static void test_ridge_balanced_favours_minority(void)
{
    enum { N = 1000, D = 4 };
    static float x[N * D];
    static int32_t y[N], p_plain[N], p_bal[N];
    for (size_t i = 0; i < N; i++) {
        y[i] = i % 10 == 0;
        for (size_t j = 0; j < D; j++)
            x[i * D + j] = (float)(rng_normal() + (y[i] ? 0.8 : 0.0));
    }
    ridge_model plain, bal;
    ridge_options o = {1.0, 0};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(ridge_fit(&plain, x, y, N, D, 2, &o, &err), TOP_OK);
    o.balanced = 1;
    CHECK_INT_EQ(ridge_fit(&bal, x, y, N, D, 2, &o, &err), TOP_OK);
    CHECK_INT_EQ(ridge_predict(p_plain, &plain, x, N, &err), TOP_OK);
    CHECK_INT_EQ(ridge_predict(p_bal, &bal, x, N, &err), TOP_OK);

    size_t pred1_plain = 0, pred1_bal = 0, hit_plain = 0, hit_bal = 0;
    for (size_t i = 0; i < N; i++) {
        pred1_plain += p_plain[i] == 1;
        pred1_bal += p_bal[i] == 1;
        hit_plain += y[i] == 1 && p_plain[i] == 1;
        hit_bal += y[i] == 1 && p_bal[i] == 1;
    }
    printf("  class 1 predicted: plain %zu, balanced %zu; recall %zu vs %zu of 100\n",
           pred1_plain, pred1_bal, hit_plain, hit_bal);
    CHECK_MSG(pred1_bal > pred1_plain, "balanced predicts class 1 %zu times, plain %zu",
              pred1_bal, pred1_plain);
    CHECK_MSG(hit_bal > hit_plain, "minority recall balanced %zu, plain %zu", hit_bal,
              hit_plain);

    /* Two classes: the second column is the negation of the first. */
    for (size_t j = 0; j < D; j++)
        CHECK_CLOSE_AT(plain.coef[D + j], -plain.coef[j], 1e-12, j);
    CHECK_CLOSE(plain.intercept[1], -plain.intercept[0], 1e-12);
    ridge_model_free(&plain);
    ridge_model_free(&bal);
}

static void test_ridge_rejects_bad_input(void)
{
    float x[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    int32_t y[4] = {0, 1, 0, 3};
    ridge_model m;
    ridge_options o = {1.0, 0};
    top_error err;

    top_error_clear(&err);
    CHECK_INT_EQ(ridge_fit(&m, x, y, 4, 1, 3, &o, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "label 3 of sample 3"), "message: %s", err.message);

    y[3] = 0;
    o.balanced = 1;
    top_error_clear(&err);
    CHECK_INT_EQ(ridge_fit(&m, x, y, 4, 1, 3, &o, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "class 2 has no training samples"), "message: %s",
              err.message);
    CHECK(m.coef == NULL);

    o = (ridge_options){0.0, 0};
    top_error_clear(&err);
    CHECK_INT_EQ(ridge_fit(&m, x, y, 4, 1, 2, &o, &err), TOP_ERR_INVALID);

    x[2] = NAN;
    o.alpha = 1.0;
    top_error_clear(&err);
    CHECK_INT_EQ(ridge_fit(&m, x, y, 4, 1, 2, &o, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "sample 2"), "message: %s", err.message);
}

int main(void)
{
    TEST_RUN(test_ridge_by_hand);
    TEST_RUN(test_ridge_matches_numpy_fixture);
    TEST_RUN(test_ridge_balanced_favours_minority);
    TEST_RUN(test_ridge_rejects_bad_input);
    return TEST_FINISH();
}
