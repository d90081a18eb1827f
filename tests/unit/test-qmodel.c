/* Models whose weights are in GGUF block formats (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K), as
 * files made by another implementation's quantizer (models/quantized, see its README): they
 * load with every tensor's type as the file says, are used in place (no copy of the weights),
 * and their forward pass equals the brute-force reference (tests/unit/refmodel.c, which
 * dequantizes every row by the scalar reference of quant.c) within what each format's
 * activation rounding allows; the reference decoder's greedy text is reproduced. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "forward.h"
#include "gguf.h"
#include "model.h"
#include "quant.h"
#include "refmodel.h"
#include "sampler.h"
#include "skv-error.h"
#include "stream.h"
#include "testutil.h"
#include "tokenizer.h"

/* The quantized test files: models/quantized ($SKV_QUANT_DIR, set by meson test). */
static const char *qpath(const char *name)
{
	static char buf[8][4096];
	static int slot;
	char *out = buf[slot++ % 8];
	const char *dir = getenv("SKV_QUANT_DIR");
	cr_assert(dir && *dir, "SKV_QUANT_DIR is not set (run through meson test)");
	snprintf(out, sizeof(buf[0]), "%s/%s", dir, name);
	return out;
}

static struct skv_model *open_model(const char *path)
{
	char msg[512] = "";
	struct skv_model *m = NULL;
	cr_assert_eq(skv_model_open(path, &m, msg, sizeof(msg)), 0, "%s", msg);
	return m;
}

