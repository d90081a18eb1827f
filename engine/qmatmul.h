/* Matrix products over weights in their file's block formats, used in place.
 *
 * y[m][r] (+)= sum_c W[r][c] * x[m][c] for W [rows][cols] stored row by row in one of the
 * types of quant.h (the file's [out][in] layout, never transposed or dequantized into a copy).
 *
 * Numerics follow ggml's CPU backend, so that a quantized file behaves as its producer meant:
 *   - Q8_0 and Q4_0 weights: each row of x is quantized to Q8_0 blocks (32 values, scale
 *     amax / 127, round to nearest), integer dot products per block, scaled by d_w * d_x;
 *   - Q4_K, Q5_K and Q6_K weights: x is quantized to Q8_K blocks (256 values with per-16 sums
 *     for the mins), as ggml's quantize_row_q8_K;
 *   - F16 and BF16 weights (and F32): widened to float32 and multiplied with float32 x (exact
 *     up to the order of summation; BF16 is not rounded through vdpbf16ps, which would round x
 *     to bfloat16 too).
 * Integer sums are exact; float sums differ from the reference only by summation order (the
 * AVX kernels, like ggml's, round each vector lane's partial sum on its own). The scalar
 * reference in tests/unit/test-qmatmul.c states each of these in plain C, with the tolerance
 * per type.
 *
 * Kernels: AVX-512 with VNNI (x86-64-v4 + AVX512_VNNI; no AVX512_BF16 instruction is used),
 * AVX2 and a baseline, picked at run time by CPUID (SKV_QMAT_ISA=base|avx2|avx512 forces one,
 * for tests and benchmarks; skv_qctx_set_isa forces one per context). One row of x (a decode step)
 * streams every weight once; many rows reuse each tile of weights, kept in cache, across all of
 * them. Rows of W are split over the context's threads (OpenMP), which also share the
 * quantization of x; with one thread the call runs on the caller's thread, without an OpenMP
 * region.
 *
 * Thread safety: a context belongs to one thread (it runs its own OpenMP team). */
#ifndef SKV_QMATMUL_H
#define SKV_QMATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "quant.h" /* struct skv_qmat */

struct skv_qctx;

/* Scratch for max_rows rows of x of at most max_cols values (a multiple of 32); threads >= 1.
 * It holds x quantized and interleaved (about 10 bytes per value of x) and per thread a block
 * of decoded weight rows (about 72 * max_cols bytes). The kernels are chosen here
 * (skv_qmat_isa).
 * Errors: -EINVAL, -ENOMEM. */
int skv_qctx_new(uint32_t max_rows, uint32_t max_cols, uint32_t threads, struct skv_qctx **out);
void skv_qctx_free(struct skv_qctx *ctx); /* accepts NULL */
int skv_qctx_set_threads(struct skv_qctx *ctx, uint32_t threads);

/* Checks a matrix description: a supported type, cols a whole number of blocks, row_bytes
 * consistent. 0 or -EINVAL. */
int skv_qmat_check(const struct skv_qmat *w);

/* n matrices (1 <= n <= 16) that share one input x ([m_rows][ld_x], the first cols values of
 * each row used; all matrices of one call have the same cols, a multiple of 256 when one of
 * them is a K-quant): y_i[m][r] = (add ? y_i[m][r] : 0) + W_i x. Each y_i is
 * [m_rows][ld_y[i]] (ld_y[i] >= rows unless m_rows == 1); only its first rows columns are
 * written. x is quantized once for all of them (to each form the types need: Q8_0 and/or
 * Q8_K). 1 <= m_rows <= max_rows, cols <= max_cols. Returns 0 or -EINVAL. */
int skv_qmat_run(struct skv_qctx *ctx, const struct skv_qmat *const *w, uint32_t n,
		 uint32_t m_rows, const float *x, size_t ld_x, float *const *y, const size_t *ld_y,
		 int add);

/* The kernel family a new context uses: "avx512-vnni", "avx2" or "base" (SKV_QMAT_ISA's choice
 * when set and supported by the CPU, else the CPU's best). */
const char *skv_qmat_isa(void);

/* The x86-64 kernel level a family of kernels compiled per ISA runs on (qmatmul's, pmat.h's):
 * 4 (x86-64-v4, with AVX512_VNNI too when vnni), 3 (x86-64-v3), 0 (the baseline). force NULL:
 * the CPU's best; "avx512", "avx2" or "base": that one, or -ENOTSUP when the CPU (or this
 * build, when not compiled per ISA) has not got it; any other name: -EINVAL. */
int skv_isa_level(const char *force, int vnni);

/* Forces one context's kernels: isa "avx512" (AVX-512 with VNNI), "avx2" or "base", for tests
 * and benchmarks. 0, -ENOTSUP (the CPU lacks it), -EINVAL (unknown name). */
int skv_qctx_set_isa(struct skv_qctx *ctx, const char *isa);
/* The kernel family of a context, as skv_qmat_isa names it. */
const char *skv_qctx_isa(const struct skv_qctx *ctx);

/* The row path's kernels (fewer rows of x than the batched path takes), for tests and
 * benchmarks that set the new kernels against the old: "tiles" (the default: the AVX-512
 * kernels run several weight rows at a time, sharing each load of x) or "rows" (one weight
 * row at a time, as every ISA without tiles does). 0 or -EINVAL. */
int skv_qctx_set_decode(struct skv_qctx *ctx, const char *kind);

#endif
