#include "attention.h"

#include <errno.h>
#include <math.h>
#include <string.h>

/* The hot loops below are written so that the compiler vectorises them along the slots (one
 * float per slot, contiguous in each K/V row). skv_attend is compiled for three ISA levels and
 * picked at load time, so the same binary runs on any x86-64 and uses AVX-512 where present. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
	!defined(__SANITIZE_ADDRESS__)
#define ATTN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTN_CLONES
#endif
#define ATTN_INLINE static inline __attribute__((always_inline))

int skv_rope_init(struct skv_rope *rope, uint32_t head_size, float theta)
{
	if (!head_size || head_size % 2 || head_size / 2 > SKV_ROPE_MAX_PAIRS || !(theta > 0))
		return -EINVAL;
	rope->head_size = head_size;
	rope->pairs = head_size / 2;
	/* Same float32 arithmetic as llama2.c, so short sequences rotate bit-for-bit alike. */
	for (uint32_t i = 0; i < rope->pairs; i++)
		rope->inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)head_size);
	return 0;
}

void skv_rope_angles(const struct skv_rope *rope, uint64_t pos, float *cos_out, float *sin_out)
{
	for (uint32_t i = 0; i < rope->pairs; i++) {
		double angle = (double)pos * (double)rope->inv_freq[i];
		cos_out[i] = (float)cos(angle);
		sin_out[i] = (float)sin(angle);
	}
}

void skv_rope_rotate(const struct skv_rope *rope, float *vec, uint32_t n_heads,
		     const float *cos_tab, const float *sin_tab)
{
	for (uint32_t h = 0; h < n_heads; h++) {
		float *head = vec + (size_t)h * rope->head_size;
		for (uint32_t i = 0; i < rope->pairs; i++) {
			float v0 = head[2 * i], v1 = head[2 * i + 1];
			head[2 * i] = v0 * cos_tab[i] - v1 * sin_tab[i];
			head[2 * i + 1] = v0 * sin_tab[i] + v1 * cos_tab[i];
		}
	}
}

/* exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2], exp(r) by a degree-6 polynomial
 * (Taylor coefficients; error below 2e-7 relative on that interval). Branch-free, so it
 * vectorises inside the softmax loop. */
ATTN_INLINE float attn_expf(float x)
{
	x = x < -87.0f ? -87.0f : x;
	x = x > 88.0f ? 88.0f : x;
	float k = __builtin_roundf(x * 1.44269504088896341f);
	float r = x - k * 0.693145751953125f;
	r = r - k * 1.42860682030941723212e-6f;
	float p = 1.0f / 720.0f;
	p = p * r + 1.0f / 120.0f;
	p = p * r + 1.0f / 24.0f;
	p = p * r + 1.0f / 6.0f;
	p = p * r + 0.5f;
	p = p * r + 1.0f;
	p = p * r + 1.0f;
	union {
		int32_t i;
		float f;
	} scale = { .i = ((int32_t)k + 127) << 23 };
	return p * scale.f;
}

float skv_expf(float x)
{
	return attn_expf(x);
}

struct attn_range {
	uint32_t lo, hi;
	const float *q;
};

/* s[t] = q . K[:, t] for t in [lo, hi); K rows are head_size rows of the plane. */
ATTN_INLINE void attn_scores(const float *restrict q, const float *restrict k_rows,
			     uint32_t stride, uint32_t head_size, uint32_t lo, uint32_t hi,
			     float *restrict s)
{
	const float *row = k_rows;
	float q0 = q[0];
#pragma omp simd
	for (uint32_t t = lo; t < hi; t++)
		s[t] = q0 * row[t];
	for (uint32_t d = 1; d < head_size; d++) {
		row = k_rows + (size_t)d * stride;
		float qd = q[d];
#pragma omp simd
		for (uint32_t t = lo; t < hi; t++)
			s[t] += qd * row[t];
	}
}

ATTN_CLONES
void skv_attend(const struct skv_attn_args *args)
{
	const struct skv_kv_desc *desc = args->desc;
	const struct skv_kv_step *step = args->step;
	uint32_t hs = desc->head_size, stride = desc->slot_stride;
	uint32_t kv_mul = args->n_heads / desc->n_kv_heads;
	uint32_t ring_end = desc->sink_slots + desc->window_slots;
	float inv_sqrt = 1.0f / sqrtf((float)hs);
	float *restrict s = args->scores;

	/* Valid slots of this step: the sinks, then the window from its head, wrapping once. */
	struct attn_range ranges[3];
	uint32_t n_ranges = 0;
	if (step->sink_count)
		ranges[n_ranges++] = (struct attn_range){ 0, step->sink_count, args->q_sink };
	if (step->window_fill) {
		uint32_t end = step->window_head + step->window_fill;
		uint32_t first_end = end < ring_end ? end : ring_end;
		ranges[n_ranges++] =
			(struct attn_range){ step->window_head, first_end, args->q_window };
		if (end > ring_end)
			ranges[n_ranges++] = (struct attn_range){
				desc->sink_slots, desc->sink_slots + (end - ring_end), args->q_window
			};
	}

	for (uint32_t h = 0; h < args->n_heads; h++) {
		uint32_t g = h / kv_mul;
		const float *k_rows = args->k_plane + (size_t)g * hs * stride;
		const float *v_rows = args->v_plane + (size_t)g * hs * stride;
		float *out = args->out + (size_t)h * hs;

		float max = -INFINITY;
		for (uint32_t r = 0; r < n_ranges; r++) {
			uint32_t lo = ranges[r].lo, hi = ranges[r].hi;
			attn_scores(ranges[r].q + (size_t)h * hs, k_rows, stride, hs, lo, hi, s);
#pragma omp simd reduction(max : max)
			for (uint32_t t = lo; t < hi; t++) {
				s[t] *= inv_sqrt;
				max = s[t] > max ? s[t] : max;
			}
		}
		float sum = 0.0f;
		for (uint32_t r = 0; r < n_ranges; r++) {
			uint32_t lo = ranges[r].lo, hi = ranges[r].hi;
#pragma omp simd reduction(+ : sum)
			for (uint32_t t = lo; t < hi; t++) {
				s[t] = attn_expf(s[t] - max);
				sum += s[t];
			}
		}
		float inv_sum = 1.0f / sum;
		for (uint32_t d = 0; d < hs; d++) {
			const float *v_row = v_rows + (size_t)d * stride;
			float acc = 0.0f;
			for (uint32_t r = 0; r < n_ranges; r++) {
				uint32_t lo = ranges[r].lo, hi = ranges[r].hi;
#pragma omp simd reduction(+ : acc)
				for (uint32_t t = lo; t < hi; t++)
					acc += s[t] * v_row[t];
			}
			out[d] = acc * inv_sum;
		}
	}
}
