/* tests/formats/test_gguf.c: GGUF writer -> reader round trips (every metadata type, several
 * tensor types, default and custom alignment), the writer's layout promises (dense aligned
 * offsets, zero padding after every tensor, general.alignment only when non-default), a
 * byte-identical rewrite through qlr_gguf_copy_kv, typed getters and writer argument errors. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "tests/formats/test_gguf_sample.h"
#include "tests/test_util.h"

static int contains(const char *hay, const char *needle) { return strstr(hay, needle) != NULL; }

static void check_sample_values(const qlr_gguf *g) {
    uint32_t u32 = 0;
    int32_t i32 = 0;
    uint64_t u = 0, n = 0, len = 0;
    float f = 0;
    double d = 0;
    int b = 0;
    const char *s = NULL;
    CHECK_OK(qlr_gguf_get_u32(g, "t.u32", &u32));
    CHECK_EQ_INT(u32, 4000000000u);
    CHECK_OK(qlr_gguf_get_i32(g, "t.i32", &i32));
    CHECK_EQ_INT(i32, -2000000000);
    CHECK_OK(qlr_gguf_get_uint(g, "t.u8", &u));
    CHECK_EQ_INT(u, 200);
    CHECK_OK(qlr_gguf_get_uint(g, "t.u16", &u));
    CHECK_EQ_INT(u, 60000);
    CHECK_OK(qlr_gguf_get_uint(g, "t.u64", &u));
    CHECK(u == 1ull << 60);
    CHECK(qlr_gguf_get_uint(g, "t.i8", &u) == QLR_ERR_RANGE);
    CHECK(contains(qlr_error_msg(), "t.i8"));
    CHECK_OK(qlr_gguf_get_f32(g, "t.f32", &f));
    CHECK(f == 1.5f);
    CHECK_OK(qlr_gguf_get_float(g, "t.f32", &d));
    CHECK(d == 1.5);
    CHECK_OK(qlr_gguf_get_float(g, "t.f64", &d));
    CHECK(d == 3.25);
    CHECK_OK(qlr_gguf_get_bool(g, "t.bool", &b));
    CHECK_EQ_INT(b, 1);
    CHECK_OK(qlr_gguf_get_str(g, "t.str", &s, &len));
    CHECK(len == strlen("h\xc3\xa9llo\nworld \"quoted\"") && !memcmp(s, "h\xc3\xa9llo\nworld \"quoted\"", len));
    CHECK_OK(qlr_gguf_get_str(g, "t.str_empty", &s, &len));
    CHECK_EQ_INT(len, 0);
    const void *scalar = qlr_gguf_kv_scalar(g, qlr_gguf_find_key(g, "t.i16"));
    int16_t i16;
    memcpy(&i16, scalar, 2);
    CHECK_EQ_INT(i16, -30000);
    scalar = qlr_gguf_kv_scalar(g, qlr_gguf_find_key(g, "t.i64"));
    int64_t i64;
    memcpy(&i64, scalar, 8);
    CHECK(i64 == -(1ll << 60));

    /* wrong types and missing keys */
    CHECK(qlr_gguf_get_u32(g, "t.i32", &u32) == QLR_ERR_FORMAT);
    CHECK(contains(qlr_error_msg(), "t.i32") && contains(qlr_error_msg(), "INT32") &&
          contains(qlr_error_msg(), "wanted UINT32"));
    CHECK(qlr_gguf_get_f32(g, "t.f64", &f) == QLR_ERR_FORMAT);
    CHECK(qlr_gguf_get_u32(g, "no.such.key", &u32) == QLR_ERR_NOT_FOUND);
    CHECK(contains(qlr_error_msg(), "no.such.key"));
    CHECK(qlr_gguf_find_key(g, "no.such.key") == -1);

    /* arrays */
    qlr_gguf_type et;
    const void *data;
    CHECK_OK(qlr_gguf_get_arr(g, "a.u32", &et, &n, &data));
    CHECK(et == QLR_GGUF_UINT32 && n == 4);
    uint32_t au32[4];
    memcpy(au32, data, sizeof au32);
    CHECK(au32[0] == 1 && au32[3] == 0xFFFFFFFFu);
    CHECK_OK(qlr_gguf_get_arr(g, "a.i64", &et, &n, &data));
    int64_t ai64[2];
    memcpy(ai64, data, sizeof ai64);
    CHECK(et == QLR_GGUF_INT64 && n == 2 && ai64[0] == INT64_MIN && ai64[1] == INT64_MAX);
    CHECK_OK(qlr_gguf_get_arr(g, "a.f64", &et, &n, &data));
    double af64[2];
    memcpy(af64, data, sizeof af64);
    CHECK(et == QLR_GGUF_FLOAT64 && af64[0] == -0.25 && af64[1] == 1e300);
    CHECK_OK(qlr_gguf_get_arr(g, "a.empty", &et, &n, &data));
    CHECK(et == QLR_GGUF_UINT32 && n == 0);
    CHECK_OK(qlr_gguf_get_arr(g, "a.str", &et, &n, NULL));
    CHECK(et == QLR_GGUF_STRING && n == 4);
    CHECK_OK(qlr_gguf_get_arr_str(g, "a.str", 2, &s, &len));
    CHECK(len == 5 && !memcmp(s, "\xc4\xa0the", 5));
    CHECK_OK(qlr_gguf_get_arr_str(g, "a.str", 1, &s, &len));
    CHECK_EQ_INT(len, 0);
    CHECK_OK(qlr_gguf_get_arr_str(g, "a.str", 3, &s, &len));
    CHECK(len == 3 && !memcmp(s, "a b", 3));
    CHECK(qlr_gguf_get_arr_str(g, "a.str", 4, &s, &len) == QLR_ERR_RANGE);
    CHECK(qlr_gguf_get_arr_str(g, "a.u32", 0, &s, &len) == QLR_ERR_FORMAT);
    CHECK(qlr_gguf_get_arr(g, "t.u32", &et, &n, &data) == QLR_ERR_FORMAT);
}

