/*
 * A disk cache of fitted ridge heads, so that a second pruning job on the
 * same model and task skips the dense model's features and the ridge fit.
 *
 * An entry is DIR/<key>.safetensors, where key is the hex SHA-256 of a
 * canonical, length-prefixed serialization of everything the head and the
 * dense accuracy depend on (head_cache_inputs). The file contains the
 * tensors "coef" F64 (C, D), "intercept" F64 (C) and "dense_accuracy" F64 (1).
 * Its __metadata__ strings are "format" = "topiary-head-cache",
 * "format_version", "key", "fit_images", "eval_images" and "content_sha256".
 * The last is the hex SHA-256 of the three tensors' bytes in that order, then
 * the two counts as text, each followed by a NUL. Any safetensors reader can
 * show an entry.
 *
 * Failure policy: a missing, corrupt, truncated, wrong-shaped or foreign
 * file is a miss (TOP_OK with *hit = 0), and the caller recomputes and
 * stores over it. Only a real I/O failure (permission denied, EIO, a
 * directory component that is not a directory) returns TOP_ERR_IO. A cache
 * must never fail a job, so callers should log any error from these
 * functions as a warning and go on without the cache. Pass a local top_error
 * to them, because the first error set in a top_error wins.
 *
 * Writes are atomic: the file is written under a unique hidden name in DIR
 * (reserved with O_EXCL, then fsynced) and renamed into place, so threads
 * and processes that store the same key at once leave one whole file.
 * Every function is reentrant and keeps no global state beyond an atomic
 * counter for temporary names.
 *
 * Not done here: locking. Two jobs that miss the same key at once both
 * compute the head, and the last rename wins.
 */
#ifndef TOPIARY_HEAD_CACHE_H
#define TOPIARY_HEAD_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "ridge.h"
#include "sha256.h"
#include "status.h"

/* Version of the key serialization and the file layout. Bump it when
 * either changes, so that old entries turn into misses. */
#define HEAD_CACHE_FORMAT_VERSION 1

/* Maximum length of a feature node name, data set URI or fingerprint in a key. */
#define HEAD_CACHE_MAX_STRING 4096

/* Everything a cached head and its dense accuracy depend on. */
typedef struct head_cache_inputs {
    const char *code_version; /* the caller's version of feature extraction and
                                 ridge code, bumped to drop old entries; NULL = "" */
    const char *model_sha256; /* 64 lower-case hex digits (head_cache_model_sha256) */
    const char *feature_node; /* the resolved feature node name, never NULL */
    size_t input_height;      /* model input size after any resize option */
    size_t input_width;
    const char *dataset_uri;         /* as passed to dataset_open */
    const char *dataset_fingerprint; /* identity of the data set's files
                                        (head_cache_dataset_fingerprint) */
    size_t calib_count;              /* the task's calibration split; 0 for an
                                        evaluation task (it shifts the fit split) */
    size_t fit_count;                /* head-fit images requested */
    size_t eval_count;               /* evaluation images requested; 0 if none */
    uint64_t seed;                   /* task seed */
    double alpha;                    /* ridge alpha, finite and > 0 */
    int balanced;                    /* ridge class_weight="balanced"; nonzero = 1 */
} head_cache_inputs;

/*
 * Computes the cache key, the hex SHA-256 of a serialization of the inputs.
 * The serialization is a magic string, HEAD_CACHE_FORMAT_VERSION, then each
 * field as a name, an 8-byte little-endian length and the bytes. Strings go
 * as given, integers as 8 little-endian bytes, alpha as the 8 little-endian
 * bytes of its IEEE-754 bits and balanced as 0 or 1. So the encoding is exact
 * and does not depend on the locale. TOP_ERR_INVALID for a NULL or over-long string, a model
 * digest that is not 64 lower-case hex digits, an empty feature node or URI, a zero input size
 * or fit count, or an alpha that is not finite and positive.
 */
