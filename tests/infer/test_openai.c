/* tests/infer/test_openai.c: infer/openai.c: valid chat and completion bodies parse to the
 * expected fields and defaults; every refusal has status 400 and names the field at fault; the
 * load/unload bodies; the JSON of results, stream chunks (SSE framing), errors and the model
 * list parse back with OpenAI's fields; invalid UTF-8 in generated text becomes U+FFFD. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora.h"
#include "core/core.h"
#include "infer/openai.h"
#include "tests/test_util.h"

static qlr_status parse(qlr_oai_endpoint ep, const char *body, qlr_oai_request *r, qlr_oai_error *e) {
    memset(e, 0, sizeof *e);
    return qlr_oai_parse_request(ep, body, strlen(body), r, e);
}

static void test_chat_valid(void) {
    qlr_oai_request r;
    qlr_oai_error e;
    CHECK_OK(parse(QLR_OAI_CHAT,
                   "{\"model\":\"sql\",\"messages\":[{\"role\":\"developer\",\"content\":\"be brief\"},"
                   "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\","
                   "\"text\":\"b\"}]},{\"role\":\"assistant\",\"content\":null},{\"role\":\"user\","
                   "\"content\":\"hi\",\"name\":\"bob\"}],"
                   "\"max_tokens\":7,\"max_completion_tokens\":9,\"temperature\":0,\"top_p\":0.5,"
                   "\"top_k\":3,\"seed\":-1,\"stop\":[\"x\",\"yz\"],\"stream\":true,"
                   "\"stream_options\":{\"include_usage\":true},\"n\":1,\"user\":\"u\","
                   "\"frequency_penalty\":0,\"unknown_key\":{\"a\":1},\"lora\":[{\"name\":\"py\",\"scale\":0.5}],"
                   "\"ignore_eos\":true}",
                   &r, &e));
    CHECK(r.endpoint == QLR_OAI_CHAT);
    CHECK(r.model && !strcmp(r.model, "sql"));
    CHECK_EQ_INT(r.n_messages, 4);
    CHECK(!strcmp(r.messages[0].role, "system") && !strcmp(r.messages[0].content, "be brief"));
    CHECK(!strcmp(r.messages[1].role, "user") && !strcmp(r.messages[1].content, "a\nb"));
    CHECK(!strcmp(r.messages[2].role, "assistant") && !strcmp(r.messages[2].content, ""));
    CHECK(!strcmp(r.messages[3].content, "hi"));
    CHECK_EQ_INT(r.max_tokens, 9); /* max_completion_tokens wins */
    CHECK(!strcmp(r.max_tokens_field, "max_completion_tokens"));
    CHECK(r.temperature == 0.0f && r.top_p == 0.5f && r.top_k == 3);
    CHECK(r.has_seed && r.seed == UINT64_MAX);
    CHECK_EQ_INT(r.n_stop, 2);
    CHECK(!strcmp(r.stop[0], "x") && !strcmp(r.stop[1], "yz"));
    CHECK(r.stream && r.include_usage && r.ignore_eos);
    CHECK(r.has_lora && r.lora_name && !strcmp(r.lora_name, "py") && r.lora_id == -1 && r.lora_scale == 0.5f);
    qlr_oai_request_free(&r);
    CHECK(r.root == NULL && r.messages == NULL);

    /* defaults */
    CHECK_OK(parse(QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}],\"stop\":\"END\","
                                 "\"model\":null,\"temperature\":null,\"lora\":[]}", &r, &e));
    CHECK(!strcmp(r.max_tokens_field, "max_tokens"));
    CHECK(r.model == NULL && r.max_tokens == 0 && r.temperature == 1.0f && r.top_p == 1.0f && r.top_k == 0);
    CHECK(!r.has_seed && !r.stream && !r.include_usage && !r.has_lora && r.lora_scale == 1.0f);
    CHECK(!r.ignore_eos);
    CHECK(r.n_stop == 1 && !strcmp(r.stop[0], "END"));
    qlr_oai_request_free(&r);

    /* lora by id, top_k -1 = off */
    CHECK_OK(parse(QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}],\"top_k\":-1,"
                                 "\"lora\":[{\"id\":2}]}", &r, &e));
    CHECK(r.top_k == 0 && r.has_lora && r.lora_id == 2 && r.lora_name == NULL && r.lora_scale == 1.0f);
    qlr_oai_request_free(&r);
}

