/* tests/formats/test_json.c: formats/json.h — positioned load errors, duplicate keys refused,
 * typed getters and their messages (file + key path), dotted paths, and the pretty writer
 * matching Python's json.dumps(indent=2, sort_keys=True) byte for byte (expected text below
 * was produced by CPython 3.11 json.dumps). */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/json.h"
#include "tests/test_util.h"

static const char *k_pretty_in = "{\"r\": 8, \"lora_alpha\": 16, \"lora_dropout\": 0.05, \"target_modules\": [\"q_proj\", \"v_proj\"], \"peft_type\": \"LORA\", \"inference_mode\": true, \"rank_pattern\": {}, \"layers\": [], \"base_model_name_or_path\": null, \"lr\": 1e-05, \"big\": 1e+16, \"hundred\": 100.0, \"neg\": -0.0, \"third\": 0.3333333333333333, \"s\": \"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\n\\t\\u0001\", \"nested\": {\"b\": [1, {\"z\": 2.5, \"a\": null}], \"a\": false}, \"mx\": 1.5e+300, \"small\": 0.0001}";
static const char *k_pretty_out =
    "{\n"
    "  \"base_model_name_or_path\": null,\n"
    "  \"big\": 1e+16,\n"
    "  \"hundred\": 100.0,\n"
    "  \"inference_mode\": true,\n"
    "  \"layers\": [],\n"
    "  \"lora_alpha\": 16,\n"
    "  \"lora_dropout\": 0.05,\n"
    "  \"lr\": 1e-05,\n"
    "  \"mx\": 1.5e+300,\n"
    "  \"neg\": -0.0,\n"
    "  \"nested\": {\n"
    "    \"a\": false,\n"
    "    \"b\": [\n"
    "      1,\n"
    "      {\n"
    "        \"a\": null,\n"
    "        \"z\": 2.5\n"
    "      }\n"
    "    ]\n"
    "  },\n"
    "  \"peft_type\": \"LORA\",\n"
    "  \"r\": 8,\n"
    "  \"rank_pattern\": {},\n"
    "  \"s\": \"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\n\\t\\u0001\",\n"
    "  \"small\": 0.0001,\n"
    "  \"target_modules\": [\n"
    "    \"q_proj\",\n"
    "    \"v_proj\"\n"
    "  ],\n"
    "  \"third\": 0.3333333333333333\n"
    "}";

static int msg_has(const char *s) {
    if (strstr(qlr_error_msg(), s)) return 1;
    fprintf(stderr, "  message was: %s\n  expected to contain: %s\n", qlr_error_msg(), s);
    return 0;
}

static void test_load(void) {
    json_t *v = NULL;
    CHECK_OK(qlr_json_load_buffer("x", "{\"a\": [1, 2]}", 13, &v));
    CHECK(v && json_is_object(v));
    json_decref(v);

    /* not NUL-terminated: only n bytes are read */
    CHECK_OK(qlr_json_load_buffer("x", "[1]garbage", 3, &v));
    json_decref(v);

    CHECK_EQ_INT(qlr_json_load_buffer("config.json", "{\n  \"a\": 1,\n  \"b\": }", 20, &v), QLR_ERR_FORMAT);
    CHECK(v == NULL);
    CHECK(msg_has("config.json:3:"));

    CHECK_EQ_INT(qlr_json_load_buffer("body", "{\"a\": 1, \"a\": 2}", 16, &v), QLR_ERR_FORMAT);
    CHECK(msg_has("body:1:"));
    CHECK(msg_has("duplicate"));

    CHECK_EQ_INT(qlr_json_load_buffer("body", "", 0, &v), QLR_ERR_FORMAT);
    CHECK_EQ_INT(qlr_json_load_buffer("body", NULL, 0, &v), QLR_ERR_FORMAT);
    CHECK_EQ_INT(qlr_json_load_buffer("body", "\"a\\u0000b\"", 10, &v), QLR_ERR_FORMAT);
    CHECK_EQ_INT(qlr_json_load_buffer("body", "\"\xff\"", 3, &v), QLR_ERR_FORMAT);
    CHECK_EQ_INT(qlr_json_load_buffer("body", "[1\0,2]", 6, &v), QLR_ERR_FORMAT);
    CHECK(v == NULL && msg_has("body:1:3: NUL byte"));
    CHECK_OK(qlr_json_load_buffer("body", "42", 2, &v)); /* any top-level value */
    CHECK(json_is_integer(v));
    json_decref(v);

    char path[512];
    snprintf(path, sizeof(path), "%s/bad.json", test_tmpdir());
    CHECK_OK(qlr_write_atomic(path, "{\n  \"x\": [1,\n  2,,]\n}\n", 22));
    CHECK_EQ_INT(qlr_json_load_file(path, &v), QLR_ERR_FORMAT);
    char want[600];
    snprintf(want, sizeof(want), "%s:3:", path);
    CHECK(msg_has(want));
    snprintf(path, sizeof(path), "%s/missing.json", test_tmpdir());
    CHECK_EQ_INT(qlr_json_load_file(path, &v), QLR_ERR_IO);
    CHECK(msg_has("missing.json"));
}

