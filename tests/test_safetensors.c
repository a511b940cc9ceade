/*
 * safetensors: writer-reader round trips of every dtype, files built byte by
 * byte as the reference implementation lays them out, float32 conversion of
 * every dtype, a table of corrupt headers, every truncation of a valid file,
 * and the writer's error paths. Files go to a fresh directory under $TMPDIR.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "test.h"

static char tmp_dir[512];

/* Stores "<tmp_dir>/<name>" in out. */
static const char *tmp_path(char *out, size_t size, const char *name)
{
    snprintf(out, size, "%s/%s", tmp_dir, name);
    return out;
}

static void put_le(uint8_t *p, uint64_t v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t f64_bits(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof b);
    return b;
}

/*
 * Returns a malloc'd file: the 8-byte length header_len, the header text and
 * data_len bytes of data (copied from data, or a byte pattern if NULL).
 * header_len normally equals strlen(header); corrupt cases lie about it.
 */
static uint8_t *build_file(size_t *size, uint64_t header_len, const char *header,
                           const uint8_t *data, size_t data_len)
{
    size_t text_len = strlen(header);
    *size = 8 + text_len + data_len;
    uint8_t *buf = malloc(*size);
    if (!buf)
        return NULL;
    put_le(buf, header_len, 8);
    memcpy(buf + 8, header, text_len);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + text_len + i] = data ? data[i] : (uint8_t)(i * 7 + 1);
    return buf;
}

static int write_bytes(const char *path, const uint8_t *buf, size_t size)
{
    FILE *fp = fopen(path, "wb");
    if (!fp)
        return -1;
    size_t n = fwrite(buf, 1, size, fp);
    return (fclose(fp) == 0 && n == size) ? 0 : -1;
}

/* Reads a whole file into a malloc'd buffer. */
static uint8_t *read_bytes(const char *path, size_t *size)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    uint8_t *buf = NULL;
    if (fseek(fp, 0, SEEK_END) == 0) {
        long n = ftell(fp);
        rewind(fp);
        buf = n > 0 ? malloc((size_t)n) : NULL;
        if (buf && fread(buf, 1, (size_t)n, fp) != (size_t)n) {
            free(buf);
            buf = NULL;
        }
        *size = buf ? (size_t)n : 0;
    }
    fclose(fp);
    return buf;
}

static int file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* ---- dtypes ------------------------------------------------------------- */

static void test_dtype_names_and_sizes(void)
{
    const char *names[ST_DTYPE_COUNT] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16",
                                         "I8",  "U64", "U32", "U16",  "U8",  "BOOL"};
    const size_t sizes[ST_DTYPE_COUNT] = {8, 4, 2, 2, 8, 4, 2, 1, 8, 4, 2, 1, 1};
    for (int d = 0; d < ST_DTYPE_COUNT; d++) {
        const char *s = st_dtype_str((st_dtype)d);
        CHECK_MSG(s && strcmp(s, names[d]) == 0, "dtype %d is named %s, expected %s", d,
                  s ? s : "NULL", names[d]);
        CHECK_INT_EQ(st_dtype_size((st_dtype)d), sizes[d]);
    }
    CHECK(st_dtype_str(ST_DTYPE_COUNT) == NULL);
    CHECK(st_dtype_str((st_dtype)-1) == NULL);
    CHECK_INT_EQ(st_dtype_size(ST_DTYPE_COUNT), 0);
}

/* ---- round trip --------------------------------------------------------- */

/* One tensor per dtype, added in reverse dtype order so that insertion
 * order differs from both dtype and name order, plus an empty tensor and a
 * scalar. */
typedef struct rt_tensor {
    char name[32];
    st_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    size_t bytes;
    uint8_t data[160];
} rt_tensor;

static size_t rt_build(rt_tensor *ts)
{
    size_t n = 0;
    for (int d = ST_DTYPE_COUNT - 1; d >= 0; d--) {
        rt_tensor *t = &ts[n++];
        snprintf(t->name, sizeof t->name, "layer%d.%s", d, st_dtype_str((st_dtype)d));
        t->dtype = (st_dtype)d;
        t->ndim = 1 + d % 3;
        size_t numel = 1;
        for (int i = 0; i < t->ndim; i++) {
            t->shape[i] = 2 + (d + i) % 2;
            numel *= (size_t)t->shape[i];
        }
        t->bytes = numel * st_dtype_size(t->dtype);
        for (size_t i = 0; i < t->bytes; i++)
            t->data[i] = (uint8_t)(d * 31 + i * 7);
        if (d == 6) {
            rt_tensor *e = &ts[n++];
            *e = (rt_tensor){
                .name = "empty", .dtype = ST_DTYPE_F32, .ndim = 2, .shape = {0, 4}, .bytes = 0};
        }
    }
    rt_tensor *s = &ts[n++];
    *s = (rt_tensor){.name = "scalar", .dtype = ST_DTYPE_F64, .ndim = 0, .bytes = 8};
    put_le(s->data, f64_bits(-0.375), 8);
    return n;
}

