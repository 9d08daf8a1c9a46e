/* cli/cmd_plan.c: `qlora plan RECIPE [--vram SIZE] [--set key=value]... [--json] [--verbose]`.
 * Loads and validates the recipe, finds the model's shape (GGUF, config.json or a preset) and
 * prints the memory plan of train/plan.h; exits 1 when the plan is over the budget (--vram,
 * else the recipe's vram_budget), with what to change. Nothing is allocated on any device. */
#include "cli/cli.h"
#include "core/core.h"
#include "train/plan.h"
#include "train/recipe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SETS 256

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora plan RECIPE [--vram SIZE] [--set key=value]... [--json] [--verbose]\n\n"
            "Prints the exact memory plan of a training run before anything is allocated: NF4 base\n"
            "weights, bf16 embeddings/norms/lm_head, LoRA masters/copies/grads, optimizer state, saved\n"
            "activations, workspaces and the CUDA reserve. Model shapes come from the base_model GGUF,\n"
            "a HF config.json, or a built-in preset for known names not on disk.\n\n"
            "  --vram SIZE      budget such as 16GiB, 24GB, 8000MiB (default: the recipe's vram_budget)\n"
            "  --set key=value  override a recipe key (YAML value; datasets.0.path=... for nested keys)\n"
            "  --json           print the plan as JSON\n"
            "  --verbose, -v    list every buffer under its component\n\n"
            "exit status: 0 fits (or no budget), 1 over budget or an error, 2 usage error\n");
}

static int cmd_plan(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *recipe = NULL, *vram = NULL;
    const char *sets[MAX_SETS];
    int n_sets = 0, json = 0, verbose = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "--verbose") || !strcmp(a, "-v")) verbose = 1;
        else if (!strcmp(a, "--vram") || !strcmp(a, "--set")) {
            if (i + 1 >= argc) return qlr_cli_usage_error("plan", "%s needs a value", a);
            if (a[2] == 'v') vram = argv[++i];
            else if (n_sets == MAX_SETS) return qlr_cli_usage_error("plan", "more than %d --set", MAX_SETS);
            else sets[n_sets++] = argv[++i];
        } else if (!strncmp(a, "--vram=", 7)) vram = a + 7;
        else if (!strncmp(a, "--set=", 6)) {
            if (n_sets == MAX_SETS) return qlr_cli_usage_error("plan", "more than %d --set", MAX_SETS);
            sets[n_sets++] = a + 6;
        } else if (a[0] == '-' && a[1]) return qlr_cli_usage_error("plan", "unknown option '%s'", a);
        else if (recipe) return qlr_cli_usage_error("plan", "one recipe only (got '%s' and '%s')", recipe, a);
        else recipe = a;
    }
    if (!recipe) return qlr_cli_usage_error("plan", "missing RECIPE (e.g. recipes/llama3-8b-16gb.yaml)");
    uint64_t budget = 0;
    if (vram && qlr_parse_size(vram, &budget) != QLR_OK)
        return qlr_cli_usage_error("plan", "--vram %s: expected a size such as 16GiB, 24GB or 8000MiB", vram);

    qlr_recipe r;
    if (qlr_recipe_load(recipe, sets, n_sets, &r) != QLR_OK) return qlr_cli_fail("plan");
    if (!vram) budget = r.vram_budget;
    else r.vram_budget = budget; /* gradient_checkpointing auto chooses against this budget */
    qlr_model_shape s;
    qlr_plan p;
    int rc = 0;
    if (qlr_model_shape_for_recipe(&r, &s) != QLR_OK || qlr_plan_build(&r, &s, &p) != QLR_OK) {
        rc = qlr_cli_fail("plan");
        qlr_recipe_free(&r);
        return rc;
    }
    if (json) {
        char *t = NULL;
        if (qlr_plan_to_json(&p, &r, budget, &t) != QLR_OK) rc = qlr_cli_fail("plan");
        else {
            printf("%s\n", t);
            free(t);
        }
    } else {
        qlr_plan_print(&p, &r, budget, verbose, stdout);
    }
    if (!rc && qlr_plan_check(&p, &r, budget) != QLR_OK) rc = qlr_cli_fail("plan");
    qlr_plan_free(&p);
    qlr_recipe_free(&r);
    return rc;
}

const qlr_cli_cmd qlr_cmd_plan = {"plan", "print the memory plan of a recipe (--vram budget check)", cmd_plan};
