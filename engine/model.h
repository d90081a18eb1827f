/* Model weights: llama2.c .bin (legacy 7 x int32 header) and GGUF v3 (architecture llama,
 * F32 tensors). Both are memory-mapped read-only; weight pointers point into the mapping, so
 * several processes that open the same file share one copy in the page cache.
 *
 * Thread safety: an opened model is immutable and may be shared by threads. */
#ifndef SKV_MODEL_H
#define SKV_MODEL_H

#include <stddef.h>
#include <stdint.h>

struct skv_gguf;

enum skv_model_format {
	SKV_MODEL_LLAMA2C = 1,
	SKV_MODEL_GGUF = 2,
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
};

/* All matrices are row-major [rows][cols] float32, out x in, as llama2.c stores them. */
struct skv_layer_weights {
	const float *attn_norm; /* [dim] */
	const float *wq;        /* [dim][dim] */
	const float *wk;        /* [kv_dim][dim] */
	const float *wv;        /* [kv_dim][dim] */
	const float *wo;        /* [dim][dim] */
	const float *ffn_norm;  /* [dim] */
	const float *w1;        /* [hidden_dim][dim]   gate */
	const float *w2;        /* [dim][hidden_dim]   down */
	const float *w3;        /* [hidden_dim][dim]   up */
};

struct skv_model {
	enum skv_model_format format;
	struct skv_model_config cfg;
	const float *token_embedding;      /* [vocab_size][dim] */
	struct skv_layer_weights *layers;  /* [n_layers] */
	const float *final_norm;           /* [dim] */
	const float *classifier;           /* [vocab_size][dim]; == token_embedding when tied */
	struct skv_gguf *gguf;             /* GGUF models: the parsed file (vocabulary lives here) */
	char *path;
	const void *map;                   /* llama2.c models: the read-only mapping */
	size_t map_size;
};

/* Open a model; the format is chosen by the file's magic ("GGUF" or else llama2.c).
 * Errors: -ENOENT and other -errno, -SKV_ETRUNCATED, -SKV_EFORMAT (bad header values,
 * wrong architecture), -SKV_EVERSION, -SKV_EDTYPE (non-F32 tensor), -SKV_ESHAPE (dimensions that
 * disagree with each other or with the file size). msg: one line naming the path and the fault. */
int skv_model_open(const char *path, struct skv_model **out, char *msg, size_t msg_len);
void skv_model_close(struct skv_model *m); /* accepts NULL */

#endif
