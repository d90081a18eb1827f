/* Model families beyond plain Llama (issue 13): random-weight files of each family written by
 * the real skv-mkmodel ($SKV_MKMODEL_BIN) at a tiny shape, the engine against the family's
 * brute-force reference (refmodel.c: every cached key re-rotated at its in-cache position at
 * every step) for the sink, window and dense policies, also after positions past four million,
 * and the load-time refusals of what streamkv does not run. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "attention.h"
#include "forward.h"
#include "model.h"
#include "refmodel.h"
#include "skv-error.h"
#include "stream.h"
#include "tokenizer.h"
#include "gguf.h"
#include "testutil.h"

extern char **environ;

static struct skv_model *model;
static struct skv_runner *runner;
static int32_t vocab;

#define FAM_TOLERANCE 2e-3f
#define FAM_TOKENS 160

/* Runs skv-mkmodel with the tiny shape and the extra flags; returns the file's path. */
static const char *fam_run(const char *name, const char *const *extra, int with_vocab);

static const char *fam_make(const char *name, const char *const *extra)
{
	return fam_run(name, extra, 1);
}

/* The tiny shape without --vocab and --tokenizer: extra gives --vocab-file. */
static const char *fam_make_vocab(const char *name, const char *const *extra)
{
	return fam_run(name, extra, 0);
}

static const char *fam_run(const char *name, const char *const *extra, int with_vocab)
{
	const char *bin = getenv("SKV_MKMODEL_BIN");
	cr_assert(bin && *bin, "SKV_MKMODEL_BIN is not set: run the tests through `meson test`");
	const char *dir = tu_scratch_dir(name);
	static char path[4096];
	snprintf(path, sizeof(path), "%s/%s.gguf", dir, name);
	const char *argv[32] = { bin, "--dim", "64", "--hidden", "96", "--layers", "2",
				 "--heads", "4", "--kv-heads", "2", "--seq-len", "1024",
				 "--threads", "1", "-o", path };
	size_t n = 17;
	if (with_vocab) {
		argv[n++] = "--vocab";
		argv[n++] = "300";
		argv[n++] = "--tokenizer";
		argv[n++] = "bytes";
	}
	for (size_t i = 0; extra && extra[i]; i++)
		argv[n++] = extra[i];
	argv[n] = NULL;
	posix_spawn_file_actions_t fa;
	cr_assert_eq(posix_spawn_file_actions_init(&fa), 0);
	cr_assert_eq(posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY,
						      0), 0);
	pid_t pid;
	cr_assert_eq(posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ), 0);
	posix_spawn_file_actions_destroy(&fa);
	int status;
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "skv-mkmodel %s failed", name);
	return path;
}

