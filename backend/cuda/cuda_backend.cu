/* backend/cuda/cuda_backend.cu: the CUDA backend object: device selection, its stream (and a
 * copy stream for side copies to pinned host memory, ordered by events), the
 * cuBLASLt handle and workspaces, device memory (cudaMalloc; copies ordered on the stream),
 * error conversion for the QLR_CK macro, and the op table wired to the kernels in the other
 * .cu files of this folder. Ops it does not implement yet stay NULL (backend.h allows it). */
#include "backend/cuda/cuda_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend/cuda/cuda_backend.h"
#include "core/log.h"
}

static int cur_device(void) {
    int d = -1;
    cudaGetDevice(&d);
    return d;
}

qlr_status qlr_cuda_fail(cudaError_t e, const char *stmt, const char *file, int line) {
    return qlr_error_set_(QLR_ERR_DEVICE, file, line, "%s:%d: %s: CUDA error %s: %s (device %d)",
                          file, line, stmt, cudaGetErrorName(e), cudaGetErrorString(e),
                          cur_device());
}
qlr_status qlr_cuda_fail(cublasStatus_t e, const char *stmt, const char *file, int line) {
    return qlr_error_set_(QLR_ERR_DEVICE, file, line, "%s:%d: %s: cuBLAS status %d (device %d)",
                          file, line, stmt, (int)e, cur_device());
}
qlr_status qlr_cuda_fail(cudnnStatus_t e, const char *stmt, const char *file, int line) {
    return qlr_error_set_(QLR_ERR_DEVICE, file, line, "%s:%d: %s: cuDNN error %s (device %d)",
                          file, line, stmt, cudnnGetErrorString(e), cur_device());
}
qlr_status qlr_cuda_fail(ncclResult_t e, const char *stmt, const char *file, int line) {
    return qlr_error_set_(QLR_ERR_DEVICE, file, line, "%s:%d: %s: NCCL error %s (device %d)",
                          file, line, stmt, ncclGetErrorString(e), cur_device());
}

static void track_alloc(qlr_cuda_impl *im, size_t bytes) {
    im->cur_bytes += bytes;
    if (im->cur_bytes > im->peak_bytes) im->peak_bytes = im->cur_bytes;
}

/* ---- memory ---- */

/* QLR_ERR_NOMEM when taking `want` more bytes (after giving back `release`) would pass the cap. */
static qlr_status check_cap(const qlr_cuda_impl *im, size_t want, size_t release, const char *what) {
    if (!im->cap_bytes || im->cur_bytes - release + want <= im->cap_bytes) return QLR_OK;
    return qlr_errorf(QLR_ERR_NOMEM, "cuda: %s of %.1f MiB refused: the allocation cap is %.1f MiB and %.1f MiB "
                      "are in use (qlr_cuda_set_alloc_cap; `qlora bench train --vram`)", what,
                      (double)want / (1 << 20), (double)im->cap_bytes / (1 << 20),
                      (double)(im->cur_bytes - release) / (1 << 20));
}

/* Each block's size is remembered (a small table; frees are rare) for the peak figure. */
static void *cu_alloc(qlr_backend *be, size_t bytes) {
    qlr_cuda_impl *im = qlr_cuda_im(be);
    void *p = NULL;
    size_t want = ((bytes ? bytes : 1) + 255) & ~(size_t)255;
    if (check_cap(im, want, 0, "an allocation")) return NULL;
    cudaError_t e = cudaMalloc(&p, want);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        qlr_errorf(QLR_ERR_NOMEM, "cuda: cannot allocate %.1f MiB on device %d (%.1f MiB free of "
                   "%.1f MiB): %s", (double)bytes / (1 << 20), im->device,
                   (double)fr / (1 << 20), (double)tot / (1 << 20), cudaGetErrorString(e));
        cudaGetLastError();
        return NULL;
    }
    if (im->n_allocs == im->cap_allocs) {
        size_t cap = im->cap_allocs ? 2 * im->cap_allocs : 64;
        void *na = realloc(im->allocs, cap * sizeof *im->allocs);
        if (!na) {
            cudaFree(p);
            qlr_errorf(QLR_ERR_NOMEM, "cuda: allocation table");
            return NULL;
        }
        im->allocs = (qlr_cuda_alloc_rec *)na;
        im->cap_allocs = cap;
    }
    im->allocs[im->n_allocs].p = p;
    im->allocs[im->n_allocs++].bytes = want;
    track_alloc(im, want);
    return p;
}

