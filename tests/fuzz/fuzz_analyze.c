/*
 * The analyzer: lm_analyze_file on the input (a memfd, by its
 * /proc/self/fd path), then the JSON of the result, so that every field it
 * filled is read once.  Extraction stays off (it writes files).  The input
 * is the file with a zero hole cut out (fuzz_hole_file in fuzz_util.h), so
 * that whole mapped-ram files, whose pages region starts at 1 MiB, are
 * inputs of a few KiB.
 */
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "livemig/analyze.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = fuzz_hole_file(data, size);
    char path[64];
    lm_analysis *a = NULL;
    lm_error err = { 0 };
    char *json;

    if (fd < 0)
        return 0;
    fuzz_fd_path(path, sizeof(path), fd);
    lm_analyze_file(path, NULL, &a, &err);
    if (!a)
        abort();            /* *out always receives a result */
    json = lm_analysis_to_json(a);
    free(json);
    lm_analysis_free(a);
    close(fd);
    return 0;
}
