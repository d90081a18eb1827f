#include "forward.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "model.h"
#include "pmat.h"
#include "qmatmul.h"
#include "skv-error.h"

/* Matrices that share one input and whose outputs lie side by side in one output row: q|k|v,
 * wo, gate|up, w2, the classifier. All F32: one panel product (pmat.h) over their packed,
 * fused panels. Otherwise the block-format members run in place through qmatmul (one call,
 * the input quantized once), and F32 members of such a mixed group each through their own
 * panels, straight into their columns of the output. */
#define FORWARD_GROUP_MAX 3
#define FORWARD_GROUPS_PER_LAYER 4

struct forward_group {
	uint32_t n;                                  /* members */
	uint32_t in, out;                            /* input width, total output width */
	uint32_t add;                                /* y += W x (residual adds: wo, w2) */
	uint32_t fused;                              /* every member F32 */
	uint32_t col[FORWARD_GROUP_MAX];             /* each member's first output column */
	const struct skv_qmat *w[FORWARD_GROUP_MAX]; /* as the model stores them */
	const float *panels[FORWARD_GROUP_MAX];      /* fused: [0] for all; else per F32 member */
};

struct forward_layer {
	struct forward_group qkv; /* [dim] -> [dim + 2 kv_dim]  q | k | v */
	struct forward_group wo;  /* [dim] -> [dim]             adds into the residual */
	struct forward_group w13; /* [dim] -> [2 hidden]        gate | up */
	struct forward_group w2;  /* [hidden] -> [dim]          adds into the residual */
};

/* Per-row plan of a step: where its key goes, which positions it is rotated at. */
struct forward_row {
	struct skv_seq *seq;
	struct skv_kv_step step;
	uint64_t sink_pos;    /* position of the query as the sinks see it */
	int32_t token;
};

struct skv_runner {
	const struct skv_model *model;
	struct skv_model_config cfg;
	struct skv_pctx *pctx;        /* F32 panel products */
	struct skv_rope rope;
	uint32_t max_rows;
	struct forward_layer *layers; /* [n_layers] */
	struct forward_group classifier; /* [dim] -> [vocab] */
	struct skv_qctx *qctx;        /* block-format matmuls (NULL for an all-F32 model) */
	uint32_t threads;
	float *packed;                /* the F32 weights in panels, fused (skv_pack_weights) */
	int owns_packed;              /* 0: a shared read-only mapping someone else made */
	uint32_t qkv_dim;             /* dim + 2 kv_dim: row stride of qkv */

	/* Scratch, like llama2.c's RunState but [max_rows] deep, 64-byte aligned. */
	float *x;        /* [max_rows][dim]     residual stream */
	float *xb;       /* [max_rows][dim]     normed input of a block */
	float *qkv;      /* [max_rows][dim + 2 kv_dim]  query | key | value of each row; the
			  * key is rotated and copied into its slot, the query rotated in place */
	float *att;      /* [max_rows][dim]     attention output */
	float *hb;       /* [max_rows][hidden]  SwiGLU output */
	float *gu;       /* [max_rows][2 hidden] gate | up projections */
	float *q_sink;   /* [threads][dim]      a row's query rotated for the sinks */
	float *cos_abs;  /* [max_rows][pairs]   rotation at the absolute position */
	float *sin_abs;
	float *cos_sink; /* [max_rows][pairs]   rotation at the position the sinks see */
	float *sin_sink;
	struct forward_row *rows;       /* [max_rows] */
	struct skv_kv_ring *ring_after; /* [max_rows] ring states to commit, one per item */
	float *scores;   /* [threads][scores_ld] attention scores of the heads of one
			  * KV head, SKV_ATTN_GROUP_HEADS * scores_cap floats per thread, each
			  * thread's 64-byte aligned */
	float *cls_out;  /* [max_rows][vocab] logits of a step's rows, made at first use */
	uint32_t scores_cap;
	size_t scores_ld;
	uint32_t *run_start; /* [max_rows + 1] first row of each stream's run (threaded attention) */
	float *alibi_slopes; /* [n_heads] ALiBi's per-head slopes (mpt), NULL: RoPE */
};

