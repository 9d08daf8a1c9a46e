/* quant/dynmap.c: bitsandbytes' 8-bit dynamic maps (spec §2.2) and the blockwise 8-bit quantizer
 * over any 256-entry sorted map. Used by NF4 double quantization (signed map, block 256) and by
 * the 8-bit AdamW states (optim/, block 256). The maps are literal float32 tables (hex floats,
 * exact) measured from bitsandbytes itself (tests/data/quant/bnb_dynmap.txt); qlr_dynmap_create()
 * is the §2.2 algorithm emulated in float32, kept as executable documentation: test_dynmap checks
 * that it stays within 2 ulps of the tables. No optimizer math lives here. */
#include "quant/dynmap.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "core/threads.h"
#include "quant/nf4.h"

/* The two tables below are bitsandbytes' own create_dynamic_map(signed=True) and
 * create_dynamic_map(signed=False) as bitsandbytes 0.50.2 computes them (torch 2.11.0+cu130,
 * read on an H100 machine; the signed one equals the nested_quant_map bitsandbytes writes into a
 * 4-bit checkpoint). Source: tests/data/quant/bnb_dynmap.txt, which test_dynmap compares bit for
 * bit. They are what bnb uses, so NF4 double quantization and the 8-bit AdamW states are
 * bit-compatible with bnb. They differ from the float32 emulation of §2.2 (qlr_dynmap_create,
 * spec Appendix A) in 42 signed and 31 unsigned entries by up to 2 ulps (the emulation does not
 * reproduce torch's float32 rounding there; spec §2.2 caveat). Do not regenerate them from
 * qlr_dynmap_create. */
