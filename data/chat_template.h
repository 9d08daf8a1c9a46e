/* data/chat_template.h: renders a conversation into the prompt text a chat model was trained
 * on, and says which bytes of that text are the assistant's (for loss masking).
 *
 * We do not run Jinja. The common families are built in (chatml for SmolLM2/Qwen, llama3,
 * llama2, mistral) and are chosen by name or detected from the model's template source by
 * substring heuristics; details that vary inside a family (the default system message SmolLM2
 * and Qwen insert) are read from the template source. Tokenizing the result is the caller's job
 * (data/tokenizer.h, with QLR_ENC_PARSE_SPECIAL for the markup). */
#ifndef QLR_DATA_CHAT_TEMPLATE_H
#define QLR_DATA_CHAT_TEMPLATE_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

typedef enum qlr_chat_format {
    QLR_CHAT_CHATML = 0, /* <|im_start|>role\ncontent<|im_end|>\n */
    QLR_CHAT_LLAMA3,     /* <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> */
    QLR_CHAT_LLAMA2,     /* <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] assistant </s> */
    QLR_CHAT_MISTRAL,    /* <s>[INST] user [/INST]assistant</s> */
} qlr_chat_format;

typedef struct qlr_chat_template qlr_chat_template;

/* By name: "chatml", "llama3", "llama2", "mistral". Unknown names are QLR_ERR_INVALID with a
 * message listing the known ones. */
qlr_status qlr_chat_template_from_name(const char *name, qlr_chat_template **out);

/* From a model's Jinja source (tokenizer.chat_template / tokenizer_config.json). Recognises the
 * families above by their markers; QLR_ERR_UNSUPPORTED when none matches. A chatml template
 * whose source inserts a literal default system message ("<|im_start|>system\nYou are ...<|im_end|>")
 * when the conversation has none keeps that behaviour. */
qlr_status qlr_chat_template_detect(const char *source, size_t len, qlr_chat_template **out);

void qlr_chat_template_free(qlr_chat_template *t);

qlr_chat_format qlr_chat_template_format(const qlr_chat_template *t);
const char *qlr_chat_template_name(const qlr_chat_template *t);
/* The default system message inserted when the first message is not "system", or NULL. */
const char *qlr_chat_template_default_system(const qlr_chat_template *t);
/* 1 if the rendered text already starts with the bos token text (llama3, llama2, mistral):
 * then encode it without QLR_ENC_ADD_SPECIAL, or bos appears twice. */
int qlr_chat_template_has_bos(const qlr_chat_template *t);

typedef struct qlr_chat_msg {
    const char *role;    /* "system", "user", "assistant" (chatml also accepts other roles) */
    const char *content; /* NUL-terminated UTF-8 */
} qlr_chat_msg;

/* A contiguous piece of the rendered text. Segments cover the text in order, end to end. */
typedef struct qlr_chat_segment {
    size_t start, end;    /* byte span [start, end) in text */
    int32_t message;      /* index into the messages, or -1 for text the template adds */
    uint8_t is_content;   /* 1: the message's content (as the template writes it, e.g. trimmed) */
    uint8_t is_assistant; /* 1: assistant output to train on: its content and the end-of-turn
                             marker that closes it (<|im_end|>, <|eot_id|>, </s>) */
} qlr_chat_segment;

typedef struct qlr_chat_render {
    char *text;                /* NUL-terminated */
    size_t len;
    qlr_chat_segment *segs;
    size_t n_segs;
} qlr_chat_render;

/* Renders `n` messages; with add_generation_prompt the text ends with the assistant header so
 * that generation continues as the assistant. Errors (QLR_ERR_INVALID, naming the message index):
 * a NULL role/content, a role the format cannot express (llama2/mistral: an optional system
 * first, then user and assistant alternating, user first). `out` is overwritten; free it with
 * qlr_chat_render_free. */
qlr_status qlr_chat_render_messages(const qlr_chat_template *t, const qlr_chat_msg *msgs, size_t n,
                                    int add_generation_prompt, qlr_chat_render *out);
void qlr_chat_render_free(qlr_chat_render *r);

#endif
