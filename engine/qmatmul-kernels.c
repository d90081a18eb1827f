/* Matrix-product kernels over the ggml block formats. This file is compiled once per
 * instruction set (engine/meson.build): -march=x86-64-v4 -mavx512vnni (QMAT_ISA v4),
 * -march=x86-64-v3 (v3) and the baseline (base); each copy exports its table qm_kernels_<isa>
 * (qmatmul-pvt.h), with the quantizers of x.
 *
 * Two paths per type; qmatmul.c chooses by the number of rows of x (qm_job.interleaved):
 *
 * Row path (decode, few rows): each weight row is read in place, block by block, and dotted
 * with each row-major quantized row of x as ggml's vec_dot kernels do: 32 weights per 256-bit
 * vector, int8 products summed to int32 (vpdpbusd with AVX512-VNNI, vpmaddubsw + vpmaddwd with
 * AVX2), the K-quant sub-block scales applied in the integer domain (vpdpwssd / vpmaddwd), one
 * float multiply per block (Q8_0, Q4_0) or super-block (K-quants). Unsigned operands: the
 * nibbles as stored (Q4_0 subtracts 8 * sum(x), Q6_K 32 * sum(x), per lane), Q8_0's sign bit
 * flipped (VNNI, minus 128 * sum(x) per lane) or its sign moved onto x (AVX2, vpsignb), as
 * ggml does. A few rows ahead are prefetched, so one core streams the weights at the memory's
 * speed.
 *
 * Batched path (many rows): rows of x are interleaved 16 to a vector (qmatmul-pvt.h); a block
 * of QM_WB weight rows is decoded once into unsigned bytes (the codes as stored; Q8_0's
 * q + 128) with float scales per scale unit, and each group of 4 decoded weights, broadcast,
 * is multiplied with 16 rows of x by one vpdpbusd (one FMA per weight for F32/F16/BF16,
 * widened to float32: x stays exact float32). Every weight offset is taken off on x's side
 * (each unit's accumulators start at x's corr), so a unit's sum is one exact integer per row
 * of x. A micro-tile of QM_NR weight rows x QM_MV groups keeps its accumulators and x in
 * registers; K is walked in chunks so that the chunk of x reused by every tile of the block
 * stays in L1, and the next block's weights are prefetched while this one computes. Every
 * decoded weight is reused by all rows of x. */
#include <math.h>
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
 * and float accumulators, MV vectors of x and a broadcast weight; AVX2 and SSE split each
 * 64-byte vector into two or four registers, hence their smaller tile. With one or two groups
 * of x (16 or 32 rows) two tiles run as one of QM_NR_WIDE rows, so that enough independent
 * accumulator chains cover vpdpbusd's latency (6 rows x 1 group is 6 chains: latency-bound).
 * Side by side against 3 x 4 tiles on the 1B shape: 0.98-1.22x (tools/README.md). */
#if defined(__AVX512F__)
#define QM_NR 6
#define QM_MV 4
#define QM_NR_WIDE 12
#define QM_MV_WIDE 2
#else
#define QM_NR 3
#define QM_MV 1
#define QM_NR_WIDE 3
#define QM_MV_WIDE 0
#endif
_Static_assert(QM_NR_MAX % QM_NR == 0, "tiles divide the thread split's row alignment");
_Static_assert(QM_WB % QM_NR == 0 && QM_WBF % QM_NR == 0, "blocks are whole tiles");
_Static_assert(QM_WB <= QM_WB_MAX && QM_WBF <= QM_WB_MAX, "qm_scratch_bytes covers the blocks");
_Static_assert(QM_MV <= QM_MV_MAX, "qm_scratch_bytes covers the partial sums");
_Static_assert(QM_NR_WIDE % QM_NR == 0 && QM_NR_WIDE <= QM_NR_MAX &&
		       QM_NR_WIDE * QM_MV_WIDE <= QM_NR * QM_MV,
	       "a wide tile is whole tiles and needs no more accumulators than a tile");

typedef int32_t qm_vi __attribute__((vector_size(64)));
typedef float qm_vf __attribute__((vector_size(64)));
typedef int8_t qm_vb __attribute__((vector_size(64)));
typedef float qm_vf_u __attribute__((vector_size(64), aligned(4)));
typedef _Float16 qm_vh_u __attribute__((vector_size(32), aligned(2)));
typedef uint16_t qm_vu16_u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t qm_vu32 __attribute__((vector_size(64)));
typedef uint8_t qm_b32 __attribute__((vector_size(32)));
typedef uint8_t qm_b16 __attribute__((vector_size(16)));

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

/* acc[l] += sum_i w[i] * x[4l + i]: w four unsigned bytes (broadcast), x signed bytes. The
 * AVX2 form (vpmaddubsw) is exact only while 2 * |w| * 128 < 32768, i.e. w < 128: every
 * decoded type but Q8_0 (q + 128), whose AVX2 copy takes the row path. */
QM_INLINE qm_vi qm_dpbusd(qm_vi acc, int32_t w, qm_vb x)
{
#if defined(__AVX512VNNI__)
	return (qm_vi)_mm512_dpbusd_epi32((__m512i)acc, _mm512_set1_epi32(w), (__m512i)x);
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
			au.h[i], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xu.h[i]), ones));
	return au.v;
#else
	uint8_t wb[4];
	memcpy(wb, &w, 4);
	for (int l = 0; l < 16; l++)
		acc[l] += wb[0] * x[4 * l] + wb[1] * x[4 * l + 1] + wb[2] * x[4 * l + 2] +
			  wb[3] * x[4 * l + 3];
	return acc;
#endif
}

#if defined(__AVX512F__)
#define QM_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define QM_IN_REGISTER(v) ((void)0)
#endif

QM_INLINE qm_vf qm_cvt(qm_vi v)
{
	return __builtin_convertvector(v, qm_vf);
}

/* ---------------------------------------------------------------------------------------- */
/* weight rows decoded for the batched path: unsigned bytes (the codes as stored: nibbles,
 * 5- and 6-bit values, Q8_0's q + 128), per scale unit its float scale and (Q4_K, Q5_K) its
 * float min; x's corr takes the codes' offsets off (qmatmul-pvt.h) */

#define QM_CS (QM_WB * QM_KC) /* bytes per K chunk of a decoded block */

struct qm_wtile {
	uint8_t *q;    /* [cols / QM_KC chunks][QM_WB][QM_KC]: the rows' chunks side by side */
	float *sc;     /* [QM_WB][units] */
	float *mn;     /* [QM_WB][units] */
	qm_vf *part;   /* [QM_WB / QM_NR][QM_NR * QM_MV]: sums over the K chunks done */
	qm_vf *tmp;    /* [QM_NR * QM_MV]: one chunk's sums */
	size_t q_ld;
	uint32_t units;
};