const float qlr_dynmap_signed[256] = {
    -0x1.fc6666p-1, -0x1.f53334p-1, -0x1.eep-1, -0x1.e6ccccp-1,
    -0x1.df999ap-1, -0x1.d86666p-1, -0x1.d13334p-1, -0x1.cap-1,
    -0x1.c2ccccp-1, -0x1.bb999ap-1, -0x1.b46666p-1, -0x1.ad3334p-1,
    -0x1.a6p-1, -0x1.9eccccp-1, -0x1.97999ap-1, -0x1.906666p-1,
    -0x1.893334p-1, -0x1.82p-1, -0x1.7accccp-1, -0x1.73999ap-1,
    -0x1.6c6668p-1, -0x1.653334p-1, -0x1.5ep-1, -0x1.56ccccp-1,
    -0x1.4f999ap-1, -0x1.486668p-1, -0x1.413334p-1, -0x1.3ap-1,
    -0x1.32ccccp-1, -0x1.2b999ap-1, -0x1.246668p-1, -0x1.1d3334p-1,
    -0x1.16p-1, -0x1.0eccccp-1, -0x1.079998p-1, -0x1.006666p-1,
    -0x1.f26664p-2, -0x1.e4p-2, -0x1.d59998p-2, -0x1.c73334p-2,
    -0x1.b8ccccp-2, -0x1.aa6666p-2, -0x1.9cp-2, -0x1.8d9998p-2,
    -0x1.7f3334p-2, -0x1.70ccccp-2, -0x1.626666p-2, -0x1.54p-2,
    -0x1.459998p-2, -0x1.373334p-2, -0x1.28ccccp-2, -0x1.1a6668p-2,
    -0x1.0cp-2, -0x1.fb3332p-3, -0x1.de6666p-3, -0x1.c1999ap-3,
    -0x1.a4ccccp-3, -0x1.88p-3, -0x1.6b3334p-3, -0x1.4e6666p-3,
    -0x1.31999ap-3, -0x1.14ccccp-3, -0x1.fp-4, -0x1.b66668p-4,
    -0x1.93d70ap-4, -0x1.8851eep-4, -0x1.7ccccep-4, -0x1.7147aep-4,
    -0x1.65c29p-4, -0x1.5a3d7p-4, -0x1.4eb854p-4, -0x1.433334p-4,
    -0x1.37ae14p-4, -0x1.2c28f6p-4, -0x1.20a3d6p-4, -0x1.151ebap-4,
    -0x1.09999ap-4, -0x1.fc28f6p-5, -0x1.e51ebap-5, -0x1.ce147ap-5,
    -0x1.b70a3ep-5, -0x1.ap-5, -0x1.88f5c2p-5, -0x1.71eb86p-5,
    -0x1.5ae146p-5, -0x1.43d70ap-5, -0x1.2ccccep-5, -0x1.15c29p-5,
    -0x1.fd70a4p-6, -0x1.cf5c2ap-6, -0x1.a147aep-6, -0x1.733334p-6,
    -0x1.451ebap-6, -0x1.170a3ep-6, -0x1.d1eb86p-7, -0x1.75c29p-7,
    -0x1.3e76c8p-7, -0x1.2c083p-7, -0x1.19999ap-7, -0x1.072b02p-7,
    -0x1.e978d4p-8, -0x1.c49ba6p-8, -0x1.9fbe76p-8, -0x1.7ae148p-8,
    -0x1.56041ap-8, -0x1.3126e8p-8, -0x1.0c49bap-8, -0x1.ced914p-9,
    -0x1.851eb8p-9, -0x1.3b645ap-9, -0x1.e353f8p-10, -0x1.4fdf3ap-10,
    -0x1.eecbfep-11, -0x1.b3d07cp-11, -0x1.78d5p-11, -0x1.3dd982p-11,
    -0x1.02de02p-11, -0x1.8fc506p-12, -0x1.19ce0ap-12, -0x1.47ae16p-13,
    -0x1.743e96p-14, -0x1.15df66p-14, -0x1.6f0068p-15, -0x1.64840cp-16,
    -0x1.040bfep-17, -0x1.b43528p-19, -0x1.27476ep-21, 0x0p+0,
    0x1.27476ep-21, 0x1.b43528p-19, 0x1.040bfep-17, 0x1.64840cp-16,
    0x1.6f0068p-15, 0x1.15df66p-14, 0x1.743e96p-14, 0x1.47ae16p-13,
    0x1.19ce0ap-12, 0x1.8fc506p-12, 0x1.02de02p-11, 0x1.3dd982p-11,
    0x1.78d5p-11, 0x1.b3d07cp-11, 0x1.eecbfep-11, 0x1.4fdf3ap-10,
    0x1.e353f8p-10, 0x1.3b645ap-9, 0x1.851eb8p-9, 0x1.ced914p-9,
    0x1.0c49bap-8, 0x1.3126e8p-8, 0x1.56041ap-8, 0x1.7ae148p-8,
    0x1.9fbe76p-8, 0x1.c49ba6p-8, 0x1.e978d4p-8, 0x1.072b02p-7,
    0x1.19999ap-7, 0x1.2c083p-7, 0x1.3e76c8p-7, 0x1.75c29p-7,
    0x1.d1eb86p-7, 0x1.170a3ep-6, 0x1.451ebap-6, 0x1.733334p-6,
    0x1.a147aep-6, 0x1.cf5c2ap-6, 0x1.fd70a4p-6, 0x1.15c29p-5,
    0x1.2ccccep-5, 0x1.43d70ap-5, 0x1.5ae146p-5, 0x1.71eb86p-5,
    0x1.88f5c2p-5, 0x1.ap-5, 0x1.b70a3ep-5, 0x1.ce147ap-5,
    0x1.e51ebap-5, 0x1.fc28f6p-5, 0x1.09999ap-4, 0x1.151ebap-4,
    0x1.20a3d6p-4, 0x1.2c28f6p-4, 0x1.37ae14p-4, 0x1.433334p-4,
    0x1.4eb854p-4, 0x1.5a3d7p-4, 0x1.65c29p-4, 0x1.7147aep-4,
    0x1.7ccccep-4, 0x1.8851eep-4, 0x1.93d70ap-4, 0x1.b66668p-4,
    0x1.fp-4, 0x1.14ccccp-3, 0x1.31999ap-3, 0x1.4e6666p-3,
    0x1.6b3334p-3, 0x1.88p-3, 0x1.a4ccccp-3, 0x1.c1999ap-3,
    0x1.de6666p-3, 0x1.fb3332p-3, 0x1.0cp-2, 0x1.1a6668p-2,
    0x1.28ccccp-2, 0x1.373334p-2, 0x1.459998p-2, 0x1.54p-2,
    0x1.626666p-2, 0x1.70ccccp-2, 0x1.7f3334p-2, 0x1.8d9998p-2,
    0x1.9cp-2, 0x1.aa6666p-2, 0x1.b8ccccp-2, 0x1.c73334p-2,
    0x1.d59998p-2, 0x1.e4p-2, 0x1.f26664p-2, 0x1.006666p-1,
    0x1.079998p-1, 0x1.0eccccp-1, 0x1.16p-1, 0x1.1d3334p-1,
    0x1.246668p-1, 0x1.2b999ap-1, 0x1.32ccccp-1, 0x1.3ap-1,
    0x1.413334p-1, 0x1.486668p-1, 0x1.4f999ap-1, 0x1.56ccccp-1,
    0x1.5ep-1, 0x1.653334p-1, 0x1.6c6668p-1, 0x1.73999ap-1,
    0x1.7accccp-1, 0x1.82p-1, 0x1.893334p-1, 0x1.906666p-1,
    0x1.97999ap-1, 0x1.9eccccp-1, 0x1.a6p-1, 0x1.ad3334p-1,
    0x1.b46666p-1, 0x1.bb999ap-1, 0x1.c2ccccp-1, 0x1.cap-1,
    0x1.d13334p-1, 0x1.d86666p-1, 0x1.df999ap-1, 0x1.e6ccccp-1,
    0x1.eep-1, 0x1.f53334p-1, 0x1.fc6666p-1, 0x1p+0
};

