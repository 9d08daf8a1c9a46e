/* tests/fuzz/fuzz_gguf.c: libFuzzer target for the GGUF reader (formats/gguf.h). Any input must
 * either be refused with a message that starts with the buffer's name, or open into a reader
 * whose every key, array element and tensor byte can be touched without leaving the buffer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "formats/gguf.h"

static volatile uint8_t g_sink;

static void touch(const void *p, uint64_t n) {
    if (!n) return;
    const uint8_t *u = p;
    g_sink ^= u[0] ^ u[n / 2] ^ u[n - 1];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qlr_gguf *g = NULL;
    if (qlr_gguf_open_mem(data, size, "fuzz.gguf", &g) != QLR_OK) {
        if (g || strncmp(qlr_error_msg(), "fuzz.gguf: ", 11) != 0) abort(); /* contract broken */
        return 0;
    }
    for (int64_t i = 0; i < qlr_gguf_n_kv(g); i++) {
        const char *key = qlr_gguf_kv_key(g, i);
        if (qlr_gguf_find_key(g, key) != i) abort(); /* keys are unique */
        const char *s;
        uint64_t len, n;
        qlr_gguf_type t = qlr_gguf_kv_type(g, i);
        if (t == QLR_GGUF_STRING) {
            if (qlr_gguf_kv_str(g, i, &s, &len) != QLR_OK) abort();
            touch(s, len);
        } else if (t == QLR_GGUF_ARRAY) {
            qlr_gguf_type et;
            const void *p;
            if (qlr_gguf_kv_arr(g, i, &et, &n, &p) != QLR_OK) abort();
            if (et == QLR_GGUF_STRING) {
                for (uint64_t k = 0; k < n; k++) {
                    if (qlr_gguf_kv_arr_str(g, i, k, &s, &len) != QLR_OK) abort();
                    touch(s, len);
                }
            } else {
                touch(p, n * qlr_gguf_scalar_size(et));
            }
        } else {
            touch(qlr_gguf_kv_scalar(g, i), qlr_gguf_scalar_size(t));
        }
    }
    uint64_t u;
    uint32_t u32;
    float f;
    double d;
    (void)qlr_gguf_get_uint(g, "llama.block_count", &u);
    (void)qlr_gguf_get_u32(g, "general.alignment", &u32);
    (void)qlr_gguf_get_f32(g, "llama.rope.freq_base", &f);
    (void)qlr_gguf_get_float(g, "llama.attention.layer_norm_rms_epsilon", &d);
    for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
        const qlr_gguf_tensor *t = qlr_gguf_tensor_at(g, i);
        if (qlr_gguf_find_tensor(g, t->name) != t) abort();
        touch(t->data, t->size);
    }
    qlr_gguf_close(g);
    return 0;
}