/* Describe group g (0..3) of layer l, or the classifier (l == n_layers). */
static void forward_group_describe(const struct skv_model *m, uint32_t l, uint32_t g,
				   struct forward_group *out)
{
	const struct skv_model_config *c = &m->cfg;
	memset(out, 0, sizeof(*out));
	if (l == (uint32_t)c->n_layers) {
		out->n = 1;
		out->w[0] = &m->classifier;
	} else {
		const struct skv_layer_weights *w = &m->layers[l];
		switch (g) {
		case 0: out->n = 3; out->w[0] = &w->wq; out->w[1] = &w->wk; out->w[2] = &w->wv; break;
		case 1: out->n = 1; out->w[0] = &w->wo; out->add = 1; break;
		case 2:
			if (w->w1.data) {
				out->n = 2;
				out->w[0] = &w->w1;
				out->w[1] = &w->w3;
			} else { /* GELU FFN: up only */
				out->n = 1;
				out->w[0] = &w->w3;
			}
			break;
		default: out->n = 1; out->w[0] = &w->w2; out->add = 1; break;
		}
	}
	out->in = out->w[0]->cols;
	out->fused = 1;
	for (uint32_t i = 0; i < out->n; i++) {
		out->col[i] = out->out;
		out->out += out->w[i]->rows;
		out->fused &= out->w[i]->type == SKV_WTYPE_F32;
	}
}

static uint32_t forward_n_groups(const struct skv_model_config *c)
{
	return (uint32_t)c->n_layers * FORWARD_GROUPS_PER_LAYER + 1;
}

static void forward_group_at(const struct skv_model *m, uint32_t index, struct forward_group *out)
{
	forward_group_describe(m, index / FORWARD_GROUPS_PER_LAYER,
			       index % FORWARD_GROUPS_PER_LAYER, out);
}

/* Floats the group takes in the packed buffer: the panels of its fused in x out matrix, or of
 * each F32 member of a mixed group; nothing for block-format members (used in place). */
static size_t forward_group_floats(const struct forward_group *g, uint32_t member)
{
	if (g->fused)
		return member == 0 ? skv_pmat_floats(g->in, g->out) : 0;
	return g->w[member]->type == SKV_WTYPE_F32 ? skv_pmat_floats(g->in, g->w[member]->rows)
						   : 0;
}

size_t skv_pack_floats(const struct skv_model *m)
{
	size_t floats = 0;
	struct forward_group g;
	for (uint32_t i = 0; i < forward_n_groups(&m->cfg); i++) {
		forward_group_at(m, i, &g);
		for (uint32_t j = 0; j < g.n; j++)
			floats += forward_group_floats(&g, j);
	}
	return floats;
}

void skv_pack_weights(const struct skv_model *m, float *dst)
{
	struct forward_group g;
	for (uint32_t i = 0; i < forward_n_groups(&m->cfg); i++) {
		forward_group_at(m, i, &g);
		for (uint32_t j = 0; j < g.n; j++) {
			const float *w = skv_qmat_f32(g.w[j]);
			if (!w)
				continue;
			if (g.fused)
				skv_pmat_pack(dst, g.in, g.out, g.col[j], w, g.w[j]->rows);
			else
				skv_pmat_pack(dst, g.in, g.w[j]->rows, 0, w, g.w[j]->rows);
			if (!g.fused || j == g.n - 1)
				dst += forward_group_floats(&g, g.fused ? 0 : j);
		}
	}
}

static void *forward_alloc(size_t n_floats)
{
	void *p = NULL;
	size_t bytes = (n_floats * sizeof(float) + 63) / 64 * 64;
	if (posix_memalign(&p, 64, bytes ? bytes : 64))
		return NULL;
	memset(p, 0, bytes);
	return p;
}

/* Describe a group's matmuls: where its F32 panels are (advancing *packed), a check of each
 * block-format member. */
static int forward_group_init(struct forward_group *g, const float **packed)
{
	int err;
	if (g->fused) {
		g->panels[0] = *packed;
		*packed += forward_group_floats(g, 0);
		return 0;
	}
	for (uint32_t i = 0; i < g->n; i++) {
		const struct skv_qmat *w = g->w[i];
		if (w->type != SKV_WTYPE_F32) {
			if ((err = skv_qmat_check(w)) < 0)
				return err;
			continue;
		}
		g->panels[i] = *packed;
		*packed += forward_group_floats(g, i);
	}
	return 0;
}

