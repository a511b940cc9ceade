/*
 * `topiary prune`: parses the options into a pipeline_options, runs
 * pipeline_run on the calling thread, draws a progress bar on stderr and
 * prints the JSON report on stdout. Exit codes: 0 done, 1 the job failed,
 * 2 an option is invalid. Owns nothing beyond one call.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "pipeline.h"

static void prune_usage(FILE *out)
{
    fprintf(out,
            "usage: topiary prune --model PATH --eval URI[,URI...] [--sparsity Q]\n"
            "                     [--method magnitude|obd|obs|layer_obs|data_free]\n"
            "                     [--calibration URI]\n"
            "                     [--calibration-split N,HEADFIT] [--eval-split HEADFIT,EVAL]\n"
            "                     [--calibration-head ridge|model]\n"
            "                     [--feature-node NAME] [--damping X | --damping-absolute X]\n"
            "                     [--scope global|per-layer] [--nm N:M] [--min-density D]\n"
            "                     [--rounds R] [--bn-correction match-dense|reestimate|none]\n"
            "                     [--bn-passes P] [--alpha A] [--batch B]\n"
            "                     [--block-size B] [--no-obs-update] [--obs-memory MIB]\n"
            "                     [--allocation magnitude|obd|uniform] [--layer-obs-rows N]\n"
            "                     [--layer-obs-inputs sequential|dense]\n"
            "                     [--finetune] [--finetune-images N] [--finetune-epochs E]\n"
            "                     [--finetune-lr LR] [--finetune-momentum M]\n"
            "                     [--finetune-weight-decay WD] [--finetune-batch B]\n"
            "                     [--finetune-schedule cosine|constant]\n"
            "                     [--finetune-batch-norm frozen|train]\n"
            "                     [--finetune-loss cross_entropy|distill]\n"
            "                     [--finetune-no-bn-correction]\n"
            "                     [--layers GLOB[,GLOB...]] [--skip-layers GLOB[,GLOB...]]\n"
            "                     [--head-cache DIR] [--seed S] [--out DIR]\n\n"
            "Prunes the model's backbone to sparsity Q (default 0.5) and reports the\n"
            "zero-shot accuracy of ridge heads, fitted on the dense features, before and\n"
            "after pruning. URIs: idx:IMAGES,LABELS  folder:DIR  bundle:FILE\n"
            "digits-grid:FILE. obd, obs and layer_obs need --calibration; magnitude\n"
            "and data_free (0.5 w^2 E[x^2], E[x^2] predicted from the batch norms) do\n"
            "not. obs: block\n"
            "OBS with Fisher blocks of B weights (default 64, 1..1024), the OBS update\n"
            "of kept weights unless --no-obs-update, at most --obs-memory MiB (4096).\n"
            "layer_obs: layer-wise OBS to the per-layer densities of a global\n"
            "--allocation mask (default magnitude), from at most N input rows per\n"
            "layer (default 4096). With a calibration set the\n"
            "batch norms are corrected after pruning (default match-dense: each BN\n"
            "input gets the dense model's mean and spread on the calibration images,\n"
            "in P passes, default 1). Defaults: calibration split 64,200,\n"
            "eval split 200,200, damping 1e-3 * mean Fisher, alpha 1.0, batch 16.\n"
            "--finetune (or any --finetune-* option) fine-tunes the pruned backbone on N\n"
            "images of the calibration set (default 512) with its ridge head frozen and\n"
            "the pruned weights held at zero: SGD, E epochs (2), LR 5e-5 with a cosine\n"
            "schedule, momentum 0.9, no weight decay, batch 16, batch norm frozen; the\n"
            "evaluation tasks are then measured again.\n"
            "The saliency loss is the cross-entropy of a ridge head fitted on the\n"
            "calibration set, or with --calibration-head model of the model's own output\n"
            "(when the calibration set's labels are the model's classes).\n"
            "Pruned: conv and dense weights before the feature node but the first conv;\n"
            "--layers prunes only the weights whose names match a glob instead (see\n"
            "topiary inspect --params), --skip-layers keeps the matching ones dense.\n"
            "--head-cache DIR keeps the dense heads and accuracies there, so a later job on\n"
            "the same model, task and splits skips the dense features.\n"
            "--out DIR writes DIR/dense.safetensors and DIR/compressed.safetensors, and\n"
            "DIR/tfjs/model.json with one float32 shard for a TF.js model.\n");
}

static int bad_option(const char *opt, const char *value, const char *fix)
{
    fprintf(stderr, "topiary prune: invalid %s '%s': %s\n", opt, value, fix);
    return 2;
}

static int missing_option(const char *opt, const char *fix)
{
    fprintf(stderr, "topiary prune: missing %s: %s\n", opt, fix);
    return 2;
}

static int parse_double(double *out, const char *s)
{
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    return errno || end == s || *end != '\0' ? -1 : 0;
}

static int parse_size(size_t *out, const char *s, char stop, const char **rest)
{
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end != stop || v > (1ull << 31))
        return -1;
    *out = (size_t)v;
    *rest = *end ? end + 1 : end;
    return 0;
}

/* Parses "A,B" into two counts. */
static int parse_pair(size_t *a, size_t *b, const char *s)
{
    const char *rest;
    return parse_size(a, s, ',', &rest) || parse_size(b, rest, '\0', &rest) ? -1 : 0;
}

