/* Model loading: llama2.c .bin and GGUF (llama, F32), both into the same struct skv_model
 * whose weight pointers point into a read-only mapping of the file.
 *
 * Both paths check the configuration the same way (model_check_config) before computing any
 * size from it, and compute sizes with overflow-checked 64-bit arithmetic; no weight pointer
 * is handed out before the bytes behind it are known to lie inside the file. */
#include "model.h"

#include "gguf.h"
#include "mapfile.h"
#include "skv-error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the model loader reads little-endian weights in place"
#endif

/* llama2.c legacy header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
 * seq_len as int32; a negative vocab_size means a separate classifier at the end. */
#define LLAMA2C_HEADER_FIELDS 7
#define LLAMA2C_HEADER_BYTES (LLAMA2C_HEADER_FIELDS * sizeof(int32_t))
#define LLAMA2C_NORM_EPS 1e-5f
#define LLAMA2C_ROPE_THETA 10000.0f
#define GGUF_DEFAULT_ROPE_THETA 10000.0f
#define GGUF_NAME_MAX 96


/* Checks that the dimensions make sense together and fills head_size and kv_dim. The size of
 * the weights is checked by each format against its file. */
static int model_check_config(struct skv_model_config *cfg, const char *path, const char *source,
			      char *msg, size_t msg_len)
{
	const struct {
		const char *name;
		int32_t value;
	} fields[] = {
		{ "dim", cfg->dim },
		{ "hidden_dim", cfg->hidden_dim },
		{ "n_layers", cfg->n_layers },
		{ "n_heads", cfg->n_heads },
		{ "n_kv_heads", cfg->n_kv_heads },
		{ "vocab_size", cfg->vocab_size },
		{ "seq_len", cfg->seq_len },
	};

	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		if (fields[i].value <= 0)
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "%s: %s: %s = %" PRId32 " must be positive", path,
					  source, fields[i].name, fields[i].value);
	}
	if (cfg->dim % cfg->n_heads)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: %s: dim %" PRId32 " is not divisible by n_heads %" PRId32,
				  path, source, cfg->dim, cfg->n_heads);
	if (cfg->n_kv_heads > cfg->n_heads || cfg->n_heads % cfg->n_kv_heads)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: %s: n_heads %" PRId32 " is not a multiple of n_kv_heads %"
				  PRId32, path, source, cfg->n_heads, cfg->n_kv_heads);
	cfg->head_size = cfg->dim / cfg->n_heads;
	/* RoPE rotates pairs of a head's components. */
	if (cfg->head_size % 2)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: %s: head size %" PRId32 " (dim / n_heads) is odd; RoPE needs"
				  " pairs", path, source, cfg->head_size);
	cfg->kv_dim = cfg->n_kv_heads * cfg->head_size; /* <= dim: cannot overflow */
	if (!cfg->rope_dims)
		cfg->rope_dims = cfg->head_size;
	if (!(cfg->norm_eps > 0.0f) || !isfinite(cfg->norm_eps))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: %s: RMSNorm epsilon %g must be positive and finite", path,
				  source, (double)cfg->norm_eps);
	if (!(cfg->rope_theta > 0.0f) || !isfinite(cfg->rope_theta))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: %s: RoPE base %g must be positive and finite", path, source,
				  (double)cfg->rope_theta);
	return 0;
}

/* *acc += a * b; false on overflow. */
static bool model_add_product(uint64_t *acc, uint64_t a, uint64_t b)
{
	uint64_t p;
	return !__builtin_mul_overflow(a, b, &p) && !__builtin_add_overflow(*acc, p, acc);
}

static void model_f32_matrix(struct skv_qmat *out, const float *data, uint64_t rows,
			     uint64_t cols)
{
	*out = (struct skv_qmat){ .type = SKV_WTYPE_F32, .rows = (uint32_t)rows,
				  .cols = (uint32_t)cols, .row_bytes = cols * sizeof(float),
				  .data = data };
}

static int model_alloc_layers(struct skv_model *m, char *msg, size_t msg_len)
{
	m->layers = calloc((size_t)m->cfg.n_layers, sizeof(*m->layers));
	if (!m->layers)
		return skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory for %" PRId32
				  " layers", m->path, m->cfg.n_layers);
	return 0;
}

/* llama2.c .bin: the header fixes every size, so the file must have exactly the bytes the
 * header implies; a shorter file is truncated, a longer one was written for other dimensions. */