static void fam_load(const char *name, const char *const *extra)
{
	char msg[256] = "";
	cr_assert_eq(skv_model_open(fam_make(name, extra), &model, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(skv_runner_new(model, 16, 1, &runner, msg, sizeof(msg)), 0, "%s", msg);
	vocab = model->cfg.vocab_size;
}

static void fam_teardown(void)
{
	skv_runner_free(runner);
	skv_model_close(model);
	runner = NULL;
	model = NULL;
	tu_scratch_cleanup();
}

struct raw_seq {
	struct skv_seq seq;
	struct skv_kv_ring ring;
	void *region;
};

static void raw_open(struct raw_seq *r, uint32_t sinks, uint32_t window, int allow_evict)
{
	const struct skv_model_config *c = &model->cfg;
	memset(r, 0, sizeof(*r));
	cr_assert_eq(skv_kv_layout_init_dtype(&r->seq.desc, c->n_layers, c->n_kv_heads,
					      c->head_size, sinks, window, SKV_KV_DTYPE_F32),
		     0);
	r->region = mmap(NULL, r->seq.desc.region_bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	cr_assert_neq(r->region, MAP_FAILED);
	r->seq.kv_base = r->region;
	r->seq.ring = &r->ring;
	r->seq.allow_evict = allow_evict;
	skv_kv_ring_reset(&r->ring, &r->seq.desc);
}

/* Engine and reference over the same pseudo-random tokens; logits equal at every step.
 * skip_to, if non-zero, jumps the text position once the sinks are filled. */
static void fam_compare(uint32_t sinks, uint32_t window, int allow_evict, size_t n_tokens,
			uint64_t skip_to)
{
	struct raw_seq raw;
	struct ref_model ref;
	raw_open(&raw, sinks, window, allow_evict);
	ref_init(&ref, model, sinks, window, allow_evict, 0);
	float *a = malloc((size_t)vocab * sizeof(float)), *b = malloc((size_t)vocab * sizeof(float));
	uint32_t state = 12345;
	float worst = 0.0f;
	for (size_t i = 0; i < n_tokens; i++) {
		if (skip_to && i == sinks) {
			raw.ring.tokens_seen = skip_to;
			raw.ring.window_start = skip_to;
			ref_skip_to(&ref, skip_to);
		}
		state = state * 1103515245u + 12345u;
		int32_t token = (int32_t)((state >> 8) % (uint32_t)vocab);
		struct skv_fwd_item item = { .seq = &raw.seq, .tokens = &token, .n_tokens = 1,
					     .logits = a };
		cr_assert_eq(skv_forward(runner, &item, 1), 0, "engine step %zu", i);
		cr_assert_eq(ref_step(&ref, token, b), 0, "reference step %zu", i);
		float d = 0.0f;
		for (int32_t v = 0; v < vocab; v++)
			d = fmaxf(d, fabsf(a[v] - b[v]));
		worst = fmaxf(worst, d);
		cr_assert_lt(d, FAM_TOLERANCE, "token %zu: logits differ by %g from the reference",
			     i, d);
	}
	if (allow_evict && n_tokens > sinks + window)
		cr_assert_gt(raw.ring.tokens_evicted, 0);
	cr_log_info("worst logit difference %g", worst);
	free(a);
	free(b);
	ref_free(&ref);
	munmap(raw.region, raw.seq.desc.region_bytes);
}

/* Every policy, and in-cache positions past four million and past 2^32. */
static void fam_all_policies(void)
{
	fam_compare(4, 28, 1, FAM_TOKENS, 0);     /* sink */
	fam_compare(0, 32, 1, FAM_TOKENS, 0);     /* window */
	fam_compare(0, 200, 0, FAM_TOKENS, 0);    /* dense */
	fam_compare(4, 28, 1, FAM_TOKENS, 4000000);
	fam_compare(4, 28, 1, 100, 4294967296ull + 12345);
}

static const char *const llama3_flags[] = { "--rope-scaling", "llama3", NULL };
static const char *const qwen2_flags[] = { "--arch", "qwen2", NULL };

Test(families, llama_plain_matches_reference, .fini = fam_teardown, .timeout = 300)
{
	fam_load("llama", NULL);
	cr_assert_eq(model->cfg.arch, SKV_ARCH_LLAMA);
	cr_assert_eq(model->cfg.rope_scaling, SKV_ROPE_SCALING_NONE);
	fam_all_policies();
}

Test(families, llama3_rope_scaling_matches_reference, .fini = fam_teardown, .timeout = 300)
{
	fam_load("llama3", llama3_flags);
	const struct skv_model_config *c = &model->cfg;
	cr_assert_eq(c->rope_scaling, SKV_ROPE_SCALING_LLAMA3);
	cr_assert_eq(c->rope_factor, 8.0f);
	cr_assert_eq(c->rope_low_freq_factor, 1.0f);
	cr_assert_eq(c->rope_high_freq_factor, 4.0f);
	cr_assert_eq(c->rope_original_context, 8192.0f);
	fam_all_policies();
}

/* The three branches of the llama3 formula, on a head of 16 at base 10000: wavelengths
 * 2 pi 10000^(i / 8); below 2048 unchanged, above 8192 divided by 8, between them smoothed. */
Test(families, llama3_scaling_formula)
{
	struct skv_rope plain, scaled;
	cr_assert_eq(skv_rope_init(&plain, 16, 10000.0f), 0);
	cr_assert_eq(skv_rope_init(&scaled, 16, 10000.0f), 0);
	cr_assert_eq(skv_rope_scale_llama3(&scaled, 8.0f, 1.0f, 4.0f, 8192.0f), 0);
	for (uint32_t i = 0; i <= 5; i++)
		cr_assert_eq(scaled.inv_freq[i], plain.inv_freq[i], "pair %u", i);
	double f6 = plain.inv_freq[6], w6 = 2.0 * M_PI / f6;
	double smooth = (8192.0 / w6 - 1.0) / 3.0;
	cr_assert_float_eq(scaled.inv_freq[6], (1.0 - smooth) * f6 / 8.0 + smooth * f6, 1e-9);
	cr_assert_float_eq(scaled.inv_freq[7], plain.inv_freq[7] / 8.0, 1e-12);
	cr_assert_eq(skv_rope_scale_llama3(&scaled, 0.5f, 1.0f, 4.0f, 8192.0f), -EINVAL);
	cr_assert_eq(skv_rope_scale_llama3(&scaled, 8.0f, 4.0f, 1.0f, 8192.0f), -EINVAL);
}

Test(families, qwen2_biases_and_neox_rope_match_reference, .fini = fam_teardown,
     .timeout = 300)
{
	fam_load("qwen2", qwen2_flags);
	const struct skv_model_config *c = &model->cfg;
	cr_assert_eq(c->arch, SKV_ARCH_QWEN2);
	cr_assert_eq(c->rope_order, SKV_ROPE_NEOX);
	for (int32_t l = 0; l < c->n_layers; l++)
		cr_assert(model->layers[l].bq && model->layers[l].bk && model->layers[l].bv);
	fam_all_policies();
}

/* NEOX order pairs component i with i + rot / 2 and leaves the unrotated tail alone. */
Test(families, neox_rotation_of_halves_and_partial_rotary)
{
	struct skv_rope rope;
	cr_assert_eq(skv_rope_init_partial(&rope, 8, 4, 10000.0f), 0);
	cr_assert_eq(rope.pairs, 2);
	cr_assert_eq(rope.inv_freq[1], 1.0f / powf(10000.0f, 0.5f));
	float cs[2], sn[2], v[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	skv_rope_angles(&rope, 3, cs, sn);
	skv_rope_rotate_neox(&rope, v, 1, cs, sn);
	cr_assert_float_eq(v[0], 1 * cs[0] - 3 * sn[0], 1e-6);
	cr_assert_float_eq(v[2], 1 * sn[0] + 3 * cs[0], 1e-6);
	cr_assert_float_eq(v[1], 2 * cs[1] - 4 * sn[1], 1e-6);
	cr_assert_float_eq(v[3], 2 * sn[1] + 4 * cs[1], 1e-6);
	for (int i = 4; i < 8; i++)
		cr_assert_eq(v[i], (float)(i + 1));
	cr_assert_eq(skv_rope_init_partial(&rope, 8, 10, 10000.0f), -EINVAL);
	cr_assert_eq(skv_rope_init_partial(&rope, 8, 3, 10000.0f), -EINVAL);
}

/* Replace the first occurrence of `from` by `to` (same length) in a copy of the file. */
static const char *fam_patched(const char *path, const char *from, const char *to, size_t n)
{
	size_t len;
	char *data = tu_read_file(path, &len);
	char *at = memmem(data, len, from, n);
	cr_assert(at, "%s not in the file", from);
	memcpy(at, to, n);
	const char *out = tu_write_scratch("patched.gguf", data, len);
	free(data);
	return out;
}

static void fam_refused(const char *path, const char *expect)
{
	struct skv_model *m = NULL;
	char msg[256] = "";
	cr_assert_lt(skv_model_open(path, &m, msg, sizeof(msg)), 0);
	cr_assert_null(m);
	cr_assert(strstr(msg, expect), "message '%s' lacks '%s'", msg, expect);
	cr_assert_null(strchr(msg, '\n'), "one line: '%s'", msg);
}

Test(families, unknown_architecture_scaling_and_missing_bias_are_refused,
     .fini = tu_scratch_cleanup)
{
	const char *llama3 = fam_make("refuse-llama3", llama3_flags);
	char keep[4096];
	snprintf(keep, sizeof(keep), "%s", llama3);
	/* general.architecture "llama" -> "lmaoa": every llama.* key is then unknown too. */
	fam_refused(fam_patched(keep, "\x05\x00\x00\x00\x00\x00\x00\x00llama",
				"\x05\x00\x00\x00\x00\x00\x00\x00lmaoa", 13),
		    "architecture 'lmaoa' is not supported");
	fam_refused(fam_patched(keep, "\x06\x00\x00\x00\x00\x00\x00\x00llama3",
				"\x06\x00\x00\x00\x00\x00\x00\x00yarnxx", 14),
		    "rope scaling type 'yarnxx' is not supported");
	const char *qwen2 = fam_make("refuse-qwen2", qwen2_flags);
	snprintf(keep, sizeof(keep), "%s", qwen2);
	fam_refused(fam_patched(keep, "blk.1.attn_k.bias", "blk.1.attn_k.bia_", 17),
		    "blk.1.attn_k.bias is missing");
}

/* --vocab-file copies a byte-level BPE vocabulary: the model's tokenizer is GPT-2's, and a
 * qwen2 model of it runs. */
Test(families, vocab_file_copies_the_bpe_vocabulary, .fini = fam_teardown, .timeout = 120)
{
	const char *dir = getenv("SKV_VOCAB_DIR");
	cr_assert(dir && *dir, "SKV_VOCAB_DIR is not set: run the tests through `meson test`");
	char vocab_file[4096];
	snprintf(vocab_file, sizeof(vocab_file), "%s/ggml-vocab-gpt-2.gguf", dir);
	const char *const flags[] = { "--arch", "qwen2", "--vocab-file", vocab_file, NULL };
	char msg[256] = "";
	const char *path = fam_make_vocab("vocab", flags);
	cr_assert_eq(skv_model_open(path, &model, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(model->cfg.vocab_size, 50257);
	struct skv_gguf_str s;
	cr_assert_eq(skv_gguf_get_str(model->gguf, "tokenizer.ggml.pre", &s), 0);
	cr_assert(s.len == 5 && !memcmp(s.ptr, "gpt-2", 5));
	cr_assert_eq(skv_gguf_get_str(model->gguf, "tokenizer.ggml.model", &s), 0);
	cr_assert(s.len == 4 && !memcmp(s.ptr, "gpt2", 4));
	struct skv_tokenizer *tok;
	cr_assert_eq(skv_tokenizer_from_gguf(model->gguf, model->cfg.vocab_size, &tok, msg,
					     sizeof(msg)), 0, "%s", msg);
	int32_t *ids;
	size_t n;
	cr_assert_eq(skv_tokenizer_encode(tok, "Hello world", 11, 0, 0, &ids, &n), 0);
	cr_assert_eq(n, 2);
	cr_assert_eq(ids[0], 15496); /* models/vocab/ggml-vocab-gpt-2.gguf.out */
	cr_assert_eq(ids[1], 995);
	free(ids);
	skv_tokenizer_free(tok);
	cr_assert_eq(skv_runner_new(model, 4, 1, &runner, msg, sizeof(msg)), 0, "%s", msg);
	vocab = model->cfg.vocab_size;
	fam_compare(4, 12, 1, 24, 4000000);
}

/* Pythia's layout: partial rotary (a quarter of each head, NEOX halves), LayerNorm with
 * biases, GELU, biases on every linear, fused qkv, parallel residual. */
Test(families, gptneox_matches_reference, .fini = fam_teardown, .timeout = 300)
{
	static const char *const flags[] = { "--arch", "gptneox", "--kv-heads", "4", NULL };
	fam_load("gptneox", flags);
	const struct skv_model_config *c = &model->cfg;
	cr_assert_eq(c->arch, SKV_ARCH_GPTNEOX);
	cr_assert_eq(c->rope_dims, 4);
	cr_assert_eq(c->head_size, 16);
	cr_assert_eq(c->rope_order, SKV_ROPE_NEOX);
	cr_assert(c->layer_norm && c->gelu_ffn && c->parallel_residual);
	const struct skv_layer_weights *w = &model->layers[1];
	cr_assert_null(w->w1.data);
	cr_assert_eq((const char *)w->wk.data,
		     (const char *)w->wq.data + (size_t)c->dim * w->wq.row_bytes);
	cr_assert(w->bo && w->b_up && w->b_down && w->attn_norm_b && w->ffn_norm_b);
	cr_assert_not_null(model->final_norm_b);
	fam_all_policies();
}

Test(families, gptneox_missing_fused_qkv_is_refused, .fini = tu_scratch_cleanup)
{
	static const char *const flags[] = { "--arch", "gptneox", "--kv-heads", "4", NULL };
	char keep[4096];
	snprintf(keep, sizeof(keep), "%s", fam_make("refuse-neox", flags));
	fam_refused(fam_patched(keep, "blk.0.attn_qkv.weight", "blk.0.attn_qkv.weighx", 21),
		    "blk.0.attn_qkv.weight is missing");
}

/* Falcon: multi-query attention (one KV head), attention and MLP in parallel on one
 * LayerNorm, GELU, NEOX RoPE over whole heads, no biases on the linears. */
Test(families, falcon_matches_reference, .fini = fam_teardown, .timeout = 300)
{
	static const char *const flags[] = { "--arch", "falcon", "--kv-heads", "1", NULL };
	fam_load("falcon", flags);
	const struct skv_model_config *c = &model->cfg;
	cr_assert_eq(c->arch, SKV_ARCH_FALCON);
	cr_assert_eq(c->n_kv_heads, 1);
	cr_assert_eq(c->rope_dims, c->head_size);
	cr_assert(c->layer_norm && c->gelu_ffn && c->parallel_residual);
	const struct skv_layer_weights *w = &model->layers[0];
	cr_assert_eq(w->ffn_norm, w->attn_norm);
	cr_assert_null(w->bq);
	cr_assert_null(w->bo);
	cr_assert_null(w->w1.data);
	fam_all_policies();
}

/* MPT: ALiBi instead of rotary (max bias 8, slopes 2^-2, 2^-4, 2^-6, 2^-8 for 4 heads), the
 * bias distance of a sink the in-cache one; LayerNorm, GELU, fused qkv, no biases (MPT-7B's
 * layout), sequential residual, grouped-query attention too. */
Test(families, mpt_alibi_matches_reference, .fini = fam_teardown, .timeout = 300)
{
	static const char *const flags[] = { "--arch", "mpt", NULL };
	fam_load("mpt", flags);
	const struct skv_model_config *c = &model->cfg;
	cr_assert_eq(c->arch, SKV_ARCH_MPT);
	cr_assert_eq(c->alibi_max_bias, 8.0f);
	cr_assert_eq(c->clamp_kqv, 0.0f);
	cr_assert_eq(c->n_kv_heads, 2);
	cr_assert(c->layer_norm && c->gelu_ffn && !c->parallel_residual);
	const struct skv_layer_weights *w = &model->layers[1];
	cr_assert_null(w->w1.data);
	cr_assert_null(w->bq);
	cr_assert_null(w->bo);
	cr_assert_null(w->attn_norm_b);
	cr_assert_null(model->final_norm_b);
	cr_assert_neq(w->ffn_norm, w->attn_norm);
	fam_all_policies();
}

/* clamp_kqv (MPT's clip_qkv) after the fused projection, and a head count that is not a power
 * of two (6: slopes of 4 heads, then the odd ones of 8). */
Test(families, mpt_clamp_and_six_heads_match_reference, .fini = fam_teardown, .timeout = 300)
{
	static const char *const flags[] = { "--arch", "mpt", "--dim", "48", "--heads", "6",
					     "--kv-heads", "6", "--clamp-kqv", "0.75", NULL };
	fam_load("mpt6", flags);
	cr_assert_eq(model->cfg.clamp_kqv, 0.75f);
	cr_assert_eq(model->cfg.n_heads, 6);
	fam_all_policies();
}

/* ggml's slopes (llama.cpp's MPT and BLOOM): m0^(h + 1) for the first power of two of heads,
 * m1^(2 (h - n') + 1) for the rest; the ALiBi paper's geometric sequence. */
Test(families, alibi_slopes)
{
	float s[12];
	skv_alibi_slopes(s, 8, 8.0f);
	for (int h = 0; h < 8; h++)
		cr_assert_float_eq(s[h], ldexp(1.0, -(h + 1)), 1e-7, "head %d", h);
	skv_alibi_slopes(s, 12, 8.0f);
	for (int h = 0; h < 8; h++)
		cr_assert_float_eq(s[h], ldexp(1.0, -(h + 1)), 1e-7, "head %d", h);
	for (int h = 8; h < 12; h++)
		cr_assert_float_eq(s[h], pow(2.0, -0.5 - (h - 8)), 1e-7, "head %d", h);
	skv_alibi_slopes(s, 4, 8.0f);
	cr_assert_float_eq(s[0], 0.25, 1e-8);
	cr_assert_float_eq(s[3], 1.0 / 256, 1e-9);
}

/* The engine's ALiBi kernels, every ISA copy, against scores computed here: a stream of 3
 * sinks and a wrapped window of 5, the sinks' distance taken from alibi_sink_pos. */
Test(families, alibi_kernel_ranges_every_isa)
{
	struct skv_kv_desc desc;
	const uint32_t hs = 8, heads = 2, sinks = 3, window = 5;
	cr_assert_eq(skv_kv_layout_init(&desc, 1, 1, hs, sinks, window), 0);
	void *region = calloc(1, desc.region_bytes);
	float k[8], v[8];
	uint32_t state = 7;
	for (uint32_t slot = 0; slot < sinks + window; slot++) {
		for (uint32_t d = 0; d < hs; d++) {
			state = state * 1103515245u + 12345u;
			k[d] = (float)((state >> 8) % 1000) / 500.0f - 1.0f;
			v[d] = (float)((state >> 12) % 1000) / 500.0f - 1.0f;
		}
		skv_kv_store_row(&desc, region, 0, slot, k, v);
	}
	float q[16], slopes[2] = { 0.5f, 0.125f };
	for (uint32_t i = 0; i < 16; i++)
		q[i] = (float)i / 8.0f - 1.0f;
	/* Window head at slot 5 (order: slots 5, 6, 7, 3, 4), the newest at slot 4. */
	struct skv_kv_step step = { .abs_pos = 1000, .slot = 4, .cache_pos = 7, .sink_count = 3,
				    .window_head = 5, .window_fill = 5 };
	static const uint32_t order[8] = { 0, 1, 2, 5, 6, 7, 3, 4 };
	float want[16];
	const float *kp = skv_kv_k_plane(region, &desc, 0), *vp = skv_kv_v_plane(region, &desc, 0);
	for (uint32_t h = 0; h < heads; h++) {
		double sc[8], max = -INFINITY, sum = 0.0;
		for (uint32_t i = 0; i < 8; i++) {
			double dot = 0.0;
			for (uint32_t d = 0; d < hs; d++)
				dot += q[h * hs + d] * kp[d * desc.slot_stride + order[i]];
			sc[i] = dot / sqrt((double)hs) - slopes[h] * (7.0 - i);
			max = fmax(max, sc[i]);
		}
		for (uint32_t i = 0; i < 8; i++)
			sum += sc[i] = exp(sc[i] - max);
		for (uint32_t d = 0; d < hs; d++) {
			double acc = 0.0;
			for (uint32_t i = 0; i < 8; i++)
				acc += sc[i] / sum * vp[d * desc.slot_stride + order[i]];
			want[h * hs + d] = (float)acc;
		}
	}
	float *scores = aligned_alloc(64, SKV_ATTN_GROUP_HEADS * desc.slot_stride * sizeof(float) + 64);
	static const char *const isas[] = { "v4", "v3", "base" };
	int ran = 0;
	for (size_t i = 0; i < 3; i++) {
		float out[16];
		struct skv_attn_args args = { .q_window = q, .q_sink = q, .k_plane = kp,
					      .v_plane = vp, .desc = &desc, .step = &step,
					      .n_heads = heads, .scores = scores, .out = out,
					      .alibi_slopes = slopes, .alibi_sink_pos = 7 };
		if (skv_attend_isa(isas[i], &args) == -ENOTSUP)
			continue;
		ran++;
		for (uint32_t j = 0; j < 16; j++)
			cr_assert_float_eq(out[j], want[j], 1e-5, "%s: component %u", isas[i], j);
	}
	cr_assert_gt(ran, 0);
	free(scores);
	free(region);
}

/* MPT layouts streamkv does not run are refused by name: a missing or mis-sized fused qkv, a
 * q/k LayerNorm (qk_ln), a missing max_alibi_bias, learned positions (max_alibi_bias 0, or a
 * position_embd tensor). */
Test(families, mpt_unknown_layout_is_refused, .fini = tu_scratch_cleanup)
{
	static const char *const flags[] = { "--arch", "mpt", NULL };
	char keep[4096];
	snprintf(keep, sizeof(keep), "%s", fam_make("refuse-mpt", flags));
	fam_refused(fam_patched(keep, "blk.0.attn_qkv.weight", "blk.0.attn_qkv.weighx", 21),
		    "blk.0.attn_qkv.weight is missing");
	fam_refused(fam_patched(keep, "blk.1.attn_output.weight", "blk.1.attn_q_norm.weight", 24),
		    "blk.1.attn_q_norm.weight: this mpt layout is not supported");
	fam_refused(fam_patched(keep, "mpt.attention.max_alibi_bias",
				"mpt.attention.max_alibi_biax", 28),
		    "mpt.attention.max_alibi_bias is missing");
	/* max_alibi_bias 8.0f -> 0.0f: MPT with learned positions. */
	fam_refused(fam_patched(keep, "max_alibi_bias\x06\x00\x00\x00\x00\x00\x00\x41",
				"max_alibi_bias\x06\x00\x00\x00\x00\x00\x00\x00", 22),
		    "only MPT with ALiBi");
	/* A fused qkv of the wrong size: mkmodel's 4 heads of 16 read as if kv_dim were 32. */
	fam_refused(fam_patched(keep, "mpt.attention.head_count_kv", "mpt.attention.head_count_kx",
				27),
		    "blk.0.attn_qkv.weight has shape");
	/* Learned positions: a position_embd.weight (named in the place of an 11-layer model's
	 * blk.10.ffn_up.weight, the same length). */
	static const char *const deep[] = { "--arch", "mpt", "--layers", "11", NULL };
	snprintf(keep, sizeof(keep), "%s", fam_make("refuse-mpt11", deep));
	fam_refused(fam_patched(keep, "blk.10.ffn_up.weight", "position_embd.weight", 20),
		    "position_embd.weight: mpt with learned positions");
}
