/* engine/pmat.c: F32 matrix products over weights packed in panels of 64 columns.
 *
 * The definition (pmat.h) is exact: each output is acc = fmaf(W[n][k], x[m][k], acc) over k
 * from zero, then y = acc or y + acc. The reference below computes that in plain C from the
 * unpacked [out][in] matrix, and every kernel copy the CPU has (base, avx2, avx512), every row
 * count (one tile, several, a tail tile), thread count, chunking of k (in beyond PM_KC) and
 * partial last panel must equal it bit for bit: that is what makes a batched stream's bits
 * those of its solo run. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pmat.h"

static const char *const isas[] = { "base", "avx2", "avx512" };

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;

static float rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	/* a spread of magnitudes, both signs: sums that round at every step */
	double u = (double)(rng_state >> 11) / 9007199254740992.0;
	return (float)((u - 0.5) * ldexp(1.0, (int)(rng_state & 7) - 3));
}

static float *rnd_buf(size_t n)
{
	float *p = malloc(n * sizeof(float) + 64);
	cr_assert(p);
	for (size_t i = 0; i < n; i++)
		p[i] = rnd();
	return p;
}

static void reference(const float *w, uint32_t in, uint32_t out, uint32_t rows, const float *x,
		      size_t ld_x, float *y, size_t ld_y, int add)
{
	for (uint32_t m = 0; m < rows; m++)
		for (uint32_t n = 0; n < out; n++) {
			float acc = 0.0f;
			for (uint32_t k = 0; k < in; k++)
				acc = fmaf(w[(size_t)n * in + k], x[(size_t)m * ld_x + k], acc);
			float *o = &y[(size_t)m * ld_y + n];
			*o = add ? *o + acc : acc;
		}
}

static float *packed(const float *w, uint32_t in, uint32_t out)
{
	size_t floats = skv_pmat_floats(in, out);
	float *p = NULL;
	cr_assert(posix_memalign((void **)&p, 64, floats * sizeof(float)) == 0);
	/* garbage first: the pack must write the last panel's padding itself */
	memset(p, 0x7f, floats * sizeof(float));
	skv_pmat_pack(p, in, out, 0, w, out);
	return p;
}

static int bits_equal(const float *a, const float *b, uint32_t rows, uint32_t cols, size_t ld)
{
	for (uint32_t m = 0; m < rows; m++)
		if (memcmp(a + (size_t)m * ld, b + (size_t)m * ld, cols * sizeof(float)))
			return 0;
	return 1;
}

/* One shape, every ISA, thread count, add mode and row count in rows_list. */
static void check_shape(uint32_t in, uint32_t out, const uint32_t *rows_list, size_t n_rows)
{
	uint32_t max_rows = 0;
	for (size_t i = 0; i < n_rows; i++)
		if (rows_list[i] > max_rows)
			max_rows = rows_list[i];
	size_t ld_x = in + 3, ld_y = out + 5; /* strides wider than the rows */
	float *w = rnd_buf((size_t)in * out), *x = rnd_buf(max_rows * ld_x);
	float *y0 = rnd_buf(max_rows * ld_y);
	float *want = malloc(max_rows * ld_y * sizeof(float)), *got = malloc(max_rows * ld_y * sizeof(float));
	float *wp = packed(w, in, out);
	int ran = 0;
	for (size_t i = 0; i < sizeof(isas) / sizeof(isas[0]); i++) {
		struct skv_pctx *ctx;
		cr_assert_eq(skv_pctx_new(max_rows, 1, &ctx), 0);
		int rc = skv_pctx_set_isa(ctx, isas[i]);
		if (rc == -ENOTSUP) {
			skv_pctx_free(ctx);
			continue;
		}
		cr_assert_eq(rc, 0);
		cr_assert_str_eq(skv_pctx_isa(ctx), isas[i]);
		ran++;
		for (uint32_t threads = 1; threads <= 3; threads++) {
			cr_assert_eq(skv_pctx_set_threads(ctx, threads), 0);
			for (int add = 0; add <= 1; add++)
				for (size_t r = 0; r < n_rows; r++) {
					uint32_t rows = rows_list[r];
					memcpy(want, y0, max_rows * ld_y * sizeof(float));
					memcpy(got, y0, max_rows * ld_y * sizeof(float));
					reference(w, in, out, rows, x, ld_x, want, ld_y, add);
					cr_assert_eq(skv_pmat_run(ctx, wp, in, out, rows, x, ld_x, got,
								  ld_y, add), 0);
					cr_assert(bits_equal(want, got, max_rows, (uint32_t)ld_y, ld_y),
						  "%s, %u threads, add %d: %u x %u, %u rows differ from the "
						  "fma chain (or wrote outside its rows and columns)",
						  isas[i], threads, add, out, in, rows);
				}
		}
		skv_pctx_free(ctx);
	}
	cr_assert(ran >= 1);
	free(wp);
	free(got);
	free(want);
	free(y0);
	free(x);
	free(w);
}