static void test_completions_valid(void) {
    qlr_oai_request r;
    qlr_oai_error e;
    CHECK_OK(parse(QLR_OAI_COMPLETIONS, "{\"prompt\":\"Once upon\",\"max_tokens\":4,\"echo\":false,"
                                        "\"logprobs\":null,\"suffix\":\"\",\"best_of\":1}", &r, &e));
    CHECK(r.prompt && !strcmp(r.prompt, "Once upon") && r.prompt_ids == NULL && r.max_tokens == 4);
    qlr_oai_request_free(&r);
    CHECK_OK(parse(QLR_OAI_COMPLETIONS, "{\"prompt\":[\"one\"]}", &r, &e));
    CHECK(r.prompt && !strcmp(r.prompt, "one"));
    qlr_oai_request_free(&r);
    CHECK_OK(parse(QLR_OAI_COMPLETIONS, "{\"prompt\":[1,22,333]}", &r, &e));
    CHECK(r.prompt == NULL && r.n_prompt_ids == 3 && r.prompt_ids[2] == 333);
    qlr_oai_request_free(&r);
    /* max_completion_tokens is a chat name: ignored by completions */
    CHECK_OK(parse(QLR_OAI_COMPLETIONS, "{\"prompt\":\"p\",\"max_completion_tokens\":5}", &r, &e));
    CHECK_EQ_INT(r.max_tokens, 0);
    qlr_oai_request_free(&r);
}

/* Each bad body: 400, the expected param, and a message that names it. */
typedef struct {
    qlr_oai_endpoint ep;
    const char *body;
    const char *param; /* "" = JSON null (the whole body) */
    const char *in_message;
} bad_case;

#define M "\"messages\":[{\"role\":\"user\",\"content\":\"q\"}]"

