/*
 * Futex-based counting semaphore with a bounded spin; see sem.h.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "util/sem.h"
#include "util/time.h"

static void sem_futex_wait(fsem *s, int64_t ns)
{
    struct timespec ts = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
    syscall(SYS_futex, &s->count, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
}

static void sem_futex_wake(fsem *s, int n)
{
    syscall(SYS_futex, &s->count, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static bool sem_try(fsem *s)
{
    unsigned v = atomic_load_explicit(&s->count, memory_order_relaxed);

    while (v > 0)
        if (atomic_compare_exchange_weak_explicit(&s->count, &v, v - 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return true;
    return false;
}

void fsem_init(fsem *s, unsigned v, int threads)
{
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;

    atomic_init(&s->count, v);
    atomic_init(&s->sleepers, 0);
    s->spin_ns = threads < cpus ? FSEM_SPIN_NS : 0;
}

void fsem_post(fsem *s)
{
    atomic_fetch_add(&s->count, 1);
    if (atomic_load(&s->sleepers))
        sem_futex_wake(s, 1);
}

void fsem_kick(fsem *s)
{
    sem_futex_wake(s, INT_MAX);
}

int fsem_wait(fsem *s, const atomic_bool *abort, int timeout_ms)
{
    int64_t start = time_now_ns();
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : start + (int64_t)timeout_ms * 1000000;

    for (;;) {
        if (sem_try(s))
            return 0;
        if (abort && atomic_load(abort))
            return -ECANCELED;
        int64_t now = time_now_ns();
        if (now >= deadline)
            return -ETIMEDOUT;
        if (now - start < s->spin_ns) {
            cpu_relax();
            continue;
        }
        /* Sleep at most 100 ms at a time: a safety net, not the wake-up path. */
        int64_t ns = deadline - now;
        if (ns > 100000000)
            ns = 100000000;
        atomic_fetch_add(&s->sleepers, 1);
        if (atomic_load(&s->count) == 0 && !(abort && atomic_load(abort)))
            sem_futex_wait(s, ns);
        atomic_fetch_sub(&s->sleepers, 1);
    }
}
