/* A plain scalar statement of ggml's reference K-quant quantizers (quantize_row_q4_K_ref,
 * q5_K_ref, q6_K_ref with make_qkx2_quants and make_qx_quants), one sub-block at a time, for
 * test-quant to compare engine/quant.c's lane-parallel searches with on blocks of every kind.
 * Same float operations in the same order; contraction off as in quant.c. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant-ref.h"

#include <math.h>
#include <string.h>

#define QREF_GROUP_MAX_EPS 1e-15f

static void qref_put_scale_min_k4(unsigned j, uint8_t *scales, uint8_t sc, uint8_t m)
{
	if (j < 4) {
		scales[j] = sc;
		scales[j + 4] = m;
	} else {
		scales[j + 4] = (uint8_t)((sc & 0x0fu) | ((m & 0x0fu) << 4));
		scales[j - 4] |= (uint8_t)((sc >> 4) << 6);
		scales[j] |= (uint8_t)((m >> 4) << 6);
	}
}

static void qref_scale_min_k4(unsigned j, const uint8_t *scales, uint8_t *sc, uint8_t *m)
{
	if (j < 4) {
		*sc = scales[j] & 63u;
		*m = scales[j + 4] & 63u;
	} else {
		*sc = (uint8_t)((scales[j + 4] & 0x0fu) | ((scales[j - 4] >> 6) << 4));
		*m = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
	}
}

static inline int qref_nearest_int(float f)
{
	const float shifted = f + 12582912.f;
	int32_t bits;
	memcpy(&bits, &shifted, sizeof(bits));
	return (bits & 0x007fffff) - 0x00400000;
}

static inline int qref_clamp(int v, int lo, int hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

static float qref_make_qkx2(int n, int nmax, const float *x, const float *w, uint8_t *L,
			     float *the_min, uint8_t *L_try, float rmin, float rdelta, int nstep)
{
	float min = x[0], max = x[0];
	float sum_w = w[0];
	float sum_x = sum_w * x[0];

	for (int i = 1; i < n; i++) {
		if (x[i] < min)
			min = x[i];
		if (x[i] > max)
			max = x[i];
		sum_w += w[i];
		sum_x += w[i] * x[i];
	}
	if (min > 0)
		min = 0;
	if (max == min) {
		memset(L, 0, (size_t)n);
		*the_min = -min;
		return 0.0f;
	}

	float iscale = (float)nmax / (max - min);
	float scale = 1.0f / iscale;
	float best_error = 0;
	for (int i = 0; i < n; i++) {
		const int l = qref_nearest_int(iscale * (x[i] - min));
		L[i] = (uint8_t)qref_clamp(l, 0, nmax);
		const float diff = scale * (float)L[i] + min - x[i];
		best_error += w[i] * (diff * diff);
	}
	if (nstep < 1) {
		*the_min = -min;
		return scale;
	}

	for (int is = 0; is <= nstep; is++) {
		iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
		float sum_l = 0, sum_l2 = 0, sum_xl = 0;
		for (int i = 0; i < n; i++) {
			const int l = qref_clamp(qref_nearest_int(iscale * (x[i] - min)), 0, nmax);
			L_try[i] = (uint8_t)l;
			sum_l += w[i] * (float)l;
			sum_l2 += w[i] * (float)l * (float)l;
			sum_xl += w[i] * (float)l * x[i];
		}
		const float D = sum_w * sum_l2 - sum_l * sum_l;
		if (D > 0) {
			float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
			float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
			if (this_min > 0) {
				this_min = 0;
				this_scale = sum_xl / sum_l2;
			}
			float error = 0;
			for (int i = 0; i < n; i++) {
				const float diff = this_scale * (float)L_try[i] + this_min - x[i];
				error += w[i] * (diff * diff);
			}
			if (error < best_error) {
				memcpy(L, L_try, (size_t)n);
				best_error = error;
				scale = this_scale;
				min = this_min;
			}
		}
	}
	*the_min = -min;
	return scale;
}

/* ggml's make_qx_quants with rmse_type 1 and no importance weights (weights x^2): signed
 * levels L - nmax in [-nmax, nmax - 1], the value of largest magnitude at -nmax. Tries 18
 * spacings around nmax and keeps the one that maximises sumlx^2 / suml2 (the weighted
 * least-squares fit); returns its scale. */