static void cu_free(qlr_backend *be, void *p) {
    if (!p) return;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    for (size_t i = 0; i < im->n_allocs; i++)
        if (im->allocs[i].p == p) {
            im->cur_bytes -= im->allocs[i].bytes;
            im->allocs[i] = im->allocs[--im->n_allocs];
            break;
        }
    /* cudaFree synchronises the device: freeing is setup/teardown, never per token */
    cudaFree(p);
}

static qlr_status cu_memset0(qlr_backend *be, void *p, size_t n) {
    if (!n) return QLR_OK;
    QLR_CK(cudaMemsetAsync(p, 0, n, qlr_cuda_im(be)->stream));
    return QLR_OK;
}
static qlr_status cu_h2d(qlr_backend *be, void *dst, const void *src, size_t n) {
    if (!n) return QLR_OK;
    QLR_CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, qlr_cuda_im(be)->stream));
    return QLR_OK;
}
static qlr_status cu_d2h(qlr_backend *be, void *dst, const void *src, size_t n) {
    if (!n) return QLR_OK;
    QLR_CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, qlr_cuda_im(be)->stream));
    return QLR_OK;
}
static qlr_status cu_d2d(qlr_backend *be, void *dst, const void *src, size_t n) {
    if (!n) return QLR_OK;
    QLR_CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, qlr_cuda_im(be)->stream));
    return QLR_OK;
}
static qlr_status cu_sync(qlr_backend *be) {
    QLR_CK(cudaStreamSynchronize(qlr_cuda_im(be)->stream));
    QLR_CK(cudaStreamSynchronize(qlr_cuda_im(be)->copy_stream));
    return QLR_OK;
}

/* ---- host staging: pinned memory, the copy stream, events ---- */

static void *cu_host_alloc(qlr_backend *be, size_t bytes) {
    (void)be;
    void *p = NULL;
    cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        qlr_errorf(QLR_ERR_NOMEM, "cuda: cannot allocate %.1f MiB of pinned host memory: %s",
                   (double)bytes / (1 << 20), cudaGetErrorString(e));
        return NULL;
    }
    return p;
}
static void cu_host_free(qlr_backend *be, void *p) {
    (void)be;
    if (p) cudaFreeHost(p); /* synchronises the device: teardown only */
}
static qlr_status cu_d2h_side(qlr_backend *be, void *dst, const void *src, size_t n) {
    if (!n) return QLR_OK;
    QLR_CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, qlr_cuda_im(be)->copy_stream));
    return QLR_OK;
}
static qlr_status cu_h2d_side(qlr_backend *be, void *dst, const void *src, size_t n) {
    if (!n) return QLR_OK;
    QLR_CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, qlr_cuda_im(be)->copy_stream));
    return QLR_OK;
}
static void *cu_event_create(qlr_backend *be) {
    (void)be;
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        cudaGetLastError();
        qlr_errorf(QLR_ERR_DEVICE, "cuda: cannot create an event: %s", cudaGetErrorString(e));
        return NULL;
    }
    return (void *)ev;
}
static void cu_event_free(qlr_backend *be, void *ev) {
    (void)be;
    if (ev) cudaEventDestroy((cudaEvent_t)ev);
}
static cudaStream_t side_stream(qlr_backend *be, int side) {
    return side ? qlr_cuda_im(be)->copy_stream : qlr_cuda_im(be)->stream;
}
static qlr_status cu_event_record(qlr_backend *be, void *ev, int side) {
    QLR_CK(cudaEventRecord((cudaEvent_t)ev, side_stream(be, side)));
    return QLR_OK;
}
static qlr_status cu_event_wait(qlr_backend *be, void *ev, int side) {
    QLR_CK(cudaStreamWaitEvent(side_stream(be, side), (cudaEvent_t)ev, 0));
    return QLR_OK;
}

