/* Process-wide run-time settings; see runtime.h. */
#include "runtime.h"

#include <stdlib.h>
#include <unistd.h>

void runtime_prefer_passive_openmp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0)
        return;
    execv("/proc/self/exe", argv);
}
