/* data/pack.c: seeded shuffles (splitmix64), first-fit-decreasing packing and the resumable
 * micro-batch iterator of data/pack.h. An epoch's plan (order of examples, then rows) is a
 * pure function of (seed, epoch), recomputed when the iterator enters an epoch, so seeking to
 * a cursor needs no history. */
#include "data/pack.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

/* ------------------------------------------------------------------ packing */

void qlr_packing_free(qlr_packing *p) {
    free(p->items);
    free(p->row_start);
    memset(p, 0, sizeof *p);
}

double qlr_packing_efficiency(const qlr_packing *p) {
    return p->n_rows ? (double)p->n_tokens / ((double)p->n_rows * p->row_len) : 0.0;
}

typedef struct sort_key {
    uint32_t len, pos, id;
} sort_key;

static int cmp_key(const void *a, const void *b) {
    const sort_key *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1; /* longest first */
    return (x->pos > y->pos) - (x->pos < y->pos);          /* stable */
}

qlr_status qlr_pack_ffd(const qlr_dataset *ds, const uint32_t *examples, size_t n, uint32_t row_len,
                        qlr_packing *out) {
    memset(out, 0, sizeof *out);
    out->row_len = row_len;
    if (n == 0) {
        out->row_start = calloc(1, sizeof *out->row_start);
        return out->row_start ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    /* segment tree over n bins: the maximum free space in each subtree; a leaf never opened has
     * row_len free, so "the leftmost bin with room" is first fit with new rows opened in order */
    size_t leaves = 1;
    while (leaves < n) leaves *= 2;
    sort_key *keys = malloc(n * sizeof *keys);
    uint32_t *tree = malloc(2 * leaves * sizeof *tree);
    uint32_t *bin_of = malloc(n * sizeof *bin_of);       /* per sorted item */
    size_t *count = calloc(n + 1, sizeof *count);
    out->items = malloc(n * sizeof *out->items);
    qlr_status st = QLR_OK;
    if (!keys || !tree || !bin_of || !count || !out->items) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        qlr_example e = qlr_dataset_get(ds, examples[i]);
        if (e.n > row_len || e.n == 0) {
            st = qlr_errorf(QLR_ERR_RANGE, "example %u (source %u line %llu) has %u tokens, rows hold %u", examples[i],
                            e.source, (unsigned long long)e.line, e.n, row_len);
            goto done;
        }
        keys[i] = (sort_key){e.n, (uint32_t)i, examples[i]};
        out->n_tokens += e.n;
    }
    qsort(keys, n, sizeof *keys, cmp_key);
    for (size_t i = 0; i < leaves; i++) tree[leaves + i] = i < n ? row_len : 0;
    for (size_t i = leaves - 1; i >= 1; i--) tree[i] = tree[2 * i] > tree[2 * i + 1] ? tree[2 * i] : tree[2 * i + 1];
    size_t n_rows = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t len = keys[i].len;
        size_t node = 1;
        while (node < leaves) node = tree[2 * node] >= len ? 2 * node : 2 * node + 1;
        size_t bin = node - leaves;
        QLR_ASSERT(bin < n && tree[node] >= len);
        tree[node] -= len;
        for (node /= 2; node >= 1; node /= 2)
            tree[node] = tree[2 * node] > tree[2 * node + 1] ? tree[2 * node] : tree[2 * node + 1];
        bin_of[i] = (uint32_t)bin;
        count[bin + 1]++;
        if (bin + 1 > n_rows) n_rows = bin + 1;
    }
    out->row_start = malloc((n_rows + 1) * sizeof *out->row_start);
    if (!out->row_start) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    out->row_start[0] = 0;
    for (size_t r = 0; r < n_rows; r++) out->row_start[r + 1] = out->row_start[r] + count[r + 1];
    memset(count, 0, (n + 1) * sizeof *count); /* now: fill level per row */
    for (size_t i = 0; i < n; i++) {
        uint32_t b = bin_of[i];
        out->items[out->row_start[b] + count[b]++] = keys[i].id;
    }
    out->n_rows = n_rows;
    out->n_items = n;
done:
    free(keys);
    free(tree);
    free(bin_of);
    free(count);
    if (st) qlr_packing_free(out);
    return st;
}

/* ------------------------------------------------------------------ the batcher */

struct qlr_batcher {
    const qlr_dataset *ds;
    qlr_batch_params p;
    uint32_t *examples;        /* [n] as given */
    size_t n;
    uint64_t rows_per_epoch, batches_per_epoch, n_tokens;
    qlr_data_cursor cur;
    /* the plan of epoch plan_epoch: rows of examples */
    int have_plan;
    uint64_t plan_epoch;
    qlr_packing plan;
    uint32_t *row_order;       /* [n_rows] */
    /* batch buffers */
    int32_t *ids, *labels, *targets, *pos, *seq;
    uint32_t *seq_off, *seq_len, *ex_ids;
    size_t seq_cap;
};

