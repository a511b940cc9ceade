/* Format detection and dispatch to the importers; see model.h. */
#include "model.h"
#include "fileio.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "import_keras.h"
#include "import_torch.h"

static int has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* A safetensors file starts with an 8-byte little-endian header length
 * followed by '{'. */
static int looks_like_safetensors(const char *path)
{
    FILE *f = top_fopen_regular(path, NULL);
    if (!f)
        return 0;
    unsigned char head[9];
    size_t got = fread(head, 1, sizeof head, f);
    fclose(f);
    return got == sizeof head && head[8] == '{' && head[7] == 0 && head[6] == 0;
}

model_format model_detect_format(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return MODEL_FORMAT_UNKNOWN;
    if (S_ISDIR(st.st_mode)) {
        char json[4096];
        int n = snprintf(json, sizeof json, "%s/model.json", path);
        if (n > 0 && (size_t)n < sizeof json && stat(json, &st) == 0)
            return MODEL_FORMAT_TFJS_LAYERS;
        return MODEL_FORMAT_UNKNOWN;
    }
    if (has_suffix(path, ".json"))
        return MODEL_FORMAT_TFJS_LAYERS;
    if (has_suffix(path, ".safetensors") || looks_like_safetensors(path))
        return MODEL_FORMAT_SAFETENSORS;
    return MODEL_FORMAT_UNKNOWN;
}

top_status model_load(graph **out, const char *path, top_error *err)
{
    *out = NULL;
    switch (model_detect_format(path)) {
    case MODEL_FORMAT_TFJS_LAYERS: {
        struct stat st;
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
            char json[4096];
            int n = snprintf(json, sizeof json, "%s/model.json", path);
            if (n < 0 || (size_t)n >= sizeof json)
                return top_error_set(err, TOP_ERR_INVALID, "model path '%s' is too long", path);
            return keras_import(out, json, err);
        }
        return keras_import(out, path, err);
    }
    case MODEL_FORMAT_SAFETENSORS: return torch_import(out, path, err);
    case MODEL_FORMAT_UNKNOWN: break;
    }
    return top_error_set(err, TOP_ERR_UNSUPPORTED,
                         "model '%s' is not a TF.js layers model (model.json or a folder "
                         "with one) nor a .safetensors checkpoint; check the path",
                         path);
}