static void qm_wtile_init(struct qm_wtile *t, void *scratch, uint32_t cols, uint32_t unit)
{
	uint8_t *p = scratch;
	t->q_ld = ((size_t)cols + QM_KC - 1) / QM_KC * QM_KC;
	t->units = cols / unit;
	size_t ul = ((size_t)cols / 16 + 15u) & ~(size_t)15;
	t->part = (qm_vf *)p;
	t->tmp = t->part + QM_WB * QM_MV;
	p += QM_PART_BYTES;
	t->q = p;
	p += QM_WB * t->q_ld;
	t->sc = (float *)p;
	p += QM_WB * ul * 4;
	t->mn = (float *)p;
}

static void qm_wtile_zero_row(struct qm_wtile *t, uint32_t r, uint32_t cols)
{
	for (uint32_t c = 0; c < cols; c += QM_KC)
		memset(t->q + (c / QM_KC) * QM_CS + r * QM_KC, 0, QM_KC);
	for (uint32_t u = 0; u < t->units; u++) {
		t->sc[r * t->units + u] = 0.f;
		t->mn[r * t->units + u] = 0.f;
	}
}

QM_INLINE qm_b32 qm_ld32(const void *p)
{
	qm_b32 v;
	memcpy(&v, p, 32);
	return v;
}

QM_INLINE void qm_st32(void *p, qm_b32 v)
{
	memcpy(p, &v, 32);
}

typedef uint8_t qm_u8x8 __attribute__((vector_size(8)));
typedef float qm_f8 __attribute__((vector_size(32)));

QM_INLINE qm_u8x8 qm_ld8(const void *p)
{
	qm_u8x8 v;
	memcpy(&v, p, 8);
	return v;
}

QM_INLINE qm_b16 qm_ld16(const void *p)
{
	qm_b16 v;
	memcpy(&v, p, 16);
	return v;
}

QM_INLINE void qm_st16(void *p, qm_b16 v)
{
	memcpy(p, &v, 16);
}

/* Where weight k of a decoded row goes: chunk k / QM_KC, QM_CS bytes per chunk (q is the
 * row's start in chunk 0), so that a chunk of a whole block is one contiguous range and no two
 * rows of it alias in L1. */
QM_INLINE uint8_t *qm_wpos(uint8_t *q, uint32_t k)
{
	return q + (k / QM_KC) * QM_CS + k % QM_KC;
}

__attribute__((unused)) static void qm_dec_q8_0(const void *row, uint32_t cols, uint8_t *q,
						 float *sc, float *mn)
{
	const struct skv_block_q8_0 *b = row;
	for (uint32_t i = 0; i < cols / 32; i++) {
		qm_st32(qm_wpos(q, 32 * i), qm_ld32(b[i].qs) ^ 0x80);
		sc[i] = qm_h2f(b[i].d);
	}
}

