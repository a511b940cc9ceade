/*
 * The topiary binary: one entry point with subcommands. Each subcommand lives
 * in its own file and registers here; main only dispatches.
 */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "runtime.h"

static const cli_command commands[] = {
    {"forward", "run a model on images and print the top classes", cli_forward},
    {"inspect", "print a model's graph, parameters and FLOPs", cli_inspect},
    {"prune", "prune a model and evaluate it zero-shot on held-out tasks", cli_prune},
    {"dataset", "inspect a labelled data set or convert it to a bundle", cli_dataset},
    {"serve", "run the HTTP service", cli_serve},
    {"submit", "submit a pruning job to a server, wait, download the result", cli_submit},
    {"jobs", "list a server's jobs", cli_jobs},
    {"job", "print one job of a server as JSON", cli_job},
    {"cancel", "cancel a queued or running job on a server", cli_cancel},
    {"checkpoint", "verify a compressed checkpoint and print its sparsity", cli_checkpoint},
    {"version", "print the version", cli_version},
};

static void print_usage(FILE *out)
{
    fprintf(out, "usage: topiary COMMAND [OPTIONS]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(out, "\nRun 'topiary COMMAND --help' for the options of a command.\n");
}

int main(int argc, char **argv)
{
    runtime_prefer_passive_openmp(argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        print_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "topiary: unknown command '%s'\n", argv[1]);
    print_usage(stderr);
    return 2;
}
