/* tests/data/test_ollama.c: every Ollama TEMPLATE of data/ollama.c, rendered for sample
 * conversations by tests/tools/gotmpl.py (a small renderer of the Go-template constructs the
 * templates use, with Ollama's collation), must equal the prompt our trainer tokenizes: for the
 * chat formats qlr_chat_render_messages with the generation prompt (minus the BOS text that
 * llama3 / llama2 / mistral renders carry and llama.cpp's tokenizer adds by itself), for alpaca
 * and completion the prompt part data/dataset.c builds. Also the Modelfile around a template,
 * and the refusals. Skips the render check (with a note) when python3 is missing. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "core/core.h"
#include "data/chat_template.h"
#include "data/dataset.h"
#include "data/ollama.h"
#include "tests/test_util.h"

static const char *SYS = "You are a careful assistant. Answer in JSON {\"a\": 1} only.";
static const char *DEF_SYS = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/* Conversations (roles alternate as llama2/mistral require); contents without surrounding white
 * space (the documented difference for llama3/llama2), with inner newlines and braces. */
typedef struct conv {
    const char *name;
    qlr_chat_msg msgs[4];
    size_t n;
} conv;

static const conv CONVS[] = {
    {"user", {{"user", "Extract the name: hi, Ana from Lima"}}, 1},
    {"system+user", {{"system", NULL}, {"user", "line one\nline two {{ not a template }}"}}, 2},
    {"multi-turn", {{"user", "first question"}, {"assistant", "{\"name\": \"Ana\"}"}, {"user", "and the city?"}}, 3},
    {"system+multi-turn",
     {{"system", NULL}, {"user", "q1"}, {"assistant", "a1\nwith two lines"}, {"user", "q2"}}, 4},
};

static json_t *msgs_json(const qlr_chat_msg *m, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_pack("[ss]", m[i].role, m[i].content));
    return a;
}

static void add_case(json_t *cases, const char *name, const char *tmpl, const qlr_chat_msg *m, size_t n,
                     const char *expected) {
    json_array_append_new(cases, json_pack("{s:s, s:s, s:o, s:s}", "name", name, "template", tmpl, "messages",
                                           msgs_json(m, n), "expected", expected));
}

static void chat_cases(json_t *cases, const char *format, const char *def_sys, int *n_cases) {
    qlr_chat_template *ct = NULL;
    if (def_sys) {
        /* a chatml source with a literal default system message, as SmolLM2's */
        char src[512];
        snprintf(src, sizeof src,
                 "{%% if messages[0]['role'] != 'system' %%}<|im_start|>system\n%s<|im_end|>\n{%% endif %%}"
                 "<|im_start|>{{ message['role'] }}", def_sys);
        CHECK_OK(qlr_chat_template_detect(src, strlen(src), &ct));
        CHECK(qlr_chat_template_default_system(ct) && !strcmp(qlr_chat_template_default_system(ct), def_sys));
    } else {
        CHECK_OK(qlr_chat_template_from_name(format, &ct));
    }
    if (!ct) return;
    qlr_ollama_template ot;
    CHECK_OK(qlr_ollama_template_make(format, def_sys, NULL, &ot));
    for (size_t c = 0; c < sizeof CONVS / sizeof CONVS[0]; c++) {
        qlr_chat_msg m[4];
        memcpy(m, CONVS[c].msgs, sizeof m);
        for (size_t i = 0; i < CONVS[c].n; i++)
            if (!m[i].content) m[i].content = SYS;
        qlr_chat_render r;
        CHECK_OK(qlr_chat_render_messages(ct, m, CONVS[c].n, 1, &r));
        const char *exp = r.text;
        /* the BOS the runtime's tokenizer adds (add_bos_token) is not the template's to write */
        if (!strncmp(exp, "<|begin_of_text|>", 17)) exp += 17;
        else if (!strncmp(exp, "<s>", 3)) exp += 3;
        char name[96];
        snprintf(name, sizeof name, "%s%s %s", format, def_sys ? "+default-system" : "", CONVS[c].name);
        add_case(cases, name, ot.text, m, CONVS[c].n, exp);
        (*n_cases)++;
        qlr_chat_render_free(&r);
    }
    qlr_ollama_template_free(&ot);
    qlr_chat_template_free(ct);
}

/* alpaca / completion: the prompt part of a parsed line, as the trainer tokenizes it (bos is the
 * tokenizer's to add, as for llama.cpp). */