static void qm_dec_q4_0(const void *row, uint32_t cols, uint8_t *q, float *sc, float *mn)
{
	const struct skv_block_q4_0 *b = row;
	for (uint32_t i = 0; i < cols / 32; i++) {
		qm_b16 v = qm_ld16(b[i].qs);
		qm_st16(qm_wpos(q, 32 * i), v & 15);
		qm_st16(qm_wpos(q, 32 * i) + 16, v >> 4);
		sc[i] = qm_h2f(b[i].d);
	}
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

QM_INLINE void qm_dec_k45(const void *row, uint32_t cols, uint8_t *q, float *sc, float *mn,
			  const int fifth)
{
	const size_t bytes = fifth ? sizeof(struct skv_block_q5_k) : sizeof(struct skv_block_q4_k);
	for (uint32_t i = 0; i < cols / 256; i++) {
		const uint8_t *blk = (const uint8_t *)row + i * bytes;
		uint16_t dd[2];
		memcpy(dd, blk, 4);
		const uint8_t *qs = fifth ? ((const struct skv_block_q5_k *)blk)->qs
					  : ((const struct skv_block_q4_k *)blk)->qs;
		qm_b32 h = fifth ? qm_ld32(((const struct skv_block_q5_k *)blk)->qh) : (qm_b32){};
		uint8_t s[8], m[8];
		qm_scale_min_k4(blk + 4, s, m);
		uint8_t *o = qm_wpos(q, 256 * i);
		for (int c = 0; c < 4; c++) {
			qm_b32 v = qm_ld32(qs + 32 * c);
			qm_b32 lo = v & 15, hi = v >> 4;
			if (fifth) {
				lo |= ((h >> (2 * c)) & 1) << 4;
				hi |= ((h >> (2 * c + 1)) & 1) << 4;
			}
			qm_st32(o + 64 * c, lo);
			qm_st32(o + 64 * c + 32, hi);
		}
		qm_f8 sv = __builtin_convertvector(qm_ld8(s), qm_f8) * qm_h2f(dd[0]);
		qm_f8 mv = __builtin_convertvector(qm_ld8(m), qm_f8) * qm_h2f(dd[1]);
		memcpy(sc + 8 * i, &sv, 32);
		memcpy(mn + 8 * i, &mv, 32);
	}
}

static void qm_dec_q4_k(const void *row, uint32_t cols, uint8_t *q, float *sc, float *mn)
{
	qm_dec_k45(row, cols, q, sc, mn, 0);
}

static void qm_dec_q5_k(const void *row, uint32_t cols, uint8_t *q, float *sc, float *mn)
{
	qm_dec_k45(row, cols, q, sc, mn, 1);
}

/* Q6_K's 6-bit codes q (weight q - 32), in ggml's order. */
QM_INLINE void qm_q6_codes(const struct skv_block_q6_k *b, uint8_t *o)
{
	for (int h = 0; h < 2; h++) {
		qm_b32 ql0 = qm_ld32(b->ql + 64 * h), ql1 = qm_ld32(b->ql + 64 * h + 32);
		qm_b32 qh = qm_ld32(b->qh + 32 * h);
		qm_st32(o + 128 * h, (ql0 & 15) | ((qh & 3) << 4));
		qm_st32(o + 128 * h + 32, (ql1 & 15) | (((qh >> 2) & 3) << 4));
		qm_st32(o + 128 * h + 64, (ql0 >> 4) | (((qh >> 4) & 3) << 4));
		qm_st32(o + 128 * h + 96, (ql1 >> 4) | (((qh >> 6) & 3) << 4));
	}
}

static void qm_dec_q6_k(const void *row, uint32_t cols, uint8_t *q, float *sc, float *mn)
{
	const struct skv_block_q6_k *b = row;
	for (uint32_t i = 0; i < cols / 256; i++) {
		qm_q6_codes(&b[i], qm_wpos(q, 256 * i));
		float d = qm_h2f(b[i].d);
		for (uint32_t j = 0; j < 16; j++)
			sc[16 * i + j] = d * (float)b[i].scales[j];
	}
}

typedef void qm_dec_fn(const void *row, uint32_t cols, uint8_t *q, float *sc, float *mn);

/* Stores the sums of a block's tiles for x groups [v0, v0 + mv): lane l of
 * part[i * QM_MV + v] is y[16 (v0 + v) + l][rb + i] (part holds the block's rows i in order:
 * tile i / QM_NR, row i % QM_NR). The plain C form goes row by row of y, so that its stores
 * are contiguous (ld_y is often a power of two: column-wise stores would all fall into one L1
 * set). */
#if defined(__AVX512F__)
/* r[16] rows of 16 floats -> r[j][i] = old r[i][j] (t: scratch) */
QM_INLINE void qm_transpose16(__m512 *r, __m512 *t)
{
	for (int i = 0; i < 16; i += 2) {
		t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
		t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
	}
	for (int i = 0; i < 16; i += 4) {
		r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
		r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
		r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
		r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
	}
	for (int h = 0; h < 16; h += 8)
		for (int i = 0; i < 4; i++) {
			t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
			t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
		}
	for (int i = 0; i < 8; i++) {
		r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
		r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
	}
}
#endif

QM_INLINE void qm_store_block(const struct qm_job *job, uint32_t rb, uint32_t nrb, uint32_t v0,
			      uint32_t mv, const qm_vf *part)
{
	const float *pf = (const float *)part;
#if defined(__AVX512F__)
	/* 16 weight rows at a time: a 16x16 transpose in registers turns the micro-tiles' lanes
	 * (rows of x) into 16 contiguous outputs per row of y */
	uint32_t full = nrb / 16 * 16;
	for (uint32_t v = 0; v < mv; v++) {
		uint32_t m0 = (v0 + v) * QM_LANES;
		uint32_t lanes = job->m_rows - m0 < QM_LANES ? job->m_rows - m0 : QM_LANES;
		for (uint32_t i0 = 0; i0 < full; i0 += 16) {
			__m512 r[16], t[16];
			for (int j = 0; j < 16; j++)
				r[j] = (__m512)part[(i0 + j) * QM_MV + v];
			qm_transpose16(r, t);
			for (uint32_t l = 0; l < lanes; l++) {
				float *dst = job->y + (size_t)(m0 + l) * job->ld_y + rb + i0;
				__m512 val = r[l];
				if (job->add)
					val = _mm512_add_ps(val, _mm512_loadu_ps(dst));
				_mm512_storeu_ps(dst, val);
			}
		}
	}
	if (full == nrb)
		return;
	pf += (size_t)full * QM_MV * QM_LANES;
	rb += full;
	nrb -= full;
#endif
	for (uint32_t v = 0; v < mv; v++)
		for (uint32_t l = 0; l < QM_LANES; l++) {
			uint32_t m = (v0 + v) * QM_LANES + l;
			if (m >= job->m_rows)
				return;
			float *dst = job->y + (size_t)m * job->ld_y + rb;
			const float *src = pf + (size_t)v * QM_LANES + l;
			if (job->add)
				for (uint32_t i = 0; i < nrb; i++)
					dst[i] += src[(size_t)i * QM_MV * QM_LANES];
			else
				for (uint32_t i = 0; i < nrb; i++)
					dst[i] = src[(size_t)i * QM_MV * QM_LANES];
		}
}

enum qm_corr { QM_CORR_NONE, QM_CORR_X, QM_CORR_X16 };

struct qm_mk_args {
	const struct qm_act *a;
	const uint8_t *wq; /* QM_NR decoded rows of one K chunk, QM_KC apart */
	const float *sc, *mn;
	uint32_t units; /* the rows' stride in sc and mn */
	uint32_t v0;    /* the first group of x */
	uint32_t u0, u1;
	qm_vf *part;
	qm_vf *tmp; /* QM_NR * QM_MV vectors */
	int first;
};

/* The integer micro-kernel: QM_NR decoded weight rows x mv groups of x over the scale units
 * [u0, u1); unit weights per scale unit, xblock values per scale of x; corr: how each unit's
 * accumulators start (x's corr, that shifted right by 4, or zero); has_min: subtract the
 * K-quant mins. The running sums live in part between K chunks. */
QM_INLINE void qm_mk_int(const struct qm_mk_args *k, const int nr, const int mv,
			 const uint32_t unit, const uint32_t xblock, const enum qm_corr corr,
			 const int has_min)
{
	const struct qm_act *a = k->a;
	const uint32_t units = k->units;
	const int8_t *xq[QM_MV];
	const int32_t *xc[QM_MV];
	const float *xd[QM_MV], *xs[QM_MV];
	for (int v = 0; v < mv; v++) {
		xq[v] = a->iqs + (size_t)(k->v0 + v) * a->iqs_ld;
		xc[v] = corr != QM_CORR_NONE ? a->icorr + (size_t)(k->v0 + v) * a->icorr_ld : NULL;
		xd[v] = a->id + (size_t)(k->v0 + v) * a->id_ld;
		xs[v] = has_min ? a->ixsum + (size_t)(k->v0 + v) * a->ixsum_ld : NULL;
	}
	/* One scale of x per chunk (Q8_K: the chunk is a super-block of 256): sum cvt(acc) * w's
	 * scale over the chunk in tmp and multiply by x's scale once at its end. Else (Q8_0
	 * form) every unit multiplies by both scales into part. The float sums stay in memory
	 * (L1) between units: in registers they would push x out of them. */
	const int chunk_dx = xblock == QM_KC;
	qm_vf *fa = chunk_dx ? k->tmp : k->part;
	if (chunk_dx || k->first)
		for (int i = 0; i < nr * QM_MV; i++)
			fa[i] = (qm_vf){};
	const uint8_t *wq[QM_NR_MAX];
	for (int r = 0; r < nr; r++)
		wq[r] = k->wq + r * QM_KC;
	const uint32_t g0 = k->u0 * unit / 4; /* the chunk's first group of 4 weights */
	for (uint32_t u = k->u0; u < k->u1; u++) {
		qm_vi acc[QM_NR_MAX * QM_MV];
		for (int v = 0; v < mv; v++) {
			qm_vi start = {};
			if (corr == QM_CORR_X)
				start = *(const qm_vi *)(xc[v] + (size_t)u * 16);
			else if (corr == QM_CORR_X16)
				start = *(const qm_vi *)(xc[v] + (size_t)u * 16) >> 4;
			for (int r = 0; r < nr; r++)
				acc[r * QM_MV + v] = start;
		}
#pragma GCC unroll 8
		for (uint32_t g = u * unit / 4; g < (u + 1) * unit / 4; g++) {
			qm_vb xv[QM_MV];
			for (int v = 0; v < mv; v++) {
				xv[v] = *(const qm_vb *)(xq[v] + (size_t)g * 64);
				/* one load of x for all QM_NR rows: GCC would otherwise fold a reload
				 * into every vpdpbusd, and 512-bit loads (2 per cycle) would bound it */
				QM_IN_REGISTER(xv[v]);
			}
			for (int r = 0; r < nr; r++) {
				int32_t w;
				memcpy(&w, wq[r] + 4 * (g - g0), 4);
				for (int v = 0; v < mv; v++)
					acc[r * QM_MV + v] = qm_dpbusd(acc[r * QM_MV + v], w, xv[v]);
			}
		}
		float wsc[QM_NR_MAX], wmn[QM_NR_MAX];
		for (int r = 0; r < nr; r++) {
			wsc[r] = k->sc[r * units + u];
			wmn[r] = has_min ? k->mn[r * units + u] : 0.f;
		}
		for (int v = 0; v < mv; v++) {
			qm_vf dx = chunk_dx ? (qm_vf){}
					    : *(const qm_vf *)(xd[v] + (size_t)(u * unit / xblock) * 16);
			qm_vf xsum = has_min ? *(const qm_vf *)(xs[v] + (size_t)u * 16) : (qm_vf){};
			for (int r = 0; r < nr; r++) {
				qm_vf t = fa[r * QM_MV + v];
				if (chunk_dx)
					t += qm_cvt(acc[r * QM_MV + v]) * wsc[r];
				else
					t += qm_cvt(acc[r * QM_MV + v]) * (dx * wsc[r]);
				if (has_min)
					t -= xsum * wmn[r];
				fa[r * QM_MV + v] = t;
			}
		}
		__asm__ volatile("" ::: "memory");
	}
	if (chunk_dx)
		for (int v = 0; v < mv; v++) {
			qm_vf dx = *(const qm_vf *)(xd[v] + (size_t)(k->u0 * unit / xblock) * 16);
			for (int r = 0; r < nr; r++)
				k->part[r * QM_MV + v] = (k->first ? (qm_vf){} : k->part[r * QM_MV + v]) +
							 fa[r * QM_MV + v] * dx;
		}
}

/* wide: QM_NR_WIDE rows (mv <= QM_MV_WIDE), else QM_NR. */
QM_INLINE void qm_mk_int_mv(const struct qm_mk_args *k, int wide, uint32_t mv,
			    const uint32_t unit, const uint32_t xblock, const enum qm_corr corr,
			    const int has_min)
{
#if QM_MV_WIDE >= 2
	if (wide) {
		if (mv == 1)
			qm_mk_int(k, QM_NR_WIDE, 1, unit, xblock, corr, has_min);
		else
			qm_mk_int(k, QM_NR_WIDE, 2, unit, xblock, corr, has_min);
		return;
	}
#else
	(void)wide;
#endif
	switch (mv) {
#if QM_MV > 1
	case 1:
		qm_mk_int(k, QM_NR, 1, unit, xblock, corr, has_min);
		break;
	case 2:
		qm_mk_int(k, QM_NR, 2, unit, xblock, corr, has_min);
		break;
	case 3:
		qm_mk_int(k, QM_NR, 3, unit, xblock, corr, has_min);
		break;
#endif
	default:
		qm_mk_int(k, QM_NR, QM_MV, unit, xblock, corr, has_min);
		break;
	}
}

/* How many tiles the next micro-kernel call covers: two as one wide tile when the groups of
 * x are few and two tiles remain. */
QM_INLINE uint32_t qm_tiles_per_call(uint32_t mv, uint32_t tile, uint32_t tiles)
{
	const uint32_t per_wide = QM_NR_WIDE / QM_NR;
	return per_wide > 1 && mv <= QM_MV_WIDE && tile + per_wide <= tiles ? per_wide : 1;
}

/* Rows [r0, r1) in blocks of QM_WB decoded rows; for each block, groups of QM_MV x groups
 * over K chunks of QM_KC weights, so that the chunk of x (QM_MV x 16 rows x QM_KC bytes)
 * stays in L1 while every tile of the block passes over it. */
QM_INLINE void qm_batched_int(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch,
			      qm_dec_fn *dec, const uint32_t unit, const uint32_t xblock,
			      const enum qm_corr corr, const int has_min)
{
	const struct skv_qmat *w = job->w;
	struct qm_wtile t;
	qm_wtile_init(&t, scratch, w->cols, unit);
	const uint32_t groups = (job->m_rows + QM_LANES - 1) / QM_LANES;
	const uint32_t ukc = QM_KC / unit;
	for (uint32_t rb = r0; rb < r1; rb += QM_WB) {
		uint32_t nrb = r1 - rb < QM_WB ? r1 - rb : QM_WB;
		uint32_t tiles = (nrb + QM_NR - 1) / QM_NR;
		for (uint32_t i = 0; i < tiles * QM_NR; i++) {
			if (i < nrb)
				dec((const uint8_t *)w->data + (size_t)(rb + i) * w->row_bytes, w->cols,
				    t.q + i * QM_KC, t.sc + i * t.units, t.mn + i * t.units);
			else
				qm_wtile_zero_row(&t, i, w->cols);
		}
		/* The next block's weights come from memory while this one computes: a few lines
		 * of it into L2 per micro-tile, so that its decode does not wait on DRAM. */
		const uint8_t *pf = (const uint8_t *)w->data + (size_t)(rb + nrb) * w->row_bytes;
		const uint8_t *pf_end = (const uint8_t *)w->data +
					(size_t)(r1 - (rb + nrb) < QM_WB ? r1 : rb + nrb + QM_WB) *
						w->row_bytes;
		size_t calls = (size_t)((groups + QM_MV - 1) / QM_MV) *
			       ((t.units + ukc - 1) / ukc) * tiles;
		size_t pf_step = ((size_t)(pf_end - pf) / calls + 63) & ~(size_t)63;
		for (uint32_t v = 0; v < groups; v += QM_MV) {
			uint32_t mv = groups - v < QM_MV ? groups - v : QM_MV;
			for (uint32_t u0 = 0; u0 < t.units; u0 += ukc) {
				uint32_t u1 = t.units - u0 < ukc ? t.units : u0 + ukc;
				for (uint32_t tile = 0, nt; tile < tiles; tile += nt) {
					nt = qm_tiles_per_call(mv, tile, tiles);
					for (size_t o = 0; o < pf_step * nt && pf < pf_end;
					     o += 64, pf += 64)
						__builtin_prefetch(pf, 0, 2);
					struct qm_mk_args k = {
						.a = job->act,
						.wq = t.q + (u0 * unit / QM_KC) * QM_CS +
						      tile * QM_NR * QM_KC,
						.sc = t.sc + tile * QM_NR * t.units,
						.mn = t.mn + tile * QM_NR * t.units,
						.units = t.units,
						.v0 = v,
						.u0 = u0,
						.u1 = u1,
						.part = t.part + tile * QM_NR * QM_MV,
						.tmp = t.tmp,
						.first = u0 == 0,
					};
					qm_mk_int_mv(&k, nt > 1, mv, unit, xblock, corr, has_min);
				}
			}
			qm_store_block(job, rb, nrb, v, mv, t.part);
		}
	}
}

/* The float micro-kernel (F32, F16, BF16): QM_NR weight rows of float32 (w_ld apart) x mv
 * groups of x over columns [c0, c1). */
QM_INLINE void qm_mk_f32(const struct qm_job *job, const float *wrows, size_t w_ld, uint32_t v0,
			 const int nr, const int mv, uint32_t c0, uint32_t c1, qm_vf *part,
			 int first)
{
	const uint32_t cols = job->w->cols;
	const float *xs[QM_MV];
	qm_vf facc[QM_NR_MAX * QM_MV];
	for (int v = 0; v < mv; v++) {
		xs[v] = job->act->ix + (size_t)(v0 + v) * cols * QM_LANES;
		for (int r = 0; r < nr; r++)
			facc[r * QM_MV + v] = first ? (qm_vf){} : part[r * QM_MV + v];
	}
	for (uint32_t k = c0; k < c1; k++) {
		qm_vf xv[QM_MV];
		for (int v = 0; v < mv; v++) {
			xv[v] = *(const qm_vf *)(xs[v] + (size_t)k * QM_LANES);
			QM_IN_REGISTER(xv[v]);
		}
		for (int r = 0; r < nr; r++) {
			float wk = wrows[r * w_ld + (k - c0)];
			for (int v = 0; v < mv; v++)
				facc[r * QM_MV + v] += xv[v] * wk;
		}
	}
	for (int v = 0; v < mv; v++)
		for (int r = 0; r < nr; r++)
			part[r * QM_MV + v] = facc[r * QM_MV + v];
}

QM_INLINE void qm_mk_f32_mv(const struct qm_job *job, const float *wrows, size_t w_ld,
			    uint32_t v0, int wide, uint32_t mv, uint32_t c0, uint32_t c1,
			    qm_vf *part, int first)
{
#if QM_MV_WIDE >= 2
	if (wide) {
		if (mv == 1)
			qm_mk_f32(job, wrows, w_ld, v0, QM_NR_WIDE, 1, c0, c1, part, first);
		else
			qm_mk_f32(job, wrows, w_ld, v0, QM_NR_WIDE, 2, c0, c1, part, first);
		return;
	}
#else
	(void)wide;
#endif
	switch (mv) {
#if QM_MV > 1
	case 1:
		qm_mk_f32(job, wrows, w_ld, v0, QM_NR, 1, c0, c1, part, first);
		break;
	case 2:
		qm_mk_f32(job, wrows, w_ld, v0, QM_NR, 2, c0, c1, part, first);
		break;
	case 3:
		qm_mk_f32(job, wrows, w_ld, v0, QM_NR, 3, c0, c1, part, first);
		break;
#endif
	default:
		qm_mk_f32(job, wrows, w_ld, v0, QM_NR, QM_MV, c0, c1, part, first);
		break;
	}
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

/* ---------------------------------------------------------------------------------------- */
/* decode tiles (AVX-512 VNNI): QM_RT weight rows at a time against one row of x
 *
 * One core streams the weights at the memory's speed only when it spends about a cycle per
 * 18-byte Q4_0 block, so the row path of this ISA runs QM_RT rows together: each load of x
 * (and its corrections) serves all of them, every block costs one broadcast load, two ALU
 * operations to unpack (Q4_0) or one (Q8_0), one vpdpbusd, one convert and one FMA whose
 * scale comes from memory as a broadcast; the block scales (fp16 weight scale times x's
 * scale) are made 16 blocks at a time by two word permutations and one conversion. The next
 * tile's bytes are prefetched a slice per 16 blocks, so requests stay in flight without
 * bursts. Sums per block are the same exact integers as the one-row kernels; the float sums
 * run in one 8-lane accumulator per row (summation order, within the tolerance). */

#if defined(__AVX512VNNI__)

#define QM_RT 4u

/* The 16 fp16 weight scales of blocks [b, b + 16) of a row of stride-byte blocks (the scale
 * first in each block: Q4_0 18, Q8_0 34), times x's scales xd[b ..], into out[16]. */
QM_INLINE void qm_scales16(const uint8_t *blk, const float *xd, float *out, const int stride)
{
	__m512i d;
	if (stride == 18) {
		/* a 64-byte window at block 4j holds the scales of blocks 4j .. 4j + 3 (words 0,
		 * 9, 18, 27) */
		const __m512i ia = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
						    0, 0, 0, 0, 0, 0, 0, 0, 59, 50, 41, 32, 27, 18,
						    9, 0);
		const __m512i ib = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
						    59, 50, 41, 32, 27, 18, 9, 0, 0, 0, 0, 0, 0, 0,
						    0, 0);
		__m512i a = _mm512_permutex2var_epi16(_mm512_loadu_si512(blk), ia,
						      _mm512_loadu_si512(blk + 72));
		__m512i b = _mm512_permutex2var_epi16(_mm512_loadu_si512(blk + 144), ib,
						      _mm512_loadu_si512(blk + 216));
		d = _mm512_mask_blend_epi16(0xff00, a, b);
	} else {
		/* a 64-byte window at block 2j holds the scales of blocks 2j, 2j + 1 (words 0, 17) */
		__m512i p[4];
		for (int j = 0; j < 4; j++) {
			const __m512i idx = _mm512_set_epi16(
				0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
				0, 0, 0, 0, 49, 32, 17, 0);
			__m512i v = _mm512_permutex2var_epi16(_mm512_loadu_si512(blk + 136 * j), idx,
							      _mm512_loadu_si512(blk + 136 * j + 68));
			p[j] = v; /* words 0 .. 3 */
		}
		/* place p[j]'s four words at 4j */
		__m512i lo = _mm512_unpacklo_epi64(p[0], p[1]); /* words 0-3 | 4-7 */
		__m512i hi = _mm512_unpacklo_epi64(p[2], p[3]); /* words 8-11 | 12-15 (as 0-7) */
		d = _mm512_inserti64x2(lo, _mm512_castsi512_si128(hi), 1);
	}
	__m512 s = _mm512_cvtph_ps(_mm512_castsi512_si256(d));
	_mm512_storeu_ps(out, _mm512_mul_ps(s, _mm512_loadu_ps(xd)));
}

