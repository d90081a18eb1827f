/* skv-bench-model: the speed of one model file in the engine, next to what the machine allows.
 *
 * For each thread count it measures, in one process and one run:
 *   bandwidth  the machine's memory read bandwidth with that many threads (a buffer far larger
 *              than the last-level cache, streamed with vector loads), median of repeats;
 *   peak       the compute peak of the instructions the matrix products use: int8 VNNI dot
 *              products (vpdpbusd, 64 multiply-adds per instruction) for the block formats,
 *              float32 FMA (16 per instruction) for F32/F16/BF16 and for attention, measured
 *              with independent accumulators in a tight loop, best of three tries;
 *   decode     tokens/s of one stream with a full window (sinks + window), greedy;
 *   prefill    tokens/s of a prompt fed in chunks of 64 (as the engine feeds prompts);
 *   streams    aggregate tokens/s of N streams decoding together at full windows, one forward
 *              pass per step (the engine's continuous batching), for each N of --streams.
 * Next to each figure it prints the bound it is held against:
 *   bandwidth bound = bandwidth / bytes a decode token must read (every weight once, except
 *                     the embedding table of which one row is read, plus the stream's KV);
 *   compute bound   = 1 / (matrix multiply-adds per token / matrix peak + attention
 *                     multiply-adds per token / FMA peak), per token of a batched step.
 * The other streams of a batch are filled by copying the first stream's KV region (a real
 * prefill of one, its bytes duplicated): their attention reads full windows of real KV without
 * prefilling each of them, which would take minutes on a 1B model.
 *
 *   skv-bench-model --model FILE [--threads 1,2] [--streams 1,16,64] [--decode-tokens N]
 *                   [--prefill N] [--repeats N] [--kv f32|f16|q8] [--weights auto|map|huge] [--json]
 */
#include <errno.h>
#include <getopt.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "bench-util.h"
#include "forward.h"
#include "kv-layout.h"
#include "model.h"
#include "qmatmul.h"
#include "sampler.h"
#include "skv-error.h"
#include "stream.h"

#define BM_MAX_LIST 16
#define BM_BW_BYTES (2ull << 30)  /* 2 GiB: far beyond any last-level cache here */
#define BM_PREFILL_CHUNK 64
#define BM_MAX_ROWS 256

struct bm_opts {
	const char *model_path;
	long long threads[BM_MAX_LIST];
	size_t n_threads;
	long long streams[BM_MAX_LIST];
	size_t n_streams;
	int decode_tokens;
	int prefill_tokens;
	int repeats;
	uint32_t kv_dtype;
	enum skv_weights_mem weights; /* --weights */
	int json;
};

/* ---- machine bounds ----------------------------------------------------------------------- */

/* GB/s of reading buf with `threads` threads, each streaming its share with 64-byte loads. */
__attribute__((target("avx512f"))) static double bm_bandwidth_once(const char *buf,
								     size_t bytes, int threads)
{
	volatile double sink = 0;
	double t0 = bench_now();
#pragma omp parallel num_threads(threads)
	{
		int t = omp_get_thread_num(), n = omp_get_num_threads();
		size_t per = bytes / (size_t)n / 256 * 256;
		const char *p = buf + per * (size_t)t, *end = p + per;
		__m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
		for (; p < end; p += 256) {
			a0 = _mm512_xor_si512(a0, _mm512_load_si512((const void *)p));
			a1 = _mm512_xor_si512(a1, _mm512_load_si512((const void *)(p + 64)));
			a2 = _mm512_xor_si512(a2, _mm512_load_si512((const void *)(p + 128)));
			a3 = _mm512_xor_si512(a3, _mm512_load_si512((const void *)(p + 192)));
		}
		__m512i x = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
		long long v = _mm512_reduce_add_epi64(x);
#pragma omp atomic
		sink += (double)v;
	}
	double dt = bench_now() - t0;
	(void)sink;
	return (double)(bytes / (size_t)threads / 256 * 256 * (size_t)threads) / dt / 1e9;
}

static double bm_bandwidth(int threads, int repeats)
{
	char *buf = mmap(NULL, BM_BW_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			 -1, 0);
	if (buf == MAP_FAILED)
		bench_die("cannot map %llu bytes for the bandwidth test", BM_BW_BYTES);
	madvise(buf, BM_BW_BYTES, MADV_HUGEPAGE);
#pragma omp parallel for num_threads(threads) schedule(static)
	for (size_t i = 0; i < BM_BW_BYTES; i += 4096)
		memset(buf + i, (int)(i >> 12), 4096);
	double v[64];
	int n = repeats < 64 ? repeats : 64;
	bm_bandwidth_once(buf, BM_BW_BYTES, threads); /* warm-up */
	for (int r = 0; r < n; r++)
		v[r] = bm_bandwidth_once(buf, BM_BW_BYTES, threads);
	munmap(buf, BM_BW_BYTES);
	return bench_median(v, (size_t)n);
}

