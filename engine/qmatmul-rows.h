/* The row path of the matrix-product kernels: one weight row dotted with one row-major
 * quantized row of x, per block format, as ggml's vec_dot kernels do (qmatmul-kernels.c's
 * header says how). Not a header of its own: qmatmul-kernels.c includes it once, in each ISA
 * copy, after the helpers it uses (QM_INLINE, qm_h2f), so that these stay inlined into the
 * per-type entry points there. */
#ifndef SKV_QMATMUL_ROWS_H
#define SKV_QMATMUL_ROWS_H

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

QM_INLINE __m256i qm_q4_block(const struct skv_block_q4_0 *b, const int8_t *xq, const int32_t *ls)
{
	__m128i v = _mm_loadu_si128((const __m128i *)b->qs);
	__m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v),
				      _mm256_set1_epi8(15));
	__m256i corr = _mm256_srai_epi32(_mm256_loadu_si256((const __m256i *)ls), 4);
	return qm_dot8_u8s8(corr, wv, _mm256_loadu_si256((const __m256i *)xq));
}

/* Q8_0 (q4 == 0) or Q4_0 (q4 == 1) rows: blocks of 32 weights, two accumulators so that the
 * FMAs do not wait on each other; the fp16 scale first in each block. */
QM_INLINE __m256i qm_block_dot(const uint8_t *blk, const int8_t *xq, const int32_t *ls,
			       const int q4)
{
	return q4 ? qm_q4_block((const struct skv_block_q4_0 *)blk, xq, ls)
		  : qm_q8_block((const struct skv_block_q8_0 *)blk, xq, ls);
}

QM_INLINE float qm_dot_32(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols,
			  const int q4)
{
	const size_t stride = q4 ? sizeof(struct skv_block_q4_0) : sizeof(struct skv_block_q8_0);
	const uint8_t *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int32_t *xs = a->lsum + (size_t)m * a->qs_ld / 4;
	__m256 f[2] = { _mm256_setzero_ps(), _mm256_setzero_ps() };
	uint32_t nb = cols / 32;
	for (uint32_t i = 0; i < nb; i++) {
		const uint8_t *blk = b + stride * i;
		uint16_t d;
		memcpy(&d, blk, 2);
		__m256i p = qm_block_dot(blk, xq + 32 * i, xs + 8 * i, q4);
		f[i & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(qm_h2f(d) * xd[i]),
					   f[i & 1]);
	}
	return qm_hsum8(_mm256_add_ps(f[0], f[1]));
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

/* Q6_K's four vectors of 6-bit codes from the low nibbles ql0, ql1 and the high pairs qh
 * (ggml's layout), in W-bit vectors (256 or 512). */
#define QM_Q6_CODES(W, q, ql0, ql1, qh, low4, hi2)                                              \
	do {                                                                                    \
		(q)[0] = _mm##W##_or_si##W(_mm##W##_and_si##W(ql0, low4),                       \
					   _mm##W##_and_si##W(_mm##W##_slli_epi16(qh, 4), hi2)); \
		(q)[1] = _mm##W##_or_si##W(_mm##W##_and_si##W(ql1, low4),                       \
					   _mm##W##_and_si##W(_mm##W##_slli_epi16(qh, 2), hi2)); \
		(q)[2] = _mm##W##_or_si##W(_mm##W##_and_si##W(_mm##W##_srli_epi16(ql0, 4), low4), \
					   _mm##W##_and_si##W(qh, hi2));                        \
		(q)[3] = _mm##W##_or_si##W(_mm##W##_and_si##W(_mm##W##_srli_epi16(ql1, 4), low4), \
					   _mm##W##_and_si##W(_mm##W##_srli_epi16(qh, 2), hi2)); \
	} while (0)

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* AVX-512: both halves of a super-block in one pass, each 512-bit vector holding 32 weights
 * of the first half (low 256 bits) and the matching 32 of the second (high 256 bits): half
 * the instructions of the 256-bit loop below. The integer sum of a super-block is the same;
 * its float conversion is split over other lanes, so the result differs from the 256-bit
 * copy's only by float rounding. */
QM_INLINE __m512i qm_cat256(const void *lo, const void *hi)
{
	return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
				  _mm256_loadu_si256((const __m256i *)hi), 1);
}

