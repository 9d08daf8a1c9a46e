/* cli/cmd_data.c: `qlora data preview RECIPE [--set key=value]... [-n N] [--color|--plain]`.
 * Loads the recipe's datasets exactly as the trainer will (tokenizer and chat template of the
 * base model, masking, truncation, split, packing) and prints N examples with the masked text
 * marked, then the counts. Owns only the recipe -> data/ conversion and the printing; the work
 * is data/dataset.h and data/pack.h. */
#include "cli/cli.h"
#include "core/core.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "train/recipe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_SETS 256
#define PATH_CAP 4096

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

/* Dataset path -> the file to open: a file as is; a folder -> <split>.jsonl, else .jsonl.gz. */
static qlr_status dataset_file(const qlr_recipe *r, const qlr_recipe_dataset *d, char *out, size_t cap) {
    QLR_TRY(qlr_recipe_resolve(r, d->path, out, cap));
    if (!qlr_is_dir(out)) return QLR_OK;
    size_t n = strlen(out);
    const char *split = d->split && *d->split ? d->split : "train";
    if (n + strlen(split) + 12 > cap) return qlr_errorf(QLR_ERR_RANGE, "%s: path too long", d->path);
    snprintf(out + n, cap - n, "/%s.jsonl", split);
    if (qlr_path_exists(out)) return QLR_OK;
    snprintf(out + n, cap - n, "/%s.jsonl.gz", split);
    if (qlr_path_exists(out)) return QLR_OK;
    out[n] = 0;
    return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: folder holds neither %s.jsonl nor %s.jsonl.gz", out, split, split);
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
    qlr_recipe r;
    if (qlr_recipe_load(recipe, sets, n_sets, &r) != QLR_OK) return qlr_cli_fail("data");
    int rc = 1;
    qlr_tokenizer *tok = NULL;
    qlr_chat_template *tmpl = NULL;
    qlr_dataset *ds = NULL;
    qlr_batcher *bt = NULL, *bv = NULL;
    qlr_data_split split = {0};
    char(*paths)[PATH_CAP] = calloc(r.n_datasets, sizeof *paths);
    qlr_data_source *src = calloc(r.n_datasets, sizeof *src);
    char model[PATH_CAP];
    if (!paths || !src) {
        qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (qlr_recipe_resolve(&r, r.base_model, model, sizeof model) != QLR_OK) goto done;
    if (qlr_data_open_tokenizer(model, r.chat_template, &tok, &tmpl) != QLR_OK) goto done;
    for (uint32_t i = 0; i < r.n_datasets; i++) {
        const qlr_recipe_dataset *d = &r.datasets[i];
        if (dataset_file(&r, d, paths[i], PATH_CAP) != QLR_OK) goto done;
        src[i] = (qlr_data_source){paths[i], (qlr_data_format)d->type, d->field, d->field_messages,
                                   d->message_field_role, d->message_field_content,
                                   d->on_bad_line == QLR_ON_BAD_LINE_SKIP};
    }
    qlr_data_params dp = qlr_data_params_default();
    dp.sequence_len = r.sequence_len;
    dp.train_on_inputs = r.train_on_inputs;
    dp.drop_long = r.truncation == QLR_TRUNCATION_DROP;
    dp.progress = 1;
    if (qlr_dataset_load(src, r.n_datasets, &dp, tok, tmpl, &ds) != QLR_OK) goto done;
    if (qlr_dataset_split(ds, r.val_set_size, r.seed, &split) != QLR_OK) goto done;

    printf("model %s, chat template %s, sequence_len %u, train_on_inputs %s, sample_packing %s\n", model,
           tmpl ? qlr_chat_template_name(tmpl) : "(none)", r.sequence_len, r.train_on_inputs ? "true" : "false",
           r.sample_packing ? "true" : "false");
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

    qlr_batch_params bp = qlr_batch_params_default();
    bp.micro_batch_size = r.micro_batch_size;
    bp.sequence_len = r.sequence_len;
    bp.packing = r.sample_packing;
    bp.seed = r.seed;
    bp.pad_id = qlr_tokenizer_pad(tok) >= 0 ? qlr_tokenizer_pad(tok) : qlr_tokenizer_eos(tok) >= 0 ? qlr_tokenizer_eos(tok) : 0;
    if (qlr_batcher_create(ds, split.train, split.n_train, &bp, &bt) != QLR_OK) goto done;
    if (split.n_val) {
        bp.shuffle = 0;
        if (qlr_batcher_create(ds, split.val, split.n_val, &bp, &bv) != QLR_OK) goto done;
    }
    const qlr_data_stats *s = qlr_dataset_stats(ds);
    printf("\n");
    printf("lines            %llu\n", (unsigned long long)s->lines);
    printf("examples         %llu  (train %zu, validation %zu)\n", (unsigned long long)s->examples, split.n_train,
           split.n_val);
    printf("tokens           %llu  (longest example %llu)\n", (unsigned long long)s->tokens,
           (unsigned long long)s->longest);
    printf("trainable tokens %llu  (%.1f%%)\n", (unsigned long long)s->trainable,
           s->tokens ? 100.0 * (double)s->trainable / (double)s->tokens : 0.0);
    printf("truncated        %llu  (truncation: %s)\n", (unsigned long long)s->truncated,
           r.truncation == QLR_TRUNCATION_DROP ? "drop" : "truncate");
    printf("dropped          %llu longer than sequence_len, %llu with nothing to train on\n",
           (unsigned long long)s->dropped_long, (unsigned long long)s->dropped_empty);
    printf("skipped lines    %llu\n", (unsigned long long)s->skipped);
    printf("train rows       %llu x %u tokens, %llu micro-batches of %u per epoch, %s efficiency %.1f%%\n",
           (unsigned long long)qlr_batcher_rows_per_epoch(bt), r.sequence_len,
           (unsigned long long)qlr_batcher_batches_per_epoch(bt), r.micro_batch_size,
           r.sample_packing ? "packing" : "padding", 100.0 * qlr_batcher_efficiency(bt));
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
    qlr_chat_template_free(tmpl);
    qlr_tokenizer_free(tok);
    free(paths);
    free(src);
    qlr_recipe_free(&r);
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
