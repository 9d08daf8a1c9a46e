/* cli/cmd_export.c: `qlora export RUN_OR_ADAPTER --format gguf|peft|ollama -o PATH`.
 * Reads an adapter (a training run's final adapter or latest checkpoint, a PEFT folder or a GGUF
 * LoRA file; adapters/lora.h qlr_lora_resolve) and writes
 *   gguf           the adapter as a GGUF LoRA for llama.cpp / Ollama ADAPTER;
 *   gguf --merge   one model GGUF with the adapter merged into the NF4-dequantized base
 *                  (model/export_gguf.h), quantized to --type;
 *   peft           a PEFT folder for HF PEFT / vLLM;
 *   ollama         a folder with the base GGUF qlora trained against (or a link), the adapter
 *                  GGUF (or the merged model with --merge) and a Modelfile whose TEMPLATE renders
 *                  the training prompt format (data/ollama.h).
 * The base model is -m BASE, else the one the adapter records (base_model_name_or_path). */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/lora.h"
#include "cli/cli.h"
#include "core/core.h"
#include "data/chat_template.h"
#include "data/dataset.h"
#include "data/ollama.h"
#include "data/tokenizer.h"
#include "formats/gguf.h"
#include "model/export_gguf.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora export RUN_OR_ADAPTER --format gguf|peft|ollama -o PATH [-m BASE] [--merge]\n"
            "                    [--type TYPE] [--base-type TYPE] [--base-gguf FILE] [--template NAME]\n\n"
            "Writes a LoRA adapter for other programs.\n\n"
            "RUN_OR_ADAPTER is one of\n"
            "  a training run folder (output_dir): its adapter/ (final), else the adapter/ of its\n"
            "      latest complete checkpoint-N/ (the trainer saves adapters as PEFT folders\n"
            "      there; a checkpoint without its manifest.json is skipped)\n"
            "  a PEFT folder (adapter_config.json + adapter_model.safetensors)\n"
            "  a GGUF LoRA file (general.type = adapter)\n\n"
            "  --format gguf    one .gguf file as llama.cpp reads it (--lora / --lora-scaled, Ollama\n"
            "                   ADAPTER): F32 lora_a/lora_b, Q/K lora_b rows permuted for llama.cpp's\n"
            "                   RoPE; with rsLoRA, adapter.lora.alpha = alpha*sqrt(r) so that llama.cpp's\n"
            "                   alpha/r equals alpha/sqrt(r). With --merge: one model .gguf instead, the\n"
            "                   base as qlora trained on it (NF4 dequantized) plus scale*B*A, in --type\n"
            "  --format peft    a folder with adapter_config.json + adapter_model.safetensors (HF PEFT,\n"
            "                   vLLM); created if missing\n"
            "  --format ollama  a folder (created) for `ollama create`: base.gguf (the NF4 base as\n"
            "                   qlora trained on it, --base-type; or a link to --base-gguf FILE),\n"
            "                   adapter.gguf, and a Modelfile (FROM, ADAPTER, a TEMPLATE rendering the\n"
            "                   training prompt format, PARAMETER stop); with --merge model.gguf and no\n"
            "                   ADAPTER. Prints the `ollama create` command\n"
            "  -o, --output PATH     where to write\n"
            "  -m, --model BASE      base model (GGUF or HF folder): checks the adapter's shapes against\n"
            "                        it and supplies what a foreign file lacks; --merge and ollama load it\n"
            "                        (default: the base the adapter records)\n"
            "  --merge               write the merged model (gguf, ollama)\n"
            "  --type TYPE           merged model: f16 (default), q8_0, q6_k, q4_k_m (llama.cpp's mix),\n"
            "                        bf16, f32\n"
            "  --base-type TYPE      ollama base.gguf: f16 (default), f32, bf16, q8_0\n"
            "  --base-gguf FILE      ollama: link base.gguf to FILE (e.g. an earlier qlora export-base)\n"
            "                        instead of writing it\n"
            "  --template NAME       ollama: the prompt format when the adapter records none (chatml,\n"
            "                        llama3, llama2, mistral, alpaca, completion)\n"
            "  -q, --quiet           no summary\n\n"
            "exit status: 0 written, 1 error, 2 usage error\n");
}