static int model_open_llama2c(struct skv_model *m, char *msg, size_t msg_len)
{
	struct skv_model_config *cfg = &m->cfg;
	int32_t header[LLAMA2C_HEADER_FIELDS];
	int err;

	if (m->map_size < LLAMA2C_HEADER_BYTES)
		return skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				  "%s: truncated llama2.c model: %zu bytes, shorter than the %zu-byte"
				  " header", m->path, m->map_size, LLAMA2C_HEADER_BYTES);
	memcpy(header, m->map, sizeof(header));
	cfg->dim = header[0];
	cfg->hidden_dim = header[1];
	cfg->n_layers = header[2];
	cfg->n_heads = header[3];
	cfg->n_kv_heads = header[4];
	/* The sign of vocab_size says whether the classifier is shared. -INT32_MIN does not
	 * exist, so that value stays negative and is refused below. */
	bool shared_classifier = header[5] > 0;
	cfg->vocab_size = header[5] < 0 && header[5] != INT32_MIN ? -header[5] : header[5];
	cfg->seq_len = header[6];
	cfg->norm_eps = LLAMA2C_NORM_EPS;
	cfg->rope_theta = LLAMA2C_ROPE_THETA;
	err = model_check_config(cfg, m->path, "llama2.c header", msg, msg_len);
	if (err)
		return err;

	uint64_t dim = (uint64_t)cfg->dim, hidden = (uint64_t)cfg->hidden_dim;
	uint64_t layers = (uint64_t)cfg->n_layers, kv_dim = (uint64_t)cfg->kv_dim;
	uint64_t vocab = (uint64_t)cfg->vocab_size, seq = (uint64_t)cfg->seq_len;
	uint64_t per_layer = 0, floats = 0, bytes;
	bool ok = model_add_product(&per_layer, 2, dim) &&           /* rms_att, rms_ffn */
		  model_add_product(&per_layer, 2 * dim, dim) &&     /* wq, wo */
		  model_add_product(&per_layer, 2 * kv_dim, dim) &&  /* wk, wv */
		  model_add_product(&per_layer, 3 * hidden, dim) &&  /* w1, w2, w3 */
		  model_add_product(&floats, vocab, dim) &&          /* token_embedding */
		  model_add_product(&floats, layers, per_layer) &&
		  model_add_product(&floats, 1, dim) &&              /* rms_final */
		  model_add_product(&floats, seq, (uint64_t)cfg->head_size) && /* freq_cis re+im */
		  (shared_classifier || model_add_product(&floats, vocab, dim)) &&
		  !__builtin_mul_overflow(floats, sizeof(float), &bytes) &&
		  !__builtin_add_overflow(bytes, LLAMA2C_HEADER_BYTES, &bytes);
	if (!ok)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: llama2.c header dimensions (dim %" PRId32 ", hidden_dim %"
				  PRId32 ", n_layers %" PRId32 ", vocab_size %" PRId32 ", seq_len %"
				  PRId32 ") overflow a 64-bit size", m->path, cfg->dim,
				  cfg->hidden_dim, cfg->n_layers, cfg->vocab_size, cfg->seq_len);
	if (m->map_size < bytes)
		return skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				  "%s: truncated llama2.c model: the header's dimensions need %" PRIu64
				  " bytes, the file has %zu", m->path, bytes, m->map_size);
	if (m->map_size > bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: llama2.c header dimensions disagree with data size: they need %"
				  PRIu64 " bytes, the file has %zu", m->path, bytes, m->map_size);

	err = model_alloc_layers(m, msg, msg_len);
	if (err)
		return err;

	/* The header is 28 bytes, so every float array below is 4-byte aligned in the page-aligned
	 * mapping. Arrays stacked over layers are walked in llama2.c order. */
	const float *w = (const float *)((const char *)m->map + LLAMA2C_HEADER_BYTES);
	const size_t d = (size_t)dim, h = (size_t)hidden, kv = (size_t)kv_dim, L = (size_t)layers;
	model_f32_matrix(&m->token_embedding, w, vocab, d);
	w += (size_t)vocab * d;
	for (size_t l = 0; l < L; l++)
		m->layers[l].attn_norm = w + l * d;
	w += L * d;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].wq, w + l * d * d, d, d);
	w += L * d * d;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].wk, w + l * kv * d, kv, d);
	w += L * kv * d;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].wv, w + l * kv * d, kv, d);
	w += L * kv * d;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].wo, w + l * d * d, d, d);
	w += L * d * d;
	for (size_t l = 0; l < L; l++)
		m->layers[l].ffn_norm = w + l * d;
	w += L * d;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].w1, w + l * h * d, h, d);
	w += L * h * d;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].w2, w + l * d * h, d, h);
	w += L * d * h;
	for (size_t l = 0; l < L; l++)
		model_f32_matrix(&m->layers[l].w3, w + l * h * d, h, d);
	w += L * h * d;
	m->final_norm = w;
	w += d;
	w += (size_t)seq * (size_t)cfg->head_size; /* freq_cis_real, freq_cis_imag: unused */
	if (shared_classifier)
		m->classifier = m->token_embedding;
	else
		model_f32_matrix(&m->classifier, w, vocab, d);
	return 0;
}

/* An integer key that must fit int32; an absent key is an error when required, else
 * *out keeps its value. */
static int model_gguf_dim(const struct skv_model *m, const char *key, bool required,
			  int32_t *out, char *msg, size_t msg_len)
{
	uint32_t value;
	int err = skv_gguf_get_u32(m->gguf, key, &value);

	if (err == -ENOENT && !required)
		return 0;
	if (err == -ENOENT)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: GGUF metadata key %s is missing",
				  m->path, key);
	if (err)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF metadata key %s is not a non-negative integer that fits"
				  " 32 bits", m->path, key);
	if (value > INT32_MAX)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF metadata key %s = %" PRIu32 " is out of range", m->path,
				  key, value);
	*out = (int32_t)value;
	return 0;
}

static int model_gguf_float(const struct skv_model *m, const char *key, float fallback,
			    bool required, float *out, char *msg, size_t msg_len)
{
	int err = skv_gguf_get_f32(m->gguf, key, out);

	if (err == -ENOENT && !required) {
		*out = fallback;
		return 0;
	}
	if (err == -ENOENT)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: GGUF metadata key %s is missing",
				  m->path, key);
	if (err)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF metadata key %s is not a float32", m->path, key);
	return 0;
}

static void model_format_dims(char *buf, size_t len, uint32_t n_dims, const uint64_t *dims)
{
	size_t used = 0;

	buf[0] = '\0';
	for (uint32_t i = 0; i < n_dims && used < len; i++) {
		int n = snprintf(buf + used, len - used, "%s%" PRIu64, i ? ", " : "", dims[i]);
		if (n < 0)
			break;
		used += (size_t)n;
	}
}

/* Checks a tensor's presence and ggml shape [cols] (rows == 0) or [cols, rows], i.e. row-major
 * [rows][cols]. Trailing ggml dimensions of 1 are accepted. */
static int model_gguf_find(const struct skv_model *m, const char *name, int64_t rows,
			   int64_t cols, const struct skv_gguf_tensor **out, char *msg,
			   size_t msg_len)
{
	const struct skv_gguf_tensor *t = skv_gguf_find_tensor(m->gguf, name);
	uint64_t want[4] = { (uint64_t)cols, rows ? (uint64_t)rows : 1, 1, 1 };
	uint32_t want_dims = rows ? 2 : 1;
	bool same = t != NULL;

	if (!t)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: GGUF tensor %s is missing",
				  m->path, name);
	for (uint32_t i = 0; i < 4; i++)
		same = same && t->dims[i] == want[i];
	if (!same) {
		char found[96], expected[96];
		model_format_dims(found, sizeof(found), t->n_dims, t->dims);
		model_format_dims(expected, sizeof(expected), want_dims, want);
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: GGUF tensor %s has shape [%s], expected [%s] (ggml order,"
				  " innermost first)", m->path, name, found, expected);
	}
	*out = t;
	return 0;
}

