/* Matrix-product kernels over the ggml block formats. This file is compiled once per
 * instruction set (engine/meson.build): -march=x86-64-v4 -mavx512vnni (QMAT_ISA v4),
 * -march=x86-64-v3 (v3) and the baseline (base); each copy exports its table qm_kernels_<isa>.
 *
 * Two paths per type, the caller's row count choosing (qm_job.interleaved):
 *
 * Row path (decode, few rows): each weight row is read in place, block by block, and dotted
 * with each row-major quantized row of x as ggml's vec_dot kernels do: 32 weights per 256-bit
 * vector, int8 products summed to int32 (vpdpbusd with AVX512-VNNI, vpmaddubsw + vpmaddwd with
 * AVX2), the K-quant sub-block scales applied in the integer domain (vpdpwssd / vpmaddwd), one
 * float multiply per block (Q8_0, Q4_0) or super-block (K-quants). Weights stream once at the
 * memory's speed; the few instructions per byte keep one core near that speed.
 *
 * Batched path (many rows): rows of x are interleaved 16 to a vector (qmatmul-pvt.h); a tile of
 * NR weight rows is decoded once into int8 (or float32) rows in L1, and each group of 4 decoded
 * weights, broadcast, is multiplied with 16 rows of x by one vpdpbusd (one FMA per weight for the
 * float types). A micro-tile of NR weight rows x MV groups of 16 rows of x keeps NR x MV
 * accumulators in registers; every decoded tile is reused by all rows of x, so the inner loop is
 * vpdpbusd-bound. Scales are applied in float per scale unit (32 or 16 weights).
 *
 * Unsigned operands of vpdpbusd: x is stored as q + 128 (interleaved layout) and every scale
 * unit's accumulator starts at -128 * (sum of its weights), which the weight decode computes;
 * the row path uses unsigned weights (nibbles) and subtracts 8 * sum(x) (Q4_0), 32 * sum(x)
 * (Q6_K) or the mins, or for Q8_0 flips the weights' sign bit (VNNI) / moves their sign onto x
 * (AVX2, vpsignb) as ggml does. Every product and sum of a scale unit is an exact integer. */
#include <stdint.h>
#include <string.h>

#include "qmatmul-pvt.h"
#include "quant.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QM_INLINE static inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

#define QM_CAT(a, b) a##_##b
#define QM_CAT2(a, b) QM_CAT(a, b)
#define QM_TABLE QM_CAT2(qm_kernels, QMAT_ISA)

/* Micro-tile: NR weight rows x MV groups of 16 rows of x. 32 zmm registers hold NR x MV int
 * and float accumulators; AVX2 and SSE split each 64-byte vector into two or four. */
#if defined(__AVX512F__)
#define QM_NR 4
#define QM_MV 3
#else
#define QM_NR 2
#define QM_MV 1
#endif
_Static_assert(QM_NR_MAX % QM_NR == 0, "tiles divide the thread split's row alignment");

typedef int32_t qm_vi __attribute__((vector_size(64)));
typedef float qm_vf __attribute__((vector_size(64)));
typedef uint8_t qm_vb __attribute__((vector_size(64)));
typedef float qm_vf_u __attribute__((vector_size(64), aligned(4)));
typedef _Float16 qm_vh_u __attribute__((vector_size(32), aligned(2)));
typedef uint16_t qm_vu16_u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t qm_vu32 __attribute__((vector_size(64)));

QM_INLINE float qm_h2f(uint16_t h)
{
#if defined(__F16C__)
	return _cvtsh_ss(h);
#else
	return skv_f16_to_f32(h);
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* primitives of the batched path on 16 lanes */

/* acc[l] += sum_i x[4l + i] * w[i]: x unsigned bytes, w four signed bytes (broadcast). The
 * AVX2 form (vpmaddubsw) is exact only while 2 * 255 * |w| < 32768: every weight type but Q8_0
 * (whose AVX2 copy uses the row path). */
QM_INLINE qm_vi qm_dpbusd(qm_vi acc, qm_vb x, int32_t w)
{
#if defined(__AVX512VNNI__)
	return (qm_vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)x, _mm512_set1_epi32(w));
#elif defined(__AVX2__)
	__m256i wv = _mm256_set1_epi32(w), ones = _mm256_set1_epi16(1);
	union {
		qm_vb v;
		__m256i h[2];
	} xu = { .v = x };
	union {
		qm_vi v;
		__m256i h[2];
	} au = { .v = acc };
	for (int i = 0; i < 2; i++)
		au.h[i] = _mm256_add_epi32(
			au.h[i], _mm256_madd_epi16(_mm256_maddubs_epi16(xu.h[i], wv), ones));
	return au.v;
#else
	int8_t wb[4];
	memcpy(wb, &w, 4);
	for (int l = 0; l < 16; l++)
		acc[l] += x[4 * l] * wb[0] + x[4 * l + 1] * wb[1] + x[4 * l + 2] * wb[2] +
			  x[4 * l + 3] * wb[3];
	return acc;
#endif
}

