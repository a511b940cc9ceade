/* Safe opening of input files; see fileio.h. */
#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int top_open_regular(const char *path, top_error *err)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        top_error_set(err, TOP_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        top_error_set(err, TOP_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        top_error_set(err, TOP_ERR_IO, "cannot read '%s': %s; pass a regular file", path,
                      S_ISDIR(sb.st_mode) ? strerror(EISDIR) : "it is not a regular file");
        close(fd);
        return -1;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
        top_error_set(err, TOP_ERR_IO, "cannot set '%s' to blocking reads: %s", path,
                      strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

FILE *top_fopen_regular(const char *path, top_error *err)
{
    int fd = top_open_regular(path, err);
    if (fd < 0)
        return NULL;
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        top_error_set(err, TOP_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
        close(fd);
    }
    return f;
}
