/* quant/nf4.c: the NF4 weight store on the host, byte-compatible with bitsandbytes (spec §1):
 * quantize (block 64, multiply by the float32 reciprocal of absmax, nearest code by the
 * decision-tree thresholds, element 2k in the high nibble), double quantization of absmax
 * (mean offset, signed dynamic map, block 256), threaded dequantization and per-tensor error
 * statistics. The dynamic maps and the 8-bit blockwise quantizer live in dynmap.c; device
 * kernels live in backend/. */
#include "quant/nf4.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/status.h"
#include "core/hash.h"
#include "core/threads.h"
#include "quant/dynmap.h"

/* Spec §1.1, as IEEE-754 bit patterns (exact). */
static const uint32_t nf4_bits[16] = {
    0xBF800000u, 0xBF3239B1u, 0xBF066B30u, 0xBECA32A0u, 0xBE91A24Du, 0xBE3D353Fu,
    0xBDBA7871u, 0x00000000u, 0x3DA2FAFFu, 0x3E24CAE3u, 0x3E7C04DDu, 0x3EAD033Au,
    0x3EE1A4B8u, 0x3F1007ABu, 0x3F3913B3u, 0x3F800000u,
};

/* The same values as float literals (each decimal is exactly a float32, spec §1.1);
 * qlr_nf4_table_ok() keeps the two spellings in agreement. */
const float qlr_nf4_table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* The 15 decision thresholds of bnb's dQuantizeNF4 (spec §1.3), spelled as in its CUDA source:
 * float literals, i.e. the decimal rounded directly to float32. Each decimal is the exact
 * midpoint of two codes (a value halfway between two floats), so direct rounding lands one ulp
 * away from the round-to-even float32 midpoint for thresholds 0, 8, 12 and 14; we follow the
 * CUDA kernel (bnb's pure-PyTorch backend would differ only for inputs exactly on those four).
 * Code = number of thresholds that s is strictly greater than. */
static const float nf4_thresh[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f,
};

int qlr_nf4_table_ok(void) {
    for (int i = 0; i < 16; i++)
        if (qlr_f32_bits(qlr_nf4_table[i]) != nf4_bits[i]) return 0;
    for (int i = 0; i < 15; i++) { /* within one ulp of the float32 midpoint */
        float mid = (qlr_nf4_table[i] + qlr_nf4_table[i + 1]) * 0.5f;
        if (nf4_thresh[i] != mid && nf4_thresh[i] != nextafterf(mid, 2.0f) &&
            nf4_thresh[i] != nextafterf(mid, -2.0f))
            return 0;
    }
    return 1;
}

uint8_t qlr_nf4_nearest(float s) {
    /* the decision tree as a branchless 4-step search: "greater than" at every node, so a
     * value on a threshold goes to the lower code and NaN always takes the lower branch
     * (code 0) */
    int c = 0;
    c += (s > nf4_thresh[c + 7]) << 3;
    c += (s > nf4_thresh[c + 3]) << 2;
    c += (s > nf4_thresh[c + 1]) << 1;
    c += (s > nf4_thresh[c]);
    return (uint8_t)c;
}

size_t qlr_nf4_bytes(int64_t rows, int64_t cols, int dq) {
    if (rows <= 0 || cols <= 0) return 0;
    int64_t n = rows * cols;
    int64_t nb = (n + QLR_NF4_BLOCK - 1) / QLR_NF4_BLOCK;
    size_t bytes = (size_t)((n + 1) / 2);
    if (dq) bytes += (size_t)nb + 4 * (size_t)((nb + QLR_NF4_DQ_BLOCK - 1) / QLR_NF4_DQ_BLOCK);
    else bytes += 4 * (size_t)nb;
    return bytes;
}

/* ---- quantization ---- */

typedef struct q4_ctx {
    const float *x;
    int64_t n;
    uint8_t *codes;
    float *absmax;
} q4_ctx;

static void quant_blocks(void *vctx, int64_t b0, int64_t b1, int tid) {
    const q4_ctx *c = vctx;
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * QLR_NF4_BLOCK, i1 = i0 + QLR_NF4_BLOCK;
        if (i1 > c->n) i1 = c->n;
        const float *x = c->x;
        /* bnb's CUDA kernel (kQuantizeBlockwiseSmall): the max starts at -FLT_MAX, and a
         * partial last block also sees the zeros its load pads the block with */
        float amax = -FLT_MAX;
        for (int64_t i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(x[i]));
        if (i1 - i0 < QLR_NF4_BLOCK) amax = fmaxf(amax, 0.0f);
        c->absmax[b] = amax;
        /* r = 1/absmax once per block, code = tree(x * r). For an all-zero block r = inf and
         * 0 * inf = NaN, which the tree sends to code 0 (what bnb stores; its dequantized value
         * is 0 because absmax is 0). */
        float r = 1.0f / amax;
        int64_t i = i0;
        for (; i + 1 < i1; i += 2)
            c->codes[i >> 1] = (uint8_t)(qlr_nf4_nearest(x[i] * r) << 4 |
                                         qlr_nf4_nearest(x[i + 1] * r));
        /* odd n: the padding nibble is the code of bnb's padding zero, 0 * r (code 7, or 0 in
         * an all-zero block) */
        if (i < i1) c->codes[i >> 1] = (uint8_t)(qlr_nf4_nearest(x[i] * r) << 4 | qlr_nf4_nearest(0.0f * r));
    }
}