QM_INLINE qm_vf qm_cvt(qm_vi v)
{
	return __builtin_convertvector(v, qm_vf);
}

/* ---------------------------------------------------------------------------------------- */
/* weight rows decoded for the batched path: int8 weights, per scale unit the accumulator's
 * start (-128 * sum of the unit's weights), its float scale and (Q4_K, Q5_K) its float min */

struct qm_wtile {
	int8_t *q;     /* [QM_NR][q_ld] */
	int32_t *corr; /* [QM_NR][units] */
	float *sc;     /* [QM_NR][units] */
	float *mn;     /* [QM_NR][units] */
	size_t q_ld;
	uint32_t units;
};

static void qm_wtile_init(struct qm_wtile *t, void *scratch, uint32_t cols, uint32_t unit)
{
	uint8_t *p = scratch;
	t->q_ld = (cols + 63u) & ~(size_t)63;
	t->units = cols / unit;
	size_t ul = ((size_t)t->units + 15u) & ~(size_t)15;
	t->q = (int8_t *)p;
	p += QM_NR * t->q_ld;
	t->corr = (int32_t *)p;
	p += QM_NR * ul * 4;
	t->sc = (float *)p;
	p += QM_NR * ul * 4;
	t->mn = (float *)p;
	t->units = cols / unit;
	/* units' stride: exact count (no padding read) */
}

static void qm_wtile_zero_row(struct qm_wtile *t, uint32_t r, uint32_t cols)
{
	memset(t->q + r * t->q_ld, 0, cols);
	for (uint32_t u = 0; u < t->units; u++) {
		t->corr[r * t->units + u] = 0;
		t->sc[r * t->units + u] = 0.f;
		t->mn[r * t->units + u] = 0.f;
	}
}

static void qm_sums(const int8_t *q, uint32_t n, uint32_t unit, int32_t *corr)
{
	for (uint32_t u = 0; u < n / unit; u++) {
		int32_t s = 0;
		for (uint32_t i = 0; i < unit; i++)
			s += q[u * unit + i];
		corr[u] = -128 * s;
	}
}

__attribute__((unused)) static void qm_dec_q8_0(const void *row, uint32_t cols, int8_t *q, int32_t *corr, float *sc,
			float *mn)
{
	const struct skv_block_q8_0 *b = row;
	for (uint32_t i = 0; i < cols / 32; i++) {
		memcpy(q + 32 * i, b[i].qs, 32);
		sc[i] = qm_h2f(b[i].d);
	}
	qm_sums(q, cols, 32, corr);
}

static void qm_dec_q4_0(const void *row, uint32_t cols, int8_t *q, int32_t *corr, float *sc,
			float *mn)
{
	const struct skv_block_q4_0 *b = row;
	for (uint32_t i = 0; i < cols / 32; i++) {
		for (uint32_t j = 0; j < 16; j++) {
			q[32 * i + j] = (int8_t)((b[i].qs[j] & 15) - 8);
			q[32 * i + 16 + j] = (int8_t)((b[i].qs[j] >> 4) - 8);
		}
		sc[i] = qm_h2f(b[i].d);
	}
	qm_sums(q, cols, 32, corr);
}

/* The 8 six-bit scales and mins of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4). */
QM_INLINE void qm_scale_min_k4(const uint8_t *s, uint8_t *sc, uint8_t *m)
{
	uint32_t w0, w1, w2;
	memcpy(&w0, s, 4);
	memcpy(&w1, s + 4, 4);
	memcpy(&w2, s + 8, 4);
	uint32_t sc_lo = w0 & 0x3f3f3f3fu, m_lo = w1 & 0x3f3f3f3fu;
	uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 6) & 0x03030303u) << 4;
	uint32_t m_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 6) & 0x03030303u) << 4;
	memcpy(sc, &sc_lo, 4);
	memcpy(sc + 4, &sc_hi, 4);
	memcpy(m, &m_lo, 4);
	memcpy(m + 4, &m_hi, 4);
}

static void qm_dec_q4_k(const void *row, uint32_t cols, int8_t *q, int32_t *corr, float *sc,
			float *mn)
{
	const struct skv_block_q4_k *b = row;
	for (uint32_t i = 0; i < cols / 256; i++) {
		uint8_t s[8], m[8];
		qm_scale_min_k4(b[i].scales, s, m);
		float d = qm_h2f(b[i].d), dmin = qm_h2f(b[i].dmin);
		int8_t *o = q + 256 * i;
		for (uint32_t c = 0; c < 4; c++)
			for (uint32_t l = 0; l < 32; l++) {
				o[64 * c + l] = (int8_t)(b[i].qs[32 * c + l] & 15);
				o[64 * c + 32 + l] = (int8_t)(b[i].qs[32 * c + l] >> 4);
			}
		for (uint32_t j = 0; j < 8; j++) {
			sc[8 * i + j] = d * (float)s[j];
			mn[8 * i + j] = dmin * (float)m[j];
		}
	}
	qm_sums(q, cols, 32, corr);
}

