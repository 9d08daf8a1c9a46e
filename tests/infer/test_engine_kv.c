/* tests/infer/test_engine_kv.c: the engine's KV block manager (infer/engine_kv.c) on its own:
 * admission reserves every block a sequence may need and refuses what does not fit (the caller
 * waits), blocks are taken lazily, release returns them; the prefix cache finds full blocks of a
 * prompt for the same key only (another key, another first block: no hit), never the block of the
 * last prompt token, prefers uncached free blocks, reuses the least recently freed cached block
 * first (a chain's leaves before its root), and a block computed twice at once stays private. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/engine_internal.h"
#include "tests/test_util.h"

static qlr_kvm_stats stats(const qlr_kvm *m) {
    qlr_kvm_stats s;
    qlr_kvm_get_stats(m, &s);
    return s;
}

/* admit + ensure(prompt) + register(prompt), as the engine does for a computed prompt */
static int run_prompt(qlr_kvm *m, qlr_kvm_seq *s, uint64_t key, const int32_t *tok, int32_t n,
                      int32_t total, int32_t *cached) {
    int ok = 0;
    CHECK_OK(qlr_kvm_admit(m, s, key, tok, n, total, &ok, cached));
    if (!ok) return 0;
    qlr_kvm_ensure(m, s, n);
    qlr_kvm_register(m, s, key, tok, n, n);
    return 1;
}

static void test_reservation(void) {
    qlr_kvm *m = NULL;
    CHECK_OK(qlr_kvm_create(10, 4, 1, &m));
    if (!m) return;
    CHECK_EQ_INT(qlr_kvm_blocks_for(m, 0), 0);
    CHECK_EQ_INT(qlr_kvm_blocks_for(m, 9), 3);
    int32_t tok[40];
    for (int i = 0; i < 40; i++) tok[i] = 100 + i;
    qlr_kvm_seq a = {0}, b = {0};
    int ok = 0;
    int32_t cached = -1;
    /* a: 6 tokens of prompt, up to 24 positions: 6 blocks reserved, 2 taken so far */
    CHECK_OK(qlr_kvm_admit(m, &a, 1, tok, 6, 24, &ok, &cached));
    CHECK(ok && cached == 0);
    qlr_kvm_ensure(m, &a, 6);
    CHECK_EQ_INT(a.n, 2);
    CHECK_EQ_INT(stats(m).used, 2);
    CHECK_EQ_INT(stats(m).committed, 4);
    /* b needs 5 blocks: 10 free - 2 used - 4 promised = 4 < 5: refused, nothing changes */
    CHECK_OK(qlr_kvm_admit(m, &b, 2, tok, 5, 20, &ok, &cached));
    CHECK(!ok && b.n == 0 && b.reserved == 0);
    CHECK_EQ_INT(stats(m).committed, 4);
    /* ... but 4 blocks fit */
    qlr_kvm_seq c = {0};
    CHECK_OK(qlr_kvm_admit(m, &c, 2, tok, 5, 16, &ok, &cached));
    CHECK(ok);
    qlr_kvm_ensure(m, &a, 24); /* a reaches its end: every reserved block taken */
    CHECK_EQ_INT(a.n, 6);
    CHECK_EQ_INT(a.reserved, 0);
    CHECK_EQ_INT(stats(m).used, 6);
    qlr_kvm_release(m, &c);
    qlr_kvm_release(m, &a);
    CHECK(a.n == 0 && a.ids == NULL);
    CHECK_EQ_INT(stats(m).used, 0);
    CHECK_EQ_INT(stats(m).committed, 0);
    CHECK_OK(qlr_kvm_admit(m, &b, 2, tok, 5, 20, &ok, &cached));
    CHECK(ok);
    qlr_kvm_release(m, &b);
    /* a sequence as large as the pool fits an empty pool */
    CHECK_OK(qlr_kvm_admit(m, &b, 3, tok, 40, 40, &ok, &cached));
    CHECK(ok);
    qlr_kvm_release(m, &b);
    qlr_kvm_free(m);
}

