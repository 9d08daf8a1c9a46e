/* core/progress.c: the progress bar of progress.h. One bar may be live at a time; the
 * logger calls qlr_progress_clear_line() before printing so lines do not interleave. */
#include "core/progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct qlr_progress {
    char label[64];
    char unit[24];
    uint64_t total, done;
    double t0, last_draw;
    int tty;
    char extra[160];
    /* the last plain (non-terminal) line: what it showed, so the final line is not a copy */
    int plain_drawn;
    uint64_t plain_done;
    char plain_extra[160];
};

static qlr_progress *g_live; /* the bar currently drawn on a terminal line */

double qlr_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void qlr_format_duration(double secs, char *buf, int n) {
    if (secs < 0 || secs != secs) secs = 0;
    if (secs < 60) snprintf(buf, n, "%.1fs", secs);
    else if (secs < 3600) snprintf(buf, n, "%dm%02ds", (int)secs / 60, (int)secs % 60);
    else snprintf(buf, n, "%dh%02dm", (int)(secs / 3600), ((int)secs % 3600) / 60);
}

qlr_progress *qlr_progress_begin(const char *label, uint64_t total, const char *unit) {
    qlr_progress *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    snprintf(p->label, sizeof p->label, "%s", label ? label : "");
    snprintf(p->unit, sizeof p->unit, "%s", unit ? unit : "");
    p->total = total;
    p->t0 = qlr_now();
    p->last_draw = 0;
    p->tty = isatty(STDERR_FILENO) && !getenv("QLR_NO_TTY");
    if (p->tty) g_live = p;
    return p;
}

static void draw(qlr_progress *p, int final) {
    double el = qlr_now() - p->t0;
    double rate = el > 0 ? (double)p->done / el : 0;
    char eta[32] = "", els[32];
    qlr_format_duration(el, els, sizeof els);
    if (p->total && p->done < p->total && rate > 0 && !final) {
        char d[24];
        qlr_format_duration((double)(p->total - p->done) / rate, d, sizeof d);
        snprintf(eta, sizeof eta, " ETA %s", d);
    }
    char bar[32] = "";
    if (p->total && p->tty) {
        int w = 20, k = (int)((double)w * (double)p->done / (double)p->total);
        if (k > w) k = w;
        bar[0] = '[';
        for (int i = 0; i < w; i++) bar[1 + i] = i < k ? '#' : '.';
        bar[w + 1] = ']';
        bar[w + 2] = ' ';
        bar[w + 3] = 0;
    }
    char count[64];
    if (p->total) snprintf(count, sizeof count, "%llu/%llu %s", (unsigned long long)p->done,
                           (unsigned long long)p->total, p->unit);
    else snprintf(count, sizeof count, "%llu %s", (unsigned long long)p->done, p->unit);
    const char *sep = p->extra[0] ? " | " : "";
    if (p->tty) {
        fprintf(stderr, "\r\033[K%s %s%s | %.3g %s/s | %s%s%s%s%s", p->label, bar, count, rate,
                p->unit, els, eta, sep, p->extra, final ? "\n" : "");
    } else {
        fprintf(stderr, "%s: %s | %.3g %s/s | %s%s%s%s\n", p->label, count, rate, p->unit, els, eta,
                sep, p->extra);
        p->plain_drawn = 1;
        p->plain_done = p->done;
        snprintf(p->plain_extra, sizeof p->plain_extra, "%s", p->extra);
    }
    fflush(stderr);
}

void qlr_progress_update(qlr_progress *p, uint64_t done, const char *extra) {
    if (!p) return;
    p->done = done;
    if (extra) snprintf(p->extra, sizeof p->extra, "%s", extra);
    /* plain lines: the last count is the final line's (qlr_progress_end) */
    if (!p->tty && p->total && done >= p->total) return;
    double now = qlr_now();
    double every = p->tty ? 0.1 : QLR_PROGRESS_PLAIN_SECS;
    if (now - p->last_draw < every) return;
    p->last_draw = now;
    draw(p, 0);
}

void qlr_progress_end(qlr_progress *p) {
    if (!p) return;
    /* a plain line showing the same count and text as the last one printed is not repeated */
    if (p->tty || !p->plain_drawn || p->plain_done != p->done || strcmp(p->plain_extra, p->extra)) draw(p, 1);
    if (g_live == p) g_live = NULL;
    free(p);
}

void qlr_progress_clear_line(void) {
    if (g_live) {
        fprintf(stderr, "\r\033[K");
        g_live->last_draw = 0; /* redraw on the next update */
    }
}
