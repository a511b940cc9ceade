/* IEEE 754 binary16 and bfloat16 to and from float32, exact in the widening
 * direction; narrowing rounds to nearest even and keeps NaN a NaN. */
#ifndef TOPIARY_HALF_H
#define TOPIARY_HALF_H

#include <stdint.h>

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bfloat16_to_float(uint16_t b);
uint16_t float_to_bfloat16(float f);

#endif
