/* tests/data/test_chat_template.c: the built-in chat formats against what the Hugging Face Jinja
 * templates print (strings rendered once with jinja2 from SmolLM2's tokenizer.chat_template and
 * the Llama 3 / Llama 2 / Mistral v0.1 templates), detection from template source, the
 * per-message segments used for loss masking, and errors. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "tests/test_util.h"

/* Segments must tile the text, and the content segments must hold the message text. */
static void check_segments(const qlr_chat_render *r) {
    size_t pos = 0;
    int ok = 1;
    for (size_t i = 0; i < r->n_segs; i++) {
        if (r->segs[i].start != pos || r->segs[i].end <= r->segs[i].start) ok = 0;
        pos = r->segs[i].end;
    }
    CHECK_MSG(ok && pos == r->len, "segments do not tile the text");
}

/* The concatenation of the is_assistant segments. */
static void assistant_text(const qlr_chat_render *r, char *out, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < r->n_segs; i++) {
        if (!r->segs[i].is_assistant) continue;
        size_t n = r->segs[i].end - r->segs[i].start;
        if (k + n + 1 > cap) break;
        memcpy(out + k, r->text + r->segs[i].start, n);
        k += n;
    }
    out[k] = 0;
}

static const char SMOL_TMPL[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt"
    " %}{{ '<|im_start|>assistant\n' }}{% endif %}";

static void test_chatml_smollm(void) {
    qlr_chat_template *t;
    CHECK_OK(qlr_chat_template_detect(SMOL_TMPL, strlen(SMOL_TMPL), &t));
    if (!t) return;
    CHECK_EQ_INT(qlr_chat_template_format(t), QLR_CHAT_CHATML);
    CHECK(qlr_chat_template_default_system(t) &&
          strcmp(qlr_chat_template_default_system(t),
                 "You are a helpful AI assistant named SmolLM, trained by Hugging Face") == 0);
    qlr_chat_msg m[] = {{"user", "Hi"}, {"assistant", "Hello!"}};
    qlr_chat_render r;
    CHECK_OK(qlr_chat_render_messages(t, m, 2, 0, &r));
    const char *want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                       "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n";
    CHECK_MSG(strcmp(r.text, want) == 0, "got %s", r.text);
    CHECK_EQ_INT(r.len, strlen(want));
    check_segments(&r);
    char a[256];
    assistant_text(&r, a, sizeof a);
    CHECK_MSG(strcmp(a, "Hello!<|im_end|>") == 0, "assistant text: %s", a);
    int found = 0;
    for (size_t i = 0; i < r.n_segs; i++)
        if (r.segs[i].message == 0 && r.segs[i].is_content)
            found = r.segs[i].end - r.segs[i].start == 2 && memcmp(r.text + r.segs[i].start, "Hi", 2) == 0;
    CHECK(found);
    qlr_chat_render_free(&r);

    qlr_chat_msg m2[] = {{"system", "S"}, {"user", "Q"}};
    CHECK_OK(qlr_chat_render_messages(t, m2, 2, 1, &r));
    CHECK(strcmp(r.text, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n") == 0);
    check_segments(&r);
    assistant_text(&r, a, sizeof a);
    CHECK_EQ_INT(strlen(a), 0);
    qlr_chat_render_free(&r);
    qlr_chat_template_free(t);

    /* Qwen-style escapes: '\n' written as backslash-n in the Jinja string */
    const char *qwen = "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful "
                       "assistant.<|im_end|>\\n' }}{%- endif %}";
    CHECK_OK(qlr_chat_template_detect(qwen, strlen(qwen), &t));
    CHECK(t && qlr_chat_template_default_system(t) &&
          strcmp(qlr_chat_template_default_system(t), "You are a helpful assistant.") == 0);
    qlr_chat_template_free(t);
    /* a plain chatml template has no default system message */
    CHECK_OK(qlr_chat_template_from_name("chatml", &t));
    CHECK(t && qlr_chat_template_default_system(t) == NULL);
    qlr_chat_msg m3[] = {{"user", "x"}};
    CHECK_OK(qlr_chat_render_messages(t, m3, 1, 1, &r));
    CHECK(strcmp(r.text, "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n") == 0);
    qlr_chat_render_free(&r);
    qlr_chat_template_free(t);
}

static const qlr_chat_msg CONV[] = {
    {"system", "Be brief."}, {"user", " Hi "}, {"assistant", "Hello! "}, {"user", "Bye"}};

static void test_llama3(void) {
    const char *src = "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
                      "message['content'] | trim + '<|eot_id|>' %}";
    qlr_chat_template *t;
    CHECK_OK(qlr_chat_template_detect(src, strlen(src), &t));
    if (!t) return;
    CHECK_EQ_INT(qlr_chat_template_format(t), QLR_CHAT_LLAMA3);
    CHECK(qlr_chat_template_has_bos(t));
    qlr_chat_render r;
    CHECK_OK(qlr_chat_render_messages(t, CONV, 4, 1, &r));
    const char *want = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant"
                       "<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n";
    CHECK_MSG(strcmp(r.text, want) == 0, "got %s", r.text);
    check_segments(&r);
    char a[256];
    assistant_text(&r, a, sizeof a);
    CHECK_MSG(strcmp(a, "Hello!<|eot_id|>") == 0, "assistant text: %s", a);
    qlr_chat_render_free(&r);
    qlr_chat_template_free(t);
}

static void test_llama2_mistral(void) {
    qlr_chat_template *t;
    const char *src = "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
                      "system_message %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}";
    CHECK_OK(qlr_chat_template_detect(src, strlen(src), &t));
    if (!t) return;
    CHECK_EQ_INT(qlr_chat_template_format(t), QLR_CHAT_LLAMA2);
    qlr_chat_render r;
    CHECK_OK(qlr_chat_render_messages(t, CONV, 4, 1, &r));
    const char *want = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello! </s><s>[INST] Bye [/INST]";
    CHECK_MSG(strcmp(r.text, want) == 0, "got %s", r.text);
    check_segments(&r);
    char a[256];
    assistant_text(&r, a, sizeof a);
    CHECK_MSG(strcmp(a, "Hello! </s>") == 0, "assistant text: '%s'", a);
    qlr_chat_render_free(&r);
    /* roles must alternate */
    qlr_chat_msg bad[] = {{"user", "a"}, {"user", "b"}};
    CHECK(qlr_chat_render_messages(t, bad, 2, 0, &r) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "message 1") != NULL);
    qlr_chat_msg bad2[] = {{"tool", "a"}};
    CHECK(qlr_chat_render_messages(t, bad2, 1, 0, &r) == QLR_ERR_INVALID);
    qlr_chat_template_free(t);

    const char *msrc = "{{ bos_token }}{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}";
    CHECK_OK(qlr_chat_template_detect(msrc, strlen(msrc), &t));
    if (!t) return;
    CHECK_EQ_INT(qlr_chat_template_format(t), QLR_CHAT_MISTRAL);
    CHECK_OK(qlr_chat_render_messages(t, CONV + 1, 3, 1, &r));
    CHECK_MSG(strcmp(r.text, "<s>[INST]  Hi  [/INST]Hello! </s>[INST] Bye [/INST]") == 0, "got %s", r.text);
    check_segments(&r);
    assistant_text(&r, a, sizeof a);
    CHECK_MSG(strcmp(a, "Hello! </s>") == 0, "assistant text: '%s'", a);
    qlr_chat_render_free(&r);
    qlr_chat_template_free(t);
}

static void test_names_and_errors(void) {
    qlr_chat_template *t = (qlr_chat_template *)1;
    CHECK(qlr_chat_template_from_name("vicuna", &t) == QLR_ERR_INVALID && t == NULL);
    CHECK_MSG(strstr(qlr_error_msg(), "vicuna") && strstr(qlr_error_msg(), "chatml, llama3, llama2, mistral"),
              "message: %s", qlr_error_msg());
    const char *unk = "{{ messages }}";
    CHECK(qlr_chat_template_detect(unk, strlen(unk), &t) == QLR_ERR_UNSUPPORTED);
    CHECK(qlr_chat_template_detect(NULL, 0, &t) == QLR_ERR_NOT_FOUND);
    for (int i = 0; i < 4; i++) {
        const char *names[] = {"chatml", "llama3", "llama2", "mistral"};
        CHECK_OK(qlr_chat_template_from_name(names[i], &t));
        CHECK(t && strcmp(qlr_chat_template_name(t), names[i]) == 0);
        qlr_chat_msg m[] = {{"user", NULL}};
        qlr_chat_render r;
        CHECK(qlr_chat_render_messages(t, m, 1, 0, &r) == QLR_ERR_INVALID);
        CHECK_OK(qlr_chat_render_messages(t, NULL, 0, 0, &r));
        CHECK(r.text != NULL);
        qlr_chat_render_free(&r);
        qlr_chat_template_free(t);
    }
}

/* The demo model's own template, rendered and tokenized: the assistant tokens are exactly the
 * ones whose bytes lie in assistant segments (offsets from the tokenizer). */
static void test_demo_tokens(void) {
    const char *model = test_demo_model_or_fail();
    if (!model) return;
    qlr_tokenizer *tok;
    CHECK_OK(qlr_tokenizer_open_gguf(model, &tok));
    if (!tok) return;
    const char *src = qlr_tokenizer_chat_template(tok);
    qlr_chat_template *t = NULL;
    CHECK_OK(qlr_chat_template_detect(src, src ? strlen(src) : 0, &t));
    if (t) {
        CHECK(qlr_chat_template_default_system(t) != NULL);
        qlr_chat_msg m[] = {{"user", "What is 2+2?"}, {"assistant", "4"}};
        qlr_chat_render r;
        CHECK_OK(qlr_chat_render_messages(t, m, 2, 0, &r));
        qlr_tokens v = {0};
        CHECK_OK(qlr_tokenizer_encode(tok, r.text, r.len, QLR_ENC_PARSE_SPECIAL | QLR_ENC_OFFSETS, &v));
        int n_asst = 0;
        char a[64] = "";
        for (size_t i = 0; i < v.n; i++) {
            for (size_t s = 0; s < r.n_segs; s++)
                if (r.segs[s].is_assistant && v.offsets[i] >= r.segs[s].start && v.offsets[i] < r.segs[s].end) {
                    n_asst++;
                    strncat(a, qlr_tokenizer_token_text(tok, v.ids[i]), sizeof a - strlen(a) - 1);
                }
        }
        CHECK_MSG(n_asst == 2 && strcmp(a, "4<|im_end|>") == 0, "assistant tokens: %d '%s'", n_asst, a);
        qlr_tokens_free(&v);
        qlr_chat_render_free(&r);
    }
    qlr_chat_template_free(t);
    qlr_tokenizer_free(tok);
}

int main(void) {
    test_chatml_smollm();
    test_llama3();
    test_llama2_mistral();
    test_names_and_errors();
    test_demo_tokens();
    return test_finish();
}