QM_INLINE float qm_hsum8v(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

/* One block's weights as vpdpbusd's unsigned operand: Q4_0 [low nibbles | high nibbles]
 * (x's order), Q8_0 q + 128. */
QM_INLINE __m256i qm_tile_w(const uint8_t *blk, const int stride)
{
	if (stride == 18) {
		__m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 2)));
		return _mm256_and_si256(_mm256_mask_srli_epi16(t, 0xff00, t, 4),
					_mm256_set1_epi8(15));
	}
	return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)),
				_mm256_set1_epi8((char)0x80));
}

/* rt rows from row (row_bytes apart) against row m of x; y += or = as the job says. pf, pf_n:
 * the bytes to prefetch during the tile (the next tile). */
QM_INLINE void qm_tile_q(const struct qm_job *job, const uint8_t *row, uint32_t r, const int rt,
			 uint32_t m, const uint8_t *pf, size_t pf_n, const int stride)
{
	const struct qm_act *a = job->act;
	const size_t rb = job->w->row_bytes;
	const uint32_t nb = job->w->cols / 32;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int32_t *xs = a->lsum + (size_t)m * a->qs_ld / 4;
	__m256 f[QM_RT];
	for (int t = 0; t < (int)QM_RT; t++)
		f[t] = _mm256_setzero_ps();
	float sc[QM_RT][16] __attribute__((aligned(64)));
	const uint32_t groups = nb / 16;
	size_t pf_step = groups ? (pf_n / groups + 63) & ~(size_t)63 : 0;
	uint32_t i = 0;
	for (uint32_t g = 0; g < groups; g++) {
		for (size_t o = 0; o < pf_step; o += 64)
			__builtin_prefetch(pf + o, 0, 3);
		pf += pf_step;
		for (int t = 0; t < rt; t++)
			qm_scales16(row + t * rb + (size_t)stride * 16 * g, xd + 16 * g, sc[t], stride);
#pragma GCC unroll 4
		for (uint32_t j = 0; j < 16; j++, i++) {
			__m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * i));
			__m256i cv = _mm256_loadu_si256((const __m256i *)(xs + 8 * i));
			if (stride == 18)
				cv = _mm256_srai_epi32(cv, 4);
			for (int t = 0; t < rt; t++) {
				__m256i w = qm_tile_w(row + t * rb + (size_t)stride * i, stride);
				__m256i acc = _mm256_dpbusd_epi32(cv, w, xv);
				/* one row: four accumulators, so that the FMAs do not wait on
				 * each other */
				int k = rt == 1 ? (int)(j & 3) : t;
				f[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sc[t][j]),
						       f[k]);
			}
		}
	}
	for (; i < nb; i++) {
		__m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * i));
		__m256i cv = _mm256_loadu_si256((const __m256i *)(xs + 8 * i));
		if (stride == 18)
			cv = _mm256_srai_epi32(cv, 4);
		for (int t = 0; t < rt; t++) {
			const uint8_t *blk = row + t * rb + (size_t)stride * i;
			uint16_t dw;
			memcpy(&dw, blk, 2);
			__m256i acc = _mm256_dpbusd_epi32(cv, qm_tile_w(blk, stride), xv);
			f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(qm_h2f(dw) * xd[i]),
					       f[t]);
		}
	}
	if (rt == 1)
		f[0] = _mm256_add_ps(_mm256_add_ps(f[0], f[1]), _mm256_add_ps(f[2], f[3]));
	for (int t = 0; t < rt; t++)
		qm_put(job, m, r + (uint32_t)t, qm_hsum8v(f[t]));
}

