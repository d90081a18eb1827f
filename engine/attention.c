#include "attention.h"
#include "attention-pvt.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

/* RoPE, the scalar exp, the KV store (every dtype), and the choice of the attention kernels'
 * ISA copy (attention-kernels.c, compiled once per ISA). */

int skv_rope_init(struct skv_rope *rope, uint32_t head_size, float theta)
{
	return skv_rope_init_partial(rope, head_size, head_size, theta);
}

int skv_rope_init_partial(struct skv_rope *rope, uint32_t head_size, uint32_t rot_dims,
			  float theta)
{
	if (!head_size || head_size % 2 || head_size / 2 > SKV_ROPE_MAX_PAIRS || !(theta > 0) ||
	    !rot_dims || rot_dims % 2 || rot_dims > head_size)
		return -EINVAL;
	rope->head_size = head_size;
	rope->pairs = rot_dims / 2;
	/* Same float32 arithmetic as llama2.c, so short sequences rotate bit-for-bit alike. */
	for (uint32_t i = 0; i < rope->pairs; i++)
		rope->inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)rot_dims);
	return 0;
}

int skv_rope_scale_llama3(struct skv_rope *rope, float factor, float low_freq_factor,
			  float high_freq_factor, float original_context)
{
	if (!(factor >= 1.0f) || !(low_freq_factor > 0.0f) ||
	    !(high_freq_factor > low_freq_factor) || !(original_context > 0.0f))
		return -EINVAL;
	const double two_pi = 6.283185307179586;
	double low_wavelen = original_context / low_freq_factor;
	double high_wavelen = original_context / high_freq_factor;
	for (uint32_t i = 0; i < rope->pairs; i++) {
		double f = rope->inv_freq[i], wavelen = two_pi / f;
		if (wavelen < high_wavelen)
			continue;
		if (wavelen > low_wavelen) {
			f /= factor;
		} else {
			double smooth = (original_context / wavelen - low_freq_factor) /
					(high_freq_factor - low_freq_factor);
			f = (1.0 - smooth) * f / factor + smooth * f;
		}
		rope->inv_freq[i] = (float)f;
	}
	return 0;
}

void skv_rope_divide(struct skv_rope *rope, const float *factors)
{
	for (uint32_t i = 0; i < rope->pairs; i++)
		rope->inv_freq[i] = rope->inv_freq[i] / factors[i];
}

