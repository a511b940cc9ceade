/*
 * The client commands of a running `topiary serve`: submit (with --wait a
 * progress bar from the job's event stream, the result table and a
 * sha256-checked checkpoint download), jobs, job and cancel. They use HTTP
 * through client_http.c and JSON through jansson, and never touch the
 * server's files. Each failure kind has its own exit code (see
 * CLIENT_EXIT_HELP). Single-threaded.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "client_http.h"
#include "sha256.h"

enum {
    EXIT_OK = 0,
    EXIT_ERROR = 1,
    EXIT_USAGE = 2,
    EXIT_UNREACHABLE = 3,
    EXIT_REJECTED = 4,
    EXIT_JOB_FAILED = 5,
    EXIT_JOB_CANCELLED = 6,
    EXIT_CHECKSUM = 7,
};

#define CLIENT_EXIT_HELP                                                                       \
    "exit codes:\n"                                                                            \
    "  0  success\n"                                                                           \
    "  1  a local error (a file could not be written, a malformed response)\n"                 \
    "  2  invalid usage\n"                                                                     \
    "  3  server unreachable, timed out or unavailable (5xx)\n"                                \
    "  4  request rejected (4xx: bad value, unknown id, missing or wrong token)\n"             \
    "  5  the job failed\n"                                                                    \
    "  6  the job was cancelled\n"                                                             \
    "  7  the downloaded checkpoint's sha256 differs from the job's\n"

#define CLIENT_COMMON_HELP                                                                     \
    "  --server URL   the server, http://HOST:PORT (default $TOPIARY_SERVER or\n"              \
    "                 http://127.0.0.1:8080)\n"                                                \
    "  --token T      bearer token (default $TOPIARY_TOKEN)\n"

/* Limit of a JSON response body; a job with every layer is far smaller. */
#define MAX_JSON_BODY (16u << 20)
/* One Server-Sent Event (its lines together). */
#define MAX_EVENT_BYTES 65536
#define EVENT_TIMEOUT_S 60
#define POLL_LIMIT_S (24 * 3600)

typedef struct client {
    http_url url;
    const char *token;
} client;

/* Options every client command takes; returns 0, or EXIT_USAGE. */
static int client_init(client *c, const char *server, const char *token)
{
    top_error err;
    top_error_clear(&err);
    if (!server)
        server = getenv("TOPIARY_SERVER");
    if (!server || !*server)
        server = "http://127.0.0.1:8080";
    c->token = token ? token : getenv("TOPIARY_TOKEN");
    if (c->token && !*c->token)
        c->token = NULL;
    if (http_url_parse(&c->url, server, &err) != TOP_OK) {
        fprintf(stderr, "topiary: %s\n", err.message);
        return EXIT_USAGE;
    }
    return 0;
}

static int exit_for_transport(const top_error *err)
{
    fprintf(stderr, "topiary: %s\n", err->message);
    return err->status == TOP_ERR_IO ? EXIT_UNREACHABLE : EXIT_ERROR;
}

/* Prints a problem document (or the raw body) and returns the exit code of its status. */
static int report_problem(const http_response *resp)
{
    json_t *doc = resp->body ? json_loads(resp->body, 0, NULL) : NULL;
    const char *detail = json_string_value(json_object_get(doc, "detail"));
    const char *field = json_string_value(json_object_get(doc, "field"));
    const char *fix = json_string_value(json_object_get(doc, "fix"));
    fprintf(stderr, "topiary: the server responded %d: %s\n", resp->status,
            detail       ? detail
            : resp->body ? resp->body
                         : "(no body)");
    if (field)
        fprintf(stderr, "  field: %s\n", field);
    if (fix)
        fprintf(stderr, "  fix:   %s\n", fix);
    json_decref(doc);
    return resp->status >= 500 ? EXIT_UNREACHABLE : EXIT_REJECTED;
}

/*
 * One JSON request. On success *out is the parsed response (NULL for 204) and
 * *status the HTTP status; otherwise the error is printed and the exit code
 * returned.
 */