typedef struct export_args {
    const char *in, *fmt, *outp, *model, *type_s, *base_type_s, *base_gguf, *template_name;
    int merge, quiet;
} export_args;

/* ---- merged models ---- */

typedef struct merge_ctx {
    const qlr_lora *l;
    const char *adapter_path;
} merge_ctx;

static qlr_status merge_delta(void *ud, int32_t layer, qlr_linear_id id, float *w, int64_t rows, int64_t cols) {
    const merge_ctx *c = ud;
    return qlr_lora_add_delta(c->l, layer, id, c->l->scale, w, rows, cols);
}

static qlr_status merge_meta(void *ud, qlr_gguf_writer *w) {
    const merge_ctx *c = ud;
    const qlr_lora *l = c->l;
    qlr_status st = qlr_gguf_set_str(w, "qlora.merged.adapter", c->adapter_path);
    if (st == QLR_OK) st = qlr_gguf_set_f32(w, "qlora.merged.scale", l->scale);
    if (st == QLR_OK && l->base.name[0]) st = qlr_gguf_set_str(w, "qlora.base.name", l->base.name);
    if (st == QLR_OK && l->base.nf4_hash) {
        char hex[17];
        qlr_model_hash_hex(l->base.nf4_hash, hex);
        st = qlr_gguf_set_str(w, "qlora.base.nf4_hash", hex);
    }
    if (st == QLR_OK && l->prompt_format) st = qlr_gguf_set_str(w, "qlora.prompt.format", l->prompt_format);
    if (st == QLR_OK && l->prompt_system) st = qlr_gguf_set_str(w, "qlora.prompt.system", l->prompt_system);
    return st;
}

static void print_stats(const char *path, const char *what, qlr_export_type t, const qlr_export_stats *s) {
    printf("wrote %s: %s, %s, %lld tensors, %.1f MiB (", path, what, qlr_export_type_name(t), (long long)s->n_tensors,
           (double)s->bytes / (1 << 20));
    int first = 1;
    for (int ty = 0; ty < 64; ty++)
        if (s->n_by_type[ty]) {
            printf("%s%lld %s", first ? "" : ", ", (long long)s->n_by_type[ty], qlr_ggml_type_name((uint32_t)ty));
            first = 0;
        }
    printf(")\n");
    if (s->n_fallback)
        printf("  %lld tensors in a 32-block type: their rows are not a multiple of 256 (as llama.cpp does)\n",
               (long long)s->n_fallback);
}

/* ---- the base model ---- */

static const char *base_path(const export_args *a, const qlr_lora *l) {
    if (a->model) return a->model;
    if (l->base_model && qlr_path_exists(l->base_model)) return l->base_model;
    qlr_errorf(QLR_ERR_NOT_FOUND, "the base model is needed: give -m BASE (the adapter records %s%s)",
               l->base_model ? l->base_model : "none", l->base_model ? ", which does not exist here" : "");
    return NULL;
}

