/* optim/adamw_state.c: the per-tensor AdamW state (allocation, the 8-bit/32-bit choice by
 * bnb's 4096-element rule) and its serialization for checkpoints: a flat little-endian layout
 * with a crc32 trailer, documented in optim.h. Reading validates every size against the bytes
 * left and against the states the run expects, so a checkpoint of another model or a
 * truncated file is refused with a message naming the tensor. The step math is in adamw.c. */
#include "optim/optim.h"

#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/file.h"

#define ADAMW_MAGIC "QLRADAMW"
#define ADAMW_VERSION 1u

qlr_status qlr_adamw_state_init(qlr_adamw_state *s, int64_t n, int use_8bit) {
    memset(s, 0, sizeof(*s));
    if (n < 0) return qlr_errorf(QLR_ERR_INVALID, "adamw state: negative element count %lld", (long long)n);
    s->n = n;
    if (use_8bit && n >= QLR_ADAMW8_MIN_SIZE) {
        s->kind = QLR_ADAMW_KIND_BNB8;
        s->n_blocks = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
        s->code1 = malloc((size_t)n);
        s->code2 = malloc((size_t)n);
        s->absmax1 = calloc((size_t)s->n_blocks, sizeof(float));
        s->absmax2 = calloc((size_t)s->n_blocks, sizeof(float));
        if (!s->code1 || !s->code2 || !s->absmax1 || !s->absmax2) goto nomem;
        /* all-zero codes with absmax 0 decode to 0, as bnb's zero-initialised state */
        memset(s->code1, 0, (size_t)n);
        memset(s->code2, 0, (size_t)n);
    } else {
        s->kind = use_8bit ? QLR_ADAMW_KIND_BNB32 : QLR_ADAMW_KIND_TORCH32;
        uint64_t bytes;
        if (!qlr_mul_ok((uint64_t)n, sizeof(float), &bytes) || bytes > SIZE_MAX) goto nomem;
        s->m = calloc((size_t)(n ? n : 1), sizeof(float));
        s->v = calloc((size_t)(n ? n : 1), sizeof(float));
        if (!s->m || !s->v) goto nomem;
    }
    return QLR_OK;
nomem:
    qlr_adamw_state_free(s);
    return qlr_errorf(QLR_ERR_NOMEM, "adamw state: cannot allocate the moments of a %lld-element tensor",
                      (long long)n);
}

void qlr_adamw_state_free(qlr_adamw_state *s) {
    free(s->m);
    free(s->v);
    free(s->code1);
    free(s->code2);
    free(s->absmax1);
    free(s->absmax2);
    memset(s, 0, sizeof(*s));
}

/* payload bytes of one tensor after its 24-byte record header; 0 with *ok = 0 on overflow */
static uint64_t tensor_payload(int64_t n, int32_t kind, int *ok) {
    uint64_t a, b, r;
    *ok = 1;
    if (n < 0) { *ok = 0; return 0; }
    if (kind == QLR_ADAMW_KIND_BNB8) {
        uint64_t nb = ((uint64_t)n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
        if (!qlr_mul_ok((uint64_t)n, 2, &a) || !qlr_mul_ok(nb, 8, &b) || !qlr_add_ok(a, b, &r)) *ok = 0;
        return *ok ? r : 0;
    }
    if (kind == QLR_ADAMW_KIND_TORCH32 || kind == QLR_ADAMW_KIND_BNB32) {
        if (!qlr_mul_ok((uint64_t)n, 8, &r)) *ok = 0;
        return *ok ? r : 0;
    }
    *ok = 0;
    return 0;
}

#define HEADER_BYTES 16u
#define RECORD_BYTES 24u

size_t qlr_adamw_states_size(const qlr_adamw_state *s, int n_tensors) {
    uint64_t total = HEADER_BYTES + 4; /* + crc trailer */
    for (int i = 0; i < n_tensors; i++) {
        int ok;
        uint64_t pl = tensor_payload(s[i].n, s[i].kind, &ok);
        if (!ok || !qlr_add_ok(total, RECORD_BYTES, &total) || !qlr_add_ok(total, pl, &total)) return 0;
    }
    return total > SIZE_MAX ? 0 : (size_t)total;
}

/* little-endian scalar writers/readers (the host may be big-endian in principle) */
static void put_u32(uint8_t *p, uint32_t x) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(x >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t x) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(x >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) x |= (uint32_t)p[i] << (8 * i);
    return x;
}
static uint64_t get_u64(const uint8_t *p) {
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)p[i] << (8 * i);
    return x;
}
static void put_f32s(uint8_t *p, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        put_u32(p + 4 * i, u);
    }
}
static void get_f32s(float *x, const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = get_u32(p + 4 * i);
        memcpy(&x[i], &u, 4);
    }
}

