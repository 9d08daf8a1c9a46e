/* tests/infer/test_metrics.c: infer/metrics.c: every sample line of the exposition belongs to a
 * metric announced by # HELP and # TYPE, values come from the inputs (KV blocks free = total -
 * used, per-adapter residency one-hot), and label values are escaped. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/metrics.h"
#include "tests/test_util.h"

/* The value of the sample line that starts with `prefix` + " ", or -1. */
static double sample(const char *text, const char *prefix) {
    size_t n = strlen(prefix);
    for (const char *l = text; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (!strncmp(l, prefix, n) && l[n] == ' ') return atof(l + n + 1);
    return -1;
}

int main(void) {
    qlr_engine_stats e;
    memset(&e, 0, sizeof e);
    e.requests_total = 10;
    e.requests_cancelled = 2;
    e.requests_rejected = 3;
    e.prompt_tokens = 100;
    e.generated_tokens = 50;
    e.running = 4;
    e.queued = 5;
    e.last_batch_tokens = 20;
    e.last_batch_seqs = 4;
    e.kv_blocks_total = 64;
    e.kv_blocks_used = 9;
    e.kv_block = 16;
    e.prefix_hits = 7;
    qlr_registry_stats rs = {2, 1, 4096, 8192, 0, 2};
    qlr_adapter_info a[2];
    memset(a, 0, sizeof a);
    snprintf(a[0].name, sizeof a[0].name, "sql");
    a[0].uses = 6;
    a[0].refs = 1;
    a[0].r = 16;
    a[0].residency = QLR_RESIDENCY_DEVICE;
    snprintf(a[1].name, sizeof a[1].name, "we\"ird\\");
    a[1].residency = QLR_RESIDENCY_FILE;
    int codes[] = {200, 429};
    uint64_t counts[] = {8, 3};
    qlr_metrics_input in = {&e, &rs, a, 2, codes, counts, 2, 12.5, 0};
    qlr_strbuf b = {0};
    qlr_metrics_write(&in, &b);
    CHECK(!b.oom && b.p);
    const char *t = b.p;
    CHECK(sample(t, "qlora_http_requests_total{status=\"200\"}") == 8);
    CHECK(sample(t, "qlora_http_requests_total{status=\"429\"}") == 3);
    CHECK(sample(t, "qlora_requests_waiting") == 5 && sample(t, "qlora_requests_running") == 4);
    CHECK(sample(t, "qlora_prompt_tokens_total") == 100 && sample(t, "qlora_generation_tokens_total") == 50);
    CHECK(sample(t, "qlora_kv_blocks_used") == 9 && sample(t, "qlora_kv_blocks_free") == 55);
    CHECK(sample(t, "qlora_last_batch_sequences") == 4 && sample(t, "qlora_prefix_cache_hits_total") == 7);
    CHECK(sample(t, "qlora_requests_cancelled_total") == 2 && sample(t, "qlora_requests_rejected_total") == 3);
    CHECK(sample(t, "qlora_adapter_requests_total{adapter=\"sql\"}") == 6);
    CHECK(sample(t, "qlora_adapter_references{adapter=\"sql\"}") == 1);
    CHECK(sample(t, "qlora_adapter_residency{adapter=\"sql\",tier=\"device\"}") == 1);
    CHECK(sample(t, "qlora_adapter_residency{adapter=\"sql\",tier=\"host\"}") == 0);
    CHECK(sample(t, "qlora_adapter_residency{adapter=\"we\\\"ird\\\\\",tier=\"file\"}") == 1);
    CHECK(sample(t, "qlora_adapters_attached") == 2 && sample(t, "qlora_uptime_seconds") == 12.5);

    /* every sample's metric name was announced with HELP and TYPE before it */
    int lines = 0, bad = 0;
    for (const char *l = t; *l;) {
        const char *nl = strchr(l, '\n');
        CHECK(nl != NULL);
        if (!nl) break;
        if (l[0] != '#') {
            size_t n = strcspn(l, "{ ");
            char name[128], help[160], type[160];
            snprintf(name, sizeof name, "%.*s", (int)n, l);
            snprintf(help, sizeof help, "# HELP %s ", name);
            snprintf(type, sizeof type, "# TYPE %s ", name);
            const char *h = strstr(t, help), *ty = strstr(t, type);
            if (!h || !ty || h > l || ty > l) {
                bad++;
                fprintf(stderr, "sample without HELP/TYPE: %.*s\n", (int)(nl - l), l);
            }
            lines++;
        }
        l = nl + 1;
    }
    CHECK(lines > 30 && bad == 0);
    qlr_strbuf_free(&b);

    /* no registry, no adapters */
    in.registry = NULL;
    in.n_adapters = 0;
    in.draining = 1;
    qlr_metrics_write(&in, &b);
    CHECK(strstr(b.p, "qlora_adapters_attached") == NULL && sample(b.p, "qlora_draining") == 1);
    qlr_strbuf_free(&b);
    return test_finish();
}
