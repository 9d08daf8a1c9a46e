/* data/tokenizer_load.c: builds a tokenizer from GGUF metadata (tokenizer.ggml.*) or from a
 * Hugging Face tokenizer.json + tokenizer_config.json. Both readers only gather arrays into a
 * qlr_tokenizer_spec and hand it to qlr_tokenizer_create (tokenizer.c); every error names the
 * key and entry. The HF reader recognises the pre-tokenizers we implement by their structure
 * and regex text, and refuses the rest instead of tokenizing differently. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer_internal.h"
#include "formats/gguf.h"
#include "formats/json.h"

/* ---------------------------------------------------------------------------------------- */
/* GGUF                                                                                     */

static qlr_status gguf_opt_id(const qlr_gguf *g, const char *key, int32_t *out) {
    if (qlr_gguf_find_key(g, key) < 0) return QLR_OK;
    uint64_t v;
    QLR_TRY(qlr_gguf_get_uint(g, key, &v));
    *out = v > INT32_MAX ? INT32_MAX : (int32_t)v; /* out of range: create() warns and ignores */
    return QLR_OK;
}

static qlr_status gguf_opt_bool(const qlr_gguf *g, const char *key, int *out) {
    if (qlr_gguf_find_key(g, key) < 0) return QLR_OK;
    return qlr_gguf_get_bool(g, key, out);
}

static char *strndup_or_null(const char *s, uint64_t n) {
    char *o = malloc((size_t)n + 1);
    if (!o) return NULL;
    memcpy(o, s, (size_t)n);
    o[n] = 0;
    return o;
}

