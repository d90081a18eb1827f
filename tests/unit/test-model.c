/* Model loading: the shipped stories260K in both formats gives the same configuration and
 * bit-identical weights; corrupted copies (made at test time) are refused with a message that
 * names the file and the fault. */
#include "gguf.h"
#include "model.h"
#include "skv-error.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A model matrix stored as F32, as a float pointer. */
#define W(mat) ((const float *)(mat).data)

#define BIN_FILE "stories260K.bin"
#define GGUF_FILE "stories260K.gguf"
#define BIN_FILE_BYTES 1056540u
#define BIN_HEADER_BYTES 28u
#define MSG_LEN 512

/* llama2.c header fields, in file order. */
enum { H_DIM, H_HIDDEN, H_LAYERS, H_HEADS, H_KV_HEADS, H_VOCAB, H_SEQ };

static void suite_fini(void)
{
	tu_scratch_cleanup();
}

TestSuite(model, .fini = suite_fini);

/* First occurrence of needle[0..n) in buf[0..len), or NULL (memmem without _GNU_SOURCE). */
static uint8_t *find_bytes(const uint8_t *buf, size_t len, const char *needle, size_t n)
{
	for (size_t i = 0; n && i + n <= len; i++) {
		if (buf[i] == (uint8_t)needle[0] && !memcmp(buf + i, needle, n))
			return (uint8_t *)(buf + i);
	}
	return NULL;
}

static uint8_t *bin_bytes(size_t *len)
{
	uint8_t *buf = (uint8_t *)tu_read_file(tu_model_path(BIN_FILE), len);
	cr_assert_eq(*len, BIN_FILE_BYTES);
	return buf;
}

static void set_header(uint8_t *buf, int field, int32_t value)
{
	memcpy(buf + field * sizeof(int32_t), &value, sizeof(value));
}

static struct skv_model *open_ok(const char *path)
{
	char msg[MSG_LEN] = "";
	struct skv_model *m = NULL;

