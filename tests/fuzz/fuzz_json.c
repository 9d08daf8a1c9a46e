/* tests/fuzz/fuzz_json.c: libFuzzer target for formats/json.h. Parses the input with
 * qlr_json_load_buffer; when it is accepted, runs the typed getters over the keys an HF
 * config and an HTTP body would ask for, and the Python-style pretty writer, whose output
 * must parse back to an equal value (reals compare by value, so it must round-trip). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/core.h"
#include "formats/json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    json_t *v = NULL;
    if (qlr_json_load_buffer("fuzz.json", data, size, &v) != QLR_OK) {
        QLR_ASSERT(v == NULL);
        return 0;
    }
    static const char *keys[] = {"hidden_size", "rope_scaling.factor", "model", "messages",
                                 "max_tokens", "stream", "a.b.c", "weight_map", ""};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        int64_t iv;
        double dv;
        int bv;
        const char *sv;
        json_t *ov;
        (void)qlr_json_get_int_opt(v, "fuzz.json", keys[i], 0, &iv);
        (void)qlr_json_get_double(v, "fuzz.json", keys[i], &dv);
        (void)qlr_json_get_bool_opt(v, "fuzz.json", keys[i], 0, &bv);
        (void)qlr_json_get_string(v, "fuzz.json", keys[i], &sv);
        (void)qlr_json_get_object_opt(v, "fuzz.json", keys[i], &ov);
        (void)qlr_json_get_array(v, "fuzz.json", keys[i], &ov);
    }
    char *text = NULL;
    size_t n = 0;
    if (qlr_json_dump_pretty(v, &text, &n) == QLR_OK) {
        json_t *back = NULL;
        QLR_ASSERT(qlr_json_load_buffer("fuzz.json (rewritten)", text, n, &back) == QLR_OK);
        QLR_ASSERT(json_equal(v, back));
        json_decref(back);
        free(text);
    }
    json_decref(v);
    return 0;
}
