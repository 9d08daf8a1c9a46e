/* tests/quant/test_dynmap.c: the literal dynamic maps against bitsandbytes' measured values
 * (tests/data/quant/bnb_dynmap.txt, bit for bit), the float32 §2.2 emulation (qlr_dynmap_create)
 * against Appendix A of the spec (tests/data/quant/dynmap_appendix_a.txt, 9 significant digits)
 * and within 2 ulps of the tables, nearest-entry search, and blockwise 8-bit quantization against
 * a brute-force reference. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "quant/dynmap.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

/* Parses the two ``` blocks of "idx: value" pairs; returns the number of maps read. */
static int read_appendix(float sgn[256], float uns[256], char txt_s[256][24], char txt_u[256][24]) {
    FILE *f = fopen(QLR_TEST_DATA "/quant/dynmap_appendix_a.txt", "r");
    if (!f) return 0;
    static char buf[1 << 16];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = 0;
    int map = -1, count[2] = {0, 0};
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (!strncmp(line, "### A.1", 7)) map = 0;
        else if (!strncmp(line, "### A.2", 7)) map = 1;
        if (map < 0 || line[0] == '#' || line[0] == '`') continue;
        char *p = line;
        for (;;) {
            char *end;
            long idx = strtol(p, &end, 10);
            if (end == p || *end != ':' || idx < 0 || idx > 255) break;
            p = end + 1;
            while (*p == ' ') p++;
            char tok[24];
            int k = 0;
            while (*p && *p != ' ' && k < 23) tok[k++] = *p++;
            tok[k] = 0;
            (map ? uns : sgn)[idx] = strtof(tok, NULL);
            strcpy(map ? txt_u[idx] : txt_s[idx], tok);
            count[map]++;
            while (*p == ' ' || *p == '|') p++;
        }
    }
    return (count[0] == 256) + (count[1] == 256);
}

/* Parses tests/data/quant/bnb_dynmap.txt: "index signed-hex unsigned-hex signed-%.9g
 * unsigned-%.9g" per line, '#' comments. Returns the number of well-formed lines in order;
 * *bad_print counts lines whose %.9g columns do not print the hex values. */
static int read_bnb(float sgn[256], float uns[256], int *bad_print) {
    FILE *f = fopen(QLR_TEST_DATA "/quant/bnb_dynmap.txt", "r");
    if (!f) return 0;
    char line[256];
    int n = 0;
    *bad_print = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        int idx;
        char hs[64], hu[64], ds[64], du[64];
        if (sscanf(line, "%d %63s %63s %63s %63s", &idx, hs, hu, ds, du) != 5 || idx != n || n >= 256)
            break;
        char *e1, *e2;
        double s = strtod(hs, &e1), u = strtod(hu, &e2);
        if (*e1 || *e2 || (double)(float)s != s || (double)(float)u != u) break; /* exact float32 */
        sgn[n] = (float)s;
        uns[n] = (float)u;
        char ps[32], pu[32];
        snprintf(ps, sizeof ps, "%.9g", (double)sgn[n]);
        snprintf(pu, sizeof pu, "%.9g", (double)uns[n]);
        if (strcmp(ps, ds) || strcmp(pu, du)) (*bad_print)++;
        n++;
    }
    fclose(f);
    return n;
}

/* distance in ulps between two finite float32 values (the count of floats between them) */
static int64_t ulp_dist(float a, float b) {
    uint32_t ua = qlr_f32_bits(a), ub = qlr_f32_bits(b);
    /* sign-magnitude -> ordered integer line (-0 and +0 both 0) */
    int64_t oa = (ua >> 31) ? -(int64_t)(ua & 0x7fffffffu) : (int64_t)ua;
    int64_t ob = (ub >> 31) ? -(int64_t)(ub & 0x7fffffffu) : (int64_t)ub;
    return oa > ob ? oa - ob : ob - oa;
}

/* lit: the table in use; bnb: bitsandbytes' measured map; gen: qlr_dynmap_create; app/txt:
 * Appendix A. want_diff: how many entries the emulation differs from bnb in (as measured). */