static float qref_make_qx(int n, int nmax, const float *x, int8_t *L)
{
	float max = 0, amax = 0;

	for (int i = 0; i < n; i++) {
		const float ax = fabsf(x[i]);
		if (ax > amax) {
			amax = ax;
			max = x[i];
		}
	}
	if (amax < QREF_GROUP_MAX_EPS) {
		memset(L, 0, (size_t)n);
		return 0.0f;
	}

	float iscale = (float)-nmax / max;
	float sumlx = 0, suml2 = 0;
	for (int i = 0; i < n; i++) {
		const int l = qref_clamp(qref_nearest_int(iscale * x[i]), -nmax, nmax - 1);
		L[i] = (int8_t)(l + nmax);
		const float w = x[i] * x[i];
		sumlx += w * x[i] * (float)l;
		suml2 += w * (float)l * (float)l;
	}
	float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
	float best = scale * sumlx;

	for (int is = -9; is <= 9; is++) {
		if (is == 0)
			continue;
		iscale = -((float)nmax + 0.1f * (float)is) / max;
		sumlx = suml2 = 0;
		for (int i = 0; i < n; i++) {
			const int l = qref_clamp(qref_nearest_int(iscale * x[i]), -nmax, nmax - 1);
			const float w = x[i] * x[i];
			sumlx += w * x[i] * (float)l;
			suml2 += w * (float)l * (float)l;
		}
		if (suml2 > 0 && sumlx * sumlx > best * suml2) {
			for (int i = 0; i < n; i++) {
				const int l = qref_nearest_int(iscale * x[i]);
				L[i] = (int8_t)(nmax + qref_clamp(l, -nmax, nmax - 1));
			}
			scale = sumlx / suml2;
			best = scale * sumlx;
		}
	}
	return scale;
}

/* The shared part of ggml's quantize_row_q4_K_ref and quantize_row_q5_K_ref: per sub-block of
 * 32 a scale and min by make_qkx2_quants (weights av_x + |x|), both quantized to 6 bits
 * against the block's largest, then every weight re-quantized against the rounded scale and
 * min (a sub-block whose rounded scale is 0 keeps the levels of the search). L gets the levels
 * in [0, nmax]. */
static void qref_k_scales(const float *x, int nmax, float rmin, float rdelta, int nstep,
			   uint16_t *d_out, uint16_t *dmin_out, uint8_t *scale_bytes, uint8_t *L)
{
	float weights[32];
	uint8_t L_try[32];
	float scales[SKV_QK_K / 32], mins[SKV_QK_K / 32];
	float max_scale = 0, max_min = 0;

	for (unsigned j = 0; j < SKV_QK_K / 32; j++) {
		const float *xs = x + 32 * j;
		float sum_x2 = 0;
		for (unsigned l = 0; l < 32; l++)
			sum_x2 += xs[l] * xs[l];
		const float av_x = sqrtf(sum_x2 / 32);
		for (unsigned l = 0; l < 32; l++)
			weights[l] = av_x + fabsf(xs[l]);
		scales[j] = qref_make_qkx2(32, nmax, xs, weights, L + 32 * j, &mins[j], L_try,
					    rmin, rdelta, nstep);
		if (scales[j] > max_scale)
			max_scale = scales[j];
		if (mins[j] > max_min)
			max_min = mins[j];
	}

	const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
	const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
	memset(scale_bytes, 0, SKV_K_SCALE_BYTES);
	for (unsigned j = 0; j < SKV_QK_K / 32; j++) {
		/* ggml stores nearest_int() into a uint8_t before clipping at 63 */
		uint8_t ls = (uint8_t)qref_nearest_int(inv_scale * scales[j]);
		uint8_t lm = (uint8_t)qref_nearest_int(inv_min * mins[j]);
		ls = ls < 63 ? ls : 63;
		lm = lm < 63 ? lm : 63;
		qref_put_scale_min_k4(j, scale_bytes, ls, lm);
	}
	*d_out = skv_f32_to_f16(max_scale / 63.f);
	*dmin_out = skv_f32_to_f16(max_min / 63.f);

	const float d_all = skv_f16_to_f32(*d_out), dmin_all = skv_f16_to_f32(*dmin_out);
	for (unsigned j = 0; j < SKV_QK_K / 32; j++) {
		uint8_t sc, m;
		qref_scale_min_k4(j, scale_bytes, &sc, &m);
		const float d = d_all * (float)sc;
		if (d == 0.0f)
			continue;
		const float dm = dmin_all * (float)m;
		for (unsigned l = 0; l < 32; l++) {
			const int q = qref_nearest_int((x[32 * j + l] + dm) / d);
			L[32 * j + l] = (uint8_t)qref_clamp(q, 0, nmax);
		}
	}
}

