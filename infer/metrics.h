/* infer/metrics.h: the Prometheus text exposition of GET /metrics, written from plain numbers
 * (engine stats, registry stats, adapter infos, the server's counts of answers by HTTP status)
 * so that it can be tested without a server. It does not collect anything itself. */
#ifndef QLR_INFER_METRICS_H
#define QLR_INFER_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "adapters/registry.h"
#include "core/strbuf.h"
#include "infer/engine.h"

typedef struct qlr_metrics_input {
    const qlr_engine_stats *engine;        /* required */
    const qlr_registry_stats *registry;    /* NULL: no registry (base model only) */
    const qlr_adapter_info *adapters;      /* [n_adapters] */
    size_t n_adapters;
    const int *status_codes;               /* [n_status] HTTP statuses answered ... */
    const uint64_t *status_counts;         /* ... and how many of each */
    size_t n_status;
    double uptime_s;
    int draining;                          /* 1 once shutdown began */
} qlr_metrics_input;

/* Appends the exposition (text format 0.0.4: # HELP / # TYPE lines, then samples; label values
 * escaped) to `out`; a failed allocation shows as out->oom. */
void qlr_metrics_write(const qlr_metrics_input *in, qlr_strbuf *out);

#endif
