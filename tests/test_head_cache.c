/*
 * head cache: bit-exact round trips of a head fitted by ridge_fit, and a key
 * that changes with every input and only then. Corrupt entries are misses:
 * every truncation, every flipped byte, wrong shapes and dtypes, NaN values
 * and a foreign key. Also directory creation, replacement, concurrent stores,
 * fingerprints, model digests and pruning. Files go to a fresh directory
 * under $TMPDIR.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "head_cache.h"
#include "ridge.h"
#include "safetensors.h"
#include "sha256.h"
#include "test.h"

static char tmp_dir[512];

static const char *tmp_path(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", tmp_dir, name);
    return out;
}

static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Fits a ridge head on n random samples: D features, C classes, labels
 * i mod C, each class shifted along its own feature. */
static void fit_random_head(ridge_model *m, size_t n, size_t d, size_t c, uint64_t seed)
{
    float *x = malloc(n * d * sizeof *x);
    int32_t *labels = malloc(n * sizeof *labels);
    uint64_t state = seed;
    for (size_t i = 0; i < n; i++) {
        labels[i] = (int32_t)(i % c);
        for (size_t j = 0; j < d; j++)
            x[i * d + j] = (float)((double)(next_random(&state) >> 11) * 0x1p-53 - 0.5);
        x[i * d + (size_t)labels[i] % d] += 1.0f;
    }
    ridge_options opt = {.alpha = 1.0, .balanced = 1};
    top_error err;
    top_error_clear(&err);
    top_status st = ridge_fit(m, x, labels, n, d, c, &opt, &err);
    CHECK_MSG(st == TOP_OK, "ridge_fit failed: %s", err.message);
    free(x);
    free(labels);
}

static void base_inputs(head_cache_inputs *in)
{
    memset(in, 0, sizeof *in);
    in->code_version = "test 1";
    in->model_sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    in->feature_node = "global_average_pooling2d_1";
    in->input_height = 224;
    in->input_width = 224;
    in->dataset_uri = "idx:train-images.gz,train-labels.gz";
    in->dataset_fingerprint = "f00d";
    in->calib_count = 0;
    in->fit_count = 200;
    in->eval_count = 100;
    in->seed = 7;
    in->alpha = 1.0;
    in->balanced = 1;
}

static void key_for(char key[SHA256_HEX_BYTES], const char *text)
{
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_buffer(digest, text, strlen(text));
    sha256_hex(key, digest);
}

static int heads_equal(const ridge_model *a, const ridge_model *b)
{
    return a->n_classes == b->n_classes && a->n_features == b->n_features &&
           memcmp(a->coef, b->coef, a->n_classes * a->n_features * sizeof(double)) == 0 &&
           memcmp(a->intercept, b->intercept, a->n_classes * sizeof(double)) == 0;
}

/* Loads key from dir expecting (c, d); returns hit, or -1 on an error. */
static int load_hit(const char *dir, const char *key, size_t d, size_t c, ridge_model *out)
{
    int hit = -1;
    double acc;
    size_t fit_n, eval_n;
    ridge_model m;
    top_error err;
    top_error_clear(&err);
    top_status st = head_cache_load(&hit, &m, &acc, &fit_n, &eval_n, dir, key, d, c, &err);
    if (st != TOP_OK)
        return -1;
    if (!hit && (m.coef || m.intercept || acc != 0.0 || fit_n || eval_n))
        return -2; /* a miss must leave every output empty */
    if (out)
        *out = m;
    else
        ridge_model_free(&m);
    return hit;
}

static long file_bytes(uint8_t **out, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    *out = malloc((size_t)n + 1);
    if (fread(*out, 1, (size_t)n, f) != (size_t)n)
        n = -1;
    fclose(f);
    return n;
}

