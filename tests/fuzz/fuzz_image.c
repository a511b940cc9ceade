/*
 * libFuzzer target: image_decode on arbitrary bytes (PNG, JPEG or neither).
 * Any input must give TOP_OK with a consistent image or an error status,
 * never a crash, a hang or a leak. Limits are small so that a header that
 * claims a huge image is rejected before any large allocation.
 */
#include <stdint.h>
#include <stdlib.h>

#include "image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    image_limits lim = {.max_width = 2048, .max_height = 2048, .max_pixels = (size_t)1 << 20};
    image_u8 img;
    top_error err;
    top_error_clear(&err);
    if (image_decode(&img, data, size, "fuzz input", &lim, &err) == TOP_OK) {
        if (img.width <= 0 || img.height <= 0 || img.width > lim.max_width ||
            img.height > lim.max_height || (img.channels != 1 && img.channels != 3) ||
            !img.pixels)
            abort();
        /* Touch the last byte so ASan checks the buffer size. */
        volatile unsigned char last =
            img.pixels[(size_t)img.width * (size_t)img.height * (size_t)img.channels - 1];
        (void)last;
        image_free(&img);
    } else if (err.message[0] == '\0' || img.pixels) {
        abort();
    }
    return 0;
}
