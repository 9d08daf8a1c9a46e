/* cli/cmd_serve.c: `qlora serve`: loads the base model and its tokenizer, attaches the --adapter
 * adapters to a registry, starts the engine (infer/engine.h) and the OpenAI-compatible HTTP
 * server (infer/server.h), prints a one-screen summary, then waits for SIGINT or SIGTERM, on
 * which running requests drain before the process exits. The serving work is infer/'s. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/registry.h"
#include "backend/backend.h"
#include "cli/cli.h"
#include "core/core.h"
#include "data/tokenizer.h"
#include "infer/engine.h"
#include "infer/server.h"
#include "model/model.h"
#include "train/recipe.h"

#define MAX_ADAPTERS 256

static void help(void) {
    printf("usage: qlora serve -m MODEL [--adapter NAME=PATH]... [options]\n\n"
           "Serves one base model and many LoRA adapters over an OpenAI-compatible HTTP API:\n"
           "POST /v1/chat/completions, /v1/completions (\"stream\": true for server-sent events),\n"
           "GET /v1/models, POST /v1/load_lora_adapter {lora_name, lora_path},\n"
           "POST /v1/unload_lora_adapter {lora_name}, GET /health, GET /metrics (Prometheus),\n"
           "and a web page at / (chat, side-by-side comparison of adapters, adapters, metrics).\n"
           "A request picks its adapter with \"model\": NAME, or with \"lora\": [{\"name\": NAME}] or\n"
           "[{\"id\": N}] (llama.cpp style, one adapter per request); else it uses the base model.\n\n"
           "  -m, --model PATH        base model .gguf or HF folder (default: the demo model)\n"
           "      --adapter NAME=PATH attach an adapter at start (GGUF LoRA, PEFT folder or a\n"
           "                          training run's output_dir); repeatable\n"
           "      --adapter-dir DIR   allow POST /v1/load_lora_adapter for paths inside DIR (relative\n"
           "                          to it, or absolute; symlinks resolved; nothing outside). Without\n"
           "                          it, loading by path is refused (403)\n"
           "      --served-model-name NAME  the base model's name in the API (default: the file\n"
           "                          name without .gguf)\n"
           "      --host ADDR         address to listen on (default 127.0.0.1: this machine only)\n"
           "      --port N            TCP port (default 8080; 0 = any free port, printed)\n"
           "      --api-key KEY       require 'Authorization: Bearer KEY' on every route but /health\n"
           "                          and the web page's files (the page asks for the key)\n"
           "                          (or set QLR_API_KEY, which keeps the key out of ps)\n"
           "      --ctx N             longest sequence, prompt + completion (default: the model's\n"
           "                          training context, at most 8192)\n"
           "      --default-max-tokens N  completion tokens of a request that sets no max_tokens\n"
           "                          (default 2048, or what is left of the context when less;\n"
           "                          0 = always what is left). KV blocks are reserved for them\n"
           "      --max-batch-tokens N  tokens per forward step (default 512)\n"
           "      --max-running N     sequences decoding at once (default 64)\n"
           "      --max-queue N       requests waiting to start; more get 429 (default 256)\n"
           "      --kv-memory SIZE    memory of the KV cache, e.g. 2GiB (default: room for\n"
           "                          --max-running sequences of min(ctx, 2048) tokens)\n"
           "      --max-body SIZE     largest request body (default 1MiB; more gets 413)\n"
           "      --device D          cpu or cuda (default cpu)\n"
           "  -t, --threads N         CPU threads (default: all cores)\n"
           "      --quiet             no per-request log lines\n\n"
           "SIGINT / SIGTERM: stop accepting, let running requests finish, exit 0; a second one exits at once.\n");
}

static int parse_int(const char *cmd, const char *flag, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        qlr_cli_usage_error(cmd, "%s: '%s' is not an integer in [%ld, %ld]", flag, s, lo, hi);
        return 0;
    }
    *out = v;
    return 1;
}

/* "dir/SmolLM2.Q4_1.gguf" -> "SmolLM2.Q4_1"; a folder -> its last component. */
static void model_name_of(const char *path, char *out, size_t cap) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    const char *b = path;
    for (size_t i = 0; i < n; i++)
        if (path[i] == '/') b = path + i + 1;
    size_t len = (size_t)(path + n - b);
    if (len > 5 && !strncmp(b + len - 5, ".gguf", 5)) len -= 5;
    snprintf(out, cap, "%.*s", (int)len, b);
}