static void check_rt_tensor(const st_file *f, const st_tensor_info *info, const rt_tensor *t)
{
    CHECK_MSG(strcmp(info->name, t->name) == 0, "tensor is %s, expected %s", info->name,
              t->name);
    CHECK_INT_EQ(info->dtype, t->dtype);
    CHECK_INT_EQ(info->ndim, t->ndim);
    for (int i = 0; i < t->ndim && i < info->ndim; i++)
        CHECK_INT_EQ(info->shape[i], t->shape[i]);
    CHECK_INT_EQ(info->end - info->begin, t->bytes);
    CHECK_INT_EQ(info->numel * st_dtype_size(info->dtype), t->bytes);
    CHECK_MSG(t->bytes == 0 || memcmp(st_tensor_data(f, info), t->data, t->bytes) == 0,
              "tensor %s: bytes differ after the round trip", t->name);
}

static int rt_write(const char *path, const rt_tensor *ts, size_t n)
{
    st_writer *w = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = st_writer_new(&w, &err);
    for (size_t i = 0; st == TOP_OK && i < n; i++)
        st = st_writer_add(w, ts[i].name, ts[i].dtype, ts[i].ndim, ts[i].shape, ts[i].data,
                           ts[i].bytes, &err);
    /* Keys in a non-alphabetical order; "format" is then replaced. */
    const char *meta[][2] = {
        {"format", "pt"}, {"z_first", "1"}, {"a_second", "2"}, {"format", "topiary"}};
    for (size_t i = 0; st == TOP_OK && i < 4; i++)
        st = st_writer_set_metadata(w, meta[i][0], meta[i][1], &err);
    if (st == TOP_OK)
        st = st_writer_write(w, path, &err);
    CHECK_MSG(st == TOP_OK, "writing %s failed: %s", path, err.message);
    st_writer_free(w);
    return st == TOP_OK ? 0 : -1;
}

static void test_round_trip_every_dtype(void)
{
    rt_tensor ts[ST_DTYPE_COUNT + 2];
    size_t n = rt_build(ts);
    char path[600], tmp[640];
    tmp_path(path, sizeof path, "round_trip.safetensors");
    if (rt_write(path, ts, n))
        return;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK_MSG(!file_exists(tmp), "%s is left behind", tmp);

    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(st_open(&f, path, &err) == TOP_OK, "open failed: %s", err.message);
    if (!f)
        return;
    CHECK_INT_EQ(st_tensor_count(f), n);
    for (size_t i = 0; i < n && i < st_tensor_count(f); i++) {
        check_rt_tensor(f, st_tensor_at(f, i), &ts[i]);
        CHECK(st_find(f, ts[i].name) == st_tensor_at(f, i));
    }
    CHECK(st_tensor_at(f, n) == NULL);

    CHECK_INT_EQ(st_metadata_count(f), 3);
    const char *keys[3] = {"format", "z_first", "a_second"};
    const char *values[3] = {"topiary", "1", "2"};
    for (size_t i = 0; i < 3 && i < st_metadata_count(f); i++) {
        CHECK_MSG(strcmp(st_metadata_key(f, i), keys[i]) == 0, "metadata key %zu is %s", i,
                  st_metadata_key(f, i));
        CHECK_MSG(strcmp(st_metadata_value(f, i), values[i]) == 0, "metadata value %zu is %s",
                  i, st_metadata_value(f, i));
    }
    const char *format = st_metadata_get(f, "format");
    CHECK(format != NULL);
    CHECK(format == NULL || strcmp(format, "topiary") == 0);
    CHECK(st_metadata_get(f, "missing") == NULL);
    CHECK(st_metadata_key(f, 3) == NULL);
    st_close(f);
}

/* The header is compact JSON with __metadata__ first and the tensors in the
 * order added, padded with spaces so the data starts at a multiple of 8. */
static void test_writer_header_layout(void)
{
    rt_tensor ts[ST_DTYPE_COUNT + 2];
    size_t n = rt_build(ts);
    char path[600];
    tmp_path(path, sizeof path, "layout.safetensors");
    if (rt_write(path, ts, n))
        return;
    size_t size = 0;
    uint8_t *buf = read_bytes(path, &size);
    CHECK(buf != NULL);
    CHECK(size > 8);
    if (!buf || size <= 8)
        return;

    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | buf[i];
    CHECK_INT_EQ((8 + header_len) % 8, 0);
    CHECK(header_len <= size - 8);
    char *header = strndup((const char *)buf + 8, (size_t)header_len);
    const char *meta = "{\"__metadata__\":{\"format\":\"topiary\",\"z_first\":\"1\","
                       "\"a_second\":\"2\"},";
    CHECK_MSG(strncmp(header, meta, strlen(meta)) == 0, "header starts %.80s", header);

    char *last = strrchr(header, '}');
    CHECK(last != NULL);
    for (const char *p = last ? last + 1 : header; *p; p++)
        CHECK_MSG(*p == ' ', "padding byte %ld is 0x%02x, expected a space", (long)(p - header),
                  (unsigned char)*p);

    const char *prev = header;
    for (size_t i = 0; i < n; i++) {
        char quoted[48];
        snprintf(quoted, sizeof quoted, "\"%.32s\":", ts[i].name);
        const char *at = strstr(header, quoted);
        CHECK_MSG(at && at > prev, "tensor %s is not after the previous one in the header",
                  ts[i].name);
        prev = at ? at : prev;
    }
    free(header);
    free(buf);
}

