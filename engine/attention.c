#include "attention.h"

#include <errno.h>
#include <math.h>
#include <string.h>

/* The hot loops below are written so that the compiler vectorises them along the slots (one
 * float per slot, contiguous in each K/V row). skv_attend is compiled for three ISA levels and
 * picked at load time, so the same binary runs on any x86-64 and uses AVX-512 where present. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
	!defined(__SANITIZE_ADDRESS__)
#define ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTN_CLONES
#endif
#define ATTN_INLINE static inline __attribute__((always_inline))
/* Vector arguments of the always-inlined helpers never cross a call boundary. */
#pragma GCC diagnostic ignored "-Wpsabi"

int skv_rope_init(struct skv_rope *rope, uint32_t head_size, float theta)
{
	if (!head_size || head_size % 2 || head_size / 2 > SKV_ROPE_MAX_PAIRS || !(theta > 0))
		return -EINVAL;
	rope->head_size = head_size;
	rope->pairs = head_size / 2;
	/* Same float32 arithmetic as llama2.c, so short sequences rotate bit-for-bit alike. */
	for (uint32_t i = 0; i < rope->pairs; i++)
		rope->inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)head_size);
	return 0;
}

void skv_rope_angles(const struct skv_rope *rope, uint64_t pos, float *cos_out, float *sin_out)
{
	for (uint32_t i = 0; i < rope->pairs; i++) {
		double angle = (double)pos * (double)rope->inv_freq[i];
		cos_out[i] = (float)cos(angle);
		sin_out[i] = (float)sin(angle);
	}
}

void skv_rope_rotate(const struct skv_rope *rope, float *vec, uint32_t n_heads,
		     const float *cos_tab, const float *sin_tab)
{
	for (uint32_t h = 0; h < n_heads; h++) {
		float *head = vec + (size_t)h * rope->head_size;
		for (uint32_t i = 0; i < rope->pairs; i++) {
			float v0 = head[2 * i], v1 = head[2 * i + 1];
			head[2 * i] = v0 * cos_tab[i] - v1 * sin_tab[i];
			head[2 * i + 1] = v0 * sin_tab[i] + v1 * cos_tab[i];
		}
	}
}

/* The kernels work on 16 slots at a time through GCC's vector extensions: one AVX-512
 * register in the x86-64-v4 clone, two AVX2 registers or four SSE registers in the others. */
typedef float attn_vf __attribute__((vector_size(64)));
typedef int32_t attn_vi __attribute__((vector_size(64)));
typedef float attn_vf_u __attribute__((vector_size(64), aligned(4))); /* unaligned access */
#define ATTN_LANES 16

ATTN_INLINE attn_vf attn_load(const float *p)
{
	return *(const attn_vf_u *)p;
}

ATTN_INLINE void attn_store(float *p, attn_vf v)
{
	*(attn_vf_u *)p = v;
}

ATTN_INLINE attn_vf attn_splat(float x)
{
	return (attn_vf){} + x;
}

ATTN_INLINE attn_vf attn_select(attn_vi mask, attn_vf yes, attn_vf no)
{
	return (attn_vf)(((attn_vi)yes & mask) | ((attn_vi)no & ~mask));
}

ATTN_INLINE float attn_hsum(attn_vf v)
{
	float sum = 0.0f;
	for (int i = 0; i < ATTN_LANES; i++)
		sum += v[i];
	return sum;
}

ATTN_INLINE float attn_hmax(attn_vf v)
{
	float m = v[0];
	for (int i = 1; i < ATTN_LANES; i++)
		m = v[i] > m ? v[i] : m;
	return m;
}

/* exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2], exp(r) by a degree-6 polynomial
 * (Taylor coefficients; relative error below 2e-7 on that interval). Inputs are clamped to
 * [-87, 88] so that 2^k stays a normal float; the softmax only feeds x <= 0. */
ATTN_INLINE attn_vf attn_vexp(attn_vf x)
{
	const attn_vf lo = attn_splat(-87.0f), hi = attn_splat(88.0f);
	x = attn_select(x < lo, lo, x);
	x = attn_select(x > hi, hi, x);
	/* Round to nearest by adding and subtracting 1.5 * 2^23. */
	const attn_vf shifter = attn_splat(12582912.0f);
	attn_vf k = (x * attn_splat(1.44269504088896341f) + shifter) - shifter;
	attn_vf r = x - k * attn_splat(0.693145751953125f);
	r = r - k * attn_splat(1.42860682030941723212e-6f);
	attn_vf p = attn_splat(1.0f / 720.0f);
	p = p * r + attn_splat(1.0f / 120.0f);
	p = p * r + attn_splat(1.0f / 24.0f);
	p = p * r + attn_splat(1.0f / 6.0f);
	p = p * r + attn_splat(0.5f);
	p = p * r + attn_splat(1.0f);
	p = p * r + attn_splat(1.0f);
	attn_vi ki = __builtin_convertvector(k, attn_vi);
	attn_vf scale = (attn_vf)((ki + 127) << 23);
	return p * scale;
}