qlr_status qlr_tokenizer_load_gguf(const qlr_gguf *g, qlr_tokenizer **out) {
    *out = NULL;
    const char *path = qlr_gguf_path(g) ? qlr_gguf_path(g) : "gguf";
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.name = path;
    qlr_status st = QLR_OK;
    qlr_str *tokens = NULL, *merges = NULL;
    int32_t *types = NULL;
    float *scores = NULL;
    char *model = NULL, *pre = NULL, *tmpl = NULL;

    const char *s;
    uint64_t n;
    if (qlr_gguf_find_key(g, "tokenizer.ggml.model") < 0)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: has no vocabulary (tokenizer.ggml.model is missing)", path);
    QLR_TRY(qlr_gguf_get_str(g, "tokenizer.ggml.model", &s, &n));
    model = strndup_or_null(s, n);
    if (!model) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path);
    if (strcmp(model, "gpt2") == 0) sp.kind = QLR_TOK_BPE;
    else if (strcmp(model, "llama") == 0) sp.kind = QLR_TOK_SPM;
    else if (strcmp(model, "none") == 0 || strcmp(model, "no_vocab") == 0) {
        st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: has no vocabulary (tokenizer.ggml.model = \"%s\")", path, model);
        goto done;
    } else {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED,
                        "%s: tokenizer.ggml.model = \"%.64s\" is not supported (supported: gpt2, llama)", path, model);
        goto done;
    }
    if (qlr_gguf_find_key(g, "tokenizer.ggml.pre") >= 0) {
        if ((st = qlr_gguf_get_str(g, "tokenizer.ggml.pre", &s, &n))) goto done;
        pre = strndup_or_null(s, n);
        if (!pre) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        sp.pre = pre;
    } else if (sp.kind == QLR_TOK_BPE) {
        QLR_LOGW("%s: tokenizer.ggml.pre is missing; using the 'default' pre-tokenizer", path);
    }
    if (sp.kind == QLR_TOK_SPM) sp.pre = NULL;

    /* tokens */
    qlr_gguf_type et;
    const void *data;
    if (qlr_gguf_find_key(g, "tokenizer.ggml.tokens") < 0) {
        st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: has no vocabulary (tokenizer.ggml.tokens is missing)", path);
        goto done;
    }
    if ((st = qlr_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n, &data))) goto done;
    if (et != QLR_GGUF_STRING) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: tokenizer.ggml.tokens: expected an array of strings, got type %d", path,
                        (int)et);
        goto done;
    }
    if (n == 0 || n > INT32_MAX) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: tokenizer.ggml.tokens: %llu entries (has no vocabulary)", path,
                        (unsigned long long)n);
        goto done;
    }
    uint64_t nv = n;
    tokens = malloc(sizeof(qlr_str) * nv);
    if (!tokens) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
    for (uint64_t i = 0; i < nv; i++) {
        uint64_t l;
        if ((st = qlr_gguf_get_arr_str(g, "tokenizer.ggml.tokens", i, &tokens[i].s, &l))) goto done;
        tokens[i].len = (size_t)l;
    }
    sp.n_vocab = (int32_t)nv;
    sp.tokens = tokens;

    if (qlr_gguf_find_key(g, "tokenizer.ggml.token_type") >= 0) {
        if ((st = qlr_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n, &data))) goto done;
        if (et != QLR_GGUF_INT32 || n != nv) {
            st = qlr_errorf(QLR_ERR_FORMAT,
                            "%s: tokenizer.ggml.token_type: expected %llu INT32 entries, got %llu of type %d", path,
                            (unsigned long long)nv, (unsigned long long)n, (int)et);
            goto done;
        }
        types = malloc(sizeof(int32_t) * nv);
        if (!types) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        memcpy(types, data, sizeof(int32_t) * nv);
        sp.token_types = types;
    }
    if (qlr_gguf_find_key(g, "tokenizer.ggml.scores") >= 0) {
        if ((st = qlr_gguf_get_arr(g, "tokenizer.ggml.scores", &et, &n, &data))) goto done;
        if ((et != QLR_GGUF_FLOAT32 && et != QLR_GGUF_INT32) || n != nv) {
            st = qlr_errorf(QLR_ERR_FORMAT,
                            "%s: tokenizer.ggml.scores: expected %llu FLOAT32 entries, got %llu of type %d", path,
                            (unsigned long long)nv, (unsigned long long)n, (int)et);
            goto done;
        }
        scores = malloc(sizeof(float) * nv);
        if (!scores) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        for (uint64_t i = 0; i < nv; i++) {
            if (et == QLR_GGUF_FLOAT32) memcpy(&scores[i], (const char *)data + 4 * i, 4);
            else {
                int32_t v;
                memcpy(&v, (const char *)data + 4 * i, 4);
                scores[i] = (float)v;
            }
        }
        sp.scores = scores;
    }
    if (qlr_gguf_find_key(g, "tokenizer.ggml.merges") >= 0) {
        if ((st = qlr_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n, &data))) goto done;
        if (et != QLR_GGUF_STRING) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tokenizer.ggml.merges: expected an array of strings, got type %d",
                            path, (int)et);
            goto done;
        }
        merges = malloc(sizeof(qlr_str) * (n ? n : 1));
        if (!merges) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        for (uint64_t i = 0; i < n; i++) {
            uint64_t l;
            if ((st = qlr_gguf_get_arr_str(g, "tokenizer.ggml.merges", i, &merges[i].s, &l))) goto done;
            merges[i].len = (size_t)l;
        }
        sp.n_merges = (int64_t)n;
        sp.merges = merges;
    } else if (sp.kind == QLR_TOK_BPE) {
        st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: tokenizer.ggml.merges is missing (required for gpt2 tokenizers)", path);
        goto done;
    }

    if (sp.kind == QLR_TOK_SPM) sp.bos = 1, sp.eos = 2, sp.unk = 0;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.bos_token_id", &sp.bos))) goto done;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.eos_token_id", &sp.eos))) goto done;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.unknown_token_id", &sp.unk))) goto done;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.padding_token_id", &sp.pad))) goto done;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.eot_token_id", &sp.eot))) goto done;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.eom_token_id", &sp.eom))) goto done;
    if ((st = gguf_opt_id(g, "tokenizer.ggml.seperator_token_id", &sp.sep))) goto done;
    if ((st = gguf_opt_bool(g, "tokenizer.ggml.add_bos_token", &sp.add_bos))) goto done;
    if ((st = gguf_opt_bool(g, "tokenizer.ggml.add_eos_token", &sp.add_eos))) goto done;
    if ((st = gguf_opt_bool(g, "tokenizer.ggml.add_space_prefix", &sp.add_space_prefix))) goto done;
    if (qlr_gguf_find_key(g, "tokenizer.chat_template") >= 0) {
        if ((st = qlr_gguf_get_str(g, "tokenizer.chat_template", &s, &n))) goto done;
        tmpl = strndup_or_null(s, n);
        if (!tmpl) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        sp.chat_template = tmpl;
    }
    st = qlr_tokenizer_create(&sp, out);
