/*
 * Import of Keras functional models saved as TF.js layers models: a
 * model.json with {modelTopology, weightsManifest} plus binary weight shards.
 *
 * The importer builds a finalized graph (graph.h) in the engine's NCHW layout.
 * Conv kernels HWIO (R, S, C, K) become (K, C, R, S), depthwise kernels
 * (R, S, C, M) become (C*M, 1, R, S), and dense kernels (IN, OUT) become
 * (OUT, IN). Each parameter keeps its manifest name ("block_1_expand/kernel"),
 * its source layout and its source shape, so a checkpoint writer can restore
 * the original tensors. Input preprocessing is recorded in g->preprocess as
 * the nsfwjs models expect it: RGB scaled to [0, 1], bilinear resize with
 * align_corners = 1.
 *
 * Every layer type, config value, inbound-node structure and weight is either
 * understood or rejected with an error that names the layer and the value;
 * nothing is skipped. Inputs are bounded by the KERAS_MAX_* limits below.
 * Thread-safe: no shared state.
 */
#ifndef TOPIARY_IMPORT_KERAS_H
#define TOPIARY_IMPORT_KERAS_H

#include <stddef.h>

#include "graph.h"
#include "status.h"

#define KERAS_MAX_JSON_BYTES ((size_t)64 << 20)  /* model.json */
#define KERAS_MAX_WEIGHT_BYTES ((size_t)4 << 30) /* all shards together */
#define KERAS_MAX_LAYERS 4096
#define KERAS_MAX_WEIGHTS 16384                /* manifest entries */
#define KERAS_MAX_SHARDS 4096                  /* manifest paths */
#define KERAS_MAX_SIDE 8192                    /* input height and width */
#define KERAS_MAX_CHANNELS 65536               /* filters, units, channels */
#define KERAS_MAX_KERNEL 1024                  /* kernel, pool, stride, dilation */
#define KERAS_MAX_PADDING 4096                 /* zero padding per side */
#define KERAS_MAX_ACTIVATION ((size_t)1 << 30) /* floats per sample per layer */

/*
 * Reads model_json_path and the weight shards its manifest lists (paths
 * relative to the model.json folder, concatenated in manifest order) and
 * builds *out. On failure *out is NULL and err names the file, layer or weight
 * and the value at fault. The caller frees *out with graph_free.
 */
top_status keras_import(graph **out, const char *model_json_path, top_error *err);

/*
 * The same from memory. json is the model.json document (json_len bytes, not
 * necessarily terminated), and weights contains all shards concatenated in
 * manifest order (weights_len bytes). The manifest's paths are not opened.
 */
top_status keras_import_buffers(graph **out, const char *json, size_t json_len,
                                const unsigned char *weights, size_t weights_len,
                                top_error *err);

/*
 * Returns 1 if parameter i is a constant the importer added because the
 * source has no such tensor: the gamma (ones) of a BatchNormalization with
 * scale = false or the beta (zeros) of one with center = false. Such a
 * parameter has the role PARAM_ROLE_STATISTIC, so the graph neither trains
 * nor counts it, and a checkpoint writer should not write it back.
 */
int keras_param_is_constant(const graph *g, int i);

#endif