void qref_quant_q4_k(const float *src, struct skv_block_q4_k *blocks, uint64_t n_blocks)
{
	uint8_t L[SKV_QK_K];

	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK_K) {
		struct skv_block_q4_k *blk = &blocks[b];
		qref_k_scales(src, 15, -1.f, 0.1f, 20, &blk->d, &blk->dmin, blk->scales, L);
		for (unsigned g = 0; g < SKV_QK_K / 64; g++)
			for (unsigned l = 0; l < 32; l++)
				blk->qs[32 * g + l] = (uint8_t)(L[64 * g + l] | (L[64 * g + 32 + l] << 4));
	}
}

void qref_quant_q5_k(const float *src, struct skv_block_q5_k *blocks, uint64_t n_blocks)
{
	uint8_t L[SKV_QK_K];

	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK_K) {
		struct skv_block_q5_k *blk = &blocks[b];
		qref_k_scales(src, 31, -0.5f, 0.1f, 15, &blk->d, &blk->dmin, blk->scales, L);
		memset(blk->qh, 0, sizeof(blk->qh));
		for (unsigned g = 0; g < SKV_QK_K / 64; g++) {
			for (unsigned l = 0; l < 32; l++) {
				unsigned lo = L[64 * g + l], hi = L[64 * g + 32 + l];
				if (lo > 15) {
					lo -= 16;
					blk->qh[l] |= (uint8_t)(1u << (2 * g));
				}
				if (hi > 15) {
					hi -= 16;
					blk->qh[l] |= (uint8_t)(2u << (2 * g));
				}
				blk->qs[32 * g + l] = (uint8_t)(lo | (hi << 4));
			}
		}
	}
}

void qref_quant_q6_k(const float *src, struct skv_block_q6_k *blocks, uint64_t n_blocks)
{
	int8_t L[SKV_QK_K];
	float scales[SKV_QK_K / 16];

	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK_K) {
		struct skv_block_q6_k *blk = &blocks[b];
		float max_scale = 0, max_abs_scale = 0;

		for (unsigned s = 0; s < SKV_QK_K / 16; s++) {
			scales[s] = qref_make_qx(16, 32, src + 16 * s, L + 16 * s);
			if (fabsf(scales[s]) > max_abs_scale) {
				max_abs_scale = fabsf(scales[s]);
				max_scale = scales[s];
			}
		}
		if (max_abs_scale < QREF_GROUP_MAX_EPS) {
			memset(blk, 0, sizeof(*blk));
			continue;
		}

		/* the sub-block scale of largest magnitude maps to -128; the others are clipped at
		 * 127 (only +128 can exceed it) */
		const float iscale = -128.f / max_scale;
		blk->d = skv_f32_to_f16(1 / iscale);
		for (unsigned s = 0; s < SKV_QK_K / 16; s++) {
			const int q = qref_nearest_int(iscale * scales[s]);
			blk->scales[s] = (int8_t)(q < 127 ? q : 127);
		}

		const float d_all = skv_f16_to_f32(blk->d);
		for (unsigned s = 0; s < SKV_QK_K / 16; s++) {
			const float d = d_all * (float)blk->scales[s];
			if (d == 0.0f)
				continue;
			for (unsigned l = 0; l < 16; l++) {
				const int q = qref_nearest_int(src[16 * s + l] / d);
				L[16 * s + l] = (int8_t)(qref_clamp(q, -32, 31) + 32);
			}
		}

		for (unsigned half = 0; half < 2; half++) {
			const uint8_t *Lh = (const uint8_t *)L + 128 * half;
			uint8_t *ql = blk->ql + 64 * half;
			uint8_t *qh = blk->qh + 32 * half;
			for (unsigned l = 0; l < 32; l++) {
				ql[l] = (uint8_t)((Lh[l] & 0x0fu) | ((Lh[l + 64] & 0x0fu) << 4));
				ql[l + 32] = (uint8_t)((Lh[l + 32] & 0x0fu) | ((Lh[l + 96] & 0x0fu) << 4));
				qh[l] = (uint8_t)((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) |
						  ((Lh[l + 64] >> 4) << 4) | ((Lh[l + 96] >> 4) << 6));
			}
		}
	}
}

