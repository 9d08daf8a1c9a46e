/* tests/formats/test_gguf_py.c: interoperability with gguf-py (llama.cpp's Python reader). Writes
 * the sample file with our writer (default and custom alignment), lists it with our reader and
 * with tests/formats/test_gguf_py.py, and requires identical listings: same header, keys, types,
 * raw value bytes, tensor names, types, shapes, offsets, sizes and data checksums. Skipped (exit
 * 77) when the `gguf` package is not importable by QLR_PYTHON3. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "tests/formats/test_gguf_sample.h"
#include "tests/test_util.h"

static void sb_hex(qlr_strbuf *b, const void *p, uint64_t n) {
    const uint8_t *u = p;
    if (!n) qlr_strbuf_printf(b, " -");
    else qlr_strbuf_printf(b, " ");
    for (uint64_t i = 0; i < n; i++) qlr_strbuf_printf(b, "%02x", u[i]);
}

/* Our reader's listing in the format of test_gguf_py.py. */
static void list_ours(const qlr_gguf *g, qlr_strbuf *b) {
    qlr_strbuf_printf(b, "header %u %u %" PRIu64 "\n", qlr_gguf_version(g), qlr_gguf_alignment(g), qlr_gguf_data_offset(g));
    for (int64_t i = 0; i < qlr_gguf_n_kv(g); i++) {
        qlr_gguf_type t = qlr_gguf_kv_type(g, i);
        qlr_strbuf_printf(b, "kv %s %s", qlr_gguf_kv_key(g, i), qlr_gguf_type_name(t));
        const char *s;
        uint64_t len, n;
        if (t == QLR_GGUF_STRING) {
            qlr_gguf_kv_str(g, i, &s, &len);
            sb_hex(b, s, len);
        } else if (t == QLR_GGUF_ARRAY) {
            qlr_gguf_type et;
            const void *data;
            qlr_gguf_kv_arr(g, i, &et, &n, &data);
            qlr_strbuf_printf(b, " %s %" PRIu64, qlr_gguf_type_name(et), n);
            for (uint64_t k = 0; k < n; k++) {
                if (et == QLR_GGUF_STRING) {
                    qlr_gguf_kv_arr_str(g, i, k, &s, &len);
                    sb_hex(b, s, len);
                } else {
                    uint32_t sz = qlr_gguf_scalar_size(et);
                    sb_hex(b, (const uint8_t *)data + k * sz, sz);
                }
            }
        } else {
            sb_hex(b, qlr_gguf_kv_scalar(g, i), qlr_gguf_scalar_size(t));
        }
        qlr_strbuf_printf(b, "\n");
    }
    for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
        const qlr_gguf_tensor *t = qlr_gguf_tensor_at(g, i);
        qlr_strbuf_printf(b, "tensor %s %u", t->name, t->type);
        for (uint32_t d = 0; d < t->n_dims; d++) qlr_strbuf_printf(b, " %" PRIu64, t->ne[d]);
        qlr_strbuf_printf(b, " %" PRIu64 " %" PRIu64 " %08x\n", qlr_gguf_data_offset(g) + t->offset, t->size,
                  qlr_crc32(0, t->data, t->size));
    }
}

/* Runs the Python lister; returns its exit status (77 = gguf-py missing), output in *out. */
static int list_python(const char *path, qlr_strbuf *out) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' '%s/tests/formats/test_gguf_py.py' '%s' 2>&1", QLR_PYTHON3, QLR_SOURCE_DIR, path);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, p)) > 0) qlr_strbuf_printf(out, "%.*s", (int)k, buf);
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Returns 77 when gguf-py is missing, else 0. */
static int compare(uint32_t alignment) {
    char path[512];
    snprintf(path, sizeof path, "%s/py_sample_%u.gguf", test_tmpdir(), alignment);
    qlr_gguf_writer *w = qlr_gguf_writer_create(alignment);
    CHECK_OK(gguf_sample_fill(w));
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);
    qlr_gguf *g = NULL;
    CHECK_OK(qlr_gguf_open(path, &g));
    if (!g) return 0;
    qlr_strbuf ours = {0}, theirs = {0};
    list_ours(g, &ours);
    qlr_gguf_close(g);
    int rc = list_python(path, &theirs);
    if (rc == 77) {
        printf("SKIP: %s", theirs.p ? theirs.p : "gguf-py not importable\n");
        free(ours.p);
        free(theirs.p);
        return 77;
    }
    CHECK_MSG(rc == 0, "gguf-py reader failed (exit %d):\n%s", rc, theirs.p ? theirs.p : "");
    int same = theirs.p && ours.p && !strcmp(ours.p, theirs.p);
    CHECK_MSG(same, "listings differ (alignment %u)\n--- ours ---\n%s--- gguf-py ---\n%s", alignment, ours.p,
              theirs.p ? theirs.p : "");
    if (same) printf("alignment %u: gguf-py lists the same keys, values and tensors\n", alignment);
    free(ours.p);
    free(theirs.p);
    return 0;
}

int main(void) {
    if (compare(0) == 77) return 77;
    compare(64);
    return test_finish();
}