static void qm_dec_q5_k(const void *row, uint32_t cols, int8_t *q, int32_t *corr, float *sc,
			float *mn)
{
	const struct skv_block_q5_k *b = row;
	for (uint32_t i = 0; i < cols / 256; i++) {
		uint8_t s[8], m[8];
		qm_scale_min_k4(b[i].scales, s, m);
		float d = qm_h2f(b[i].d), dmin = qm_h2f(b[i].dmin);
		int8_t *o = q + 256 * i;
		for (uint32_t c = 0; c < 4; c++)
			for (uint32_t l = 0; l < 32; l++) {
				uint8_t h = b[i].qh[l];
				o[64 * c + l] = (int8_t)((b[i].qs[32 * c + l] & 15) |
							 (((h >> (2 * c)) & 1) << 4));
				o[64 * c + 32 + l] = (int8_t)((b[i].qs[32 * c + l] >> 4) |
							      (((h >> (2 * c + 1)) & 1) << 4));
			}
		for (uint32_t j = 0; j < 8; j++) {
			sc[8 * i + j] = d * (float)s[j];
			mn[8 * i + j] = dmin * (float)m[j];
		}
	}
	qm_sums(q, cols, 32, corr);
}

static void qm_dec_q6_k(const void *row, uint32_t cols, int8_t *q, int32_t *corr, float *sc,
			float *mn)
{
	const struct skv_block_q6_k *b = row;
	for (uint32_t i = 0; i < cols / 256; i++) {
		float d = qm_h2f(b[i].d);
		int8_t *o = q + 256 * i;
		for (uint32_t h = 0; h < 2; h++) {
			const uint8_t *ql = b[i].ql + 64 * h, *qh = b[i].qh + 32 * h;
			for (uint32_t l = 0; l < 32; l++) {
				o[128 * h + l] = (int8_t)(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
				o[128 * h + 32 + l] =
					(int8_t)(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
				o[128 * h + 64 + l] =
					(int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
				o[128 * h + 96 + l] =
					(int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
			}
		}
		for (uint32_t j = 0; j < 16; j++)
			sc[16 * i + j] = d * (float)b[i].scales[j];
	}
	qm_sums(q, cols, 16, corr);
}

typedef void qm_dec_fn(const void *row, uint32_t cols, int8_t *q, int32_t *corr, float *sc,
		       float *mn);

/* Stores the micro-tile's sums: lane l of facc[r][v] is y[16 (v0 + v) + l][r0 + r]. */
QM_INLINE void qm_store_tile(const struct qm_job *job, uint32_t r0, uint32_t nr, uint32_t v0,
			     int mv, qm_vf facc[QM_NR][QM_MV])
{
	for (uint32_t r = 0; r < nr; r++)
		for (int v = 0; v < mv; v++) {
			float out[16];
			memcpy(out, &facc[r][v], sizeof(out));
			for (uint32_t l = 0; l < QM_LANES; l++) {
				uint32_t m = (v0 + (uint32_t)v) * QM_LANES + l;
				if (m >= job->m_rows)
					break;
				float *dst = job->y + (size_t)m * job->ld_y + r0 + r;
				*dst = job->add ? *dst + out[l] : out[l];
			}
		}
}

/* The integer micro-kernel: QM_NR decoded weight rows x mv groups of x; unit weights per scale
 * unit, xblock values per scale of x; has_min: subtract the K-quant mins. */
QM_INLINE void qm_mk_int(const struct qm_job *job, const struct qm_wtile *t, uint32_t r0,
			 uint32_t nr, uint32_t v0, const int mv, const uint32_t unit,
			 const uint32_t xblock, const int has_min)
{
	const struct qm_act *a = job->act;
	const uint32_t units = t->units;
	qm_vf facc[QM_NR][QM_MV];
	const uint8_t *xq[QM_MV];
	const float *xd[QM_MV], *xs[QM_MV];
	for (int v = 0; v < mv; v++) {
		xq[v] = a->iqs + (size_t)(v0 + v) * a->iqs_ld;
		xd[v] = a->id + (size_t)(v0 + v) * a->id_ld;
		xs[v] = has_min ? a->ixsum + (size_t)(v0 + v) * a->ixsum_ld : NULL;
		for (int r = 0; r < QM_NR; r++)
			facc[r][v] = (qm_vf){};
	}
	for (uint32_t u = 0; u < units; u++) {
		qm_vi acc[QM_NR][QM_MV];
		for (int r = 0; r < QM_NR; r++)
			for (int v = 0; v < mv; v++)
				acc[r][v] = (qm_vi){} + t->corr[r * units + u];
		for (uint32_t g = u * unit / 4; g < (u + 1) * unit / 4; g++) {
			qm_vb xv[QM_MV];
			for (int v = 0; v < mv; v++)
				xv[v] = *(const qm_vb *)(xq[v] + (size_t)g * 64);
			for (int r = 0; r < QM_NR; r++) {
				int32_t w;
				memcpy(&w, t->q + r * t->q_ld + 4 * g, 4);
				for (int v = 0; v < mv; v++)
					acc[r][v] = qm_dpbusd(acc[r][v], xv[v], w);
			}
		}
		for (int v = 0; v < mv; v++) {
			qm_vf dx = *(const qm_vf *)(xd[v] + (size_t)(u * unit / xblock) * 16);
			for (int r = 0; r < QM_NR; r++)
				facc[r][v] += qm_cvt(acc[r][v]) * (dx * t->sc[r * units + u]);
			if (has_min) {
				qm_vf xsum = *(const qm_vf *)(xs[v] + (size_t)u * 16);
				for (int r = 0; r < QM_NR; r++)
					facc[r][v] -= xsum * t->mn[r * units + u];
			}
		}
	}
	qm_store_tile(job, r0, nr, v0, mv, facc);
}

QM_INLINE void qm_batched_int(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch,
			      qm_dec_fn *dec, const uint32_t unit, const uint32_t xblock,
			      const int has_min)
{
	const struct skv_qmat *w = job->w;
	struct qm_wtile t;
	qm_wtile_init(&t, scratch, w->cols, unit);
	uint32_t groups = (job->m_rows + QM_LANES - 1) / QM_LANES;
	for (uint32_t r = r0; r < r1; r += QM_NR) {
		uint32_t nr = r1 - r < QM_NR ? r1 - r : QM_NR;
		for (uint32_t i = 0; i < QM_NR; i++) {
			if (i < nr)
				dec((const uint8_t *)w->data + (size_t)(r + i) * w->row_bytes, w->cols,
				    t.q + i * t.q_ld, t.corr + i * t.units, t.sc + i * t.units,
				    t.mn + i * t.units);
			else
				qm_wtile_zero_row(&t, i, w->cols);
		}
		uint32_t v = 0;
		for (; v + QM_MV <= groups; v += QM_MV)
			qm_mk_int(job, &t, r, nr, v, QM_MV, unit, xblock, has_min);
#if QM_MV > 2
		if (groups - v == 2)
			qm_mk_int(job, &t, r, nr, v, 2, unit, xblock, has_min);
		else
#endif
#if QM_MV > 1
		if (groups - v == 1)
			qm_mk_int(job, &t, r, nr, v, 1, unit, xblock, has_min);
#endif
	}
}

/* The float micro-kernel (F32, F16, BF16): w rows in float32 rows of scratch. */
QM_INLINE void qm_mk_f32(const struct qm_job *job, const float *wrows, size_t w_ld, uint32_t r0,
			 uint32_t nr, uint32_t v0, const int mv)
{
	const uint32_t cols = job->w->cols;
	const float *xs[QM_MV];
	qm_vf facc[QM_NR][QM_MV];
	for (int v = 0; v < mv; v++) {
		xs[v] = job->act->ix + (size_t)(v0 + v) * cols * QM_LANES;
		for (int r = 0; r < QM_NR; r++)
			facc[r][v] = (qm_vf){};
	}
	for (uint32_t k = 0; k < cols; k++) {
		qm_vf xv[QM_MV];
		for (int v = 0; v < mv; v++)
			xv[v] = *(const qm_vf *)(xs[v] + (size_t)k * QM_LANES);
		for (int r = 0; r < QM_NR; r++) {
			float wk = wrows[r * w_ld + k];
			for (int v = 0; v < mv; v++)
				facc[r][v] += xv[v] * wk;
		}
	}
	qm_store_tile(job, r0, nr, v0, mv, facc);
}

/* ---------------------------------------------------------------------------------------- */
/* float rows: F32, F16, BF16 widened to float32 */

enum qm_ftype { QM_F32, QM_F16, QM_BF16 };

QM_INLINE qm_vf qm_load_w16(const void *row, uint32_t c, const enum qm_ftype ft)
{
	if (ft == QM_F32)
		return *(const qm_vf_u *)((const float *)row + c);
	if (ft == QM_F16) {
#if defined(__AVX512F__)
		return (qm_vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c)));
#else
		return __builtin_convertvector(*(const qm_vh_u *)((const _Float16 *)row + c), qm_vf);
#endif
	}
	qm_vu32 wide = __builtin_convertvector(*(const qm_vu16_u *)((const uint16_t *)row + c), qm_vu32);
	return (qm_vf)(wide << 16);
}

QM_INLINE float qm_load_w1(const void *row, uint32_t c, const enum qm_ftype ft)
{
	if (ft == QM_F32)
		return ((const float *)row)[c];
	uint16_t h = ((const uint16_t *)row)[c];
	if (ft == QM_F16)
		return qm_h2f(h);
	uint32_t bits = (uint32_t)h << 16;
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

QM_INLINE float qm_hsum(qm_vf v)
{
	float out[16];
	memcpy(out, &v, sizeof(out));
	float s = 0.f;
	for (int i = 0; i < 8; i++)
		out[i] += out[i + 8];
	for (int i = 0; i < 4; i++)
		out[i] += out[i + 4];
	s = (out[0] + out[2]) + (out[1] + out[3]);
	return s;
}

QM_INLINE float qm_dot_float(const void *row, const float *x, uint32_t cols,
			     const enum qm_ftype ft)
{
	qm_vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
	uint32_t c = 0;
	for (; c + 64 <= cols; c += 64) {
		a0 += qm_load_w16(row, c, ft) * *(const qm_vf_u *)(x + c);
		a1 += qm_load_w16(row, c + 16, ft) * *(const qm_vf_u *)(x + c + 16);
		a2 += qm_load_w16(row, c + 32, ft) * *(const qm_vf_u *)(x + c + 32);
		a3 += qm_load_w16(row, c + 48, ft) * *(const qm_vf_u *)(x + c + 48);
	}
	for (; c + 16 <= cols; c += 16)
		a0 += qm_load_w16(row, c, ft) * *(const qm_vf_u *)(x + c);
	float s = qm_hsum((a0 + a1) + (a2 + a3));
	for (; c < cols; c++)
		s += qm_load_w1(row, c, ft) * x[c];
	return s;
}

QM_INLINE void qm_put(const struct qm_job *job, uint32_t m, uint32_t r, float v)
{
	float *dst = job->y + (size_t)m * job->ld_y + r;
	*dst = job->add ? *dst + v : v;
}

QM_INLINE void qm_run_float(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch,
			    const enum qm_ftype ft)
{
	const struct skv_qmat *w = job->w;
	const uint32_t cols = w->cols;
	if (!job->interleaved) {
		for (uint32_t r = r0; r < r1; r++) {
			const void *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
			for (uint32_t m = 0; m < job->m_rows; m++)
				qm_put(job, m, r,
				       qm_dot_float(row, job->act->x + (size_t)m * job->act->ld_x, cols,
						    ft));
		}
		return;
	}
	float *wrows = scratch;
	size_t w_ld = cols;
	uint32_t groups = (job->m_rows + QM_LANES - 1) / QM_LANES;
	for (uint32_t r = r0; r < r1; r += QM_NR) {
		uint32_t nr = r1 - r < QM_NR ? r1 - r : QM_NR;
		for (uint32_t i = 0; i < QM_NR; i++) {
			float *o = wrows + i * w_ld;
			if (i >= nr) {
				memset(o, 0, cols * sizeof(float));
				continue;
			}
			const void *row = (const uint8_t *)w->data + (size_t)(r + i) * w->row_bytes;
			uint32_t c = 0;
			for (; c + 16 <= cols; c += 16)
				*(qm_vf_u *)(o + c) = qm_load_w16(row, c, ft);
			for (; c < cols; c++)
				o[c] = qm_load_w1(row, c, ft);
		}
		uint32_t v = 0;
		for (; v + QM_MV <= groups; v += QM_MV)
			qm_mk_f32(job, wrows, w_ld, r, nr, v, QM_MV);
#if QM_MV > 2
		if (groups - v == 2)
			qm_mk_f32(job, wrows, w_ld, r, nr, v, 2);
		else
#endif
#if QM_MV > 1
		if (groups - v == 1)
			qm_mk_f32(job, wrows, w_ld, r, nr, v, 1);
#endif
	}
}

static void qm_f32(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	qm_run_float(job, r0, r1, scratch, QM_F32);
}

static void qm_f16(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	qm_run_float(job, r0, r1, scratch, QM_F16);
}

static void qm_bf16(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	qm_run_float(job, r0, r1, scratch, QM_BF16);
}

/* ---------------------------------------------------------------------------------------- */
/* row path: one weight row dotted with one row-major quantized row of x */

#if defined(__AVX2__)

QM_INLINE __m256i qm_dot8_u8s8(__m256i acc, __m256i u, __m256i s)
{
#if defined(__AVX512VNNI__)
	return _mm256_dpbusd_epi32(acc, u, s);
#else
	return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
						       _mm256_set1_epi16(1)));
#endif
}

QM_INLINE __m256i qm_dot8_s16(__m256i acc, __m256i a, __m256i b)
{
#if defined(__AVX512VNNI__)
	return _mm256_dpwssd_epi32(acc, a, b);
#else
	return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

QM_INLINE float qm_hsum8(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

QM_INLINE __m256i qm_q8_block(const struct skv_block_q8_0 *b, const int8_t *xq, const int32_t *ls)
{
	__m256i wv = _mm256_loadu_si256((const __m256i *)b->qs);
	__m256i xv = _mm256_loadu_si256((const __m256i *)xq);
#if defined(__AVX512VNNI__)
	return _mm256_dpbusd_epi32(_mm256_loadu_si256((const __m256i *)ls),
				   _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80)), xv);
#else
	(void)ls;
	return _mm256_madd_epi16(
		_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)),
		_mm256_set1_epi16(1));
