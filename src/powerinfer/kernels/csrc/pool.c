/* Thread pool and barrier (see pool.h). The barrier is ggml's counter + generation scheme. */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#if (defined(__x86_64__) || defined(__i386__)) && !defined(PI_FORCE_PORTABLE)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* Between decode steps Python samples the next token (~0.1 ms); waiting 2 ms keeps workers hot for that
 * gap while an idle process goes quiet almost at once. */
#define PI_SPIN_NS 2000000ull
/* Pure spinning only this long; after that every wait iteration calls sched_yield(), so when the machine is
 * oversubscribed (another process on our cores) the thread we wait for gets the CPU at once instead of after
 * a 4 ms scheduler tick. Measured with a busy neighbour: 3.8 ms per 2-thread job -> see kernel_bench. */
#define PI_PURE_SPIN_NS 20000ull

/* Spin-then-yield waiting helper: call with the iteration count; returns after yielding when due. */
static inline void relax(unsigned *spins, uint64_t *t0) {
    cpu_relax();
    if ((++*spins & 63) == 0) {
        const uint64_t now = pi_now_ns();
        if (!*t0) *t0 = now;
        else if (now - *t0 > PI_PURE_SPIN_NS) sched_yield();
    }
}

struct pi_pool {
    int nth;
    pthread_t *threads;
    pi_job_fn fn;
    void *arg;
    _Atomic int gen;       /* job generation, bumped by pi_pool_run */
    _Atomic int done;      /* workers finished with the current job */
    _Atomic int sleeping;  /* workers blocked on cv */
    _Atomic int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int bar_count;
    _Atomic int bar_gen;
    int timing;
    uint64_t bar_ns;
};

typedef struct { pi_pool *p; int ith, gen0; } worker_arg;

uint64_t pi_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *worker_main(void *varg) {
    worker_arg wa = *(worker_arg *)varg;
    free(varg);
    pi_pool *p = wa.p;
    int seen = wa.gen0; /* the generation at creation: a job posted before this thread ran is not missed */
    for (;;) {
        uint64_t t0 = 0;
        unsigned spins = 0;
        int g;
        while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen && !atomic_load(&p->stop)) {
            relax(&spins, &t0);
            if ((spins & 63) == 0) {
                if (t0 && pi_now_ns() - t0 > PI_SPIN_NS) {
                    pthread_mutex_lock(&p->mu);
                    atomic_fetch_add(&p->sleeping, 1);
                    while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
                    atomic_fetch_sub(&p->sleeping, 1);
                    pthread_mutex_unlock(&p->mu);
                    t0 = 0;
                }
            }
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        p->fn(p->arg, wa.ith, p->nth);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
    }
    return NULL;
}

pi_pool *pi_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    pi_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->nth = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) { free(p); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) { p->nth = i; pi_pool_free(p); return NULL; }
        wa->p = p; wa->ith = i; wa->gen0 = atomic_load(&p->gen);
        if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
            free(wa); p->nth = i; pi_pool_free(p); return NULL;
        }
    }
    return p;
}

void pi_pool_free(pi_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->nth; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

int pi_pool_size(const pi_pool *p) { return p->nth; }

void pi_pool_run(pi_pool *p, pi_job_fn fn, void *arg) {
    if (p->nth == 1) { fn(arg, 0, 1); return; }
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->done, 0);
    atomic_store(&p->bar_count, 0);
    atomic_fetch_add(&p->gen, 1); /* seq_cst: pairs with the sleeper's increment of `sleeping` */
    if (atomic_load(&p->sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0, p->nth);
    unsigned spins = 0;
    uint64_t t0 = 0;
    while (atomic_load_explicit(&p->done, memory_order_acquire) != p->nth - 1) relax(&spins, &t0);
}

void pi_barrier(pi_pool *p, int ith) {
    if (p->nth == 1) return;
    const uint64_t t0 = (p->timing && ith == 0) ? pi_now_ns() : 0;
    const int g = atomic_load_explicit(&p->bar_gen, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == p->nth - 1) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar_gen, 1, memory_order_release);
    } else {
        unsigned spins = 0;
        uint64_t ts = 0;
        while (atomic_load_explicit(&p->bar_gen, memory_order_acquire) == g) relax(&spins, &ts);
    }
    if (t0) p->bar_ns += pi_now_ns() - t0; /* thread 0 only */
}

void pi_pool_timing(pi_pool *p, int on) { p->timing = on; }
uint64_t pi_pool_barrier_ns(pi_pool *p, int reset) {
    const uint64_t v = p->bar_ns;
    if (reset) p->bar_ns = 0;
    return v;
}