qlr_status qlr_cuda_ws(qlr_backend *be, size_t bytes, void **out) {
    qlr_cuda_impl *im = qlr_cuda_im(be);
    if (bytes > im->ws_bytes) {
        size_t want = (bytes + (1u << 20) - 1) & ~(size_t)((1u << 20) - 1);
        QLR_TRY(check_cap(im, want, im->ws_bytes, "the op workspace"));
        if (im->ws) {
            QLR_CK(cudaStreamSynchronize(im->stream));
            QLR_CK(cudaFree(im->ws));
            im->cur_bytes -= im->ws_bytes;
            im->ws = NULL;
            im->ws_bytes = 0;
        }
        cudaError_t e = cudaMalloc(&im->ws, want);
        if (e != cudaSuccess) {
            cudaGetLastError();
            im->ws = NULL;
            return qlr_errorf(QLR_ERR_NOMEM, "cuda: cannot allocate a %.1f MiB op workspace: %s",
                              (double)want / (1 << 20), cudaGetErrorString(e));
        }
        im->ws_bytes = want;
        track_alloc(im, want);
    }
    *out = im->ws;
    return QLR_OK;
}

/* ---- lifetime ---- */

static void cu_destroy(qlr_backend *be) {
    if (!be) return;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    if (im) {
        if (im->stream) cudaStreamSynchronize(im->stream);
        qlr_cuda_sdpa_release(im);
        cudaFree(im->fresh_idx);
        if (im->lt) cublasLtDestroy(im->lt);
        cudaFree(im->lt_ws);
        cudaFree(im->ws);
        cudaFree(im->d_dynmap);
        cudaFree(im->d_stage);
        cudaFreeHost(im->h_pinned);
        free(im->allocs);
        if (im->copy_stream) {
            cudaStreamSynchronize(im->copy_stream);
            cudaStreamDestroy(im->copy_stream);
        }
        if (im->stream) cudaStreamDestroy(im->stream);
        free(im);
    }
    free(be);
}

static qlr_status cu_init(qlr_backend *be, qlr_cuda_impl *im) {
    int n_dev = 0;
    QLR_CK(cudaGetDeviceCount(&n_dev));
    if (n_dev <= 0) return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda: no CUDA device found");
    const char *env = getenv("QLR_CUDA_DEVICE");
    im->device = env ? atoi(env) : 0;
    if (im->device < 0 || im->device >= n_dev)
        return qlr_errorf(QLR_ERR_INVALID, "QLR_CUDA_DEVICE=%s: %d device(s) present", env, n_dev);
    QLR_CK(cudaSetDevice(im->device));
    cudaDeviceProp prop;
    QLR_CK(cudaGetDeviceProperties(&prop, im->device));
    if (prop.major < 8)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda: %s is compute capability %d.%d; bf16 kernels "
                          "need 8.0 (Ampere) or newer", prop.name, prop.major, prop.minor);
    im->n_sm = prop.multiProcessorCount;
    QLR_CK(cudaStreamCreateWithFlags(&im->stream, cudaStreamNonBlocking));
    QLR_CK(cudaStreamCreateWithFlags(&im->copy_stream, cudaStreamNonBlocking));
    QLR_CK(cublasLtCreate(&im->lt));
    im->lt_ws_bytes = 32u << 20;
    QLR_CK(cudaMalloc(&im->lt_ws, im->lt_ws_bytes));
    track_alloc(im, im->lt_ws_bytes);
    QLR_CK(cudaMalloc(&im->d_dynmap, 256 * sizeof(float)));
    QLR_CK(cudaMemcpy(im->d_dynmap, qlr_dynmap_signed, 256 * sizeof(float), cudaMemcpyHostToDevice));
    im->h_pinned_bytes = 1u << 16;
    QLR_CK(cudaMallocHost(&im->h_pinned, im->h_pinned_bytes));
    QLR_CK(cudaMalloc(&im->d_stage, im->h_pinned_bytes));
    /* measured on an H100 (bench_decode, Llama-3.1-8B and SmolLM2 shapes): the FMA kernel wins
     * at one token, the tensor-core kernel from 2 to 32 tokens, dequantize + cuBLASLt at 64 */
    im->gemv1_variant = 4; /* the streaming n = 1 kernel where it applies (nf4.cu) */
    im->n_policy = 2;
    im->policy_max_n[0] = 1;
    im->policy_path[0] = QLR_CUDA_NF4_FUSED;
    im->policy_max_n[1] = 48;
    im->policy_path[1] = QLR_CUDA_NF4_FUSED_MMA;
    QLR_LOGD("cuda: %s, %d SMs, compute %d.%d", prop.name, prop.multiProcessorCount, prop.major,
             prop.minor);
    return QLR_OK;
}