float skv_expf(float x)
{
	x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
	float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
	float r = x - k * 0.693145751953125f;
	r = r - k * 1.42860682030941723212e-6f;
	float p = 1.0f / 720.0f;
	p = p * r + 1.0f / 120.0f;
	p = p * r + 1.0f / 24.0f;
	p = p * r + 1.0f / 6.0f;
	p = p * r + 0.5f;
	p = p * r + 1.0f;
	p = p * r + 1.0f;
	union {
		int32_t i;
		float f;
	} scale = { .i = ((int32_t)k + 127) << 23 };
	return p * scale.f;
}

struct attn_range {
	uint32_t lo, hi;
	const float *q;
};

/* Scores of one or two query heads that share a KV head (grouped-query attention), so that
 * each K vector is loaded once for both: s_i[t] = scale * (q_i . K[:, t]) for t in [lo, hi).
 * Updates max_i. With pair == 0 only head 0 is computed (the compiler drops the rest). */
ATTN_INLINE void attn_scores(int pair, const float *restrict q0, const float *restrict q1,
			     const float *restrict k_rows, size_t stride, uint32_t head_size,
			     uint32_t lo, uint32_t hi, float scale, float *restrict s0,
			     float *restrict s1, float *max0, float *max1)
{
	attn_vf vmax0 = attn_splat(-INFINITY), vmax1 = vmax0;
	uint32_t t = lo;
	for (; t + ATTN_LANES <= hi; t += ATTN_LANES) {
		attn_vf k = attn_load(k_rows + t);
		attn_vf acc0 = q0[0] * k, acc1 = pair ? q1[0] * k : k;
		for (uint32_t d = 1; d < head_size; d++) {
			k = attn_load(k_rows + d * stride + t);
			acc0 += q0[d] * k;
			if (pair)
				acc1 += q1[d] * k;
		}
		acc0 *= scale;
		attn_store(s0 + t, acc0);
		vmax0 = attn_select(acc0 > vmax0, acc0, vmax0);
		if (pair) {
			acc1 *= scale;
			attn_store(s1 + t, acc1);
			vmax1 = attn_select(acc1 > vmax1, acc1, vmax1);
		}
	}
	float m0 = attn_hmax(vmax0), m1 = pair ? attn_hmax(vmax1) : 0.0f;
	for (; t < hi; t++) {
		float acc0 = 0.0f, acc1 = 0.0f;
		for (uint32_t d = 0; d < head_size; d++) {
			float k = k_rows[d * stride + t];
			acc0 += q0[d] * k;
			acc1 += pair ? q1[d] * k : 0.0f;
		}
		s0[t] = acc0 * scale;
		m0 = s0[t] > m0 ? s0[t] : m0;
		if (pair) {
			s1[t] = acc1 * scale;
			m1 = s1[t] > m1 ? s1[t] : m1;
		}
	}
	*max0 = m0 > *max0 ? m0 : *max0;
	if (pair)
		*max1 = m1 > *max1 ? m1 : *max1;
}

/* s[t] = exp(s[t] - max) over [lo, hi); returns their sum. */
ATTN_INLINE float attn_exp_sum(float *restrict s, uint32_t lo, uint32_t hi, float max)
{
	attn_vf vsum = attn_splat(0.0f), vmax = attn_splat(max);
	float sum = 0.0f;
	uint32_t t = lo;
	for (; t + ATTN_LANES <= hi; t += ATTN_LANES) {
		attn_vf e = attn_vexp(attn_load(s + t) - vmax);
		attn_store(s + t, e);
		vsum += e;
	}
	for (; t < hi; t++) {
		s[t] = skv_expf(s[t] - max);
		sum += s[t];
	}
	return sum + attn_hsum(vsum);
}

/* out_i[d] += sum over t in [lo, hi) of p_i[t] * V[d][t], one or two heads per V load. */
ATTN_INLINE void attn_values(int pair, const float *restrict p0, const float *restrict p1,
			     const float *restrict v_rows, size_t stride, uint32_t head_size,
			     uint32_t lo, uint32_t hi, float *restrict out0, float *restrict out1)
{
	for (uint32_t d = 0; d < head_size; d++) {
		const float *row = v_rows + d * stride;
		attn_vf vacc0 = attn_splat(0.0f), vacc1 = vacc0;
		float acc0 = 0.0f, acc1 = 0.0f;
		uint32_t t = lo;
		for (; t + ATTN_LANES <= hi; t += ATTN_LANES) {
			attn_vf v = attn_load(row + t);
			vacc0 += attn_load(p0 + t) * v;
			if (pair)
				vacc1 += attn_load(p1 + t) * v;
		}
		for (; t < hi; t++) {
			acc0 += p0[t] * row[t];
			acc1 += pair ? p1[t] * row[t] : 0.0f;
		}
		out0[d] += acc0 + attn_hsum(vacc0);
		if (pair)
			out1[d] += acc1 + attn_hsum(vacc1);
	}
}