static void test_writer_add_f32_round_trip(void)
{
    tensor t, back;
    top_error err;
    top_error_clear(&err);
    int64_t shape[4] = {2, 3, 1, 5};
    CHECK_INT_EQ(tensor_init(&t, 4, shape, &err), TOP_OK);
    for (size_t i = 0; i < t.numel; i++)
        t.data[i] = (float)i * 0.25f - 3.0f;
    st_writer *w = NULL;
    CHECK_INT_EQ(st_writer_new(&w, &err), TOP_OK);
    CHECK_INT_EQ(st_writer_add_f32(w, "conv.weight", &t, &err), TOP_OK);
    char path[600];
    tmp_path(path, sizeof path, "f32.safetensors");
    CHECK_MSG(st_writer_write(w, path, &err) == TOP_OK, "write failed: %s", err.message);
    st_writer_free(w);

    st_file *f = NULL;
    CHECK_MSG(st_open(&f, path, &err) == TOP_OK, "open failed: %s", err.message);
    if (f) {
        const st_tensor_info *info = st_find(f, "conv.weight");
        CHECK(info != NULL);
        CHECK_INT_EQ(st_metadata_count(f), 0);
        if (info && st_read_f32(f, info, &back, &err) == TOP_OK) {
            CHECK(tensor_same_shape(&t, &back));
            for (size_t i = 0; i < t.numel; i++)
                CHECK_CLOSE_AT(back.data[i], t.data[i], 0.0, i);
            tensor_free(&back);
        }
        st_close(f);
    }
    tensor_free(&t);
}

/* ---- files built by hand ------------------------------------------------ */

/* A file as PyTorch's safetensors package lays it out for a 2x3 linear
 * layer: {"format": "pt"} metadata, keys sorted, header padded with spaces
 * to a multiple of 8, float32 little-endian data with the bias first. */
static uint8_t *build_linear_file(size_t *size)
{
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"fc.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"fc.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                       "\"data_offsets\":[8,32]}}";
    char header[256];
    size_t len = strlen(json), padded = (len + 7) / 8 * 8;
    memcpy(header, json, len);
    memset(header + len, ' ', padded - len);
    header[padded] = '\0';
    /* bias (0.5, -1), weight ((1, 2, 3), (-4, 0.25, 1e-3)) as raw bytes */
    static const uint8_t data[32] = {
        0x00, 0x00, 0x00, 0x3f, 0x00, 0x00, 0x80, 0xbf, /* 0.5, -1 */
        0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40, /* 1, 2 */
        0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x80, 0xc0, /* 3, -4 */
        0x00, 0x00, 0x80, 0x3e, 0x6f, 0x12, 0x83, 0x3a, /* 0.25, 0.001 */
    };
    return build_file(size, padded, header, data, sizeof data);
}

static void check_linear_file(const st_file *f)
{
    CHECK_INT_EQ(st_tensor_count(f), 2);
    const char *format = st_metadata_get(f, "format");
    CHECK(format != NULL);
    CHECK(format == NULL || strcmp(format, "pt") == 0);
    const st_tensor_info *bias = st_find(f, "fc.bias"), *weight = st_find(f, "fc.weight");
    CHECK(bias == st_tensor_at(f, 0));
    CHECK(weight == st_tensor_at(f, 1));
    if (!bias || !weight)
        return;
    tensor t;
    top_error err;
    top_error_clear(&err);
    const float expected_bias[2] = {0.5f, -1.0f};
    CHECK_INT_EQ(st_read_f32(f, bias, &t, &err), TOP_OK);
    for (size_t i = 0; i < 2 && t.data; i++)
        CHECK_CLOSE_AT(t.data[i], expected_bias[i], 0.0, i);
    tensor_free(&t);

    const float expected_weight[6] = {1.0f, 2.0f, 3.0f, -4.0f, 0.25f, 0.001f};
    CHECK_INT_EQ(st_read_f32(f, weight, &t, &err), TOP_OK);
    CHECK_INT_EQ(t.ndim, 2);
    CHECK_INT_EQ(t.shape[0], 2);
    CHECK_INT_EQ(t.shape[1], 3);
    for (size_t i = 0; i < 6 && t.data; i++)
        CHECK_CLOSE_AT(t.data[i], expected_weight[i], 0.0, i);
    tensor_free(&t);
}

