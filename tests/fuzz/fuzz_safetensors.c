/* tests/fuzz/fuzz_safetensors.c: libFuzzer target for the safetensors reader. Feeds the input
 * to qlr_safetensors_open_buffer (the same validation qlr_safetensors_open runs on a mapped
 * file); when it is accepted, touches every tensor's bytes and re-serializes it through the
 * writer's header builder so that the accepted shapes, names and metadata are exercised too. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/core.h"
#include "formats/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qlr_safetensors *f = NULL;
    if (qlr_safetensors_open_buffer(data, size, "fuzz.safetensors", &f) != QLR_OK) {
        QLR_ASSERT(f == NULL);
        QLR_ASSERT(qlr_error_msg()[0] != 0);
        return 0;
    }
    qlr_st_writer *w = qlr_st_writer_create();
    uint8_t acc = 0;
    for (size_t i = 0; i < qlr_safetensors_count(f); i++) {
        const qlr_st_tensor *t = qlr_safetensors_tensor(f, i);
        QLR_ASSERT(t->offset + t->nbytes <= size);
        const uint8_t *p = t->data;
        for (uint64_t j = 0; j < t->nbytes; j++) acc ^= p[j];
        QLR_ASSERT(qlr_safetensors_find(f, t->name) != NULL);
        if (w) QLR_ASSERT(qlr_st_writer_add(w, t->name, t->dtype, t->n_dims, t->shape, t->data, t->nbytes) == QLR_OK);
    }
    for (size_t i = 0; i < qlr_safetensors_metadata_count(f); i++) {
        const char *k, *v;
        qlr_safetensors_metadata_at(f, i, &k, &v);
        QLR_ASSERT(qlr_safetensors_metadata(f, k) == v);
        if (w) (void)qlr_st_writer_set_metadata(w, k, v);
    }
    if (w) {
        char *h = NULL;
        size_t n = 0;
        if (qlr_st_writer_header(w, &h, &n) == QLR_OK) {
            QLR_ASSERT(n % 8 == 0);
            free(h);
        }
        qlr_st_writer_free(w);
    }
    (void)acc;
    qlr_safetensors_close(f);
    return 0;
}
