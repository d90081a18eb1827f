/* Linear layers on oneDNN's matmul primitive: the engine's F32 path until the panel kernels
 * (pmat.h) measured faster; now built into skv-bench-qmat only (tools/meson.build), which
 * measures the panels against it.
 *
 * y[M][out] = x[M][in] . Wt, with Wt the weight stored transposed, [in][out] row-major
 * (oneDNN's "ab" K x N layout). The model files store W as [out][in]; read in place as "ba",
 * oneDNN's M = 1 kernels run at half the speed they reach on "ab" (measured in tools/README.md),
 * so the runner packs every weight once into this layout (forward.c) and fuses the matrices
 * that share an input (q|k|v, gate|up). Optional fused post-op:
 *   SKV_LINEAR_ADD     y += x . Wt               (residual connections: wo, w2)
 *
 * A primitive depends only on (in, out, kind, M), not on the weights, so the backend creates
 * one per shape and row count the first time it is needed and reuses it for every layer and
 * every later step; memory objects are created with it and re-pointed per call. Scratchpad is
 * user-managed, one buffer for all primitives. After warm-up our code allocates nothing per
 * step (oneDNN 2.6's C API still allocates its small execution context inside each call).
 *
 * Thread safety: a backend and its linears belong to one thread. */
#ifndef SKV_LINEAR_H
#define SKV_LINEAR_H

#include <stddef.h>
#include <stdint.h>

enum skv_linear_kind {
	SKV_LINEAR_PLAIN = 0,
	SKV_LINEAR_ADD = 1,
};

struct skv_backend;

struct skv_linear {
	const float *weight; /* [in][out], the transposed weight */
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

/* Describe Wt (no copy: it must outlive the linear). Returns 0, -ENOMEM, -ENOSPC (too many distinct shapes),
 * -SKV_EBACKEND. */
int skv_linear_init(struct skv_backend *be, struct skv_linear *lin, const float *weight,
		    uint32_t in, uint32_t out, enum skv_linear_kind kind);
void skv_linear_fini(struct skv_linear *lin); /* accepts a zeroed struct */

/* Run on M rows (1 <= M <= max_rows). x: [M][in], y: [M][out] (read too for ADD).
 * Returns 0, -EINVAL, -SKV_EBACKEND. */
int skv_linear_run(struct skv_backend *be, const struct skv_linear *lin, uint32_t rows,
		   const float *x, float *y);

/* Name of the oneDNN implementation chosen for this linear at M rows ("brg:avx512_core",
 * ...), for benchmarks and logs; creates the primitive if needed. NULL on failure. */
const char *skv_linear_impl(struct skv_backend *be, const struct skv_linear *lin, uint32_t rows);

#endif