void skv_runner_free(struct skv_runner *r)
{
	if (!r)
		return;
	free(r->layers);
	skv_pctx_free(r->pctx);
	skv_qctx_free(r->qctx);
	free(r->x);
	free(r->xb);
	free(r->qkv);
	free(r->att);
	free(r->hb);
	free(r->gu);
	if (r->owns_packed)
		free(r->packed);
	free(r->q_sink);
	free(r->cos_abs);
	free(r->sin_abs);
	free(r->cos_sink);
	free(r->sin_sink);
	free(r->rows);
	free(r->ring_after);
	free(r->scores);
	free(r->run_start);
	free(r->alibi_slopes);
	free(r->cls_out);
	free(r);
}

int skv_runner_new(const struct skv_model *model, uint32_t max_rows, uint32_t threads,
		   struct skv_runner **out, char *msg, size_t msg_len)
{
	return skv_runner_new_packed(model, NULL, max_rows, threads, out, msg, msg_len);
}

int skv_runner_new_packed(const struct skv_model *model, const float *packed, uint32_t max_rows,
			  uint32_t threads, struct skv_runner **out, char *msg, size_t msg_len)
{
	const struct skv_model_config *c = &model->cfg;
	struct skv_runner *r = calloc(1, sizeof(*r));
	int err = -ENOMEM;

	if (!r)
		return -ENOMEM;
	r->model = model;
	r->cfg = *c;
	r->max_rows = max_rows;
	if (skv_rope_init_partial(&r->rope, (uint32_t)c->head_size, (uint32_t)c->rope_dims,
				  c->rope_theta) < 0) {
		err = skv_errorf(msg, msg_len, -SKV_ESHAPE, "%s: head size %d is not supported",
				 model->path, c->head_size);
		goto fail;
	}
	if (c->rope_freqs)
		skv_rope_divide(&r->rope, c->rope_freqs);
	if (c->rope_scaling == SKV_ROPE_SCALING_LINEAR) {
		for (uint32_t i = 0; i < r->rope.pairs; i++)
			r->rope.inv_freq[i] /= c->rope_factor;
	} else if (c->rope_scaling == SKV_ROPE_SCALING_LLAMA3 &&
		   skv_rope_scale_llama3(&r->rope, c->rope_factor, c->rope_low_freq_factor,
					 c->rope_high_freq_factor, c->rope_original_context) < 0) {
		err = skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: bad llama3 rope scaling factors",
				 model->path);
		goto fail;
	}
	if (c->alibi_max_bias > 0.0f) {
		r->alibi_slopes = calloc((size_t)c->n_heads, sizeof(float));
		if (!r->alibi_slopes)
			goto fail;
		skv_alibi_slopes(r->alibi_slopes, (uint32_t)c->n_heads, c->alibi_max_bias);
	}
	r->threads = threads ? threads : 1;
	err = skv_pctx_new(max_rows, r->threads, &r->pctx);
	if (err < 0)
		goto fail;
	err = -ENOMEM;

	size_t rows = max_rows, pairs = r->rope.pairs;
	r->x = forward_alloc(rows * c->dim);
	r->xb = forward_alloc(rows * c->dim);
	r->qkv_dim = (uint32_t)(c->dim + 2 * c->kv_dim);
	r->qkv = forward_alloc(rows * r->qkv_dim);
	r->att = forward_alloc(rows * c->dim);
	r->hb = forward_alloc(rows * c->hidden_dim);
	r->gu = forward_alloc(rows * 2 * c->hidden_dim);
	if (packed) {
		r->packed = (float *)(uintptr_t)packed; /* only ever read */
	} else {
		r->packed = forward_alloc(skv_pack_floats(model));
		r->owns_packed = 1;
	}
	r->q_sink = forward_alloc((size_t)r->threads * c->dim);
	r->cos_abs = forward_alloc(rows * pairs);
	r->sin_abs = forward_alloc(rows * pairs);
	r->cos_sink = forward_alloc(rows * pairs);
	r->sin_sink = forward_alloc(rows * pairs);
	r->rows = calloc(rows, sizeof(*r->rows));
	r->run_start = calloc(rows + 1, sizeof(*r->run_start));
	r->ring_after = calloc(rows, sizeof(*r->ring_after));
	r->layers = calloc((size_t)c->n_layers, sizeof(*r->layers));
	if (!r->x || !r->xb || !r->qkv || !r->att || !r->hb || !r->gu || !r->packed ||
	    !r->q_sink || !r->cos_abs || !r->sin_abs || !r->cos_sink || !r->sin_sink || !r->rows ||
	    !r->run_start || !r->ring_after || !r->layers)
		goto fail;

	if (r->owns_packed)
		skv_pack_weights(model, r->packed);
	const float *next = r->packed;
	uint32_t quantized = 0;
	for (uint32_t i = 0; i < forward_n_groups(c); i++) {
		uint32_t l = i / FORWARD_GROUPS_PER_LAYER, g = i % FORWARD_GROUPS_PER_LAYER;
		struct forward_group *fg = l == (uint32_t)c->n_layers ? &r->classifier
				: g == 0 ? &r->layers[l].qkv : g == 1 ? &r->layers[l].wo
				: g == 2 ? &r->layers[l].w13 : &r->layers[l].w2;
		forward_group_at(model, i, fg);
		quantized |= !fg->fused;
		if ((err = forward_group_init(fg, &next)) < 0)
			goto fail_backend;
	}
	if (quantized) {
		/* Scratch for quantized activations comes in whole super-blocks. */
		uint32_t max_cols = (uint32_t)(c->hidden_dim > c->dim ? c->hidden_dim : c->dim);
		max_cols = (max_cols + SKV_QK_K - 1) / SKV_QK_K * SKV_QK_K;
		err = skv_qctx_new(max_rows, max_cols, r->threads, &r->qctx);
		if (err < 0)
			goto fail_backend;
	}
	*out = r;
	return 0;

