/* tests/core/test_core.c: core/ unit tests: f16/bf16 conversion against the compiler's own
 * _Float16 and hand-picked bit patterns, atomic writes, crc32 known values, arenas, errors,
 * and the parallel-for partition. */
#include "core/core.h"
#include "tests/test_util.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_f16(void) {
    /* every f16 round-trips through f32 exactly (NaNs stay NaN) */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qlr_f16_to_f32((uint16_t)h);
        _Float16 ref;
        uint16_t hh = (uint16_t)h;
        memcpy(&ref, &hh, 2);
        float fr = (float)ref;
        if (f != f) {
            if (fr == fr) bad++;
            if (qlr_f32_to_f16(f) == qlr_f32_to_f16(f) && !((qlr_f32_to_f16(f) & 0x7c00) == 0x7c00 && (qlr_f32_to_f16(f) & 0x3ff)))
                bad++;
            continue;
        }
        if (qlr_f32_bits(f) != qlr_f32_bits(fr)) bad++;
        if (qlr_f32_to_f16(f) != h) bad++;
    }
    CHECK_EQ_INT(bad, 0);
    /* f32 -> f16 rounding matches the compiler's _Float16 conversion on random and edge bits */
    uint64_t rng = 1;
    bad = 0;
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)test_rng_u64(&rng);
        if (i < 1000) u = (u & 0x807fffffu) | ((uint32_t)(100 + i % 50) << 23); /* subnormal range */
        float f = qlr_bits_f32(u);
        if (f != f) continue;
        _Float16 r = (_Float16)f;
        uint16_t rb;
        memcpy(&rb, &r, 2);
        if (qlr_f32_to_f16(f) != rb) {
            if (bad < 5) fprintf(stderr, "f16 mismatch for %08x: %04x vs %04x\n", u, qlr_f32_to_f16(f), rb);
            bad++;
        }
    }
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT(qlr_f32_to_f16(65520.0f), 0x7c00);
    CHECK_EQ_INT(qlr_f32_to_f16(65519.0f), 0x7bff);
    CHECK_EQ_INT(qlr_f32_to_f16(-0.0f), 0x8000);
}

static void test_bf16(void) {
    CHECK_EQ_INT(qlr_f32_to_bf16(1.0f), 0x3f80);
    CHECK_EQ_INT(qlr_f32_to_bf16(qlr_bits_f32(0x3f808000u)), 0x3f80); /* tie -> even */
    CHECK_EQ_INT(qlr_f32_to_bf16(qlr_bits_f32(0x3f818000u)), 0x3f82); /* tie -> even (up) */
    CHECK_EQ_INT(qlr_f32_to_bf16(qlr_bits_f32(0x3f808001u)), 0x3f81);
    CHECK_EQ_INT(qlr_f32_to_bf16(qlr_bits_f32(0x7f7fffffu)), 0x7f80); /* max float rounds to inf */
    uint16_t nan = qlr_f32_to_bf16(qlr_bits_f32(0x7f800001u));       /* signalling NaN stays NaN */
    CHECK((nan & 0x7f80) == 0x7f80 && (nan & 0x7f));
    CHECK_EQ_INT(qlr_f32_to_bf16(-INFINITY), 0xff80);
    for (uint32_t h = 0; h < 65536; h++) {
        float f = qlr_bf16_to_f32((uint16_t)h);
        if (f == f && qlr_f32_to_bf16(f) != h) { CHECK_MSG(0, "bf16 %04x does not round-trip", h); break; }
    }
}

static void test_files(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/a.bin", test_tmpdir());
    const char *msg = "123456789";
    CHECK_OK(qlr_write_atomic(path, msg, 9));
    CHECK_EQ_INT(qlr_crc32(0, msg, 9), 0xCBF43926u); /* the standard crc32 check value */
    char *data;
    size_t n;
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &data, &n));
    CHECK(n == 9 && memcmp(data, msg, 9) == 0 && data[9] == 0);
    free(data);
    CHECK(qlr_file_read_all(path, 4, &data, &n) == QLR_ERR_RANGE);
    qlr_mmap m;
    CHECK_OK(qlr_mmap_open(path, &m));
    CHECK(m.size == 9 && memcmp(m.data, msg, 9) == 0);
    qlr_mmap_close(&m);
    /* an aborted writer leaves the old file and no temp file behind */
    qlr_afile af;
    CHECK_OK(qlr_afile_open(&af, path));
    CHECK_OK(qlr_afile_write(&af, "xx", 2));
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s", af.tmp);
    qlr_afile_abort(&af);
    CHECK(!qlr_path_exists(tmp));
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &data, &n));
    CHECK(n == 9);
    free(data);
    /* the writer's running crc equals crc32 of the whole content */
    CHECK_OK(qlr_afile_open(&af, path));
    CHECK_OK(qlr_afile_write(&af, "1234", 4));
    CHECK_OK(qlr_afile_write(&af, "56789", 5));
    CHECK_EQ_INT(af.crc, 0xCBF43926u);
    CHECK_OK(qlr_afile_commit(&af));
    CHECK(qlr_mmap_open("/nonexistent/x", &m) == QLR_ERR_IO);
    CHECK(strstr(qlr_error_msg(), "/nonexistent/x") != NULL);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/x/y/z", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(dir));
    CHECK(qlr_is_dir(dir));
}

