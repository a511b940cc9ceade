/*
 * Export of a graph imported from a TF.js layers model back to a TF.js layers
 * model: OUT_DIR/model.json plus one weight shard OUT_DIR/group1-shard1of1.bin,
 * loadable by tf.loadLayersModel (checked with @tensorflow/tfjs 4.22).
 *
 * The new model.json is the source model.json with only its weightsManifest
 * replaced. Every other top-level field (modelTopology, format, generatedBy,
 * convertedBy and any others) is copied as parsed, in its order. The new
 * manifest has one group with one shard path, and lists the source weights
 * in the source order under their source names and shapes, all with dtype
 * float32 and no quantization, so pruned zeros stay exact zeros. The values
 * are the graph's parameters permuted back into the Keras layouts (see
 * tfjs_param_to_source).
 *
 * Thread-safety: reads the graph only, so it may run while no thread changes
 * the graph's parameters. Not done: sharding into several files, writing a
 * model whose source is not a TF.js layers model.json.
 */
#ifndef TOPIARY_TFJS_EXPORT_H
#define TOPIARY_TFJS_EXPORT_H

#include "graph.h"
#include "status.h"

#define TFJS_EXPORT_MODEL_JSON "model.json"
#define TFJS_EXPORT_SHARD "group1-shard1of1.bin"

/*
 * Writes out_dir/model.json and out_dir/group1-shard1of1.bin for graph g,
 * which keras_import built from source_model_json. out_dir is created if it
 * is missing (its parent must exist). Each file is written to a temporary
 * file in out_dir and renamed into place, the shard first, so model.json is
 * only replaced once its shard is complete.
 *
 * Errors (nothing is renamed into place on any of them):
 *   TOP_ERR_UNSUPPORTED  g was not imported from a TF.js layers model
 *                        (its architecture does not start with "keras:"),
 *                        or source_model_json is not a TF.js layers model.json
 *   TOP_ERR_NOT_FOUND    a manifest weight has no graph parameter; err names it
 *   TOP_ERR_FORMAT       a graph parameter is not in the manifest, or the
 *                        manifest is malformed
 *   TOP_ERR_SHAPE        a parameter's shape differs from the manifest's
 *   TOP_ERR_NUMERIC      a parameter value is NaN or infinite
 *   TOP_ERR_LIMIT        the float32 weights exceed KERAS_MAX_WEIGHT_BYTES
 *   TOP_ERR_INVALID      out_dir is the source model's folder, or a target
 *                        exists and is not a regular file
 *   TOP_ERR_IO, TOP_ERR_NOMEM
 */
top_status tfjs_export_write(const graph *g, const char *source_model_json, const char *out_dir,
                             top_error *err);

/*
 * Copies parameter gp from the engine layout into its source (Keras) layout.
 * dst has room for gp->value.numel floats. With (R, S) the kernel size:
 *   PARAM_LAYOUT_HWIO  engine (K, C, R, S)    -> source (R, S, C, K)
 *   PARAM_LAYOUT_HWC1  engine (C*M, 1, R, S)  -> source (R, S, C, M), where
 *                      engine channel c*M + m is depthwise output m of input c
 *   PARAM_LAYOUT_IO    engine (OUT, IN)       -> source (IN, OUT)
 *   PARAM_LAYOUT_SAME  copied unchanged
 * Returns TOP_ERR_SHAPE, naming the parameter, when gp->src_shape does not
 * match the engine shape under the layout.
 */
top_status tfjs_param_to_source(float *dst, const graph_param *gp, top_error *err);

#endif
