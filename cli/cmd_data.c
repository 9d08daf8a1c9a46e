/* cli/cmd_data.c: `qlora data preview RECIPE [--set key=value]... [-n N] [--color|--plain]`.
 * Loads the recipe's datasets exactly as the trainer will (tokenizer and chat template of the
 * base model, masking, truncation, split, packing) and prints N examples with the masked text
 * marked, then the counts. The recipe -> data settings are the trainer's (train/trainer.h); the
 * work is data/dataset.h and data/pack.h; this file owns the printing. */
#include "cli/cli.h"
#include "core/core.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "train/recipe.h"
#include "train/trainer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SETS 256

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora data preview RECIPE [--set key=value]... [-n N] [--color|--plain]\n\n"
            "Tokenizes the recipe's datasets as `qlora train` does and shows the first N examples\n"
            "(default 3) with the text that gets no loss marked, then the counts: examples, tokens,\n"
            "trainable tokens, truncated, dropped, skipped lines, the train/validation split, packed\n"
            "rows and packing efficiency.\n\n"
            "  --set key=value  override a recipe key (YAML value; datasets.0.path=... for nested keys)\n"
            "  -n N             examples to show (0: counts only)\n"
            "  --color          mark masked text dim and trained text green (default on a terminal)\n"
            "  --plain          mark masked text as [[...]] (default when stdout is not a terminal)\n\n"
            "exit status: 0 ok, 1 an error (bad line, missing file, ...), 2 usage error\n");
}

/* What turns a record of this format into text: the chat template for chat data, the format's own
 * layout otherwise (alpaca prompts are not wrapped in the chat template). */
static const char *formatting(qlr_data_format f, const qlr_chat_template *tmpl, char *buf, size_t cap) {
    switch (f) {
    case QLR_DATA_CHAT:
    case QLR_DATA_SHAREGPT:
        snprintf(buf, cap, "chat template %s", tmpl ? qlr_chat_template_name(tmpl) : "(none)");
        return buf;
    case QLR_DATA_ALPACA: return "Alpaca prompt (### Instruction / ### Input / ### Response), no chat template";
    case QLR_DATA_COMPLETION: return "raw text (+ bos/eos), no chat template";
    case QLR_DATA_INPUT_OUTPUT: return "segments as written, no chat template";
    case QLR_DATA_PRETOKENIZED: return "token ids as given, no template";
    default: return "?";
    }
}

static void print_marked(const qlr_tokenizer *tok, const qlr_example *e, int color) {
    size_t i = 0;
    while (i < e->n) {
        int masked = e->labels[i] == QLR_LABEL_IGNORE;
        size_t j = i + 1;
        while (j < e->n && (e->labels[j] == QLR_LABEL_IGNORE) == masked) j++;
        char *text = NULL;
        size_t len = 0;
        if (qlr_tokenizer_decode(tok, e->ids + i, j - i, 0, &text, &len) == QLR_OK) {
            if (color) fputs(masked ? "\033[2m" : "\033[32m", stdout);
            else if (masked) fputs("[[", stdout);
            fwrite(text, 1, len, stdout);
            if (color) fputs("\033[0m", stdout);
            else if (masked) fputs("]]", stdout);
        }
        free(text);
        i = j;
    }
    fputc('\n', stdout);
}

