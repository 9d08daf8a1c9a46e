/* tests/data/test_dataset_pack.c: shuffling, splitting, packing and batching on generated
 * pretokenized datasets (a tiny in-memory vocabulary; no model needed): positions restart per
 * example, no row exceeds sequence_len, every example appears exactly once per epoch, targets
 * are the next label of the same example, shuffles are deterministic per seed and differ
 * between seeds, a resumed iterator yields the same remaining batches, val split sizes. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "tests/test_util.h"

#define VOCAB 512

static qlr_tokenizer *tiny_tokenizer(void) {
    static char text[VOCAB][16];
    qlr_str toks[VOCAB];
    for (int i = 0; i < VOCAB; i++) {
        snprintf(text[i], sizeof text[i], "<0x%02X>", i & 255);
        if (i >= 256) snprintf(text[i], sizeof text[i], "w%d", i);
        toks[i] = (qlr_str){text[i], strlen(text[i])};
    }
    int32_t types[VOCAB];
    for (int i = 0; i < VOCAB; i++) types[i] = i < 256 ? QLR_TOKTYPE_BYTE : QLR_TOKTYPE_NORMAL;
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.kind = QLR_TOK_SPM;
    sp.n_vocab = VOCAB;
    sp.tokens = toks;
    sp.token_types = types;
    sp.add_bos = 0;
    qlr_tokenizer *t = NULL;
    CHECK_OK(qlr_tokenizer_create(&sp, &t));
    return t;
}

/* n examples of random lengths in [3, max_len]; ids encode (example, position) so that a
 * batch can be checked against its source; the first 2 labels of each example are masked. */
static const char *write_dataset(const char *name, int n, int max_len, uint64_t seed) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), name);
    FILE *f = fopen(path, "w");
    uint64_t s = seed;
    for (int i = 0; i < n; i++) {
        int len = 3 + (int)(test_rng_u64(&s) % (uint64_t)(max_len - 2));
        fprintf(f, "{\"input_ids\": [");
        for (int t = 0; t < len; t++) fprintf(f, "%s%d", t ? ", " : "", 256 + (i * 7 + t) % 256);
        fprintf(f, "], \"labels\": [");
        for (int t = 0; t < len; t++) fprintf(f, "%s%d", t ? ", " : "", t < 2 ? -100 : 256 + (i * 7 + t) % 256);
        fprintf(f, "]}\n");
    }
    fclose(f);
    return path;
}

static qlr_dataset *load_pt(qlr_tokenizer *tok, const char *path, uint32_t seq_len) {
    qlr_data_source s = {0};
    s.path = path;
    s.format = QLR_DATA_PRETOKENIZED;
    qlr_data_params p = qlr_data_params_default();
    p.sequence_len = seq_len;
    qlr_dataset *ds = NULL;
    CHECK_OK(qlr_dataset_load(&s, 1, &p, tok, NULL, &ds));
    return ds;
}

static void test_rng(void) {
    /* splitmix64 reference values (seed 0: first output 0xe220a8397b1dcdaf) */
    uint64_t st = 0;
    CHECK(qlr_data_rng_next(&st) == 0xe220a8397b1dcdafULL);
    CHECK(qlr_data_rng_next(&st) == 0x6e789e6aa1b965f4ULL);
    /* bounded draws stay in range and hit every value */
    st = 7;
    int seen[5] = {0};
    for (int i = 0; i < 1000; i++) {
        uint64_t v = qlr_data_rng_below(&st, 5);
        CHECK_MSG(v < 5, "draw %llu", (unsigned long long)v);
        if (v < 5) seen[v] = 1;
    }
    CHECK(seen[0] && seen[1] && seen[2] && seen[3] && seen[4]);
    /* a permutation is a permutation; same seed same order; different seed different order */
    uint32_t a[100], b[100], c[100];
    for (int i = 0; i < 100; i++) a[i] = b[i] = c[i] = (uint32_t)i;
    qlr_data_permute(a, 100, qlr_data_rng_seed(42, QLR_RNG_STREAM_EPOCH, 0));
    qlr_data_permute(b, 100, qlr_data_rng_seed(42, QLR_RNG_STREAM_EPOCH, 0));
    qlr_data_permute(c, 100, qlr_data_rng_seed(43, QLR_RNG_STREAM_EPOCH, 0));
    CHECK(!memcmp(a, b, sizeof a));
    CHECK(memcmp(a, c, sizeof a) != 0);
    int cnt[100] = {0}, ok = 1;
    for (int i = 0; i < 100; i++) cnt[a[i]]++;
    for (int i = 0; i < 100; i++) ok &= cnt[i] == 1;
    CHECK(ok);
}