	cr_assert_eq(skv_model_open(path, &m, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_not_null(m);
	return m;
}

/* Opens a modified copy; returns the result and leaves the message in msg. */
static int open_copy(const char *name, const void *buf, size_t len, char *msg)
{
	struct skv_model *m = (struct skv_model *)&m; /* must be reset to NULL on error */
	const char *path = tu_write_scratch(name, buf, len);
	int err = skv_model_open(path, &m, msg, MSG_LEN);

	if (err)
		cr_assert_null(m);
	skv_model_close(m);
	return err;
}

static void assert_msg_has(const char *msg, const char *part)
{
	cr_assert(strstr(msg, part) != NULL, "message \"%s\" lacks \"%s\"", msg, part);
}

static void assert_stories260k_config(const struct skv_model_config *cfg)
{
	cr_assert_eq(cfg->dim, 64);
	cr_assert_eq(cfg->hidden_dim, 172);
	cr_assert_eq(cfg->n_layers, 5);
	cr_assert_eq(cfg->n_heads, 8);
	cr_assert_eq(cfg->n_kv_heads, 4);
	cr_assert_eq(cfg->vocab_size, 512);
	cr_assert_eq(cfg->head_size, 8);
	cr_assert_eq(cfg->kv_dim, 32);
	cr_assert_eq(cfg->norm_eps, 1e-5f);
	cr_assert_eq(cfg->rope_theta, 10000.0f);
}

Test(model, bin_loads_with_exact_config)
{
	const char *path = tu_model_path(BIN_FILE);
	struct skv_model *m = open_ok(path);
	const float *base = (const float *)((const char *)m->map + BIN_HEADER_BYTES);

	cr_assert_eq(m->format, SKV_MODEL_LLAMA2C);
	assert_stories260k_config(&m->cfg);
	cr_assert_eq(m->cfg.seq_len, 512);
	cr_assert_str_eq(m->path, path);
	cr_assert_null(m->gguf);
	cr_assert_eq(m->map_size, BIN_FILE_BYTES);

	/* llama2.c order: embedding, rms_att[L], wq[L], ... with this model's sizes. */
	const size_t d = 64, h = 172, kv = 32, L = 5, vocab = 512, seq = 512;
	cr_assert_eq(W(m->token_embedding), base);
	cr_assert_eq(m->layers[0].attn_norm, base + vocab * d);
	cr_assert_eq(m->layers[1].attn_norm, base + vocab * d + d);
	cr_assert_eq(W(m->layers[0].wq), base + vocab * d + L * d);
	cr_assert_eq(W(m->layers[4].w3) + h * d,
		     base + vocab * d + 2 * L * d + 2 * L * d * d + 2 * L * kv * d + 3 * L * h * d);
	cr_assert_eq(m->final_norm, W(m->layers[4].w3) + h * d);
	/* rms_final, then the two freq_cis tables fill the file exactly. */
	cr_assert_eq((const char *)(m->final_norm + d + seq * 8), (const char *)m->map + m->map_size);
	/* vocab_size > 0: the classifier is the embedding. */
	cr_assert_eq(W(m->classifier), W(m->token_embedding));
	skv_model_close(m);
}

/* The GGUF's llama.context_length is 2048 although the model was trained at 512: seq_len
 * reports what the file says; everything else equals the .bin's configuration. */
Test(model, gguf_loads_with_the_same_config)
{
	const char *path = tu_model_path(GGUF_FILE);
	struct skv_model *m = open_ok(path);

	cr_assert_eq(m->format, SKV_MODEL_GGUF);
	assert_stories260k_config(&m->cfg);
	cr_assert_eq(m->cfg.seq_len, 2048);
	cr_assert_str_eq(m->path, path);
	cr_assert_not_null(m->gguf);
	cr_assert_null(m->map);
	/* This GGUF stores output.weight explicitly (a copy of the embedding). */
	cr_assert_not_null(skv_gguf_find_tensor(m->gguf, "output.weight"));
	cr_assert_neq(W(m->classifier), W(m->token_embedding));
	cr_assert(memcmp(W(m->classifier), W(m->token_embedding), 512 * 64 * sizeof(float)) == 0);
	skv_model_close(m);
}

/* The .bin weight that a GGUF tensor name stands for, and its float count; NULL if none. */
static const float *bin_tensor(const struct skv_model *bin, const char *name, size_t *count)
{
	const struct skv_model_config *c = &bin->cfg;
	const size_t d = (size_t)c->dim, h = (size_t)c->hidden_dim, kv = (size_t)c->kv_dim;
	int layer, used = 0;
	char suffix[32];

	if (!strcmp(name, "token_embd.weight") || !strcmp(name, "output.weight")) {
		*count = (size_t)c->vocab_size * d;
		return !strcmp(name, "output.weight") ? W(bin->classifier) : W(bin->token_embedding);
	}
	if (!strcmp(name, "output_norm.weight")) {
		*count = d;
		return bin->final_norm;
	}
	if (sscanf(name, "blk.%d.%31[a-z_].weight%n", &layer, suffix, &used) != 2 ||
	    (size_t)used != strlen(name) || layer < 0 || layer >= c->n_layers)
		return NULL;
	const struct skv_layer_weights *lw = &bin->layers[layer];
	const struct {
		const char *suffix;
		const float *data;
		size_t count;
	} table[] = {
		{ "attn_norm", lw->attn_norm, d },  { "attn_q", W(lw->wq), d * d },
		{ "attn_k", W(lw->wk), kv * d },       { "attn_v", W(lw->wv), kv * d },
		{ "attn_output", W(lw->wo), d * d },   { "ffn_norm", lw->ffn_norm, d },
		{ "ffn_gate", W(lw->w1), h * d },      { "ffn_down", W(lw->w2), d * h },
		{ "ffn_up", W(lw->w3), h * d },
	};
	for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
		if (!strcmp(suffix, table[i].suffix)) {
			*count = table[i].count;
			return table[i].data;
		}
	}
	return NULL;
}

/* Every one of the GGUF's 48 tensors equals the .bin's tensor bit for bit: this llama2.c-
 * converted GGUF needs no Q/K row permutation. */
Test(model, every_tensor_equals_between_formats)
{
	struct skv_model *bin = open_ok(tu_model_path(BIN_FILE));
	struct skv_model *gguf = open_ok(tu_model_path(GGUF_FILE));
	uint64_t n = skv_gguf_tensor_count(gguf->gguf);

	cr_assert_eq(n, 48u);
	for (uint64_t i = 0; i < n; i++) {
		const struct skv_gguf_tensor *t = skv_gguf_tensor_at(gguf->gguf, i);
		char name[80];
		size_t count = 0;
		cr_assert_lt(t->name.len, sizeof(name));
		memcpy(name, t->name.ptr, t->name.len);
		name[t->name.len] = '\0';
		const float *want = bin_tensor(bin, name, &count);
		cr_assert_not_null(want, "GGUF tensor %s has no .bin counterpart", name);
		cr_assert_eq(t->n_bytes, count * sizeof(float), "%s", name);
		cr_assert(memcmp(t->data, want, t->n_bytes) == 0, "%s differs from the .bin", name);
	}

	/* And the model structs agree pointer by pointer in content. */
	const size_t d = 64, h = 172, kv = 32;
	cr_assert(!memcmp(W(bin->token_embedding), W(gguf->token_embedding), 512 * d * sizeof(float)));
	cr_assert(!memcmp(W(bin->classifier), W(gguf->classifier), 512 * d * sizeof(float)));
	cr_assert(!memcmp(bin->final_norm, gguf->final_norm, d * sizeof(float)));
	for (int l = 0; l < 5; l++) {
		const struct skv_layer_weights *a = &bin->layers[l], *b = &gguf->layers[l];
		cr_assert(!memcmp(a->attn_norm, b->attn_norm, d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->wq), W(b->wq), d * d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->wk), W(b->wk), kv * d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->wv), W(b->wv), kv * d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->wo), W(b->wo), d * d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(a->ffn_norm, b->ffn_norm, d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->w1), W(b->w1), h * d * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->w2), W(b->w2), d * h * sizeof(float)), "layer %d", l);
		cr_assert(!memcmp(W(a->w3), W(b->w3), h * d * sizeof(float)), "layer %d", l);
	}
	skv_model_close(gguf);
	skv_model_close(bin);
}

