/* cli/cmd_version.c: `qlora version` (also `qlora --version`) prints the version and how this
 * binary was built (qlr_cli_build_summary: the backends and CUDA architectures CMake chose). */
#include "cli/cli.h"

#include <stdio.h>

static int cmd_version(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        printf("usage: qlora version\n\nPrints the qlora version and the build configuration.\n");
        return 0;
    }
    printf("qlora %s\nbuild: %s\n", QLR_VERSION, qlr_cli_build_summary());
    return 0;
}

const qlr_cli_cmd qlr_cmd_version = {"version", "print the version and build configuration", cmd_version};
