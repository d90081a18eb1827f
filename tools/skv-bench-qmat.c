/* skv-bench-qmat: the quantized matrix-product kernels (engine/qmatmul.h) against the machine's
 * bounds, and oneDNN's f32 matmul (engine/linear.h) at the same shapes.
 *
 * Measures, in one run:
 *  - memory read bandwidth with 1 and 2 threads: a buffer of --pool-mb (default 2048 MiB,
 *    far larger than the last-level cache) summed with 64-byte loads, median of --repeats;
 *  - the compute peak per thread count: cores x GHz x MACs per cycle, each factor measured: the
 *    clock by a chain of dependent adds (1 cycle each), the MACs per cycle by 12 independent
 *    chains of vpdpbusd zmm (64 int8 MACs each) and of vfmadd231ps zmm (16 f32 MACs);
 *  - each weight type at the matrices of a Llama-1B layer (2048x2048 q/o, 5632x2048 gate/up,
 *    2048x5632 down; 256x2048 k/v are the same per byte) and a 7B layer (4096x4096,
 *    11008x4096, 4096x11008): one row of x (decode) over a pool of copies of the matrix as
 *    large as --pool-mb, so that every weight comes from memory: GB/s of weight bytes and % of
 *    the measured bandwidth; 16 and 64 rows (batched) on one matrix: GMAC/s and % of the
 *    compute peak of the instruction the kernel is built on (vpdpbusd for the quantized types,
 *    FMA for F32/F16/BF16);
 *  - oneDNN f32 (skv_linear_run on the transposed [in][out] weight) and the engine's F32 panel
 *    kernels (engine/pmat.h, the weight packed in panels of 64 columns) at the same points.
 * Medians of --repeats. --json prints one JSON object. */
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench-util.h"
#include "linear.h"
#include "pmat.h"
#include "qmatmul.h"
#include "quant.h"

#define MAX_POINTS 1024

struct opts {
	long long types[16];
	size_t n_types;
	int shape_1b, shape_7b;
	long long rows[8];
	size_t n_rows;
	long long threads[4];
	size_t n_threads;
	int repeats;
	size_t pool_bytes;
	int onednn, panels;
	int compare;
	int json;
};

struct point {
	const char *shape, *matrix, *type, *impl;
	uint32_t out, in, m_rows, threads;
	double seconds;    /* per call, median */
	double best;       /* per call, fastest */
	double gbps;       /* weight bytes per second / 1e9, median */
	double gmacs;      /* multiply-accumulates per second / 1e9, median */
	double pct;        /* fastest call against the bound's fastest (see main) */
	double pct_med;    /* median against median */
};

static struct point points[MAX_POINTS];
static size_t n_points;

/* ---------------------------------------------------------------------------------------- */
/* bounds */

static volatile uint64_t sink_u64;

/* Seconds to read bytes from buf with threads threads (64-byte loads, summed). */
static double read_once(const uint8_t *buf, size_t bytes, int threads)
{
	typedef uint64_t v8 __attribute__((vector_size(64)));
	uint64_t total = 0;
	double t0 = bench_now();
#pragma omp parallel num_threads(threads) reduction(+ : total)
	{
		int t = omp_get_thread_num(), n = omp_get_num_threads();
		size_t lo = bytes / 256 * t / n * 256, hi = bytes / 256 * (t + 1) / n * 256;
		v8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
		for (size_t o = lo; o + 256 <= hi; o += 256) {
			/* as the kernels' row path does: requests a few KB ahead */
			__builtin_prefetch(buf + o + 2048, 0, 3);
			__builtin_prefetch(buf + o + 2048 + 64, 0, 3);
			__builtin_prefetch(buf + o + 2048 + 128, 0, 3);
			__builtin_prefetch(buf + o + 2048 + 192, 0, 3);
			a0 += *(const v8 *)(buf + o);
			a1 += *(const v8 *)(buf + o + 64);
			a2 += *(const v8 *)(buf + o + 128);
			a3 += *(const v8 *)(buf + o + 192);
		}
		v8 s = a0 + a1 + a2 + a3;
		for (int i = 0; i < 8; i++)
			total += s[i];
	}
	double sec = bench_now() - t0;
	sink_u64 += total;
	return sec;
}

