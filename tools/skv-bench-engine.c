/* skv-bench-engine: single-stream speed of the engine, in one process, no daemon.
 *
 *   decode     tokens/s of one stream whose window is full (every step attends to S + W keys)
 *   prefill    tokens/s of feeding a prompt of --prefill tokens in one call (chunked matmuls)
 *   baseline   tokens/s of a plain single-threaded C forward pass (llama2.c-style loops over a
 *              dense cache) at the same cache size, measured in the same run for comparison
 *   sink vs recompute, per cache size: time per token of StreamingLLM (4 sinks + window) and
 *              of sliding window with re-computation over the same number of tokens, and their
 *              ratio; and the peak memory each adds to the process (VmHWM, reset through
 *              /proc/self/clear_refs before each, so one process measures them in turn), with
 *              the KV bytes each holds (the paper's Figure 10)
 *   batch      with --batch B1,B2,..: microseconds per token of B streams at full windows decoding
 *              together, one skv_forward per step (continuous batching as an engine runs it),
 *              against B = 1 in the same run
 * Every figure is the median of --repeats runs, measurements interleaved so that noise from
 * other processes hits all of them alike. Timings are wall clock (CLOCK_MONOTONIC). */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "forward.h"
#include "model.h"
#include "sampler.h"
#include "skv-error.h"
#include "stream.h"
#include "bench-plain.h"
#include "bench-util.h"

#ifndef SKV_MODEL_DIR
#define SKV_MODEL_DIR "models/stories260K"
#endif

#define BENCH_MAX_SIZES 16
#define BENCH_STEP_ROWS 256 /* rows of one engine step (engine/engine-main.c) */

struct bench_opts {
	const char *model_path;
	int repeats;
	int decode_tokens;
	int prefill_tokens;
	int compare_tokens;
	int sizes[BENCH_MAX_SIZES];
	int n_sizes;
	int threads;
	int json;
	int compare_only;  /* only sink vs recompute (a large model's other parts take long) */
	int csv;           /* --csv: the comparison (or --batch) as CSV rows, for plots */
	int batch[BENCH_MAX_SIZES]; /* --batch: stream counts to decode together */
	int n_batch;
	int rec_tokens;    /* recompute steps timed per size (0: compare_tokens / 10, >= 5) */
};

/* Resident and peak resident bytes of this process (/proc/self/status VmRSS, VmHWM). */
static void bench_rss(uint64_t *rss, uint64_t *hwm)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	unsigned long long kib;
	*rss = *hwm = 0;
	while (f && fgets(line, sizeof(line), f)) {
		if (sscanf(line, "VmRSS: %llu kB", &kib) == 1)
			*rss = kib * 1024;
		else if (sscanf(line, "VmHWM: %llu kB", &kib) == 1)
			*hwm = kib * 1024;
	}
	if (f)
		fclose(f);
}

/* Start a peak measurement: VmHWM back to the current RSS (clear_refs "5", Linux >= 4.0).
 * Returns the RSS it starts from. */
static uint64_t bench_peak_start(void)
{
	FILE *f = fopen("/proc/self/clear_refs", "w");
	if (!f || fputs("5", f) < 0 || fclose(f) != 0)
		bench_die("cannot reset the peak RSS through /proc/self/clear_refs");
	uint64_t rss, hwm;
	bench_rss(&rss, &hwm);
	return rss;
}

/* Bytes the peak rose above start since bench_peak_start. */
static uint64_t bench_peak_since(uint64_t start)
{
	uint64_t rss, hwm;
	bench_rss(&rss, &hwm);
	return hwm > start ? hwm - start : 0;
}

/* Deterministic token ids (not BOS), so every run feeds the same text. */
static void bench_tokens(int32_t *ids, size_t n, int32_t vocab, uint64_t seed)
{
	for (size_t i = 0; i < n; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		ids[i] = 3 + (int32_t)((seed >> 33) % (uint64_t)(vocab - 3));
	}
}

static uint32_t bench_kv_dtype = SKV_KV_DTYPE_F32; /* the streams' KV type: --kv's first */
/* --kv's list: --batch measures every type in each repeat, interleaved, side by side. */
static uint32_t bench_kv_dtypes[3] = { SKV_KV_DTYPE_F32 };
static int bench_n_kv = 1;

