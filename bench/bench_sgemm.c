/*
 * Measures the OpenBLAS sgemm rate of this machine: C = A B with square
 * float32 matrices of size --size (default 2048), best of --iters runs.
 * Prints one JSON line: {"bench":"sgemm","size":...,"gflops":...,"threads":...}.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

int main(int argc, char **argv)
{
    int size = 2048, iters = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--size"))
            size = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--iters"))
            iters = atoi(argv[i + 1]);
    }
    if (size < 16 || size > 16384 || iters < 1) {
        fprintf(stderr, "bench_sgemm: --size must be in 16..16384 and --iters >= 1\n");
        return 2;
    }
    size_t n = (size_t)size * (size_t)size;
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
    float *c = malloc(n * sizeof(float));
    if (!a || !b || !c) {
        fprintf(stderr, "bench_sgemm: out of memory for size %d\n", size);
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        a[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
        b[i] = (float)((i * 104729) % 1000) / 1000.0f - 0.5f;
    }
    double best = 1e30;
    for (int it = 0; it < iters + 1; it++) {
        double t0 = bench_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, size, size, size, 1.0f, a, size,
                    b, size, 0.0f, c, size);
        double dt = bench_now() - t0;
        if (it > 0 && dt < best) /* the first run warms up the threads */
            best = dt;
    }
    double gflops = 2.0 * (double)size * size * size / best / 1e9;
    printf("{\"bench\":\"sgemm\",\"size\":%d,\"gflops\":%.2f,\"threads\":%d}\n", size, gflops,
           openblas_get_num_threads());
    free(a);
    free(b);
    free(c);
    return 0;
}
