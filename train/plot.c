/* train/plot.c: metrics.jsonl -> loss.svg (see plot.h). The drawing is plain SVG text: a frame,
 * grid lines at "nice" tick values (1, 2, 5 x 10^k), one polyline per series with an id
 * (train_loss, eval_loss, learning_rate) and a legend. Coordinates are written with two
 * decimals; the document is ASCII. */
#include "train/plot.h"

#include <jansson.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"

/* ------------------------------------------------------------------ reading */

qlr_status qlr_plot_read_metrics(const char *path, qlr_plot_point **pts, size_t *n) {
    *pts = NULL;
    *n = 0;
    char *text = NULL;
    size_t len = 0;
    QLR_TRY(qlr_file_read_all(path, (size_t)1 << 30, &text, &len));
    size_t cap = 0, lineno = 0;
    qlr_status st = QLR_OK;
    for (char *line = text; line < text + len && st == QLR_OK;) {
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        size_t ll = nl ? (size_t)(nl - line) : (size_t)(text + len - line);
        lineno++;
        char *next = line + ll + (nl ? 1 : 0);
        size_t blank = 0;
        while (blank < ll && (line[blank] == ' ' || line[blank] == '\r' || line[blank] == '\t')) blank++;
        if (blank == ll) {
            line = next;
            continue;
        }
        json_error_t je;
        json_t *j = json_loadb(line, ll, 0, &je);
        if (!json_is_object(j)) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s:%zu: not a JSON object (%s)", path, lineno, j ? "another JSON value" : je.text);
            json_decref(j);
            break;
        }
        static const char *const keys[] = {"step", "loss", "lr"};
        double v[3];
        for (int k = 0; k < 3 && st == QLR_OK; k++) {
            json_t *x = json_object_get(j, keys[k]);
            if (!json_is_number(x)) st = qlr_errorf(QLR_ERR_FORMAT, "%s:%zu: %s: missing or not a number", path, lineno, keys[k]);
            else v[k] = json_number_value(x);
        }
        json_t *ev = json_object_get(j, "eval_loss");
        if (st == QLR_OK && ev && !json_is_number(ev))
            st = qlr_errorf(QLR_ERR_FORMAT, "%s:%zu: eval_loss: not a number", path, lineno);
        if (st == QLR_OK && *n == cap) {
            cap = cap ? 2 * cap : 256;
            qlr_plot_point *grown = realloc(*pts, cap * sizeof *grown);
            if (!grown) st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            else *pts = grown;
        }
        if (st == QLR_OK) (*pts)[(*n)++] = (qlr_plot_point){v[0], v[1], v[2], ev ? json_number_value(ev) : NAN};
        json_decref(j);
        line = next;
    }
    free(text);
    if (st) {
        free(*pts);
        *pts = NULL;
        *n = 0;
    }
    return st;
}

/* ------------------------------------------------------------------ axes */

/* Canvas and plot area (pixels). */
enum { W = 880, H = 480, LEFT = 72, RIGHT = 86, TOP = 62, BOTTOM = 52 };
#define PW ((double)(W - LEFT - RIGHT))
#define PH ((double)(H - TOP - BOTTOM))

typedef struct axis {
    double lo, hi;   /* in data units (log10 of them for a log axis) */
    int log;
} axis;

