/* core/progress.h: a progress bar for long work (loading, quantizing, training, benches).
 *
 * On a terminal (stderr is a tty) it redraws one line: label, bar, done/total, rate, ETA and a
 * caller-supplied extra text (loss, lr, ...). When stderr is not a terminal it prints a plain
 * line at most every QLR_PROGRESS_PLAIN_SECS seconds and one at the end, so logs stay readable:
 * the count that completes the bar is printed once, by qlr_progress_end, and never a line that
 * repeats the one before it. */
#ifndef QLR_CORE_PROGRESS_H
#define QLR_CORE_PROGRESS_H

#include <stdint.h>

#define QLR_PROGRESS_PLAIN_SECS 10.0

typedef struct qlr_progress qlr_progress;

/* Starts a bar. `unit` names what is counted ("tensors", "steps", "MiB"); total 0 means
 * unknown (no bar, no ETA). Returns NULL only if allocation fails (then all calls are no-ops). */
qlr_progress *qlr_progress_begin(const char *label, uint64_t total, const char *unit);
/* Sets the count done so far and an optional extra text (may be NULL). Cheap: redraws at
 * most ~10 times a second. */
void qlr_progress_update(qlr_progress *p, uint64_t done, const char *extra);
/* Final line with the elapsed time and mean rate (on a terminal always; in plain mode unless
 * the last plain line showed the same count and text); frees `p`. */
void qlr_progress_end(qlr_progress *p);
/* Erases a live bar line so another message can be printed (used by the logger). */
void qlr_progress_clear_line(void);

/* Formats a duration in seconds as "1h02m", "3m07s" or "12.3s" into buf. */
void qlr_format_duration(double secs, char *buf, int n);
/* Monotonic clock in seconds. */
double qlr_now(void);

#endif