static void check_map(const char *name, const float *lit, const float *bnb, const float *gen,
                      const float *app, char txt[256][24], int want_diff) {
    int bad_bnb = 0, bad_app = 0, bad_txt = 0, gen_diff = 0;
    int64_t worst_ulp = 0;
    for (int i = 0; i < 256; i++) {
        char s[32];
        if (qlr_f32_bits(lit[i]) != qlr_f32_bits(bnb[i])) {
            if (bad_bnb++ < 3)
                fprintf(stderr, "%s[%d]: table %.9g vs bitsandbytes %.9g\n", name, i, (double)lit[i],
                        (double)bnb[i]);
        }
        if (qlr_f32_bits(gen[i]) != qlr_f32_bits(bnb[i])) gen_diff++;
        int64_t d = ulp_dist(gen[i], bnb[i]);
        if (d > worst_ulp) worst_ulp = d;
        if (d > 2) fprintf(stderr, "%s[%d]: emulation %.9g is %lld ulps from bitsandbytes %.9g\n", name,
                           i, (double)gen[i], (long long)d, (double)bnb[i]);
        if (gen[i] != app[i]) bad_app++;
        snprintf(s, sizeof s, "%.9g", (double)gen[i]);
        if (strcmp(s, txt[i])) {
            if (bad_txt++ < 3) fprintf(stderr, "%s[%d]: %s vs appendix %s\n", name, i, s, txt[i]);
        }
    }
    CHECK_MSG(bad_bnb == 0, "%s: %d table entries differ (bits) from tests/data/quant/bnb_dynmap.txt",
              name, bad_bnb);
    CHECK_MSG(worst_ulp <= 2, "%s: qlr_dynmap_create is up to %lld ulps from bitsandbytes' map (> 2)",
              name, (long long)worst_ulp);
    CHECK_MSG(gen_diff == want_diff,
              "%s: qlr_dynmap_create differs from bitsandbytes' map in %d entries, measured %d", name,
              gen_diff, want_diff);
    CHECK_MSG(bad_app == 0, "%s: %d qlr_dynmap_create entries differ from Appendix A", name, bad_app);
    CHECK_MSG(bad_txt == 0, "%s: %d qlr_dynmap_create entries print differently (%%.9g) than Appendix A",
              name, bad_txt);
    int sorted = 1;
    for (int i = 0; i < 255; i++) sorted &= lit[i] < lit[i + 1];
    CHECK_MSG(sorted, "%s is not strictly ascending", name);
}

static void test_maps(void) {
    static float sgn[256], uns[256], bs[256], bu[256];
    static char ts[256][24], tu[256][24];
    CHECK_MSG(read_appendix(sgn, uns, ts, tu) == 2, "could not read both maps from %s",
              QLR_TEST_DATA "/quant/dynmap_appendix_a.txt");
    int bad_print = -1;
    CHECK_MSG(read_bnb(bs, bu, &bad_print) == 256, "could not read 256 entries from %s",
              QLR_TEST_DATA "/quant/bnb_dynmap.txt");
    CHECK_MSG(bad_print == 0, "%d lines of bnb_dynmap.txt: %%.9g columns disagree with the hex ones",
              bad_print);
    float gs[256], gu[256];
    qlr_dynmap_create(1, gs);
    qlr_dynmap_create(0, gu);
    /* 42 signed and 31 unsigned entries: measured against bitsandbytes 0.50.2 (see the file) */
    check_map("signed", qlr_dynmap_signed, bs, gs, sgn, ts, 42);
    check_map("unsigned", qlr_dynmap_unsigned, bu, gu, uns, tu, 31);
    /* the measured example that made real checkpoints fail against the emulated table */
    CHECK(qlr_f32_bits(qlr_dynmap_signed[89]) == qlr_f32_bits(-0.028281251f));
    CHECK(qlr_f32_bits(gs[89]) == qlr_f32_bits(-0.0282812472f));
    /* landmarks of spec §2.2 */
    CHECK(qlr_f32_bits(qlr_dynmap_signed[127]) == 0 && qlr_dynmap_signed[255] == 1.0f);
    CHECK_NEAR(qlr_dynmap_signed[0], -0.99296875, 1e-7, 0);
    CHECK_NEAR(qlr_dynmap_signed[128], 5.5e-7, 1e-12, 0);
    CHECK(qlr_f32_bits(qlr_dynmap_unsigned[0]) == 0 && qlr_dynmap_unsigned[255] == 1.0f);
    CHECK_NEAR(qlr_dynmap_unsigned[1], 3.25e-7, 1e-12, 0);
}

