/* binary16 and bfloat16 conversions by bit manipulation; see half.h. */
#include "half.h"

#include <string.h>

static float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t float_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f;
    uint32_t mantissa = h & 0x3ff;

    if (exponent == 0x1f) /* infinity or NaN */
        return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        if (mantissa == 0)
            return bits_to_float(sign);
        /* Subnormal: value = mantissa * 2^-24, exact in float32. */
        float v = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t float_to_half(float f)
{
    uint32_t u = float_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t abs = u & 0x7fffffffu;

    if (abs >= 0x7f800000u) /* infinity or NaN */
        return (uint16_t)(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0));
    if (abs >= 0x477ff000u) /* rounds to a value beyond the largest half */
        return (uint16_t)(sign | 0x7c00);
    if (abs < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        float v = bits_to_float(abs) * 16777216.0f; /* in units of 2^-24 */
        uint32_t m = (uint32_t)v;
        float rest = v - (float)m;
        if (rest > 0.5f || (rest == 0.5f && (m & 1)))
            m++;
        return (uint16_t)(sign | m);
    }
    /* Normal: rebias the exponent, round the 13 dropped bits to nearest even. */
    uint32_t half = ((abs >> 13) - (112u << 10));
    uint32_t dropped = abs & 0x1fffu;
    if (dropped > 0x1000u || (dropped == 0x1000u && (half & 1)))
        half++;
    return (uint16_t)(sign | half);
}

float bfloat16_to_float(uint16_t b)
{
    return bits_to_float((uint32_t)b << 16);
}

uint16_t float_to_bfloat16(float f)
{
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)((u + rounding) >> 16);
}
