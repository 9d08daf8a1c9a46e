/* adapters/lora.c: the LoRA adapter object: allocation in one block, PEFT-style init from a
 * documented deterministic PRNG, base-model identity and the shape check that refuses an adapter
 * made for another base. The file formats are in lora_gguf.c and lora_peft.c, the run-directory
 * resolution and the format dispatch in lora_load.c (files depend downwards only:
 * lora_load.c -> lora_gguf.c, lora_peft.c -> lora.c).
 *
 * Init PRNG (stable; checkpoints and tests depend on it): for layer L and module id M,
 *   state = mix(seed ^ mix(0x6c6f7261ull + (uint64_t)L * 8 + M))     (mix = splitmix64 finaliser)
 * then each A element in row-major order draws x = splitmix64_next(&state) and
 *   A = (float)((2 * ((x >> 11) * 2^-53) - 1) / sqrt(in)),
 * i.e. U(-1/sqrt(in), 1/sqrt(in)) = torch kaiming_uniform_(a=sqrt(5)) bounds. B = 0. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora_internal.h"
#include "core/core.h"
#include "formats/gguf.h"

qlr_lora_params qlr_lora_params_default(void) {
    qlr_lora_params p;
    memset(&p, 0, sizeof p);
    p.r = 8;
    p.alpha = 16.0;
    p.dropout = 0.0;
    p.use_rslora = 0;
    p.targets = QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V);
    p.seed = 42;
    p.base_model = NULL;
    return p;
}

void qlr_lora_base_from_config(const qlr_model_config *cfg, qlr_lora_base *base) {
    memset(base, 0, sizeof *base);
    snprintf(base->arch, sizeof base->arch, "%s", cfg->arch);
    base->n_layers = cfg->n_layers;
    base->d_model = cfg->d_model;
    base->n_heads = cfg->n_heads;
    base->n_kv_heads = cfg->n_kv_heads;
    base->head_dim = cfg->head_dim;
    base->d_ff = cfg->d_ff;
}

void qlr_lora_base_from_loaded(const qlr_model *m, qlr_lora_base *base) {
    qlr_lora_base_from_config(&m->cfg, base);
    base->nf4_hash = m->nf4_hash;
    if (m->source) {
        const char *s = m->source;
        size_t n = strlen(s);
        while (n > 1 && s[n - 1] == '/') n--; /* a folder given as "dir/" */
        size_t b = n;
        while (b > 0 && s[b - 1] != '/') b--;
        snprintf(base->name, sizeof base->name, "%.*s", (int)(n - b), s + b);
    }
}

qlr_status qlr_lora_parse_hash_(const char *hex, uint64_t *out) {
    uint64_t v = 0;
    int n = 0;
    for (; hex[n]; n++) {
        char c = hex[n];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0 || n >= 16) return QLR_ERR_FORMAT;
        v = v << 4 | (uint64_t)d;
    }
    if (n != 16) return QLR_ERR_FORMAT;
    *out = v;
    return QLR_OK;
}

static qlr_status dup_opt(const char *s, char **out) {
    char *d = NULL;
    if (s && !(d = strdup(s))) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    free(*out);
    *out = d;
    return QLR_OK;
}

qlr_status qlr_lora_set_prompt(qlr_lora *l, const char *format, const char *system) {
    QLR_TRY(dup_opt(format && *format ? format : NULL, &l->prompt_format));
    return dup_opt(system, &l->prompt_system);
}

int qlr_lora_warn_base(const qlr_lora *l, const qlr_lora_base *b, const char *src) {
    if (!l->base.nf4_hash || !b->nf4_hash || l->base.nf4_hash == b->nf4_hash) return 0;
    QLR_LOGW("%s: this adapter was trained on %s (nf4 %016llx), but the base model here is %s (nf4 "
             "%016llx): another NF4 store, so answers can differ from the ones measured in training "
             "(run it on the base it was trained on, or `qlora export-base -m %s` for llama.cpp)",
             src, l->base.name[0] ? l->base.name : "another base", (unsigned long long)l->base.nf4_hash,
             b->name[0] ? b->name : "another model", (unsigned long long)b->nf4_hash,
             l->base.name[0] ? l->base.name : "THE_TRAINING_BASE");
    return 1;
}

