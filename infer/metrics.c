/* infer/metrics.c: the Prometheus text of GET /metrics (see metrics.h). Metric names follow
 * Prometheus' conventions: a qlora_ prefix, _total on counters, base units. */
#include "infer/metrics.h"

#include <inttypes.h>

#include "infer/openai.h"

static void head(qlr_strbuf *b, const char *name, const char *type, const char *help) {
    qlr_strbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metric_u(qlr_strbuf *b, const char *name, const char *type, const char *help, uint64_t v) {
    head(b, name, type, help);
    qlr_strbuf_printf(b, "%s %" PRIu64 "\n", name, v);
}

static void metric_d(qlr_strbuf *b, const char *name, const char *type, const char *help, double v) {
    head(b, name, type, help);
    qlr_strbuf_printf(b, "%s %.6g\n", name, v);
}

/* A label value with \, " and newline escaped as the text format requires. */
static void label_value(qlr_strbuf *b, const char *s) {
    for (; *s; s++) {
        if (*s == '\\') qlr_strbuf_puts(b, "\\\\");
        else if (*s == '"') qlr_strbuf_puts(b, "\\\"");
        else if (*s == '\n') qlr_strbuf_puts(b, "\\n");
        else qlr_strbuf_put(b, s, 1);
    }
}

static void adapter_sample(qlr_strbuf *b, const char *name, const char *adapter, const char *extra_key,
                           const char *extra_val, uint64_t v) {
    qlr_strbuf_printf(b, "%s{adapter=\"", name);
    label_value(b, adapter);
    if (extra_key) qlr_strbuf_printf(b, "\",%s=\"%s", extra_key, extra_val);
    qlr_strbuf_printf(b, "\"} %" PRIu64 "\n", v);
}

void qlr_metrics_write(const qlr_metrics_input *in, qlr_strbuf *b) {
    const qlr_engine_stats *e = in->engine;

    head(b, "qlora_http_requests_total", "counter", "HTTP requests answered, by status code.");
    for (size_t i = 0; i < in->n_status; i++)
        qlr_strbuf_printf(b, "qlora_http_requests_total{status=\"%d\"} %" PRIu64 "\n", in->status_codes[i],
                          in->status_counts[i]);

    metric_u(b, "qlora_requests_total", "counter", "Completion requests accepted by the engine.",
             e->requests_total);
    metric_u(b, "qlora_requests_finished_total", "counter", "Completion requests that ran to the end.",
             e->requests_done);
    metric_u(b, "qlora_requests_cancelled_total", "counter",
             "Completion requests cancelled (client disconnected or shutdown).", e->requests_cancelled);
    metric_u(b, "qlora_requests_rejected_total", "counter", "Completion requests refused with 429 (queue full).",
             e->requests_rejected);
    metric_u(b, "qlora_requests_running", "gauge", "Sequences decoding now.", (uint64_t)e->running);
    metric_u(b, "qlora_requests_waiting", "gauge", "Requests queued, not started (queue depth).",
             (uint64_t)e->queued);
    metric_u(b, "qlora_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", e->prompt_tokens);
    metric_u(b, "qlora_generation_tokens_total", "counter", "Tokens generated.", e->generated_tokens);
    metric_u(b, "qlora_prefix_cache_hits_total", "counter", "Prompt KV blocks served from the prefix cache.",
             e->prefix_hits);
    metric_u(b, "qlora_prefix_cache_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
             e->cached_tokens);
    metric_u(b, "qlora_engine_steps_total", "counter", "Forward steps run by the engine.", e->steps);
    metric_u(b, "qlora_last_batch_tokens", "gauge", "Tokens in the last forward step.",
             (uint64_t)e->last_batch_tokens);
    metric_u(b, "qlora_last_batch_sequences", "gauge", "Sequences in the last forward step.",
             (uint64_t)e->last_batch_seqs);
    int32_t used = e->kv_blocks_used, total = e->kv_blocks_total;
    metric_u(b, "qlora_kv_blocks_total", "gauge", "KV cache blocks.", (uint64_t)total);
    metric_u(b, "qlora_kv_blocks_used", "gauge", "KV cache blocks in use.", (uint64_t)used);
    metric_u(b, "qlora_kv_blocks_free", "gauge", "KV cache blocks free.",
             (uint64_t)(total > used ? total - used : 0));
    metric_u(b, "qlora_kv_block_tokens", "gauge", "Tokens per KV cache block.", (uint64_t)e->kv_block);
    metric_d(b, "qlora_generation_tokens_per_second", "gauge",
             "Generated tokens per second over the last few seconds.", e->tokens_per_s);

    if (in->registry) {
        const qlr_registry_stats *r = in->registry;
        metric_u(b, "qlora_adapters_attached", "gauge", "Adapters attached.", r->attached);
        metric_u(b, "qlora_adapters_resident", "gauge", "Adapters with a device copy.", r->resident);
        metric_u(b, "qlora_adapter_device_bytes", "gauge", "Bytes of adapter device copies.", r->device_bytes);
        metric_u(b, "qlora_adapter_host_bytes", "gauge", "Bytes of adapter host masters.", r->host_bytes);
        metric_u(b, "qlora_adapter_evictions_total", "counter", "Adapter device copies evicted.", r->evictions);
        metric_u(b, "qlora_adapter_loads_total", "counter", "Adapter file loads.", r->loads);
    }
    if (in->n_adapters) {
        head(b, "qlora_adapter_requests_total", "counter", "Requests per adapter since it was attached.");
        for (size_t i = 0; i < in->n_adapters; i++)
            adapter_sample(b, "qlora_adapter_requests_total", in->adapters[i].name, NULL, NULL,
                           in->adapters[i].uses);
        head(b, "qlora_adapter_references", "gauge",
             "References held on the adapter now (running requests, the engine's recently used set).");
        for (size_t i = 0; i < in->n_adapters; i++)
            adapter_sample(b, "qlora_adapter_references", in->adapters[i].name, NULL, NULL,
                           (uint64_t)(in->adapters[i].refs > 0 ? in->adapters[i].refs : 0));
        head(b, "qlora_adapter_residency", "gauge", "1 for the tier an adapter is in now (file, host, device).");
        static const qlr_residency tiers[] = {QLR_RESIDENCY_FILE, QLR_RESIDENCY_HOST, QLR_RESIDENCY_DEVICE};
        for (size_t i = 0; i < in->n_adapters; i++)
            for (int t = 0; t < 3; t++)
                adapter_sample(b, "qlora_adapter_residency", in->adapters[i].name, "tier",
                               qlr_oai_residency_name(tiers[t]), in->adapters[i].residency == tiers[t]);
        head(b, "qlora_adapter_rank", "gauge", "LoRA rank of each adapter.");
        for (size_t i = 0; i < in->n_adapters; i++)
            adapter_sample(b, "qlora_adapter_rank", in->adapters[i].name, NULL, NULL,
                           (uint64_t)(in->adapters[i].r > 0 ? in->adapters[i].r : 0));
    }
    metric_d(b, "qlora_uptime_seconds", "gauge", "Seconds since the server started.", in->uptime_s);
    metric_u(b, "qlora_draining", "gauge", "1 once shutdown began (new requests get 503).", (uint64_t)in->draining);
}
