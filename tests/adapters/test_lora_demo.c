/* tests/adapters/test_lora_demo.c: adapters on the demo model (SmolLM2-135M: llama, 30 layers,
 * d 576, 9/3 heads x 64, ff 1536) through the `qlora export` CLI: a run folder's adapter ->
 * GGUF (-m) -> PEFT -> GGUF gives the same file; every export re-imports bit-identically; a PEFT
 * folder without base identity needs -m for GGUF (exit 1 naming -m, then 0 with it); usage errors
 * exit 2. Fails with a pointer to scripts/setup.sh when the demo model is missing. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "adapters/lora.h"
#include "core/core.h"
#include "tests/test_util.h"

static const char *demo_model(void) {
    return test_demo_model();
}

static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int run(const char *fmt, ...) {
    char args[4096], cmd[4400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' export %s >/dev/null 2>%s/stderr.txt", QLR_QLORA_BIN, args, test_tmpdir());
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int stderr_has(const char *s) {
    char p[512], *d = NULL;
    size_t n;
    snprintf(p, sizeof p, "%s/stderr.txt", test_tmpdir());
    int ok = qlr_file_read_all(p, 1 << 20, &d, &n) == QLR_OK && strstr(d, s);
    if (!ok) fprintf(stderr, "stderr was: %s\n", d ? d : "(none)");
    free(d);
    return ok;
}

static int same_file(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int eq = qlr_file_read_all(a, 1 << 28, &x, &nx) == QLR_OK && qlr_file_read_all(b, 1 << 28, &y, &ny) == QLR_OK &&
             nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return eq;
}

int main(void) {
    const char *model = demo_model();
    if (!qlr_path_exists(model)) {
        fprintf(stderr, "demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)\n", model);
        return 1;
    }
    qlr_lora_base base;
    CHECK_OK(qlr_lora_base_from_model(model, &base));
    CHECK(!strcmp(base.arch, "llama") && base.n_layers == 30 && base.d_model == 576 && base.n_heads == 9 &&
          base.n_kv_heads == 3 && base.head_dim == 64 && base.d_ff == 1536);
    qlr_lora_params p = qlr_lora_params_default();
    p.r = 8;
    p.alpha = 16;
    p.targets = QLR_LORA_TARGETS_ALL;
    p.base_model = model;
    qlr_lora *l = NULL;
    CHECK_OK(qlr_lora_create(&base, &p, &l));
    if (!l) return test_finish();
    uint64_t s = 7;
    for (uint64_t i = 0; i < l->n_params; i++) l->block[i] = test_rng_normal(&s) * 0.01f;
    const char *t = test_tmpdir();
    char run_dir[512], ad[600], g1[512], g2[512], pd[512], bare[512], g3[512];
    snprintf(run_dir, sizeof run_dir, "%s/run", t);
    snprintf(ad, sizeof ad, "%s/" QLR_RUN_ADAPTER_DIR, run_dir);
    snprintf(g1, sizeof g1, "%s/a.gguf", t);
    snprintf(g2, sizeof g2, "%s/b.gguf", t);
    snprintf(g3, sizeof g3, "%s/c.gguf", t);
    snprintf(pd, sizeof pd, "%s/peft", t);
    snprintf(bare, sizeof bare, "%s/bare_peft", t);
    CHECK_OK(qlr_lora_save_peft(l, ad));

    CHECK_EQ_INT(run("--help"), 0);
    CHECK_EQ_INT(run("'%s'", run_dir), 2);
    CHECK_EQ_INT(run("'%s' --format onnx -o x", run_dir), 2);
    CHECK_EQ_INT(run("'%s' --format gguf -o '%s' -m '%s'", run_dir, g1, model), 0);
    CHECK_EQ_INT(run("'%s' --format peft -o '%s'", g1, pd), 0);
    CHECK_EQ_INT(run("'%s' --format gguf -o '%s'", pd, g2), 0);
    CHECK(same_file(g1, g2));
    qlr_lora *x = NULL;
    CHECK_OK(qlr_lora_load_gguf(g2, &base, &x));
    if (x) {
        CHECK(x->n_params == l->n_params && !memcmp(x->block, l->block, l->n_params * 4));
        CHECK(x->scale == 2.0f);
    }
    qlr_lora_free(x);
    x = NULL;
    CHECK_OK(qlr_lora_load(pd, &base, &x));
    if (x) CHECK(!memcmp(x->block, l->block, l->n_params * 4));
    qlr_lora_free(x);

    /* a PEFT folder without our base identity (as HF PEFT writes it): GGUF needs -m */
    qlr_lora_base keep = l->base;
    memset(&l->base, 0, sizeof l->base);
    l->base.n_layers = keep.n_layers;
    CHECK_OK(qlr_lora_save_peft(l, bare));
    l->base = keep;
    CHECK_EQ_INT(run("'%s' --format gguf -o '%s'", bare, g3), 1);
    CHECK(stderr_has("-m"));
    CHECK_EQ_INT(run("'%s' --format gguf -o '%s' -m '%s'", bare, g3, model), 0);
    CHECK(same_file(g1, g3));
    qlr_lora_free(l);
    return test_finish();
}