/* Without output.weight, a GGUF's classifier is tied to the embedding. The copy renames the
 * tensor (same length) so that it is ignored. */
Test(model, gguf_without_output_is_tied)
{
	size_t len;
	uint8_t *buf = (uint8_t *)tu_read_file(tu_model_path(GGUF_FILE), &len);
	uint8_t *hit = find_bytes(buf, len, "output.weight", strlen("output.weight"));

	cr_assert_not_null(hit);
	hit[5] = 'x';
	struct skv_model *m = open_ok(tu_write_scratch("tied.gguf", buf, len));
	cr_assert_null(skv_gguf_find_tensor(m->gguf, "output.weight"));
	cr_assert_eq(W(m->classifier), W(m->token_embedding));
	skv_model_close(m);
	free(buf);
}

/* A negative vocab_size means a separate classifier after the freq_cis tables. */
Test(model, bin_with_separate_classifier)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = bin_bytes(&len);
	size_t classifier_bytes = 512 * 64 * sizeof(float);
	uint8_t *bigger = malloc(len + classifier_bytes);

	cr_assert_not_null(bigger);
	set_header(buf, H_VOCAB, -512);
	/* Without the classifier the file is short. */
	cr_assert_eq(open_copy("sep-short.bin", buf, len, msg), -SKV_ETRUNCATED);
	assert_msg_has(msg, "1187612"); /* bytes the header implies */

	memcpy(bigger, buf, len);
	float *cls = (float *)(bigger + len);
	for (size_t i = 0; i < 512 * 64; i++)
		cls[i] = (float)i;
	struct skv_model *m = open_ok(tu_write_scratch("sep.bin", bigger, len + classifier_bytes));
	cr_assert_eq(m->cfg.vocab_size, 512);
	cr_assert_neq(W(m->classifier), W(m->token_embedding));
	cr_assert_eq((const char *)W(m->classifier), (const char *)m->map + len);
	cr_assert_eq(W(m->classifier)[511 * 64 + 63], (float)(511 * 64 + 63));
	skv_model_close(m);
	free(bigger);
	free(buf);
}