static int preview(const char *recipe, const char *const *sets, int n_sets, long n_show, int color) {
    /* the trainer's options without its memory-plan check: a preview is no training run */
    qlr_recipe r;
    qlr_train_opts o;
    if (qlr_recipe_load(recipe, sets, n_sets, &r) != QLR_OK) return qlr_cli_fail("data");
    qlr_status lst = qlr_train_opts_from_recipe(&r, &o);
    if (lst == QLR_OK && (lst = qlr_train_opts_check_data(&r, &o))) qlr_train_opts_free(&o);
    qlr_recipe_free(&r);
    if (lst) return qlr_cli_fail("data");
    int rc = 1;
    qlr_tokenizer *tok = NULL;
    qlr_chat_template *tmpl = NULL;
    qlr_dataset *ds = NULL, *test_ds = NULL;
    qlr_batcher *bt = NULL, *bv = NULL;
    qlr_data_split split = {0};
    qlr_data_source *src = NULL, *test_src = NULL;
    uint32_t n_src = 0, n_test_src = 0;
    uint32_t *test_idx = NULL;
    if (qlr_data_open_tokenizer(o.base_model, o.chat_template, &tok, &tmpl) != QLR_OK) goto done;
    if (qlr_train_data_sources(&o, NULL, &src, &n_src) != QLR_OK) goto done;
    if (qlr_train_test_sources(&o, &test_src, &n_test_src) != QLR_OK) goto done;
    qlr_data_params dp;
    qlr_train_data_params(&o, &dp);
    dp.progress = 1;
    if (qlr_dataset_load(src, n_src, &dp, tok, tmpl, &ds) != QLR_OK) goto done;
    if (qlr_dataset_split(ds, o.val_set_size, o.seed, &split) != QLR_OK) goto done;
    if (n_test_src && qlr_dataset_load(test_src, n_test_src, &dp, tok, tmpl, &test_ds) != QLR_OK) goto done;

    printf("model %s, sequence_len %u, train_on_inputs %s, sample_packing %s\n", o.base_model, o.sequence_len,
           o.train_on_inputs ? "true" : "false", o.sample_packing ? "true" : "false");
    for (uint32_t i = 0; i < n_src + n_test_src; i++) {
        const qlr_data_source *d = i < n_src ? &src[i] : &test_src[i - n_src];
        char buf[96];
        printf("%s.%u %s (%s): %s\n", i < n_src ? "datasets" : "test_datasets", i < n_src ? i : i - n_src, d->path,
               qlr_data_format_name(d->format), formatting(d->format, tmpl, buf, sizeof buf));
    }
    if (n_show > 0)
        printf("%s\n", color ? "legend: \033[2mdim = masked (no loss)\033[0m, \033[32mgreen = trained\033[0m"
                             : "legend: [[...]] = masked (no loss); the rest is trained");
    size_t n = qlr_dataset_size(ds);
    for (size_t i = 0; i < n && (long)i < n_show; i++) {
        qlr_example e = qlr_dataset_get(ds, i);
        size_t trained = 0;
        for (uint32_t t = 1; t < e.n; t++) trained += e.labels[t] != QLR_LABEL_IGNORE;
        printf("\n--- example %zu  (%s:%llu, %u tokens, %zu trained) ---\n", i + 1, src[e.source].path,
               (unsigned long long)e.line, e.n, trained);
        print_marked(tok, &e, color);
    }

    qlr_batch_params bp;
    qlr_train_batch_params(&o, 1, &bp);
    if (qlr_batcher_create(ds, split.train, split.n_train, &bp, &bt) != QLR_OK) goto done;
    bp.shuffle = 0;
    size_t n_val = test_ds ? qlr_dataset_size(test_ds) : split.n_val;
    if (test_ds) {
        test_idx = malloc((n_val ? n_val : 1) * sizeof *test_idx);
        if (!test_idx) {
            qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            goto done;
        }
        for (size_t i = 0; i < n_val; i++) test_idx[i] = (uint32_t)i;
        if (n_val && qlr_batcher_create(test_ds, test_idx, n_val, &bp, &bv) != QLR_OK) goto done;
    } else if (n_val && qlr_batcher_create(ds, split.val, n_val, &bp, &bv) != QLR_OK) goto done;
    const qlr_data_stats *s = qlr_dataset_stats(ds);
    printf("\n");
    printf("lines            %llu\n", (unsigned long long)s->lines);
    printf("examples         %llu  (train %zu, validation %zu%s)\n", (unsigned long long)s->examples, split.n_train,
           n_val, test_ds ? " from test_datasets" : "");
    printf("tokens           %llu  (longest example %llu)\n", (unsigned long long)s->tokens,
           (unsigned long long)s->longest);
    printf("trainable tokens %llu  (%.1f%%)\n", (unsigned long long)s->trainable,
           s->tokens ? 100.0 * (double)s->trainable / (double)s->tokens : 0.0);
    printf("truncated        %llu  (truncation: %s)\n", (unsigned long long)s->truncated,
           o.drop_long ? "drop" : "truncate");
    printf("dropped          %llu longer than sequence_len, %llu with nothing to train on\n",
           (unsigned long long)s->dropped_long, (unsigned long long)s->dropped_empty);
    printf("skipped lines    %llu\n", (unsigned long long)s->skipped);
    printf("train rows       %llu x %u tokens, %llu micro-batches of %u per epoch, %s efficiency %.1f%%\n",
           (unsigned long long)qlr_batcher_rows_per_epoch(bt), o.sequence_len,
           (unsigned long long)qlr_batcher_batches_per_epoch(bt), o.micro_batch_size,
           o.sample_packing ? "packing" : "padding", 100.0 * qlr_batcher_efficiency(bt));
    if (bv)
        printf("validation rows  %llu, %llu micro-batches, efficiency %.1f%%\n",
               (unsigned long long)qlr_batcher_rows_per_epoch(bv), (unsigned long long)qlr_batcher_batches_per_epoch(bv),
               100.0 * qlr_batcher_efficiency(bv));
    rc = 0;
done:
    if (rc) qlr_cli_fail("data");
    qlr_batcher_free(bt);
    qlr_batcher_free(bv);
    qlr_data_split_free(&split);
    qlr_dataset_free(ds);
    qlr_dataset_free(test_ds);
    free(test_idx);
    qlr_chat_template_free(tmpl);
    qlr_tokenizer_free(tok);
    free(src);
    free(test_src);
    qlr_train_opts_free(&o);
    return rc;
}

