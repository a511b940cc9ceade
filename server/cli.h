/* Subcommands of the topiary binary. Each returns the process exit code:
 * 0 success, 1 the work failed, 2 invalid usage. */
#ifndef TOPIARY_CLI_H
#define TOPIARY_CLI_H

typedef struct cli_command {
    const char *name;
    const char *help;
    int (*run)(int argc, char **argv);
} cli_command;

int cli_version(int argc, char **argv);
int cli_forward(int argc, char **argv);
int cli_inspect(int argc, char **argv);
int cli_prune(int argc, char **argv);
int cli_dataset(int argc, char **argv);
int cli_serve(int argc, char **argv);
int cli_submit(int argc, char **argv);
int cli_jobs(int argc, char **argv);
int cli_job(int argc, char **argv);
int cli_cancel(int argc, char **argv);
int cli_checkpoint(int argc, char **argv);

#endif
