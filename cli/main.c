/* cli/main.c: the qlora entry point. Dispatches argv[1] to a subcommand from the generated
 * table (see cli.h) and owns process exit. Nothing else in the tree calls exit(). */
#include "cli/cli.h"
#include "core/core.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QLR_CMD(name) extern const qlr_cli_cmd qlr_cmd_##name;
#include "commands.inc"
#undef QLR_CMD

static const qlr_cli_cmd *const g_cmds[] = {
#define QLR_CMD(name) &qlr_cmd_##name,
#include "commands.inc"
#undef QLR_CMD
};
static const int g_n_cmds = (int)(sizeof g_cmds / sizeof g_cmds[0]);

int qlr_cli_fail(const char *cmd) {
    fprintf(stderr, "qlora %s: error: %s\n", cmd, qlr_error_msg()[0] ? qlr_error_msg() : qlr_status_str(qlr_error_status()));
    if (qlr_log_get_level() >= QLR_LOG_DEBUG) fprintf(stderr, "  (raised at %s)\n", qlr_error_where());
    return 1;
}

int qlr_cli_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "qlora %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see 'qlora %s --help')\n", cmd);
    va_end(ap);
    return 2;
}

int qlr_cli_wants_help(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return 1;
    return 0;
}

const char *qlr_cli_demo_model(void) {
    static char path[4096];
    const char *env = getenv("QLR_DEMO_MODEL");
    if (env && *env) return env;
    const char *cache = getenv("QLR_CACHE");
    if (cache && *cache) snprintf(path, sizeof path, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", cache);
    else snprintf(path, sizeof path, "%s/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf", QLR_SOURCE_DIR);
    return path;
}

static void usage(FILE *f) {
    fprintf(f, "qlora %s: QLoRA fine-tuning and multi-adapter serving\n\n", QLR_VERSION);
    fprintf(f, "usage: qlora <command> [options]   (qlora <command> --help for details)\n\ncommands:\n");
    for (int i = 0; i < g_n_cmds; i++) fprintf(f, "  %-12s %s\n", g_cmds[i]->name, g_cmds[i]->summary);
    fprintf(f, "\nenvironment: QLR_LOG=error|warn|info|debug, QLR_THREADS=N, QLR_DEMO_MODEL=path\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("qlora %s\n", QLR_VERSION);
        return 0;
    }
    for (int i = 0; i < g_n_cmds; i++)
        if (!strcmp(argv[1], g_cmds[i]->name)) return g_cmds[i]->main(argc - 1, argv + 1);
    fprintf(stderr, "qlora: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