/* F32, F16, BF16 rows as float32, QM_RT at a time against row m of x (x loaded once for all
 * of them); two 16-lane accumulators per row. */
QM_INLINE __m512 qm_tile_wf(const void *row, uint32_t c, const enum qm_ftype ft)
{
	if (ft == QM_F32)
		return _mm512_loadu_ps((const float *)row + c);
	__m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c));
	if (ft == QM_F16)
		return _mm512_cvtph_ps(h);
	return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

QM_INLINE void qm_tile_f(const struct qm_job *job, const uint8_t *row, uint32_t r, const int rt,
			 uint32_t m, const uint8_t *pf, size_t pf_n, const int kind)
{
	const enum qm_ftype ft = (enum qm_ftype)kind;
	const size_t rb = job->w->row_bytes;
	const uint32_t cols = job->w->cols;
	const float *x = job->act->x + (size_t)m * job->act->ld_x;
	__m512 f0[QM_RT], f1[QM_RT];
	for (int t = 0; t < rt; t++)
		f0[t] = f1[t] = _mm512_setzero_ps();
	const uint32_t steps = cols / 256;
	size_t pf_step = steps ? (pf_n / steps + 63) & ~(size_t)63 : 0;
	uint32_t c = 0;
	for (uint32_t s = 0; s < steps; s++) {
		for (size_t o = 0; o < pf_step; o += 64)
			__builtin_prefetch(pf + o, 0, 3);
		pf += pf_step;
#pragma GCC unroll 2
		for (uint32_t k = 0; k < 256; k += 32, c += 32) {
			__m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
			for (int t = 0; t < rt; t++) {
				const uint8_t *wr = row + t * rb;
				f0[t] = _mm512_fmadd_ps(qm_tile_wf(wr, c, ft), x0, f0[t]);
				f1[t] = _mm512_fmadd_ps(qm_tile_wf(wr, c + 16, ft), x1, f1[t]);
			}
		}
	}
	for (; c + 16 <= cols; c += 16) {
		__m512 x0 = _mm512_loadu_ps(x + c);
		for (int t = 0; t < rt; t++)
			f0[t] = _mm512_fmadd_ps(qm_tile_wf(row + t * rb, c, ft), x0, f0[t]);
	}
	for (int t = 0; t < rt; t++) {
		float s = _mm512_reduce_add_ps(_mm512_add_ps(f0[t], f1[t]));
		for (uint32_t k = c; k < cols; k++)
			s += qm_load_w1(row + t * rb, k, ft) * x[k];
		qm_put(job, m, r + (uint32_t)t, s);
	}
}