static void test_reference_layout_file(void)
{
    size_t size = 0;
    uint8_t *buf = build_linear_file(&size);
    if (!buf)
        return;
    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(st_open_memory(&f, buf, size, &err) == TOP_OK, "memory: %s", err.message);
    if (f) {
        check_linear_file(f);
        st_close(f);
    }

    char path[600];
    tmp_path(path, sizeof path, "linear.safetensors");
    CHECK(write_bytes(path, buf, size) == 0);
    CHECK_MSG(st_open(&f, path, &err) == TOP_OK, "file: %s", err.message);
    if (f) {
        check_linear_file(f);
        st_close(f);
    }
    free(buf);
}

/* Two values per dtype as little-endian bytes and the float32 each must
 * convert to. */
typedef struct conv_case {
    st_dtype dtype;
    uint64_t raw[2];
    float expected[2];
} conv_case;

static const conv_case conv_cases[] = {
    {ST_DTYPE_F32, {0x3f800000u, 0xbf000000u}, {1.0f, -0.5f}},
    {ST_DTYPE_F16, {0x3c00u, 0x0001u}, {1.0f, 5.9604644775390625e-8f}},
    {ST_DTYPE_F16, {0xc000u, 0x7bffu}, {-2.0f, 65504.0f}},
    {ST_DTYPE_BF16, {0x3f80u, 0x4049u}, {1.0f, 3.140625f}},
    {ST_DTYPE_BF16, {0xc040u, 0x0000u}, {-3.0f, 0.0f}},
    {ST_DTYPE_I64, {(uint64_t)-3, (uint64_t)1 << 40}, {-3.0f, 1099511627776.0f}},
    {ST_DTYPE_I32, {0x80000000u, 7u}, {-2147483648.0f, 7.0f}},
    {ST_DTYPE_I16, {0x8000u, 12345u}, {-32768.0f, 12345.0f}},
    {ST_DTYPE_I8, {0x80u, 0x7fu}, {-128.0f, 127.0f}},
    {ST_DTYPE_U64, {UINT64_MAX, 5u}, {18446744073709551616.0f, 5.0f}},
    {ST_DTYPE_U32, {0xffffffffu, 0u}, {4294967296.0f, 0.0f}},
    {ST_DTYPE_U16, {0xffffu, 1u}, {65535.0f, 1.0f}},
    {ST_DTYPE_U8, {0xffu, 0u}, {255.0f, 0.0f}},
    {ST_DTYPE_BOOL, {1u, 0u}, {1.0f, 0.0f}},
};

static void check_conversions(const st_file *f, const char *source)
{
    size_t n = sizeof conv_cases / sizeof conv_cases[0];
    top_error err;
    top_error_clear(&err);
    for (size_t c = 0; c < n; c++) {
        char name[16];
        snprintf(name, sizeof name, "c%zu", c);
        tensor t = {0};
        const st_tensor_info *info = st_find(f, name);
        CHECK_MSG(info && st_read_f32(f, info, &t, &err) == TOP_OK, "%s %s: %s", source, name,
                  err.message);
        if (!t.data)
            continue;
        CHECK_INT_EQ(t.numel, 2);
        for (size_t i = 0; i < 2; i++)
            CHECK_MSG(t.data[i] == conv_cases[c].expected[i],
                      "%s %s (%s)[%zu] = %.9g, expected %.9g", source, name,
                      st_dtype_str(conv_cases[c].dtype), i, t.data[i],
                      conv_cases[c].expected[i]);
        tensor_free(&t);
    }

    tensor t = {0};
    const st_tensor_info *info = st_find(f, "f64");
    CHECK_MSG(info && st_read_f32(f, info, &t, &err) == TOP_OK, "%s f64: %s", source,
              err.message);
    if (t.data) {
        CHECK(t.data[0] == 0.1f);
        CHECK(isinf(t.data[1]));
        CHECK(t.data[1] > 0);
        CHECK(t.data[2] == -2.5f);
        tensor_free(&t);
    }
}

/* Builds a file with one two-element tensor per conversion case and an F64
 * tensor. The header length is odd, so the data is misaligned. */
