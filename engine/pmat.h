/* F32 matrix products over weights packed in column panels: y[M][out] (+)= x[M][in] . W^T.
 *
 * The packed matrix holds ceil(out / 64) panels; panel p is the 64 columns (outputs)
 * 64p .. 64p + 63, stored k-major: element (k, j) at p * in * 64 + k * 64 + j, so that one
 * 256-byte line of a panel holds one input's weights for 64 outputs. Columns past out are zeros.
 * skv_pmat_pack fills it from the model files' [out][in] rows; matrices that share an input
 * (q|k|v, gate|up) are packed side by side as one matrix of their summed columns.
 *
 * Every output is one chain of fused multiply-adds in the order of k from zero:
 *     acc = 0; for k in 0 .. in-1: acc = fma(W[n][k], x[m][k], acc);  y = acc (or y + acc)
 * whatever the number of rows M, the tile a row falls in, the thread count or the instruction
 * set: the bits of a row of y depend on that row of x only. This is what lets an engine batch
 * streams (many rows per step) and give each the bits of its solo run (tests/mp/test-batch.c),
 * and what a broadcast-x / load-W micro-kernel gives for free: a decode step (M = 1) streams
 * each panel once with 4 independent chains per vector of k; a batched step keeps a tile of
 * 6 rows x 64 columns in 24 AVX-512 accumulators and walks k in chunks that stay in L2 (the
 * running sums are stored and reloaded between chunks, which rounds nothing). */
#ifndef SKV_PMAT_H
#define SKV_PMAT_H

#include <stddef.h>
#include <stdint.h>

#define SKV_PMAT_NR 64u

/* Floats of a packed matrix of in x out. */
size_t skv_pmat_floats(uint32_t in, uint32_t out);

/* Packs w, n rows of in floats (a model file's [n][in] matrix), as columns col0 .. col0 + n - 1
 * of the packed matrix dst of in x out columns; columns of the last panel past out are set to
 * zero by the call that packs column out - 1. Uses every core for big matrices. */
void skv_pmat_pack(float *dst, uint32_t in, uint32_t out, uint32_t col0, const float *w,
		   uint32_t n);

struct skv_pctx;

/* max_rows bounds M; threads: the OpenMP threads of each call (1: no parallel region).
 * Returns 0, -EINVAL, -ENOMEM. */
int skv_pctx_new(uint32_t max_rows, uint32_t threads, struct skv_pctx **out);
void skv_pctx_free(struct skv_pctx *ctx); /* accepts NULL */
int skv_pctx_set_threads(struct skv_pctx *ctx, uint32_t threads);

/* The kernels: "avx512", "avx2", "base", or NULL for the CPU's best (the default, also chosen by
 * SKV_QMAT_ISA). All give the same bits. Returns 0, -EINVAL (unknown), -ENOTSUP (not this CPU). */
int skv_pctx_set_isa(struct skv_pctx *ctx, const char *isa);
const char *skv_pctx_isa(const struct skv_pctx *ctx);

/* y[m][j] = (add ? y[m][j] : 0) + sum_k W[j][k] x[m][k] for m < rows, j < out, with wp packed by
 * skv_pmat_pack for (in, out). ld_x >= in, ld_y >= out (floats). Returns 0 or -EINVAL. */
int skv_pmat_run(struct skv_pctx *ctx, const float *wp, uint32_t in, uint32_t out, uint32_t rows,
		 const float *x, size_t ld_x, float *y, size_t ld_y, int add);

#endif