/* Rows [r0, r1) QM_RT at a time with a tile kernel (qm_tile_q: kind = the block stride, Q4_0
 * 18 or Q8_0 34; qm_tile_f: kind = enum qm_ftype), each tile width its own instance; the next
 * tile is prefetched during this one (none past r1: another thread's rows). */
typedef void (*qm_tile_fn)(const struct qm_job *job, const uint8_t *row, uint32_t r, int rt,
			   uint32_t m, const uint8_t *pf, size_t pf_n, int kind);

QM_INLINE void qm_tiles(const struct qm_job *job, uint32_t r0, uint32_t r1, const qm_tile_fn tile,
			const int kind)
{
	const struct skv_qmat *w = job->w;
	const uint8_t *base = w->data;
	const size_t rb = w->row_bytes;
	for (uint32_t r = r0; r < r1; r += QM_RT) {
		uint32_t rt = r1 - r < QM_RT ? r1 - r : QM_RT;
		const uint8_t *row = base + (size_t)r * rb;
		uint32_t next = r + rt < r1 ? (r1 - r - rt < QM_RT ? r1 - r - rt : QM_RT) : 0;
		const uint8_t *pf = row + rt * rb;
		for (uint32_t m = 0; m < job->m_rows; m++) {
			size_t pf_n = m == 0 ? next * rb : 0;
			switch (rt) {
			case 1: tile(job, row, r, 1, m, pf, pf_n, kind); break;
			case 2: tile(job, row, r, 2, m, pf, pf_n, kind); break;
			case 3: tile(job, row, r, 3, m, pf, pf_n, kind); break;
			default: tile(job, row, r, QM_RT, m, pf, pf_n, kind); break;
			}
		}
	}
}