fail_backend:
	skv_errorf(msg, msg_len, err, "cannot describe the matrix products of %s (%s)",
		   model->path, skv_strerror(err));
fail:
	skv_runner_free(r);
	return err;
}

const struct skv_model_config *skv_runner_config(const struct skv_runner *r)
{
	return &r->cfg;
}

uint32_t skv_runner_max_rows(const struct skv_runner *r)
{
	return r->max_rows;
}

const char *skv_runner_impl(struct skv_runner *r, uint32_t rows)
{
	if (!r->layers[0].w13.fused)
		return skv_qmat_isa();
	return skv_pctx_isa(r->pctx);
}

/* y[rows][g->out] (+)= the group's matrices times x[rows][g->in]. */
static int forward_group_run(struct skv_runner *r, const struct forward_group *g, uint32_t rows,
			     const float *x, float *y)
{
	if (g->fused)
		return skv_pmat_run(r->pctx, g->panels[0], g->in, g->out, rows, x, g->in, y, g->out,
				    (int)g->add);
	const struct skv_qmat *qw[FORWARD_GROUP_MAX];
	float *qy[FORWARD_GROUP_MAX];
	size_t ld[FORWARD_GROUP_MAX];
	uint32_t nq = 0;
	int err;
	for (uint32_t i = 0; i < g->n; i++) {
		if (g->w[i]->type != SKV_WTYPE_F32) {
			qw[nq] = g->w[i];
			qy[nq] = y + g->col[i];
			ld[nq++] = g->out;
			continue;
		}
		if ((err = skv_pmat_run(r->pctx, g->panels[i], g->in, g->w[i]->rows, rows, x, g->in,
					y + g->col[i], g->out, (int)g->add)) < 0)
			return err;
	}
	return nq ? skv_qmat_run(r->qctx, qw, nq, rows, x, g->in, qy, ld, (int)g->add) : 0;
}

/* LayerNorm with weight and bias, row by row (gptneox): mean and variance over the row. */
static void forward_layernorm(float *out, const float *x, const float *weight, const float *bias,
			      uint32_t rows, uint32_t dim, float eps)
{
	for (uint32_t r = 0; r < rows; r++) {
		const float *xr = x + (size_t)r * dim;
		float *o = out + (size_t)r * dim;
		float mean = 0.0f, var = 0.0f;
		for (uint32_t j = 0; j < dim; j++)
			mean += xr[j];
		mean /= (float)dim;
		for (uint32_t j = 0; j < dim; j++)
			var += (xr[j] - mean) * (xr[j] - mean);
		float inv = 1.0f / sqrtf(var / (float)dim + eps);
		for (uint32_t j = 0; j < dim; j++)
			o[j] = (xr[j] - mean) * inv * weight[j] + (bias ? bias[j] : 0.0f);
	}
}

/* y[r][j] += bias[j] over rows of width n and stride ld; nothing when bias is NULL. */
static void forward_add_bias(float *y, const float *bias, uint32_t rows, uint32_t n, size_t ld)
{
	for (uint32_t r = 0; bias && r < rows; r++)
		for (uint32_t j = 0; j < n; j++)
			y[(size_t)r * ld + j] += bias[j];
}