done:
    free(tokens);
    free(merges);
    free(types);
    free(scores);
    free(model);
    free(pre);
    free(tmpl);
    return st;
}

qlr_status qlr_tokenizer_open_gguf(const char *path, qlr_tokenizer **out) {
    *out = NULL;
    qlr_gguf *g;
    QLR_TRY(qlr_gguf_open(path, &g));
    qlr_status st = qlr_tokenizer_load_gguf(g, out);
    qlr_gguf_close(g);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Hugging Face tokenizer.json                                                              */

static const char *json_type_str(const json_t *v, const char *key) {
    json_t *x = v ? json_object_get(v, key) : NULL;
    return json_is_string(x) ? json_string_value(x) : NULL;
}

/* Classifies a pre_tokenizer object into one of ours; -1 if not recognised. */
static int hf_classify_pre(const json_t *pt) {
    if (!pt || json_is_null(pt)) return -1;
    const char *ty = json_type_str(pt, "type");
    if (!ty) return -1;
    if (strcmp(ty, "ByteLevel") == 0) {
        json_t *ur = json_object_get(pt, "use_regex");
        json_t *ap = json_object_get(pt, "add_prefix_space");
        if (json_is_false(ur) || json_is_true(ap)) return -1;
        return QLR_TOK_PRE_GPT2;
    }
    if (strcmp(ty, "Sequence") != 0) return -1;
    json_t *arr = json_object_get(pt, "pretokenizers");
    if (!json_is_array(arr)) return -1;
    int digits = 0, bytelevel_regex = 0, split = -1, n = 0;
    size_t i;
    json_t *e;
    json_array_foreach(arr, i, e) {
        const char *et = json_type_str(e, "type");
        n++;
        if (!et) return -1;
        if (strcmp(et, "Digits") == 0 && json_is_true(json_object_get(e, "individual_digits"))) digits = 1;
        else if (strcmp(et, "ByteLevel") == 0) {
            if (json_is_true(json_object_get(e, "add_prefix_space"))) return -1;
            bytelevel_regex = !json_is_false(json_object_get(e, "use_regex"));
        } else if (strcmp(et, "Split") == 0) {
            json_t *pat = json_object_get(e, "pattern");
            const char *re = json_type_str(pat, "Regex");
            if (!re) return -1;
            if (strstr(re, "\\p{N}{1,3}")) split = QLR_TOK_PRE_LLAMA3;
            else if (strstr(re, "\\p{L}+|\\p{N}|")) split = QLR_TOK_PRE_QWEN2;
            else return -1;
        } else return -1;
    }
    if (split >= 0 && !bytelevel_regex && !digits) return split;
    if (digits && bytelevel_regex && split < 0 && n == 2) return QLR_TOK_PRE_SMOLLM;
    if (bytelevel_regex && !digits && split < 0 && n == 1) return QLR_TOK_PRE_GPT2;
    return -1;
}

static const char *pre_name(int pre) {
    switch (pre) {
    case QLR_TOK_PRE_GPT2: return "gpt-2";
    case QLR_TOK_PRE_LLAMA3: return "llama-bpe";
    case QLR_TOK_PRE_QWEN2: return "qwen2";
    case QLR_TOK_PRE_SMOLLM: return "smollm";
    default: return "default";
    }
}

/* A token named in tokenizer_config.json: a string or {"content": ...}. */
static int32_t hf_config_token(const qlr_tokenizer_spec *sp, const json_t *cfg, const char *key, const qlr_str *toks) {
    json_t *v = cfg ? json_object_get(cfg, key) : NULL;
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return -2;
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    for (int32_t i = 0; i < sp->n_vocab; i++)
        if (toks[i].s && toks[i].len == n && memcmp(toks[i].s, s, n) == 0) return i;
    return -1;
}

qlr_status qlr_tokenizer_load_hf(const char *path, qlr_tokenizer **out) {
    *out = NULL;
    char *file = NULL, *cfg_path = NULL;
    json_t *root = NULL, *cfg = NULL;
    qlr_str *tokens = NULL, *merges = NULL;
    int32_t *types = NULL;
    float *scores = NULL;
    char *merge_buf = NULL;
    qlr_status st = QLR_OK;
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();

    size_t pl = strlen(path);
    if (qlr_is_dir(path)) {
        file = malloc(pl + 32);
        cfg_path = malloc(pl + 32);
        if (!file || !cfg_path) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        snprintf(file, pl + 32, "%s/tokenizer.json", path);
        snprintf(cfg_path, pl + 32, "%s/tokenizer_config.json", path);
    } else {
        file = strdup(path);
        cfg_path = malloc(pl + 32);
        if (!file || !cfg_path) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path); goto done; }
        const char *slash = strrchr(path, '/');
        size_t dl = slash ? (size_t)(slash - path + 1) : 0;
        memcpy(cfg_path, path, dl);
        strcpy(cfg_path + dl, "tokenizer_config.json");
    }
    sp.name = file;
    if ((st = qlr_json_load_file(file, &root))) goto done;
    if (qlr_path_exists(cfg_path) && (st = qlr_json_load_file(cfg_path, &cfg))) goto done;

    json_t *model = json_object_get(root, "model");
    const char *mtype = json_type_str(model, "type");
    if (!model || !mtype) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: key \"model.type\" is missing", file);
        goto done;
    }
    if (strcmp(mtype, "BPE") != 0) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: model.type \"%s\" is not supported (supported: BPE)", file, mtype);
        goto done;
    }
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab) || json_object_size(vocab) == 0) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: model.vocab: missing or empty (the tokenizer has no vocabulary)", file);
        goto done;
    }
    json_t *added = json_object_get(root, "added_tokens");
    /* vocabulary size: 1 + the largest id */
    int64_t max_id = -1;
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= INT32_MAX) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: model.vocab: \"%.40s\" has an invalid id", file, k);
            goto done;
        }
        if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
    }
    size_t i;
    json_array_foreach(added, i, v) {
        json_t *id = json_object_get(v, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= INT32_MAX ||
            !json_is_string(json_object_get(v, "content"))) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: added_tokens: entry %zu needs an integer id and a string content",
                            file, i);
            goto done;
        }
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    if (max_id > 16 * 1024 * 1024) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: model.vocab: id %lld is implausibly large", file, (long long)max_id);
        goto done;
    }
    int32_t nv = (int32_t)max_id + 1;
    tokens = calloc((size_t)nv, sizeof(qlr_str));
    types = malloc(sizeof(int32_t) * (size_t)nv);
    if (!tokens || !types) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", file); goto done; }
    for (int32_t j = 0; j < nv; j++) types[j] = QLR_TOKTYPE_UNUSED;
    json_object_foreach(vocab, k, v) {
        int32_t id = (int32_t)json_integer_value(v);
        tokens[id].s = k;
        tokens[id].len = strlen(k);
        types[id] = QLR_TOKTYPE_NORMAL;
    }
    json_array_foreach(added, i, v) {
        int32_t id = (int32_t)json_integer_value(json_object_get(v, "id"));
        json_t *c = json_object_get(v, "content");
        tokens[id].s = json_string_value(c);
        tokens[id].len = json_string_length(c);
        types[id] = json_is_true(json_object_get(v, "special")) ? QLR_TOKTYPE_CONTROL : QLR_TOKTYPE_USER_DEFINED;
    }
    for (int32_t j = 0; j < nv; j++)
        if (!tokens[j].s) { tokens[j].s = ""; tokens[j].len = 0; }

    /* kind and pre-tokenizer */
    int byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    json_t *pt = json_object_get(root, "pre_tokenizer");
    int pre = hf_classify_pre(pt);
    if (pre >= 0) {
        sp.kind = QLR_TOK_BPE;
        sp.pre = pre_name(pre);
    } else if (byte_fallback) {
        sp.kind = QLR_TOK_SPM;
        for (int32_t j = 0; j < nv; j++)
            if (tokens[j].len == 6 && memcmp(tokens[j].s, "<0x", 3) == 0 && tokens[j].s[5] == '>' &&
                types[j] == QLR_TOKTYPE_NORMAL)
                types[j] = QLR_TOKTYPE_BYTE;
        /* add_space_prefix: a normalizer Prepend("▁") or Metaspace(prepend_scheme != never) */
        char *txt = json_dumps(root, JSON_COMPACT);
        sp.add_space_prefix = 0;
        if (txt) {
            if (strstr(txt, "\"Prepend\"") || (strstr(txt, "\"Metaspace\"") && !strstr(txt, "\"never\""))) sp.add_space_prefix = 1;
            free(txt);
        }
    } else {
        char *txt = pt ? json_dumps(pt, JSON_COMPACT) : NULL;
        st = qlr_errorf(QLR_ERR_UNSUPPORTED,
                        "%s: pre_tokenizer %.300s is not one we implement (ByteLevel GPT-2, Digits+ByteLevel "
                        "(smollm), Split llama3/qwen2 + ByteLevel, or SentencePiece-style byte_fallback BPE)",
                        file, txt ? txt : "null");
        free(txt);
        goto done;
    }

    /* merges: "a b" strings or [a, b] pairs */
    json_t *jm = json_object_get(model, "merges");
    size_t nm = json_is_array(jm) ? json_array_size(jm) : 0;
    merges = malloc(sizeof(qlr_str) * (nm ? nm : 1));
    size_t mb_total = 0;
    json_array_foreach(jm, i, v) {
        if (json_is_array(v) && json_array_size(v) == 2 && json_is_string(json_array_get(v, 0)) &&
            json_is_string(json_array_get(v, 1)))
            mb_total += json_string_length(json_array_get(v, 0)) + json_string_length(json_array_get(v, 1)) + 2;
    }
    merge_buf = malloc(mb_total ? mb_total : 1);
    if (!merges || !merge_buf) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", file); goto done; }
    size_t mp = 0;
    json_array_foreach(jm, i, v) {
        if (json_is_string(v)) {
            merges[i].s = json_string_value(v);
            merges[i].len = json_string_length(v);
        } else if (json_is_array(v) && json_array_size(v) == 2 && json_is_string(json_array_get(v, 0)) &&
                   json_is_string(json_array_get(v, 1))) {
            json_t *a = json_array_get(v, 0), *b = json_array_get(v, 1);
            size_t la = json_string_length(a), lb = json_string_length(b);
            merges[i].s = merge_buf + mp;
            memcpy(merge_buf + mp, json_string_value(a), la);
            merge_buf[mp + la] = ' ';
            memcpy(merge_buf + mp + la + 1, json_string_value(b), lb);
            merges[i].len = la + 1 + lb;
            mp += la + lb + 2;
        } else {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: model.merges: entry %zu is neither \"a b\" nor [\"a\", \"b\"]", file, i);
            goto done;
        }
    }
    if (sp.kind == QLR_TOK_BPE) {
        sp.n_merges = (int64_t)nm;
        sp.merges = merges;
    } else {
        /* SPM scores from merge ranks: a piece made by an earlier merge scores higher. */
        scores = malloc(sizeof(float) * (size_t)nv);
        if (!scores) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", file); goto done; }
        for (int32_t j = 0; j < nv; j++) scores[j] = -1e9f; /* filled once the vocabulary map exists */
    }

    /* special ids */
    sp.n_vocab = nv;
    sp.tokens = tokens;
    sp.token_types = types;
    int32_t id;
    if ((id = hf_config_token(&sp, cfg, "bos_token", tokens)) >= 0) sp.bos = id;
    if ((id = hf_config_token(&sp, cfg, "eos_token", tokens)) >= 0) sp.eos = id;
    if ((id = hf_config_token(&sp, cfg, "pad_token", tokens)) >= 0) sp.pad = id;
    if ((id = hf_config_token(&sp, cfg, "unk_token", tokens)) >= 0) sp.unk = id;
    if (sp.kind == QLR_TOK_SPM && sp.unk < 0) {
        const char *u = json_type_str(model, "unk_token");
        for (int32_t j = 0; u && j < nv; j++)
            if (tokens[j].len == strlen(u) && memcmp(tokens[j].s, u, tokens[j].len) == 0) sp.unk = j;
    }
    if (cfg) {
        json_t *b = json_object_get(cfg, "add_bos_token");
        if (json_is_boolean(b)) sp.add_bos = json_is_true(b);
        b = json_object_get(cfg, "add_eos_token");
        if (json_is_boolean(b)) sp.add_eos = json_is_true(b);
        json_t *ct = json_object_get(cfg, "chat_template");
        if (json_is_string(ct)) sp.chat_template = json_string_value(ct);
        else if (json_is_array(ct)) {
            json_array_foreach(ct, i, v) {
                if (json_is_string(json_object_get(v, "template")) &&
                    (!sp.chat_template || (json_type_str(v, "name") && strcmp(json_type_str(v, "name"), "default") == 0)))
                    sp.chat_template = json_string_value(json_object_get(v, "template"));
            }
        }
    }
    if (sp.kind == QLR_TOK_BPE && (!cfg || !json_is_boolean(json_object_get(cfg, "add_bos_token")))) {
        /* HF adds bos through the post_processor (TemplateProcessing) rather than a flag */
        json_t *pp = json_object_get(root, "post_processor");
        char *txt = pp ? json_dumps(pp, JSON_COMPACT) : NULL;
        sp.add_bos = 0;
        if (txt && sp.bos >= 0 && strstr(txt, "\"TemplateProcessing\"") &&
            strstr(txt, tokens[sp.bos].s ? tokens[sp.bos].s : "\x01"))
            sp.add_bos = 1;
        free(txt);
    }
    if (sp.kind == QLR_TOK_SPM) {
        /* build once without scores to get the vocabulary map, then derive scores */
        qlr_tokenizer_spec tmp = sp;
        tmp.scores = NULL;
        qlr_tokenizer *t0;
        if ((st = qlr_tokenizer_create(&tmp, &t0))) goto done;
        char *buf = malloc(4096);
        for (size_t r = 0; r < nm && buf; r++) {
            const char *m = merges[r].s;
            size_t n = merges[r].len, s_ = 1;
            while (s_ < n && m[s_] != ' ') s_++;
            if (s_ >= n || n > 4000) continue;
            memcpy(buf, m, s_);
            memcpy(buf + s_, m + s_ + 1, n - s_ - 1);
            int32_t mid = qlr_tok_vocab_find(t0, buf, n - 1);
            if (mid >= 0 && scores[mid] == -1e9f) scores[mid] = -(float)r;
        }
        free(buf);
        qlr_tokenizer_free(t0);
        for (int32_t j = 0; j < nv; j++)
            if (scores[j] == -1e9f) scores[j] = 0.0f; /* single characters: never merged */
        sp.scores = scores;
        sp.n_merges = 0;
        sp.merges = NULL;
    }
    st = qlr_tokenizer_create(&sp, out);
done:
    json_decref(root);
    json_decref(cfg);
    free(tokens);
    free(merges);
    free(merge_buf);
    free(types);
    free(scores);
    free(file);
    free(cfg_path);
    return st;
}
