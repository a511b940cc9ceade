/*
 * Importers of PyTorch safetensors checkpoints: torchvision ResNet (18, 34,
 * 50, 101, 152 and any other block counts) and Vision Transformers with
 * torchvision (`vit_b_16`) or timm/DINO tensor names.
 *
 * The architecture is detected from the tensor names, and every size (widths,
 * block counts, patch size, image size, depth, MLP size, classes) comes from
 * the tensor shapes. Every tensor in the file must be used: a missing tensor,
 * an unexpected extra tensor or a shape mismatch is an error that names the
 * tensor and both shapes. The only tensors read and dropped are batch-norm
 * `num_batches_tracked` counters (see torch_tensor_is_unused).
 *
 * The returned graph is finalized, owns copies of the weights as float32 in
 * PyTorch layout (PARAM_LAYOUT_SAME, original names) and does not refer to
 * the file. Thread-safety: no shared state; an st_file may be read by several
 * imports at once.
 */
#ifndef TOPIARY_IMPORT_TORCH_H
#define TOPIARY_IMPORT_TORCH_H

#include "graph.h"
#include "safetensors.h"
#include "status.h"

/*
 * Opens a safetensors checkpoint, detects ResNet or ViT by its tensor names
 * and builds the graph into *out (caller frees with graph_free). On failure
 * *out is NULL and err names the tensor or the architecture problem.
 */
top_status torch_import(graph **out, const char *path, top_error *err);

/* The same from an open file (a file on disk or a buffer in memory). */
top_status torch_import_file(graph **out, const st_file *f, top_error *err);

/*
 * Returns 1 if the importer reads the tensor with this name but keeps no graph
 * parameter for it (batch-norm `num_batches_tracked` counters). A checkpoint
 * writer that wants a drop-in file copies these tensors from the source.
 */
int torch_tensor_is_unused(const char *name);

#endif
