/*
 * `topiary checkpoint verify FILE [--sha256 HEX]`: loads a compressed
 * checkpoint with ckpt_read (every mask, value count, dtype and shape is
 * checked and every tensor decoded) and prints its tensor count, how many are
 * stored sparse, the fraction of float32 elements that are exactly +0.0, the
 * recorded method and sparsity, and the file's sha256. With --sha256 a
 * different digest is exit code 7. Runs on the calling thread.
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "checkpoint.h"
#include "cli.h"
#include "sha256.h"

#define EXIT_CHECKSUM 7

static void verify_usage(FILE *out)
{
    fprintf(out, "usage: topiary checkpoint verify FILE [--sha256 HEX]\n\n"
                 "Loads a compressed checkpoint, decodes every tensor and prints its\n"
                 "tensor count, sparsity and sha256.\n\n"
                 "exit codes: 0 valid, 1 unreadable or malformed, 2 invalid usage,\n"
                 "7 the sha256 differs from --sha256\n");
}

/* Counts float32 elements and those whose bit pattern is +0.0 (the format's "zero"). */
static void count_zeros(const ckpt_dense *d, size_t *f32, size_t *zeros)
{
    *f32 = *zeros = 0;
    for (size_t i = 0; i < d->count; i++) {
        const ckpt_tensor *t = &d->tensors[i];
        if (t->dtype != ST_DTYPE_F32)
            continue;
        const unsigned char *p = t->data;
        for (size_t k = 0; k < t->numel; k++) {
            static const unsigned char zero[4];
            *zeros += !memcmp(p + 4 * k, zero, 4);
        }
        *f32 += t->numel;
    }
}

static int verify(const char *path, const char *want)
{
    top_error err;
    top_error_clear(&err);
    char hex[SHA256_HEX_BYTES];
    st_file *f = NULL;
    ckpt_dense d = {0};
    int rc = 1;
    if (sha256_file(hex, path, &err) != TOP_OK || st_open(&f, path, &err) != TOP_OK)
        goto done;
    if (!ckpt_is_compressed(f)) {
        top_error_set(&err, TOP_ERR_FORMAT,
                      "'%s' is a safetensors file but not a compressed checkpoint (no format "
                      "\"%s\" in its metadata)",
                      path, CKPT_FORMAT);
        goto done;
    }
    if (ckpt_read(&d, f, &err) != TOP_OK)
        goto done;
    size_t sparse = 0, f32, zeros;
    for (size_t i = 0; i < d.count; i++)
        sparse += d.tensors[i].sparse != 0;
    count_zeros(&d, &f32, &zeros);
    const char *method = st_metadata_get(f, "method");
    const char *q = st_metadata_get(f, "sparsity");
    printf("checkpoint  %s\n", path);
    printf("format      %s version %s\n", CKPT_FORMAT, st_metadata_get(f, "format_version"));
    printf("tensors     %zu (%zu stored as mask and values)\n", d.count, sparse);
    printf("float32     %zu elements, %zu zero (%.4f)\n", f32, zeros,
           f32 ? (double)zeros / (double)f32 : 0.0);
    printf("method      %s, requested sparsity %s\n", method ? method : "-", q ? q : "-");
    printf("sha256      %s\n", hex);
    rc = 0;
    if (want && strcmp(want, hex)) {
        fprintf(stderr, "topiary: sha256 mismatch: the file has %s, expected %s\n", hex, want);
        rc = EXIT_CHECKSUM;
    } else if (want) {
        printf("sha256 matches the expected value\n");
    }
done:
    if (rc == 1)
        fprintf(stderr, "topiary: %s\n", err.message);
    ckpt_dense_free(&d);
    if (f)
        st_close(f);
    return rc;
}

int cli_checkpoint(int argc, char **argv)
{
    static const struct option opts[] = {
        {"sha256", required_argument, 0, 's'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *want = NULL;
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (o == 'h') {
            verify_usage(stdout);
            return 0;
        }
        if (o != 's') {
            verify_usage(stderr);
            return 2;
        }
        want = optarg;
    }
    if (argc - optind != 2 || strcmp(argv[optind], "verify")) {
        verify_usage(stderr);
        return 2;
    }
    if (want && (strlen(want) != 64 || strspn(want, "0123456789abcdef") != 64)) {
        fprintf(stderr, "topiary: --sha256 '%s' must be 64 lower-case hex digits\n", want);
        return 2;
    }
    return verify(argv[optind + 1], want);
}
