#include "linear.h"

#include <errno.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "skv-error.h"

#define LINEAR_MAX_SHAPES 32

/* One primitive for one (shape, M), with the memory objects it executes on. */
struct linear_plan {
	dnnl_primitive_t prim;
	dnnl_memory_t src, dst;
	const char *impl;
};

struct linear_shape {
	uint32_t in, out;
	enum skv_linear_kind kind;
	dnnl_memory_desc_t weight_md; /* K x N, "ab": the transposed [in][out] matrix */
	struct linear_plan *plans;    /* [max_rows + 1], created lazily, index M */
};

struct skv_backend {
	dnnl_engine_t engine;
	dnnl_stream_t stream;
	uint32_t max_rows;
	uint32_t n_shapes;
	struct linear_shape shapes[LINEAR_MAX_SHAPES];
	dnnl_memory_t scratch_mem;
	void *scratch;
	size_t scratch_bytes;
};

int skv_backend_new(uint32_t max_rows, uint32_t threads, struct skv_backend **out, char *msg,
		    size_t msg_len)
{
	if (!max_rows)
		return -EINVAL;
	if (threads)
		omp_set_num_threads((int)threads);
	struct skv_backend *be = calloc(1, sizeof(*be));
	if (!be)
		return -ENOMEM;
	be->max_rows = max_rows;
	dnnl_status_t st = dnnl_engine_create(&be->engine, dnnl_cpu, 0);
	if (st == dnnl_success)
		st = dnnl_stream_create(&be->stream, be->engine, dnnl_stream_default_flags);
	if (st != dnnl_success) {
		skv_backend_free(be);
		return skv_errorf(msg, msg_len, -SKV_EBACKEND,
				  "oneDNN: cannot create a CPU engine and stream (status %d)", st);
	}
	*out = be;
	return 0;
}

void skv_backend_free(struct skv_backend *be)
{
	if (!be)
		return;
	for (uint32_t s = 0; s < be->n_shapes; s++) {
		struct linear_shape *shape = &be->shapes[s];
		for (uint32_t m = 0; shape->plans && m <= be->max_rows; m++) {
			struct linear_plan *p = &shape->plans[m];
			if (p->prim)
				dnnl_primitive_destroy(p->prim);
			if (p->src)
				dnnl_memory_destroy(p->src);
			if (p->dst)
				dnnl_memory_destroy(p->dst);
		}
		free(shape->plans);
	}
	if (be->scratch_mem)
		dnnl_memory_destroy(be->scratch_mem);
	free(be->scratch);
	if (be->stream)
		dnnl_stream_destroy(be->stream);
	if (be->engine)
		dnnl_engine_destroy(be->engine);
	free(be);
}

static int linear_find_shape(struct skv_backend *be, uint32_t in, uint32_t out,
			     enum skv_linear_kind kind)
{
	for (uint32_t s = 0; s < be->n_shapes; s++)
		if (be->shapes[s].in == in && be->shapes[s].out == out && be->shapes[s].kind == kind)
			return (int)s;
	if (be->n_shapes == LINEAR_MAX_SHAPES)
		return -ENOSPC;
	struct linear_shape *shape = &be->shapes[be->n_shapes];
	shape->plans = calloc(be->max_rows + 1, sizeof(*shape->plans));
	if (!shape->plans)
		return -ENOMEM;
	dnnl_dims_t wdims = { in, out };
	if (dnnl_memory_desc_init_by_tag(&shape->weight_md, 2, wdims, dnnl_f32, dnnl_ab) !=
	    dnnl_success) {
		free(shape->plans);
		shape->plans = NULL;
		return -SKV_EBACKEND;
	}
	shape->in = in;
	shape->out = out;
	shape->kind = kind;
	return (int)be->n_shapes++;
}

int skv_linear_init(struct skv_backend *be, struct skv_linear *lin, const float *weight,
		    uint32_t in, uint32_t out, enum skv_linear_kind kind)
{
	memset(lin, 0, sizeof(*lin));
	if (!in || !out || !weight)
		return -EINVAL;
	int shape = linear_find_shape(be, in, out, kind);
	if (shape < 0)
		return shape;
	dnnl_memory_t mem;
	/* oneDNN never writes a weights argument; the cast only fits its handle type. */
	if (dnnl_memory_create(&mem, &be->shapes[shape].weight_md, be->engine,
			       (void *)(uintptr_t)weight) != dnnl_success)
		return -SKV_EBACKEND;
	lin->weight = weight;
	lin->in = in;
	lin->out = out;
	lin->shape = (uint32_t)shape;
	lin->weight_mem = mem;
	return 0;
}

void skv_linear_fini(struct skv_linear *lin)
{
	if (lin->weight_mem)
		dnnl_memory_destroy((dnnl_memory_t)lin->weight_mem);
	lin->weight_mem = NULL;
}

/* Grow the shared user scratchpad to fit a new primitive; every memory object that wraps it
 * is re-pointed at execution time, so growing is safe between steps. */
static int linear_reserve_scratch(struct skv_backend *be, const dnnl_memory_desc_t *md)
{
	size_t need = dnnl_memory_desc_get_size(md);
	if (need <= be->scratch_bytes)
		return 0;
	void *buf = NULL;
	if (posix_memalign(&buf, 64, need))
		return -ENOMEM;
	free(be->scratch);
	be->scratch = buf;
	be->scratch_bytes = need;
	if (be->scratch_mem)
		dnnl_memory_destroy(be->scratch_mem);
	be->scratch_mem = NULL;
	dnnl_memory_desc_t flat;
	dnnl_dims_t dims = { (dnnl_dim_t)need };
	if (dnnl_memory_desc_init_by_tag(&flat, 1, dims, dnnl_u8, dnnl_a) != dnnl_success ||
	    dnnl_memory_create(&be->scratch_mem, &flat, be->engine, buf) != dnnl_success)
		return -SKV_EBACKEND;
	return 0;
}

