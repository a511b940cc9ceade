/*
 * Process-wide run-time settings that must be in place before the numeric
 * core runs. Called first thing in main, on the main thread.
 */
#ifndef TOPIARY_RUNTIME_H
#define TOPIARY_RUNTIME_H

/*
 * Re-executes the program once with OMP_WAIT_POLICY=PASSIVE unless the
 * variable is already set. With libgomp's default policy, the OpenMP threads
 * of one kernel spin after their loop and take the cores from the OpenBLAS
 * threads of the next sgemm. On 2 cores that made MobileNetV2 at 112 px up to
 * 3x slower (measured with bench/bench_model). libgomp reads the variable
 * only when it loads, hence the re-exec. Returns if the exec fails, and the
 * program then runs with the default policy.
 */
void runtime_prefer_passive_openmp(char **argv);

#endif