/* A tick spacing of 1, 2 or 5 x 10^k giving about `target` intervals over `range`. */
static double nice_step(double range, int target) {
    double raw = range / target;
    double mag = pow(10, floor(log10(raw)));
    double f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

/* A linear axis from 0 (or below, for negative data) to a tick at or above `max`. */
static axis linear_axis(double min, double max) {
    axis a = {min < 0 ? min : 0, max, 0};
    if (!(a.hi > a.lo)) a.hi = a.lo + 1;
    double s = nice_step(a.hi - a.lo, 5);
    a.lo = floor(a.lo / s) * s;
    a.hi = ceil(a.hi / s - 1e-9) * s;
    return a;
}

static double axis_pos(const axis *a, double v) { /* 0 at lo, 1 at hi */
    double x = a->log ? log10(v) : v;
    return (x - a->lo) / (a->hi - a->lo);
}

static double px_x(const axis *a, double v) { return LEFT + axis_pos(a, v) * PW; }
static double px_y(const axis *a, double v) { return TOP + PH - axis_pos(a, v) * PH; }

/* Tick values of an axis into t[] (at most cap); returns the count. */
static int ticks(const axis *a, double *t, int cap) {
    int n = 0;
    if (a->log) {
        int decades = (int)llround(a->hi - a->lo);
        for (int d = (int)llround(a->lo); d <= (int)llround(a->hi) && n < cap; d++) {
            static const double sub[] = {1, 2, 5};
            for (int k = 0; k < 3 && n < cap; k++) {
                if (k && decades > 2) break; /* many decades: powers of ten only */
                double v = sub[k] * pow(10, d);
                if (log10(v) <= a->hi + 1e-9) t[n++] = v;
            }
        }
        return n;
    }
    double s = nice_step(a->hi - a->lo, 5);
    for (double v = a->lo; v <= a->hi + s * 1e-6 && n < cap; v += s) t[n++] = fabs(v) < s * 1e-9 ? 0 : v;
    return n;
}

static void fmt_tick(char *buf, size_t cap, double v) {
    snprintf(buf, cap, "%.3g", v);
}

/* XML text: & < > " escaped, other bytes below 0x20 and above 0x7e dropped (ASCII document). */
static void put_text(qlr_strbuf *o, const char *s) {
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '&') qlr_strbuf_puts(o, "&amp;");
        else if (c == '<') qlr_strbuf_puts(o, "&lt;");
        else if (c == '>') qlr_strbuf_puts(o, "&gt;");
        else if (c == '"') qlr_strbuf_puts(o, "&quot;");
        else if (c >= 0x20 && c < 0x7f) qlr_strbuf_put(o, (const char *)&c, 1);
    }
}

/* ------------------------------------------------------------------ drawing */

static int finite_pos(double v, int log) { return isfinite(v) && (!log || v > 0); }

/* One series as a polyline (and circles when `marks`); only points with a usable value. */
static void series(qlr_strbuf *o, const char *id, const char *style, int marks, const qlr_plot_point *p, size_t n,
                   size_t off, const axis *x, const axis *y) {
    qlr_strbuf_printf(o, "<polyline id=\"%s\" fill=\"none\" %s points=\"", id, style);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        double v = *(const double *)((const char *)&p[i] + off);
        if (!finite_pos(v, y->log) || !isfinite(p[i].step)) continue;
        qlr_strbuf_printf(o, "%s%.2f,%.2f", k++ ? " " : "", px_x(x, p[i].step), px_y(y, v));
    }
    qlr_strbuf_puts(o, "\"/>\n");
    if (!marks) return;
    for (size_t i = 0; i < n; i++) {
        double v = *(const double *)((const char *)&p[i] + off);
        if (!finite_pos(v, y->log) || !isfinite(p[i].step)) continue;
        qlr_strbuf_printf(o, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"3\" fill=\"#ff7f0e\"/>\n", px_x(x, p[i].step),
                          px_y(y, v));
    }
}