#endif
}

QM_INLINE float qm_dot_q8_0(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q8_0 *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int32_t *xs = a->lsum + (size_t)m * a->qs_ld / 4;
	__m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
	uint32_t nb = cols / 32, i = 0;
	for (; i + 2 <= nb; i += 2) {
		__m256i p0 = qm_q8_block(b + i, xq + 32 * i, xs + 8 * i);
		__m256i p1 = qm_q8_block(b + i + 1, xq + 32 * i + 32, xs + 8 * i + 8);
		f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qm_h2f(b[i].d) * xd[i]), f0);
		f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1),
				     _mm256_set1_ps(qm_h2f(b[i + 1].d) * xd[i + 1]), f1);
	}
	if (i < nb) {
		__m256i p0 = qm_q8_block(b + i, xq + 32 * i, xs + 8 * i);
		f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qm_h2f(b[i].d) * xd[i]), f0);
	}
	return qm_hsum8(_mm256_add_ps(f0, f1));
}

QM_INLINE __m256i qm_q4_block(const struct skv_block_q4_0 *b, const int8_t *xq, const int32_t *ls)
{
	__m128i v = _mm_loadu_si128((const __m128i *)b->qs);
	__m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v),
				      _mm256_set1_epi8(15));
	__m256i corr = _mm256_srai_epi32(_mm256_loadu_si256((const __m256i *)ls), 4);
	return qm_dot8_u8s8(corr, wv, _mm256_loadu_si256((const __m256i *)xq));
}

