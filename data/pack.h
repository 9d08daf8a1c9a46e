/* data/pack.h: the order examples are trained in — seeded shuffles, sample packing into rows of
 * sequence_len, and the micro-batch iterator the trainer pulls from (resumable from a cursor).
 * The seeded streams are data/rng.h's.
 *
 * Packing: first-fit decreasing. Each epoch's examples (already shuffled) are stably sorted by
 * length, longest first, and each goes into the first row (in opening order) with room; then
 * the rows are shuffled. Because FFD depends only on the multiset of lengths, every epoch has
 * the same number of rows. Does not own tokenization (data/dataset.h). */
#ifndef QLR_DATA_PACK_H
#define QLR_DATA_PACK_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "data/dataset.h"
#include "data/rng.h"

/* Rows of a packing: row r holds items[row_start[r] .. row_start[r+1]) (example indices). */
typedef struct qlr_packing {
    uint32_t *items;          /* [n_items] example indices, row by row */
    size_t *row_start;        /* [n_rows + 1] */
    size_t n_rows, n_items;
    uint64_t n_tokens;        /* tokens in all rows */
    uint32_t row_len;
} qlr_packing;

/* First-fit decreasing of examples[0..n) of `ds` into rows of `row_len` tokens (ties keep the
 * given order). Every example must be <= row_len tokens (QLR_ERR_RANGE naming it otherwise).
 * O(n log n). Free with qlr_packing_free. */
qlr_status qlr_pack_ffd(const qlr_dataset *ds, const uint32_t *examples, size_t n, uint32_t row_len,
                        qlr_packing *out);
void qlr_packing_free(qlr_packing *p);
/* Tokens / (rows * row_len), in [0, 1]. */
double qlr_packing_efficiency(const qlr_packing *p);

/* ---- the micro-batch iterator ---- */

typedef struct qlr_batch_params {
    uint32_t micro_batch_size; /* rows per batch (default 1) */
    uint32_t sequence_len;     /* tokens per row (default: the dataset's sequence_len) */
    int packing;               /* 1: several examples per row (FFD); 0: one example per row, padded */
    int shuffle;               /* 1 (default): a new seeded order each epoch; 0: load order (eval) */
    uint64_t seed;             /* recipe seed */
    int32_t pad_id;            /* input id written in padding (default 0; labels are -100 there) */
} qlr_batch_params;

qlr_batch_params qlr_batch_params_default(void);

/* Where the iterator stands: the next batch is number `batch` of epoch `epoch` (both from 0).
 * The trainer checkpoints this pair; seeking to it replays exactly the same batches. */
typedef struct qlr_data_cursor {
    uint64_t epoch;
    uint64_t batch;
} qlr_data_cursor;

/* One micro-batch, [rows × seq_len] row-major; arrays owned by the batcher, valid until the
 * next qlr_batcher_next. Attention must stay within a sequence: use seq_ids (or the
 * seq_offsets / seq_lengths list); positions restart at 0 for every example. */
typedef struct qlr_data_batch {
    uint32_t rows, seq_len;    /* micro_batch_size × sequence_len */
    uint32_t n_valid_rows;     /* rows holding data; the last batch of an epoch may pad whole rows */
    const int32_t *input_ids;  /* [rows*seq_len] pad_id in padding */
    const int32_t *labels;     /* [rows*seq_len] aligned with input_ids (HF); -100 masked or padding */
    const int32_t *targets;    /* [rows*seq_len] the token position t must predict (labels[t+1] of the
                                  same example), -100 where no loss: at each example's last token,
                                  masked tokens and padding. The cross-entropy uses this. */
    const int32_t *positions;  /* [rows*seq_len] 0.. within each example; 0 in padding */
    const int32_t *seq_ids;    /* [rows*seq_len] example number within this batch (0..n_seqs-1,
                                  unique across rows); -1 in padding */
    uint32_t n_seqs;           /* examples in the batch */
    const uint32_t *seq_offsets; /* [n_seqs] first token of each example in the flattened batch */
    const uint32_t *seq_lengths; /* [n_seqs] its length */
    const uint32_t *example_ids; /* [n_seqs] dataset index of each example */
    uint64_t n_tokens;         /* real (non-padding) tokens */
    uint64_t n_targets;        /* targets != -100 (loss terms) */
    qlr_data_cursor cursor;    /* the position of THIS batch */
} qlr_data_batch;

typedef struct qlr_batcher qlr_batcher;

/* An iterator over examples[0..n) of `ds` (e.g. qlr_data_split.train); the list is copied. The
 * cursor starts at {0, 0}. Errors: QLR_ERR_INVALID for an empty list, zero sizes, or an example
 * longer than sequence_len (the dataset was loaded with a larger one). */
qlr_status qlr_batcher_create(const qlr_dataset *ds, const uint32_t *examples, size_t n,
                              const qlr_batch_params *p, qlr_batcher **out);
void qlr_batcher_free(qlr_batcher *b);

/* Rows and micro-batches in every epoch (ceil(rows / micro_batch_size)). */
uint64_t qlr_batcher_rows_per_epoch(const qlr_batcher *b);
uint64_t qlr_batcher_batches_per_epoch(const qlr_batcher *b);
/* Real tokens / (rows_per_epoch * sequence_len): the packing (or padding) efficiency. */
double qlr_batcher_efficiency(const qlr_batcher *b);

qlr_data_cursor qlr_batcher_cursor(const qlr_batcher *b);
/* Moves to `c`; batch == batches_per_epoch means the start of the next epoch. QLR_ERR_RANGE
 * for a batch beyond that. */
qlr_status qlr_batcher_seek(qlr_batcher *b, qlr_data_cursor c);
/* Fills *out with the batch at the cursor and advances it (into the next epoch at the end of
 * one: the iterator never ends; the trainer counts epochs). Fails only on allocation. */
qlr_status qlr_batcher_next(qlr_batcher *b, qlr_data_batch *out);

#endif
