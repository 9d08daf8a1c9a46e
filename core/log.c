/* core/log.c: leveled logging; see log.h. The progress bar clears its line before a log
 * line is printed so the two never interleave on a terminal. */
#include "core/log.h"
#include "core/progress.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int g_level = -1;
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;

static int level_from_env(void) {
    const char *s = getenv("QLR_LOG");
    if (!s || !*s) return QLR_LOG_INFO;
    if (!strcasecmp(s, "error")) return QLR_LOG_ERROR;
    if (!strcasecmp(s, "warn") || !strcasecmp(s, "warning")) return QLR_LOG_WARN;
    if (!strcasecmp(s, "info")) return QLR_LOG_INFO;
    if (!strcasecmp(s, "debug")) return QLR_LOG_DEBUG;
    fprintf(stderr, "qlora: warning: QLR_LOG='%s' is not one of error|warn|info|debug; using info\n", s);
    return QLR_LOG_INFO;
}

void qlr_log_set_level(qlr_log_level lvl) { g_level = (int)lvl; }

qlr_log_level qlr_log_get_level(void) {
    if (g_level < 0) g_level = level_from_env();
    return (qlr_log_level)g_level;
}

void qlr_log_(qlr_log_level lvl, const char *file, int line, const char *fmt, ...) {
    if ((int)lvl > (int)qlr_log_get_level()) return;
    static const char *names[] = {"error", "warning", "info", "debug"};
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_log_mu);
    qlr_progress_clear_line();
    if (lvl == QLR_LOG_INFO) {
        fprintf(stderr, "%s\n", msg);
    } else if (lvl == QLR_LOG_DEBUG) {
        const char *base = strrchr(file, '/');
        fprintf(stderr, "debug: %s:%d: %s\n", base ? base + 1 : file, line, msg);
    } else {
        fprintf(stderr, "%s: %s\n", names[lvl], msg);
    }
    fflush(stderr);
    pthread_mutex_unlock(&g_log_mu);
}
