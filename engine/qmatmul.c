/* Quantized matrix products: the context, the quantization of x by ggml's reference rules, its
 * lane-interleaved copy for many rows, the choice of the kernels' ISA copy and the split of the
 * weight rows over threads. The kernels are in qmatmul-kernels.c (one copy per ISA). */
#include <errno.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "qmatmul-pvt.h"
#include "quant.h"

/* From this many rows of x on, the batched (interleaved) path: below it the row path reads each
 * weight row from memory once and from L1 for the other rows. Crossovers measured with every
 * weight in cache (2048x2048, AVX-512): the row path costs about m_rows times its one-row time,
 * the batched one about the same for 1 to 16 rows (one group of 16 lanes): Q8_0 4.5 rows,
 * Q4_K 6, Q6_K 5.5, F16 8. */
#define QM_BATCH_MIN 6u
#define QM_BATCH_MIN_FLOAT 8u

struct skv_qctx {
	uint32_t max_rows, max_cols, threads;
	const struct qm_kernels *kern;
	int one_row; /* skv_qctx_set_decode("rows"): the one-row decode kernels */
	size_t groups; /* max_rows rounded up to QM_LANES, in groups */
	/* row-major, Q8_0 form */
	int8_t *qs0;
	float *d0;
	int32_t *lsum0;
	/* row-major, Q8_K form */
	int8_t *qsk;
	float *dk;
	int16_t *b16, *b32;
	/* interleaved */
	int8_t *iqs0, *iqsk;
	int32_t *icorr0, *icorrk;
	float *id0, *idk, *ixsum, *ix;
	/* per thread */
	uint8_t *scratch;
	size_t scratch_bytes;
	uint32_t scratch_threads;
};

/* ---------------------------------------------------------------------------------------- */
/* ISA choice */

int skv_isa_level(const char *force, int vnni)
{
#ifdef SKV_QMAT_MULTI_ISA
	__builtin_cpu_init();
	int v4 = __builtin_cpu_supports("x86-64-v4") &&
		 (!vnni || __builtin_cpu_supports("avx512vnni"));
	int v3 = __builtin_cpu_supports("x86-64-v3");
#else
	int v4 = 0, v3 = 0;
#endif
	if (!force)
		return v4 ? 4 : v3 ? 3 : 0;
	if (!strcmp(force, "avx512"))
		return v4 ? 4 : -ENOTSUP;
	if (!strcmp(force, "avx2"))
		return v3 ? 3 : -ENOTSUP;
	return strcmp(force, "base") ? -EINVAL : 0;
}

static const struct qm_kernels *qm_pick(const char *force)
{
	int level = skv_isa_level(force, 1);
#ifdef SKV_QMAT_MULTI_ISA
	if (level == 4)
		return &qm_kernels_v4;
	if (level == 3)
		return &qm_kernels_v3;
#endif
	return level < 0 ? NULL : &qm_kernels_base;
}

/* The environment's choice, or the CPU's best; an unknown or unsupported SKV_QMAT_ISA falls
 * back to the CPU's best (the caller sees which one through skv_qctx_isa). */
static const struct qm_kernels *qm_default(void)
{
	const char *force = getenv("SKV_QMAT_ISA");
	const struct qm_kernels *k = force && *force ? qm_pick(force) : NULL;
	return k ? k : qm_pick(NULL);
}

const char *skv_qmat_isa(void)
{
	return qm_default()->name;
}

int skv_qctx_set_isa(struct skv_qctx *ctx, const char *isa)
{
	if (!ctx)
		return -EINVAL;
	int level = skv_isa_level(isa ? isa : "", 1);
	if (level < 0)
		return level;
	ctx->kern = qm_pick(isa);
	return 0;
}

const char *skv_qctx_isa(const struct skv_qctx *ctx)
{
	return ctx ? ctx->kern->name : NULL;
}

