/* The KV store of every element type and the attention kernels of every ISA copy, against a
 * scalar reference in double precision over the values the region holds. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "kv-layout.h"

/* A one-layer region of the given shape, every byte 0xff first (NaN floats, code -1, NaN
 * scales), so that a kernel that reads a slot outside the step's ranges shows it. */
struct region {
	struct skv_kv_desc desc;
	void *base;
};

static void region_open(struct region *r, uint32_t n_kv_heads, uint32_t head_size,
			uint32_t sinks, uint32_t window, uint32_t dtype)
{
	char msg[256] = "";
	cr_assert_eq(skv_kv_layout_init_dtype(&r->desc, 1, n_kv_heads, head_size, sinks, window,
					      dtype),
		     0);
	cr_assert_eq(skv_kv_layout_check(&r->desc, r->desc.region_bytes, msg, sizeof(msg)), 0,
		     "%s", msg);
	r->base = aligned_alloc(64, (r->desc.region_bytes + 63) / 64 * 64);
	cr_assert_not_null(r->base);
	memset(r->base, 0xff, r->desc.region_bytes);
}

/* The value the region holds for (plane, kv head g, component d, slot t). */
static double region_value(const struct region *r, const void *plane, uint32_t g, uint32_t d,
			   uint32_t t)
{
	const struct skv_kv_desc *desc = &r->desc;
	size_t idx = ((size_t)g * desc->head_size + d) * desc->slot_stride + t;
	switch (desc->dtype) {
	case SKV_KV_DTYPE_F16:
		return (double)((const _Float16 *)plane)[idx];
	case SKV_KV_DTYPE_Q8: {
		const float *scales = skv_kv_plane_scales((void *)plane, desc);
		return (double)scales[(size_t)g * desc->slot_stride + t] *
		       ((const int8_t *)plane)[idx];
	}
	default:
		return (double)((const float *)plane)[idx];
	}
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float rnd(float lo, float hi)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	double u = (double)((rng_state * 0x2545f4914f6cdd1dull) >> 11) / 9007199254740992.0;
	return lo + (float)u * (hi - lo);
}

Test(kv_store, q8_codes_and_scales)
{
	struct region r;
	region_open(&r, 3, 8, 0, 20, SKV_KV_DTYPE_Q8);
	float k[24], v[24];
	for (int j = 0; j < 24; j++) {
		k[j] = rnd(-3.0f, 3.0f);
		v[j] = rnd(-0.5f, 0.5f);
	}
	k[5] = -7.25f;                    /* head 0's largest |x|: code -127 */
	memset(v + 8, 0, 8 * sizeof(float)); /* head 1 of V all zero */
	k[16] = 1e-40f;                   /* head 2 of K: subnormal values only */
	for (int j = 17; j < 24; j++)
		k[j] = -3e-41f * (float)(j - 16);
	skv_kv_store_row(&r.desc, r.base, 0, 7, k, v);

	void *kp = skv_kv_k_plane(r.base, &r.desc, 0), *vp = skv_kv_v_plane(r.base, &r.desc, 0);
	const float *ks = skv_kv_plane_scales(kp, &r.desc), *vs = skv_kv_plane_scales(vp, &r.desc);
	const int8_t *kc = kp;
	size_t stride = r.desc.slot_stride;
	cr_assert_eq(ks[7], 7.25f / 127.0f);
	cr_assert_eq(kc[5 * stride + 7], -127);
	cr_assert_eq(vs[stride + 7], 0.0f, "an all-zero head stores scale 0");
	for (uint32_t d = 0; d < 8; d++)
		cr_assert_eq(((const int8_t *)vp)[(8 + d) * stride + 7], 0);
	cr_assert_gt(ks[2 * stride + 7], 0.0f, "a subnormal head keeps a scale");
	int max_code = 0;
	for (uint32_t d = 0; d < 8; d++)
		max_code = abs(kc[(16 + d) * stride + 7]) > max_code ? abs(kc[(16 + d) * stride + 7])
								    : max_code;
	cr_assert_eq(max_code, 127, "a subnormal head still uses the whole code range");
	/* Every stored value is within half a step of its input; nothing else was written. */
	for (uint32_t g = 0; g < 3; g++)
		for (uint32_t d = 0; d < 8; d++) {
			size_t j = g * 8 + d;
			double sk = ks[g * stride + 7], sv = vs[g * stride + 7];
			cr_assert_leq(fabs(region_value(&r, kp, g, d, 7) - k[j]), sk / 2 * 1.0001 + 1e-45,
				      "k[%zu]", j);
			cr_assert_leq(fabs(region_value(&r, vp, g, d, 7) - v[j]), sv / 2 * 1.0001,
				      "v[%zu]", j);
			cr_assert_eq(kc[(g * 8 + d) * stride + 6], -1, "slot 6 untouched");
		}
	/* A NaN or an infinity poisons its head's scale, as it would poison float32 scores. */
	k[1] = NAN;
	v[9] = INFINITY;
	skv_kv_store_row(&r.desc, r.base, 0, 8, k, v);
	cr_assert(isnan(ks[8]));
	cr_assert(isnan(vs[stride + 8]));
	cr_assert_eq(vs[8], vs[7], "the other heads are as before");
	free(r.base);
}

