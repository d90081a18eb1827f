#include "refmodel.h"
#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

/* Any weight type: each row dequantized by the scalar reference (quant.h), then in double. */
static void ref_matvec(double *out, const double *x, const struct skv_qmat *w, int n_in,
		       int n_out)
{
	float *row = malloc((size_t)n_in * sizeof(float));
	for (int i = 0; i < n_out; i++) {
		skv_dequant_row(w->type, (const char *)w->data + (size_t)i * w->row_bytes, row,
				(uint64_t)n_in);
		double acc = 0.0;
		for (int j = 0; j < n_in; j++)
			acc += (double)row[j] * x[j];
		out[i] = acc;
	}
	free(row);
}

static void ref_rmsnorm(double *out, const double *x, const float *w, int n, double eps)
{
	double ss = 0.0;
	for (int i = 0; i < n; i++)
		ss += x[i] * x[i];
	ss = 1.0 / sqrt(ss / n + eps);
	for (int i = 0; i < n; i++)
		out[i] = (double)w[i] * (ss * x[i]);
}

/* The frequency of rotary pair i, in double: 1 / theta^(2i / rot_dims), then the model's
 * rope_freqs divisors and its scaling (linear: / factor; llama3: Llama 3.1's formula as its
 * Hugging Face code states it). */
static double ref_freq(const struct skv_model_config *c, int i)
{
	double f = 1.0 / pow(c->rope_theta, 2.0 * i / c->rope_dims);
	if (c->rope_freqs)
		f /= c->rope_freqs[i];
	if (c->rope_scaling == SKV_ROPE_SCALING_LINEAR)
		f /= c->rope_factor;
	if (c->rope_scaling == SKV_ROPE_SCALING_LLAMA3) {
		double wavelen = 2.0 * M_PI / f;
		double low_wavelen = c->rope_original_context / c->rope_low_freq_factor;
		double high_wavelen = c->rope_original_context / c->rope_high_freq_factor;
		if (wavelen > low_wavelen) {
			f /= c->rope_factor;
		} else if (wavelen >= high_wavelen) {
			double smooth = (c->rope_original_context / wavelen - c->rope_low_freq_factor) /
					(c->rope_high_freq_factor - c->rope_low_freq_factor);
			f = (1.0 - smooth) * f / c->rope_factor + smooth * f;
		}
	}
	return f;
}

/* Rotate every head of vec at position pos: the first rope_dims components of each head, in
 * interleaved pairs (2i, 2i + 1) or NEOX halves (i, i + rope_dims / 2). */
static void ref_rope(double *vec, int n, const struct skv_model_config *c, uint64_t pos)
{
	int hs = c->head_size, half = c->rope_dims / 2;
	for (int h = 0; h < n; h += hs) {
		for (int i = 0; i < half; i++) {
			int a = c->rope_order == SKV_ROPE_NEOX ? i : 2 * i;
			int b = c->rope_order == SKV_ROPE_NEOX ? i + half : 2 * i + 1;
			double angle = (double)pos * ref_freq(c, i);
			double cs = cos(angle), sn = sin(angle);
			double v0 = vec[h + a], v1 = vec[h + b];
			vec[h + a] = v0 * cs - v1 * sn;
			vec[h + b] = v0 * sn + v1 * cs;
		}
	}
}

/* The model's norm in double: RMSNorm, or LayerNorm (mean, variance, weight, bias). */
static void ref_norm(double *out, const double *x, const float *w, const float *b,
		     const struct skv_model_config *c)
{
	int n = c->dim;
	if (!c->layer_norm) {
		ref_rmsnorm(out, x, w, n, c->norm_eps);
		return;
	}
	double mean = 0.0, var = 0.0;
	for (int i = 0; i < n; i++)
		mean += x[i];
	mean /= n;
	for (int i = 0; i < n; i++)
		var += (x[i] - mean) * (x[i] - mean);
	double inv = 1.0 / sqrt(var / n + c->norm_eps);
	for (int i = 0; i < n; i++)
		out[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0);
}

/* ALiBi's slope of head h, in double, as MPT's Hugging Face code (gen_slopes) states it: with
 * n' the power of two >= n_heads, slope_i = 2^(-max_bias (i + 1) / n') for i < n'; when n' >
 * n_heads, the odd-numbered slopes then the even-numbered ones, cut to n_heads. */
