/* bench/cupti_trace.h: optional kernel trace for bench_decode (cupti_trace.c). */
#ifndef QLR_BENCH_CUPTI_TRACE_H
#define QLR_BENCH_CUPTI_TRACE_H
/* Starts recording kernels when QLR_BENCH_TRACE names a file (written at exit): 1 on, 0 not
 * asked, -1 failed (message printed). */
int qlr_bench_trace_begin(void);
#endif