/* Device int32 [FRESH_ZEROS zeros | 0, 1, .., cap - 1] with cap >= n: the seq and pos arrays of
 * attention_fresh's tail rows. Grown (synchronously: rare) when a longer prefill comes. */
#define FRESH_ZEROS 64
static qlr_status fresh_index(qlr_cuda_impl *im, int64_t n) {
    if (n <= im->fresh_cap) return QLR_OK;
    int64_t cap = n > 2 * im->fresh_cap ? n : 2 * im->fresh_cap;
    if (cap < 4096) cap = 4096;
    size_t bytes = (size_t)(FRESH_ZEROS + cap) * 4;
    QLR_TRY(check_cap(im, bytes, im->fresh_idx ? (size_t)(FRESH_ZEROS + im->fresh_cap) * 4 : 0,
                      "the attention_fresh position table"));
    int32_t *h = (int32_t *)malloc(bytes), *d = NULL;
    if (!h) return qlr_errorf(QLR_ERR_NOMEM, "cuda attention_fresh: %zu-byte position table", bytes);
    for (int64_t i = 0; i < FRESH_ZEROS + cap; i++)
        h[i] = i < FRESH_ZEROS ? 0 : (int32_t)(i - FRESH_ZEROS);
    cudaError_t e = cudaMalloc(&d, bytes);
    if (e == cudaSuccess) e = cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    free(h);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cudaFree(d);
        return qlr_errorf(QLR_ERR_NOMEM, "cuda attention_fresh: %zu-byte position table: %s", bytes,
                          cudaGetErrorString(e));
    }
    if (im->fresh_idx) {
        QLR_CK(cudaStreamSynchronize(im->stream));
        cudaFree(im->fresh_idx);
        im->cur_bytes -= (size_t)(FRESH_ZEROS + im->fresh_cap) * 4;
    }
    im->fresh_idx = d;
    im->fresh_cap = cap;
    track_alloc(im, bytes);
    return QLR_OK;
}

/* The attention_fresh op (a prefill of one sequence from position 0 over its own k/v), n > 64:
 * rows 0..m-1, m = n rounded down to a multiple of 64, through cuDNN's fused SDPA
 * (qlr_cuda_attention_prefill_cudnn: being causal, those rows depend only on the first m keys, so
 * they are a fresh prefill of m tokens); the last n - m (< 64) rows through the attention op
 * (split-KV kernel) over k/v viewed as the cache of one sequence of ctx = n rows. cuDNN builds a
 * plan per shape, 35-105 ms on an H100 for each new length (up to 1.2 s when it compiles a
 * kernel), which exact lengths would pay for most new prompts; this pays it once per multiple of
 * 64. The tail costs up to 0.3 ms per layer at 2047 tokens of Llama-3.1-8B (PERF_NOTES.md 9):
 * the whole op still beats our prefill kernel at every length measured. At or below 64 tokens the attention kernels are as good: QLR_ERR_UNSUPPORTED (nothing
 * written), as when cuDNN refuses the shape or cannot be loaded (its reason is logged once per
 * process at debug level); the caller clears the error and uses the attention op.
 * QLR_CUDA_SDPA=0 leaves the op out of the table (our attention kernels for every prefill; said
 * once at info level). */