const float qlr_dynmap_unsigned[256] = {
    0x0p+0, 0x1.5cf754p-22, 0x1.a0133p-21, 0x1.1d367p-19,
    0x1.2599ecp-18, 0x1.bc98a2p-18, 0x1.29cbaap-17, 0x1.0624dcp-16,
    0x1.c2e34p-16, 0x1.3fd0dp-15, 0x1.9e3p-15, 0x1.fc8f34p-15,
    0x1.2d7732p-14, 0x1.5ca6c8p-14, 0x1.8bd662p-14, 0x1.0cb296p-13,
    0x1.82a994p-13, 0x1.f8a092p-13, 0x1.374bc8p-12, 0x1.724744p-12,
    0x1.ad42c6p-12, 0x1.e83e44p-12, 0x1.119ce2p-11, 0x1.2f1aap-11,
    0x1.4c986p-11, 0x1.6a162p-11, 0x1.8793dep-11, 0x1.a511ap-11,
    0x1.c28f5ep-11, 0x1.e00d1cp-11, 0x1.fd8adcp-11, 0x1.2b020cp-10,
    0x1.74bc6ap-10, 0x1.be76c8p-10, 0x1.041894p-9, 0x1.28f5c2p-9,
    0x1.4dd2fp-9, 0x1.72b02p-9, 0x1.978d4ep-9, 0x1.bc6a8p-9,
    0x1.e147aep-9, 0x1.03126ep-8, 0x1.158104p-8, 0x1.27ef9ep-8,
    0x1.3a5e34p-8, 0x1.4cccccp-8, 0x1.5f3b64p-8, 0x1.71a9fap-8,
    0x1.841894p-8, 0x1.96872ap-8, 0x1.a8f5c2p-8, 0x1.bb645cp-8,
    0x1.cdd2fp-8, 0x1.e0418ap-8, 0x1.f2b01ep-8, 0x1.028f5cp-7,
    0x1.0bc6a8p-7, 0x1.14fdf2p-7, 0x1.1e354p-7, 0x1.276c8ap-7,
    0x1.30a3d6p-7, 0x1.39db24p-7, 0x1.43126ep-7, 0x1.5eb854p-7,
    0x1.8ccccep-7, 0x1.bae146p-7, 0x1.e8f5c4p-7, 0x1.0b851ep-6,
    0x1.228f5ep-6, 0x1.39999ap-6, 0x1.50a3d6p-6, 0x1.67ae16p-6,
    0x1.7eb852p-6, 0x1.95c28ep-6, 0x1.accccep-6, 0x1.c3d70ep-6,
    0x1.dae146p-6, 0x1.f1eb86p-6, 0x1.047aep-5, 0x1.1p-5,
    0x1.1b851ep-5, 0x1.270a3ep-5, 0x1.328f5ep-5, 0x1.3e147ap-5,
    0x1.49999ap-5, 0x1.551eb8p-5, 0x1.60a3d6p-5, 0x1.6c28f6p-5,
    0x1.77ae14p-5, 0x1.833334p-5, 0x1.8eb85p-5, 0x1.9a3d7p-5,
    0x1.a5c28ep-5, 0x1.b147aep-5, 0x1.bccccep-5, 0x1.c851eep-5,
    0x1.d3d70ep-5, 0x1.df5c2ap-5, 0x1.eae146p-5, 0x1.f66666p-5,
    0x1.00f5c4p-4, 0x1.06b854p-4, 0x1.0c7ae2p-4, 0x1.123d7p-4,
    0x1.18p-4, 0x1.1dc29p-4, 0x1.23852p-4, 0x1.2947aep-4,
    0x1.2f0a3ep-4, 0x1.34cccep-4, 0x1.3a8f5ep-4, 0x1.4051ecp-4,
    0x1.46147cp-4, 0x1.4bd70ap-4, 0x1.51999ap-4, 0x1.575c2ap-4,
    0x1.5d1eb8p-4, 0x1.62e148p-4, 0x1.68a3d6p-4, 0x1.6e6666p-4,
    0x1.7428f6p-4, 0x1.79eb86p-4, 0x1.7fae16p-4, 0x1.8570a4p-4,
    0x1.8b3334p-4, 0x1.90f5c4p-4, 0x1.96b852p-4, 0x1.a8p-4,
    0x1.c4ccccp-4, 0x1.e1999ap-4, 0x1.fe6666p-4, 0x1.0d9998p-3,
    0x1.1cp-3, 0x1.2a6668p-3, 0x1.38ccccp-3, 0x1.473334p-3,
    0x1.559998p-3, 0x1.64p-3, 0x1.726668p-3, 0x1.80ccccp-3,
    0x1.8f3334p-3, 0x1.9d9998p-3, 0x1.acp-3, 0x1.ba6668p-3,
    0x1.c8ccccp-3, 0x1.d73334p-3, 0x1.e59998p-3, 0x1.f4p-3,
    0x1.013332p-2, 0x1.086666p-2, 0x1.0f999ap-2, 0x1.16ccccp-2,
    0x1.1ep-2, 0x1.253334p-2, 0x1.2c6666p-2, 0x1.339998p-2,
    0x1.3accccp-2, 0x1.42p-2, 0x1.493334p-2, 0x1.506666p-2,
    0x1.579998p-2, 0x1.5eccccp-2, 0x1.66p-2, 0x1.6d3334p-2,
    0x1.746666p-2, 0x1.7b9998p-2, 0x1.82ccccp-2, 0x1.8ap-2,
    0x1.913334p-2, 0x1.986666p-2, 0x1.9f9998p-2, 0x1.a6ccccp-2,
    0x1.aep-2, 0x1.b53334p-2, 0x1.bc6666p-2, 0x1.c39998p-2,
    0x1.caccccp-2, 0x1.d2p-2, 0x1.d93334p-2, 0x1.e06666p-2,
    0x1.e79998p-2, 0x1.eeccccp-2, 0x1.f6p-2, 0x1.fd3332p-2,
    0x1.023334p-1, 0x1.05ccccp-1, 0x1.096666p-1, 0x1.0dp-1,
    0x1.109998p-1, 0x1.143334p-1, 0x1.17ccccp-1, 0x1.1b6668p-1,
    0x1.1fp-1, 0x1.22999ap-1, 0x1.263334p-1, 0x1.29ccccp-1,
    0x1.2d6668p-1, 0x1.31p-1, 0x1.34999ap-1, 0x1.383334p-1,
    0x1.3bccccp-1, 0x1.3f6668p-1, 0x1.43p-1, 0x1.46999ap-1,
    0x1.4a3334p-1, 0x1.4dccccp-1, 0x1.516668p-1, 0x1.55p-1,
    0x1.58999ap-1, 0x1.5c3334p-1, 0x1.5fccccp-1, 0x1.636668p-1,
    0x1.67p-1, 0x1.6a999ap-1, 0x1.6e3334p-1, 0x1.71ccccp-1,
    0x1.756668p-1, 0x1.79p-1, 0x1.7c999ap-1, 0x1.803334p-1,
    0x1.83ccccp-1, 0x1.876668p-1, 0x1.8bp-1, 0x1.8e9998p-1,
    0x1.923334p-1, 0x1.95ccccp-1, 0x1.996668p-1, 0x1.9dp-1,
    0x1.a09998p-1, 0x1.a43334p-1, 0x1.a7ccccp-1, 0x1.ab6668p-1,
    0x1.afp-1, 0x1.b29998p-1, 0x1.b63334p-1, 0x1.b9ccccp-1,
    0x1.bd6668p-1, 0x1.c1p-1, 0x1.c49998p-1, 0x1.c83334p-1,
    0x1.cbccccp-1, 0x1.cf6668p-1, 0x1.d3p-1, 0x1.d69998p-1,
    0x1.da3334p-1, 0x1.ddccccp-1, 0x1.e16668p-1, 0x1.e5p-1,
    0x1.e89998p-1, 0x1.ec3334p-1, 0x1.efccccp-1, 0x1.f36668p-1,
    0x1.f7p-1, 0x1.fa9998p-1, 0x1.fe3334p-1, 0x1p+0
};