static void human_bytes(uint64_t b, char *out, size_t cap) {
    if (b >= (1ull << 30)) snprintf(out, cap, "%.1f GiB", b / (double)(1ull << 30));
    else snprintf(out, cap, "%.0f MiB", b / (double)(1ull << 20));
}

/* After the first signal: a second one ends the process at once, without draining. */
static void *second_signal(void *arg) {
    int sig = 0;
    sigwait((const sigset_t *)arg, &sig);
    fprintf(stderr, "qlora serve: second signal: exiting without draining\n");
    _exit(130);
    return NULL;
}

static int cmd_serve(int argc, char **argv) {
    const char *cmd = "serve";
    if (qlr_cli_wants_help(argc, argv)) {
        help();
        return 0;
    }
    const char *model = NULL, *adapter_dir = NULL, *host = "127.0.0.1", *api_key = NULL, *device = "cpu";
    const char *served_name = NULL, *kv_memory = NULL, *max_body = NULL;
    const char *adapters[MAX_ADAPTERS];
    int n_adapters = 0, quiet = 0, queue_set = 0;
    long port = 8080, ctx = 0, max_batch = 0, max_running = 0, max_queue = 0, threads = 0, default_max = 2048;
    static const char *valued[] = {"-m", "--model", "--adapter", "--adapter-dir", "--served-model-name", "--host",
                                   "--port", "--api-key", "--ctx", "--default-max-tokens", "--max-batch-tokens", "--max-running",
                                   "--max-queue", "--kv-memory", "--max-body", "--device", "-t", "--threads", NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--quiet")) {
            quiet = 1;
            continue;
        }
        int known = 0;
        for (int k = 0; valued[k]; k++) known |= !strcmp(a, valued[k]);
        if (!known) return qlr_cli_usage_error(cmd, "unknown argument '%s'", a);
        if (i + 1 >= argc) return qlr_cli_usage_error(cmd, "%s needs a value", a);
        const char *v = argv[++i];
#define IS(s1) (!strcmp(a, s1))
        if (IS("-m") || IS("--model")) model = v;
        else if (IS("--adapter")) {
            if (n_adapters == MAX_ADAPTERS) return qlr_cli_usage_error(cmd, "more than %d --adapter", MAX_ADAPTERS);
            const char *eq = strchr(v, '=');
            if (!eq || eq == v || !eq[1])
                return qlr_cli_usage_error(cmd, "--adapter %s: expected NAME=PATH (e.g. sql=out/sql/adapter_model.gguf)", v);
            adapters[n_adapters++] = v;
        } else if (IS("--adapter-dir")) adapter_dir = v;
        else if (IS("--served-model-name")) served_name = v;
        else if (IS("--host")) host = v;
        else if (IS("--api-key")) api_key = v;
        else if (IS("--device")) device = v;
        else if (IS("--kv-memory")) kv_memory = v;
        else if (IS("--max-body")) max_body = v;
        else if (IS("--port")) { if (!parse_int(cmd, a, v, 0, 65535, &port)) return 2; }
        else if (IS("--ctx")) { if (!parse_int(cmd, a, v, 16, 1 << 24, &ctx)) return 2; }
        else if (IS("--default-max-tokens")) { if (!parse_int(cmd, a, v, 0, 1 << 24, &default_max)) return 2; }
        else if (IS("--max-batch-tokens")) { if (!parse_int(cmd, a, v, 1, 1 << 20, &max_batch)) return 2; }
        else if (IS("--max-running")) { if (!parse_int(cmd, a, v, 1, 1 << 16, &max_running)) return 2; }
        else if (IS("--max-queue")) {
            if (!parse_int(cmd, a, v, 0, 1 << 20, &max_queue)) return 2;
            queue_set = 1;
        }
        else if (!parse_int(cmd, a, v, 1, 1024, &threads)) return 2;
#undef IS
    }
    if (!model) model = qlr_cli_demo_model();
    if (!api_key) {
        const char *env = getenv("QLR_API_KEY");
        if (env && *env) api_key = env;
    }
    if (api_key && !*api_key) return qlr_cli_usage_error(cmd, "--api-key must not be empty");
    uint64_t kv_bytes = 0, body_bytes = (uint64_t)1 << 20;
    if (kv_memory && (qlr_parse_size(kv_memory, &kv_bytes) != QLR_OK || kv_bytes == 0))
        return qlr_cli_usage_error(cmd, "--kv-memory %s: expected a size such as 2GiB or 512MiB", kv_memory);
    if (max_body && (qlr_parse_size(max_body, &body_bytes) != QLR_OK || body_bytes == 0))
        return qlr_cli_usage_error(cmd, "--max-body %s: expected a size such as 1MiB or 64KiB", max_body);
    if (adapter_dir && !qlr_is_dir(adapter_dir))
        return qlr_cli_usage_error(cmd, "--adapter-dir %s: not a folder", adapter_dir);

    /* Every thread started from here on (engine, HTTP) inherits this mask, so SIGINT and SIGTERM
     * reach only sigwait below; SIGPIPE from a closed client socket is ignored. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    qlr_backend *be = NULL;
    qlr_tokenizer *tok = NULL;
    qlr_model *m = NULL;
    qlr_registry *reg = NULL;
    qlr_engine *eng = NULL;
    qlr_server *srv = NULL;
    int rc = 1;
    if (qlr_backend_create(device, (int)threads, &be) != QLR_OK) goto done;
    if ((qlr_is_dir(model) ? qlr_tokenizer_load_hf(model, &tok) : qlr_tokenizer_open_gguf(model, &tok)) != QLR_OK)
        goto done;
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = !quiet;
    if (qlr_model_load(model, be, &lp, &m) != QLR_OK) goto done;
    if (qlr_tokenizer_n_vocab(tok) > m->cfg.n_vocab) {
        qlr_errorf(QLR_ERR_FORMAT, "%s: the tokenizer has %d tokens but the model only %d", model,
                   qlr_tokenizer_n_vocab(tok), m->cfg.n_vocab);
        goto done;
    }
    qlr_registry_params rp = qlr_registry_params_default();
    qlr_lora_base ident;
    qlr_lora_base_from_loaded(m, &ident);
    rp.base_nf4_hash = ident.nf4_hash;
    rp.base_name = ident.name;
    if (qlr_registry_create(be, &m->cfg, &rp, &reg) != QLR_OK) goto done;
    char base_name[256];
    if (served_name) snprintf(base_name, sizeof base_name, "%s", served_name);
    else model_name_of(model, base_name, sizeof base_name);
    for (int i = 0; i < n_adapters; i++) {
        const char *eq = strchr(adapters[i], '=');
        char name[QLR_ADAPTER_NAME_MAX];
        size_t nl = (size_t)(eq - adapters[i]);
        if (nl >= sizeof name) {
            qlr_errorf(QLR_ERR_INVALID, "--adapter %s: the name is longer than %d bytes", adapters[i],
                       QLR_ADAPTER_NAME_MAX - 1);
            goto done;
        }
        memcpy(name, adapters[i], nl);
        name[nl] = 0;
        if (!strcmp(name, base_name)) {
            qlr_errorf(QLR_ERR_INVALID, "--adapter %s: '%s' is the base model's name", adapters[i], name);
            goto done;
        }
        if (qlr_registry_attach_file(reg, name, eq + 1, 0) != QLR_OK) {
            qlr_error_prefix("--adapter %s", adapters[i]);
            goto done;
        }
    }

    qlr_engine_params ep = qlr_engine_params_default();
    int32_t max_ctx = ctx > 0 ? (int32_t)ctx : (m->cfg.ctx_train < 8192 ? m->cfg.ctx_train : 8192);
    if (ctx > m->cfg.ctx_train)
        QLR_LOGW("--ctx %ld is longer than the model was trained for (%d)", ctx, m->cfg.ctx_train);
    ep.max_ctx = max_ctx;
    if (max_batch) ep.max_batch_tokens = (int32_t)max_batch;
    if (max_running) ep.max_running = (int32_t)max_running;
    if (queue_set) ep.max_queue = (int32_t)max_queue; /* 0 is a real value: every request waits its turn or gets 429 */
    if (kv_bytes) ep.kv_bytes = kv_bytes;
    if (qlr_engine_create(m, tok, reg, &ep, &eng) != QLR_OK) goto done;

    qlr_server_params sp = qlr_server_params_default();
    sp.host = host;
    sp.port = (uint16_t)port;
    sp.api_key = api_key;
    sp.adapter_dir = adapter_dir;
    sp.model_name = base_name;
    sp.max_ctx = max_ctx;
    sp.default_max_tokens = (int32_t)default_max;
    sp.max_body = (size_t)body_bytes;
    sp.log_requests = !quiet;
    if (qlr_server_start(eng, reg, tok, &sp, &srv) != QLR_OK) goto done;

    /* the summary */
    qlr_engine_stats es;
    qlr_engine_get_stats(eng, &es);
    char wbytes[32];
    human_bytes(m->nf4_bytes + m->other_bytes, wbytes, sizeof wbytes);
    printf("qlora serve\n");
    printf("  model     %s (%s, %d layers, d_model %d; %s NF4 + bf16 on %s, %d threads)\n", base_name, m->cfg.arch,
           m->cfg.n_layers, m->cfg.d_model, wbytes, be->name, qlr_n_threads());
    const char *tmpl = qlr_server_chat_template(srv);
    printf("  chat      %s\n", tmpl ? tmpl : "no usable chat template: /v1/chat/completions answers 400");
    qlr_adapter_info *list = NULL;
    size_t na = 0;
    if (qlr_registry_list(reg, &list, &na) == QLR_OK && na) {
        for (size_t i = 0; i < na; i++)
            printf("  %-9s %s: r %d, alpha %g (%s)\n", i ? "" : "adapters", list[i].name, list[i].r, list[i].alpha,
                   list[i].path);
    } else {
        printf("  adapters  none attached\n");
    }
    free(list);
    printf("  loading   %s\n", adapter_dir ? adapter_dir : "off (POST /v1/load_lora_adapter needs --adapter-dir)");
    printf("  engine    KV cache %d tokens (%d blocks of %d), context %d, %d tokens per step, %d running, "
           "queue %d\n", es.kv_blocks_total * es.kv_block, es.kv_blocks_total, es.kv_block, max_ctx,
           ep.max_batch_tokens, ep.max_running, ep.max_queue);
    if (default_max) printf("  requests  max_tokens %ld when not given\n", default_max);
    else printf("  requests  max_tokens: the rest of the context when not given\n");
    printf("  auth      %s\n", api_key ? "API key required (Authorization: Bearer ...)" : "none");
    printf("  web page  http://%s:%u/\n", host, (unsigned)qlr_server_port(srv));
    printf("  listening http://%s:%u/v1  (SIGINT/SIGTERM drains and exits)\n", host, (unsigned)qlr_server_port(srv));
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    pthread_t second;
    if (pthread_create(&second, NULL, second_signal, &sigs) == 0) pthread_detach(second);
    qlr_engine_get_stats(eng, &es);
    fprintf(stderr, "qlora serve: %s: draining %d running and %d queued requests\n",
            sig == SIGINT ? "SIGINT" : "SIGTERM", es.running, es.queued);
    qlr_server_stop(srv, 1, 30);
    fprintf(stderr, "qlora serve: stopped\n");
    rc = 0;
done:
    if (rc) qlr_cli_fail(cmd);
    qlr_server_free(srv);
    qlr_engine_free(eng);
    qlr_registry_free(reg);
    qlr_model_free(m);
    qlr_tokenizer_free(tok);
    qlr_backend_free(be);
    return rc;
}

const qlr_cli_cmd qlr_cmd_serve = {"serve", "OpenAI-compatible HTTP server: one base model, many LoRA adapters",
                                   cmd_serve};