static qlr_status cu_attention_fresh(qlr_backend *be, void *out, const void *q, const void *k,
                                     const void *v, int64_t n, int64_t n_heads, int64_t n_kv,
                                     int64_t hd, float scale) {
    if (n <= 64)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda attention_fresh: %lld tokens (cuDNN SDPA is "
                          "used above 64)", (long long)n);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    int64_t m = n / 64 * 64, tail = n - m;
    QLR_TRY(fresh_index(im, n));
    qlr_status st = qlr_cuda_attention_prefill_cudnn(be, out, q, k, v, m, n_heads, n_kv, hd, scale);
    static int logged = 0;
    if (st == QLR_ERR_UNSUPPORTED && !__atomic_exchange_n(&logged, 1, __ATOMIC_RELAXED))
        QLR_LOGD("cuda: fresh prefills fall back to the attention kernels: %s", qlr_error_msg());
    if (st != QLR_OK || tail == 0) return st;
    size_t row = (size_t)(n_heads * hd) * 2; /* bytes of one token's q / out (bf16) */
    return qlr_cuda_attention(be, (char *)out + (size_t)m * row, (const char *)q + (size_t)m * row,
                              k, v, im->fresh_idx, im->fresh_idx + FRESH_ZEROS + m, tail, n_heads,
                              n_kv, hd, n, scale);
}