QM_INLINE float qm_dot_q4_0(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q4_0 *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int32_t *xs = a->lsum + (size_t)m * a->qs_ld / 4;
	__m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
	uint32_t nb = cols / 32, i = 0;
	for (; i + 2 <= nb; i += 2) {
		__m256i p0 = qm_q4_block(b + i, xq + 32 * i, xs + 8 * i);
		__m256i p1 = qm_q4_block(b + i + 1, xq + 32 * i + 32, xs + 8 * i + 8);
		f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qm_h2f(b[i].d) * xd[i]), f0);
		f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1),
				     _mm256_set1_ps(qm_h2f(b[i + 1].d) * xd[i + 1]), f1);
	}
	if (i < nb) {
		__m256i p0 = qm_q4_block(b + i, xq + 32 * i, xs + 8 * i);
		f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(qm_h2f(b[i].d) * xd[i]), f0);
	}
	return qm_hsum8(_mm256_add_ps(f0, f1));
}

/* vpshufb masks broadcasting int16 word j of each 128-bit lane (lo: word jl, hi: word jh). */
QM_INLINE __m256i qm_word_mask(int jl, int jh)
{
	return _mm256_set_m128i(_mm_set1_epi16((short)(((2 * jh + 1) << 8) | (2 * jh))),
				_mm_set1_epi16((short)(((2 * jl + 1) << 8) | (2 * jl))));
}

