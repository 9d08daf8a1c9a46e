/* tests/core/test_core.c: core/ unit tests: f16/bf16 conversion against the compiler's own
 * _Float16 and hand-picked bit patterns, atomic writes (and the removal of a killed writer's
 * temp file), crc32 known values, arenas, errors, the parallel-for partition, the progress bar's
 * plain (non-terminal) lines, and the test kill points of core/testhook.h. */
#include "core/core.h"
#include "tests/test_util.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
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

/* A killed writer's temp file ("<name>.tmp.<pid>" of a process that no longer runs) is removed
 * by the next writer of that name; a live process's, another name's and a non-pid suffix stay
 * (found by tests/e2e/test_e2e_sigkill.c: every kill left one behind, for good). */
static void test_stale_temps(void) {
    pid_t dead = fork();
    if (dead == 0) _exit(0);
    int status;
    waitpid(dead, &status, 0);
    char path[512], t_dead[600], t_live[600], t_word[600], t_other[600];
    snprintf(path, sizeof path, "%s/s.bin", test_tmpdir());
    snprintf(t_dead, sizeof t_dead, "%s.tmp.%ld", path, (long)dead);
    snprintf(t_live, sizeof t_live, "%s.tmp.%ld", path, (long)getppid());
    snprintf(t_word, sizeof t_word, "%s.tmp.abc", path);
    snprintf(t_other, sizeof t_other, "%s/other.bin.tmp.%ld", test_tmpdir(), (long)dead);
    const char *all[4] = {t_dead, t_live, t_word, t_other};
    for (int i = 0; i < 4; i++) CHECK_OK(qlr_write_atomic(all[i], "x", 1));
    CHECK_OK(qlr_write_atomic(path, "new", 3));
    CHECK_MSG(!qlr_path_exists(t_dead), "%s: the dead writer's temp file is still there", t_dead);
    CHECK(qlr_path_exists(t_live));
    CHECK(qlr_path_exists(t_word));
    CHECK(qlr_path_exists(t_other));
    CHECK(qlr_path_exists(path));
}

/* QLR_TEST_KILL_AT=<label>:<n> kills at the n-th pass of that point and not before; the trace
 * lists every point passed. Runs in a child before this process passes any point. */
