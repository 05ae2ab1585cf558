/*
 * Guest RAM backends; see rambackend.h.
 */
#include "rambackend.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

int tool_mem_backend_parse(const char *s, enum guest_backend *b, const char **path,
                           lm_error *err)
{
    if (!strcmp(s, "anon")) {
        *b = GUEST_MEM_ANON;
    } else if (!strcmp(s, "memfd")) {
        *b = GUEST_MEM_MEMFD;
    } else if (!strncmp(s, "file:", 5) && s[5]) {
        *b = GUEST_MEM_FILE;
        *path = s + 5;
    } else {
        return tool_error(err, -EINVAL, "--mem-backend: '%s' is not anon, memfd or file:PATH",
                          s);
    }
    return 0;
}

int tool_ram_map(enum guest_backend b, const char *path, uint64_t mem, bool incoming,
                 uint8_t **ram, int *fd, lm_error *err)
{
    unsigned long long size = (unsigned long long)mem;
    int prot = PROT_READ | PROT_WRITE, flags = MAP_SHARED;
    struct stat st;
    void *p;

    *fd = -1;
    switch (b) {
    case GUEST_MEM_ANON:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
        break;
    case GUEST_MEM_MEMFD:
        if (incoming) {         /* address space only: the source's memfd comes later */
            prot = PROT_NONE;
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
            break;
        }
        *fd = memfd_create("livemig-guest-ram", MFD_CLOEXEC);
        if (*fd < 0)
            return tool_error_errno(err, -errno, "memfd_create");
        if (ftruncate(*fd, (off_t)mem) < 0)
            return tool_error_errno(err, -errno, "cannot size the memfd to %llu bytes", size);
        break;
    case GUEST_MEM_FILE:
        *fd = open(path, O_RDWR | O_CLOEXEC | (incoming ? 0 : O_CREAT), 0600);
        if (*fd < 0)
            return tool_error_errno(err, -errno, "cannot open %s", path);
        if (fstat(*fd, &st) < 0)
            return tool_error_errno(err, -errno, "fstat %s", path);
        if (incoming && (uint64_t)st.st_size != mem)
            return tool_error(err, -EINVAL, "%s holds %llu bytes, not the %llu of --mem",
                              path, (unsigned long long)st.st_size, size);
        if (!incoming && ftruncate(*fd, (off_t)mem) < 0)
            return tool_error_errno(err, -errno, "cannot size %s to %llu bytes", path, size);
        break;
    }
    p = mmap(NULL, mem, prot, flags, *fd, 0);
    if (p == MAP_FAILED)
        return tool_error_errno(err, -errno, "cannot map %llu bytes of guest RAM", size);
    *ram = p;
    return 0;
}