QM_INLINE __m256i qm_shift16(__m256i v, const int s)
{
	return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s);
}

/* Q4_K and Q5_K: fifth = 1 adds the fifth bits of qh. */
QM_INLINE float qm_dot_k45(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols,
			   const int fifth)
{
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int16_t *xb = a->bsum32 + (size_t)m * a->b32_ld;
	const size_t bytes = fifth ? sizeof(struct skv_block_q5_k) : sizeof(struct skv_block_q4_k);
	const __m256i low4 = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(16);
	__m256 f = _mm256_setzero_ps();
	__m128 fm = _mm_setzero_ps();
	for (uint32_t i = 0; i < cols / 256; i++) {
		const uint8_t *blk = (const uint8_t *)row + i * bytes;
		const uint16_t *dd = (const uint16_t *)blk;
		const uint8_t *qs = fifth ? ((const struct skv_block_q5_k *)blk)->qs
					  : ((const struct skv_block_q4_k *)blk)->qs;
		uint8_t sc[8], mn[8];
		qm_scale_min_k4(blk + 4, sc, mn);
		uint64_t sc64, mn64;
		memcpy(&sc64, sc, 8);
		memcpy(&mn64, mn, 8);
		__m256i scv = _mm256_broadcastsi128_si256(
			_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc64)));
		__m256i qh = fifth ? _mm256_loadu_si256(
					     (const __m256i *)((const struct skv_block_q5_k *)blk)->qh)
				   : _mm256_setzero_si256();
		const int8_t *x = xq + 256 * i;
		__m256i acc = _mm256_setzero_si256();
		for (int c = 0; c < 4; c++) {
			__m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
			__m256i lo = _mm256_and_si256(q, low4);
			__m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
			if (fifth) {
				lo = _mm256_or_si256(lo, _mm256_and_si256(qm_shift16(qh, 4 - 2 * c), bit4));
				hi = _mm256_or_si256(hi, _mm256_and_si256(qm_shift16(qh, 3 - 2 * c), bit4));
			}
			__m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x + 64 * c)));
			__m256i p1 = _mm256_maddubs_epi16(
				hi, _mm256_loadu_si256((const __m256i *)(x + 64 * c + 32)));
			acc = qm_dot8_s16(acc, p0, _mm256_shuffle_epi8(scv, qm_word_mask(2 * c, 2 * c)));
			acc = qm_dot8_s16(acc, p1,
					  _mm256_shuffle_epi8(scv, qm_word_mask(2 * c + 1, 2 * c + 1)));
		}
		float dx = xd[i];
		f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(qm_h2f(dd[0]) * dx), f);
		__m128i mins = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn64)),
					      _mm_loadu_si128((const __m128i *)(xb + 8 * i)));
		fm = _mm_fmadd_ps(_mm_cvtepi32_ps(mins), _mm_set1_ps(qm_h2f(dd[1]) * dx), fm);
	}
	fm = _mm_add_ps(fm, _mm_movehl_ps(fm, fm));
	fm = _mm_add_ss(fm, _mm_movehdup_ps(fm));
	return qm_hsum8(f) - _mm_cvtss_f32(fm);
}

