/*
 * libFuzzer target for the head cache reader. It writes the input as the
 * cache entry of a fixed key in a private temporary directory and loads it
 * with head_cache_load, expecting 2 classes x 3 features. So the file read,
 * the safetensors validation and every entry check run on hostile bytes. A
 * hit must contain finite values, and storing it again and loading that copy
 * must give the same bits. Run with the sanitizers that `make fuzz` adds; the
 * seeds are in tests/fuzz/corpus/head_cache (make_seeds.sh writes them).
 */
#include <fcntl.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "head_cache.h"

#define FUZZ_KEY "5f0c2b6a1e9d4c3b8a7f6e5d4c3b2a1908f7e6d5c4b3a29180f7e6d5c4b3a291"
#define FUZZ_FEATURES 3
#define FUZZ_CLASSES 2

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[512], copy_dir[600], entry[700];

/* Removes the files and directories set_up made, at exit. */
static void clean_up(void)
{
    char copy_entry[800];
    snprintf(copy_entry, sizeof copy_entry, "%s/%s.safetensors", copy_dir, FUZZ_KEY);
    unlink(entry);
    unlink(copy_entry);
    rmdir(copy_dir);
    rmdir(dir);
}

static int set_up(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/fuzz_head_cache_XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(dir))
        return -1;
    snprintf(copy_dir, sizeof copy_dir, "%s/copy", dir);
    snprintf(entry, sizeof entry, "%s/%s.safetensors", dir, FUZZ_KEY);
    atexit(clean_up);
    return 0;
}

static int write_entry(const uint8_t *data, size_t size)
{
    int fd = open(entry, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    size_t done = 0;
    while (done < size) {
        ssize_t k = write(fd, data + done, size - done);
        if (k <= 0)
            break;
        done += (size_t)k;
    }
    close(fd);
    return done == size ? 0 : -1;
}

/* Stores a hit again and checks that the copy loads with the same bits. */
static void check_hit(const ridge_model *m, double accuracy, size_t fit_n, size_t eval_n)
{
    for (size_t i = 0; i < FUZZ_CLASSES * FUZZ_FEATURES; i++)
        if (!isfinite(m->coef[i]))
            __builtin_trap();
    for (size_t i = 0; i < FUZZ_CLASSES; i++)
        if (!isfinite(m->intercept[i]))
            __builtin_trap();
    if (!isfinite(accuracy) || accuracy < 0.0 || accuracy > 1.0)
        __builtin_trap();
    if (head_cache_store(copy_dir, FUZZ_KEY, m, accuracy, fit_n, eval_n, NULL) != TOP_OK)
        __builtin_trap();
    int hit = 0;
    ridge_model back;
    double acc_back;
    size_t fit_back, eval_back;
    if (head_cache_load(&hit, &back, &acc_back, &fit_back, &eval_back, copy_dir, FUZZ_KEY,
                        FUZZ_FEATURES, FUZZ_CLASSES, NULL) != TOP_OK ||
        !hit)
        __builtin_trap();
    if (memcmp(back.coef, m->coef, FUZZ_CLASSES * FUZZ_FEATURES * sizeof(double)) != 0 ||
        memcmp(back.intercept, m->intercept, FUZZ_CLASSES * sizeof(double)) != 0 ||
        memcmp(&acc_back, &accuracy, sizeof accuracy) != 0 || fit_back != fit_n ||
        eval_back != eval_n)
        __builtin_trap();
    ridge_model_free(&back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!dir[0] && set_up() != 0)
        return 0;
    if (write_entry(data, size) != 0)
        return 0;

    int hit = 0;
    ridge_model m;
    double accuracy;
    size_t fit_n, eval_n;
    if (head_cache_load(&hit, &m, &accuracy, &fit_n, &eval_n, dir, FUZZ_KEY, FUZZ_FEATURES,
                        FUZZ_CLASSES, NULL) != TOP_OK)
        return 0;
    if (hit)
        check_hit(&m, accuracy, fit_n, eval_n);
    ridge_model_free(&m);
    return 0;
}
