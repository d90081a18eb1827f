/* Panel matrix-product kernels (pmat.h). Compiled once per instruction set (engine/meson.build):
 * -march=x86-64-v4 (PMAT_ISA v4: 16 floats per vector, tiles of up to 6 rows x 64 columns in 24
 * accumulators), -march=x86-64-v3 (v3: 8 floats, one row x 64 columns, or 3 rows x 32), and the
 * baseline (base: scalar fmaf). Each output is one fma chain over k from zero in every copy, so
 * all three give the same bits; a tile only decides how many chains run side by side.
 *
 * A tile loads the 64 weights of one k (one 256-byte line of the panel) and multiplies them
 * with each of its rows' x[k], broadcast: the weights are read once per tile from L2 (or, for a
 * single tile, once from memory), x once per tile from L1. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pmat-pvt.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define PM_INLINE static inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"

#define PM_CAT(a, b) a##_##b
#define PM_CAT2(a, b) PM_CAT(a, b)
#define PM_TABLE PM_CAT2(pm_kernels, PMAT_ISA)
#if defined(__AVX512F__)
#define PM_NAME "avx512"
#elif defined(__AVX2__)
#define PM_NAME "avx2"
#else
#define PM_NAME "base"
#endif

/* The end of a tile: its sums, tmp[i][j] for mr rows, into y's ncols columns (or added). */
PM_INLINE void pm_write(const float *tmp, int mr, float *y, size_t ld_y, uint32_t ncols, int add)
{
	for (int i = 0; i < mr; i++) {
		float *o = y + (size_t)i * ld_y;
		const float *s = tmp + i * SKV_PMAT_NR;
		if (add)
			for (uint32_t j = 0; j < ncols; j++)
				o[j] = o[j] + s[j];
		else
			memcpy(o, s, ncols * sizeof(float));
	}
}

#if defined(__AVX512F__)

#define PM_MR 6

/* mr rows x 64 columns over kc values of k. first: the sums start at zero, else at part;
 * last: they go to y, else back to part. */
PM_INLINE void pm_tile(const float *w, uint32_t kc, const float *x, size_t ld_x, const int mr,
		       float *part, int first, int last, float *y, size_t ld_y, uint32_t ncols,
		       int add, const float *pf, uint32_t npf)
{
	__m512 c[PM_MR][4];
	for (int i = 0; i < mr; i++)
		for (int j = 0; j < 4; j++)
			c[i][j] = first ? _mm512_setzero_ps()
					: _mm512_load_ps(part + i * SKV_PMAT_NR + 16 * j);
	for (uint32_t k = 0; k < kc; k++) {
		const float *wk = w + (size_t)k * SKV_PMAT_NR;
		if (k < npf)
			_mm_prefetch((const char *)(pf + (size_t)k * 16), _MM_HINT_T1);
		__m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16);
		__m512 w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
		for (int i = 0; i < mr; i++) {
			__m512 b = _mm512_set1_ps(x[(size_t)i * ld_x + k]);
			c[i][0] = _mm512_fmadd_ps(w0, b, c[i][0]);
			c[i][1] = _mm512_fmadd_ps(w1, b, c[i][1]);
			c[i][2] = _mm512_fmadd_ps(w2, b, c[i][2]);
			c[i][3] = _mm512_fmadd_ps(w3, b, c[i][3]);
		}
	}
	if (!last) {
		for (int i = 0; i < mr; i++)
			for (int j = 0; j < 4; j++)
				_mm512_store_ps(part + i * SKV_PMAT_NR + 16 * j, c[i][j]);
		return;
	}
	if (ncols == SKV_PMAT_NR) {
		for (int i = 0; i < mr; i++) {
			float *o = y + (size_t)i * ld_y;
			for (int j = 0; j < 4; j++) {
				__m512 v = c[i][j];
				if (add)
					v = _mm512_add_ps(_mm512_loadu_ps(o + 16 * j), v);
				_mm512_storeu_ps(o + 16 * j, v);
			}
		}
		return;
	}
	float tmp[PM_MR * SKV_PMAT_NR] __attribute__((aligned(64)));
	for (int i = 0; i < mr; i++)
		for (int j = 0; j < 4; j++)
			_mm512_store_ps(tmp + i * SKV_PMAT_NR + 16 * j, c[i][j]);
	pm_write(tmp, mr, y, ld_y, ncols, add);
}