/* The read bandwidth of the whole buffer, median of repeats. */
static double read_bandwidth(const uint8_t *buf, size_t bytes, int threads, int repeats)
{
	double runs[64];
	for (int rep = 0; rep < repeats; rep++)
		runs[rep] = (double)bytes / read_once(buf, bytes, threads);
	return bench_median(runs, (size_t)repeats);
}

/* The clock: a chain of dependent imul (3 cycles each on every x86 core of the last decade;
 * an add chain is not a clock on cores that fold dependent adds of immediates), best of many
 * short runs so that a busy machine does not slow it down. */
static double clock_ghz(void)
{
	const uint64_t iters = 100000;
	double best = 1e30;
	for (int rep = 0; rep < 300; rep++) {
		uint64_t v = 3, n = iters;
		double t0 = bench_now();
		__asm__ volatile("1:\n\t"
				 "imul %0, %0\n\t"
				 "imul %0, %0\n\t"
				 "imul %0, %0\n\t"
				 "imul %0, %0\n\t"
				 "dec %1\n\t"
				 "jnz 1b\n\t"
				 : "+r"(v), "+r"(n)
				 :
				 : "cc");
		double s = bench_now() - t0;
		sink_u64 += v;
		if (s < best)
			best = s;
	}
	return 12.0 * (double)iters / best / 1e9;
}

#define PEAK_CHAINS(op)                                                                      \
	op " %%zmm14, %%zmm15, %%zmm0\n\t" op " %%zmm14, %%zmm15, %%zmm1\n\t" op                \
	   " %%zmm14, %%zmm15, %%zmm2\n\t" op " %%zmm14, %%zmm15, %%zmm3\n\t" op                \
	   " %%zmm14, %%zmm15, %%zmm4\n\t" op " %%zmm14, %%zmm15, %%zmm5\n\t" op                \
	   " %%zmm14, %%zmm15, %%zmm6\n\t" op " %%zmm14, %%zmm15, %%zmm7\n\t" op                \
	   " %%zmm14, %%zmm15, %%zmm8\n\t" op " %%zmm14, %%zmm15, %%zmm9\n\t" op                \
	   " %%zmm14, %%zmm15, %%zmm10\n\t" op " %%zmm14, %%zmm15, %%zmm11\n\t"

__attribute__((target("avx512f,avx512vnni"))) static void peak_loop(int vnni, uint64_t iters)
{
	if (vnni)
		__asm__ volatile("vpxord %%zmm14, %%zmm14, %%zmm14\n\t"
				 "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"
				 "1:\n\t" PEAK_CHAINS("vpdpbusd") "dec %0\n\t"
				 "jnz 1b\n\t"
				 : "+r"(iters)
				 :
				 : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
				   "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm14", "xmm15");
	else
		__asm__ volatile("vpxord %%zmm14, %%zmm14, %%zmm14\n\t"
				 "vpxord %%zmm15, %%zmm15, %%zmm15\n\t"
				 "1:\n\t" PEAK_CHAINS("vfmadd231ps") "dec %0\n\t"
				 "jnz 1b\n\t"
				 : "+r"(iters)
				 :
				 : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
				   "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm14", "xmm15");
}

/* MACs per second of all threads: 12 instructions x (64 int8 | 16 f32) MACs per iteration,
 * each thread's best of many short runs, summed. */
static double peak_macs(int vnni, int threads)
{
	const uint64_t iters = 50000;
	double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
	{
		double best = 1e30;
		for (int rep = 0; rep < 200; rep++) {
			double t0 = bench_now();
			peak_loop(vnni, iters);
			double s = bench_now() - t0;
			if (s < best)
				best = s;
		}
		total += (double)iters * 12 * (vnni ? 64 : 16) / best;
	}
	return total;
}

/* ---------------------------------------------------------------------------------------- */
/* matrices */

/* A pool of copies of one [rows][cols] matrix of type (rows of random floats quantized by
 * quant.c, 16 distinct rows repeated), at least pool_bytes in all. */