/* A norm or bias vector: F32 only, as every GGUF producer stores them. */
static int model_gguf_vector(const struct skv_model *m, const char *name, int64_t cols,
			     const float **out, char *msg, size_t msg_len)
{
	const struct skv_gguf_tensor *t;
	int err = model_gguf_find(m, name, 0, cols, &t, msg, msg_len);
	if (err)
		return err;
	if (t->type != SKV_GGML_TYPE_F32)
		return skv_errorf(msg, msg_len, -SKV_EDTYPE,
				  "%s: GGUF tensor %s has type %s (%" PRIu32 "); norm and bias vectors must"
				  " be F32", m->path, name, skv_gguf_ggml_type_name(t->type),
				  t->type);
	/* general.alignment may legally be 1 or 2; the forward pass needs aligned floats. */
	if (!t->data || (uintptr_t)t->data % _Alignof(float))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF tensor %s data is not %zu-byte aligned", m->path, name,
				  _Alignof(float));
	*out = t->data;
	return 0;
}

/* A weight matrix [rows][cols] in any type streamkv reads, used in place. */
static int model_gguf_matrix(const struct skv_model *m, const char *name, int64_t rows,
			     int64_t cols, struct skv_qmat *out, char *msg, size_t msg_len)
{
	const struct skv_gguf_tensor *t;
	int err = model_gguf_find(m, name, rows, cols, &t, msg, msg_len);
	if (err)
		return err;
	const char *type_name = skv_wtype_name(t->type);
	if (!type_name || t->type == SKV_WTYPE_Q8_K)
		return skv_errorf(msg, msg_len, -SKV_EDTYPE,
				  "%s: GGUF tensor %s has type %s (%" PRIu32 "), which streamkv does"
				  " not read (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)",
				  m->path, name, skv_gguf_ggml_type_name(t->type), t->type);
	uint64_t row_bytes = skv_wtype_row_bytes(t->type, (uint64_t)cols);
	if (!row_bytes)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: GGUF tensor %s: width %" PRId64 " is not a whole number of %s"
				  " blocks of %" PRIu32, m->path, name, cols, type_name,
				  skv_wtype_block_elems(t->type));
	if (!t->data || t->n_bytes != row_bytes * (uint64_t)rows)
		return skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				  "%s: GGUF tensor %s holds %" PRIu64 " bytes, its shape needs %"
				  PRIu64, m->path, name, t->data ? t->n_bytes : 0,
				  row_bytes * (uint64_t)rows);
	/* Kernels read fp16 scales and float32 rows with plain loads. */
	if ((uintptr_t)t->data % (t->type == SKV_WTYPE_F32 ? 4 : 2))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF tensor %s data is not aligned for its type", m->path,
				  name);
	*out = (struct skv_qmat){ .type = t->type, .rows = (uint32_t)rows, .cols = (uint32_t)cols,
				  .row_bytes = row_bytes, .data = t->data };
	return 0;
}

static int model_gguf_layer_matrix(const struct skv_model *m, int32_t layer, const char *suffix,
				   int64_t rows, int64_t cols, struct skv_qmat *out, char *msg,
				   size_t msg_len)
{
	char name[GGUF_NAME_MAX];

	snprintf(name, sizeof(name), "blk.%" PRId32 ".%s.weight", layer, suffix);
	return model_gguf_matrix(m, name, rows, cols, out, msg, msg_len);
}

static int model_gguf_layer_vector(const struct skv_model *m, int32_t layer, const char *suffix,
				   int64_t cols, const float **out, char *msg, size_t msg_len)
{
	char name[GGUF_NAME_MAX];

	snprintf(name, sizeof(name), "blk.%" PRId32 ".%s.weight", layer, suffix);
	return model_gguf_vector(m, name, cols, out, msg, msg_len);
}

/* PREFIX.rope.scaling.type: absent or "none", "linear" (frequencies / factor) or "llama3"
 * (factor, low_freq_factor, high_freq_factor, original_context_length); any other is refused. */
static int model_gguf_rope_scaling(struct skv_model *m, const char *prefix, char *msg,
				   size_t msg_len)
{
	struct skv_model_config *cfg = &m->cfg;
	struct skv_gguf_str type;
	char key[GGUF_NAME_MAX];
	int err;

	snprintf(key, sizeof(key), "%s.rope.scaling.type", prefix);
	err = skv_gguf_get_str(m->gguf, key, &type);
	if (err == -ENOENT)
		return 0;
	if (err)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: GGUF metadata key %s is not a"
				  " string", m->path, key);
	bool none = type.len == 4 && !memcmp(type.ptr, "none", 4);
	bool linear = type.len == 6 && !memcmp(type.ptr, "linear", 6);
	bool llama3 = type.len == 6 && !memcmp(type.ptr, "llama3", 6);
	if (!none && !linear && !llama3) {
		char shown[40];
		size_t n = type.len < sizeof(shown) - 1 ? (size_t)type.len : sizeof(shown) - 1;
		for (size_t i = 0; i < n; i++)
			shown[i] = type.ptr[i] >= 0x20 && type.ptr[i] < 0x7f ? type.ptr[i] : '?';
		shown[n] = '\0';
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF rope scaling type '%s' is not supported (none, linear,"
				  " llama3)", m->path, shown);
	}
	if (none)
		return 0;
	snprintf(key, sizeof(key), "%s.rope.scaling.factor", prefix);
	if ((err = model_gguf_float(m, key, 1.0f, true, &cfg->rope_factor, msg, msg_len)))
		return err;
	if (!(cfg->rope_factor >= 1.0f) || !isfinite(cfg->rope_factor))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: GGUF %s %g must be at least 1",
				  m->path, key, (double)cfg->rope_factor);
	cfg->rope_scaling = SKV_ROPE_SCALING_LINEAR;
	if (linear)
		return 0;
	cfg->rope_scaling = SKV_ROPE_SCALING_LLAMA3;
	int32_t original = 0;
	snprintf(key, sizeof(key), "%s.rope.scaling.original_context_length", prefix);
	if ((err = model_gguf_dim(m, key, true, &original, msg, msg_len)))
		return err;
	cfg->rope_original_context = (float)original;
	snprintf(key, sizeof(key), "%s.rope.scaling.low_freq_factor", prefix);
	if ((err = model_gguf_float(m, key, 1.0f, true, &cfg->rope_low_freq_factor, msg,
				    msg_len)))
		return err;
	snprintf(key, sizeof(key), "%s.rope.scaling.high_freq_factor", prefix);
	if ((err = model_gguf_float(m, key, 4.0f, true, &cfg->rope_high_freq_factor, msg,
				    msg_len)))
		return err;
	if (!(cfg->rope_low_freq_factor > 0.0f) ||
	    !(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor) || original <= 0 ||
	    !isfinite(cfg->rope_high_freq_factor))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF llama3 rope scaling needs 0 < low_freq_factor (%g) <"
				  " high_freq_factor (%g) and original_context_length %" PRId32
				  " > 0", m->path, (double)cfg->rope_low_freq_factor,
				  (double)cfg->rope_high_freq_factor, original);
	return 0;
}