top_status head_cache_key(char key[SHA256_HEX_BYTES], const head_cache_inputs *in,
                          top_error *err);

/*
 * Writes to out (cap >= SHA256_HEX_BYTES) the hex SHA-256 of the identity of
 * the file or directory at path. The identity of a file is its size, mtime in
 * nanoseconds and inode (stat follows symlinks), not its contents. A
 * directory contributes each entry's name and identity in byte order of the
 * names, two levels deep, so folder:DIR/CLASS/FILE data sets are covered.
 * Names that start with '.' are skipped, as the folder reader skips them.
 * Deeper levels count only through their directory's own identity.
 * TOP_ERR_IO names a path that cannot be read; TOP_ERR_LIMIT past 10^7
 * entries.
 */
top_status head_cache_file_fingerprint(char *out, size_t cap, const char *path, top_error *err);

/*
 * The fingerprint of a data set URI (idx:IMAGES,LABELS, folder:DIR,
 * bundle:FILE, digits-grid:FILE): the hex SHA-256 of the scheme and the
 * head_cache_file_fingerprint of each path it names. TOP_ERR_INVALID for
 * another scheme or a malformed idx: pair.
 */
top_status head_cache_dataset_fingerprint(char out[SHA256_HEX_BYTES], const char *uri,
                                          top_error *err);

/*
 * The hex SHA-256 of a model's source files, read in full. A .safetensors
 * file gives its plain sha256sum. A TF.js layers model (a model.json file or
 * a folder that contains one) gives the SHA-256 of "tfjs", the digest of
 * model.json, then each shard's manifest path and digest in manifest order.
 * Errors name the file that cannot be read or the malformed manifest.
 */
top_status head_cache_model_sha256(char hex[SHA256_HEX_BYTES], const char *model_path,
                                   top_error *err);

/*
 * Looks up DIR/<key>.safetensors. On a hit *hit = 1, head owns new arrays
 * (free with ridge_model_free) of shape (expect_classes, expect_features),
 * and dense_accuracy, fit_n and eval_n hold the stored values; the file's
 * mtime is set to now, which head_cache_prune reads as its last use. On a
 * miss *hit = 0, head is zeroed and the other outputs are 0. A file is a hit
 * only if it has exactly the three tensors above, as F64 of the expected
 * shapes with finite values and an accuracy in [0, 1]. Its metadata must
 * give the format, a matching content_sha256 and a stored key equal to key.
 * TOP_ERR_INVALID for a key that is not 64 lower-case hex digits (it would
 * be a path), an empty dir or zero expectations; TOP_ERR_IO for an I/O
 * failure other than a missing file.
 */
top_status head_cache_load(int *hit, ridge_model *head, double *dense_accuracy, size_t *fit_n,
                           size_t *eval_n, const char *dir, const char *key,
                           size_t expect_features, size_t expect_classes, top_error *err);

/*
 * Stores an entry at DIR/<key>.safetensors, replacing any earlier one, and
 * fsyncs it and DIR. Missing directories on the way to DIR are created with
 * mode 0700, because an entry anyone can plant there would be trusted as a
 * head. TOP_ERR_INVALID for a bad key, an empty head, or a non-finite value
 * or an accuracy outside [0, 1] (such an entry would only load as a miss);
 * TOP_ERR_IO names the path that failed.
 */
top_status head_cache_store(const char *dir, const char *key, const ridge_model *head,
                            double dense_accuracy, size_t fit_n, size_t eval_n, top_error *err);

/*
 * Deletes entries in DIR, least recently used first (oldest mtime, then
 * name), until the entries left total at most max_bytes. Temporary files of
 * stores older than one hour (left by a crash) are deleted too. Other files
 * are left alone. *removed (may be NULL) counts the files deleted. A missing
 * DIR is an empty cache. TOP_ERR_IO names a path that cannot be listed or
 * deleted.
 */
top_status head_cache_prune(const char *dir, size_t max_bytes, size_t *removed, top_error *err);

#endif
