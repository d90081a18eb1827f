/* The plain-C baseline of skv-bench-engine: llama2.c's forward pass as plain loops (matvec,
 * dense cache, scalar attention) over the same weights. Compiled on its own with
 * -Ofast -march=native (tools/meson.build), the strongest flags a plain C build would use, so
 * that the engine is compared with the best plain C, not with a handicapped one. */
#ifndef SKV_BENCH_PLAIN_H
#define SKV_BENCH_PLAIN_H

#include <stdint.h>

struct skv_model;

struct naive {
	const struct skv_model *m;
	int cache_len;
	float *x, *xb, *xb2, *q, *hb, *hb2, *att, *logits;
	float *key_cache, *value_cache; /* [layer][cache_len][kv_dim] */
};

/* Returns 0 or -ENOMEM. */
int naive_init(struct naive *nv, const struct skv_model *m, int cache_len);
void naive_free(struct naive *nv);
/* One token at position pos (< cache_len); logits in nv->logits. */
void naive_forward(struct naive *nv, int32_t token, int pos);

#endif
