/* optim/adamw_state.c: the per-tensor AdamW state (allocation, the 8-bit/32-bit choice by
 * bnb's 4096-element rule) and its serialization for checkpoints: a flat little-endian layout
 * with a crc32 trailer, documented in optim.h. The arrays live in host memory (the
 * qlr_adamw_state_init family) or in a backend's memory (the qlr_adamw_state_create family);
 * both share one writer and one reader, which differ only in how bytes cross to the host.
 * Reading validates every size against the bytes left and against the states the run expects
 * before anything is written, so a checkpoint of another model or a truncated file is refused
 * with a message naming the tensor. The step math is in backend/cpu/ops_optim.c. */
#include "optim/optim.h"

#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/file.h"

#define ADAMW_MAGIC "QLRADAMW"
#define ADAMW_VERSION 1u

/* ---------------------------------------------------------------- where the arrays live
 * be == NULL: host memory (malloc); otherwise be's memory through be->mem. */

/* *out = `bytes` (at least 1) zeroed bytes. */
static qlr_status arr_zeroed(qlr_backend *be, void **out, size_t bytes) {
    if (!be) {
        *out = calloc(bytes ? bytes : 1, 1);
        return *out ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "cannot allocate %zu bytes", bytes);
    }
    qlr_error_clear();
    *out = be->mem.alloc(be, bytes ? bytes : 1);
    if (!*out) {
        if (qlr_error_status() == QLR_OK)
            qlr_errorf(QLR_ERR_NOMEM, "%s: cannot allocate %zu bytes", be->name, bytes);
        return qlr_error_status();
    }
    return be->mem.memset0(be, *out, bytes);
}

static void arr_free(qlr_backend *be, void *p) {
    if (!p) return;
    if (be) be->mem.free(be, p);
    else free(p);
}

static qlr_status arr_to_host(qlr_backend *be, void *dst_host, const void *src, size_t bytes) {
    if (!bytes) return QLR_OK;
    if (!be) {
        memcpy(dst_host, src, bytes);
        return QLR_OK;
    }
    return be->mem.d2h(be, dst_host, src, bytes);
}

static qlr_status arr_from_host(qlr_backend *be, void *dst, const void *src_host, size_t bytes) {
    if (!bytes) return QLR_OK;
    if (!be) {
        memcpy(dst, src_host, bytes);
        return QLR_OK;
    }
    return be->mem.h2d(be, dst, src_host, bytes);
}

/* ---------------------------------------------------------------- allocation */

static void state_release(qlr_backend *be, qlr_adamw_state *s) {
    arr_free(be, s->m);
    arr_free(be, s->v);
    arr_free(be, s->code1);
    arr_free(be, s->code2);
    arr_free(be, s->absmax1);
    arr_free(be, s->absmax2);
    memset(s, 0, sizeof(*s));
}

static qlr_status state_make(qlr_backend *be, qlr_adamw_state *s, int64_t n, int use_8bit) {
    memset(s, 0, sizeof(*s));
    if (n < 0) return qlr_errorf(QLR_ERR_INVALID, "adamw state: negative element count %lld", (long long)n);
    s->n = n;
    qlr_status st;
    uint64_t bytes;
    if (use_8bit && n >= QLR_ADAMW8_MIN_SIZE) {
        s->kind = QLR_ADAMW_KIND_BNB8;
        s->n_blocks = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
        /* all-zero codes with absmax 0 decode to 0, as bnb's zero-initialised state */
        if ((uint64_t)n > SIZE_MAX / 2) goto nomem;
        st = arr_zeroed(be, (void **)&s->code1, (size_t)n);
        if (st == QLR_OK) st = arr_zeroed(be, (void **)&s->code2, (size_t)n);
        if (st == QLR_OK) st = arr_zeroed(be, (void **)&s->absmax1, (size_t)s->n_blocks * sizeof(float));
        if (st == QLR_OK) st = arr_zeroed(be, (void **)&s->absmax2, (size_t)s->n_blocks * sizeof(float));
    } else {
        s->kind = use_8bit ? QLR_ADAMW_KIND_BNB32 : QLR_ADAMW_KIND_TORCH32;
        if (!qlr_mul_ok((uint64_t)n, sizeof(float), &bytes) || bytes > SIZE_MAX) goto nomem;
        st = arr_zeroed(be, (void **)&s->m, (size_t)bytes);
        if (st == QLR_OK) st = arr_zeroed(be, (void **)&s->v, (size_t)bytes);
    }
    if (st == QLR_OK) return QLR_OK;
    state_release(be, s);
    return qlr_error_prefix("adamw state: the moments of a %lld-element tensor", (long long)n);
nomem:
    state_release(be, s);
    return qlr_errorf(QLR_ERR_NOMEM, "adamw state: cannot allocate the moments of a %lld-element tensor",
                      (long long)n);
}