/* A runner of one thread for up to max_rows rows and one stream of the default policy. */
static struct skv_stream *default_stream(struct skv_model *m, uint32_t max_rows,
					 struct skv_runner **r)
{
	char msg[512] = "";
	cr_assert_eq(skv_runner_new(m, max_rows, 1, r, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_policy p;
	skv_policy_default(&p);
	cr_assert_eq(skv_policy_resolve(&p, m->cfg.seq_len, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_stream *s;
	cr_assert_eq(skv_stream_new(*r, &p, &s, msg, sizeof(msg)), 0, "%s", msg);
	return s;
}

static int32_t file_type_of(const struct skv_model *m, const char *name)
{
	const struct skv_gguf_tensor *t = skv_gguf_find_tensor(m->gguf, name);
	cr_assert_not_null(t, "%s", name);
	return (int32_t)t->type;
}

/* Every matrix is described with the type, shape and bytes of its tensor, in place. */
static void assert_in_place(const struct skv_model *m, const struct skv_qmat *w,
			    const char *name)
{
	const struct skv_gguf_tensor *t = skv_gguf_find_tensor(m->gguf, name);
	cr_assert_not_null(t, "%s", name);
	cr_assert_eq(w->type, t->type, "%s: type %u, file says %u", name, w->type, t->type);
	cr_assert_eq(w->data, t->data, "%s is not used in place", name);
	cr_assert_eq(w->cols, t->dims[0], "%s", name);
	cr_assert_eq(w->rows, t->dims[1], "%s", name);
	cr_assert_eq(w->row_bytes * w->rows, t->n_bytes, "%s", name);
}

static const char *const quantized_files[] = {
	"stories260K-F16.gguf",  "stories260K-BF16.gguf", "random-d256-Q8_0.gguf",
	"random-d256-Q4_0.gguf", "random-d256-Q4_K_M.gguf", "random-d256-Q5_K_M.gguf",
	"random-d256-Q6_K.gguf", "random-d256-f32.gguf",
};

Test(qmodel, every_tensor_has_the_files_type_and_is_used_in_place)
{
	for (size_t f = 0; f < sizeof(quantized_files) / sizeof(quantized_files[0]); f++) {
		struct skv_model *m = open_model(qpath(quantized_files[f]));
		char name[96];
		assert_in_place(m, &m->token_embedding, "token_embd.weight");
		for (int32_t l = 0; l < m->cfg.n_layers; l++) {
			const struct skv_layer_weights *w = &m->layers[l];
			const struct {
				const char *suffix;
				const struct skv_qmat *mat;
			} mats[] = { { "attn_q", &w->wq }, { "attn_k", &w->wk }, { "attn_v", &w->wv },
				     { "attn_output", &w->wo }, { "ffn_gate", &w->w1 },
				     { "ffn_down", &w->w2 }, { "ffn_up", &w->w3 } };
			for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++) {
				snprintf(name, sizeof(name), "blk.%d.%s.weight", l, mats[i].suffix);
				assert_in_place(m, mats[i].mat, name);
			}
		}
		if (skv_gguf_find_tensor(m->gguf, "output.weight"))
			assert_in_place(m, &m->classifier, "output.weight");
		/* Resident weights are about the file's size: nothing is dequantized ahead. */
		uint64_t bytes = skv_model_weight_bytes(m);
		struct stat st;
		cr_assert_eq(stat(qpath(quantized_files[f]), &st), 0);
		cr_assert_leq(bytes, (uint64_t)st.st_size, "%s", quantized_files[f]);
		cr_assert_geq(bytes, (uint64_t)st.st_size / 2, "%s: %llu of %lld bytes",
			      quantized_files[f], (unsigned long long)bytes, (long long)st.st_size);
		skv_model_close(m);
	}
}

Test(qmodel, the_mixes_hold_the_types_their_names_say)
{
	struct skv_model *m = open_model(qpath("random-d256-Q4_K_M.gguf"));
	char types[64];
	skv_model_types(m, types, sizeof(types));
	cr_assert(strstr(types, "Q4_K") && strstr(types, "Q6_K"), "Q4_K_M holds %s", types);
	cr_assert_eq(m->layers[0].wq.type, SKV_WTYPE_Q4_K);
	skv_model_close(m);

	m = open_model(qpath("random-d256-Q5_K_M.gguf"));
	skv_model_types(m, types, sizeof(types));
	cr_assert(strstr(types, "Q5_K"), "Q5_K_M holds %s", types);
	skv_model_close(m);

	m = open_model(qpath("stories260K-F16.gguf"));
	cr_assert_eq(m->layers[0].wq.type, SKV_WTYPE_F16);
	cr_assert_eq(file_type_of(m, "blk.0.attn_norm.weight"), SKV_WTYPE_F32);
	skv_model_close(m);
}

/* A tensor of a type streamkv does not read (Q4_1 here: the type field patched) is refused at
 * load with one line naming the tensor and the type. */
Test(qmodel, an_unread_type_is_refused_naming_the_tensor)
{
	size_t len;
	char *buf = tu_read_file(qpath("random-d256-Q8_0.gguf"), &len);
	struct skv_gguf *g;
	char msg[512] = "";
	cr_assert_eq(skv_gguf_open(qpath("random-d256-Q8_0.gguf"), &g, msg, sizeof(msg)), 0, "%s",
		     msg);
	const struct skv_gguf_tensor *t = skv_gguf_find_tensor(g, "blk.1.ffn_up.weight");
	cr_assert_not_null(t);
	cr_assert_eq(t->type, SKV_WTYPE_Q8_0);
	/* The tensor info's type field follows its name, n_dims and dims. */
	const char *info = memmem(buf, len, "blk.1.ffn_up.weight", strlen("blk.1.ffn_up.weight"));
	cr_assert_not_null(info);
	size_t at = (size_t)(info - buf) + strlen("blk.1.ffn_up.weight") + 4 + 8 * t->n_dims;
	uint32_t type;
	memcpy(&type, buf + at, 4);
	cr_assert_eq(type, SKV_WTYPE_Q8_0, "the type field is where GGUF puts it");
	/* Q4_1 blocks of 32 weights are 20 bytes, Q8_0's 34: the file still parses. */
	type = 3;
	memcpy(buf + at, &type, 4);
	skv_gguf_close(g);
	struct skv_model *m = NULL;
	int err = skv_model_open(tu_write_scratch("q4_1.gguf", buf, len), &m, msg, sizeof(msg));
	cr_assert_eq(err, -SKV_EDTYPE, "%d: %s", err, msg);
	cr_assert(strstr(msg, "blk.1.ffn_up.weight") && strstr(msg, "Q4_1"), "%s", msg);
	cr_assert_null(m);
	free(buf);
	tu_scratch_cleanup();
}

/* Logits of the engine against the reference, token by token, over a sink stream that
 * evicts (window 24 + 4 sinks over 48 tokens). Returns the worst |difference| relative to the
 * largest |logit| of the step, and how often the greedy choice agrees. */
static void compare_with_reference(const char *file, double *worst_rel, int *agree, int *steps)
{
	char msg[512] = "";
	struct skv_model *m = open_model(qpath(file));
	struct skv_runner *r;
	cr_assert_eq(skv_runner_new(m, 64, 1, &r, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_policy p;
	skv_policy_default(&p);
	p.sink_slots = 4;
	p.window_slots = 24;
	cr_assert_eq(skv_policy_resolve(&p, m->cfg.seq_len, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_stream *s;
	cr_assert_eq(skv_stream_new(r, &p, &s, msg, sizeof(msg)), 0, "%s", msg);
	struct ref_model ref;
	ref_init(&ref, m, 4, 24, 1, 0);
	int32_t vocab = m->cfg.vocab_size;
	float *la = malloc(sizeof(float) * vocab), *lb = malloc(sizeof(float) * vocab);
	int32_t token = 1;
	*worst_rel = 0;
	*agree = 0;
	*steps = 48;
	for (int step = 0; step < *steps; step++) {
		cr_assert_eq(skv_stream_feed(s, &token, 1, la, NULL), 0);
		cr_assert_eq(ref_step(&ref, token, lb), 0);
		double peak = 0, diff = 0;
		for (int32_t i = 0; i < vocab; i++) {
			cr_assert(isfinite(la[i]), "%s: logit %d is %g", file, i, la[i]);
			peak = fmax(peak, fabs(lb[i]));
			diff = fmax(diff, fabs((double)la[i] - lb[i]));
		}
		*worst_rel = fmax(*worst_rel, diff / fmax(peak, 1e-6));
		*agree += skv_argmax(la, vocab) == skv_argmax(lb, vocab);
		/* Follow the reference's choice so both see the same text. */
		token = skv_argmax(lb, vocab);
	}
	free(la);
	free(lb);
	ref_free(&ref);
	skv_stream_free(s);
	skv_runner_free(r);
	skv_model_close(m);
}

/* F16 and BF16 weights are widened exactly and multiplied with float32 activations: only the
 * order of summation differs from the reference. */
Test(qmodel, f16_and_bf16_equal_the_reference_to_summation_order)
{
	const char *files[] = { "stories260K-F16.gguf", "stories260K-BF16.gguf",
				"random-d256-f32.gguf" };
	for (size_t f = 0; f < 3; f++) {
		double worst;
		int agree, steps;
		compare_with_reference(files[f], &worst, &agree, &steps);
		cr_log_info("%s: worst relative logit difference %g, greedy agrees %d/%d", files[f],
			    worst, agree, steps);
		cr_assert_lt(worst, 1e-4, "%s: %g", files[f], worst);
		cr_assert_eq(agree, steps, "%s", files[f]);
	}
}

/* Block formats quantize each activation row to 8 bits (as ggml does) before the integer dot
 * products: the logits move by about a percent of their range, no more. */
Test(qmodel, block_formats_equal_the_reference_within_activation_rounding)
{
	const char *files[] = { "random-d256-Q8_0.gguf", "random-d256-Q4_0.gguf",
				"random-d256-Q4_K_M.gguf", "random-d256-Q5_K_M.gguf",
				"random-d256-Q6_K.gguf" };
	for (size_t f = 0; f < sizeof(files) / sizeof(files[0]); f++) {
		double worst;
		int agree, steps;
		compare_with_reference(files[f], &worst, &agree, &steps);
		cr_log_info("%s: worst relative logit difference %g, greedy agrees %d/%d", files[f],
			    worst, agree, steps);
		cr_assert_lt(worst, 0.05, "%s: %g", files[f], worst);
		cr_assert_geq(agree, steps * 3 / 4, "%s: %d/%d", files[f], agree, steps);
	}
}

/* The reference decoder's greedy continuation of "Once upon a time" on the random-weight
 * files, as their README gives it (24 tokens). */
static void assert_greedy_text(const char *file, const char *want, size_t must_match)
{
	char msg[512] = "";
	struct skv_model *m = open_model(qpath(file));
	struct skv_tokenizer *tok;
	cr_assert_eq(skv_tokenizer_load(tu_model_path("tok512.bin"), m->cfg.vocab_size, &tok, msg,
					sizeof(msg)),
		     0, "%s", msg);
	struct skv_runner *r;
	struct skv_stream *s = default_stream(m, 64, &r);
	const char *prompt = "Once upon a time";
	int32_t *ids;
	size_t n;
	cr_assert_eq(skv_tokenizer_encode(tok, prompt, strlen(prompt), 1, 0, &ids, &n), 0);
	float *logits = malloc(sizeof(float) * m->cfg.vocab_size);
	cr_assert_eq(skv_stream_feed(s, ids, n, logits, NULL), 0);
	char got[1024];
	size_t got_len = (size_t)snprintf(got, sizeof(got), "%s", prompt);
	int32_t prev = ids[n - 1];
	for (int i = 0; i < 24; i++) {
		int32_t next = skv_argmax(logits, m->cfg.vocab_size);
		size_t len;
		const char *piece = skv_tokenizer_decode(tok, prev, next, &len);
		cr_assert_not_null(piece);
		if (got_len + len < sizeof(got)) {
			memcpy(got + got_len, piece, len);
			got_len += len;
		}
		cr_assert_eq(skv_stream_feed(s, &next, 1, logits, NULL), 0);
		prev = next;
	}
	got[got_len] = '\0';
	cr_log_info("%s: %s", file, got);
	cr_assert(!strncmp(got, want, must_match), "%s: got '%s', the reference decoder '%s'",
		  file, got, want);
	free(logits);
	free(ids);
	skv_stream_free(s);
	skv_runner_free(r);
	skv_tokenizer_free(tok);
	skv_model_close(m);
}

#define REFERENCE_TEXT "Once upon a time named2 play play pim pall bigOOOXVX"

Test(qmodel, f32_file_gives_the_reference_decoders_greedy_text)
{
	assert_greedy_text("random-d256-f32.gguf", REFERENCE_TEXT, strlen(REFERENCE_TEXT));
}

Test(qmodel, q8_0_file_gives_the_reference_decoders_greedy_text)
{
	assert_greedy_text("random-d256-Q8_0.gguf", REFERENCE_TEXT, strlen(REFERENCE_TEXT));
}

/* Two threads split the matrix rows and the streams' attention; every row's arithmetic is the
 * same whichever thread does it, so a batch of streams (prompt chunks of several rows and
 * single decode rows, windows that evict) gives the same bits with 1 and 2 threads. A single
 * stream's attention is split by KV heads instead (forward_attend_heads), in every KV type. */
static void same_bits_with_two_threads(int STREAMS, uint32_t kv_dtype)
{
	enum { STEPS = 40, MAX_STREAMS = 6 };
	cr_assert(STREAMS <= MAX_STREAMS);
	char msg[512] = "";
	struct skv_model *m = open_model(qpath("random-d256-Q4_K_M.gguf"));
	struct skv_runner *r[2];
	struct skv_stream *s[2][MAX_STREAMS];
	int32_t vocab = m->cfg.vocab_size;
	float *logits[2];
	for (int k = 0; k < 2; k++) {
		cr_assert_eq(skv_runner_new(m, 64, (uint32_t)(k + 1), &r[k], msg, sizeof(msg)), 0,
			     "%s", msg);
		logits[k] = malloc(sizeof(float) * vocab * STREAMS);
		for (int i = 0; i < STREAMS; i++) {
			struct skv_policy p;
			skv_policy_default(&p);
			p.sink_slots = 4;
			p.window_slots = 12 + 4 * i;
			p.kv_dtype = kv_dtype;
			cr_assert_eq(skv_policy_resolve(&p, m->cfg.seq_len, msg, sizeof(msg)), 0,
				     "%s", msg);
			cr_assert_eq(skv_stream_new(r[k], &p, &s[k][i], msg, sizeof(msg)), 0, "%s",
				     msg);
		}
	}
	int32_t tokens[MAX_STREAMS][8];
	for (int step = 0; step < STEPS; step++) {
		for (int k = 0; k < 2; k++) {
			struct skv_fwd_item items[MAX_STREAMS];
			for (int i = 0; i < STREAMS; i++) {
				/* Every third step a prompt chunk of i + 2 tokens, else one token. */
				uint32_t n = step % 3 == 0 ? (uint32_t)i + 2 : 1;
				for (uint32_t j = 0; j < n; j++)
					tokens[i][j] = 3 + (step * 31 + i * 7 + (int)j * 13) % (vocab - 3);
				cr_assert_eq(skv_stream_item(s[k][i], tokens[i], n,
							     logits[k] + (size_t)i * vocab, &items[i]),
					     0);
			}
			cr_assert_eq(skv_forward(r[k], items, STREAMS), 0);
		}
		cr_assert(!memcmp(logits[0], logits[1], sizeof(float) * vocab * STREAMS),
			  "%d stream(s), kv %s, step %d: 2 threads differ from 1", STREAMS,
			  skv_kv_dtype_name(kv_dtype), step);
	}
	for (int k = 0; k < 2; k++) {
		for (int i = 0; i < STREAMS; i++)
			skv_stream_free(s[k][i]);
		skv_runner_free(r[k]);
		free(logits[k]);
	}
	skv_model_close(m);
}

Test(qmodel, two_threads_give_the_same_bits_as_one)
{
	same_bits_with_two_threads(6, SKV_KV_DTYPE_F32);
	same_bits_with_two_threads(6, SKV_KV_DTYPE_Q8);
}

Test(qmodel, one_stream_split_by_kv_heads_gives_the_same_bits)
{
	same_bits_with_two_threads(1, SKV_KV_DTYPE_F32);
	same_bits_with_two_threads(1, SKV_KV_DTYPE_F16);
	same_bits_with_two_threads(1, SKV_KV_DTYPE_Q8);
}

/* Block-format weights: a decode step of one row runs the row kernels, a step of six or more
 * rows the batched ones, which round differently (integer block sums are exact in both; the
 * float sums over blocks run in another order). So a stream batched with others is not bit
 * for bit its solo run, as it is for F32 weights (tests/mp/test-batch.c), but within float
 * rounding of it: its logits, step after step, stay within 1e-5 of the largest logit. */
static void batched_within_rounding(const char *file)
{
	enum { B = 8, STEPS = 24 };
	char msg[512] = "";
	struct skv_model *m = open_model(qpath(file));
	struct skv_runner *r;
	cr_assert_eq(skv_runner_new(m, 64, 1, &r, msg, sizeof(msg)), 0, "%s", msg);
	int32_t vocab = m->cfg.vocab_size;
	struct skv_stream *solo, *s[B];
	struct skv_policy p;
	skv_policy_default(&p);
	p.sink_slots = 4;
	p.window_slots = 16; /* evicts during the run */
	cr_assert_eq(skv_policy_resolve(&p, m->cfg.seq_len, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(skv_stream_new(r, &p, &solo, msg, sizeof(msg)), 0, "%s", msg);
	for (int i = 0; i < B; i++)
		cr_assert_eq(skv_stream_new(r, &p, &s[i], msg, sizeof(msg)), 0, "%s", msg);
	float *a = malloc(sizeof(float) * vocab), *b = malloc(sizeof(float) * vocab * B);
	cr_assert(a && b);
	int differ = 0;
	for (int step = 0; step < STEPS; step++) {
		int32_t tok[B];
		for (int i = 0; i < B; i++)
			tok[i] = 3 + (step * 31 + i * 7) % (vocab - 3);
		struct skv_fwd_item it, items[B];
		cr_assert_eq(skv_stream_item(solo, &tok[0], 1, a, &it), 0);
		cr_assert_eq(skv_forward(r, &it, 1), 0);
		for (int i = 0; i < B; i++)
			cr_assert_eq(skv_stream_item(s[i], &tok[i], 1, b + (size_t)i * vocab,
						     &items[i]),
				     0);
		cr_assert_eq(skv_forward(r, items, B), 0);
		double worst = 0, amax = 0;
		for (int32_t j = 0; j < vocab; j++) {
			double d = fabs((double)a[j] - b[j]);
			worst = d > worst ? d : worst;
			amax = fabs(a[j]) > amax ? fabs(a[j]) : amax;
		}
		cr_assert_lt(worst, 1e-5 * amax, "%s step %d: batched logits differ by %g (largest %g)",
			     file, step, worst, amax);
		differ |= worst > 0;
	}
	/* The reason this is not a bitwise test: the two paths really do round differently. */
	cr_assert(differ, "%s: the batched run equals the solo run bit for bit: make this test "
		  "bitwise", file);
	free(a);
	free(b);
	for (int i = 0; i < B; i++)
		skv_stream_free(s[i]);
	skv_stream_free(solo);
	skv_runner_free(r);
	skv_model_close(m);
}

Test(qmodel, a_batched_stream_stays_within_rounding_of_its_solo_run)
{
	batched_within_rounding("random-d256-Q4_K_M.gguf");
	batched_within_rounding("random-d256-Q8_0.gguf");
}

/* --weights huge: the weights read in place come from a private copy (2 MiB-aligned, huge
 * pages advised) instead of the file's mapping; the model computes the same bits from it.
 * auto keeps the mapping for a model under SKV_WEIGHTS_HUGE_MIN bytes of such weights. */
static void logits_of(struct skv_model *m, float *out, int steps)
{
	struct skv_runner *r;
	struct skv_stream *s = default_stream(m, 8, &r);
	for (int i = 0; i < steps; i++) {
		int32_t tok = 1 + (i * 37) % (m->cfg.vocab_size - 1);
		cr_assert_eq(skv_stream_feed(s, &tok, 1, out + (size_t)i * m->cfg.vocab_size, NULL),
			     0);
	}
	skv_stream_free(s);
	skv_runner_free(r);
}

Test(qmodel, weights_on_huge_pages_give_the_same_bits)
{
	enum { STEPS = 5 };
	const char *files[] = { "random-d256-Q4_K_M.gguf", "random-d256-Q8_0.gguf" };
	for (size_t f = 0; f < 2; f++) {
		char msg[512] = "";
		struct skv_model *map, *huge, *autom;
		cr_assert_eq(skv_model_open_mode(qpath(files[f]), SKV_WEIGHTS_MAP, &map, msg,
						 sizeof(msg)),
			     0, "%s", msg);
		cr_assert_eq(skv_model_open_mode(qpath(files[f]), SKV_WEIGHTS_HUGE, &huge, msg,
						 sizeof(msg)),
			     0, "%s", msg);
		cr_assert_eq(skv_model_open_mode(qpath(files[f]), SKV_WEIGHTS_AUTO, &autom, msg,
						 sizeof(msg)),
			     0, "%s", msg);
		cr_assert_eq(map->weights_mem, SKV_WEIGHTS_MAP);
		cr_assert_eq(huge->weights_mem, SKV_WEIGHTS_HUGE);
		cr_assert_lt(skv_model_weight_bytes(autom), SKV_WEIGHTS_HUGE_MIN);
		cr_assert_eq(autom->weights_mem, SKV_WEIGHTS_MAP, "a small model stays mapped");
		/* The copy is its own memory, aligned for huge pages, not the file's mapping. */
		const struct skv_gguf_tensor *a = skv_gguf_find_tensor(map->gguf, "blk.0.attn_q.weight");
		const struct skv_gguf_tensor *b = skv_gguf_find_tensor(huge->gguf, "blk.0.attn_q.weight");
		cr_assert(a && b && a->data != b->data && !memcmp(a->data, b->data, a->n_bytes));
		int32_t vocab = map->cfg.vocab_size;
		float *la = malloc(sizeof(float) * vocab * STEPS), *lb = malloc(sizeof(float) * vocab * STEPS);
		logits_of(map, la, STEPS);
		logits_of(huge, lb, STEPS);
		cr_assert(!memcmp(la, lb, sizeof(float) * vocab * STEPS), "%s", files[f]);
		free(la);
		free(lb);
		skv_model_close(map);
		skv_model_close(huge);
		skv_model_close(autom);
	}
	/* A llama2.c file: its mapping replaced by the copy. */
	char msg[512] = "";
	struct skv_model *map, *huge;
	cr_assert_eq(skv_model_open_mode(tu_model_path("stories260K.bin"), SKV_WEIGHTS_MAP, &map,
					 msg, sizeof(msg)),
		     0, "%s", msg);
	cr_assert_eq(skv_model_open_mode(tu_model_path("stories260K.bin"), SKV_WEIGHTS_HUGE, &huge,
					 msg, sizeof(msg)),
		     0, "%s", msg);
	cr_assert_eq(huge->weights_mem, SKV_WEIGHTS_HUGE);
	cr_assert(huge->map != map->map && huge->map_size == map->map_size &&
		  !memcmp(huge->map, map->map, map->map_size));
	int32_t vocab = map->cfg.vocab_size;
	float *la = malloc(sizeof(float) * vocab * STEPS), *lb = malloc(sizeof(float) * vocab * STEPS);
	logits_of(map, la, STEPS);
	logits_of(huge, lb, STEPS);
	cr_assert(!memcmp(la, lb, sizeof(float) * vocab * STEPS), "stories260K.bin");
	free(la);
	free(lb);
	skv_model_close(map);
	skv_model_close(huge);
	enum skv_weights_mem mode;
	cr_assert_eq(skv_weights_mem_parse("huge", &mode), 0);
	cr_assert_eq(mode, SKV_WEIGHTS_HUGE);
	cr_assert_eq(skv_weights_mem_parse("Huge", &mode), -EINVAL);
	cr_assert_eq(skv_weights_mem_parse("", &mode), -EINVAL);
}
