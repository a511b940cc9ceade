/*
 * Measures the OpenBLAS sgemm rate of this machine: C = A B with square
 * float32 matrices of size --size (default 2048), best of --iters runs.
 * Prints one JSON line: {"bench":"sgemm","size":...,"gflops":...,"threads":...}.
 *
 * By default one product runs on the OpenBLAS threads. With --per-core, each
 * OpenMP thread runs its own product at the same time, with OpenBLAS on one
 * thread, as topiary's kernels do with a batch. gflops is then the sum over
 * the threads. On a loaded machine the two can differ a lot, because the
 * OpenBLAS threads of one product wait for each other.
 */
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

/* Returns the best wall time in seconds of `iters` timed rounds after one
 * warm-up. A round is one product into c, or with threads > 1 one product
 * per thread into its own n floats of c, all at the same time. */
static double time_products(float *c, const float *a, const float *b, int size, int iters,
                            int threads)
{
    size_t n = (size_t)size * (size_t)size;
    double best = 1e30;
    for (int it = 0; it < iters + 1; it++) {
        double t0 = bench_now();
#pragma omp parallel num_threads(threads) if (threads > 1)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, size, size, size, 1.0f, a, size,
                    b, size, 0.0f, c + (size_t)omp_get_thread_num() * n, size);
        double dt = bench_now() - t0;
        if (it > 0 && dt < best) /* the first run warms up the threads */
            best = dt;
    }
    return best;
}

int main(int argc, char **argv)
{
    int size = 2048, iters = 5, per_core = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--per-core"))
            per_core = 1;
        else if (!strcmp(argv[i], "--size") && i + 1 < argc)
            size = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atoi(argv[++i]);
    }
    if (size < 16 || size > 16384 || iters < 1) {
        fprintf(stderr, "bench_sgemm: --size must be in 16..16384 and --iters >= 1\n");
        return 2;
    }
    int threads = per_core ? omp_get_max_threads() : 1;
    size_t n = (size_t)size * (size_t)size;
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
    float *c = malloc(n * (size_t)threads * sizeof(float));
    if (!a || !b || !c) {
        fprintf(stderr, "bench_sgemm: out of memory for size %d\n", size);
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        a[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
        b[i] = (float)((i * 104729) % 1000) / 1000.0f - 0.5f;
    }
    if (per_core)
        openblas_set_num_threads(1);
    double best = time_products(c, a, b, size, iters, threads);
    double gflops = 2.0 * (double)size * size * size * threads / best / 1e9;
    printf("{\"bench\":\"sgemm\",\"size\":%d,\"gflops\":%.2f,\"threads\":%d,"
           "\"per_core\":%d}\n",
           size, gflops, per_core ? threads : openblas_get_num_threads(), per_core);
    free(a);
    free(b);
    free(c);
    return 0;
}