/* brute force: smallest |map[j] - x| in double, ties to the lower index */
static int ref_nearest(const float *map, float x) {
    int best = 0;
    double bd = INFINITY;
    for (int j = 0; j < 256; j++) {
        double d = fabs((double)map[j] - (double)x);
        if (d < bd) {
            bd = d;
            best = j;
        }
    }
    return best;
}

static void test_nearest(void) {
    const float *m = qlr_dynmap_signed;
    for (int j = 0; j < 256; j++) CHECK_EQ_INT(qlr_dynmap_nearest(m, m[j]), j);
    for (int j = 0; j < 256; j++) CHECK_EQ_INT(qlr_dynmap_nearest(qlr_dynmap_unsigned, qlr_dynmap_unsigned[j]), j);
    /* a value exactly on a (float32) midpoint goes to the lower index; just above, the upper */
    int ties = 0;
    for (int j = 0; j < 255; j++) {
        float mid = (m[j] + m[j + 1]) * 0.5f;
        if (mid == m[j] || mid == m[j + 1]) continue;
        CHECK_EQ_INT(qlr_dynmap_nearest(m, mid), j);
        CHECK_EQ_INT(qlr_dynmap_nearest(m, nextafterf(mid, 2.0f)), j + 1);
        ties++;
    }
    CHECK(ties > 250);
    CHECK_EQ_INT(qlr_dynmap_nearest(m, NAN), 0);
    CHECK_EQ_INT(qlr_dynmap_nearest(m, -5.0f), 0);
    CHECK_EQ_INT(qlr_dynmap_nearest(m, 5.0f), 255);
    CHECK_EQ_INT(qlr_dynmap_nearest(m, 0.0f), 127);
    CHECK_EQ_INT(qlr_dynmap_nearest(m, -0.0f), 127);
    uint64_t rng = 7;
    int bad = 0;
    for (int i = 0; i < 20000; i++) {
        float x = (test_rng_uniform(&rng) * 2.0f - 1.0f) * powf(10.0f, -7.0f * test_rng_uniform(&rng));
        if (qlr_dynmap_nearest(m, x) != ref_nearest(m, x)) bad++;
    }
    CHECK_EQ_INT(bad, 0);
}

/* bnb's CUDA search (dQuantize<0>): the nearest entry, the even index on an exact float32
 * midpoint (its search ends on an even index and keeps it on a tie), NaN -> 0, and out of
 * range values clamp to the ends; checked against the brute force away from midpoints. */
static void test_quantize_bnb(void) {
    const float *maps[2] = {qlr_dynmap_signed, qlr_dynmap_unsigned};
    for (int k = 0; k < 2; k++) {
        const float *m = maps[k];
        for (int j = 0; j < 256; j++) CHECK_EQ_INT(qlr_dynmap_quantize_bnb(m, m[j]), j);
        int ties = 0, bad_tie = 0, bad_next = 0;
        for (int j = 0; j < 255; j++) {
            float mid = (m[j] + m[j + 1]) * 0.5f;
            if (mid == m[j] || mid == m[j + 1]) continue;
            ties++;
            bad_tie += qlr_dynmap_quantize_bnb(m, mid) != (j % 2 == 0 ? j : j + 1);
            bad_next += qlr_dynmap_quantize_bnb(m, nextafterf(mid, 2.0f)) != j + 1;
            bad_next += qlr_dynmap_quantize_bnb(m, nextafterf(mid, -2.0f)) != j;
        }
        CHECK(ties > 250);
        CHECK_EQ_INT(bad_tie, 0);
        CHECK_EQ_INT(bad_next, 0);
        CHECK_EQ_INT(qlr_dynmap_quantize_bnb(m, NAN), 0);
        CHECK_EQ_INT(qlr_dynmap_quantize_bnb(m, 5.0f), 255);
        CHECK_EQ_INT(qlr_dynmap_quantize_bnb(m, -5.0f), 0);
    }
    uint64_t rng = 11;
    int bad = 0;
    for (int i = 0; i < 20000; i++) {
        float x = (test_rng_uniform(&rng) * 2.0f - 1.0f) * powf(10.0f, -7.0f * test_rng_uniform(&rng));
        if (qlr_dynmap_quantize_bnb(qlr_dynmap_signed, x) != ref_nearest(qlr_dynmap_signed, x)) bad++;
    }
    CHECK_EQ_INT(bad, 0);
}