static int call_json(const client *c, const char *method, const char *path, const char *body,
                     const char *idempotency_key, json_t **out, int *status)
{
    top_error err;
    top_error_clear(&err);
    http_request req = {.method = method,
                        .path = path,
                        .token = c->token,
                        .accept = "application/json",
                        .idempotency_key = idempotency_key};
    if (body) {
        req.body = body;
        req.body_len = strlen(body);
        req.content_type = "application/json";
    }
    http_response resp;
    *out = NULL;
    if (http_do(&resp, &c->url, &req, NULL, NULL, MAX_JSON_BODY, &err) != TOP_OK) {
        http_response_free(&resp);
        return exit_for_transport(&err);
    }
    *status = resp.status;
    int rc = EXIT_OK;
    if (resp.status >= 400) {
        rc = report_problem(&resp);
    } else if (resp.status != 204) {
        json_error_t jerr;
        *out = json_loads(resp.body, 0, &jerr);
        if (!*out) {
            fprintf(stderr, "topiary: the server's response to %s %s is not JSON: %s\n", method,
                    path, jerr.text);
            rc = EXIT_ERROR;
        }
    }
    http_response_free(&resp);
    return rc;
}

/* A string member, or fallback when it is absent or not a string. */
static const char *str_or(json_t *obj, const char *key, const char *fallback)
{
    const char *v = json_string_value(json_object_get(obj, key));
    return v ? v : fallback;
}

static int is_final(const char *status)
{
    return status && (!strcmp(status, "succeeded") || !strcmp(status, "failed") ||
                      !strcmp(status, "cancelled"));
}

/* ---- progress ---------------------------------------------------------------------- */

typedef struct progress_view {
    int tty;
    char last_stage[64];
    int last_decile;
    int drawn;
} progress_view;