qlr_status qlr_nf4_quantize_blocks(const float *x, int64_t n, uint8_t *codes, float *absmax) {
    if (n < 0) return qlr_errorf(QLR_ERR_INVALID, "nf4 quantize: negative element count");
    if (n == 0) return QLR_OK;
    q4_ctx c = {.x = x, .n = n, .codes = codes, .absmax = absmax};
    qlr_parallel_for((n + QLR_NF4_BLOCK - 1) / QLR_NF4_BLOCK, 1024, quant_blocks, &c);
    return QLR_OK;
}

/* ---- torch.mean on CUDA, emulated ----
 *
 * bitsandbytes' double quantization takes offset = absmax.mean() of a float32 CUDA tensor, so
 * its last bits come from PyTorch's CUDA reduction (aten/src/ATen/native/cuda/Reduce.cuh,
 * ReduceMomentKernel.cu, SharedReduceOps.h MeanOps) for a full reduction of a contiguous 1-D
 * float32 tensor of n elements: float32 accumulators throughout, the result is sum * (1.0f/n).
 * The association order, as setReduceConfig lays it out:
 *   - n >= 128: vectorized input (4 floats per load); dim0 = n / 4, else dim0 = n;
 *   - one block row of W = min(last_pow2(dim0), 512) threads; values_per_thread = ceil(n / W);
 *   - when values_per_thread >= 256 the input is split over C = max(min(target, ceil(v/16)),
 *     ceil(v/256)) thread blocks, target = SMs * (threads per SM / W);
 *   - thread t of block c: 4 accumulators; vectorized, it reads vectors t + c*W, + W*C, ...
 *     (accumulator i takes element i of each vector) and, in block 0, element
 *     4*floor(n/4) + t of the tail into accumulator 0; unvectorized, elements t + i*W (i = 0..3)
 *     per round of 4*W; then acc0 + acc1, + acc2, + acc3 in that order;
 *   - the W thread values: shared-memory halving down to 32 (v[t] += v[t + o], o = W/2 .. 32),
 *     then the warp shuffle with offsets 16, 8, 4, 2, 1 (CUDA builds; ROCm goes 1 .. 16);
 *   - with C > 1 blocks the last one sums the C block values, thread t taking t, t + W, ...,
 *     and reduces them the same way.
 * SMs and threads per SM matter only when ceil(n/W)/16 exceeds the target (n above about 4.3
 * million absmax values, 277 million weights); we take an H100/H200 (132 SMs, 2048 threads). */
enum { TORCH_SMS = 132, TORCH_THREADS_PER_SM = 2048, TORCH_MAX_THREADS = 512, TORCH_WARP = 32 };

static int64_t last_pow2_i64(int64_t n) {
    int64_t p = 1;
    while (p * 2 <= n) p *= 2;
    return p;
}