/* GELU, tanh form as ggml computes it: 0.5 x (1 + tanh(sqrt(2 / pi) x (1 + 0.044715 x^2))). */
static void forward_gelu(float *out, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		float v = x[i];
		out[i] = 0.5f * v * (1.0f + tanhf(0.7978845608f * v * (1.0f + 0.044715f * v * v)));
	}
}

/* llama2.c's rmsnorm, row by row. */
static void forward_rmsnorm(float *out, const float *x, const float *weight, uint32_t rows,
			    uint32_t dim, float eps)
{
	for (uint32_t r = 0; r < rows; r++) {
		const float *xr = x + (size_t)r * dim;
		float *o = out + (size_t)r * dim;
		float ss = 0.0f;
		for (uint32_t j = 0; j < dim; j++)
			ss += xr[j] * xr[j];
		ss /= (float)dim;
		ss += eps;
		ss = 1.0f / sqrtf(ss);
		for (uint32_t j = 0; j < dim; j++)
			o[j] = weight[j] * (ss * xr[j]);
	}
}

/* The model's norm: RMSNorm, or LayerNorm with its bias. */
static void forward_norm(const struct skv_runner *r, float *out, const float *x,
			 const float *weight, const float *bias, uint32_t rows)
{
	const struct skv_model_config *c = &r->cfg;
	if (c->layer_norm)
		forward_layernorm(out, x, weight, bias, rows, (uint32_t)c->dim, c->norm_eps);
	else
		forward_rmsnorm(out, x, weight, rows, (uint32_t)c->dim, c->norm_eps);
}

static int forward_check_seq(const struct skv_runner *r, const struct skv_seq *seq)
{
	const struct skv_kv_desc *d = &seq->desc;
	if (d->n_layers != (uint32_t)r->cfg.n_layers || d->n_kv_heads != (uint32_t)r->cfg.n_kv_heads ||
	    d->head_size != (uint32_t)r->cfg.head_size)
		return -EINVAL;
	return 0;
}

/* Plan every row: advance a private copy of each ring, so that nothing is committed unless
 * the whole step can run. */
static int forward_plan(struct skv_runner *r, struct skv_fwd_item *items, uint32_t n_items,
			uint32_t *n_rows)
{
	uint32_t row = 0;
	for (uint32_t i = 0; i < n_items; i++) {
		struct skv_fwd_item *it = &items[i];
		int err = forward_check_seq(r, it->seq);
		if (err < 0)
			return err;
		if (it->n_tokens > r->max_rows - row)
			return -EINVAL;
		struct skv_kv_ring ring = *it->seq->ring;
		for (uint32_t t = 0; t < it->n_tokens; t++, row++) {
			if (it->tokens[t] < 0 || it->tokens[t] >= r->cfg.vocab_size)
				return -EINVAL;
			struct forward_row *fr = &r->rows[row];
			fr->seq = it->seq;
			fr->token = it->tokens[t];
			err = skv_kv_ring_append(&ring, &it->seq->desc, (int)it->seq->allow_evict,
						 &fr->step);
			if (err < 0)
				return err;
			size_t pairs = r->rope.pairs;
			skv_rope_angles(&r->rope, fr->step.abs_pos, r->cos_abs + row * pairs,
					r->sin_abs + row * pairs);
			fr->sink_pos = it->seq->abs_positions ? fr->step.abs_pos
							      : fr->step.cache_pos;
			skv_rope_angles(&r->rope, fr->sink_pos, r->cos_sink + row * pairs,
					r->sin_sink + row * pairs);
		}
		r->ring_after[i] = ring;
		uint32_t slots = it->seq->desc.slot_stride;
		if (slots > r->scores_cap) {
			size_t ld = (SKV_ATTN_GROUP_HEADS * (size_t)slots + 15) / 16 * 16;
			float *s = forward_alloc(ld * r->threads);
			if (!s)
				return -ENOMEM;
			free(r->scores);
			r->scores = s;
			r->scores_cap = slots;
			r->scores_ld = ld;
		}
	}
	*n_rows = row;
	return 0;
}

/* The model's RoPE order: interleaved pairs (llama) or halves (NEOX: qwen2). */
static void forward_rope(const struct skv_runner *r, float *vec, uint32_t n_heads,
			 const float *cos_tab, const float *sin_tab)
{
	if (r->cfg.rope_order == SKV_ROPE_NEOX)
		skv_rope_rotate_neox(&r->rope, vec, n_heads, cos_tab, sin_tab);
	else
		skv_rope_rotate(&r->rope, vec, n_heads, cos_tab, sin_tab);
}

