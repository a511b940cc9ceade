/*
 * Keep masks from saliency scores: global or per-layer ranking, unstructured
 * or N:M, with a per-layer minimum density, and the iterative schedule.
 *
 * Selection is exact counting, not a float threshold. Each score maps to a
 * 32-bit key that orders like the float (-0 and +0 equal). To take the r
 * lowest weights of a set, two histogram passes (high 16 bits, then low 16
 * bits within the boundary bucket) find the smallest key t with at least r
 * weights at or below it. Every weight below t is taken, then the weights
 * equal to t in ascending (layer, index) order until r are taken. Taking the r highest mirrors
 * this: keys are complemented and ties are walked in descending order.
 *
 * While masks are built, a mask byte is a state: MASK_PRUNED (0), MASK_FREE
 * (1, still rankable) or MASK_LOCKED (2, kept by the density floor). The
 * final masks hold only 0 and 1. Reentrant; the caller owns the layers.
 */
#include "prune.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Legend: L layers; layer l has count_l scores as (rows, cols), row-major. */

enum { MASK_PRUNED = 0, MASK_FREE = 1, MASK_LOCKED = 2 };

typedef enum rank_end { RANK_LOWEST, RANK_HIGHEST } rank_end;

/* Order-preserving key of a non-NaN float: RANK_LOWEST keys ascend with s,
 * RANK_HIGHEST keys are their complement. */
