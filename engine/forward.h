/* The forward pass: Llama 2 (RMSNorm, RoPE on interleaved pairs, grouped-query attention,
 * SwiGLU) over a batch of rows that may belong to several streams.
 *
 * A step takes items, each a run of consecutive tokens of one stream. All rows of the step go
 * through every linear layer together (one matrix product per group of weights per layer, M = all rows);
 * attention runs per row, in each stream's token order, over that stream's KV slots where they
 * lie: a row's K/V are appended (evicting the oldest window token when the window is full and
 * the stream allows it) right before the row attends, so a run of tokens fed in one step gives
 * the same result as feeding them one per step, and a stream's result does not depend on which
 * other streams share the step.
 *
 * Scratch buffers are sized once for max_rows; a step allocates nothing (the score buffer grows
 * only when a stream with more slots than any before it appears).
 *
 * Thread safety: a runner belongs to one thread; the model it reads may be shared. */
#ifndef SKV_FORWARD_H
#define SKV_FORWARD_H

#include <stddef.h>
#include <stdint.h>

#include "kv-layout.h"

struct skv_model;
struct skv_model_config;
struct skv_runner;

/* One stream's KV state as the forward pass sees it. */
struct skv_seq {
	struct skv_kv_desc desc;   /* private, validated copy of the region's descriptor */
	void *kv_base;             /* start of the region (its descriptor is stored there too) */
	struct skv_kv_ring *ring;  /* advanced by skv_forward; may live in shared memory */
	uint32_t allow_evict;      /* evict the oldest window token when the window is full */
	uint32_t abs_positions;    /* ablation: sinks see the query at its absolute position,
				    * not at its position inside the cache */
};

struct skv_fwd_item {
	struct skv_seq *seq;
	const int32_t *tokens;     /* [n_tokens] ids, each < vocab_size */
	uint32_t n_tokens;
	uint32_t logits_all;       /* 1: logits is [n_tokens][vocab]; 0: logits of the last row */
	float *logits;             /* NULL: no logits wanted for this item */
};

/* The F32 weights packed for the panel products (pmat.h): every F32 matrix in panels of 64
 * output columns, k-major, q|k|v and gate|up fused side by side when all of a group are F32. Block-format weights (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) are not packed:
 * they are used in place from the model's mapping. The layout depends only on the model's
 * shape and types, so a packed buffer can be built once and shared (the daemon puts it in a
 * sealed memfd for all engines). skv_pack_floats may be 0 (a fully quantized model). */
size_t skv_pack_floats(const struct skv_model *m);
void skv_pack_weights(const struct skv_model *m, float *dst); /* dst: skv_pack_floats floats */

/* threads: OpenMP threads of the matrix products (panels and qmatmul) and attention (1 is the engine's
 * default, fastest for small models; a big model needs several cores to reach the memory bus;
 * 0 means 1).
 * Errors: -ENOMEM, -SKV_ESHAPE, -SKV_EFORMAT, -EINVAL (msg says which). */
int skv_runner_new(const struct skv_model *model, uint32_t max_rows, uint32_t threads,
		   struct skv_runner **out, char *msg, size_t msg_len);
/* The same over weights packed by someone else (skv_pack_weights into shared memory), read-only
 * and not freed with the runner: N engine processes share one copy. */
int skv_runner_new_packed(const struct skv_model *model, const float *packed, uint32_t max_rows,
			  uint32_t threads, struct skv_runner **out, char *msg, size_t msg_len);
void skv_runner_free(struct skv_runner *r); /* accepts NULL */

const struct skv_model_config *skv_runner_config(const struct skv_runner *r);
uint32_t skv_runner_max_rows(const struct skv_runner *r);

/* Run one step. The rows of all items must total at most max_rows. Returns 0; -EINVAL for a
 * token id out of range, too many rows, or a sequence whose shape does not match the model;
 * -SKV_ECACHEFULL if a stream that may not evict runs out of slots (checked before any work:
 * no ring is changed then); -ENOMEM; -SKV_EBACKEND. */
int skv_forward(struct skv_runner *r, struct skv_fwd_item *items, uint32_t n_items);

/* The kernels the matrix products run on ("avx512", "avx2", "base"; the F32 panels' or, for a
 * model with block-format weights, qmatmul's), for benchmarks and logs. */
const char *skv_runner_impl(struct skv_runner *r, uint32_t rows);

#endif
