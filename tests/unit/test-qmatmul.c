/* engine/qmatmul.c: matrix products over ggml block-format weights.
 *
 * The reference here states each numeric definition in plain C, independently of the kernels:
 * x quantized as ggml's quantize_row_q8_0_ref (scale amax / 127 stored as fp16, roundf) and
 * quantize_row_q8_K_ref (scale -127 / max, round half to even), the integer dot product of each
 * block (Q8_0, Q4_0) or sub-block (K-quants) with its scales and mins, summed in double. Every
 * ISA copy the CPU has (base, avx2, avx512) must equal it within float summation order:
 *
 *   |y - ref| <= (2 * terms + 16) * 2^-24 * magnitude
 *
 * where terms counts the scaled integer (sub-)block products (quantized types) or the w * x
 * (F32, F16, BF16), and magnitude is the sum over the elements of |scale * w * x|, with w the
 * stored unsigned code plus its offset for Q4_0 (q + 8) and Q6_K (q + 64 - 32): kernels sum
 * the products of a block in several lanes and may subtract the offset apart, and each lane's
 * partial sum is rounded to float on its own (as ggml's AVX kernels do). Hand-built inputs whose every partial sum is an exact
 * integer must come out exactly. And against dequantize-then-multiply (quant.c's
 * skv_dequant_row): |y - W_deq x| <= sum |w_deq| * |x - x_quantized| + the tolerance above. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qmatmul.h"
#include "quant.h"

/* ---------------------------------------------------------------------------------------- */
/* the reference */