Test(kv_store, f32_exact_and_f16_saturates)
{
	struct region a, h;
	region_open(&a, 1, 4, 2, 14, SKV_KV_DTYPE_F32);
	region_open(&h, 1, 4, 2, 14, SKV_KV_DTYPE_F16);
	float k[4] = { 0.1f, -1e6f, 3.0f, NAN }, v[4] = { 1e6f, -2.5f, 65504.0f, 1e-3f };
	skv_kv_store_row(&a.desc, a.base, 0, 3, k, v);
	skv_kv_store_row(&h.desc, h.base, 0, 3, k, v);
	void *ak = skv_kv_k_plane(a.base, &a.desc, 0), *av = skv_kv_v_plane(a.base, &a.desc, 0);
	void *hk = skv_kv_k_plane(h.base, &h.desc, 0), *hv = skv_kv_v_plane(h.base, &h.desc, 0);
	for (uint32_t d = 0; d < 3; d++) {
		cr_assert_eq(region_value(&a, ak, 0, d, 3), (double)k[d]);
		cr_assert_eq(region_value(&a, av, 0, d, 3), (double)v[d]);
	}
	cr_assert_eq(region_value(&h, hk, 0, 1, 3), -65504.0);
	cr_assert_eq(region_value(&h, hv, 0, 0, 3), 65504.0);
	cr_assert(isnan(region_value(&h, hk, 0, 3, 3)), "NaN stays NaN");
	free(a.base);
	free(h.base);
}

/* The step of a stream that has seen `seen` tokens (the last one its own), as
 * skv_kv_ring_append plans it. */
static struct skv_kv_step step_after(const struct skv_kv_desc *desc, uint64_t seen)
{
	struct skv_kv_ring ring = { .window_start = desc->sink_slots };
	struct skv_kv_step step;
	for (uint64_t i = 0; i < seen; i++)
		cr_assert_eq(skv_kv_ring_append(&ring, desc, 1, &step), 0);
	return step;
}

/* out = softmax(q . K / sqrt(hs)) V over the step's slots, in double, from the region. */
static void reference_attend(const struct region *r, const struct skv_attn_args *a,
			     double *out)
{
	const struct skv_kv_desc *desc = &r->desc;
	const struct skv_kv_step *st = a->step;
	uint32_t hs = desc->head_size, kv_mul = a->n_heads / desc->n_kv_heads;
	uint32_t n = st->sink_count + st->window_fill;
	uint32_t *slot = calloc(n, sizeof(*slot));
	int *sink = calloc(n, sizeof(*sink));
	double *s = calloc(n, sizeof(*s));
	for (uint32_t i = 0; i < st->sink_count; i++) {
		slot[i] = i;
		sink[i] = 1;
	}
	for (uint32_t i = 0; i < st->window_fill; i++) {
		uint32_t w = st->window_head - desc->sink_slots + i;
		slot[st->sink_count + i] = desc->sink_slots + w % desc->window_slots;
	}
	for (uint32_t h = 0; h < a->n_heads; h++) {
		uint32_t g = h / kv_mul;
		double max = -INFINITY, sum = 0.0;
		for (uint32_t i = 0; i < n; i++) {
			const float *q = (sink[i] ? a->q_sink : a->q_window) + (size_t)h * hs;
			double dot = 0.0;
			for (uint32_t d = 0; d < hs; d++)
				dot += q[d] * region_value(r, a->k_plane, g, d, slot[i]);
			s[i] = dot / sqrt((double)hs);
			max = s[i] > max ? s[i] : max;
		}
		for (uint32_t i = 0; i < n; i++)
			sum += s[i] = exp(s[i] - max);
		for (uint32_t d = 0; d < hs; d++) {
			double acc = 0.0;
			for (uint32_t i = 0; i < n; i++)
				acc += s[i] * region_value(r, a->v_plane, g, d, slot[i]);
			out[(size_t)h * hs + d] = acc / sum;
		}
	}
	free(slot);
	free(sink);
	free(s);
}

