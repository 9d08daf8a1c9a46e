/* infer/engine_kv.c: the KV block manager of the engine: which block of the paged pool
 * (model/kv_paged.c) each sequence holds, reference counts, reservations, and the prefix cache.
 *
 * Admission reserves every block a request can ever need (prompt + max_tokens), so a running
 * request never waits for a block and nothing is preempted; the blocks themselves are taken
 * lazily as positions are reached, so free blocks keep their cached prefixes as long as possible.
 *
 * Prefix cache: a full prompt block whose K/V is computed is entered in a hash table under
 * (key = adapter identity and scale, parent block and the parent's generation, the block's
 * tokens). The parent link makes a match exact for the whole chain: a block's generation is
 * bumped each time it is handed out anew, so a child whose parent was reused for other content
 * can never match again. Lookups compare the stored key, parent and tokens, never only the hash.
 * A block with no references stays in the table (the LRU list of free cached blocks, least
 * recently freed first) until it is taken for new content; a sequence frees its blocks last
 * block first, so a chain's root is evicted after its leaves. Host memory only. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/engine_internal.h"

typedef struct kblock {
    int32_t ref;
    int32_t hnext;       /* next block in its hash bucket (-1: none) */
    int32_t prev, next;  /* the LRU list of free cached blocks */
    int32_t parent;      /* cached: the block before it in its chain (-1: the first block) */
    uint32_t parent_gen; /* the parent's generation when it was cached */
    uint32_t gen;        /* bumped each time the block is handed out anew */
    int hashed;          /* in the hash table (holds a cached prefix) */
    uint64_t key, hash;
} kblock;

struct qlr_kvm {
    int32_t n_blocks, block;
    int prefix;
    kblock *b;
    int32_t *tokens;     /* [n_blocks * block] the tokens of each cached block */
    int32_t *plain;      /* stack of free blocks without a cached prefix */
    int32_t n_plain;
    int32_t lru_head, lru_tail, n_lru;
    int32_t *bucket;     /* [n_bucket] first block of each chain, -1 */
    uint32_t n_bucket;   /* a power of two */
    int32_t committed, used;
    uint64_t evictions;
};