#elif defined(__AVX2__)

#define PM_MR 3

/* One row: 64 columns in 8 accumulators; more rows: 32 columns (half a panel) x up to 3 rows
 * in 12, the other half next. */
PM_INLINE void pm_tile_half(const float *w, uint32_t kc, const float *x, size_t ld_x,
			    const int mr, int half, float *part, int first, int last, float *tmp)
{
	__m256 c[PM_MR][4];
	const int off = 32 * half;
	for (int i = 0; i < mr; i++)
		for (int j = 0; j < 4; j++)
			c[i][j] = first ? _mm256_setzero_ps()
					: _mm256_load_ps(part + i * SKV_PMAT_NR + off + 8 * j);
	for (uint32_t k = 0; k < kc; k++) {
		const float *wk = w + (size_t)k * SKV_PMAT_NR + off;
		__m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
		__m256 w2 = _mm256_loadu_ps(wk + 16), w3 = _mm256_loadu_ps(wk + 24);
		for (int i = 0; i < mr; i++) {
			__m256 b = _mm256_set1_ps(x[(size_t)i * ld_x + k]);
			c[i][0] = _mm256_fmadd_ps(w0, b, c[i][0]);
			c[i][1] = _mm256_fmadd_ps(w1, b, c[i][1]);
			c[i][2] = _mm256_fmadd_ps(w2, b, c[i][2]);
			c[i][3] = _mm256_fmadd_ps(w3, b, c[i][3]);
		}
	}
	float *dst = last ? tmp : part;
	for (int i = 0; i < mr; i++)
		for (int j = 0; j < 4; j++)
			_mm256_store_ps(dst + i * SKV_PMAT_NR + off + 8 * j, c[i][j]);
}

PM_INLINE void pm_tile_row(const float *w, uint32_t kc, const float *x, float *part, int first,
			   int last, float *tmp)
{
	__m256 c[8];
	for (int j = 0; j < 8; j++)
		c[j] = first ? _mm256_setzero_ps() : _mm256_load_ps(part + 8 * j);
	for (uint32_t k = 0; k < kc; k++) {
		const float *wk = w + (size_t)k * SKV_PMAT_NR;
		__m256 b = _mm256_set1_ps(x[k]);
		for (int j = 0; j < 8; j++)
			c[j] = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 8 * j), b, c[j]);
	}
	float *dst = last ? tmp : part;
	for (int j = 0; j < 8; j++)
		_mm256_store_ps(dst + 8 * j, c[j]);
}

PM_INLINE void pm_tile(const float *w, uint32_t kc, const float *x, size_t ld_x, const int mr,
		       float *part, int first, int last, float *y, size_t ld_y, uint32_t ncols,
		       int add, const float *pf, uint32_t npf)
{
	float tmp[PM_MR * SKV_PMAT_NR] __attribute__((aligned(64)));
	if (mr == 1) {
		pm_tile_row(w, kc, x, part, first, last, tmp);
	} else {
		pm_tile_half(w, kc, x, ld_x, mr, 0, part, first, last, tmp);
		pm_tile_half(w, kc, x, ld_x, mr, 1, part, first, last, tmp);
	}
	if (last)
		pm_write(tmp, mr, y, ld_y, ncols, add);
}

#else

#define PM_MR 1

