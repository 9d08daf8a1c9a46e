/* tests/fuzz/fuzz_recipe.c: libFuzzer target for the recipe parser (formats/yaml.c +
 * train/recipe.c) and the planner. The input is recipe YAML; its comment lines starting with
 * "#set " are also applied as --set overrides. An accepted recipe must write out as YAML that
 * parses back to an equal struct, and must plan (on the SmolLM2-135M preset) without error;
 * a rejected one must leave a message and a freed struct. Never a crash, never a leak. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "train/plan.h"
#include "train/recipe.h"

#define MAX_SETS 8

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    qlr_log_set_level(QLR_LOG_ERROR);
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = 0;
    /* collect "#set k=v" lines (copies: the recipe text stays as given) */
    char *sets[MAX_SETS];
    int n_sets = 0;
    for (size_t i = 0; i < size && n_sets < MAX_SETS; i++) {
        if ((i == 0 || text[i - 1] == '\n') && size - i > 5 && !memcmp(text + i, "#set ", 5)) {
            size_t j = i + 5;
            while (j < size && text[j] != '\n' && text[j] != 0) j++;
            sets[n_sets] = strndup(text + i + 5, j - i - 5);
            if (sets[n_sets]) n_sets++;
        }
    }
    qlr_recipe r;
    qlr_status st = qlr_recipe_parse(text, size, "fuzz.yaml", ".", (const char *const *)sets, n_sets, &r);
    if (st != QLR_OK) {
        QLR_ASSERT(qlr_error_msg()[0] != 0);
        QLR_ASSERT(r.base_model == NULL && r.datasets == NULL);
    } else {
        char *out = NULL;
        QLR_ASSERT(qlr_recipe_to_yaml(&r, 0, &out) == QLR_OK);
        qlr_recipe back;
        QLR_ASSERT(qlr_recipe_parse(out, strlen(out), "fuzz.yaml (rewritten)", ".", NULL, 0, &back) == QLR_OK);
        QLR_ASSERT(qlr_recipe_equal(&r, &back));
        qlr_recipe_free(&back);
        free(out);
        qlr_model_shape s;
        QLR_ASSERT(qlr_model_shape_preset("SmolLM2-135M", &s) == QLR_OK);
        qlr_plan p;
        QLR_ASSERT(qlr_plan_build(&r, &s, &p) == QLR_OK);
        (void)qlr_plan_check(&p, &r, 1ull << 30);
        qlr_plan_free(&p);
        qlr_recipe_free(&r);
    }
    for (int i = 0; i < n_sets; i++) free(sets[i]);
    free(text);
    return 0;
}