static void test_prefix(void) {
    qlr_kvm *m = NULL;
    CHECK_OK(qlr_kvm_create(12, 4, 1, &m));
    if (!m) return;
    int32_t t[16], u[16];
    for (int i = 0; i < 16; i++) t[i] = u[i] = 7 * i + 1;
    u[5] = 999; /* u shares only t's first block */
    qlr_kvm_seq a = {0}, b = {0};
    int32_t cached = -1;
    /* a: a 13-token prompt: blocks 0..2 full, cached after its release */
    CHECK(run_prompt(m, &a, 42, t, 13, 16, &cached));
    CHECK_EQ_INT(cached, 0);
    int32_t a_ids[4];
    memcpy(a_ids, a.ids, sizeof a_ids[0] * (size_t)a.n);
    qlr_kvm_release(m, &a);
    CHECK_EQ_INT(stats(m).used, 0);
    CHECK_EQ_INT(stats(m).cached_free, 3);
    /* the same prompt and key: 3 blocks (12 tokens) reused, the same blocks */
    CHECK(run_prompt(m, &b, 42, t, 13, 16, &cached));
    CHECK_EQ_INT(cached, 12);
    CHECK(b.n == 4 && b.ids[0] == a_ids[0] && b.ids[1] == a_ids[1] && b.ids[2] == a_ids[2]);
    CHECK_EQ_INT(stats(m).cached_free, 0);
    CHECK_EQ_INT(stats(m).used, 4);
    /* a second user of the same blocks while b holds them (shared, referenced twice) */
    qlr_kvm_seq c = {0};
    CHECK(run_prompt(m, &c, 42, t, 14, 16, &cached));
    CHECK_EQ_INT(cached, 12);
    CHECK_EQ_INT(stats(m).used, 5); /* 3 shared + b's and c's own last blocks */
    qlr_kvm_release(m, &c);
    qlr_kvm_release(m, &b);
    /* another key: nothing; a prompt whose second block differs: the first block only */
    CHECK(run_prompt(m, &c, 43, t, 13, 16, &cached));
    CHECK_EQ_INT(cached, 0);
    qlr_kvm_release(m, &c);
    CHECK(run_prompt(m, &c, 42, u, 13, 16, &cached));
    CHECK_EQ_INT(cached, 4);
    qlr_kvm_release(m, &c);
    /* a 12-token prompt (3 full blocks): the block of its last token is computed again */
    CHECK(run_prompt(m, &c, 42, t, 12, 16, &cached));
    CHECK_EQ_INT(cached, 8);
    qlr_kvm_release(m, &c);
    /* without prefix caching nothing is ever found */
    qlr_kvm *m0 = NULL;
    CHECK_OK(qlr_kvm_create(12, 4, 0, &m0));
    CHECK(run_prompt(m0, &c, 42, t, 13, 16, &cached));
    qlr_kvm_release(m0, &c);
    CHECK(run_prompt(m0, &c, 42, t, 13, 16, &cached));
    CHECK_EQ_INT(cached, 0);
    qlr_kvm_release(m0, &c);
    qlr_kvm_free(m0);
    qlr_kvm_free(m);
}

/* Uncached free blocks go first; then the least recently freed cached block, so a chain loses its
 * last block first and its first blocks stay findable. */
static void test_lru(void) {
    qlr_kvm *m = NULL;
    CHECK_OK(qlr_kvm_create(6, 2, 1, &m));
    if (!m) return;
    int32_t t[8] = {1, 2, 3, 4, 5, 6, 7, 8}, other[12];
    for (int i = 0; i < 12; i++) other[i] = 50 + i;
    qlr_kvm_seq a = {0}, b = {0};
    int32_t cached;
    CHECK(run_prompt(m, &a, 9, t, 7, 8, &cached)); /* blocks 0..2 full and cached, 3 private */
    qlr_kvm_release(m, &a);
    CHECK_EQ_INT(stats(m).cached_free, 3);
    /* 3 blocks for other content: the 3 uncached free blocks (2 never used + a's last) first */
    CHECK(run_prompt(m, &b, 10, other, 5, 6, &cached));
    CHECK_EQ_INT(stats(m).cached_free, 3);
    CHECK_EQ_INT(stats(m).evictions, 0);
    qlr_kvm_release(m, &b); /* b's 2 full blocks join the cached list, after a's */
    CHECK(run_prompt(m, &b, 11, other, 1, 2, &cached)); /* takes the uncached block */
    qlr_kvm_seq c = {0};
    CHECK(run_prompt(m, &c, 11, other + 2, 1, 2, &cached)); /* evicts a's block 2 (freed first) */
    CHECK_EQ_INT(stats(m).evictions, 1);
    qlr_kvm_release(m, &c);
    qlr_kvm_release(m, &b);
    CHECK(run_prompt(m, &a, 9, t, 7, 8, &cached));
    CHECK_EQ_INT(cached, 4); /* blocks 0 and 1 of the chain survived */
    qlr_kvm_release(m, &a);
    qlr_kvm_free(m);
}

/* Two sequences computing the same prompt at once: the second one's block stays private, and the
 * chain found afterwards is the first one's. */
static void test_duplicate(void) {
    qlr_kvm *m = NULL;
    CHECK_OK(qlr_kvm_create(8, 2, 1, &m));
    if (!m) return;
    int32_t t[5] = {3, 1, 4, 1, 5};
    qlr_kvm_seq a = {0}, b = {0}, c = {0};
    int ok;
    int32_t cached;
    CHECK_OK(qlr_kvm_admit(m, &a, 1, t, 5, 5, &ok, &cached));
    CHECK_OK(qlr_kvm_admit(m, &b, 1, t, 5, 5, &ok, &cached));
    CHECK_EQ_INT(cached, 0);
    qlr_kvm_ensure(m, &a, 5);
    qlr_kvm_ensure(m, &b, 5);
    qlr_kvm_register(m, &a, 1, t, 5, 5);
    qlr_kvm_register(m, &b, 1, t, 5, 5);
    int32_t a0 = a.ids[0], a1 = a.ids[1];
    qlr_kvm_release(m, &b);
    CHECK_EQ_INT(stats(m).cached_free, 0); /* b's blocks were never entered */
    CHECK(run_prompt(m, &c, 1, t, 5, 5, &cached));
    CHECK(cached == 4 && c.ids[0] == a0 && c.ids[1] == a1);
    qlr_kvm_release(m, &c);
    qlr_kvm_release(m, &a);
    CHECK_EQ_INT(stats(m).cached_free, 2);
    qlr_kvm_free(m);
}

int main(void) {
    qlr_kvm *m = NULL;
    CHECK(qlr_kvm_create(0, 16, 1, &m) == QLR_ERR_INVALID && m == NULL);
    test_reservation();
    test_prefix();
    test_lru();
    test_duplicate();
    return test_finish();
}