static double ref_alibi_slope(const struct skv_model_config *c, int h)
{
	int n = 1;
	while (n < c->n_heads)
		n *= 2;
	int i = h;
	if (n != c->n_heads)
		i = h < n / 2 ? 2 * h + 1 : 2 * (h - n / 2);
	return pow(2.0, -(double)c->alibi_max_bias * (i + 1) / n);
}

/* mpt's clamp_kqv on one vector, when the model has one. */
static void ref_clamp(double *v, int n, const struct skv_model_config *c)
{
	for (int i = 0; c->clamp_kqv > 0.0f && i < n; i++)
		v[i] = fmax(-c->clamp_kqv, fmin(c->clamp_kqv, v[i]));
}

/* out[i] += bias[i] when the model has that bias. */
static void ref_bias(double *out, const float *bias, int n)
{
	for (int i = 0; bias && i < n; i++)
		out[i] += bias[i];
}

void ref_init(struct ref_model *r, const struct skv_model *m, uint32_t sink_slots,
	      uint32_t window_slots, int allow_evict, int abs_positions)
{
	memset(r, 0, sizeof(*r));
	r->m = m;
	r->sink_slots = sink_slots;
	r->window_slots = window_slots;
	r->allow_evict = allow_evict;
	r->abs_positions = abs_positions;
	size_t slots = (size_t)sink_slots + window_slots;
	size_t n = (size_t)m->cfg.n_layers * slots * m->cfg.kv_dim;
	r->k = calloc(n, sizeof(float));
	r->v = calloc(n, sizeof(float));
	r->abs_pos = calloc(slots, sizeof(uint64_t));
}

void ref_free(struct ref_model *r)
{
	free(r->k);
	free(r->v);
	free(r->abs_pos);
}

void ref_skip_to(struct ref_model *r, uint64_t pos)
{
	r->next_pos = pos;
}

