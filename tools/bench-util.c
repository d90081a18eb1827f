#include "bench-util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void bench_die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: ", program_invocation_short_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

double bench_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

long long bench_parse_int(const char *flag, const char *text, long long lo, long long hi)
{
	char *end;
	errno = 0;
	long long v = strtoll(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		bench_die("%s: '%s' is not a whole number in [%lld, %lld]", flag, text, lo, hi);
	return v;
}

int bench_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

double bench_median(double *v, size_t n)
{
	if (!n)
		return 0.0;
	qsort(v, n, sizeof(*v), bench_cmp_double);
	return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double bench_pct(const double *sorted, size_t n, double p)
{
	if (!n)
		return 0.0;
	size_t rank = (size_t)ceil(p / 100.0 * (double)n);
	rank = rank < 1 ? 1 : rank > n ? n : rank;
	return sorted[rank - 1];
}

size_t bench_parse_list(const char *flag, const char *text, long long lo, long long hi,
			long long *out, size_t cap)
{
	size_t n = 0;
	const char *p = text;
	for (;;) {
		char *end;
		errno = 0;
		long long v = strtoll(p, &end, 10);
		if (errno || end == p || (*end && *end != ',') || v < lo || v > hi)
			bench_die("%s: '%s' is not a comma-separated list of whole numbers in "
				  "[%lld, %lld]", flag, text, lo, hi);
		if (n == cap)
			bench_die("%s: '%s' has more than %zu numbers", flag, text, cap);
		out[n++] = v;
		if (!*end)
			return n;
		p = end + 1;
	}
}

long long bench_series_every(long long tokens)
{
	return tokens >= 100 ? tokens / 100 : 1;
}

long long bench_series_rows(long long tokens, long long every)
{
	return tokens / every + (tokens % every != 0);
}

long long bench_series_mark(long long k, long long tokens, long long every)
{
	return k + 1 >= bench_series_rows(tokens, every) ? tokens : (k + 1) * every;
}

long long bench_series_row_at(unsigned long long total, long long streams, long long tokens,
			      long long every)
{
	unsigned long long per_row = (unsigned long long)every * (unsigned long long)streams;
	unsigned long long end = (unsigned long long)tokens * (unsigned long long)streams;
	if (!total || total > end)
		return -1;
	if (total == end)
		return bench_series_rows(tokens, every) - 1;
	return total % per_row ? -1 : (long long)(total / per_row) - 1;
}

/* The value of "key <number> kB" in a /proc file, in bytes; -1 if absent. */
static long long bench_proc_kib_field(const char *path, const char *key)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	char line[256];
	size_t key_len = strlen(key);
	long long bytes = -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, key_len)) {
			long long kib;
			if (sscanf(line + key_len, " %lld", &kib) == 1)
				bytes = kib * 1024;
			break;
		}
	fclose(f);
	return bytes;
}

static void bench_proc_path(char *buf, size_t len, int pid, const char *file)
{
	if (pid)
		snprintf(buf, len, "/proc/%d/%s", pid, file);
	else
		snprintf(buf, len, "/proc/self/%s", file);
}

long long bench_proc_rss(int pid)
{
	/* statm: "size resident shared text lib data dt" in pages, one short line; status would
	 * format some fifty lines to give the same resident count. */
	char path[64], buf[128];
	bench_proc_path(path, sizeof(path), pid, "statm");
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	unsigned long long size, resident;
	if (sscanf(buf, "%llu %llu", &size, &resident) != 2)
		return -1;
	return (long long)resident * sysconf(_SC_PAGESIZE);
}

long long bench_proc_pss(int pid)
{
	char path[64];
	bench_proc_path(path, sizeof(path), pid, "smaps_rollup");
	return bench_proc_kib_field(path, "Pss:");
}

double bench_proc_cpu_s(int pid)
{
	/* The process's CPU clock counts nanoseconds; /proc/PID/stat only clock ticks (10 ms),
	 * too coarse for runs of a fraction of a second. */
	clockid_t clock;
	struct timespec ts;
	if (clock_getcpuclockid((pid_t)pid, &clock) == 0 && clock_gettime(clock, &ts) == 0)
		return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
	char path[64], buf[1024];
	bench_proc_path(path, sizeof(path), pid, "stat");
	FILE *f = fopen(path, "r");
	if (!f)
		return -1.0;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	/* The command name may hold spaces and parentheses: fields start after the last ')'.
	 * utime and stime are fields 14 and 15, the 12th and 13th after the state (field 3). */
	char *p = strrchr(buf, ')');
	unsigned long long utime, stime;
	if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime,
			 &stime) != 2)
		return -1.0;
	return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}
