/* tests/fuzz/fuzz_dataset.c: libFuzzer target for the JSONL record parser of data/dataset.h.
 * The first input byte picks the dataset format (mod 6), the rest is one line. An accepted
 * record is tokenized with a tiny byte-fallback vocabulary and the chatml template; the
 * invariants: a rejected line leaves a zeroed record and an error message, an accepted one
 * yields ids and labels of equal length where every label is -100 or its own id. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "core/core.h"
#include "data/chat_template.h"
#include "data/dataset.h"
#include "data/tokenizer.h"

static qlr_tokenizer *g_tok;
static qlr_chat_template *g_tmpl;

static void setup(void) {
    static char text[260][16];
    static qlr_str toks[260];
    static int32_t types[260];
    int n = 0;
    const char *special[] = {"<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"};
    for (int i = 0; i < 4; i++) {
        snprintf(text[n], sizeof text[n], "%s", special[i]);
        types[n] = i ? QLR_TOKTYPE_CONTROL : QLR_TOKTYPE_UNKNOWN;
        toks[n] = (qlr_str){text[n], strlen(text[n])};
        n++;
    }
    for (int b = 0; b < 256; b++, n++) {
        snprintf(text[n], sizeof text[n], "<0x%02X>", b);
        types[n] = QLR_TOKTYPE_BYTE;
        toks[n] = (qlr_str){text[n], 6};
    }
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.kind = QLR_TOK_SPM;
    sp.n_vocab = n;
    sp.tokens = toks;
    sp.token_types = types;
    sp.unk = 0;
    sp.bos = 3;
    sp.eos = 3;
    sp.eot = 2;
    QLR_ASSERT(qlr_tokenizer_create(&sp, &g_tok) == QLR_OK);
    QLR_ASSERT(qlr_chat_template_from_name("chatml", &g_tmpl) == QLR_OK);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_tok) setup();
    if (size < 1) return 0;
    qlr_data_source src = {0};
    src.format = (qlr_data_format)(data[0] % QLR_DATA_FORMAT_COUNT);
    src.field = data[0] & 0x80 ? "body" : NULL;
    qlr_data_record rec;
    qlr_status st = qlr_data_parse_line(&src, (const char *)data + 1, size - 1, &rec);
    if (st != QLR_OK) {
        QLR_ASSERT(qlr_error_msg()[0] != 0);
        qlr_data_record_free(&rec);
        return 0;
    }
    for (size_t i = 0; i < rec.n_parts; i++) QLR_ASSERT(rec.parts[i].text != NULL);
    for (size_t i = 0; i < rec.n_msgs; i++) QLR_ASSERT(rec.msgs[i].role && rec.msgs[i].content);
    if (src.format == QLR_DATA_PRETOKENIZED) QLR_ASSERT(rec.n_ids > 0 && rec.ids && rec.labels);
    for (int toi = 0; toi < 2; toi++) {
        qlr_example_buf ex = {0};
        if (qlr_data_tokenize(&rec, g_tok, g_tmpl, toi, &ex) == QLR_OK) {
            for (size_t i = 0; i < ex.n; i++)
                QLR_ASSERT(ex.labels[i] == QLR_LABEL_IGNORE || ex.labels[i] == ex.ids[i] ||
                           src.format == QLR_DATA_PRETOKENIZED);
        }
        qlr_example_buf_free(&ex);
    }
    qlr_data_record_free(&rec);
    return 0;
}
