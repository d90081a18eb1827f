#include "bench-plain.h"
#include "skv-error.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static void naive_matmul(float *out, const float *x, const float *w, int n, int d)
{
	for (int i = 0; i < d; i++) {
		float val = 0.0f;
		for (int j = 0; j < n; j++)
			val += w[(size_t)i * n + j] * x[j];
		out[i] = val;
	}
}

static void naive_rmsnorm(float *o, const float *x, const float *w, int n, float eps)
{
	float ss = 0.0f;
	for (int j = 0; j < n; j++)
		ss += x[j] * x[j];
	ss = 1.0f / sqrtf(ss / (float)n + eps);
	for (int j = 0; j < n; j++)
		o[j] = w[j] * (ss * x[j]);
}

void naive_forward(struct naive *nv, int32_t token, int pos)
{
	const struct skv_model_config *c = &nv->m->cfg;
	int dim = c->dim, kv_dim = c->kv_dim, hs = c->head_size, hid = c->hidden_dim;
	int kv_mul = c->n_heads / c->n_kv_heads;
	memcpy(nv->x, skv_qmat_f32(&nv->m->token_embedding) + (size_t)token * dim, (size_t)dim * sizeof(float));
	for (int l = 0; l < c->n_layers; l++) {
		const struct skv_layer_weights *w = &nv->m->layers[l];
		float *kc = nv->key_cache + ((size_t)l * nv->cache_len + pos) * kv_dim;
		float *vc = nv->value_cache + ((size_t)l * nv->cache_len + pos) * kv_dim;
		naive_rmsnorm(nv->xb, nv->x, w->attn_norm, dim, c->norm_eps);
		naive_matmul(nv->q, nv->xb, skv_qmat_f32(&w->wq), dim, dim);
		naive_matmul(kc, nv->xb, skv_qmat_f32(&w->wk), dim, kv_dim);
		naive_matmul(vc, nv->xb, skv_qmat_f32(&w->wv), dim, kv_dim);
		for (int i = 0; i < dim; i += 2) {
			float freq = 1.0f / powf(10000.0f, (float)(i % hs) / (float)hs);
			float fcr = cosf(pos * freq), fci = sinf(pos * freq);
			for (int v = 0; v < (i < kv_dim ? 2 : 1); v++) {
				float *vec = v ? kc : nv->q;
				float v0 = vec[i], v1 = vec[i + 1];
				vec[i] = v0 * fcr - v1 * fci;
				vec[i + 1] = v0 * fci + v1 * fcr;
			}
		}
		for (int h = 0; h < c->n_heads; h++) {
			const float *q = nv->q + h * hs;
			float *att = nv->att;
			const float *kbase = nv->key_cache + (size_t)l * nv->cache_len * kv_dim;
			const float *vbase = nv->value_cache + (size_t)l * nv->cache_len * kv_dim;
			float max = -INFINITY, sum = 0.0f;
			for (int t = 0; t <= pos; t++) {
				const float *k = kbase + (size_t)t * kv_dim + (h / kv_mul) * hs;
				float score = 0.0f;
				for (int i = 0; i < hs; i++)
					score += q[i] * k[i];
				att[t] = score / sqrtf((float)hs);
				max = att[t] > max ? att[t] : max;
			}
			for (int t = 0; t <= pos; t++) {
				att[t] = expf(att[t] - max);
				sum += att[t];
			}
			float *xb = nv->xb + h * hs;
			memset(xb, 0, (size_t)hs * sizeof(float));
			for (int t = 0; t <= pos; t++) {
				const float *v = vbase + (size_t)t * kv_dim + (h / kv_mul) * hs;
				float a = att[t] / sum;
				for (int i = 0; i < hs; i++)
					xb[i] += a * v[i];
			}
		}
		naive_matmul(nv->xb2, nv->xb, skv_qmat_f32(&w->wo), dim, dim);
		for (int i = 0; i < dim; i++)
			nv->x[i] += nv->xb2[i];
		naive_rmsnorm(nv->xb, nv->x, w->ffn_norm, dim, c->norm_eps);
		naive_matmul(nv->hb, nv->xb, skv_qmat_f32(&w->w1), dim, hid);
		naive_matmul(nv->hb2, nv->xb, skv_qmat_f32(&w->w3), dim, hid);
		for (int i = 0; i < hid; i++) {
			float val = nv->hb[i];
			nv->hb[i] = val * (1.0f / (1.0f + expf(-val))) * nv->hb2[i];
		}
		naive_matmul(nv->xb, nv->hb, skv_qmat_f32(&w->w2), hid, dim);
		for (int i = 0; i < dim; i++)
			nv->x[i] += nv->xb[i];
	}
	naive_rmsnorm(nv->x, nv->x, nv->m->final_norm, dim, c->norm_eps);
	naive_matmul(nv->logits, nv->x, skv_qmat_f32(&nv->m->classifier), dim, c->vocab_size);
}

int naive_init(struct naive *nv, const struct skv_model *m, int cache_len)
{
	const struct skv_model_config *c = &m->cfg;
	char types[64];
	skv_model_types(m, types, sizeof(types));
	/* The plain-C baseline is llama2.c's float32 loop: it reads F32 models only. */
	if (strcmp(types, "F32"))
		return -SKV_EDTYPE;
	nv->m = m;
	nv->cache_len = cache_len;
	nv->x = calloc((size_t)c->dim, sizeof(float));
	nv->xb = calloc((size_t)c->dim, sizeof(float));
	nv->xb2 = calloc((size_t)c->dim, sizeof(float));
	nv->q = calloc((size_t)c->dim, sizeof(float));
	nv->hb = calloc((size_t)c->hidden_dim, sizeof(float));
	nv->hb2 = calloc((size_t)c->hidden_dim, sizeof(float));
	nv->att = calloc((size_t)cache_len, sizeof(float));
	nv->logits = calloc((size_t)c->vocab_size, sizeof(float));
	size_t cache = (size_t)c->n_layers * cache_len * c->kv_dim;
	nv->key_cache = calloc(cache, sizeof(float));
	nv->value_cache = calloc(cache, sizeof(float));
	if (!nv->x || !nv->xb || !nv->xb2 || !nv->q || !nv->hb || !nv->hb2 || !nv->att ||
	    !nv->logits || !nv->key_cache || !nv->value_cache) {
		naive_free(nv);
		return -ENOMEM;
	}
	return 0;
}

void naive_free(struct naive *nv)
{
	free(nv->x);
	free(nv->xb);
	free(nv->xb2);
	free(nv->q);
	free(nv->hb);
	free(nv->hb2);
	free(nv->att);
	free(nv->logits);
	free(nv->key_cache);
	free(nv->value_cache);
}