static void test_getters(void) {
    const char *text =
        "{\"num_attention_heads\": \"32\", \"hidden_size\": 576, \"rope_theta\": 10000.0,"
        " \"max_position_embeddings\": 2048.0, \"eps\": 1e-05, \"tie\": true, \"name\": \"llama\","
        " \"nothing\": null, \"half\": 1.5, \"rope_scaling\": {\"factor\": 8.0, \"type\": \"llama3\"},"
        " \"a.b\": 7, \"list\": [1, 2], \"big\": 9223372036854775807}";
    json_t *cfg = NULL;
    CHECK_OK(qlr_json_load_buffer("config.json", text, strlen(text), &cfg));
    int64_t i = -1;
    double d = -1;
    int b = -1;
    const char *s = NULL;
    json_t *o = NULL;

    CHECK_EQ_INT(qlr_json_get_int(cfg, "config.json", "num_attention_heads", &i), QLR_ERR_FORMAT);
    CHECK(msg_has("config.json: key \"num_attention_heads\": expected an integer, got string"));
    CHECK_EQ_INT(i, -1);
    CHECK_OK(qlr_json_get_int(cfg, "config.json", "hidden_size", &i));
    CHECK_EQ_INT(i, 576);
    CHECK_OK(qlr_json_get_int(cfg, "config.json", "max_position_embeddings", &i));
    CHECK_EQ_INT(i, 2048);
    CHECK_OK(qlr_json_get_int(cfg, "config.json", "big", &i));
    CHECK(i == INT64_MAX);
    CHECK_EQ_INT(qlr_json_get_int(cfg, "config.json", "half", &i), QLR_ERR_FORMAT);
    CHECK(msg_has("key \"half\": expected an integer, got real 1.5"));
    CHECK_EQ_INT(qlr_json_get_int(cfg, "config.json", "num_layers", &i), QLR_ERR_NOT_FOUND);
    CHECK(msg_has("config.json: missing key \"num_layers\""));
    CHECK_EQ_INT(qlr_json_get_int(cfg, "config.json", "nothing", &i), QLR_ERR_FORMAT);
    CHECK(msg_has("key \"nothing\": must not be null"));
    CHECK_OK(qlr_json_get_int_opt(cfg, "config.json", "num_layers", 30, &i));
    CHECK_EQ_INT(i, 30);
    CHECK_OK(qlr_json_get_int_opt(cfg, "config.json", "nothing", 31, &i));
    CHECK_EQ_INT(i, 31);
    CHECK_EQ_INT(qlr_json_get_int_opt(cfg, "config.json", "name", 0, &i), QLR_ERR_FORMAT);

    CHECK_OK(qlr_json_get_double(cfg, "config.json", "rope_theta", &d));
    CHECK_NEAR(d, 10000.0, 0, 0);
    CHECK_OK(qlr_json_get_double(cfg, "config.json", "hidden_size", &d));
    CHECK_NEAR(d, 576.0, 0, 0);
    CHECK_OK(qlr_json_get_double(cfg, "config.json", "eps", &d));
    CHECK(d == 1e-05);
    CHECK_EQ_INT(qlr_json_get_double(cfg, "config.json", "tie", &d), QLR_ERR_FORMAT);
    CHECK(msg_has("key \"tie\": expected a number, got true"));
    CHECK_OK(qlr_json_get_double_opt(cfg, "config.json", "dropout", 0.25, &d));
    CHECK(d == 0.25);

    /* dotted path into a nested object; a literal key with a dot still wins */
    CHECK_OK(qlr_json_get_double(cfg, "config.json", "rope_scaling.factor", &d));
    CHECK(d == 8.0);
    CHECK_EQ_INT(qlr_json_get_int(cfg, "config.json", "rope_scaling.type", &i), QLR_ERR_FORMAT);
    CHECK(msg_has("config.json: key \"rope_scaling.type\": expected an integer, got string"));
    CHECK_OK(qlr_json_get_int(cfg, "config.json", "a.b", &i));
    CHECK_EQ_INT(i, 7);
    CHECK(qlr_json_lookup(cfg, "rope_scaling.missing") == NULL);
    CHECK(qlr_json_lookup(cfg, "name.x") == NULL);

    CHECK_OK(qlr_json_get_bool(cfg, "config.json", "tie", &b));
    CHECK_EQ_INT(b, 1);
    CHECK_OK(qlr_json_get_bool_opt(cfg, "config.json", "absent", 0, &b));
    CHECK_EQ_INT(b, 0);
    CHECK_EQ_INT(qlr_json_get_bool(cfg, "config.json", "hidden_size", &b), QLR_ERR_FORMAT);
    CHECK(msg_has("expected a boolean, got integer"));

    CHECK_OK(qlr_json_get_string(cfg, "config.json", "name", &s));
    CHECK(s && strcmp(s, "llama") == 0);
    CHECK_OK(qlr_json_get_string_opt(cfg, "config.json", "absent", "dflt", &s));
    CHECK(s && strcmp(s, "dflt") == 0);
    CHECK_EQ_INT(qlr_json_get_string(cfg, "config.json", "list", &s), QLR_ERR_FORMAT);
    CHECK(msg_has("expected a string, got array"));

    CHECK_OK(qlr_json_get_object(cfg, "config.json", "rope_scaling", &o));
    CHECK(o && json_is_object(o));
    CHECK_OK(qlr_json_get_object_opt(cfg, "config.json", "nothing", &o));
    CHECK(o == NULL);
    CHECK_EQ_INT(qlr_json_get_object(cfg, "config.json", "list", &o), QLR_ERR_FORMAT);
    CHECK(msg_has("expected an object, got array"));
    CHECK_OK(qlr_json_get_array(cfg, "config.json", "list", &o));
    CHECK(o && json_array_size(o) == 2);
    CHECK_OK(qlr_json_get_array_opt(cfg, "config.json", "absent", &o));
    CHECK(o == NULL);

    /* not an object at all */
    json_t *arr = json_array();
    CHECK_EQ_INT(qlr_json_get_int(arr, "body", "x", &i), QLR_ERR_FORMAT);
    CHECK(msg_has("body: expected an object holding key \"x\", got array"));
    json_decref(arr);
    CHECK(strcmp(qlr_json_type_name(NULL), "missing") == 0);
    json_decref(cfg);
}