static uint8_t *build_conversion_file(size_t *size)
{
    size_t n = sizeof conv_cases / sizeof conv_cases[0];
    char header[2048] = "{";
    uint8_t data[256];
    size_t used = 1, offset = 0;
    for (size_t c = 0; c < n; c++) {
        size_t es = st_dtype_size(conv_cases[c].dtype);
        used += (size_t)snprintf(header + used, sizeof header - used,
                                 "%s\"c%zu\":{\"dtype\":\"%s\",\"shape\":[2],"
                                 "\"data_offsets\":[%zu,%zu]}",
                                 c ? "," : "", c, st_dtype_str(conv_cases[c].dtype), offset,
                                 offset + 2 * es);
        put_le(data + offset, conv_cases[c].raw[0], es);
        put_le(data + offset + es, conv_cases[c].raw[1], es);
        offset += 2 * es;
    }
    /* Keys in another order; 0.1 rounds to 0.1f and 1e300 to infinity. */
    used += (size_t)snprintf(header + used, sizeof header - used,
                             ",\"f64\":{\"shape\":[3],\"dtype\":\"F64\",\"data_offsets\":[%zu,"
                             "%zu]}}",
                             offset, offset + 24);
    put_le(data + offset, f64_bits(0.1), 8);
    put_le(data + offset + 8, f64_bits(1e300), 8);
    put_le(data + offset + 16, f64_bits(-2.5), 8);
    offset += 24;
    if (used % 2 == 0) { /* an odd length puts the data at an odd offset */
        header[used++] = ' ';
        header[used] = '\0';
    }
    return build_file(size, used, header, data, offset);
}

/* The buffer also starts at an odd address, so UBSan catches any load
 * through a cast pointer. */
static void test_read_f32_every_dtype(void)
{
    size_t size = 0;
    uint8_t *file = build_conversion_file(&size);
    uint8_t *odd = malloc(size + 1);
    if (!file || !odd)
        return;
    size_t header_len = (size_t)file[0] | (size_t)file[1] << 8;
    CHECK_INT_EQ((8 + header_len) % 2, 1);
    memcpy(odd + 1, file, size);

    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(st_open_memory(&f, odd + 1, size, &err) == TOP_OK, "memory: %s", err.message);
    if (f)
        check_conversions(f, "memory");
    st_close(f);

    char path[600];
    tmp_path(path, sizeof path, "conversions.safetensors");
    CHECK(write_bytes(path, file, size) == 0);
    f = NULL;
    CHECK_MSG(st_open(&f, path, &err) == TOP_OK, "file: %s", err.message);
    if (f)
        check_conversions(f, "file");
    st_close(f);
    free(odd);
    free(file);
}

/* Tensors come in offset order whatever the header order, and an empty
 * tensor may share a boundary. */
static void test_tensor_order_and_find(void)
{
    const char *header = "{\"b\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[8,16]},"
                         "\"c\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,16]},"
                         "\"__metadata__\":{},"
                         "\"a\":{\"dtype\":\"U8\",\"shape\":[2,4],\"data_offsets\":[0,8]},"
                         "\"d\":{\"dtype\":\"U8\",\"shape\":[0,3],\"data_offsets\":[8,8]}}";
    size_t size = 0;
    uint8_t *buf = build_file(&size, strlen(header), header, NULL, 16);
    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(buf && st_open_memory(&f, buf, size, &err) == TOP_OK, "open: %s", err.message);
    if (f) {
        const char *order[4] = {"a", "d", "b", "c"};
        CHECK_INT_EQ(st_tensor_count(f), 4);
        for (size_t i = 0; i < 4; i++) {
            const st_tensor_info *t = st_tensor_at(f, i);
            CHECK_MSG(t && strcmp(t->name, order[i]) == 0, "tensor %zu is %s, expected %s", i,
                      t ? t->name : "NULL", order[i]);
            CHECK(st_find(f, order[i]) == t);
        }
        CHECK(st_find(f, "e") == NULL);
        CHECK(st_find(f, "") == NULL);
        CHECK(st_find(f, "__metadata__") == NULL);
        CHECK_INT_EQ(st_metadata_count(f), 0);
        const st_tensor_info *b = st_find(f, "b");
        CHECK(b != NULL);
        CHECK(b == NULL || memcmp(st_tensor_data(f, b), buf + 8 + strlen(header) + 8, 8) == 0);
        st_close(f);
    }
    free(buf);
}

static void test_empty_header_opens(void)
{
    const char *headers[3] = {"{}", "{\"__metadata__\":{\"k\":\"v\"}}  ", " { } "};
    for (int i = 0; i < 3; i++) {
        size_t size = 0;
        uint8_t *buf = build_file(&size, strlen(headers[i]), headers[i], NULL, 0);
        st_file *f = NULL;
        top_error err;
        top_error_clear(&err);
        CHECK_MSG(buf && st_open_memory(&f, buf, size, &err) == TOP_OK, "header %s: %s",
                  headers[i], err.message);
        if (f)
            CHECK_INT_EQ(st_tensor_count(f), 0);
        st_close(f);
        free(buf);
    }
}

/* ---- corrupt files ------------------------------------------------------ */

typedef struct corrupt_case {
    const char *what;
    const char *header;
    uint64_t header_len; /* 0: strlen(header) */
    size_t data_len;
    top_status status;
    const char *needle[2]; /* substrings of the message; NULL if unused */
} corrupt_case;

/* clang-format off */
#define ENTRY(name, body) "\"" name "\":{" body "}"
#define F32_8 "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]"

