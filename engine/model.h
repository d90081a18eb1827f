/* Model weights: llama2.c .bin (legacy 7 x int32 header, float32) and GGUF v3 (architecture
 * llama; matrices in F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K or Q6_K, per tensor as the file
 * says; norm vectors F32). Both are memory-mapped read-only; weight pointers point into the mapping, so
 * several processes that open the same file share one copy in the page cache.
 *
 * Thread safety: an opened model is immutable and may be shared by threads. */
#ifndef SKV_MODEL_H
#define SKV_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "mapfile.h"
#include "quant.h"

struct skv_gguf;

enum skv_model_format {
	SKV_MODEL_LLAMA2C = 1,
	SKV_MODEL_GGUF = 2,
};

/* GGUF general.architecture values streamkv runs; anything else is refused at load. */
enum skv_model_arch {
	SKV_ARCH_LLAMA = 0,  /* Llama 2/3/3.1, Mistral, TinyLlama; llama2.c models */
	SKV_ARCH_QWEN2 = 1,  /* llama with biases on q, k, v and NEOX-order RoPE */
	SKV_ARCH_GPTNEOX = 2, /* Pythia: partial NEOX RoPE, LayerNorm, GELU, biases, parallel */
	SKV_ARCH_FALCON = 3,  /* parallel attention and MLP on one LayerNorm, multi-query, GELU */
	SKV_ARCH_MPT = 4,     /* ALiBi (no rotary), LayerNorm, GELU, fused qkv, biases optional */
};

enum skv_rope_scaling {
	SKV_ROPE_SCALING_NONE = 0,
	SKV_ROPE_SCALING_LINEAR = 1, /* frequencies / rope_factor */
	SKV_ROPE_SCALING_LLAMA3 = 2, /* Llama 3.1: skv_rope_scale_llama3 */
};

enum skv_rope_order {
	SKV_ROPE_INTERLEAVED = 0, /* pairs (2i, 2i + 1): llama2.c, GGUF llama */
	SKV_ROPE_NEOX = 1,        /* halves (i, i + rot / 2): qwen2, gptneox */
};

struct skv_model_config {
	int32_t dim;         /* model width */
	int32_t hidden_dim;  /* FFN inner width */
	int32_t n_layers;
	int32_t n_heads;     /* query heads */
	int32_t n_kv_heads;  /* key/value heads (grouped-query attention) */
	int32_t vocab_size;
	int32_t seq_len;     /* the length the model was trained at; for GGUF, llama.context_length
	                      * as the file states it (stories260K.gguf says 2048, trained at 512) */
	int32_t head_size;   /* dim / n_heads */
	int32_t kv_dim;      /* n_kv_heads * head_size */
	float norm_eps;      /* RMSNorm epsilon (1e-5 for llama2.c models) */
	float rope_theta;    /* RoPE base (10000 for llama2.c models) */
	int32_t arch;        /* enum skv_model_arch */
	int32_t rope_order;  /* enum skv_rope_order */
	int32_t rope_dims;   /* rotated components of a head (head_size unless partial) */
	int32_t rope_scaling; /* enum skv_rope_scaling, with the four values below */
	float rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_context;
	const float *rope_freqs; /* GGUF rope_freqs.weight [rope_dims / 2] or NULL */
	int32_t layer_norm;  /* 1: LayerNorm (mean and variance, weight and bias), else RMSNorm */
	int32_t gelu_ffn;    /* 1: up -> GELU -> down (no gate), else SwiGLU */
	int32_t parallel_residual; /* 1: x + attn(norm1(x)) + ffn(norm2(x)) */
	float alibi_max_bias; /* mpt: ALiBi's maximum bias (8 for MPT-7B): scores get
			       * -slope_h * distance (skv_alibi_slopes), keys are not rotated;
			       * 0: no ALiBi (RoPE) */
	float clamp_kqv;      /* mpt: q, k, v clamped to [-clamp_kqv, clamp_kqv] when > 0 */
};

/* Every matrix is [out][in] row-major as the file stores it (llama2.c's layout), in the file's
 * weight type (struct skv_qmat: type, shape, data in place in the read-only mapping). Norm
 * vectors are float32. */
struct skv_layer_weights {
	const float *attn_norm; /* [dim] */
	struct skv_qmat wq;     /* [dim][dim] */
	struct skv_qmat wk;     /* [kv_dim][dim] */
	struct skv_qmat wv;     /* [kv_dim][dim] */
	struct skv_qmat wo;     /* [dim][dim] */
	const float *ffn_norm;  /* [dim] */
	struct skv_qmat w1;     /* [hidden_dim][dim]   gate (.data NULL for a GELU FFN) */
	struct skv_qmat w2;     /* [dim][hidden_dim]   down */
	struct skv_qmat w3;     /* [hidden_dim][dim]   up */
	const float *bq, *bk, *bv; /* qwen2, gptneox: [dim], [kv_dim], [kv_dim]; NULL: none */
	const float *attn_norm_b, *ffn_norm_b; /* LayerNorm biases [dim] (gptneox) or NULL */
	const float *bo, *b_up, *b_down;       /* [dim], [hidden], [dim] or NULL */
};

struct skv_model {
	enum skv_model_format format;
	struct skv_model_config cfg;
	struct skv_qmat token_embedding;   /* [vocab_size][dim] */
	struct skv_layer_weights *layers;  /* [n_layers] */
	const float *final_norm;           /* [dim] */
	const float *final_norm_b;         /* [dim] LayerNorm bias or NULL */
	struct skv_qmat classifier;        /* [vocab_size][dim]; .data == token_embedding.data
					    * when tied */
	struct skv_gguf *gguf;             /* GGUF models: the parsed file (vocabulary lives here) */
	char *path;
	const void *map;                   /* llama2.c models: the read-only mapping */
	size_t map_size;
	enum skv_weights_mem weights_mem;  /* where the weights are: SKV_WEIGHTS_MAP or _HUGE */
};

/* Open a model; the format is chosen by the file's magic ("GGUF" or else llama2.c).
 * Errors: -ENOENT and other -errno, -SKV_ETRUNCATED, -SKV_EFORMAT (bad header values,
 * wrong architecture), -SKV_EVERSION, -SKV_EDTYPE (a weight type streamkv does not read, or a norm that is not F32), -SKV_ESHAPE (dimensions that
 * disagree with each other or with the file size). msg: one line naming the path and the fault. */
int skv_model_open(const char *path, struct skv_model **out, char *msg, size_t msg_len);
/* The same with the weights where mode says (mapfile.h: the file's mapping, or a private copy
 * on transparent huge pages; skv_model_open is SKV_WEIGHTS_MAP). SKV_WEIGHTS_AUTO copies only
 * a model with SKV_WEIGHTS_HUGE_MIN bytes or more of matrices read in place (not F32, which the
 * runner packs), when the kernel has transparent huge pages; m->weights_mem says which. */
int skv_model_open_mode(const char *path, enum skv_weights_mem mode, struct skv_model **out,
			char *msg, size_t msg_len);
void skv_model_close(struct skv_model *m); /* accepts NULL */

/* Row `row` of the token embedding as float32 into dst[dim] (dequantized per the file's type).
 * row must be < vocab_size. */
void skv_model_embedding_row(const struct skv_model *m, int32_t row, float *dst);

/* Bytes of all weights as stored (the resident size of a model used in place). */
uint64_t skv_model_weight_bytes(const struct skv_model *m);

/* "F32", "Q4_K+Q6_K", ...: the distinct matrix types of the model, for logs. */
void skv_model_types(const struct skv_model *m, char *buf, size_t len);

#endif
