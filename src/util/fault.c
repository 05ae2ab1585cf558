/*
 * Test fault injection; see fault.h.
 */
#ifdef LM_FAULT_INJECTION
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
    atomic_bool fired;
} faults[MAX_FAULTS];
static int nfaults;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void fault_parse(void)
{
    const char *env = getenv("LIVEMIG_FAULT");
    char buf[256], *save = NULL;

    if (!env || !*env)
        return;
    snprintf(buf, sizeof(buf), "%s", env);
    for (char *tok = strtok_r(buf, ",", &save); tok && nfaults < MAX_FAULTS;
         tok = strtok_r(NULL, ",", &save)) {
        struct fault *f = &faults[nfaults];
        if (sscanf(tok, "%7[^:]:%15[^:]:%d", f->side, f->point, &f->channel) == 3)
            nfaults++;
        else
            lm_log("LIVEMIG_FAULT: ignoring '%s' (expected SIDE:POINT:CHANNEL)", tok);
    }
}

bool lm_fault_hit(const char *side, const char *point, int channel)
{
    pthread_once(&once, fault_parse);
    for (int i = 0; i < nfaults; i++) {
        struct fault *f = &faults[i];
        if (f->channel == channel && !strcmp(f->side, side) && !strcmp(f->point, point) &&
            !atomic_exchange(&f->fired, true)) {
            lm_log("injected fault: %s %s on channel %d", side, point, channel);
            return true;
        }
    }
    return false;
}
#endif
