#include "sampler.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

int skv_sampler_init(struct skv_sampler *s, int32_t vocab_size, float temperature, float top_p,
		     uint64_t seed)
{
	if (vocab_size < 1 || !(temperature >= 0.0f) || isnan(top_p))
		return -EINVAL;
	s->vocab_size = vocab_size;
	s->temperature = temperature;
	s->top_p = top_p;
	s->rng = seed ? seed : 0x9e3779b97f4a7c15ull;
	s->candidates = calloc((size_t)vocab_size, sizeof(*s->candidates));
	return s->candidates ? 0 : -ENOMEM;
}

void skv_sampler_fini(struct skv_sampler *s)
{
	free(s->candidates);
	s->candidates = NULL;
}

/* xorshift64*, as llama2.c's random_u32: the top 32 bits of the multiplied state. */
static uint32_t sampler_u32(uint64_t *state)
{
	*state ^= *state >> 12;
	*state ^= *state << 25;
	*state ^= *state >> 27;
	return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float sampler_f32(uint64_t *state)
{
	return (float)(sampler_u32(state) >> 8) / 16777216.0f;
}

int32_t skv_argmax(const float *v, int32_t n)
{
	int32_t best = 0;
	for (int32_t i = 1; i < n; i++)
		if (v[i] > v[best])
			best = i;
	return best;
}

void skv_softmax(float *v, int32_t n)
{
	float max = v[0];
	for (int32_t i = 1; i < n; i++)
		max = v[i] > max ? v[i] : max;
	float sum = 0.0f;
	for (int32_t i = 0; i < n; i++) {
		v[i] = expf(v[i] - max);
		sum += v[i];
	}
	for (int32_t i = 0; i < n; i++)
		v[i] /= sum;
}

static int32_t sampler_mult(const float *probs, int32_t n, float coin)
{
	float cdf = 0.0f;
	for (int32_t i = 0; i < n; i++) {
		cdf += probs[i];
		if (coin < cdf)
			return i;
	}
	return n - 1; /* rounding left the cdf just below 1 */
}

static int sampler_cmp_desc(const void *a, const void *b)
{
	const struct skv_prob_index *x = a, *y = b;
	if (x->prob > y->prob)
		return -1;
	if (x->prob < y->prob)
		return 1;
	return 0;
}

/* Nucleus sampling: the smallest set of most likely tokens whose mass exceeds top_p. Tokens
 * below (1 - top_p) / (n - 1) cannot be in it and are dropped before sorting, as llama2.c. */
static int32_t sampler_topp(struct skv_sampler *s, const float *probs, float coin)
{
	int32_t n = s->vocab_size, n0 = 0;
	const float cutoff = (1.0f - s->top_p) / (float)(n - 1 > 0 ? n - 1 : 1);
	for (int32_t i = 0; i < n; i++)
		if (probs[i] >= cutoff)
			s->candidates[n0++] = (struct skv_prob_index){ probs[i], i };
	qsort(s->candidates, (size_t)n0, sizeof(*s->candidates), sampler_cmp_desc);

	float cum = 0.0f;
	int32_t last = n0 - 1;
	for (int32_t i = 0; i < n0; i++) {
		cum += s->candidates[i].prob;
		if (cum > s->top_p) {
			last = i;
			break;
		}
	}
	float r = coin * cum;
	float cdf = 0.0f;
	for (int32_t i = 0; i <= last; i++) {
		cdf += s->candidates[i].prob;
		if (r < cdf)
			return s->candidates[i].index;
	}
	return s->candidates[last].index;
}

int32_t skv_sampler_sample(struct skv_sampler *s, float *logits)
{
	if (s->temperature == 0.0f)
		return skv_argmax(logits, s->vocab_size);
	for (int32_t i = 0; i < s->vocab_size; i++)
		logits[i] /= s->temperature;
	skv_softmax(logits, s->vocab_size);
	float coin = sampler_f32(&s->rng);
	if (s->top_p <= 0.0f || s->top_p >= 1.0f)
		return sampler_mult(logits, s->vocab_size, coin);
	return sampler_topp(s, logits, coin);
}

double skv_nll(const float *logits, int32_t n, int32_t target)
{
	float max = logits[0];
	for (int32_t i = 1; i < n; i++)
		max = logits[i] > max ? logits[i] : max;
	double sum = 0.0;
	for (int32_t i = 0; i < n; i++)
		sum += exp((double)logits[i] - max);
	return log(sum) + max - (double)logits[target];
}