static int linear_make_plan(struct skv_backend *be, struct linear_shape *shape, uint32_t rows,
			    struct linear_plan *plan)
{
	dnnl_memory_desc_t src_md, dst_md;
	dnnl_dims_t sdims = { rows, shape->in }, ddims = { rows, shape->out };
	dnnl_primitive_attr_t attr = NULL;
	dnnl_post_ops_t ops = NULL;
	dnnl_primitive_desc_t pd = NULL;
	dnnl_matmul_desc_t desc;
	int err = -SKV_EBACKEND;

	if (dnnl_memory_desc_init_by_tag(&src_md, 2, sdims, dnnl_f32, dnnl_ab) != dnnl_success ||
	    dnnl_memory_desc_init_by_tag(&dst_md, 2, ddims, dnnl_f32, dnnl_ab) != dnnl_success ||
	    dnnl_matmul_desc_init(&desc, &src_md, &shape->weight_md, NULL, &dst_md) !=
		    dnnl_success)
		goto out;
	if (dnnl_primitive_attr_create(&attr) != dnnl_success ||
	    dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user) !=
		    dnnl_success)
		goto out;
	if (shape->kind != SKV_LINEAR_PLAIN) {
		if (dnnl_post_ops_create(&ops) != dnnl_success)
			goto out;
		if (shape->kind == SKV_LINEAR_ADD &&
		    dnnl_post_ops_append_sum(ops, 1.0f) != dnnl_success)
			goto out;
		if (dnnl_primitive_attr_set_post_ops(attr, ops) != dnnl_success)
			goto out;
	}
	if (dnnl_primitive_desc_create(&pd, &desc, attr, be->engine, NULL) != dnnl_success ||
	    dnnl_primitive_create(&plan->prim, pd) != dnnl_success)
		goto out;
	const dnnl_memory_desc_t *scratch_md =
		dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
	if (scratch_md && (err = linear_reserve_scratch(be, scratch_md)) < 0)
		goto out;
	err = -SKV_EBACKEND;
	/* Handles are set before each execution; creating with NULL allocates nothing. */
	if (dnnl_memory_create(&plan->src, &src_md, be->engine, DNNL_MEMORY_NONE) != dnnl_success ||
	    dnnl_memory_create(&plan->dst, &dst_md, be->engine, DNNL_MEMORY_NONE) != dnnl_success)
		goto out;
	err = 0;
out:
	/* The name is owned by a descriptor: take it from the primitive's own, which lives as
	 * long as the primitive, not from pd, destroyed below. */
	if (!err) {
		const_dnnl_primitive_desc_t own;
		plan->impl = "unknown";
		if (dnnl_primitive_get_primitive_desc(plan->prim, &own) == dnnl_success)
			dnnl_primitive_desc_query(own, dnnl_query_impl_info_str, 0, &plan->impl);
	}
	if (pd)
		dnnl_primitive_desc_destroy(pd);
	if (ops)
		dnnl_post_ops_destroy(ops);
	if (attr)
		dnnl_primitive_attr_destroy(attr);
	if (err) {
		if (plan->prim)
			dnnl_primitive_destroy(plan->prim);
		if (plan->src)
			dnnl_memory_destroy(plan->src);
		if (plan->dst)
			dnnl_memory_destroy(plan->dst);
		memset(plan, 0, sizeof(*plan));
	}
	return err;
}

static struct linear_plan *linear_plan(struct skv_backend *be, const struct skv_linear *lin,
				       uint32_t rows, int *err)
{
	struct linear_shape *shape = &be->shapes[lin->shape];
	struct linear_plan *plan = &shape->plans[rows];
	if (!plan->prim && (*err = linear_make_plan(be, shape, rows, plan)) < 0)
		return NULL;
	return plan;
}

int skv_linear_run(struct skv_backend *be, const struct skv_linear *lin, uint32_t rows,
		   const float *x, float *y)
{
	if (!rows || rows > be->max_rows || lin->shape >= be->n_shapes)
		return -EINVAL;
	int err = 0;
	struct linear_plan *plan = linear_plan(be, lin, rows, &err);
	if (!plan)
		return err;

	dnnl_exec_arg_t args[4] = {
		{ DNNL_ARG_SRC, plan->src },
		{ DNNL_ARG_WEIGHTS, (dnnl_memory_t)lin->weight_mem },
		{ DNNL_ARG_DST, plan->dst },
		{ DNNL_ARG_SCRATCHPAD, be->scratch_mem },
	};
	int n_args = be->scratch_mem ? 4 : 3;
	if (dnnl_memory_set_data_handle(plan->src, (void *)(uintptr_t)x) != dnnl_success ||
	    dnnl_memory_set_data_handle(plan->dst, y) != dnnl_success)
		return -SKV_EBACKEND;
	if (dnnl_primitive_execute(plan->prim, be->stream, n_args, args) != dnnl_success ||
	    dnnl_stream_wait(be->stream) != dnnl_success)
		return -SKV_EBACKEND;
	return 0;
}

const char *skv_linear_impl(struct skv_backend *be, const struct skv_linear *lin, uint32_t rows)
{
	if (!rows || rows > be->max_rows || lin->shape >= be->n_shapes)
		return NULL;
	int err = 0;
	struct linear_plan *plan = linear_plan(be, lin, rows, &err);
	return plan ? plan->impl : NULL;
}
