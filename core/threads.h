/* core/threads.h: a fixed pool of worker threads and a parallel-for over [0, n).
 * The thread count comes from QLR_THREADS, else the number of online CPUs. The pool is made
 * on first use and lives for the process; calls from inside a worker run serially. */
#ifndef QLR_CORE_THREADS_H
#define QLR_CORE_THREADS_H

#include <stdint.h>

/* fn(ctx, begin, end, thread_index) handles indices [begin, end). */
typedef void (*qlr_range_fn)(void *ctx, int64_t begin, int64_t end, int tid);

/* Splits [0, n) into contiguous chunks of at least `min_chunk` and runs them on the pool;
 * returns when all are done. Deterministic partition for a given n and thread count. */
void qlr_parallel_for(int64_t n, int64_t min_chunk, qlr_range_fn fn, void *ctx);

/* Number of threads the pool uses (>= 1). */
int qlr_n_threads(void);
/* Sets the thread count before first use (0 = default). */
void qlr_set_n_threads(int n);

#endif