static int write_bytes(const char *path, const uint8_t *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static size_t count_files(const char *dir)
{
    char cmd[700];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
    FILE *p = popen(cmd, "r");
    size_t n = 0;
    if (!p || fscanf(p, "%zu", &n) != 1)
        n = (size_t)-1;
    if (p)
        pclose(p);
    return n;
}

/* ---- round trip and key --------------------------------------------------- */

static void test_round_trip_bit_exact(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "round_trip");
    key_for(key, "round trip");
    ridge_model head = {0}, back = {0};
    fit_random_head(&head, 60, 7, 3, 1);
    top_error err;
    top_error_clear(&err);
    double acc = 2.0 / 3.0;
    top_status st = head_cache_store(dir, key, &head, acc, 60, 17, &err);
    CHECK_MSG(st == TOP_OK, "store failed: %s", err.message);

    int hit = 0;
    double acc_back = -1.0;
    size_t fit_n = 0, eval_n = 0;
    st = head_cache_load(&hit, &back, &acc_back, &fit_n, &eval_n, dir, key, 7, 3, &err);
    CHECK_MSG(st == TOP_OK, "load failed: %s", err.message);
    CHECK_INT_EQ(hit, 1);
    CHECK(back.coef != NULL);
    CHECK(back.coef && heads_equal(&head, &back));
    CHECK(memcmp(&acc, &acc_back, sizeof acc) == 0);
    CHECK_INT_EQ(fit_n, 60);
    CHECK_INT_EQ(eval_n, 17);

    /* The entry is a plain safetensors file with readable metadata. */
    char path[700];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, key);
    st_file *f = NULL;
    CHECK(st_open(&f, path, &err) == TOP_OK);
    if (f) {
        const st_tensor_info *t = st_find(f, "coef");
        CHECK(t != NULL);
        if (t) {
            CHECK_INT_EQ(t->dtype, ST_DTYPE_F64);
            CHECK_INT_EQ(t->shape[0], 3);
            CHECK_INT_EQ(t->shape[1], 7);
        }
        const char *stored = st_metadata_get(f, "key");
        CHECK(stored != NULL);
        CHECK(stored && strcmp(stored, key) == 0);
        const char *fit_text = st_metadata_get(f, "fit_images");
        CHECK(fit_text != NULL);
        CHECK(fit_text && strcmp(fit_text, "60") == 0);
        st_close(f);
    }
    ridge_model_free(&head);
    ridge_model_free(&back);
}

/* Sets field i of in to a value other than base_inputs gives. */
static int mutate_field(head_cache_inputs *in, int i)
{
    switch (i) {
    case 0: in->code_version = "test 2"; return 1;
    case 1:
        in->model_sha256 = "1123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        return 1;
    case 2: in->feature_node = "block_13_expand_relu"; return 1;
    case 3: in->input_height = 112; return 1;
    case 4: in->input_width = 112; return 1;
    case 5: in->dataset_uri = "idx:t10k-images.gz,t10k-labels.gz"; return 1;
    case 6: in->dataset_fingerprint = "f00e"; return 1;
    case 7: in->calib_count = 64; return 1;
    case 8: in->fit_count = 201; return 1;
    case 9: in->eval_count = 99; return 1;
    case 10: in->seed = 8; return 1;
    case 11: in->alpha = nextafter(1.0, 2.0); return 1;
    case 12: in->balanced = 0; return 1;
    }
    return 0;
}

static void test_key_changes_with_each_field(void)
{
    enum { N_FIELDS = 13 };
    head_cache_inputs in;
    char base[SHA256_HEX_BYTES], again[SHA256_HEX_BYTES], keys[N_FIELDS][SHA256_HEX_BYTES];
    top_error err;
    top_error_clear(&err);
    base_inputs(&in);
    CHECK(head_cache_key(base, &in, &err) == TOP_OK);
    CHECK_INT_EQ(strlen(base), 64);
    CHECK(head_cache_key(again, &in, &err) == TOP_OK);
    CHECK(strcmp(base, again) == 0);

    for (int i = 0; i < N_FIELDS; i++) {
        base_inputs(&in);
        CHECK(mutate_field(&in, i));
        CHECK(head_cache_key(keys[i], &in, &err) == TOP_OK);
        CHECK_MSG(strcmp(keys[i], base) != 0, "field %d does not change the key", i);
        for (int j = 0; j < i; j++)
            CHECK_MSG(strcmp(keys[i], keys[j]) != 0, "fields %d and %d give one key", i, j);
    }
    CHECK_INT_EQ(mutate_field(&in, N_FIELDS), 0);

    /* Equivalent spellings give the same key. */
    base_inputs(&in);
    in.balanced = 5;
    CHECK(head_cache_key(again, &in, &err) == TOP_OK);
    CHECK(strcmp(base, again) == 0);
    base_inputs(&in);
    in.code_version = NULL;
    CHECK(head_cache_key(keys[0], &in, &err) == TOP_OK);
    in.code_version = "";
    CHECK(head_cache_key(again, &in, &err) == TOP_OK);
    CHECK(strcmp(keys[0], again) == 0);
}

static void test_key_strings_are_unambiguous(void)
{
    head_cache_inputs in;
    char a[SHA256_HEX_BYTES], b[SHA256_HEX_BYTES];
    base_inputs(&in);
    in.dataset_uri = "folder:ab";
    in.dataset_fingerprint = "c";
    CHECK(head_cache_key(a, &in, NULL) == TOP_OK);
    in.dataset_uri = "folder:a";
    in.dataset_fingerprint = "bc";
    CHECK(head_cache_key(b, &in, NULL) == TOP_OK);
    CHECK(strcmp(a, b) != 0);
}