static void test_blockwise8(void) {
    /* n not a multiple of the block, one all-zero block, one block of tiny values */
    const int block = 256;
    const int64_t n = 256 * 9 + 77;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    uint8_t *codes = malloc(n);
    float absmax[10];
    uint64_t rng = 99;
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * 0.01f;
    for (int64_t i = 256; i < 512; i++) x[i] = 0.0f;
    for (int64_t i = 512; i < 768; i++) x[i] *= 1e-6f;
    CHECK_OK(qlr_blockwise8_quantize(x, n, block, qlr_dynmap_signed, codes, absmax));
    int bad_amax = 0, bad_code = 0;
    for (int b = 0; b < 10; b++) {
        int64_t i0 = (int64_t)b * block, i1 = i0 + block < n ? i0 + block : n;
        float a = 0;
        for (int64_t i = i0; i < i1; i++) a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
        if (absmax[b] != a) bad_amax++;
        float r = 1.0f / a; /* inf for the all-zero block: 0 * inf = NaN -> code 0, as bnb */
        for (int64_t i = i0; i < i1; i++)
            if (codes[i] != (a > 0 ? ref_nearest(qlr_dynmap_signed, x[i] * r) : 0)) bad_code++;
    }
    CHECK_EQ_INT(bad_amax, 0);
    CHECK_EQ_INT(bad_code, 0);
    CHECK(absmax[1] == 0.0f);
    CHECK_OK(qlr_blockwise8_dequant(codes, n, block, qlr_dynmap_signed, absmax, y));
    /* error bound: half the widest gap of the signed map (0.9/64/2 = 0.00703) times absmax */
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs(y[i] - x[i]) / (absmax[i / block] > 0 ? absmax[i / block] : 1);
        if (e > worst) worst = e;
        if (absmax[i / block] == 0) CHECK(y[i] == 0.0f);
    }
    CHECK_MSG(worst <= 0.00704, "blockwise8 signed worst block-relative error %g > 0.00704", worst);
    /* unsigned map on non-negative data (the AdamW second moment) */
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * x[i];
    CHECK_OK(qlr_blockwise8_quantize(x, n, block, qlr_dynmap_unsigned, codes, absmax));
    CHECK_OK(qlr_blockwise8_dequant(codes, n, block, qlr_dynmap_unsigned, absmax, y));
    worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs(y[i] - x[i]) / (absmax[i / block] > 0 ? absmax[i / block] : 1);
        if (e > worst) worst = e;
    }
    CHECK_MSG(worst <= 0.00352, "blockwise8 unsigned worst block-relative error %g > 0.00352", worst);
    CHECK(qlr_blockwise8_quantize(x, n, 0, qlr_dynmap_signed, codes, absmax) == QLR_ERR_INVALID);
    CHECK(qlr_blockwise8_dequant(codes, -1, 256, qlr_dynmap_signed, absmax, y) == QLR_ERR_INVALID);
    free(x);
    free(y);
    free(codes);
}

int main(void) {
    test_maps();
    test_nearest();
    test_quantize_bnb();
    test_blockwise8();
    return test_finish();
}
