/*
 * Opening input files safely: every reader of a file named by a user goes
 * through here, so a FIFO, a device or a directory gives an error instead of
 * blocking or reading forever.
 */
#ifndef TOPIARY_FILEIO_H
#define TOPIARY_FILEIO_H

#include <stdio.h>

#include "status.h"

/*
 * Opens path read-only and returns the descriptor, or -1 with err naming the
 * path and the reason. The open is non-blocking, so a FIFO without a writer
 * cannot hang it; anything but a regular file is rejected, and the descriptor
 * is returned in blocking mode.
 */
int top_open_regular(const char *path, top_error *err);

/* The same as a stdio stream ("rb"); NULL with err set on failure. */
FILE *top_fopen_regular(const char *path, top_error *err);

#endif