static const corrupt_case corrupt_cases[] = {
    {"header longer than file", "{}", 100, 0, TOP_ERR_FORMAT, {"header length 100", "2 bytes"}},
    {"header length absurd", "{}", UINT64_MAX, 0, TOP_ERR_FORMAT,
     {"header length 18446744073709551615", "limit"}},
    {"header length above cap", "{}", ((uint64_t)100 << 20) + 1, 0, TOP_ERR_FORMAT,
     {"104857601", "limit"}},
    {"header length zero", "", 0, 4, TOP_ERR_FORMAT, {"header JSON", NULL}},
    {"malformed JSON", "{\"w\": {", 0, 8, TOP_ERR_FORMAT, {"header JSON is invalid", NULL}},
    {"trailing garbage", "{} x", 0, 0, TOP_ERR_FORMAT, {"header JSON is invalid", NULL}},
    {"NUL inside name", "{\"a\\u0000b\":{}}", 0, 0, TOP_ERR_FORMAT, {"header JSON", NULL}},
    {"non-object header", "[1, 2]", 0, 0, TOP_ERR_FORMAT, {"an array", "not an object"}},
    {"entry not an object", "{\"w.bad\": 3}", 0, 0, TOP_ERR_FORMAT, {"'w.bad'", "an integer"}},
    {"duplicate name", "{" ENTRY("w", F32_8) "," ENTRY("w", F32_8) "}", 0, 8, TOP_ERR_FORMAT,
     {"duplicate", "w"}},
    {"unknown dtype",
     "{" ENTRY("fc.weight", "\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]") "}",
     0, 2, TOP_ERR_UNSUPPORTED, {"'fc.weight'", "'F8_E4M3'"}},
    {"dtype not a string",
     "{" ENTRY("fc.weight", "\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]") "}", 0, 8,
     TOP_ERR_FORMAT, {"'fc.weight'", "dtype is an integer"}},
    {"negative dim",
     "{" ENTRY("bn.mean", "\"dtype\":\"F32\",\"shape\":[2,-1],\"data_offsets\":[0,8]") "}", 0,
     8, TOP_ERR_FORMAT, {"'bn.mean'", "dimension 1 is -1"}},
    {"absurd dims",
     "{" ENTRY("bn.var",
               "\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]") "}",
     0, 8, TOP_ERR_FORMAT, {"'bn.var'", "(4294967296, 4294967296)"}},
    {"absurd dim times zero",
     "{" ENTRY("bn.var",
               "\"dtype\":\"F32\",\"shape\":[0,9223372036854775807],\"data_offsets\":[0,0]") "}",
     0, 0, TOP_ERR_FORMAT, {"'bn.var'", "9223372036854775807"}},
    {"dim not an integer",
     "{" ENTRY("bn.var", "\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]") "}", 0, 8,
     TOP_ERR_FORMAT, {"'bn.var'", "a real number"}},
    {"dim too big for JSON",
     "{" ENTRY("bn.var",
               "\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,8]") "}",
     0, 8, TOP_ERR_FORMAT, {"header JSON is invalid", NULL}},
    {"shape not an array",
     "{" ENTRY("bn.var", "\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]") "}", 0, 8,
     TOP_ERR_FORMAT, {"'bn.var'", "shape is an integer"}},
    {"rank too high",
     "{" ENTRY("deep", "\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]") "}",
     0, 1, TOP_ERR_UNSUPPORTED, {"'deep'", "rank 9"}},
    {"offsets out of range",
     "{" ENTRY("head.bias", "\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[0,64]") "}", 0,
     8, TOP_ERR_FORMAT, {"'head.bias'", "[0, 64] run past the 8 bytes"}},
    {"end before begin",
     "{" ENTRY("head.bias", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]") "}", 0, 8,
     TOP_ERR_FORMAT, {"'head.bias'", "[8, 0]"}},
    {"negative offset",
     "{" ENTRY("head.bias", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]") "}", 0,
     8, TOP_ERR_FORMAT, {"'head.bias'", "data_offsets"}},
    {"one offset",
     "{" ENTRY("head.bias", "\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0]") "}", 0, 8,
     TOP_ERR_FORMAT, {"'head.bias'", "[begin, end]"}},
    {"size mismatch",
     "{" ENTRY("layer1.0.conv1.weight",
               "\"dtype\":\"F32\",\"shape\":[64,3,7,7],\"data_offsets\":[0,100]") "}",
     0, 100, TOP_ERR_FORMAT,
     {"tensor 'layer1.0.conv1.weight': data_offsets [0, 100] do not match shape (64, 3, 7, 7) "
      "of F32 (37632 bytes)",
      NULL}},
    {"overlapping tensors",
     "{" ENTRY("a.w", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]") "," ENTRY(
         "b.w", "\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]") "}",
     0, 16, TOP_ERR_FORMAT, {"'a.w' [4, 12]", "'b.w' [0, 16]"}},
    {"empty tensor inside another",
     "{" ENTRY("a.w", "\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]") "," ENTRY(
         "b.w", "\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]") "}",
     0, 16, TOP_ERR_FORMAT, {"'a.w'", "overlap"}},
    {"small tensor inside a large one",
     "{" ENTRY("a", "\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]") "," ENTRY(
         "b", "\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]") "," ENTRY(
         "c", "\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[8,10]") "}",
     0, 16, TOP_ERR_FORMAT, {"'a' [0, 16]", "'b' [2, 4]"}},
    {"metadata value not a string",
     "{\"__metadata__\":{\"format\":\"pt\",\"epochs\":3}," ENTRY("w", F32_8) "}", 0, 8,
     TOP_ERR_FORMAT, {"'epochs'", "an integer"}},
    {"metadata not an object", "{\"__metadata__\":[\"pt\"]}", 0, 0, TOP_ERR_FORMAT,
     {"__metadata__", "an array"}},
    {"unknown key in entry",
     "{" ENTRY("fc.weight", F32_8 ",\"requires_grad\":true") "}", 0, 8, TOP_ERR_FORMAT,
     {"'fc.weight'", "'requires_grad'"}},
    {"missing key in entry",
     "{" ENTRY("fc.weight", "\"dtype\":\"F32\",\"shape\":[2]") "}", 0, 8, TOP_ERR_FORMAT,
     {"'fc.weight'", "'data_offsets' is missing"}},
};
/* clang-format on */