int skv_qctx_set_decode(struct skv_qctx *ctx, const char *kind)
{
	if (!ctx || !kind)
		return -EINVAL;
	if (!strcmp(kind, "tiles"))
		ctx->one_row = 0;
	else if (!strcmp(kind, "rows"))
		ctx->one_row = 1;
	else
		return -EINVAL;
	return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* context */

static size_t qm_round(size_t n, size_t to)
{
	return (n + to - 1) / to * to;
}

static void *qm_alloc(size_t bytes)
{
	void *p = NULL;
	if (posix_memalign(&p, QM_ALIGN, qm_round(bytes ? bytes : 1, QM_ALIGN)))
		return NULL;
	return p;
}

static int qm_scratch_resize(struct skv_qctx *ctx, uint32_t threads)
{
	if (ctx->scratch && ctx->scratch_threads >= threads)
		return 0;
	uint8_t *s = qm_alloc(ctx->scratch_bytes * threads);
	if (!s)
		return -ENOMEM;
	free(ctx->scratch);
	ctx->scratch = s;
	ctx->scratch_threads = threads;
	return 0;
}

void skv_qctx_free(struct skv_qctx *ctx)
{
	if (!ctx)
		return;
	free(ctx->qs0);
	free(ctx->d0);
	free(ctx->lsum0);
	free(ctx->qsk);
	free(ctx->dk);
	free(ctx->b16);
	free(ctx->b32);
	free(ctx->iqs0);
	free(ctx->iqsk);
	free(ctx->icorr0);
	free(ctx->icorrk);
	free(ctx->id0);
	free(ctx->idk);
	free(ctx->ixsum);
	free(ctx->ix);
	free(ctx->scratch);
	free(ctx);
}

/* Row strides: qs rows are max_cols bytes rounded to 64; block arrays are rounded to 16. */
static size_t qm_qs_ld(const struct skv_qctx *ctx)
{
	return qm_round(ctx->max_cols, QM_ALIGN);
}

static size_t qm_blk_ld(const struct skv_qctx *ctx, uint32_t block)
{
	return qm_round(ctx->max_cols / block, 16);
}

int skv_qctx_new(uint32_t max_rows, uint32_t max_cols, uint32_t threads, struct skv_qctx **out)
{
	if (!out || !max_rows || !max_cols || !threads || max_cols % SKV_QK8_0)
		return -EINVAL;
	*out = NULL;
	struct skv_qctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return -ENOMEM;
	ctx->max_rows = max_rows;
	ctx->max_cols = max_cols;
	ctx->threads = threads;
	ctx->kern = qm_default();
	ctx->groups = qm_round(max_rows, QM_LANES) / QM_LANES;
	size_t rows = max_rows, cols = max_cols, g = ctx->groups;
	size_t qs_ld = qm_qs_ld(ctx);
	ctx->qs0 = qm_alloc(rows * qs_ld);
	ctx->d0 = qm_alloc(rows * qm_blk_ld(ctx, 32) * sizeof(float));
	ctx->lsum0 = qm_alloc(rows * qs_ld / 4 * sizeof(int32_t));
	ctx->qsk = qm_alloc(rows * qs_ld);
	ctx->dk = qm_alloc(rows * qm_blk_ld(ctx, 256) * sizeof(float));
	ctx->b16 = qm_alloc(rows * qm_blk_ld(ctx, 16) * sizeof(int16_t));
	ctx->b32 = qm_alloc(rows * qm_blk_ld(ctx, 32) * sizeof(int16_t));
	ctx->iqs0 = qm_alloc(g * cols * QM_LANES);
	ctx->iqsk = qm_alloc(g * cols * QM_LANES);
	ctx->icorr0 = qm_alloc(g * (cols / 32) * QM_LANES * sizeof(int32_t));
	ctx->icorrk = qm_alloc(g * (cols / 16) * QM_LANES * sizeof(int32_t));
	ctx->id0 = qm_alloc(g * (cols / 32) * QM_LANES * sizeof(float));
	ctx->idk = qm_alloc(g * qm_round(cols / 256, 1) * QM_LANES * sizeof(float) + 64);
	ctx->ixsum = qm_alloc(g * (cols / 32) * QM_LANES * sizeof(float));
	ctx->ix = qm_alloc(g * cols * QM_LANES * sizeof(float));
	ctx->scratch_bytes = qm_round(qm_scratch_bytes(max_cols), QM_ALIGN);
	if (!ctx->qs0 || !ctx->d0 || !ctx->lsum0 || !ctx->qsk || !ctx->dk || !ctx->b16 ||
	    !ctx->b32 || !ctx->iqs0 || !ctx->iqsk || !ctx->icorr0 || !ctx->icorrk || !ctx->id0 || !ctx->idk || !ctx->ixsum ||
	    !ctx->ix || qm_scratch_resize(ctx, threads) < 0) {
		skv_qctx_free(ctx);
		return -ENOMEM;
	}
	*out = ctx;
	return 0;
}

int skv_qctx_set_threads(struct skv_qctx *ctx, uint32_t threads)
{
	if (!ctx || !threads)
		return -EINVAL;
	int rc = qm_scratch_resize(ctx, threads);
	if (rc < 0)
		return rc;
	ctx->threads = threads;
	return 0;
}

int skv_qmat_check(const struct skv_qmat *w)
{
	if (!w || !w->data || !w->rows || !w->cols)
		return -EINVAL;
	switch (w->type) {
	case SKV_WTYPE_F32:
	case SKV_WTYPE_F16:
	case SKV_WTYPE_BF16:
	case SKV_WTYPE_Q8_0:
	case SKV_WTYPE_Q4_0:
	case SKV_WTYPE_Q4_K:
	case SKV_WTYPE_Q5_K:
	case SKV_WTYPE_Q6_K:
		break;
	default:
		return -EINVAL;
	}
	uint64_t rb = skv_wtype_row_bytes(w->type, w->cols);
	if (!rb || rb != w->row_bytes)
		return -EINVAL;
	return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* the interleaved copy of x (the quantizers are the kernels', one per ISA) */

/* Rows 16v + lane of the row-major qs into group v's [cols / 4][16][4], and each unit's
 * accumulator start, scale * (sum of the unit's unit q), into [cols / unit][16]; missing rows
 * are zeros. */
static void qm_interleave_qs(const int8_t *qs, size_t qs_ld, uint32_t m_rows, uint32_t cols,
			     uint32_t unit, int32_t scale, int8_t *iqs, int32_t *icorr,
			     uint32_t v0, uint32_t v1)
{
	for (uint32_t v = v0; v < v1; v++) {
		int8_t *dst = iqs + (size_t)v * cols * QM_LANES;
		int32_t *corr = icorr + (size_t)v * (cols / unit) * QM_LANES;
		for (uint32_t lane = 0; lane < QM_LANES; lane++) {
			uint32_t m = v * QM_LANES + lane;
			const int8_t *src = qs + (size_t)m * qs_ld;
			for (uint32_t g = 0; g < cols / 4; g++) {
				uint32_t word = 0;
				if (m < m_rows)
					memcpy(&word, src + 4 * g, 4);
				memcpy(dst + ((size_t)g * QM_LANES + lane) * 4, &word, 4);
			}
			for (uint32_t u = 0; u < cols / unit; u++) {
				int32_t s = 0;
				for (uint32_t i = 0; m < m_rows && i < unit; i++)
					s += src[u * unit + i];
				corr[(size_t)u * QM_LANES + lane] = scale * s;
			}
		}
	}
}

static void qm_interleave_f(const float *src, size_t ld, uint32_t m_rows, uint32_t n,
			    float *dst, uint32_t v0, uint32_t v1)
{
	for (uint32_t v = v0; v < v1; v++)
		for (uint32_t lane = 0; lane < QM_LANES; lane++) {
			uint32_t m = v * QM_LANES + lane;
			float *o = dst + (size_t)v * n * QM_LANES + lane;
			if (m < m_rows)
				for (uint32_t i = 0; i < n; i++)
					o[(size_t)i * QM_LANES] = src[(size_t)m * ld + i];
			else
				for (uint32_t i = 0; i < n; i++)
					o[(size_t)i * QM_LANES] = 0.f;
		}
}

/* ---------------------------------------------------------------------------------------- */
/* the run */

static qm_rows_fn *qm_kernel(const struct qm_kernels *k, uint32_t type)
{
	switch (type) {
	case SKV_WTYPE_F32: return k->f32;
	case SKV_WTYPE_F16: return k->f16;
	case SKV_WTYPE_BF16: return k->bf16;
	case SKV_WTYPE_Q8_0: return k->q8_0;
	case SKV_WTYPE_Q4_0: return k->q4_0;
	case SKV_WTYPE_Q4_K: return k->q4_k;
	case SKV_WTYPE_Q5_K: return k->q5_k;
	case SKV_WTYPE_Q6_K: return k->q6_k;
	default: return NULL;
	}
}

static int qm_form(uint32_t type)
{
	switch (type) {
	case SKV_WTYPE_Q8_0:
	case SKV_WTYPE_Q4_0:
		return 0;
	case SKV_WTYPE_Q4_K:
	case SKV_WTYPE_Q5_K:
	case SKV_WTYPE_Q6_K:
		return 1;
	default:
		return 2;
	}
}

/* Thread t of threads computes, of every matrix, the rows [rows * t / threads,
 * rows * (t + 1) / threads), each bound rounded to the kernels' tile of QM_NR_MAX rows. */
static void qm_slice(const struct qm_job *jobs, uint32_t n, uint32_t t, uint32_t threads,
		     void *scratch, const struct qm_kernels *k)
{
	for (uint32_t i = 0; i < n; i++) {
		uint32_t rows = jobs[i].w->rows;
		uint32_t r0 = (uint32_t)((uint64_t)rows * t / threads) / QM_NR_MAX * QM_NR_MAX;
		uint32_t r1 = t + 1 == threads
				      ? rows
				      : (uint32_t)((uint64_t)rows * (t + 1) / threads) / QM_NR_MAX *
						QM_NR_MAX;
		if (r0 < r1)
			qm_kernel(k, jobs[i].w->type)(&jobs[i], r0, r1, scratch);
	}
}

#define QM_MAX_MATS 16u

/* What one call quantizes and interleaves (need[form]: some matrix wants that form of x). */
struct qm_call {
	struct skv_qctx *ctx;
	const float *x;
	size_t ld_x;
	uint32_t m_rows, cols;
	int need[3];
	int batched, batched_f;
	size_t qs_ld, ld0, ldk, ld16, ld32;
};

/* Rows [m0, m1) of x, quantized to the forms the call needs (row-major). */
static void qm_quantize_rows(const struct qm_call *c, uint32_t m0, uint32_t m1)
{
	struct skv_qctx *ctx = c->ctx;
	const struct qm_kernels *k = ctx->kern;
	for (uint32_t m = m0; m < m1; m++) {
		const float *xm = c->x + m * c->ld_x;
		if (c->need[0])
			k->quant_q8_0(xm, c->cols, ctx->qs0 + m * c->qs_ld, ctx->d0 + m * c->ld0,
				      ctx->lsum0 + m * c->qs_ld / 4);
		if (c->need[1])
			k->quant_q8_k(xm, c->cols, ctx->qsk + m * c->qs_ld, ctx->dk + m * c->ldk,
				      ctx->b16 + m * c->ld16, ctx->b32 + m * c->ld32);
	}
}

/* Groups [v0, v1) of the interleaved copies (batched calls only). */
static void qm_interleave_groups(const struct qm_call *c, uint32_t v0, uint32_t v1)
{
	struct skv_qctx *ctx = c->ctx;
	uint32_t m_rows = c->m_rows, cols = c->cols;
	if (c->need[0] && c->batched) {
		qm_interleave_qs(ctx->qs0, c->qs_ld, m_rows, cols, 32, -128, ctx->iqs0, ctx->icorr0,
				 v0, v1);
		qm_interleave_f(ctx->d0, c->ld0, m_rows, cols / 32, ctx->id0, v0, v1);
	}
	if (c->need[1] && c->batched) {
		qm_interleave_qs(ctx->qsk, c->qs_ld, m_rows, cols, 16, -32, ctx->iqsk, ctx->icorrk,
				 v0, v1);
		qm_interleave_f(ctx->dk, c->ldk, m_rows, cols / 256, ctx->idk, v0, v1);
		/* xsum = bsum32 in float: the K-quant mins (x's scale comes per chunk) */
		for (uint32_t v = v0; v < v1; v++)
			for (uint32_t lane = 0; lane < QM_LANES; lane++) {
				uint32_t m = v * QM_LANES + lane;
				float *o = ctx->ixsum + (size_t)v * (cols / 32) * QM_LANES + lane;
				for (uint32_t j = 0; j < cols / 32; j++)
					o[(size_t)j * QM_LANES] =
						m < m_rows ? (float)ctx->b32[m * c->ld32 + j] : 0.f;
			}
	}
	if (c->need[2] && c->batched_f)
		qm_interleave_f(c->x, c->ld_x, m_rows, cols, ctx->ix, v0, v1);
}

int skv_qmat_run(struct skv_qctx *ctx, const struct skv_qmat *const *w, uint32_t n,
		 uint32_t m_rows, const float *x, size_t ld_x, float *const *y, const size_t *ld_y,
		 int add)
{
	if (!ctx || !w || !n || n > QM_MAX_MATS || !m_rows || m_rows > ctx->max_rows || !x ||
	    !y || !ld_y)
		return -EINVAL;
	uint32_t cols = w[0] ? w[0]->cols : 0;
	if (!cols || cols > ctx->max_cols || ld_x < cols)
		return -EINVAL;
	int need[3] = { 0, 0, 0 };
	for (uint32_t i = 0; i < n; i++) {
		if (skv_qmat_check(w[i]) < 0 || w[i]->cols != cols || !y[i] ||
		    (m_rows > 1 && ld_y[i] < w[i]->rows))
			return -EINVAL;
		int form = qm_form(w[i]->type);
		if (form == 1 && cols % SKV_QK_K)
			return -EINVAL;
		need[form] = 1;
	}
	struct qm_call c = {
		.ctx = ctx, .x = x, .ld_x = ld_x, .m_rows = m_rows, .cols = cols,
		.need = { need[0], need[1], need[2] },
		.batched = m_rows >= QM_BATCH_MIN, .batched_f = m_rows >= QM_BATCH_MIN_FLOAT,
		.qs_ld = qm_qs_ld(ctx), .ld0 = qm_blk_ld(ctx, 32), .ldk = qm_blk_ld(ctx, 256),
		.ld16 = qm_blk_ld(ctx, 16), .ld32 = qm_blk_ld(ctx, 32),
	};
	int batched = c.batched, batched_f = c.batched_f;
	struct qm_act act0 = { .x = x, .ld_x = ld_x }, actk = act0, actf = act0;
	act0.qs = ctx->qs0;
	act0.d = ctx->d0;
	act0.lsum = ctx->lsum0;
	act0.qs_ld = c.qs_ld;
	act0.blk_ld = c.ld0;
	act0.iqs = ctx->iqs0;
	act0.icorr = ctx->icorr0;
	act0.id = ctx->id0;
	act0.iqs_ld = (size_t)cols * QM_LANES;
	act0.icorr_ld = (size_t)cols / 32 * QM_LANES;
	act0.id_ld = (size_t)cols / 32 * QM_LANES;
	actk.qs = ctx->qsk;
	actk.d = ctx->dk;
	actk.bsum16 = ctx->b16;
	actk.bsum32 = ctx->b32;
	actk.qs_ld = c.qs_ld;
	actk.blk_ld = c.ldk;
	actk.b16_ld = c.ld16;
	actk.b32_ld = c.ld32;
	actk.iqs = ctx->iqsk;
	actk.icorr = ctx->icorrk;
	actk.id = ctx->idk;
	actk.ixsum = ctx->ixsum;
	actk.iqs_ld = (size_t)cols * QM_LANES;
	actk.icorr_ld = (size_t)cols / 16 * QM_LANES;
	actk.id_ld = (size_t)cols / 256 * QM_LANES;
	actk.ixsum_ld = (size_t)cols / 32 * QM_LANES;
	actf.ix = ctx->ix;

	struct qm_job jobs[QM_MAX_MATS];
	for (uint32_t i = 0; i < n; i++) {
		int form = qm_form(w[i]->type);
		jobs[i] = (struct qm_job){
			.w = w[i],
			.act = form == 0 ? &act0 : form == 1 ? &actk : &actf,
			.m_rows = m_rows,
			.interleaved = form == 2 ? batched_f : batched,
			.tiles = !ctx->one_row,
			.y = y[i],
			.ld_y = m_rows > 1 ? ld_y[i] : w[i]->rows,
			.add = add,
		};
	}
	uint32_t threads = ctx->threads;
	uint32_t groups = (m_rows + QM_LANES - 1) / QM_LANES;
	const struct qm_kernels *k = ctx->kern;
	/* One thread runs here, without an OpenMP region: no fork/join on the small models. */
	if (threads == 1) {
		qm_quantize_rows(&c, 0, m_rows);
		qm_interleave_groups(&c, 0, groups);
		qm_slice(jobs, n, 0, 1, ctx->scratch, k);
		return 0;
	}
	uint8_t *scratch = ctx->scratch;
	size_t sb = ctx->scratch_bytes;
	/* The threads quantize their share of x's rows, then (batched calls) interleave their
	 * share of its groups, then compute their share of every matrix's rows. */
#pragma omp parallel num_threads(threads)
	{
		uint32_t t = (uint32_t)omp_get_thread_num();
		uint32_t team = (uint32_t)omp_get_num_threads();
		qm_quantize_rows(&c, m_rows * t / team, m_rows * (t + 1) / team);
#pragma omp barrier
		/* The interleaved copies (and the barrier after them) only for batched calls. */
		if (c.batched || c.batched_f) {
			qm_interleave_groups(&c, groups * t / team, groups * (t + 1) / team);
#pragma omp barrier
		}
		qm_slice(jobs, n, t, team, scratch + t * sb, k);
	}
	return 0;
}
