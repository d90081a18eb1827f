/* Weight types of GGUF files: sizes, fp16/bf16 conversions, the scalar reference
 * dequantization and ggml's reference quantizers (see quant.h).
 *
 * Everything here must agree with ggml to the bit: dequantized weights are compared with
 * ggml's definitions, and skv_quant_row() must write the bytes llama-quantize writes without an
 * importance matrix. That fixes more than the formulas: the order of every float operation, the
 * float (not double) type of every intermediate, ggml's rounding helper (nearest_int: add
 * 1.5 * 2^23 and read the mantissa, which rounds half to even) and its strict comparisons when
 * it searches for scales. ggml's reference code is built for baseline x86-64, without fused
 * multiply-adds, so contraction is switched off for this file: an fma would change the last
 * bit of a dequantized weight and, through the quantizers' error comparisons, whole blocks. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the block formats are little-endian and read in place"
#endif

/* Below this absolute maximum a group of weights counts as all zero (ggml's GROUP_MAX_EPS). */
#define QUANT_GROUP_MAX_EPS 1e-15f

struct quant_type {
	uint32_t type;
	const char *name;
	uint32_t block_elems;
	uint32_t block_bytes;
};

static const struct quant_type quant_types[] = {
	{ SKV_WTYPE_F32, "F32", 1, 4 },
	{ SKV_WTYPE_F16, "F16", 1, 2 },
	{ SKV_WTYPE_BF16, "BF16", 1, 2 },
	{ SKV_WTYPE_Q8_0, "Q8_0", SKV_QK8_0, sizeof(struct skv_block_q8_0) },
	{ SKV_WTYPE_Q4_0, "Q4_0", SKV_QK4_0, sizeof(struct skv_block_q4_0) },
	{ SKV_WTYPE_Q4_K, "Q4_K", SKV_QK_K, sizeof(struct skv_block_q4_k) },
	{ SKV_WTYPE_Q5_K, "Q5_K", SKV_QK_K, sizeof(struct skv_block_q5_k) },
	{ SKV_WTYPE_Q6_K, "Q6_K", SKV_QK_K, sizeof(struct skv_block_q6_k) },
};

static const struct quant_type *quant_type_find(uint32_t type)
{
	for (size_t i = 0; i < sizeof(quant_types) / sizeof(quant_types[0]); i++)
		if (quant_types[i].type == type)
			return &quant_types[i];
	return NULL;
}

const char *skv_wtype_name(uint32_t type)
{
	const struct quant_type *t = quant_type_find(type);
	return t ? t->name : NULL;
}

uint32_t skv_wtype_block_elems(uint32_t type)
{
	const struct quant_type *t = quant_type_find(type);
	return t ? t->block_elems : 0;
}

uint32_t skv_wtype_block_bytes(uint32_t type)
{
	const struct quant_type *t = quant_type_find(type);
	return t ? t->block_bytes : 0;
}

uint64_t skv_wtype_row_bytes(uint32_t type, uint64_t cols)
{
	const struct quant_type *t = quant_type_find(type);

	if (!t || cols % t->block_elems)
		return 0;
	if (cols / t->block_elems > UINT64_MAX / t->block_bytes)
		return 0;
	return cols / t->block_elems * t->block_bytes;
}

int skv_wtype_parse(const char *name, uint32_t *type)
{
	if (!name)
		return -EINVAL;
	for (size_t i = 0; i < sizeof(quant_types) / sizeof(quant_types[0]); i++) {
		if (!strcasecmp(name, quant_types[i].name)) {
			if (type)
				*type = quant_types[i].type;
			return 0;
		}
	}
	return -EINVAL;
}

static uint32_t quant_f32_bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static float quant_bits_f32(uint32_t u)
{
	float f;
	memcpy(&f, &u, sizeof(f));
	return f;
}

