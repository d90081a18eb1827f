/* Linear layers on oneDNN's matmul primitive.
 *
 * y[M][out] = x[M][in] . W^T, with W the model's row-major [out][in] matrix used where it lies
 * (memory-mapped, shared by every process that maps the model; oneDNN reads it as a K x N
 * matrix in "ba" order, so no weight is copied or reordered). Optional fused post-ops:
 *   SKV_LINEAR_ADD     y += x . W^T               (residual connections: wo, w2)
 *   SKV_LINEAR_SWIGLU  y = silu(x . W^T) * aux    (the gate of the SwiGLU FFN, aux = x . W3^T)
 *
 * A primitive depends only on (in, out, kind, M), not on the weights, so the backend creates
 * one per shape and row count the first time it is needed and reuses it for every layer and
 * every later step; memory objects are created with it and re-pointed per call. Scratchpad is
 * user-managed, one buffer for all primitives. After warm-up a step allocates nothing.
 *
 * Thread safety: a backend and its linears belong to one thread. */
#ifndef SKV_LINEAR_H
#define SKV_LINEAR_H

#include <stddef.h>
#include <stdint.h>

enum skv_linear_kind {
	SKV_LINEAR_PLAIN = 0,
	SKV_LINEAR_ADD = 1,
	SKV_LINEAR_SWIGLU = 2,
};

struct skv_backend;

struct skv_linear {
	const float *weight; /* [out][in] */
	uint32_t in, out;
	uint32_t shape;      /* index of the (in, out, kind) shape in the backend */
	void *weight_mem;    /* dnnl_memory_t over weight */
};

/* max_rows bounds M for every call. threads: OpenMP threads oneDNN may use in this process
 * (0: leave the OpenMP default). On this project's tiny model one thread is fastest: a second
 * one costs more in synchronisation than it saves (see tools/README.md), so engines default
 * to 1 and get parallelism from more engines and batching.
 * Errors: -ENOMEM, -SKV_EBACKEND (msg says what oneDNN refused). */
int skv_backend_new(uint32_t max_rows, uint32_t threads, struct skv_backend **out, char *msg,
		    size_t msg_len);
void skv_backend_free(struct skv_backend *be); /* accepts NULL */

/* Describe W (no copy). Returns 0, -ENOMEM, -ENOSPC (too many distinct shapes),
 * -SKV_EBACKEND. */
int skv_linear_init(struct skv_backend *be, struct skv_linear *lin, const float *weight,
		    uint32_t in, uint32_t out, enum skv_linear_kind kind);
void skv_linear_fini(struct skv_linear *lin); /* accepts a zeroed struct */

/* Run on M rows (1 <= M <= max_rows). x: [M][in], y: [M][out] (read too for ADD),
 * aux: [M][out] for SWIGLU, else NULL. Returns 0, -EINVAL, -SKV_EBACKEND. */
int skv_linear_run(struct skv_backend *be, const struct skv_linear *lin, uint32_t rows,
		   const float *x, float *y, const float *aux);

/* Name of the oneDNN implementation chosen for this linear at M rows ("brg:avx512_core",
 * ...), for benchmarks and logs; creates the primitive if needed. NULL on failure. */
const char *skv_linear_impl(struct skv_backend *be, const struct skv_linear *lin, uint32_t rows);

#endif
