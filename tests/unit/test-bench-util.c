/* The benchmarks' own arithmetic (tools/bench-util.c) on known data: medians, the nearest-rank
 * percentile skv-bench reports as p50/p99, strict flag parsing (bad input exits 1 with a
 * message naming the flag, checked in a forked child), the row schedule of skv-bench --series,
 * and the resident-set reading it samples. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../tools/bench-util.h"

/* ---- medians and percentiles --------------------------------------------------------------- */

Test(bench_util, median_odd_count_sorts_in_place)
{
	double v[] = { 5, 1, 3 };
	cr_assert_float_eq(bench_median(v, 3), 3.0, 1e-12);
	cr_assert(v[0] == 1 && v[1] == 3 && v[2] == 5, "bench_median sorts its input");
}

Test(bench_util, median_even_count_is_mean_of_middle_two)
{
	double v[] = { 4, 1, 3, 2 };
	cr_assert_float_eq(bench_median(v, 4), 2.5, 1e-12);
	double w[] = { 10, -10 };
	cr_assert_float_eq(bench_median(w, 2), 0.0, 1e-12);
}

Test(bench_util, median_unsorted_with_duplicates)
{
	double v[] = { 7, 7, 1, 7, 2 };
	cr_assert_float_eq(bench_median(v, 5), 7.0, 1e-12);
	double w[] = { 3, 9, 3, 1, 9, 9 }; /* 1 3 3 9 9 9 */
	cr_assert_float_eq(bench_median(w, 6), 6.0, 1e-12);
	double same[] = { 2, 2, 2, 2 };
	cr_assert_float_eq(bench_median(same, 4), 2.0, 1e-12);
}

Test(bench_util, median_of_one_and_of_none)
{
	double v[] = { 42.5 };
	cr_assert_float_eq(bench_median(v, 1), 42.5, 1e-12);
	cr_assert_float_eq(bench_median(v, 0), 0.0, 1e-12);
}

Test(bench_util, percentile_of_one_value_is_that_value)
{
	const double v[] = { 42 };
	const double ps[] = { 0.1, 1, 50, 99, 100 };
	for (size_t i = 0; i < sizeof(ps) / sizeof(ps[0]); i++)
		cr_assert_float_eq(bench_pct(v, 1, ps[i]), 42.0, 1e-12, "p%g", ps[i]);
	cr_assert_float_eq(bench_pct(v, 0, 50), 0.0, 1e-12, "empty array");
}

Test(bench_util, percentile_of_1_to_100_is_the_rank)
{
	double v[100];
	for (int i = 0; i < 100; i++)
		v[i] = i + 1;
	cr_assert_float_eq(bench_pct(v, 100, 99), 99.0, 1e-12, "p99 is the 99th value");
	cr_assert_float_eq(bench_pct(v, 100, 50), 50.0, 1e-12, "p50 is the 50th value");
	cr_assert_float_eq(bench_pct(v, 100, 100), 100.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 100, 1), 1.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 100, 0.5), 1.0, 1e-12, "rank ceil(0.5) = 1");
	cr_assert_float_eq(bench_pct(v, 100, 99.5), 100.0, 1e-12, "rank ceil(99.5) = 100");
}

Test(bench_util, percentile_is_nearest_rank_not_interpolated)
{
	const double v[] = { 10, 20, 30, 40 };
	cr_assert_float_eq(bench_pct(v, 4, 25), 10.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 4, 50), 20.0, 1e-12, "rank 2, no interpolation");
	cr_assert_float_eq(bench_pct(v, 4, 51), 30.0, 1e-12, "rank ceil(2.04) = 3");
	cr_assert_float_eq(bench_pct(v, 4, 99), 40.0, 1e-12);
	double big[200];
	for (int i = 0; i < 200; i++)
		big[i] = i + 1;
	cr_assert_float_eq(bench_pct(big, 200, 99), 198.0, 1e-12, "rank 198 of 200");
}

Test(bench_util, percentile_with_ties)
{
	const double v[] = { 1, 2, 2, 2, 3 };
	cr_assert_float_eq(bench_pct(v, 5, 20), 1.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 5, 21), 2.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 5, 50), 2.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 5, 80), 2.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 5, 81), 3.0, 1e-12);
	cr_assert_float_eq(bench_pct(v, 5, 99), 3.0, 1e-12);
}

Test(bench_util, compare_doubles_sorts_ascending)
{
	double v[] = { 3.5, -1, 0, -7.25, 3.5, 2 };
	qsort(v, 6, sizeof(double), bench_cmp_double);
	const double want[] = { -7.25, -1, 0, 2, 3.5, 3.5 };
	for (int i = 0; i < 6; i++)
		cr_assert_float_eq(v[i], want[i], 1e-12, "v[%d]", i);
}

/* ---- flag parsing ------------------------------------------------------------------------- */

