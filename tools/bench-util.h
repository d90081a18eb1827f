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

/* Sorts v in place and returns its median. */
double bench_median(double *v, size_t n);

/* Nearest-rank percentile (0 < p <= 100) of an ascending array; 0 when empty. */
double bench_pct(const double *sorted, size_t n, double p);

/* qsort comparator for doubles, ascending. */
int bench_cmp_double(const void *a, const void *b);

/* A comma-separated list of whole numbers in [lo, hi] for flag ("1,4,16"), at most cap of
 * them, into out; returns how many, or bench_die (empty items, junk, too many). */
size_t bench_parse_list(const char *flag, const char *text, long long lo, long long hi,
			long long *out, size_t cap);

/* What the kernel says about a process (pid 0: this one). Resident set (VmRSS) in bytes;
 * proportional set (smaps_rollup Pss: shared pages divided among the processes mapping them)
 * in bytes; CPU time (user + system, all threads) in seconds. -1 when the process is gone or
 * the file is unreadable. */
long long bench_proc_rss(int pid);
long long bench_proc_pss(int pid);
double bench_proc_cpu_s(int pid);

#endif