PM_INLINE void pm_tile(const float *w, uint32_t kc, const float *x, size_t ld_x, const int mr,
		       float *part, int first, int last, float *y, size_t ld_y, uint32_t ncols,
		       int add, const float *pf, uint32_t npf)
{
	float acc[SKV_PMAT_NR];
	for (uint32_t j = 0; j < SKV_PMAT_NR; j++)
		acc[j] = first ? 0.0f : part[j];
	for (uint32_t k = 0; k < kc; k++) {
		const float *wk = w + (size_t)k * SKV_PMAT_NR;
		float xk = x[k];
		for (uint32_t j = 0; j < SKV_PMAT_NR; j++)
			acc[j] = fmaf(wk[j], xk, acc[j]);
	}
	if (last)
		pm_write(acc, 1, y, ld_y, ncols, add);
	else
		memcpy(part, acc, sizeof(acc));
}

#endif

_Static_assert(PM_MR <= PM_MR_MAX, "a tile has at most PM_MR_MAX rows");

/* rows of x in tiles of PM_MR over k values [k0, k0 + kc) of one panel. With several tiles
 * the chunk is read from memory by the first and from L2 by the others, so the tiles fetch
 * the next chunk meanwhile, one line per k each: it lies right after this one in memory
 * (the panel's next chunk, or the next panel's first), pf_end bounds the thread's panels. */
static void pm_chunk(const float *panel, uint32_t k0, uint32_t kc, uint32_t rows,
		     const float *x, size_t ld_x, float *part, int first, int last, float *y,
		     size_t ld_y, uint32_t ncols, int add, const float *pf_end)
{
	const float *w = panel + (size_t)k0 * SKV_PMAT_NR;
	const float *pf = rows > PM_MR ? w + (size_t)kc * SKV_PMAT_NR : pf_end;
	for (uint32_t m0 = 0; m0 < rows; m0 += PM_MR) {
		uint32_t npf = pf < pf_end ? (uint32_t)((pf_end - pf) / 16) : 0;
		npf = npf < kc ? npf : kc;
		uint32_t mr = rows - m0 < PM_MR ? rows - m0 : PM_MR;
		const float *xm = x + (size_t)m0 * ld_x + k0;
		float *pm = part + (size_t)m0 * SKV_PMAT_NR;
		float *ym = y + (size_t)m0 * ld_y;
		switch (mr) {
#define PM_CASE(n)                                                                             \
	case n:                                                                                \
		pm_tile(w, kc, xm, ld_x, n, pm, first, last, ym, ld_y, ncols, add, pf, npf);  \
		break;
		PM_CASE(1)
#if PM_MR >= 3
		PM_CASE(2)
		PM_CASE(3)
#endif
#if PM_MR >= 6
		PM_CASE(4)
		PM_CASE(5)
		PM_CASE(6)
#endif
#undef PM_CASE
		default:
			break;
		}
		pf += (size_t)npf * 16;
	}
}

static void pm_panels(const float *wp, uint32_t in, uint32_t out, uint32_t p0, uint32_t p1,
		      uint32_t rows, const float *x, size_t ld_x, float *y, size_t ld_y, int add,
		      float *part)
{
	/* One tile of rows keeps its sums in registers over the whole of k. */
	uint32_t kc_max = rows <= PM_MR ? in : PM_KC;
	const float *pf_end = wp + (size_t)p1 * in * SKV_PMAT_NR;
	for (uint32_t p = p0; p < p1; p++) {
		const float *panel = wp + (size_t)p * in * SKV_PMAT_NR;
		uint32_t c0 = p * SKV_PMAT_NR;
		uint32_t ncols = out - c0 < SKV_PMAT_NR ? out - c0 : SKV_PMAT_NR;
		for (uint32_t k0 = 0; k0 < in; k0 += kc_max) {
			uint32_t kc = in - k0 < kc_max ? in - k0 : kc_max;
			pm_chunk(panel, k0, kc, rows, x, ld_x, part, k0 == 0, k0 + kc == in, y + c0,
				 ld_y, ncols, add, pf_end);
		}
	}
}

const struct pm_kernels PM_TABLE = {
	.name = PM_NAME,
	.panels = pm_panels,
};
