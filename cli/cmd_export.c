/* cli/cmd_export.c: `qlora export RUN_OR_ADAPTER --format gguf|peft -o PATH [-m BASE_MODEL]`.
 * Reads an adapter (a training run's final adapter or latest checkpoint, a PEFT folder or a GGUF
 * LoRA file; adapters/lora.h qlr_lora_resolve) and writes it as a GGUF LoRA for llama.cpp /
 * Ollama or as a PEFT folder for HF PEFT / vLLM. With -m the adapter is checked against that base
 * model, which also supplies what a foreign file lacks (architecture, head layout). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora.h"
#include "cli/cli.h"
#include "core/core.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora export RUN_OR_ADAPTER --format gguf|peft -o PATH [-m BASE_MODEL]\n\n"
            "Converts a LoRA adapter between formats.\n\n"
            "RUN_OR_ADAPTER is one of\n"
            "  a training run folder (output_dir): its adapter/ (final), else the adapter/ of its\n"
            "      latest complete checkpoint-N/ (the trainer saves adapters as PEFT folders\n"
            "      there; a checkpoint without its manifest.json is skipped)\n"
            "  a PEFT folder (adapter_config.json + adapter_model.safetensors)\n"
            "  a GGUF LoRA file (general.type = adapter)\n\n"
            "  --format gguf    one .gguf file as llama.cpp reads it (--lora / --lora-scaled, Ollama\n"
            "                   ADAPTER): F32 lora_a/lora_b, Q/K lora_b rows permuted for llama.cpp's\n"
            "                   RoPE; with rsLoRA, adapter.lora.alpha = alpha*sqrt(r) so that llama.cpp's\n"
            "                   alpha/r equals alpha/sqrt(r)\n"
            "  --format peft    a folder with adapter_config.json + adapter_model.safetensors (HF PEFT,\n"
            "                   vLLM); created if missing\n"
            "  -o, --output PATH     where to write\n"
            "  -m, --model BASE      base model (GGUF or HF folder): checks the adapter's shapes against\n"
            "                        it and supplies the architecture/head layout a foreign file lacks\n"
            "  -q, --quiet           no summary line\n\n"
            "exit status: 0 written, 1 error, 2 usage error\n");
}

static int cmd_export(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *in = NULL, *fmt = NULL, *outp = NULL, *model = NULL;
    int quiet = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **dst = NULL;
        if (!strcmp(a, "--format") || !strcmp(a, "-f")) dst = &fmt;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) dst = &outp;
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) dst = &model;
        else if (!strncmp(a, "--format=", 9)) fmt = a + 9;
        else if (!strncmp(a, "--output=", 9)) outp = a + 9;
        else if (!strncmp(a, "--model=", 8)) model = a + 8;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (a[0] == '-' && a[1]) return qlr_cli_usage_error("export", "unknown option '%s'", a);
        else if (in) return qlr_cli_usage_error("export", "one input only (got '%s' and '%s')", in, a);
        else in = a;
        if (dst) {
            if (i + 1 >= argc) return qlr_cli_usage_error("export", "%s needs a value", a);
            *dst = argv[++i];
        }
    }
    if (!in) return qlr_cli_usage_error("export", "missing RUN_OR_ADAPTER (a run folder, PEFT folder or .gguf)");
    if (!fmt) return qlr_cli_usage_error("export", "missing --format gguf|peft");
    int gguf;
    if (!strcmp(fmt, "gguf")) gguf = 1;
    else if (!strcmp(fmt, "peft")) gguf = 0;
    else return qlr_cli_usage_error("export", "--format %s: expected gguf or peft", fmt);
    if (!outp) return qlr_cli_usage_error("export", "missing -o PATH");

    qlr_lora_base base;
    if (model && qlr_lora_base_from_model(model, &base) != QLR_OK) return qlr_cli_fail("export");
    char *src = NULL;
    int src_gguf = 0;
    if (qlr_lora_resolve(in, &src, &src_gguf) != QLR_OK) return qlr_cli_fail("export");
    qlr_lora *l = NULL;
    qlr_status st = src_gguf ? qlr_lora_load_gguf(src, model ? &base : NULL, &l)
                             : qlr_lora_load_peft(src, model ? &base : NULL, &l);
    if (st == QLR_OK) st = gguf ? qlr_lora_save_gguf(l, outp) : qlr_lora_save_peft(l, outp);
    int rc = 0;
    if (st != QLR_OK) {
        rc = qlr_cli_fail("export");
    } else if (!quiet) {
        printf("read %s (%s)\n", src, src_gguf ? "gguf" : "peft");
        printf("  ");
        qlr_lora_print(l, stdout);
        if (gguf && l->use_rslora)
            printf("  rsLoRA: adapter.lora.alpha written as alpha*sqrt(r) = %g so llama.cpp's alpha/r = %g\n",
                   l->alpha * sqrt((double)l->r), (double)l->scale);
        printf("wrote %s (%s)\n", outp, gguf ? "gguf" : "peft");
    }
    qlr_lora_free(l);
    free(src);
    return rc;
}

const qlr_cli_cmd qlr_cmd_export = {"export", "convert a LoRA adapter (run, PEFT folder, GGUF) to GGUF or PEFT",
                                    cmd_export};