/* torch.linspace's scalar CPU path in float32: the first half counts up from start, the second
 * half counts down from end, so both endpoints are exact. */
static void linspace_f32(float start, float end, int steps, float *out) {
    float step = (end - start) / (float)(steps - 1);
    int half = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < half ? start + step * (float)i : end - step * (float)(steps - i - 1);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

void qlr_dynmap_create(int is_signed, float out[256]) {
    float pts[130];
    int n = 0;
    for (int i = 0; i < 7; i++) {
        int k = is_signed ? (1 << i) : (1 << (i + 1));
        linspace_f32(0.1f, 1.0f, k + 1, pts);
        /* Python's 10**(i-6) is a double; torch casts the scalar to float32 for the multiply */
        float scale = (float)pow(10.0, (double)(i - 6));
        for (int j = 0; j < k; j++) {
            float mean = (pts[j] + pts[j + 1]) / 2.0f;
            out[n++] = scale * mean;
            if (is_signed) out[n++] = -scale * mean;
        }
    }
    out[n++] = 0.0f;
    out[n++] = 1.0f;
    QLR_ASSERT(n == 256);
    qsort(out, 256, sizeof(float), cmp_float);
}

uint8_t qlr_dynmap_nearest(const float *map, float x) {
    /* number of midpoints m_j = (map[j] + map[j+1]) / 2 (float32) strictly below x: the
     * bucketize rule of bnb's default backend (a value on a midpoint goes to the lower index;
     * NaN compares false everywhere and gives 0) */
    int lo = 0, hi = 255; /* answer in [lo, hi] */
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        float m = (map[mid] + map[mid + 1]) * 0.5f;
        if (m < x) lo = mid + 1;
        else hi = mid;
    }
    return (uint8_t)lo;
}

