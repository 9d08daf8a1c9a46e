/* tests/infer/test_http_util.c: infer/http_util.c: the API key check (scheme, spacing, wrong
 * and missing keys, keys that share a prefix) and adapter path confinement against a real
 * folder tree with symlinks that point inside and outside, "..", absolute paths, missing files
 * and no --adapter-dir at all. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core.h"
#include "infer/http_util.h"
#include "tests/test_util.h"

static void test_auth(void) {
    CHECK(qlr_http_auth_ok(NULL, NULL));           /* no key configured: open */
    CHECK(qlr_http_auth_ok("anything", NULL));
    CHECK(qlr_http_auth_ok("Bearer s3cret", "s3cret"));
    CHECK(qlr_http_auth_ok("bearer   s3cret  ", "s3cret"));
    CHECK(!qlr_http_auth_ok(NULL, "s3cret"));
    CHECK(!qlr_http_auth_ok("", "s3cret"));
    CHECK(!qlr_http_auth_ok("s3cret", "s3cret"));   /* no scheme */
    CHECK(!qlr_http_auth_ok("Basic s3cret", "s3cret"));
    CHECK(!qlr_http_auth_ok("Bearer s3cre", "s3cret"));
    CHECK(!qlr_http_auth_ok("Bearer s3crets", "s3cret"));
    CHECK(!qlr_http_auth_ok("Bearer S3cret", "s3cret"));
    CHECK(!qlr_http_auth_ok("Bearer ", "s3cret"));
    CHECK(!qlr_http_auth_ok("Bearers3cret", "s3cret"));
    CHECK(qlr_http_ct_equal("", 0, "", 0));
    CHECK(!qlr_http_ct_equal("a", 1, "", 0));
    CHECK(!qlr_http_ct_equal("", 0, "a", 1));
    CHECK(!qlr_http_ct_equal("abcabc", 6, "abc", 3)); /* cycling b must not make these equal */
    CHECK(qlr_http_ct_equal("abc", 3, "abc", 3));
}

static void touch(const char *path) {
    FILE *f = fopen(path, "w");
    CHECK_MSG(f != NULL, "cannot create %s", path);
    if (f) fclose(f);
}

static void test_confine(void) {
    char root[1024], dir[1200], p[PATH_MAX], out[PATH_MAX], want[PATH_MAX];
    snprintf(root, sizeof root, "%s/confine", test_tmpdir());
    snprintf(dir, sizeof dir, "%s/adapters", root);
    CHECK_OK(qlr_mkdir_p(dir));
    snprintf(p, sizeof p, "%s/sql", dir);
    CHECK_OK(qlr_mkdir_p(p));
    snprintf(p, sizeof p, "%s/sql/adapter.gguf", dir);
    touch(p);
    snprintf(p, sizeof p, "%s/secret.gguf", root);
    touch(p);
    /* a symlink inside pointing inside, one pointing outside, one to a folder outside */
    snprintf(p, sizeof p, "%s/alias.gguf", dir);
    CHECK(symlink("sql/adapter.gguf", p) == 0);
    snprintf(p, sizeof p, "%s/escape.gguf", dir);
    CHECK(symlink("../secret.gguf", p) == 0);
    snprintf(p, sizeof p, "%s/up", dir);
    CHECK(symlink(root, p) == 0);

    char rdir[2048];
    CHECK(realpath(dir, rdir) != NULL);
    snprintf(want, sizeof want, "%s/sql/adapter.gguf", rdir);

    qlr_oai_error e;
    CHECK(qlr_http_confine_path(dir, "sql/adapter.gguf", out, sizeof out, &e));
    CHECK(!strcmp(out, want));
    CHECK(qlr_http_confine_path(dir, "./sql//adapter.gguf", out, sizeof out, &e));
    CHECK(!strcmp(out, want));
    CHECK(qlr_http_confine_path(dir, "alias.gguf", out, sizeof out, &e)); /* resolved to the target */
    CHECK(!strcmp(out, want));
    CHECK(qlr_http_confine_path(dir, want, out, sizeof out, &e));         /* absolute, inside */
    CHECK(qlr_http_confine_path(dir, "sql", out, sizeof out, &e));        /* a folder (PEFT) */

    struct { const char *path; int status; } bad[] = {
        {"../secret.gguf", 403},
        {"sql/../../secret.gguf", 403},
        {"sql/..", 403},
        {"escape.gguf", 403},        /* symlink leading out */
        {"up/secret.gguf", 403},     /* through a symlinked folder */
        {"missing.gguf", 404},
        {"sql/adapter.gguf/x", 404}, /* ENOTDIR */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&e, 0, sizeof e);
        out[0] = 0;
        CHECK_MSG(!qlr_http_confine_path(dir, bad[i].path, out, sizeof out, &e), "%s accepted", bad[i].path);
        CHECK_MSG(e.http_status == bad[i].status, "%s: status %d, expected %d", bad[i].path, e.http_status,
                  bad[i].status);
        CHECK(!strcmp(e.param, "lora_path") && out[0] == 0);
        CHECK_MSG(strstr(e.message, "'lora_path'") != NULL, "%s: the message does not name the field: %s", bad[i].path,
                  e.message);
    }
    /* absolute path outside */
    snprintf(p, sizeof p, "%s/secret.gguf", root);
    CHECK(!qlr_http_confine_path(dir, p, out, sizeof out, &e) && e.http_status == 403);
    /* a sibling that shares the prefix ("adapters2" next to "adapters") is outside */
    snprintf(p, sizeof p, "%s/adapters2", root);
    CHECK_OK(qlr_mkdir_p(p));
    snprintf(p, sizeof p, "%s/adapters2/a.gguf", root);
    touch(p);
    CHECK(!qlr_http_confine_path(dir, p, out, sizeof out, &e) && e.http_status == 403);
    /* no --adapter-dir: loading by path is refused, and the message says how to allow it */
    CHECK(!qlr_http_confine_path(NULL, "sql/adapter.gguf", out, sizeof out, &e));
    CHECK(e.http_status == 403 && strstr(e.message, "--adapter-dir") != NULL);
    /* too small an output */
    CHECK(!qlr_http_confine_path(dir, "sql/adapter.gguf", out, 4, &e) && e.http_status == 400);
}

int main(void) {
    test_auth();
    test_confine();
    return test_finish();
}
