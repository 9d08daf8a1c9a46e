/* train/plot.h: the picture of a training run — train loss per step, eval loss at the eval
 * steps and the learning rate (on a second axis) as one SVG file written by the program itself
 * (text, lines and axes; any browser or image viewer that reads SVG shows it).
 *
 * Reads what the trainer logs (output_dir/metrics.jsonl: one JSON object per logged step with
 * step, loss, lr and eval_loss at eval steps) and writes output_dir/loss.svg atomically. The
 * trainer calls it at each checkpoint and at the end; `qlora plot RUN_DIR` on demand. It does
 * not own the metrics file (train/trainer_ckpt.c writes it). */
#ifndef QLR_TRAIN_PLOT_H
#define QLR_TRAIN_PLOT_H

#include <stddef.h>

#include "core/status.h"
#include "core/strbuf.h"

#define QLR_PLOT_FILE "loss.svg"

/* One logged step; eval_loss is NaN when the step had no evaluation. */
typedef struct qlr_plot_point {
    double step, loss, lr, eval_loss;
} qlr_plot_point;

/* Reads a metrics.jsonl file into *pts (malloc'ed, in file order). A line that is not a JSON
 * object with numeric step, loss and lr is QLR_ERR_FORMAT naming the file, the line and the
 * key. An empty file gives *n = 0. */
qlr_status qlr_plot_read_metrics(const char *path, qlr_plot_point **pts, size_t *n);

/* Appends the SVG document of the points (n >= 1) to `out`: a left axis for the losses (log
 * scale when they span 20x or more), a right axis for the learning rate, a step axis, a legend
 * and `title`. Non-finite values are left out. QLR_ERR_INVALID for n == 0; QLR_ERR_NOMEM. */
qlr_status qlr_plot_svg(const qlr_plot_point *pts, size_t n, const char *title, qlr_strbuf *out);

/* run_dir/metrics.jsonl -> out_path (NULL: run_dir/loss.svg), atomically; the path written goes to
 * `written` (cap bytes) when not NULL. QLR_ERR_NOT_FOUND without metrics.jsonl, QLR_ERR_INVALID
 * when it holds no step yet. */
qlr_status qlr_plot_run(const char *run_dir, const char *out_path, char *written, size_t cap);

#endif
