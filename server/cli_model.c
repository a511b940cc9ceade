/*
 * `topiary forward` and `topiary inspect`: offline commands that load a model
 * with the importers and let a person check it by eye. They run on the
 * calling thread and own everything they allocate.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "fileio.h"
#include "graph.h"
#include "image.h"
#include "model.h"
#include "ops.h"

#define CLI_MAX_IMAGES 64
#define CLI_MAX_LABELS 4096
#define CLI_LABEL_MAX 128
/* Images per forward pass of `topiary forward`. */
#define FORWARD_BATCH 8

typedef struct label_list {
    int count;
    char (*names)[CLI_LABEL_MAX];
} label_list;

/* Reads one class name per line. A missing file leaves the list empty. */
static int labels_read(label_list *labels, const char *path, int required)
{
    labels->count = 0;
    labels->names = NULL;
    top_error err;
    top_error_clear(&err);
    FILE *f = top_fopen_regular(path, &err);
    if (!f) {
        if (required)
            fprintf(stderr, "topiary: labels file: %s\n", err.message);
        return required ? -1 : 0;
    }
    labels->names = calloc(CLI_MAX_LABELS, sizeof *labels->names);
    if (!labels->names) {
        fclose(f);
        return -1;
    }
    char line[CLI_LABEL_MAX];
    while (labels->count < CLI_MAX_LABELS && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        snprintf(labels->names[labels->count++], CLI_LABEL_MAX, "%s", line);
    }
    fclose(f);
    return 0;
}

/* Looks for labels.txt beside model.json (or inside a model folder). */
static void labels_find_default(char *out, size_t size, const char *model)
{
    struct stat st;
    if (stat(model, &st) == 0 && S_ISDIR(st.st_mode)) {
        snprintf(out, size, "%s/labels.txt", model);
        return;
    }
    const char *slash = strrchr(model, '/');
    int dir_len = slash ? (int)(slash - model) : 1;
    snprintf(out, size, "%.*s/labels.txt", dir_len, slash ? model : ".");
}

static int compare_desc(const void *a, const void *b, void *scores)
{
    const float *s = scores;
    float x = s[*(const int *)a], y = s[*(const int *)b];
    if (x != y)
        return x < y ? 1 : -1;
    return *(const int *)a - *(const int *)b;
}

static void print_top_k(const char *image, float *probs, int classes, int k,
                        const label_list *labels)
{
    int order[CLI_MAX_LABELS];
    int count = classes < CLI_MAX_LABELS ? classes : CLI_MAX_LABELS;
    for (int i = 0; i < count; i++)
        order[i] = i;
    qsort_r(order, (size_t)count, sizeof order[0], compare_desc, probs);
    printf("%s\n", image);
    for (int i = 0; i < k && i < count; i++) {
        int c = order[i];
        const char *name = c < labels->count ? labels->names[c] : "";
        printf("  %2d. class %-4d %-24s %.6f\n", i + 1, c, name, probs[c]);
    }
}

static void forward_usage(FILE *out)
{
    fprintf(out, "usage: topiary forward --model PATH --image FILE [--image FILE ...]\n"
                 "                       [--top K] [--labels FILE]\n\n"
                 "Runs the model on each image (PNG or JPEG) with the preprocessing its\n"
                 "importer recorded and prints the K most probable classes (default 5).\n"
                 "Class names come from --labels, or labels.txt beside the model.\n");
}