static void test_corrupt_headers_rejected(void)
{
    size_t n = sizeof corrupt_cases / sizeof corrupt_cases[0];
    for (size_t c = 0; c < n; c++) {
        const corrupt_case *cc = &corrupt_cases[c];
        uint64_t header_len = cc->header_len ? cc->header_len : strlen(cc->header);
        size_t size = 0;
        uint8_t *buf = build_file(&size, header_len, cc->header, NULL, cc->data_len);
        st_file *f = (st_file *)buf; /* must be reset to NULL on failure */
        top_error err;
        top_error_clear(&err);
        top_status st = st_open_memory(&f, buf, size, &err);
        CHECK_MSG(st == cc->status, "%s: status %s, expected %s (%s)", cc->what,
                  top_status_str(st), top_status_str(cc->status), err.message);
        CHECK_MSG(st == TOP_OK || f == NULL, "%s: *out is not NULL after a failure", cc->what);
        for (int k = 0; k < 2; k++)
            CHECK_MSG(!cc->needle[k] || strstr(err.message, cc->needle[k]),
                      "%s: message \"%s\" does not contain \"%s\"", cc->what, err.message,
                      cc->needle[k]);
        if (st == TOP_OK)
            st_close(f);
        free(buf);
    }
}

static void test_short_file_rejected(void)
{
    static const uint8_t bytes[7] = {2, 0, 0, 0, 0, 0, 0};
    for (size_t len = 0; len < 8; len++) {
        st_file *f = NULL;
        top_error err;
        top_error_clear(&err);
        CHECK_INT_EQ(st_open_memory(&f, len ? bytes : NULL, len, &err), TOP_ERR_FORMAT);
        CHECK_MSG(strstr(err.message, "shorter than the 8-byte header length"),
                  "length %zu: %s", len, err.message);
    }

    char path[600];
    tmp_path(path, sizeof path, "short.safetensors");
    CHECK(write_bytes(path, bytes, 3) == 0);
    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(st_open(&f, path, &err), TOP_ERR_FORMAT);
    CHECK_MSG(strstr(err.message, path) && strstr(err.message, "file is 3 bytes"), "%s",
              err.message);
}

/* Every proper prefix of a valid file fails cleanly; only the whole opens.
 * Each prefix sits in its own allocation so ASan detects any over-read. */
static void test_every_truncation_fails(void)
{
    size_t size = 0;
    uint8_t *full = build_linear_file(&size);
    if (!full)
        return;
    int opened = 0;
    for (size_t len = 0; len <= size; len++) {
        uint8_t *prefix = len ? malloc(len) : NULL;
        if (len)
            memcpy(prefix, full, len);
        st_file *f = NULL;
        top_error err;
        top_error_clear(&err);
        top_status st = st_open_memory(&f, prefix, len, &err);
        if (len < size) {
            CHECK_MSG(st == TOP_ERR_FORMAT && f == NULL && err.message[0],
                      "prefix of %zu bytes: status %s, message \"%s\"", len, top_status_str(st),
                      err.message);
        } else {
            CHECK_MSG(st == TOP_OK, "whole file: %s", err.message);
        }
        opened += st == TOP_OK;
        st_close(f);
        free(prefix);
    }
    CHECK_INT_EQ(opened, 1);
    free(full);
}

/* ---- I/O errors and writer errors -------------------------------------- */