/* One ISA copy over every element type, head sizes 8 (the shipped model), 12 (the one-component
 * loop) and 64, grouped-query heads, windows partly filled, full, and wrapped; a window of 45
 * (single blocks of 16 slots, most of them partial) and one of 200 (runs of four full blocks,
 * scored together, between partial ones). */
static void kernels_match_reference_window(const char *isa, uint32_t window)
{
	static const uint32_t dtypes[] = { SKV_KV_DTYPE_F32, SKV_KV_DTYPE_F16, SKV_KV_DTYPE_Q8 };
	static const uint32_t head_sizes[] = { 8, 12, 64 };
	const uint64_t seen[] = { 3, 21, 4 + window, 4 + window + 30, 4 + window * 7 + 11 };
	const uint32_t n_kv_heads = 2, n_heads = 6, sinks = 4;
	for (size_t di = 0; di < 3; di++)
		for (size_t hi = 0; hi < 3; hi++) {
			uint32_t hs = head_sizes[hi], kv_dim = n_kv_heads * hs;
			struct region r;
			region_open(&r, n_kv_heads, hs, sinks, window, dtypes[di]);
			float *k = malloc(kv_dim * sizeof(float)), *v = malloc(kv_dim * sizeof(float));
			float *q = malloc(n_heads * hs * sizeof(float));
			float *qs = malloc(n_heads * hs * sizeof(float));
			float *out = malloc(n_heads * hs * sizeof(float));
			double *ref = malloc(n_heads * hs * sizeof(double));
			float *scores = aligned_alloc(64, SKV_ATTN_GROUP_HEADS * r.desc.slot_stride *
								    sizeof(float));
			uint64_t stored = 0;
			for (size_t si = 0; si < sizeof(seen) / sizeof(seen[0]); si++) {
				struct skv_kv_step step = step_after(&r.desc, seen[si]);
				/* Store the tokens up to this step in their slots, as the engine does. */
				for (; stored < seen[si]; stored++) {
					struct skv_kv_step at = step_after(&r.desc, stored + 1);
					for (uint32_t j = 0; j < kv_dim; j++) {
						k[j] = rnd(-2.0f, 2.0f);
						v[j] = rnd(-1.0f, 1.0f);
					}
					skv_kv_store_row(&r.desc, r.base, 0, at.slot, k, v);
				}
				for (uint32_t j = 0; j < n_heads * hs; j++) {
					q[j] = rnd(-1.5f, 1.5f);
					qs[j] = rnd(-1.5f, 1.5f);
				}
				struct skv_attn_args args = {
					.q_window = q,
					.q_sink = qs,
					.k_plane = skv_kv_k_plane(r.base, &r.desc, 0),
					.v_plane = skv_kv_v_plane(r.base, &r.desc, 0),
					.desc = &r.desc,
					.step = &step,
					.n_heads = n_heads,
					.scores = scores,
					.out = out,
				};
				int err = skv_attend_isa(isa, &args);
				if (err == -ENOTSUP)
					cr_skip_test("this CPU or build has no %s copy of the kernels",
						     isa);
				cr_assert_eq(err, 0);
				reference_attend(&r, &args, ref);
				for (uint32_t j = 0; j < n_heads * hs; j++)
					cr_assert_lt(fabs(out[j] - ref[j]), 2e-6 + 2e-6 * fabs(ref[j]),
						     "%s %s hs %u window %u after %llu tokens: out[%u] = "
						     "%g, reference %g",
						     isa, skv_kv_dtype_name(dtypes[di]), hs, window,
						     (unsigned long long)seen[si], j, out[j], ref[j]);
			}
			free(k);
			free(v);
			free(q);
			free(qs);
			free(out);
			free(ref);
			free(scores);
			free(r.base);
		}
}

static void kernels_match_reference(const char *isa)
{
	kernels_match_reference_window(isa, 45);
	kernels_match_reference_window(isa, 200);
}

Test(attention, v4_kernels_match_reference)
{
	kernels_match_reference("v4");
}

Test(attention, v3_kernels_match_reference)
{
	kernels_match_reference("v3");
}

Test(attention, base_kernels_match_reference)
{
	kernels_match_reference("base");
}

Test(attention, unknown_isa_is_refused)
{
	cr_assert_eq(skv_attend_isa("v9", NULL), -ENOTSUP);
}
