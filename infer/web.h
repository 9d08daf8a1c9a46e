/* infer/web.h: the web page of `qlora serve` (infer/web/: index.html, app.css, app.js), embedded
 * in the binary at build time by cmake/QlrEmbed.cmake, and the headers it is served with.
 *
 * The page talks to the server only through its public API (/v1/models, /v1/chat/completions,
 * /v1/load_lora_adapter, /v1/unload_lora_adapter, /metrics, /health), with the API key the user
 * types in; loading the page itself needs no key. It owns the table of assets and the lookup,
 * not the routing or the responses (infer/server.c). */
#ifndef QLR_INFER_WEB_H
#define QLR_INFER_WEB_H

#include <stddef.h>

typedef struct qlr_web_asset {
    const char *path;            /* URL path: "/index.html", "/app.js" */
    const char *content_type;    /* "text/html; charset=utf-8", ... */
    const unsigned char *data;   /* the file's bytes (not NUL-terminated) */
    size_t size;
} qlr_web_asset;

/* Generated (build folder, web_assets.c): every file of infer/web/ in the order CMake lists them. */
extern const qlr_web_asset qlr_web_assets[];
extern const size_t qlr_web_n_assets;

/* The Content-Security-Policy of every asset: scripts, styles, images and connections from the
 * page's own origin only, no inline script or style, no plugins, no framing by other sites. */
#define QLR_WEB_CSP                                                                                     \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "     \
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

/* The asset served at URL path `url` ("/" is "/index.html"); NULL when none (the query string, if
 * any, must have been removed: libmicrohttpd gives the path alone). */
const qlr_web_asset *qlr_web_find(const char *url);

#endif