qlr_status qlr_lora_base_from_model(const char *path, qlr_lora_base *base) {
    qlr_model_config cfg;
    if (qlr_is_dir(path)) {
        size_t n = strlen(path) + 16;
        char *p = malloc(n);
        if (!p) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        snprintf(p, n, "%s/config.json", path);
        qlr_status st = qlr_model_config_from_hf(p, &cfg);
        free(p);
        QLR_TRY(st);
    } else {
        qlr_gguf *g = NULL;
        QLR_TRY(qlr_gguf_open(path, &g));
        qlr_status st = qlr_model_config_from_gguf(g, &cfg);
        qlr_gguf_close(g);
        QLR_TRY(st);
    }
    qlr_lora_base_from_config(&cfg, base);
    return QLR_OK;
}

void qlr_lora_base_shape(const qlr_lora_base *b, qlr_linear_id id, int32_t *out, int32_t *in) {
    int64_t q = (int64_t)b->n_heads * b->head_dim, kv = (int64_t)b->n_kv_heads * b->head_dim;
    int64_t o = 0, i = 0;
    switch (id) {
    case QLR_LIN_Q: o = q; i = b->d_model; break;
    case QLR_LIN_K:
    case QLR_LIN_V: o = kv; i = b->d_model; break;
    case QLR_LIN_O: o = b->d_model; i = q; break;
    case QLR_LIN_GATE:
    case QLR_LIN_UP: o = b->d_ff; i = b->d_model; break;
    case QLR_LIN_DOWN: o = b->d_model; i = b->d_ff; break;
    default: break;
    }
    *out = (o > 0 && o <= INT32_MAX && i > 0) ? (int32_t)o : 0;
    *in = (i > 0 && i <= INT32_MAX && o > 0) ? (int32_t)i : 0;
}

float qlr_lora_compute_scale(double alpha, int32_t r, int use_rslora) {
    if (r <= 0) return 0.0f;
    return (float)(use_rslora ? alpha / sqrt((double)r) : alpha / (double)r);
}

qlr_status qlr_lora_alloc_(const qlr_lora_base *base, int32_t n_layers, int32_t r,
                           const int32_t (*shapes)[2], qlr_lora **out) {
    *out = NULL;
    if (n_layers < 1 || r < 1) return qlr_errorf(QLR_ERR_INVALID, "adapter: %d layers, rank %d", n_layers, r);
    uint64_t total = 0;
    size_t nm = (size_t)n_layers * QLR_LIN_COUNT;
    for (size_t k = 0; k < nm; k++) {
        if (!shapes[k][0]) continue;
        uint64_t x = 0;
        if (!qlr_add_ok((uint64_t)shapes[k][0], (uint64_t)shapes[k][1], &x) ||
            !qlr_mul_ok(x, (uint64_t)r, &x) || !qlr_add_ok(total, x, &total) ||
            total > ((uint64_t)1 << 36))
            return qlr_errorf(QLR_ERR_NOMEM, "adapter: size overflows (rank %d)", r);
    }
    qlr_lora *l = calloc(1, sizeof *l);
    if (!l) return qlr_errorf(QLR_ERR_NOMEM, "adapter: out of memory");
    l->base = *base;
    l->base.n_layers = n_layers;
    l->r = r;
    l->mods = calloc(nm, sizeof *l->mods);
    l->block = total ? calloc(total, sizeof(float)) : NULL;
    if (!l->mods || (total && !l->block)) {
        qlr_lora_free(l);
        return qlr_errorf(QLR_ERR_NOMEM, "adapter: out of memory for %llu parameters", (unsigned long long)total);
    }
    l->n_params = total;
    float *p = l->block;
    for (size_t k = 0; k < nm; k++) {
        if (!shapes[k][0]) continue;
        qlr_lora_module *m = &l->mods[k];
        m->out = shapes[k][0];
        m->in = shapes[k][1];
        m->a = p;
        p += (size_t)r * m->in;
        m->b = p;
        p += (size_t)m->out * r;
        l->targets |= QLR_LORA_TARGET(k % QLR_LIN_COUNT);
    }
    *out = l;
    return QLR_OK;
}

