/* tests/test_util.c: see test_util.h. */
#include "tests/test_util.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/file.h"

int test_n_pass, test_n_fail;

void test_fail_(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    const char *base = strrchr(file, '/');
    fprintf(stderr, "FAIL %s:%d: ", base ? base + 1 : file, line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    test_n_fail++;
}

int test_finish(void) {
    printf("%d passed, %d failed\n", test_n_pass, test_n_fail);
    return test_n_fail ? 1 : (test_n_pass ? 0 : 2); /* a test that checked nothing fails */
}

uint64_t test_rng_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float test_rng_uniform(uint64_t *s) { return (float)(test_rng_u64(s) >> 40) / (float)(1ull << 24); }

float test_rng_normal(uint64_t *s) {
    float u1 = test_rng_uniform(s), u2 = test_rng_uniform(s);
    if (u1 < 1e-7f) u1 = 1e-7f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530718f * u2);
}

const char *test_tmpdir(void) {
    static char dir[256];
    if (!dir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(dir, sizeof dir, "%s/qlr_test_XXXXXX", base && *base ? base : "/tmp");
        if (!mkdtemp(dir)) {
            perror("mkdtemp");
            exit(2);
        }
    }
    return dir;
}

const char *test_demo_model(void) {
    const char *e = getenv("QLR_DEMO_MODEL");
    return e && *e ? e : QLR_SOURCE_DIR "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

const char *test_demo_model_or_fail(void) {
    const char *p = test_demo_model();
    if (qlr_path_exists(p)) return p;
    CHECK_MSG(0, "demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)", p);
    return NULL;
}
