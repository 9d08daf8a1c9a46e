/* tests/fuzz/fuzz_adapter.c: libFuzzer target for the LoRA adapter readers (adapters/): a PEFT
 * folder's adapter_config.json + adapter_model.safetensors, or a GGUF LoRA file. Input: byte 0
 * picks the format (bit 0: 1 = GGUF); for PEFT, bytes 1-2 (little-endian) are the config's length
 * (cut to what is there), the config follows and the rest is the safetensors image. A refusal
 * must leave no adapter and a message; an accepted adapter must have rank >= 1, both halves of
 * every module it has, finite-sized tensors that can be read whole, and must pass (or refuse
 * with a message) the shape check against a fixed base model. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "adapters/lora_internal.h"
#include "core/core.h"

static volatile float g_sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qlr_log_set_level(QLR_LOG_ERROR);
    if (size < 1) return 0;
    qlr_lora *l = NULL;
    qlr_status st;
    qlr_error_clear();
    if (data[0] & 1) {
        st = qlr_lora_load_gguf_mem_(data + 1, size - 1, "fuzz.gguf", NULL, &l);
    } else {
        size_t cfg_n = size >= 3 ? (size_t)data[1] | (size_t)data[2] << 8 : 0;
        size_t rest = size >= 3 ? size - 3 : 0;
        if (cfg_n > rest) cfg_n = rest;
        const uint8_t *cfg = data + (size >= 3 ? 3 : size);
        st = qlr_lora_load_peft_mem_(cfg, cfg_n, cfg + cfg_n, rest - cfg_n, NULL, &l);
    }
    if (st != QLR_OK) {
        QLR_ASSERT(l == NULL);
        QLR_ASSERT(qlr_error_msg()[0] != 0);
        return 0;
    }
    QLR_ASSERT(l != NULL && l->r >= 1 && l->base.n_layers >= 1);
    float acc = 0;
    for (int32_t L = 0; L < l->base.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
            if (!m) continue;
            QLR_ASSERT(m->a && m->b && m->in > 0 && m->out > 0);
            size_t na = (size_t)l->r * (size_t)m->in, nb = (size_t)m->out * (size_t)l->r;
            acc += m->a[0] + m->a[na - 1] + m->b[0] + m->b[nb - 1];
        }
    g_sink = acc;
    /* the shape check against SmolLM2-135M's layout must answer, not crash */
    qlr_lora_base b;
    memset(&b, 0, sizeof b);
    snprintf(b.arch, sizeof b.arch, "llama");
    b.n_layers = 30;
    b.d_model = 576;
    b.n_heads = 9;
    b.n_kv_heads = 3;
    b.head_dim = 64;
    b.d_ff = 1536;
    if (qlr_lora_check_base(l, &b, "fuzz") != QLR_OK) QLR_ASSERT(qlr_error_msg()[0] != 0);
    FILE *devnull = fopen("/dev/null", "w");
    if (devnull) {
        qlr_lora_print(l, devnull);
        fclose(devnull);
    }
    qlr_lora_free(l);
    return 0;
}