/* blk.N.SUFFIX.bias: required for qwen2, optional for llama (llama.cpp reads it there too). */
static int model_gguf_bias(const struct skv_model *m, int32_t layer, const char *suffix,
			   int64_t cols, const float **out, char *msg, size_t msg_len)
{
	char name[GGUF_NAME_MAX];

	snprintf(name, sizeof(name), "blk.%" PRId32 ".%s.bias", layer, suffix);
	if (m->cfg.arch != SKV_ARCH_QWEN2 && !skv_gguf_find_tensor(m->gguf, name))
		return 0;
	return model_gguf_vector(m, name, cols, out, msg, msg_len);
}

static int model_gguf_config(struct skv_model *m, char *msg, size_t msg_len)
{
	struct skv_model_config *cfg = &m->cfg;
	struct skv_gguf_str arch;
	int err;

	err = skv_gguf_get_str(m->gguf, "general.architecture", &arch);
	if (err)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF metadata key general.architecture is %s", m->path,
				  err == -ENOENT ? "missing" : "not a string");
	static const struct {
		const char *name;
		enum skv_model_arch arch;
		enum skv_rope_order order;
	} archs[] = {
		{ "llama", SKV_ARCH_LLAMA, SKV_ROPE_INTERLEAVED },
		{ "qwen2", SKV_ARCH_QWEN2, SKV_ROPE_NEOX },
		{ "gptneox", SKV_ARCH_GPTNEOX, SKV_ROPE_NEOX },
		{ "falcon", SKV_ARCH_FALCON, SKV_ROPE_NEOX },
		{ "mpt", SKV_ARCH_MPT, SKV_ROPE_NEOX }, /* no rotary: the order is never used */
	};
	const char *prefix = NULL;
	for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]); i++) {
		if (arch.len == strlen(archs[i].name) && !memcmp(arch.ptr, archs[i].name, arch.len)) {
			prefix = archs[i].name;
			cfg->arch = archs[i].arch;
			cfg->rope_order = archs[i].order;
		}
	}
	if (!prefix) {
		char shown[40];
		size_t n = arch.len < sizeof(shown) - 1 ? (size_t)arch.len : sizeof(shown) - 1;
		for (size_t i = 0; i < n; i++)
			shown[i] = arch.ptr[i] >= 0x20 && arch.ptr[i] < 0x7f ? arch.ptr[i] : '?';
		shown[n] = '\0';
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF architecture '%s' is not supported (llama, qwen2,"
				  " gptneox, falcon, mpt)",
				  m->path, shown);
	}
	char key[GGUF_NAME_MAX];