/* Splits the comma list of evaluation URIs in place. A piece without a scheme
 * is the label file of an idx: URI, so it joins the piece before it. */
static int split_eval(pipeline_options *o, char *list)
{
    for (char *p = strtok(list, ","); p; p = strtok(NULL, ",")) {
        if (!strchr(p, ':') && o->n_eval > 0) {
            p[-1] = ',';
            continue;
        }
        if (o->n_eval == PIPELINE_MAX_EVAL_TASKS)
            return -1;
        o->eval_uris[o->n_eval++] = p;
    }
    return o->n_eval > 0 ? 0 : -1;
}

typedef struct progress_state {
    const char *stage;
    int tty;
} progress_state;

/* Redraws the bar in place on a terminal. Otherwise it prints one line when a
 * stage starts and one when it ends. */
static void draw_progress(void *user, const char *stage, size_t done, size_t total)
{
    progress_state *ps = user;
    int new_stage = !ps->stage || strcmp(ps->stage, stage) != 0;
    if (!ps->tty && !new_stage && done != total)
        return;
    if (ps->tty && ps->stage && new_stage)
        fputc('\n', stderr);
    ps->stage = stage;
    double f = total ? (double)done / (double)total : 0.0;
    int width = 30, fill = (int)(f * width + 0.5);
    fprintf(stderr, "%s%-18s [%.*s%*s] %3.0f%%", ps->tty ? "\r" : "", stage, fill,
            "##############################", width - fill, "", 100.0 * f);
    if (!ps->tty)
        fputc('\n', stderr);
    fflush(stderr);
}

enum {
    OPT_CALIB_SPLIT = 256,
    OPT_EVAL_SPLIT,
    OPT_FEATURE,
    OPT_DAMPING,
    OPT_DAMPING_ABS,
    OPT_NO_BN,
    OPT_BN_CORRECTION,
    OPT_BN_PASSES,
    OPT_ALPHA,
    OPT_BATCH,
    OPT_SCOPE,
    OPT_NM,
    OPT_MIN_DENSITY,
    OPT_ROUNDS,
    OPT_BLOCK,
    OPT_NO_UPDATE,
    OPT_OBS_MEMORY,
    OPT_ALLOCATION,
    OPT_LOBS_ROWS,
    OPT_LOBS_INPUTS,
    OPT_FINETUNE,
    OPT_FT_IMAGES,
    OPT_FT_EPOCHS,
    OPT_FT_LR,
    OPT_FT_MOMENTUM,
    OPT_FT_DECAY,
    OPT_FT_SCHEDULE,
    OPT_FT_BN,
    OPT_FT_BATCH,
    OPT_FT_NO_BN,
    OPT_FT_LOSS,
    OPT_HEAD_CACHE,
    OPT_LAYERS,
    OPT_SKIP_LAYERS,
    OPT_CALIB_HEAD
};