#define BM_PEAK_ITERS 200000000
#define BM_PEAK_TRIES 3

/* Multiply-adds per second of vpdpbusd over 16 independent accumulators, all threads. */
__attribute__((target("avx512f,avx512vnni"))) static double bm_peak_vnni(int threads)
{
	double t0 = bench_now();
	volatile int sink = 0;
#pragma omp parallel num_threads(threads)
	{
		__m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
		__m512i acc[16];
		for (int i = 0; i < 16; i++)
			acc[i] = _mm512_set1_epi32(i);
		for (long it = 0; it < BM_PEAK_ITERS / 16; it++) {
			for (int i = 0; i < 16; i++)
				acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
			__asm__ volatile("" : "+v"(a), "+v"(b));
		}
		__m512i s = acc[0];
		for (int i = 1; i < 16; i++)
			s = _mm512_add_epi32(s, acc[i]);
#pragma omp atomic
		sink += _mm512_reduce_add_epi32(s);
	}
	(void)sink;
	return (double)BM_PEAK_ITERS / 16 * 16 * 64 * threads / (bench_now() - t0);
}

/* Multiply-adds per second of float32 FMA (vfmadd, 16 lanes) over 16 accumulators. */
__attribute__((target("avx512f"))) static double bm_peak_fma(int threads)
{
	double t0 = bench_now();
	volatile float sink = 0;
#pragma omp parallel num_threads(threads)
	{
		__m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
		__m512 acc[16];
		for (int i = 0; i < 16; i++)
			acc[i] = _mm512_set1_ps((float)i);
		for (long it = 0; it < BM_PEAK_ITERS / 16; it++) {
			for (int i = 0; i < 16; i++)
				acc[i] = _mm512_fmadd_ps(acc[i], a, b);
			__asm__ volatile("" : "+v"(a), "+v"(b));
		}
		__m512 s = acc[0];
		for (int i = 1; i < 16; i++)
			s = _mm512_add_ps(s, acc[i]);
#pragma omp atomic
		sink += _mm512_reduce_add_ps(s);
	}
	(void)sink;
	return (double)BM_PEAK_ITERS / 16 * 16 * 16 * threads / (bench_now() - t0);
}

/* ---- what a token costs --------------------------------------------------------------------- */

struct bm_cost {
	double weight_bytes;   /* read per decode token: every matrix but the embedding table */
	double kv_bytes;       /* the stream's KV planes */
	double matrix_macs;    /* multiply-adds of the matrix products per token */
	double attention_macs; /* q.k and p.v over a full window */
	int block_format;      /* the matrices are mostly block formats (VNNI peak applies) */
};

static void bm_add_matrix(struct bm_cost *c, const struct skv_qmat *w, double *block_bytes)
{
	c->weight_bytes += (double)w->row_bytes * w->rows;
	c->matrix_macs += (double)w->rows * w->cols;
	if (w->type != SKV_WTYPE_F32 && w->type != SKV_WTYPE_F16 && w->type != SKV_WTYPE_BF16)
		*block_bytes += (double)w->row_bytes * w->rows;
}

static void bm_token_cost(const struct skv_model *m, const struct skv_stream *s,
			  struct bm_cost *c)
{
	const struct skv_model_config *cfg = &m->cfg;
	double block_bytes = 0;
	memset(c, 0, sizeof(*c));
	bm_add_matrix(c, &m->classifier, &block_bytes);
	for (int32_t l = 0; l < cfg->n_layers; l++) {
		const struct skv_layer_weights *w = &m->layers[l];
		const struct skv_qmat *all[] = { &w->wq, &w->wk, &w->wv, &w->wo, &w->w1, &w->w2,
						 &w->w3 };
		for (size_t i = 0; i < 7; i++)
			bm_add_matrix(c, all[i], &block_bytes);
	}
	/* One embedding row. */
	c->weight_bytes += (double)m->token_embedding.row_bytes;
	const struct skv_seq *seq = skv_stream_seq(s);
	double slots = (double)(seq->desc.sink_slots + seq->desc.window_slots);
	c->kv_bytes = (double)seq->desc.n_layers * 2 * seq->desc.n_kv_heads * seq->desc.head_size *
		      slots * skv_kv_dtype_bytes(seq->desc.dtype);
	c->attention_macs = (double)cfg->n_layers * 2 * cfg->n_heads * cfg->head_size * slots;
	c->block_format = block_bytes * 2 > c->weight_bytes;
}

