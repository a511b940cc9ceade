/*
 * Loading a model from a path, whatever its format: a TF.js layers model
 * (a model.json file, or a folder that contains one) goes to the Keras
 * importer, a .safetensors file to the PyTorch importer (ResNet or ViT by its
 * tensor names). The result is a finalized graph the caller frees.
 */
#ifndef TOPIARY_MODEL_H
#define TOPIARY_MODEL_H

#include "graph.h"
#include "status.h"

typedef enum model_format {
    MODEL_FORMAT_UNKNOWN,
    MODEL_FORMAT_TFJS_LAYERS, /* model.json + binary weight shards */
    MODEL_FORMAT_SAFETENSORS, /* a PyTorch state dict as safetensors */
} model_format;

/* Detects the format from the path (a folder with model.json, a .json file, a
 * .safetensors file, or a file starting with a safetensors header). */
model_format model_detect_format(const char *path);

/* Imports the model at path into *out. On failure *out is NULL, and err names
 * the format that was tried and why it failed. */
top_status model_load(graph **out, const char *path, top_error *err);

#endif