/* Reduces v[0..w) (w a power of two) the way block_x_reduce does; returns thread 0's value. */
static float torch_block_x_reduce(float *v, int64_t w) {
    int64_t dim_x = w;
    if (dim_x > TORCH_WARP) {
        for (int64_t o = dim_x / 2; o >= TORCH_WARP; o >>= 1)
            for (int64_t t = 0; t < o; t++) v[t] = v[t] + v[t + o];
        dim_x = TORCH_WARP;
    }
    for (int64_t o = dim_x >> 1; o > 0; o >>= 1)
        for (int64_t t = 0; t < o; t++) v[t] = v[t] + v[t + o]; /* t + o not yet updated: a shuffle */
    return v[0];
}

static float torch_cuda_mean_f32(const float *x, int64_t n) {
    int vectorize = n >= 128;
    int64_t dim0 = vectorize ? n / 4 : n;
    int64_t w = dim0 < TORCH_MAX_THREADS ? last_pow2_i64(dim0) : TORCH_MAX_THREADS;
    int64_t vpt = (n + w - 1) / w;
    int64_t ctas = 1;
    if (vpt >= 16 && vpt >= 256) {
        int64_t target = (int64_t)TORCH_SMS * (TORCH_THREADS_PER_SM / w);
        int64_t c2 = (vpt + 15) / 16, c3 = (vpt + 255) / 256;
        ctas = target < c2 ? target : c2;
        if (c3 > ctas) ctas = c3;
    }
    int64_t stride = w * ctas; /* step_input: in vectors when vectorized */
    float *v = malloc(sizeof(float) * (size_t)w), *blocks = malloc(sizeof(float) * (size_t)ctas);
    QLR_ASSERT(v && blocks);
    for (int64_t c = 0; c < ctas; c++) {
        for (int64_t t = 0; t < w; t++) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int64_t idx = t + c * w;
            if (vectorize) {
                for (; idx * 4 + 3 < n; idx += stride)
                    for (int i = 0; i < 4; i++) acc[i] = acc[i] + x[idx * 4 + i];
                int64_t tail = n - n % 4 + t;
                if (c == 0 && tail < n) acc[0] = acc[0] + x[tail];
            } else {
                for (; idx + 3 * stride < n; idx += 4 * stride)
                    for (int i = 0; i < 4; i++) acc[i] = acc[i] + x[idx + i * stride];
                for (int i = 0; i < 4 && idx < n; i++, idx += stride) acc[i] = acc[i] + x[idx];
            }
            v[t] = ((acc[0] + acc[1]) + acc[2]) + acc[3];
        }
        blocks[c] = torch_block_x_reduce(v, w);
    }
    float sum = blocks[0];
    if (ctas > 1) {
        for (int64_t t = 0; t < w; t++) {
            float a = 0.0f;
            for (int64_t k = t; k < ctas; k += w) a = a + blocks[k];
            v[t] = a;
        }
        sum = torch_block_x_reduce(v, w);
    }
    free(v);
    free(blocks);
    float factor = 1.0f / (float)n;
    return sum * factor;
}

float qlr_nf4_dq_mean(const float *absmax, int64_t nb) {
    if (nb <= 0) return 0.0f;
    return torch_cuda_mean_f32(absmax, nb);
}

qlr_status qlr_nf4_double_quant(const float *absmax, int64_t nb, uint8_t *absmax_q,
                                float *dq_absmax, float *dq_offset) {
    if (nb < 0) return qlr_errorf(QLR_ERR_INVALID, "nf4 double quant: negative block count");
    float off = qlr_nf4_dq_mean(absmax, nb);
    *dq_offset = off;
    if (nb == 0) return QLR_OK;
    float *centered = malloc((size_t)nb * sizeof(float));
    if (!centered)
        return qlr_errorf(QLR_ERR_NOMEM, "nf4 double quant: out of memory (%lld blocks)",
                          (long long)nb);
    for (int64_t i = 0; i < nb; i++) centered[i] = absmax[i] - off;
    qlr_status st = qlr_blockwise8_quantize(centered, nb, QLR_NF4_DQ_BLOCK, qlr_dynmap_signed,
                                            absmax_q, dq_absmax);
    free(centered);
    return st;
}

void qlr_nf4_free(qlr_nf4 *q) {
    if (!q) return;
    if (q->owned) {
        free(q->codes);
        free(q->absmax);
        free(q->absmax_q);
        free(q->dq_absmax);
    }
    memset(q, 0, sizeof *q);
}

