/*
 * Compressed checkpoints: bit-exact round trips at several sparsities, the
 * file size, rejection of corrupt files (each error names the tensor), and
 * SHA-256 against the FIPS 180-4 examples.
 */
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "sha256.h"
#include "test.h"

static char tmp_dir[64];

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint32_t rng_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

static void tmp_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "%s/%s", tmp_dir, name);
}

/* ---- SHA-256 -------------------------------------------------------------- */

static void check_digest(const char *label, const void *data, size_t size, const char *want)
{
    uint8_t d[SHA256_DIGEST_BYTES];
    char hex[SHA256_HEX_BYTES];
    sha256_buffer(d, data, size);
    sha256_hex(hex, d);
    CHECK_MSG(strcmp(hex, want) == 0, "sha256(%s) = %s, expected %s", label, hex, want);
}

static void test_sha256_vectors(void)
{
    check_digest("\"\"", "", 0,
                 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    check_digest("\"abc\"", "abc", 3,
                 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    check_digest("448-bit message", two, strlen(two),
                 "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

    /* A million 'a', fed in uneven pieces through the streaming API. */
    static char a[1000000];
    memset(a, 'a', sizeof a);
    check_digest("1e6 x 'a'", a, sizeof a,
                 "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    sha256_ctx ctx;
    uint8_t d[SHA256_DIGEST_BYTES];
    char hex[SHA256_HEX_BYTES];
    sha256_init(&ctx);
    for (size_t off = 0, step = 1; off < sizeof a; off += step, step = step * 3 % 997 + 1)
        sha256_update(&ctx, a + off, off + step > sizeof a ? sizeof a - off : step);
    sha256_final(&ctx, d);
    sha256_hex(hex, d);
    CHECK_MSG(strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") ==
                  0,
              "streamed sha256 = %s", hex);

    /* The file helper matches the buffer digest. */
    char path[128];
    tmp_path(path, sizeof path, "abc.txt");
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f)
        return;
    fwrite("abc", 1, 3, f);
    fclose(f);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(sha256_file(hex, path, &err), TOP_OK);
    CHECK_MSG(strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0,
              "sha256_file = %s", hex);
    tmp_path(path, sizeof path, "missing.txt");
    CHECK_INT_EQ(sha256_file(hex, path, &err), TOP_ERR_IO);
}

/* ---- round trips ----------------------------------------------------------- */

enum { BIG_ROWS = 1000, BIG_COLS = 100, SMALL_ROWS = 37, SMALL_COLS = 5 };

/* Random float bits (finite), a fraction q set to +0.0 exactly, and some
 * -0.0, NaN payloads, infinities and subnormals among the rest. */
static void fill_tensor(uint32_t *bits, size_t n, double q)
{
    static const uint32_t specials[] = {0x80000000u, 0x7fc01234u, 0xffa00001u, 0x7f800000u,
                                        0x00000001u, 0x807fffffu};
    size_t zeros = (size_t)(q * (double)n + 0.5);
    for (size_t i = 0; i < n; i++) {
        float v = (float)((double)(rng_u32() % 2000001) / 1e6 - 1.0);
        memcpy(&bits[i], &v, 4);
        if (bits[i] == 0)
            bits[i] = 0x3f800000u;
        if (i % 53 == 7)
            bits[i] = specials[(i / 53) % 6];
    }
    /* Zero a random subset of exactly `zeros` entries. */
    for (size_t z = 0; z < zeros;) {
        size_t i = rng_u32() % n;
        if (bits[i] != 0) {
            bits[i] = 0;
            z++;
        }
    }
}

static long file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

static void check_round_trip(double q)
{
    static uint32_t big[BIG_ROWS * BIG_COLS], small[SMALL_ROWS * SMALL_COLS];
    fill_tensor(big, BIG_ROWS * BIG_COLS, q);
    fill_tensor(small, SMALL_ROWS * SMALL_COLS, q);
    float scalar = -0.0f;
    int64_t counts[3] = {-5, 0, INT64_MAX};
    uint16_t halves[4] = {0x3c00, 0x0000, 0x8000, 0x7e01};

    ckpt_input in[6] = {
        {"layer.big", ST_DTYPE_F32, 2, {BIG_ROWS, BIG_COLS}, big, sizeof big},
        {"layer.small", ST_DTYPE_F32, 2, {SMALL_ROWS, SMALL_COLS}, small, sizeof small},
        {"scalar", ST_DTYPE_F32, 0, {0}, &scalar, 4},
        {"bn.num_batches_tracked", ST_DTYPE_I64, 1, {3}, counts, sizeof counts},
        {"half", ST_DTYPE_F16, 1, {4}, halves, sizeof halves},
        {"empty", ST_DTYPE_F32, 1, {0}, NULL, 0},
    };
    ckpt_metadata_entry meta[2] = {{"method", "obs"},
                                   {"source_sha256", "e3b0c44298fc1c149afbf4c8996fb924"}};
    char path[128];
    tmp_path(path, sizeof path, "round_trip.safetensors");
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(ckpt_write(path, in, 6, meta, 2, &err), TOP_OK);
    if (err.status != TOP_OK) {
        printf("  %s\n", err.message);
        return;
    }

    /* Size: (1 - q) * dense + numel / 8 for the big tensor, plus a header. */
    double dense = 4.0 * BIG_ROWS * BIG_COLS;
    double want = q > 0 ? (1.0 - q) * dense + BIG_ROWS * BIG_COLS / 8.0 : dense;
    long size = file_size(path);
    double small_bytes = sizeof small + sizeof small / 32 + 4 + sizeof counts + sizeof halves;
    printf("  q %.1f: file %ld bytes, big tensor estimate %.0f\n", q, size, want);
    CHECK_MSG(size >= want && size <= want + small_bytes + 2048,
              "q %g: file is %ld bytes, expected %.0f + header and small tensors", q, size,
              want);

    st_file *f = NULL;
    CHECK_INT_EQ(st_open(&f, path, &err), TOP_OK);
    if (!f)
        return;
    CHECK(ckpt_is_compressed(f));
    CHECK(strcmp(st_metadata_get(f, "method"), "obs") == 0);
    CHECK(strcmp(st_metadata_get(f, "format_version"), "1") == 0);
    ckpt_dense d;
    CHECK_INT_EQ(ckpt_read(&d, f, &err), TOP_OK);
    CHECK_INT_EQ(d.count, 6);
    for (size_t i = 0; i < d.count && i < 6; i++) {
        ckpt_tensor *t = &d.tensors[i];
        CHECK_MSG(strcmp(t->name, in[i].name) == 0, "tensor %zu is '%s', expected '%s'", i,
                  t->name, in[i].name);
        CHECK_INT_EQ(t->dtype, in[i].dtype);
        CHECK_INT_EQ(t->ndim, in[i].ndim);
        for (int k = 0; k < t->ndim; k++)
            CHECK_INT_EQ(t->shape[k], in[i].shape[k]);
        CHECK_INT_EQ(t->bytes, in[i].bytes);
        if (t->bytes == in[i].bytes && t->bytes > 0) {
            const uint8_t *a = t->data, *b = in[i].data;
            for (size_t k = 0; k < t->bytes; k++)
                if (a[k] != b[k]) {
                    CHECK_MSG(0, "q %g tensor '%s' byte %zu: 0x%02x, expected 0x%02x", q,
                              t->name, k, a[k], b[k]);
                    break;
                }
        }
    }
    if (d.count == 6) {
        CHECK_INT_EQ(d.tensors[0].sparse, q > 0);
        CHECK_INT_EQ(d.tensors[2].sparse, 0); /* -0.0 is a value */
        CHECK_INT_EQ(d.tensors[3].sparse, 0);
    }
    ckpt_dense_free(&d);
    st_close(f);
}

static void test_round_trip_sparsities(void)
{
    static const double qs[] = {0.0, 0.5, 0.9, 1.0};
    for (size_t i = 0; i < 4; i++)
        check_round_trip(qs[i]);
}

static void test_writer_rejects_bad_input(void)
{
    float v[2] = {0.0f, 1.0f};
    char path[128];
    tmp_path(path, sizeof path, "bad.safetensors");
    top_error err;

    ckpt_input in[2] = {{"a::mask", ST_DTYPE_F32, 1, {2}, v, sizeof v},
                        {"b", ST_DTYPE_F32, 1, {2}, v, sizeof v}};
    top_error_clear(&err);
    CHECK_INT_EQ(ckpt_write(path, in, 1, NULL, 0, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'a::mask'"), "message: %s", err.message);

    ckpt_metadata_entry meta = {"format", "other"};
    top_error_clear(&err);
    CHECK_INT_EQ(ckpt_write(path, in + 1, 1, &meta, 1, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "reserved"), "message: %s", err.message);

    ckpt_input dup[2] = {in[1], in[1]};
    top_error_clear(&err);
    CHECK_INT_EQ(ckpt_write(path, dup, 2, NULL, 0, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "listed twice"), "message: %s", err.message);
}

/* ---- corrupt files --------------------------------------------------------- */

typedef struct stored {
    const char *name;
    st_dtype dtype;
    int64_t length;
    const void *data;
} stored;

/* Writes stored 1-D tensors with the given version and index, opens the
 * file, runs ckpt_read and returns its status; err gets the message. */
static top_status read_crafted(const stored *parts, size_t n, const char *version,
                               const char *index, top_error *err)
{
    char path[128];
    tmp_path(path, sizeof path, "crafted.safetensors");
    st_writer *w = NULL;
    top_error werr;
    top_error_clear(&werr);
    top_error_clear(err);
    if (st_writer_new(&w, &werr) != TOP_OK)
        return TOP_ERR_NOMEM;
    for (size_t i = 0; i < n; i++)
        st_writer_add(w, parts[i].name, parts[i].dtype, 1, &parts[i].length, parts[i].data,
                      (size_t)parts[i].length * st_dtype_size(parts[i].dtype), &werr);
    st_writer_set_metadata(w, "format", CKPT_FORMAT, &werr);
    if (version)
        st_writer_set_metadata(w, "format_version", version, &werr);
    if (index)
        st_writer_set_metadata(w, "tensors", index, &werr);
    st_writer_write(w, path, &werr);
    st_writer_free(w);
    CHECK_MSG(werr.status == TOP_OK, "crafting failed: %s", werr.message);

    st_file *f = NULL;
    if (st_open(&f, path, &werr) != TOP_OK)
        return TOP_ERR_IO;
    ckpt_dense d;
    top_status st = ckpt_read(&d, f, err);
    if (st == TOP_OK)
        ckpt_dense_free(&d);
    st_close(f);
    return st;
}

#define SPARSE_W "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,5],\"encoding\":\"sparse\",\"nonzero\":%d}}"

static void expect_rejected(const stored *parts, size_t n, const char *version, const char *index,
                            top_status want, const char *fragment)
{
    top_error err;
    top_status st = read_crafted(parts, n, version, index, &err);
    CHECK_MSG(st == want, "status %d (%s), expected %d", (int)st, err.message, (int)want);
    CHECK_MSG(strstr(err.message, fragment), "message '%s' lacks '%s'", err.message, fragment);
}

static void test_reader_rejects_corrupt_files(void)
{
    uint8_t mask_ok[2] = {0x07, 0x00}, mask_long[3] = {0x07, 0, 0}, mask_four[2] = {0x0f, 0};
    uint8_t mask_pad[2] = {0x07, 0x04};
    float vals[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    char idx3[256], idx4[256];
    snprintf(idx3, sizeof idx3, SPARSE_W, 3);
    snprintf(idx4, sizeof idx4, SPARSE_W, 4);

    /* The well-formed file reads. */
    stored ok[2] = {{"w::mask", ST_DTYPE_U8, 2, mask_ok}, {"w::values", ST_DTYPE_F32, 3, vals}};
    top_error err;
    CHECK_INT_EQ(read_crafted(ok, 2, "1", idx3, &err), TOP_OK);

    stored longer[2] = {{"w::mask", ST_DTYPE_U8, 3, mask_long},
                        {"w::values", ST_DTYPE_F32, 3, vals}};
    expect_rejected(longer, 2, "1", idx3, TOP_ERR_FORMAT, "tensor 'w': part '::mask'");

    stored four[2] = {{"w::mask", ST_DTYPE_U8, 2, mask_four}, {"w::values", ST_DTYPE_F32, 3, vals}};
    expect_rejected(four, 2, "1", idx3, TOP_ERR_FORMAT, "tensor 'w': mask has 4 set bits");

    stored few[2] = {{"w::mask", ST_DTYPE_U8, 2, mask_ok}, {"w::values", ST_DTYPE_F32, 2, vals}};
    expect_rejected(few, 2, "1", idx3, TOP_ERR_FORMAT, "tensor 'w': part '::values'");

    expect_rejected(ok, 1, "1", idx3, TOP_ERR_FORMAT, "tensor 'w': part '::values' is missing");

    stored pad[2] = {{"w::mask", ST_DTYPE_U8, 2, mask_pad}, {"w::values", ST_DTYPE_F32, 4, vals}};
    expect_rejected(pad, 2, "1", idx4, TOP_ERR_FORMAT, "tensor 'w': mask bits past element 10");

    expect_rejected(ok, 2, "2", idx3, TOP_ERR_UNSUPPORTED, "format_version '2'");
    expect_rejected(ok, 2, NULL, idx3, TOP_ERR_UNSUPPORTED, "format_version '(missing)'");
    expect_rejected(ok, 2, "1", "[1, 2", TOP_ERR_FORMAT, "metadata 'tensors'");
    expect_rejected(ok, 2, "1", NULL, TOP_ERR_FORMAT, "metadata 'tensors'");

    stored extra[3] = {ok[0], ok[1], {"stray", ST_DTYPE_F32, 1, vals}};
    expect_rejected(extra, 3, "1", idx3, TOP_ERR_FORMAT, "tensor 'stray' is not listed");

    expect_rejected(ok, 2, "1",
                    "{\"w\":{\"dtype\":\"I32\",\"shape\":[2,5],\"encoding\":\"sparse\","
                    "\"nonzero\":3}}",
                    TOP_ERR_FORMAT, "tensor 'w': a sparse entry needs dtype F32");
    expect_rejected(ok, 2, "1",
                    "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,5],\"encoding\":\"rle\"}}",
                    TOP_ERR_FORMAT, "tensor 'w': unknown encoding");

    stored dense_v[1] = {{"v", ST_DTYPE_F32, 4, vals}};
    expect_rejected(dense_v, 1, "1",
                    "{\"v\":{\"dtype\":\"F32\",\"shape\":[2,2],\"encoding\":\"dense\"}}",
                    TOP_ERR_FORMAT, "tensor 'v': stored dtype or shape disagrees");
    expect_rejected(dense_v, 1, "1",
                    "{\"u\":{\"dtype\":\"F32\",\"shape\":[4],\"encoding\":\"dense\"}}",
                    TOP_ERR_FORMAT, "tensor 'u' is in the index but not in the file");
    expect_rejected(dense_v, 1, "1",
                    "{\"v\":{\"dtype\":\"F32\",\"shape\":[4],\"encoding\":\"dense\"},"
                    "\"v\":{\"dtype\":\"F32\",\"shape\":[4],\"encoding\":\"dense\"}}",
                    TOP_ERR_FORMAT, "metadata 'tensors'");
}

/* Every prefix of a valid file is rejected (by the safetensors reader or by
 * ckpt_read) without a crash. */
static void test_truncated_files_rejected(void)
{
    uint32_t bits[64];
    fill_tensor(bits, 64, 0.5);
    ckpt_input in[1] = {{"w", ST_DTYPE_F32, 2, {8, 8}, bits, sizeof bits}};
    char path[128];
    tmp_path(path, sizeof path, "truncate.safetensors");
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(ckpt_write(path, in, 1, NULL, 0, &err), TOP_OK);
    long size = file_size(path);
    CHECK(size > 0);
    if (size <= 0)
        return;
    uint8_t *buf = malloc((size_t)size);
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL);
    if (!f) {
        free(buf);
        return;
    }
    CHECK_INT_EQ(fread(buf, 1, (size_t)size, f), size);
    fclose(f);

    size_t accepted = 0;
    for (long len = 0; len <= size; len++) {
        uint8_t *copy = malloc(len ? (size_t)len : 1);
        memcpy(copy, buf, (size_t)len);
        st_file *sf = NULL;
        top_error_clear(&err);
        if (st_open_memory(&sf, copy, (size_t)len, &err) == TOP_OK) {
            ckpt_dense d;
            if (ckpt_read(&d, sf, &err) == TOP_OK) {
                accepted++;
                ckpt_dense_free(&d);
            }
            st_close(sf);
        }
        free(copy);
    }
    CHECK_INT_EQ(accepted, 1); /* only the whole file */
    free(buf);
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/topiary-ckpt-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    TEST_RUN(test_sha256_vectors);
    TEST_RUN(test_round_trip_sparsities);
    TEST_RUN(test_writer_rejects_bad_input);
    TEST_RUN(test_reader_rejects_corrupt_files);
    TEST_RUN(test_truncated_files_rejected);

    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp_dir);
    return TEST_FINISH();
}