static const struct option prune_options[] = {
    {"model", required_argument, NULL, 'm'},
    {"sparsity", required_argument, NULL, 'q'},
    {"method", required_argument, NULL, 'M'},
    {"calibration", required_argument, NULL, 'c'},
    {"calibration-split", required_argument, NULL, OPT_CALIB_SPLIT},
    {"eval", required_argument, NULL, 'e'},
    {"eval-split", required_argument, NULL, OPT_EVAL_SPLIT},
    {"feature-node", required_argument, NULL, OPT_FEATURE},
    {"damping", required_argument, NULL, OPT_DAMPING},
    {"damping-absolute", required_argument, NULL, OPT_DAMPING_ABS},
    {"no-bn-recalibration", no_argument, NULL, OPT_NO_BN},
    {"bn-correction", required_argument, NULL, OPT_BN_CORRECTION},
    {"scope", required_argument, NULL, OPT_SCOPE},
    {"nm", required_argument, NULL, OPT_NM},
    {"min-density", required_argument, NULL, OPT_MIN_DENSITY},
    {"rounds", required_argument, NULL, OPT_ROUNDS},
    {"bn-passes", required_argument, NULL, OPT_BN_PASSES},
    {"alpha", required_argument, NULL, OPT_ALPHA},
    {"batch", required_argument, NULL, OPT_BATCH},
    {"block-size", required_argument, NULL, OPT_BLOCK},
    {"no-obs-update", no_argument, NULL, OPT_NO_UPDATE},
    {"obs-memory", required_argument, NULL, OPT_OBS_MEMORY},
    {"allocation", required_argument, NULL, OPT_ALLOCATION},
    {"layer-obs-rows", required_argument, NULL, OPT_LOBS_ROWS},
    {"layer-obs-inputs", required_argument, NULL, OPT_LOBS_INPUTS},
    {"finetune", no_argument, NULL, OPT_FINETUNE},
    {"finetune-images", required_argument, NULL, OPT_FT_IMAGES},
    {"finetune-epochs", required_argument, NULL, OPT_FT_EPOCHS},
    {"finetune-lr", required_argument, NULL, OPT_FT_LR},
    {"finetune-momentum", required_argument, NULL, OPT_FT_MOMENTUM},
    {"finetune-weight-decay", required_argument, NULL, OPT_FT_DECAY},
    {"finetune-schedule", required_argument, NULL, OPT_FT_SCHEDULE},
    {"finetune-batch-norm", required_argument, NULL, OPT_FT_BN},
    {"finetune-batch", required_argument, NULL, OPT_FT_BATCH},
    {"finetune-no-bn-correction", no_argument, NULL, OPT_FT_NO_BN},
    {"finetune-loss", required_argument, NULL, OPT_FT_LOSS},
    {"head-cache", required_argument, NULL, OPT_HEAD_CACHE},
    {"layers", required_argument, NULL, OPT_LAYERS},
    {"calibration-head", required_argument, NULL, OPT_CALIB_HEAD},
    {"skip-layers", required_argument, NULL, OPT_SKIP_LAYERS},
    {"seed", required_argument, NULL, 's'},
    {"out", required_argument, NULL, 'o'},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* Parses one obs or layer_obs option into o. Returns 0, 1 if c is not one of
 * them, or the exit code for an invalid value. */
static int parse_obs(pipeline_options *o, int c, const char *arg)
{
    size_t n;
    const char *rest;
    switch (c) {
    case OPT_BLOCK:
        if (parse_size(&n, arg, '\0', &rest) || n < 1 || n > PIPELINE_OBS_BLOCK_MAX)
            return bad_option("--block-size", arg, "pass a block size from 1 to 1024");
        o->obs_block = n;
        return 0;
    case OPT_NO_UPDATE: o->obs_update = 0; return 0;
    case OPT_OBS_MEMORY:
        if (parse_size(&n, arg, '\0', &rest) || n < 1 || n > ((size_t)1 << 30))
            return bad_option("--obs-memory", arg, "pass a budget in MiB, such as 4096");
        o->obs_memory_budget = n << 20;
        return 0;
    case OPT_ALLOCATION:
        if (!strcmp(arg, "magnitude"))
            o->allocation = PIPELINE_ALLOC_MAGNITUDE;
        else if (!strcmp(arg, "obd"))
            o->allocation = PIPELINE_ALLOC_OBD;
        else if (!strcmp(arg, "uniform"))
            o->allocation = PIPELINE_ALLOC_UNIFORM;
        else
            return bad_option("--allocation", arg, "use magnitude, obd or uniform");
        return 0;
    case OPT_LOBS_ROWS:
        if (parse_size(&n, arg, '\0', &rest) || n < 16 || n > PIPELINE_LAYER_OBS_ROWS_MAX)
            return bad_option("--layer-obs-rows", arg, "pass a row count from 16 to 1048576");
        o->layer_obs_rows = n;
        return 0;
    case OPT_LOBS_INPUTS:
        if (strcmp(arg, "sequential") && strcmp(arg, "dense"))
            return bad_option("--layer-obs-inputs", arg, "use sequential or dense");
        o->layer_obs_sequential = arg[0] == 's';
        return 0;
    default: return 1;
    }
}

/* Parses one fine-tuning option into o (any of them turns fine-tuning on).
 * Returns 0, 1 if c is not one of them, or the exit code for an invalid value. */
static int parse_finetune(pipeline_options *o, int c, const char *arg)
{
    size_t n = 0;
    double v = -1.0;
    const char *rest;
    finetune_options *f = &o->ft;
    int sized = c == OPT_FT_IMAGES || c == OPT_FT_EPOCHS || c == OPT_FT_BATCH;
    int real = c == OPT_FT_LR || c == OPT_FT_MOMENTUM || c == OPT_FT_DECAY;
    if (sized && parse_size(&n, arg, '\0', &rest))
        n = 0; /* rejected below */
    if (real && parse_double(&v, arg))
        v = -1.0;
    switch (c) {
    case OPT_FINETUNE: break;
    case OPT_FT_NO_BN: o->finetune_bn_correction = 0; break;
    case OPT_FT_IMAGES:
        if (n < 2 || n > 1000000)
            return bad_option("--finetune-images", arg, "pass a count from 2 to 1000000");
        o->finetune_count = n;
        break;
    case OPT_FT_EPOCHS:
        if (n < 1 || n > 100)
            return bad_option("--finetune-epochs", arg, "pass a count from 1 to 100");
        f->epochs = (int)n;
        break;
    case OPT_FT_BATCH:
        if (n < 2 || n > 1024)
            return bad_option("--finetune-batch", arg, "pass an image count from 2 to 1024");
        f->batch_size = (int)n;
        break;
    case OPT_FT_LR:
        if (!(v > 0.0 && v <= 1.0))
            return bad_option("--finetune-lr", arg, "pass a rate in (0, 1], such as 5e-5");
        f->lr = v;
        break;
    case OPT_FT_MOMENTUM:
        if (!(v >= 0.0 && v <= 0.999))
            return bad_option("--finetune-momentum", arg,
                              "pass a value in [0, 0.999], such as 0.9");
        f->momentum = v;
        break;
    case OPT_FT_DECAY:
        if (!(v >= 0.0 && v <= 1.0))
            return bad_option("--finetune-weight-decay", arg,
                              "pass a value in [0, 1], such as 1e-4");
        f->weight_decay = v;
        break;
    case OPT_FT_SCHEDULE:
        if (strcmp(arg, "cosine") && strcmp(arg, "constant"))
            return bad_option("--finetune-schedule", arg, "use cosine or constant");
        f->schedule =
            strcmp(arg, "cosine") ? FINETUNE_SCHEDULE_CONSTANT : FINETUNE_SCHEDULE_COSINE;
        break;
    case OPT_FT_LOSS:
        if (strcmp(arg, "cross_entropy") && strcmp(arg, "distill"))
            return bad_option("--finetune-loss", arg, "use cross_entropy or distill");
        f->loss = arg[0] == 'd' ? FINETUNE_LOSS_DISTILL : FINETUNE_LOSS_CROSS_ENTROPY;
        break;
    case OPT_FT_BN:
        if (strcmp(arg, "frozen") && strcmp(arg, "train"))
            return bad_option("--finetune-batch-norm", arg, "use frozen or train");
        f->bn_train = arg[0] == 't';
        break;
    default: return 1;
    }
    o->finetune = 1;
    return 0;
}

/* Parses one option into o. Returns 0, or the exit code for an invalid value. */
static int parse_one(pipeline_options *o, int c, char *arg)
{
    int obs = parse_obs(o, c, arg);
    if (obs != 1)
        return obs;
    int ft = parse_finetune(o, c, arg);
    if (ft != 1)
        return ft;
    double v;
    size_t n;
    const char *rest;
    switch (c) {
    case 'm': o->model_path = arg; return 0;
    case 'c': o->calib_uri = arg; return 0;
    case OPT_FEATURE: o->feature_node = arg; return 0;
    case 'o': o->out_dir = arg; return 0;
    case OPT_HEAD_CACHE: o->head_cache_dir = arg; return 0;
    case OPT_LAYERS: o->layers = arg; return 0;
    case OPT_CALIB_HEAD:
        if (strcmp(arg, "ridge") && strcmp(arg, "model"))
            return bad_option("--calibration-head", arg, "use ridge or model");
        o->calib_model_head = arg[0] == 'm';
        return 0;
    case OPT_SKIP_LAYERS: o->skip_layers = arg; return 0;
    case OPT_NO_BN: o->bn_recalibration = 0; return 0;
    case OPT_BN_CORRECTION:
        if (!strcmp(arg, "none")) {
            o->bn_recalibration = 0;
        } else if (!strcmp(arg, "match-dense") || !strcmp(arg, "reestimate")) {
            o->bn_mode = arg[0] == 'm' ? PIPELINE_BN_MATCH_DENSE : PIPELINE_BN_REESTIMATE;
        } else {
            return bad_option("--bn-correction", arg, "use match-dense, reestimate or none");
        }
        return 0;
    case OPT_SCOPE:
        if (strcmp(arg, "global") && strcmp(arg, "per-layer"))
            return bad_option("--scope", arg, "use global or per-layer");
        o->scope = arg[0] == 'g' ? PRUNE_SCOPE_GLOBAL : PRUNE_SCOPE_PER_LAYER;
        return 0;
    case OPT_NM: {
        size_t nm_n, nm_m;
        if (parse_size(&nm_n, arg, ':', &rest) || parse_size(&nm_m, rest, '\0', &rest) ||
            nm_n < 1 || nm_n >= nm_m || nm_m > PRUNE_NM_MAX_GROUP)
            return bad_option("--nm", arg, "pass N:M with N < M <= 64, such as 2:4");
        o->nm_n = (int)nm_n;
        o->nm_m = (int)nm_m;
        return 0;
    }
    case OPT_MIN_DENSITY:
        if (parse_double(&v, arg) || !(v >= 0.0 && v < 1.0))
            return bad_option("--min-density", arg, "pass a fraction in [0, 1), such as 0.05");
        o->min_density = v;
        return 0;
    case OPT_ROUNDS:
        if (parse_size(&n, arg, '\0', &rest) || n < 1 || n > 100)
            return bad_option("--rounds", arg, "pass a count from 1 to 100");
        o->rounds = (int)n;
        return 0;
    case OPT_BN_PASSES:
        if (parse_size(&n, arg, '\0', &rest) || n < 1 || n > 16)
            return bad_option("--bn-passes", arg, "pass a count from 1 to 16");
        o->bn_passes = (int)n;
        return 0;
    case 'q':
        if (parse_double(&v, arg) || !(v >= 0.0 && v < 1.0))
            return bad_option("--sparsity", arg, "pass a fraction in [0, 1), such as 0.5");
        o->sparsity = v;
        return 0;
    case 'M':
        if (!strcmp(arg, "magnitude"))
            o->method = PIPELINE_METHOD_MAGNITUDE;
        else if (!strcmp(arg, "obd"))
            o->method = PIPELINE_METHOD_OBD;
        else if (!strcmp(arg, "obs"))
            o->method = PIPELINE_METHOD_OBS;
        else if (!strcmp(arg, "layer_obs"))
            o->method = PIPELINE_METHOD_LAYER_OBS;
        else if (!strcmp(arg, "data_free"))
            o->method = PIPELINE_METHOD_DATA_FREE;
        else
            return bad_option("--method", arg,
                              "use magnitude, obd, obs, layer_obs or data_free");
        return 0;
    case OPT_CALIB_SPLIT:
        if (parse_pair(&o->calib_count, &o->calib_fit_count, arg) || o->calib_count < 2 ||
            o->calib_fit_count < 2)
            return bad_option("--calibration-split", arg,
                              "pass two counts >= 2, such as "
                              "64,200 (calibration, head fit)");
        return 0;
    case OPT_EVAL_SPLIT:
        if (parse_pair(&o->eval_fit_count, &o->eval_count, arg) || o->eval_fit_count < 2 ||
            o->eval_count < 1)
            return bad_option("--eval-split", arg,
                              "pass two counts, such as 200,200 "
                              "(head fit >= 2, evaluation >= 1)");
        return 0;
    case 'e':
        if (split_eval(o, arg))
            return bad_option("--eval", arg, "pass 1 to 16 comma-separated data set URIs");
        return 0;
    case OPT_DAMPING:
    case OPT_DAMPING_ABS:
        if (parse_double(&v, arg) || !(v >= 0.0 && v < 1e30))
            return bad_option(c == OPT_DAMPING ? "--damping" : "--damping-absolute", arg,
                              "pass a number >= 0, such as 1e-3");
        o->damping = v;
        o->damping_mode =
            c == OPT_DAMPING ? PIPELINE_DAMPING_RELATIVE : PIPELINE_DAMPING_ABSOLUTE;
        return 0;
    case OPT_ALPHA:
        if (parse_double(&v, arg) || !(v > 0.0 && v < 1e30))
            return bad_option("--alpha", arg, "pass a ridge penalty > 0, such as 1.0");
        o->ridge_alpha = v;
        return 0;
    case OPT_BATCH:
        if (parse_size(&n, arg, '\0', &rest) || n < 2 || n > 1024)
            return bad_option("--batch", arg, "pass an image count from 2 to 1024");
        o->batch_size = (int)n;
        return 0;
    case 's':
        if (parse_size(&n, arg, '\0', &rest))
            return bad_option("--seed", arg, "pass a non-negative integer below 2^31");
        o->seed = n;
        return 0;
    default: prune_usage(stderr); return 2;
    }
}

int cli_prune(int argc, char **argv)
{
    pipeline_options o;
    pipeline_options_init(&o);
    optind = 1;
    for (int c; (c = getopt_long(argc, argv, "h", prune_options, NULL)) != -1;) {
        if (c == 'h') {
            prune_usage(stdout);
            return 0;
        }
        int rc = parse_one(&o, c, optarg);
        if (rc)
            return rc;
    }
    if (optind < argc)
        return bad_option("argument", argv[optind], "options start with --; see --help");
    if (!o.model_path)
        return missing_option("--model", "pass the model folder or file to prune");
    if (o.n_eval == 0)
        return missing_option("--eval", "pass at least one evaluation data set URI");
    if (o.method != PIPELINE_METHOD_MAGNITUDE && o.method != PIPELINE_METHOD_DATA_FREE &&
        !o.calib_uri)
        return missing_option("--calibration", "--method obd, obs and layer_obs need a "
                                               "calibration data set");
    if (o.finetune && !o.calib_uri)
        return missing_option("--calibration", "fine-tuning trains on the calibration "
                                               "data set; pass one or drop --finetune");

    progress_state ps = {.stage = NULL, .tty = isatty(2)};
    json_t *report = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&report, NULL, &o, draw_progress, &ps, NULL, &err);
    if (ps.stage && ps.tty)
        fputc('\n', stderr);
    if (st != TOP_OK) {
        fprintf(stderr, "topiary prune: %s\n", err.message);
        return st == TOP_ERR_INVALID ? 2 : 1;
    }
    json_dumpf(report, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    fputc('\n', stdout);
    json_decref(report);
    return 0;
}
