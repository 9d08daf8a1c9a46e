/* data/ollama.c: Ollama Modelfile TEMPLATEs of our training prompt formats (data/ollama.h).
 * Each template mirrors one renderer line by line: chatml, llama3, llama2 and mistral follow
 * qlr_chat_render_messages (data/chat_template.c) with add_generation_prompt; alpaca and
 * completion follow the prompts data/dataset.c builds. Go-template notes: `{{-` / `-}}` trim the
 * white space next to an action, so the template's own line breaks below are either wanted in
 * the output or trimmed; variables declared outside a range and assigned inside it ($sys, $first)
 * keep their value across iterations (Go >= 1.11). tests/data/test_ollama.c renders every
 * template with a small renderer of these constructs (tests/tools/gotmpl.py) and compares. */
#include "data/ollama.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

/* Literal text for a template: "{{" would open an action, so it is written as an action that
 * prints it. */
static void put_literal(qlr_strbuf *b, const char *s) {
    for (const char *p = s; *p; p++) {
        if (p[0] == '{' && p[1] == '{') {
            qlr_strbuf_puts(b, "{{ \"{{\" }}");
            p++;
        } else {
            qlr_strbuf_put(b, p, 1);
        }
    }
}

static const char ALPACA_HEAD[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n";

qlr_status qlr_ollama_template_make(const char *format, const char *default_system, const char *eos_text,
                                    qlr_ollama_template *out) {
    memset(out, 0, sizeof *out);
    if (!format) format = "";
    if (default_system && strstr(default_system, "\"\"\""))
        return qlr_errorf(QLR_ERR_INVALID, "ollama: the default system message contains \"\"\", which a Modelfile "
                                           "TEMPLATE cannot hold");
    if (eos_text && (!*eos_text || strstr(eos_text, "\"\"\"") || strchr(eos_text, '"') || strchr(eos_text, '\n')))
        eos_text = NULL; /* not expressible as a stop string: the runtime's own EOS stop remains */
    qlr_strbuf b = {0};
    if (!strcmp(format, "chatml")) {
        qlr_strbuf_puts(&b, "{{- range $i, $m := .Messages }}");
        if (default_system) {
            qlr_strbuf_puts(&b, "\n{{- if and (eq $i 0) (ne $m.Role \"system\") }}<|im_start|>system\n");
            put_literal(&b, default_system);
            qlr_strbuf_puts(&b, "<|im_end|>\n{{ end }}");
        }
        qlr_strbuf_puts(&b, "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n");
        out->stops[out->n_stops++] = "<|im_end|>";
        out->stops[out->n_stops++] = "<|im_start|>";
    } else if (!strcmp(format, "llama3")) {
        qlr_strbuf_puts(&b, "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                            "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n");
        out->stops[out->n_stops++] = "<|eot_id|>";
        out->stops[out->n_stops++] = "<|start_header_id|>";
    } else if (!strcmp(format, "llama2")) {
        qlr_strbuf_puts(&b, "{{- $sys := \"\" }}{{- $first := true }}\n"
                            "{{- range .Messages }}\n"
                            "{{- if eq .Role \"system\" }}{{ $sys = .Content }}\n"
                            "{{- else if eq .Role \"user\" }}{{ if not $first }}<s>{{ end }}[INST] "
                            "{{ if $sys }}<<SYS>>\n{{ $sys }}\n<</SYS>>\n\n{{ $sys = \"\" }}{{ end }}"
                            "{{ .Content }} [/INST]{{ $first = false }}\n"
                            "{{- else }} {{ .Content }} </s>\n"
                            "{{- end }}\n"
                            "{{- end }}");
        out->stops[out->n_stops++] = "[INST]";
        out->stops[out->n_stops++] = "</s>";
    } else if (!strcmp(format, "mistral")) {
        qlr_strbuf_puts(&b, "{{- $sys := \"\" }}\n"
                            "{{- range .Messages }}\n"
                            "{{- if eq .Role \"system\" }}{{ $sys = .Content }}\n"
                            "{{- else if eq .Role \"user\" }}[INST] {{ if $sys }}{{ $sys }}\n\n{{ $sys = \"\" }}{{ end }}"
                            "{{ .Content }} [/INST]\n"
                            "{{- else }}{{ .Content }}</s>\n"
                            "{{- end }}\n"
                            "{{- end }}");
        out->stops[out->n_stops++] = "[INST]";
        out->stops[out->n_stops++] = "</s>";
    } else if (!strcmp(format, "alpaca")) {
        qlr_strbuf_puts(&b, "{{- range .Messages }}\n{{- if eq .Role \"user\" }}");
        put_literal(&b, ALPACA_HEAD);
        qlr_strbuf_puts(&b, "{{ .Content }}\n\n### Response:\n{{ else if eq .Role \"assistant\" }}{{ .Content }}");
        if (eos_text) put_literal(&b, eos_text);
        qlr_strbuf_puts(&b, "\n{{- end }}\n{{- end }}");
        out->stops[out->n_stops++] = "### Instruction:";
    } else if (!strcmp(format, "completion")) {
        qlr_strbuf_puts(&b, "{{- range .Messages }}{{ if ne .Role \"system\" }}{{ .Content }}{{ end }}{{ end }}");
    } else {
        qlr_strbuf_free(&b);
        return qlr_errorf(QLR_ERR_INVALID,
                          "ollama: no template for prompt format '%s' (known: chatml, llama3, llama2, mistral, "
                          "alpaca, completion)", format);
    }
    if (eos_text && (!strcmp(format, "alpaca") || !strcmp(format, "completion"))) {
        if (!(out->owned = strdup(eos_text))) {
            qlr_strbuf_free(&b);
            return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        }
        out->stops[out->n_stops++] = out->owned;
    }
    if (b.oom) {
        qlr_strbuf_free(&b);
        free(out->owned);
        memset(out, 0, sizeof *out);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    out->text = b.p;
    return QLR_OK;
}

void qlr_ollama_template_free(qlr_ollama_template *t) {
    if (!t) return;
    free(t->text);
    free(t->owned);
    memset(t, 0, sizeof *t);
}

qlr_status qlr_ollama_modelfile(const char *from, const char *adapter, const qlr_ollama_template *t,
                                char **out) {
    *out = NULL;
    if (strchr(from, '\n') || (adapter && strchr(adapter, '\n')))
        return qlr_errorf(QLR_ERR_INVALID, "ollama: a path with a line break cannot go in a Modelfile");
    qlr_strbuf b = {0};
    qlr_strbuf_printf(&b, "# Made by qlora export --format ollama. Create the model with:\n"
                          "#   ollama create NAME -f Modelfile\n");
    qlr_strbuf_printf(&b, "FROM %s\n", from);
    if (adapter) qlr_strbuf_printf(&b, "ADAPTER %s\n", adapter);
    qlr_strbuf_puts(&b, "TEMPLATE \"\"\"");
    qlr_strbuf_puts(&b, t->text);
    qlr_strbuf_puts(&b, "\"\"\"\n");
    for (int i = 0; i < t->n_stops; i++) qlr_strbuf_printf(&b, "PARAMETER stop \"%s\"\n", t->stops[i]);
    if (b.oom) {
        qlr_strbuf_free(&b);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    *out = b.p;
    return QLR_OK;
}
