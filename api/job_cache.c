/* The finished-job body cache; see job_cache.h. */
#include "job_cache.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define JOB_CACHE_ID_MAX 64

typedef struct cache_entry {
    char id[JOB_CACHE_ID_MAX];
    char *body;
    size_t len;
    uint64_t used; /* tick of the last get or put; 0 = empty */
} cache_entry;

static cache_entry entries[JOB_CACHE_ENTRIES];
static uint64_t tick;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Index of the entry for id, or -1. The caller holds the lock. */
static int find(const char *id)
{
    for (int i = 0; i < JOB_CACHE_ENTRIES; i++)
        if (entries[i].used && strcmp(entries[i].id, id) == 0)
            return i;
    return -1;
}

int job_cache_get(const char *id, char **text, size_t *len)
{
    int hit = 0;
    pthread_mutex_lock(&lock);
    int i = find(id);
    if (i >= 0) {
        *text = malloc(entries[i].len + 1);
        if (*text) {
            memcpy(*text, entries[i].body, entries[i].len + 1);
            *len = entries[i].len;
            entries[i].used = ++tick;
            hit = 1;
        }
    }
    pthread_mutex_unlock(&lock);
    return hit;
}

void job_cache_put(const char *id, const char *body, size_t len)
{
    if (strlen(id) >= JOB_CACHE_ID_MAX || len > JOB_CACHE_MAX_BODY)
        return;
    char *copy = malloc(len + 1);
    if (!copy)
        return;
    memcpy(copy, body, len);
    copy[len] = '\0';
    pthread_mutex_lock(&lock);
    int slot = find(id);
    for (int i = 0; slot < 0 && i < JOB_CACHE_ENTRIES; i++)
        if (!entries[i].used)
            slot = i;
    if (slot < 0) { /* full: replace the least recently used */
        slot = 0;
        for (int i = 1; i < JOB_CACHE_ENTRIES; i++)
            if (entries[i].used < entries[slot].used)
                slot = i;
    }
    free(entries[slot].body);
    strcpy(entries[slot].id, id);
    entries[slot].body = copy;
    entries[slot].len = len;
    entries[slot].used = ++tick;
    pthread_mutex_unlock(&lock);
}

void job_cache_drop(const char *id)
{
    pthread_mutex_lock(&lock);
    int i = find(id);
    if (i >= 0) {
        free(entries[i].body);
        memset(&entries[i], 0, sizeof entries[i]);
    }
    pthread_mutex_unlock(&lock);
}