Test(model, missing_empty_and_directory)
{
	char msg[MSG_LEN] = "";
	struct skv_model *m = (struct skv_model *)&m;
	const char *missing = tu_model_path("no-such-model.bin");

	cr_assert_eq(skv_model_open(missing, &m, msg, sizeof(msg)), -ENOENT);
	cr_assert_null(m);
	assert_msg_has(msg, missing);
	assert_msg_has(msg, "cannot open");

	const char *empty = tu_write_scratch("empty.bin", "", 0);
	cr_assert_eq(skv_model_open(empty, &m, msg, sizeof(msg)), -SKV_ETRUNCATED);
	assert_msg_has(msg, empty);
	assert_msg_has(msg, "empty");

	const char *dir = tu_scratch_dir("model");
	cr_assert_eq(skv_model_open(dir, &m, msg, sizeof(msg)), -EISDIR);
	assert_msg_has(msg, dir);
	cr_assert_null(m);
}

/* Every prefix of the header and a sample of prefixes through the weights is refused as
 * truncated; the copy is written once and cut shorter step by step. */
Test(model, bin_truncated_at_every_header_offset_and_through_data)
{
	char msg[MSG_LEN];
	size_t len;
	uint8_t *buf = bin_bytes(&len);
	const char *path = tu_write_scratch("cut.bin", buf, len);
	struct skv_model *m = NULL;

	for (size_t cut = len - 1; cut > BIN_HEADER_BYTES; cut -= cut > 997 ? 997 : cut - 1) {
		cr_assert_eq(truncate(path, (off_t)cut), 0);
		cr_assert_eq(skv_model_open(path, &m, msg, sizeof(msg)), -SKV_ETRUNCATED,
			     "cut at %zu: %s", cut, msg);
		assert_msg_has(msg, path);
		if (cut == len - 1)
			assert_msg_has(msg, "1056540");
	}
	for (size_t cut = BIN_HEADER_BYTES + 1; cut-- > 0;) {
		cr_assert_eq(truncate(path, (off_t)cut), 0);
		cr_assert_eq(skv_model_open(path, &m, msg, sizeof(msg)), -SKV_ETRUNCATED,
			     "cut at %zu: %s", cut, msg);
		cr_assert_null(m);
		assert_msg_has(msg, path);
	}
	free(buf);
}