qlr_status qlr_plot_svg(const qlr_plot_point *p, size_t n, const char *title, qlr_strbuf *o) {
    if (!n) return qlr_errorf(QLR_ERR_INVALID, "nothing to plot: no logged step");
    double smax = 0, lmin = INFINITY, lmax = 0, rmax = 0;
    size_t n_eval = 0, last_eval = 0;
    for (size_t i = 0; i < n; i++) {
        if (isfinite(p[i].step) && p[i].step > smax) smax = p[i].step;
        double l[2] = {p[i].loss, p[i].eval_loss};
        for (int k = 0; k < 2; k++)
            if (isfinite(l[k])) {
                if (l[k] > 0 && l[k] < lmin) lmin = l[k];
                if (l[k] > lmax) lmax = l[k];
            }
        if (isfinite(p[i].lr) && p[i].lr > rmax) rmax = p[i].lr;
        if (isfinite(p[i].eval_loss)) n_eval++, last_eval = i;
    }
    axis x = linear_axis(0, smax > 0 ? smax : 1);
    axis yl;
    if (isfinite(lmin) && lmax / lmin >= 20) {
        yl = (axis){floor(log10(lmin)), ceil(log10(lmax)), 1};
        if (yl.hi <= yl.lo) yl.hi = yl.lo + 1;
    } else {
        yl = linear_axis(0, lmax > 0 ? lmax : 1);
    }
    axis yr = linear_axis(0, rmax > 0 ? rmax : 1);

    qlr_strbuf_printf(o, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                         "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
                         "font-family=\"sans-serif\" font-size=\"12\">\n"
                         "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n",
                      W, H, W, H, W, H);
    qlr_strbuf_printf(o, "<text x=\"%d\" y=\"24\" font-size=\"15\" font-weight=\"bold\">", LEFT);
    put_text(o, title);
    qlr_strbuf_puts(o, "</text>\n");
    const qlr_plot_point *last = &p[n - 1];
    qlr_strbuf_printf(o, "<text x=\"%d\" y=\"44\" fill=\"#444\">%zu logged steps (to step %.0f); last train loss %.4g",
                      LEFT, n, last->step, last->loss);
    if (n_eval) qlr_strbuf_printf(o, "; last eval loss %.4g (step %.0f)", p[last_eval].eval_loss, p[last_eval].step);
    qlr_strbuf_printf(o, "; peak learning rate %.3g</text>\n", rmax);

    /* grid and ticks */
    double t[64];
    char lab[32];
    int nt = ticks(&x, t, 64);
    qlr_strbuf_puts(o, "<g stroke=\"#e6e6e6\">\n");
    for (int i = 0; i < nt; i++)
        qlr_strbuf_printf(o, "<line x1=\"%.2f\" y1=\"%d\" x2=\"%.2f\" y2=\"%d\"/>\n", px_x(&x, t[i]), TOP, px_x(&x, t[i]),
                          H - BOTTOM);
    double tl[64];
    int ntl = ticks(&yl, tl, 64);
    for (int i = 0; i < ntl; i++)
        qlr_strbuf_printf(o, "<line x1=\"%d\" y1=\"%.2f\" x2=\"%d\" y2=\"%.2f\"/>\n", LEFT, px_y(&yl, tl[i]), W - RIGHT,
                          px_y(&yl, tl[i]));
    qlr_strbuf_puts(o, "</g>\n");
    qlr_strbuf_printf(o, "<rect x=\"%d\" y=\"%d\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#444\"/>\n", LEFT,
                      TOP, PW, PH);
    qlr_strbuf_puts(o, "<g fill=\"#333\">\n");
    for (int i = 0; i < nt; i++) {
        fmt_tick(lab, sizeof lab, t[i]);
        qlr_strbuf_printf(o, "<text x=\"%.2f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", px_x(&x, t[i]),
                          H - BOTTOM + 16, lab);
    }
    for (int i = 0; i < ntl; i++) {
        fmt_tick(lab, sizeof lab, tl[i]);
        qlr_strbuf_printf(o, "<text x=\"%d\" y=\"%.2f\" text-anchor=\"end\">%s</text>\n", LEFT - 6,
                          px_y(&yl, tl[i]) + 4, lab);
    }
    int ntr = ticks(&yr, t, 64);
    for (int i = 0; i < ntr; i++) {
        fmt_tick(lab, sizeof lab, t[i]);
        qlr_strbuf_printf(o, "<text x=\"%d\" y=\"%.2f\" fill=\"#777\">%s</text>\n", W - RIGHT + 6, px_y(&yr, t[i]) + 4,
                          lab);
    }
    qlr_strbuf_puts(o, "</g>\n");
    qlr_strbuf_printf(o, "<text x=\"%.2f\" y=\"%d\" text-anchor=\"middle\">step</text>\n", LEFT + PW / 2, H - 12);
    qlr_strbuf_printf(o, "<text transform=\"translate(18 %.2f) rotate(-90)\" text-anchor=\"middle\">loss%s</text>\n",
                      TOP + PH / 2, yl.log ? " (log scale)" : "");
    qlr_strbuf_printf(o, "<text transform=\"translate(%d %.2f) rotate(90)\" text-anchor=\"middle\" fill=\"#777\">"
                         "learning rate</text>\n",
                      W - 14, TOP + PH / 2);

    /* the series: the learning rate under the losses */
    series(o, "learning_rate", "stroke=\"#999\" stroke-width=\"1.5\" stroke-dasharray=\"5 4\"", 0, p, n,
           offsetof(qlr_plot_point, lr), &x, &yr);
    series(o, "train_loss", "stroke=\"#1f77b4\" stroke-width=\"1.5\"", 0, p, n, offsetof(qlr_plot_point, loss), &x, &yl);
    if (n_eval)
        series(o, "eval_loss", "stroke=\"#ff7f0e\" stroke-width=\"1.5\"", 1, p, n, offsetof(qlr_plot_point, eval_loss),
               &x, &yl);

    /* legend, top right inside the frame */
    int lx = W - RIGHT - 150, ly = TOP + 10;
    qlr_strbuf_printf(o, "<rect x=\"%d\" y=\"%d\" width=\"142\" height=\"%d\" fill=\"white\" fill-opacity=\"0.85\" "
                         "stroke=\"#ccc\"/>\n",
                      lx - 6, ly - 4, n_eval ? 62 : 44);
    static const char *const names[] = {"train loss", "eval loss", "learning rate"};
    static const char *const styles[] = {"stroke=\"#1f77b4\"", "stroke=\"#ff7f0e\"",
                                         "stroke=\"#999\" stroke-dasharray=\"5 4\""};
    for (int i = 0, row = 0; i < 3; i++) {
        if (i == 1 && !n_eval) continue;
        int y = ly + 10 + 18 * row++;
        qlr_strbuf_printf(o, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke-width=\"2\" %s/>\n", lx, y, lx + 24, y,
                          styles[i]);
        qlr_strbuf_printf(o, "<text x=\"%d\" y=\"%d\">%s</text>\n", lx + 32, y + 4, names[i]);
    }
    qlr_strbuf_puts(o, "</svg>\n");
    return o->oom ? qlr_errorf(QLR_ERR_NOMEM, "out of memory drawing the plot") : QLR_OK;
}