/* qwen2's biases on q, k and v, added to each row of qkv before any rotation. */
static void forward_qkv_bias(struct skv_runner *r, const struct skv_layer_weights *w,
			     uint32_t n_rows)
{
	const struct skv_model_config *c = &r->cfg;
	const float *bias[3] = { w->bq, w->bk, w->bv };
	const uint32_t width[3] = { (uint32_t)c->dim, (uint32_t)c->kv_dim, (uint32_t)c->kv_dim };
	if (!w->bq && !w->bk && !w->bv)
		return;
	for (uint32_t row = 0; row < n_rows; row++) {
		float *dst = r->qkv + (size_t)row * r->qkv_dim;
		for (uint32_t b = 0; b < 3; b++) {
			if (bias[b])
				for (uint32_t j = 0; j < width[b]; j++)
					dst[j] += bias[b][j];
			dst += width[b];
		}
	}
}

/* mpt's clamp_kqv: every q, k and v component into [-c, c], after the biases (llama.cpp's
 * order). */
static void forward_qkv_clamp(struct skv_runner *r, uint32_t n_rows)
{
	float c = r->cfg.clamp_kqv;
	if (!(c > 0.0f))
		return;
	for (size_t i = 0; i < (size_t)n_rows * r->qkv_dim; i++)
		r->qkv[i] = r->qkv[i] < -c ? -c : r->qkv[i] > c ? c : r->qkv[i];
}

/* One row: rotate and store its key and value, rotate its query, and fill args to attend
 * over its stream's slots (ALiBi: nothing rotates; the kernel biases each range by its
 * distances). q_sink and scores are the calling thread's scratch. */
static void forward_prepare_row(struct skv_runner *r, uint32_t layer, uint32_t row,
				float *q_sink_buf, float *scores, struct skv_attn_args *out_args)
{
	const struct skv_model_config *c = &r->cfg;
	size_t pairs = r->rope.pairs;
	uint32_t dim = (uint32_t)c->dim, kv_dim = (uint32_t)c->kv_dim;
	struct forward_row *fr = &r->rows[row];
	float *q = r->qkv + (size_t)row * r->qkv_dim;
	float *k = q + dim, *v = k + kv_dim;
	const float *ca = r->cos_abs + row * pairs, *sa = r->sin_abs + row * pairs;
	const float *cs = r->cos_sink + row * pairs, *ss = r->sin_sink + row * pairs;

	const int alibi = r->alibi_slopes != NULL;
	if (!alibi)
		forward_rope(r, k, (uint32_t)c->n_kv_heads, ca, sa);
	skv_kv_store_row(&fr->seq->desc, fr->seq->kv_base, layer, fr->step.slot, k, v);
	if (layer == 0)
		skv_kv_region_tokens(fr->seq->kv_base, &fr->seq->desc)[fr->step.slot] = fr->token;

	const float *q_sink = q;
	if (!alibi && fr->step.sink_count && fr->sink_pos != fr->step.abs_pos) {
		memcpy(q_sink_buf, q, dim * sizeof(float));
		forward_rope(r, q_sink_buf, (uint32_t)c->n_heads, cs, ss);
		q_sink = q_sink_buf;
	}
	if (!alibi)
		forward_rope(r, q, (uint32_t)c->n_heads, ca, sa);

	struct skv_attn_args args = {
		.q_window = q,
		.q_sink = q_sink,
		.k_plane = skv_kv_k_plane(fr->seq->kv_base, &fr->seq->desc, layer),
		.v_plane = skv_kv_v_plane(fr->seq->kv_base, &fr->seq->desc, layer),
		.desc = &fr->seq->desc,
		.step = &fr->step,
		.n_heads = (uint32_t)c->n_heads,
		.scores = scores,
		.out = r->att + (size_t)row * dim,
		.alibi_slopes = r->alibi_slopes,
		.alibi_sink_pos = fr->sink_pos,
	};
	*out_args = args;
}

static void forward_attend_row(struct skv_runner *r, uint32_t layer, uint32_t row,
			       float *q_sink_buf, float *scores)
{
	struct skv_attn_args args;
	forward_prepare_row(r, layer, row, q_sink_buf, scores, &args);
	skv_attend(&args);
}

