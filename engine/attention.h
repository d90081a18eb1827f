/* Rotary position embedding and attention over a stream's KV slots, in place.
 *
 * Positions as StreamingLLM defines them. The model must see the sinks at positions
 * 0..S-1 and the window at S..S+fill-1, in order, whatever the token's place in the text. The
 * paper's code keeps pre-RoPE keys and rotates all of them again at every step. We keep every
 * key rotated once, at its absolute position a_k, when it is appended. RoPE scores depend only on
 * the difference of the two rotations (R(x)q . R(y)k = q . R(y - x)k), so:
 *   - window keys: their in-cache distance to the query equals their distance in the text (the
 *     window is a contiguous run of the text), so the query rotated at its absolute position
 *     a_q scores them exactly as the re-rotation does;
 *   - sink keys: sink j sits at absolute position j, which is also its in-cache position, so the
 *     query rotated at its in-cache position p_q scores them exactly as the re-rotation does.
 * One extra rotation of the query per step replaces re-rotating S + W keys. Angles are computed
 * from the integer position in double precision, so the result stays exact after millions of
 * tokens (float32 angles lose whole radians past 2^24).
 *
 * Thread safety: pure functions over the buffers passed in. */
#ifndef SKV_ATTENTION_H
#define SKV_ATTENTION_H

#include <stdint.h>

#include "kv-layout.h"

#define SKV_ROPE_MAX_PAIRS 256

/* Inverse frequencies of the rotary pairs of one head, as llama2.c computes them
 * (1 / theta^(2i / head_size) in float32). */
struct skv_rope {
	uint32_t head_size;
	uint32_t pairs;                     /* rotated dims / 2 (head_size / 2 unless partial) */
	float inv_freq[SKV_ROPE_MAX_PAIRS]; /* [pairs] */
};

/* -EINVAL if head_size is odd, zero or above 2 * SKV_ROPE_MAX_PAIRS. */
int skv_rope_init(struct skv_rope *rope, uint32_t head_size, float theta);

/* cos/sin of every pair's angle at an integer position, computed in double. [pairs] each. */
void skv_rope_angles(const struct skv_rope *rope, uint64_t pos, float *cos_out, float *sin_out);

/* Rotate n_heads consecutive heads of vec (interleaved pairs, as llama2.c) in place. */
void skv_rope_rotate(const struct skv_rope *rope, float *vec, uint32_t n_heads,
		     const float *cos_tab, const float *sin_tab);

/* Partial rotary (GPT-NeoX): only the first rot_dims components of each head of head_size
 * rotate, at 1 / theta^(2i / rot_dims); the rest never move. rot_dims even, <= head_size.
 * skv_rope_init is this with rot_dims == head_size. */
int skv_rope_init_partial(struct skv_rope *rope, uint32_t head_size, uint32_t rot_dims,
			  float theta);

/* Llama 3.1's `llama3` rope scaling of the inverse frequencies, as llama.cpp and Hugging Face
 * apply it: with wavelength w = 2 pi / f, w < ctx / high keeps f, w > ctx / low takes
 * f / factor, in between s = (ctx / w - low) / (high - low) and f' = (1 - s) f / factor + s f.
 * -EINVAL unless factor >= 1, 0 < low < high, ctx > 0. */
int skv_rope_scale_llama3(struct skv_rope *rope, float factor, float low_freq_factor,
			  float high_freq_factor, float original_context);

/* GGUF rope_freqs.weight: f_i / factors[i] for each pair (what llama.cpp does with them). */
void skv_rope_divide(struct skv_rope *rope, const float *factors);

/* The same rotation in GPT-NeoX order: component i pairs with i + rot_dims / 2 (halves of
 * the rotated part, not interleaved pairs), as llama.cpp's NEOX rope type. */
void skv_rope_rotate_neox(const struct skv_rope *rope, float *vec, uint32_t n_heads,
			  const float *cos_tab, const float *sin_tab);

