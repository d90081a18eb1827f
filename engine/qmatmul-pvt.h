/* Private to the quantized matrix products: the layouts of the quantized activations, the job
 * a kernel runs, and the per-ISA kernel tables (qmatmul-kernels.c is compiled once per ISA).
 *
 * Two layouts of x, both made once per call by qmatmul.c:
 *
 * Row-major (decode and few rows: each weight row is read once from memory and, for m_rows > 1,
 * again from L1 for every row of x):
 *   Q8_0 form   qs [m][qs_ld] int8, d [m][blk_ld] float (the fp16-rounded scale, as ggml
 *               stores it), lsum [m][qs_ld / 4] int32: -128 * (sum of each 4 qs), the start
 *               of each vpdpbusd lane when the weights are offset by 128 (or by 8: lsum / 16),
 *               so that every lane holds an exact sum of its own 4 products and no lane
 *               carries a block's whole correction (which would cost float precision)
 *   Q8_K form   qs [m][qs_ld] int8, d [m][blk_ld] float, bsum16 [m][b16_ld] int16 (ggml's
 *               bsums), bsum32 [m][b32_ld] int16 (sums of 32 = pairs of bsums)
 *
 * Lane-interleaved (many rows: 16 rows of x are the 16 lanes of a vector, so four weights,
 * broadcast, multiply 16 rows of x in one vpdpbusd and each decoded tile of weight rows is
 * reused across every row of x). Group v holds rows 16v .. 16v + 15 (missing rows are zeros):
 *   qs  [group][cols / 4][16 lanes][4] int8: x's q (the signed operand of vpdpbusd; the
 *       decoded weights are the unsigned one: nibbles as stored, Q8_0's q + 128)
 *   corr[group][cols / cunit][16] int32: each scale unit's accumulator start, which takes the
 *       weights' offset off: Q8_0 form -128 * (sum of the 32 q), for Q8_0 (q + 128); the
 *       kernels shift it right by 4 for Q4_0 (nibble - 8); Q8_K form -32 * bsum16, for Q6_K
 *       (q - 32); Q4_K and Q5_K have no offset (their mins are xsum's)
 *   d   [group][cols / xblock][16] float     (xblock: 32 for Q8_0, 256 for Q8_K)
 *   xsum[group][cols / 32][16] float         (Q8_K only: bsum32, for the K-quant mins)
 *   f32 [group][cols][16] float               (F32, F16, BF16 weights: x itself)
 */
#ifndef SKV_QMATMUL_PVT_H
#define SKV_QMATMUL_PVT_H

#include <stddef.h>
#include <stdint.h>

#include "qmatmul.h"

#define QM_LANES 16u       /* rows of x per interleaved group: one 512-bit vector of int32 */
#define QM_ALIGN 64u
#define QM_NR_MAX 12u      /* a multiple of every ISA's weight rows per micro-tile */
/* The batched path decodes QM_WB weight rows (QM_WBF for the float types, as float32) at a
 * time and walks K in chunks of QM_KC weights (QM_KCF for float), so that the chunk of x it
 * reuses across the block (QM_MV groups x 16 rows x QM_KC bytes, 16 KB) stays in L1 while the
 * decoded rows (QM_WB x cols bytes) stay in L2. */
#define QM_WB 48u
#define QM_WBF 12u
#define QM_WB_MAX 48u
#define QM_MV_MAX 4u
#define QM_KC 256u
#define QM_KCF 64u
#define QM_PART_BYTES ((QM_WB_MAX + QM_NR_MAX) * QM_MV_MAX * 64u)

struct qm_act {
	/* row-major */
	const int8_t *qs;
	const float *d;
	const int32_t *lsum;
	const int16_t *bsum16;
	const int16_t *bsum32;
	size_t qs_ld, blk_ld, b16_ld, b32_ld; /* lsum's stride: qs_ld / 4 */
	/* interleaved (NULL when the call uses the row-major path) */
	const int8_t *iqs;
	const int32_t *icorr;
	const float *id;
	const float *ixsum;
	size_t iqs_ld, icorr_ld, id_ld, ixsum_ld; /* elements per group */
	/* float32 input */
	const float *x;
	size_t ld_x;
	const float *ix; /* interleaved x, [group][cols][16] */
};

struct qm_job {
	const struct skv_qmat *w;
	const struct qm_act *act;
	uint32_t m_rows;
	int interleaved; /* the batched path */
	int tiles;       /* the row path's multi-row tiles (else the one-row kernels) */
	float *y;
	size_t ld_y;
	int add;
};

/* Bytes of per-thread scratch the kernels need for cols columns: QM_WB_MAX decoded weight
 * rows, as uint8 with two floats per 16 weights (scale units) or as float32, and the
 * running sums of a block's tiles. */
static inline size_t qm_scratch_bytes(uint32_t cols)
{
	size_t q_ld = ((size_t)cols + QM_KC - 1) / QM_KC * QM_KC;
	size_t f_ld = ((size_t)cols + QM_KCF - 1) / QM_KCF * QM_KCF;
	size_t ul = ((size_t)cols / 16 + 15u) & ~(size_t)15;
	size_t ints = QM_WB_MAX * (q_ld + 2 * ul * 4);
	size_t floats = QM_WBF * f_ld * 4;
	return QM_PART_BYTES + (ints > floats ? ints : floats) + 256;
}

/* Computes y rows [r0, r1) of one matrix (r0 a multiple of QM_NR_MAX unless r0 == r1).
 * scratch: qm_scratch_bytes(cols) bytes, 64-byte aligned, private to the calling thread. */
typedef void qm_rows_fn(const struct qm_job *job, uint32_t r0, uint32_t r1, void *scratch);

/* x quantized by ggml's quantize_row_q8_0_ref (qs, the fp16-rounded d, lsum) and
 * quantize_row_q8_K_ref (qs, d, bsum16, bsum32), into one row of the row-major layout; every
 * ISA copy gives the same bits. */
typedef void qm_quant_q8_0_fn(const float *x, uint32_t cols, int8_t *qs, float *d,
			      int32_t *lsum);
typedef void qm_quant_q8_k_fn(const float *x, uint32_t cols, int8_t *qs, float *d,
			      int16_t *bsum16, int16_t *bsum32);

struct qm_kernels {
	const char *name;
	qm_rows_fn *f32, *f16, *bf16, *q8_0, *q4_0, *q4_k, *q5_k, *q6_k;
	qm_quant_q8_0_fn *quant_q8_0;
	qm_quant_q8_k_fn *quant_q8_k;
};

extern const struct qm_kernels qm_kernels_v4;
extern const struct qm_kernels qm_kernels_v3;
extern const struct qm_kernels qm_kernels_base;

#endif
