/* tests/infer/test_web.c: the web page embedded in qlora serve (infer/web.h): every file of
 * infer/web/ is in the binary byte for byte; "/" finds index.html and nothing else is found by
 * accident; the page names only its own files (every src/href resolves to an embedded asset,
 * no URL of another origin anywhere), holds no inline script, style or event handler (the
 * Content-Security-Policy would block them), and that policy allows this origin only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/web.h"
#include "tests/test_util.h"

static const char *const FILES[] = {"index.html", "app.css", "app.js", "favicon.svg"};
#define N_FILES (sizeof FILES / sizeof FILES[0])

/* The asset's bytes as a NUL-terminated copy (the embedded bytes are not terminated). */
static char *text_of(const qlr_web_asset *a) {
    char *t = malloc(a->size + 1);
    memcpy(t, a->data, a->size);
    t[a->size] = 0;
    return t;
}

static void test_assets_match_files(void) {
    CHECK_EQ_INT(qlr_web_n_assets, N_FILES);
    for (size_t i = 0; i < N_FILES; i++) {
        char url[64], path[1024];
        snprintf(url, sizeof url, "/%s", FILES[i]);
        snprintf(path, sizeof path, "%s/infer/web/%s", QLR_SOURCE_DIR, FILES[i]);
        const qlr_web_asset *a = qlr_web_find(url);
        CHECK_MSG(a != NULL, "%s is not embedded", url);
        if (!a) continue;
        char *data = NULL;
        size_t n = 0;
        CHECK_OK(qlr_file_read_all(path, 1 << 24, &data, &n));
        CHECK_MSG(data && n == a->size && !memcmp(data, a->data, n), "%s: embedded bytes differ from %s", url, path);
        free(data);
        const char *dot = strrchr(FILES[i], '.');
        const char *want = !strcmp(dot, ".html") ? "text/html; charset=utf-8"
                           : !strcmp(dot, ".css") ? "text/css; charset=utf-8"
                           : !strcmp(dot, ".js")  ? "text/javascript; charset=utf-8"
                                                  : "image/svg+xml";
        CHECK_MSG(!strcmp(a->content_type, want), "%s: Content-Type %s", url, a->content_type);
    }
}

static void test_find(void) {
    CHECK(qlr_web_find("/") == qlr_web_find("/index.html") && qlr_web_find("/") != NULL);
    CHECK(qlr_web_find(NULL) == NULL);
    CHECK(qlr_web_find("") == NULL);
    CHECK(qlr_web_find("/v1/models") == NULL);
    CHECK(qlr_web_find("/health") == NULL);
    CHECK(qlr_web_find("app.js") == NULL);          /* paths start with / */
    CHECK(qlr_web_find("/app.js/") == NULL);
    CHECK(qlr_web_find("/../app.js") == NULL);
    CHECK(qlr_web_find("//app.js") == NULL);
    CHECK(qlr_web_find("/APP.JS") == NULL);
    CHECK(qlr_web_find("/web/app.js") == NULL);
}

/* Every src="..." and href="..." of index.html: an embedded asset, named by an absolute path. */
static void test_links_are_local(const char *html) {
    int n = 0;
    for (const char *attr = "src=\"", *p; attr; attr = !strcmp(attr, "src=\"") ? "href=\"" : NULL) {
        for (p = strstr(html, attr); p; p = strstr(p + 1, attr)) {
            const char *v = p + strlen(attr), *end = strchr(v, '"');
            char url[256];
            CHECK(end && (size_t)(end - v) < sizeof url);
            if (!end || (size_t)(end - v) >= sizeof url) continue;
            memcpy(url, v, (size_t)(end - v));
            url[end - v] = 0;
            CHECK_MSG(qlr_web_find(url) != NULL, "index.html links to %s, which is not an embedded asset", url);
            n++;
        }
    }
    CHECK_MSG(n >= 3, "index.html names %d files (expected the stylesheet, the script and the icon)", n);
}

/* No inline script, style or handler: the policy forbids them, so they would silently not run. */
static void test_no_inline(const char *html) {
    for (const char *p = strstr(html, "<script"); p; p = strstr(p + 1, "<script")) {
        const char *end = strchr(p, '>');
        CHECK_MSG(end && strstr(p, " src=") && strstr(p, " src=") < end, "index.html has an inline <script>");
        CHECK_MSG(end && !strncmp(end, "></script>", 10), "index.html has a <script> with a body");
    }
    CHECK_MSG(!strstr(html, "<style"), "index.html has an inline <style>");
    CHECK_MSG(!strstr(html, " style="), "index.html has a style attribute");
    static const char *const handlers[] = {" onclick=", " onload=", " onsubmit=", " onchange=", " oninput=", " onerror="};
    for (size_t i = 0; i < sizeof handlers / sizeof handlers[0]; i++)
        CHECK_MSG(!strstr(html, handlers[i]), "index.html has an inline handler%s", handlers[i]);
}

/* No URL of another origin in any file (the SVG namespace is a name, never fetched). */
static void test_no_outside_urls(void) {
    for (size_t i = 0; i < qlr_web_n_assets; i++) {
        char *t = text_of(&qlr_web_assets[i]);
        const char *ns = "http://www.w3.org/2000/svg";
        for (char *p = strstr(t, ns); p; p = strstr(p, ns)) memset(p, '_', strlen(ns));
        CHECK_MSG(!strstr(t, "http://") && !strstr(t, "https://"), "%s names another origin", qlr_web_assets[i].path);
        CHECK_MSG(!strstr(t, "src=\"//") && !strstr(t, "href=\"//") && !strstr(t, "url(//"),
                  "%s has a scheme-relative URL", qlr_web_assets[i].path);
        CHECK_MSG(!strstr(t, "@import"), "%s imports a stylesheet", qlr_web_assets[i].path);
        CHECK_MSG(!strstr(t, "innerHTML") && !strstr(t, "eval("), "%s builds markup or code from text", qlr_web_assets[i].path);
        free(t);
    }
}

static void test_policy(void) {
    const char *csp = QLR_WEB_CSP;
    CHECK(strstr(csp, "default-src 'none'") != NULL);
    CHECK(strstr(csp, "script-src 'self'") != NULL);
    CHECK(strstr(csp, "connect-src 'self'") != NULL);
    CHECK(strstr(csp, "frame-ancestors 'none'") != NULL);
    CHECK(!strstr(csp, "unsafe") && !strstr(csp, "*") && !strstr(csp, "http") && !strstr(csp, "data:"));
}

int main(void) {
    test_assets_match_files();
    test_find();
    const qlr_web_asset *index = qlr_web_find("/");
    if (index) {
        char *html = text_of(index);
        test_links_are_local(html);
        test_no_inline(html);
        free(html);
    }
    test_no_outside_urls();
    test_policy();
    return test_finish();
}