/* Layout promises of the writer, checked on the raw bytes. */
static void check_layout(const qlr_gguf *g, const uint8_t *file, uint64_t size) {
    uint64_t a = qlr_gguf_alignment(g), expect = 0;
    CHECK(qlr_gguf_data_offset(g) % a == 0);
    for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
        const qlr_gguf_tensor *t = qlr_gguf_tensor_at(g, i);
        CHECK(t->offset == expect);
        uint64_t padded = (t->size + a - 1) / a * a;
        const uint8_t *pad = file + qlr_gguf_data_offset(g) + t->offset + t->size;
        int zero = 1;
        for (uint64_t k = 0; k < padded - t->size; k++) zero &= pad[k] == 0;
        CHECK_MSG(zero, "padding after tensor %s is not zero", t->name);
        expect += padded;
    }
    CHECK_MSG(size == qlr_gguf_data_offset(g) + expect, "file size %llu, expected %llu (padding after the last tensor)",
              (unsigned long long)size, (unsigned long long)(qlr_gguf_data_offset(g) + expect));
}

static void round_trip(uint32_t alignment) {
    char path[512], path2[512];
    snprintf(path, sizeof path, "%s/sample_%u.gguf", test_tmpdir(), alignment);
    snprintf(path2, sizeof path2, "%s/sample_%u_copy.gguf", test_tmpdir(), alignment);
    qlr_gguf_writer *w = qlr_gguf_writer_create(alignment);
    CHECK(w != NULL);
    if (!w) return;
    CHECK_OK(gguf_sample_fill(w));
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);

    qlr_gguf *g = NULL;
    CHECK_OK(qlr_gguf_open(path, &g));
    if (!g) return;
    uint32_t want_align = alignment ? alignment : 32;
    CHECK_EQ_INT(qlr_gguf_version(g), 3);
    CHECK_EQ_INT(qlr_gguf_alignment(g), want_align);
    int64_t ai = qlr_gguf_find_key(g, "general.alignment");
    if (want_align == 32) {
        CHECK_MSG(ai == -1, "general.alignment written although the alignment is the default");
    } else {
        uint32_t v = 0;
        CHECK(ai == 0);
        CHECK_OK(qlr_gguf_get_u32(g, "general.alignment", &v));
        CHECK_EQ_INT(v, want_align);
    }
    CHECK_EQ_INT(qlr_gguf_n_kv(g), 28 + (want_align != 32));
    CHECK_EQ_INT(qlr_gguf_n_tensors(g), 9);
    check_sample_values(g);

    /* the same bytes through open_mem */
    size_t size = 0;
    char *bytes = NULL;
    CHECK_OK(qlr_file_read_all(path, 1 << 24, &bytes, &size));
    check_layout(g, (const uint8_t *)bytes, size);
    qlr_gguf *gm = NULL;
    CHECK_OK(qlr_gguf_open_mem(bytes, size, "mem.gguf", &gm));
    if (gm) {
        CHECK(!strcmp(qlr_gguf_path(gm), "mem.gguf"));
        CHECK_EQ_INT(qlr_gguf_n_tensors(gm), 9);
        check_sample_values(gm);
    }

    /* tensors: metadata and bytes */
    const qlr_gguf_tensor *t = qlr_gguf_find_tensor(g, "blk.0.ffn_down.weight");
    CHECK(t && t->type == QLR_GGML_Q6_K && t->n_dims == 2 && t->ne[0] == 256 && t->ne[1] == 2 && t->ne[2] == 1 &&
          t->size == 2 * 210);
    t = qlr_gguf_find_tensor(g, "blk.0.ffn_norm.weight");
    CHECK(t && t->type == QLR_GGML_BF16 && t->n_dims == 3 && t->size == 16);
    t = qlr_gguf_find_tensor(g, "blk.0.positions");
    CHECK(t && t->n_dims == 4 && t->size == 20);
    CHECK(qlr_gguf_find_tensor(g, "missing") == NULL);

    /* rewrite through copy_kv + add_tensor: the file must come out byte-identical */
    qlr_gguf_writer *w2 = qlr_gguf_writer_create(alignment);
    for (int64_t i = 0; i < qlr_gguf_n_kv(g); i++) CHECK_OK(qlr_gguf_copy_kv(w2, g, i));
    for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
        const qlr_gguf_tensor *ti = qlr_gguf_tensor_at(g, i);
        CHECK_OK(qlr_gguf_add_tensor(w2, ti->name, ti->type, ti->n_dims, ti->ne, ti->data, ti->size));
        if (gm) CHECK(!memcmp(ti->data, qlr_gguf_tensor_at(gm, i)->data, ti->size));
    }
    CHECK_OK(qlr_gguf_writer_write(w2, path2));
    qlr_gguf_writer_free(w2);
    size_t size2 = 0;
    char *bytes2 = NULL;
    CHECK_OK(qlr_file_read_all(path2, 1 << 24, &bytes2, &size2));
    CHECK_MSG(size2 == size && bytes2 && !memcmp(bytes, bytes2, size), "rewritten file differs from the original");
    free(bytes2);
    qlr_gguf_close(gm);
    free(bytes);
    qlr_gguf_close(g);
}