QM_INLINE float qm_dot_q4_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	return qm_dot_k45(row, a, m, cols, 0);
}

QM_INLINE float qm_dot_q5_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	return qm_dot_k45(row, a, m, cols, 1);
}

QM_INLINE float qm_dot_q6_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q6_k *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int16_t *xb = a->bsum16 + (size_t)m * a->b16_ld;
	const __m256i low4 = _mm256_set1_epi8(15), hi2 = _mm256_set1_epi8(0x30);
	__m256 f = _mm256_setzero_ps();
	for (uint32_t i = 0; i < cols / 256; i++) {
		__m256i scv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b[i].scales));
		__m256i corr = _mm256_madd_epi16(scv, _mm256_loadu_si256((const __m256i *)(xb + 16 * i)));
		__m256i acc = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
		const int8_t *x = xq + 256 * i;
		for (int h = 0; h < 2; h++) {
			__m256i sch = h ? _mm256_permute2x128_si256(scv, scv, 0x11)
					: _mm256_permute2x128_si256(scv, scv, 0x00);
			__m256i ql0 = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h));
			__m256i ql1 = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h + 32));
			__m256i qh = _mm256_loadu_si256((const __m256i *)(b[i].qh + 32 * h));
			__m256i q[4];
			q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4),
					       _mm256_and_si256(_mm256_slli_epi16(qh, 4), hi2));
			q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4),
					       _mm256_and_si256(_mm256_slli_epi16(qh, 2), hi2));
			q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
					       _mm256_and_si256(qh, hi2));
			q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
					       _mm256_and_si256(_mm256_srli_epi16(qh, 2), hi2));
			for (int k = 0; k < 4; k++) {
				__m256i p = _mm256_maddubs_epi16(
					q[k], _mm256_loadu_si256((const __m256i *)(x + 128 * h + 32 * k)));
				acc = qm_dot8_s16(acc, p,
						  _mm256_shuffle_epi8(sch, qm_word_mask(2 * k, 2 * k + 1)));
			}
		}
		f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(qm_h2f(b[i].d) * xd[i]), f);
	}
	return qm_hsum8(f);
}

#else /* the baseline: plain C, the same integer sums */

QM_INLINE float qm_dot_q8_0(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q8_0 *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	float s = 0.f;
	for (uint32_t i = 0; i < cols / 32; i++) {
		int32_t dot = 0;
		for (uint32_t j = 0; j < 32; j++)
			dot += b[i].qs[j] * xq[32 * i + j];
		s += (float)dot * (qm_h2f(b[i].d) * xd[i]);
	}
	return s;
}

QM_INLINE float qm_dot_q4_0(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q4_0 *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	float s = 0.f;
	for (uint32_t i = 0; i < cols / 32; i++) {
		int32_t dot = 0;
		for (uint32_t j = 0; j < 16; j++)
			dot += ((b[i].qs[j] & 15) - 8) * xq[32 * i + j] +
			       ((b[i].qs[j] >> 4) - 8) * xq[32 * i + 16 + j];
		s += (float)dot * (qm_h2f(b[i].d) * xd[i]);
	}
	return s;
}

