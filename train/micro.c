/* train/micro.c: a data batch (rows of sequence_len, padded or packed) turned into the model's
 * varlen micro-batch: the examples back to back, padding dropped, sequence ids 0..n-1. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "train/trainer_internal.h"

void qlr_micro_free(qlr_micro *mb) {
    free(mb->tokens);
    free(mb->targets);
    free(mb->pos);
    free(mb->seq);
    memset(mb, 0, sizeof *mb);
}

qlr_status qlr_micro_from_batch(qlr_micro *mb, const qlr_data_batch *b) {
    int64_t need = 0;
    for (uint32_t s = 0; s < b->n_seqs; s++) need += b->seq_lengths[s];
    if (need > INT32_MAX) return qlr_errorf(QLR_ERR_RANGE, "micro-batch of %lld tokens", (long long)need);
    if (need > mb->cap) {
        int32_t cap = (int32_t)need;
        int32_t *t = realloc(mb->tokens, sizeof(int32_t) * (size_t)cap);
        if (t) mb->tokens = t;
        int32_t *g = realloc(mb->targets, sizeof(int32_t) * (size_t)cap);
        if (g) mb->targets = g;
        int32_t *p = realloc(mb->pos, sizeof(int32_t) * (size_t)cap);
        if (p) mb->pos = p;
        int32_t *q = realloc(mb->seq, sizeof(int32_t) * (size_t)cap);
        if (q) mb->seq = q;
        if (!t || !g || !p || !q) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        mb->cap = cap;
    }
    int32_t n = 0;
    int64_t nt = 0;
    for (uint32_t s = 0; s < b->n_seqs; s++) {
        uint32_t off = b->seq_offsets[s], len = b->seq_lengths[s];
        for (uint32_t j = 0; j < len; j++) {
            mb->tokens[n] = b->input_ids[off + j];
            mb->targets[n] = b->targets[off + j];
            mb->pos[n] = b->positions[off + j];
            mb->seq[n] = (int32_t)s;
            nt += mb->targets[n] >= 0;
            n++;
        }
    }
    mb->n = n;
    mb->n_seq = (int32_t)b->n_seqs;
    mb->n_targets = nt;
    return QLR_OK;
}

qlr_train_batch qlr_micro_view(const qlr_micro *mb) {
    qlr_train_batch tb = {mb->n, mb->tokens, mb->targets, mb->pos, mb->seq, mb->n_seq};
    return tb;
}

