/* backend/backend.c: backend selection by device name and the helpers every backend shares
 * (NF4 store upload, f32 <-> act conversions through host memory). The ops themselves live in
 * cpu/ and cuda/. */
#include "backend/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

qlr_sampling qlr_sampling_default(void) {
    qlr_sampling s = {0.0f, 0, 1.0f};
    return s;
}

qlr_status qlr_backend_create(const char *device, int n_threads, qlr_backend **out) {
    *out = NULL;
    if (!device || !strcmp(device, "cpu")) return qlr_backend_cpu_create(n_threads, out);
    if (!strcmp(device, "cuda")) {
#ifdef QLR_BACKEND_CUDA
        return qlr_backend_cuda_create(n_threads, out);
#else
        return qlr_errorf(QLR_ERR_UNSUPPORTED,
                          "device 'cuda': this qlora was built without the CUDA backend "
                          "(configure with -DQLR_CUDA=ON on a machine with nvcc)");
#endif
    }
    return qlr_errorf(QLR_ERR_INVALID, "unknown device '%s' (known: cpu, cuda)", device);
}

void qlr_backend_free(qlr_backend *be) {
    if (be && be->destroy) be->destroy(be);
}

qlr_device_traits qlr_device_traits_of(const qlr_backend *be) {
    qlr_device_traits t = {be->act_dtype, be->host_visible};
    return t;
}

qlr_device_traits qlr_device_traits_named(const char *device) {
    qlr_device_traits t = {QLR_BF16, 0};
    if (device && !strcmp(device, "cpu")) t.act_dtype = QLR_F32, t.host_visible = 1;
    return t;
}

/* The sizes of an uploaded store's buffers (0 = not allocated). */
static void nf4_sizes(int64_t n, int64_t n_blocks, int64_t n_dq_blocks, int dq, size_t sz[4]) {
    sz[0] = (size_t)((n + 1) / 2);                                  /* codes */
    sz[1] = dq ? 0 : (size_t)n_blocks * 4;                          /* absmax f32 */
    sz[2] = dq ? (size_t)n_blocks : 0;                              /* absmax_q u8 */
    sz[3] = dq ? (size_t)n_dq_blocks * 4 + QLR_NF4_DQ_PAD * 4 : 0;  /* second level + pad */
}

void qlr_backend_nf4_items(int64_t rows, int64_t cols, int dq, uint64_t count, const char *group,
                           const char *name, qlr_mem_item_fn fn, void *ud) {
    static const char *part[4] = {"codes", "absmax f32", "absmax u8", "nested absmax f32"};
    int64_t n = rows * cols, nb = (n + 63) / 64, ndq = dq ? (nb + 255) / 256 : 0;
    size_t sz[4];
    nf4_sizes(n, nb, ndq, dq, sz);
    char nm[96];
    for (int i = 0; i < 4; i++) {
        if (!sz[i] || (i == 0 && !n)) continue;
        snprintf(nm, sizeof nm, "%s NF4 %s", name, part[i]);
        fn(ud, group, nm, count, sz[i]);
    }
}

static qlr_status upload_buf(qlr_backend *be, void **dst, const void *src, size_t bytes) {
    *dst = NULL;
    if (!bytes) return QLR_OK;
    *dst = be->mem.alloc(be, bytes);
    if (!*dst) return qlr_error_status();
    return be->mem.h2d(be, *dst, src, bytes);
}

qlr_status qlr_backend_nf4_upload(qlr_backend *be, qlr_nf4 *host, qlr_nf4 *dev, int steal) {
    *dev = *host;
    dev->owned = 0;
    if (steal && be->host_visible && host->owned) {
        /* The CPU backend's memory is malloc memory: take the buffers over. */
        dev->owned = 1;
        host->owned = 0;
        host->codes = NULL;
        host->absmax = NULL;
        host->absmax_q = NULL;
        host->dq_absmax = NULL;
        return QLR_OK;
    }
    dev->codes = NULL;
    dev->absmax = NULL;
    dev->absmax_q = NULL;
    dev->dq_absmax = NULL;
    size_t sz[4];
    nf4_sizes(host->n, host->n_blocks, host->n_dq_blocks, host->dq, sz);
    qlr_status st = upload_buf(be, (void **)&dev->codes, host->codes, sz[0]);
    if (st == QLR_OK && sz[1]) st = upload_buf(be, (void **)&dev->absmax, host->absmax, sz[1]);
    if (st == QLR_OK && sz[2]) st = upload_buf(be, (void **)&dev->absmax_q, host->absmax_q, sz[2]);
    if (st == QLR_OK && sz[3]) {
        /* QLR_NF4_DQ_PAD zero floats after the second-level table (aligned 32-byte reads) */
        size_t bytes = sz[3] - QLR_NF4_DQ_PAD * 4, pad = QLR_NF4_DQ_PAD * 4;
        dev->dq_absmax = be->mem.alloc(be, bytes + pad);
        if (!dev->dq_absmax) st = qlr_error_status();
        if (st == QLR_OK) st = be->mem.memset0(be, (char *)dev->dq_absmax + bytes, pad);
        if (st == QLR_OK && bytes) st = be->mem.h2d(be, dev->dq_absmax, host->dq_absmax, bytes);
    }
    if (st != QLR_OK) qlr_backend_nf4_free(be, dev);
    return st;
}