float skv_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exponent = (h >> 10) & 0x1fu;
	uint32_t mantissa = h & 0x3ffu;

	if (exponent == 0) {
		/* zero or subnormal: mantissa * 2^-24, exact in float32 */
		float magnitude = (float)mantissa * 0x1p-24f;
		return sign ? -magnitude : magnitude;
	}
	if (exponent == 0x1f) /* inf or NaN, payload kept */
		return quant_bits_f32(sign | 0x7f800000u | (mantissa << 13));
	return quant_bits_f32(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

/* Round to nearest, ties to even, as IEEE conversion and ggml's scalar conversion do. NaN
 * becomes the quiet NaN 0x7e00 with the sign kept, as in ggml (its payload is dropped). */
uint16_t skv_f32_to_f16(float f)
{
	uint32_t bits = quant_f32_bits(f);
	uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
	uint32_t magnitude = bits & 0x7fffffffu;

	if (magnitude > 0x7f800000u)
		return sign | 0x7e00u;
	/* 65520 = 65504 + half an ulp is a tie that rounds to the even neighbour, infinity */
	if (magnitude >= 0x477ff000u)
		return sign | 0x7c00u;
	if (magnitude >= 0x38800000u) {
		/* normal: rebias the exponent, drop 13 mantissa bits with rounding; a carry out of
		 * the mantissa correctly increments the exponent */
		uint32_t rebiased = magnitude - ((127u - 15u) << 23);
		return sign | (uint16_t)((rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13);
	}
	/* subnormal half (below 2^-14): count units of 2^-24; 2^-25 itself ties to 0 */
	if (magnitude <= 0x33000000u)
		return sign;
	uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
	uint32_t shift = 126u - (magnitude >> 23); /* 14..24 */
	uint32_t units = mantissa >> shift;
	uint32_t rest = mantissa & ((1u << shift) - 1u);
	uint32_t half = 1u << (shift - 1u);

	if (rest > half || (rest == half && (units & 1u)))
		units++;
	return sign | (uint16_t)units;
}

float skv_bf16_to_f32(uint16_t b)
{
	return quant_bits_f32((uint32_t)b << 16);
}

/* As ggml_compute_fp32_to_bf16: NaN keeps its top bits and is made quiet; everything else
 * (subnormals included, not flushed) rounds to nearest even, overflowing to infinity. */
uint16_t skv_f32_to_bf16(float f)
{
	uint32_t bits = quant_f32_bits(f);

	if ((bits & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((bits >> 16) | 0x40u);
	return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* ggml's get_scale_min_k4: sub-block j's 6-bit scale and min. Bytes 0-3 hold scales 0-3 and
 * bytes 4-7 mins 0-3 in their low six bits; scales and mins 4-7 keep their low four bits in
 * bytes 8-11 (scale low, min high nibble) and their top two bits in the spare top bits of bytes
 * 0-3 (scales) and 4-7 (mins). */
static void quant_scale_min_k4(unsigned j, const uint8_t *scales, uint8_t *sc, uint8_t *m)
{
	if (j < 4) {
		*sc = scales[j] & 63u;
		*m = scales[j + 4] & 63u;
	} else {
		*sc = (uint8_t)((scales[j + 4] & 0x0fu) | ((scales[j - 4] >> 6) << 4));
		*m = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
	}
}

static void quant_put_scale_min_k4(unsigned j, uint8_t *scales, uint8_t sc, uint8_t m)
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

/* ---- dequantization: ggml's dequantize_row_* ---- */

static void dequant_q8_0(const struct skv_block_q8_0 *blocks, float *dst, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++) {
		const float d = skv_f16_to_f32(blocks[b].d);
		for (unsigned j = 0; j < SKV_QK8_0; j++)
			*dst++ = (float)blocks[b].qs[j] * d;
	}
}

static void dequant_q4_0(const struct skv_block_q4_0 *blocks, float *dst, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++) {
		const float d = skv_f16_to_f32(blocks[b].d);
		for (unsigned j = 0; j < SKV_QK4_0 / 2; j++) {
			dst[j] = (float)((int)(blocks[b].qs[j] & 0x0fu) - 8) * d;
			dst[j + SKV_QK4_0 / 2] = (float)((int)(blocks[b].qs[j] >> 4) - 8) * d;
		}
		dst += SKV_QK4_0;
	}
}

/* Q4_K and Q5_K share the layout of their 64-weight groups: group g uses sub-blocks 2g (low
 * nibbles of qs[32g..32g+31]) and 2g+1 (high nibbles); Q5_K's fifth bit of sub-block s is bit s
 * of qh[0..31]. */
static void dequant_q4_k(const struct skv_block_q4_k *blocks, float *dst, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++) {
		const struct skv_block_q4_k *blk = &blocks[b];
		const float d = skv_f16_to_f32(blk->d);
		const float dmin = skv_f16_to_f32(blk->dmin);
		const uint8_t *qs = blk->qs;

		for (unsigned s = 0; s < SKV_QK_K / 32; s += 2) {
			uint8_t sc, m;
			quant_scale_min_k4(s, blk->scales, &sc, &m);
			const float d_lo = d * (float)sc, m_lo = dmin * (float)m;
			quant_scale_min_k4(s + 1, blk->scales, &sc, &m);
			const float d_hi = d * (float)sc, m_hi = dmin * (float)m;
			for (unsigned l = 0; l < 32; l++)
				*dst++ = d_lo * (float)(qs[l] & 0x0fu) - m_lo;
			for (unsigned l = 0; l < 32; l++)
				*dst++ = d_hi * (float)(qs[l] >> 4) - m_hi;
			qs += 32;
		}
	}
}

static void dequant_q5_k(const struct skv_block_q5_k *blocks, float *dst, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++) {
		const struct skv_block_q5_k *blk = &blocks[b];
		const float d = skv_f16_to_f32(blk->d);
		const float dmin = skv_f16_to_f32(blk->dmin);
		const uint8_t *qs = blk->qs;

		for (unsigned s = 0; s < SKV_QK_K / 32; s += 2) {
			uint8_t sc, m;
			const uint8_t bit_lo = (uint8_t)(1u << s), bit_hi = (uint8_t)(2u << s);
			quant_scale_min_k4(s, blk->scales, &sc, &m);
			const float d_lo = d * (float)sc, m_lo = dmin * (float)m;
			quant_scale_min_k4(s + 1, blk->scales, &sc, &m);
			const float d_hi = d * (float)sc, m_hi = dmin * (float)m;
			for (unsigned l = 0; l < 32; l++)
				*dst++ = d_lo * (float)((qs[l] & 0x0fu) + (blk->qh[l] & bit_lo ? 16u : 0u)) - m_lo;
			for (unsigned l = 0; l < 32; l++)
				*dst++ = d_hi * (float)((qs[l] >> 4) + (blk->qh[l] & bit_hi ? 16u : 0u)) - m_hi;
			qs += 32;
		}
	}
}

/* Q6_K: each half (128 weights) has 64 bytes of ql and 32 of qh. Weight 32k + l of the half
 * (k = 0..3, l = 0..31) takes the low (k < 2) or high (k >= 2) nibble of ql[l + 32 (k & 1)] and
 * bits 2k..2k+1 of qh[l]; its scale is scales[8 half + 2k + l / 16]. */
static void dequant_q6_k(const struct skv_block_q6_k *blocks, float *dst, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++) {
		const struct skv_block_q6_k *blk = &blocks[b];
		const float d = skv_f16_to_f32(blk->d);

		for (unsigned half = 0; half < 2; half++) {
			const uint8_t *ql = blk->ql + 64 * half;
			const uint8_t *qh = blk->qh + 32 * half;
			const int8_t *sc = blk->scales + 8 * half;

			for (unsigned l = 0; l < 32; l++) {
				const unsigned is = l / 16;
				const int q1 = (int)((ql[l] & 0x0fu) | (((qh[l] >> 0) & 3u) << 4)) - 32;
				const int q2 = (int)((ql[l + 32] & 0x0fu) | (((qh[l] >> 2) & 3u) << 4)) - 32;
				const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3u) << 4)) - 32;
				const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3u) << 4)) - 32;
				dst[l] = d * (float)sc[is] * (float)q1;
				dst[l + 32] = d * (float)sc[is + 2] * (float)q2;
				dst[l + 64] = d * (float)sc[is + 4] * (float)q3;
				dst[l + 96] = d * (float)sc[is + 6] * (float)q4;
			}
			dst += 128;
		}
	}
}

