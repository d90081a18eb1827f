#include "attention.h"
#include "attention-pvt.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

/* RoPE, the scalar exp, and the choice of the attention kernels' ISA copy
 * (attention-kernels.c, compiled once per ISA). */

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

void skv_swiglu(float *out, const float *gu, uint32_t rows, uint32_t hidden)
{
	pthread_once(&attn_once, attn_choose);
	attn_chosen.swiglu(out, gu, rows, hidden);
}