uint64_t qlr_kvm_mix(uint64_t h, uint64_t v) {
    uint64_t z = h ^ (v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

qlr_status qlr_kvm_create(int32_t n_blocks, int32_t block, int prefix_cache, qlr_kvm **out) {
    *out = NULL;
    if (n_blocks < 1 || block < 1)
        return qlr_errorf(QLR_ERR_INVALID, "KV blocks: %d blocks of %d tokens", n_blocks, block);
    qlr_kvm *m = calloc(1, sizeof *m);
    if (!m) return qlr_errorf(QLR_ERR_NOMEM, "KV block manager");
    m->n_blocks = n_blocks;
    m->block = block;
    m->prefix = prefix_cache;
    m->n_bucket = 1;
    while (m->n_bucket < 2u * (uint32_t)n_blocks) m->n_bucket <<= 1;
    m->b = calloc((size_t)n_blocks, sizeof *m->b);
    m->plain = malloc((size_t)n_blocks * sizeof *m->plain);
    m->bucket = malloc((size_t)m->n_bucket * sizeof *m->bucket);
    m->tokens = prefix_cache ? malloc((size_t)n_blocks * (size_t)block * sizeof *m->tokens) : NULL;
    if (!m->b || !m->plain || !m->bucket || (prefix_cache && !m->tokens)) {
        qlr_kvm_free(m);
        return qlr_errorf(QLR_ERR_NOMEM, "KV block manager of %d blocks", n_blocks);
    }
    for (uint32_t i = 0; i < m->n_bucket; i++) m->bucket[i] = -1;
    /* the stack hands out block 0 first */
    for (int32_t i = 0; i < n_blocks; i++) {
        m->plain[i] = n_blocks - 1 - i;
        m->b[i].hnext = m->b[i].prev = m->b[i].next = m->b[i].parent = -1;
    }
    m->n_plain = n_blocks;
    m->lru_head = m->lru_tail = -1;
    *out = m;
    return QLR_OK;
}

void qlr_kvm_free(qlr_kvm *m) {
    if (!m) return;
    free(m->b);
    free(m->plain);
    free(m->bucket);
    free(m->tokens);
    free(m);
}

void qlr_kvm_get_stats(const qlr_kvm *m, qlr_kvm_stats *s) {
    s->total = m->n_blocks;
    s->used = m->used;
    s->cached_free = m->n_lru;
    s->committed = m->committed;
    s->evictions = m->evictions;
}

int32_t qlr_kvm_block(const qlr_kvm *m) { return m->block; }

int32_t qlr_kvm_blocks_for(const qlr_kvm *m, int64_t n_tokens) {
    return (int32_t)((n_tokens + m->block - 1) / m->block);
}

/* ---- the hash table ---- */

static uint64_t block_hash(uint64_t key, int32_t parent, uint32_t pgen, const int32_t *tok,
                           int32_t n) {
    uint64_t h = qlr_kvm_mix(key, (uint64_t)(uint32_t)parent);
    h = qlr_kvm_mix(h, pgen);
    for (int32_t i = 0; i < n; i++) h = qlr_kvm_mix(h, (uint64_t)(uint32_t)tok[i]);
    return h;
}

static int32_t lookup(const qlr_kvm *m, uint64_t key, int32_t parent, uint32_t pgen,
                      const int32_t *tok) {
    uint64_t h = block_hash(key, parent, pgen, tok, m->block);
    for (int32_t id = m->bucket[h & (m->n_bucket - 1)]; id >= 0; id = m->b[id].hnext) {
        const kblock *b = &m->b[id];
        if (b->hash == h && b->key == key && b->parent == parent && b->parent_gen == pgen &&
            !memcmp(m->tokens + (int64_t)id * m->block, tok, (size_t)m->block * sizeof *tok))
            return id;
    }
    return -1;
}

static void hash_insert(qlr_kvm *m, int32_t id, uint64_t key, int32_t parent, uint32_t pgen,
                        const int32_t *tok) {
    kblock *b = &m->b[id];
    b->key = key;
    b->parent = parent;
    b->parent_gen = pgen;
    b->hash = block_hash(key, parent, pgen, tok, m->block);
    memcpy(m->tokens + (int64_t)id * m->block, tok, (size_t)m->block * sizeof *tok);
    int32_t *head = &m->bucket[b->hash & (m->n_bucket - 1)];
    b->hnext = *head;
    *head = id;
    b->hashed = 1;
}

static void hash_remove(qlr_kvm *m, int32_t id) {
    kblock *b = &m->b[id];
    int32_t *p = &m->bucket[b->hash & (m->n_bucket - 1)];
    while (*p != id) {
        QLR_ASSERT(*p >= 0);
        p = &m->b[*p].hnext;
    }
    *p = b->hnext;
    b->hnext = -1;
    b->hashed = 0;
}

/* ---- the LRU list of free cached blocks ---- */

static void lru_remove(qlr_kvm *m, int32_t id) {
    kblock *b = &m->b[id];
    if (b->prev >= 0) m->b[b->prev].next = b->next;
    else m->lru_head = b->next;
    if (b->next >= 0) m->b[b->next].prev = b->prev;
    else m->lru_tail = b->prev;
    b->prev = b->next = -1;
    m->n_lru--;
}

static void lru_append(qlr_kvm *m, int32_t id) {
    kblock *b = &m->b[id];
    b->prev = m->lru_tail;
    b->next = -1;
    if (m->lru_tail >= 0) m->b[m->lru_tail].next = id;
    else m->lru_head = id;
    m->lru_tail = id;
    m->n_lru++;
}

/* A free block for new content: one without a cached prefix, else the least recently freed
 * cached one (its cache entry goes). */
static int32_t take(qlr_kvm *m) {
    int32_t id;
    if (m->n_plain > 0) {
        id = m->plain[--m->n_plain];
    } else {
        QLR_ASSERT(m->n_lru > 0);
        id = m->lru_head;
        lru_remove(m, id);
        hash_remove(m, id);
        m->evictions++;
    }
    kblock *b = &m->b[id];
    QLR_ASSERT(b->ref == 0);
    b->gen++;
    b->ref = 1;
    m->used++;
    return id;
}

/* ---- sequences ---- */

static qlr_status seq_reserve(qlr_kvm_seq *s, int32_t cap) {
    if (s->cap >= cap) return QLR_OK;
    int32_t *p = realloc(s->ids, (size_t)cap * sizeof *p);
    if (!p) return qlr_errorf(QLR_ERR_NOMEM, "KV block list of %d blocks", cap);
    s->ids = p;
    s->cap = cap;
    return QLR_OK;
}

qlr_status qlr_kvm_admit(qlr_kvm *m, qlr_kvm_seq *s, uint64_t key, const int32_t *tokens,
                         int32_t n_prompt, int32_t n_total, int *admitted, int32_t *n_cached) {
    *admitted = 0;
    *n_cached = 0;
    QLR_ASSERT(s->n == 0 && s->reserved == 0 && n_prompt >= 1 && n_total >= n_prompt);
    int32_t total = qlr_kvm_blocks_for(m, n_total);
    QLR_TRY(seq_reserve(s, total));
    int32_t hits = 0, hits_free = 0, parent = -1;
    uint32_t pgen = 0;
    int32_t max_hits = m->prefix ? (n_prompt - 1) / m->block : 0;
    while (hits < max_hits) {
        int32_t id = lookup(m, key, parent, pgen, tokens + (int64_t)hits * m->block);
        if (id < 0) break;
        s->ids[hits++] = id;
        hits_free += m->b[id].ref == 0;
        parent = id;
        pgen = m->b[id].gen;
    }
    int32_t need = total - hits;
    if (m->n_plain + m->n_lru - m->committed < need + hits_free) return QLR_OK;
    for (int32_t i = 0; i < hits; i++) {
        kblock *b = &m->b[s->ids[i]];
        if (b->ref++ == 0) {
            lru_remove(m, s->ids[i]);
            m->used++;
        }
    }
    s->n = hits;
    s->n_registered = hits;
    s->reserved = need;
    m->committed += need;
    *admitted = 1;
    *n_cached = hits * m->block;
    return QLR_OK;
}

void qlr_kvm_ensure(qlr_kvm *m, qlr_kvm_seq *s, int32_t n_tokens) {
    int32_t want = qlr_kvm_blocks_for(m, n_tokens);
    QLR_ASSERT(want <= s->cap);
    while (s->n < want) {
        QLR_ASSERT(s->reserved > 0);
        s->ids[s->n++] = take(m);
        s->reserved--;
        m->committed--;
    }
}

void qlr_kvm_register(qlr_kvm *m, qlr_kvm_seq *s, uint64_t key, const int32_t *tokens,
                      int32_t n_computed, int32_t n_prompt) {
    if (!m->prefix) return;
    int32_t lim = n_computed < n_prompt ? n_computed : n_prompt;
    int32_t full = lim / m->block;
    if (full > s->n) full = s->n;
    for (int32_t i = s->n_registered; i < full; i++) {
        int32_t id = s->ids[i], parent = i > 0 ? s->ids[i - 1] : -1;
        uint32_t pgen = parent >= 0 ? m->b[parent].gen : 0;
        const int32_t *tok = tokens + (int64_t)i * m->block;
        if (m->b[id].hashed) continue;               /* a hit, cached already */
        if (parent >= 0 && !m->b[parent].hashed) break; /* lookups could never reach it */
        if (lookup(m, key, parent, pgen, tok) >= 0) continue; /* computed twice: stays private */
        hash_insert(m, id, key, parent, pgen, tok);
    }
    if (full > s->n_registered) s->n_registered = full;
}

void qlr_kvm_release(qlr_kvm *m, qlr_kvm_seq *s) {
    for (int32_t i = s->n - 1; i >= 0; i--) {
        int32_t id = s->ids[i];
        kblock *b = &m->b[id];
        QLR_ASSERT(b->ref > 0);
        if (--b->ref > 0) continue;
        m->used--;
        if (b->hashed) lru_append(m, id);
        else m->plain[m->n_plain++] = id;
    }
    m->committed -= s->reserved;
    QLR_ASSERT(m->committed >= 0);
    free(s->ids);
    memset(s, 0, sizeof *s);
}