QM_INLINE float qm_dot_k45(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols,
			   const int fifth)
{
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int16_t *xb = a->bsum32 + (size_t)m * a->b32_ld;
	const size_t bytes = fifth ? sizeof(struct skv_block_q5_k) : sizeof(struct skv_block_q4_k);
	float s = 0.f;
	for (uint32_t i = 0; i < cols / 256; i++) {
		const uint8_t *blk = (const uint8_t *)row + i * bytes;
		uint16_t dd[2];
		memcpy(dd, blk, 4);
		const uint8_t *qs = fifth ? ((const struct skv_block_q5_k *)blk)->qs
					  : ((const struct skv_block_q4_k *)blk)->qs;
		const uint8_t *qh = fifth ? ((const struct skv_block_q5_k *)blk)->qh : NULL;
		uint8_t sc[8], mn[8];
		qm_scale_min_k4(blk + 4, sc, mn);
		const int8_t *x = xq + 256 * i;
		int32_t isum = 0, msum = 0;
		for (int c = 0; c < 4; c++) {
			int32_t d0 = 0, d1 = 0;
			for (int l = 0; l < 32; l++) {
				int lo = qs[32 * c + l] & 15, hi = qs[32 * c + l] >> 4;
				if (fifth) {
					lo |= ((qh[l] >> (2 * c)) & 1) << 4;
					hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
				}
				d0 += lo * x[64 * c + l];
				d1 += hi * x[64 * c + 32 + l];
			}
			isum += sc[2 * c] * d0 + sc[2 * c + 1] * d1;
		}
		for (int j = 0; j < 8; j++)
			msum += mn[j] * xb[8 * i + j];
		s += (qm_h2f(dd[0]) * xd[i]) * (float)isum - (qm_h2f(dd[1]) * xd[i]) * (float)msum;
	}
	return s;
}

QM_INLINE float qm_dot_q4_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	return qm_dot_k45(row, a, m, cols, 0);
}

QM_INLINE float qm_dot_q5_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	return qm_dot_k45(row, a, m, cols, 1);
}

QM_INLINE float qm_dot_q6_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q6_k *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	float s = 0.f;
	for (uint32_t i = 0; i < cols / 256; i++) {
		int8_t q[256];
		int32_t corr[16], sc[16];
		float unused[16];
		qm_dec_q6_k(b + i, 256, q, corr, (float *)unused, NULL);
		for (int j = 0; j < 16; j++)
			sc[j] = b[i].scales[j];
		const int8_t *x = xq + 256 * i;
		int32_t isum = 0;
		for (int j = 0; j < 16; j++) {
			int32_t dot = 0;
			for (int l = 0; l < 16; l++)
				dot += q[16 * j + l] * x[16 * j + l];
			isum += sc[j] * dot;
		}
		s += (qm_h2f(b[i].d) * xd[i]) * (float)isum;
	}
	return s;
}

#endif

typedef float qm_dot_fn(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols);

QM_INLINE void qm_run_rows(const struct qm_job *job, uint32_t r0, uint32_t r1, qm_dot_fn *dot)
{
	const struct skv_qmat *w = job->w;
	for (uint32_t r = r0; r < r1; r++) {
		const void *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
		for (uint32_t m = 0; m < job->m_rows; m++)
			qm_put(job, m, r, dot(row, job->act, m, w->cols));
	}
}

static void qm_q8_0(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
#if defined(__AVX2__) && !defined(__AVX512VNNI__)
	/* vpmaddubsw would saturate on q + 128: the row path, whose vpsignb form is exact */
	qm_run_rows(job, r0, r1, qm_dot_q8_0);
#else
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q8_0, 32, 32, 0);
	else
		qm_run_rows(job, r0, r1, qm_dot_q8_0);
#endif
}

static void qm_q4_0(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q4_0, 32, 32, 0);
	else
		qm_run_rows(job, r0, r1, qm_dot_q4_0);
}

static void qm_q4_k(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q4_k, 32, 256, 1);
	else
		qm_run_rows(job, r0, r1, qm_dot_q4_k);
}

static void qm_q5_k(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q5_k, 32, 256, 1);
	else
		qm_run_rows(job, r0, r1, qm_dot_q5_k);
}

static void qm_q6_k(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q6_k, 16, 256, 0);
	else
		qm_run_rows(job, r0, r1, qm_dot_q6_k);
}

#if defined(__AVX512VNNI__)
#define QM_NAME "avx512-vnni"
#elif defined(__AVX2__)
#define QM_NAME "avx2"
#else
#define QM_NAME "base"
#endif

const struct qm_kernels QM_TABLE = {
	.name = QM_NAME,
	.f32 = qm_f32,
	.f16 = qm_f16,
	.bf16 = qm_bf16,
	.q8_0 = qm_q8_0,
	.q4_0 = qm_q4_0,
	.q4_k = qm_q4_k,
	.q5_k = qm_q5_k,
	.q6_k = qm_q6_k,
};