void qlr_backend_nf4_free(qlr_backend *be, qlr_nf4 *dev) {
    if (dev->owned) {
        /* stolen host buffers (CPU) */
        qlr_nf4_free(dev);
        return;
    }
    if (dev->codes) be->mem.free(be, dev->codes);
    if (dev->absmax) be->mem.free(be, dev->absmax);
    if (dev->absmax_q) be->mem.free(be, dev->absmax_q);
    if (dev->dq_absmax) be->mem.free(be, dev->dq_absmax);
    memset(dev, 0, sizeof *dev);
}

qlr_status qlr_backend_upload_act(qlr_backend *be, void *dst, const float *src, int64_t n) {
    if (be->act_dtype == QLR_F32) return be->mem.h2d(be, dst, src, (size_t)n * 4);
    if (be->act_dtype != QLR_BF16)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "backend %s: activation dtype %s", be->name,
                          qlr_dtype_name(be->act_dtype));
    uint16_t *tmp = malloc((size_t)n * 2 + 1);
    if (!tmp) return qlr_errorf(QLR_ERR_NOMEM, "upload of %lld values", (long long)n);
    qlr_f32_to_bf16_row(src, tmp, (size_t)n);
    qlr_status st = be->mem.h2d(be, dst, tmp, (size_t)n * 2);
    if (st == QLR_OK) st = be->mem.sync(be); /* tmp must outlive an async copy */
    free(tmp);
    return st;
}

qlr_status qlr_backend_download_act(qlr_backend *be, float *dst, const void *src, int64_t n) {
    if (be->act_dtype == QLR_F32) {
        QLR_TRY(be->mem.d2h(be, dst, src, (size_t)n * 4));
        return be->mem.sync(be);
    }
    if (be->act_dtype != QLR_BF16)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "backend %s: activation dtype %s", be->name,
                          qlr_dtype_name(be->act_dtype));
    uint16_t *tmp = malloc((size_t)n * 2 + 1);
    if (!tmp) return qlr_errorf(QLR_ERR_NOMEM, "download of %lld values", (long long)n);
    qlr_status st = be->mem.d2h(be, tmp, src, (size_t)n * 2);
    if (st == QLR_OK) st = be->mem.sync(be);
    if (st == QLR_OK) qlr_bf16_to_f32_row(tmp, dst, (size_t)n);
    free(tmp);
    return st;
}

/* ---- segment lists of lora_segmented ---- */

void qlr_lora_segs_build(const int32_t *slot, int32_t n, int32_t n_slots, int32_t run_min,
                         int32_t *tok, int32_t *tiles, int32_t *runs, int32_t *mark,
                         qlr_lora_segs *out) {
    memset(out, 0, sizeof *out);
    /* mark[i]: 1 = goes to a tile, 0 = slot -1 or in a run, 2 = placed */
    int32_t nt = 0, nr = 0, pos = 0, mt = 0;
    /* runs of >= run_min consecutive tokens of one slot go to `runs` */
    for (int32_t i = 0; i < n;) {
        int32_t s = slot[i] >= 0 && slot[i] < n_slots ? slot[i] : -1, j = i + 1;
        while (j < n && slot[j] == slot[i]) j++;
        int run = s >= 0 && run_min > 0 && j - i >= run_min;
        if (run) {
            runs[3 * nr] = s, runs[3 * nr + 1] = i, runs[3 * nr + 2] = j - i;
            nr++;
        }
        for (int32_t k = i; k < j; k++) mark[k] = s >= 0 && !run;
        i = j;
    }
    /* tiles, one slot at a time in order of first use: one scan of the batch per distinct slot
     * (batches are a few thousand tokens at most, so no per-slot scratch is needed) */
    for (int32_t i = 0; i < n; i++) {
        if (mark[i] != 1) continue;
        int32_t s = slot[i], start = pos, cnt = 0;
        for (int32_t k = i; k < n; k++) {
            if (mark[k] != 1 || slot[k] != s) continue;
            mark[k] = 2;
            if (cnt == QLR_LORA_TILE) {
                tiles[3 * nt] = s, tiles[3 * nt + 1] = start, tiles[3 * nt + 2] = cnt;
                nt++;
                start += cnt;
                cnt = 0;
            }
            tok[pos++] = k;
            cnt++;
        }
        tiles[3 * nt] = s, tiles[3 * nt + 1] = start, tiles[3 * nt + 2] = cnt;
        nt++;
    }
    for (int32_t t = 0; t < nt; t++) mt = tiles[3 * t + 2] > mt ? tiles[3 * t + 2] : mt;
    out->n_tiles = nt;
    out->max_tile = mt;
    out->n_sorted = pos;
    out->tiles = tiles;
    out->tok = tok;
    out->n_runs = nr;
    out->runs = runs;
}