/* ------------------------------------------------------------------ a run folder */

qlr_status qlr_plot_run(const char *run_dir, const char *out_path, char *written, size_t cap) {
    char metrics[4200], out[4200];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", run_dir);
    if (!qlr_path_exists(metrics))
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: no metrics.jsonl (a training run's output_dir holds one)", run_dir);
    if (out_path) snprintf(out, sizeof out, "%s", out_path);
    else snprintf(out, sizeof out, "%s/" QLR_PLOT_FILE, run_dir);
    qlr_plot_point *p;
    size_t n;
    QLR_TRY(qlr_plot_read_metrics(metrics, &p, &n));
    if (!n) {
        free(p);
        return qlr_errorf(QLR_ERR_INVALID, "%s: no step logged yet", metrics);
    }
    /* the title: the run folder's name */
    size_t len = strlen(run_dir);
    while (len > 1 && run_dir[len - 1] == '/') len--;
    size_t b = len;
    while (b > 0 && run_dir[b - 1] != '/') b--;
    char title[300];
    snprintf(title, sizeof title, "%.*s: loss and learning rate", (int)(len - b), run_dir + b);
    qlr_strbuf svg = {0};
    qlr_status st = qlr_plot_svg(p, n, title, &svg);
    free(p);
    if (st == QLR_OK) st = qlr_write_atomic(out, svg.p, svg.n);
    qlr_strbuf_free(&svg);
    if (st == QLR_OK && written) snprintf(written, cap, "%s", out);
    return st;
}
