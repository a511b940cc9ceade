/* `topiary version`: the version and the library versions linked in. */
#include <stdio.h>

#include "cli.h"

#define TOPIARY_VERSION "0.1.0"

int cli_version(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    printf("topiary %s\n", TOPIARY_VERSION);
    return 0;
}
