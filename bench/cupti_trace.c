/* bench/cupti_trace.c: QLR_BENCH_TRACE=FILE makes bench_decode record every kernel the GPU ran
 * (CUPTI activity records: start and end in ns, the CUDA graph it belonged to, grid size,
 * registers, shared memory, name) and write them as CSV at exit. Kernels inside a graph replay
 * are recorded one by one, so the gaps and overlaps of a decode step show. Built into
 * bench_decode only when CUPTI is found; used with QLR_BENCH_PROFILE_STEP=2. */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench/cupti_trace.h"

static FILE *g_trace;

static void CUPTIAPI buf_request(uint8_t **buf, size_t *size, size_t *max_records) {
    *size = 16u << 20;
    *buf = aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI buf_complete(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                                  size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *rec = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)rec;
        if (g_trace)
            fprintf(g_trace, "%llu,%llu,%u,%d,%d,%d,%u,%s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->graphId, k->gridX * k->gridY * k->gridZ,
                    k->blockX * k->blockY * k->blockZ, k->registersPerThread,
                    k->dynamicSharedMemory + k->staticSharedMemory, k->name ? k->name : "?");
    }
    free(buf);
}

static void trace_end(void) {
    cuptiActivityFlushAll(1);
    if (g_trace) fclose(g_trace);
    g_trace = NULL;
}

int qlr_bench_trace_begin(void) {
    const char *path = getenv("QLR_BENCH_TRACE");
    if (!path || !*path) return 0;
    g_trace = fopen(path, "w");
    if (!g_trace) {
        perror(path);
        return -1;
    }
    fprintf(g_trace, "start_ns,end_ns,graph,blocks,threads,regs,smem,name\n");
    if (cuptiActivityRegisterCallbacks(buf_request, buf_complete) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
        fprintf(stderr, "QLR_BENCH_TRACE: CUPTI activity tracing could not be enabled\n");
        fclose(g_trace);
        g_trace = NULL;
        return -1;
    }
    atexit(trace_end);
    return 1;
}