qlr_status qlr_adamw_states_write(const qlr_adamw_state *s, int n_tensors, uint8_t *buf,
                                  size_t cap, size_t *written) {
    *written = 0;
    if (n_tensors < 0) return qlr_errorf(QLR_ERR_INVALID, "adamw state: negative tensor count");
    for (int i = 0; i < n_tensors; i++) {
        int ok;
        tensor_payload(s[i].n, s[i].kind, &ok);
        if (!ok) return qlr_errorf(QLR_ERR_INVALID, "adamw state: tensor %d: bad kind %d or n %lld", i,
                                   (int)s[i].kind, (long long)s[i].n);
    }
    size_t need = qlr_adamw_states_size(s, n_tensors);
    if (need == 0) return qlr_errorf(QLR_ERR_NOMEM, "adamw state: serialized size overflows");
    if (cap < need)
        return qlr_errorf(QLR_ERR_RANGE, "adamw state: buffer of %zu bytes, %zu needed", cap, need);
    uint8_t *w = buf;
    memcpy(w, ADAMW_MAGIC, 8);
    put_u32(w + 8, ADAMW_VERSION);
    put_u32(w + 12, (uint32_t)n_tensors);
    w += HEADER_BYTES;
    for (int i = 0; i < n_tensors; i++) {
        const qlr_adamw_state *t = &s[i];
        int is8 = t->kind == QLR_ADAMW_KIND_BNB8;
        put_u64(w, (uint64_t)t->n);
        put_u64(w + 8, (uint64_t)t->step);
        put_u32(w + 16, (uint32_t)t->kind);
        put_u32(w + 20, is8 ? QLR_ADAMW8_BLOCK : 0);
        w += RECORD_BYTES;
        if (is8) {
            int64_t nb = (t->n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
            if (t->n) memcpy(w, t->code1, (size_t)t->n);
            w += t->n;
            if (t->n) memcpy(w, t->code2, (size_t)t->n);
            w += t->n;
            put_f32s(w, t->absmax1, nb);
            w += 4 * nb;
            put_f32s(w, t->absmax2, nb);
            w += 4 * nb;
        } else {
            put_f32s(w, t->m, t->n);
            w += 4 * t->n;
            put_f32s(w, t->v, t->n);
            w += 4 * t->n;
        }
    }
    put_u32(w, qlr_crc32(0, buf, (size_t)(w - buf)));
    w += 4;
    QLR_ASSERT((size_t)(w - buf) == need);
    *written = need;
    return QLR_OK;
}

qlr_status qlr_adamw_states_read(qlr_adamw_state *s, int n_tensors, const uint8_t *buf, size_t len,
                                 const char *what) {
    if (!what) what = "optimizer state";
    if (len < HEADER_BYTES + 4)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %zu bytes, too short for an optimizer state", what, len);
    if (memcmp(buf, ADAMW_MAGIC, 8) != 0)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: not a qlora AdamW state (bad magic)", what);
    uint32_t version = get_u32(buf + 8);
    if (version != ADAMW_VERSION)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: AdamW state version %u, this build reads %u", what,
                          version, ADAMW_VERSION);
    uint32_t crc = get_u32(buf + len - 4);
    if (qlr_crc32(0, buf, len - 4) != crc)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: crc32 mismatch (file is corrupt or truncated)", what);
    uint32_t nt = get_u32(buf + 12);
    if (n_tensors < 0 || nt != (uint32_t)n_tensors)
        return qlr_errorf(QLR_ERR_INVALID, "%s: holds %u tensors, the run has %d", what, nt, n_tensors);
    const uint8_t *r = buf + HEADER_BYTES, *end = buf + len - 4;
    for (int i = 0; i < n_tensors; i++) {
        qlr_adamw_state *t = &s[i];
        if ((size_t)(end - r) < RECORD_BYTES)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: offset %zu: tensor %d: record truncated", what,
                              (size_t)(r - buf), i);
        int64_t n = (int64_t)get_u64(r), step = (int64_t)get_u64(r + 8);
        int32_t kind = (int32_t)get_u32(r + 16);
        uint32_t block = get_u32(r + 20);
        if (n != t->n || kind != t->kind)
            return qlr_errorf(QLR_ERR_INVALID,
                              "%s: tensor %d: state has n=%lld kind=%d, the run expects n=%lld kind=%d "
                              "(optimizer state of another model or optimizer?)",
                              what, i, (long long)n, (int)kind, (long long)t->n, (int)t->kind);
        if (step < 0)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %d: negative step %lld", what, i, (long long)step);
        int is8 = kind == QLR_ADAMW_KIND_BNB8;
        if (block != (is8 ? QLR_ADAMW8_BLOCK : 0u))
            return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %d: block size %u unsupported", what, i, block);
        r += RECORD_BYTES;
        int ok;
        uint64_t pl = tensor_payload(n, kind, &ok);
        if (!ok || pl > (uint64_t)(end - r))
            return qlr_errorf(QLR_ERR_FORMAT, "%s: offset %zu: tensor %d: %llu payload bytes, %zu left", what,
                              (size_t)(r - buf), i, (unsigned long long)pl, (size_t)(end - r));
        t->step = step;
        if (is8) {
            int64_t nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
            if (n) memcpy(t->code1, r, (size_t)n);
            r += n;
            if (n) memcpy(t->code2, r, (size_t)n);
            r += n;
            get_f32s(t->absmax1, r, nb);
            r += 4 * nb;
            get_f32s(t->absmax2, r, nb);
            r += 4 * nb;
        } else {
            get_f32s(t->m, r, n);
            r += 4 * n;
            get_f32s(t->v, r, n);
            r += 4 * n;
        }
    }
    if (r != end)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %zu trailing bytes after the last tensor", what,
                          (size_t)(end - r));
    return QLR_OK;
}