extern "C" qlr_status qlr_backend_cuda_create(int n_threads, qlr_backend **out) {
    (void)n_threads;
    *out = NULL;
    qlr_backend *be = (qlr_backend *)calloc(1, sizeof *be);
    qlr_cuda_impl *im = (qlr_cuda_impl *)calloc(1, sizeof *im);
    if (!be || !im) {
        free(be);
        free(im);
        return qlr_errorf(QLR_ERR_NOMEM, "cuda: backend allocation");
    }
    be->name = "cuda";
    be->kind = QLR_DEVICE_CUDA;
    be->act_dtype = QLR_BF16;
    be->host_visible = 0;
    be->impl = im;
    be->destroy = cu_destroy;
    be->mem.alloc = cu_alloc;
    be->mem.free = cu_free;
    be->mem.memset0 = cu_memset0;
    be->mem.h2d = cu_h2d;
    be->mem.d2h = cu_d2h;
    be->mem.d2d = cu_d2d;
    be->mem.sync = cu_sync;
    be->mem.host_alloc = cu_host_alloc;
    be->mem.host_free = cu_host_free;
    be->mem.d2h_side = cu_d2h_side;
    be->mem.h2d_side = cu_h2d_side;
    be->mem.event_create = cu_event_create;
    be->mem.event_free = cu_event_free;
    be->mem.event_record = cu_event_record;
    be->mem.event_wait = cu_event_wait;
    qlr_backend_ops *o = &be->ops;
    o->embedding = qlr_cuda_embedding;
    o->rmsnorm = qlr_cuda_rmsnorm;
    o->rope = qlr_cuda_rope;
    o->kv_store = qlr_cuda_kv_store;
    o->attention = qlr_cuda_attention;
    o->swiglu = qlr_cuda_swiglu;
    o->add = qlr_cuda_add;
    o->get_rows = qlr_cuda_get_rows;
    o->nf4_linear = qlr_cuda_nf4_linear;
    o->lora = qlr_cuda_lora;
    o->lora_batched = qlr_cuda_lora_batched;
    o->lora_segmented = qlr_cuda_lora_segmented;
    o->lm_head = qlr_cuda_lm_head;
    o->sample = qlr_cuda_sample;
    o->rmsnorm_bwd = qlr_cuda_rmsnorm_bwd;
    o->rope_bwd = qlr_cuda_rope_bwd;
    o->swiglu_bwd = qlr_cuda_swiglu_bwd;
    o->nf4_linear_dx = qlr_cuda_nf4_linear_dx;
    o->lora_bwd = qlr_cuda_lora_bwd;
    o->attention_varlen = qlr_cuda_attention_varlen;
    o->attention_varlen_bwd = qlr_cuda_attention_varlen_bwd;
    o->lm_head_ce = qlr_cuda_lm_head_ce;
    o->dropout = qlr_cuda_dropout;
    o->nf4_linear_multi = qlr_cuda_nf4_linear_multi;
    o->swiglu_nf4_linear = qlr_cuda_swiglu_nf4_linear;
    o->add_rmsnorm = qlr_cuda_add_rmsnorm;
    o->rope_kv_store = qlr_cuda_rope_kv_store;
    o->adamw_step = qlr_cuda_adamw_step;
    o->sum_squares = qlr_cuda_sum_squares;
    o->scale_f32 = qlr_cuda_scale_f32;
    o->f32_to_act = qlr_cuda_f32_to_act;
    o->nf4_lm_head = qlr_cuda_nf4_lm_head;
    o->comm_id = qlr_cuda_comm_id;
    o->comm_create = qlr_cuda_comm_create;
    o->comm_destroy = qlr_cuda_comm_destroy;
    o->allreduce_sum_f32 = qlr_cuda_allreduce_sum_f32;
    o->comm_poll = qlr_cuda_comm_poll;
    o->kv_store_paged = qlr_cuda_kv_store_paged;
    o->attention_paged = qlr_cuda_attention_paged;
    const char *sdpa = getenv("QLR_CUDA_SDPA");
    if (!sdpa || atoi(sdpa) != 0) {
        o->attention_fresh = cu_attention_fresh;
    } else {
        static int said = 0;
        if (!__atomic_exchange_n(&said, 1, __ATOMIC_RELAXED))
            QLR_LOGI("cuda: QLR_CUDA_SDPA=0: fresh prefills use our attention kernels, not cuDNN's "
                     "SDPA");
    }
    qlr_status st = cu_init(be, im);
    if (st != QLR_OK) {
        cu_destroy(be);
        return st;
    }
    *out = be;
    return QLR_OK;
}

int qlr_cuda_pdl_enabled(void) {
    static int on = -1;
    if (on < 0) {
        const char *e = getenv("QLR_CUDA_PDL");
        on = e ? atoi(e) != 0 : 1;
    }
    return on;
}

/* ---- extras (cuda_backend.h) ---- */

extern "C" qlr_status qlr_cuda_reserve(qlr_backend *be, size_t bytes) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    void *p;
    return qlr_cuda_ws(be, bytes, &p);
}

extern "C" void *qlr_cuda_stream(qlr_backend *be) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    return (void *)qlr_cuda_im(be)->stream;
}

extern "C" size_t qlr_cuda_peak_bytes(qlr_backend *be) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    return qlr_cuda_im(be)->peak_bytes;
}

extern "C" void qlr_cuda_set_alloc_cap(qlr_backend *be, size_t bytes) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    qlr_cuda_im(be)->cap_bytes = bytes;
}

extern "C" qlr_status qlr_cuda_mem_info(qlr_backend *be, size_t *free_bytes, size_t *total_bytes) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    QLR_CK(cudaMemGetInfo(free_bytes, total_bytes));
    return QLR_OK;
}

extern "C" const char *qlr_cuda_device_name(qlr_backend *be) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    static char name[256];
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, qlr_cuda_im(be)->device) != cudaSuccess) return "unknown";
    snprintf(name, sizeof name, "%s", prop.name);
    return name;
}