static void test_split(qlr_tokenizer *tok) {
    qlr_dataset *ds = load_pt(tok, write_dataset("split.jsonl", 50, 10, 1), 64);
    if (!ds) return;
    qlr_data_split s, s2, s3;
    CHECK_OK(qlr_dataset_split(ds, 0.1, 42, &s));
    CHECK_EQ_INT(s.n_val, 5);
    CHECK_EQ_INT(s.n_train, 45);
    int seen[50] = {0}, ok = 1;
    for (size_t i = 0; i < s.n_val; i++) seen[s.val[i]]++;
    for (size_t i = 0; i < s.n_train; i++) seen[s.train[i]]++;
    for (int i = 0; i < 50; i++) ok &= seen[i] == 1;
    CHECK_MSG(ok, "train and val must partition the examples");
    for (size_t i = 1; i < s.n_train; i++) CHECK(s.train[i - 1] < s.train[i]);
    CHECK_OK(qlr_dataset_split(ds, 0.1, 42, &s2));
    CHECK(s2.n_val == 5 && !memcmp(s.val, s2.val, 5 * sizeof *s.val));
    CHECK_OK(qlr_dataset_split(ds, 0.1, 7, &s3));
    CHECK(memcmp(s.val, s3.val, 5 * sizeof *s.val) != 0);
    qlr_data_split_free(&s);
    qlr_data_split_free(&s2);
    qlr_data_split_free(&s3);
    CHECK_OK(qlr_dataset_split(ds, 0.05, 42, &s)); /* ceil(2.5) */
    CHECK_EQ_INT(s.n_val, 3);
    qlr_data_split_free(&s);
    CHECK_OK(qlr_dataset_split(ds, 7, 42, &s)); /* an absolute count */
    CHECK_EQ_INT(s.n_val, 7);
    CHECK_EQ_INT(s.n_train, 43);
    qlr_data_split_free(&s);
    CHECK_OK(qlr_dataset_split(ds, 0, 42, &s));
    CHECK(s.n_val == 0 && s.n_train == 50);
    qlr_data_split_free(&s);
    CHECK(qlr_dataset_split(ds, 50, 42, &s) == QLR_ERR_RANGE);
    CHECK(qlr_dataset_split(ds, 2.5, 42, &s) == QLR_ERR_RANGE);
    qlr_dataset_free(ds);
}

/* Checks one epoch of batches: shapes, positions, seq ids, targets, each example once. */
static void check_epoch(const qlr_dataset *ds, const uint32_t *ex, size_t n, const qlr_batch_params *p) {
    qlr_batcher *b;
    CHECK_OK(qlr_batcher_create(ds, ex, n, p, &b));
    if (!b) return;
    int *seen = calloc(qlr_dataset_size(ds), sizeof *seen);
    uint64_t nb = qlr_batcher_batches_per_epoch(b), tokens = 0, rows = 0;
    int ok_pos = 1, ok_seq = 1, ok_tgt = 1, ok_ids = 1, ok_pad = 1;
    for (uint64_t k = 0; k < nb; k++) {
        qlr_data_batch bt;
        CHECK_OK(qlr_batcher_next(b, &bt));
        CHECK(bt.cursor.epoch == 0 && bt.cursor.batch == k);
        CHECK(bt.rows == p->micro_batch_size && bt.seq_len == p->sequence_len);
        rows += bt.n_valid_rows;
        for (uint32_t s = 0; s < bt.n_seqs; s++) {
            uint32_t off = bt.seq_offsets[s], len = bt.seq_lengths[s];
            qlr_example e = qlr_dataset_get(ds, bt.example_ids[s]);
            seen[bt.example_ids[s]]++;
            /* an example never crosses a row end */
            CHECK(off / p->sequence_len == (off + len - 1) / p->sequence_len);
            CHECK(len == e.n);
            for (uint32_t t = 0; t < len; t++) {
                ok_pos &= bt.positions[off + t] == (int32_t)t;
                ok_seq &= bt.seq_ids[off + t] == (int32_t)s;
                ok_ids &= bt.input_ids[off + t] == e.ids[t] && bt.labels[off + t] == e.labels[t];
                ok_tgt &= bt.targets[off + t] == (t + 1 < len ? e.labels[t + 1] : QLR_LABEL_IGNORE);
            }
            tokens += len;
        }
        size_t real = 0;
        for (size_t i = 0; i < (size_t)bt.rows * bt.seq_len; i++) {
            if (bt.seq_ids[i] >= 0) real++;
            else ok_pad &= bt.labels[i] == QLR_LABEL_IGNORE && bt.targets[i] == QLR_LABEL_IGNORE &&
                           bt.input_ids[i] == p->pad_id;
        }
        CHECK_EQ_INT(real, bt.n_tokens);
        if (p->packing == 0) CHECK(bt.n_seqs == bt.n_valid_rows);
    }
    CHECK(ok_pos && ok_seq && ok_ids && ok_tgt && ok_pad);
    int once = 1;
    for (size_t i = 0; i < n; i++) once &= seen[ex[i]] == 1;
    CHECK_MSG(once, "every example exactly once per epoch");
    CHECK_EQ_INT(rows, qlr_batcher_rows_per_epoch(b));
    CHECK_NEAR(qlr_batcher_efficiency(b), (double)tokens / ((double)rows * p->sequence_len), 1e-12, 0);
    /* the next batch starts epoch 1 */
    qlr_data_batch bt;
    CHECK_OK(qlr_batcher_next(b, &bt));
    CHECK(bt.cursor.epoch == 1 && bt.cursor.batch == 0);
    free(seen);
    qlr_batcher_free(b);
}

