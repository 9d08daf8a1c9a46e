/* data/dataset.h: JSONL training data -> tokenized examples with loss labels.
 *
 * Owns: reading JSONL files (plain or gzip, detected by the magic bytes, never the extension),
 * parsing one line into a record per dataset format, rendering and tokenizing records (chat
 * formats through data/chat_template.h), loss masking (train_on_inputs), truncate/drop of long
 * examples, bad-line errors ("train.jsonl:17: field \"messages\": missing") or skip counts, the
 * counters `qlora data preview` prints, and the deterministic train/validation split.
 * Does not own: recipes (train/ converts a qlr_recipe into the structs here), shuffling,
 * packing and batching (data/pack.h).
 *
 * Label convention (as Hugging Face): labels[i] is aligned with ids[i]; QLR_LABEL_IGNORE (-100)
 * marks a token that is not trained. The loss at position t predicts labels[t+1], so the first
 * token of an example is never a target. data/pack.h hands the trainer pre-shifted targets. */
#ifndef QLR_DATA_DATASET_H
#define QLR_DATA_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"

#define QLR_LABEL_IGNORE (-100)
/* Longest JSONL line accepted (a longer one is a bad line). */
#define QLR_DATA_MAX_LINE ((size_t)64 << 20)

/* Dataset formats; the same order as train/recipe.h qlr_dataset_type so a cast converts. */
typedef enum qlr_data_format {
    QLR_DATA_ALPACA = 0,    /* {"instruction", "input"?, "output"}: Alpaca prompt, response + eos trained */
    QLR_DATA_COMPLETION,    /* {"<field>": text}: bos? + text + eos, all trained */
    QLR_DATA_CHAT,          /* {"messages": [{"role", "content"}]} through the chat template */
    QLR_DATA_SHAREGPT,      /* {"conversations": [{"from": human|gpt|system, "value"}]} likewise */
    QLR_DATA_INPUT_OUTPUT,  /* {"segments": [{"text", "label": bool}]}: label says trained; no bos/eos added */
    QLR_DATA_PRETOKENIZED,  /* {"input_ids": [...], "labels"?: [...]} (-100 = not trained) */
    QLR_DATA_FORMAT_COUNT
} qlr_data_format;

/* "alpaca", "completion", ...; "?" out of range. */
const char *qlr_data_format_name(qlr_data_format f);

/* One input file. Strings are borrowed for the duration of qlr_dataset_load. */
typedef struct qlr_data_source {
    const char *path;           /* a JSONL file, plain or gzip */
    qlr_data_format format;
    const char *field;          /* completion: the text field; NULL = "text" */
    const char *field_messages; /* chat: NULL = "messages"; sharegpt: NULL = "conversations" */
    const char *field_role;     /* chat: NULL = "role"; sharegpt: NULL = "from" */
    const char *field_content;  /* chat: NULL = "content"; sharegpt: NULL = "value" */
    int skip_bad_lines;         /* 0: a bad line fails the load naming file:line and the field;
                                   1: it is skipped and counted in qlr_data_stats.skipped */
} qlr_data_source;

typedef struct qlr_data_params {
    uint32_t sequence_len;      /* longest example kept, in tokens (default 512) */
    int train_on_inputs;        /* 0 (default): loss only on alpaca responses and assistant turns
                                   (their end-of-turn token included); 1: on every token.
                                   input_output and pretokenized labels are always honoured. */
    int drop_long;              /* 0 (default): cut longer examples to sequence_len; 1: drop them */
    int progress;               /* 1: a progress bar while tokenizing files over 1 MiB (default 0) */
} qlr_data_params;

qlr_data_params qlr_data_params_default(void);

/* What a load saw. `trainable` counts loss terms: positions t >= 1 with labels[t] != -100. */
typedef struct qlr_data_stats {
    uint64_t lines;             /* non-blank lines read (blank lines are ignored) */
    uint64_t examples;          /* examples kept */
    uint64_t tokens;            /* tokens in kept examples (after truncation) */
    uint64_t trainable;         /* loss terms in kept examples */
    uint64_t truncated;         /* kept, but cut to sequence_len */
    uint64_t dropped_long;      /* longer than sequence_len with drop_long */
    uint64_t dropped_empty;     /* nothing left to train on (no assistant turn, or all masked) */
    uint64_t skipped;           /* bad lines skipped (skip_bad_lines) */
    uint64_t longest;           /* longest kept example, tokens */
} qlr_data_stats;

/* A view of one example (valid while its dataset lives). */
typedef struct qlr_example {
    const int32_t *ids;         /* [n] */
    const int32_t *labels;      /* [n] aligned with ids; -100 = not trained */
    uint32_t n;
    uint32_t source;            /* index into the sources given to qlr_dataset_load */
    uint64_t line;              /* 1-based line in that file */
} qlr_example;

typedef struct qlr_dataset qlr_dataset;

