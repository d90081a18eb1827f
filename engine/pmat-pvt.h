/* Private to the panel matrix products (pmat.h): the per-ISA kernel table. pmat-kernels.c is
 * compiled once per ISA (engine/meson.build) and exports pm_kernels_<isa>. */
#ifndef SKV_PMAT_PVT_H
#define SKV_PMAT_PVT_H

#include <stddef.h>
#include <stdint.h>

#include "pmat.h"

/* Rows of x per tile (the largest a kernel table uses) and k per chunk when several tiles
 * share a panel: a chunk of a panel (PM_KC x 64 floats, 128 KiB) and of x (rows x PM_KC
 * floats) stay in L2 while every tile of rows walks it. */
#define PM_MR_MAX 6u
#define PM_KC 512u

/* Panels [p0, p1) of y for rows [0, rows) of x. part: rows x 64 floats, 64-byte aligned, private
 * to the calling thread (the running sums between chunks of k). */
typedef void pm_panels_fn(const float *wp, uint32_t in, uint32_t out, uint32_t p0, uint32_t p1,
			  uint32_t rows, const float *x, size_t ld_x, float *y, size_t ld_y,
			  int add, float *part);

struct pm_kernels {
	const char *name;
	pm_panels_fn *panels;
};

extern const struct pm_kernels pm_kernels_v4;
extern const struct pm_kernels pm_kernels_v3;
extern const struct pm_kernels pm_kernels_base;

#endif