static void test_key_rejects_bad_inputs(void)
{
    static char long_name[HEAD_CACHE_MAX_STRING + 2];
    memset(long_name, 'n', sizeof long_name - 1);
    for (int i = 0; i < 9; i++) {
        head_cache_inputs in;
        base_inputs(&in);
        switch (i) {
        case 0: in.model_sha256 = NULL; break;
        case 1:
            in.model_sha256 =
                "0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef";
            break;
        case 2: in.model_sha256 = "0123"; break;
        case 3: in.alpha = 0.0; break;
        case 4: in.alpha = NAN; break;
        case 5: in.feature_node = ""; break;
        case 6: in.input_width = 0; break;
        case 7: in.fit_count = 0; break;
        case 8: in.feature_node = long_name; break;
        }
        char key[SHA256_HEX_BYTES] = "x";
        top_error err;
        top_error_clear(&err);
        CHECK_MSG(head_cache_key(key, &in, &err) == TOP_ERR_INVALID, "case %d accepted", i);
        CHECK_MSG(key[0] == '\0', "case %d left a key", i);
        CHECK_MSG(err.message[0] != '\0', "case %d has no message", i);
    }
}

/* ---- misses and corrupt entries -------------------------------------------- */

static void test_missing_entry_is_miss(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "no_such_dir");
    key_for(key, "missing");
    CHECK_INT_EQ(load_hit(dir, key, 4, 3, NULL), 0);
}

/* Stores a small head and returns the entry's bytes and path. */
static long small_entry(uint8_t **bytes, char *path, size_t path_size, const char *dir,
                        const char *key)
{
    ridge_model head = {0};
    fit_random_head(&head, 20, 3, 2, 2);
    top_error err;
    top_error_clear(&err);
    top_status st = head_cache_store(dir, key, &head, 0.75, 20, 10, &err);
    CHECK_MSG(st == TOP_OK, "store failed: %s", err.message);
    ridge_model_free(&head);
    snprintf(path, path_size, "%s/%s.safetensors", dir, key);
    return file_bytes(bytes, path);
}

static void test_truncated_entries_are_misses(void)
{
    char dir[600], path[700], key[SHA256_HEX_BYTES];
    uint8_t *bytes = NULL;
    tmp_path(dir, sizeof dir, "truncated");
    key_for(key, "truncated");
    long n = small_entry(&bytes, path, sizeof path, dir, key);
    CHECK(n > 100);
    for (long len = 0; len < n; len++) {
        CHECK(write_bytes(path, bytes, (size_t)len) == 0);
        int hit = load_hit(dir, key, 3, 2, NULL);
        CHECK_MSG(hit == 0, "prefix of %ld of %ld bytes gave %d", len, n, hit);
    }
    CHECK(write_bytes(path, bytes, (size_t)n) == 0);
    CHECK_INT_EQ(load_hit(dir, key, 3, 2, NULL), 1);
    free(bytes);
}

static void test_flipped_bytes_are_misses(void)
{
    char dir[600], path[700], key[SHA256_HEX_BYTES];
    uint8_t *bytes = NULL;
    tmp_path(dir, sizeof dir, "flipped");
    key_for(key, "flipped");
    long n = small_entry(&bytes, path, sizeof path, dir, key);
    CHECK(n > 100);
    for (long i = 0; i < n; i++) {
        for (int bit = 0; bit < 8; bit += 7) {
            bytes[i] ^= (uint8_t)(1u << bit);
            CHECK(write_bytes(path, bytes, (size_t)n) == 0);
            int hit = load_hit(dir, key, 3, 2, NULL);
            CHECK_MSG(hit == 0, "bit %d of byte %ld of %ld flipped gave %d", bit, i, n, hit);
            bytes[i] ^= (uint8_t)(1u << bit);
        }
    }
    free(bytes);
}

static void test_wrong_shape_is_miss(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "shapes");
    key_for(key, "shapes");
    ridge_model head = {0};
    fit_random_head(&head, 30, 4, 3, 3);
    CHECK(head_cache_store(dir, key, &head, 0.5, 30, 10, NULL) == TOP_OK);
    CHECK_INT_EQ(load_hit(dir, key, 4, 3, NULL), 1);
    CHECK_INT_EQ(load_hit(dir, key, 3, 4, NULL), 0);
    CHECK_INT_EQ(load_hit(dir, key, 5, 3, NULL), 0);
    CHECK_INT_EQ(load_hit(dir, key, 4, 2, NULL), 0);
    CHECK_INT_EQ(load_hit(dir, key, 12, 1, NULL), 0);
    ridge_model_free(&head);
}

