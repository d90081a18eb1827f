/* A brute-force reference of the StreamingLLM forward pass, for tests only.
 *
 * It follows the paper's code literally: the cache keeps pre-RoPE keys in logical order (sinks,
 * then the window oldest first); at every step all cached keys are rotated again at their
 * position inside the cache, the query at its own (ALiBi, mpt: every key's bias is computed
 * again from the two in-cache positions, -slope * (query's - key's)), and attention is computed
 * in double precision. Nothing is shared with the engine's code but the model's weights. */
#ifndef SKV_REFMODEL_H
#define SKV_REFMODEL_H

#include <stdint.h>

struct skv_model;

struct ref_model {
	const struct skv_model *m;
	uint32_t sink_slots, window_slots;
	int allow_evict;     /* 0: like dense, fail when full */
	int abs_positions;   /* rotate by absolute text positions instead of cache positions */
	uint64_t next_pos;   /* absolute position of the next token */
	uint32_t n_sink, n_window;
	uint32_t window_head; /* index of the oldest window entry in the ring arrays */
	/* pre-RoPE keys and values: [layer][slot][kv_dim], slots = sinks then window ring */
	float *k, *v;
	uint64_t *abs_pos;   /* [slot] absolute position of each cached token */
};

void ref_init(struct ref_model *r, const struct skv_model *m, uint32_t sink_slots,
	      uint32_t window_slots, int allow_evict, int abs_positions);
void ref_free(struct ref_model *r);

/* Jump the absolute position of the next token (sinks keep theirs). */
void ref_skip_to(struct ref_model *r, uint64_t pos);

/* Feed one token; logits[vocab] out. Returns 0, or -1 when full and not allowed to evict. */
int ref_step(struct ref_model *r, int32_t token, float *logits);

#endif
