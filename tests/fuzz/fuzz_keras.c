/*
 * libFuzzer target of the Keras importer: the input is a model.json document
 * followed by two bytes (little-endian) that choose how many bytes of a fixed
 * weights buffer are passed, so the fuzzer can match a manifest's byte count.
 * Any input must give TOP_OK (a graph, freed here) or an error with a
 * message; crashes, leaks and undefined behaviour are the findings.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "import_keras.h"

#define FUZZ_WEIGHT_BYTES 4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static unsigned char weights[FUZZ_WEIGHT_BYTES];
    static int ready;
    if (!ready) {
        /* Small quantized values and finite float32/float16 patterns. */
        for (size_t i = 0; i < sizeof weights; i++)
            weights[i] = (unsigned char)((i * 37u + 11u) % 61u);
        ready = 1;
    }
    if (size < 2)
        return 0;
    size_t weights_len = ((size_t)data[size - 2] | (size_t)data[size - 1] << 8) %
                         (FUZZ_WEIGHT_BYTES + 1);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = keras_import_buffers(&g, (const char *)data, size - 2, weights, weights_len,
                                         &err);
    if (st == TOP_OK) {
        graph_free(g);
    } else if (g != NULL || err.message[0] == '\0') {
        abort();  /* a failure must leave no graph and must set a message */
    }
    return 0;
}
