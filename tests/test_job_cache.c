/* The finished-job body cache: hits, misses, replacement and drops. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job_cache.h"
#include "test.h"

static void test_cache_put_get_drop(void)
{
    char *text = NULL;
    size_t len = 0;
    CHECK_INT_EQ(job_cache_get("job_a", &text, &len), 0);
    job_cache_put("job_a", "{\"id\":\"job_a\"}", 14);
    CHECK_INT_EQ(job_cache_get("job_a", &text, &len), 1);
    CHECK_INT_EQ(len, 14);
    CHECK(text && strcmp(text, "{\"id\":\"job_a\"}") == 0);
    free(text);

    job_cache_put("job_a", "{}", 2); /* a newer body replaces the old one */
    CHECK_INT_EQ(job_cache_get("job_a", &text, &len), 1);
    CHECK(text && strcmp(text, "{}") == 0);
    free(text);

    job_cache_drop("job_a");
    CHECK_INT_EQ(job_cache_get("job_a", &text, &len), 0);
}

static void test_cache_replaces_least_recent(void)
{
    char id[32], *text = NULL;
    size_t len;
    for (int i = 0; i < JOB_CACHE_ENTRIES; i++) {
        snprintf(id, sizeof id, "job_%d", i);
        job_cache_put(id, id, strlen(id));
    }
    /* Touch job_0 so that job_1 is now the least recently used. */
    CHECK_INT_EQ(job_cache_get("job_0", &text, &len), 1);
    free(text);
    job_cache_put("job_new", "x", 1);
    CHECK_INT_EQ(job_cache_get("job_1", &text, &len), 0);
    CHECK_INT_EQ(job_cache_get("job_0", &text, &len), 1);
    free(text);
    CHECK_INT_EQ(job_cache_get("job_new", &text, &len), 1);
    free(text);
    for (int i = 0; i < JOB_CACHE_ENTRIES; i++) {
        snprintf(id, sizeof id, "job_%d", i);
        job_cache_drop(id);
    }
    job_cache_drop("job_new");
}

static void test_cache_skips_oversized_bodies(void)
{
    size_t big = JOB_CACHE_MAX_BODY + 1;
    char *body = calloc(big + 1, 1), *text = NULL;
    size_t len;
    CHECK(body != NULL);
    if (!body)
        return;
    memset(body, 'x', big);
    job_cache_put("job_big", body, big);
    CHECK_INT_EQ(job_cache_get("job_big", &text, &len), 0);
    free(body);
}

int main(void)
{
    TEST_RUN(test_cache_put_get_drop);
    TEST_RUN(test_cache_replaces_least_recent);
    TEST_RUN(test_cache_skips_oversized_bodies);
    return TEST_FINISH();
}