qlr_batch_params qlr_batch_params_default(void) {
    qlr_batch_params p = {.micro_batch_size = 1, .sequence_len = 0, .packing = 0, .shuffle = 1, .seed = 42, .pad_id = 0};
    return p;
}

/* Builds the rows of epoch `e`: shuffle examples, then pack (or one per row), then shuffle rows. */
static qlr_status make_plan(qlr_batcher *b, uint64_t e) {
    if (b->have_plan && b->plan_epoch == e) return QLR_OK;
    qlr_packing_free(&b->plan);
    free(b->row_order);
    b->row_order = NULL;
    b->have_plan = 0;
    uint32_t *order = malloc(b->n * sizeof *order);
    if (!order) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    memcpy(order, b->examples, b->n * sizeof *order);
    if (b->p.shuffle) qlr_data_permute(order, b->n, qlr_data_rng_seed(b->p.seed, QLR_RNG_STREAM_EPOCH, e));
    qlr_status st = QLR_OK;
    if (b->p.packing) {
        st = qlr_pack_ffd(b->ds, order, b->n, b->p.sequence_len, &b->plan);
        free(order);
        if (st) return st;
    } else {
        qlr_packing *pk = &b->plan;
        pk->items = order;
        pk->row_start = malloc((b->n + 1) * sizeof *pk->row_start);
        if (!pk->row_start) {
            qlr_packing_free(pk);
            return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        }
        for (size_t i = 0; i <= b->n; i++) pk->row_start[i] = i;
        pk->n_rows = pk->n_items = b->n;
        pk->row_len = b->p.sequence_len;
        for (size_t i = 0; i < b->n; i++) pk->n_tokens += qlr_dataset_get(b->ds, order[i]).n;
    }
    b->row_order = malloc((b->plan.n_rows ? b->plan.n_rows : 1) * sizeof *b->row_order);
    if (!b->row_order) {
        qlr_packing_free(&b->plan);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    for (size_t r = 0; r < b->plan.n_rows; r++) b->row_order[r] = (uint32_t)r;
    if (b->p.shuffle && b->p.packing)
        qlr_data_permute(b->row_order, b->plan.n_rows, qlr_data_rng_seed(b->p.seed, QLR_RNG_STREAM_ROWS, e));
    /* FFD depends only on the lengths, so the row count is the same in every epoch */
    QLR_ASSERT(!b->rows_per_epoch || b->plan.n_rows == b->rows_per_epoch);
    b->have_plan = 1;
    b->plan_epoch = e;
    return QLR_OK;
}

void qlr_batcher_free(qlr_batcher *b) {
    if (!b) return;
    free(b->examples);
    qlr_packing_free(&b->plan);
    free(b->row_order);
    free(b->ids);
    free(b->labels);
    free(b->targets);
    free(b->pos);
    free(b->seq);
    free(b->seq_off);
    free(b->seq_len);
    free(b->ex_ids);
    free(b);
}

qlr_status qlr_batcher_create(const qlr_dataset *ds, const uint32_t *examples, size_t n, const qlr_batch_params *p,
                              qlr_batcher **out) {
    *out = NULL;
    if (n == 0) return qlr_errorf(QLR_ERR_INVALID, "no examples to batch");
    if (p->micro_batch_size == 0) return qlr_errorf(QLR_ERR_INVALID, "micro_batch_size must be >= 1");
    qlr_batcher *b = calloc(1, sizeof *b);
    if (!b) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    b->ds = ds;
    b->p = *p;
    if (!b->p.sequence_len) b->p.sequence_len = qlr_dataset_sequence_len(ds);
    b->n = n;
    b->examples = malloc(n * sizeof *b->examples);
    uint64_t cells = 0;
    qlr_status st = QLR_OK;
    if (!b->examples || !qlr_mul_ok(b->p.micro_batch_size, b->p.sequence_len, &cells)) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto fail;
    }
    size_t nds = qlr_dataset_size(ds);
    for (size_t i = 0; i < n; i++) {
        if (examples[i] >= nds) {
            st = qlr_errorf(QLR_ERR_INVALID, "example index %u is outside the dataset (%zu examples)", examples[i], nds);
            goto fail;
        }
        qlr_example e = qlr_dataset_get(ds, examples[i]);
        if (e.n > b->p.sequence_len) {
            st = qlr_errorf(QLR_ERR_INVALID, "example %u has %u tokens, more than sequence_len %u", examples[i], e.n,
                            b->p.sequence_len);
            goto fail;
        }
        b->examples[i] = examples[i];
        b->n_tokens += e.n;
    }
    b->ids = malloc(cells * sizeof *b->ids);
    b->labels = malloc(cells * sizeof *b->labels);
    b->targets = malloc(cells * sizeof *b->targets);
    b->pos = malloc(cells * sizeof *b->pos);
    b->seq = malloc(cells * sizeof *b->seq);
    if (!b->ids || !b->labels || !b->targets || !b->pos || !b->seq) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = make_plan(b, 0))) goto fail;
    b->rows_per_epoch = b->plan.n_rows;
    b->batches_per_epoch = (b->rows_per_epoch + b->p.micro_batch_size - 1) / b->p.micro_batch_size;
    *out = b;
    return QLR_OK;