static qlr_status load_base(const char *path, int quiet, qlr_backend **be, qlr_model **m) {
    QLR_TRY(qlr_backend_create("cpu", 0, be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = !quiet;
    return qlr_model_load(path, *be, &lp, m);
}

/* ---- ollama ---- */

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* The prompt format's template, with the chat template's default system message and the
 * tokenizer's EOS text taken from the base model when the adapter does not record them. */
static qlr_status ollama_template(const export_args *a, const qlr_lora *l, const char *base,
                                  qlr_ollama_template *t, const char **fmt_out) {
    const char *fmt = a->template_name ? a->template_name : l->prompt_format;
    if (!fmt)
        return qlr_errorf(QLR_ERR_INVALID, "the adapter records no training prompt format (trained before qlora "
                                           "recorded it, or on data without one): give --template NAME");
    qlr_tokenizer *tok = NULL;
    qlr_chat_template *ct = NULL;
    qlr_status st = qlr_data_open_tokenizer(base, NULL, &tok, &ct);
    if (st != QLR_OK) return st;
    const char *sys = l->prompt_system;
    if (a->template_name && (!l->prompt_format || strcmp(a->template_name, l->prompt_format))) {
        sys = NULL; /* another format than the recorded one: the model's own template decides */
        if (ct && !strcmp(qlr_chat_template_name(ct), fmt)) sys = qlr_chat_template_default_system(ct);
    }
    const char *eos = qlr_tokenizer_eos(tok) >= 0 ? qlr_tokenizer_token_text(tok, qlr_tokenizer_eos(tok)) : NULL;
    st = qlr_ollama_template_make(fmt, sys, eos, t);
    *fmt_out = fmt;
    qlr_chat_template_free(ct);
    qlr_tokenizer_free(tok);
    return st;
}

static int export_ollama(const export_args *a, qlr_lora *l, const char *src) {
    const char *cmd = "export";
    qlr_export_type mtype = QLR_EXPORT_F16, btype = QLR_EXPORT_F16;
    if (a->type_s && qlr_export_type_parse(a->type_s, &mtype) != QLR_OK) return qlr_cli_fail(cmd);
    if (a->base_type_s && (qlr_export_type_parse(a->base_type_s, &btype) != QLR_OK || btype > QLR_EXPORT_Q8_0))
        return qlr_cli_usage_error(cmd, "--base-type %s: expected f32, f16, bf16 or q8_0", a->base_type_s);
    const char *base = base_path(a, l);
    if (!base) return qlr_cli_fail(cmd);
    qlr_ollama_template t;
    const char *fmt = NULL;
    if (ollama_template(a, l, base, &t, &fmt) != QLR_OK) return qlr_cli_fail(cmd);
    int rc = 1;
    qlr_backend *be = NULL;
    qlr_model *m = NULL;
    char *p_base = join(a->outp, "base.gguf"), *p_adapter = join(a->outp, "adapter.gguf");
    char *p_model = join(a->outp, "model.gguf"), *p_mf = join(a->outp, "Modelfile"), *mf = NULL;
    if (!p_base || !p_adapter || !p_model || !p_mf) {
        qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (qlr_mkdir_p(a->outp) != QLR_OK) goto done;
    int need_model = a->merge || !a->base_gguf;
    if (need_model) {
        if (load_base(base, a->quiet, &be, &m) != QLR_OK) goto done;
        qlr_lora_base ident;
        qlr_lora_base_from_loaded(m, &ident);
        if (qlr_lora_check_base(l, &ident, src) != QLR_OK) goto done;
        qlr_lora_warn_base(l, &ident, src);
    }
    qlr_export_stats stats;
    qlr_export_gguf_params gp = qlr_export_gguf_params_default();
    gp.progress = !a->quiet;
    if (a->merge) {
        merge_ctx mc = {l, src};
        gp.type = mtype;
        gp.delta = merge_delta;
        gp.delta_ud = &mc;
        gp.meta = merge_meta;
        gp.meta_ud = &mc;
        if (qlr_model_export_gguf(m, p_model, &gp, &stats) != QLR_OK) goto done;
        if (!a->quiet) print_stats(p_model, "base + adapter merged", mtype, &stats);
    } else {
        if (a->base_gguf) {
            char abs[PATH_MAX];
            if (!realpath(a->base_gguf, abs)) {
                qlr_errorf(QLR_ERR_NOT_FOUND, "--base-gguf %s: not found", a->base_gguf);
                goto done;
            }
            qlr_gguf *g = NULL;
            if (qlr_gguf_open(abs, &g) != QLR_OK) goto done;
            const char *hs;
            uint64_t hl;
            char hex[17];
            qlr_model_hash_hex(l->base.nf4_hash, hex);
            if (qlr_gguf_get_str(g, "qlora.nf4.hash", &hs, &hl) != QLR_OK) {
                qlr_error_clear();
                QLR_LOGW("%s has no qlora.nf4.hash: it is not a qlora export-base file, so Ollama will run the "
                         "adapter on other weights than it was trained against", abs);
            } else if (l->base.nf4_hash && (hl != 16 || memcmp(hs, hex, 16))) {
                qlr_errorf(QLR_ERR_INVALID, "--base-gguf %s holds the NF4 store nf4 %.*s, the adapter was trained on "
                           "nf4 %s (%s)", abs, (int)(hl < 64 ? hl : 64), hs, hex, l->base.name);
                qlr_gguf_close(g);
                goto done;
            }
            qlr_gguf_close(g);
            unlink(p_base);
            if (symlink(abs, p_base) != 0) {
                qlr_errorf(QLR_ERR_IO, "%s: cannot create the link to %s", p_base, abs);
                goto done;
            }
            if (!a->quiet) printf("linked %s -> %s\n", p_base, abs);
        } else {
            gp.type = btype;
            gp.nf4_state = 1;
            if (qlr_model_export_gguf(m, p_base, &gp, &stats) != QLR_OK) goto done;
            if (!a->quiet) print_stats(p_base, "the base as qlora trained on it", btype, &stats);
        }
        if (qlr_lora_save_gguf(l, p_adapter) != QLR_OK) goto done;
        if (!a->quiet) printf("wrote %s: the adapter (lora r %d)\n", p_adapter, l->r);
    }
    if (qlr_ollama_modelfile(a->merge ? "./model.gguf" : "./base.gguf", a->merge ? NULL : "./adapter.gguf", &t, &mf) !=
            QLR_OK ||
        qlr_write_atomic(p_mf, mf, strlen(mf)) != QLR_OK)
        goto done;
    if (!a->quiet) {
        const char *name = strrchr(a->outp, '/');
        name = name && name[1] ? name + 1 : a->outp;
        printf("wrote %s: TEMPLATE of the training prompt format %s%s, %d stop strings\n", p_mf, fmt,
               t.text && strstr(t.text, "(ne $m.Role \"system\")") ? " (with its default system message)" : "",
               t.n_stops);
        printf("next: ollama create %s -f %s && ollama run %s\n", name, p_mf, name);
    }
    rc = 0;
done:
    if (rc) qlr_cli_fail(cmd);
    free(mf);
    free(p_base);
    free(p_adapter);
    free(p_model);
    free(p_mf);
    qlr_ollama_template_free(&t);
    qlr_model_free(m);
    qlr_backend_free(be);
    return rc;
}

static int export_merged_gguf(const export_args *a, qlr_lora *l, const char *src) {
    const char *cmd = "export";
    qlr_export_type type = QLR_EXPORT_F16;
    if (a->type_s && qlr_export_type_parse(a->type_s, &type) != QLR_OK) return qlr_cli_fail(cmd);
    const char *base = base_path(a, l);
    if (!base) return qlr_cli_fail(cmd);
    qlr_backend *be = NULL;
    qlr_model *m = NULL;
    int rc = 1;
    if (load_base(base, a->quiet, &be, &m) == QLR_OK) {
        qlr_lora_base ident;
        qlr_lora_base_from_loaded(m, &ident);
        if (qlr_lora_check_base(l, &ident, src) == QLR_OK) {
            qlr_lora_warn_base(l, &ident, src);
            merge_ctx mc = {l, src};
            qlr_export_gguf_params gp = qlr_export_gguf_params_default();
            gp.type = type;
            gp.delta = merge_delta;
            gp.delta_ud = &mc;
            gp.meta = merge_meta;
            gp.meta_ud = &mc;
            gp.progress = !a->quiet;
            qlr_export_stats stats;
            if (qlr_model_export_gguf(m, a->outp, &gp, &stats) == QLR_OK) {
                if (!a->quiet) print_stats(a->outp, "base + adapter merged", type, &stats);
                rc = 0;
            }
        }
    }
    if (rc) qlr_cli_fail(cmd);
    qlr_model_free(m);
    qlr_backend_free(be);
    return rc;
}

static int cmd_export(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    export_args a;
    memset(&a, 0, sizeof a);
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        const char **dst = NULL;
        if (!strcmp(s, "--format") || !strcmp(s, "-f")) dst = &a.fmt;
        else if (!strcmp(s, "-o") || !strcmp(s, "--output")) dst = &a.outp;
        else if (!strcmp(s, "-m") || !strcmp(s, "--model")) dst = &a.model;
        else if (!strcmp(s, "--type") || !strcmp(s, "-t")) dst = &a.type_s;
        else if (!strcmp(s, "--base-type")) dst = &a.base_type_s;
        else if (!strcmp(s, "--base-gguf")) dst = &a.base_gguf;
        else if (!strcmp(s, "--template")) dst = &a.template_name;
        else if (!strncmp(s, "--format=", 9)) a.fmt = s + 9;
        else if (!strncmp(s, "--output=", 9)) a.outp = s + 9;
        else if (!strncmp(s, "--model=", 8)) a.model = s + 8;
        else if (!strncmp(s, "--type=", 7)) a.type_s = s + 7;
        else if (!strcmp(s, "--merge")) a.merge = 1;
        else if (!strcmp(s, "-q") || !strcmp(s, "--quiet")) a.quiet = 1;
        else if (s[0] == '-' && s[1]) return qlr_cli_usage_error("export", "unknown option '%s'", s);
        else if (a.in) return qlr_cli_usage_error("export", "one input only (got '%s' and '%s')", a.in, s);
        else a.in = s;
        if (dst) {
            if (i + 1 >= argc) return qlr_cli_usage_error("export", "%s needs a value", s);
            *dst = argv[++i];
        }
    }
    if (!a.in) return qlr_cli_usage_error("export", "missing RUN_OR_ADAPTER (a run folder, PEFT folder or .gguf)");
    if (!a.fmt) return qlr_cli_usage_error("export", "missing --format gguf|peft|ollama");
    int gguf = !strcmp(a.fmt, "gguf"), peft = !strcmp(a.fmt, "peft"), ollama = !strcmp(a.fmt, "ollama");
    if (!gguf && !peft && !ollama) return qlr_cli_usage_error("export", "--format %s: expected gguf, peft or ollama", a.fmt);
    if (!a.outp) return qlr_cli_usage_error("export", "missing -o PATH");
    if (a.merge && peft) return qlr_cli_usage_error("export", "--merge writes a model: --format gguf or ollama");
    if (a.type_s && !a.merge) return qlr_cli_usage_error("export", "--type is the merged model's: add --merge");
    if ((a.base_type_s || a.base_gguf) && (!ollama || a.merge))
        return qlr_cli_usage_error("export", "--base-type / --base-gguf are for --format ollama without --merge");
    if (a.template_name && !ollama) return qlr_cli_usage_error("export", "--template is for --format ollama");

    qlr_lora_base base;
    if (a.model && qlr_lora_base_from_model(a.model, &base) != QLR_OK) return qlr_cli_fail("export");
    char *src = NULL;
    int src_gguf = 0;
    if (qlr_lora_resolve(a.in, &src, &src_gguf) != QLR_OK) return qlr_cli_fail("export");
    qlr_lora *l = NULL;
    qlr_status st = src_gguf ? qlr_lora_load_gguf(src, a.model ? &base : NULL, &l)
                             : qlr_lora_load_peft(src, a.model ? &base : NULL, &l);
    int rc = 0;
    if (st != QLR_OK) {
        rc = qlr_cli_fail("export");
    } else {
        if (!a.quiet) {
            printf("read %s (%s)\n  ", src, src_gguf ? "gguf" : "peft");
            qlr_lora_print(l, stdout);
        }
        if (ollama) rc = export_ollama(&a, l, src);
        else if (a.merge) rc = export_merged_gguf(&a, l, src);
        else {
            st = gguf ? qlr_lora_save_gguf(l, a.outp) : qlr_lora_save_peft(l, a.outp);
            if (st != QLR_OK) rc = qlr_cli_fail("export");
            else if (!a.quiet) {
                if (gguf && l->use_rslora)
                    printf("  rsLoRA: adapter.lora.alpha written as alpha*sqrt(r) = %g so llama.cpp's alpha/r = %g\n",
                           l->alpha * sqrt((double)l->r), (double)l->scale);
                printf("wrote %s (%s)\n", a.outp, gguf ? "gguf" : "peft");
            }
        }
    }
    qlr_lora_free(l);
    free(src);
    return rc;
}

const qlr_cli_cmd qlr_cmd_export = {"export",
                                    "write an adapter for other programs: GGUF, PEFT, a merged GGUF, an Ollama folder",
                                    cmd_export};
