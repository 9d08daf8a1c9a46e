/* cli/cmd_export_base.c: `qlora export-base -m MODEL -o DIR`: loads a base model into the NF4
 * store and writes the weights exactly as the runtime uses them (NF4 dequantized, HF names and
 * row order) as f32 safetensors + config.json, the input of tests/tools/golden_make.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/core.h"
#include "model/model.h"

static int cmd_export_base(int argc, char **argv) {
    const char *cmd = "export-base";
    if (qlr_cli_wants_help(argc, argv)) {
        printf("usage: qlora export-base -m MODEL -o DIR [--layers N]\n\n"
               "Writes the base model as qlora runs it: decoder linears dequantized from the NF4\n"
               "store (double quant), Q/K rows in HF order, embeddings as their bf16 values, as\n"
               "HF-named f32 DIR/model.safetensors plus DIR/config.json. The golden reference\n"
               "(tests/tools/golden_make.py) builds transformers' model from it.\n\n"
               "  -m, --model PATH   model .gguf (default: the demo model)\n"
               "  -o, --out DIR      output folder (created)\n"
               "      --layers N     export only the first N decoder layers\n");
        return 0;
    }
    const char *model = NULL, *out = NULL;
    int layers = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) return qlr_cli_usage_error(cmd, "unknown or incomplete argument '%s'", a);
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) model = argv[++i];
        else if (!strcmp(a, "-o") || !strcmp(a, "--out")) out = argv[++i];
        else if (!strcmp(a, "--layers")) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 1 || v > 1024) return qlr_cli_usage_error(cmd, "--layers: '%s'", argv[i]);
            layers = (int)v;
        } else return qlr_cli_usage_error(cmd, "unknown argument '%s'", a);
    }
    if (!out) return qlr_cli_usage_error(cmd, "-o DIR is required");
    if (!model) model = qlr_cli_demo_model();
    qlr_backend *be = NULL;
    qlr_model *m = NULL;
    int rc = 1;
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.max_layers = layers;
    if (qlr_backend_create("cpu", 0, &be) == QLR_OK && qlr_model_load(model, be, &lp, &m) == QLR_OK &&
        qlr_model_export_hf(m, out) == QLR_OK) {
        fprintf(stderr, "wrote %s/model.safetensors and %s/config.json (%d layers)\n", out, out,
                m->cfg.n_layers);
        rc = 0;
    }
    if (rc) qlr_cli_fail(cmd);
    qlr_model_free(m);
    qlr_backend_free(be);
    return rc;
}

const qlr_cli_cmd qlr_cmd_export_base = {"export-base",
                                         "write the NF4 base model dequantized as HF safetensors",
                                         cmd_export_base};
