/*
 * Masks, saliency, block OBS and layer-wise OBS on small random problems.
 * References are computed here independently: a full sort for the mask
 * ranking, a Gaussian-elimination KKT solve for the OBS update, brute force
 * over all subsets for the best pruned set, and an eager (non-batched)
 * SparseGPT for layer OBS.
 */
#include <stdint.h>
#include <string.h>

#include "prune.h"
#include "test.h"

/* ---- helpers ------------------------------------------------------------- */

static uint64_t rng_state = 88172645463325252ull;

static void rng_seed(uint64_t s) { rng_state = s ? s : 1; }

static double rng_uniform(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static double rng_normal(void)
{
    double u = rng_uniform(), v = rng_uniform();
    if (u < 1e-300)
        u = 1e-300;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* Random SPD (d, d): A A^T / d + 0.1 I. */
static void random_spd(double *h, size_t d)
{
    double *a = malloc(d * d * sizeof *a);
    for (size_t i = 0; i < d * d; i++)
        a[i] = rng_normal();
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++) {
            double s = 0.0;
            for (size_t k = 0; k < d; k++)
                s += a[i * d + k] * a[j * d + k];
            h[i * d + j] = s / (double)d + (i == j ? 0.1 : 0.0);
        }
    free(a);
}

/* Solves a x = b (n, n) by Gaussian elimination with partial pivoting;
 * a and b are overwritten, x is returned in b. */
static void gauss_solve(double *a, double *b, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        size_t p = k;
        for (size_t i = k + 1; i < n; i++)
            if (fabs(a[i * n + k]) > fabs(a[p * n + k]))
                p = i;
        for (size_t j = 0; j < n; j++) {
            double t = a[k * n + j];
            a[k * n + j] = a[p * n + j];
            a[p * n + j] = t;
        }
        double t = b[k];
        b[k] = b[p];
        b[p] = t;
        for (size_t i = k + 1; i < n; i++) {
            double f = a[i * n + k] / a[k * n + k];
            for (size_t j = k; j < n; j++)
                a[i * n + j] -= f * a[k * n + j];
            b[i] -= f * b[k];
        }
    }
    for (size_t k = n; k-- > 0;) {
        double s = b[k];
        for (size_t j = k + 1; j < n; j++)
            s -= a[k * n + j] * b[j];
        b[k] = s / a[k * n + k];
    }
}

/* Inverse of (d, d) by Gaussian elimination, column by column. */
static void gauss_inverse(double *inv, const double *h, size_t d)
{
    double *a = malloc(d * d * sizeof *a), *col = malloc(d * sizeof *col);
    for (size_t c = 0; c < d; c++) {
        memcpy(a, h, d * d * sizeof *a);
        for (size_t i = 0; i < d; i++)
            col[i] = i == c;
        gauss_solve(a, col, d);
        for (size_t i = 0; i < d; i++)
            inv[i * d + c] = col[i];
    }
    free(a);
    free(col);
}

/*
 * Minimises 0.5 d^T H d subject to d_i = -w_i for i in the subset (bit i of
 * `subset`) through the KKT system [H E; E^T 0] [d; mu] = [0; -w_P].
 * Writes d and returns the loss 0.5 d^T H d.
 */
static double kkt_loss(double *d, const double *h, const double *w, size_t n,
                       unsigned subset)
{
    size_t p = 0, idx[32];
    for (size_t i = 0; i < n; i++)
        if (subset >> i & 1u)
            idx[p++] = i;
    size_t m = n + p;
    double *a = calloc(m * m, sizeof *a), *b = calloc(m, sizeof *b);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            a[i * m + j] = h[i * n + j];
    for (size_t k = 0; k < p; k++) {
        a[idx[k] * m + n + k] = 1.0;
        a[(n + k) * m + idx[k]] = 1.0;
        b[n + k] = -w[idx[k]];
    }
    gauss_solve(a, b, m);
    double loss = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            loss += 0.5 * b[i] * h[i * n + j] * b[j];
    if (d)
        memcpy(d, b, n * sizeof *d);
    free(a);
    free(b);
    return loss;
}

static unsigned popcount_u(unsigned x)
{
    unsigned c = 0;
    for (; x; x &= x - 1)
        c++;
    return c;
}

static size_t count_zero(const uint8_t *m, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += m[i] == 0;
    return c;
}

/* ---- masks --------------------------------------------------------------- */

typedef struct ref_key {
    float score;
    size_t layer, index;
} ref_key;