typedef struct entry_spec {
    st_dtype coef_dtype;
    int64_t classes, features;
    double coef_value, accuracy;
    int extra_tensor, drop_metadata;
} entry_spec;

/* Writes an entry by hand as head_cache_store lays it out, with a valid
 * content_sha256, so only the field under test is wrong. */
static void write_entry(const char *path, const char *key, const entry_spec *s)
{
    size_t c = (size_t)s->classes, d = (size_t)s->features, cd = c * d;
    size_t coef_size = s->coef_dtype == ST_DTYPE_F64 ? 8 : 4;
    uint8_t *buf = calloc(cd * coef_size + 8 * (c + 1), 1);
    for (size_t i = 0; i < cd; i++) {
        if (s->coef_dtype == ST_DTYPE_F64)
            memcpy(buf + 8 * i, &s->coef_value, 8);
        else {
            float v = (float)s->coef_value;
            memcpy(buf + 4 * i, &v, 4);
        }
    }
    memcpy(buf + cd * coef_size + 8 * c, &s->accuracy, 8); /* intercepts stay 0 */
    sha256_ctx ctx;
    uint8_t digest[SHA256_DIGEST_BYTES];
    char hex[SHA256_HEX_BYTES];
    sha256_init(&ctx);
    sha256_update(&ctx, buf, cd * coef_size + 8 * (c + 1));
    sha256_update(&ctx, "20\0" "10", 6); /* the counts, each with its NUL */
    sha256_final(&ctx, digest);
    sha256_hex(hex, digest);

    st_writer *w = NULL;
    const int64_t coef_shape[2] = {s->classes, s->features}, c_shape[1] = {s->classes};
    const int64_t one[1] = {1};
    CHECK(st_writer_new(&w, NULL) == TOP_OK);
    st_writer_add(w, "coef", s->coef_dtype, 2, coef_shape, buf, cd * coef_size, NULL);
    st_writer_add(w, "intercept", ST_DTYPE_F64, 1, c_shape, buf + cd * coef_size, 8 * c, NULL);
    st_writer_add(w, "dense_accuracy", ST_DTYPE_F64, 1, one, buf + cd * coef_size + 8 * c, 8,
                  NULL);
    if (s->extra_tensor)
        st_writer_add(w, "extra", ST_DTYPE_F64, 1, one, buf, 8, NULL);
    st_writer_set_metadata(w, "format", "topiary-head-cache", NULL);
    st_writer_set_metadata(w, "format_version", "1", NULL);
    if (!s->drop_metadata)
        st_writer_set_metadata(w, "key", key, NULL);
    st_writer_set_metadata(w, "content_sha256", hex, NULL);
    st_writer_set_metadata(w, "fit_images", "20", NULL);
    st_writer_set_metadata(w, "eval_images", "10", NULL);
    CHECK(st_writer_write(w, path, NULL) == TOP_OK);
    st_writer_free(w);
    free(buf);
}

static void test_hand_written_entries(void)
{
    char dir[600], path[700], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "hand");
    mkdir(dir, 0700);
    key_for(key, "hand");
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, key);
    const entry_spec good = {ST_DTYPE_F64, 2, 3, 0.25, 0.5, 0, 0};
    entry_spec cases[] = {good, good, good, good, good, good, good};
    cases[1].coef_dtype = ST_DTYPE_F32;
    cases[2].coef_value = NAN;
    cases[3].coef_value = INFINITY;
    cases[4].accuracy = 1.5;
    cases[5].extra_tensor = 1;
    cases[6].drop_metadata = 1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_entry(path, key, &cases[i]);
        ridge_model m = {0};
        int hit = load_hit(dir, key, 3, 2, &m);
        CHECK_MSG(hit == (i == 0), "case %zu gave %d", i, hit);
        if (hit == 1) {
            CHECK(m.coef[5] == 0.25);
            CHECK(m.intercept[1] == 0.0);
        }
        ridge_model_free(&m);
    }
}

static void test_foreign_key_is_miss(void)
{
    char dir[600], path[700], other[700], key[SHA256_HEX_BYTES], key2[SHA256_HEX_BYTES];
    uint8_t *bytes = NULL;
    tmp_path(dir, sizeof dir, "foreign");
    key_for(key, "foreign a");
    key_for(key2, "foreign b");
    long n = small_entry(&bytes, path, sizeof path, dir, key);
    snprintf(other, sizeof other, "%s/%s.safetensors", dir, key2);
    CHECK(n > 0);
    CHECK(write_bytes(other, bytes, (size_t)n) == 0);
    CHECK_INT_EQ(load_hit(dir, key, 3, 2, NULL), 1);
    CHECK_INT_EQ(load_hit(dir, key2, 3, 2, NULL), 0);
    free(bytes);
}