fail:
    qlr_batcher_free(b);
    return st;
}

uint64_t qlr_batcher_rows_per_epoch(const qlr_batcher *b) { return b->rows_per_epoch; }
uint64_t qlr_batcher_batches_per_epoch(const qlr_batcher *b) { return b->batches_per_epoch; }
double qlr_batcher_efficiency(const qlr_batcher *b) {
    return (double)b->n_tokens / ((double)b->rows_per_epoch * b->p.sequence_len);
}
qlr_data_cursor qlr_batcher_cursor(const qlr_batcher *b) { return b->cur; }

qlr_status qlr_batcher_seek(qlr_batcher *b, qlr_data_cursor c) {
    if (c.batch > b->batches_per_epoch)
        return qlr_errorf(QLR_ERR_RANGE, "data cursor batch %llu: an epoch has %llu batches (was the dataset or "
                                         "micro_batch_size changed since the checkpoint?)",
                          (unsigned long long)c.batch, (unsigned long long)b->batches_per_epoch);
    if (c.batch == b->batches_per_epoch) {
        c.epoch++;
        c.batch = 0;
    }
    b->cur = c;
    return QLR_OK;
}

static qlr_status ensure_seq_cap(qlr_batcher *b, size_t need) {
    if (need <= b->seq_cap) return QLR_OK;
    size_t cap = b->seq_cap ? b->seq_cap : 64;
    while (cap < need) cap *= 2;
    uint32_t *o = realloc(b->seq_off, cap * sizeof *o);
    if (!o) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    b->seq_off = o;
    uint32_t *l = realloc(b->seq_len, cap * sizeof *l);
    if (!l) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    b->seq_len = l;
    uint32_t *x = realloc(b->ex_ids, cap * sizeof *x);
    if (!x) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    b->ex_ids = x;
    b->seq_cap = cap;
    return QLR_OK;
}

qlr_status qlr_batcher_next(qlr_batcher *b, qlr_data_batch *out) {
    if (b->cur.batch >= b->batches_per_epoch) {
        b->cur.epoch++;
        b->cur.batch = 0;
    }
    QLR_TRY(make_plan(b, b->cur.epoch));
    const uint32_t S = b->p.sequence_len, R = b->p.micro_batch_size;
    const size_t cells = (size_t)R * S;
    for (size_t i = 0; i < cells; i++) {
        b->ids[i] = b->p.pad_id;
        b->labels[i] = b->targets[i] = QLR_LABEL_IGNORE;
        b->pos[i] = 0;
        b->seq[i] = -1;
    }
    memset(out, 0, sizeof *out);
    uint64_t row0 = b->cur.batch * R;
    uint32_t valid = 0, n_seqs = 0;
    for (uint32_t r = 0; r < R && row0 + r < b->rows_per_epoch; r++, valid++) {
        uint32_t row = b->row_order[row0 + r];
        size_t at = (size_t)r * S;
        for (size_t k = b->plan.row_start[row]; k < b->plan.row_start[row + 1]; k++) {
            qlr_example e = qlr_dataset_get(b->ds, b->plan.items[k]);
            QLR_ASSERT(at + e.n <= (size_t)(r + 1) * S);
            QLR_TRY(ensure_seq_cap(b, n_seqs + 1));
            b->seq_off[n_seqs] = (uint32_t)at;
            b->seq_len[n_seqs] = e.n;
            b->ex_ids[n_seqs] = b->plan.items[k];
            memcpy(b->ids + at, e.ids, e.n * sizeof *e.ids);
            memcpy(b->labels + at, e.labels, e.n * sizeof *e.labels);
            for (uint32_t t = 0; t < e.n; t++) {
                b->pos[at + t] = (int32_t)t;
                b->seq[at + t] = (int32_t)n_seqs;
                int32_t tg = t + 1 < e.n ? e.labels[t + 1] : QLR_LABEL_IGNORE;
                b->targets[at + t] = tg;
                out->n_targets += tg != QLR_LABEL_IGNORE;
            }
            out->n_tokens += e.n;
            at += e.n;
            n_seqs++;
        }
    }
    out->rows = R;
    out->seq_len = S;
    out->n_valid_rows = valid;
    out->input_ids = b->ids;
    out->labels = b->labels;
    out->targets = b->targets;
    out->positions = b->pos;
    out->seq_ids = b->seq;
    out->n_seqs = n_seqs;
    out->seq_offsets = b->seq_off;
    out->seq_lengths = b->seq_len;
    out->example_ids = b->ex_ids;
    out->cursor = b->cur;
    b->cur.batch++;
    return QLR_OK;
}