static float ref_h2f(uint16_t h)
{
	uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, mant = h & 1023;
	uint32_t bits;
	if (exp == 0) {
		float f = ldexpf((float)mant, -24);
		return sign ? -f : f;
	}
	if (exp == 31)
		bits = sign | 0x7f800000u | (mant << 13);
	else
		bits = sign | ((exp + 112) << 23) | (mant << 13);
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

static float ref_bf2f(uint16_t b)
{
	uint32_t bits = (uint32_t)b << 16;
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

struct ref_x {
	/* Q8_0 form */
	int8_t q0[16384];
	float d0[512];
	/* Q8_K form */
	int8_t qk[16384];
	float dk[64];
};

static void ref_quant_q8_0(const float *x, uint32_t n, int8_t *q, float *d)
{
	for (uint32_t b = 0; b < n / 32; b++) {
		float amax = 0.f;
		for (int j = 0; j < 32; j++)
			if (fabsf(x[32 * b + j]) > amax)
				amax = fabsf(x[32 * b + j]);
		float dd = amax / 127.f;
		float id = dd != 0.f ? 1.f / dd : 0.f;
		for (int j = 0; j < 32; j++)
			q[32 * b + j] = (int8_t)roundf(x[32 * b + j] * id);
		d[b] = ref_h2f(skv_f32_to_f16(dd));
	}
}

/* ggml's nearest_int: round half to even for |v| < 2^22 */
static int ref_nearest(float v)
{
	return (int)rintf(v);
}

static void ref_quant_q8_k(const float *x, uint32_t n, int8_t *q, float *d)
{
	for (uint32_t b = 0; b < n / 256; b++) {
		const float *xb = x + 256 * b;
		float amax = 0.f, max = 0.f;
		for (int j = 0; j < 256; j++)
			if (fabsf(xb[j]) > amax) {
				amax = fabsf(xb[j]);
				max = xb[j];
			}
		if (amax == 0.f) {
			d[b] = 0.f;
			memset(q + 256 * b, 0, 256);
			continue;
		}
		float iscale = -127.f / max;
		for (int j = 0; j < 256; j++) {
			int v = ref_nearest(iscale * xb[j]);
			q[256 * b + j] = (int8_t)(v > 127 ? 127 : v);
		}
		d[b] = 1.f / iscale;
	}
}

static void ref_quantize(const float *x, uint32_t n, struct ref_x *rx)
{
	cr_assert(n <= 16384);
	ref_quant_q8_0(x, n, rx->q0, rx->d0);
	if (n % 256 == 0)
		ref_quant_q8_k(x, n, rx->qk, rx->dk);
}

/* ggml's get_scale_min_k4, as ggml writes it */
static void ref_scale_min(int j, const uint8_t *q, int *d, int *m)
{
	if (j < 4) {
		*d = q[j] & 63;
		*m = q[j + 4] & 63;
	} else {
		*d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
		*m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
	}
}

/* One row: *sum the reference value, *mag the sum of |term|, *terms their count. */
static void ref_dot(uint32_t type, const void *row, uint32_t n, const float *x,
		    const struct ref_x *rx, double *sum, double *mag, uint32_t *terms)
{
	double s = 0, a = 0;
	uint32_t t = 0;
	const uint8_t *p = row;
	switch (type) {
	case SKV_WTYPE_F32:
	case SKV_WTYPE_F16:
	case SKV_WTYPE_BF16:
		for (uint32_t c = 0; c < n; c++) {
			float w;
			if (type == SKV_WTYPE_F32)
				memcpy(&w, p + 4 * c, 4);
			else {
				uint16_t h;
				memcpy(&h, p + 2 * c, 2);
				w = type == SKV_WTYPE_F16 ? ref_h2f(h) : ref_bf2f(h);
			}
			double v = (double)w * x[c];
			s += v;
			a += fabs(v);
			t++;
		}
		break;
	case SKV_WTYPE_Q8_0:
		for (uint32_t b = 0; b < n / 32; b++) {
			const struct skv_block_q8_0 *blk = (const void *)(p + 34 * b);
			long dot = 0, abs_dot = 0;
			for (int j = 0; j < 32; j++) {
				dot += blk->qs[j] * rx->q0[32 * b + j];
				abs_dot += labs((long)blk->qs[j] * rx->q0[32 * b + j]);
			}
			double scale = (double)ref_h2f(blk->d) * rx->d0[b];
			s += scale * dot;
			a += fabs(scale) * abs_dot;
			t++;
		}
		break;
	case SKV_WTYPE_Q4_0:
		for (uint32_t b = 0; b < n / 32; b++) {
			const struct skv_block_q4_0 *blk = (const void *)(p + 18 * b);
			long dot = 0, abs_dot = 0;
			for (int j = 0; j < 16; j++) {
				dot += ((blk->qs[j] & 15) - 8) * rx->q0[32 * b + j] +
				       ((blk->qs[j] >> 4) - 8) * rx->q0[32 * b + 16 + j];
				/* kernels may sum q * x and 8 * x apart (q the stored nibble) */
				abs_dot += ((blk->qs[j] & 15) + 8) * labs(rx->q0[32 * b + j]) +
					   ((blk->qs[j] >> 4) + 8) * labs(rx->q0[32 * b + 16 + j]);
			}
			double scale = (double)ref_h2f(blk->d) * rx->d0[b];
			s += scale * dot;
			a += fabs(scale) * abs_dot;
			t++;
		}
		break;
	case SKV_WTYPE_Q4_K:
	case SKV_WTYPE_Q5_K: {
		int five = type == SKV_WTYPE_Q5_K;
		size_t bytes = five ? 176 : 144;
		for (uint32_t b = 0; b < n / 256; b++) {
			const uint8_t *blk = p + bytes * b;
			const struct skv_block_q4_k *b4 = (const void *)blk;
			const struct skv_block_q5_k *b5 = (const void *)blk;
			const uint8_t *qs = five ? b5->qs : b4->qs;
			double d = ref_h2f(b4->d), dmin = ref_h2f(b4->dmin), dx = rx->dk[b];
			const int8_t *xq = rx->qk + 256 * b;
			for (int j = 0; j < 8; j++) {
				int sc, m;
				ref_scale_min(j, b4->scales, &sc, &m);
				long dot = 0, xs = 0, abs_dot = 0, abs_xs = 0;
				for (int l = 0; l < 32; l++) {
					int q = j % 2 ? qs[32 * (j / 2) + l] >> 4 : qs[32 * (j / 2) + l] & 15;
					if (five)
						q |= ((b5->qh[l] >> j) & 1) << 4;
					dot += q * xq[32 * j + l];
					xs += xq[32 * j + l];
					abs_dot += q * labs(xq[32 * j + l]);
					abs_xs += labs(xq[32 * j + l]);
				}
				double v = d * dx * sc * dot, vm = dmin * dx * m * xs;
				s += v - vm;
				a += fabs(d * dx * sc) * abs_dot + fabs(dmin * dx * m) * abs_xs;
				t += 2;
			}
		}
		break;
	}
	case SKV_WTYPE_Q6_K:
		for (uint32_t b = 0; b < n / 256; b++) {
			const struct skv_block_q6_k *blk = (const void *)(p + 210 * b);
			int q[256];
			for (int h = 0; h < 2; h++)
				for (int l = 0; l < 32; l++) {
					const uint8_t *ql = blk->ql + 64 * h, *qh = blk->qh + 32 * h;
					q[128 * h + l] = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
					q[128 * h + l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
					q[128 * h + l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
					q[128 * h + l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
				}
			double d = ref_h2f(blk->d), dx = rx->dk[b];
			for (int j = 0; j < 16; j++) {
				long dot = 0, abs_dot = 0;
				for (int l = 0; l < 16; l++) {
					dot += q[16 * j + l] * rx->qk[256 * b + 16 * j + l];
					/* kernels may sum (q + 32) * x and 32 * x apart */
					abs_dot += (q[16 * j + l] + 64) * labs(rx->qk[256 * b + 16 * j + l]);
				}
				double scale = d * dx * blk->scales[j];
				s += scale * dot;
				a += fabs(scale) * abs_dot;
				t++;
			}
		}
		break;
	default:
		cr_assert_fail("type %u", type);
	}
	*sum = s;
	*mag = a;
	*terms = t;
}

static double ref_tol(double mag, uint32_t terms)
{
	return (2.0 * terms + 16) * ldexp(1.0, -24) * mag + 1e-30;
}

/* ---------------------------------------------------------------------------------------- */
/* inputs */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float rndf(void) /* [-1, 1) */
{
	return (float)((int32_t)rnd()) / 2147483648.f;
}

/* a finite fp16 of magnitude 2^(lo - 15) .. 2^(hi - 14), either sign */
static uint16_t rnd_f16(int lo, int hi)
{
	uint32_t e = (uint32_t)lo + rnd() % (uint32_t)(hi - lo + 1);
	return (uint16_t)(((rnd() & 1) << 15) | (e << 10) | (rnd() & 1023));
}

/* Random bytes for every block field, with scales of a plausible size. */
static void *make_matrix(uint32_t type, uint32_t rows, uint32_t cols, struct skv_qmat *w)
{
	uint64_t rb = skv_wtype_row_bytes(type, cols);
	cr_assert(rb > 0, "row bytes of %s x %u", skv_wtype_name(type), cols);
	uint8_t *data = malloc(rb * rows);
	cr_assert(data);
	for (uint64_t i = 0; i < rb * rows; i++)
		data[i] = (uint8_t)rnd();
	for (uint32_t r = 0; r < rows; r++) {
		uint8_t *row = data + rb * r;
		switch (type) {
		case SKV_WTYPE_F32:
			for (uint32_t c = 0; c < cols; c++) {
				float f = rndf();
				memcpy(row + 4 * c, &f, 4);
			}
			break;
		case SKV_WTYPE_F16:
			for (uint32_t c = 0; c < cols; c++) {
				uint16_t h = rnd_f16(8, 16);
				memcpy(row + 2 * c, &h, 2);
			}
			break;
		case SKV_WTYPE_BF16:
			for (uint32_t c = 0; c < cols; c++) {
				float f = rndf() * 4.f;
				uint32_t bits;
				memcpy(&bits, &f, 4);
				uint16_t h = (uint16_t)(bits >> 16);
				memcpy(row + 2 * c, &h, 2);
			}
			break;
		case SKV_WTYPE_Q8_0:
			for (uint32_t b = 0; b < cols / 32; b++) {
				uint16_t d = rnd_f16(5, 10);
				memcpy(row + 34 * b, &d, 2);
			}
			break;
		case SKV_WTYPE_Q4_0:
			for (uint32_t b = 0; b < cols / 32; b++) {
				uint16_t d = rnd_f16(5, 10);
				memcpy(row + 18 * b, &d, 2);
			}
			break;
		case SKV_WTYPE_Q4_K:
		case SKV_WTYPE_Q5_K:
			for (uint32_t b = 0; b < cols / 256; b++) {
				uint16_t d = rnd_f16(3, 8), dmin = rnd_f16(3, 8);
				size_t bytes = type == SKV_WTYPE_Q4_K ? 144 : 176;
				memcpy(row + bytes * b, &d, 2);
				memcpy(row + bytes * b + 2, &dmin, 2);
			}
			break;
		case SKV_WTYPE_Q6_K:
			for (uint32_t b = 0; b < cols / 256; b++) {
				uint16_t d = rnd_f16(3, 8);
				memcpy(row + 210 * b + 208, &d, 2);
			}
			break;
		}
	}
	*w = (struct skv_qmat){ .type = type, .rows = rows, .cols = cols, .row_bytes = rb,
				.data = data };
	return data;
}

static float *make_x(uint32_t m_rows, uint32_t cols, size_t ld)
{
	float *x = malloc(sizeof(float) * m_rows * ld);
	cr_assert(x);
	for (uint32_t m = 0; m < m_rows; m++)
		for (size_t c = 0; c < ld; c++) {
			float v = rndf();
			if (rnd() % 97 == 0)
				v *= 30.f; /* an outlier sets a block's scale */
			x[m * ld + c] = c < cols ? v : NAN; /* the padding must not be read */
		}
	/* an all-zero block (ggml's amax == 0 branch) */
	if (cols >= 512)
		for (uint32_t c = 256; c < 512; c++)
			x[c] = 0.f;
	return x;
}

/* ---------------------------------------------------------------------------------------- */
/* the checks */

static const char *const isas[] = { "base", "avx2", "avx512" };

/* y from the kernels of isa for n matrices sharing x, each against the reference. Returns 0,
 * or -ENOTSUP when the CPU lacks the ISA. */
static int check_call(const char *isa, const uint32_t *types, uint32_t n, uint32_t rows,
		      uint32_t cols, uint32_t m_rows, uint32_t threads, int add)
{
	struct skv_qctx *ctx;
	cr_assert_eq(skv_qctx_new(m_rows, cols, threads, &ctx), 0);
	int rc = skv_qctx_set_isa(ctx, isa);
	if (rc == -ENOTSUP) {
		skv_qctx_free(ctx);
		return rc;
	}
	cr_assert_eq(rc, 0);
	struct skv_qmat mats[4];
	const struct skv_qmat *wp[4];
	void *data[4];
	float *y[4], *y0[4];
	size_t ld_y[4];
	size_t ld_x = cols + 3;
	float *x = make_x(m_rows, cols, ld_x);
	for (uint32_t i = 0; i < n; i++) {
		data[i] = make_matrix(types[i], rows + i, cols, &mats[i]);
		wp[i] = &mats[i];
		ld_y[i] = rows + i + 5;
		y[i] = malloc(sizeof(float) * m_rows * ld_y[i]);
		y0[i] = malloc(sizeof(float) * m_rows * ld_y[i]);
		for (size_t k = 0; k < m_rows * ld_y[i]; k++)
			y[i][k] = y0[i][k] = add ? rndf() : NAN;
	}
	cr_assert_eq(skv_qmat_run(ctx, wp, n, m_rows, x, ld_x, y, ld_y, add), 0);
	struct ref_x *rx = malloc(sizeof(*rx));
	cr_assert(rx);
	for (uint32_t m = 0; m < m_rows; m++) {
		ref_quantize(x + m * ld_x, cols, rx);
		for (uint32_t i = 0; i < n; i++)
			for (uint32_t r = 0; r < mats[i].rows; r++) {
				double s, mag;
				uint32_t terms;
				ref_dot(types[i], (const uint8_t *)data[i] + r * mats[i].row_bytes, cols,
					x + m * ld_x, rx, &s, &mag, &terms);
				double base = add ? y0[i][m * ld_y[i] + r] : 0.0;
				double got = y[i][m * ld_y[i] + r];
				cr_assert(fabs(got - base - s) <= ref_tol(mag, terms) + (add ? ldexp(1.0, -23) * (fabs(s) + 1) : 0),
					  "%s %s rows %u cols %u m_rows %u threads %u add %d: y[%u][%u] = "
					  "%.9g, reference %.9g (tolerance %.3g)",
					  isa, skv_wtype_name(types[i]), mats[i].rows, cols, m_rows,
					  threads, add, m, r, got - base, s, ref_tol(mag, terms));
			}
	}
	/* the padding of y is left alone */
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t m = 0; m + 1 < m_rows; m++)
			for (size_t r = mats[i].rows; r < ld_y[i]; r++) {
				float a = y[i][m * ld_y[i] + r], b = y0[i][m * ld_y[i] + r];
				cr_assert(memcmp(&a, &b, 4) == 0, "%s wrote y padding", isa);
			}
	for (uint32_t i = 0; i < n; i++) {
		free(data[i]);
		free(y[i]);
		free(y0[i]);
	}
	free(rx);
	free(x);
	skv_qctx_free(ctx);
	return 0;
}

static void check_type_all(uint32_t type)
{
	static const uint32_t m_list[] = { 1, 2, 3, 7, 16, 17, 64, 256 };
	uint32_t cols_list[] = { 256, 768 };
	int ran = 0;
	for (size_t k = 0; k < sizeof(isas) / sizeof(isas[0]); k++) {
		int ok = 1;
		for (size_t mi = 0; mi < sizeof(m_list) / sizeof(m_list[0]) && ok; mi++)
			for (int ci = 0; ci < 2 && ok; ci++) {
				uint32_t m = m_list[mi], cols = cols_list[ci];
				/* odd row counts; the big cases once, the small ones in every mode */
				uint32_t rows = m >= 64 ? 37 : 13;
				for (int add = 0; add < 2 && ok; add++)
					for (uint32_t th = 1; th <= 2 && ok; th++) {
						if (m >= 64 && cols > 256 && (add || th == 2))
							continue;
						if (check_call(isas[k], &type, 1, rows, cols, m, th, add) ==
						    -ENOTSUP)
							ok = 0;
					}
			}
		ran += ok;
	}
	cr_assert(ran >= 1);
}

/* The AVX-512 row path runs up to four weight rows per tile (each load of x serving them all)
 * and 16 blocks per group of scales: every tile width (1-4 rows, also at the ends of a
 * thread's share), whole groups and a tail of blocks, float rows of whole 256-column steps
 * and a tail of 16-column pieces. */
Test(qmatmul, decode_tiles_every_width_and_tail)
{
	static const uint32_t types[] = { SKV_WTYPE_Q4_0, SKV_WTYPE_Q8_0, SKV_WTYPE_F16,
					  SKV_WTYPE_BF16, SKV_WTYPE_F32 };
	static const uint32_t qcols[] = { 32, 544, 1056 }, fcols[] = { 96, 800, 1056 };
	for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
		int is_float = types[t] == SKV_WTYPE_F16 || types[t] == SKV_WTYPE_BF16 ||
			       types[t] == SKV_WTYPE_F32;
		for (int ci = 0; ci < 3; ci++)
			for (uint32_t rows = 1; rows <= 9; rows++)
				for (uint32_t m = 1; m <= 3; m += 2)
					for (uint32_t th = 1; th <= 2; th++) {
						uint32_t cols = is_float ? fcols[ci] : qcols[ci];
						if (check_call("avx512", &types[t], 1, rows, cols, m, th,
							       0) == -ENOTSUP)
							cr_skip("the CPU has no AVX-512");
					}
	}
}

#define TYPE_TEST(name, type)                                                                 \
	Test(qmatmul, name) { check_type_all(type); }
TYPE_TEST(f32, SKV_WTYPE_F32)
TYPE_TEST(f16, SKV_WTYPE_F16)
TYPE_TEST(bf16, SKV_WTYPE_BF16)
TYPE_TEST(q8_0, SKV_WTYPE_Q8_0)
TYPE_TEST(q4_0, SKV_WTYPE_Q4_0)
TYPE_TEST(q4_k, SKV_WTYPE_Q4_K)
TYPE_TEST(q5_k, SKV_WTYPE_Q5_K)
TYPE_TEST(q6_k, SKV_WTYPE_Q6_K)

Test(qmatmul, isa_levels_present)
{
	struct skv_qctx *ctx;
	cr_assert_eq(skv_qctx_new(4, 256, 1, &ctx), 0);
	cr_assert_eq(skv_qctx_set_isa(ctx, "base"), 0);
	cr_assert_str_eq(skv_qctx_isa(ctx), "base");
	cr_assert_eq(skv_qctx_set_isa(ctx, "sse9"), -EINVAL);
	__builtin_cpu_init();
	int v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni") &&
		 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
	int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
	cr_assert_eq(skv_qctx_set_isa(ctx, "avx2"), v3 ? 0 : -ENOTSUP);
	cr_assert_eq(skv_qctx_set_isa(ctx, "avx512"), v4 ? 0 : -ENOTSUP);
	skv_qctx_free(ctx);
	if (!v4)
		cr_skip_test("this CPU has no AVX-512 VNNI: only %s kernels are tested",
			     v3 ? "base and avx2" : "base");
}

/* q|k|v and gate|up: several matrices (of mixed types, as a Q4_K_M file has) share one x. */
Test(qmatmul, several_matrices_one_call)
{
	static const uint32_t mixes[][3] = {
		{ SKV_WTYPE_Q4_K, SKV_WTYPE_Q4_K, SKV_WTYPE_Q6_K },
		{ SKV_WTYPE_Q8_0, SKV_WTYPE_Q4_0, SKV_WTYPE_F16 },
		{ SKV_WTYPE_Q5_K, SKV_WTYPE_BF16, SKV_WTYPE_Q8_0 },
	};
	static const uint32_t m_list[] = { 1, 5, 64 };
	for (size_t k = 0; k < 3; k++)
		for (size_t i = 0; i < 3; i++)
			for (size_t j = 0; j < 3; j++)
				for (uint32_t th = 1; th <= 2; th++)
					check_call(isas[k], mixes[i], 3, 21, 512, m_list[j], th, j == 1);
}

/* The threads of the context split the rows; no output depends on their number. */
Test(qmatmul, threads_give_the_same_bits)
{
	struct skv_qmat w;
	void *data = make_matrix(SKV_WTYPE_Q4_K, 203, 1024, &w);
	const struct skv_qmat *wp = &w;
	float *x = make_x(64, 1024, 1024);
	for (uint32_t m = 1; m <= 64; m *= 8) {
		float *y1 = calloc(64 * 203, 4), *y2 = calloc(64 * 203, 4);
		size_t ld = 203;
		struct skv_qctx *ctx;
		cr_assert_eq(skv_qctx_new(64, 1024, 1, &ctx), 0);
		cr_assert_eq(skv_qmat_run(ctx, &wp, 1, m, x, 1024, &y1, &ld, 0), 0);
		cr_assert_eq(skv_qctx_set_threads(ctx, 2), 0);
		cr_assert_eq(skv_qmat_run(ctx, &wp, 1, m, x, 1024, &y2, &ld, 0), 0);
		cr_assert(memcmp(y1, y2, sizeof(float) * m * 203) == 0, "m_rows %u", m);
		skv_qctx_free(ctx);
		free(y1);
		free(y2);
	}
	free(x);
	free(data);
}

/* Against dequantize-then-multiply: the difference is the activations' quantization error. */
Test(qmatmul, dequantized_matmul_within_activation_error)
{
	static const uint32_t types[] = { SKV_WTYPE_Q8_0, SKV_WTYPE_Q4_0, SKV_WTYPE_Q4_K,
					  SKV_WTYPE_Q5_K, SKV_WTYPE_Q6_K, SKV_WTYPE_F16,
					  SKV_WTYPE_BF16 };
	const uint32_t cols = 1024, rows = 19;
	float *deq = malloc(sizeof(float) * cols);
	struct ref_x *rx = malloc(sizeof(*rx));
	for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++)
		for (size_t k = 0; k < 3; k++)
			for (uint32_t m_rows = 1; m_rows <= 32; m_rows *= 32) {
				struct skv_qctx *ctx;
				cr_assert_eq(skv_qctx_new(m_rows, cols, 1, &ctx), 0);
				if (skv_qctx_set_isa(ctx, isas[k]) < 0) {
					skv_qctx_free(ctx);
					continue;
				}
				struct skv_qmat w;
				void *data = make_matrix(types[t], rows, cols, &w);
				const struct skv_qmat *wp = &w;
				float *x = make_x(m_rows, cols, cols);
				float *y = malloc(sizeof(float) * m_rows * rows);
				size_t ld = rows;
				cr_assert_eq(skv_qmat_run(ctx, &wp, 1, m_rows, x, cols, &y, &ld, 0), 0);
				int k_form = types[t] == SKV_WTYPE_Q4_K || types[t] == SKV_WTYPE_Q5_K ||
					     types[t] == SKV_WTYPE_Q6_K;
				int exact_x = types[t] == SKV_WTYPE_F16 || types[t] == SKV_WTYPE_BF16;
				for (uint32_t m = 0; m < m_rows; m++) {
					const float *xm = x + m * cols;
					ref_quantize(xm, cols, rx);
					for (uint32_t r = 0; r < rows; r++) {
						cr_assert_eq(skv_dequant_row(types[t],
									     (const uint8_t *)data + r * w.row_bytes,
									     deq, cols),
							     0);
						double s = 0, bound = 0, mag = 0;
						for (uint32_t c = 0; c < cols; c++) {
							double xq = exact_x ? xm[c]
								    : k_form ? (double)rx->dk[c / 256] * rx->qk[c]
									     : (double)rx->d0[c / 32] * rx->q0[c];
							s += (double)deq[c] * xm[c];
							bound += fabs(deq[c]) * fabs(xm[c] - xq);
							mag += fabs((double)deq[c] * xq);
						}
						double tol = bound + ref_tol(mag, 2 * cols);
						cr_assert(fabs(y[m * rows + r] - s) <= tol,
							  "%s %s: y[%u][%u] = %.9g, dequantized %.9g, bound %.3g",
							  isas[k], skv_wtype_name(types[t]), m, r,
							  y[m * rows + r], s, tol);
					}
				}
				free(y);
				free(x);
				free(data);
				skv_qctx_free(ctx);
			}
	free(rx);
	free(deq);
}

/* ---------------------------------------------------------------------------------------- */
/* hand-built blocks: every partial sum an exact integer, so every ISA is exact */

static float run_one(const char *isa, const struct skv_qmat *w, const float *x, uint32_t m_rows,
		     float *y)
{
	struct skv_qctx *ctx;
	cr_assert_eq(skv_qctx_new(m_rows, w->cols, 1, &ctx), 0);
	int rc = skv_qctx_set_isa(ctx, isa);
	if (rc < 0) {
		skv_qctx_free(ctx);
		return NAN;
	}
	size_t ld = w->rows;
	cr_assert_eq(skv_qmat_run(ctx, &w, 1, m_rows, x, w->cols, &y, &ld, 0), 0);
	skv_qctx_free(ctx);
	return y[0];
}

/* x of integers, +127 first in every block of 32 and |x| <= 7 elsewhere: the Q8_0 scale of a block
 * holding 127 is 1 and Q8_K's is -1, so both quantizations are exact. */
static void integer_x(float *x, uint32_t cols, uint32_t m_rows)
{
	for (uint32_t m = 0; m < m_rows; m++)
		for (uint32_t c = 0; c < cols; c++)
			x[m * cols + c] = c % 32 == 0 ? 127.f : (float)((int)(rnd() % 15) - 7);
}

Test(qmatmul, hand_built_exact)
{
	const uint32_t cols = 512, rows = 5;
	float x[16 * 512], y[16 * 5];
	for (size_t k = 0; k < 3; k++)
		for (uint32_t m_rows = 1; m_rows <= 16; m_rows += 15) {
			integer_x(x, cols, m_rows);
			/* Q8_0, d = 1: y = sum q x */
			struct skv_block_q8_0 b8[5 * 16];
			for (uint32_t i = 0; i < rows * 16; i++) {
				b8[i].d = 0x3C00; /* 1.0 */
				for (int j = 0; j < 32; j++)
					b8[i].qs[j] = (int8_t)(rnd() % 256 - 128);
			}
			struct skv_qmat w = { SKV_WTYPE_Q8_0, rows, cols, 34 * 16, b8 };
			if (isnan(run_one(isas[k], &w, x, m_rows, y)))
				continue;
			for (uint32_t m = 0; m < m_rows; m++)
				for (uint32_t r = 0; r < rows; r++) {
					long e = 0;
					for (uint32_t c = 0; c < cols; c++)
						e += b8[r * 16 + c / 32].qs[c % 32] * (long)x[m * cols + c];
					cr_assert_eq(y[m * rows + r], (float)e, "%s Q8_0 [%u][%u]", isas[k], m, r);
				}
			/* Q4_K, d = 1, dmin = 0.5, scales and mins small: y = sum (sc q - m / 2) x */
			struct skv_block_q4_k b4[5 * 2];
			for (uint32_t i = 0; i < rows * 2; i++) {
				b4[i].d = 0x3C00;
				b4[i].dmin = 0x3800; /* 0.5 */
				for (int j = 0; j < 12; j++)
					b4[i].scales[j] = (uint8_t)rnd();
				for (int j = 0; j < 128; j++)
					b4[i].qs[j] = (uint8_t)rnd();
			}
			w = (struct skv_qmat){ SKV_WTYPE_Q4_K, rows, cols, 144 * 2, b4 };
			run_one(isas[k], &w, x, m_rows, y);
			for (uint32_t m = 0; m < m_rows; m++)
				for (uint32_t r = 0; r < rows; r++) {
					double e = 0;
					for (uint32_t c = 0; c < cols; c++) {
						const struct skv_block_q4_k *b = &b4[r * 2 + c / 256];
						int j = (c % 256) / 32, l = c % 32, sc, mn;
						ref_scale_min(j, b->scales, &sc, &mn);
						int q = j % 2 ? b->qs[32 * (j / 2) + l] >> 4
							      : b->qs[32 * (j / 2) + l] & 15;
						e += (sc * q - 0.5 * mn) * x[m * cols + c];
					}
					cr_assert_eq(y[m * rows + r], (float)e, "%s Q4_K [%u][%u]: %.9g vs %.9g",
						     isas[k], m, r, y[m * rows + r], e);
				}
		}
}

/* Rounding: Q8_0 rounds half away from zero (roundf), Q8_K half to even (nearest_int); a
 * one-hot weight row reads back one quantized activation. */
Test(qmatmul, activation_rounding_as_ggml)
{
	const uint32_t cols = 256;
	float x[256];
	for (uint32_t c = 0; c < cols; c++)
		x[c] = 0.f;
	x[0] = 127.f; /* both scales exactly 1 (Q8_K: -1) */
	x[3] = 2.5f;
	x[4] = -2.5f;
	x[5] = 3.5f;
	static const struct {
		uint32_t c;
		float q8_0, q8_k;
	} cases[] = { { 3, 3.f, 2.f }, { 4, -3.f, -2.f }, { 5, 4.f, 4.f }, { 0, 127.f, 127.f } };
	for (size_t k = 0; k < 3; k++)
		for (size_t i = 0; i < 4; i++) {
			struct skv_block_q8_0 b8[8];
			memset(b8, 0, sizeof(b8));
			for (int j = 0; j < 8; j++)
				b8[j].d = 0x3C00;
			b8[cases[i].c / 32].qs[cases[i].c % 32] = 1;
			struct skv_qmat w = { SKV_WTYPE_Q8_0, 1, cols, 34 * 8, b8 };
			float y;
			if (isnan(run_one(isas[k], &w, x, 1, &y)))
				continue;
			cr_assert_eq(y, cases[i].q8_0, "%s Q8_0 x[%u]: %g", isas[k], cases[i].c, y);
			/* Q6_K: d = 1, scale 1 for the sub-block, q = 33 (w = 1) there, 32 (w = 0) else */
			struct skv_block_q6_k b6;
			memset(&b6, 0, sizeof(b6));
			b6.d = 0x3C00;
			for (int j = 0; j < 16; j++)
				b6.scales[j] = 1;
			for (int l = 0; l < 64; l++)
				b6.qh[l] = 0xAA; /* the high pair of every weight is 2: q = 32 + low */
			uint32_t c = cases[i].c; /* c < 32: ql[c] low nibble */
			b6.ql[c] = 1;
			w = (struct skv_qmat){ SKV_WTYPE_Q6_K, 1, cols, 210, &b6 };
			run_one(isas[k], &w, x, 1, &y);
			cr_assert_eq(y, cases[i].q8_k, "%s Q6_K x[%u]: %g", isas[k], c, y);
		}
}

Test(qmatmul, argument_checks)
{
	struct skv_qctx *ctx;
	cr_assert_eq(skv_qctx_new(0, 256, 1, &ctx), -EINVAL);
	cr_assert_eq(skv_qctx_new(4, 256, 0, &ctx), -EINVAL);
	cr_assert_eq(skv_qctx_new(4, 256, 1, &ctx), 0);
	uint8_t data[144 * 4] = { 0 };
	struct skv_qmat w = { SKV_WTYPE_Q4_K, 2, 512, 288, data };
	cr_assert_eq(skv_qmat_check(&w), 0);
	w.row_bytes = 287;
	cr_assert_eq(skv_qmat_check(&w), -EINVAL);
	w.row_bytes = 288;
	w.type = SKV_WTYPE_Q8_K;
	cr_assert_eq(skv_qmat_check(&w), -EINVAL);
	w.type = SKV_WTYPE_Q4_K;
	w.cols = 300;
	cr_assert_eq(skv_qmat_check(&w), -EINVAL);
	w = (struct skv_qmat){ SKV_WTYPE_Q4_K, 2, 256, 144, data };
	const struct skv_qmat *wp = &w;
	float x[5 * 512] = { 0 }, y[5 * 2];
	float *yp = y;
	size_t ld = 2;
	cr_assert_eq(skv_qmat_run(ctx, &wp, 1, 5, x, 256, &yp, &ld, 0), -EINVAL); /* > max_rows */
	cr_assert_eq(skv_qmat_run(ctx, &wp, 1, 1, x, 255, &yp, &ld, 0), -EINVAL); /* ld_x */
	cr_assert_eq(skv_qmat_run(ctx, &wp, 1, 4, x, 256, &yp, &ld, 0), 0);
	for (int i = 0; i < 8; i++)
		cr_assert_eq(y[i], 0.f);
	skv_qctx_free(ctx);
	skv_qctx_free(NULL);
}

/* Identity weights read x back as the kernels quantized it: every quantized activation, bit
 * for bit, against the reference quantizers (Q8_0 through a Q8_0 identity, Q8_K through a
 * Q4_K one: d = 1, scales 1, mins 0, one nibble 1 per row), on the row path (1 row) and the
 * batched path (40 rows). */
Test(qmatmul, quantized_activations_bit_exact)
{
	const uint32_t n = 512;
	struct skv_block_q8_0 *i8 = calloc(n * (n / 32), sizeof(*i8));
	struct skv_block_q4_k *i4 = calloc(n * (n / 256), sizeof(*i4));
	cr_assert(i8 && i4);
	static const uint8_t ones[12] = { 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1 };
	for (uint32_t r = 0; r < n; r++) {
		for (uint32_t b = 0; b < n / 32; b++)
			i8[r * (n / 32) + b].d = 0x3C00;
		i8[r * (n / 32) + r / 32].qs[r % 32] = 1;
		for (uint32_t b = 0; b < n / 256; b++) {
			struct skv_block_q4_k *blk = &i4[r * (n / 256) + b];
			blk->d = 0x3C00;
			memcpy(blk->scales, ones, 12);
		}
		struct skv_block_q4_k *blk = &i4[r * (n / 256) + r / 256];
		uint32_t c = r % 256, l = c % 64;
		blk->qs[32 * (c / 64) + l % 32] = l < 32 ? 0x01 : 0x10;
	}
	struct skv_qmat w8 = { SKV_WTYPE_Q8_0, n, n, 34 * (n / 32), i8 };
	struct skv_qmat w6 = { SKV_WTYPE_Q4_K, n, n, 144 * (n / 256), i4 };
	const struct skv_qmat *wp[2] = { &w8, &w6 };
	struct ref_x *rx = malloc(sizeof(*rx));
	for (size_t k = 0; k < 3; k++)
		for (uint32_t m_rows = 1; m_rows <= 40; m_rows += 39) {
			struct skv_qctx *ctx;
			cr_assert_eq(skv_qctx_new(m_rows, n, 1, &ctx), 0);
			if (skv_qctx_set_isa(ctx, isas[k]) < 0) {
				skv_qctx_free(ctx);
				continue;
			}
			float *x = make_x(m_rows, n, n);
			/* ties of both rounding rules, and a block whose largest magnitude is negative */
			x[1] = 127.f;
			x[2] = 62.5f;
			x[3] = -62.5f;
			x[600 % n] = -300.f;
			float *y8 = malloc(sizeof(float) * m_rows * n), *y6 = malloc(sizeof(float) * m_rows * n);
			float *ys[2] = { y8, y6 };
			size_t ld[2] = { n, n };
			cr_assert_eq(skv_qmat_run(ctx, wp, 2, m_rows, x, n, ys, ld, 0), 0);
			for (uint32_t m = 0; m < m_rows; m++) {
				ref_quantize(x + m * n, n, rx);
				for (uint32_t c = 0; c < n; c++) {
					float e8 = rx->d0[c / 32] * (float)rx->q0[c];
					float e6 = rx->dk[c / 256] * (float)rx->qk[c];
					cr_assert(y8[m * n + c] == e8, "%s Q8_0 x[%u][%u] = %.9g: %.9g, not %.9g",
						  isas[k], m, c, x[m * n + c], y8[m * n + c], e8);
					cr_assert(y6[m * n + c] == e6, "%s Q8_K x[%u][%u] = %.9g: %.9g, not %.9g",
						  isas[k], m, c, x[m * n + c], y6[m * n + c], e6);
				}
			}
			free(y8);
			free(y6);
			free(x);
			skv_qctx_free(ctx);
		}
	free(rx);
	free(i8);
	free(i4);
}

/* SKV_QMAT_ISA chooses a new context's kernels; an unknown or unsupported name falls back to
 * the CPU's best. */
Test(qmatmul, isa_from_environment)
{
	struct skv_qctx *ctx;
	const char *best = skv_qmat_isa();
	cr_assert(best);
	setenv("SKV_QMAT_ISA", "base", 1);
	cr_assert_str_eq(skv_qmat_isa(), "base");
	cr_assert_eq(skv_qctx_new(1, 32, 1, &ctx), 0);
	cr_assert_str_eq(skv_qctx_isa(ctx), "base");
	skv_qctx_free(ctx);
	setenv("SKV_QMAT_ISA", "no-such-isa", 1);
	cr_assert_str_eq(skv_qmat_isa(), best);
	unsetenv("SKV_QMAT_ISA");
	cr_assert_str_eq(skv_qmat_isa(), best);
}