static void test_non_regular_entry(void)
{
    char dir[600], path[700], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "non_regular");
    key_for(key, "non regular");
    mkdir(dir, 0700);
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, key);
    CHECK(mkdir(path, 0700) == 0);
    CHECK_INT_EQ(load_hit(dir, key, 3, 2, NULL), 0);
    ridge_model head = {0};
    fit_random_head(&head, 20, 3, 2, 4);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(head_cache_store(dir, key, &head, 0.5, 20, 10, &err), TOP_ERR_IO);
    CHECK(strstr(err.message, "rename") != NULL);
    CHECK_INT_EQ(count_files(dir), 1); /* the temporary file is gone */
    ridge_model_free(&head);
}

static void test_io_errors_are_errors(void)
{
    char file[600], dir[700], key[SHA256_HEX_BYTES];
    tmp_path(file, sizeof file, "plain_file");
    CHECK(write_bytes(file, (const uint8_t *)"x", 1) == 0);
    snprintf(dir, sizeof dir, "%s/sub", file);
    key_for(key, "io");
    CHECK_INT_EQ(load_hit(dir, key, 3, 2, NULL), -1);
    ridge_model head = {0};
    fit_random_head(&head, 20, 3, 2, 5);
    CHECK_INT_EQ(head_cache_store(dir, key, &head, 0.5, 20, 10, NULL), TOP_ERR_IO);
    CHECK_INT_EQ(head_cache_store(file, key, &head, 0.5, 20, 10, NULL), TOP_ERR_IO);
    ridge_model_free(&head);
}

static void test_bad_arguments(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "args");
    key_for(key, "args");
    ridge_model head = {0}, m;
    fit_random_head(&head, 20, 3, 2, 6);
    int hit;
    double acc;
    size_t a, b;
    CHECK_INT_EQ(head_cache_store(dir, "../../etc/passwd", &head, 0.5, 1, 1, NULL),
                 TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_store(dir, key, &head, NAN, 1, 1, NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_store(dir, key, &head, 1.25, 1, 1, NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_store("", key, &head, 0.5, 1, 1, NULL), TOP_ERR_INVALID);
    head.coef[1] = NAN;
    CHECK_INT_EQ(head_cache_store(dir, key, &head, 0.5, 1, 1, NULL), TOP_ERR_INVALID);
    char upper[SHA256_HEX_BYTES];
    memcpy(upper, key, sizeof upper);
    upper[0] = 'A';
    CHECK_INT_EQ(head_cache_load(&hit, &m, &acc, &a, &b, dir, upper, 3, 2, NULL),
                 TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_load(&hit, &m, &acc, &a, &b, dir, key, 0, 2, NULL),
                 TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_load(&hit, &m, &acc, &a, &b, dir, key, SIZE_MAX / 2, 4, NULL),
                 TOP_ERR_INVALID);
    ridge_model_free(&head);
}

/* ---- directories, replacement, concurrency --------------------------------- */

static void test_missing_dir_is_created(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "made/a/b/");
    key_for(key, "made");
    ridge_model head = {0};
    fit_random_head(&head, 20, 3, 2, 7);
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(head_cache_store(dir, key, &head, 0.5, 20, 10, &err) == TOP_OK, "%s",
              err.message);
    struct stat sb;
    CHECK(stat(dir, &sb) == 0);
    CHECK(S_ISDIR(sb.st_mode));
    CHECK_INT_EQ(sb.st_mode & 0777, 0700);
    CHECK_INT_EQ(load_hit(dir, key, 3, 2, NULL), 1);
    ridge_model_free(&head);
}

static void test_store_replaces_entry(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "replace");
    key_for(key, "replace");
    ridge_model first = {0}, second = {0}, back = {0};
    fit_random_head(&first, 20, 3, 2, 8);
    fit_random_head(&second, 20, 3, 2, 9);
    CHECK(head_cache_store(dir, key, &first, 0.25, 20, 10, NULL) == TOP_OK);
    CHECK(head_cache_store(dir, key, &second, 0.75, 21, 11, NULL) == TOP_OK);
    int hit = 0;
    double acc = 0.0;
    size_t fit_n = 0, eval_n = 0;
    CHECK(head_cache_load(&hit, &back, &acc, &fit_n, &eval_n, dir, key, 3, 2, NULL) ==
          TOP_OK);
    CHECK_INT_EQ(hit, 1);
    CHECK(back.coef && heads_equal(&back, &second));
    CHECK(acc == 0.75);
    CHECK_INT_EQ(fit_n, 21);
    CHECK_INT_EQ(count_files(dir), 1);
    ridge_model_free(&first);
    ridge_model_free(&second);
    ridge_model_free(&back);
}

