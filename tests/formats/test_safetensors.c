/* tests/formats/test_safetensors.c: formats/safetensors.h — write -> read -> byte-identical
 * round trip for every common dtype (incl. a rank-0 scalar and an empty tensor), the exact
 * header layout of the reference writer, writer argument checks, a 2-shard set with an index
 * and a folder listing, and (when Python's `safetensors` and numpy are importable) that Python
 * reads our file with the same values and writes the same bytes for the same tensors. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "core/core.h"
#include "formats/safetensors.h"
#include "tests/test_util.h"

static int msg_has(const char *s) {
    if (strstr(qlr_error_msg(), s)) return 1;
    fprintf(stderr, "  message was: %s\n  expected to contain: %s\n", qlr_error_msg(), s);
    return 0;
}

/* Deterministic bytes for tensor k: byte j = (k*31 + j*7 + 3) mod 251. */
static uint8_t *make_bytes(int k, size_t n) {
    uint8_t *p = malloc(n ? n : 1);
    for (size_t j = 0; j < n; j++) p[j] = (uint8_t)((k * 31 + j * 7 + 3) % 251);
    return p;
}

typedef struct spec {
    const char *name;
    qlr_st_dtype dtype;
    uint32_t n_dims;
    uint64_t shape[4];
} spec;

static const spec k_specs[] = {
    {"f64", QLR_ST_F64, 2, {3, 2}},
    {"i64", QLR_ST_I64, 1, {5}},
    {"u64", QLR_ST_U64, 1, {2}},
    {"f32.scalar", QLR_ST_F32, 0, {0}},
    {"f32", QLR_ST_F32, 3, {2, 3, 4}},
    {"u32", QLR_ST_U32, 1, {3}},
    {"i32", QLR_ST_I32, 2, {1, 7}},
    {"bf16", QLR_ST_BF16, 2, {4, 3}},
    {"f16", QLR_ST_F16, 1, {9}},
    {"i16", QLR_ST_I16, 1, {3}},
    {"u16", QLR_ST_U16, 1, {5}},
    {"a.u8", QLR_ST_U8, 2, {3, 5}},
    {"i8", QLR_ST_I8, 1, {11}},
    {"bool", QLR_ST_BOOL, 1, {6}},
    {"f8", QLR_ST_F8_E4M3, 1, {4}},
    {"empty", QLR_ST_F32, 2, {0, 4}},
    {"f4", QLR_ST_F4, 1, {6}},
};
#define N_SPECS (sizeof(k_specs) / sizeof(k_specs[0]))

static uint64_t spec_bytes(const spec *s) {
    uint64_t n = 1;
    for (uint32_t d = 0; d < s->n_dims; d++) n *= s->shape[d];
    return n * qlr_st_dtype_bits(s->dtype) / 8;
}

static void test_dtypes(void) {
    for (int i = 0; i < QLR_ST_DTYPE_COUNT; i++) {
        qlr_st_dtype t;
        CHECK(qlr_st_dtype_parse(qlr_st_dtype_name((qlr_st_dtype)i), &t) && t == (qlr_st_dtype)i);
    }
    qlr_st_dtype t = QLR_ST_U8;
    CHECK(!qlr_st_dtype_parse("f32", &t) && t == QLR_ST_U8);
    CHECK_EQ_INT(qlr_st_dtype_bits(QLR_ST_F4), 4);
    CHECK_EQ_INT(qlr_st_dtype_bits(QLR_ST_C64), 64);
    CHECK(qlr_st_dtype_name(QLR_ST_DTYPE_COUNT) == NULL);
    for (int i = 0; i < QLR_DTYPE_COUNT; i++) {
        qlr_dtype c;
        qlr_st_dtype s = qlr_st_dtype_from_core((qlr_dtype)i);
        CHECK(qlr_st_dtype_to_core(s, &c) && c == (qlr_dtype)i);
        CHECK_EQ_INT(qlr_st_dtype_bits(s) / 8, qlr_dtype_size((qlr_dtype)i));
    }
}