/* KV heads [g0, g1) of a prepared row, as an attention of their own: the query, output and
 * slope rows of their query heads, their part of each plane (q8: its scales at the offset
 * that lands on theirs). Heads are independent, so the bits are those of the whole call. */
static void forward_attend_heads(const struct skv_attn_args *all, uint32_t g0, uint32_t g1,
				 float *scores, struct skv_kv_desc *sub_desc)
{
	const struct skv_kv_desc *d = all->desc;
	const uint32_t group = all->n_heads / d->n_kv_heads;
	const size_t hs = d->head_size, qoff = (size_t)g0 * group * hs;
	const uint64_t codes = (uint64_t)g0 * hs * d->slot_stride * skv_kv_dtype_bytes(d->dtype);
	*sub_desc = *d;
	sub_desc->n_kv_heads = g1 - g0;
	if (d->dtype == SKV_KV_DTYPE_Q8)
		sub_desc->scales_offset =
			d->scales_offset + (uint64_t)g0 * d->slot_stride * sizeof(float) - codes;
	struct skv_attn_args a = *all;
	a.desc = sub_desc;
	a.n_heads = (g1 - g0) * group;
	a.q_window = all->q_window + qoff;
	a.q_sink = all->q_sink + qoff;
	a.out = all->out + qoff;
	a.k_plane = (const char *)all->k_plane + codes;
	a.v_plane = (const char *)all->v_plane + codes;
	a.scores = scores;
	if (all->alibi_slopes)
		a.alibi_slopes = all->alibi_slopes + (size_t)g0 * group;
	skv_attend(&a);
}

/* Rows of one stream run in order (each attends over the keys of the rows before it); the
 * streams of a step are independent, so with several threads they are spread over them, each
 * thread with its own scratch. A row's result does not depend on the thread that runs it. */
static int forward_attention(struct skv_runner *r, uint32_t layer, uint32_t n_rows)
{
	uint32_t dim = (uint32_t)r->cfg.dim;
	if (r->threads <= 1) {
		for (uint32_t row = 0; row < n_rows; row++)
			forward_attend_row(r, layer, row, r->q_sink, r->scores);
		return 0;
	}
	/* Runs of consecutive rows of one stream (a step holds each stream once). */
	uint32_t n_runs = 0;
	for (uint32_t row = 0; row < n_rows; row++)
		if (row == 0 || r->rows[row].seq != r->rows[row - 1].seq)
			r->run_start[n_runs++] = row;
	r->run_start[n_runs] = n_rows;
	const uint32_t n_kv = (uint32_t)r->cfg.n_kv_heads;
	if (n_runs == 1 && n_kv >= 2) {
		/* One stream (a decode step, a prompt): its rows in order, each row's KV heads
		 * split over the threads, so that a big model's single stream does not leave all
		 * but one core waiting on attention. */
		uint32_t parts = r->threads < n_kv ? r->threads : n_kv;
		for (uint32_t row = 0; row < n_rows; row++) {
			struct skv_attn_args args;
			forward_prepare_row(r, layer, row, r->q_sink, r->scores, &args);
#pragma omp parallel for schedule(static, 1) num_threads(parts)
			for (uint32_t p = 0; p < parts; p++) {
				struct skv_kv_desc sub;
				forward_attend_heads(&args, n_kv * p / parts, n_kv * (p + 1) / parts,
						     r->scores + (size_t)p * r->scores_ld, &sub);
			}
		}
		return 0;
	}
	if (n_rows < 2) {
		forward_attend_row(r, layer, 0, r->q_sink, r->scores);
		return 0;
	}
#pragma omp parallel num_threads(r->threads)
	{
		int t = omp_get_thread_num();
		float *q_sink = r->q_sink + (size_t)t * dim;
		float *scores = r->scores + (size_t)t * r->scores_ld;
#pragma omp for schedule(dynamic, 1)
		for (uint32_t run = 0; run < n_runs; run++)
			for (uint32_t row = r->run_start[run]; row < r->run_start[run + 1]; row++)
				forward_attend_row(r, layer, row, q_sink, scores);
	}
	return 0;
}