/* Query heads of one KV head whose scores are made together (rows of the scratch). */
#define SKV_ATTN_GROUP_HEADS 8u

/* One query row of one layer attending over one stream's KV planes. */
struct skv_attn_args {
	const float *q_window;  /* [n_heads][head_size], rotated at the token's absolute position */
	const float *q_sink;    /* [n_heads][head_size], rotated at the position the sinks must see */
	const void *k_plane;    /* [n_kv_heads][head_size][slot_stride] of desc->dtype (float32,
				 * _Float16, or int8 codes with their scales), see kv-layout.h */
	const void *v_plane;    /* same shape */
	const struct skv_kv_desc *desc;
	const struct skv_kv_step *step; /* which slots are valid for this row */
	uint32_t n_heads;
	float *scores;          /* scratch, [SKV_ATTN_GROUP_HEADS][slot_stride] floats, 64-byte
				 * aligned: the scores of the heads of one KV head scored together */
	float *out;             /* [n_heads][head_size] */
	/* ALiBi (mpt; NULL: none): head h's score of a key gets -alibi_slopes[h] * distance, the
	 * query's in-cache position minus the key's. Window keys lie in text order, so their
	 * distance is the text distance, from step's window_head and window_fill; the sinks'
	 * is alibi_sink_pos - j for sink j, alibi_sink_pos being the position the sinks see
	 * the query at (step->cache_pos, or the absolute position for --positions abs). One
	 * offset per slot range: nothing is stored per key, nothing re-biased per step. */
	const float *alibi_slopes;  /* [n_heads] */
	uint64_t alibi_sink_pos;
};

void skv_attend(const struct skv_attn_args *args);

/* The same through one ISA copy of the kernels, "v4" (AVX-512), "v3" (AVX2 + FMA) or "base",
 * for tests that check every copy. Returns 0, or -ENOTSUP when this build lacks that copy or
 * this CPU cannot run it (nothing is computed). */
int skv_attend_isa(const char *isa, const struct skv_attn_args *args);

/* Store one token's rotated key and its value into slot `slot` of layer `layer` of the region
 * at base (desc validated, slot < slot_stride): element j of k and v goes to row j of the K and
 * V planes. k and v are [n_kv_heads * head_size] floats. float32 is stored as is; f16 rounds to
 * nearest, saturating at +-65504 (an infinity would turn a whole softmax into NaN); q8 stores,
 * per kv head, scale = max |x| / 127 and codes round(x / scale) in [-127, 127] (an all-zero head
 * stores scale 0; a head with a NaN or an infinity stores scale NaN, so that it poisons the
 * scores as it would in float32). Called by the engine serving the stream (the one writer of
 * its KV); touches nothing else. */
void skv_kv_store_row(const struct skv_kv_desc *desc, void *base, uint32_t layer, uint32_t slot,
		      const float *k, const float *v);

/* ALiBi's slope of every head as ggml computes them (llama.cpp's MPT): with n' the largest
 * power of two <= n_heads, m0 = 2^(-max_bias / n') and m1 = 2^(-max_bias / 2 / n'), head h < n'
 * gets m0^(h + 1), head h >= n' gets m1^(2 (h - n') + 1) (the ALiBi paper's slopes for n', then
 * the odd ones of 2 n' for the rest). slopes[n_heads]. */
void skv_alibi_slopes(float *slopes, uint32_t n_heads, float max_bias);

/* expf for the softmax, vectorisable; max relative error below 2e-7 on [-87, 0]. */
float skv_expf(float x);

/* SwiGLU of the FFN, row by row: out[r][i] = silu(gu[r][i]) * gu[r][hidden + i], where each
 * row of gu holds the gate then the up projection ([rows][2 * hidden]); out is [rows][hidden]. */
void skv_swiglu(float *out, const float *gu, uint32_t rows, uint32_t hidden);

#endif