Test(pmat, every_kernel_equals_the_fma_chain_bit_for_bit)
{
	static const uint32_t rows[] = { 1, 2, 5, 6, 7, 12, 13, 64 };
	check_shape(64, 192, rows, 8);   /* whole panels (stories260K's q|k|v) */
	check_shape(64, 344, rows, 8);   /* a partial last panel (its gate|up: 2 x 172) */
	check_shape(172, 64, rows, 8);   /* its w2 */
	check_shape(7, 1, rows, 8);      /* one column, a short k */
	check_shape(1100, 130, rows, 8); /* k in three chunks, one of them partial */
}

Test(pmat, a_row_has_the_same_bits_in_every_batch)
{
	/* Row 0 alone, then as one of 1..40 rows (single tile, several tiles, tail tiles,
	 * chunked k): always the same bits. */
	uint32_t in = 700, out = 100;
	float *w = rnd_buf((size_t)in * out), *x = rnd_buf(40 * (size_t)in);
	float *wp = packed(w, in, out);
	float solo[100], *y = malloc(40 * out * sizeof(float));
	struct skv_pctx *ctx;
	cr_assert_eq(skv_pctx_new(40, 2, &ctx), 0);
	cr_assert_eq(skv_pmat_run(ctx, wp, in, out, 1, x, in, solo, out, 0), 0);
	for (uint32_t rows = 1; rows <= 40; rows++) {
		cr_assert_eq(skv_pmat_run(ctx, wp, in, out, rows, x, in, y, out, 0), 0);
		cr_assert(!memcmp(y, solo, sizeof(solo)), "row 0 changed in a batch of %u", rows);
	}
	skv_pctx_free(ctx);
	free(y);
	free(wp);
	free(x);
	free(w);
}

Test(pmat, fused_members_pack_as_one_matrix)
{
	/* q|k|v packed member by member at their columns equals the concatenated matrix packed
	 * at once (the daemon's shared copy and an engine's own must agree). */
	uint32_t in = 70, nq = 100, nk = 30, nv = 30, out = nq + nk + nv;
	float *w = rnd_buf((size_t)in * out);
	float *whole = packed(w, in, out);
	size_t floats = skv_pmat_floats(in, out);
	float *parts = NULL;
	cr_assert(posix_memalign((void **)&parts, 64, floats * sizeof(float)) == 0);
	memset(parts, 0x7f, floats * sizeof(float));
	skv_pmat_pack(parts, in, out, 0, w, nq);
	skv_pmat_pack(parts, in, out, nq, w + (size_t)nq * in, nk);
	skv_pmat_pack(parts, in, out, nq + nk, w + (size_t)(nq + nk) * in, nv);
	cr_assert(!memcmp(whole, parts, floats * sizeof(float)));
	/* the padding of the last panel is zero */
	for (uint32_t k = 0; k < in; k++)
		for (uint32_t j = out % SKV_PMAT_NR; j < SKV_PMAT_NR; j++)
			cr_assert_eq(whole[(size_t)(out / SKV_PMAT_NR) * in * SKV_PMAT_NR +
					   (size_t)k * SKV_PMAT_NR + j], 0.0f);
	free(parts);
	free(whole);
	free(w);
}

Test(pmat, bad_arguments_are_refused)
{
	struct skv_pctx *ctx;
	float wp[64] = { 0 }, x[4] = { 0 }, y[4];
	cr_assert_eq(skv_pctx_new(0, 1, &ctx), -EINVAL);
	cr_assert_eq(skv_pctx_new(4, 0, &ctx), -EINVAL);
	cr_assert_eq(skv_pctx_new(4, 1, &ctx), 0);
	cr_assert_eq(skv_pctx_set_isa(ctx, "sse9"), -EINVAL);
	cr_assert_eq(skv_pctx_set_threads(ctx, 0), -EINVAL);
	cr_assert_eq(skv_pmat_run(ctx, wp, 1, 1, 5, x, 1, y, 1, 0), -EINVAL); /* > max_rows */
	cr_assert_eq(skv_pmat_run(ctx, wp, 1, 1, 0, x, 1, y, 1, 0), -EINVAL);
	cr_assert_eq(skv_pmat_run(ctx, wp, 2, 1, 1, x, 1, y, 1, 0), -EINVAL); /* ld_x < in */
	cr_assert_eq(skv_pmat_run(ctx, wp, 1, 2, 1, x, 1, y, 1, 0), -EINVAL); /* ld_y < out */
	cr_assert_eq(skv_pmat_run(ctx, NULL, 1, 1, 1, x, 1, y, 1, 0), -EINVAL);
	cr_assert_eq(skv_pmat_run(ctx, wp, 1, 1, 1, x, 1, y, 1, 0), 0);
	skv_pctx_free(ctx);
	skv_pctx_free(NULL);
}