/* Softmax-weighted sum for one or two heads of KV head g over the step's ranges. */
ATTN_INLINE void attn_heads(int pair, const struct skv_attn_args *args,
			    const struct attn_range *ranges, uint32_t n_ranges, uint32_t h,
			    const float *k_rows, const float *v_rows, size_t stride,
			    uint32_t hs, float scale)
{
	float *s0 = args->scores, *s1 = args->scores + stride;
	float *out0 = args->out + (size_t)h * hs, *out1 = out0 + hs;
	float max0 = -INFINITY, max1 = -INFINITY;

	for (uint32_t r = 0; r < n_ranges; r++)
		attn_scores(pair, ranges[r].q + (size_t)h * hs, ranges[r].q + (size_t)(h + 1) * hs,
			    k_rows, stride, hs, ranges[r].lo, ranges[r].hi, scale, s0, s1, &max0,
			    &max1);
	float sum0 = 0.0f, sum1 = 0.0f;
	for (uint32_t r = 0; r < n_ranges; r++) {
		sum0 += attn_exp_sum(s0, ranges[r].lo, ranges[r].hi, max0);
		if (pair)
			sum1 += attn_exp_sum(s1, ranges[r].lo, ranges[r].hi, max1);
	}
	memset(out0, 0, hs * sizeof(float) * (pair ? 2 : 1));
	for (uint32_t r = 0; r < n_ranges; r++)
		attn_values(pair, s0, s1, v_rows, stride, hs, ranges[r].lo, ranges[r].hi, out0,
			    out1);
	for (uint32_t d = 0; d < hs; d++) {
		out0[d] *= 1.0f / sum0;
		if (pair)
			out1[d] *= 1.0f / sum1;
	}
}

ATTN_CLONES
void skv_attend(const struct skv_attn_args *args)
{
	const struct skv_kv_desc *desc = args->desc;
	const struct skv_kv_step *step = args->step;
	uint32_t hs = desc->head_size;
	size_t stride = desc->slot_stride;
	uint32_t kv_mul = args->n_heads / desc->n_kv_heads;
	uint32_t ring_end = desc->sink_slots + desc->window_slots;
	float inv_sqrt = 1.0f / sqrtf((float)hs);

	/* Valid slots of this step: the sinks, then the window from its head, wrapping once. */
	struct attn_range ranges[3];
	uint32_t n_ranges = 0;
	if (step->sink_count)
		ranges[n_ranges++] = (struct attn_range){ 0, step->sink_count, args->q_sink };
	if (step->window_fill) {
		uint32_t end = step->window_head + step->window_fill;
		uint32_t first_end = end < ring_end ? end : ring_end;
		ranges[n_ranges++] =
			(struct attn_range){ step->window_head, first_end, args->q_window };
		if (end > ring_end)
			ranges[n_ranges++] = (struct attn_range){
				desc->sink_slots, desc->sink_slots + (end - ring_end), args->q_window
			};
	}
	/* Adjacent ranges scored with the same query are one run of slots: merging them makes
	 * the arithmetic (and so the result) identical to a cache without sinks, e.g. sink with
	 * a window not yet full against dense. */
	uint32_t merged = 0;
	for (uint32_t r = 0; r < n_ranges; r++) {
		if (merged && ranges[merged - 1].hi == ranges[r].lo &&
		    ranges[merged - 1].q == ranges[r].q)
			ranges[merged - 1].hi = ranges[r].hi;
		else
			ranges[merged++] = ranges[r];
	}
	n_ranges = merged;

	for (uint32_t g = 0; g < desc->n_kv_heads; g++) {
		const float *k_rows = args->k_plane + (size_t)g * hs * stride;
		const float *v_rows = args->v_plane + (size_t)g * hs * stride;
		uint32_t h = g * kv_mul, end = h + kv_mul;
		/* The common head sizes get their own constant-folded copy of the loops. */
		for (; h + 2 <= end; h += 2) {
			if (hs == 8)
				attn_heads(1, args, ranges, n_ranges, h, k_rows, v_rows, stride, 8,
					   inv_sqrt);
			else
				attn_heads(1, args, ranges, n_ranges, h, k_rows, v_rows, stride, hs,
					   inv_sqrt);
		}
		if (h < end)
			attn_heads(0, args, ranges, n_ranges, h, k_rows, v_rows, stride, hs,
				   inv_sqrt);
	}
}