qlr_status qlr_nf4_quantize(const float *w, int64_t rows, int64_t cols, int dq, qlr_nf4 *out) {
    memset(out, 0, sizeof *out);
    uint64_t n64;
    if (rows <= 0 || cols <= 0 || !qlr_mul_ok((uint64_t)rows, (uint64_t)cols, &n64) ||
        n64 > (uint64_t)INT64_MAX / 8)
        return qlr_errorf(QLR_ERR_INVALID, "nf4 quantize: bad shape [%lld, %lld]",
                          (long long)rows, (long long)cols);
    qlr_nf4 q = {0};
    q.rows = rows;
    q.cols = cols;
    q.n = (int64_t)n64;
    q.n_blocks = (q.n + QLR_NF4_BLOCK - 1) / QLR_NF4_BLOCK;
    q.dq = dq ? 1 : 0;
    q.n_dq_blocks = dq ? (q.n_blocks + QLR_NF4_DQ_BLOCK - 1) / QLR_NF4_DQ_BLOCK : 0;
    q.owned = 1;
    q.codes = malloc((size_t)((q.n + 1) / 2));
    q.absmax = malloc((size_t)q.n_blocks * sizeof(float));
    if (dq) {
        q.absmax_q = malloc((size_t)q.n_blocks);
        q.dq_absmax = malloc((size_t)q.n_dq_blocks * sizeof(float));
    }
    if (!q.codes || !q.absmax || (dq && (!q.absmax_q || !q.dq_absmax))) {
        qlr_nf4_free(&q);
        return qlr_errorf(QLR_ERR_NOMEM, "nf4 quantize: out of memory for [%lld, %lld]",
                          (long long)rows, (long long)cols);
    }
    qlr_status st = qlr_nf4_quantize_blocks(w, q.n, q.codes, q.absmax);
    if (st == QLR_OK && dq) {
        st = qlr_nf4_double_quant(q.absmax, q.n_blocks, q.absmax_q, q.dq_absmax, &q.dq_offset);
        free(q.absmax);
        q.absmax = NULL;
    }
    if (st != QLR_OK) {
        qlr_nf4_free(&q);
        return st;
    }
    *out = q;
    return QLR_OK;
}

/* Allocates an owned store of shape [rows, cols] (codes and the absmax arrays of its dq mode). */
static qlr_status nf4_alloc(int64_t rows, int64_t cols, int dq, qlr_nf4 *out) {
    memset(out, 0, sizeof *out);
    uint64_t n64;
    if (rows <= 0 || cols <= 0 || !qlr_mul_ok((uint64_t)rows, (uint64_t)cols, &n64) ||
        n64 > (uint64_t)INT64_MAX / 8)
        return qlr_errorf(QLR_ERR_INVALID, "nf4: bad shape [%lld, %lld]", (long long)rows, (long long)cols);
    qlr_nf4 q = {0};
    q.rows = rows;
    q.cols = cols;
    q.n = (int64_t)n64;
    q.n_blocks = (q.n + QLR_NF4_BLOCK - 1) / QLR_NF4_BLOCK;
    q.dq = dq ? 1 : 0;
    q.n_dq_blocks = dq ? (q.n_blocks + QLR_NF4_DQ_BLOCK - 1) / QLR_NF4_DQ_BLOCK : 0;
    q.owned = 1;
    q.codes = malloc((size_t)((q.n + 1) / 2));
    if (dq) {
        q.absmax_q = malloc((size_t)q.n_blocks);
        q.dq_absmax = malloc((size_t)q.n_dq_blocks * sizeof(float));
    } else {
        q.absmax = malloc((size_t)q.n_blocks * sizeof(float));
    }
    if (!q.codes || (dq ? (!q.absmax_q || !q.dq_absmax) : !q.absmax)) {
        qlr_nf4_free(&q);
        return qlr_errorf(QLR_ERR_NOMEM, "nf4: out of memory for [%lld, %lld]", (long long)rows, (long long)cols);
    }
    *out = q;
    return QLR_OK;
}