/* ---- the engine ----------------------------------------------------------------------------- */

static struct skv_stream *bm_stream(struct skv_runner *r, uint32_t kv_dtype)
{
	struct skv_policy p;
	char msg[256] = "";
	struct skv_stream *s;
	skv_policy_default(&p);
	p.kv_dtype = kv_dtype;
	if (skv_policy_resolve(&p, skv_runner_config(r)->seq_len, msg, sizeof(msg)) < 0 ||
	    skv_stream_new(r, &p, &s, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	return s;
}

static void bm_feed(struct skv_stream *s, const int32_t *ids, size_t n, float *logits)
{
	for (size_t off = 0; off < n; off += BM_PREFILL_CHUNK) {
		size_t k = n - off < BM_PREFILL_CHUNK ? n - off : BM_PREFILL_CHUNK;
		int err = skv_stream_feed(s, ids + off, k, logits, NULL);
		if (err < 0)
			bench_die("forward pass failed: %s", skv_strerror(err));
	}
}

/* Copies a stream's whole KV region (descriptor, ring state, token ids, slots) into another
 * stream of the same policy: a full window of real KV without another prefill. */
static void bm_clone_kv(const struct skv_stream *from, struct skv_stream *to)
{
	const struct skv_seq *a = skv_stream_seq(from), *b = skv_stream_seq(to);
	if (a->desc.region_bytes != b->desc.region_bytes)
		bench_die("streams of different layouts");
	memcpy(b->kv_base, a->kv_base, a->desc.region_bytes);
}

/* Aggregate tokens/s of B streams decoding together, `steps` steps. */
static double bm_streams(struct skv_runner *r, struct skv_stream *const *s, int B, int steps,
			 float *logits, int32_t *next)
{
	int32_t vocab = skv_runner_config(r)->vocab_size;
	struct skv_fwd_item items[BM_MAX_ROWS];
	double t0 = bench_now();
	for (int step = 0; step < steps; step++)
		for (int off = 0; off < B; off += BM_MAX_ROWS) {
			int nb = B - off < BM_MAX_ROWS ? B - off : BM_MAX_ROWS;
			for (int i = 0; i < nb; i++)
				skv_stream_item(s[off + i], &next[off + i], 1,
						logits + (size_t)(off + i) * vocab, &items[i]);
			int err = skv_forward(r, items, (uint32_t)nb);
			if (err < 0)
				bench_die("forward pass failed: %s", skv_strerror(err));
			for (int i = 0; i < nb; i++)
				next[off + i] = skv_argmax(logits + (size_t)(off + i) * vocab, vocab);
		}
	return (double)B * steps / (bench_now() - t0);
}

static void bm_usage(FILE *out)
{
	fputs("usage: skv-bench-model --model FILE [--threads 1,2] [--streams 1,16,64]\n"
	      "                       [--decode-tokens N] [--prefill N] [--repeats N]\n"
	      "                       [--kv f32|f16|q8] [--weights auto|map|huge] [--json]\n",
	      out);
}

static void bm_parse(int argc, char **argv, struct bm_opts *o)
{
	static const struct option longs[] = {
		{ "model", required_argument, NULL, 'm' },
		{ "threads", required_argument, NULL, 't' },
		{ "streams", required_argument, NULL, 's' },
		{ "decode-tokens", required_argument, NULL, 'd' },
		{ "prefill", required_argument, NULL, 'p' },
		{ "repeats", required_argument, NULL, 'r' },
		{ "kv", required_argument, NULL, 'k' },
		{ "weights", required_argument, NULL, 'w' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	*o = (struct bm_opts){ .decode_tokens = 32, .prefill_tokens = 256, .repeats = 3,
			       .kv_dtype = SKV_KV_DTYPE_F32 };
	o->threads[0] = 1;
	o->n_threads = 1;
	o->streams[0] = 1;
	o->streams[1] = 16;
	o->streams[2] = 64;
	o->n_streams = 3;
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
		switch (c) {
		case 'm': o->model_path = optarg; break;
		case 't':
			o->n_threads = bench_parse_list("--threads", optarg, 1, 256, o->threads,
							BM_MAX_LIST);
			break;
		case 's':
			o->n_streams = bench_parse_list("--streams", optarg, 1, 4096, o->streams,
							BM_MAX_LIST);
			break;
		case 'd': o->decode_tokens = (int)bench_parse_int("--decode-tokens", optarg, 1, 1 << 20); break;
		case 'p': o->prefill_tokens = (int)bench_parse_int("--prefill", optarg, 1, 1 << 16); break;
		case 'r': o->repeats = (int)bench_parse_int("--repeats", optarg, 1, 64); break;
		case 'k':
			if (!strcmp(optarg, "f32"))
				o->kv_dtype = SKV_KV_DTYPE_F32;
			else if (!strcmp(optarg, "f16"))
				o->kv_dtype = SKV_KV_DTYPE_F16;
			else if (!strcmp(optarg, "q8"))
				o->kv_dtype = SKV_KV_DTYPE_Q8;
			else
				bench_die("--kv: '%s' is not f32, f16 or q8", optarg);
			break;
		case 'w':
			if (skv_weights_mem_parse(optarg, &o->weights) < 0)
				bench_die("--weights: '%s' is not auto, map or huge", optarg);
			break;
		case 'j': o->json = 1; break;
		case 'h': bm_usage(stdout); exit(0);
		default: bm_usage(stderr); bench_die("unknown or incomplete flag '%s'", argv[optind - 1]);
		}
	}
	if (!o->model_path || optind < argc) {
		bm_usage(stderr);
		bench_die("--model FILE is required");
	}
}

int main(int argc, char **argv)
{
	struct bm_opts o;
	bm_parse(argc, argv, &o);
	setvbuf(stdout, NULL, _IOLBF, 0); /* rows as they are measured: a long run shows progress */
	char msg[512] = "", types[64];
	struct skv_model *m;
	double t_open = bench_now();
	if (skv_model_open_mode(o.model_path, o.weights, &m, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	t_open = bench_now() - t_open;
	const struct skv_model_config *cfg = &m->cfg;
	skv_model_types(m, types, sizeof(types));
	int32_t vocab = cfg->vocab_size;
	long long max_b = 1;
	for (size_t i = 0; i < o.n_streams; i++)
		max_b = o.streams[i] > max_b ? o.streams[i] : max_b;
	size_t n_ids = (size_t)cfg->seq_len + (size_t)o.prefill_tokens + 16;
	int32_t *ids = malloc(n_ids * sizeof(int32_t));
	float *logits = malloc((size_t)max_b * (size_t)vocab * sizeof(float));
	int32_t *next = malloc((size_t)max_b * sizeof(int32_t));
	struct skv_stream **s = calloc((size_t)max_b, sizeof(*s));
	if (!ids || !logits || !next || !s)
		bench_die("out of memory");
	uint64_t seed = 42;
	for (size_t i = 0; i < n_ids; i++) {
		seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
		ids[i] = 3 + (int32_t)(seed % (uint64_t)(vocab > 3 ? vocab - 3 : 1));
	}
	if (o.json)
		printf("{\"model\": \"%s\", \"types\": \"%s\", \"dim\": %d, \"layers\": %d, "
		       "\"weight_bytes\": %llu, \"weights\": \"%s\", \"open_s\": %.3f, \"runs\": [",
		       o.model_path, types, cfg->dim, cfg->n_layers,
		       (unsigned long long)skv_model_weight_bytes(m),
		       skv_weights_mem_name(m->weights_mem), t_open);
	else
		printf("model %s: %s, dim %d, hidden %d, %d layers, %d/%d heads, vocab %d, %.1f MiB"
		       " of weights (%s); opened in %.3f s\n",
		       o.model_path, types, cfg->dim, cfg->hidden_dim, cfg->n_layers, cfg->n_heads,
		       cfg->n_kv_heads, vocab, (double)skv_model_weight_bytes(m) / (1 << 20),
		       m->weights_mem == SKV_WEIGHTS_HUGE ? "a copy on huge pages"
							  : "the file's mapping",
		       t_open);

	for (size_t ti = 0; ti < o.n_threads; ti++) {
		int threads = (int)o.threads[ti];
		double bw = bm_bandwidth(threads, o.repeats);
		/* A peak is the best of a few tries: preemption only ever slows a try down. */
		double vnni = 0, fma = 0;
		for (int i = 0; i < BM_PEAK_TRIES; i++) {
			double v = bm_peak_vnni(threads), f = bm_peak_fma(threads);
			vnni = v > vnni ? v : vnni;
			fma = f > fma ? f : fma;
		}
		struct skv_runner *r;
		double t_runner = bench_now();
		if (skv_runner_new(m, BM_MAX_ROWS, (uint32_t)threads, &r, msg, sizeof(msg)) < 0)
			bench_die("%s", msg);
		t_runner = bench_now() - t_runner;
		s[0] = bm_stream(r, o.kv_dtype);
		/* Fill the first stream's window for real: trained length tokens. */
		bm_feed(s[0], ids, (size_t)cfg->seq_len, logits);
		struct bm_cost cost;
		bm_token_cost(m, s[0], &cost);
		double bw_bound = bw * 1e9 / (cost.weight_bytes + cost.kv_bytes);
		double mat_peak = cost.block_format ? vnni : fma;

		double dec[64], pre[64];
		int reps = o.repeats < 64 ? o.repeats : 64;
		for (int rep = 0; rep < reps; rep++) {
			double t0 = bench_now();
			for (int i = 0; i < o.decode_tokens; i++) {
				int32_t tok = skv_argmax(logits, vocab);
				bm_feed(s[0], &tok, 1, logits);
			}
			dec[rep] = o.decode_tokens / (bench_now() - t0);
			struct skv_stream *p = bm_stream(r, o.kv_dtype);
			t0 = bench_now();
			bm_feed(p, ids, (size_t)o.prefill_tokens, logits + vocab * 0);
			pre[rep] = o.prefill_tokens / (bench_now() - t0);
			skv_stream_free(p);
		}
		double decode = bench_median(dec, (size_t)reps), prefill = bench_median(pre, (size_t)reps);
		if (o.json)
			printf("%s{\"threads\": %d, \"bandwidth_gbs\": %.2f, \"peak_vnni_gmacs\": %.1f,"
			       " \"peak_fma_gmacs\": %.1f, \"runner_s\": %.3f, \"bytes_per_token\": %.0f,"
			       " \"bandwidth_bound\": %.2f, \"decode\": %.2f, \"prefill\": %.2f, "
			       "\"streams\": [",
			       ti ? ", " : "", threads, bw, vnni / 1e9, fma / 1e9, t_runner,
			       cost.weight_bytes + cost.kv_bytes, bw_bound, decode, prefill);
		else
			printf("\n%d thread(s): bandwidth %.1f GB/s, peak %.0f GMAC/s int8 VNNI, %.0f "
			       "GMAC/s f32 FMA; runner ready in %.3f s\n"
			       "  decode   %8.2f tokens/s   bandwidth bound %8.2f (%.0f%%: %.1f MB read "
			       "per token)\n"
			       "  prefill  %8.2f tokens/s\n",
			       threads, bw, vnni / 1e9, fma / 1e9, t_runner, decode, bw_bound,
			       100 * decode / bw_bound, (cost.weight_bytes + cost.kv_bytes) / 1e6,
			       prefill);

		for (long long b = 1; b < max_b; b++) {
			s[b] = bm_stream(r, o.kv_dtype);
			bm_clone_kv(s[0], s[b]);
		}
		for (long long b = 0; b < max_b; b++)
			next[b] = ids[(size_t)b % n_ids];
		for (size_t si = 0; si < o.n_streams; si++) {
			int B = (int)o.streams[si];
			bm_streams(r, s, B, 1, logits, next); /* warm-up of this row count */
			double v[64];
			for (int rep = 0; rep < reps; rep++) {
				int steps = B >= 64 ? 2 : B >= 16 ? 4 : 8;
				v[rep] = bm_streams(r, s, B, steps, logits, next);
			}
			double agg = bench_median(v, (size_t)reps);
			/* A batched step reads the weights once for all B rows and each stream's KV. */
			double t_mem = (cost.weight_bytes + B * cost.kv_bytes) / (bw * 1e9);
			double t_cmp = B * (cost.matrix_macs / mat_peak + cost.attention_macs / fma);
			double bound = B / (t_mem > t_cmp ? t_mem : t_cmp);
			double compute_bound = B / t_cmp;
			if (o.json)
				printf("%s{\"streams\": %d, \"tokens_per_s\": %.2f, \"bound\": %.2f, "
				       "\"compute_bound\": %.2f}", si ? ", " : "", B, agg, bound,
				       compute_bound);
			else
				printf("  %4d streams %8.2f tokens/s   bound %8.2f (%.0f%%), compute bound "
				       "%8.2f (%.0f%%)\n", B, agg, bound, 100 * agg / bound,
				       compute_bound, 100 * agg / compute_bound);
		}
		if (o.json)
			printf("]}");
		for (long long b = 0; b < max_b; b++) {
			skv_stream_free(s[b]);
			s[b] = NULL;
		}
		skv_runner_free(r);
	}
	if (o.json)
		printf("]}\n");
	free(ids);
	free(logits);
	free(next);
	free(s);
	skv_model_close(m);
	return 0;
}