#define MODEL_KEY(suffix) (snprintf(key, sizeof(key), "%s." suffix, prefix), key)

	if ((err = model_gguf_dim(m, MODEL_KEY("embedding_length"), true, &cfg->dim, msg,
				  msg_len)) ||
	    (err = model_gguf_dim(m, MODEL_KEY("feed_forward_length"), true, &cfg->hidden_dim, msg,
				  msg_len)) ||
	    (err = model_gguf_dim(m, MODEL_KEY("block_count"), true, &cfg->n_layers, msg,
				  msg_len)) ||
	    (err = model_gguf_dim(m, MODEL_KEY("attention.head_count"), true, &cfg->n_heads, msg,
				  msg_len)) ||
	    (err = model_gguf_dim(m, MODEL_KEY("context_length"), true, &cfg->seq_len, msg,
				  msg_len)))
		return err;
	cfg->n_kv_heads = cfg->n_heads; /* no grouped-query attention unless the key says so */
	err = model_gguf_dim(m, MODEL_KEY("attention.head_count_kv"), false, &cfg->n_kv_heads,
			     msg, msg_len);
	if (err)
		return err;
	if (cfg->arch == SKV_ARCH_FALCON) {
		cfg->layer_norm = 1;
		cfg->gelu_ffn = 1;
		cfg->parallel_residual = 1;
	}
	if (cfg->arch == SKV_ARCH_MPT) {
		cfg->layer_norm = 1;
		cfg->gelu_ffn = 1;
		/* llama.cpp requires max_alibi_bias; its converter writes 0 for an MPT with learned
		 * positions instead of ALiBi, which streamkv does not run. */
		if ((err = model_gguf_float(m, MODEL_KEY("attention.max_alibi_bias"), 0.0f, true,
					    &cfg->alibi_max_bias, msg, msg_len)) ||
		    (err = model_gguf_float(m, MODEL_KEY("attention.clamp_kqv"), 0.0f, false,
					    &cfg->clamp_kqv, msg, msg_len)))
			return err;
		if (!(cfg->alibi_max_bias > 0.0f) || !isfinite(cfg->alibi_max_bias))
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "%s: GGUF mpt.attention.max_alibi_bias %g: only MPT with"
					  " ALiBi (a positive maximum bias) is supported", m->path,
					  (double)cfg->alibi_max_bias);
		if (!(cfg->clamp_kqv >= 0.0f) || isinf(cfg->clamp_kqv))
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "%s: GGUF mpt.attention.clamp_kqv %g must be a finite,"
					  " non-negative bound", m->path, (double)cfg->clamp_kqv);
	}
	if (cfg->arch == SKV_ARCH_GPTNEOX) {
		int parallel = 1; /* llama.cpp's default when the key is absent */
		cfg->layer_norm = 1;
		cfg->gelu_ffn = 1;
		err = skv_gguf_get_bool(m->gguf, MODEL_KEY("use_parallel_residual"), &parallel);
		if (err && err != -ENOENT)
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "%s: GGUF metadata key %s is not a bool", m->path, key);
		cfg->parallel_residual = parallel;
	}
	if ((err = model_gguf_float(m, cfg->layer_norm ? MODEL_KEY("attention.layer_norm_epsilon")
					 : MODEL_KEY("attention.layer_norm_rms_epsilon"),
				    0.0f, true, &cfg->norm_eps, msg, msg_len)) ||
	    (err = model_gguf_float(m, MODEL_KEY("rope.freq_base"), GGUF_DEFAULT_ROPE_THETA, false,
				    &cfg->rope_theta, msg, msg_len)))
		return err;
	err = model_gguf_rope_scaling(m, prefix, msg, msg_len);
	if (err)
		return err;

	/* The vocabulary is the tokenizer's token list; without one, the embedding's rows. */
	struct skv_gguf_str *tokens = NULL;
	uint64_t n_tokens = 0;
	err = skv_gguf_get_str_array(m->gguf, "tokenizer.ggml.tokens", &tokens, &n_tokens);
	free(tokens);
	if (err == -ENOENT) {
		const struct skv_gguf_tensor *embd = skv_gguf_find_tensor(m->gguf,
									  "token_embd.weight");
		if (!embd || embd->n_dims < 2)
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "%s: GGUF has neither tokenizer.ggml.tokens nor a 2-D"
					  " token_embd.weight to size the vocabulary", m->path);
		n_tokens = embd->dims[1];
	} else if (err == -ENOMEM) {
		return skv_errorf(msg, msg_len, err, "%s: out of memory", m->path);
	} else if (err) {
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF tokenizer.ggml.tokens is not an array of strings", m->path);
	}
	if (n_tokens > INT32_MAX)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: GGUF vocabulary of %" PRIu64 " tokens is too large", m->path,
				  n_tokens);
	cfg->vocab_size = (int32_t)n_tokens;

	err = model_check_config(cfg, m->path, "GGUF metadata", msg, msg_len);
	if (err)
		return err;

	/* Partial rotary embeddings are gptneox's: elsewhere RoPE must cover whole heads. */
	uint32_t rope_dims;
	err = skv_gguf_get_u32(m->gguf, MODEL_KEY("rope.dimension_count"), &rope_dims);
	if (err == -SKV_EFORMAT)
		return skv_errorf(msg, msg_len, err,
				  "%s: GGUF metadata key %s is not an integer", m->path, key);
	if (!err && cfg->arch == SKV_ARCH_GPTNEOX &&
	    (!rope_dims || rope_dims % 2 || rope_dims > (uint32_t)cfg->head_size))
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: GGUF %s %" PRIu32 " must be even, positive and at most the"
				  " head size %" PRId32, m->path, key, rope_dims, cfg->head_size);
	if (!err && cfg->arch == SKV_ARCH_MPT)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF %s: mpt has no rotary embedding (ALiBi)", m->path, key);
	if (!err && cfg->arch != SKV_ARCH_GPTNEOX && rope_dims != (uint32_t)cfg->head_size)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "%s: GGUF %s %" PRIu32 " differs from the head size %" PRId32,
				  m->path, key, rope_dims, cfg->head_size);
	if (!err)
		cfg->rope_dims = (int32_t)rope_dims;
#undef MODEL_KEY
	return 0;
}

/* A vector that must be present: blk.N.SUFFIX.bias, or a whole name when layer < 0. */
static int model_gguf_req_bias(const struct skv_model *m, int32_t layer, const char *suffix,
			       int64_t cols, const float **out, char *msg, size_t msg_len)
{
	char name[GGUF_NAME_MAX];

	if (layer < 0)
		snprintf(name, sizeof(name), "%s", suffix);
	else
		snprintf(name, sizeof(name), "blk.%" PRId32 ".%s.bias", layer, suffix);
	return model_gguf_vector(m, name, cols, out, msg, msg_len);
}

/* gptneox as llama.cpp's converter writes it: LayerNorms with biases, one fused attn_qkv
 * [dim + 2 kv_dim][dim] holding q, then k, then v rows (the converter undoes the Hugging Face
 * per-head interleaving), its bias likewise, biases on attn_output, ffn_up and ffn_down. q, k
 * and v are views of the fused matrix: consecutive rows, so the forward pass runs them as one
 * group as it does separate ones. */
/* falcon as llama.cpp writes it: the same fused attn_qkv (multi-query: one k and one v head),
 * one LayerNorm feeding both attention and the MLP (attn_norm_2, Falcon-40B's second one, feeds
 * the MLP when present), no biases on the linears, no ffn_norm. */
static int model_open_falcon_layer(const struct skv_model *m, int32_t l,
				   struct skv_layer_weights *lw, char *msg, size_t msg_len)
{
	char name[GGUF_NAME_MAX];
	int err;