static void test_open_io_errors(void)
{
    char path[600];
    tmp_path(path, sizeof path, "missing.safetensors");
    st_file *f = (st_file *)path;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(st_open(&f, path, &err), TOP_ERR_IO);
    CHECK(f == NULL);
    CHECK_MSG(strstr(err.message, path) && strstr(err.message, strerror(ENOENT)), "%s",
              err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(st_open(&f, tmp_dir, &err), TOP_ERR_IO);
    CHECK_MSG(strstr(err.message, tmp_dir) && strstr(err.message, strerror(EISDIR)), "%s",
              err.message);
}

static void test_writer_rejects_bad_tensors(void)
{
    st_writer *w = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_new(&w, &err), TOP_OK);
    if (!w)
        return;
    int64_t shape[2] = {2, 3};
    float data[6] = {0};
    CHECK_INT_EQ(st_writer_add(w, "fc.weight", ST_DTYPE_F32, 2, shape, data, 24, &err), TOP_OK);

    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_add(w, "fc.weight", ST_DTYPE_F32, 2, shape, data, 24, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'fc.weight'") && strstr(err.message, "unique"), "%s",
              err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_add(w, "fc.bias", ST_DTYPE_F16, 2, shape, data, 24, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'fc.bias'") &&
                  strstr(err.message, "(2, 3) of F16 (12 bytes)"),
              "%s", err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_add(w, "__metadata__", ST_DTYPE_F32, 2, shape, data, 24, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "reserved"), "%s", err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_add(w, "bad\xff", ST_DTYPE_F32, 2, shape, data, 24, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "UTF-8"), "%s", err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_add(w, "x", ST_DTYPE_COUNT, 2, shape, data, 24, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'x'") && strstr(err.message, "dtype 13"), "%s", err.message);

    top_error_clear(&err);
    int64_t negative[1] = {-2};
    CHECK(st_writer_add(w, "y", ST_DTYPE_U8, 1, negative, data, 2, &err) != TOP_OK);
    CHECK_MSG(strstr(err.message, "'y'"), "%s", err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_set_metadata(w, "k", "bad\xfe", &err), TOP_ERR_INVALID);
    st_writer_free(w);
}

static void test_writer_io_errors(void)
{
    st_writer *w = NULL;
    top_error err;
    top_error_clear(&err);
    int64_t shape[1] = {4};
    uint8_t data[4] = {1, 2, 3, 4};
    CHECK_INT_EQ(st_writer_new(&w, &err), TOP_OK);
    if (!w)
        return;
    CHECK_INT_EQ(st_writer_add(w, "m", ST_DTYPE_U8, 1, shape, data, 4, &err), TOP_OK);

    char path[600], tmp[640];
    tmp_path(path, sizeof path, "no_such_dir/out.safetensors");
    CHECK_INT_EQ(st_writer_write(w, path, &err), TOP_ERR_IO);
    CHECK_MSG(strstr(err.message, path) && strstr(err.message, strerror(ENOENT)), "%s",
              err.message);

    /* A target that exists as a directory (or FIFO, or device) is rejected
     * before anything is written, since the rename would replace it. */
    tmp_path(path, sizeof path, "a_directory");
    CHECK(mkdir(path, 0755) == 0);
    top_error_clear(&err);
    CHECK_INT_EQ(st_writer_write(w, path, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "not a regular file") && strstr(err.message, path), "%s",
              err.message);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK_MSG(!file_exists(tmp), "%s is left behind", tmp);
    rmdir(path);
    st_writer_free(w);
}

/* ---- main --------------------------------------------------------------- */

static void remove_tmp_dir(void)
{
    const char *names[] = {"round_trip.safetensors", "layout.safetensors",
                           "f32.safetensors",        "linear.safetensors",
                           "short.safetensors",      "conversions.safetensors"};
    char path[600];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        unlink(tmp_path(path, sizeof path, names[i]));
    if (rmdir(tmp_dir) != 0)
        fprintf(stderr, "cannot remove %s: %s\n", tmp_dir, strerror(errno));
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmp_dir, sizeof tmp_dir, "%s/topiary-st-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmp_dir)) {
        fprintf(stderr, "cannot create a directory under %s: %s\n", base ? base : "/tmp",
                strerror(errno));
        return 1;
    }
    TEST_RUN(test_dtype_names_and_sizes);
    TEST_RUN(test_round_trip_every_dtype);
    TEST_RUN(test_writer_header_layout);
    TEST_RUN(test_writer_add_f32_round_trip);
    TEST_RUN(test_reference_layout_file);
    TEST_RUN(test_read_f32_every_dtype);
    TEST_RUN(test_tensor_order_and_find);
    TEST_RUN(test_empty_header_opens);
    TEST_RUN(test_corrupt_headers_rejected);
    TEST_RUN(test_short_file_rejected);
    TEST_RUN(test_every_truncation_fails);
    TEST_RUN(test_open_io_errors);
    TEST_RUN(test_writer_rejects_bad_tensors);
    TEST_RUN(test_writer_io_errors);
    remove_tmp_dir();
    return TEST_FINISH();
}