typedef struct store_job {
    const char *dir, *key;
    const ridge_model *head;
    int failures;
} store_job;

static void *store_many(void *arg)
{
    store_job *job = arg;
    for (int i = 0; i < 25; i++)
        if (head_cache_store(job->dir, job->key, job->head, 0.5, 20, 10, NULL) != TOP_OK)
            job->failures++;
    return NULL;
}

static void test_concurrent_stores(void)
{
    char dir[600], key[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "concurrent");
    key_for(key, "concurrent");
    ridge_model a = {0}, b = {0}, back = {0};
    fit_random_head(&a, 40, 16, 4, 10);
    fit_random_head(&b, 40, 16, 4, 11);
    store_job jobs[2] = {{dir, key, &a, 0}, {dir, key, &b, 0}};
    pthread_t threads[2];
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&threads[i], NULL, store_many, &jobs[i]) == 0);
    for (int i = 0; i < 2; i++)
        pthread_join(threads[i], NULL);
    CHECK_INT_EQ(jobs[0].failures + jobs[1].failures, 0);
    CHECK_INT_EQ(load_hit(dir, key, 16, 4, &back), 1);
    CHECK(back.coef && (heads_equal(&back, &a) || heads_equal(&back, &b)));
    CHECK_INT_EQ(count_files(dir), 1);
    ridge_model_free(&a);
    ridge_model_free(&b);
    ridge_model_free(&back);
}

/* ---- fingerprints and model digests ---------------------------------------- */

static void set_mtime(const char *path, time_t sec)
{
    struct timespec times[2] = {{sec, 0}, {sec, 0}};
    CHECK(utimensat(AT_FDCWD, path, times, 0) == 0);
}

static void fingerprint(char hex[SHA256_HEX_BYTES], const char *path)
{
    top_error err;
    top_error_clear(&err);
    top_status st = head_cache_file_fingerprint(hex, SHA256_HEX_BYTES, path, &err);
    CHECK_MSG(st == TOP_OK, "fingerprint failed: %s", err.message);
}

static void test_file_fingerprint(void)
{
    char path[600], a[SHA256_HEX_BYTES], b[SHA256_HEX_BYTES];
    tmp_path(path, sizeof path, "fp_file");
    CHECK(write_bytes(path, (const uint8_t *)"abc", 3) == 0);
    set_mtime(path, 1000000000);
    fingerprint(a, path);
    fingerprint(b, path);
    CHECK(strcmp(a, b) == 0);
    set_mtime(path, 1000000001);
    fingerprint(b, path);
    CHECK(strcmp(a, b) != 0);
    CHECK(write_bytes(path, (const uint8_t *)"abcd", 4) == 0);
    set_mtime(path, 1000000000);
    fingerprint(b, path);
    CHECK(strcmp(a, b) != 0);
    char small[8];
    CHECK_INT_EQ(head_cache_file_fingerprint(small, sizeof small, path, NULL),
                 TOP_ERR_INVALID);
    tmp_path(path, sizeof path, "fp_missing");
    CHECK_INT_EQ(head_cache_file_fingerprint(a, sizeof a, path, NULL), TOP_ERR_IO);
}