Test(bench_util, parse_list_good_input)
{
	long long out[8];
	cr_assert_eq(bench_parse_list("--sweep", "1,4,16", 1, 100, out, 8), 3);
	cr_assert(out[0] == 1 && out[1] == 4 && out[2] == 16);
	cr_assert_eq(bench_parse_list("--sweep", "7", 1, 100, out, 8), 1);
	cr_assert_eq(out[0], 7);
	cr_assert_eq(bench_parse_list("--sweep", "0,100,0", 0, 100, out, 3), 3,
		     "both bounds inclusive, exactly cap items");
	cr_assert(out[0] == 0 && out[1] == 100 && out[2] == 0);
	cr_assert_eq(bench_parse_list("--sweep", "1024,1", 1, 65536, out, 8), 2,
		     "order kept, not sorted");
	cr_assert(out[0] == 1024 && out[1] == 1);
}

struct died {
	int exit_code; /* or 128 + signal; -1: the call returned */
	char err[512]; /* its stderr */
};

/* Runs call(arg) in a child with stderr captured: bench_die must end the child. */
static void run_in_child(void (*call)(const void *), const void *arg, struct died *d)
{
	int fds[2];
	cr_assert_eq(pipe(fds), 0);
	fflush(NULL);
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (!pid) {
		close(fds[0]);
		dup2(fds[1], STDERR_FILENO);
		call(arg);
		_exit(99); /* returned: not a death */
	}
	close(fds[1]);
	size_t got = 0;
	ssize_t n;
	while (got < sizeof(d->err) - 1 &&
	       (n = read(fds[0], d->err + got, sizeof(d->err) - 1 - got)) > 0)
		got += (size_t)n;
	d->err[got] = '\0';
	close(fds[0]);
	int status;
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	d->exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	if (d->exit_code == 99)
		d->exit_code = -1;
}

struct list_case {
	const char *text;
	long long lo, hi;
	size_t cap;
	const char *why; /* a part of the message */
};

static void call_parse_list(const void *arg)
{
	const struct list_case *c = arg;
	long long out[4];
	bench_parse_list("--sweep", c->text, c->lo, c->hi, out, c->cap);
}

Test(bench_util, parse_list_bad_input_exits_1_naming_the_flag)
{
	const char *not_list = "is not a comma-separated list of whole numbers";
	const struct list_case cases[] = {
		{ "", 1, 100, 4, not_list },
		{ "1,,2", 1, 100, 4, not_list },
		{ "1,", 1, 100, 4, not_list },
		{ ",1", 1, 100, 4, not_list },
		{ "1,x", 1, 100, 4, not_list },
		{ "4x", 1, 100, 4, not_list },
		{ "1;2", 1, 100, 4, not_list },
		{ "1.5", 1, 100, 4, not_list },
		{ "0", 1, 100, 4, not_list },
		{ "-1", 1, 100, 4, not_list },
		{ "101", 1, 100, 4, not_list },
		{ "99999999999999999999", 1, 100, 4, not_list },
		{ "1,2,3,4,5", 1, 100, 4, "has more than 4 numbers" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct died d;
		run_in_child(call_parse_list, &cases[i], &d);
		cr_assert_eq(d.exit_code, 1, "'%s': exit %d, stderr: %s", cases[i].text, d.exit_code,
			     d.err);
		cr_assert(strstr(d.err, "--sweep: ") && strstr(d.err, cases[i].why),
			  "'%s': stderr says: %s", cases[i].text, d.err);
		cr_assert(strchr(d.err, '\n') == d.err + strlen(d.err) - 1,
			  "'%s': one line: %s", cases[i].text, d.err);
	}
}

static void call_parse_int(const void *arg)
{
	bench_parse_int("--tokens", arg, 1, 1000);
}

Test(bench_util, parse_int_good_and_bad)
{
	cr_assert_eq(bench_parse_int("--tokens", "1", 1, 1000), 1);
	cr_assert_eq(bench_parse_int("--tokens", "1000", 1, 1000), 1000);
	cr_assert_eq(bench_parse_int("--tokens", "4000000", 1, 1LL << 32), 4000000);
	const char *bad[] = { "", "0", "1001", "12abc", "abc", "-5", "1e3",
			      "99999999999999999999" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct died d;
		run_in_child(call_parse_int, bad[i], &d);
		cr_assert_eq(d.exit_code, 1, "'%s': exit %d", bad[i], d.exit_code);
		cr_assert(strstr(d.err, "--tokens: '") &&
				  strstr(d.err, "is not a whole number in [1, 1000]"),
			  "'%s': stderr says: %s", bad[i], d.err);
	}
}

/* ---- the rows of skv-bench --series -------------------------------------------------------- */

Test(bench_util, series_default_interval_is_a_hundredth)
{
	cr_assert_eq(bench_series_every(1000000), 10000);
	cr_assert_eq(bench_series_every(4000000), 40000);
	cr_assert_eq(bench_series_every(50000), 500);
	cr_assert_eq(bench_series_every(250), 2);
	cr_assert_eq(bench_series_every(100), 1);
	cr_assert_eq(bench_series_every(99), 1, "at least 1");
	cr_assert_eq(bench_series_every(1), 1);
}

Test(bench_util, series_rows_and_marks)
{
	cr_assert_eq(bench_series_rows(1000000, 10000), 100);
	cr_assert_eq(bench_series_mark(0, 1000000, 10000), 10000);
	cr_assert_eq(bench_series_mark(99, 1000000, 10000), 1000000);
	cr_assert_eq(bench_series_rows(50001, 500), 101, "a short last row");
	cr_assert_eq(bench_series_mark(99, 50001, 500), 50000);
	cr_assert_eq(bench_series_mark(100, 50001, 500), 50001);
	cr_assert_eq(bench_series_rows(7, 100), 1, "every > tokens: one row at the end");
	cr_assert_eq(bench_series_mark(0, 7, 100), 7);
}

Test(bench_util, series_row_at_known_totals)
{
	/* 8 streams x 20,000 tokens, a row every 200 tokens per stream = 1,600 in all. */
	cr_assert_eq(bench_series_row_at(0, 8, 20000, 200), -1);
	cr_assert_eq(bench_series_row_at(1, 8, 20000, 200), -1);
	cr_assert_eq(bench_series_row_at(1599, 8, 20000, 200), -1);
	cr_assert_eq(bench_series_row_at(1600, 8, 20000, 200), 0);
	cr_assert_eq(bench_series_row_at(3200, 8, 20000, 200), 1);
	cr_assert_eq(bench_series_row_at(160000, 8, 20000, 200), 99);
	cr_assert_eq(bench_series_row_at(160001, 8, 20000, 200), -1, "past the end");
	/* 3 x 1,050 every 100: the 11th row ends at 3,150, not at 3,300. */
	cr_assert_eq(bench_series_row_at(3000, 3, 1050, 100), 9);
	cr_assert_eq(bench_series_row_at(3150, 3, 1050, 100), 10);
	cr_assert_eq(bench_series_row_at(3300, 3, 1050, 100), -1);
	/* 64 x 4,000,000 tokens: totals past 2^32. */
	cr_assert_eq(bench_series_row_at(64ULL * 4000000, 64, 4000000, 40000), 99);
	cr_assert_eq(bench_series_row_at(64ULL * 40000 * 70, 64, 4000000, 40000), 69);
}

Test(bench_util, series_every_row_claimed_once_in_order)
{
	const long long shapes[][3] = { { 1, 50, 7 }, { 3, 1050, 100 }, { 8, 200, 2 },
					{ 5, 13, 13 }, { 2, 9, 20 } };
	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
		long long streams = shapes[s][0], tokens = shapes[s][1], every = shapes[s][2];
		long long rows = bench_series_rows(tokens, every), next = 0;
		for (unsigned long long total = 1; total <= (unsigned long long)(streams * tokens);
		     total++) {
			long long k = bench_series_row_at(total, streams, tokens, every);
			if (k < 0)
				continue;
			cr_assert_eq(k, next, "shape %zu: total %llu ends row %lld, expected %lld", s,
				     total, k, next);
			cr_assert_eq((unsigned long long)(bench_series_mark(k, tokens, every) *
							  streams),
				     total, "shape %zu: row %lld ends at its mark", s, k);
			next++;
		}
		cr_assert_eq(next, rows, "shape %zu: %lld of %lld rows", s, next, rows);
	}
}