static void part_case(json_t *cases, qlr_data_format fmt, const char *line, const char *user, int *n_cases) {
    qlr_data_source src = {0};
    src.format = fmt;
    qlr_data_record rec;
    CHECK_OK(qlr_data_parse_line(&src, line, strlen(line), &rec));
    qlr_strbuf prompt = {0};
    for (size_t i = 0; i < rec.n_parts && !rec.parts[i].trainable; i++)
        qlr_strbuf_put(&prompt, rec.parts[i].text, rec.parts[i].len);
    if (fmt == QLR_DATA_COMPLETION) qlr_strbuf_puts(&prompt, user); /* all of it is the prompt */
    const char *format = fmt == QLR_DATA_ALPACA ? "alpaca" : "completion";
    qlr_ollama_template ot;
    CHECK_OK(qlr_ollama_template_make(format, NULL, "<|im_end|>", &ot));
    qlr_chat_msg m[2] = {{"system", SYS}, {"user", user}};
    char name[64];
    snprintf(name, sizeof name, "%s user", format);
    add_case(cases, name, ot.text, m + 1, 1, prompt.p ? prompt.p : "");
    snprintf(name, sizeof name, "%s system+user", format); /* a system message changes nothing */
    add_case(cases, name, ot.text, m, 2, prompt.p ? prompt.p : "");
    *n_cases += 2;
    qlr_ollama_template_free(&ot);
    qlr_strbuf_free(&prompt);
    qlr_data_record_free(&rec);
}

static void test_render(void) {
    json_t *cases = json_array();
    int n = 0;
    chat_cases(cases, "chatml", NULL, &n);
    chat_cases(cases, "chatml", DEF_SYS, &n);
    chat_cases(cases, "llama3", NULL, &n);
    chat_cases(cases, "llama2", NULL, &n);
    chat_cases(cases, "mistral", NULL, &n);
    part_case(cases, QLR_DATA_ALPACA, "{\"instruction\": \"Name the capital of Peru.\", \"output\": \"Lima\"}",
              "Name the capital of Peru.", &n);
    part_case(cases, QLR_DATA_COMPLETION, "{\"text\": \"Once upon a time\"}", "Once upon a time", &n);
    char path[512], cmd[1400];
    snprintf(path, sizeof path, "%s/ollama_cases.json", test_tmpdir());
    CHECK(json_dump_file(cases, path, JSON_INDENT(1)) == 0);
    json_decref(cases);
    snprintf(cmd, sizeof cmd, "python3 '%s/tests/tools/gotmpl.py' '%s' 2>&1", QLR_SOURCE_DIR, path);
    FILE *p = popen(cmd, "r");
    CHECK(p != NULL);
    if (!p) return;
    char line[4096], last[4096] = "";
    while (fgets(line, sizeof line, p)) {
        fputs(line, stdout);
        snprintf(last, sizeof last, "%s", line);
    }
    int rc = pclose(p);
    if (WIFEXITED(rc) && WEXITSTATUS(rc) == 127) {
        printf("NOTE: python3 not found: the TEMPLATE render check is skipped\n");
        return;
    }
    int passed = -1, failed = -1;
    CHECK(sscanf(last, "%d passed, %d failed", &passed, &failed) == 2);
    CHECK_MSG(WIFEXITED(rc) && WEXITSTATUS(rc) == 0, "gotmpl.py reported failures");
    CHECK_EQ_INT(passed, n);
    CHECK_EQ_INT(failed, 0);
}

static void test_modelfile(void) {
    qlr_ollama_template t;
    CHECK_OK(qlr_ollama_template_make("chatml", DEF_SYS, "<|im_end|>", &t));
    CHECK_EQ_INT(t.n_stops, 2);
    char *mf = NULL;
    CHECK_OK(qlr_ollama_modelfile("./base.gguf", "./adapter.gguf", &t, &mf));
    CHECK(mf && strstr(mf, "\nFROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\""));
    CHECK(mf && strstr(mf, "\"\"\"\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop \"<|im_start|>\"\n"));
    const char *b = mf ? strstr(mf, "TEMPLATE \"\"\"") : NULL, *e = b ? strstr(b + 12, "\"\"\"") : NULL;
    CHECK(b && e && (size_t)(e - b - 12) == strlen(t.text) && !strncmp(b + 12, t.text, strlen(t.text)));
    free(mf);
    CHECK_OK(qlr_ollama_modelfile("model.gguf", NULL, &t, &mf));
    CHECK(mf && !strstr(mf, "ADAPTER"));
    free(mf);
    CHECK(qlr_ollama_modelfile("a\nb.gguf", NULL, &t, &mf) == QLR_ERR_INVALID && !mf);
    qlr_ollama_template_free(&t);
    /* a literal "{{" in the default system message is escaped, not an action */
    CHECK_OK(qlr_ollama_template_make("chatml", "use {{braces}}", NULL, &t));
    CHECK(strstr(t.text, "use {{ \"{{\" }}braces}}") != NULL);
    qlr_ollama_template_free(&t);
    CHECK_OK(qlr_ollama_template_make("alpaca", NULL, "</s>", &t));
    CHECK(t.n_stops == 2 && !strcmp(t.stops[1], "</s>") && strstr(t.text, "{{ .Content }}</s>"));
    qlr_ollama_template_free(&t);
    CHECK(qlr_ollama_template_make("vicuna", NULL, NULL, &t) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "chatml, llama3, llama2, mistral, alpaca, completion") != NULL);
    CHECK(qlr_ollama_template_make("chatml", "a \"\"\" b", NULL, &t) == QLR_ERR_INVALID);
    qlr_error_clear();
}

int main(void) {
    test_modelfile();
    test_render();
    return test_finish();
}