void skv_rope_rotate_neox(const struct skv_rope *rope, float *vec, uint32_t n_heads,
			  const float *cos_tab, const float *sin_tab)
{
	for (uint32_t h = 0; h < n_heads; h++) {
		float *head = vec + (size_t)h * rope->head_size;
		for (uint32_t i = 0; i < rope->pairs; i++) {
			float v0 = head[i], v1 = head[i + rope->pairs];
			head[i] = v0 * cos_tab[i] - v1 * sin_tab[i];
			head[i + rope->pairs] = v0 * sin_tab[i] + v1 * cos_tab[i];
		}
	}
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

void skv_alibi_slopes(float *slopes, uint32_t n_heads, float max_bias)
{
	uint32_t n_pow2 = 1;
	while (n_pow2 * 2 <= n_heads)
		n_pow2 *= 2;
	float m0 = powf(2.0f, -max_bias / (float)n_pow2);
	float m1 = powf(2.0f, -(max_bias / 2.0f) / (float)n_pow2);
	for (uint32_t h = 0; h < n_heads; h++)
		slopes[h] = h < n_pow2 ? powf(m0, (float)(h + 1))
				       : powf(m1, (float)(2 * (h - n_pow2) + 1));
}

float skv_expf(float x)
{
	x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
	float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
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

/* A float as half precision, saturated to its largest finite value (65504) rather than
 * infinity; NaN stays NaN. */
static _Float16 attention_half(float x)
{
	x = x > 65504.0f ? 65504.0f : x < -65504.0f ? -65504.0f : x;
	return (_Float16)x;
}

/* One head's head_size components (x[d], stored at codes[d * stride]) as int8 codes and their
 * scale. The codes are computed in double: 127 / amax overflows float for a subnormal amax. */
static float attention_quantize_head(const float *x, uint32_t head_size, int8_t *codes,
				     size_t stride)
{
	float amax = 0.0f;
	int finite = 1;
	for (uint32_t d = 0; d < head_size; d++) {
		float a = fabsf(x[d]);
		if (!isfinite(a))
			finite = 0;
		else if (a > amax)
			amax = a;
	}
	if (!finite || amax == 0.0f) {
		for (uint32_t d = 0; d < head_size; d++)
			codes[d * stride] = 0;
		return finite ? 0.0f : NAN;
	}
	double inv = SKV_KV_Q8_MAX / (double)amax;
	for (uint32_t d = 0; d < head_size; d++) {
		long c = lrint((double)x[d] * inv);
		c = c > SKV_KV_Q8_MAX ? SKV_KV_Q8_MAX : c < -SKV_KV_Q8_MAX ? -SKV_KV_Q8_MAX : c;
		codes[d * stride] = (int8_t)c;
	}
	return amax / (float)SKV_KV_Q8_MAX;
}

static void attention_store_plane(const struct skv_kv_desc *desc, void *plane, uint32_t slot,
				  const float *x)
{
	size_t stride = desc->slot_stride;
	uint32_t kv_dim = desc->n_kv_heads * desc->head_size;
	switch (desc->dtype) {
	case SKV_KV_DTYPE_F16: {
		_Float16 *p = (_Float16 *)plane + slot;
		for (uint32_t j = 0; j < kv_dim; j++)
			p[j * stride] = attention_half(x[j]);
		break;
	}
	case SKV_KV_DTYPE_Q8: {
		float *scales = skv_kv_plane_scales(plane, desc);
		for (uint32_t g = 0; g < desc->n_kv_heads; g++)
			scales[g * stride + slot] = attention_quantize_head(
				x + (size_t)g * desc->head_size, desc->head_size,
				(int8_t *)plane + (size_t)g * desc->head_size * stride + slot, stride);
		break;
	}
	default: {
		float *p = (float *)plane + slot;
		for (uint32_t j = 0; j < kv_dim; j++)
			p[j * stride] = x[j];
		break;
	}
	}
}

void skv_kv_store_row(const struct skv_kv_desc *desc, void *base, uint32_t layer, uint32_t slot,
		      const float *k, const float *v)
{
	attention_store_plane(desc, skv_kv_k_plane(base, desc, layer), slot, k);
	attention_store_plane(desc, skv_kv_v_plane(base, desc, layer), slot, v);
}

struct attn_kernels {
	void (*attend)(const struct skv_attn_args *args);
	void (*swiglu)(float *out, const float *gu, uint32_t rows, uint32_t hidden);
};

static struct attn_kernels attn_pick(void)
{
#ifdef SKV_ATTN_MULTI_ISA
	__builtin_cpu_init();
	if (__builtin_cpu_supports("x86-64-v4"))
		return (struct attn_kernels){ attn_attend_v4, attn_swiglu_v4 };
	if (__builtin_cpu_supports("x86-64-v3"))
		return (struct attn_kernels){ attn_attend_v3, attn_swiglu_v3 };
#endif
	return (struct attn_kernels){ attn_attend_base, attn_swiglu_base };
}

static pthread_once_t attn_once = PTHREAD_ONCE_INIT;
static struct attn_kernels attn_chosen;

static void attn_choose(void)
{
	attn_chosen = attn_pick();
}

void skv_attend(const struct skv_attn_args *args)
{
	pthread_once(&attn_once, attn_choose);
	attn_chosen.attend(args);
}

int skv_attend_isa(const char *isa, const struct skv_attn_args *args)
{
	if (!strcmp(isa, "base")) {
		attn_attend_base(args);
		return 0;
	}
#ifdef SKV_ATTN_MULTI_ISA
	__builtin_cpu_init();
	if (!strcmp(isa, "v4") && __builtin_cpu_supports("x86-64-v4")) {
		attn_attend_v4(args);
		return 0;
	}
	if (!strcmp(isa, "v3") && __builtin_cpu_supports("x86-64-v3")) {
		attn_attend_v3(args);
		return 0;
	}
#endif
	return -ENOTSUP;
}

void skv_swiglu(float *out, const float *gu, uint32_t rows, uint32_t hidden)
{
	pthread_once(&attn_once, attn_choose);
	attn_chosen.swiglu(out, gu, rows, hidden);
}