static void progress_draw(progress_view *v, const char *status, const char *stage, double p,
                          double eta)
{
    if (!isfinite(p) || p < 0)
        p = 0;
    if (p > 1)
        p = 1;
    const char *label = stage ? stage : status ? status : "?";
    if (v->tty) {
        char bar[31];
        int fill = (int)(p * 30.0 + 0.5);
        for (int i = 0; i < 30; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[30] = '\0';
        char eta_text[32] = "";
        if (eta >= 0 && isfinite(eta))
            snprintf(eta_text, sizeof eta_text, "  eta %.0f s", eta);
        fprintf(stderr, "\r[%s] %3.0f%%  %-12s%-14s", bar, p * 100, label, eta_text);
        v->drawn = 1;
    } else {
        int decile = (int)(p * 10);
        if (strcmp(v->last_stage, label) || decile != v->last_decile)
            fprintf(stderr, "progress %3.0f%%  %s\n", p * 100, label);
        v->last_decile = decile;
    }
    snprintf(v->last_stage, sizeof v->last_stage, "%s", label);
    fflush(stderr);
}

static void progress_from_json(progress_view *v, json_t *d)
{
    json_t *eta = json_object_get(d, "eta_seconds");
    progress_draw(v, json_string_value(json_object_get(d, "status")),
                  json_string_value(json_object_get(d, "stage")),
                  json_number_value(json_object_get(d, "progress")),
                  json_is_number(eta) ? json_number_value(eta) : -1);
}

static void progress_end(progress_view *v)
{
    if (v->tty && v->drawn)
        fputc('\n', stderr);
    v->drawn = 0;
}

/* Server-Sent Events parser state: the current line and event. */
typedef struct sse_state {
    progress_view *view;
    char line[MAX_EVENT_BYTES];
    size_t line_len;
    char data[MAX_EVENT_BYTES];
    size_t data_len;
    int done;
    int overflow;
} sse_state;

static void sse_dispatch(sse_state *s)
{
    if (s->data_len) {
        s->data[s->data_len] = '\0';
        json_t *d = json_loads(s->data, 0, NULL);
        if (d) {
            progress_from_json(s->view, d);
            if (is_final(json_string_value(json_object_get(d, "status"))))
                s->done = 1;
            json_decref(d);
        }
    }
    s->data_len = 0;
}

static void sse_line(sse_state *s)
{
    s->line[s->line_len] = '\0';
    if (s->line_len && s->line[s->line_len - 1] == '\r')
        s->line[--s->line_len] = '\0';
    if (s->line_len == 0) {
        sse_dispatch(s);
    } else if (!strncmp(s->line, "data:", 5)) {
        const char *v = s->line + 5 + (s->line[5] == ' ');
        size_t n = strlen(v);
        if (s->data_len + n + 1 < sizeof s->data) {
            memcpy(s->data + s->data_len, v, n);
            s->data_len += n;
        } else {
            s->overflow = 1;
        }
    } /* "event:", "id:" and ":" comments need nothing: the data names the state */
    s->line_len = 0;
}

static int sse_sink(void *ctx, const char *data, size_t n)
{
    sse_state *s = ctx;
    for (size_t i = 0; i < n; i++) {
        if (data[i] == '\n') {
            sse_line(s);
        } else if (s->line_len + 1 < sizeof s->line) {
            s->line[s->line_len++] = data[i];
        } else {
            s->overflow = 1; /* drop the rest of an over-long line */
        }
    }
    return 0;
}

/* Follows the event stream, then polls until the job is final; *job is its last state. */
static int wait_for_job(const client *c, const char *id, json_t **job)
{
    progress_view view = {.tty = isatty(STDERR_FILENO), .last_decile = -1};
    sse_state *s = calloc(1, sizeof *s);
    if (!s)
        return EXIT_ERROR;
    s->view = &view;
    char path[160];
    snprintf(path, sizeof path, "/v1/jobs/%s/events", id);
    http_request req = {.method = "GET",
                        .path = path,
                        .token = c->token,
                        .accept = "text/event-stream",
                        .timeout_s = EVENT_TIMEOUT_S};
    http_response resp;
    top_error err;
    top_error_clear(&err);
    top_status st = http_do(&resp, &c->url, &req, sse_sink, s, 0, &err);
    http_response_free(&resp);
    free(s);
    if (st == TOP_OK && resp.status >= 400) {
        progress_end(&view);
        fprintf(stderr, "topiary: the event stream of %s responded %d\n", id, resp.status);
        return resp.status >= 500 ? EXIT_UNREACHABLE : EXIT_REJECTED;
    }
    /* The stream ended (done, a dropped connection or a timeout): poll to the final state. */
    snprintf(path, sizeof path, "/v1/jobs/%s", id);
    for (long waited = 0; waited < POLL_LIMIT_S; waited++) {
        int code = 0;
        int rc = call_json(c, "GET", path, NULL, NULL, job, &code);
        if (rc) {
            progress_end(&view);
            return rc;
        }
        progress_from_json(&view, *job);
        if (is_final(json_string_value(json_object_get(*job, "status")))) {
            progress_end(&view);
            return EXIT_OK;
        }
        json_decref(*job);
        *job = NULL;
        sleep(1);
    }
    progress_end(&view);
    fprintf(stderr, "topiary: job %s is not finished after %d s\n", id, POLL_LIMIT_S);
    return EXIT_ERROR;
}

/* ---- results ----------------------------------------------------------------------- */

static void print_accuracy(json_t *v)
{
    if (json_is_number(v))
        printf("  %10.4f", json_number_value(v));
    else
        printf("  %10s", "-");
}

/* The difference b - a, or a dash when either is missing. */
static void print_change(const json_t *a, const json_t *b)
{
    if (json_is_number(a) && json_is_number(b))
        printf("  %+10.4f", json_number_value(b) - json_number_value(a));
    else
        printf("  %10s", "-");
}

static void print_results(json_t *job)
{
    json_t *res = json_object_get(job, "results");
    json_t *req = json_object_get(job, "request");
    json_t *arts = json_object_get(job, "artifacts");
    printf("job %s %s\n", json_string_value(json_object_get(job, "id")),
           json_string_value(json_object_get(job, "status")));
    printf("method %s, requested sparsity %.4f\n\n", str_or(req, "method", "magnitude"),
           json_number_value(json_object_get(res, "sparsity_requested")));
    json_t *tasks = json_object_get(res, "tasks");
    int tuned = json_is_object(json_object_get(res, "finetune"));
    printf("%-24s  %10s  %10s  %10s", "task", "dense acc", "pruned acc", "change");
    if (tuned)
        printf("  %10s  %10s", "tuned acc", "change");
    printf("\n");
    for (size_t i = 0; i < json_array_size(tasks); i++) {
        json_t *t = json_array_get(tasks, i);
        json_t *dense = json_object_get(t, "dense_accuracy");
        json_t *pruned = json_object_get(t, "pruned_accuracy");
        json_t *ft = json_object_get(t, "finetuned_accuracy");
        printf("%-24s", str_or(t, "task", "?"));
        print_accuracy(dense);
        print_accuracy(pruned);
        print_change(dense, pruned);
        if (tuned) {
            print_accuracy(ft);
            print_change(dense, ft);
        }
        printf("\n");
    }
    printf("\nachieved sparsity   %.4f (%lld of %lld prunable weights are zero)\n",
           json_number_value(json_object_get(res, "sparsity_achieved")),
           (long long)json_integer_value(json_object_get(res, "zero_weights")),
           (long long)json_integer_value(json_object_get(res, "prunable_weights")));
    json_int_t dense =
        json_integer_value(json_object_get(json_object_get(arts, "dense"), "size"));
    json_int_t comp =
        json_integer_value(json_object_get(json_object_get(arts, "compressed"), "size"));
    printf("dense checkpoint    %lld bytes\n", (long long)dense);
    printf("compressed          %lld bytes (%.3f of dense)\n", (long long)comp,
           dense > 0 ? (double)comp / (double)dense : 0.0);
}

/* ---- download ---------------------------------------------------------------------- */

typedef struct download {
    FILE *f;
    sha256_ctx sha;
    size_t bytes;
    const http_response *resp;
    char problem[2048];
    size_t problem_len;
    int write_failed;
} download;

static int download_sink(void *ctx, const char *data, size_t n)
{
    download *d = ctx;
    if (d->resp->status != 200) { /* keep the start of the problem document */
        size_t room = sizeof d->problem - 1 - d->problem_len;
        size_t k = n < room ? n : room;
        memcpy(d->problem + d->problem_len, data, k);
        d->problem_len += k;
        d->problem[d->problem_len] = '\0';
        return 0;
    }
    if (fwrite(data, 1, n, d->f) != n) {
        d->write_failed = 1;
        return 1;
    }
    sha256_update(&d->sha, data, n);
    d->bytes += n;
    return 0;
}

static int download_checkpoint(const client *c, json_t *job, const char *file)
{
    const char *id = json_string_value(json_object_get(job, "id"));
    json_t *art = json_object_get(json_object_get(job, "artifacts"), "compressed");
    const char *want = json_string_value(json_object_get(art, "sha256"));
    if (!want) {
        fprintf(stderr, "topiary: job %s records no compressed checkpoint\n", id);
        return EXIT_ERROR;
    }
    char tmp[4096], path[160];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.part", file) >= sizeof tmp) {
        fprintf(stderr, "topiary: --download path is too long\n");
        return EXIT_USAGE;
    }
    snprintf(path, sizeof path, "/v1/jobs/%s/checkpoint?format=compressed", id);
    download *d = calloc(1, sizeof *d);
    if (!d)
        return EXIT_ERROR;
    d->f = fopen(tmp, "wb");
    if (!d->f) {
        fprintf(stderr, "topiary: cannot write '%s': %s\n", tmp, strerror(errno));
        free(d);
        return EXIT_ERROR;
    }
    sha256_init(&d->sha);
    http_request req = {.method = "GET", .path = path, .token = c->token, .timeout_s = 120};
    http_response resp;
    d->resp = &resp;
    top_error err;
    top_error_clear(&err);
    top_status st = http_do(&resp, &c->url, &req, download_sink, d, 0, &err);
    int rc = EXIT_OK;
    if (fclose(d->f) != 0 || d->write_failed) {
        fprintf(stderr, "topiary: writing '%s' failed: %s\n", tmp, strerror(errno));
        rc = EXIT_ERROR;
    } else if (st != TOP_OK) {
        rc = exit_for_transport(&err);
    } else if (resp.status != 200) {
        resp.body = d->problem;
        rc = report_problem(&resp);
        resp.body = NULL;
    }
    http_response_free(&resp);
    if (rc == EXIT_OK) {
        uint8_t digest[SHA256_DIGEST_BYTES];
        char got[SHA256_HEX_BYTES];
        sha256_final(&d->sha, digest);
        sha256_hex(got, digest);
        if (strcmp(got, want)) {
            fprintf(stderr,
                    "topiary: checksum mismatch for %s: got sha256 %s, the job records "
                    "%s; download it again\n",
                    file, got, want);
            rc = EXIT_CHECKSUM;
        } else if (rename(tmp, file) != 0) {
            fprintf(stderr, "topiary: cannot rename '%s' to '%s': %s\n", tmp, file,
                    strerror(errno));
            rc = EXIT_ERROR;
        } else {
            printf("downloaded          %s, %zu bytes, sha256 %s (verified)\n", file, d->bytes,
                   got);
        }
    }
    if (rc != EXIT_OK)
        unlink(tmp);
    free(d);
    return rc;
}

