/*
 * libFuzzer target for the compressed checkpoint reader: any byte string is
 * opened as an in-memory safetensors file and, if that succeeds, decoded by
 * ckpt_read. Either call may reject the input; neither may crash, leak or
 * read out of bounds. Seeds: any file written by ckpt_write.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "checkpoint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    if (st_open_memory(&f, data, size, &err) != TOP_OK)
        return 0;
    ckpt_dense d;
    if (ckpt_read(&d, f, &err) == TOP_OK) {
        /* Touch every decoded byte so a bad length shows up under ASan. */
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < d.count; i++)
            for (size_t k = 0; k < d.tensors[i].bytes; k++)
                sink ^= ((const uint8_t *)d.tensors[i].data)[k];
        (void)sink;
        ckpt_dense_free(&d);
    }
    st_close(f);
    return 0;
}
