/* core/testhook.c: the QLR_TEST_KILL_AT / QLR_TEST_KILL_TRACE kill points of core/testhook.h.
 * Parsed once from the environment; the hit counter is atomic so that a point reached from
 * worker threads still kills at exactly one hit. */
#include "core/testhook.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static char g_label[64];
static long g_at;             /* kill at this hit (>= 1); 0: no kill */
static atomic_long g_hits;
static int g_trace = -1;      /* fd of QLR_TEST_KILL_TRACE, or -1 */

static void init(void) {
    const char *at = getenv("QLR_TEST_KILL_AT");
    if (at && *at) {
        const char *colon = strrchr(at, ':');
        if (colon && colon > at && (size_t)(colon - at) < sizeof g_label) {
            char *end = NULL;
            long n = strtol(colon + 1, &end, 10);
            if (end && !*end && n >= 1) {
                memcpy(g_label, at, (size_t)(colon - at));
                g_label[colon - at] = 0;
                g_at = n;
            }
        }
    }
    const char *tr = getenv("QLR_TEST_KILL_TRACE");
    if (tr && *tr) g_trace = open(tr, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static void trace(const char *label, const char *suffix) {
    char line[128];
    size_t a = strlen(label), b = strlen(suffix);
    if (a + b + 1 > sizeof line) return;
    memcpy(line, label, a);
    memcpy(line + a, suffix, b);
    line[a + b] = '\n';
    ssize_t w = write(g_trace, line, a + b + 1);
    (void)w;
}

void qlr_kill_point(const char *label) {
    pthread_once(&g_once, init);
    if (g_trace >= 0) trace(label, "");
    if (!g_at || (strcmp(g_label, "*") != 0 && strcmp(g_label, label) != 0)) return;
    if (atomic_fetch_add(&g_hits, 1) + 1 != g_at) return;
    if (g_trace >= 0) trace(label, " KILL");
    raise(SIGKILL);
    for (;;) pause(); /* SIGKILL cannot be caught; never reached */
}
