/* tests/fuzz/fuzz_request.c: libFuzzer target for infer/openai.c, the parser of HTTP request
 * bodies. Every input goes through the chat, completions, adapter-load and adapter-unload
 * parsers. A refusal must carry a 4xx/5xx status, a type and a message, and its error object must
 * be valid JSON; an accepted request must hold what the server relies on (messages with role and
 * content, exactly one kind of prompt, ranges of the sampling fields, at most 4 stop strings),
 * and its texts, written back as a completion, a stream and a model list, must give valid JSON
 * (the generated text is fed through as raw bytes, so invalid UTF-8 is exercised too). */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/openai.h"

static void check_json(const char *s) {
    QLR_ASSERT(s != NULL);
    json_error_t e;
    json_t *v = json_loads(s, 0, &e);
    QLR_ASSERT(v != NULL);
    json_decref(v);
}

static void check_error(const qlr_oai_error *e) {
    QLR_ASSERT(e->http_status >= 400 && e->http_status < 600);
    QLR_ASSERT(e->type != NULL && e->message[0] != 0);
    char *s = qlr_oai_error_json(e);
    check_json(s);
    free(s);
}

/* Every "data: " payload of an SSE text is JSON or [DONE], and the stream ends with [DONE]. */
static void check_sse(const qlr_strbuf *b) {
    QLR_ASSERT(!b->oom && b->p != NULL);
    const char *p = b->p, *last = NULL;
    while (*p) {
        QLR_ASSERT(!strncmp(p, "data: ", 6));
        const char *end = strstr(p, "\n\n");
        QLR_ASSERT(end != NULL);
        size_t len = (size_t)(end - p - 6);
        char *payload = malloc(len + 1);
        QLR_ASSERT(payload != NULL);
        memcpy(payload, p + 6, len);
        payload[len] = 0;
        QLR_ASSERT(memchr(payload, '\n', len) == NULL);
        if (strcmp(payload, "[DONE]")) check_json(payload);
        free(payload);
        last = p;
        p = end + 2;
    }
    QLR_ASSERT(last && !strcmp(last, "data: [DONE]\n\n"));
}

static void check_request(const qlr_oai_request *r, const uint8_t *data, size_t size) {
    if (r->endpoint == QLR_OAI_CHAT) {
        QLR_ASSERT(r->n_messages > 0 && r->messages != NULL);
        for (size_t i = 0; i < r->n_messages; i++)
            QLR_ASSERT(r->messages[i].role != NULL && r->messages[i].content != NULL);
    } else {
        QLR_ASSERT((r->prompt != NULL) != (r->n_prompt_ids > 0));
        for (size_t i = 0; i < r->n_prompt_ids; i++) QLR_ASSERT(r->prompt_ids[i] >= 0);
    }
    QLR_ASSERT(r->max_tokens >= 0);
    QLR_ASSERT(r->temperature >= 0 && r->temperature <= 2 && r->top_p >= 0 && r->top_p <= 1 && r->top_k >= 0);
    QLR_ASSERT(r->n_stop >= 0 && r->n_stop <= QLR_OAI_MAX_STOP);
    for (int32_t i = 0; i < r->n_stop; i++)
        QLR_ASSERT(r->stop[i] && r->stop[i][0] && strlen(r->stop[i]) <= QLR_OAI_MAX_STOP_BYTES);
    QLR_ASSERT(!r->include_usage || r->stream);
    if (r->has_lora) QLR_ASSERT((r->lora_name != NULL) != (r->lora_id >= 0));

    /* the raw input as "generated text", under the request's model name */
    const char *model = r->model ? r->model : "base";
    qlr_oai_result res = {"id", 1, model, (const char *)data, size, "stop", 1, 2, 0};
    char *s = qlr_oai_format_result(r->endpoint, &res);
    check_json(s);
    free(s);
    qlr_oai_stream st = {r->endpoint, "id", 1, model, r->include_usage};
    qlr_strbuf b = {0};
    qlr_oai_stream_begin(&st, &b);
    qlr_oai_stream_text(&st, (const char *)data, size, &b);
    if (r->endpoint == QLR_OAI_CHAT)
        for (size_t i = 0; i < r->n_messages; i++)
            qlr_oai_stream_text(&st, r->messages[i].content, strlen(r->messages[i].content), &b);
    qlr_oai_stream_end(&st, "length", 1, 2, 0, &b);
    check_sse(&b);
    qlr_strbuf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const qlr_oai_endpoint eps[] = {QLR_OAI_CHAT, QLR_OAI_COMPLETIONS};
    for (int i = 0; i < 2; i++) {
        qlr_oai_request r;
        qlr_oai_error e;
        memset(&e, 0, sizeof e);
        if (qlr_oai_parse_request(eps[i], data, size, &r, &e) == QLR_OK) {
            check_request(&r, data, size);
            qlr_oai_request_free(&r);
        } else {
            QLR_ASSERT(r.root == NULL && r.messages == NULL && r.prompt_ids == NULL);
            check_error(&e);
        }
    }
    for (int need_path = 0; need_path < 2; need_path++) {
        qlr_oai_lora_request l;
        qlr_oai_error e;
        memset(&e, 0, sizeof e);
        if (qlr_oai_parse_lora_request(data, size, need_path, &l, &e) == QLR_OK) {
            QLR_ASSERT(l.lora_name && l.lora_name[0]);
            QLR_ASSERT(!need_path || (l.lora_path && l.lora_path[0]));
            qlr_adapter_info a;
            memset(&a, 0, sizeof a);
            size_t n = strlen(l.lora_name);
            memcpy(a.name, l.lora_name, n < sizeof a.name ? n : sizeof a.name - 1);
            char *s = qlr_oai_format_models(l.lora_name, 0, 1, &a, 1);
            check_json(s);
            free(s);
            qlr_oai_lora_request_free(&l);
        } else {
            check_error(&e);
        }
    }
    return 0;
}