static void test_round_trip(void) {
    char path[512];
    snprintf(path, sizeof(path), "%s/rt.safetensors", test_tmpdir());
    uint8_t *bufs[N_SPECS];
    qlr_st_writer *w = qlr_st_writer_create();
    CHECK(w != NULL);
    /* add in reverse so that the writer's ordering is exercised */
    for (int k = (int)N_SPECS - 1; k >= 0; k--) {
        bufs[k] = make_bytes(k, spec_bytes(&k_specs[k]));
        CHECK_OK(qlr_st_writer_add(w, k_specs[k].name, k_specs[k].dtype, k_specs[k].n_dims,
                                   k_specs[k].shape, bufs[k], spec_bytes(&k_specs[k])));
    }
    CHECK_OK(qlr_st_writer_set_metadata(w, "format", "pt"));
    CHECK_OK(qlr_st_writer_set_metadata(w, "note", "q\"uote\\ and\nnewline é"));
    CHECK_OK(qlr_st_writer_write(w, path));

    /* writer argument checks */
    uint64_t sh2[1] = {2};
    CHECK_EQ_INT(qlr_st_writer_add(w, "f32", QLR_ST_F32, 1, sh2, bufs[0], 8), QLR_ERR_INVALID);
    CHECK(msg_has("added twice"));
    CHECK_EQ_INT(qlr_st_writer_add(w, "x", QLR_ST_F32, 1, sh2, bufs[0], 7), QLR_ERR_INVALID);
    CHECK(msg_has("needs 8"));
    CHECK_EQ_INT(qlr_st_writer_add(w, "__metadata__", QLR_ST_F32, 1, sh2, bufs[0], 8), QLR_ERR_INVALID);
    CHECK_EQ_INT(qlr_st_writer_add(w, "bad\xff", QLR_ST_F32, 1, sh2, bufs[0], 8), QLR_ERR_INVALID);
    uint64_t sh3[1] = {3};
    CHECK_EQ_INT(qlr_st_writer_add(w, "f4odd", QLR_ST_F4, 1, sh3, bufs[0], 1), QLR_ERR_INVALID);
    CHECK(msg_has("whole number of bytes"));
    uint64_t big[2] = {1ull << 62, 1ull << 62};
    CHECK_EQ_INT(qlr_st_writer_add(w, "huge", QLR_ST_F32, 2, big, bufs[0], 0), QLR_ERR_INVALID);
    CHECK(msg_has("overflows"));

    qlr_safetensors *f = NULL;
    CHECK_OK(qlr_safetensors_open(path, &f));
    if (!f) return;
    CHECK_EQ_INT(qlr_safetensors_count(f), N_SPECS);
    CHECK_EQ_INT(qlr_safetensors_header_size(f) % 8, 0);
    CHECK(strcmp(qlr_safetensors_metadata(f, "format"), "pt") == 0);
    CHECK(strcmp(qlr_safetensors_metadata(f, "note"), "q\"uote\\ and\nnewline é") == 0);
    CHECK(qlr_safetensors_metadata(f, "absent") == NULL);
    CHECK_EQ_INT(qlr_safetensors_metadata_count(f), 2);
    const char *mk, *mv;
    qlr_safetensors_metadata_at(f, 0, &mk, &mv);
    CHECK(strcmp(mk, "format") == 0);

    for (size_t k = 0; k < N_SPECS; k++) {
        const spec *s = &k_specs[k];
        const qlr_st_tensor *t = qlr_safetensors_find(f, s->name);
        CHECK_MSG(t != NULL, "tensor %s missing", s->name);
        if (!t) continue;
        CHECK_EQ_INT(t->dtype, s->dtype);
        CHECK_EQ_INT(t->n_dims, s->n_dims);
        for (uint32_t d = 0; d < s->n_dims; d++) CHECK_EQ_INT(t->shape[d], s->shape[d]);
        CHECK_EQ_INT(t->nbytes, spec_bytes(s));
        CHECK_MSG(memcmp(t->data, bufs[k], t->nbytes) == 0, "tensor %s bytes differ", s->name);
        /* natural alignment relative to the (8-aligned) data buffer */
        uint32_t align = qlr_st_dtype_bits(s->dtype) / 8;
        if (align > 1) CHECK_EQ_INT(t->offset % align, 0);
        CHECK_EQ_INT(((uintptr_t)t->data) % (align ? align : 1), 0);
    }
    const qlr_st_tensor *sc = qlr_safetensors_find(f, "f32.scalar");
    CHECK(sc && sc->n_dims == 0 && sc->numel == 1 && sc->nbytes == 4);
    const qlr_st_tensor *em = qlr_safetensors_find(f, "empty");
    CHECK(em && em->numel == 0 && em->nbytes == 0);
    CHECK(qlr_safetensors_find(f, "nope") == NULL);
    CHECK(qlr_safetensors_tensor(f, N_SPECS) == NULL);
    /* file order: dtypes descending, then name */
    for (size_t i = 1; i < qlr_safetensors_count(f); i++) {
        const qlr_st_tensor *a = qlr_safetensors_tensor(f, i - 1), *b = qlr_safetensors_tensor(f, i);
        CHECK(a->offset + a->nbytes == b->offset);
        CHECK(a->dtype > b->dtype || (a->dtype == b->dtype && strcmp(a->name, b->name) < 0) ||
              (a->nbytes == 0 || b->nbytes == 0));
    }

    /* the header text is the reference writer's (compact, __metadata__ first, space padded) */
    char *h = NULL;
    size_t hn = 0;
    CHECK_OK(qlr_st_writer_header(w, &h, &hn));
    const char *want_start = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"q\\\"uote\\\\ and\\nnewline é\"},"
                             "\"u64\":{\"dtype\":\"U64\",\"shape\":[2],\"data_offsets\":[0,16]},"
                             "\"i64\":{\"dtype\":\"I64\",\"shape\":[5],\"data_offsets\":[16,56]},"
                             "\"f64\":{\"dtype\":\"F64\",\"shape\":[3,2],\"data_offsets\":[56,104]},";
    CHECK(h && hn % 8 == 0 && strncmp(h, want_start, strlen(want_start)) == 0);
    CHECK(h && memcmp(h, (const uint8_t *)qlr_safetensors_tensor(f, 0)->data - hn, hn) == 0);
    if (h) {
        size_t end = hn;
        while (end > 0 && h[end - 1] == ' ') end--;
        CHECK(end > 0 && h[end - 1] == '}' && hn - end < 8);
    }
    free(h);

    /* open_buffer over the same bytes gives the same tensors */
    char *raw = NULL;
    size_t rn = 0;
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &raw, &rn));
    qlr_safetensors *g = NULL;
    CHECK_OK(qlr_safetensors_open_buffer(raw, rn, "mem", &g));
    CHECK(g && qlr_safetensors_count(g) == N_SPECS);
    qlr_safetensors_close(g);

    /* write again from what we read: byte-identical file */
    qlr_st_writer *w2 = qlr_st_writer_create();
    for (size_t i = 0; i < qlr_safetensors_count(f); i++) {
        const qlr_st_tensor *t = qlr_safetensors_tensor(f, i);
        CHECK_OK(qlr_st_writer_add(w2, t->name, t->dtype, t->n_dims, t->shape, t->data, t->nbytes));
    }
    for (size_t i = 0; i < qlr_safetensors_metadata_count(f); i++) {
        qlr_safetensors_metadata_at(f, i, &mk, &mv);
        CHECK_OK(qlr_st_writer_set_metadata(w2, mk, mv));
    }
    char path2[512];
    snprintf(path2, sizeof(path2), "%s/rt2.safetensors", test_tmpdir());
    CHECK_OK(qlr_st_writer_write(w2, path2));
    char *raw2 = NULL;
    size_t rn2 = 0;
    CHECK_OK(qlr_file_read_all(path2, 1 << 20, &raw2, &rn2));
    CHECK(raw && raw2 && rn == rn2 && memcmp(raw, raw2, rn) == 0);
    free(raw);
    free(raw2);
    qlr_st_writer_free(w2);
    qlr_safetensors_close(f);

    /* no metadata, no tensors: "{}" padded to 8 */
    qlr_st_writer *w3 = qlr_st_writer_create();
    snprintf(path2, sizeof(path2), "%s/empty.safetensors", test_tmpdir());
    CHECK_OK(qlr_st_writer_write(w3, path2));
    CHECK_OK(qlr_file_read_all(path2, 1 << 20, &raw2, &rn2));
    CHECK(raw2 && rn2 == 16 && raw2[0] == 8 && memcmp(raw2 + 8, "{}      ", 8) == 0);
    free(raw2);
    CHECK_OK(qlr_safetensors_open(path2, &f));
    CHECK(f && qlr_safetensors_count(f) == 0);
    qlr_safetensors_close(f);
    qlr_st_writer_free(w3);

    qlr_st_writer_free(w);
    for (size_t k = 0; k < N_SPECS; k++) free(bufs[k]);
}