uint8_t qlr_dynmap_quantize_bnb(const float *map, float x) {
    /* bitsandbytes' dQuantize<0> (csrc/kernels.cu), the search of its CUDA blockwise 8-bit
     * quantizer: 7 halving steps from index 127 keep the last indices seen above and below x
     * (bounds -1 and 1 until then, replaced by map[0] / map[255] if never moved), then one
     * float32 midpoint comparison with the neighbour on x's side. Differs from the bucketize
     * rule (qlr_dynmap_nearest) only for x exactly on a midpoint: the search's own index wins,
     * which is always the even one. NaN fails every comparison and ends at 0. */
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = map[pivot];
    for (int step = 64; step > 0; step >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot];
    }
    if (upper_pivot == 255) upper = map[255];
    if (lower_pivot == 0) lower = map[0];
    if (x > val) {
        float mid = (upper + val) * 0.5f;
        return (uint8_t)(x > mid ? upper_pivot : pivot);
    }
    float mid = (lower + val) * 0.5f;
    return (uint8_t)(x < mid ? lower_pivot : pivot);
}

typedef struct bw8_ctx {
    const float *x;
    float *out;
    int64_t n;
    int block;
    const float *map;
    uint8_t *codes;
    float *absmax;
    const float *absmax_in;
    const uint8_t *codes_in;
} bw8_ctx;