static int cmd_data(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "preview")) return qlr_cli_usage_error("data", "unknown action '%s' (known: preview)", argv[1]);
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *recipe = NULL;
    const char *sets[MAX_SETS];
    int n_sets = 0, color = isatty(STDOUT_FILENO) && !getenv("NO_COLOR");
    long n_show = 3;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--color")) color = 1;
        else if (!strcmp(a, "--plain")) color = 0;
        else if (!strcmp(a, "--set") || !strcmp(a, "-n")) {
            if (i + 1 >= argc) return qlr_cli_usage_error("data", "%s needs a value", a);
            const char *v = argv[++i];
            if (a[1] == 'n') {
                char *end;
                n_show = strtol(v, &end, 10);
                if (*end || end == v || n_show < 0) return qlr_cli_usage_error("data", "-n %s: expected a count >= 0", v);
            } else if (n_sets == MAX_SETS) return qlr_cli_usage_error("data", "more than %d --set", MAX_SETS);
            else sets[n_sets++] = v;
        } else if (!strncmp(a, "--set=", 6)) {
            if (n_sets == MAX_SETS) return qlr_cli_usage_error("data", "more than %d --set", MAX_SETS);
            sets[n_sets++] = a + 6;
        } else if (a[0] == '-' && a[1]) return qlr_cli_usage_error("data", "unknown option '%s'", a);
        else if (recipe) return qlr_cli_usage_error("data", "one recipe only (got '%s' and '%s')", recipe, a);
        else recipe = a;
    }
    if (!recipe) return qlr_cli_usage_error("data", "missing RECIPE (e.g. recipes/smollm2-quickstart.yaml)");
    return preview(recipe, sets, n_sets, n_show, color);
}

const qlr_cli_cmd qlr_cmd_data = {"data", "preview a recipe's datasets: masked examples, counts, packing", cmd_data};