static void write_file(const char *path, const char *text) {
    CHECK_OK(qlr_write_atomic(path, text, strlen(text)));
}

static void test_sharded(void) {
    char dir[512], p[600];
    snprintf(dir, sizeof(dir), "%s/sharded", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(dir));
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[4] = {0x3f80, 0x4000, 0x4040, 0x4080};
    int64_t c[2] = {-1, 7};
    uint64_t sa[2] = {2, 3}, sb[1] = {4}, sc[1] = {2};

    qlr_st_writer *w = qlr_st_writer_create();
    CHECK_OK(qlr_st_writer_add(w, "model.layers.0.w", QLR_ST_F32, 2, sa, a, sizeof(a)));
    CHECK_OK(qlr_st_writer_add(w, "model.embed", QLR_ST_BF16, 1, sb, b, sizeof(b)));
    CHECK_OK(qlr_st_writer_set_metadata(w, "format", "pt"));
    snprintf(p, sizeof(p), "%s/model-00001-of-00002.safetensors", dir);
    CHECK_OK(qlr_st_writer_write(w, p));
    qlr_st_writer_free(w);
    w = qlr_st_writer_create();
    CHECK_OK(qlr_st_writer_add(w, "lm_head.x", QLR_ST_I64, 1, sc, c, sizeof(c)));
    snprintf(p, sizeof(p), "%s/model-00002-of-00002.safetensors", dir);
    CHECK_OK(qlr_st_writer_write(w, p));
    qlr_st_writer_free(w);
    snprintf(p, sizeof(p), "%s/model.safetensors.index.json", dir);
    write_file(p, "{\"metadata\": {\"total_size\": 48}, \"weight_map\": {"
                  "\"lm_head.x\": \"model-00002-of-00002.safetensors\","
                  "\"model.embed\": \"model-00001-of-00002.safetensors\","
                  "\"model.layers.0.w\": \"model-00001-of-00002.safetensors\"}}");

    /* the folder and the index itself open to the same set */
    for (int pass = 0; pass < 2; pass++) {
        qlr_st_set *s = NULL;
        CHECK_OK(qlr_st_set_open(pass ? p : dir, &s));
        if (!s) continue;
        CHECK_EQ_INT(qlr_st_set_count(s), 3);
        CHECK_EQ_INT(qlr_st_set_n_files(s), 2);
        CHECK(qlr_st_set_index_path(s) != NULL);
        const qlr_st_tensor *t = qlr_st_set_find(s, "lm_head.x");
        CHECK(t && t->file == 1 && t->dtype == QLR_ST_I64 && memcmp(t->data, c, sizeof(c)) == 0);
        t = qlr_st_set_find(s, "model.layers.0.w");
        CHECK(t && t->file == 0 && t->n_dims == 2 && t->shape[1] == 3 && memcmp(t->data, a, sizeof(a)) == 0);
        t = qlr_st_set_find(s, "model.embed");
        CHECK(t && t->file == 0 && memcmp(t->data, b, sizeof(b)) == 0);
        CHECK(qlr_st_set_find(s, "nope") == NULL);
        CHECK(strstr(qlr_safetensors_path(qlr_st_set_file(s, 1)), "00002") != NULL);
        CHECK(strcmp(qlr_safetensors_metadata(qlr_st_set_file(s, 0), "format"), "pt") == 0);
        for (size_t i = 1; i < qlr_st_set_count(s); i++)
            CHECK(qlr_st_set_tensor(s, i - 1)->file <= qlr_st_set_tensor(s, i)->file);
        qlr_st_set_close(s);
    }

    /* the summary names every tensor and ends with "valid" */
    char sum[600];
    snprintf(sum, sizeof(sum), "%s/summary.txt", test_tmpdir());
    FILE *out = fopen(sum, "w");
    CHECK_OK(qlr_safetensors_print_summary(out, dir, 1));
    fclose(out);
    char *text = NULL;
    size_t tn = 0;
    CHECK_OK(qlr_file_read_all(sum, 1 << 20, &text, &tn));
    CHECK(text && strstr(text, "model.layers.0.w") && strstr(text, "[2, 3]") && strstr(text, "lm_head.x") &&
          strstr(text, "metadata format = pt") && strstr(text, "total: 3 tensors") &&
          tn > 6 && strcmp(text + tn - 6, "valid\n") == 0);
    if (text) fputs(text, stdout);
    free(text);

    /* without the index: the folder's *.safetensors files, in name order */
    CHECK(remove(p) == 0);
    qlr_st_set *s = NULL;
    CHECK_OK(qlr_st_set_open(dir, &s));
    CHECK(s && qlr_st_set_count(s) == 3 && qlr_st_set_index_path(s) == NULL);
    qlr_st_set_close(s);

    /* a tensor name in two files is refused */
    w = qlr_st_writer_create();
    CHECK_OK(qlr_st_writer_add(w, "lm_head.x", QLR_ST_I64, 1, sc, c, sizeof(c)));
    snprintf(p, sizeof(p), "%s/extra.safetensors", dir);
    CHECK_OK(qlr_st_writer_write(w, p));
    qlr_st_writer_free(w);
    CHECK_EQ_INT(qlr_st_set_open(dir, &s), QLR_ERR_FORMAT);
    CHECK(s == NULL && msg_has("tensor \"lm_head.x\" is in both"));

    /* a single file is a set of one */
    CHECK_OK(qlr_st_set_open(p, &s));
    CHECK(s && qlr_st_set_count(s) == 1 && qlr_st_set_n_files(s) == 1);
    qlr_st_set_close(s);

    char empty[600];
    snprintf(empty, sizeof(empty), "%s/emptydir", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(empty));
    CHECK_EQ_INT(qlr_st_set_open(empty, &s), QLR_ERR_NOT_FOUND);
    snprintf(empty, sizeof(empty), "%s/nonexistent.safetensors", test_tmpdir());
    CHECK_EQ_INT(qlr_st_set_open(empty, &s), QLR_ERR_IO);
}