static uint8_t *make_pool(uint32_t type, uint32_t rows, uint32_t cols, size_t pool_bytes,
			  size_t *copies, uint64_t *row_bytes)
{
	uint64_t rb = skv_wtype_row_bytes(type, cols);
	if (!rb)
		bench_die("type %s cannot hold %u columns", skv_wtype_name(type), cols);
	size_t mat = rb * rows;
	size_t n = pool_bytes / mat + 1;
	if (n < 2)
		n = 2;
	uint8_t *p = NULL;
	if (posix_memalign((void **)&p, 4096, mat * n))
		bench_die("out of memory for a %zu-byte pool", mat * n);
	float *src = malloc(sizeof(float) * cols);
	for (uint32_t r = 0; r < 16 && r < rows; r++) {
		for (uint32_t c = 0; c < cols; c++)
			src[c] = (float)((rand() % 20001) - 10000) / 10000.f * 0.05f;
		if (type == SKV_WTYPE_F32)
			memcpy(p + r * rb, src, rb);
		else if (skv_quant_row(type, src, p + r * rb, cols) < 0)
			bench_die("quantizing to %s failed", skv_wtype_name(type));
	}
	for (uint32_t r = 16; r < rows; r++)
		memcpy(p + r * rb, p + (r % 16) * rb, rb);
	for (size_t i = 1; i < n; i++)
		memcpy(p + i * mat, p, mat);
	free(src);
	*copies = n;
	*row_bytes = rb;
	return p;
}

static float *make_x(uint32_t m_rows, uint32_t cols)
{
	float *x = malloc(sizeof(float) * m_rows * cols);
	for (size_t i = 0; i < (size_t)m_rows * cols; i++)
		x[i] = (float)((rand() % 20001) - 10000) / 10000.f;
	return x;
}

static void add_point(struct point p)
{
	if (n_points < MAX_POINTS)
		points[n_points++] = p;
}

struct shape {
	const char *shape, *matrix;
	uint32_t out, in;
};

static const struct shape shapes[] = {
	{ "1b", "q/o 2048x2048", 2048, 2048 },
	{ "1b", "gate/up 5632x2048", 5632, 2048 },
	{ "1b", "down 2048x5632", 2048, 5632 },
	{ "7b", "q/o 4096x4096", 4096, 4096 },
	{ "7b", "gate/up 11008x4096", 11008, 4096 },
	{ "7b", "down 4096x11008", 4096, 11008 },
};

