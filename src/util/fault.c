/*
 * Test fault injection; see fault.h.
 *
 * The list is parsed once (pthread_once) into a fixed array; after that the
 * only writes are the atomic hit counters, so a hit costs a few string
 * compares and, for a matching fault, one atomic increment -- no lock on the
 * data path of the channels that call it.
 */
#ifdef FAULT_INJECTION
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"
#include "util/fault.h"

#define MAX_FAULTS 8

static struct fault {
    char side[8], point[16];
    int channel;
    unsigned long nth;          /* fires on this hit; 1 = the first */
    atomic_ulong hits;          /* hits of (side, point, channel) so far */
} faults[MAX_FAULTS];
static int nfaults;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* One "SIDE:POINT:CHANNEL[:N]" into *f.  0, or -EINVAL. */
static int fault_parse_one(const char *tok, struct fault *f)
{
    const char *rest;
    char *end;
    int used = 0;

    if (sscanf(tok, "%7[^:]:%15[^:]:%d%n", f->side, f->point, &f->channel, &used) != 3 ||
        used == 0)
        return -EINVAL;
    rest = tok + used;
    f->nth = 1;
    if (*rest == 0)
        return 0;
    if (*rest != ':' || rest[1] < '0' || rest[1] > '9')
        return -EINVAL;
    errno = 0;
    f->nth = strtoul(rest + 1, &end, 10);
    if (errno || *end || f->nth == 0)
        return -EINVAL;
    return 0;
}

static void fault_parse(void)
{
    const char *env = getenv("LIVEMIG_FAULT");
    char buf[256], *save = NULL;

    if (!env || !*env)
        return;
    snprintf(buf, sizeof(buf), "%s", env);
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        struct fault *f = &faults[nfaults];

        if (nfaults == MAX_FAULTS) {
            util_log("LIVEMIG_FAULT: more than %d faults; ignoring '%s' and the rest",
                     MAX_FAULTS, tok);
            break;
        }
        if (fault_parse_one(tok, f) == 0)
            nfaults++;
        else
            util_log("LIVEMIG_FAULT: ignoring '%s' (expected SIDE:POINT:CHANNEL[:N], N >= 1)",
                     tok);
    }
}

bool fault_hit(const char *side, const char *point, int channel)
{
    bool fire = false;

    pthread_once(&once, fault_parse);
    /*
     * Every matching fault counts this hit, even once one of them fired:
     * "src:packet:0:5,src:packet:0:9" must fail on the 5th and the 9th.
     * fetch_add hands out each hit number once, so when several threads
     * hit the same point concurrently exactly one of them gets the N-th.
     */
    for (int i = 0; i < nfaults; i++) {
        struct fault *f = &faults[i];
        unsigned long hit;

        if (f->channel != channel || strcmp(f->side, side) || strcmp(f->point, point))
            continue;
        hit = atomic_fetch_add_explicit(&f->hits, 1, memory_order_relaxed) + 1;
        if (hit == f->nth) {
            util_log("injected fault: %s %s on channel %d (hit %lu)", side, point, channel, hit);
            fire = true;
        }
    }
    return fire;
}
#endif
