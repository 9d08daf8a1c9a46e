/* cli/cli.h: what a subcommand looks like. Each cli/cmd_<name>.c defines one
 *   const qlr_cli_cmd qlr_cmd_<name> = {"<name>", "<one-line summary>", <main function>};
 * and CMake collects every cmd_*.c into the command table (commands.inc), so adding a
 * subcommand never touches main.c. A subcommand's main parses its own flags, prints --help,
 * calls one module entry point, and returns the process exit code (0 ok, 1 failure, 2 usage). */
#ifndef QLR_CLI_H
#define QLR_CLI_H

#include "core/status.h"

typedef struct qlr_cli_cmd {
    const char *name;
    const char *summary;
    int (*main)(int argc, char **argv); /* argv[0] is the subcommand name */
} qlr_cli_cmd;

/* Prints "qlora <cmd>: error: <message>" for the current error and returns 1. */
int qlr_cli_fail(const char *cmd);
/* Prints "qlora <cmd>: <fmt...>" plus a pointer to --help, returns 2 (usage error). */
int qlr_cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* 1 if argv holds -h or --help. */
int qlr_cli_wants_help(int argc, char **argv);

/* One line: the backends this binary was built with (CUDA architectures), build type and
 * compiler, as CMake configured them. */
const char *qlr_cli_build_summary(void);

/* How to run this binary in a hint the user can paste: "qlora" when the first qlora on PATH is
 * this binary, else its path (relative to the current folder when inside it, e.g.
 * "build/bin/qlora"). Returns a static string. */
const char *qlr_cli_self_command(void);

/* The demo model path: $QLR_DEMO_MODEL, else <repo cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf
 * as installed by scripts/setup.sh. Returns a static string. */
const char *qlr_cli_demo_model(void);

#endif
