/* cli/cmd_export_base.c: `qlora export-base -m MODEL --format gguf|hf [--type T] -o PATH`: loads a
 * base model into the NF4 store and writes the weights exactly as qlora runs them (NF4
 * dequantized). gguf: one llama.cpp GGUF (model/export_gguf.h: llama.cpp's names, shapes and Q/K
 * order, the source's tokenizer and chat template, the NF4 scale state so that qlora reloads the
 * very store), for llama.cpp and Ollama to run the weights an adapter was trained against. hf:
 * HF-named f32 safetensors + config.json, the input of tests/tools/golden_make.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/core.h"
#include "model/export_gguf.h"
#include "model/model.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora export-base -m MODEL [--format gguf|hf] [--type TYPE] -o PATH [--layers N]\n\n"
            "Writes the base model as qlora runs it: decoder linears dequantized from the NF4 store\n"
            "(double quant), embeddings as their bf16 values, norms f32.\n\n"
            "  --format gguf   one .gguf file for llama.cpp / Ollama: llama.cpp's tensor names, shapes\n"
            "                  and Q/K row order, every metadata key of the source GGUF (tokenizer,\n"
            "                  chat template) and qlora.nf4.* (the NF4 scale state and the store's\n"
            "                  hash: qlora reloads this file to the very same NF4 store, and an adapter\n"
            "                  trained on MODEL finds its base). The default when PATH ends in .gguf.\n"
            "  --format hf     HF-named f32 PATH/model.safetensors + PATH/config.json (Q/K in HF order),\n"
            "                  the input of the golden reference (tests/tools/golden_make.py). The\n"
            "                  default otherwise.\n"
            "  --type TYPE     gguf: f32, f16 (default), bf16 or q8_0 for the 2-D weights (norms stay\n"
            "                  f32); f32 holds the NF4 values exactly, f16 within 2^-11\n"
            "  -m, --model PATH  model .gguf (default: the demo model) or HF folder (--format hf only)\n"
            "  -o, --out PATH    output file (gguf) or folder (hf, created)\n"
            "      --layers N    hf: export only the first N decoder layers\n"
            "  -q, --quiet       no summary\n\n"
            "exit status: 0 written, 1 error, 2 usage error\n");
}

static int cmd_export_base(int argc, char **argv) {
    const char *cmd = "export-base";
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *model = NULL, *out = NULL, *fmt = NULL, *type_s = NULL;
    int layers = 0, quiet = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            quiet = 1;
            continue;
        }
        if (i + 1 >= argc) return qlr_cli_usage_error(cmd, "unknown or incomplete argument '%s'", a);
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) model = argv[++i];
        else if (!strcmp(a, "-o") || !strcmp(a, "--out") || !strcmp(a, "--output")) out = argv[++i];
        else if (!strcmp(a, "--format") || !strcmp(a, "-f")) fmt = argv[++i];
        else if (!strcmp(a, "--type") || !strcmp(a, "-t")) type_s = argv[++i];
        else if (!strcmp(a, "--layers")) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 1 || v > 1024) return qlr_cli_usage_error(cmd, "--layers: '%s'", argv[i]);
            layers = (int)v;
        } else return qlr_cli_usage_error(cmd, "unknown argument '%s'", a);
    }
    if (!out) return qlr_cli_usage_error(cmd, "-o PATH is required");
    size_t ol = strlen(out);
    int gguf = ol > 5 && !strcmp(out + ol - 5, ".gguf");
    if (fmt && !strcmp(fmt, "gguf")) gguf = 1;
    else if (fmt && !strcmp(fmt, "hf")) gguf = 0;
    else if (fmt) return qlr_cli_usage_error(cmd, "--format %s: expected gguf or hf", fmt);
    qlr_export_gguf_params gp = qlr_export_gguf_params_default();
    if (type_s) {
        if (!gguf) return qlr_cli_usage_error(cmd, "--type is for --format gguf (hf is always f32)");
        if (qlr_export_type_parse(type_s, &gp.type) != QLR_OK || gp.type > QLR_EXPORT_Q8_0)
            return qlr_cli_usage_error(cmd, "--type %s: expected f32, f16, bf16 or q8_0", type_s);
    }
    if (gguf && layers) return qlr_cli_usage_error(cmd, "--layers is for --format hf");
    if (!model) model = qlr_cli_demo_model();
    qlr_backend *be = NULL;
    qlr_model *m = NULL;
    int rc = 1;
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.max_layers = layers;
    lp.progress = !quiet;
    if (qlr_backend_create("cpu", 0, &be) != QLR_OK || qlr_model_load(model, be, &lp, &m) != QLR_OK) goto done;
    if (!gguf) {
        if (qlr_model_export_hf(m, out) != QLR_OK) goto done;
        if (!quiet)
            fprintf(stderr, "wrote %s/model.safetensors and %s/config.json (%d layers)\n", out, out, m->cfg.n_layers);
        rc = 0;
        goto done;
    }
    gp.nf4_state = 1;
    gp.progress = !quiet;
    qlr_export_stats stats;
    if (qlr_model_export_gguf(m, out, &gp, &stats) != QLR_OK) goto done;
    if (!quiet) {
        char hex[17];
        qlr_model_hash_hex(m->nf4_hash, hex);
        printf("wrote %s: %s, %lld tensors, %.1f MiB, nf4 %s\n", out, qlr_export_type_name(gp.type),
               (long long)stats.n_tensors, (double)stats.bytes / (1 << 20), hex);
        printf("  llama.cpp: llama-cli -m %s (add --lora ADAPTER.gguf for an adapter trained on %s)\n", out, model);
    }
    rc = 0;
done:
    if (rc) qlr_cli_fail(cmd);
    qlr_model_free(m);
    qlr_backend_free(be);
    return rc;
}

const qlr_cli_cmd qlr_cmd_export_base = {"export-base",
                                         "write the base model as qlora runs it (NF4 dequantized): GGUF or HF",
                                         cmd_export_base};