	lw->ffn_norm = lw->attn_norm;
	lw->ffn_norm_b = lw->attn_norm_b;
	snprintf(name, sizeof(name), "blk.%" PRId32 ".attn_norm_2.weight", l);
	if (!skv_gguf_find_tensor(m->gguf, name))
		return 0;
	if ((err = model_gguf_layer_vector(m, l, "attn_norm_2", m->cfg.dim, &lw->ffn_norm, msg,
					   msg_len)) ||
	    (err = model_gguf_req_bias(m, l, "attn_norm_2", m->cfg.dim, &lw->ffn_norm_b, msg,
				       msg_len)))
		return err;
	return 0;
}

/* mpt as llama.cpp reads it: LayerNorms (biases optional: MPT-7B has none), the fused attn_qkv,
 * attn_output, ffn_up, GELU, ffn_down, each with an optional bias; sequential residual. What
 * llama.cpp also accepts but streamkv does not run is refused by name: learned positions
 * (position_embd, MPT without ALiBi), the q/k LayerNorms of qk_ln models and AWQ's activation
 * scales. */
static int model_open_mpt_layer(const struct skv_model *m, int32_t l,
				struct skv_layer_weights *lw, struct skv_qmat *qkv,
				const float **bqkv, char *msg, size_t msg_len)
{
	const int64_t dim = m->cfg.dim, hidden = m->cfg.hidden_dim, kv_dim = m->cfg.kv_dim;
	static const char *const unsupported[] = { "attn_q_norm.weight", "attn_k_norm.weight",
						   "ffn.act.scales" };
	char name[GGUF_NAME_MAX];
	int err;

	for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++) {
		snprintf(name, sizeof(name), "blk.%" PRId32 ".%s", l, unsupported[i]);
		if (skv_gguf_find_tensor(m->gguf, name))
			return skv_errorf(msg, msg_len, -SKV_EFORMAT,
					  "%s: GGUF tensor %s: this mpt layout is not supported",
					  m->path, name);
	}
	if ((err = model_gguf_layer_vector(m, l, "attn_norm", dim, &lw->attn_norm, msg,
					   msg_len)) ||
	    (err = model_gguf_bias(m, l, "attn_norm", dim, &lw->attn_norm_b, msg, msg_len)) ||
	    (err = model_gguf_layer_matrix(m, l, "attn_qkv", dim + 2 * kv_dim, dim, qkv, msg,
					   msg_len)) ||
	    (err = model_gguf_bias(m, l, "attn_qkv", dim + 2 * kv_dim, bqkv, msg, msg_len)) ||
	    (err = model_gguf_layer_matrix(m, l, "attn_output", dim, dim, &lw->wo, msg,
					   msg_len)) ||
	    (err = model_gguf_bias(m, l, "attn_output", dim, &lw->bo, msg, msg_len)) ||
	    (err = model_gguf_layer_vector(m, l, "ffn_norm", dim, &lw->ffn_norm, msg, msg_len)) ||
	    (err = model_gguf_bias(m, l, "ffn_norm", dim, &lw->ffn_norm_b, msg, msg_len)) ||
	    (err = model_gguf_layer_matrix(m, l, "ffn_up", hidden, dim, &lw->w3, msg, msg_len)) ||
	    (err = model_gguf_bias(m, l, "ffn_up", hidden, &lw->b_up, msg, msg_len)) ||
	    (err = model_gguf_layer_matrix(m, l, "ffn_down", dim, hidden, &lw->w2, msg,
					   msg_len)) ||
	    (err = model_gguf_bias(m, l, "ffn_down", dim, &lw->b_down, msg, msg_len)))
		return err;
	return 0;
}

static int model_open_gptneox(struct skv_model *m, char *msg, size_t msg_len)
{
	const struct skv_model_config *cfg = &m->cfg;
	const int64_t dim = cfg->dim, hidden = cfg->hidden_dim, kv_dim = cfg->kv_dim;
	struct skv_qmat qkv;
	const float *bqkv;
	int err;

	bool mpt = cfg->arch == SKV_ARCH_MPT;
	if (mpt && skv_gguf_find_tensor(m->gguf, "position_embd.weight"))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: GGUF tensor position_embd.weight: mpt with learned positions"
				  " instead of ALiBi is not supported", m->path);
	if ((err = model_gguf_matrix(m, "token_embd.weight", cfg->vocab_size, dim,
				     &m->token_embedding, msg, msg_len)) ||
	    (err = model_gguf_vector(m, "output_norm.weight", dim, &m->final_norm, msg, msg_len)))
		return err;
	if ((!mpt || skv_gguf_find_tensor(m->gguf, "output_norm.bias")) &&
	    (err = model_gguf_req_bias(m, -1, "output_norm.bias", dim, &m->final_norm_b, msg,
				       msg_len)))
		return err;
	for (int32_t l = 0; l < cfg->n_layers; l++) {
		struct skv_layer_weights *lw = &m->layers[l];
		bqkv = NULL;
		if (mpt) {
			if ((err = model_open_mpt_layer(m, l, lw, &qkv, &bqkv, msg, msg_len)))
				return err;
			goto views;
		}
		if (cfg->arch == SKV_ARCH_FALCON) {
			if ((err = model_gguf_layer_vector(m, l, "attn_norm", dim, &lw->attn_norm,
							   msg, msg_len)) ||
			    (err = model_gguf_req_bias(m, l, "attn_norm", dim, &lw->attn_norm_b,
						       msg, msg_len)) ||
			    (err = model_gguf_layer_matrix(m, l, "attn_qkv", dim + 2 * kv_dim, dim,
							   &qkv, msg, msg_len)) ||
			    (err = model_gguf_layer_matrix(m, l, "attn_output", dim, dim, &lw->wo,
							   msg, msg_len)) ||
			    (err = model_gguf_layer_matrix(m, l, "ffn_up", hidden, dim, &lw->w3,
							   msg, msg_len)) ||
			    (err = model_gguf_layer_matrix(m, l, "ffn_down", dim, hidden, &lw->w2,
							   msg, msg_len)) ||
			    (err = model_open_falcon_layer(m, l, lw, msg, msg_len)))
				return err;
			goto views;
		}
		if ((err = model_gguf_layer_vector(m, l, "attn_norm", dim, &lw->attn_norm, msg,
						   msg_len)) ||
		    (err = model_gguf_req_bias(m, l, "attn_norm", dim, &lw->attn_norm_b, msg,
					       msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "attn_qkv", dim + 2 * kv_dim, dim, &qkv,
						   msg, msg_len)) ||
		    (err = model_gguf_req_bias(m, l, "attn_qkv", dim + 2 * kv_dim, &bqkv, msg,
					       msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "attn_output", dim, dim, &lw->wo, msg,
						   msg_len)) ||
		    (err = model_gguf_req_bias(m, l, "attn_output", dim, &lw->bo, msg, msg_len)) ||
		    (err = model_gguf_layer_vector(m, l, "ffn_norm", dim, &lw->ffn_norm, msg,
						   msg_len)) ||
		    (err = model_gguf_req_bias(m, l, "ffn_norm", dim, &lw->ffn_norm_b, msg,
					       msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "ffn_up", hidden, dim, &lw->w3, msg,
						   msg_len)) ||
		    (err = model_gguf_req_bias(m, l, "ffn_up", hidden, &lw->b_up, msg, msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "ffn_down", dim, hidden, &lw->w2, msg,
						   msg_len)) ||
		    (err = model_gguf_req_bias(m, l, "ffn_down", dim, &lw->b_down, msg, msg_len)))
			return err;
views:;
		const char *base = qkv.data;
		lw->wq = qkv;
		lw->wq.rows = (uint32_t)dim;
		lw->wk = qkv;
		lw->wk.rows = (uint32_t)kv_dim;
		lw->wk.data = base + (size_t)dim * qkv.row_bytes;
		lw->wv = lw->wk;
		lw->wv.data = base + (size_t)(dim + kv_dim) * qkv.row_bytes;
		if (bqkv) {
			lw->bq = bqkv;
			lw->bk = bqkv + dim;
			lw->bv = bqkv + dim + kv_dim;
		}
	}
	return 0;
}