/* Decodes and preprocesses every image into one (N, C, H, W) batch. */
static int forward_make_batch(float **batch, const graph *g, char **images, int n)
{
    const graph_preprocess *pp = &g->preprocess;
    size_t per_image = (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width;
    *batch = malloc(per_image * (size_t)n * sizeof(float));
    if (!*batch) {
        fprintf(stderr, "topiary: out of memory for a batch of %d images\n", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        image_u8 img = {0};
        top_error err;
        top_error_clear(&err);
        if (image_load(&img, images[i], NULL, &err) != TOP_OK ||
            image_preprocess(*batch + per_image * (size_t)i, &img, pp, &err) != TOP_OK) {
            fprintf(stderr, "topiary: %s\n", err.message);
            image_free(&img);
            return -1;
        }
        image_free(&img);
    }
    return 0;
}

int cli_forward(int argc, char **argv)
{
    static const struct option options[] = {
        {"model", required_argument, NULL, 'm'}, {"image", required_argument, NULL, 'i'},
        {"top", required_argument, NULL, 'k'},   {"labels", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *labels_path = NULL;
    char *images[CLI_MAX_IMAGES];
    int n_images = 0, top = 5, opt;
    while ((opt = getopt_long(argc, argv, "m:i:k:l:h", options, NULL)) != -1) {
        switch (opt) {
        case 'm': model = optarg; break;
        case 'l': labels_path = optarg; break;
        case 'k':
            top = atoi(optarg);
            if (top < 1 || top > 1000) {
                fprintf(stderr, "topiary: --top %s is outside 1..1000\n", optarg);
                return 2;
            }
            break;
        case 'i':
            if (n_images == CLI_MAX_IMAGES) {
                fprintf(stderr, "topiary: at most %d --image options\n", CLI_MAX_IMAGES);
                return 2;
            }
            images[n_images++] = optarg;
            break;
        case 'h': forward_usage(stdout); return 0;
        default: forward_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "topiary: unexpected argument '%s'; give each image its own --image\n",
                argv[optind]);
        return 2;
    }
    if (!model || n_images == 0) {
        fprintf(stderr, "topiary: forward needs --model and at least one --image\n");
        forward_usage(stderr);
        return 2;
    }

    label_list labels;
    char default_labels[4096];
    labels_find_default(default_labels, sizeof default_labels, model);
    if (labels_read(&labels, labels_path ? labels_path : default_labels, labels_path != NULL))
        return 1;

    int rc = 1;
    graph *g = NULL;
    float *batch = NULL, *probs = NULL;
    top_error err;
    top_error_clear(&err);
    if (model_load(&g, model, &err) != TOP_OK) {
        fprintf(stderr, "topiary: cannot load model: %s\n", err.message);
        goto done;
    }
    const graph_node *out = &g->nodes[g->output];
    int classes = (int)out->sample_numel;
    if (labels.count && labels.count != classes) {
        fprintf(stderr,
                "topiary: labels file '%s' has %d names but the model has %d classes; pass "
                "a file with one name per line for each class\n",
                labels_path ? labels_path : default_labels, labels.count, classes);
        rc = 2;
        goto done;
    }
    probs = malloc((size_t)classes * FORWARD_BATCH * sizeof(float));
    if (!probs) {
        fprintf(stderr, "topiary: out of memory for %d outputs\n", classes);
        goto done;
    }
    /* Fixed-size batches keep the memory independent of the image count. */
    for (int first = 0; first < n_images; first += FORWARD_BATCH) {
        int n = n_images - first < FORWARD_BATCH ? n_images - first : FORWARD_BATCH;
        free(batch);
        if (forward_make_batch(&batch, g, images + first, n))
            goto done;
        if (graph_forward(g, batch, n, GRAPH_MODE_INFERENCE, &err) != TOP_OK) {
            fprintf(stderr, "topiary: forward pass failed: %s\n", err.message);
            goto done;
        }
        /* Models whose graph ends in softmax already output probabilities. */
        if (out->op == OP_SOFTMAX)
            memcpy(probs, graph_node_output(g, g->output),
                   (size_t)classes * (size_t)n * sizeof(float));
        else
            softmax_forward(probs, graph_node_output(g, g->output), (size_t)n, classes);
        for (int i = 0; i < n; i++)
            print_top_k(images[first + i], probs + (size_t)classes * (size_t)i, classes, top,
                        &labels);
    }
    rc = 0;

done:
    free(probs);
    free(batch);
    free(labels.names);
    graph_free(g);
    return rc;
}

static void inspect_usage(FILE *out)
{
    fprintf(out, "usage: topiary inspect --model PATH [--params] [--nodes]\n\n"
                 "Prints the architecture, input preprocessing, parameter and FLOP counts\n"
                 "of a model; --params lists every parameter, --nodes every graph node.\n");
}

static void inspect_print(const graph *g, int list_params, int list_nodes)
{
    graph_stats stats;
    graph_get_stats(g, &stats);
    const graph_preprocess *pp = &g->preprocess;
    printf("architecture      %s\n", g->architecture);
    printf("input             %d x %d x %d (channels x height x width)\n", pp->channels,
           pp->height, pp->width);
    printf("nodes             %d\n", g->n_nodes);
    size_t statistics = 0;
    for (int i = 0; i < g->n_params; i++)
        if (g->params[i].role == PARAM_ROLE_STATISTIC)
            statistics += g->params[i].value.numel;
    printf("parameters        %zu trainable, %zu with batch-norm statistics\n", stats.params,
           stats.params + statistics);
    printf("prunable weights  %zu\n", stats.prunable_params);
    printf("GFLOPs per image  %.3f\n", stats.flops / 1e9);
    if (list_params) {
        printf("\n%-56s %-8s %-22s %s\n", "parameter", "prunable", "shape", "node");
        for (int i = 0; i < g->n_params; i++) {
            const graph_param *p = &g->params[i];
            char shape[96];
            tensor_shape_str(shape, sizeof shape, p->value.ndim, p->value.shape);
            printf("%-56s %-8s %-22s %s\n", p->name,
                   graph_param_is_prunable(g, i) ? "yes" : "no", shape, g->nodes[p->node].name);
        }
    }
    if (list_nodes) {
        printf("\n%-48s %-16s %s\n", "node", "op", "output shape");
        for (int i = 0; i < g->n_nodes; i++) {
            const graph_node *nd = &g->nodes[i];
            char shape[96];
            tensor_shape_str(shape, sizeof shape, nd->ndim, nd->dims);
            printf("%-48s %-16s %s\n", nd->name, op_kind_str(nd->op), shape);
        }
    }
}

int cli_inspect(int argc, char **argv)
{
    static const struct option options[] = {
        {"model", required_argument, NULL, 'm'},
        {"params", no_argument, NULL, 'p'},
        {"nodes", no_argument, NULL, 'n'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL;
    int list_params = 0, list_nodes = 0, opt;
    while ((opt = getopt_long(argc, argv, "m:pnh", options, NULL)) != -1) {
        switch (opt) {
        case 'm': model = optarg; break;
        case 'p': list_params = 1; break;
        case 'n': list_nodes = 1; break;
        case 'h': inspect_usage(stdout); return 0;
        default: inspect_usage(stderr); return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "topiary: inspect needs --model\n");
        inspect_usage(stderr);
        return 2;
    }
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    if (model_load(&g, model, &err) != TOP_OK) {
        fprintf(stderr, "topiary: cannot load model: %s\n", err.message);
        return 1;
    }
    inspect_print(g, list_params, list_nodes);
    graph_free(g);
    return 0;
}
