/* infer/engine_text.c: one request's output text. Each generated token's bytes go through the
 * streaming detokeniser (data/tokenizer.h qlr_tok_stream: a character split across tokens is
 * held until complete), then into a hold buffer that keeps back only what could still be the
 * start of a stop string; everything before that is emitted at once. A stop string is found
 * wherever it falls across token boundaries; the text before its first occurrence is emitted
 * and the match and anything after it never are. Each emitted piece carries the ids of the
 * tokens whose text it completes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/engine_internal.h"

qlr_status qlr_etext_init(qlr_etext *t, const qlr_tokenizer *tok, const char *const *stop,
                          int32_t n_stop) {
    memset(t, 0, sizeof *t);
    t->tok = tok;
    if (n_stop > 0) {
        t->stop = calloc((size_t)n_stop, sizeof *t->stop);
        t->stop_len = calloc((size_t)n_stop, sizeof *t->stop_len);
        if (!t->stop || !t->stop_len) goto nomem;
        t->n_stop = n_stop;
        for (int32_t i = 0; i < n_stop; i++) {
            QLR_ASSERT(stop[i] && stop[i][0]);
            t->stop_len[i] = strlen(stop[i]);
            t->stop[i] = malloc(t->stop_len[i] + 1);
            if (!t->stop[i]) goto nomem;
            memcpy(t->stop[i], stop[i], t->stop_len[i] + 1);
        }
    }
    return QLR_OK;
nomem:
    qlr_etext_free(t);
    return qlr_errorf(QLR_ERR_NOMEM, "stop strings");
}

void qlr_etext_free(qlr_etext *t) {
    for (int32_t i = 0; i < t->n_stop; i++) free(t->stop[i]);
    free(t->stop);
    free(t->stop_len);
    free(t->hold);
    free(t->ids);
    free(t->id_end);
    free(t->piece);
    memset(t, 0, sizeof *t);
}

static qlr_status grow(void **p, size_t *cap, size_t want, size_t elem) {
    if (want <= *cap) return QLR_OK;
    size_t c = *cap ? *cap : 64;
    while (c < want) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return qlr_errorf(QLR_ERR_NOMEM, "output text of %zu bytes", want);
    *p = q;
    *cap = c;
    return QLR_OK;
}

#define INCOMPLETE SIZE_MAX /* id_end of a token whose character is not complete yet */

/* ids and id_end share one capacity. */
static qlr_status grow_ids(qlr_etext *t, size_t want) {
    if (want <= t->cap_ids) return QLR_OK;
    size_t c = t->cap_ids ? 2 * t->cap_ids : 16;
    while (c < want) c *= 2;
    int32_t *a = realloc(t->ids, c * sizeof *a);
    if (!a) return qlr_errorf(QLR_ERR_NOMEM, "output token list");
    t->ids = a;
    size_t *b = realloc(t->id_end, c * sizeof *b);
    if (!b) return qlr_errorf(QLR_ERR_NOMEM, "output token list");
    t->id_end = b;
    t->cap_ids = c;
    return QLR_OK;
}

static qlr_status hold_append(qlr_etext *t, const char *s, size_t n) {
    QLR_TRY(grow((void **)&t->hold, &t->cap_hold, t->n_hold + n, 1));
    memcpy(t->hold + t->n_hold, s, n);
    t->n_hold += n;
    return QLR_OK;
}

/* Emits hold[0..len) with the ids whose text ends within it, and drops them. */
static void emit_front(qlr_etext *t, size_t len, qlr_etext_emit_fn emit, void *ud) {
    if (len == 0) return; /* ids of empty text wait for the next piece */
    size_t k = 0;
    while (k < t->n_ids && t->id_end[k] <= len) k++;
    emit(ud, t->hold, len, t->ids, k);
    memmove(t->hold, t->hold + len, t->n_hold - len);
    t->n_hold -= len;
    memmove(t->ids, t->ids + k, (t->n_ids - k) * sizeof *t->ids);
    for (size_t i = k; i < t->n_ids; i++)
        t->id_end[i - k] = t->id_end[i] == INCOMPLETE ? INCOMPLETE : t->id_end[i] - len;
    t->n_ids -= k;
}

/* First occurrence of any stop string in hold: its offset, or -1. */
static int64_t find_stop(const qlr_etext *t) {
    int64_t best = -1;
    for (int32_t i = 0; i < t->n_stop; i++) {
        size_t L = t->stop_len[i];
        for (size_t p = 0; p + L <= t->n_hold && (best < 0 || (int64_t)p < best); p++)
            if (t->hold[p] == t->stop[i][0] && !memcmp(t->hold + p, t->stop[i], L)) {
                best = (int64_t)p;
                break;
            }
    }
    return best;
}

/* Bytes at the end of hold that are a proper prefix of some stop string (kept back). */
static size_t stop_prefix_tail(const qlr_etext *t) {
    size_t keep = 0;
    for (int32_t i = 0; i < t->n_stop; i++) {
        size_t L = t->stop_len[i] - 1; /* a whole match would have been found */
        if (L > t->n_hold) L = t->n_hold;
        for (size_t k = L; k > keep; k--)
            if (!memcmp(t->hold + t->n_hold - k, t->stop[i], k)) {
                keep = k;
                break;
            }
    }
    return keep;
}

qlr_status qlr_etext_push(qlr_etext *t, int32_t id, qlr_etext_emit_fn emit, void *ud,
                          int *stopped) {
    *stopped = 0;
    size_t plen = 0;
    qlr_tokenizer_piece(t->tok, id, &plen);
    QLR_TRY(grow((void **)&t->piece, &t->cap_piece, 4 * plen + 8, 1));
    size_t n = qlr_tok_stream_push(t->tok, &t->ts, id, QLR_DEC_SKIP_SPECIAL, t->piece, t->cap_piece);
    QLR_ASSERT(n <= t->cap_piece); /* 4 * piece + 8 always suffices (data/tokenizer.h) */
    QLR_TRY(hold_append(t, t->piece, n));
    QLR_TRY(grow_ids(t, t->n_ids + 1));
    /* a token whose last bytes wait in the detokeniser for the rest of their character is
     * complete when that character is: ends of such tokens are set by the push that completes it */
    for (size_t i = t->n_ids; i > 0 && t->id_end[i - 1] == INCOMPLETE && n > 0; i--)
        t->id_end[i - 1] = t->n_hold;
    t->ids[t->n_ids] = id;
    t->id_end[t->n_ids] = t->ts.n_pending ? INCOMPLETE : t->n_hold;
    t->n_ids++;
    int64_t at = find_stop(t);
    if (at >= 0) {
        emit_front(t, (size_t)at, emit, ud);
        t->n_hold = 0;
        t->n_ids = 0;
        *stopped = 1;
        return QLR_OK;
    }
    size_t len = t->n_hold - stop_prefix_tail(t);
    /* never split a character (a stop string need not start on a character boundary) */
    while (len > 0 && len < t->n_hold && ((unsigned char)t->hold[len] & 0xC0) == 0x80) len--;
    emit_front(t, len, emit, ud);
    return QLR_OK;
}

qlr_status qlr_etext_finish(qlr_etext *t, qlr_etext_emit_fn emit, void *ud) {
    char tail[4];
    size_t n = qlr_tok_stream_flush(&t->ts, tail, sizeof tail);
    QLR_TRY(hold_append(t, tail, n));
    for (size_t i = 0; i < t->n_ids; i++)
        if (t->id_end[i] == INCOMPLETE) t->id_end[i] = t->n_hold;
    emit_front(t, t->n_hold, emit, ud);
    return QLR_OK;
}