qlr_status qlr_adamw_state_init(qlr_adamw_state *s, int64_t n, int use_8bit) {
    return state_make(NULL, s, n, use_8bit);
}

void qlr_adamw_state_free(qlr_adamw_state *s) { state_release(NULL, s); }

qlr_status qlr_adamw_state_create(qlr_backend *be, qlr_adamw_state *s, int64_t n, int use_8bit) {
    return state_make(be, s, n, use_8bit);
}

void qlr_adamw_state_destroy(qlr_backend *be, qlr_adamw_state *s) { state_release(be, s); }

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
static void get_f32s(float *x, const uint8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = get_u32(p + 4 * i);
        memcpy(&x[i], &u, 4);
    }
}

/* The f32 arrays cross to and from the host in native byte order; these turn them into the
 * layout's little-endian words (nothing to do on a little-endian host). */
static int host_is_le(void) {
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}
static void f32s_native_to_le(uint8_t *p, int64_t n) {
    if (host_is_le()) return;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, 4);
        put_u32(p + 4 * i, u);
    }
}
/* dst[n] (host or be memory) = the little-endian floats at src. */
static qlr_status load_f32s(qlr_backend *be, float *dst, const uint8_t *src, int64_t n) {
    if (host_is_le()) return arr_from_host(be, dst, src, (size_t)n * 4);
    if (!be) {
        get_f32s(dst, src, n);
        return QLR_OK;
    }
    float *tmp = malloc((size_t)(n ? n : 1) * 4);
    if (!tmp) return qlr_errorf(QLR_ERR_NOMEM, "adamw state: %lld-float staging buffer", (long long)n);
    get_f32s(tmp, src, n);
    qlr_status st = arr_from_host(be, dst, tmp, (size_t)n * 4);
    if (st == QLR_OK) st = be->mem.sync(be);
    free(tmp);
    return st;
}

