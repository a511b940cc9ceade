/*
 * libFuzzer target for the safetensors reader: parses the input with
 * st_open_memory and, when it opens, converts every tensor to float32, so
 * header validation and every dtype conversion run on hostile bytes. Run with
 * the sanitizers that `make fuzz` adds; the seeds are in
 * tests/fuzz/corpus/safetensors.
 */
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    if (st_open_memory(&f, data, size, &err) != TOP_OK)
        return 0;

    for (size_t i = 0; i < st_tensor_count(f); i++) {
        tensor t;
        if (st_read_f32(f, st_tensor_at(f, i), &t, NULL) == TOP_OK)
            tensor_free(&t);
    }
    for (size_t i = 0; i < st_metadata_count(f); i++)
        (void)st_metadata_get(f, st_metadata_key(f, i));
    st_close(f);
    return 0;
}