/* Reads and tokenizes every source, in order. `tmpl` is needed only for chat and sharegpt
 * (QLR_ERR_INVALID if NULL then). Lines are tokenized in parallel (core/threads.h) and kept in
 * file order. Errors: QLR_ERR_IO naming the file; QLR_ERR_FORMAT "path:line: <reason>" for a bad
 * line of a source without skip_bad_lines (the reason names the field: `field "messages":
 * missing`, `field "segments[1].label": expected true or false, got string`, `not JSON: ...`).
 * An input that yields no example at all is QLR_ERR_INVALID. *out is NULL on failure. */
qlr_status qlr_dataset_load(const qlr_data_source *srcs, size_t n_srcs, const qlr_data_params *p,
                            const qlr_tokenizer *tok, const qlr_chat_template *tmpl, qlr_dataset **out);
void qlr_dataset_free(qlr_dataset *ds);

size_t qlr_dataset_size(const qlr_dataset *ds);
/* Example i in load order; i must be < size (asserted). */
qlr_example qlr_dataset_get(const qlr_dataset *ds, size_t i);
const qlr_data_stats *qlr_dataset_stats(const qlr_dataset *ds);
uint32_t qlr_dataset_sequence_len(const qlr_dataset *ds);

/* Train/validation split. val_set_size: 0 = none; in (0, 1) a fraction (n_val = ceil(f * n),
 * as HF train_test_split); >= 1 an absolute count (must be an integer). Membership is the
 * first n_val entries of a seeded permutation (qlr_data_permute, stream "split"); each list
 * is then sorted by example index. QLR_ERR_RANGE if nothing would be left to train on. */
typedef struct qlr_data_split {
    uint32_t *train;
    size_t n_train;
    uint32_t *val;
    size_t n_val;
} qlr_data_split;

qlr_status qlr_dataset_split(const qlr_dataset *ds, double val_set_size, uint64_t seed,
                             qlr_data_split *out);
void qlr_data_split_free(qlr_data_split *s);

/* Opens the tokenizer of `model` (a GGUF file, or a Hugging Face folder / tokenizer.json) and
 * the chat template: `chat_template` NULL, "" or "tokenizer_default" = detected from the
 * model's template source (*tmpl stays NULL, without error, when the model has none or it is
 * not one we know: a chat dataset then fails to load with that reason); otherwise a built-in
 * name (chatml, llama3, llama2, mistral). On failure both outputs are NULL. */
qlr_status qlr_data_open_tokenizer(const char *model, const char *chat_template, qlr_tokenizer **tok,
                                   qlr_chat_template **tmpl);

/* ---- one line -> one record (no tokenizer; the fuzz target's entry point) ---- */

/* A piece of text with its loss flag. `special`: control tokens written in it are parsed. */
typedef struct qlr_data_part {
    const char *text;
    size_t len;
    uint8_t trainable;
    uint8_t special;
} qlr_data_part;

typedef struct qlr_data_record {
    qlr_data_format format;
    int add_bos_eos;            /* alpaca/completion: bos (if the tokenizer adds one) and eos */
    qlr_data_part *parts;       /* alpaca, completion, input_output */
    size_t n_parts;
    qlr_chat_msg *msgs;         /* chat, sharegpt (sharegpt roles mapped to system/user/assistant) */
    size_t n_msgs;
    int32_t *ids, *labels;      /* pretokenized: [n_ids] each (labels = ids when absent) */
    size_t n_ids;
    void *json_;                /* private: the parsed line that texts point into */
    char *scratch_;             /* private: the rendered alpaca prompt */
} qlr_data_record;

/* Parses one JSONL line of `src->format`. QLR_ERR_FORMAT with a message that starts with the
 * reason and names the field ("field \"output\": missing"); the caller prefixes file:line.
 * Never crashes on any bytes. `rec` is overwritten; free with qlr_data_record_free. */
qlr_status qlr_data_parse_line(const qlr_data_source *src, const char *line, size_t len,
                               qlr_data_record *rec);
void qlr_data_record_free(qlr_data_record *rec);

/* A growable ids + labels pair. */
typedef struct qlr_example_buf {
    int32_t *ids, *labels;
    size_t n, cap;
} qlr_example_buf;
void qlr_example_buf_free(qlr_example_buf *b);

/* Tokenizes a record (ids and labels appended to `out`, which it clears first). Chat records
 * are rendered and tokenized as one text with control tokens parsed (as HF
 * apply_chat_template); a token is trained when its first byte lies in an assistant segment.
 * Errors: QLR_ERR_FORMAT for a conversation the template refuses or a pretokenized id outside
 * the vocabulary. */
qlr_status qlr_data_tokenize(const qlr_data_record *rec, const qlr_tokenizer *tok,
                             const qlr_chat_template *tmpl, int train_on_inputs, qlr_example_buf *out);

#endif