static void bw8_quant_range(void *vctx, int64_t b0, int64_t b1, int tid) {
    const bw8_ctx *c = vctx;
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * c->block, i1 = i0 + c->block;
        if (i1 > c->n) i1 = c->n;
        /* bnb's kQuantizeBlockwise: the max starts at -FLT_MAX and a partial block also sees
         * the zeros its load pads with; r = 1/absmax once, code = search(x * r). An all-zero
         * block has r = inf and 0 * inf = NaN, which the search sends to code 0. */
        float amax = -FLT_MAX;
        for (int64_t i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(c->x[i]));
        if (i1 - i0 < c->block) amax = fmaxf(amax, 0.0f);
        c->absmax[b] = amax;
        float r = 1.0f / amax;
        for (int64_t i = i0; i < i1; i++) c->codes[i] = qlr_dynmap_quantize_bnb(c->map, c->x[i] * r);
    }
}

static void bw8_dequant_range(void *vctx, int64_t b0, int64_t b1, int tid) {
    const bw8_ctx *c = vctx;
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * c->block, i1 = i0 + c->block;
        if (i1 > c->n) i1 = c->n;
        float a = c->absmax_in[b];
        for (int64_t i = i0; i < i1; i++) c->out[i] = c->map[c->codes_in[i]] * a;
    }
}

qlr_status qlr_blockwise8_quantize(const float *x, int64_t n, int block, const float *map,
                                   uint8_t *codes, float *absmax) {
    if (n < 0 || block <= 0)
        return qlr_errorf(QLR_ERR_INVALID, "blockwise 8-bit quantize: bad n=%lld or block=%d",
                          (long long)n, block);
    if (n == 0) return QLR_OK;
    bw8_ctx c = {.x = x, .n = n, .block = block, .map = map, .codes = codes, .absmax = absmax};
    int64_t nb = (n + block - 1) / block;
    qlr_parallel_for(nb, (1 << 16) / block + 1, bw8_quant_range, &c);
    return QLR_OK;
}

qlr_status qlr_blockwise8_dequant(const uint8_t *codes, int64_t n, int block, const float *map,
                                  const float *absmax, float *out) {
    if (n < 0 || block <= 0)
        return qlr_errorf(QLR_ERR_INVALID, "blockwise 8-bit dequant: bad n=%lld or block=%d",
                          (long long)n, block);
    if (n == 0) return QLR_OK;
    bw8_ctx c = {.out = out, .n = n, .block = block, .map = map, .absmax_in = absmax,
                 .codes_in = codes};
    int64_t nb = (n + block - 1) / block;
    qlr_parallel_for(nb, (1 << 16) / block + 1, bw8_dequant_range, &c);
    return QLR_OK;
}