static void test_pretty(void) {
    json_t *v = NULL;
    CHECK_OK(qlr_json_load_buffer("in", k_pretty_in, strlen(k_pretty_in), &v));
    char *out = NULL;
    size_t n = 0;
    CHECK_OK(qlr_json_dump_pretty(v, &out, &n));
    CHECK(out && strcmp(out, k_pretty_out) == 0);
    CHECK_EQ_INT(n, strlen(k_pretty_out));
    if (out && strcmp(out, k_pretty_out) != 0) fprintf(stderr, "got:\n%s\n", out);
    free(out);

    char path[512];
    snprintf(path, sizeof(path), "%s/adapter_config.json", test_tmpdir());
    CHECK_OK(qlr_json_write_file(path, v));
    char *back = NULL;
    size_t bn = 0;
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &back, &bn));
    CHECK(back && bn == strlen(k_pretty_out) && memcmp(back, k_pretty_out, bn) == 0);
    free(back);
    json_t *again = NULL;
    CHECK_OK(qlr_json_load_file(path, &again));
    CHECK(again && json_equal(v, again));
    json_decref(again);
    json_decref(v);

    /* scalars, empties and float shapes */
    struct { double x; const char *want; } reals[] = {
        {0.1, "0.1"}, {1.0, "1.0"}, {-2.5, "-2.5"}, {1e-4, "0.0001"}, {1.5e-5, "1.5e-05"},
        {123456789012345.0, "123456789012345.0"}, {1e22, "1e+22"}, {5e-324, "5e-324"},
        {1.7976931348623157e308, "1.7976931348623157e+308"}, {0.30000000000000004, "0.30000000000000004"},
    };
    for (size_t k = 0; k < sizeof(reals) / sizeof(reals[0]); k++) {
        json_t *r = json_real(reals[k].x);
        CHECK_OK(qlr_json_dump_pretty(r, &out, NULL));
        CHECK_MSG(out && strcmp(out, reals[k].want) == 0, "real %.17g: got %s want %s", reals[k].x,
                  out ? out : "(null)", reals[k].want);
        free(out);
        json_decref(r);
    }
    json_t *e = json_object();
    CHECK_OK(qlr_json_dump_pretty(e, &out, NULL));
    CHECK(out && strcmp(out, "{}") == 0);
    free(out);
    json_decref(e);
}

int main(void) {
    test_load();
    test_getters();
    test_pretty();
    return test_finish();
}
