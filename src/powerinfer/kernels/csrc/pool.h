/* Persistent thread pool: n-1 pthread workers plus the calling thread run one SPMD job at a time
 * (fn(arg, ith, nth) on every thread), with a spinning barrier between phases. Idle workers spin for
 * PI_SPIN_NS, then sleep on a condition variable, so an idle process does not burn a core. */
#ifndef PI_POOL_H
#define PI_POOL_H

#include <stdint.h>

typedef void (*pi_job_fn)(void *arg, int ith, int nth);
typedef struct pi_pool pi_pool;

pi_pool *pi_pool_new(int n_threads); /* NULL on failure */
void pi_pool_free(pi_pool *p);
int pi_pool_size(const pi_pool *p);
/* Run fn on all threads; returns when every thread has returned from fn. Not reentrant. */
void pi_pool_run(pi_pool *p, pi_job_fn fn, void *arg);
/* All nth threads of the running job must call it the same number of times. */
void pi_barrier(pi_pool *p, int ith);
/* ns spent by thread 0 waiting in pi_barrier since the last reset (only while timing is on). */
void pi_pool_timing(pi_pool *p, int on);
uint64_t pi_pool_barrier_ns(pi_pool *p, int reset);

uint64_t pi_now_ns(void);

#endif