static void test_folder_fingerprint(void)
{
    char root[600], cls[700], img[800], a[SHA256_HEX_BYTES], b[SHA256_HEX_BYTES];
    tmp_path(root, sizeof root, "fp_folder");
    snprintf(cls, sizeof cls, "%s/cat", root);
    snprintf(img, sizeof img, "%s/one.png", cls);
    CHECK(mkdir(root, 0700) == 0);
    CHECK(mkdir(cls, 0700) == 0);
    CHECK(write_bytes(img, (const uint8_t *)"png", 3) == 0);
    fingerprint(a, root);
    fingerprint(b, root);
    CHECK(strcmp(a, b) == 0);

    /* A rewritten image two levels down changes it, with every mtime kept. */
    CHECK(write_bytes(img, (const uint8_t *)"png2", 4) == 0);
    set_mtime(img, 1000000000);
    set_mtime(cls, 1000000000);
    set_mtime(root, 1000000000);
    fingerprint(a, root);
    CHECK(write_bytes(img, (const uint8_t *)"PNG2", 4) == 0);
    set_mtime(img, 1000000000);
    fingerprint(b, root);
    CHECK(strcmp(a, b) == 0); /* same size and mtime: identity, not content */
    CHECK(write_bytes(img, (const uint8_t *)"png22", 5) == 0);
    set_mtime(img, 1000000000);
    fingerprint(b, root);
    CHECK(strcmp(a, b) != 0);

    char dataset[SHA256_HEX_BYTES], uri[900];
    snprintf(uri, sizeof uri, "folder:%s", root);
    CHECK(head_cache_dataset_fingerprint(dataset, uri, NULL) == TOP_OK);
    CHECK(strcmp(dataset, b) != 0); /* the scheme is part of it */
    snprintf(uri, sizeof uri, "idx:%s", root);
    CHECK_INT_EQ(head_cache_dataset_fingerprint(dataset, uri, NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_dataset_fingerprint(dataset, "http://x", NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(head_cache_dataset_fingerprint(dataset, "bundle:", NULL), TOP_ERR_INVALID);
}

static void test_idx_fingerprint(void)
{
    char images[600], labels[600], uri[1300], a[SHA256_HEX_BYTES], b[SHA256_HEX_BYTES];
    tmp_path(images, sizeof images, "fp_images");
    tmp_path(labels, sizeof labels, "fp_labels");
    CHECK(write_bytes(images, (const uint8_t *)"imgs", 4) == 0);
    CHECK(write_bytes(labels, (const uint8_t *)"labs", 4) == 0);
    snprintf(uri, sizeof uri, "idx:%s,%s", images, labels);
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(head_cache_dataset_fingerprint(a, uri, &err) == TOP_OK, "%s", err.message);
    CHECK(head_cache_dataset_fingerprint(b, uri, NULL) == TOP_OK);
    CHECK(strcmp(a, b) == 0);
    CHECK(write_bytes(labels, (const uint8_t *)"labels", 6) == 0);
    CHECK(head_cache_dataset_fingerprint(b, uri, NULL) == TOP_OK);
    CHECK(strcmp(a, b) != 0);
    snprintf(uri, sizeof uri, "idx:%s,%s/missing", images, tmp_dir);
    CHECK_INT_EQ(head_cache_dataset_fingerprint(b, uri, NULL), TOP_ERR_IO);
}

static void test_model_sha256(void)
{
    char dir[600], json[700], shard[700], st_path[700];
    char a[SHA256_HEX_BYTES], b[SHA256_HEX_BYTES], plain[SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "model");
    CHECK(mkdir(dir, 0700) == 0);
    snprintf(json, sizeof json, "%s/model.json", dir);
    snprintf(shard, sizeof shard, "%s/group1-shard1of1.bin", dir);
    const char *doc = "{\"modelTopology\":{},\"weightsManifest\":[{\"paths\":"
                      "[\"group1-shard1of1.bin\"],\"weights\":[]}]}";
    CHECK(write_bytes(json, (const uint8_t *)doc, strlen(doc)) == 0);
    CHECK(write_bytes(shard, (const uint8_t *)"\1\2\3\4", 4) == 0);
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(head_cache_model_sha256(a, dir, &err) == TOP_OK, "%s", err.message);
    CHECK(head_cache_model_sha256(b, json, NULL) == TOP_OK);
    CHECK(strcmp(a, b) == 0);
    CHECK(write_bytes(shard, (const uint8_t *)"\1\2\3\5", 4) == 0);
    CHECK(head_cache_model_sha256(b, dir, NULL) == TOP_OK);
    CHECK(strcmp(a, b) != 0);

    const char *escape = "{\"weightsManifest\":[{\"paths\":[\"../x.bin\"],\"weights\":[]}]}";
    CHECK(write_bytes(json, (const uint8_t *)escape, strlen(escape)) == 0);
    CHECK_INT_EQ(head_cache_model_sha256(b, dir, NULL), TOP_ERR_FORMAT);

    /* A safetensors model's digest is its plain sha256sum. */
    snprintf(st_path, sizeof st_path, "%s/resnet.safetensors", dir);
    st_writer *w = NULL;
    const int64_t shape[1] = {2};
    const float values[2] = {1.0f, 2.0f};
    CHECK(st_writer_new(&w, NULL) == TOP_OK);
    CHECK(st_writer_add(w, "fc.bias", ST_DTYPE_F32, 1, shape, values, 8, NULL) == TOP_OK);
    CHECK(st_writer_write(w, st_path, NULL) == TOP_OK);
    st_writer_free(w);
    CHECK(head_cache_model_sha256(a, st_path, NULL) == TOP_OK);
    CHECK(sha256_file(plain, st_path, NULL) == TOP_OK);
    CHECK(strcmp(a, plain) == 0);
}

/* ---- last use and pruning --------------------------------------------------- */

static void test_load_marks_use(void)
{
    char dir[600], path[700], key[SHA256_HEX_BYTES];
    uint8_t *bytes = NULL;
    tmp_path(dir, sizeof dir, "mark");
    key_for(key, "mark");
    CHECK(small_entry(&bytes, path, sizeof path, dir, key) > 0);
    set_mtime(path, 1000000000);
    CHECK_INT_EQ(load_hit(dir, key, 3, 2, NULL), 1);
    struct stat sb;
    CHECK(stat(path, &sb) == 0);
    CHECK(sb.st_mtime > 1000000000);
    free(bytes);
}

static void test_prune_oldest_first(void)
{
    char dir[600], path[800], keys[3][SHA256_HEX_BYTES];
    tmp_path(dir, sizeof dir, "prune");
    ridge_model head = {0};
    fit_random_head(&head, 20, 3, 2, 12);
    struct stat sb;
    for (int i = 0; i < 3; i++) {
        char text[32];
        snprintf(text, sizeof text, "prune %d", i);
        key_for(keys[i], text);
        CHECK(head_cache_store(dir, keys[i], &head, 0.5, 20, 10, NULL) == TOP_OK);
        snprintf(path, sizeof path, "%s/%s.safetensors", dir, keys[i]);
        set_mtime(path, 1000000000 + 100 * (2 - i)); /* keys[2] is the oldest */
    }
    CHECK(stat(path, &sb) == 0);
    size_t entry_bytes = (size_t)sb.st_size;
    time_t now = time(NULL);

    snprintf(path, sizeof path, "%s/.%s.1.2.0000000000000000.part", dir, keys[0]);
    CHECK(write_bytes(path, (const uint8_t *)"x", 1) == 0);
    set_mtime(path, now - 7200); /* a crashed store's leftover */
    snprintf(path, sizeof path, "%s/.%s.1.3.0000000000000000.part", dir, keys[0]);
    CHECK(write_bytes(path, (const uint8_t *)"x", 1) == 0); /* a store under way */
    snprintf(path, sizeof path, "%s/notes.txt", dir);
    CHECK(write_bytes(path, (const uint8_t *)"x", 1) == 0);

    size_t removed = 0;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(head_cache_prune(dir, entry_bytes + entry_bytes / 2, &removed, &err) == TOP_OK,
              "%s", err.message);
    CHECK_INT_EQ(removed, 3);
    CHECK_INT_EQ(load_hit(dir, keys[0], 3, 2, NULL), 1);
    CHECK_INT_EQ(load_hit(dir, keys[1], 3, 2, NULL), 0);
    CHECK_INT_EQ(load_hit(dir, keys[2], 3, 2, NULL), 0);
    CHECK_INT_EQ(count_files(dir), 3);

    CHECK(head_cache_prune(dir, 0, &removed, NULL) == TOP_OK);
    CHECK_INT_EQ(removed, 1);
    tmp_path(path, sizeof path, "prune_missing");
    CHECK(head_cache_prune(path, 0, &removed, NULL) == TOP_OK);
    CHECK_INT_EQ(removed, 0);
    ridge_model_free(&head);
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/topiary_head_cache_XXXXXX",
             base && base[0] ? base : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    TEST_RUN(test_round_trip_bit_exact);
    TEST_RUN(test_key_changes_with_each_field);
    TEST_RUN(test_key_strings_are_unambiguous);
    TEST_RUN(test_key_rejects_bad_inputs);
    TEST_RUN(test_missing_entry_is_miss);
    TEST_RUN(test_truncated_entries_are_misses);
    TEST_RUN(test_flipped_bytes_are_misses);
    TEST_RUN(test_wrong_shape_is_miss);
    TEST_RUN(test_hand_written_entries);
    TEST_RUN(test_foreign_key_is_miss);
    TEST_RUN(test_non_regular_entry);
    TEST_RUN(test_io_errors_are_errors);
    TEST_RUN(test_bad_arguments);
    TEST_RUN(test_missing_dir_is_created);
    TEST_RUN(test_store_replaces_entry);
    TEST_RUN(test_concurrent_stores);
    TEST_RUN(test_file_fingerprint);
    TEST_RUN(test_folder_fingerprint);
    TEST_RUN(test_idx_fingerprint);
    TEST_RUN(test_model_sha256);
    TEST_RUN(test_load_marks_use);
    TEST_RUN(test_prune_oldest_first);

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp_dir);
    return TEST_FINISH();
}
