/* skv-bench-quant: speed of engine/quant.c on one core -- skv_quant_row (what skv-mkmodel
 * spends its time in) and the scalar reference skv_dequant_row -- for every weight type, in
 * millions of weights per second, the median of interleaved repeats.
 *
 *   skv-bench-quant [--weights M] [--repeats N]
 *
 * The input is uniform random in [-0.1, 0.1), rows of 4096 weights. Times are this thread's
 * CPU time (CLOCK_THREAD_CPUTIME_ID), so other work on a shared machine does not count (its
 * cache and memory traffic still does). */
#include "bench-util.h"
#include "quant.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_ROW 4096u
#define BENCH_MAX_REPEATS 101

static const uint32_t bench_types[] = {
	SKV_WTYPE_F16, SKV_WTYPE_BF16, SKV_WTYPE_Q8_0, SKV_WTYPE_Q4_0,
	SKV_WTYPE_Q4_K, SKV_WTYPE_Q5_K, SKV_WTYPE_Q6_K,
};
#define BENCH_N_TYPES (sizeof(bench_types) / sizeof(bench_types[0]))

static double bench_cpu_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void usage(void)
{
	fprintf(stderr, "usage: skv-bench-quant [--weights MILLIONS (4)] [--repeats N (5)]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	long long millions = 4, repeats = 5;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--weights") && i + 1 < argc)
			millions = bench_parse_int("--weights", argv[++i], 1, 1024);
		else if (!strcmp(argv[i], "--repeats") && i + 1 < argc)
			repeats = bench_parse_int("--repeats", argv[++i], 1, BENCH_MAX_REPEATS);
		else
			usage();
	}

	const uint64_t n = (uint64_t)millions * 1000000 / BENCH_ROW * BENCH_ROW;
	float *weights = malloc(n * sizeof(float));
	float *restored = malloc(n * sizeof(float));
	uint8_t *packed = malloc(n * sizeof(float));
	if (!weights || !restored || !packed)
		bench_die("out of memory for %llu weights", (unsigned long long)n);
	uint64_t state = 0x853c49e6748fea9bull;
	for (uint64_t i = 0; i < n; i++) {
		state = state * 6364136223846793005ull + 1442695040888963407ull;
		weights[i] = ((float)(state >> 40) / 16777216.0f - 0.5f) * 0.2f;
	}

	static double quant_s[BENCH_N_TYPES][BENCH_MAX_REPEATS];
	static double dequant_s[BENCH_N_TYPES][BENCH_MAX_REPEATS];
	for (long long r = 0; r < repeats; r++) {
		for (size_t t = 0; t < BENCH_N_TYPES; t++) {
			const uint32_t type = bench_types[t];
			const uint64_t row_bytes = skv_wtype_row_bytes(type, BENCH_ROW);
			double t0 = bench_cpu_now();
			for (uint64_t row = 0; row < n / BENCH_ROW; row++)
				if (skv_quant_row(type, weights + row * BENCH_ROW,
						  packed + row * row_bytes, BENCH_ROW))
					bench_die("skv_quant_row failed for %s", skv_wtype_name(type));
			double t1 = bench_cpu_now();
			for (uint64_t row = 0; row < n / BENCH_ROW; row++)
				if (skv_dequant_row(type, packed + row * row_bytes,
						    restored + row * BENCH_ROW, BENCH_ROW))
					bench_die("skv_dequant_row failed for %s", skv_wtype_name(type));
			double t2 = bench_cpu_now();
			quant_s[t][r] = t1 - t0;
			dequant_s[t][r] = t2 - t1;
		}
	}

	printf("%llu weights, median of %lld runs, one thread (CPU time)\n",
	       (unsigned long long)n, repeats);
	printf("type   bytes/weight   quantize M/s   dequantize M/s\n");
	for (size_t t = 0; t < BENCH_N_TYPES; t++) {
		const uint32_t type = bench_types[t];
		const double q = bench_median(quant_s[t], (size_t)repeats);
		const double d = bench_median(dequant_s[t], (size_t)repeats);
		printf("%-6s %12.4f %14.1f %16.1f\n", skv_wtype_name(type),
		       (double)skv_wtype_block_bytes(type) / skv_wtype_block_elems(type),
		       (double)n / q / 1e6, (double)n / d / 1e6);
	}
	free(weights);
	free(restored);
	free(packed);
	return 0;
}