static const bad_case BAD[] = {
    {QLR_OAI_CHAT, "", "", "malformed JSON"},
    {QLR_OAI_CHAT, "{\"messages\":", "", "malformed JSON"},
    {QLR_OAI_CHAT, "{\"a\":1,\"a\":2}", "", "malformed JSON"},
    {QLR_OAI_CHAT, "[1,2]", "", "must be a JSON object"},
    {QLR_OAI_CHAT, "{}", "messages", "'messages' is required"},
    {QLR_OAI_CHAT, "{\"messages\":\"hi\"}", "messages", "expected a list, got string"},
    {QLR_OAI_CHAT, "{\"messages\":[]}", "messages", "at least one"},
    {QLR_OAI_CHAT, "{\"messages\":[3]}", "messages[0]", "expected an object, got integer"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages[0].role", "is required"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":5,\"content\":\"x\"}]}", "messages[0].role", "expected a string"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"robot\",\"content\":\"x\"}]}",
     "messages[1].role", "unknown role 'robot'"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\"}]}", "messages[0].content", "is required"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":1}]}", "messages[0].content",
     "expected a string or a list"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", "", "is not allowed"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
     "messages[0].content[0].type", "'image_url' are not supported"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":2}]}]}",
     "messages[0].content[0].text", "expected a string"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[7]}]}", "messages[0].content[0]",
     "expected an object"},
    {QLR_OAI_CHAT, "{\"messages\":[{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{}]}]}",
     "messages[0].tool_calls", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"model\":3}", "model", "expected a string, got integer"},
    {QLR_OAI_CHAT, "{" M ",\"max_tokens\":\"5\"}", "max_tokens", "expected an integer, got string"},
    {QLR_OAI_CHAT, "{" M ",\"max_tokens\":2.5}", "max_tokens", "expected an integer, got real"},
    {QLR_OAI_CHAT, "{" M ",\"max_tokens\":0}", "max_tokens", "between 1 and"},
    {QLR_OAI_CHAT, "{" M ",\"max_tokens\":99999999999}", "max_tokens", "between 1 and"},
    {QLR_OAI_CHAT, "{" M ",\"max_completion_tokens\":-3}", "max_completion_tokens", "between 1 and"},
    {QLR_OAI_CHAT, "{" M ",\"temperature\":\"hot\"}", "temperature", "expected a number, got string"},
    {QLR_OAI_CHAT, "{" M ",\"temperature\":2.5}", "temperature", "between 0 and 2"},
    {QLR_OAI_CHAT, "{" M ",\"temperature\":-0.1}", "temperature", "between 0 and 2"},
    {QLR_OAI_CHAT, "{" M ",\"top_p\":1.5}", "top_p", "between 0 and 1"},
    {QLR_OAI_CHAT, "{" M ",\"top_p\":true}", "top_p", "expected a number, got true"},
    {QLR_OAI_CHAT, "{" M ",\"top_k\":-2}", "top_k", "between -1 and"},
    {QLR_OAI_CHAT, "{" M ",\"top_k\":1.0}", "top_k", "expected an integer"},
    {QLR_OAI_CHAT, "{" M ",\"seed\":\"1\"}", "seed", "expected an integer"},
    {QLR_OAI_CHAT, "{" M ",\"stop\":5}", "stop", "expected a string or a list of strings"},
    {QLR_OAI_CHAT, "{" M ",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop", "at most 4"},
    {QLR_OAI_CHAT, "{" M ",\"stop\":[\"a\",3]}", "stop[1]", "expected a string"},
    {QLR_OAI_CHAT, "{" M ",\"stop\":\"\"}", "stop", "must not be empty"},
    {QLR_OAI_CHAT, "{" M ",\"stream\":\"yes\"}", "stream", "expected true or false"},
    {QLR_OAI_CHAT, "{" M ",\"stream\":1}", "stream", "expected true or false"},
    {QLR_OAI_CHAT, "{" M ",\"stream_options\":{\"include_usage\":true}}", "stream_options",
     "only allowed when 'stream' is true"},
    {QLR_OAI_CHAT, "{" M ",\"stream\":true,\"stream_options\":[]}", "stream_options", "expected an object"},
    {QLR_OAI_CHAT, "{" M ",\"stream\":true,\"stream_options\":{\"include_usage\":\"y\"}}",
     "stream_options.include_usage", "expected true or false"},
    {QLR_OAI_CHAT, "{" M ",\"ignore_eos\":1}", "ignore_eos", "expected true or false"},
    {QLR_OAI_CHAT, "{" M ",\"n\":2}", "n", "'n' must be 1"},
    {QLR_OAI_CHAT, "{" M ",\"n\":\"1\"}", "n", "expected an integer"},
    {QLR_OAI_CHAT, "{" M ",\"presence_penalty\":0.5}", "presence_penalty", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"frequency_penalty\":9}", "frequency_penalty", "between -2 and 2"},
    {QLR_OAI_CHAT, "{" M ",\"logit_bias\":{\"5\":1}}", "logit_bias", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"logprobs\":true}", "logprobs", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"top_logprobs\":2}", "top_logprobs", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"tools\":[{\"type\":\"function\"}]}", "tools", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"tool_choice\":\"auto\"}", "tool_choice", "not supported"},
    {QLR_OAI_CHAT, "{" M ",\"response_format\":{\"type\":\"json_object\"}}", "response_format.type",
     "only \"text\""},
    {QLR_OAI_CHAT, "{" M ",\"lora\":{\"id\":0}}", "lora", "expected a list"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[{\"id\":0},{\"id\":1}]}", "lora", "one adapter per request"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[5]}", "lora[0]", "expected an object"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[{\"scale\":1}]}", "lora[0]", "\"id\" or \"name\" is required"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[{\"id\":0,\"name\":\"a\"}]}", "lora[0]", "not both"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[{\"id\":-1}]}", "lora[0].id", "between 0 and"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[{\"name\":7}]}", "lora[0].name", "expected a string"},
    {QLR_OAI_CHAT, "{" M ",\"lora\":[{\"name\":\"a\",\"scale\":\"x\"}]}", "lora[0].scale", "expected a number"},
    {QLR_OAI_COMPLETIONS, "{}", "prompt", "'prompt' is required"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":{}}", "prompt", "expected a string"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":[]}", "prompt", "empty list"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":[\"a\",\"b\"]}", "prompt", "one prompt per request"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":[[1,2]]}", "prompt[0]", "not supported"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":[1,\"x\"]}", "prompt[1]", "expected an integer"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":[1,-4]}", "prompt[1]", "between 0 and"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":\"p\",\"echo\":true}", "echo", "not supported"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":\"p\",\"suffix\":\"s\"}", "suffix", "not supported"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":\"p\",\"logprobs\":2}", "logprobs", "not supported"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":\"p\",\"best_of\":3}", "best_of", "must be 1"},
    {QLR_OAI_COMPLETIONS, "{\"prompt\":\"p\",\"max_tokens\":null,\"temperature\":[]}", "temperature",
     "expected a number, got array"},
};

static void test_bad_bodies(void) {
    for (size_t i = 0; i < sizeof BAD / sizeof BAD[0]; i++) {
        const bad_case *c = &BAD[i];
        qlr_oai_request r;
        qlr_oai_error e;
        qlr_status st = parse(c->ep, c->body, &r, &e);
        CHECK_MSG(st == QLR_ERR_INVALID, "case %zu (%s): status %d", i, c->body, (int)st);
        CHECK_MSG(e.http_status == 400 && !strcmp(e.type, "invalid_request_error"), "case %zu: http %d", i,
                  e.http_status);
        CHECK_MSG(!strcmp(e.param, c->param), "case %zu (%s): param '%s', expected '%s'", i, c->body, e.param,
                  c->param);
        CHECK_MSG(strstr(e.message, c->in_message) != NULL, "case %zu: message '%s' lacks '%s'", i, e.message,
                  c->in_message);
        if (c->param[0])
            CHECK_MSG(strstr(e.message, c->param) != NULL, "case %zu: message '%s' does not name '%s'", i,
                      e.message, c->param);
        CHECK(r.root == NULL && r.messages == NULL && r.owned == NULL);
        qlr_oai_request_free(&r); /* harmless on the emptied struct */
    }
    /* malformed JSON says where */
    qlr_oai_request r;
    qlr_oai_error e;
    CHECK(parse(QLR_OAI_CHAT, "{\n \"messages\": [,]}", &r, &e) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(e.message, "request body:2:") != NULL, "no position in '%s'", e.message);
}

static void test_lora_bodies(void) {
    qlr_oai_lora_request l;
    qlr_oai_error e;
    const char *ok = "{\"lora_name\":\"sql\",\"lora_path\":\"sql/adapter.gguf\"}";
    CHECK_OK(qlr_oai_parse_lora_request(ok, strlen(ok), 1, &l, &e));
    CHECK(!strcmp(l.lora_name, "sql") && !strcmp(l.lora_path, "sql/adapter.gguf"));
    qlr_oai_lora_request_free(&l);
    const char *unl = "{\"lora_name\":\"sql\"}";
    CHECK_OK(qlr_oai_parse_lora_request(unl, strlen(unl), 0, &l, &e));
    CHECK(l.lora_path == NULL);
    qlr_oai_lora_request_free(&l);
    struct { const char *b; int path; const char *param; } bad[] = {
        {"{", 1, ""},
        {"\"x\"", 1, ""},
        {"{\"lora_path\":\"a\"}", 1, "lora_name"},
        {"{\"lora_name\":1,\"lora_path\":\"a\"}", 1, "lora_name"},
        {"{\"lora_name\":\"\",\"lora_path\":\"a\"}", 1, "lora_name"},
        {"{\"lora_name\":\"a\"}", 1, "lora_path"},
        {"{\"lora_name\":\"a\",\"lora_path\":[]}", 1, "lora_path"},
        {"{\"lora_name\":\"a\",\"lora_path\":\"\"}", 1, "lora_path"},
        {"{\"lora_name\":null}", 0, "lora_name"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&e, 0, sizeof e);
        CHECK_MSG(qlr_oai_parse_lora_request(bad[i].b, strlen(bad[i].b), bad[i].path, &l, &e) == QLR_ERR_INVALID,
                  "lora case %zu accepted", i);
        CHECK_MSG(e.http_status == 400 && !strcmp(e.param, bad[i].param), "lora case %zu: %d '%s'", i,
                  e.http_status, e.param);
        CHECK(l.root == NULL);
    }
}

/* Parses `s` as JSON (must succeed). */
static json_t *load(const char *s) {
    json_error_t je;
    json_t *v = json_loads(s, 0, &je);
    CHECK_MSG(v != NULL, "not JSON: %s (%s)", s, je.text);
    return v;
}

static const char *sget(json_t *o, const char *path) {
    json_t *v = o;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *tok = strtok(buf, "."); tok && v; tok = strtok(NULL, ".")) {
        if (*tok >= '0' && *tok <= '9') v = json_array_get(v, (size_t)atoi(tok));
        else v = json_object_get(v, tok);
    }
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static json_int_t iget(json_t *o, const char *a, const char *b) {
    return json_integer_value(json_object_get(json_object_get(o, a), b));
}

static void test_results(void) {
    char id[64];
    qlr_oai_make_id(QLR_OAI_CHAT, 42, id, sizeof id);
    CHECK(!strncmp(id, "chatcmpl-", 9) && strlen(id) == 9 + 24);
    char id2[64];
    qlr_oai_make_id(QLR_OAI_CHAT, 43, id2, sizeof id2);
    CHECK(strcmp(id, id2) != 0);
    qlr_oai_make_id(QLR_OAI_COMPLETIONS, 42, id2, sizeof id2);
    CHECK(!strncmp(id2, "cmpl-", 5));

    qlr_oai_result r = {id, 1700000000, "sql", "Hello \"w\"\n", 10, "stop", 12, 3, 4};
    char *s = qlr_oai_format_result(QLR_OAI_CHAT, &r);
    json_t *v = load(s);
    CHECK(sget(v, "object") && !strcmp(sget(v, "object"), "chat.completion"));
    CHECK(!strcmp(sget(v, "id"), id) && !strcmp(sget(v, "model"), "sql"));
    CHECK(json_integer_value(json_object_get(v, "created")) == 1700000000);
    CHECK(sget(v, "choices.0.message.role") && !strcmp(sget(v, "choices.0.message.role"), "assistant"));
    CHECK(sget(v, "choices.0.message.content") && !strcmp(sget(v, "choices.0.message.content"), "Hello \"w\"\n"));
    CHECK(!strcmp(sget(v, "choices.0.finish_reason"), "stop"));
    CHECK(iget(v, "usage", "prompt_tokens") == 12 && iget(v, "usage", "completion_tokens") == 3 &&
          iget(v, "usage", "total_tokens") == 15);
    CHECK(json_integer_value(json_object_get(json_object_get(json_object_get(v, "usage"), "prompt_tokens_details"),
                                             "cached_tokens")) == 4);
    json_decref(v);
    free(s);

    r.finish_reason = "length";
    r.text = "ab\xff" "c\xe2\x82";   /* a bad byte, then a truncated 3-byte sequence */
    r.len = 6;
    s = qlr_oai_format_result(QLR_OAI_COMPLETIONS, &r);
    v = load(s);
    CHECK(!strcmp(sget(v, "object"), "text_completion"));
    CHECK(sget(v, "choices.0.text") && !strcmp(sget(v, "choices.0.text"), "ab\xef\xbf\xbd" "c\xef\xbf\xbd"));
    CHECK(!strcmp(sget(v, "choices.0.finish_reason"), "length"));
    json_decref(v);
    free(s);
}

/* Splits SSE text into its "data: " payloads; checks the framing. Returns the count. */
static int sse_split(const char *text, char out[][2048], int max) {
    int n = 0;
    const char *p = text;
    while (*p) {
        CHECK_MSG(!strncmp(p, "data: ", 6), "event does not start with 'data: ': %.40s", p);
        const char *end = strstr(p, "\n\n");
        CHECK_MSG(end != NULL, "event not ended by a blank line");
        if (!end || n == max) break;
        size_t len = (size_t)(end - p - 6);
        CHECK(memchr(p + 6, '\n', len) == NULL); /* one line per payload */
        if (len >= 2048) len = 2047;
        memcpy(out[n], p + 6, len);
        out[n][len] = 0;
        n++;
        p = end + 2;
    }
    return n;
}

static void test_stream(void) {
    static char ev[8][2048];
    qlr_oai_stream s = {QLR_OAI_CHAT, "chatcmpl-x", 5, "base", 1};
    qlr_strbuf b = {0};
    qlr_oai_stream_begin(&s, &b);
    qlr_oai_stream_text(&s, "Hel", 3, &b);
    qlr_oai_stream_text(&s, "", 0, &b); /* nothing */
    qlr_oai_stream_text(&s, "lo\n", 3, &b);
    qlr_oai_stream_end(&s, "length", 7, 2, 0, &b);
    CHECK(!b.oom);
    int n = sse_split(b.p, ev, 8);
    CHECK_EQ_INT(n, 6); /* role, 2 texts, finish, usage, [DONE] */
    const char *want_content[] = {"", "Hel", "lo\n"};
    for (int i = 0; i < 5 && i < n; i++) {
        json_t *v = load(ev[i]);
        CHECK(!strcmp(sget(v, "object"), "chat.completion.chunk") && !strcmp(sget(v, "id"), "chatcmpl-x"));
        json_t *usage = json_object_get(v, "usage");
        if (i < 3) {
            CHECK(!strcmp(sget(v, "choices.0.delta.content"), want_content[i]));
            CHECK(json_is_null(json_object_get(json_array_get(json_object_get(v, "choices"), 0), "finish_reason")));
            CHECK(json_is_null(usage));
        }
        if (i == 0) CHECK(sget(v, "choices.0.delta.role") && !strcmp(sget(v, "choices.0.delta.role"), "assistant"));
        if (i == 3) {
            CHECK(!strcmp(sget(v, "choices.0.finish_reason"), "length"));
            CHECK(json_object_size(json_object_get(json_array_get(json_object_get(v, "choices"), 0), "delta")) == 0);
        }
        if (i == 4) {
            CHECK(json_array_size(json_object_get(v, "choices")) == 0);
            CHECK(iget(v, "usage", "total_tokens") == 9);
        }
        json_decref(v);
    }
    CHECK(n == 6 && !strcmp(ev[5], "[DONE]"));
    qlr_strbuf_free(&b);

    /* completions, no usage: text chunks, a finish chunk, [DONE]; no "usage" key at all */
    qlr_oai_stream c = {QLR_OAI_COMPLETIONS, "cmpl-y", 5, "sql", 0};
    qlr_oai_stream_begin(&c, &b);
    CHECK(b.n == 0);
    qlr_oai_stream_text(&c, "a\xc3", 2, &b); /* truncated UTF-8 in a chunk is replaced, not dropped */
    qlr_oai_stream_end(&c, "stop", 1, 1, 0, &b);
    n = sse_split(b.p, ev, 8);
    CHECK_EQ_INT(n, 3);
    json_t *v = load(ev[0]);
    CHECK(!strcmp(sget(v, "object"), "text_completion") && !strcmp(sget(v, "choices.0.text"), "a\xef\xbf\xbd"));
    CHECK(json_object_get(v, "usage") == NULL);
    json_decref(v);
    v = load(ev[1]);
    CHECK(!strcmp(sget(v, "choices.0.finish_reason"), "stop") && !strcmp(sget(v, "choices.0.text"), ""));
    json_decref(v);
    qlr_strbuf_free(&b);

    /* an error inside a stream */
    qlr_oai_error e;
    qlr_oai_error_set(&e, 500, NULL, NULL, "device error: %s", "boom");
    qlr_oai_stream_error(&e, &b);
    n = sse_split(b.p, ev, 8);
    CHECK_EQ_INT(n, 2);
    v = load(ev[0]);
    CHECK(!strcmp(sget(v, "error.message"), "device error: boom") && !strcmp(sget(v, "error.type"), "server_error"));
    json_decref(v);
    CHECK(!strcmp(ev[1], "[DONE]"));
    qlr_strbuf_free(&b);
}

static void test_errors_json(void) {
    struct { int st; const char *type; } t[] = {{400, "invalid_request_error"}, {401, "authentication_error"},
                                                 {403, "permission_error"}, {404, "invalid_request_error"},
                                                 {413, "invalid_request_error"}, {429, "rate_limit_error"},
                                                 {500, "server_error"}, {503, "server_error"}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        qlr_oai_error e;
        qlr_oai_error_set(&e, t[i].st, i % 2 ? "temperature" : NULL, i % 2 ? "c" : NULL, "m%d", t[i].st);
        char *s = qlr_oai_error_json(&e);
        json_t *v = load(s);
        json_t *in = json_object_get(v, "error");
        CHECK_MSG(!strcmp(sget(v, "error.type"), t[i].type), "status %d: type %s", t[i].st, sget(v, "error.type"));
        char m[16];
        snprintf(m, sizeof m, "m%d", t[i].st);
        CHECK(!strcmp(sget(v, "error.message"), m));
        if (i % 2) CHECK(!strcmp(sget(v, "error.param"), "temperature") && !strcmp(sget(v, "error.code"), "c"));
        else CHECK(json_is_null(json_object_get(in, "param")) && json_is_null(json_object_get(in, "code")));
        CHECK(json_object_size(in) == 4);
        json_decref(v);
        free(s);
    }
}

static void test_models(void) {
    qlr_adapter_info a[2];
    memset(a, 0, sizeof a);
    snprintf(a[0].name, sizeof a[0].name, "sql");
    snprintf(a[0].path, sizeof a[0].path, "/adapters/sql.gguf");
    a[0].r = 16;
    a[0].alpha = 32;
    a[0].scale = 2;
    a[0].residency = QLR_RESIDENCY_DEVICE;
    a[0].refs = 1;
    a[0].uses = 7;
    a[0].targets = QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V) | QLR_LORA_TARGET(QLR_LIN_DOWN);
    snprintf(a[1].name, sizeof a[1].name, "py");
    a[1].r = 8;
    a[1].residency = QLR_RESIDENCY_FILE;
    char *s = qlr_oai_format_models("smol", 9, 2048, a, 2);
    json_t *v = load(s);
    CHECK(!strcmp(sget(v, "object"), "list"));
    json_t *d = json_object_get(v, "data");
    CHECK_EQ_INT(json_array_size(d), 3);
    CHECK(!strcmp(sget(v, "data.0.id"), "smol") && !strcmp(sget(v, "data.0.object"), "model"));
    CHECK(json_is_null(json_object_get(json_array_get(d, 0), "parent")));
    CHECK(!strcmp(sget(v, "data.1.id"), "sql") && !strcmp(sget(v, "data.1.parent"), "smol"));
    CHECK(!strcmp(sget(v, "data.1.root"), "/adapters/sql.gguf") && !strcmp(sget(v, "data.1.residency"), "device"));
    CHECK(json_integer_value(json_object_get(json_array_get(d, 1), "rank")) == 16);
    CHECK(json_integer_value(json_object_get(json_array_get(d, 2), "lora_id")) == 1);
    CHECK(!strcmp(sget(v, "data.2.residency"), "file") && !strcmp(sget(v, "data.2.root"), "py"));
    CHECK(json_integer_value(json_object_get(json_array_get(d, 1), "requests")) == 7);
    CHECK(json_integer_value(json_object_get(json_array_get(d, 2), "requests")) == 0);
    json_t *tg = json_object_get(json_array_get(d, 1), "targets");
    CHECK(json_array_size(tg) == 3 && !strcmp(json_string_value(json_array_get(tg, 0)), "q_proj") &&
          !strcmp(json_string_value(json_array_get(tg, 1)), "v_proj") &&
          !strcmp(json_string_value(json_array_get(tg, 2)), "down_proj"));
    CHECK(json_array_size(json_object_get(json_array_get(d, 2), "targets")) == 0);
    CHECK(json_integer_value(json_object_get(json_array_get(d, 0), "created")) == 9);
    json_decref(v);
    free(s);
    s = qlr_oai_format_models("smol", 9, 2048, NULL, 0);
    v = load(s);
    CHECK_EQ_INT(json_array_size(json_object_get(v, "data")), 1);
    json_decref(v);
    free(s);
}

static void test_utf8(void) {
    struct { const char *in; size_t n; const char *out; } t[] = {
        {"plain", 5, "plain"},
        {"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}, /* é € 😀 */
        {"\x80", 1, "\xef\xbf\xbd"},                        /* lone continuation */
        {"\xc0\xaf", 2, "\xef\xbf\xbd\xef\xbf\xbd"},        /* overlong: two bad bytes */
        {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* surrogate */
        {"\xf4\x90\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* > U+10FFFF */
        {"\xe2\x82x", 3, "\xef\xbf\xbdx"},                  /* truncated, then ASCII: one U+FFFD */
        {"\xf0\x9f\x98", 3, "\xef\xbf\xbd"},                /* truncated at the end */
        {"a\0b", 3, "a\0b"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        size_t n = 0;
        char *s = qlr_oai_utf8_sanitize(t[i].in, t[i].n, &n);
        size_t want = i == 8 ? 3 : strlen(t[i].out);
        CHECK_MSG(s && n == want && !memcmp(s, t[i].out, want), "utf8 case %zu", i);
        free(s);
    }
}

int main(void) {
    test_chat_valid();
    test_completions_valid();
    test_bad_bodies();
    test_lora_bodies();
    test_results();
    test_stream();
    test_errors_json();
    test_models();
    test_utf8();
    return test_finish();
}