uint64_t qlr_nf4_hash(const qlr_nf4 *q) {
    qlr_hash64 h;
    qlr_hash64_init(&h, 0);
    uint8_t hdr[17];
    for (int i = 0; i < 8; i++) {
        hdr[i] = (uint8_t)((uint64_t)q->rows >> (8 * i));
        hdr[8 + i] = (uint8_t)((uint64_t)q->cols >> (8 * i));
    }
    hdr[16] = (uint8_t)(q->dq != 0);
    qlr_hash64_update(&h, hdr, sizeof hdr);
    qlr_hash64_update(&h, q->codes, (size_t)((q->n + 1) / 2));
    if (q->dq) {
        qlr_hash64_update(&h, q->absmax_q, (size_t)q->n_blocks);
        qlr_hash64_update(&h, q->dq_absmax, (size_t)q->n_dq_blocks * sizeof(float));
        qlr_hash64_update(&h, &q->dq_offset, sizeof(float));
    } else {
        qlr_hash64_update(&h, q->absmax, (size_t)q->n_blocks * sizeof(float));
    }
    return qlr_hash64_final(&h);
}

typedef struct state_ctx {
    qlr_nf4 *q;
    const float *w;
    float *dev; /* [n_threads] */
} state_ctx;

static void state_blocks(void *vctx, int64_t b0, int64_t b1, int tid) {
    const state_ctx *c = vctx;
    float worst = c->dev[tid];
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * QLR_NF4_BLOCK, i1 = i0 + QLR_NF4_BLOCK;
        if (i1 > c->q->n) i1 = c->q->n;
        float a = qlr_nf4_block_absmax(c->q, b), r = 1.0f / a;
        for (int64_t i = i0; i < i1; i++) {
            uint8_t k = qlr_nf4_nearest(c->w[i] * r);
            if (i & 1) c->q->codes[i >> 1] |= k;
            else c->q->codes[i >> 1] = (uint8_t)(k << 4);
            float dev = a != 0.0f ? fabsf(c->w[i] - qlr_nf4_table[k] * a) / fabsf(a) : fabsf(c->w[i]);
            if (dev != dev) dev = INFINITY; /* NaN counts as the worst */
            if (dev > worst) worst = dev;
        }
    }
    c->dev[tid] = worst;
}

qlr_status qlr_nf4_from_state(const float *w, int64_t rows, int64_t cols, const qlr_nf4_state *s,
                              qlr_nf4 *out, float *max_dev) {
    *max_dev = 0.0f;
    QLR_TRY(nf4_alloc(rows, cols, s->dq, out));
    qlr_nf4 *q = out;
    if (q->dq) {
        memcpy(q->absmax_q, s->absmax_q, (size_t)q->n_blocks);
        memcpy(q->dq_absmax, s->dq_absmax, (size_t)q->n_dq_blocks * sizeof(float));
        q->dq_offset = s->dq_offset;
    } else {
        memcpy(q->absmax, s->absmax, (size_t)q->n_blocks * sizeof(float));
    }
    int nt = qlr_n_threads();
    float *dev = calloc((size_t)nt, sizeof *dev);
    if (!dev) {
        qlr_nf4_free(q);
        return qlr_errorf(QLR_ERR_NOMEM, "nf4: out of memory");
    }
    state_ctx c = {q, w, dev};
    qlr_parallel_for(q->n_blocks, 1024, state_blocks, &c);
    for (int i = 0; i < nt; i++)
        if (dev[i] > *max_dev) *max_dev = dev[i];
    free(dev);
    return QLR_OK;
}

/* ---- dequantization ---- */

float qlr_nf4_block_absmax(const qlr_nf4 *q, int64_t b) {
    if (!q->dq) return q->absmax[b];
    return qlr_dynmap_signed[q->absmax_q[b]] * q->dq_absmax[b / QLR_NF4_DQ_BLOCK] + q->dq_offset;
}

/* Elements [e0, e1) of the flattened matrix into out[0 .. e1-e0). */
static void dequant_elems(const qlr_nf4 *q, int64_t e0, int64_t e1, float *out) {
    const uint8_t *codes = q->codes;
    int64_t i = e0;
    out -= e0;
    while (i < e1) {
        int64_t b = i / QLR_NF4_BLOCK, be = (b + 1) * QLR_NF4_BLOCK;
        if (be > e1) be = e1;
        float a = qlr_nf4_block_absmax(q, b);
        float lut[16]; /* table[k] * absmax: the very product of spec §1.5 */
        for (int k = 0; k < 16; k++) lut[k] = qlr_nf4_table[k] * a;
        if (i & 1) {
            out[i] = lut[codes[i >> 1] & 15];
            i++;
        }
        for (; i + 1 < be; i += 2) {
            uint8_t c = codes[i >> 1];
            out[i] = lut[c >> 4];
            out[i + 1] = lut[c & 15];
        }
        if (i < be) {
            out[i] = lut[codes[i >> 1] >> 4];
            i++;
        }
    }
}