static int model_open_gguf(struct skv_model *m, enum skv_weights_mem mode, char *msg,
			   size_t msg_len)
{
	const struct skv_model_config *cfg = &m->cfg;
	int err;

	err = skv_gguf_open_mode(m->path, mode, &m->weights_mem, &m->gguf, msg, msg_len);
	if (!err)
		err = model_gguf_config(m, msg, msg_len);
	if (!err)
		err = model_alloc_layers(m, msg, msg_len);
	if (err)
		return err;

	const int64_t dim = cfg->dim, hidden = cfg->hidden_dim, kv_dim = cfg->kv_dim;
	if (cfg->arch == SKV_ARCH_GPTNEOX || cfg->arch == SKV_ARCH_FALCON ||
	    cfg->arch == SKV_ARCH_MPT) {
		err = model_open_gptneox(m, msg, msg_len);
		if (err)
			return err;
		goto classifier;
	}
	if ((err = model_gguf_matrix(m, "token_embd.weight", cfg->vocab_size, dim,
				     &m->token_embedding, msg, msg_len)) ||
	    (err = model_gguf_vector(m, "output_norm.weight", dim, &m->final_norm, msg, msg_len)))
		return err;
	for (int32_t l = 0; l < cfg->n_layers; l++) {
		struct skv_layer_weights *lw = &m->layers[l];
		if ((err = model_gguf_layer_vector(m, l, "attn_norm", dim, &lw->attn_norm, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "attn_q", dim, dim, &lw->wq, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "attn_k", kv_dim, dim, &lw->wk, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "attn_v", kv_dim, dim, &lw->wv, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "attn_output", dim, dim, &lw->wo, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_vector(m, l, "ffn_norm", dim, &lw->ffn_norm, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "ffn_gate", hidden, dim, &lw->w1, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "ffn_down", dim, hidden, &lw->w2, msg,
						   msg_len)) ||
		    (err = model_gguf_layer_matrix(m, l, "ffn_up", hidden, dim, &lw->w3, msg,
						   msg_len)) ||
		    (err = model_gguf_bias(m, l, "attn_q", dim, &lw->bq, msg, msg_len)) ||
		    (err = model_gguf_bias(m, l, "attn_k", kv_dim, &lw->bk, msg, msg_len)) ||
		    (err = model_gguf_bias(m, l, "attn_v", kv_dim, &lw->bv, msg, msg_len)))
			return err;
	}
	/* Llama 3.1 as llama.cpp converts it: the rope scaling as per-pair frequency divisors. */
	if (skv_gguf_find_tensor(m->gguf, "rope_freqs.weight") &&
	    (err = model_gguf_vector(m, "rope_freqs.weight", cfg->rope_dims / 2,
				     &m->cfg.rope_freqs, msg, msg_len)))
		return err;
classifier:
	/* No output.weight: the classifier is tied to the embedding. */
	if (!skv_gguf_find_tensor(m->gguf, "output.weight")) {
		m->classifier = m->token_embedding;
		return 0;
	}
	return model_gguf_matrix(m, "output.weight", cfg->vocab_size, dim, &m->classifier, msg,
				 msg_len);
}

int skv_model_open(const char *path, struct skv_model **out, char *msg, size_t msg_len)
{
	return skv_model_open_mode(path, SKV_WEIGHTS_MAP, out, msg, msg_len);
}

static uint64_t model_block_bytes(const struct skv_model *m);

static int model_open(const char *path, enum skv_weights_mem mode, struct skv_model **out,
		      char *msg, size_t msg_len);

int skv_model_open_mode(const char *path, enum skv_weights_mem mode, struct skv_model **out,
			char *msg, size_t msg_len)
{
	if (mode != SKV_WEIGHTS_AUTO)
		return model_open(path, mode, out, msg, msg_len);
	/* auto: an all-F32 model's matrices are packed by the runner and read from the packed
	 * copy, so only a model with SKV_WEIGHTS_HUGE_MIN bytes of block-format (and F16/BF16)
	 * matrices, read in place, is opened again on huge pages (if the kernel has them; if the
	 * copy cannot be made it stays on the mapping). */
	int err = model_open(path, SKV_WEIGHTS_MAP, out, msg, msg_len);
	if (err || model_block_bytes(*out) < SKV_WEIGHTS_HUGE_MIN)
		return err;
	struct skv_model *huge;
	char why[256];
	if (model_open(path, SKV_WEIGHTS_AUTO, &huge, why, sizeof(why)) == 0) {
		skv_model_close(*out);
		*out = huge;
	}
	return 0;
}

static int model_open(const char *path, enum skv_weights_mem mode, struct skv_model **out,
		      char *msg, size_t msg_len)
{
	struct skv_model *m;
	int err;

	*out = NULL;
	m = calloc(1, sizeof(*m));
	if (!m)
		return skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory", path);
	m->path = strdup(path);
	if (!m->path) {
		err = skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory", path);
		goto out_free;
	}
	err = skv_map_file(path, "model file", &m->map, &m->map_size, msg, msg_len);
	if (err)
		goto out_free;
	if (!m->map_size) {
		err = skv_errorf(msg, msg_len, -SKV_ETRUNCATED, "%s: empty file, not a model",
				 path);
		goto out_free;
	}

	/* The magic picks the format. A GGUF is parsed by skv_gguf_open from its own mapping,
	 * so this one is dropped; anything else must be a llama2.c file. */
	if (m->map_size >= 4 && !memcmp(m->map, "GGUF", 4)) {
		munmap((void *)m->map, m->map_size);
		m->map = NULL;
		m->map_size = 0;
		m->format = SKV_MODEL_GGUF;
		err = model_open_gguf(m, mode, msg, msg_len);
	} else {
		/* A file named .gguf without the magic is a damaged GGUF, not a llama2.c model:
		 * say so rather than report its first bytes as a nonsensical llama2.c header. */
		size_t len = strlen(path);
		if (len >= 5 && !strcasecmp(path + len - 5, ".gguf")) {
			err = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					 "%s: not a GGUF file (bad magic: the file does not start "
					 "with \"GGUF\")",
					 path);
			goto out_free;
		}
		m->format = SKV_MODEL_LLAMA2C;
		m->weights_mem = SKV_WEIGHTS_MAP;
		if (mode != SKV_WEIGHTS_MAP) {
			/* The bytes where mode says, in place of the mapping the magic was read
			 * from. */
			const void *copy;
			size_t copy_size;
			err = skv_map_file_mode(path, "model file", mode, &copy, &copy_size,
						&m->weights_mem, msg, msg_len);
			if (err)
				goto out_free;
			munmap((void *)m->map, m->map_size);
			m->map = copy;
			m->map_size = copy_size;
		}
		err = model_open_llama2c(m, msg, msg_len);
	}
	if (err)
		goto out_free;
	*out = m;
	return 0;

out_free:
	skv_model_close(m);
	return err;
}

