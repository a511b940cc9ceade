/*
 * SHA-256 (FIPS 180-4): a streaming context, one-shot helpers for a buffer
 * and a file, and lower-case hex output. Used to record the digest of source
 * checkpoints and artifacts. Reentrant; one context per thread.
 */
#ifndef TOPIARY_SHA256_H
#define TOPIARY_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define SHA256_DIGEST_BYTES 32
#define SHA256_HEX_BYTES 65 /* 64 hex digits and a terminating NUL */

typedef struct sha256_ctx {
    uint32_t state[8];
    uint64_t length; /* bytes hashed so far */
    uint8_t block[64];
    size_t used; /* bytes waiting in block */
} sha256_ctx;

void sha256_init(sha256_ctx *ctx);
void sha256_update(sha256_ctx *ctx, const void *data, size_t size);
/* Writes the digest; ctx must be initialised again before reuse. */
void sha256_final(sha256_ctx *ctx, uint8_t digest[SHA256_DIGEST_BYTES]);

/* Digest of one buffer. */
void sha256_buffer(uint8_t digest[SHA256_DIGEST_BYTES], const void *data, size_t size);
/* Lower-case hex of a digest. */
void sha256_hex(char hex[SHA256_HEX_BYTES], const uint8_t digest[SHA256_DIGEST_BYTES]);
/* Hex digest of a file's contents, read in 64 KiB pieces. TOP_ERR_IO names the path. */
top_status sha256_file(char hex[SHA256_HEX_BYTES], const char *path, top_error *err);

#endif
