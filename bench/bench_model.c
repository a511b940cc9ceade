/*
 * Measures forward and forward+backward throughput of one model at one batch
 * size and input size, in images per second, plus the achieved GFLOP/s
 * (forward FLOPs from graph_get_stats; a backward pass is counted as twice the
 * forward, the usual estimate) and the peak resident memory of the process.
 *
 * usage: bench_model --model PATH [--size PX] [--batch N] [--iters I] [--backward]
 * Prints one JSON line. Inputs are random in [0, 1); the loss for the backward
 * pass is cross-entropy against label 0, as in bench/torch_bench.py. Each
 * figure is the best of the timed iterations; cpu_s is the least process CPU
 * time of one iteration (all threads, spinning included), which other load
 * on the machine disturbs less than the wall clock.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "graph.h"
#include "model.h"
#include "ops.h"
#include "runtime.h"

typedef struct bench_options {
    const char *model;
    int size, batch, iters, backward;
} bench_options;

static int parse_options(bench_options *o, int argc, char **argv)
{
    *o = (bench_options){NULL, 0, 32, 3, 0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--backward")) {
            o->backward = 1;
            continue;
        }
        if (!v)
            return -1;
        if (!strcmp(a, "--model"))
            o->model = v;
        else if (!strcmp(a, "--size"))
            o->size = atoi(v);
        else if (!strcmp(a, "--batch"))
            o->batch = atoi(v);
        else if (!strcmp(a, "--iters"))
            o->iters = atoi(v);
        else
            return -1;
        i++;
    }
    return o->model && o->batch >= 1 && o->iters >= 1 && o->size >= 0 ? 0 : -1;
}

/* One timed step: forward, and backward of the cross-entropy when asked. */
static int run_step(graph *g, const float *x, float *dlogits, int32_t *labels,
                    const bench_options *o, top_error *err)
{
    if (graph_forward(g, x, o->batch, GRAPH_MODE_INFERENCE, err) != TOP_OK)
        return -1;
    if (!o->backward)
        return 0;
    int classes = (int)g->nodes[g->output].sample_numel;
    cross_entropy_forward_backward(dlogits, graph_node_output(g, g->output), labels, o->batch,
                                   classes);
    return graph_backward(g, g->output, dlogits, NULL, err) == TOP_OK ? 0 : -1;
}

int main(int argc, char **argv)
{
    runtime_prefer_passive_openmp(argv);
    bench_options o;
    if (parse_options(&o, argc, argv)) {
        fprintf(stderr, "usage: bench_model --model PATH [--size PX] [--batch N] "
                        "[--iters I] [--backward]\n");
        return 2;
    }
    top_error err;
    top_error_clear(&err);
    graph *g = NULL;
    if (model_load(&g, o.model, &err) != TOP_OK ||
        (o.size && graph_set_input_size(g, o.size, o.size, &err) != TOP_OK)) {
        fprintf(stderr, "bench_model: %s\n", err.message);
        graph_free(g);
        return 1;
    }
    const graph_preprocess *pp = &g->preprocess;
    size_t per_image = (size_t)pp->channels * pp->height * pp->width;
    int classes = (int)g->nodes[g->output].sample_numel;
    float *x = malloc(per_image * (size_t)o.batch * sizeof(float));
    float *dlogits = malloc((size_t)classes * (size_t)o.batch * sizeof(float));
    int32_t *labels = calloc((size_t)o.batch, sizeof(int32_t));
    if (!x || !dlogits || !labels) {
        fprintf(stderr, "bench_model: out of memory for batch %d\n", o.batch);
        return 1;
    }
    for (size_t i = 0; i < per_image * (size_t)o.batch; i++)
        x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f;

    double best = 1e30, best_cpu = 1e30;
    for (int it = 0; it <= o.iters; it++) { /* iteration 0 warms up and allocates */
        double t0 = bench_now(), c0 = bench_cpu_now();
        if (run_step(g, x, dlogits, labels, &o, &err)) {
            fprintf(stderr, "bench_model: %s\n", err.message);
            return 1;
        }
        double dt = bench_now() - t0, dc = bench_cpu_now() - c0;
        if (it > 0 && dt < best)
            best = dt;
        if (it > 0 && dc < best_cpu)
            best_cpu = dc;
    }
    graph_stats stats;
    graph_get_stats(g, &stats);
    double flops = stats.flops * o.batch * (o.backward ? 3.0 : 1.0);
    printf("{\"bench\":\"model\",\"impl\":\"topiary\",\"arch\":\"%s\",\"size\":%d,\"batch\":%d,"
           "\"backward\":%d,\"images_per_s\":%.3f,\"gflops\":%.2f,\"cpu_s\":%.3f,"
           "\"peak_rss_mib\":%.0f}\n",
           g->architecture, pp->height, o.batch, o.backward, o.batch / best, flops / best / 1e9,
           best_cpu, bench_peak_rss_mib());
    free(x);
    free(dlogits);
    free(labels);
    graph_free(g);
    return 0;
}