static void test_kill_point(void) {
    char trace[600];
    snprintf(trace, sizeof trace, "%s/kill_trace.txt", test_tmpdir());
    pid_t pid = fork();
    if (pid == 0) {
        setenv("QLR_TEST_KILL_AT", "t.here:2", 1);
        setenv("QLR_TEST_KILL_TRACE", trace, 1);
        qlr_kill_point("t.here");
        qlr_kill_point("t.other");
        qlr_kill_point("t.other");
        qlr_kill_point("t.here");
        _exit(3); /* not killed */
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child status %d", status);
    char *data = NULL;
    size_t n;
    CHECK_OK(qlr_file_read_all(trace, 1 << 20, &data, &n));
    CHECK_MSG(data && !strcmp(data, "t.here\nt.other\nt.other\nt.here\nt.here KILL\n"), "trace: %s",
              data ? data : "");
    free(data);
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

/* each item counted once; the part index (tid) below the thread count, and each part's range
 * starting at tid x (its length) unless it is the last, shorter one */
typedef struct {
    int *count;
    int64_t n;
    _Atomic int bad;
} count_ctx;

static void count_range(void *p, int64_t b, int64_t e, int tid) {
    count_ctx *c = p;
    if (e <= b || tid < 0 || tid >= qlr_n_threads() || (e < c->n && b != (int64_t)tid * (e - b)))
        c->bad = 1;
    for (int64_t i = b; i < e; i++) c->count[i]++;
}

static void test_threads(void) {
    /* jobs of every size back to back: the caller and the workers claim parts, so whichever
     * thread is free runs the next one; no item twice or never */
    int *count = calloc(5000, sizeof *count);
    count_ctx cc = {count, 0, 0};
    int once = 1;
    for (int r = 0; r < 3000; r++) {
        cc.n = (r * 7919) % 5000 + 1;
        memset(count, 0, 5000 * sizeof *count);
        qlr_parallel_for(cc.n, r % 7 + 1, count_range, &cc);
        for (int64_t i = 0; i < cc.n; i++) once &= count[i] == 1;
    }
    CHECK(once);
    CHECK(cc.bad == 0);
    free(count);
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

/* Runs `fn` with stderr sent to a file (not a terminal: plain progress lines) and returns what it
 * printed (malloc'ed). */
static char *stderr_of(void (*fn)(void)) {
    char path[512];
    snprintf(path, sizeof path, "%s/progress.txt", test_tmpdir());
    fflush(stderr);
    int saved = dup(2);
    FILE *f = fopen(path, "w");
    if (!f || saved < 0) return strdup("");
    dup2(fileno(f), 2);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    fclose(f);
    char *s = NULL;
    size_t n;
    if (qlr_file_read_all(path, 1 << 20, &s, &n)) return strdup("");
    return s;
}

static int count_lines(const char *s, const char *needle) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p++) n++;
    return n;
}

/* One step of one: the update that completes the bar and the end would both print "1/1". */
static void progress_one(void) {
    qlr_progress *p = qlr_progress_begin("one", 1, "steps");
    qlr_progress_update(p, 1, "loss 0.5");
    qlr_progress_end(p);
}

/* Three quick steps: the first is printed at once, the last by the end, the middle one not. */
static void progress_three(void) {
    qlr_progress *p = qlr_progress_begin("three", 3, "steps");
    for (int i = 1; i <= 3; i++) qlr_progress_update(p, (uint64_t)i, i == 3 ? "last" : "more");
    qlr_progress_end(p);
}

/* Unknown total: the end repeats nothing when the last line already showed the final count. */
static void progress_open(void) {
    qlr_progress *p = qlr_progress_begin("open", 0, "items");
    qlr_progress_update(p, 5, "x");
    qlr_progress_end(p);
}

static void test_progress_plain(void) {
    setenv("QLR_NO_TTY", "1", 1);
    char *s = stderr_of(progress_one);
    CHECK_MSG(count_lines(s, "\n") == 1 && count_lines(s, "one: 1/1 steps") == 1, "one step:\n%s", s);
    free(s);
    s = stderr_of(progress_three);
    CHECK_MSG(count_lines(s, "\n") == 2 && strstr(s, "three: 1/3 steps") && strstr(s, "three: 3/3 steps") &&
                  strstr(s, "| last"),
              "three steps:\n%s", s);
    free(s);
    s = stderr_of(progress_open);
    CHECK_MSG(count_lines(s, "\n") == 1 && strstr(s, "open: 5 items"), "unknown total:\n%s", s);
    free(s);
}

static void test_path_normalize(void) {
    static const char *const cases[][2] = {
        {"recipes/../outputs/run", "outputs/run"}, {"./a//b/./c/", "a/b/c"}, {"a/b/../../..", ".."},
        {"../x/../y", "../y"}, {"/../a/..", "/"}, {"/a/./b/../c", "/a/c"}, {"", "."}, {".", "."},
        {"a/..", "."}, {"../../z", "../../z"}, {"//x", "/x"},
    };
    char buf[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK_OK(qlr_path_normalize(cases[i][0], buf, sizeof buf));
        CHECK_MSG(!strcmp(buf, cases[i][1]), "normalize(\"%s\") = \"%s\", expected \"%s\"", cases[i][0], buf,
                  cases[i][1]);
    }
    /* a ".." after a symbolic link stays: link/.. is the target's parent, not the link's folder */
    char dir[512], link[600], in[700];
    snprintf(dir, sizeof dir, "%s/norm/real/deep", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(dir));
    snprintf(link, sizeof link, "%s/norm/link", test_tmpdir());
    CHECK(symlink(dir, link) == 0);
    snprintf(in, sizeof in, "%s/../x", link);
    CHECK_OK(qlr_path_normalize(in, buf, sizeof buf));
    CHECK_MSG(!strcmp(buf, in), "%s became %s", in, buf);
    CHECK(qlr_path_normalize("abc/def", buf, 5) == QLR_ERR_RANGE);
    qlr_error_clear();
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
    test_kill_point(); /* first: before this process passes a kill point */
    test_hash();
    test_f16();
    test_bf16();
    test_files();
    test_stale_temps();
    test_arena();
    test_errors();
    test_threads();
    test_strbuf();
    test_progress_plain();
    test_path_normalize();
    return test_finish();
}
