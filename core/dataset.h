/*
 * Labelled image data sets, tasks drawn from them, and a batch iterator that
 * decodes and preprocesses ahead of its consumer.
 *
 * A data set is opened from a URI:
 *   idx:IMAGES,LABELS      IDX files, plain or gzip (magic 0x00000803 for
 *                          (N, H, W) u8 images, 0x00000801 for (N) u8 labels)
 *   folder:DIR             one subfolder per class (sorted names are the class
 *                          names), PNG or JPEG files in each, sorted by name;
 *                          names starting with '.' are skipped
 *   bundle:FILE            safetensors with "images" U8 (N, H, W, C), C 1 or 3,
 *                          and "labels" of an integer dtype (N); the
 *                          __metadata__ key "class_names" may hold a JSON array
 *                          of strings
 *   digits-grid:FILE       the OpenCV digits.png: a 2000x1000 gray PNG of 50
 *                          rows x 100 columns of 20x20 cells, label = row / 5
 * Classes without names are named "0", "1", ...; the class count is the
 * largest label + 1 unless names give more.
 *
 * Memory: a data set holds its labels and at most `memory_budget` bytes of
 * pixels. IDX pixels that fit are loaded whole; larger ones are read by
 * offset (a gzip file is inflated once into an anonymous temporary file).
 * Folders decode each file on demand. Bundles are memory-mapped, so the
 * kernel pages them in and out. The digits grid is always resident
 * (2,000,000 bytes) and needs a budget that large.
 *
 * Thread-safety: after open, every const function may run on several threads
 * at once (dataset_get reads with pread or from immutable memory).
 */
#ifndef TOPIARY_DATASET_H
#define TOPIARY_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "graph.h"
#include "image.h"
#include "status.h"

#define DATASET_DEFAULT_MEMORY_BUDGET ((size_t)1 << 30)
#define DATASET_MAX_CLASSES 100000
#define DATASET_MAX_IMAGES ((size_t)1 << 31)

typedef struct dataset dataset;

typedef struct dataset_options {
    size_t memory_budget; /* bytes of pixels held resident; 0: the default */
    image_limits limits;  /* per-image bounds; zeros: image.h defaults */
} dataset_options;

/* Opens a data set from a URI (forms above). opt may be NULL. */
top_status dataset_open(dataset **out, const char *uri, const dataset_options *opt,
                        top_error *err);

/*
 * Opens IDX images and labels held in memory (plain or gzip; the fuzz target
 * and uploads use it). The buffers are copied or inflated, so they need not
 * outlive the call; `what` names the source in errors.
 */
top_status dataset_open_idx_memory(dataset **out, const void *images, size_t images_size,
                                   const void *labels, size_t labels_size, const char *what,
                                   const dataset_options *opt, top_error *err);
void dataset_close(dataset *ds);

size_t dataset_count(const dataset *ds);
int dataset_class_count(const dataset *ds);
/* The name of class c, or NULL if c is out of range. */
const char *dataset_class_name(const dataset *ds, int c);
/* Labels of all images, (N), each in 0 .. class count - 1. */
const int *dataset_labels(const dataset *ds);
/* The URI the data set was opened from. */
const char *dataset_uri(const dataset *ds);

/*
 * Replaces the class names (IDX files carry none). n must be at least the
 * class count; more names raise the class count to n.
 */
top_status dataset_set_class_names(dataset *ds, const char *const *names, int n,
                                   top_error *err);

/* Decodes image i into a new owned image (free with image_free). Errors name
 * the file (and the index for files that hold many images). */
top_status dataset_get(const dataset *ds, size_t i, image_u8 *out, top_error *err);

/* Returns the bytes of pixels the data set keeps in memory now, not counting
 * labels, names or mapped files. It never exceeds the memory budget. */
size_t dataset_resident_bytes(const dataset *ds);
/* 1 if pixels are read on demand instead of held whole. */
int dataset_is_streaming(const dataset *ds);

/* ---- tasks -------------------------------------------------------------- */

/* Draws "all remaining images of the class" in a task split. */
#define TASK_ALL ((size_t)-1)

typedef struct task_spec {
    const int *classes; /* source class ids; task class j is classes[j]; NULL: all */
    int n_classes;
    size_t calib_per_class; /* calibration images per class */
    size_t fit_per_class;   /* head-fitting images per class */
    size_t eval_per_class;  /* evaluation images per class, or TASK_ALL */
    uint64_t seed;
} task_spec;

typedef struct task_split {
    const dataset *source; /* the data set the indices refer to (not owned) */
    size_t count;
    size_t *indices; /* (count) image indices in source */
    int *labels;     /* (count) task labels, 0 .. n_classes - 1 */
} task_split;

typedef struct task {
    int n_classes;
    int *classes; /* (n_classes) source class id of each task class */
    task_split calib, fit, eval;
} task;

/*
 * Draws a task. With test == NULL, calibration, head fitting and evaluation
 * come from train, in that order, from one shuffle per class, so they never
 * overlap. With a test set (an official split), calibration and head fitting
 * come from train and evaluation from test; both must have the same classes.
 *
 * Shuffles: the stream of a class is splitmix64 seeded with
 * seed ^ (0x9e3779b97f4a7c15 * (class + 1)) (test-set streams add the constant
 * 0x5851f42d4c957f2d to the seed); Fisher-Yates draws j uniform in 0..i by
 * rejection sampling. Each split is then shuffled by a stream of its own, so
 * batches mix the classes. A class with too few images is an error that names
 * it. The result depends only on the data set's labels, the spec and the seed.
 */
top_status task_make(task *out, const dataset *train, const dataset *test,
                     const task_spec *spec, top_error *err);
void task_free(task *t);

/*
 * Splits classes 0 .. n_classes - 1 into n_groups disjoint groups of
 * n_classes / n_groups classes each (the remainder is left out), shuffled by
 * seed (seed 0 keeps the natural order). groups: (n_groups, n_classes /
 * n_groups), each group sorted; pass a group as task_spec.classes.
 */
top_status task_class_groups(int *groups, int n_classes, int n_groups, uint64_t seed,
                             top_error *err);

/* splitmix64: advances *state and returns the next 64-bit output. */
uint64_t task_splitmix64(uint64_t *state);

/* ---- batches ------------------------------------------------------------ */

typedef struct batch {
    int n;                 /* images in this batch; 0 at the end */
    size_t first;          /* position in the split of the first image */
    float *x;              /* (n, C, H, W) per the preprocess */
    int *labels;           /* (n) */
    const size_t *indices; /* (n) image indices in the data set */
} batch;

typedef struct batch_iter batch_iter;

/*
 * Starts a worker thread that decodes and preprocesses the split's images in
 * order into two alternating buffers of batch_size images. The split and its
 * data set must outlive the iterator.
 */
top_status batch_iter_new(batch_iter **out, const task_split *split, const graph_preprocess *pp,
                          int batch_size, top_error *err);
/*
 * Waits for the next batch and points *b at it; it stays valid until the next
 * call or batch_iter_free. At the end, (*b)->n is 0. A decoding error ends the
 * iteration with that error.
 */
top_status batch_iter_next(batch_iter *it, const batch **b, top_error *err);
/* Stops the worker (at once, mid-split is fine) and frees everything. */
void batch_iter_free(batch_iter *it);

#endif
