/* Attention and SwiGLU kernels. This file is compiled once per instruction set (see
 * engine/meson.build): with -march=x86-64-v4 (AVX-512), -march=x86-64-v3 (AVX2 + FMA) and for
 * the baseline, each copy naming its entry points with its ISA (ATTN_ISA). attention.c picks
 * the best copy for the CPU at the first call. The loops run 16 slots at a time through GCC's
 * vector extensions: one AVX-512 register in the v4 copy, two AVX2 or four SSE registers in the
 * others. Separate compilations rather than target attributes or target_clones: GCC 12 lowers
 * generic vector comparisons in helper functions for the ISA of the helper, not of its caller,
 * which turned the masked loops into scalar code. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention-pvt.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define ATTN_INLINE static inline __attribute__((always_inline))
/* Vector arguments of the always-inlined helpers never cross a call boundary. */
#pragma GCC diagnostic ignored "-Wpsabi"

ATTN_INLINE attn_vf attn_load(const float *p)
{
	return *(const attn_vf_u *)p;
}

/* 16 KV elements from element index idx of a plane of element type kind (ATTN_KV_*, a
 * constant at each call): float32; half precision widened to float32 (one vcvtph2ps on
 * AVX-512); or int8 codes widened to float32 (vpmovsxbd + vcvtdq2ps), still unscaled: the q8
 * callers fold the slot's scale into the score or the probability, once per slot. */
typedef _Float16 attn_vh_u __attribute__((vector_size(ATTN_LANES * 2), aligned(2)));
typedef int8_t attn_vb_u __attribute__((vector_size(ATTN_LANES), aligned(1)));