/* ---- submit ------------------------------------------------------------------------ */

typedef struct submit_args {
    const char *server, *token, *model, *method, *calibration, *eval, *download, *key;
    const char *ft_loss; /* fine-tuning loss, or NULL for the server's default */
    double sparsity;
    long calib_images, head_fit, eval_images, seed, ft_images;
    int wait, finetune;
} submit_args;

static void submit_usage(FILE *out)
{
    fprintf(
        out,
        "usage: topiary submit --model ID_OR_URI --sparsity Q --eval TASK[,TASK...]\n"
        "                      [--method M] [--calibration TASK] [--finetune] [--wait]\n"
        "                      [--download FILE] [options]\n\n"
        "Submits a pruning job (POST /v1/jobs) and prints its id. With --wait it shows\n"
        "progress on stderr, then prints accuracies, sparsity and checkpoint sizes.\n\n" CLIENT_COMMON_HELP
        "  --model M              a registered model id or a file:// URI\n"
        "  --sparsity Q           fraction of prunable weights to zero, 0 <= Q < 1\n"
        "  --method M             magnitude (default) or data_free, or obd, obs or\n"
        "                         layer_obs (these need --calibration)\n"
        "  --calibration TASK     task id or data set URI for the saliency\n"
        "  --eval TASKS           comma-separated task ids or URIs to evaluate on\n"
        "  --calibration-images N calibration images (server default 64)\n"
        "  --head-fit-images N    images per evaluation task to fit the head\n"
        "  --eval-images N        images per evaluation task to score\n"
        "  --seed N               seed of the splits\n"
        "  --finetune             fine-tune the pruned model on the calibration task,\n"
        "                         then measure every task again\n"
        "  --finetune-images N    images to fine-tune on (server default 512)\n"
        "  --finetune-loss L      cross_entropy (default) or distill\n"
        "  --idempotency-key K    a retry with the same key returns the same job\n"
        "  --wait                 follow the job to its end and print the results\n"
        "  --download FILE        with --wait: save the compressed checkpoint and\n"
        "                         check its sha256 against the job's\n\n" CLIENT_EXIT_HELP);
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static int submit_parse(submit_args *a, int argc, char **argv)
{
    static const struct option opts[] = {{"server", required_argument, 0, 's'},
                                         {"token", required_argument, 0, 't'},
                                         {"model", required_argument, 0, 'm'},
                                         {"sparsity", required_argument, 0, 'q'},
                                         {"method", required_argument, 0, 'M'},
                                         {"calibration", required_argument, 0, 'c'},
                                         {"eval", required_argument, 0, 'e'},
                                         {"calibration-images", required_argument, 0, 'C'},
                                         {"head-fit-images", required_argument, 0, 'H'},
                                         {"eval-images", required_argument, 0, 'E'},
                                         {"seed", required_argument, 0, 'S'},
                                         {"finetune", no_argument, 0, 'f'},
                                         {"finetune-images", required_argument, 0, 'F'},
                                         {"finetune-loss", required_argument, 0, 'L'},
                                         {"idempotency-key", required_argument, 0, 'k'},
                                         {"wait", no_argument, 0, 'w'},
                                         {"download", required_argument, 0, 'd'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    *a = (submit_args){.sparsity = -1,
                       .calib_images = -1,
                       .head_fit = -1,
                       .eval_images = -1,
                       .seed = -1,
                       .ft_images = -1};
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        long *target = o == 'C'   ? &a->calib_images
                       : o == 'H' ? &a->head_fit
                       : o == 'E' ? &a->eval_images
                       : o == 'S' ? &a->seed
                       : o == 'F' ? &a->ft_images
                                  : NULL;
        if (target && parse_long(optarg, 0, 2147483647L, target)) {
            fprintf(stderr, "topiary submit: '%s' is not a count from 0 to 2147483647\n",
                    optarg);
            return EXIT_USAGE;
        }
        switch (o) {
        case 's': a->server = optarg; break;
        case 't': a->token = optarg; break;
        case 'm': a->model = optarg; break;
        case 'M': a->method = optarg; break;
        case 'c': a->calibration = optarg; break;
        case 'e': a->eval = optarg; break;
        case 'k': a->key = optarg; break;
        case 'w': a->wait = 1; break;
        case 'f': a->finetune = 1; break;
        case 'F': a->finetune = 1; break;
        case 'L':
            a->finetune = 1;
            a->ft_loss = optarg;
            break;
        case 'd': a->download = optarg; break;
        case 'h': submit_usage(stdout); return -1;
        case 'q': {
            char *end;
            a->sparsity = strtod(optarg, &end);
            if (end == optarg || *end || !(a->sparsity >= 0 && a->sparsity < 1)) {
                fprintf(stderr, "topiary submit: --sparsity '%s' must be a number in [0, 1)\n",
                        optarg);
                return EXIT_USAGE;
            }
            break;
        }
        case 'C':
        case 'H':
        case 'E':
        case 'S': break;
        default: submit_usage(stderr); return EXIT_USAGE;
        }
    }
    const char *missing = !a->model         ? "--model"
                          : a->sparsity < 0 ? "--sparsity"
                          : !a->eval        ? "--eval"
                                            : NULL;
    if (missing || optind != argc || (a->download && !a->wait)) {
        if (missing)
            fprintf(stderr, "topiary submit: %s is required\n", missing);
        else if (optind != argc)
            fprintf(stderr, "topiary submit: unexpected argument '%s'\n", argv[optind]);
        else
            fprintf(stderr, "topiary submit: --download needs --wait\n");
        return EXIT_USAGE;
    }
    return 0;
}

static void set_count(json_t *obj, const char *key, long v)
{
    if (v >= 0)
        json_object_set_new(obj, key, json_integer(v));
}

/* The POST /v1/jobs body; NULL when out of memory. */
static json_t *submit_body(const submit_args *a)
{
    json_t *body = json_object(), *eval = json_object(), *tasks = json_array();
    json_object_set_new(body, "model", json_string(a->model));
    json_object_set_new(body, "sparsity", json_real(a->sparsity));
    if (a->method)
        json_object_set_new(body, "method", json_string(a->method));
    if (a->calibration) {
        json_t *cal = json_object();
        json_object_set_new(cal, "task", json_string(a->calibration));
        set_count(cal, "images", a->calib_images);
        set_count(cal, "head_fit_images", a->head_fit);
        json_object_set_new(body, "calibration", cal);
    }
    char *list = strdup(a->eval);
    for (char *save = NULL, *t = list ? strtok_r(list, ",", &save) : NULL; t;
         t = strtok_r(NULL, ",", &save))
        json_array_append_new(tasks, json_string(t));
    free(list);
    json_object_set_new(eval, "tasks", tasks);
    set_count(eval, "head_fit_images", a->head_fit);
    set_count(eval, "images", a->eval_images);
    json_object_set_new(body, "evaluation", eval);
    if (a->seed >= 0)
        json_object_set_new(body, "options", json_pack("{s:I}", "seed", (json_int_t)a->seed));
    if (a->finetune) {
        json_t *ft = json_object();
        set_count(ft, "images", a->ft_images);
        if (a->ft_loss)
            json_object_set_new(ft, "loss", json_string(a->ft_loss));
        json_object_set_new(body, "finetune", ft);
    }
    return body;
}

static int finish_job(const client *c, const submit_args *a, const char *id)
{
    json_t *job = NULL;
    int rc = wait_for_job(c, id, &job);
    if (rc)
        return rc;
    const char *status = json_string_value(json_object_get(job, "status"));
    if (!strcmp(status, "failed")) {
        fprintf(stderr, "topiary: job %s failed: %s\n", id,
                str_or(job, "error", "(no message)"));
        rc = EXIT_JOB_FAILED;
    } else if (!strcmp(status, "cancelled")) {
        fprintf(stderr, "topiary: job %s was cancelled\n", id);
        rc = EXIT_JOB_CANCELLED;
    } else {
        print_results(job);
        if (a->download)
            rc = download_checkpoint(c, job, a->download);
    }
    json_decref(job);
    return rc;
}

int cli_submit(int argc, char **argv)
{
    submit_args a;
    int rc = submit_parse(&a, argc, argv);
    if (rc)
        return rc < 0 ? EXIT_OK : rc;
    client c;
    if ((rc = client_init(&c, a.server, a.token)))
        return rc;
    json_t *body = submit_body(&a);
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!text)
        return EXIT_ERROR;
    json_t *job = NULL;
    int code = 0;
    rc = call_json(&c, "POST", "/v1/jobs", text, a.key, &job, &code);
    free(text);
    if (rc)
        return rc;
    const char *id = json_string_value(json_object_get(job, "id"));
    if (!id) {
        fprintf(stderr, "topiary: the server's response names no job id\n");
        json_decref(job);
        return EXIT_ERROR;
    }
    printf("submitted %s\n", id);
    fflush(stdout);
    if (a.wait)
        rc = finish_job(&c, &a, id);
    json_decref(job);
    return rc;
}

/* ---- jobs, job, cancel -------------------------------------------------------------- */

/* Parses --server, --token, --status, --limit, --cursor and --help; -1 means --help was shown.
 */
static int simple_parse(int argc, char **argv, const char *usage, const char **server,
                        const char **token, const char **status, const char **limit,
                        const char **cursor)
{
    static const struct option opts[] = {{"server", required_argument, 0, 's'},
                                         {"token", required_argument, 0, 't'},
                                         {"status", required_argument, 0, 'S'},
                                         {"limit", required_argument, 0, 'l'},
                                         {"cursor", required_argument, 0, 'c'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    optind = 1;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        const char **slot = o == 's'   ? server
                            : o == 't' ? token
                            : o == 'S' ? status
                            : o == 'l' ? limit
                            : o == 'c' ? cursor
                                       : NULL;
        if (o == 'h') {
            printf("%s\n" CLIENT_COMMON_HELP "\n" CLIENT_EXIT_HELP, usage);
            return -1;
        }
        if (!slot) {
            fprintf(stderr, "%s\n", usage);
            return EXIT_USAGE;
        }
        *slot = optarg;
    }
    return 0;
}

static int get_one_id(int argc, char **argv, const char *usage, client *c, const char **id)
{
    const char *server = NULL, *token = NULL;
    const char *status = NULL, *limit = NULL, *cursor = NULL; /* jobs only: refused here */
    int rc = simple_parse(argc, argv, usage, &server, &token, &status, &limit, &cursor);
    if (rc)
        return rc;
    if (status || limit || cursor || optind + 1 != argc) {
        fprintf(stderr, "%s\n", usage);
        return EXIT_USAGE;
    }
    *id = argv[optind];
    if (strspn(*id, "abcdefghijklmnopqrstuvwxyz0123456789_") != strlen(*id) ||
        strlen(*id) > 63) {
        fprintf(stderr, "topiary: '%s' is not a job id (job_ and 16 hex digits)\n", *id);
        return EXIT_USAGE;
    }
    return client_init(c, server, token);
}

int cli_job(int argc, char **argv)
{
    const char *usage = "usage: topiary job ID [--server URL] [--token T]\n\n"
                        "Prints the job's JSON (GET /v1/jobs/ID).";
    client c;
    const char *id;
    int rc = get_one_id(argc, argv, usage, &c, &id);
    if (rc)
        return rc < 0 ? EXIT_OK : rc;
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s", id);
    json_t *job = NULL;
    int code = 0;
    if ((rc = call_json(&c, "GET", path, NULL, NULL, &job, &code)))
        return rc;
    char *text = json_dumps(job, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (text)
        puts(text);
    free(text);
    json_decref(job);
    return text ? EXIT_OK : EXIT_ERROR;
}

int cli_cancel(int argc, char **argv)
{
    const char *usage = "usage: topiary cancel ID [--server URL] [--token T]\n\n"
                        "Cancels a queued or running job (POST /v1/jobs/ID/cancel).";
    client c;
    const char *id;
    int rc = get_one_id(argc, argv, usage, &c, &id);
    if (rc)
        return rc < 0 ? EXIT_OK : rc;
    char path[128];
    snprintf(path, sizeof path, "/v1/jobs/%s/cancel", id);
    json_t *job = NULL;
    int code = 0;
    if ((rc = call_json(&c, "POST", path, NULL, NULL, &job, &code)))
        return rc;
    printf("%s %s\n", id,
           code == 202 ? "cancel requested; it stops at its next batch" : "cancelled");
    json_decref(job);
    return EXIT_OK;
}

/* The list view carries no request, so a row shows state and times only. */
static void print_job_row(json_t *j)
{
    printf("%-22s %-10s %-20s %5.0f%%  %-24s  %s\n", str_or(j, "id", "?"),
           str_or(j, "status", "?"), str_or(j, "stage", "-"),
           json_number_value(json_object_get(j, "progress")) * 100,
           str_or(j, "created_at", "-"), str_or(j, "finished_at", "-"));
}

int cli_jobs(int argc, char **argv)
{
    const char *usage =
        "usage: topiary jobs [--status queued|running|succeeded|failed|cancelled]\n"
        "                    [--limit N] [--cursor C] [--server URL] [--token T]\n\n"
        "Lists jobs, newest first (GET /v1/jobs).";
    const char *server = NULL, *token = NULL, *status = NULL, *limit = NULL, *cursor = NULL;
    int rc = simple_parse(argc, argv, usage, &server, &token, &status, &limit, &cursor);
    if (rc)
        return rc < 0 ? EXIT_OK : rc;
    long n = 20;
    if (optind != argc || (limit && parse_long(limit, 1, 100, &n))) {
        fprintf(stderr, optind != argc ? "%s\n" : "topiary jobs: --limit must be 1 to 100\n",
                usage);
        return EXIT_USAGE;
    }
    client c;
    if ((rc = client_init(&c, server, token)))
        return rc;
    char path[512];
    int len =
        snprintf(path, sizeof path, "/v1/jobs?limit=%ld%s%s%s%s", n, status ? "&status=" : "",
                 status ? status : "", cursor ? "&cursor=" : "", cursor ? cursor : "");
    if (len < 0 || (size_t)len >= sizeof path || strpbrk(path, " #\r\n")) {
        fprintf(stderr, "topiary jobs: --status or --cursor is malformed\n");
        return EXIT_USAGE;
    }
    json_t *page = NULL;
    int code = 0;
    if ((rc = call_json(&c, "GET", path, NULL, NULL, &page, &code)))
        return rc;
    printf("%-22s %-10s %-20s %6s  %-24s  %s\n", "id", "status", "stage", "done", "created",
           "finished");
    json_t *jobs = json_object_get(page, "jobs");
    for (size_t i = 0; i < json_array_size(jobs); i++)
        print_job_row(json_array_get(jobs, i));
    const char *next = json_string_value(json_object_get(page, "next_cursor"));
    if (next)
        printf("more: topiary jobs --cursor %s\n", next);
    json_decref(page);
    return EXIT_OK;
}
