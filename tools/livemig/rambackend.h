/*
 * Where a guest's RAM lives (--mem-backend), for every command that hosts
 * one (`livemig guest`, `livemig vm`): private anonymous memory, a memfd,
 * or a named shared file.  The last two are what CPR hands over (a
 * descriptor the library knows: lm_ram_register_fd), the file also what
 * outlives the process (cpr-reboot).
 *
 * An incoming guest with a memfd gets address space only (PROT_NONE,
 * MAP_NORESERVE, fd -1): the source's memfd is mapped over it when a
 * cpr-transfer brings it, so the destination never has a copy of its own.
 * An incoming guest with a file takes the file as it is (it must hold
 * exactly the guest's size): a cpr-reboot restore.
 *
 * Threads: called once at startup; the caller owns the mapping and the
 * descriptor.
 */
#ifndef LIVEMIG_TOOL_RAMBACKEND_H
#define LIVEMIG_TOOL_RAMBACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "livemig/livemig.h"

enum guest_backend {
    GUEST_MEM_ANON,             /* private anonymous memory (default) */
    GUEST_MEM_MEMFD,            /* a memfd, mapped shared: cpr-transfer can hand it over */
    GUEST_MEM_FILE,             /* a shared file (mem_path), e.g. under /dev/shm: it
                                   outlives the process, so cpr-reboot can restore from it */
};

/* "anon", "memfd" or "file:PATH" (*path then points into s).  0 or -EINVAL. */
int tool_mem_backend_parse(const char *s, enum guest_backend *b, const char **path,
                           lm_error *err);

/* Map `mem` bytes as the backend says; *fd is -1 for anonymous memory and
 * an incoming memfd's reservation.  0 or a negative errno with err. */
int tool_ram_map(enum guest_backend b, const char *path, uint64_t mem, bool incoming,
                 uint8_t **ram, int *fd, lm_error *err);

#endif
