#include "pmat.h"

#include <errno.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "pmat-pvt.h"
#include "qmatmul.h" /* skv_isa_level */

struct skv_pctx {
	const struct pm_kernels *kern;
	uint32_t max_rows, threads, part_threads;
	float *part; /* [part_threads][max_rows][64] */
};

/* ---------------------------------------------------------------------------------------- */
/* packing */

size_t skv_pmat_floats(uint32_t in, uint32_t out)
{
	return ((size_t)out + SKV_PMAT_NR - 1) / SKV_PMAT_NR * SKV_PMAT_NR * in;
}

#define PM_PACK_K 64u

void skv_pmat_pack(float *dst, uint32_t in, uint32_t out, uint32_t col0, const float *w,
		   uint32_t n)
{
	uint32_t p0 = col0 / SKV_PMAT_NR, p1 = (col0 + n + SKV_PMAT_NR - 1) / SKV_PMAT_NR;
	int last = col0 + n == out;
	/* Panel by panel; within one, blocks of PM_PACK_K values of k, so that the block's rows
	 * of w (64 lines) and of the panel (PM_PACK_K lines) stay in L1. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(omp_get_num_procs()) \
	if ((size_t)n * in >= (1u << 20))
	for (uint32_t p = p0; p < p1; p++) {
		float *panel = dst + (size_t)p * in * SKV_PMAT_NR;
		uint32_t c0 = p * SKV_PMAT_NR;
		uint32_t j0 = col0 > c0 ? col0 - c0 : 0;
		uint32_t j1 = col0 + n - c0 < SKV_PMAT_NR ? col0 + n - c0 : SKV_PMAT_NR;
		for (uint32_t k0 = 0; k0 < in; k0 += PM_PACK_K) {
			uint32_t k1 = k0 + PM_PACK_K < in ? k0 + PM_PACK_K : in;
			for (uint32_t j = j0; j < j1; j++) {
				const float *src = w + (size_t)(c0 + j - col0) * in;
				for (uint32_t k = k0; k < k1; k++)
					panel[(size_t)k * SKV_PMAT_NR + j] = src[k];
			}
			if (last && p == p1 - 1)
				for (uint32_t k = k0; k < k1; k++)
					memset(panel + (size_t)k * SKV_PMAT_NR + j1, 0,
					       (SKV_PMAT_NR - j1) * sizeof(float));
		}
	}
}

/* ---------------------------------------------------------------------------------------- */
/* kernels and context */

static const struct pm_kernels *pm_pick(const char *force)
{
	int level = skv_isa_level(force, 0);
#ifdef SKV_QMAT_MULTI_ISA
	if (level == 4)
		return &pm_kernels_v4;
	if (level == 3)
		return &pm_kernels_v3;
#endif
	return level < 0 ? NULL : &pm_kernels_base;
}

static int pm_part_resize(struct skv_pctx *ctx, uint32_t threads)
{
	if (threads <= ctx->part_threads)
		return 0;
	void *p = NULL;
	size_t bytes = (size_t)threads * ctx->max_rows * SKV_PMAT_NR * sizeof(float);
	if (posix_memalign(&p, 64, bytes))
		return -ENOMEM;
	free(ctx->part);
	ctx->part = p;
	ctx->part_threads = threads;
	return 0;
}

int skv_pctx_new(uint32_t max_rows, uint32_t threads, struct skv_pctx **out)
{
	if (!max_rows || !threads || !out)
		return -EINVAL;
	struct skv_pctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return -ENOMEM;
	ctx->max_rows = max_rows;
	ctx->threads = threads;
	const char *force = getenv("SKV_QMAT_ISA");
	ctx->kern = force && *force ? pm_pick(force) : NULL;
	if (!ctx->kern)
		ctx->kern = pm_pick(NULL);
	if (pm_part_resize(ctx, threads) < 0) {
		free(ctx);
		return -ENOMEM;
	}
	*out = ctx;
	return 0;
}

void skv_pctx_free(struct skv_pctx *ctx)
{
	if (!ctx)
		return;
	free(ctx->part);
	free(ctx);
}

int skv_pctx_set_threads(struct skv_pctx *ctx, uint32_t threads)
{
	if (!ctx || !threads)
		return -EINVAL;
	int rc = pm_part_resize(ctx, threads);
	if (rc < 0)
		return rc;
	ctx->threads = threads;
	return 0;
}

int skv_pctx_set_isa(struct skv_pctx *ctx, const char *isa)
{
	if (!ctx)
		return -EINVAL;
	int level = skv_isa_level(isa, 0);
	if (level < 0)
		return level;
	ctx->kern = pm_pick(isa);
	return 0;
}

const char *skv_pctx_isa(const struct skv_pctx *ctx)
{
	return ctx ? ctx->kern->name : NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* the run */

int skv_pmat_run(struct skv_pctx *ctx, const float *wp, uint32_t in, uint32_t out, uint32_t rows,
		 const float *x, size_t ld_x, float *y, size_t ld_y, int add)
{
	if (!ctx || !wp || !in || !out || !rows || rows > ctx->max_rows || !x || !y || ld_x < in ||
	    ld_y < out)
		return -EINVAL;
	uint32_t panels = (out + SKV_PMAT_NR - 1) / SKV_PMAT_NR;
	uint32_t threads = ctx->threads < panels ? ctx->threads : panels;
	const struct pm_kernels *k = ctx->kern;
	size_t part_floats = (size_t)ctx->max_rows * SKV_PMAT_NR;
	if (threads <= 1) {
		k->panels(wp, in, out, 0, panels, rows, x, ld_x, y, ld_y, add, ctx->part);
		return 0;
	}
	/* Each thread its share of the panels: every weight is read by one thread, once. */
#pragma omp parallel num_threads(threads)
	{
		uint32_t t = (uint32_t)omp_get_thread_num();
		uint32_t team = (uint32_t)omp_get_num_threads();
		uint32_t p0 = panels * t / team, p1 = panels * (t + 1) / team;
		if (p0 < p1)
			k->panels(wp, in, out, p0, p1, rows, x, ld_x, y, ld_y, add,
				  ctx->part + t * part_floats);
	}
	return 0;
}