QM_INLINE float qm_dot_q6_k(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	const struct skv_block_q6_k *b = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	const int16_t *xb = a->bsum16 + (size_t)m * a->b16_ld;
	const __m512i low4 = _mm512_set1_epi8(15), hi2 = _mm512_set1_epi8(0x30);
	/* For the products of weights 32k .. 32k + 31 of each half: the scales of its two groups
	 * of 16, 2k and 2k + 1 (low half), 8 + 2k and 9 + 2k (high half), 8 words each. */
	__m512i sidx[4];
	for (int k = 0; k < 4; k++) {
		int16_t w[32];
		for (int j = 0; j < 32; j++)
			w[j] = (int16_t)((j >= 16 ? 8 : 0) + 2 * k + ((j & 15) >= 8));
		sidx[k] = _mm512_loadu_si512(w);
	}
	__m512 f = _mm512_setzero_ps();
	for (uint32_t i = 0; i < cols / 256; i++) {
		__m256i scv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b[i].scales));
		__m256i corr = _mm256_madd_epi16(scv, _mm256_loadu_si256((const __m256i *)(xb + 16 * i)));
		__m512i acc = _mm512_inserti64x4(
			_mm512_castsi256_si512(
				_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5))),
			_mm256_setzero_si256(), 1);
		__m512i sc512 = _mm512_castsi256_si512(scv);
		const int8_t *x = xq + 256 * i;
		__m512i ql0 = qm_cat256(b[i].ql, b[i].ql + 64);
		__m512i ql1 = qm_cat256(b[i].ql + 32, b[i].ql + 96);
		__m512i qh = _mm512_loadu_si512(b[i].qh);
		__m512i q[4];
		QM_Q6_CODES(512, q, ql0, ql1, qh, low4, hi2);
		for (int k = 0; k < 4; k++) {
			__m512i p = _mm512_maddubs_epi16(q[k], qm_cat256(x + 32 * k, x + 128 + 32 * k));
			acc = _mm512_dpwssd_epi32(acc, p, _mm512_permutexvar_epi16(sidx[k], sc512));
		}
		f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(qm_h2f(b[i].d) * xd[i]),
				    f);
	}
	return _mm512_reduce_add_ps(f);
}
#else
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
			QM_Q6_CODES(256, q, ql0, ql1, qh, low4, hi2);
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
#endif

#else /* the baseline: plain C, the same integer sums */

/* Q8_0 (q4 == 0) or Q4_0 (q4 == 1) rows: each block's exact integer dot, then one float
 * multiply-add per block, as the vector copies. */
QM_INLINE float qm_dot_32(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols,
			  const int q4)
{
	const struct skv_block_q8_0 *b8 = row;
	const struct skv_block_q4_0 *b4 = row;
	const int8_t *xq = a->qs + (size_t)m * a->qs_ld;
	const float *xd = a->d + (size_t)m * a->blk_ld;
	float s = 0.f;
	for (uint32_t i = 0; i < cols / 32; i++) {
		const int8_t *x = xq + 32 * i;
		int32_t dot = 0;
		if (q4)
			for (uint32_t j = 0; j < 16; j++)
				dot += ((b4[i].qs[j] & 15) - 8) * x[j] +
				       ((b4[i].qs[j] >> 4) - 8) * x[16 + j];
		else
			for (uint32_t j = 0; j < 32; j++)
				dot += b8[i].qs[j] * x[j];
		s += (float)dot * (qm_h2f(q4 ? b4[i].d : b8[i].d) * xd[i]);
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
		uint8_t q[256];
		qm_q6_codes(&b[i], q);
		const int8_t *x = xq + 256 * i;
		int32_t isum = 0;
		for (int j = 0; j < 16; j++) {
			int32_t dot = 0;
			for (int l = 0; l < 16; l++)
				dot += (q[16 * j + l] - 32) * x[16 * j + l];
			isum += b[i].scales[j] * dot;
		}
		s += (qm_h2f(b[i].d) * xd[i]) * (float)isum;
	}
	return s;
}

#endif

QM_INLINE float qm_dot_q8_0(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	return qm_dot_32(row, a, m, cols, 0);
}

QM_INLINE float qm_dot_q4_0(const void *row, const struct qm_act *a, uint32_t m, uint32_t cols)
{
	return qm_dot_32(row, a, m, cols, 1);
}

#endif
