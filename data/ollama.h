/* data/ollama.h: a training prompt format written as an Ollama Modelfile: the TEMPLATE in
 * Ollama's Go-template language (text/template over .Messages, each with .Role and .Content)
 * that renders the same text our trainer tokenized (data/chat_template.c for the chat formats,
 * data/dataset.c for alpaca and completion), the stop strings, and the Modelfile around them.
 *
 * What Ollama's runtime adds on its own is left out of the TEMPLATE: the tokenizer's BOS when the
 * GGUF says add_bos_token (llama3, llama2 and mistral renders start with it as text here).
 * Known differences (documented, not renderable in Go templates without functions Ollama lacks):
 * llama3 and llama2 strip each message's surrounding whitespace, the TEMPLATE does not (the same
 * text for messages without leading/trailing whitespace); Ollama merges consecutive messages of
 * one role with "\n\n" before rendering, our trainer keeps them apart; alpaca uses the prompt
 * without an input field (a chat message has none); llama2 with a system message and an empty
 * first user message. It does not own the chat formats themselves (chat_template.c). */
#ifndef QLR_DATA_OLLAMA_H
#define QLR_DATA_OLLAMA_H

#include <stddef.h>

#include "core/status.h"

#define QLR_OLLAMA_MAX_STOPS 4

typedef struct qlr_ollama_template {
    char *text;                          /* the TEMPLATE body (malloc'ed) */
    const char *stops[QLR_OLLAMA_MAX_STOPS]; /* PARAMETER stop values (static or in `owned`) */
    int n_stops;
    char *owned;                         /* storage of a stop taken from the tokenizer */
} qlr_ollama_template;

/* The TEMPLATE of a prompt format: "chatml" (default_system: the message the template inserts
 * when the conversation has no system message first, or NULL), "llama3", "llama2", "mistral",
 * "alpaca", "completion". eos_text: the tokenizer's end-of-sequence text (alpaca and completion
 * train it after the answer; NULL = none). QLR_ERR_INVALID for an unknown format (naming the
 * known ones) or a default system message that cannot be put in a Modelfile (contains `"""`). */
qlr_status qlr_ollama_template_make(const char *format, const char *default_system, const char *eos_text,
                                    qlr_ollama_template *out);
void qlr_ollama_template_free(qlr_ollama_template *t);

/* The Modelfile: FROM `from`, ADAPTER `adapter` (NULL = none: a merged model), TEMPLATE """...""",
 * one PARAMETER stop per stop string. Paths are written as given (relative paths resolve against
 * the Modelfile's folder). *out malloc'ed. QLR_ERR_INVALID for a path with a newline. */
qlr_status qlr_ollama_modelfile(const char *from, const char *adapter, const qlr_ollama_template *t,
                                char **out);

#endif