static void test_packing(qlr_tokenizer *tok) {
    qlr_dataset *ds = load_pt(tok, write_dataset("pack.jsonl", 300, 64, 2), 64);
    if (!ds) return;
    size_t n = qlr_dataset_size(ds);
    CHECK_EQ_INT(n, 300);
    uint32_t *all = malloc(n * sizeof *all);
    for (size_t i = 0; i < n; i++) all[i] = (uint32_t)i;

    /* FFD: no row over the limit, every item once, rows near the lower bound */
    qlr_packing pk;
    CHECK_OK(qlr_pack_ffd(ds, all, n, 64, &pk));
    uint64_t total = 0;
    int ok = 1, *seen = calloc(n, sizeof *seen);
    for (size_t r = 0; r < pk.n_rows; r++) {
        uint64_t used = 0;
        for (size_t k = pk.row_start[r]; k < pk.row_start[r + 1]; k++) {
            used += qlr_dataset_get(ds, pk.items[k]).n;
            seen[pk.items[k]]++;
        }
        ok &= used <= 64 && used > 0;
        total += used;
    }
    CHECK_MSG(ok, "a row over sequence_len or empty");
    for (size_t i = 0; i < n; i++) CHECK(seen[i] == 1);
    CHECK_EQ_INT(total, pk.n_tokens);
    CHECK(pk.n_rows * 64 >= total && pk.n_rows < n);
    CHECK(qlr_packing_efficiency(&pk) > 0.9); /* FFD on uniform lengths packs tightly */
    qlr_packing_free(&pk);
    free(seen);

    qlr_batch_params p = qlr_batch_params_default();
    p.sequence_len = 64;
    p.micro_batch_size = 3;
    p.pad_id = 5;
    p.seed = 11;
    p.packing = 1;
    check_epoch(ds, all, n, &p);
    p.packing = 0;
    check_epoch(ds, all, n, &p);
    p.shuffle = 0;
    check_epoch(ds, all, 17, &p);
    /* a subset (a split's train list) */
    p.packing = 1;
    p.shuffle = 1;
    check_epoch(ds, all + 100, 57, &p);
    /* a row length below an example's is refused */
    p.sequence_len = 8;
    qlr_batcher *b = NULL;
    CHECK(qlr_batcher_create(ds, all, n, &p, &b) == QLR_ERR_INVALID);
    free(all);
    qlr_dataset_free(ds);
}

static int batch_eq(const qlr_data_batch *a, const qlr_data_batch *b) {
    size_t c = (size_t)a->rows * a->seq_len;
    return a->rows == b->rows && a->n_seqs == b->n_seqs && a->cursor.epoch == b->cursor.epoch &&
           a->cursor.batch == b->cursor.batch && !memcmp(a->input_ids, b->input_ids, c * 4) &&
           !memcmp(a->targets, b->targets, c * 4) && !memcmp(a->positions, b->positions, c * 4) &&
           !memcmp(a->seq_ids, b->seq_ids, c * 4) && !memcmp(a->example_ids, b->example_ids, a->n_seqs * 4);
}