void skv_model_close(struct skv_model *m)
{
	if (!m)
		return;
	skv_gguf_close(m->gguf);
	if (m->map)
		munmap((void *)m->map, m->map_size);
	free(m->layers);
	free(m->path);
	free(m);
}

void skv_model_embedding_row(const struct skv_model *m, int32_t row, float *dst)
{
	const struct skv_qmat *e = &m->token_embedding;
	const char *src = (const char *)e->data + (size_t)row * e->row_bytes;
	if (e->type == SKV_WTYPE_F32)
		memcpy(dst, src, (size_t)e->cols * sizeof(float));
	else
		skv_dequant_row(e->type, src, dst, e->cols); /* the loader checked type and width */
}

static void model_for_each_matrix(const struct skv_model *m,
				  void (*fn)(const struct skv_qmat *w, void *arg), void *arg)
{
	fn(&m->token_embedding, arg);
	if (m->classifier.data != m->token_embedding.data)
		fn(&m->classifier, arg);
	for (int32_t l = 0; l < m->cfg.n_layers; l++) {
		const struct skv_layer_weights *w = &m->layers[l];
		const struct skv_qmat *all[] = { &w->wq, &w->wk, &w->wv, &w->wo, &w->w1, &w->w2,
						 &w->w3 };
		for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
			if (all[i]->data) /* a GELU FFN has no gate */
				fn(all[i], arg);
	}
}

static void model_add_bytes(const struct skv_qmat *w, void *arg)
{
	*(uint64_t *)arg += w->row_bytes * w->rows;
}

static void model_add_block_bytes(const struct skv_qmat *w, void *arg)
{
	if (w->type != SKV_WTYPE_F32)
		*(uint64_t *)arg += (uint64_t)w->rows * w->row_bytes;
}

/* Bytes of the matrices that are not F32 (read in place, not packed). */
static uint64_t model_block_bytes(const struct skv_model *m)
{
	uint64_t bytes = 0;
	model_for_each_matrix(m, model_add_block_bytes, &bytes);
	return bytes;
}

uint64_t skv_model_weight_bytes(const struct skv_model *m)
{
	uint64_t bytes = 0;
	model_for_each_matrix(m, model_add_bytes, &bytes);
	return bytes;
}

/* Types seen, as a bit set over ggml numbers (all below 32). */
static void model_add_type(const struct skv_qmat *w, void *arg)
{
	*(uint32_t *)arg |= 1u << (w->type & 31);
}

void skv_model_types(const struct skv_model *m, char *buf, size_t len)
{
	uint32_t seen = 0;
	size_t used = 0;
	model_for_each_matrix(m, model_add_type, &seen);
	if (len)
		buf[0] = '\0';
	for (uint32_t t = 0; t < 32 && used < len; t++) {
		if (!(seen & (1u << t)))
			continue;
		int n = snprintf(buf + used, len - used, "%s%s", used ? "+" : "",
				 skv_wtype_name(t) ? skv_wtype_name(t) : "?");
		if (n < 0)
			break;
		used += (size_t)n;
	}
}