int ref_step(struct ref_model *r, int32_t token, float *logits)
{
	const struct skv_model_config *c = &r->m->cfg;
	int dim = c->dim, kv_dim = c->kv_dim, hs = c->head_size, hid = c->hidden_dim;
	size_t slots = (size_t)r->sink_slots + r->window_slots;

	/* Where the new token goes: a sink slot while they last, else the window ring. */
	uint32_t slot;
	if (r->n_sink < r->sink_slots) {
		slot = r->n_sink++;
	} else {
		if (r->n_window == r->window_slots) {
			if (!r->allow_evict)
				return -1;
			r->window_head = (r->window_head + 1) % r->window_slots;
			r->n_window--;
		}
		slot = r->sink_slots + (r->window_head + r->n_window) % r->window_slots;
		r->n_window++;
	}
	r->abs_pos[slot] = r->next_pos;
	uint64_t q_abs = r->next_pos++;

	/* Logical order of the cache: sinks, then the window oldest first. */
	uint32_t n_cache = r->n_sink + r->n_window;
	uint32_t *order = malloc(n_cache * sizeof(uint32_t));
	for (uint32_t i = 0; i < r->n_sink; i++)
		order[i] = i;
	for (uint32_t i = 0; i < r->n_window; i++)
		order[r->n_sink + i] = r->sink_slots + (r->window_head + i) % r->window_slots;

	double *x = calloc(dim, sizeof(double)), *xb = calloc(dim, sizeof(double));
	double *q = calloc(dim, sizeof(double)), *k = calloc(kv_dim, sizeof(double));
	double *v = calloc(kv_dim, sizeof(double)), *att_out = calloc(dim, sizeof(double));
	double *tmp = calloc(dim, sizeof(double)), *hb = calloc(hid, sizeof(double));
	double *hb2 = calloc(hid, sizeof(double)), *kr = calloc(kv_dim, sizeof(double));
	double *qr = calloc(dim, sizeof(double)), *scores = calloc(n_cache, sizeof(double));
	float *embd = malloc((size_t)dim * sizeof(float));
	skv_model_embedding_row(r->m, token, embd);
	for (int i = 0; i < dim; i++)
		x[i] = embd[i];
	free(embd);

	for (int l = 0; l < c->n_layers; l++) {
		const struct skv_layer_weights *w = &r->m->layers[l];
		float *kc = r->k + (size_t)l * slots * kv_dim, *vc = r->v + (size_t)l * slots * kv_dim;
		ref_norm(xb, x, w->attn_norm, w->attn_norm_b, c);
		ref_matvec(q, xb, &w->wq, dim, dim);
		ref_matvec(k, xb, &w->wk, dim, kv_dim);
		ref_matvec(v, xb, &w->wv, dim, kv_dim);
		ref_bias(q, w->bq, dim);
		ref_bias(k, w->bk, kv_dim);
		ref_bias(v, w->bv, kv_dim);
		ref_clamp(q, dim, c);
		ref_clamp(k, kv_dim, c);
		ref_clamp(v, kv_dim, c);
		for (int i = 0; i < kv_dim; i++) {
			kc[(size_t)slot * kv_dim + i] = (float)k[i];
			vc[(size_t)slot * kv_dim + i] = (float)v[i];
		}
		/* Re-rotate (or, for ALiBi, re-bias) everything at this step's positions. */
		int alibi = c->alibi_max_bias > 0.0f;
		uint64_t q_pos = r->abs_positions ? q_abs : n_cache - 1;
		memcpy(qr, q, dim * sizeof(double));
		if (!alibi)
			ref_rope(qr, dim, c, q_pos);
		int kv_mul = c->n_heads / c->n_kv_heads;
		for (int h = 0; h < c->n_heads; h++) {
			int g = h / kv_mul;
			double max = -INFINITY;
			for (uint32_t i = 0; i < n_cache; i++) {
				uint32_t s = order[i];
				for (int j = 0; j < kv_dim; j++)
					kr[j] = kc[(size_t)s * kv_dim + j];
				uint64_t k_pos = r->abs_positions ? r->abs_pos[s] : i;
				if (!alibi)
					ref_rope(kr, kv_dim, c, k_pos);
				double dot = 0.0;
				for (int d = 0; d < hs; d++)
					dot += qr[h * hs + d] * kr[g * hs + d];
				scores[i] = dot / sqrt((double)hs);
				if (alibi)
					scores[i] -= ref_alibi_slope(c, h) * (double)(q_pos - k_pos);
				max = scores[i] > max ? scores[i] : max;
			}
			double sum = 0.0;
			for (uint32_t i = 0; i < n_cache; i++) {
				scores[i] = exp(scores[i] - max);
				sum += scores[i];
			}
			for (int d = 0; d < hs; d++) {
				double acc = 0.0;
				for (uint32_t i = 0; i < n_cache; i++)
					acc += scores[i] / sum *
					       vc[(size_t)order[i] * kv_dim + g * hs + d];
				att_out[h * hs + d] = acc;
			}
		}
		/* Parallel residual: the FFN's input is the norm of x before attention adds. */
		if (c->parallel_residual)
			ref_norm(xb, x, w->ffn_norm, w->ffn_norm_b, c);
		ref_matvec(tmp, att_out, &w->wo, dim, dim);
		ref_bias(tmp, w->bo, dim);
		for (int i = 0; i < dim; i++)
			x[i] += tmp[i];
		if (!c->parallel_residual)
			ref_norm(xb, x, w->ffn_norm, w->ffn_norm_b, c);
		if (c->gelu_ffn) {
			ref_matvec(hb, xb, &w->w3, dim, hid);
			ref_bias(hb, w->b_up, hid);
			for (int i = 0; i < hid; i++)
				hb[i] = 0.5 * hb[i] *
					(1.0 + tanh(sqrt(2.0 / M_PI) * hb[i] *
						    (1.0 + 0.044715 * hb[i] * hb[i])));
		} else {
			ref_matvec(hb, xb, &w->w1, dim, hid);
			ref_matvec(hb2, xb, &w->w3, dim, hid);
			for (int i = 0; i < hid; i++)
				hb[i] = hb[i] / (1.0 + exp(-hb[i])) * hb2[i];
		}
		ref_matvec(tmp, hb, &w->w2, hid, dim);
		ref_bias(tmp, w->b_down, dim);
		for (int i = 0; i < dim; i++)
			x[i] += tmp[i];
	}
	ref_norm(xb, x, r->m->final_norm, r->m->final_norm_b, c);
	double *out = calloc(c->vocab_size, sizeof(double));
	ref_matvec(out, xb, &r->m->classifier, dim, c->vocab_size);
	for (int i = 0; i < c->vocab_size; i++)
		logits[i] = (float)out[i];

	free(out);
	free(order);
	free(x);
	free(xb);
	free(q);
	free(k);
	free(v);
	free(att_out);
	free(tmp);
	free(hb);
	free(hb2);
	free(kr);
	free(qr);
	free(scores);
	return 0;
}