static double bw_bound[3], peak_int8[3], peak_f32[3];
static int have_vnni;

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Median and minimum of n per-call times (sorted in place). */
static void stats(double *t, size_t n, double *med, double *min)
{
	qsort(t, n, sizeof(*t), cmp_d);
	*min = t[0];
	*med = n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

typedef void run_fn(void *ctx, size_t copy, uint32_t m);

/* One point: m = 1 times every call over a sweep of the pool (each matrix from memory) per
 * repeat, and the plain read of the same copies; m > 1 times calls on copy 0 (in cache) and
 * the instruction peak. */
static struct point measure(const struct opts *o, const struct shape *sh, const char *type,
			    const char *impl, const uint8_t *pool, size_t mat, size_t copies,
			    uint32_t m, uint32_t th, int is_float, run_fn *run, void *ctx)
{
	size_t cap = (size_t)o->repeats * (copies > 64 ? copies : 64);
	double *t = malloc(sizeof(double) * cap), *rd = malloc(sizeof(double) * cap);
	size_t n = 0, nr = 0;
	double macs = (double)sh->out * sh->in * m;
	run(ctx, 0, m); /* warm-up: primitives, scratch */
	for (int rep = 0; rep < o->repeats; rep++) {
		if (m == 1) {
			for (size_t i = 0; i < copies; i++) {
				double t0 = bench_now();
				run(ctx, i, m);
				t[n++] = bench_now() - t0;
			}
			for (size_t i = 0; i < copies; i++)
				rd[nr++] = read_once(pool + i * mat, mat, (int)th);
		} else {
			int calls = (int)(1e9 / macs) + 3;
			for (int c = 0; c < calls && n < cap; c++) {
				double t0 = bench_now();
				run(ctx, 0, m);
				t[n++] = bench_now() - t0;
			}
		}
	}
	double med, best;
	stats(t, n, &med, &best);
	struct point p = { sh->shape, sh->matrix, type, impl, sh->out, sh->in, m, th, med, best,
			   (double)mat / med / 1e9, macs / med / 1e9, 0, 0 };
	if (m == 1) {
		double rmed, rbest;
		stats(rd, nr, &rmed, &rbest);
		p.pct = 100.0 * rbest / best;
		p.pct_med = 100.0 * rmed / med;
	} else {
		double peak = is_float ? peak_f32[th] : peak_int8[th];
		if (peak > 0) {
			p.pct = 100.0 * macs / best / peak;
			p.pct_med = 100.0 * macs / med / peak;
		}
	}
	free(t);
	free(rd);
	return p;
}

/* The most rows of x any point asks for. */
static uint32_t max_rows(const struct opts *o)
{
	uint32_t max_m = 1;
	for (size_t i = 0; i < o->n_rows; i++)
		if ((uint32_t)o->rows[i] > max_m)
			max_m = (uint32_t)o->rows[i];
	return max_m;
}

struct qrun {
	struct skv_qctx *ctx;
	struct skv_qmat w;
	const uint8_t *pool;
	size_t mat;
	const float *x;
	float *y;
};

static void qrun(void *arg, size_t copy, uint32_t m)
{
	struct qrun *q = arg;
	q->w.data = q->pool + copy * q->mat;
	const struct skv_qmat *wp = &q->w;
	size_t ld = q->w.rows;
	if (skv_qmat_run(q->ctx, &wp, 1, m, q->x, q->w.cols, &q->y, &ld, 0) < 0)
		bench_die("skv_qmat_run failed");
}

static void bench_qmat(const struct opts *o, const struct shape *sh, uint32_t type)
{
	size_t copies;
	uint64_t rb;
	uint8_t *pool = make_pool(type, sh->out, sh->in, o->pool_bytes, &copies, &rb);
	size_t mat = rb * sh->out;
	uint32_t max_m = max_rows(o);
	float *x = make_x(max_m, sh->in);
	float *y = malloc(sizeof(float) * max_m * sh->out);
	struct skv_qctx *ctx;
	if (skv_qctx_new(max_m, sh->in, 1, &ctx) < 0)
		bench_die("skv_qctx_new failed");
	int is_float = type == SKV_WTYPE_F32 || type == SKV_WTYPE_F16 || type == SKV_WTYPE_BF16;
	struct qrun q = { ctx, { type, sh->out, sh->in, rb, pool }, pool, mat, x, y };
	for (size_t ti = 0; ti < o->n_threads; ti++) {
		uint32_t th = (uint32_t)o->threads[ti];
		skv_qctx_set_threads(ctx, th);
		for (size_t ri = 0; ri < o->n_rows; ri++) {
			skv_qctx_set_decode(ctx, "tiles");
			add_point(measure(o, sh, skv_wtype_name(type), skv_qctx_isa(ctx), pool, mat,
					  copies, (uint32_t)o->rows[ri], th, is_float, qrun, &q));
			if (o->compare) {
				/* the previous kernels at the same point, right after */
				skv_qctx_set_decode(ctx, "rows");
				add_point(measure(o, sh, skv_wtype_name(type), "previous", pool, mat,
						  copies, (uint32_t)o->rows[ri], th, is_float, qrun, &q));
			}
			if (!o->json)
				fprintf(stderr, ".");
		}
	}
	skv_qctx_free(ctx);
	free(y);
	free(x);
	free(pool);
}

struct drun {
	struct skv_backend *be;
	struct skv_linear *lins;
	const float *x;
	float *y;
};

static void drun(void *arg, size_t copy, uint32_t m)
{
	struct drun *d = arg;
	if (skv_linear_run(d->be, &d->lins[copy], m, d->x, d->y) < 0)
		bench_die("skv_linear_run failed");
}

static void bench_onednn(const struct opts *o, const struct shape *sh)
{
	uint32_t max_m = max_rows(o);
	size_t mat = (size_t)sh->out * sh->in * sizeof(float);
	size_t copies = o->pool_bytes / mat + 1;
	if (copies < 2)
		copies = 2;
	float *pool = NULL;
	if (posix_memalign((void **)&pool, 4096, mat * copies))
		bench_die("out of memory for the oneDNN pool");
	for (size_t i = 0; i < (size_t)sh->out * sh->in; i++)
		pool[i] = (float)((rand() % 20001) - 10000) / 200000.f;
	for (size_t i = 1; i < copies; i++)
		memcpy((uint8_t *)pool + i * mat, pool, mat);
	float *x = make_x(max_m, sh->in);
	float *y = malloc(sizeof(float) * max_m * sh->out);
	for (size_t ti = 0; ti < o->n_threads; ti++) {
		uint32_t th = (uint32_t)o->threads[ti];
		struct skv_backend *be;
		char msg[256];
		if (skv_backend_new(max_m, th, &be, msg, sizeof(msg)) < 0)
			bench_die("oneDNN: %s", msg);
		struct skv_linear *lins = calloc(copies, sizeof(*lins));
		for (size_t i = 0; i < copies; i++)
			if (skv_linear_init(be, &lins[i], (const float *)((const uint8_t *)pool + i * mat),
					    sh->in, sh->out, SKV_LINEAR_PLAIN) < 0)
				bench_die("oneDNN linear init failed");
		struct drun d = { be, lins, x, y };
		for (size_t ri = 0; ri < o->n_rows; ri++) {
			uint32_t m = (uint32_t)o->rows[ri];
			add_point(measure(o, sh, "F32", "oneDNN", (const uint8_t *)pool, mat, copies, m,
					  th, 1, drun, &d));
			if (!o->json)
				fprintf(stderr, ".");
		}
		for (size_t i = 0; i < copies; i++)
			skv_linear_fini(&lins[i]);
		free(lins);
		skv_backend_free(be);
	}
	free(y);
	free(x);
	free(pool);
}

struct prun {
	struct skv_pctx *ctx;
	const float *pool;
	size_t mat_floats;
	uint32_t in, out;
	const float *x;
	float *y;
};

static void prun(void *arg, size_t copy, uint32_t m)
{
	struct prun *p = arg;
	if (skv_pmat_run(p->ctx, p->pool + copy * p->mat_floats, p->in, p->out, m, p->x, p->in,
			 p->y, p->out, 0) < 0)
		bench_die("skv_pmat_run failed");
}

static void bench_panels(const struct opts *o, const struct shape *sh)
{
	uint32_t max_m = max_rows(o);
	size_t mat_floats = skv_pmat_floats(sh->in, sh->out), mat = mat_floats * sizeof(float);
	size_t copies = o->pool_bytes / mat + 1;
	if (copies < 2)
		copies = 2;
	float *w = malloc((size_t)sh->out * sh->in * sizeof(float)), *pool = NULL;
	if (!w || posix_memalign((void **)&pool, 4096, mat * copies))
		bench_die("out of memory for the panel pool");
	for (size_t i = 0; i < (size_t)sh->out * sh->in; i++)
		w[i] = (float)((rand() % 20001) - 10000) / 200000.f;
	skv_pmat_pack(pool, sh->in, sh->out, 0, w, sh->out);
	free(w);
	for (size_t i = 1; i < copies; i++)
		memcpy((uint8_t *)pool + i * mat, pool, mat);
	float *x = make_x(max_m, sh->in);
	float *y = malloc(sizeof(float) * max_m * sh->out);
	struct skv_pctx *ctx;
	if (skv_pctx_new(max_m, 1, &ctx) < 0)
		bench_die("skv_pctx_new failed");
	struct prun p = { ctx, pool, mat_floats, sh->in, sh->out, x, y };
	for (size_t ti = 0; ti < o->n_threads; ti++) {
		uint32_t th = (uint32_t)o->threads[ti];
		skv_pctx_set_threads(ctx, th);
		for (size_t ri = 0; ri < o->n_rows; ri++) {
			add_point(measure(o, sh, "F32", "panels", (const uint8_t *)pool, mat, copies,
					  (uint32_t)o->rows[ri], th, 1, prun, &p));
			if (!o->json)
				fprintf(stderr, ".");
		}
	}
	skv_pctx_free(ctx);
	free(y);
	free(x);
	free(pool);
}

/* ---------------------------------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f, "usage: skv-bench-qmat [--types f16,bf16,q8_0,q4_0,q4_k,q5_k,q6_k,f32]\n"
		   "                      [--shapes 1b,7b] [--rows 1,16,64] [--threads 1,2]\n"
		   "                      [--repeats N] [--pool-mb N] [--no-onednn] [--no-panels]\n"
		   "                      [--compare] [--json]\n");
}

static void parse_types(struct opts *o, const char *text)
{
	char buf[256];
	snprintf(buf, sizeof(buf), "%s", text);
	o->n_types = 0;
	for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		uint32_t t;
		if (skv_wtype_parse(tok, &t) < 0 || o->n_types >= 16)
			bench_die("--types: unknown or too many types at '%s'", tok);
		o->types[o->n_types++] = t;
	}
	if (!o->n_types)
		bench_die("--types: empty list");
}

int main(int argc, char **argv)
{
	struct opts o = { .shape_1b = 1, .shape_7b = 1, .repeats = 5,
			  .pool_bytes = (size_t)2048 << 20, .onednn = 1, .panels = 1 };
	parse_types(&o, "f16,bf16,q8_0,q4_0,q4_k,q5_k,q6_k");
	o.n_rows = bench_parse_list("--rows", "1,16,64", 1, 4096, o.rows, 8);
	o.n_threads = bench_parse_list("--threads", "1,2", 1, 2, o.threads, 4);
	static const struct option longopts[] = {
		{ "types", required_argument, NULL, 't' },
		{ "shapes", required_argument, NULL, 's' },
		{ "rows", required_argument, NULL, 'r' },
		{ "threads", required_argument, NULL, 'T' },
		{ "repeats", required_argument, NULL, 'n' },
		{ "pool-mb", required_argument, NULL, 'p' },
		{ "no-onednn", no_argument, NULL, 'D' },
		{ "no-panels", no_argument, NULL, 'P' },
		{ "compare", no_argument, NULL, 'C' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 't': parse_types(&o, optarg); break;
		case 's':
			o.shape_1b = strstr(optarg, "1b") != NULL;
			o.shape_7b = strstr(optarg, "7b") != NULL;
			if (!o.shape_1b && !o.shape_7b)
				bench_die("--shapes: expected 1b, 7b or 1b,7b");
			break;
		case 'r': o.n_rows = bench_parse_list("--rows", optarg, 1, 4096, o.rows, 8); break;
		case 'T':
			o.n_threads = bench_parse_list("--threads", optarg, 1, 2, o.threads, 4);
			break;
		case 'n': o.repeats = (int)bench_parse_int("--repeats", optarg, 1, 64); break;
		case 'p':
			o.pool_bytes = (size_t)bench_parse_int("--pool-mb", optarg, 16, 65536) << 20;
			break;
		case 'D': o.onednn = 0; break;
		case 'P': o.panels = 0; break;
		case 'C': o.compare = 1; break;
		case 'j': o.json = 1; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 1;
		}
	}
	if (optind < argc)
		bench_die("unexpected argument '%s' (see --help)", argv[optind]);

	__builtin_cpu_init();
	int vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512f");
	have_vnni = vnni;
	double ghz = clock_ghz();
	uint8_t *buf = NULL;
	if (posix_memalign((void **)&buf, 4096, o.pool_bytes))
		bench_die("out of memory for the %zu-byte bandwidth buffer", o.pool_bytes);
	for (size_t i = 0; i < o.pool_bytes; i += 8) {
		uint64_t v = i * 0x9E3779B97F4A7C15ull;
		memcpy(buf + i, &v, 8);
	}
	for (size_t ti = 0; ti < o.n_threads; ti++) {
		int th = (int)o.threads[ti];
		bw_bound[th] = read_bandwidth(buf, o.pool_bytes, th, o.repeats);
		if (vnni) {
			peak_int8[th] = peak_macs(1, th);
			peak_f32[th] = peak_macs(0, th);
		}
	}
	free(buf);

	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
		const struct shape *sh = &shapes[si];
		if ((!strcmp(sh->shape, "1b") && !o.shape_1b) || (!strcmp(sh->shape, "7b") && !o.shape_7b))
			continue;
		for (size_t t = 0; t < o.n_types; t++)
			bench_qmat(&o, sh, (uint32_t)o.types[t]);
		if (o.onednn)
			bench_onednn(&o, sh);
		if (o.panels)
			bench_panels(&o, sh);
	}
	if (!o.json)
		fprintf(stderr, "\n");

	if (o.json) {
		printf("{\"clock_ghz\": %.3f, \"kernels\": \"%s\", \"bounds\": [", ghz,
		       skv_qmat_isa());
		for (size_t ti = 0; ti < o.n_threads; ti++) {
			int th = (int)o.threads[ti];
			printf("%s{\"threads\": %d, \"read_gbps\": %.2f, \"int8_gmacs_peak\": %.1f, "
			       "\"f32_gmacs_peak\": %.1f}",
			       ti ? ", " : "", th, bw_bound[th] / 1e9, peak_int8[th] / 1e9,
			       peak_f32[th] / 1e9);
		}
		printf("], \"points\": [");
		for (size_t i = 0; i < n_points; i++) {
			const struct point *p = &points[i];
			printf("%s\n  {\"shape\": \"%s\", \"matrix\": \"%s\", \"type\": \"%s\", "
			       "\"impl\": \"%s\", \"rows\": %u, \"cols\": %u, \"m_rows\": %u, "
			       "\"threads\": %u, \"us_median\": %.2f, \"us_best\": %.2f, "
			       "\"weight_gbps\": %.3f, \"gmacs\": %.3f, \"pct_of_bound_best\": %.1f, "
			       "\"pct_of_bound_median\": %.1f}",
			       i ? "," : "", p->shape, p->matrix, p->type, p->impl, p->out, p->in,
			       p->m_rows, p->threads, p->seconds * 1e6, p->best * 1e6, p->gbps,
			       p->gmacs, p->pct, p->pct_med);
		}
		printf("\n]}\n");
		return 0;
	}
	printf("clock %.2f GHz (dependent imul); kernels %s\n", ghz, skv_qmat_isa());
	for (size_t ti = 0; ti < o.n_threads; ti++) {
		int th = (int)o.threads[ti];
		printf("threads %d: memory read %.1f GB/s; peak int8 %.0f GMAC/s (vpdpbusd zmm), "
		       "f32 %.0f GMAC/s (FMA zmm)\n",
		       th, bw_bound[th] / 1e9, peak_int8[th] / 1e9, peak_f32[th] / 1e9);
	}
	printf("\n%-3s %-19s %-5s %-11s %3s %2s %9s %9s %8s %8s %7s %7s\n", "", "matrix", "type",
	       "impl", "M", "T", "us med", "us best", "GB/s", "GMAC/s", "%best", "%med");
	for (size_t i = 0; i < n_points; i++) {
		const struct point *p = &points[i];
		printf("%-3s %-19s %-5s %-11s %3u %2u %9.1f %9.1f %8.2f %8.1f %6.1f%% %6.1f%%",
		       p->shape, p->matrix, p->type, p->impl, p->m_rows, p->threads, p->seconds * 1e6,
		       p->best * 1e6, p->gbps, p->gmacs, p->pct, p->pct_med);
		if (i > 0 && !strcmp(p->impl, "previous"))
			printf("  new %.2fx", p->seconds / points[i - 1].seconds);
		printf("\n");
	}
	printf("\nGB/s, GMAC/s: medians of every call. %%best: the fastest call against the bound's\n"
	       "best; %%med: medians against medians. Bound for M = 1: reading the same copies of\n"
	       "the weights (each from memory: the pool is larger than the LLC) with the same\n"
	       "threads, timed per copy right after the kernel's sweep; for M > 1: the best rate\n"
	       "of 12 independent chains of vpdpbusd zmm (quantized types) or vfmadd231ps zmm\n"
	       "(F32, F16, BF16, oneDNN) per thread, times the threads.\n");
	return 0;
}