int skv_dequant_row(uint32_t type, const void *src, float *dst, uint64_t n)
{
	const struct quant_type *t = quant_type_find(type);

	if (!t || n % t->block_elems || (n && (!src || !dst)))
		return -EINVAL;
	const uint64_t n_blocks = n / t->block_elems;

	switch (type) {
	case SKV_WTYPE_F32:
		memcpy(dst, src, n * sizeof(float));
		break;
	case SKV_WTYPE_F16: {
		const uint8_t *bytes = src;
		for (uint64_t i = 0; i < n; i++) {
			uint16_t h;
			memcpy(&h, bytes + 2 * i, sizeof(h));
			dst[i] = skv_f16_to_f32(h);
		}
		break;
	}
	case SKV_WTYPE_BF16: {
		const uint8_t *bytes = src;
		for (uint64_t i = 0; i < n; i++) {
			uint16_t h;
			memcpy(&h, bytes + 2 * i, sizeof(h));
			dst[i] = skv_bf16_to_f32(h);
		}
		break;
	}
	case SKV_WTYPE_Q8_0:
		dequant_q8_0(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q4_0:
		dequant_q4_0(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q4_K:
		dequant_q4_k(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q5_K:
		dequant_q5_k(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q6_K:
		dequant_q6_k(src, dst, n_blocks);
		break;
	default:
		return -EINVAL;
	}
	return 0;
}

/* ---- quantization: ggml's quantize_row_*_ref ---- */

/* ggml's nearest_int: adding 1.5 * 2^23 leaves round-half-even(f) in the low mantissa bits for
 * |f| < 2^22. Outside that range ggml gets (and so must we) whatever the bits say. */
static inline int quant_nearest_int(float f)
{
	const float shifted = f + 12582912.f;
	int32_t bits;
	memcpy(&bits, &shifted, sizeof(bits));
	return (bits & 0x007fffff) - 0x00400000;
}

static inline int quant_clamp(int v, int lo, int hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

static void quant_q8_0(const float *src, struct skv_block_q8_0 *blocks, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK8_0) {
		float amax = 0.0f;
		for (unsigned j = 0; j < SKV_QK8_0; j++) {
			const float a = fabsf(src[j]);
			amax = amax > a ? amax : a;
		}
		const float d = amax / 127.0f;
		const float id = d != 0.0f ? 1.0f / d : 0.0f;

		blocks[b].d = skv_f32_to_f16(d);
		for (unsigned j = 0; j < SKV_QK8_0; j++)
			blocks[b].qs[j] = (int8_t)roundf(src[j] * id);
	}
}

static void quant_q4_0(const float *src, struct skv_block_q4_0 *blocks, uint64_t n_blocks)
{
	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK4_0) {
		/* the signed value of largest magnitude (the first one on a tie) maps to -8 */
		float amax = 0.0f, max = 0.0f;
		for (unsigned j = 0; j < SKV_QK4_0; j++) {
			if (amax < fabsf(src[j])) {
				amax = fabsf(src[j]);
				max = src[j];
			}
		}
		const float d = max / -8.0f;
		const float id = d != 0.0f ? 1.0f / d : 0.0f;

		blocks[b].d = skv_f32_to_f16(d);
		for (unsigned j = 0; j < SKV_QK4_0 / 2; j++) {
			/* truncation of x + 8.5 (x in [-8, 8]) rounds half up; 16 is clipped to 15 */
			int lo = (int8_t)(src[j] * id + 8.5f);
			int hi = (int8_t)(src[j + SKV_QK4_0 / 2] * id + 8.5f);
			lo = lo < 15 ? lo : 15;
			hi = hi < 15 ? hi : 15;
			blocks[b].qs[j] = (uint8_t)((unsigned)lo | ((unsigned)hi << 4));
		}
	}
}

/* The scale searches of the K-quants run four sub-blocks at a time, sub-block s in lane s of a
 * 16-byte vector (GCC vector extensions; native SSE2 on every x86-64, NEON on aarch64). Each
 * lane performs exactly the scalar sequence of float operations of ggml's code -- the sums still
 * run over the weights in order, only the sub-blocks are interleaved -- so the results are the
 * scalar results bit for bit (tests/unit/quant-ref.c keeps the scalar statement, and
 * test-quant compares the two). A branch of the scalar code becomes a select per lane; lanes
 * that ggml returns early from compute values that are then discarded. */
#define QUANT_LANES 4
typedef float quant_vf __attribute__((vector_size(4 * QUANT_LANES)));
typedef int32_t quant_vi __attribute__((vector_size(4 * QUANT_LANES)));

/* per lane: nearest_int; mask ? a : b for int (I) and float (F) vectors; fabsf; clamp */
#define QUANT_V_NEAREST(f) ((((quant_vi)((f) + 12582912.f)) & 0x007fffff) - 0x00400000)
#define QUANT_V_SELI(mask, a, b) (((mask) & (a)) | (~(mask) & (b)))
#define QUANT_V_SELF(mask, a, b) \
	((quant_vf)(((mask) & (quant_vi)(a)) | (~(mask) & (quant_vi)(b))))
#define QUANT_V_FABS(f) ((quant_vf)((quant_vi)(f) & 0x7fffffff))
#define QUANT_V_CLAMP(l, lo, hi) \
	QUANT_V_SELI((l) > (hi), (quant_vi){ 0 } + (hi), \
		     QUANT_V_SELI((l) < (lo), (quant_vi){ 0 } + (lo), (l)))
/* weight i of each lane's sub-block, the sub-blocks n weights apart */
#define QUANT_V_GATHER(x, n, i) \
	((quant_vf){ (x)[i], (x)[(n) + (i)], (x)[2 * (n) + (i)], (x)[3 * (n) + (i)] })
_Static_assert(QUANT_LANES == 4, "QUANT_V_GATHER fills four lanes");

/* ggml's make_qkx2_quants (use_mad false, nstep >= 1) for QUANT_LANES sub-blocks of 32
 * weights of x, with ggml's weights for no importance matrix (av_x + |x|, av_x the
 * sub-block's RMS). Levels in [0, nmax] with x ~ scale * L - min. Starting from the min/max
 * fit it tries nstep + 1 slightly different level spacings (nmax + rmin + rdelta * is), solves
 * the weighted least squares for scale and min of each, and keeps the one of least weighted
 * squared error (strictly less only). scales[s], mins[s] (non-negative) and L[32 s + i]. */
static void quant_qkx2_lanes(const float *x, int nmax, float rmin, float rdelta, int nstep,
			     float *scales, float *mins, uint8_t *L)
{
	quant_vf xt[32], wt[32];
	quant_vi lt[32], lt_try[32];
	quant_vf sum_x2 = { 0 }, av_x = { 0 };

	for (unsigned i = 0; i < 32; i++)
		xt[i] = QUANT_V_GATHER(x, 32, i);
	for (unsigned i = 0; i < 32; i++)
		sum_x2 += xt[i] * xt[i];
	for (unsigned s = 0; s < QUANT_LANES; s++)
		av_x[s] = sqrtf(sum_x2[s] / 32);
	for (unsigned i = 0; i < 32; i++)
		wt[i] = av_x + QUANT_V_FABS(xt[i]);

	quant_vf min = xt[0], max = xt[0];
	quant_vf sum_w = wt[0];
	quant_vf sum_x = sum_w * xt[0];
	for (unsigned i = 1; i < 32; i++) {
		min = QUANT_V_SELF(xt[i] < min, xt[i], min);
		max = QUANT_V_SELF(xt[i] > max, xt[i], max);
		sum_w += wt[i];
		sum_x += wt[i] * xt[i];
	}
	const quant_vf zero = { 0 };
	min = QUANT_V_SELF(min > 0, zero, min);
	const quant_vi flat = max == min;

	quant_vf iscale = (float)nmax / (max - min);
	quant_vf scale = 1.0f / iscale;
	quant_vf best_error = zero;
	for (unsigned i = 0; i < 32; i++) {
		lt[i] = QUANT_V_CLAMP(QUANT_V_NEAREST(iscale * (xt[i] - min)), 0, nmax);
		const quant_vf diff = scale * __builtin_convertvector(lt[i], quant_vf) + min - xt[i];
		best_error += wt[i] * (diff * diff);
	}

	/* as in ggml, a better fit moves min, and the spacings tried after it start from there */
	for (int is = 0; is <= nstep; is++) {
		iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
		quant_vf sum_l = zero, sum_l2 = zero, sum_xl = zero;
		for (unsigned i = 0; i < 32; i++) {
			lt_try[i] = QUANT_V_CLAMP(QUANT_V_NEAREST(iscale * (xt[i] - min)), 0, nmax);
			const quant_vf l = __builtin_convertvector(lt_try[i], quant_vf);
			sum_l += wt[i] * l;
			sum_l2 += wt[i] * l * l;
			sum_xl += wt[i] * l * xt[i];
		}
		const quant_vf D = sum_w * sum_l2 - sum_l * sum_l;
		quant_vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
		quant_vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
		const quant_vi positive = this_min > 0;
		this_min = QUANT_V_SELF(positive, zero, this_min);
		this_scale = QUANT_V_SELF(positive, sum_xl / sum_l2, this_scale);
		quant_vf error = zero;
		for (unsigned i = 0; i < 32; i++) {
			const quant_vf diff =
				this_scale * __builtin_convertvector(lt_try[i], quant_vf) + this_min - xt[i];
			error += wt[i] * (diff * diff);
		}
		const quant_vi better = (D > 0) & (error < best_error);
		for (unsigned i = 0; i < 32; i++)
			lt[i] = QUANT_V_SELI(better, lt_try[i], lt[i]);
		best_error = QUANT_V_SELF(better, error, best_error);
		scale = QUANT_V_SELF(better, this_scale, scale);
		min = QUANT_V_SELF(better, this_min, min);
	}

	for (unsigned s = 0; s < QUANT_LANES; s++) {
		/* a flat sub-block (max == min after clipping min at 0): levels 0, scale 0 */
		scales[s] = flat[s] ? 0.0f : scale[s];
		mins[s] = -min[s];
		for (unsigned i = 0; i < 32; i++)
			L[32 * s + i] = flat[s] ? 0 : (uint8_t)lt[i][s];
	}
}

/* ggml's make_qx_quants with nmax 32, rmse_type 1 and no importance weights (weights x^2) for
 * QUANT_LANES sub-blocks of 16 weights of x: signed levels L - 32 in [-32, 31], the value of
 * largest magnitude at -32. Tries 18 spacings around nmax and keeps the one that maximises
 * sumlx^2 / suml2 (the weighted least-squares fit, strictly better only). scales[s] and
 * L[16 s + i] (0..63). */
static void quant_qx_lanes(const float *x, float *scales, int8_t *L)
{
	const int nmax = 32;
	quant_vf xt[16];
	quant_vi lt[16], lt_try[16];
	const quant_vf zero = { 0 };
	quant_vf max = zero, amax = zero;

	for (unsigned i = 0; i < 16; i++)
		xt[i] = QUANT_V_GATHER(x, 16, i);
	for (unsigned i = 0; i < 16; i++) {
		const quant_vf ax = QUANT_V_FABS(xt[i]);
		const quant_vi larger = ax > amax;
		amax = QUANT_V_SELF(larger, ax, amax);
		max = QUANT_V_SELF(larger, xt[i], max);
	}
	const quant_vi all_zero = amax < QUANT_GROUP_MAX_EPS;

	quant_vf iscale = (float)-nmax / max;
	quant_vf sumlx = zero, suml2 = zero;
	for (unsigned i = 0; i < 16; i++) {
		const quant_vi l = QUANT_V_CLAMP(QUANT_V_NEAREST(iscale * xt[i]), -nmax, nmax - 1);
		lt[i] = l + nmax;
		const quant_vf w = xt[i] * xt[i];
		const quant_vf lf = __builtin_convertvector(l, quant_vf);
		sumlx += w * xt[i] * lf;
		suml2 += w * lf * lf;
	}
	quant_vf scale = QUANT_V_SELF(suml2 != 0, sumlx / suml2, zero);
	quant_vf best = scale * sumlx;

	for (int is = -9; is <= 9; is++) {
		if (is == 0)
			continue;
		iscale = -((float)nmax + 0.1f * (float)is) / max;
		sumlx = suml2 = zero;
		for (unsigned i = 0; i < 16; i++) {
			const quant_vi l =
				QUANT_V_CLAMP(QUANT_V_NEAREST(iscale * xt[i]), -nmax, nmax - 1);
			lt_try[i] = l + nmax;
			const quant_vf w = xt[i] * xt[i];
			const quant_vf lf = __builtin_convertvector(l, quant_vf);
			sumlx += w * xt[i] * lf;
			suml2 += w * lf * lf;
		}
		const quant_vi better = (suml2 > 0) & (sumlx * sumlx > best * suml2);
		const quant_vf new_scale = sumlx / suml2;
		for (unsigned i = 0; i < 16; i++)
			lt[i] = QUANT_V_SELI(better, lt_try[i], lt[i]);
		scale = QUANT_V_SELF(better, new_scale, scale);
		best = QUANT_V_SELF(better, new_scale * sumlx, best);
	}

	for (unsigned s = 0; s < QUANT_LANES; s++) {
		scales[s] = all_zero[s] ? 0.0f : scale[s];
		for (unsigned i = 0; i < 16; i++)
			L[16 * s + i] = all_zero[s] ? 0 : (int8_t)lt[i][s];
	}
}

/* The shared part of ggml's quantize_row_q4_K_ref and quantize_row_q5_K_ref: per sub-block of
 * 32 a scale and min by make_qkx2_quants (quant_qkx2_lanes), both quantized to 6 bits
 * against the block's largest, then every weight re-quantized against the rounded scale and
 * min (a sub-block whose rounded scale is 0 keeps the levels of the search). L gets the levels
 * in [0, nmax]. */
static void quant_k_scales(const float *x, int nmax, float rmin, float rdelta, int nstep,
			   uint16_t *d_out, uint16_t *dmin_out, uint8_t *scale_bytes, uint8_t *L)
{
	float scales[SKV_QK_K / 32], mins[SKV_QK_K / 32];
	float max_scale = 0, max_min = 0;

	for (unsigned j = 0; j < SKV_QK_K / 32; j += QUANT_LANES)
		quant_qkx2_lanes(x + 32 * j, nmax, rmin, rdelta, nstep, scales + j, mins + j,
				 L + 32 * j);
	for (unsigned j = 0; j < SKV_QK_K / 32; j++) {
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
		uint8_t ls = (uint8_t)quant_nearest_int(inv_scale * scales[j]);
		uint8_t lm = (uint8_t)quant_nearest_int(inv_min * mins[j]);
		ls = ls < 63 ? ls : 63;
		lm = lm < 63 ? lm : 63;
		quant_put_scale_min_k4(j, scale_bytes, ls, lm);
	}
	*d_out = skv_f32_to_f16(max_scale / 63.f);
	*dmin_out = skv_f32_to_f16(max_min / 63.f);

	const float d_all = skv_f16_to_f32(*d_out), dmin_all = skv_f16_to_f32(*dmin_out);
	for (unsigned j = 0; j < SKV_QK_K / 32; j++) {
		uint8_t sc, m;
		quant_scale_min_k4(j, scale_bytes, &sc, &m);
		const float d = d_all * (float)sc;
		if (d == 0.0f)
			continue;
		const float dm = dmin_all * (float)m;
		for (unsigned l = 0; l < 32; l++) {
			const int q = quant_nearest_int((x[32 * j + l] + dm) / d);
			L[32 * j + l] = (uint8_t)quant_clamp(q, 0, nmax);
		}
	}
}

static void quant_q4_k(const float *src, struct skv_block_q4_k *blocks, uint64_t n_blocks)
{
	uint8_t L[SKV_QK_K];

	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK_K) {
		struct skv_block_q4_k *blk = &blocks[b];
		quant_k_scales(src, 15, -1.f, 0.1f, 20, &blk->d, &blk->dmin, blk->scales, L);
		for (unsigned g = 0; g < SKV_QK_K / 64; g++)
			for (unsigned l = 0; l < 32; l++)
				blk->qs[32 * g + l] = (uint8_t)(L[64 * g + l] | (L[64 * g + 32 + l] << 4));
	}
}

static void quant_q5_k(const float *src, struct skv_block_q5_k *blocks, uint64_t n_blocks)
{
	uint8_t L[SKV_QK_K];

	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK_K) {
		struct skv_block_q5_k *blk = &blocks[b];
		quant_k_scales(src, 31, -0.5f, 0.1f, 15, &blk->d, &blk->dmin, blk->scales, L);
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

static void quant_q6_k(const float *src, struct skv_block_q6_k *blocks, uint64_t n_blocks)
{
	int8_t L[SKV_QK_K];
	float scales[SKV_QK_K / 16];

	for (uint64_t b = 0; b < n_blocks; b++, src += SKV_QK_K) {
		struct skv_block_q6_k *blk = &blocks[b];
		float max_scale = 0, max_abs_scale = 0;

		for (unsigned s = 0; s < SKV_QK_K / 16; s += QUANT_LANES)
			quant_qx_lanes(src + 16 * s, scales + s, L + 16 * s);
		for (unsigned s = 0; s < SKV_QK_K / 16; s++) {
			if (fabsf(scales[s]) > max_abs_scale) {
				max_abs_scale = fabsf(scales[s]);
				max_scale = scales[s];
			}
		}
		if (max_abs_scale < QUANT_GROUP_MAX_EPS) {
			memset(blk, 0, sizeof(*blk));
			continue;
		}

		/* the sub-block scale of largest magnitude maps to -128; the others are clipped at
		 * 127 (only +128 can exceed it) */
		const float iscale = -128.f / max_scale;
		blk->d = skv_f32_to_f16(1 / iscale);
		for (unsigned s = 0; s < SKV_QK_K / 16; s++) {
			const int q = quant_nearest_int(iscale * scales[s]);
			blk->scales[s] = (int8_t)(q < 127 ? q : 127);
		}

		const float d_all = skv_f16_to_f32(blk->d);
		for (unsigned s = 0; s < SKV_QK_K / 16; s++) {
			const float d = d_all * (float)blk->scales[s];
			if (d == 0.0f)
				continue;
			for (unsigned l = 0; l < 16; l++) {
				const int q = quant_nearest_int(src[16 * s + l] / d);
				L[16 * s + l] = (int8_t)(quant_clamp(q, -32, 31) + 32);
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

int skv_quant_row(uint32_t type, const float *src, void *dst, uint64_t n)
{
	const struct quant_type *t = quant_type_find(type);

	if (!t || n % t->block_elems || (n && (!src || !dst)))
		return -EINVAL;
	const uint64_t n_blocks = n / t->block_elems;

	switch (type) {
	case SKV_WTYPE_F32:
		memcpy(dst, src, n * sizeof(float));
		break;
	case SKV_WTYPE_F16: {
		uint8_t *bytes = dst;
		for (uint64_t i = 0; i < n; i++) {
			const uint16_t h = skv_f32_to_f16(src[i]);
			memcpy(bytes + 2 * i, &h, sizeof(h));
		}
		break;
	}
	case SKV_WTYPE_BF16: {
		uint8_t *bytes = dst;
		for (uint64_t i = 0; i < n; i++) {
			const uint16_t h = skv_f32_to_bf16(src[i]);
			memcpy(bytes + 2 * i, &h, sizeof(h));
		}
		break;
	}
	case SKV_WTYPE_Q8_0:
		quant_q8_0(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q4_0:
		quant_q4_0(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q4_K:
		quant_q4_k(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q5_K:
		quant_q5_k(src, dst, n_blocks);
		break;
	case SKV_WTYPE_Q6_K:
		quant_q6_k(src, dst, n_blocks);
		break;
	default:
		return -EINVAL;
	}
	return 0;
}