static uint32_t score_key(float s, rank_end end)
{
    uint32_t u;
    if (s == 0.0f)
        s = 0.0f; /* -0 ranks with +0 */
    memcpy(&u, &s, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return end == RANK_LOWEST ? u : ~u;
}

/*
 * Counts the keys of the free weights in layers [first, last) in 65536
 * buckets: by their high 16 bits, or with low_half set, by the low 16 bits
 * of only those keys whose high 16 bits equal `high`.
 */
static void key_histogram(size_t *hist, const prune_layer *layers, size_t first, size_t last,
                          rank_end end, int low_half, uint32_t high)
{
    memset(hist, 0, 65536 * sizeof *hist);
    for (size_t l = first; l < last; l++) {
        const prune_layer *ly = &layers[l];
        for (size_t i = 0; i < ly->count; i++) {
            if (ly->mask[i] != MASK_FREE)
                continue;
            uint32_t key = score_key(ly->scores[i], end);
            if (!low_half)
                hist[key >> 16]++;
            else if (key >> 16 == high)
                hist[key & 0xffffu]++;
        }
    }
}

/* First bucket at which before + the running sum of hist reaches r; *before
 * becomes the count of all earlier buckets. */
static uint32_t histogram_bucket(const size_t *hist, size_t r, size_t *before)
{
    uint32_t b = 0;
    while (b < 65535 && *before + hist[b] < r)
        *before += hist[b++];
    return b;
}

/* Sets the state of weight i of layer l to `to` if it is free with key t;
 * returns 1 if it did. Used by the tie walk. */
static int take_tie(prune_layer *ly, size_t i, uint32_t t, rank_end end, uint8_t to)
{
    if (ly->mask[i] != MASK_FREE || score_key(ly->scores[i], end) != t)
        return 0;
    ly->mask[i] = to;
    return 1;
}

/*
 * Sets the r lowest (or highest) free weights of layers [first, last) to
 * state `to`. Ties at the boundary go in ascending (layer, index) order for
 * RANK_LOWEST and descending for RANK_HIGHEST. The caller ensures r does not
 * exceed the number of free weights. hist: 65536 counters of workspace.
 */
static void select_ranked(prune_layer *layers, size_t first, size_t last, size_t r,
                          rank_end end, uint8_t to, size_t *hist)
{
    if (r == 0)
        return;

    /* Smallest key t with at least r free keys <= t: a two-pass radix
     * search, first on the high 16 bits, then on the low 16 bits. */
    size_t before = 0;
    key_histogram(hist, layers, first, last, end, 0, 0);
    uint32_t high = histogram_bucket(hist, r, &before);
    key_histogram(hist, layers, first, last, end, 1, high);
    uint32_t t = high << 16 | histogram_bucket(hist, r, &before);

    /* Everything strictly below t. */
    size_t taken = 0;
    for (size_t l = first; l < last; l++) {
        prune_layer *ly = &layers[l];
        for (size_t i = 0; i < ly->count; i++)
            if (ly->mask[i] == MASK_FREE && score_key(ly->scores[i], end) < t) {
                ly->mask[i] = to;
                taken++;
            }
    }

    /* Ties at t, in (layer, index) order. */
    if (end == RANK_LOWEST) {
        for (size_t l = first; l < last && taken < r; l++)
            for (size_t i = 0; i < layers[l].count && taken < r; i++)
                taken += (size_t)take_tie(&layers[l], i, t, end, to);
    } else {
        for (size_t l = last; l > first && taken < r; l--)
            for (size_t i = layers[l - 1].count; i > 0 && taken < r; i--)
                taken += (size_t)take_tie(&layers[l - 1], i - 1, t, end, to);
    }
}

static size_t count_state(const prune_layer *ly, uint8_t state)
{
    size_t c = 0;
    for (size_t i = 0; i < ly->count; i++)
        c += ly->mask[i] == state;
    return c;
}

/* ceil(d * n), ignoring the rounding error of the product (0.3 * 10 is
 * 3.0000000000000004 in double and must give 3). */
static size_t floor_count(double d, size_t n)
{
    double v = d * (double)n;
    return (size_t)ceil(v - 1e-9 * fmax(1.0, v));
}

/* round(q * n) for q in [0, 1], half away from zero. */
static size_t round_count(double q, size_t n)
{
    return (size_t)floor(q * (double)n + 0.5);
}

/* Prunes all but the N best of each group of M consecutive weights in a row:
 * ranking by (score, index) ascending, so ties prune the earlier weight. */
static void apply_nm(prune_layer *ly, int n_keep, int m)
{
    size_t idx[PRUNE_NM_MAX_GROUP];
    for (size_t row = 0; row < ly->count; row += ly->cols)
        for (size_t g = 0; g < ly->cols; g += (size_t)m) {
            size_t len = ly->cols - g < (size_t)m ? ly->cols - g : (size_t)m;
            if (len <= (size_t)n_keep)
                continue;

            /* Insertion sort of the group by (key, index). */
            for (size_t j = 0; j < len; j++) {
                size_t i = row + g + j, k = j;
                uint32_t key = score_key(ly->scores[i], RANK_LOWEST);
                while (k > 0 && score_key(ly->scores[idx[k - 1]], RANK_LOWEST) > key) {
                    idx[k] = idx[k - 1];
                    k--;
                }
                idx[k] = i;
            }
            for (size_t j = 0; j < len - (size_t)n_keep; j++)
                ly->mask[idx[j]] = MASK_PRUNED;
        }
}

static top_status validate(const prune_layer *layers, size_t n_layers,
                           const prune_mask_options *opt, top_error *err)
{
    if (!(opt->sparsity >= 0.0 && opt->sparsity <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "sparsity %g is outside [0, 1]; pass a fraction such as 0.5",
                             opt->sparsity);
    if (!(opt->min_density >= 0.0 && opt->min_density <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID, "min_density %g is outside [0, 1]",
                             opt->min_density);
    if (opt->min_density > 1.0 - opt->sparsity + 1e-12)
        return top_error_set(err, TOP_ERR_INVALID,
                             "min_density %g exceeds the target density %g; lower "
                             "min_density or the sparsity",
                             opt->min_density, 1.0 - opt->sparsity);
    if (opt->scope != PRUNE_SCOPE_GLOBAL && opt->scope != PRUNE_SCOPE_PER_LAYER)
        return top_error_set(err, TOP_ERR_INVALID, "unknown prune scope %d", (int)opt->scope);
    if (opt->nm_m != 0 && (opt->nm_m < 1 || opt->nm_m > PRUNE_NM_MAX_GROUP || opt->nm_n < 0 ||
                           opt->nm_n >= opt->nm_m))
        return top_error_set(err, TOP_ERR_INVALID,
                             "invalid N:M pattern %d:%d; need 0 <= N < M <= %d", opt->nm_n,
                             opt->nm_m, PRUNE_NM_MAX_GROUP);

    for (size_t l = 0; l < n_layers; l++) {
        const prune_layer *ly = &layers[l];
        if (ly->count > 0 && (!ly->scores || !ly->mask))
            return top_error_set(err, TOP_ERR_INVALID, "layer %zu has no scores or mask", l);
        if (ly->cols == 0 || ly->count % ly->cols != 0)
            return top_error_set(err, TOP_ERR_SHAPE,
                                 "layer %zu: count %zu is not a multiple of cols %zu", l,
                                 ly->count, ly->cols);
        for (size_t i = 0; i < ly->count; i++)
            if (isnan(ly->scores[i]))
                return top_error_set(err, TOP_ERR_NUMERIC,
                                     "layer %zu: score %zu is NaN; check the saliency inputs",
                                     l, i);
    }
    return TOP_OK;
}

/* Keeps exactly keep_l of the free weights of each layer. */
static top_status mask_per_layer(prune_layer *layers, size_t n_layers,
                                 const prune_mask_options *opt, size_t *hist, top_error *err)
{
    for (size_t l = 0; l < n_layers; l++) {
        prune_layer *ly = &layers[l];
        size_t cap = count_state(ly, MASK_FREE);
        size_t floor_l = floor_count(opt->min_density, ly->count);
        size_t keep = ly->count - round_count(opt->sparsity, ly->count);
        if (keep < floor_l)
            keep = floor_l;
        if (keep > cap)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "layer %zu: %d:%d allows %zu of %zu weights but sparsity %g "
                                 "keeps %zu; raise the sparsity to at least %g",
                                 l, opt->nm_n, opt->nm_m, cap, ly->count, opt->sparsity, keep,
                                 1.0 - (double)opt->nm_n / opt->nm_m);
        select_ranked(layers, l, l + 1, cap - keep, RANK_LOWEST, MASK_PRUNED, hist);
    }
    return TOP_OK;
}

/* Locks each layer's floor, then prunes the lowest free weights across all
 * layers until round(q * total) are pruned or only floors remain. */
static top_status mask_global(prune_layer *layers, size_t n_layers,
                              const prune_mask_options *opt, size_t total, size_t *hist,
                              top_error *err)
{
    size_t cap = 0, floors = 0;
    for (size_t l = 0; l < n_layers; l++) {
        prune_layer *ly = &layers[l];
        size_t cap_l = count_state(ly, MASK_FREE);
        size_t floor_l = floor_count(opt->min_density, ly->count);
        if (floor_l > cap_l)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "layer %zu: min_density %g needs %zu weights but %d:%d "
                                 "allows %zu; lower min_density",
                                 l, opt->min_density, floor_l, opt->nm_n, opt->nm_m, cap_l);
        select_ranked(layers, l, l + 1, floor_l, RANK_HIGHEST, MASK_LOCKED, hist);
        cap += cap_l;
        floors += floor_l;
    }

    size_t keep = total - round_count(opt->sparsity, total);
    if (keep > cap)
        return top_error_set(err, TOP_ERR_INVALID,
                             "%d:%d allows %zu of %zu weights but sparsity %g keeps %zu; "
                             "raise the sparsity to at least %g",
                             opt->nm_n, opt->nm_m, cap, total, opt->sparsity, keep,
                             1.0 - (double)opt->nm_n / opt->nm_m);
    if (keep < floors)
        keep = floors;
    select_ranked(layers, 0, n_layers, cap - keep, RANK_LOWEST, MASK_PRUNED, hist);
    return TOP_OK;
}

top_status prune_mask_compute(prune_layer *layers, size_t n_layers,
                              const prune_mask_options *opt, top_error *err)
{
    if (!opt || (n_layers > 0 && !layers))
        return top_error_set(err, TOP_ERR_INVALID,
                             "prune_mask_compute: missing layers or options");
    top_status st = validate(layers, n_layers, opt, err);
    if (st != TOP_OK)
        return st;

    size_t total = 0;
    for (size_t l = 0; l < n_layers; l++) {
        if (top_size_add(&total, total, layers[l].count))
            return top_error_set(err, TOP_ERR_OVERFLOW, "total weight count overflows");
        memset(layers[l].mask, MASK_FREE, layers[l].count);
        if (opt->nm_m > 0)
            apply_nm(&layers[l], opt->nm_n, opt->nm_m);
    }

    size_t *hist = malloc(65536 * sizeof *hist);
    if (!hist)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate the mask histogram");
    if (opt->scope == PRUNE_SCOPE_PER_LAYER)
        st = mask_per_layer(layers, n_layers, opt, hist, err);
    else
        st = mask_global(layers, n_layers, opt, total, hist, err);
    free(hist);

    /* Locked floors become plain keeps; on error the masks are cleared. */
    for (size_t l = 0; l < n_layers; l++)
        for (size_t i = 0; i < layers[l].count; i++)
            layers[l].mask[i] = st == TOP_OK && layers[l].mask[i] != MASK_PRUNED;
    return st;
}

double prune_schedule_density(double final_density, int round, int rounds)
{
    if (rounds <= 0 || round >= rounds)
        return final_density;
    if (round <= 0)
        return 1.0;
    return pow(final_density, (double)round / (double)rounds);
}