/* Python check: exit 0 = same values and same bytes, 1 = mismatch, 77 = not installed. */
static const char *k_py =
    "import sys\n"
    "try:\n"
    "    import numpy as np\n"
    "    from safetensors.numpy import load_file, save_file\n"
    "except Exception as e:\n"
    "    print('note:', e); sys.exit(77)\n"
    "path, out = sys.argv[1], sys.argv[2]\n"
    "specs = [('f64','<f8',[3,2]),('i64','<i8',[5]),('u64','<u8',[2]),('f32.scalar','<f4',[]),\n"
    "         ('f32','<f4',[2,3,4]),('u32','<u4',[3]),('i32','<i4',[1,7]),('f16','<f2',[9]),\n"
    "         ('i16','<i2',[3]),('u16','<u2',[5]),('a.u8','u1',[3,5]),('i8','i1',[11]),\n"
    "         ('bool','?',[6]),('empty','<f4',[0,4])]\n"
    "exp = {}\n"
    "for k, (name, dt, shape) in enumerate(specs):\n"
    "    n = int(np.prod(shape)) * np.dtype(dt).itemsize\n"
    "    raw = bytes(((k*31 + j*7 + 3) % 251) for j in range(n))\n"
    "    if dt == '?': raw = bytes(b & 1 for b in raw)\n"
    "    exp[name] = np.frombuffer(raw, dtype=dt).reshape(shape)\n"
    "got = load_file(path)\n"
    "ok = sorted(got) == sorted(exp)\n"
    "for name in exp:\n"
    "    g, e = got.get(name), exp[name]\n"
    "    if g is None or g.dtype != e.dtype or g.shape != e.shape or g.tobytes() != e.tobytes():\n"
    "        print('mismatch', name); ok = False\n"
    "save_file(exp, out, metadata={'format': 'pt'})\n"
    "if open(out, 'rb').read() != open(path, 'rb').read():\n"
    "    print('python wrote different bytes'); ok = False\n"
    "sys.exit(0 if ok else 1)\n";

