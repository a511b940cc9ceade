/* Tensor shapes, overflow checks and half-precision conversions. */
#include <stdint.h>
#include <string.h>

#include "half.h"
#include "tensor.h"
#include "test.h"

static void test_tensor_init_zeroed_aligned(void)
{
    tensor t;
    top_error err;
    top_error_clear(&err);
    int64_t shape[3] = {2, 3, 5};
    CHECK_INT_EQ(tensor_init(&t, 3, shape, &err), TOP_OK);
    CHECK_INT_EQ(t.numel, 30);
    CHECK_INT_EQ((uintptr_t)t.data % TENSOR_ALIGN, 0);
    for (size_t i = 0; i < t.numel; i++)
        CHECK_CLOSE_AT(t.data[i], 0.0, 0.0, i);
    tensor_free(&t);
    CHECK(t.data == NULL);
}

static void test_tensor_rejects_overflow(void)
{
    tensor t;
    top_error err;
    top_error_clear(&err);
    int64_t shape[2] = {INT64_C(1) << 40, INT64_C(1) << 40};
    CHECK_INT_EQ(tensor_init(&t, 2, shape, &err), TOP_ERR_OVERFLOW);
    CHECK(t.data == NULL);
    CHECK(strstr(err.message, "(1099511627776, 1099511627776)") != NULL);
}

static void test_tensor_rejects_negative_dim(void)
{
    tensor t;
    top_error err;
    top_error_clear(&err);
    int64_t shape[2] = {4, -1};
    CHECK_INT_EQ(tensor_init(&t, 2, shape, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "negative") != NULL);
}

static void test_first_error_wins(void)
{
    top_error err;
    top_error_clear(&err);
    top_error_set(&err, TOP_ERR_IO, "first %d", 1);
    top_error_set(&err, TOP_ERR_FORMAT, "second");
    CHECK_INT_EQ(err.status, TOP_ERR_IO);
    CHECK(strcmp(err.message, "first 1") == 0);
}

static void test_half_round_trip(void)
{
    /* Every finite half survives half -> float -> half exactly. */
    int mismatches = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00)
            continue;
        if (float_to_half(half_to_float((uint16_t)h)) != h)
            mismatches++;
    }
    CHECK_INT_EQ(mismatches, 0);
    CHECK_CLOSE(half_to_float(0x3c00), 1.0, 0.0);
    CHECK_CLOSE(half_to_float(0xc000), -2.0, 0.0);
    CHECK_CLOSE(half_to_float(0x0001), 5.9604644775390625e-8, 0.0);
    CHECK_CLOSE(half_to_float(0x7bff), 65504.0, 0.0);
    CHECK_INT_EQ(float_to_half(65520.0f), 0x7c00);   /* rounds up to infinity */
    CHECK_INT_EQ(float_to_half(1.0f + 1.0f / 4096), 0x3c00); /* ties to even */
}

static void test_bfloat16_conversion(void)
{
    CHECK_CLOSE(bfloat16_to_float(0x3f80), 1.0, 0.0);
    CHECK_INT_EQ(float_to_bfloat16(1.0f), 0x3f80);
    CHECK_INT_EQ(float_to_bfloat16(-3.5f), 0xc060);
}

int main(void)
{
    TEST_RUN(test_tensor_init_zeroed_aligned);
    TEST_RUN(test_tensor_rejects_overflow);
    TEST_RUN(test_tensor_rejects_negative_dim);
    TEST_RUN(test_first_error_wins);
    TEST_RUN(test_half_round_trip);
    TEST_RUN(test_bfloat16_conversion);
    return TEST_FINISH();
}