void qlr_nf4_dequant_rows(const qlr_nf4 *q, int64_t r0, int64_t nr, float *out) {
    QLR_ASSERT(r0 >= 0 && nr >= 0 && r0 + nr <= q->rows);
    dequant_elems(q, r0 * q->cols, (r0 + nr) * q->cols, out);
}

typedef struct dq_ctx {
    const qlr_nf4 *q;
    float *out;
} dq_ctx;

static void dequant_blocks(void *vctx, int64_t b0, int64_t b1, int tid) {
    const dq_ctx *c = vctx;
    int64_t e0 = b0 * QLR_NF4_BLOCK, e1 = b1 * QLR_NF4_BLOCK;
    if (e1 > c->q->n) e1 = c->q->n;
    dequant_elems(c->q, e0, e1, c->out + e0);
}

void qlr_nf4_dequant(const qlr_nf4 *q, float *out) {
    dq_ctx c = {q, out};
    qlr_parallel_for(q->n_blocks, 2048, dequant_blocks, &c);
}

/* ---- error statistics ---- */

typedef struct err_acc {
    double sse, ssx, max_abs, max_rel;
    int64_t n_used, n_nonfinite;
    char pad[16]; /* keep per-thread slots on separate cache lines */
} err_acc;

typedef struct err_ctx {
    const qlr_nf4 *q;
    const float *x;
    err_acc *acc;
} err_ctx;

static void err_blocks(void *vctx, int64_t b0, int64_t b1, int tid) {
    const err_ctx *c = vctx;
    err_acc a = {0};
    float buf[QLR_NF4_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        int64_t e0 = b * QLR_NF4_BLOCK, e1 = e0 + QLR_NF4_BLOCK;
        if (e1 > c->q->n) e1 = c->q->n;
        dequant_elems(c->q, e0, e1, buf);
        for (int64_t i = e0; i < e1; i++) {
            double x = c->x[i], w = buf[i - e0];
            if (!isfinite(x)) {
                a.n_nonfinite++;
                continue;
            }
            double e = fabs(w - x);
            a.sse += e * e;
            a.ssx += x * x;
            a.n_used++;
            if (e > a.max_abs) a.max_abs = e;
            if (x != 0.0 && e / fabs(x) > a.max_rel) a.max_rel = e / fabs(x);
        }
    }
    c->acc[tid] = a;
}

qlr_status qlr_nf4_error_stats(const qlr_nf4 *q, const float *orig, qlr_nf4_err *out) {
    memset(out, 0, sizeof *out);
    int nt = qlr_n_threads();
    err_acc *acc = calloc((size_t)nt, sizeof *acc);
    if (!acc) return qlr_errorf(QLR_ERR_NOMEM, "nf4 error stats: out of memory");
    err_ctx c = {q, orig, acc};
    qlr_parallel_for(q->n_blocks, 1024, err_blocks, &c);
    err_acc t = {0};
    for (int i = 0; i < nt; i++) { /* fixed order: deterministic for a given thread count */
        t.sse += acc[i].sse;
        t.ssx += acc[i].ssx;
        t.n_used += acc[i].n_used;
        t.n_nonfinite += acc[i].n_nonfinite;
        if (acc[i].max_abs > t.max_abs) t.max_abs = acc[i].max_abs;
        if (acc[i].max_rel > t.max_rel) t.max_rel = acc[i].max_rel;
    }
    free(acc);
    if (t.n_used > 0) {
        out->rms_err = sqrt(t.sse / (double)t.n_used);
        out->rms_ref = sqrt(t.ssx / (double)t.n_used);
    }
    out->rel_rms_err = out->rms_ref > 0 ? out->rms_err / out->rms_ref : 0.0;
    out->max_abs_err = t.max_abs;
    out->max_rel_err = t.max_rel;
    out->n_nonfinite = t.n_nonfinite;
    return QLR_OK;
}