ATTN_INLINE attn_vf attn_load_kv(const void *plane, size_t idx, int kind)
{
	if (kind == ATTN_KV_F32)
		return attn_load((const float *)plane + idx);
	if (kind == ATTN_KV_Q8) {
		const int8_t *p = (const int8_t *)plane + idx;
#if defined(__AVX512F__)
		return (attn_vf)_mm512_cvtepi32_ps(
			_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
		/* Two halves of 8 (GCC 12 lowers the generic conversion below lane by lane). */
		union { __m256 half[2]; attn_vf whole; } u;
		u.half[0] = _mm256_cvtepi32_ps(
			_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
		u.half[1] = _mm256_cvtepi32_ps(
			_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
		return u.whole;
#else
		return __builtin_convertvector(*(const attn_vb_u *)p, attn_vf);
#endif
	}
	const _Float16 *p = (const _Float16 *)plane + idx;
#if defined(__AVX512F__)
	return (attn_vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__AVX2__) && defined(__F16C__)
	union { __m256 half[2]; attn_vf whole; } u;
	u.half[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
	u.half[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
	return u.whole;
#else
	return __builtin_convertvector(*(const attn_vh_u *)p, attn_vf);
#endif
}

ATTN_INLINE size_t attn_elem_bytes(int kind)
{
	return kind == ATTN_KV_F32 ? 4 : kind == ATTN_KV_F16 ? 2 : 1;
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

/* Horizontal sum and max as a tree of four shuffles: a lane-by-lane loop is a chain of 15
 * dependent scalar operations, which cost more than the dot products of a short window. */
ATTN_INLINE float attn_hsum(attn_vf v)
{
	v += __builtin_shuffle(v, (attn_vi){ 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7 });
	v += __builtin_shuffle(v, (attn_vi){ 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11 });
	v += __builtin_shuffle(v, (attn_vi){ 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13 });
	v += __builtin_shuffle(v, (attn_vi){ 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14 });
	return v[0];
}

ATTN_INLINE attn_vf attn_vmax(attn_vf a, attn_vf b)
{
	return attn_select(a > b, a, b);
}

ATTN_INLINE float attn_hmax(attn_vf v)
{
	v = attn_vmax(v, __builtin_shuffle(v, (attn_vi){ 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3,
							  4, 5, 6, 7 }));
	v = attn_vmax(v, __builtin_shuffle(v, (attn_vi){ 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8,
							  9, 10, 11 }));
	v = attn_vmax(v, __builtin_shuffle(v, (attn_vi){ 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14,
							  15, 12, 13 }));
	v = attn_vmax(v, __builtin_shuffle(v, (attn_vi){ 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13,
							  12, 15, 14 }));
	return v[0];
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


/* Ranges are processed in whole blocks of 16 slots aligned to the row start: a row is
 * slot_stride floats, a multiple of 16, so a block never reads outside its row. Lanes outside
 * [lo, hi) are masked: their scores are not stored, not counted in the max or the sum, and
 * their products with V are dropped (selected away, never multiplied by zero, so a stale NaN in
 * an unused slot cannot leak in). No scalar tail loops. */
ATTN_INLINE attn_vi attn_mask(uint32_t block, uint32_t lo, uint32_t hi)
{
	const attn_vi lanes = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };
	attn_vi idx = lanes + (int32_t)block;
	return (idx >= (int32_t)lo) & (idx < (int32_t)hi);
}

/* A block lies wholly inside [lo, hi): the common case, which needs no mask. */
ATTN_INLINE int attn_full(uint32_t block, uint32_t lo, uint32_t hi)
{
	return block >= lo && block + ATTN_LANES <= hi;
}

/* ALiBi's bias of one or two heads over one range of slots (NULL: no ALiBi). */
struct attn_alibi {
	float slope0, slope1; /* the heads' slopes */
	int64_t origin;       /* slot t lies at distance origin - t from the query */
};

/* nb consecutive blocks of scores (1 to ATTN_SB, a constant at each call); masked != 0 (with
 * nb == 1) handles a partial block. Each block's dot product is a chain of head_size dependent
 * FMAs: one or two heads of one block are too few chains to cover the FMA latency, so full
 * blocks go ATTN_SB at a time (as many as the registers hold), each block's chain the same operations in the same order as
 * alone (the same bits). For q8 the dot runs over the integer codes and the slot's scale
 * multiplies the sum once: the score is that of the dequantized key, without dequantizing
 * each component. */
#if defined(__AVX512F__)
#define ATTN_SB 4 /* 8 accumulators of 32 zmm */
#elif defined(__AVX2__)
#define ATTN_SB 2 /* 4 accumulators of two ymm each, of 16 */
#else
#define ATTN_SB 1 /* four xmm per accumulator */
#endif
ATTN_INLINE void attn_scores_block(int kind, int pair, int masked, const int nb, uint32_t b,
				   uint32_t lo, uint32_t hi, const float *restrict q0,
				   const float *restrict q1, const void *restrict k_rows,
				   const float *restrict k_scale, size_t stride, uint32_t head_size,
				   float scale, const struct attn_alibi *alibi, float *restrict s0,
				   float *restrict s1, attn_vf *vmax0, attn_vf *vmax1)
{
	const attn_vf neg_inf = attn_splat(-INFINITY);
	attn_vf acc0[ATTN_SB], acc1[ATTN_SB];
	for (int j = 0; j < nb; j++) {
		attn_vf k = attn_load_kv(k_rows, b + j * ATTN_LANES, kind);
		acc0[j] = q0[0] * k;
		acc1[j] = pair ? q1[0] * k : k;
	}
	for (uint32_t d = 1; d < head_size; d++) {
		for (int j = 0; j < nb; j++) {
			attn_vf k = attn_load_kv(k_rows, d * stride + b + j * ATTN_LANES, kind);
			acc0[j] += q0[d] * k;
			if (pair)
				acc1[j] += q1[d] * k;
		}
	}
	for (int j = 0; j < nb; j++) {
		uint32_t bj = b + j * ATTN_LANES;
		attn_vf a0 = acc0[j], a1 = acc1[j];
		if (kind == ATTN_KV_Q8) {
			attn_vf slot_scale = attn_load(k_scale + bj) * scale;
			a0 *= slot_scale;
			a1 *= slot_scale;
		} else {
			a0 *= scale;
			a1 *= scale;
		}
		if (alibi) {
			/* In-cache distances are whole numbers below 2^24 (SKV_KV_MAX_SLOTS): exact
			 * in float. (--positions abs gives the sinks larger ones, whose weights
			 * vanish.) */
			const attn_vf lanes = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };
			attn_vf dist = attn_splat((float)(alibi->origin - (int64_t)bj)) - lanes;
			a0 -= attn_splat(alibi->slope0) * dist;
			if (pair)
				a1 -= attn_splat(alibi->slope1) * dist;
		}
		if (masked) {
			attn_vi mask = attn_mask(bj, lo, hi);
			a0 = attn_select(mask, a0, neg_inf);
			attn_store(s0 + bj, attn_select(mask, a0, attn_load(s0 + bj)));
			if (pair) {
				a1 = attn_select(mask, a1, neg_inf);
				attn_store(s1 + bj, attn_select(mask, a1, attn_load(s1 + bj)));
			}
		} else {
			attn_store(s0 + bj, a0);
			if (pair)
				attn_store(s1 + bj, a1);
		}
		*vmax0 = attn_select(a0 > *vmax0, a0, *vmax0);
		if (pair)
			*vmax1 = attn_select(a1 > *vmax1, a1, *vmax1);
	}
}

/* Scores of one or two query heads that share a KV head (grouped-query attention), so that
 * each K vector is loaded once for both: s_i[t] = scale * (q_i . K[:, t]) for t in [lo, hi).
 * Updates max_i. With pair == 0 only head 0 is computed (the compiler drops the rest). */
ATTN_INLINE void attn_scores(int kind, int pair, const float *restrict q0,
			     const float *restrict q1, const void *restrict k_rows,
			     const float *restrict k_scale, size_t stride, uint32_t head_size,
			     uint32_t lo, uint32_t hi, float scale,
			     const struct attn_alibi *alibi, float *restrict s0,
			     float *restrict s1, float *max0, float *max1)
{
	attn_vf vmax0 = attn_splat(-INFINITY), vmax1 = vmax0;
	for (uint32_t b = lo & ~(ATTN_LANES - 1); b < hi;) {
		if (ATTN_SB > 1 && attn_full(b, lo, hi) &&
		    attn_full(b + (ATTN_SB - 1) * ATTN_LANES, lo, hi)) {
			attn_scores_block(kind, pair, 0, ATTN_SB, b, lo, hi, q0, q1, k_rows, k_scale,
					  stride, head_size, scale, alibi,
					  s0, s1, &vmax0, &vmax1);
			b += ATTN_SB * ATTN_LANES;
		} else if (attn_full(b, lo, hi)) {
			attn_scores_block(kind, pair, 0, 1, b, lo, hi, q0, q1, k_rows, k_scale,
					  stride, head_size, scale, alibi,
					  s0, s1, &vmax0, &vmax1);
			b += ATTN_LANES;
		} else {
			attn_scores_block(kind, pair, 1, 1, b, lo, hi, q0, q1, k_rows, k_scale,
					  stride, head_size, scale, alibi,
					  s0, s1, &vmax0, &vmax1);
			b += ATTN_LANES;
		}
	}
	float m0 = attn_hmax(vmax0);
	*max0 = m0 > *max0 ? m0 : *max0;
	if (pair) {
		float m1 = attn_hmax(vmax1);
		*max1 = m1 > *max1 ? m1 : *max1;
	}
}

/* s[t] = exp(s[t] - max) over [lo, hi); returns their sum. A weight below e^-64 (1.6e-28 of the
 * largest, which is 1) is below float32's resolution of the sum and of the weighted V sums, and
 * is flushed to zero: left in, its products with V (and with q8's V scales, 1e-2 and smaller)
 * are subnormal, and subnormal operands cost this CPU's FMAs 10-20 times their normal time
 * (measured: a q8 layer of 512 slots with widely spread scores, 62 us instead of 3.3). */
ATTN_INLINE float attn_exp_sum(float *restrict s, uint32_t lo, uint32_t hi, float max)
{
	const attn_vf zero = attn_splat(0.0f), vmax = attn_splat(max);
	const attn_vf negligible = attn_splat(-64.0f);
	attn_vf vsum = zero;
	for (uint32_t b = lo & ~(ATTN_LANES - 1); b < hi; b += ATTN_LANES) {
		attn_vf old = attn_load(s + b);
		attn_vf x = old - vmax;
		attn_vf e = attn_select(x < negligible, zero, attn_vexp(x));
		if (attn_full(b, lo, hi)) {
			attn_store(s + b, e);
		} else {
			attn_vi mask = attn_mask(b, lo, hi);
			e = attn_select(mask, e, zero);
			attn_store(s + b, attn_select(mask, e, old));
		}
		vsum += e;
	}
	return attn_hsum(vsum);
}

/* Probabilities of block b as the V codes need them: for q8, times each slot's V scale, so that
 * the weighted sum runs over the integer codes with one multiply per slot, not per component. */
ATTN_INLINE attn_vf attn_prob(int kind, const float *restrict p, const float *restrict v_scale,
			      uint32_t b)
{
	attn_vf pv = attn_load(p + b);
	return kind == ATTN_KV_Q8 ? pv * attn_load(v_scale + b) : pv;
}

/* out_i[d] += sum over t in [lo, hi) of p_i[t] * V[d][t], one or two heads per V load. */
ATTN_INLINE void attn_values(int kind, int pair, const float *restrict p0,
			     const float *restrict p1, const void *restrict v_rows,
			     const float *restrict v_scale, size_t stride, uint32_t head_size,
			     uint32_t lo, uint32_t hi, float *restrict out0, float *restrict out1)
{
	const attn_vf zero = attn_splat(0.0f);
	for (uint32_t d = 0; d < head_size; d++) {
		attn_vf vacc0 = zero, vacc1 = zero;
		for (uint32_t b = lo & ~(ATTN_LANES - 1); b < hi; b += ATTN_LANES) {
			attn_vf v = attn_load_kv(v_rows, d * stride + b, kind);
			attn_vf x0 = attn_prob(kind, p0, v_scale, b) * v;
			attn_vf x1 = pair ? attn_prob(kind, p1, v_scale, b) * v : zero;
			if (!attn_full(b, lo, hi)) {
				attn_vi mask = attn_mask(b, lo, hi);
				x0 = attn_select(mask, x0, zero);
				x1 = attn_select(mask, x1, zero);
			}
			vacc0 += x0;
			if (pair)
				vacc1 += x1;
		}
		out0[d] += attn_hsum(vacc0);
		if (pair)
			out1[d] += attn_hsum(vacc1);
	}
}

/* The same for a head size that is a multiple of 8, eight components at a time: each block of
 * probabilities is loaded once for eight V rows instead of once per row, the sixteen
 * accumulators staying in registers. Each component's sum runs over the blocks in the same
 * order as in attn_values, so the result is bit for bit the same. */
ATTN_INLINE void attn_values8(int kind, int pair, const float *restrict p0,
			      const float *restrict p1, const void *restrict v_rows,
			      const float *restrict v_scale, size_t stride, uint32_t head_size, uint32_t lo, uint32_t hi, float *restrict out0,
			      float *restrict out1)
{
	const attn_vf zero = attn_splat(0.0f);
	for (uint32_t d0 = 0; d0 < head_size; d0 += 8) {
		attn_vf acc0[8], acc1[8];
		for (int j = 0; j < 8; j++)
			acc0[j] = acc1[j] = zero;
		for (uint32_t b = lo & ~(ATTN_LANES - 1); b < hi; b += ATTN_LANES) {
			attn_vf pv0 = attn_prob(kind, p0, v_scale, b);
			attn_vf pv1 = pair ? attn_prob(kind, p1, v_scale, b) : zero;
			if (!attn_full(b, lo, hi)) {
				/* Lanes outside [lo, hi) select zero products (see attn_mask). */
				attn_vi mask = attn_mask(b, lo, hi);
				for (int j = 0; j < 8; j++) {
					attn_vf v =
						attn_load_kv(v_rows, (d0 + j) * stride + b, kind);
					acc0[j] += attn_select(mask, pv0 * v, zero);
					if (pair)
						acc1[j] += attn_select(mask, pv1 * v, zero);
				}
				continue;
			}
			for (int j = 0; j < 8; j++) {
				attn_vf v = attn_load_kv(v_rows, (d0 + j) * stride + b, kind);
				acc0[j] += pv0 * v;
				if (pair)
					acc1[j] += pv1 * v;
			}
		}
		for (int j = 0; j < 8; j++) {
			out0[d0 + j] += attn_hsum(acc0[j]);
			if (pair)
				out1[d0 + j] += attn_hsum(acc1[j]);
		}
	}
}

/* The rows of one KV head in a row's planes. */
struct attn_kv_rows {
	const void *k, *v;                /* [head_size][slot_stride] elements */
	const float *k_scale, *v_scale;   /* q8: [slot_stride] scales */
};

/* Scores of heads [h, h + n) of one KV head over the step's ranges, into rows 0 .. n-1 of the
 * scratch, pairs sharing each K load. The slots go ATTN_CHUNK at a time with every pair
 * inside a chunk, so that the chunk of K (head_size x ATTN_CHUNK elements) is read from
 * memory once and from L1/L2 by the other pairs, instead of the whole plane once per pair.
 * Chunks start at the range's first block plus multiples of ATTN_CHUNK (a multiple of
 * ATTN_SB blocks), so each block is scored by the same call as over the whole range: the
 * same bits. */
#define ATTN_CHUNK (4u * ATTN_SB * ATTN_LANES)
ATTN_INLINE void attn_group_scores(int kind, const struct skv_attn_args *args,
				   const struct attn_range *ranges, uint32_t n_ranges, uint32_t h,
				   uint32_t n, const struct attn_kv_rows *kv, size_t stride,
				   uint32_t hs, float scale, float *max)
{
	float unused = -INFINITY;
	for (uint32_t i = 0; i < n; i++)
		max[i] = -INFINITY;
	for (uint32_t r = 0; r < n_ranges; r++) {
		uint32_t lo = ranges[r].lo, hi = ranges[r].hi;
		uint32_t b0 = lo & ~(ATTN_LANES - 1);
		for (uint32_t c0 = lo; c0 < hi;) {
			uint32_t c1 = (c0 == lo ? b0 : c0) + ATTN_CHUNK;
			c1 = c1 < hi ? c1 : hi;
			for (uint32_t i = 0; i < n; i += 2) {
				int pair = i + 1 < n;
				uint32_t hh = h + i;
				struct attn_alibi alibi;
				if (args->alibi_slopes)
					alibi = (struct attn_alibi){
						args->alibi_slopes[hh],
						pair ? args->alibi_slopes[hh + 1] : 0.0f,
						ranges[r].alibi_origin
					};
				float *s0 = args->scores + (size_t)i * stride;
				if (pair)
					attn_scores(kind, 1, ranges[r].q + (size_t)hh * hs,
						    ranges[r].q + (size_t)(hh + 1) * hs, kv->k,
						    kv->k_scale, stride, hs, c0, c1, scale,
						    args->alibi_slopes ? &alibi : NULL, s0, s0 + stride,
						    &max[i], &max[i + 1]);
				else
					attn_scores(kind, 0, ranges[r].q + (size_t)hh * hs,
						    ranges[r].q + (size_t)hh * hs, kv->k, kv->k_scale,
						    stride, hs, c0, c1, scale,
						    args->alibi_slopes ? &alibi : NULL, s0, s0 + stride,
						    &max[i], &unused);
			}
			c0 = c1;
		}
	}
}

/* Softmax-weighted sum for one or two heads whose scores are in s0 (and s1), maxima max0/1. */
ATTN_INLINE void attn_heads(int kind, int pair, const struct skv_attn_args *args,
			    const struct attn_range *ranges, uint32_t n_ranges, uint32_t h,
			    const struct attn_kv_rows *kv, size_t stride, uint32_t hs, float *s0,
			    float *s1, float max0, float max1)
{
	float *out0 = args->out + (size_t)h * hs, *out1 = out0 + hs;
	float sum0 = 0.0f, sum1 = 0.0f;
	for (uint32_t r = 0; r < n_ranges; r++) {
		sum0 += attn_exp_sum(s0, ranges[r].lo, ranges[r].hi, max0);
		if (pair)
			sum1 += attn_exp_sum(s1, ranges[r].lo, ranges[r].hi, max1);
	}
	memset(out0, 0, hs * sizeof(float) * (pair ? 2 : 1));
	for (uint32_t r = 0; r < n_ranges; r++) {
		if (hs % 8 == 0)
			attn_values8(kind, pair, s0, s1, kv->v, kv->v_scale, stride, hs,
				     ranges[r].lo, ranges[r].hi, out0, out1);
		else
			attn_values(kind, pair, s0, s1, kv->v, kv->v_scale, stride, hs,
				    ranges[r].lo, ranges[r].hi, out0, out1);
	}
	for (uint32_t d = 0; d < hs; d++) {
		out0[d] *= 1.0f / sum0;
		if (pair)
			out1[d] *= 1.0f / sum1;
	}
}

/* Every KV head's query heads, SKV_ATTN_GROUP_HEADS at a time: their scores (pairs sharing
 * each K load, chunk by chunk), then each pair's softmax and values (sharing each V load). */
ATTN_INLINE void attn_groups(int kind, const struct skv_attn_args *args,
			     const struct attn_range *ranges, uint32_t n_ranges, size_t stride,
			     uint32_t hs, uint32_t kv_mul, float inv_sqrt)
{
	const struct skv_kv_desc *desc = args->desc;
	float max[SKV_ATTN_GROUP_HEADS];
	for (uint32_t g = 0; g < desc->n_kv_heads; g++) {
		/* Bytes into a plane of head g's rows, and of its q8 scales ([slot_stride] floats at
		 * scales_offset; 0 and unused for the other types). */
		size_t at = (size_t)g * hs * stride * attn_elem_bytes(kind);
		size_t sat = desc->scales_offset + (size_t)g * stride * sizeof(float);
		struct attn_kv_rows kv = {
			.k = (const char *)args->k_plane + at,
			.v = (const char *)args->v_plane + at,
			.k_scale = (const float *)((const char *)args->k_plane + sat),
			.v_scale = (const float *)((const char *)args->v_plane + sat),
		};
		for (uint32_t h = g * kv_mul, end = h + kv_mul; h < end;) {
			uint32_t n = end - h < SKV_ATTN_GROUP_HEADS ? end - h : SKV_ATTN_GROUP_HEADS;
			/* The common head sizes get their own constant-folded copy of the loops. */
			if (hs == 8)
				attn_group_scores(kind, args, ranges, n_ranges, h, n, &kv, stride, 8,
						  inv_sqrt, max);
			else
				attn_group_scores(kind, args, ranges, n_ranges, h, n, &kv, stride, hs,
						  inv_sqrt, max);
			for (uint32_t i = 0; i < n; i += 2) {
				float *s0 = args->scores + (size_t)i * stride;
				if (i + 1 < n && hs == 8)
					attn_heads(kind, 1, args, ranges, n_ranges, h + i, &kv, stride,
						   8, s0, s0 + stride, max[i], max[i + 1]);
				else if (i + 1 < n)
					attn_heads(kind, 1, args, ranges, n_ranges, h + i, &kv, stride,
						   hs, s0, s0 + stride, max[i], max[i + 1]);
				else
					attn_heads(kind, 0, args, ranges, n_ranges, h + i, &kv, stride,
						   hs, s0, s0 + stride, max[i], max[i]);
			}
			h += n;
		}
	}
}

void ATTN_FN(attn_attend)(const struct skv_attn_args *args)
{
	const struct skv_kv_desc *desc = args->desc;
	const struct skv_kv_step *step = args->step;
	uint32_t hs = desc->head_size;
	size_t stride = desc->slot_stride;
	uint32_t kv_mul = args->n_heads / desc->n_kv_heads;
	uint32_t ring_end = desc->sink_slots + desc->window_slots;
	float inv_sqrt = 1.0f / sqrtf((float)hs);

	/* Valid slots of this step: the sinks, then the window from its head, wrapping once. */
	/* ALiBi origins: sink j lies at alibi_sink_pos - j; the newest window token (the row's
	 * own, order window_fill - 1) at distance 0, the oldest (at window_head) at
	 * window_fill - 1, the wrapped part continuing from desc->sink_slots. */
	struct attn_range ranges[3];
	uint32_t n_ranges = 0;
	int64_t newest = (int64_t)step->window_head + step->window_fill - 1;
	if (step->sink_count)
		ranges[n_ranges++] = (struct attn_range){ 0, step->sink_count, args->q_sink,
							  (int64_t)args->alibi_sink_pos };
	if (step->window_fill) {
		uint32_t end = step->window_head + step->window_fill;
		uint32_t first_end = end < ring_end ? end : ring_end;
		ranges[n_ranges++] =
			(struct attn_range){ step->window_head, first_end, args->q_window, newest };
		if (end > ring_end)
			ranges[n_ranges++] = (struct attn_range){
				desc->sink_slots, desc->sink_slots + (end - ring_end), args->q_window,
				newest - (ring_end - desc->sink_slots)
			};
	}
	/* Adjacent ranges scored with the same query (and, for ALiBi, the same origin) are one
	 * run of slots: merging them makes the arithmetic (and so the result) identical to a
	 * cache without sinks, e.g. sink with a window not yet full against dense. */
	uint32_t merged = 0;
	for (uint32_t r = 0; r < n_ranges; r++) {
		if (merged && ranges[merged - 1].hi == ranges[r].lo &&
		    ranges[merged - 1].q == ranges[r].q &&
		    (!args->alibi_slopes ||
		     ranges[merged - 1].alibi_origin == ranges[r].alibi_origin))
			ranges[merged - 1].hi = ranges[r].hi;
		else
			ranges[merged++] = ranges[r];
	}
	n_ranges = merged;

	if (desc->dtype == SKV_KV_DTYPE_F16)
		attn_groups(ATTN_KV_F16, args, ranges, n_ranges, stride, hs, kv_mul, inv_sqrt);
	else if (desc->dtype == SKV_KV_DTYPE_Q8)
		attn_groups(ATTN_KV_Q8, args, ranges, n_ranges, stride, hs, kv_mul, inv_sqrt);
	else
		attn_groups(ATTN_KV_F32, args, ranges, n_ranges, stride, hs, kv_mul, inv_sqrt);
}

void ATTN_FN(attn_swiglu)(float *out, const float *gu, uint32_t rows, uint32_t hidden)
{
	for (uint32_t r = 0; r < rows; r++) {
		const float *gate = gu + (size_t)r * 2 * hidden, *up = gate + hidden;
		float *o = out + (size_t)r * hidden;
		uint32_t i = 0;
		for (; i + ATTN_LANES <= hidden; i += ATTN_LANES) {
			attn_vf g = attn_load(gate + i);
			attn_vf silu = g / (attn_splat(1.0f) + attn_vexp(-g));
			attn_store(o + i, silu * attn_load(up + i));
		}
		for (; i < hidden; i++)
			o[i] = gate[i] / (1.0f + skv_expf(-gate[i])) * up[i];
	}
}

