/* cli/cmd_eval.c: `qlora eval RECIPE [--adapter PATH] [--base] [-n N]`: validation loss and
 * exact match of greedy answers for the base model and a trained adapter (train/eval.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/core.h"
#include "train/eval.h"
#include "train/trainer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora eval RECIPE [--adapter PATH] [--base] [-n N] [options]\n\n"
            "Measures, on the recipe's validation data (its test_datasets files, or else the\n"
            "val_set_size split: the examples training held out), the mean token loss and the\n"
            "task metric: exact match of the greedy answer (chat data: the conversation up to\n"
            "the last assistant turn is the prompt; the generated text, trimmed, must equal the\n"
            "reference answer exactly). By default it evaluates the base model and the adapter\n"
            "of the recipe's output_dir, and compares them.\n\n"
            "  --adapter PATH   the adapter: a training run folder, a checkpoint-N folder's\n"
            "                   adapter/, a PEFT folder or a GGUF LoRA file\n"
            "  --base           the base model only\n"
            "  --adapter-only   the adapter only\n"
            "  -n N             only the first N validation examples\n"
            "  --data FILE      evaluate on every example of FILE (the first dataset's format)\n"
            "                   instead of the recipe's validation data\n"
            "  --show K         print up to K mismatches per model (default 3)\n"
            "  --answers FILE   write every greedy answer as JSONL (model, source, line,\n"
            "                   reference, answer, exact, and the tokens: prompt_ids, answer_ids,\n"
            "                   stop_ids, stopped, max_tokens, for replaying in other engines)\n"
            "  --set key=value  override a recipe key, as for qlora train\n"
            "  --device D       cpu, cuda or auto (CUDA when a GPU is present)\n"
            "  -t, --threads N  CPU threads (default: all cores)\n"
            "  -q, --quiet      no progress bars\n\n"
            "A progress bar per pass (loss, then exact match) and per model on stderr.\n\n"
            "exit status: 0 evaluated, 1 error, 2 usage error\n");
}

static int cmd_eval(int argc, char **argv) {
    const char *cmd = "eval";
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    qlr_eval_opts e = qlr_eval_opts_default();
    const char *recipe = NULL;
    int base_only = 0, adapter_only = 0, threads = 0, quiet = 0;
    char dev_set[64];
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    int n_sets = 0;
    if (!sets) return qlr_cli_usage_error(cmd, "out of memory");
#define NEED_VALUE()                                                                   \
    do {                                                                               \
        if (i + 1 >= argc) {                                                           \
            free(sets);                                                                \
            return qlr_cli_usage_error(cmd, "%s needs a value", a);                    \
        }                                                                              \
    } while (0)
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--adapter")) { NEED_VALUE(); e.adapter = argv[++i]; }
        else if (!strcmp(a, "--base")) base_only = 1;
        else if (!strcmp(a, "--adapter-only")) adapter_only = 1;
        else if (!strcmp(a, "--data")) { NEED_VALUE(); e.data_path = argv[++i]; }
        else if (!strcmp(a, "--answers")) { NEED_VALUE(); e.answers_path = argv[++i]; }
        else if (!strcmp(a, "--set")) { NEED_VALUE(); sets[n_sets++] = argv[++i]; }
        else if (!strcmp(a, "--device")) {
            NEED_VALUE();
            snprintf(dev_set, sizeof dev_set, "device=%s", argv[++i]);
            sets[n_sets++] = dev_set;
        }
        else if (!strcmp(a, "-n") || !strcmp(a, "--show") || !strcmp(a, "-t") || !strcmp(a, "--threads")) {
            NEED_VALUE();
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < (strcmp(a, "--show") ? 1 : 0) || v > 1000000) {
                free(sets);
                return qlr_cli_usage_error(cmd, "%s: '%s' is not a valid count", a, argv[i]);
            }
            if (!strcmp(a, "-n")) e.n_examples = (int32_t)v;
            else if (!strcmp(a, "--show")) e.n_show = (int32_t)v;
            else threads = (int)v;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (a[0] == '-' && a[1]) {
            free(sets);
            return qlr_cli_usage_error(cmd, "unknown option '%s'", a);
        } else if (!recipe) recipe = a;
        else {
            free(sets);
            return qlr_cli_usage_error(cmd, "one recipe only (got '%s' and '%s')", recipe, a);
        }
    }
#undef NEED_VALUE
    if (!recipe) {
        free(sets);
        return qlr_cli_usage_error(cmd, "RECIPE is required");
    }
    if (base_only && (adapter_only || e.adapter)) {
        free(sets);
        return qlr_cli_usage_error(cmd, "--base evaluates the base model only; it excludes --adapter/--adapter-only");
    }
    qlr_train_opts o;
    qlr_status st = qlr_train_opts_load(recipe, sets, n_sets, &o);
    free(sets);
    if (st) return qlr_cli_fail(cmd);
    o.threads = threads;
    if (threads) qlr_set_n_threads(threads);
    e.run = &o;
    e.eval_base = !adapter_only;
    e.eval_adapter = !base_only;
    e.progress = !quiet;
    e.qlora_cmd = qlr_cli_self_command();
    qlr_eval_scores b, a;
    st = qlr_eval_run(&e, &b, &a, stdout);
    int rc = st ? qlr_cli_fail(cmd) : 0;
    qlr_train_opts_free(&o);
    return rc;
}

const qlr_cli_cmd qlr_cmd_eval = {"eval", "validation loss and exact match, base model vs adapter", cmd_eval};
