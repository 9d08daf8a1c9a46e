/* cli/cmd_version.c: `qlora version` prints the version and how this binary was built. */
#include "cli/cli.h"

#include <stdio.h>

static int cmd_version(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        printf("usage: qlora version\n\nPrints the qlora version and the build configuration.\n");
        return 0;
    }
    printf("qlora %s\n", QLR_VERSION);
#ifdef QLR_HAVE_CUDA
    printf("backends: cpu, cuda\n");
#else
    printf("backends: cpu\n");
#endif
    return 0;
}

const qlr_cli_cmd qlr_cmd_version = {"version", "print the version and build configuration", cmd_version};