#endif

QM_INLINE void qm_run_float(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch,
			    const enum qm_ftype ft)
{
	const struct skv_qmat *w = job->w;
	const uint32_t cols = w->cols;
	if (!job->interleaved) {
#if defined(__AVX512VNNI__)
		if (job->tiles) {
			qm_tiles(job, r0, r1, qm_tile_f, (int)ft);
			return;
		}
#endif
		for (uint32_t r = r0; r < r1; r++) {
			const void *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
			for (uint32_t m = 0; m < job->m_rows; m++)
				qm_put(job, m, r,
				       qm_dot_float(row, job->act->x + (size_t)m * job->act->ld_x, cols,
						    ft));
		}
		return;
	}
	qm_vf *part = scratch;
	/* [cols / QM_KCF chunks][QM_WBF rows][QM_KCF] float32 */
	float *wrows = (float *)((uint8_t *)scratch + QM_PART_BYTES);
	const size_t w_ld = QM_KCF, csf = (size_t)QM_WBF * QM_KCF;
	const uint32_t groups = (job->m_rows + QM_LANES - 1) / QM_LANES;
	for (uint32_t rb = r0; rb < r1; rb += QM_WBF) {
		uint32_t nrb = r1 - rb < QM_WBF ? r1 - rb : QM_WBF;
		uint32_t tiles = (nrb + QM_NR - 1) / QM_NR;
		for (uint32_t i = 0; i < tiles * QM_NR; i++) {
			float *o = wrows + i * w_ld;
			const void *row = (const uint8_t *)w->data + (size_t)(rb + i) * w->row_bytes;
			uint32_t c = 0;
			for (; c + 16 <= cols; c += 16)
				*(qm_vf_u *)(o + (c / QM_KCF) * csf + c % QM_KCF) =
					i < nrb ? qm_load_w16(row, c, ft) : (qm_vf){};
			for (; c < cols; c++)
				o[(c / QM_KCF) * csf + c % QM_KCF] = i < nrb ? qm_load_w1(row, c, ft) : 0.f;
		}
		for (uint32_t v = 0; v < groups; v += QM_MV) {
			uint32_t mv = groups - v < QM_MV ? groups - v : QM_MV;
			for (uint32_t c0 = 0; c0 < cols; c0 += QM_KCF) {
				uint32_t c1 = cols - c0 < QM_KCF ? cols : c0 + QM_KCF;
				for (uint32_t tile = 0, nt; tile < tiles; tile += nt) {
					nt = qm_tiles_per_call(mv, tile, tiles);
					qm_mk_f32_mv(job, wrows + (c0 / QM_KCF) * csf + tile * QM_NR * w_ld,
						     w_ld, v, nt > 1, mv, c0, c1,
						     part + tile * QM_NR * QM_MV, c0 == 0);
				}
			}
			qm_store_block(job, rb, nrb, v, mv, part);
		}
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

#include "qmatmul-rows.h" /* the row path: qm_dot_<type> */

/* ---------------------------------------------------------------------------------------- */
/* x quantized as ggml's quantize_row_q8_0_ref and quantize_row_q8_K_ref */

#if defined(__AVX512F__)

/* roundf (half away from zero) of 16 floats, exactly: truncate, then step away from zero
 * where the dropped fraction is at least one half (t - trunc(t) is exact). */
QM_INLINE __m512 qm_roundf16(__m512 t)
{
	__m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
	__m512 frac = _mm512_abs_ps(_mm512_sub_ps(t, r));
	__mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
	__m512 step = _mm512_or_ps(_mm512_set1_ps(1.f),
				   _mm512_and_ps(t, _mm512_set1_ps(-0.f)));
	return _mm512_mask_add_ps(r, up, r, step);
}

static void qm_quant_q8_0(const float *x, uint32_t cols, int8_t *qs, float *d, int32_t *lsum)
{
	const __m256i ones = _mm256_set1_epi8(1);
	for (uint32_t b = 0; b < cols / 32; b++) {
		__m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
		float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
		float scale = amax / 127.f;
		float inv = scale != 0.f ? 1.f / scale : 0.f;
		__m512 vi = _mm512_set1_ps(inv);
		__m512i q0 = _mm512_cvttps_epi32(qm_roundf16(_mm512_mul_ps(x0, vi)));
		__m512i q1 = _mm512_cvttps_epi32(qm_roundf16(_mm512_mul_ps(x1, vi)));
		__m256i q = _mm256_set_m128i(_mm512_cvtepi32_epi8(q1), _mm512_cvtepi32_epi8(q0));
		_mm256_storeu_si256((__m256i *)(qs + 32 * b), q);
		d[b] = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT));
		__m256i s4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, q);
		_mm256_storeu_si256((__m256i *)(lsum + 8 * b), _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), s4), 7));
	}
}