static qlr_status states_write(qlr_backend *be, const qlr_adamw_state *s, int n_tensors,
                               uint8_t *buf, size_t cap, size_t *written) {
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
    /* pass 1: records, and every array's bytes as they are in memory */
    for (int i = 0; i < n_tensors; i++) {
        const qlr_adamw_state *t = &s[i];
        int is8 = t->kind == QLR_ADAMW_KIND_BNB8;
        put_u64(w, (uint64_t)t->n);
        put_u64(w + 8, (uint64_t)t->step);
        put_u32(w + 16, (uint32_t)t->kind);
        put_u32(w + 20, is8 ? QLR_ADAMW8_BLOCK : 0);
        w += RECORD_BYTES;
        if (is8) {
            size_t nb4 = (size_t)((t->n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK) * 4;
            QLR_TRY(arr_to_host(be, w, t->code1, (size_t)t->n));
            w += t->n;
            QLR_TRY(arr_to_host(be, w, t->code2, (size_t)t->n));
            w += t->n;
            QLR_TRY(arr_to_host(be, w, t->absmax1, nb4));
            w += nb4;
            QLR_TRY(arr_to_host(be, w, t->absmax2, nb4));
            w += nb4;
        } else {
            QLR_TRY(arr_to_host(be, w, t->m, (size_t)t->n * 4));
            w += 4 * t->n;
            QLR_TRY(arr_to_host(be, w, t->v, (size_t)t->n * 4));
            w += 4 * t->n;
        }
    }
    if (be) QLR_TRY(be->mem.sync(be));
    /* pass 2: the f32 arrays to little-endian words */
    uint8_t *f = buf + HEADER_BYTES;
    for (int i = 0; i < n_tensors; i++) {
        int64_t n = s[i].n;
        f += RECORD_BYTES;
        if (s[i].kind == QLR_ADAMW_KIND_BNB8) {
            int64_t nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
            f32s_native_to_le(f + 2 * n, 2 * nb);
            f += 2 * n + 8 * nb;
        } else {
            f32s_native_to_le(f, 2 * n);
            f += 8 * n;
        }
    }
    QLR_ASSERT(f == w);
    put_u32(w, qlr_crc32(0, buf, (size_t)(w - buf)));
    w += 4;
    QLR_ASSERT((size_t)(w - buf) == need);
    *written = need;
    return QLR_OK;
}

static qlr_status states_read(qlr_backend *be, qlr_adamw_state *s, int n_tensors,
                              const uint8_t *buf, size_t len, const char *what) {
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
    /* pass 1: validate every record against the bytes left and the states the run expects */
    const uint8_t *r = buf + HEADER_BYTES, *end = buf + len - 4;
    for (int i = 0; i < n_tensors; i++) {
        const qlr_adamw_state *t = &s[i];
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
        r += pl;
    }
    if (r != end)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %zu trailing bytes after the last tensor", what,
                          (size_t)(end - r));
    /* pass 2: copy (the sizes are the states' own, checked above) */
    r = buf + HEADER_BYTES;
    for (int i = 0; i < n_tensors; i++) {
        qlr_adamw_state *t = &s[i];
        int64_t n = t->n;
        t->step = (int64_t)get_u64(r + 8);
        r += RECORD_BYTES;
        if (t->kind == QLR_ADAMW_KIND_BNB8) {
            int64_t nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
            QLR_TRY(arr_from_host(be, t->code1, r, (size_t)n));
            r += n;
            QLR_TRY(arr_from_host(be, t->code2, r, (size_t)n));
            r += n;
            QLR_TRY(load_f32s(be, t->absmax1, r, nb));
            r += 4 * nb;
            QLR_TRY(load_f32s(be, t->absmax2, r, nb));
            r += 4 * nb;
        } else {
            QLR_TRY(load_f32s(be, t->m, r, n));
            r += 4 * n;
            QLR_TRY(load_f32s(be, t->v, r, n));
            r += 4 * n;
        }
    }
    QLR_ASSERT(r == end);
    /* the copies read buf, which is the caller's once we return */
    if (be) QLR_TRY(be->mem.sync(be));
    return QLR_OK;
}

qlr_status qlr_adamw_states_write(const qlr_adamw_state *s, int n_tensors, uint8_t *buf,
                                  size_t cap, size_t *written) {
    return states_write(NULL, s, n_tensors, buf, cap, written);
}

qlr_status qlr_adamw_states_read(qlr_adamw_state *s, int n_tensors, const uint8_t *buf, size_t len,
                                 const char *what) {
    return states_read(NULL, s, n_tensors, buf, len, what);
}

qlr_status qlr_adamw_states_save(qlr_backend *be, const qlr_adamw_state *s, int n_tensors,
                                 uint8_t *buf, size_t cap, size_t *written) {
    return states_write(be, s, n_tensors, buf, cap, written);
}

qlr_status qlr_adamw_states_load(qlr_backend *be, qlr_adamw_state *s, int n_tensors,
                                 const uint8_t *buf, size_t len, const char *what) {
    return states_read(be, s, n_tensors, buf, len, what);
}