static void test_python(void) {
    /* the dtypes numpy has, same byte pattern as make_bytes (bools as 0/1) */
    static const char *names[] = {"f64", "i64", "u64", "f32.scalar", "f32", "u32", "i32",
                                  "f16", "i16", "u16", "a.u8", "i8", "bool", "empty"};
    char path[512], out[512], py[512], cmd[2048];
    snprintf(path, sizeof(path), "%s/py.safetensors", test_tmpdir());
    snprintf(out, sizeof(out), "%s/py_out.safetensors", test_tmpdir());
    snprintf(py, sizeof(py), "%s/check.py", test_tmpdir());
    qlr_st_writer *w = qlr_st_writer_create();
    uint8_t *bufs[16] = {0};
    for (int k = 0; k < 14; k++) {
        const spec *s = NULL;
        for (size_t i = 0; i < N_SPECS; i++)
            if (strcmp(k_specs[i].name, names[k]) == 0) s = &k_specs[i];
        QLR_ASSERT(s != NULL);
        uint64_t n = spec_bytes(s);
        bufs[k] = make_bytes(k, n);
        if (s->dtype == QLR_ST_BOOL)
            for (uint64_t j = 0; j < n; j++) bufs[k][j] &= 1;
        CHECK_OK(qlr_st_writer_add(w, s->name, s->dtype, s->n_dims, s->shape, bufs[k], n));
    }
    CHECK_OK(qlr_st_writer_set_metadata(w, "format", "pt"));
    CHECK_OK(qlr_st_writer_write(w, path));
    qlr_st_writer_free(w);
    for (int k = 0; k < 14; k++) free(bufs[k]);
    CHECK_OK(qlr_write_atomic(py, k_py, strlen(k_py)));
    snprintf(cmd, sizeof(cmd), "python3 '%s' '%s' '%s'", py, path, out);
    int rc = system(cmd);
    int code = (rc != -1 && WIFEXITED(rc)) ? WEXITSTATUS(rc) : -1;
    if (code == 77 || code == 127) {
        printf("note: python3 with safetensors+numpy not available; skipped the Python interop check\n");
        return;
    }
    CHECK_MSG(code == 0, "python safetensors check failed (exit %d)", code);
    if (code == 0) printf("python safetensors: same values, same bytes\n");
}

int main(void) {
    test_dtypes();
    test_round_trip();
    test_sharded();
    test_python();
    return test_finish();
}