static void qm_quant_q8_k(const float *x, uint32_t cols, int8_t *qs, float *d, int16_t *b16,
			  int16_t *b32)
{
	for (uint32_t b = 0; b < cols / 256; b++) {
		const float *xb = x + 256 * b;
		__m512 m = _mm512_setzero_ps();
		for (int i = 0; i < 16; i++)
			m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)));
		float amax = _mm512_reduce_max_ps(m);
		int8_t *qb = qs + 256 * b;
		if (amax == 0.f) {
			d[b] = 0.f;
			memset(qb, 0, 256);
			memset(b16 + 16 * b, 0, 32);
			memset(b32 + 8 * b, 0, 16);
			continue;
		}
		/* ggml keeps the first element of the largest magnitude, with its sign */
		float max = 0.f;
		for (int i = 0; i < 16; i++) {
			__mmask16 hit = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)),
							   _mm512_set1_ps(amax), _CMP_EQ_OQ);
			if (hit) {
				max = xb[16 * i + __builtin_ctz(hit)];
				break;
			}
		}
		float iscale = -127.f / max;
		__m512 vs = _mm512_set1_ps(iscale);
		for (int i = 0; i < 16; i++) {
			/* vcvtps2dq rounds half to even, as ggml's nearest_int (|v| <= 127) */
			__m512i q = _mm512_min_epi32(
				_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * i), vs)),
				_mm512_set1_epi32(127));
			_mm_storeu_si128((__m128i *)(qb + 16 * i), _mm512_cvtepi32_epi8(q));
			b16[16 * b + i] = (int16_t)_mm512_reduce_add_epi32(q);
		}
		for (int j = 0; j < 8; j++)
			b32[8 * b + j] = (int16_t)(b16[16 * b + 2 * j] + b16[16 * b + 2 * j + 1]);
		d[b] = 1.f / iscale;
	}
}

#else /* plain C, as ggml writes it (rintf: ggml's nearest_int for |v| < 2^22, and no add
       * that a compiler could fuse into an FMA) */

static void qm_quant_q8_0(const float *x, uint32_t cols, int8_t *qs, float *d, int32_t *lsum)
{
	for (uint32_t b = 0; b < cols / 32; b++) {
		const float *xb = x + (size_t)b * 32;
		float amax = 0.f;
		for (uint32_t j = 0; j < 32; j++)
			amax = fmaxf(amax, fabsf(xb[j]));
		float scale = amax / 127.f;
		float inv = scale != 0.f ? 1.f / scale : 0.f;
		for (uint32_t j = 0; j < 32; j++)
			qs[b * 32 + j] = (int8_t)roundf(xb[j] * inv);
		d[b] = skv_f16_to_f32(skv_f32_to_f16(scale));
	}
	for (uint32_t g = 0; g < cols / 4; g++)
		lsum[g] = -128 * (qs[4 * g] + qs[4 * g + 1] + qs[4 * g + 2] + qs[4 * g + 3]);
}

static void qm_quant_q8_k(const float *x, uint32_t cols, int8_t *qs, float *d, int16_t *b16,
			  int16_t *b32)
{
	for (uint32_t b = 0; b < cols / 256; b++) {
		const float *xb = x + (size_t)b * 256;
		int8_t *qb = qs + (size_t)b * 256;
		float amax = 0.f, max = 0.f;
		for (uint32_t j = 0; j < 256; j++) {
			float ax = fabsf(xb[j]);
			if (ax > amax) {
				amax = ax;
				max = xb[j];
			}
		}
		if (amax == 0.f) {
			d[b] = 0.f;
			memset(qb, 0, 256);
		} else {
			float iscale = -127.f / max;
			for (uint32_t j = 0; j < 256; j++) {
				int v = (int)rintf(iscale * xb[j]);
				qb[j] = (int8_t)(v < 127 ? v : 127);
			}
			d[b] = 1.f / iscale;
		}
		for (uint32_t j = 0; j < 16; j++) {
			int s = 0;
			for (uint32_t i = 0; i < 16; i++)
				s += qb[j * 16 + i];
			b16[b * 16 + j] = (int16_t)s;
		}
		for (uint32_t j = 0; j < 8; j++)
			b32[b * 8 + j] = (int16_t)(b16[b * 16 + 2 * j] + b16[b * 16 + 2 * j + 1]);
	}
}

#endif

typedef float qm_dot_fn(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols);

#define QM_PF_ROWS 3

QM_INLINE void qm_run_rows(const struct qm_job *job, uint32_t r0, uint32_t r1, qm_dot_fn *dot)
{
	const struct skv_qmat *w = job->w;
	const uint8_t *end = (const uint8_t *)w->data + (size_t)r1 * w->row_bytes;
	for (uint32_t r = r0; r < r1; r++) {
		const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
		/* a few rows ahead into L1 (more requests in flight than the prefetchers keep) */
		const uint8_t *pf = row + QM_PF_ROWS * w->row_bytes;
		for (size_t o = 0; o < w->row_bytes && pf + o < end; o += 64)
			__builtin_prefetch(pf + o, 0, 3);
		for (uint32_t m = 0; m < job->m_rows; m++)
			qm_put(job, m, r, dot(row, job->act, m, w->cols));
	}
}

static void qm_q8_0(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
#if defined(__AVX512VNNI__)
	if (!job->interleaved && job->tiles) {
		qm_tiles(job, r0, r1, qm_tile_q, 34);
		return;
	}
#endif
#if defined(__AVX2__) && !defined(__AVX512VNNI__)
	/* vpmaddubsw would saturate on q + 128: the row path, whose vpsignb form is exact */
	qm_run_rows(job, r0, r1, qm_dot_q8_0);
#else
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q8_0, 32, 32, QM_CORR_X, 0);
	else
		qm_run_rows(job, r0, r1, qm_dot_q8_0);
#endif
}

static void qm_q4_0(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
#if defined(__AVX512VNNI__)
	if (!job->interleaved && job->tiles) {
		qm_tiles(job, r0, r1, qm_tile_q, 18);
		return;
	}
#endif
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q4_0, 32, 32, QM_CORR_X16, 0);
	else
		qm_run_rows(job, r0, r1, qm_dot_q4_0);
}

static void qm_q4_k(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q4_k, 32, 256, QM_CORR_NONE, 1);
	else
		qm_run_rows(job, r0, r1, qm_dot_q4_k);
}

static void qm_q5_k(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q5_k, 32, 256, QM_CORR_NONE, 1);
	else
		qm_run_rows(job, r0, r1, qm_dot_q5_k);
}

static void qm_q6_k(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch)
{
	if (job->interleaved)
		qm_batched_int(job, r0, r1, scratch, qm_dec_q6_k, 16, 256, QM_CORR_X, 0);
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
	.quant_q8_0 = qm_quant_q8_0,
	.quant_q8_k = qm_quant_q8_k,
};
