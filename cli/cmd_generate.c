/* cli/cmd_generate.c: `qlora generate`: loads a base model onto a backend, tokenizes a prompt
 * (optionally through the model's chat template), and streams the generated text to stdout,
 * one flush per token; the speed line goes to stderr. The model work is model/'s. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/adapter_dev.h"
#include "backend/backend.h"
#include "cli/cli.h"
#include "core/core.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "model/model.h"

static void help(void) {
    printf("usage: qlora generate -m MODEL -p PROMPT [options]\n\n"
           "Generates text with a base model (GGUF file or HF folder) loaded into the NF4 store,\n"
           "optionally with a LoRA adapter.\n\n"
           "  -m, --model PATH     model .gguf (default: the demo model)\n"
           "  -p, --prompt TEXT    prompt text\n"
           "      --adapter PATH   apply a LoRA adapter: a GGUF LoRA, a PEFT folder or a\n"
           "                       training run's output_dir (its final adapter)\n"
           "      --adapter-scale S  multiply the adapter's effect (default 1)\n"
           "      --chat           render the prompt as a user message with the model's chat\n"
           "                       template; stop at end of turn\n"
           "  -s, --system TEXT    system message (with --chat)\n"
           "  -n, --n-predict N    tokens to generate (default 128)\n"
           "      --temp T         temperature; 0 = greedy (default 0)\n"
           "      --top-k K        keep the K most likely tokens (default 40; 0 = off)\n"
           "      --top-p P        nucleus sampling threshold (default 0.95; 1 = off)\n"
           "      --seed S         RNG seed (default 0)\n"
           "      --ctx N          context length (default: prompt + n-predict)\n"
           "      --device D       cpu or cuda (default cpu)\n"
           "  -t, --threads N      CPU threads (default: all cores)\n"
           "      --quiet          no loading progress\n\n"
           "The last line (stderr) gives prompt and generation speed in tokens/s.\n");
}

static int parse_num(const char *cmd, const char *flag, const char *s, double lo, double hi,
                     double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v < lo || v > hi) {
        qlr_cli_usage_error(cmd, "%s: '%s' is not a number in [%g, %g]", flag, s, lo, hi);
        return 0;
    }
    *out = v;
    return 1;
}

typedef struct {
    const qlr_tokenizer *tok;
    qlr_tok_stream ts;
    char buf[1024];
} stream_ctx;

static int on_token(void *ud, int32_t id) {
    stream_ctx *s = ud;
    size_t n = qlr_tok_stream_push(s->tok, &s->ts, id, QLR_DEC_SKIP_SPECIAL, s->buf, sizeof s->buf);
    if (n <= sizeof s->buf) fwrite(s->buf, 1, n, stdout);
    fflush(stdout);
    return 0;
}

static int cmd_generate(int argc, char **argv) {
    const char *cmd = "generate";
    if (qlr_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    const char *model = NULL, *prompt = NULL, *system = NULL, *device = "cpu", *adapter = NULL;
    int chat = 0, quiet = 0;
    double n_predict = 128, temp = 0, top_k = 40, top_p = 0.95, seed = 0, ctx = 0, threads = 0;
    double adapter_scale = 1;
    static const char *valued[] = {"-m", "--model", "-p", "--prompt", "-s", "--system", "--device",
                                   "--adapter", "--adapter-scale",
                                   "-n", "--n-predict", "--temp", "--top-k", "--top-p", "--seed",
                                   "--ctx", "-t", "--threads", NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--chat")) { chat = 1; continue; }
        if (!strcmp(a, "--quiet")) { quiet = 1; continue; }
        int known = 0;
        for (int k = 0; valued[k]; k++) known |= !strcmp(a, valued[k]);
        if (!known) return qlr_cli_usage_error(cmd, "unknown argument '%s'", a);
        if (i + 1 >= argc) return qlr_cli_usage_error(cmd, "%s needs a value", a);
        const char *v = argv[++i];
#define IS(s1, s2) (!strcmp(a, s1) || !strcmp(a, s2))
        if (IS("-m", "--model")) model = v;
        else if (IS("-p", "--prompt")) prompt = v;
        else if (IS("-s", "--system")) system = v;
        else if (IS("--device", "--device")) device = v;
        else if (IS("--adapter", "--adapter")) adapter = v;
        else if (IS("--adapter-scale", "--adapter-scale")) {
            if (!parse_num(cmd, a, v, -100, 100, &adapter_scale)) return 2;
        }
        else if (IS("-n", "--n-predict")) { if (!parse_num(cmd, a, v, 0, 1 << 20, &n_predict)) return 2; }
        else if (IS("--temp", "--temp")) { if (!parse_num(cmd, a, v, 0, 100, &temp)) return 2; }
        else if (IS("--top-k", "--top-k")) { if (!parse_num(cmd, a, v, 0, 1 << 24, &top_k)) return 2; }
        else if (IS("--top-p", "--top-p")) { if (!parse_num(cmd, a, v, 0, 1, &top_p)) return 2; }
        else if (IS("--seed", "--seed")) { if (!parse_num(cmd, a, v, 0, 1.8e19, &seed)) return 2; }
        else if (IS("--ctx", "--ctx")) { if (!parse_num(cmd, a, v, 1, 1 << 24, &ctx)) return 2; }
        else if (!parse_num(cmd, a, v, 1, 256, &threads)) return 2;
#undef IS
    }
    if (!prompt) return qlr_cli_usage_error(cmd, "-p PROMPT is required");
    if (!model) model = qlr_cli_demo_model();
    if (system && !chat) return qlr_cli_usage_error(cmd, "--system needs --chat");
    if (adapter_scale != 1 && !adapter) return qlr_cli_usage_error(cmd, "--adapter-scale needs --adapter");

    qlr_backend *be = NULL;
    qlr_tokenizer *tok = NULL;
    qlr_chat_template *tmpl = NULL;
    qlr_chat_render rendered = {0};
    qlr_model *m = NULL;
    qlr_kv_cache *kv = NULL;
    qlr_forward *fw = NULL;
    qlr_tokens ids = {0};
    qlr_adapter_one ad;
    memset(&ad, 0, sizeof ad);
    int rc = 1;
    if (qlr_backend_create(device, (int)threads, &be) != QLR_OK) goto done;
    if ((qlr_is_dir(model) ? qlr_tokenizer_load_hf(model, &tok) : qlr_tokenizer_open_gguf(model, &tok)) != QLR_OK)
        goto done;
    const char *text = prompt;
    unsigned flags = QLR_ENC_ADD_SPECIAL;
    if (chat) {
        const char *src = qlr_tokenizer_chat_template(tok);
        if (!src) {
            qlr_errorf(QLR_ERR_NOT_FOUND, "%s has no chat template; run without --chat", model);
            goto done;
        }
        if (qlr_chat_template_detect(src, strlen(src), &tmpl) != QLR_OK) goto done;
        qlr_chat_msg msgs[2];
        size_t nm = 0;
        if (system) msgs[nm++] = (qlr_chat_msg){"system", system};
        msgs[nm++] = (qlr_chat_msg){"user", prompt};
        if (qlr_chat_render_messages(tmpl, msgs, nm, 1, &rendered) != QLR_OK) goto done;
        text = rendered.text;
        flags = QLR_ENC_PARSE_SPECIAL | (qlr_chat_template_has_bos(tmpl) ? 0 : QLR_ENC_ADD_SPECIAL);
    }
    if (qlr_tokenizer_encode(tok, text, strlen(text), flags, &ids) != QLR_OK) goto done;
    if (ids.n == 0) {
        qlr_errorf(QLR_ERR_INVALID, "the prompt encodes to no tokens");
        goto done;
    }
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = !quiet;
    if (qlr_model_load(model, be, &lp, &m) != QLR_OK) goto done;
    if (qlr_tokenizer_n_vocab(tok) > m->cfg.n_vocab) {
        qlr_errorf(QLR_ERR_FORMAT, "%s: the tokenizer has %d tokens but the model only %d", model,
                   qlr_tokenizer_n_vocab(tok), m->cfg.n_vocab);
        goto done;
    }
    if (adapter) {
        if (qlr_adapter_one_load(m, adapter, (float)adapter_scale, &ad) != QLR_OK) goto done;
        if (!quiet) {
            fprintf(stderr, "adapter %s: ", adapter);
            qlr_lora_print(ad.lora, stderr);
        }
    }
    int32_t n_ctx = ctx > 0 ? (int32_t)ctx : (int32_t)ids.n + (int32_t)n_predict;
    if (n_ctx > m->cfg.ctx_train)
        QLR_LOGW("context %d is longer than the model was trained for (%d)", n_ctx, m->cfg.ctx_train);
    if ((int64_t)ids.n >= n_ctx) {
        qlr_errorf(QLR_ERR_RANGE, "the prompt has %zu tokens; --ctx %d leaves no room", ids.n, n_ctx);
        goto done;
    }
    if (qlr_kv_cache_create(m, 1, n_ctx, &kv) != QLR_OK) goto done;
    int32_t n_batch = ids.n < 256 ? (int32_t)ids.n : 256;
    if (qlr_forward_create(m, n_batch, 1, &fw) != QLR_OK) goto done;

    qlr_generate_params gp = qlr_generate_params_default();
    gp.n_predict = (int32_t)n_predict;
    gp.sampling.temperature = (float)temp;
    gp.sampling.top_k = (int32_t)top_k;
    gp.sampling.top_p = (float)top_p;
    gp.seed = (uint64_t)seed;
    gp.n_batch = n_batch;
    int32_t stops[3];
    int32_t ns = 0;
    int32_t cand[3] = {qlr_tokenizer_eos(tok), qlr_tokenizer_eot(tok), -1};
    for (int i = 0; i < 2; i++)
        if (cand[i] >= 0 && (ns == 0 || stops[ns - 1] != cand[i])) stops[ns++] = cand[i];
    gp.stop_ids = stops;
    gp.n_stop = ns;
    gp.adapters = ad.set;
    stream_ctx sc;
    memset(&sc, 0, sizeof sc);
    sc.tok = tok;
    qlr_generate_stats gs;
    if (!chat) {
        fwrite(prompt, 1, strlen(prompt), stdout);
        fflush(stdout);
    }
    if (qlr_generate(fw, kv, ids.ids, (int32_t)ids.n, &gp, on_token, &sc, &gs) != QLR_OK) goto done;
    size_t fl = qlr_tok_stream_flush(&sc.ts, sc.buf, sizeof sc.buf);
    fwrite(sc.buf, 1, fl, stdout);
    printf("\n");
    fflush(stdout);
    fprintf(stderr, "prompt: %d tokens, %.1f tokens/s; generation: %d tokens, %.1f tokens/s (%s, %d threads)\n",
            gs.n_prompt, gs.prompt_secs > 0 ? gs.n_prompt / gs.prompt_secs : 0.0, gs.n_gen,
            gs.gen_secs > 0 ? gs.n_gen / gs.gen_secs : 0.0, be->name, qlr_n_threads());
    rc = 0;
done:
    if (rc) qlr_cli_fail(cmd);
    qlr_tokens_free(&ids);
    qlr_forward_free(fw);
    qlr_kv_cache_free(kv);
    qlr_adapter_one_free(&ad);
    qlr_model_free(m);
    qlr_chat_render_free(&rendered);
    qlr_chat_template_free(tmpl);
    qlr_tokenizer_free(tok);
    qlr_backend_free(be);
    return rc;
}

const qlr_cli_cmd qlr_cmd_generate = {"generate", "generate text with a base model and an optional adapter",
                                      cmd_generate};
