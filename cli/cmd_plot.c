/* cli/cmd_plot.c: `qlora plot RUN_DIR [-o FILE]`: the picture of a training run (train loss per
 * step, eval loss, learning rate) from RUN_DIR/metrics.jsonl as an SVG file (train/plot.h). The
 * trainer writes the same file at each checkpoint and at the end; this redraws it on demand
 * (while a run is going, or after copying metrics.jsonl elsewhere). */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/core.h"
#include "train/plot.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora plot RUN_DIR [-o FILE]\n\n"
            "Draws a training run from RUN_DIR/metrics.jsonl (RUN_DIR is the recipe's output_dir):\n"
            "the train loss of every logged step, the eval loss at the eval steps (log scale when\n"
            "the losses span 20x or more) and the learning rate on a second axis, as an SVG file\n"
            "(open it in a browser). qlora train writes it at each checkpoint and at the end.\n\n"
            "  -o FILE   where to write it (default RUN_DIR/" QLR_PLOT_FILE ")\n\n"
            "exit status: 0 written, 1 error (no metrics.jsonl, a bad line), 2 usage error\n");
}

static int cmd_plot(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *run = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (i + 1 >= argc) return qlr_cli_usage_error("plot", "%s needs a file", a);
            out = argv[++i];
        } else if (a[0] == '-' && a[1]) {
            return qlr_cli_usage_error("plot", "unknown option '%s'", a);
        } else if (run) {
            return qlr_cli_usage_error("plot", "one RUN_DIR only (got '%s' and '%s')", run, a);
        } else {
            run = a;
        }
    }
    if (!run) return qlr_cli_usage_error("plot", "RUN_DIR is required (the recipe's output_dir)");
    if (!qlr_is_dir(run))
        return qlr_cli_usage_error("plot", "%s is not a folder: give the run's output_dir (it holds metrics.jsonl)", run);
    char written[4200];
    if (qlr_plot_run(run, out, written, sizeof written) != QLR_OK) return qlr_cli_fail("plot");
    printf("plot: %s\n", written);
    return 0;
}

const qlr_cli_cmd qlr_cmd_plot = {"plot", "draw a run's loss and learning rate (metrics.jsonl -> SVG)", cmd_plot};