static struct skv_stream *bench_stream(struct skv_runner *r, enum skv_policy_kind kind,
				       int64_t sinks, int64_t window)
{
	struct skv_policy p;
	char msg[256] = "";
	struct skv_stream *s;
	skv_policy_default(&p);
	p.kind = kind;
	p.kv_dtype = bench_kv_dtype;
	p.sink_slots = sinks;
	p.window_slots = window;
	if (skv_policy_resolve(&p, skv_runner_config(r)->seq_len, msg, sizeof(msg)) < 0 ||
	    skv_stream_new(r, &p, &s, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	return s;
}

static void bench_feed(struct skv_stream *s, const int32_t *ids, size_t n, float *logits)
{
	int err = skv_stream_feed(s, ids, n, logits, NULL);
	if (err < 0)
		bench_die("forward pass failed: %s", skv_strerror(err));
}

/* Seconds per token of `steps` single-token steps on a stream already warmed to full. The
 * next token is the argmax of the last logits, as in greedy decoding. */
static double bench_decode_steps(struct skv_stream *s, int steps, float *logits, int32_t vocab)
{
	double t0 = bench_now();
	for (int i = 0; i < steps; i++) {
		int32_t next = skv_argmax(logits, vocab);
		bench_feed(s, &next, 1, logits);
	}
	return (bench_now() - t0) / steps;
}

static void bench_usage(FILE *out)
{
	fputs("usage: skv-bench-engine [--model PATH] [--repeats N] [--decode-tokens N]\n"
	      "                        [--prefill N] [--compare-tokens N] [--sizes 64,128,256,512]\n"
	      "                        [--threads N] [--json] [--compare-only] [--rec-tokens N]\n"
	      "                        [--batch B1,B2,...] [--kv f32|f16|q8[,...]] [--csv]\n",
	      out);
}

static void bench_parse(int argc, char **argv, struct bench_opts *o)
{
	static const struct option longs[] = {
		{ "model", required_argument, NULL, 'm' },
		{ "repeats", required_argument, NULL, 'r' },
		{ "decode-tokens", required_argument, NULL, 'd' },
		{ "prefill", required_argument, NULL, 'p' },
		{ "compare-tokens", required_argument, NULL, 'c' },
		{ "sizes", required_argument, NULL, 's' },
		{ "threads", required_argument, NULL, 't' },
		{ "json", no_argument, NULL, 'j' },
		{ "compare-only", no_argument, NULL, 'C' },
		{ "rec-tokens", required_argument, NULL, 'R' },
		{ "batch", required_argument, NULL, 'B' },
		{ "kv", required_argument, NULL, 'K' },
		{ "csv", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	static char default_model[4096];
	const char *dir = getenv("SKV_MODEL_DIR");
	snprintf(default_model, sizeof(default_model), "%s/stories260K.bin",
		 dir && *dir ? dir : SKV_MODEL_DIR);
	*o = (struct bench_opts){ .model_path = default_model, .repeats = 7,
				  .decode_tokens = 2000, .prefill_tokens = 512,
				  .compare_tokens = 200, .threads = 1,
				  .sizes = { 64, 128, 256, 512 }, .n_sizes = 4 };
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
		switch (c) {
		case 'm': o->model_path = optarg; break;
		case 'r': o->repeats = (int)bench_parse_int("--repeats", optarg, 1, 1000); break;
		case 'd': o->decode_tokens = (int)bench_parse_int("--decode-tokens", optarg, 1, 1 << 24); break;
		case 'p': o->prefill_tokens = (int)bench_parse_int("--prefill", optarg, 1, 1 << 20); break;
		case 'c': o->compare_tokens = (int)bench_parse_int("--compare-tokens", optarg, 1, 1 << 20); break;
		case 't': o->threads = (int)bench_parse_int("--threads", optarg, 1, 256); break;
		case 'j': o->json = 1; break;
		case 'C': o->compare_only = 1; break;
		case 'V': o->csv = 1; break;
		case 'K': {
			bench_n_kv = 0;
			char *save = NULL, *list = strdup(optarg);
			for (char *tok = strtok_r(list, ",", &save); tok;
			     tok = strtok_r(NULL, ",", &save)) {
				uint32_t dt;
				if (!strcmp(tok, "f32"))
					dt = SKV_KV_DTYPE_F32;
				else if (!strcmp(tok, "f16"))
					dt = SKV_KV_DTYPE_F16;
				else if (!strcmp(tok, "q8"))
					dt = SKV_KV_DTYPE_Q8;
				else
					bench_die("--kv: '%s' is not f32, f16 or q8", tok);
				if (bench_n_kv == 3)
					bench_die("--kv: at most 3 types");
				bench_kv_dtypes[bench_n_kv++] = dt;
			}
			free(list);
			if (!bench_n_kv)
				bench_die("--kv: empty list");
			bench_kv_dtype = bench_kv_dtypes[0];
			break;
		}
		case 'B': {
			o->n_batch = 0;
			char *list = optarg, *tok, *save = NULL;
			while ((tok = strtok_r(list, ",", &save))) {
				list = NULL;
				if (o->n_batch == BENCH_MAX_SIZES)
					bench_die("--batch: at most %d counts", BENCH_MAX_SIZES);
				o->batch[o->n_batch++] = (int)bench_parse_int("--batch", tok, 1, 4096);
			}
			break;
		}
		case 'R': o->rec_tokens = (int)bench_parse_int("--rec-tokens", optarg, 1, 1 << 20); break;
		case 's': {
			o->n_sizes = 0;
			char *list = optarg, *tok, *save = NULL;
			while ((tok = strtok_r(list, ",", &save))) {
				list = NULL;
				if (o->n_sizes == BENCH_MAX_SIZES)
					bench_die("--sizes: at most %d sizes", BENCH_MAX_SIZES);
				o->sizes[o->n_sizes++] = (int)bench_parse_int("--sizes", tok, 8, 1 << 20);
			}
			if (!o->n_sizes)
				bench_die("--sizes: give a comma-separated list such as 64,128");
			break;
		}
		case 'h': bench_usage(stdout); exit(0);
		default:
			bench_usage(stderr);
			bench_die("unknown or incomplete flag '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc)
		bench_die("unexpected argument '%s'", argv[optind]);
}

/* --batch: B streams at full windows (default sink cache), decoding together: per step one
 * skv_forward over every stream (in runs of the runner's rows), greedy. Seconds per token. */
static double bench_batch(struct skv_runner *runner, int B, int steps, const int32_t *ids,
			  int trained)
{
	int32_t vocab = skv_runner_config(runner)->vocab_size;
	uint32_t max_rows = BENCH_STEP_ROWS; /* as skv-engine's steps hold */
	struct skv_stream **s = calloc((size_t)B, sizeof(*s));
	struct skv_fwd_item *items = calloc(max_rows, sizeof(*items));
	float *logits = malloc((size_t)B * (size_t)vocab * sizeof(float));
	int32_t *next = malloc((size_t)B * sizeof(int32_t));
	if (!s || !items || !logits || !next)
		bench_die("out of memory");
	for (int i = 0; i < B; i++) {
		s[i] = bench_stream(runner, SKV_POLICY_SINK, -1, -1);
		/* Each its own text (an offset into ids), filled past a full window. */
		bench_feed(s[i], ids + i % 16, (size_t)trained, logits + (size_t)i * vocab);
		next[i] = skv_argmax(logits + (size_t)i * vocab, vocab);
	}
	double t0 = bench_now();
	for (int step = 0; step < steps; step++)
		for (int off = 0; off < B; off += (int)max_rows) {
			int nb = B - off < (int)max_rows ? B - off : (int)max_rows;
			for (int i = 0; i < nb; i++)
				skv_stream_item(s[off + i], &next[off + i], 1,
						logits + (size_t)(off + i) * vocab, &items[i]);
			int err = skv_forward(runner, items, (uint32_t)nb);
			if (err < 0)
				bench_die("forward pass failed: %s", skv_strerror(err));
			for (int i = 0; i < nb; i++)
				next[off + i] = skv_argmax(logits + (size_t)(off + i) * vocab, vocab);
		}
	double per_token = (bench_now() - t0) / ((double)steps * B);
	for (int i = 0; i < B; i++)
		skv_stream_free(s[i]);
	free(s);
	free(items);
	free(logits);
	free(next);
	return per_token;
}

int main(int argc, char **argv)
{
	struct bench_opts o;
	bench_parse(argc, argv, &o);
	char msg[512] = "";
	struct skv_model *model;
	struct skv_runner *runner;
	if (skv_model_open(o.model_path, &model, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	if (skv_runner_new(model, 512, (uint32_t)o.threads, &runner, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	const struct skv_model_config *c = &model->cfg;
	int32_t vocab = c->vocab_size;
	int trained = c->seq_len > 0 ? c->seq_len : 512;
	int max_size = trained;
	for (int i = 0; i < o.n_sizes; i++)
		max_size = o.sizes[i] > max_size ? o.sizes[i] : max_size;
	size_t n_ids = (size_t)max_size * 2 + (size_t)o.prefill_tokens + 16;
	int32_t *ids = malloc(n_ids * sizeof(int32_t));
	float *logits = malloc((size_t)vocab * sizeof(float));
	double *decode = calloc((size_t)o.repeats, sizeof(double));
	double *prefill = calloc((size_t)o.repeats, sizeof(double));
	double *naive = calloc((size_t)o.repeats, sizeof(double));
	double *sink_t = calloc((size_t)o.repeats * o.n_sizes, sizeof(double));
	double *rec_t = calloc((size_t)o.repeats * o.n_sizes, sizeof(double));
	double *sink_m = calloc((size_t)o.repeats * o.n_sizes, sizeof(double));
	double *rec_m = calloc((size_t)o.repeats * o.n_sizes, sizeof(double));
	uint64_t *sink_kv = calloc((size_t)o.n_sizes, sizeof(uint64_t));
	uint64_t *rec_kv = calloc((size_t)o.n_sizes, sizeof(uint64_t));
	if (!ids || !logits || !decode || !prefill || !naive || !sink_t || !rec_t || !sink_m ||
	    !rec_m || !sink_kv || !rec_kv)
		bench_die("out of memory");
	bench_tokens(ids, n_ids, vocab, 42);

	if (o.n_batch) {
		/* Only the batch measurement: every count and KV type in each repeat, interleaved. */
		int nk = bench_n_kv;
		double *bt = calloc((size_t)o.repeats * o.n_batch * nk, sizeof(double));
		if (!bt)
			bench_die("out of memory");
		for (int r = 0; r < o.repeats; r++)
			for (int bi = 0; bi < o.n_batch; bi++)
				for (int ki = 0; ki < nk; ki++) {
					int B = o.batch[bi];
					int steps = 20000 / B > 5 ? 20000 / B : 5;
					bench_kv_dtype = bench_kv_dtypes[ki];
					bt[(bi * nk + ki) * o.repeats + r] =
						bench_batch(runner, B, steps, ids, trained);
				}
		if (o.csv)
			printf(nk > 1 ? "streams,kv,us_per_token,tokens_per_s,vs_first\n"
				      : "streams,us_per_token,tokens_per_s,vs_first\n");
		else if (!o.json)
			printf("model %s, %d thread(s), median of %d; streams at full windows "
			       "(4 + %d), one forward pass per step\n\n%-8s %-4s %14s %16s %10s\n",
			       o.model_path, o.threads, o.repeats, trained - 4, "streams", "kv",
			       "us/token", "tokens/s", "vs first");
		else
			printf("{\"model\": \"%s\", \"threads\": %d, \"repeats\": %d, "
			       "\"batch\": [", o.model_path, o.threads, o.repeats);
		for (int bi = 0; bi < o.n_batch; bi++)
			for (int ki = 0; ki < nk; ki++) {
				/* "vs first": against the first count with the same KV type. */
				double t = bench_median(bt + (bi * nk + ki) * o.repeats,
							(size_t)o.repeats);
				double one = bench_median(bt + ki * o.repeats, (size_t)o.repeats);
				const char *kv = skv_kv_dtype_name(bench_kv_dtypes[ki]);
				if (o.csv && nk > 1)
					printf("%d,%s,%.3f,%.1f,%.3f\n", o.batch[bi], kv, t * 1e6,
					       1.0 / t, one / t);
				else if (o.csv)
					printf("%d,%.3f,%.1f,%.3f\n", o.batch[bi], t * 1e6, 1.0 / t,
					       one / t);
				else if (o.json)
					printf("%s{\"streams\": %d, \"kv\": \"%s\", "
					       "\"s_per_token\": %.9f, \"tokens_per_s\": %.1f}",
					       bi || ki ? ", " : "", o.batch[bi], kv, t, 1.0 / t);
				else
					printf("%-8d %-4s %14.2f %16.0f %9.2fx\n", o.batch[bi], kv,
					       t * 1e6, 1.0 / t, one / t);
			}
		if (o.json && !o.csv)
			printf("]}\n");
		free(bt);
		free(ids);
		free(logits);
		skv_runner_free(runner);
		skv_model_close(model);
		return 0;
	}

	/* Decode with a full window: sink policy at its defaults. */
	struct skv_stream *dec = NULL;
	struct naive nv = { 0 };
	int naive_steps = trained / 8;
	if (!o.compare_only) {
		dec = bench_stream(runner, SKV_POLICY_SINK, -1, -1);
		bench_feed(dec, ids, (size_t)trained, logits);
		if (naive_init(&nv, model, trained) < 0)
			bench_die("out of memory");
	}

	/* A warm-up of both kinds first: the first use of each matmul shape creates its oneDNN
	 * primitive and scratch, which must not count as the first stream's memory or time. */
	for (int si = 0; si < o.n_sizes; si++)
		for (int kind = 0; kind < 2; kind++) {
			int size = o.sizes[si];
			struct skv_stream *w =
				kind ? bench_stream(runner, SKV_POLICY_RECOMPUTE, -1, size)
				     : bench_stream(runner, SKV_POLICY_SINK, 4, size - 4);
			bench_feed(w, ids, (size_t)size, logits);
			bench_decode_steps(w, 1, logits, vocab);
			skv_stream_free(w);
		}

	for (int r = 0; r < o.repeats; r++) {
		if (o.compare_only)
			goto compare;
		decode[r] = 1.0 / bench_decode_steps(dec, o.decode_tokens, logits, vocab);

		struct skv_stream *pre = bench_stream(runner, SKV_POLICY_SINK, -1,
						      o.prefill_tokens > trained ? o.prefill_tokens
										 : -1);
		double t0 = bench_now();
		bench_feed(pre, ids, (size_t)o.prefill_tokens, logits);
		prefill[r] = o.prefill_tokens / (bench_now() - t0);
		skv_stream_free(pre);

		/* The baseline's last steps attend to nearly a full cache, as decode does. */
		for (int p = 0; p < trained - naive_steps; p++)
			naive_forward(&nv, ids[p], p);
		t0 = bench_now();
		for (int p = trained - naive_steps; p < trained; p++)
			naive_forward(&nv, ids[p], p);
		naive[r] = naive_steps / (bench_now() - t0);

compare:
		/* One after the other, each from a reset peak: what a stream of each kind adds to
		 * the process (its KV, its history, the pages it touches), then freed. */
		for (int si = 0; si < o.n_sizes; si++) {
			int size = o.sizes[si];
			uint64_t base = bench_peak_start();
			struct skv_stream *sk = bench_stream(runner, SKV_POLICY_SINK, 4, size - 4);
			bench_feed(sk, ids, (size_t)size, logits);
			sink_t[si * o.repeats + r] =
				bench_decode_steps(sk, o.compare_tokens, logits, vocab);
			sink_m[si * o.repeats + r] = (double)bench_peak_since(base);
			sink_kv[si] = skv_stream_kv_bytes(sk);
			skv_stream_free(sk);

			base = bench_peak_start();
			struct skv_stream *rc = bench_stream(runner, SKV_POLICY_RECOMPUTE, -1, size);
			bench_feed(rc, ids, (size_t)size, logits);
			int rec_steps = o.rec_tokens ? o.rec_tokens
				      : o.compare_tokens / 10 > 5 ? o.compare_tokens / 10 : 5;
			rec_t[si * o.repeats + r] = bench_decode_steps(rc, rec_steps, logits, vocab);
			rec_m[si * o.repeats + r] = (double)bench_peak_since(base);
			rec_kv[si] = skv_stream_kv_bytes(rc);
			skv_stream_free(rc);
		}
	}

	double dec_med = bench_median(decode, (size_t)o.repeats);
	double pre_med = bench_median(prefill, (size_t)o.repeats);
	double naive_med = bench_median(naive, (size_t)o.repeats);
	const char *impl1 = skv_runner_impl(runner, 1);
	if (o.csv) {
		printf("cache,sink_us_per_token,recompute_us_per_token,speedup,sink_peak_bytes,"
		       "recompute_peak_bytes,sink_kv_bytes,recompute_kv_bytes\n");
		for (int si = 0; si < o.n_sizes; si++) {
			double st = bench_median(sink_t + si * o.repeats, (size_t)o.repeats);
			double rt = bench_median(rec_t + si * o.repeats, (size_t)o.repeats);
			printf("%d,%.3f,%.3f,%.3f,%.0f,%.0f,%llu,%llu\n", o.sizes[si], st * 1e6,
			       rt * 1e6, rt / st,
			       bench_median(sink_m + si * o.repeats, (size_t)o.repeats),
			       bench_median(rec_m + si * o.repeats, (size_t)o.repeats),
			       (unsigned long long)sink_kv[si], (unsigned long long)rec_kv[si]);
		}
	} else if (o.json) {
		printf("{\"model\": \"%s\", \"dim\": %d, \"layers\": %d, \"threads\": %d, "
		       "\"repeats\": %d, \"matmul_impl\": \"%s\", ",
		       o.model_path, c->dim, c->n_layers, o.threads, o.repeats, impl1 ? impl1 : "?");
		if (!o.compare_only)
			printf("\"decode_tokens_per_s\": %.1f, \"decode_cache_tokens\": %d, "
			       "\"prefill_tokens_per_s\": %.1f, \"prefill_tokens\": %d, "
			       "\"plain_c_tokens_per_s\": %.1f, ",
			       dec_med, trained, pre_med, o.prefill_tokens, naive_med);
		printf("\"sink_vs_recompute\": [");
		for (int si = 0; si < o.n_sizes; si++) {
			double st = bench_median(sink_t + si * o.repeats, (size_t)o.repeats);
			double rt = bench_median(rec_t + si * o.repeats, (size_t)o.repeats);
			printf("%s{\"cache\": %d, \"sink_s_per_token\": %.9f, "
			       "\"recompute_s_per_token\": %.9f, \"speedup\": %.2f, "
			       "\"sink_peak_bytes\": %.0f, \"recompute_peak_bytes\": %.0f, "
			       "\"sink_kv_bytes\": %llu, \"recompute_kv_bytes\": %llu}",
			       si ? ", " : "", o.sizes[si], st, rt, rt / st,
			       bench_median(sink_m + si * o.repeats, (size_t)o.repeats),
			       bench_median(rec_m + si * o.repeats, (size_t)o.repeats),
			       (unsigned long long)sink_kv[si], (unsigned long long)rec_kv[si]);
		}
		printf("]}\n");
	} else {
		printf("model %s (dim %d, %d layers, %d heads, %d kv heads, vocab %d), %d thread(s), "
		       "median of %d\n",
		       o.model_path, c->dim, c->n_layers, c->n_heads, c->n_kv_heads, vocab,
		       o.threads, o.repeats);
		printf("matmul implementation (M=1): %s\n\n", impl1 ? impl1 : "?");
		if (!o.compare_only) {
			printf("%-44s %12s\n", "measurement", "tokens/s");
			printf("%-44s %12.0f\n", "decode, full window (4 sinks + 508)", dec_med);
			printf("%-44s %12.0f\n", "plain C (llama2.c loops), cache ~512", naive_med);
			printf("%-44s %12.0f\n\n", "prefill (one call)", pre_med);
		}
		printf("%-8s %16s %20s %10s %12s %12s\n", "cache", "sink us/token",
		       "recompute us/token", "speed-up", "sink MiB", "recomp. MiB");
		for (int si = 0; si < o.n_sizes; si++) {
			double st = bench_median(sink_t + si * o.repeats, (size_t)o.repeats);
			double rt = bench_median(rec_t + si * o.repeats, (size_t)o.repeats);
			printf("%-8d %16.1f %20.1f %9.1fx %12.2f %12.2f\n", o.sizes[si], st * 1e6,
			       rt * 1e6, rt / st,
			       bench_median(sink_m + si * o.repeats, (size_t)o.repeats) / 1048576.0,
			       bench_median(rec_m + si * o.repeats, (size_t)o.repeats) / 1048576.0);
		}
		printf("(MiB: peak resident memory a stream adds to the process while it runs)\n");
	}

	if (!o.compare_only)
		naive_free(&nv);
	skv_stream_free(dec);
	free(sink_m);
	free(rec_m);
	free(sink_kv);
	free(rec_kv);
	free(ids);
	free(logits);
	free(decode);
	free(prefill);
	free(naive);
	free(sink_t);
	free(rec_t);
	skv_runner_free(runner);
	skv_model_close(model);
	return 0;
}
