/* infer/web.c: finds the embedded asset of a URL path (see web.h). The bytes themselves are in
 * the generated web_assets.c. */
#include "infer/web.h"

#include <string.h>

const qlr_web_asset *qlr_web_find(const char *url) {
    if (!url) return NULL;
    if (!strcmp(url, "/")) url = "/index.html";
    for (size_t i = 0; i < qlr_web_n_assets; i++)
        if (!strcmp(url, qlr_web_assets[i].path)) return &qlr_web_assets[i];
    return NULL;
}
