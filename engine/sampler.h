/* Token sampling with llama2.c's semantics: greedy argmax at temperature 0; otherwise
 * softmax(logits / temperature), then either plain multinomial sampling (top_p <= 0 or >= 1)
 * or nucleus (top-p) sampling, driven by llama2.c's xorshift64* generator so that a given seed
 * draws the same sequence of random numbers as run.c.
 *
 * Thread safety: a sampler belongs to one stream. */
#ifndef SKV_SAMPLER_H
#define SKV_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

struct skv_sampler {
	int32_t vocab_size;
	float temperature; /* 0: greedy */
	float top_p;       /* nucleus mass in (0, 1); outside: plain sampling */
	uint64_t rng;      /* xorshift64* state, never 0 */
	struct skv_prob_index {
		float prob;
		int32_t index;
	} *candidates;     /* [vocab_size] scratch for top-p */
};

/* Errors: -EINVAL (temperature < 0, NaN, or vocab_size < 1), -ENOMEM. seed 0 is mapped to a
 * fixed non-zero value (xorshift has no zero state). */
int skv_sampler_init(struct skv_sampler *s, int32_t vocab_size, float temperature, float top_p,
		     uint64_t seed);
void skv_sampler_fini(struct skv_sampler *s);

/* Pick the next token. logits is modified (scaled and turned into probabilities). */
int32_t skv_sampler_sample(struct skv_sampler *s, float *logits);

/* argmax, lowest index on ties (as llama2.c). */
int32_t skv_argmax(const float *v, int32_t n);

/* -log softmax(logits)[target], in double: the negative log-likelihood perplexity sums. */
double skv_nll(const float *logits, int32_t n, int32_t target);

/* In-place softmax as llama2.c computes it (max-subtracted, float32). */
void skv_softmax(float *v, int32_t n);

#endif
