/* Helpers shared by the benchmark tools: fatal errors, the clock, strict flag parsing, and
 * order statistics. Every tool reports medians of repeated, interleaved runs. */
#ifndef SKV_BENCH_UTIL_H
#define SKV_BENCH_UTIL_H

#include <stddef.h>

/* "<program>: <message>" on stderr, exit status 1. */
void bench_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* CLOCK_MONOTONIC in seconds. */
double bench_now(void);

/* A whole number in [lo, hi] for flag, or bench_die. */
long long bench_parse_int(const char *flag, const char *text, long long lo, long long hi);

/* Sorts v in place and returns its median: the middle value for odd n, the mean of the two
 * middle values for even n; 0 when n is 0. */
double bench_median(double *v, size_t n);

/* Nearest-rank percentile of an ascending array: the smallest value with at least p percent
 * of the n values at or below it, i.e. sorted[ceil(p / 100 * n) - 1] (rank clamped to
 * [1, n]; 0 < p <= 100). p50 of 1..100 is 50, p99 is 99, p100 is the largest; n = 1 gives the
 * value for every p. 0 when n is 0. */
double bench_pct(const double *sorted, size_t n, double p);

/* qsort comparator for doubles, ascending. */
int bench_cmp_double(const void *a, const void *b);

/* A comma-separated list of whole numbers in [lo, hi] for flag ("1,4,16"), at most cap of
 * them, into out; returns how many, or bench_die (empty items, junk, too many). */
size_t bench_parse_list(const char *flag, const char *text, long long lo, long long hi,
			long long *out, size_t cap);

/* skv-bench --series: a row every `every` tokens per stream, counted in aggregate (a row ends
 * when the streams' tokens together reach k * every * streams: tokens_per_stream is their
 * mean), and one at the end, tokens per stream = tokens (a shorter last row when every does
 * not divide tokens). All arguments >= 1.
 * bench_series_every: the default interval, tokens / 100 (at least 1).
 * bench_series_rows: how many rows, ceil(tokens / every).
 * bench_series_mark: tokens per stream at the end of row k (0-based), min((k + 1) * every,
 * tokens).
 * bench_series_row_at: the row that ends when the streams' aggregate count reaches total
 * (total in 1..streams * tokens), or -1 when total ends no row. Every total is reached by
 * exactly one token, so each row is claimed once however many threads count. */
long long bench_series_every(long long tokens);
long long bench_series_rows(long long tokens, long long every);
long long bench_series_mark(long long k, long long tokens, long long every);
long long bench_series_row_at(unsigned long long total, long long streams, long long tokens,
			      long long every);

/* What the kernel says about a process (pid 0: this one). Resident set in bytes
 * (/proc/PID/statm's resident pages, the same count as status's VmRSS, one short read);
 * proportional set (smaps_rollup Pss: shared pages divided among the processes mapping them)
 * in bytes; CPU time (user + system, all threads) in seconds. -1 when the process is gone or
 * the file is unreadable. */
long long bench_proc_rss(int pid);
long long bench_proc_pss(int pid);
double bench_proc_cpu_s(int pid);

#endif