static void test_arena(void) {
    qlr_arena a;
    CHECK_OK(qlr_arena_init(&a, "test", 1000));
    void *p = qlr_arena_alloc(&a, 10, 64);
    void *q = qlr_arena_alloc(&a, 10, 256);
    CHECK(p && q && ((uintptr_t)q & 255) == 0);
    CHECK(qlr_arena_alloc(&a, 2000, 1) == NULL);
    CHECK(strstr(qlr_error_msg(), "arena 'test' is full") != NULL);
    CHECK(qlr_arena_alloc(&a, SIZE_MAX, 1) == NULL); /* no overflow */
    qlr_arena_reset(&a);
    CHECK(a.used == 0 && a.peak > 0);
    qlr_arena_free(&a);
}

static qlr_status fail_inner(void) { return qlr_errorf(QLR_ERR_FORMAT, "bad byte at offset %d", 7); }

static void test_errors(void) {
    CHECK(fail_inner() == QLR_ERR_FORMAT);
    CHECK(qlr_error_prefix("x.gguf") == QLR_ERR_FORMAT);
    CHECK(strcmp(qlr_error_msg(), "x.gguf: bad byte at offset 7") == 0);
    CHECK(strstr(qlr_error_where(), "test_core.c:") != NULL);
    CHECK(strcmp(qlr_status_str(QLR_ERR_FORMAT), "format error") == 0);
}

static void sum_range(void *ctx, int64_t b, int64_t e, int tid) {
    int64_t *out = ctx;
    for (int64_t i = b; i < e; i++) out[i] = i * 2;
}

static void test_threads(void) {
    int64_t n = 100003;
    int64_t *v = calloc(n, sizeof *v);
    qlr_parallel_for(n, 16, sum_range, v);
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= v[i] == i * 2;
    CHECK(ok);
    for (int r = 0; r < 50; r++) qlr_parallel_for(7, 1, sum_range, v); /* many small jobs */
    free(v);
    CHECK(qlr_n_threads() >= 1);
}

static void test_strbuf(void) {
    qlr_strbuf b = {0};
    qlr_strbuf_put(&b, "ab", 2);
    qlr_strbuf_puts(&b, "c");
    for (int i = 0; i < 1000; i++) qlr_strbuf_printf(&b, "%d,", i % 10); /* forces several regrowths */
    CHECK(!b.oom && b.n == 3 + 2000 && strncmp(b.p, "abc0,1,", 7) == 0 && b.p[b.n] == 0);
    qlr_strbuf_put(&b, "x\0y", 3);                                      /* embedded NUL kept */
    CHECK(b.n == 2006 && b.p[2004] == 0 && b.p[2005] == 'y');
    qlr_strbuf_free(&b);
    CHECK(b.p == NULL && b.n == 0);
}

/* qlr-hash64: pinned values (files record them: a change of the definition must fail here;
 * the pins were computed independently from core/hash.h's definition in Python),
 * streaming in any split equals one call, every byte and the length count. */
static void test_hash(void) {
    uint8_t buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (uint8_t)(i * 7 + 3);
    uint64_t one = qlr_hash64_of(buf, sizeof buf, 0);
    printf("qlr-hash64: empty %016llx, abc %016llx, 1000 bytes %016llx\n",
           (unsigned long long)qlr_hash64_of("", 0, 0), (unsigned long long)qlr_hash64_of("abc", 3, 0),
           (unsigned long long)one);
    CHECK(qlr_hash64_of("", 0, 0) == 0xe4c0500b82706c86ull);
    CHECK(qlr_hash64_of("abc", 3, 0) == 0xf72710fb84d6dd31ull);
    CHECK(one == 0xa7a204e58b7dad67ull);
    const size_t splits[] = {1, 3, 31, 32, 33, 64, 999};
    for (size_t k = 0; k < sizeof splits / sizeof splits[0]; k++) {
        qlr_hash64 h;
        qlr_hash64_init(&h, 0);
        for (size_t off = 0; off < sizeof buf; off += splits[k]) {
            size_t n = sizeof buf - off < splits[k] ? sizeof buf - off : splits[k];
            qlr_hash64_update(&h, buf + off, n);
        }
        CHECK_MSG(qlr_hash64_final(&h) == one, "pieces of %zu bytes hash differently", splits[k]);
    }
    int same = 0;
    for (int i = 0; i < 1000; i += 37) {
        buf[i] ^= 1;
        same += qlr_hash64_of(buf, sizeof buf, 0) == one;
        buf[i] ^= 1;
    }
    CHECK_MSG(same == 0, "%d one-bit changes kept the hash", same);
    CHECK(qlr_hash64_of("abc", 4, 0) != qlr_hash64_of("abc", 3, 0)); /* zero padding vs length */
    CHECK(qlr_hash64_of("abc", 3, 1) != qlr_hash64_of("abc", 3, 0)); /* seed */
}

int main(void) {
    test_hash();
    test_f16();
    test_bf16();
    test_files();
    test_arena();
    test_errors();
    test_threads();
    test_strbuf();
    return test_finish();
}