int skv_forward(struct skv_runner *r, struct skv_fwd_item *items, uint32_t n_items)
{
	const struct skv_model_config *c = &r->cfg;
	const struct skv_model *m = r->model;
	uint32_t dim = (uint32_t)c->dim, n_rows = 0;
	int err = forward_plan(r, items, n_items, &n_rows);
	if (err < 0)
		return err;
	if (!n_rows)
		return 0;

	uint32_t row = 0;
	for (uint32_t i = 0; i < n_items; i++)
		for (uint32_t t = 0; t < items[i].n_tokens; t++, row++)
			skv_model_embedding_row(m, items[i].tokens[t], r->x + (size_t)row * dim);

	for (int32_t l = 0; l < c->n_layers; l++) {
		const struct skv_layer_weights *w = &m->layers[l];
		struct forward_layer *fl = &r->layers[l];

		forward_norm(r, r->xb, r->x, w->attn_norm, w->attn_norm_b, n_rows);
		if ((err = forward_group_run(r, &fl->qkv, n_rows, r->xb, r->qkv)) < 0)
			return err;
		forward_qkv_bias(r, w, n_rows);
		forward_qkv_clamp(r, n_rows);
		/* Parallel residual: the FFN reads the same x as attention (xb is free now). */
		if (c->parallel_residual)
			forward_norm(r, r->xb, r->x, w->ffn_norm, w->ffn_norm_b, n_rows);
		forward_attention(r, (uint32_t)l, n_rows);
		if ((err = forward_group_run(r, &fl->wo, n_rows, r->att, r->x)) < 0)
			return err;
		forward_add_bias(r->x, w->bo, n_rows, dim, dim);

		if (!c->parallel_residual)
			forward_norm(r, r->xb, r->x, w->ffn_norm, w->ffn_norm_b, n_rows);
		if ((err = forward_group_run(r, &fl->w13, n_rows, r->xb, r->gu)) < 0)
			return err;
		if (c->gelu_ffn) {
			uint32_t hidden = (uint32_t)c->hidden_dim;
			forward_add_bias(r->gu, w->b_up, n_rows, hidden, hidden);
			forward_gelu(r->hb, r->gu, (size_t)n_rows * hidden);
		} else {
			skv_swiglu(r->hb, r->gu, n_rows, (uint32_t)c->hidden_dim);
		}
		if ((err = forward_group_run(r, &fl->w2, n_rows, r->hb, r->x)) < 0)
			return err;
		forward_add_bias(r->x, w->b_down, n_rows, dim, dim);
	}

	/* The rings are committed once the KV of every row is in place. */
	for (uint32_t i = 0; i < n_items; i++)
		skv_kv_ring_publish(items[i].seq->ring, &r->ring_after[i]);

	/* Final norm and classifier only for the rows whose logits are wanted, gathered so that
	 * one matmul serves them all. */
	uint32_t out_rows = 0;
	row = 0;
	for (uint32_t i = 0; i < n_items; i++) {
		struct skv_fwd_item *it = &items[i];
		uint32_t first = it->logits_all ? 0 : it->n_tokens - 1;
		for (uint32_t t = 0; t < it->n_tokens; t++, row++)
			if (it->logits && t >= first)
				forward_norm(r, r->xb + (size_t)out_rows++ * dim,
					     r->x + (size_t)row * dim, m->final_norm,
					     m->final_norm_b, 1);
	}
	if (!out_rows)
		return 0;
	/* One classifier matmul for all rows (M = out_rows), then each item's logits copied to
	 * its caller's buffer: a batch of decode rows pays one classifier product, not one per item. */
	if (out_rows > 1 && out_rows <= r->max_rows) {
		size_t vocab = (size_t)c->vocab_size;
		if (!r->cls_out) {
			r->cls_out = forward_alloc((size_t)r->max_rows * vocab);
			if (!r->cls_out)
				return -ENOMEM;
		}
		err = forward_group_run(r, &r->classifier, out_rows, r->xb, r->cls_out);
		if (err < 0)
			return err;
		const float *src = r->cls_out;
		for (uint32_t i = 0; i < n_items; i++) {
			struct skv_fwd_item *it = &items[i];
			if (!it->logits)
				continue;
			size_t n = (it->logits_all ? it->n_tokens : 1) * vocab;
			memcpy(it->logits, src, n * sizeof(float));
			src += n;
		}
		return 0;
	}
	out_rows = 0;
	for (uint32_t i = 0; i < n_items; i++) {
		struct skv_fwd_item *it = &items[i];
		if (!it->logits)
			continue;
		uint32_t n = it->logits_all ? it->n_tokens : 1;
		err = forward_group_run(r, &r->classifier, n, r->xb + (size_t)out_rows * dim,
					it->logits);
		if (err < 0)
			return err;
		out_rows += n;
	}
	return 0;
}
