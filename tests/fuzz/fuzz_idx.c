/*
 * libFuzzer target: the IDX reader from memory (plain or gzip).
 *
 * Input layout: byte 0 and 1 give, little-endian, the length L of the labels
 * part, capped by the input size. The labels are the next L bytes and the
 * images are the rest. Every input must open with consistent counts and
 * readable images, or fail with a message. The memory budget is small, so a
 * header that claims a huge data set is rejected.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dataset.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t labels_size = (size_t)data[0] | (size_t)data[1] << 8;
    if (labels_size > size - 2)
        labels_size = size - 2;
    const uint8_t *labels = data + 2;
    const uint8_t *images = labels + labels_size;
    size_t images_size = size - 2 - labels_size;

    dataset_options opt = {.memory_budget = (size_t)1 << 22,
                           .limits = {.max_width = 256, .max_height = 256}};
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    if (dataset_open_idx_memory(&ds, images, images_size, labels, labels_size, "fuzz", &opt,
                                &err) != TOP_OK) {
        if (ds || err.message[0] == '\0')
            abort();
        return 0;
    }
    size_t n = dataset_count(ds);
    if (n == 0 || dataset_class_count(ds) <= 0 || dataset_class_count(ds) > 256)
        abort();
    for (size_t i = 0; i < n; i += n / 4 + 1) {
        image_u8 img;
        if (dataset_get(ds, i, &img, NULL) != TOP_OK)
            abort();
        int label = dataset_labels(ds)[i];
        if (label < 0 || label >= dataset_class_count(ds))
            abort();
        image_free(&img);
    }
    dataset_close(ds);
    return 0;
}