/* ---- what the kernel says ----------------------------------------------------------------- */

static long long status_vmrss(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	cr_assert_not_null(f);
	char line[256];
	long long kib = -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %lld kB", &kib) == 1)
			break;
	fclose(f);
	cr_assert_gt(kib, 0, "no VmRSS in /proc/self/status");
	return kib * 1024;
}

Test(bench_util, rss_matches_vmrss_and_follows_touched_memory)
{
	long long before_status = status_vmrss();
	long long before = bench_proc_rss(0);
	long long after_status = status_vmrss();
	long long lo = before_status < after_status ? before_status : after_status;
	long long hi = before_status < after_status ? after_status : before_status;
	cr_assert(before >= lo - (1 << 20) && before <= hi + (1 << 20),
		  "statm %lld bytes, VmRSS %lld..%lld", before, lo, hi);

	size_t bytes = 64u << 20;
	char *p = malloc(bytes);
	cr_assert_not_null(p);
	memset(p, 1, bytes);
	long long grown = bench_proc_rss(0);
	cr_assert_geq(grown - before, (long long)(60u << 20),
		      "touching 64 MiB grew the resident set by %lld bytes", grown - before);
	long long by_pid = bench_proc_rss(getpid());
	cr_assert(by_pid > grown - (1 << 20) && by_pid < grown + (1 << 20),
		  "by pid %lld bytes, as pid 0 %lld", by_pid, grown);
	free(p);
}

Test(bench_util, proc_readings_of_a_gone_process_are_minus_one)
{
	pid_t pid = fork();
	cr_assert_geq(pid, 0);
	if (!pid)
		_exit(0);
	cr_assert_eq(waitpid(pid, NULL, 0), pid);
	cr_assert_eq(bench_proc_rss(pid), -1);
	cr_assert_eq(bench_proc_pss(pid), -1);
	cr_assert_lt(bench_proc_cpu_s(pid), 0.0);
	cr_assert_gt(bench_proc_rss(0), 0);
	cr_assert_geq(bench_proc_cpu_s(0), 0.0);
}