static int compare_ref(const void *pa, const void *pb)
{
    const ref_key *a = pa, *b = pb;
    if (a->score != b->score)
        return a->score < b->score ? -1 : 1;
    if (a->layer != b->layer)
        return a->layer < b->layer ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

#define N_LAYERS 4
static const size_t layer_rows[N_LAYERS] = {3, 17, 1, 8};
static const size_t layer_cols[N_LAYERS] = {10, 12, 7, 64};

/* Random layers whose scores take only `levels` distinct values (ties). */
static void make_layers(prune_layer *layers, float **scores, uint8_t **masks, int levels)
{
    for (size_t l = 0; l < N_LAYERS; l++) {
        size_t count = layer_rows[l] * layer_cols[l];
        scores[l] = malloc(count * sizeof(float));
        masks[l] = malloc(count);
        for (size_t i = 0; i < count; i++)
            scores[l][i] = (float)(int)(rng_uniform() * levels) * 0.25f;
        layers[l] = (prune_layer){scores[l], masks[l], count, layer_cols[l]};
    }
}

static void free_layers(float **scores, uint8_t **masks)
{
    for (size_t l = 0; l < N_LAYERS; l++) {
        free(scores[l]);
        free(masks[l]);
    }
}

/* Checks every count rule of prune_mask_compute for one option set. */
static void check_mask_counts(const prune_layer *layers, const prune_mask_options *o)
{
    size_t total = 0, pruned = 0;
    for (size_t l = 0; l < N_LAYERS; l++) {
        const prune_layer *ly = &layers[l];
        size_t z = count_zero(ly->mask, ly->count);
        size_t floor_l = (size_t)ceil(o->min_density * (double)ly->count - 1e-9);
        total += ly->count;
        pruned += z;
        CHECK_MSG(ly->count - z >= floor_l,
                  "layer %zu keeps %zu, floor %zu (q %g, %d:%d, scope %d)", l, ly->count - z,
                  floor_l, o->sparsity, o->nm_n, o->nm_m, (int)o->scope);
        if (o->scope == PRUNE_SCOPE_PER_LAYER) {
            size_t want = (size_t)floor(o->sparsity * (double)ly->count + 0.5);
            if (ly->count - want < floor_l)
                want = ly->count - floor_l;
            CHECK_MSG(z == want, "layer %zu prunes %zu, expected %zu (q %g, %d:%d)", l, z,
                      want, o->sparsity, o->nm_n, o->nm_m);
        }
        /* N:M: at most N kept in every group of M in a row. */
        for (size_t r = 0; o->nm_m && r < ly->count / ly->cols; r++)
            for (size_t g = 0; g < ly->cols; g += (size_t)o->nm_m) {
                size_t kept = 0;
                for (size_t j = g; j < ly->cols && j < g + (size_t)o->nm_m; j++)
                    kept += ly->mask[r * ly->cols + j];
                CHECK_MSG(kept <= (size_t)o->nm_n,
                          "layer %zu row %zu group %zu keeps %zu > %d", l, r, g, kept,
                          o->nm_n);
            }
    }
    size_t want = (size_t)floor(o->sparsity * (double)total + 0.5);
    if (o->scope == PRUNE_SCOPE_GLOBAL && o->min_density == 0.0)
        CHECK_MSG(pruned == want, "pruned %zu, expected %zu (q %g, %d:%d)", pruned, want,
                  o->sparsity, o->nm_n, o->nm_m);
    else
        CHECK_MSG(pruned <= want + N_LAYERS && pruned + N_LAYERS >= want,
                  "pruned %zu, expected %zu within %d (q %g, %d:%d, scope %d)", pruned, want,
                  N_LAYERS, o->sparsity, o->nm_n, o->nm_m, (int)o->scope);
}

static void test_mask_exact_counts_all_modes(void)
{
    static const int nm[3][2] = {{0, 0}, {2, 4}, {4, 8}};
    static const double qs[] = {0.0, 0.3, 0.5, 0.75, 0.9, 1.0};
    static const double mins[] = {0.0, 0.05};
    prune_layer layers[N_LAYERS];
    float *scores[N_LAYERS];
    uint8_t *masks[N_LAYERS];
    rng_seed(7);
    make_layers(layers, scores, masks, 5);

    int cases = 0;
    for (int scope = 0; scope < 2; scope++)
        for (int p = 0; p < 3; p++)
            for (size_t qi = 0; qi < sizeof qs / sizeof *qs; qi++)
                for (size_t mi = 0; mi < 2; mi++) {
                    prune_mask_options o = {qs[qi], (prune_scope)scope, nm[p][0], nm[p][1],
                                            mins[mi]};
                    if (mins[mi] > 1.0 - qs[qi])
                        continue;
                    if (nm[p][1] && qs[qi] < 1.0 - (double)nm[p][0] / nm[p][1])
                        continue;
                    top_error err;
                    top_error_clear(&err);
                    top_status st = prune_mask_compute(layers, N_LAYERS, &o, &err);
                    CHECK_MSG(st == TOP_OK, "q %g %d:%d scope %d min %g: %s", qs[qi],
                              nm[p][0], nm[p][1], scope, mins[mi], err.message);
                    if (st == TOP_OK)
                        check_mask_counts(layers, &o);
                    cases++;
                }
    CHECK(cases >= 40);
    free_layers(scores, masks);
}

/* Checks that the global unstructured mask prunes exactly the first
 * round(q * total) weights of the (score, layer, index) sort. */
static void check_against_full_sort(prune_layer *layers, double q)
{
    size_t total = 0;
    for (size_t l = 0; l < N_LAYERS; l++)
        total += layers[l].count;
    ref_key *keys = malloc(total * sizeof *keys);
    size_t k = 0;
    for (size_t l = 0; l < N_LAYERS; l++)
        for (size_t i = 0; i < layers[l].count; i++)
            keys[k++] = (ref_key){layers[l].scores[i], l, i};
    qsort(keys, total, sizeof *keys, compare_ref);

    prune_mask_options o = {q, PRUNE_SCOPE_GLOBAL, 0, 0, 0.0};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(prune_mask_compute(layers, N_LAYERS, &o, &err), TOP_OK);
    size_t p = (size_t)floor(q * (double)total + 0.5);
    for (size_t i = 0; i < total; i++) {
        int expected = i >= p;
        int got = layers[keys[i].layer].mask[keys[i].index];
        CHECK_MSG(got == expected,
                  "q %g sorted position %zu (layer %zu index %zu, score %g): mask %d, "
                  "expected %d", q, i, keys[i].layer, keys[i].index, keys[i].score, got,
                  expected);
        if (got != expected)
            break;
    }
    free(keys);
}

static void test_mask_matches_full_sort(void)
{
    prune_layer layers[N_LAYERS];
    float *scores[N_LAYERS];
    uint8_t *masks[N_LAYERS];
    rng_seed(11);
    make_layers(layers, scores, masks, 3); /* heavy ties */
    check_against_full_sort(layers, 0.37);
    check_against_full_sort(layers, 0.999);

    /* Signed scores spread over many magnitudes, with +-0 and +-inf. */
    for (size_t l = 0; l < N_LAYERS; l++)
        for (size_t i = 0; i < layers[l].count; i++) {
            double v = rng_normal() * pow(10.0, (int)(rng_uniform() * 12) - 6);
            scores[l][i] = (float)v;
            if (i % 17 == 3)
                scores[l][i] = i % 2 ? -0.0f : 0.0f;
            if (i % 29 == 5)
                scores[l][i] = i % 2 ? -INFINITY : INFINITY;
        }
    check_against_full_sort(layers, 0.21);
    check_against_full_sort(layers, 0.5);
    check_against_full_sort(layers, 0.93);
    free_layers(scores, masks);
}

static void test_mask_deterministic(void)
{
    prune_layer layers[N_LAYERS];
    float *scores[N_LAYERS];
    uint8_t *masks[N_LAYERS], *first[N_LAYERS];
    rng_seed(3);
    make_layers(layers, scores, masks, 2);
    prune_mask_options o = {0.6, PRUNE_SCOPE_GLOBAL, 2, 4, 0.1};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(prune_mask_compute(layers, N_LAYERS, &o, &err), TOP_OK);
    for (size_t l = 0; l < N_LAYERS; l++) {
        first[l] = malloc(layers[l].count);
        memcpy(first[l], masks[l], layers[l].count);
    }
    CHECK_INT_EQ(prune_mask_compute(layers, N_LAYERS, &o, &err), TOP_OK);
    for (size_t l = 0; l < N_LAYERS; l++) {
        for (size_t i = 0; i < layers[l].count; i++)
            if (first[l][i] != masks[l][i]) {
                CHECK_MSG(0, "layer %zu index %zu: %d then %d", l, i, first[l][i], masks[l][i]);
                break;
            }
        free(first[l]);
    }
    free_layers(scores, masks);
}

static void test_mask_ties_by_index(void)
{
    float s1[10], s2[6];
    uint8_t m1[10], m2[6];
    for (int i = 0; i < 10; i++)
        s1[i] = 1.0f;
    for (int i = 0; i < 6; i++)
        s2[i] = i % 2 ? 1.0f : -0.0f; /* -0 ranks with +0 */
    s2[2] = 0.0f;
    prune_layer layers[2] = {{s1, m1, 10, 10}, {s2, m2, 6, 6}};

    /* 16 weights, q = 0.5: the three zeros of layer 1 go first, then five
     * of the equal 1.0 scores in ascending (layer, index) order. */
    prune_mask_options o = {0.5, PRUNE_SCOPE_GLOBAL, 0, 0, 0.0};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(prune_mask_compute(layers, 2, &o, &err), TOP_OK);
    for (int i = 0; i < 10; i++)
        CHECK_MSG(m1[i] == (i >= 5), "layer 0 index %d: mask %d, expected %d", i, m1[i], i >= 5);
    for (int i = 0; i < 6; i++)
        CHECK_MSG(m2[i] == (i % 2), "layer 1 index %d: mask %d, expected %d", i, m2[i], i % 2);

    /* round(0.85 * 10) = 9 would keep one; the floor ceil(0.15 * 10) = 2
     * keeps the last two in prune order, indices 8 and 9. */
    o = (prune_mask_options){0.85, PRUNE_SCOPE_PER_LAYER, 0, 0, 0.15};
    CHECK_INT_EQ(prune_mask_compute(layers, 1, &o, &err), TOP_OK);
    for (int i = 0; i < 10; i++)
        CHECK_MSG(m1[i] == (i >= 8), "floor: index %d mask %d, expected %d", i, m1[i], i >= 8);
}

static void test_mask_floor_protects_layer(void)
{
    /* Layer 0 has the lowest scores; a global 90% would empty it. */
    float s0[100], s1[100];
    uint8_t m0[100], m1[100];
    for (int i = 0; i < 100; i++) {
        s0[i] = 0.001f * (float)i;
        s1[i] = 1.0f + (float)i;
    }
    prune_layer layers[2] = {{s0, m0, 100, 10}, {s1, m1, 100, 10}};
    prune_mask_options o = {0.9, PRUNE_SCOPE_GLOBAL, 0, 0, 0.03};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(prune_mask_compute(layers, 2, &o, &err), TOP_OK);
    CHECK_INT_EQ(100 - count_zero(m0, 100), 3);
    CHECK_INT_EQ(100 - count_zero(m1, 100), 17);
    CHECK_INT_EQ(m0[99], 1);
    CHECK_INT_EQ(m0[96], 0);
}

static void test_mask_rejects_bad_options(void)
{
    float s[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    uint8_t m[8];
    prune_layer ly = {s, m, 8, 8};
    top_error err;

    top_error_clear(&err);
    prune_mask_options o = {0.25, PRUNE_SCOPE_GLOBAL, 2, 4, 0.0};
    CHECK_INT_EQ(prune_mask_compute(&ly, 1, &o, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "raise the sparsity to at least 0.5"), "message: %s",
              err.message);

    top_error_clear(&err);
    o = (prune_mask_options){0.8, PRUNE_SCOPE_GLOBAL, 0, 0, 0.5};
    CHECK_INT_EQ(prune_mask_compute(&ly, 1, &o, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "min_density 0.5"), "message: %s", err.message);

    top_error_clear(&err);
    s[5] = NAN;
    o = (prune_mask_options){0.5, PRUNE_SCOPE_GLOBAL, 0, 0, 0.0};
    CHECK_INT_EQ(prune_mask_compute(&ly, 1, &o, &err), TOP_ERR_NUMERIC);
    CHECK_MSG(strstr(err.message, "layer 0: score 5 is NaN"), "message: %s", err.message);

    top_error_clear(&err);
    s[5] = 6;
    ly.cols = 3;
    CHECK_INT_EQ(prune_mask_compute(&ly, 1, &o, &err), TOP_ERR_SHAPE);
}

static void test_schedule_density(void)
{
    double k = 0.1;
    CHECK_CLOSE(prune_schedule_density(k, 0, 4), 1.0, 0.0);
    CHECK_CLOSE(prune_schedule_density(k, 4, 4), k, 1e-15);
    CHECK_CLOSE(prune_schedule_density(k, 2, 4), sqrt(k), 1e-15);
    /* Each round keeps the same fraction of the previous density. */
    double ratio = prune_schedule_density(k, 1, 4);
    for (int r = 1; r <= 4; r++)
        CHECK_CLOSE_AT(prune_schedule_density(k, r, 4) / prune_schedule_density(k, r - 1, 4),
                       ratio, 1e-12, r);
}

/* ---- saliency and block OBS ---------------------------------------------- */

static void test_obd_and_magnitude(void)
{
    float w[4] = {-2.0f, 0.5f, 0.0f, 3.0f}, f[4] = {1.0f, 4.0f, 9.0f, 0.0f}, s[4];
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(prune_saliency_obd(s, w, f, 4, 0.5, &err), TOP_OK);
    double want[4] = {0.5 * 4 * 1.5, 0.5 * 0.25 * 4.5, 0.0, 0.5 * 9 * 0.5};
    for (int i = 0; i < 4; i++)
        CHECK_CLOSE_AT(s[i], want[i], 1e-6, i);
    prune_saliency_magnitude(s, w, 4);
    for (int i = 0; i < 4; i++)
        CHECK_CLOSE_AT(s[i], fabs(w[i]), 0.0, i);
    CHECK_INT_EQ(prune_saliency_obd(s, w, f, 4, -1.0, &err), TOP_ERR_INVALID);
}

/* Loss of removing `subset` with d = -w_P and no update of the others. */
static double loss_without_update(const double *h, const double *w, size_t n, unsigned subset)
{
    double loss = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            if ((subset >> i & 1u) && (subset >> j & 1u))
                loss += 0.5 * w[i] * h[i * n + j] * w[j];
    return loss;
}

/* Subset of the k lowest scores (ties by index). */
static unsigned lowest_k(const float *scores, size_t n, size_t k)
{
    unsigned subset = 0;
    for (size_t t = 0; t < k; t++) {
        size_t best = n;
        for (size_t i = 0; i < n; i++)
            if (!(subset >> i & 1u) && (best == n || scores[i] < scores[best]))
                best = i;
        subset |= 1u << best;
    }
    return subset;
}

static void test_obs_vs_brute_force(void)
{
    enum { D = 8, TRIALS = 40 };
    double h[D * D], hinv[D * D], work[D * D], wd[D];
    float w[D], s_obs[D], s_mag[D];
    double sum_obs[4] = {0}, sum_mag[4] = {0};
    top_error err;
    top_error_clear(&err);
    rng_seed(1234);

    for (int trial = 0; trial < TRIALS; trial++) {
        random_spd(h, D);
        for (size_t i = 0; i < D; i++) {
            w[i] = (float)rng_normal();
            wd[i] = w[i];
        }
        memcpy(hinv, h, sizeof h);
        CHECK_INT_EQ(obs_invert_spd(hinv, D, 0.0, NULL, work, &err), TOP_OK);
        obs_block_saliency(s_obs, w, hinv, D);
        prune_saliency_magnitude(s_mag, w, D);

        for (size_t k = 1; k <= 3; k++) {
            /* Brute-force optimum over all subsets of size k. */
            double best = INFINITY;
            for (unsigned sub = 1; sub < (1u << D); sub++)
                if (popcount_u(sub) == k) {
                    double l = kkt_loss(NULL, h, wd, D, sub);
                    if (l < best)
                        best = l;
                }
            double l_obs = kkt_loss(NULL, h, wd, D, lowest_k(s_obs, D, k));
            double l_mag = kkt_loss(NULL, h, wd, D, lowest_k(s_mag, D, k));
            double l_mag_plain = loss_without_update(h, wd, D, lowest_k(s_mag, D, k));
            CHECK_MSG(l_obs >= best - 1e-9 * (1 + best), "trial %d k %zu: OBS %g below optimum %g",
                      trial, k, l_obs, best);
            CHECK_MSG(l_mag <= l_mag_plain + 1e-9 * (1 + l_mag),
                      "trial %d k %zu: update made magnitude worse (%g > %g)", trial, k, l_mag,
                      l_mag_plain);
            if (k == 1) {
                /* Single removal: the OBS score is the exact loss. */
                CHECK_MSG(fabs(l_obs - best) <= 1e-9 * (1 + best),
                          "trial %d: OBS loss %.12g, brute-force optimum %.12g", trial, l_obs,
                          best);
                CHECK_MSG(l_obs <= l_mag + 1e-12, "trial %d: OBS %g worse than magnitude %g",
                          trial, l_obs, l_mag);
                size_t i = 0;
                while (!(lowest_k(s_obs, D, 1) >> i & 1u))
                    i++;
                CHECK_CLOSE_AT(s_obs[i], l_obs, 1e-5 * (1 + l_obs), i);
            }
            sum_obs[k] += l_obs;
            sum_mag[k] += l_mag;
        }
    }
    for (size_t k = 2; k <= 3; k++)
        CHECK_MSG(sum_obs[k] < sum_mag[k], "k %zu: mean OBS loss %g not below magnitude %g", k,
                  sum_obs[k] / TRIALS, sum_mag[k] / TRIALS);
}

static void test_obs_update_matches_kkt(void)
{
    enum { D = 9 };
    double h[D * D], hinv[D * D], work[D * D + 2 * D], wd[D], d[D];
    float w[D];
    uint8_t mask[D] = {1, 0, 1, 1, 0, 1, 0, 1, 1};
    unsigned subset = (1u << 1) | (1u << 4) | (1u << 6);
    top_error err;
    top_error_clear(&err);
    rng_seed(99);
    random_spd(h, D);
    for (size_t i = 0; i < D; i++) {
        w[i] = (float)rng_normal();
        wd[i] = w[i];
    }
    memcpy(hinv, h, sizeof h);
    CHECK_INT_EQ(obs_invert_spd(hinv, D, 0.0, NULL, work, &err), TOP_OK);
    kkt_loss(d, h, wd, D, subset);
    CHECK_INT_EQ(obs_block_update(w, mask, hinv, D, work, &err), TOP_OK);
    for (size_t i = 0; i < D; i++) {
        if (!mask[i]) {
            CHECK_MSG(w[i] == 0.0f && !signbit(w[i]), "pruned w[%zu] = %g, expected +0", i, w[i]);
            continue;
        }
        CHECK_CLOSE_AT(w[i], wd[i] + d[i], 1e-5 * (1 + fabs(wd[i] + d[i])), i);
    }
}

static void test_obs_inverse_matches_gauss(void)
{
    enum { D = 12 };
    double h[D * D], inv[D * D], ref[D * D], work[D * D];
    top_error err;
    top_error_clear(&err);
    obs_damping dmp = {0};
    rng_seed(5);
    random_spd(h, D);
    memcpy(inv, h, sizeof h);
    CHECK_INT_EQ(obs_invert_spd(inv, D, 0.0, &dmp, work, &err), TOP_OK);
    gauss_inverse(ref, h, D);
    for (size_t i = 0; i < D * D; i++)
        CHECK_CLOSE_AT(inv[i], ref[i], 1e-9 * (1 + fabs(ref[i])), i);
    CHECK_INT_EQ(dmp.retries, 0);
    CHECK_INT_EQ(dmp.blocks, 1);
}

static void test_cholesky_retry_singular(void)
{
    enum { D = 6 };
    double h[D * D], inv[D * D], work[D * D];
    top_error err;
    top_error_clear(&err);
    rng_seed(17);
    random_spd(h, D);
    for (size_t j = 0; j < D; j++)
        h[2 * D + j] = h[j * D + 2] = 0.0; /* a zero row and column */
    memcpy(inv, h, sizeof h);
    obs_damping dmp = {0};
    CHECK_INT_EQ(obs_invert_spd(inv, D, 0.0, &dmp, work, &err), TOP_OK);
    CHECK_MSG(dmp.retries >= 1, "retries %d, expected >= 1", dmp.retries);
    CHECK_MSG(dmp.lambda > 0.0, "lambda %g, expected > 0", dmp.lambda);

    /* inv * (h + lambda I) = I. */
    for (size_t i = 0; i < D; i++)
        for (size_t j = 0; j < D; j++) {
            double s = 0.0;
            for (size_t k = 0; k < D; k++)
                s += inv[i * D + k] * (h[k * D + j] + (k == j ? dmp.lambda : 0.0));
            CHECK_CLOSE_AT(s, i == j, 1e-6, i * D + j);
        }

    /* A matrix of NaN never factorises: bounded retries, then an error. */
    for (size_t i = 0; i < D * D; i++)
        inv[i] = NAN;
    CHECK_INT_EQ(obs_invert_spd(inv, D, 1e-3, NULL, work, &err), TOP_ERR_NUMERIC);
}

static void test_obs_layer_blocks_and_dead_features(void)
{
    enum { N = 20, COUNT = 10, B = 4 };
    float g[N * COUNT], w[COUNT], s[COUNT];
    double lambda = 1e-3;
    top_error err;
    top_error_clear(&err);
    rng_seed(21);
    for (size_t i = 0; i < N * COUNT; i++)
        g[i] = (float)rng_normal();
    for (size_t n = 0; n < N; n++)
        g[n * COUNT + 5] = 0.0f; /* dead feature */
    for (size_t i = 0; i < COUNT; i++)
        w[i] = (float)rng_normal();

    obs_damping dmp = {0};
    CHECK_INT_EQ(obs_layer_saliency(s, w, g, COUNT, N, B, lambda, &dmp, &err), TOP_OK);
    CHECK_INT_EQ(dmp.blocks, 3); /* 4 + 4 + 2 */
    CHECK_INT_EQ(dmp.retries, 0);

    /* Reference: naive Fisher of each block, Gaussian inverse. */
    for (size_t start = 0; start < COUNT; start += B) {
        size_t b = COUNT - start < B ? COUNT - start : B;
        double f[B * B], inv[B * B];
        for (size_t i = 0; i < b; i++)
            for (size_t j = 0; j < b; j++) {
                double acc = 0.0;
                for (size_t n = 0; n < N; n++)
                    acc += (double)g[n * COUNT + start + i] * g[n * COUNT + start + j];
                f[i * b + j] = acc / N + (i == j ? lambda : 0.0);
            }
        gauss_inverse(inv, f, b);
        for (size_t i = 0; i < b; i++) {
            double want = (double)w[start + i] * w[start + i] / (2.0 * inv[i * b + i]);
            CHECK_CLOSE_AT(s[start + i], want, 1e-5 * (1 + want), start + i);
        }
    }
    /* A dead weight costs 0.5 w^2 lambda, because only the damping gives it a cost. */
    CHECK_CLOSE_AT(s[5], 0.5 * w[5] * w[5] * lambda, 1e-6 * (1 + s[5]), 5);

    /* Update: pruned weights exactly 0, survivors finite. */
    uint8_t mask[COUNT] = {1, 0, 1, 1, 1, 0, 1, 0, 1, 1};
    CHECK_INT_EQ(obs_layer_update(w, mask, g, COUNT, N, B, lambda, NULL, &err), TOP_OK);
    for (size_t i = 0; i < COUNT; i++) {
        CHECK_MSG(isfinite(w[i]), "w[%zu] = %g", i, w[i]);
        if (!mask[i])
            CHECK_MSG(w[i] == 0.0f, "pruned w[%zu] = %g", i, w[i]);
    }

    /* All gradients zero and no damping: the retry rule still inverts. */
    memset(g, 0, sizeof g);
    dmp = (obs_damping){0};
    CHECK_INT_EQ(obs_layer_saliency(s, w, g, COUNT, N, B, 0.0, &dmp, &err), TOP_OK);
    CHECK_MSG(dmp.retries == 3, "retries %d, expected one per block (3)", dmp.retries);
}

static void test_obs_memory_estimate(void)
{
    size_t counts[2] = {1000, 300};
    obs_memory m;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(obs_memory_estimate(&m, counts, 2, 128, 64, 0, &err), TOP_OK);
    CHECK_INT_EQ(m.gradients, 1300 * 64 * 4);
    CHECK_INT_EQ(m.scores, 1300 * 4);
    CHECK_INT_EQ(m.workspace, (2 * 128 * 128 + 2 * 128 + 64 * 128) * 8);
    CHECK_INT_EQ(m.total, m.gradients + m.scores + m.workspace);
    CHECK_INT_EQ(obs_memory_estimate(&m, counts, 2, 128, 64, 100000, &err), TOP_ERR_LIMIT);
    CHECK_MSG(strstr(err.message, "lower the calibration samples"), "message: %s", err.message);
    size_t huge[1] = {SIZE_MAX / 2};
    top_error_clear(&err);
    CHECK_INT_EQ(obs_memory_estimate(&m, huge, 1, 128, 64, 0, &err), TOP_ERR_OVERFLOW);
}

/* ---- layer-wise OBS ------------------------------------------------------ */

/* X = Z A: correlated inputs. x: (n, c) */
static void correlated_inputs(float *x, size_t n, size_t c)
{
    double *a = malloc(c * c * sizeof *a);
    for (size_t i = 0; i < c * c; i++)
        a[i] = rng_normal() * (i % (c + 1) == 0 ? 2.0 : 0.5);
    double *z = malloc(c * sizeof *z);
    for (size_t s = 0; s < n; s++) {
        for (size_t k = 0; k < c; k++)
            z[k] = rng_normal();
        for (size_t j = 0; j < c; j++) {
            double acc = 0.0;
            for (size_t k = 0; k < c; k++)
                acc += z[k] * a[k * c + j];
            x[s * c + j] = (float)acc;
        }
    }
    free(a);
    free(z);
}

/* Magnitude pruning of the whole layer to round(q * R C), no update. */
static void magnitude_prune(float *w, size_t count, double q)
{
    float *s = malloc(count * sizeof *s);
    uint8_t *m = malloc(count);
    prune_saliency_magnitude(s, w, count);
    prune_layer ly = {s, m, count, count};
    prune_mask_options o = {q, PRUNE_SCOPE_PER_LAYER, 0, 0, 0.0};
    prune_mask_compute(&ly, 1, &o, NULL);
    for (size_t i = 0; i < count; i++)
        if (!m[i])
            w[i] = 0.0f;
    free(s);
    free(m);
}

/* Eager SparseGPT: every pruned column updates all later columns at once.
 * Same block-wise mask choice; naive Cholesky and inverse. */
static void eager_layer_obs(float *w, uint8_t *mask, const float *x, size_t rows, size_t cols,
                            size_t n, double q, size_t block, double damp)
{
    double *h = calloc(cols * cols, sizeof *h), *hi = malloc(cols * cols * sizeof *hi);
    double *u = calloc(cols * cols, sizeof *u), *wd = malloc(rows * cols * sizeof *wd);
    for (size_t i = 0; i < cols; i++)
        for (size_t j = 0; j < cols; j++) {
            double acc = 0.0;
            for (size_t s = 0; s < n; s++)
                acc += (double)x[s * cols + i] * x[s * cols + j];
            h[i * cols + j] = 2.0 * acc / (double)n;
        }
    double mean = 0.0;
    for (size_t i = 0; i < cols; i++)
        mean += h[i * cols + i] / (double)cols;
    for (size_t i = 0; i < cols; i++)
        h[i * cols + i] += damp * mean;
    gauss_inverse(hi, h, cols);
    /* Upper U with hi = U^T U: Cholesky of hi = L L^T, U = L^T. */
    for (size_t j = 0; j < cols; j++) {
        double s = hi[j * cols + j];
        for (size_t k = 0; k < j; k++)
            s -= u[k * cols + j] * u[k * cols + j];
        u[j * cols + j] = sqrt(s);
        for (size_t i = j + 1; i < cols; i++) {
            double t = hi[j * cols + i];
            for (size_t k = 0; k < j; k++)
                t -= u[k * cols + j] * u[k * cols + i];
            u[j * cols + i] = t / u[j * cols + j];
        }
    }
    for (size_t i = 0; i < rows * cols; i++)
        wd[i] = w[i];
    memset(mask, 1, rows * cols);
    for (size_t c0 = 0; c0 < cols; c0 += block) {
        size_t b = cols - c0 < block ? cols - c0 : block;
        size_t k = (size_t)floor(q * (double)(rows * (c0 + b)) + 0.5) -
                   (size_t)floor(q * (double)(rows * c0) + 0.5);
        /* k lowest w^2 / U_jj^2 in the block, ties by row-major index. */
        for (size_t t = 0; t < k; t++) {
            size_t best = SIZE_MAX;
            double best_s = INFINITY;
            for (size_t r = 0; r < rows; r++)
                for (size_t j = c0; j < c0 + b; j++) {
                    double sc = wd[r * cols + j] * wd[r * cols + j] /
                                (u[j * cols + j] * u[j * cols + j]);
                    if (mask[r * cols + j] && sc < best_s) {
                        best_s = sc;
                        best = r * cols + j;
                    }
                }
            mask[best] = 0;
        }
        for (size_t j = c0; j < c0 + b; j++)
            for (size_t r = 0; r < rows; r++) {
                if (mask[r * cols + j])
                    continue;
                double e = wd[r * cols + j] / u[j * cols + j];
                for (size_t t = j; t < cols; t++)
                    wd[r * cols + t] -= e * u[j * cols + t];
                wd[r * cols + j] = 0.0;
            }
    }
    for (size_t i = 0; i < rows * cols; i++)
        w[i] = mask[i] ? (float)wd[i] : 0.0f;
    free(h);
    free(hi);
    free(u);
    free(wd);
}

static void test_layer_obs_beats_magnitude(void)
{
    enum { R = 16, C = 40, N = 200 };
    static float x[N * C], w0[R * C], w_obs[R * C], w_mag[R * C], w_ref[R * C];
    static uint8_t mask[R * C], mask_ref[R * C];
    top_error err;
    top_error_clear(&err);
    rng_seed(2024);
    correlated_inputs(x, N, C);
    for (size_t i = 0; i < R * C; i++)
        w0[i] = (float)rng_normal();

    static const double qs[] = {0.3, 0.5, 0.8};
    for (size_t qi = 0; qi < 3; qi++) {
        double q = qs[qi];
        memcpy(w_obs, w0, sizeof w0);
        memcpy(w_mag, w0, sizeof w0);
        layer_obs_options o = {q, 0, 0, 16, 0.01, NULL};
        obs_damping dmp = {0};
        CHECK_INT_EQ(layer_obs_prune(w_obs, mask, x, R, C, N, &o, &dmp, &err), TOP_OK);
        magnitude_prune(w_mag, R * C, q);

        size_t want = (size_t)floor(q * R * C + 0.5);
        CHECK_MSG(count_zero(mask, R * C) == want, "q %g: pruned %zu, expected %zu", q,
                  count_zero(mask, R * C), want);
        for (size_t i = 0; i < R * C; i++)
            if (!mask[i] && w_obs[i] != 0.0f) {
                CHECK_MSG(0, "q %g: pruned w[%zu] = %g", q, i, w_obs[i]);
                break;
            }

        double e_obs, e_mag;
        CHECK_INT_EQ(layer_obs_reconstruction_error(&e_obs, w0, w_obs, x, R, C, N, &err), TOP_OK);
        CHECK_INT_EQ(layer_obs_reconstruction_error(&e_mag, w0, w_mag, x, R, C, N, &err), TOP_OK);
        printf("  q %.1f: reconstruction error layer OBS %.4g, magnitude %.4g\n", q, e_obs, e_mag);
        CHECK_MSG(e_obs < 0.7 * e_mag, "q %g: layer OBS error %g not below 0.7 x magnitude %g", q,
                  e_obs, e_mag);

        /* The lazy batch update equals the eager one. */
        memcpy(w_ref, w0, sizeof w0);
        eager_layer_obs(w_ref, mask_ref, x, R, C, N, q, 16, 0.01);
        size_t mask_diff = 0;
        for (size_t i = 0; i < R * C; i++)
            mask_diff += mask[i] != mask_ref[i];
        CHECK_MSG(mask_diff == 0, "q %g: %zu mask entries differ from the eager reference", q,
                  mask_diff);
        for (size_t i = 0; i < R * C; i++)
            CHECK_CLOSE_AT(w_obs[i], w_ref[i], 1e-4 * (1 + fabs(w_ref[i])), i);
    }
}

static void test_layer_obs_nm_and_error_formula(void)
{
    enum { R = 8, C = 24, N = 100 };
    static float x[N * C], w0[R * C], w[R * C], w_mag[R * C];
    static uint8_t mask[R * C];
    top_error err;
    top_error_clear(&err);
    rng_seed(77);
    correlated_inputs(x, N, C);
    for (size_t i = 0; i < R * C; i++)
        w0[i] = (float)rng_normal();
    memcpy(w, w0, sizeof w0);
    layer_obs_options o = {0.0, 2, 4, 8, 0.01, NULL};
    CHECK_INT_EQ(layer_obs_prune(w, mask, x, R, C, N, &o, NULL, &err), TOP_OK);
    for (size_t r = 0; r < R; r++)
        for (size_t g = 0; g < C; g += 4) {
            int kept = mask[r * C + g] + mask[r * C + g + 1] + mask[r * C + g + 2] +
                       mask[r * C + g + 3];
            CHECK_MSG(kept == 2, "row %zu group %zu keeps %d, expected 2", r, g, kept);
        }

    /* Magnitude 2:4 through the mask module for comparison. */
    float s[R * C];
    uint8_t m[R * C];
    prune_saliency_magnitude(s, w0, R * C);
    prune_layer ly = {s, m, R * C, C};
    prune_mask_options mo = {0.5, PRUNE_SCOPE_PER_LAYER, 2, 4, 0.0};
    CHECK_INT_EQ(prune_mask_compute(&ly, 1, &mo, &err), TOP_OK);
    for (size_t i = 0; i < R * C; i++)
        w_mag[i] = m[i] ? w0[i] : 0.0f;
    double e_obs, e_mag;
    layer_obs_reconstruction_error(&e_obs, w0, w, x, R, C, N, &err);
    layer_obs_reconstruction_error(&e_mag, w0, w_mag, x, R, C, N, &err);
    CHECK_MSG(e_obs < e_mag, "2:4 layer OBS error %g not below magnitude %g", e_obs, e_mag);

    /* The error function against a direct sum. */
    double direct = 0.0;
    for (size_t s_i = 0; s_i < N; s_i++)
        for (size_t r = 0; r < R; r++) {
            double acc = 0.0;
            for (size_t j = 0; j < C; j++)
                acc += ((double)w0[r * C + j] - w_mag[r * C + j]) * x[s_i * C + j];
            direct += acc * acc;
        }
    CHECK_CLOSE(e_mag, direct, 1e-9 * direct);

    o = (layer_obs_options){0.5, 2, 4, 8, 0.01, NULL};
    CHECK_INT_EQ(layer_obs_prune(w, mask, x, R, C, N, &o, NULL, &err), TOP_ERR_INVALID);
}

static void test_layer_obs_dead_input_and_retry(void)
{
    enum { R = 6, C = 10, N = 50 };
    static float x[N * C], w[R * C];
    static uint8_t mask[R * C];
    top_error err;
    top_error_clear(&err);
    rng_seed(5150);
    correlated_inputs(x, N, C);
    for (size_t s = 0; s < N; s++)
        x[s * C + 3] = 0.0f; /* dead input 3 */
    for (size_t i = 0; i < R * C; i++)
        w[i] = (float)rng_normal();

    layer_obs_options o = {0.5, 0, 0, 4, 0.01, NULL};
    obs_damping dmp = {0};
    CHECK_INT_EQ(layer_obs_prune(w, mask, x, R, C, N, &o, &dmp, &err), TOP_OK);
    CHECK_INT_EQ(count_zero(mask, R * C), 30);
    CHECK_INT_EQ(dmp.retries, 0);
    for (size_t r = 0; r < R; r++)
        CHECK_MSG(mask[r * C + 3] == 0, "row %zu keeps the dead input's weight", r);

    /* No damping: H is singular, the retry rule adds damping. */
    for (size_t i = 0; i < R * C; i++)
        w[i] = (float)rng_normal();
    o.damping = 0.0;
    dmp = (obs_damping){0};
    CHECK_INT_EQ(layer_obs_prune(w, mask, x, R, C, N, &o, &dmp, &err), TOP_OK);
    CHECK_MSG(dmp.retries >= 1, "retries %d, expected >= 1", dmp.retries);
    CHECK_INT_EQ(count_zero(mask, R * C), 30);
    for (size_t i = 0; i < R * C; i++)
        CHECK_MSG(isfinite(w[i]), "w[%zu] = %g", i, w[i]);

    volatile int cancel = 1;
    o.cancel = &cancel;
    CHECK_INT_EQ(layer_obs_prune(w, mask, x, R, C, N, &o, NULL, &err), TOP_ERR_CANCELLED);
}

int main(void)
{
    TEST_RUN(test_mask_exact_counts_all_modes);
    TEST_RUN(test_mask_matches_full_sort);
    TEST_RUN(test_mask_deterministic);
    TEST_RUN(test_mask_ties_by_index);
    TEST_RUN(test_mask_floor_protects_layer);
    TEST_RUN(test_mask_rejects_bad_options);
    TEST_RUN(test_schedule_density);
    TEST_RUN(test_obd_and_magnitude);
    TEST_RUN(test_obs_vs_brute_force);
    TEST_RUN(test_obs_update_matches_kkt);
    TEST_RUN(test_obs_inverse_matches_gauss);
    TEST_RUN(test_cholesky_retry_singular);
    TEST_RUN(test_obs_layer_blocks_and_dead_features);
    TEST_RUN(test_obs_memory_estimate);
    TEST_RUN(test_layer_obs_beats_magnitude);
    TEST_RUN(test_layer_obs_nm_and_error_formula);
    TEST_RUN(test_layer_obs_dead_input_and_retry);
    return TEST_FINISH();
}