void qlr_lora_finish_(qlr_lora *l, double alpha, double dropout, int use_rslora) {
    l->alpha = alpha;
    l->dropout = dropout;
    l->use_rslora = use_rslora ? 1 : 0;
    l->scale = qlr_lora_compute_scale(alpha, l->r, l->use_rslora);
}

void qlr_lora_adopt_base_(qlr_lora *l, const qlr_lora_base *b) {
    if (!l->base.arch[0]) snprintf(l->base.arch, sizeof l->base.arch, "%s", b->arch);
    if (!l->base.d_model) l->base.d_model = b->d_model;
    if (!l->base.n_heads) l->base.n_heads = b->n_heads;
    if (!l->base.n_kv_heads) l->base.n_kv_heads = b->n_kv_heads;
    if (!l->base.head_dim) l->base.head_dim = b->head_dim;
    if (!l->base.d_ff) l->base.d_ff = b->d_ff;
}

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t splitmix_next(uint64_t *s) {
    *s += 0x9e3779b97f4a7c15ull;
    return mix64(*s);
}

qlr_status qlr_lora_create(const qlr_lora_base *base, const qlr_lora_params *p, qlr_lora **out) {
    *out = NULL;
    if (p->r < 1 || p->r > 65536) return qlr_errorf(QLR_ERR_INVALID, "lora_r must be in 1..65536 (got %d)", p->r);
    if (!(p->alpha > 0) || !isfinite(p->alpha))
        return qlr_errorf(QLR_ERR_INVALID, "lora_alpha must be > 0 (got %g)", p->alpha);
    if (!(p->dropout >= 0 && p->dropout < 1))
        return qlr_errorf(QLR_ERR_INVALID, "lora_dropout must be in [0, 1) (got %g)", p->dropout);
    if (!(p->targets & QLR_LORA_TARGETS_ALL) || (p->targets & ~QLR_LORA_TARGETS_ALL))
        return qlr_errorf(QLR_ERR_INVALID, "lora targets: mask 0x%x selects no module or an unknown one", p->targets);
    if (base->n_layers < 1) return qlr_errorf(QLR_ERR_INVALID, "adapter: base model has no layers");
    int32_t (*shapes)[2] = calloc((size_t)base->n_layers * QLR_LIN_COUNT, sizeof *shapes);
    if (!shapes) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (int id = 0; id < QLR_LIN_COUNT; id++) {
        if (!(p->targets & QLR_LORA_TARGET(id))) continue;
        int32_t o, i;
        qlr_lora_base_shape(base, (qlr_linear_id)id, &o, &i);
        if (!o || !i) {
            free(shapes);
            return qlr_errorf(QLR_ERR_INVALID, "adapter: the base model's shape of %s is unknown",
                              qlr_linear_hf_name((qlr_linear_id)id));
        }
        for (int32_t L = 0; L < base->n_layers; L++) {
            shapes[(size_t)L * QLR_LIN_COUNT + id][0] = o;
            shapes[(size_t)L * QLR_LIN_COUNT + id][1] = i;
        }
    }
    qlr_lora *l = NULL;
    qlr_status st = qlr_lora_alloc_(base, base->n_layers, p->r, (const int32_t(*)[2])shapes, &l);
    free(shapes);
    QLR_TRY(st);
    qlr_lora_finish_(l, p->alpha, p->dropout, p->use_rslora);
    if (p->base_model && !(l->base_model = strdup(p->base_model))) {
        qlr_lora_free(l);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    for (int32_t L = 0; L < base->n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            qlr_lora_module *m = qlr_lora_get(l, L, (qlr_linear_id)id);
            if (!m) continue;
            uint64_t s = mix64(p->seed ^ mix64(0x6c6f7261ull + (uint64_t)L * 8 + (uint64_t)id));
            double bound = 1.0 / sqrt((double)m->in);
            size_t n = (size_t)l->r * m->in;
            for (size_t k = 0; k < n; k++) {
                double u = (double)(splitmix_next(&s) >> 11) * 0x1.0p-53;
                m->a[k] = (float)((2.0 * u - 1.0) * bound);
            }
            /* B stays zero (calloc) */
        }
    *out = l;
    return QLR_OK;
}

typedef struct delta_ctx {
    const qlr_lora_module *m;
    int32_t r;
    float scale;
    float *w;
} delta_ctx;

static void delta_rows(void *vctx, int64_t o0, int64_t o1, int tid) {
    (void)tid;
    const delta_ctx *c = vctx;
    const qlr_lora_module *m = c->m;
    double *acc = malloc((size_t)m->in * sizeof(double));
    for (int64_t o = o0; o < o1; o++) {
        float *row = c->w + o * m->in;
        if (!acc) { /* out of memory: the same sum in float, one term at a time */
            for (int32_t k = 0; k < c->r; k++) {
                float bk = c->scale * m->b[o * c->r + k];
                const float *a = m->a + (int64_t)k * m->in;
                for (int32_t i = 0; i < m->in; i++) row[i] += bk * a[i];
            }
            continue;
        }
        for (int32_t i = 0; i < m->in; i++) acc[i] = 0.0;
        for (int32_t k = 0; k < c->r; k++) {
            double bk = m->b[o * c->r + k];
            const float *a = m->a + (int64_t)k * m->in;
            for (int32_t i = 0; i < m->in; i++) acc[i] += bk * a[i];
        }
        for (int32_t i = 0; i < m->in; i++) row[i] = (float)((double)row[i] + (double)c->scale * acc[i]);
    }
    free(acc);
}

qlr_status qlr_lora_add_delta(const qlr_lora *l, int32_t layer, qlr_linear_id id, float scale, float *w,
                              int64_t rows, int64_t cols) {
    const qlr_lora_module *m = qlr_lora_get_const(l, layer, id);
    if (!m) return QLR_OK;
    if (rows != m->out || cols != m->in)
        return qlr_errorf(QLR_ERR_INVALID, "merge: blk.%d.%s is [%lld, %lld], the adapter's module [%d, %d]", layer,
                          qlr_linear_gguf_name(id), (long long)rows, (long long)cols, m->out, m->in);
    delta_ctx c = {m, l->r, scale, w};
    qlr_parallel_for(rows, 16, delta_rows, &c);
    return QLR_OK;
}

void qlr_lora_free(qlr_lora *l) {
    if (!l) return;
    free(l->block);
    free(l->mods);
    free(l->base_model);
    free(l->prompt_format);
    free(l->prompt_system);
    free(l);
}

qlr_lora_module *qlr_lora_get(qlr_lora *l, int32_t layer, qlr_linear_id id) {
    if (!l || layer < 0 || layer >= l->base.n_layers || id < 0 || id >= QLR_LIN_COUNT) return NULL;
    qlr_lora_module *m = &l->mods[(size_t)layer * QLR_LIN_COUNT + id];
    return m->a ? m : NULL;
}

const qlr_lora_module *qlr_lora_get_const(const qlr_lora *l, int32_t layer, qlr_linear_id id) {
    return qlr_lora_get((qlr_lora *)l, layer, id);
}

void qlr_lora_tensor_name_(char *buf, size_t n, int peft, int32_t layer, qlr_linear_id id, int half) {
    if (peft)
        snprintf(buf, n, "base_model.model.model.layers.%d.%s.%s.lora_%c.weight", layer,
                 id <= QLR_LIN_O ? "self_attn" : "mlp", qlr_linear_hf_name(id), half ? 'B' : 'A');
    else
        snprintf(buf, n, "blk.%d.%s.weight.lora_%c", layer, qlr_linear_gguf_name(id), half ? 'b' : 'a');
}

qlr_status qlr_lora_check_base(const qlr_lora *l, const qlr_lora_base *b, const char *src) {
    return qlr_lora_check_base_(l, b, src, 0);
}

qlr_status qlr_lora_check_base_(const qlr_lora *l, const qlr_lora_base *b, const char *src, int peft) {
    char tn[160];
    if (l->base.arch[0] && b->arch[0] && strcmp(l->base.arch, b->arch))
        return qlr_errorf(QLR_ERR_INVALID,
                          "%s: adapter architecture '%s' does not match the base model's '%s'", src,
                          l->base.arch, b->arch);
    /* An adapter may cover fewer layers than the base (PEFT layers_to_transform); a tensor for a
     * layer the base does not have means another base model. */
    for (int32_t L = b->n_layers > 0 ? b->n_layers : l->base.n_layers; L < l->base.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++)
            if (qlr_lora_get_const(l, L, (qlr_linear_id)id)) {
                qlr_lora_tensor_name_(tn, sizeof tn, peft, L, (qlr_linear_id)id, 0);
                return qlr_errorf(QLR_ERR_INVALID,
                                  "%s: tensor %s: the base model has only %d layers "
                                  "(adapter made for another base model)", src, tn, b->n_layers);
            }
    for (int32_t L = 0; L < l->base.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
            if (!m) continue;
            int32_t o, i;
            qlr_lora_base_shape(b, (qlr_linear_id)id, &o, &i);
            const char *g = qlr_linear_gguf_name((qlr_linear_id)id);
            if (i && m->in != i) {
                qlr_lora_tensor_name_(tn, sizeof tn, peft, L, (qlr_linear_id)id, 0);
                return qlr_errorf(QLR_ERR_INVALID,
                                  "%s: tensor %s: in_features %d but the base model's %s takes %d "
                                  "(adapter made for another base model)", src, tn, m->in, g, i);
            }
            if (o && m->out != o) {
                qlr_lora_tensor_name_(tn, sizeof tn, peft, L, (qlr_linear_id)id, 1);
                return qlr_errorf(QLR_ERR_INVALID,
                                  "%s: tensor %s: out_features %d but the base model's %s has %d "
                                  "(adapter made for another base model)", src, tn, m->out, g, o);
            }
        }
    if (l->base.n_heads && b->n_heads &&
        (l->base.n_heads != b->n_heads || l->base.n_kv_heads != b->n_kv_heads ||
         l->base.head_dim != b->head_dim))
        return qlr_errorf(QLR_ERR_INVALID,
                          "%s: adapter made for %d heads (%d kv) of %d, the base model has %d (%d kv) "
                          "of %d (adapter made for another base model)",
                          src, l->base.n_heads, l->base.n_kv_heads, l->base.head_dim, b->n_heads,
                          b->n_kv_heads, b->head_dim);
    return QLR_OK;
}

void qlr_lora_print(const qlr_lora *l, FILE *out) {
    fprintf(out, "lora r %d alpha %g (scale %g) rslora %s, dropout %g, targets ", l->r, l->alpha,
            (double)l->scale, l->use_rslora ? "yes" : "no", l->dropout);
    int first = 1;
    for (int id = 0; id < QLR_LIN_COUNT; id++)
        if (l->targets & QLR_LORA_TARGET(id)) {
            fprintf(out, "%s%s", first ? "" : ",", qlr_linear_hf_name((qlr_linear_id)id));
            first = 0;
        }
    fprintf(out, ", %d layers, %llu params, base %s", l->base.n_layers, (unsigned long long)l->n_params,
            l->base.arch[0] ? l->base.arch : "unknown");
    if (l->base.name[0]) fprintf(out, " %s", l->base.name);
    if (l->base.nf4_hash) fprintf(out, " (nf4 %016llx)", (unsigned long long)l->base.nf4_hash);
    fprintf(out, ", prompt format %s", l->prompt_format ? l->prompt_format : "unknown");
    if (l->prompt_system) fprintf(out, " (default system message)");
    fputc('\n', out);
}