Test(model, bin_bigger_file_is_eshape)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = bin_bytes(&len);
	uint8_t *bigger = calloc(1, len + 4);

	cr_assert_not_null(bigger);
	memcpy(bigger, buf, len);
	cr_assert_eq(open_copy("plus1.bin", bigger, len + 1, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "disagree with data size");
	assert_msg_has(msg, "plus1.bin");
	cr_assert_eq(open_copy("plus4.bin", bigger, len + 4, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "1056540");
	assert_msg_has(msg, "1056544");
	free(bigger);
	free(buf);
}

Test(model, bin_nonpositive_dims_are_eformat)
{
	static const char *const field_names[] = {
		"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len",
	};
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = bin_bytes(&len);

	for (int field = H_DIM; field <= H_SEQ; field++) {
		/* A negative vocab_size is legal (separate classifier); INT32_MIN is not. */
		const int32_t bad[] = { 0, field == H_VOCAB ? INT32_MIN : -1 };
		int32_t saved;
		memcpy(&saved, buf + field * 4, sizeof(saved));
		for (size_t i = 0; i < 2; i++) {
			set_header(buf, field, bad[i]);
			cr_assert_eq(open_copy("dims.bin", buf, len, msg), -SKV_EFORMAT,
				     "%s = %d: %s", field_names[field], bad[i], msg);
			assert_msg_has(msg, "dims.bin");
			assert_msg_has(msg, field_names[field]);
			assert_msg_has(msg, "must be positive");
		}
		set_header(buf, field, saved);
	}
	free(buf);
}

Test(model, bin_inconsistent_heads_are_eshape)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = bin_bytes(&len);

	set_header(buf, H_HEADS, 7);
	cr_assert_eq(open_copy("heads7.bin", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "heads7.bin");
	assert_msg_has(msg, "not divisible by n_heads 7");

	set_header(buf, H_HEADS, 8);
	set_header(buf, H_KV_HEADS, 3);
	cr_assert_eq(open_copy("kv3.bin", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "not a multiple of n_kv_heads 3");
	set_header(buf, H_KV_HEADS, 16);
	cr_assert_eq(open_copy("kv16.bin", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "n_kv_heads 16");

	/* 64 heads of one component: RoPE needs pairs. */
	set_header(buf, H_HEADS, 64);
	set_header(buf, H_KV_HEADS, 64);
	cr_assert_eq(open_copy("odd-head.bin", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "odd");
	free(buf);
}

Test(model, bin_absurd_and_overflowing_dims)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = bin_bytes(&len);

	/* Sizes that overflow 64 bits. */
	set_header(buf, H_DIM, 1 << 30);
	set_header(buf, H_HIDDEN, 1 << 30);
	set_header(buf, H_LAYERS, 1 << 30);
	set_header(buf, H_HEADS, 1 << 20);
	set_header(buf, H_KV_HEADS, 1 << 20);
	cr_assert_eq(open_copy("overflow.bin", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "overflow.bin");
	assert_msg_has(msg, "overflow a 64-bit size");

	set_header(buf, H_DIM, INT32_MAX - 1);
	set_header(buf, H_HIDDEN, INT32_MAX);
	set_header(buf, H_LAYERS, INT32_MAX);
	set_header(buf, H_HEADS, 1);
	set_header(buf, H_KV_HEADS, 1);
	set_header(buf, H_VOCAB, INT32_MAX);
	set_header(buf, H_SEQ, INT32_MAX);
	cr_assert_eq(open_copy("overflow-max.bin", buf, len, msg), -SKV_ESHAPE);

	/* Large but representable: the file is far too short. */
	set_header(buf, H_DIM, 65536);
	set_header(buf, H_HIDDEN, 65536);
	set_header(buf, H_LAYERS, 1000);
	set_header(buf, H_HEADS, 512);
	set_header(buf, H_KV_HEADS, 512);
	set_header(buf, H_VOCAB, 512);
	set_header(buf, H_SEQ, 512);
	cr_assert_eq(open_copy("huge.bin", buf, len, msg), -SKV_ETRUNCATED);
	assert_msg_has(msg, "huge.bin");
	assert_msg_has(msg, "the file has 1056540");
	free(buf);
}

/* GGUF faults that only the model loader sees: metadata it needs. */
Test(model, gguf_metadata_faults)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = (uint8_t *)tu_read_file(tu_model_path(GGUF_FILE), &len);
	uint8_t *copy = malloc(len);
	cr_assert_not_null(copy);

	/* general.architecture = "mamba" (same length as "llama"). */
	memcpy(copy, buf, len);
	uint8_t *arch = find_bytes(copy, len, "general.architecture", 20);
	cr_assert_not_null(arch);
	memcpy(arch + 20 + 4 + 8, "mamba", 5);
	cr_assert_eq(open_copy("mamba.gguf", copy, len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "mamba.gguf");
	assert_msg_has(msg, "architecture 'mamba' is not supported");

	/* A required key renamed away. */
	memcpy(copy, buf, len);
	uint8_t *key = find_bytes(copy, len, "llama.block_count", 17);
	cr_assert_not_null(key);
	key[16] = 'x';
	cr_assert_eq(open_copy("no-blocks.gguf", copy, len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "llama.block_count is missing");

	/* Without head_count_kv, n_kv_heads defaults to head_count; attn_k then disagrees. */
	memcpy(copy, buf, len);
	key = find_bytes(copy, len, "llama.attention.head_count_kv", 29);
	cr_assert_not_null(key);
	key[28] = 'x';
	cr_assert_eq(open_copy("no-kv-heads.gguf", copy, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "blk.0.attn_k.weight has shape [64, 32], expected [64, 64]");

	/* head_count 7 does not divide 64. */
	memcpy(copy, buf, len);
	key = find_bytes(copy, len, "llama.attention.head_count\x04", 27);
	cr_assert_not_null(key);
	uint32_t seven = 7;
	memcpy(key + 26 + 4, &seven, sizeof(seven));
	cr_assert_eq(open_copy("heads7.gguf", copy, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "not divisible by n_heads 7");

	/* A tensor the model needs renamed away. */
	memcpy(copy, buf, len);
	key = find_bytes(copy, len, "blk.3.ffn_up.weight", 19);
	cr_assert_not_null(key);
	key[8] = 'x';
	cr_assert_eq(open_copy("no-up.gguf", copy, len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "blk.3.ffn_up.weight is missing");
	free(copy);
	free(buf);
}
