/* tests/train/test_plot.c: train/plot.h. metrics.jsonl is read with file:line:key errors; the
 * SVG has one polyline per series with exactly the finite points, the loss axis turns
 * logarithmic at a 20x span, text is escaped; qlr_plot_run writes RUN_DIR/loss.svg. */
#include "core/core.h"
#include "tests/test_util.h"
#include "train/plot.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void write_text(const char *path, const char *text) {
    CHECK_OK(qlr_write_atomic(path, text, strlen(text)));
}

/* Points in the polyline with this id (-1 when absent). */
static int polyline_points(const char *svg, const char *id) {
    char key[64];
    snprintf(key, sizeof key, "<polyline id=\"%s\"", id);
    const char *p = strstr(svg, key);
    if (!p) return -1;
    p = strstr(p, "points=\"");
    if (!p) return -1;
    p += 8;
    int n = 0;
    for (; *p && *p != '"'; p++) n += *p == ',';
    return n;
}

static int count(const char *s, const char *needle) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p++) n++;
    return n;
}

static void test_read(void) {
    char path[512];
    qlr_plot_point *p;
    size_t n;
    snprintf(path, sizeof path, "%s/metrics.jsonl", test_tmpdir());
    write_text(path, "{\"step\": 1, \"loss\": 0.5, \"lr\": 0.001}\n\n"
                     "{\"step\": 2, \"loss\": 0.25, \"lr\": 0.002, \"eval_loss\": 0.3}\n");
    CHECK_OK(qlr_plot_read_metrics(path, &p, &n));
    CHECK_EQ_INT(n, 2);
    if (n == 2) {
        CHECK(p[0].step == 1 && p[0].loss == 0.5 && p[0].lr == 0.001 && isnan(p[0].eval_loss));
        CHECK(p[1].step == 2 && p[1].eval_loss == 0.3);
    }
    free(p);
    char want[700];
    write_text(path, "{\"step\": 1, \"loss\": 0.5, \"lr\": 0.001}\n{\"step\": 2, \"lr\": 0.002}\n");
    CHECK(qlr_plot_read_metrics(path, &p, &n) == QLR_ERR_FORMAT);
    snprintf(want, sizeof want, "%s:2: loss: missing or not a number", path);
    CHECK_MSG(!strcmp(qlr_error_msg(), want), "%s", qlr_error_msg());
    CHECK(p == NULL && n == 0);
    write_text(path, "{\"step\": 1, \"loss\": 0.5, \"lr\": 0.001, \"eval_loss\": \"x\"}\n");
    CHECK(qlr_plot_read_metrics(path, &p, &n) == QLR_ERR_FORMAT);
    snprintf(want, sizeof want, "%s:1: eval_loss: not a number", path);
    CHECK_MSG(!strcmp(qlr_error_msg(), want), "%s", qlr_error_msg());
    write_text(path, "step 1\n");
    CHECK(qlr_plot_read_metrics(path, &p, &n) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), ":1: not a JSON object") != NULL, "%s", qlr_error_msg());
    qlr_error_clear();
}

static void test_svg(void) {
    /* 6 steps, losses spanning 100x (log axis), eval at 3 and 6, one non-finite lr left out */
    qlr_plot_point p[6];
    for (int i = 0; i < 6; i++) p[i] = (qlr_plot_point){i + 1, 1.0 / pow(2.5, i), 0.001 * (i + 1) / 6, NAN};
    p[2].eval_loss = 0.2;
    p[5].eval_loss = 0.02;
    p[4].lr = NAN;
    qlr_strbuf s = {0};
    CHECK_OK(qlr_plot_svg(p, 6, "run <a&b>", &s));
    const char *svg = s.p ? s.p : "";
    CHECK(!strncmp(svg, "<?xml version=\"1.0\"", 19));
    CHECK(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\"") != NULL);
    CHECK(s.n > 7 && !strcmp(svg + s.n - 7, "</svg>\n"));
    CHECK_EQ_INT(polyline_points(svg, "train_loss"), 6);
    CHECK_EQ_INT(polyline_points(svg, "eval_loss"), 2);
    CHECK_EQ_INT(polyline_points(svg, "learning_rate"), 5);
    CHECK_EQ_INT(count(svg, "<circle "), 2); /* eval points are marked */
    CHECK(strstr(svg, "loss (log scale)") != NULL);
    CHECK(strstr(svg, "run &lt;a&amp;b&gt;") != NULL);
    CHECK_EQ_INT(count(svg, "<text"), count(svg, "</text>"));
    for (size_t i = 0; i < s.n; i++)
        if ((unsigned char)svg[i] > 0x7e) {
            CHECK_MSG(0, "byte %zu is not ASCII", i);
            break;
        }
    qlr_strbuf_free(&s);
    /* a narrow span: linear axis; no eval: no eval series */
    for (int i = 0; i < 6; i++) p[i].eval_loss = NAN, p[i].loss = 1.0 - 0.1 * i;
    CHECK_OK(qlr_plot_svg(p, 6, "flat", &s));
    CHECK(s.p && !strstr(s.p, "log scale") && polyline_points(s.p, "eval_loss") == -1);
    CHECK(s.p && !strstr(s.p, "eval loss</text>"));
    qlr_strbuf_free(&s);
    CHECK(qlr_plot_svg(p, 0, "none", &s) == QLR_ERR_INVALID);
    qlr_strbuf_free(&s);
    qlr_error_clear();
}

static void test_run_dir(void) {
    char dir[512], path[600], written[700];
    snprintf(dir, sizeof dir, "%s/run", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(dir));
    CHECK(qlr_plot_run(dir, NULL, written, sizeof written) == QLR_ERR_NOT_FOUND);
    CHECK_MSG(strstr(qlr_error_msg(), "no metrics.jsonl") != NULL, "%s", qlr_error_msg());
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    write_text(path, "");
    CHECK(qlr_plot_run(dir, NULL, written, sizeof written) == QLR_ERR_INVALID);
    write_text(path, "{\"step\": 1, \"loss\": 0.5, \"lr\": 0.001}\n");
    CHECK_OK(qlr_plot_run(dir, NULL, written, sizeof written));
    snprintf(path, sizeof path, "%s/" QLR_PLOT_FILE, dir);
    CHECK_MSG(!strcmp(written, path), "%s", written);
    char *svg = NULL;
    size_t n = 0;
    CHECK_OK(qlr_file_read_all(path, 1 << 20, &svg, &n));
    CHECK(svg && strstr(svg, ">run: loss and learning rate</text>") && polyline_points(svg, "train_loss") == 1);
    free(svg);
    snprintf(path, sizeof path, "%s/elsewhere.svg", test_tmpdir());
    CHECK_OK(qlr_plot_run(dir, path, NULL, 0));
    CHECK(qlr_path_exists(path));
    qlr_error_clear();
}

int main(void) {
    test_read();
    test_svg();
    test_run_dir();
    return test_finish();
}