/* Batch sequences as a hash per batch. */
static void run(qlr_batcher *b, int n, uint64_t *h) {
    for (int i = 0; i < n; i++) {
        qlr_data_batch bt;
        CHECK_OK(qlr_batcher_next(b, &bt));
        uint64_t x = 1469598103934665603ULL;
        for (uint32_t s = 0; s < bt.n_seqs; s++) x = (x ^ bt.example_ids[s]) * 1099511628211ULL;
        h[i] = x ^ bt.cursor.batch;
    }
}

static void test_shuffle_and_resume(qlr_tokenizer *tok) {
    qlr_dataset *ds = load_pt(tok, write_dataset("resume.jsonl", 120, 40, 3), 64);
    if (!ds) return;
    uint32_t all[120];
    for (int i = 0; i < 120; i++) all[i] = (uint32_t)i;
    for (int packing = 0; packing < 2; packing++) {
        qlr_batch_params p = qlr_batch_params_default();
        p.sequence_len = 64;
        p.micro_batch_size = 4;
        p.packing = packing;
        p.seed = 42;
        qlr_batcher *a, *b, *c;
        CHECK_OK(qlr_batcher_create(ds, all, 120, &p, &a));
        CHECK_OK(qlr_batcher_create(ds, all, 120, &p, &b));
        p.seed = 43;
        CHECK_OK(qlr_batcher_create(ds, all, 120, &p, &c));
        if (!a || !b || !c) return;
        uint64_t nb = qlr_batcher_batches_per_epoch(a);
        int total = (int)(3 * nb + 2); /* three epochs and a bit */
        uint64_t *ha = calloc((size_t)total, 8), *hb = calloc((size_t)total, 8), *hc = calloc((size_t)total, 8);
        run(a, total, ha);
        run(b, total, hb);
        run(c, total, hc);
        CHECK_MSG(!memcmp(ha, hb, (size_t)total * 8), "same seed, same batches");
        CHECK_MSG(memcmp(ha, hc, (size_t)nb * 8) != 0, "another seed, another order");
        CHECK_MSG(memcmp(ha, ha + nb, (size_t)nb * 8) != 0, "epochs differ");
        CHECK_EQ_INT(qlr_batcher_cursor(a).epoch, 3);
        CHECK_EQ_INT(qlr_batcher_cursor(a).batch, 2);

        /* resume: a fresh batcher seeked to the cursor after k batches yields the rest */
        p.seed = 42;
        int ks[] = {0, 1, (int)nb - 1, (int)nb, (int)nb + 3, 2 * (int)nb + 1};
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
            int k = ks[ki];
            qlr_batcher *x, *y;
            CHECK_OK(qlr_batcher_create(ds, all, 120, &p, &x));
            CHECK_OK(qlr_batcher_create(ds, all, 120, &p, &y));
            uint64_t *tmp = calloc((size_t)total, 8);
            if (k) run(x, k, tmp);
            qlr_data_cursor cur = qlr_batcher_cursor(x);
            CHECK_OK(qlr_batcher_seek(y, cur));
            int same = 1;
            for (int i = k; i < total; i++) {
                qlr_data_batch bx, by;
                CHECK_OK(qlr_batcher_next(x, &bx));
                /* copy x's batch before y overwrites nothing of it (separate batchers) */
                CHECK_OK(qlr_batcher_next(y, &by));
                same &= batch_eq(&bx, &by);
            }
            CHECK_MSG(same, "resume after %d batches (packing %d)", k, packing);
            free(tmp);
            qlr_batcher_free(x);
            qlr_batcher_free(y);
        }
        /* a cursor past the end of an epoch is refused; the end itself is the next epoch */
        qlr_data_cursor bad = {0, nb + 1}, end = {0, nb};
        CHECK(qlr_batcher_seek(a, bad) == QLR_ERR_RANGE);
        CHECK_OK(qlr_batcher_seek(a, end));
        CHECK(qlr_batcher_cursor(a).epoch == 1 && qlr_batcher_cursor(a).batch == 0);
        free(ha);
        free(hb);
        free(hc);
        qlr_batcher_free(a);
        qlr_batcher_free(b);
        qlr_batcher_free(c);
    }
    qlr_dataset_free(ds);
}

int main(void) {
    qlr_tokenizer *tok = tiny_tokenizer();
    test_rng();
    if (tok) {
        test_split(tok);
        test_packing(tok);
        test_shuffle_and_resume(tok);
    }
    qlr_tokenizer_free(tok);
    return test_finish();
}