static void writer_errors(void) {
    qlr_gguf_writer *w = qlr_gguf_writer_create(0);
    float data[8] = {0};
    uint64_t ne[2] = {8, 1};
    CHECK_OK(qlr_gguf_set_u32(w, "k", 1));
    CHECK(qlr_gguf_set_u32(w, "k", 2) == QLR_ERR_INVALID);
    CHECK(contains(qlr_error_msg(), "'k'"));
    CHECK(qlr_gguf_set_str(w, "", "x") == QLR_ERR_INVALID);
    CHECK(qlr_gguf_set_u32(w, "general.alignment", 64) == QLR_ERR_INVALID);
    CHECK_OK(qlr_gguf_set_u32(w, "general.alignment", 32)); /* managed: accepted, not written */
    CHECK(qlr_gguf_set_arr(w, "arr", QLR_GGUF_STRING, data, 1) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_set_scalar(w, "sc", QLR_GGUF_ARRAY, data) == QLR_ERR_INVALID);
    CHECK_OK(qlr_gguf_add_tensor(w, "t", QLR_GGML_F32, 2, ne, data, sizeof data));
    CHECK(qlr_gguf_add_tensor(w, "t", QLR_GGML_F32, 2, ne, data, sizeof data) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_add_tensor(w, "u", QLR_GGML_F32, 2, ne, data, 4) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_add_tensor(w, "u", QLR_GGML_Q4_0, 2, ne, data, 4) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_add_tensor(w, "u", 4, 2, ne, data, 32) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_add_tensor(w, "u", QLR_GGML_F32, 0, ne, data, 32) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_add_tensor(w, "u", QLR_GGML_F32, 5, ne, data, 32) == QLR_ERR_INVALID);
    CHECK(qlr_gguf_add_tensor(w, "0123456789012345678901234567890123456789012345678901234567890123", QLR_GGML_F32, 2, ne,
                              data, 32) == QLR_ERR_INVALID);
    char path[512];
    snprintf(path, sizeof path, "%s/no_such_dir/x.gguf", test_tmpdir());
    CHECK(qlr_gguf_writer_write(w, path) == QLR_ERR_IO);
    qlr_gguf_writer_free(w);
    CHECK(qlr_gguf_writer_create(48) == NULL);

    qlr_gguf *g = NULL;
    snprintf(path, sizeof path, "%s/missing.gguf", test_tmpdir());
    CHECK(qlr_gguf_open(path, &g) == QLR_ERR_IO && g == NULL);
    CHECK(contains(qlr_error_msg(), path));
}

static void tables(void) {
    CHECK(!strcmp(qlr_ggml_type_name(QLR_GGML_Q4_K), "Q4_K"));
    CHECK_EQ_INT(qlr_ggml_block_elems(4), 0);
    CHECK_EQ_INT(qlr_ggml_block_elems(QLR_GGML_Q6_K), 256);
    CHECK_EQ_INT(qlr_ggml_block_bytes(QLR_GGML_Q6_K), 210);
    CHECK_EQ_INT(qlr_ggml_block_bytes(QLR_GGML_Q4_1), 20);
    CHECK_EQ_INT(qlr_ggml_block_bytes(QLR_GGML_Q5_K), 176);
    CHECK(!strcmp(qlr_gguf_type_name(QLR_GGUF_FLOAT64), "FLOAT64"));
    CHECK(qlr_gguf_type_name(13) == NULL);
    CHECK_EQ_INT(qlr_gguf_scalar_size(QLR_GGUF_INT16), 2);
    CHECK_EQ_INT(qlr_gguf_scalar_size(QLR_GGUF_STRING), 0);
}

int main(void) {
    tables();
    round_trip(0);
    round_trip(64);
    round_trip(1);
    writer_errors();
    return test_finish();
}
