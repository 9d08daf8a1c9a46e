/* tests/formats/test_gguf_bad.c: feeds every corrupt file of tests/data/gguf_bad/ (made by
 * tests/tools/make_bad_gguf.py) to the reader, both from disk and from memory, and checks that it
 * is refused with a message that starts with the file name, names the byte offset and contains
 * the substring listed in EXPECTED.txt; also that every .gguf there is listed, and that the valid
 * fuzz seeds of tests/fuzz/corpus/gguf/ are accepted (so refusals are for the right reason). */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "tests/test_util.h"

#define BAD_DIR QLR_TEST_DATA "/gguf_bad"
#define SEED_DIR QLR_SOURCE_DIR "/tests/fuzz/corpus/gguf"

/* 1 if msg contains one of the '|'-separated alternatives. */
static int matches(const char *msg, const char *alts) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", alts);
    for (char *save = NULL, *tok = strtok_r(buf, "|", &save); tok; tok = strtok_r(NULL, "|", &save))
        if (strstr(msg, tok)) return 1;
    return 0;
}

static void check_refused(const char *file, const char *expect) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", BAD_DIR, file);
    qlr_gguf *g = NULL;
    qlr_status st = qlr_gguf_open(path, &g);
    CHECK_MSG(st != QLR_OK && g == NULL, "%s: accepted, expected an error containing '%s'", file, expect);
    if (st == QLR_OK) {
        qlr_gguf_close(g);
        return;
    }
    const char *msg = qlr_error_msg();
    CHECK_MSG(st == QLR_ERR_FORMAT || st == QLR_ERR_UNSUPPORTED, "%s: status %s", file, qlr_status_str(st));
    CHECK_MSG(!strncmp(msg, path, strlen(path)), "%s: message does not start with the path: %s", file, msg);
    CHECK_MSG(strstr(msg, ": offset ") != NULL, "%s: message names no offset: %s", file, msg);
    CHECK_MSG(matches(msg, expect), "%s: message '%s' lacks '%s'", file, msg, expect);
    if (getenv("QLR_TEST_VERBOSE")) printf("%s\n", msg);

    /* the same through open_mem, with the caller's name */
    char *data = NULL;
    size_t size = 0;
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &data, &size));
    st = qlr_gguf_open_mem(data, size, file, &g);
    CHECK_MSG(st != QLR_OK && g == NULL && !strncmp(qlr_error_msg(), file, strlen(file)) &&
                  matches(qlr_error_msg(), expect),
              "%s: from memory: %s", file, qlr_error_msg());
    if (g) qlr_gguf_close(g);
    free(data);
}

int main(void) {
    char *manifest = NULL;
    size_t size = 0;
    CHECK_OK(qlr_file_read_all(BAD_DIR "/EXPECTED.txt", 1 << 20, &manifest, &size));
    if (!manifest) return test_finish();
    int n_listed = 0;
    for (char *save = NULL, *line = strtok_r(manifest, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#' || !line[0]) continue;
        char *tab = strchr(line, '\t');
        CHECK_MSG(tab != NULL, "EXPECTED.txt: bad line '%s'", line);
        if (!tab) continue;
        *tab = 0;
        check_refused(line, tab + 1);
        n_listed++;
    }
    CHECK_MSG(n_listed >= 40, "only %d bad files listed", n_listed);

    /* every .gguf in the folder is listed */
    char *listing = NULL;
    CHECK_OK(qlr_file_read_all(BAD_DIR "/EXPECTED.txt", 1 << 20, &listing, &size));
    DIR *d = opendir(BAD_DIR);
    CHECK(d != NULL);
    int n_files = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 5, ".gguf")) continue;
        n_files++;
        char want[300];
        snprintf(want, sizeof want, "\n%s\t", e->d_name);
        CHECK_MSG(listing && strstr(listing, want), "%s is not listed in EXPECTED.txt", e->d_name);
    }
    if (d) closedir(d);
    CHECK_EQ_INT(n_files, n_listed);
    free(listing);
    free(manifest);

    /* the valid seeds load */
    d = opendir(SEED_DIR);
    CHECK(d != NULL);
    int n_seeds = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        if (!strstr(e->d_name, ".gguf")) continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", SEED_DIR, e->d_name);
        qlr_gguf *g = NULL;
        CHECK_OK(qlr_gguf_open(path, &g));
        qlr_gguf_close(g);
        n_seeds++;
    }
    if (d) closedir(d);
    CHECK(n_seeds >= 5);
    return test_finish();
}
