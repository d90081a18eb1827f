/* GGUF reader: the shipped stories260K.gguf parses with every key and tensor where the file
 * says, and every corrupted copy (made at test time in a scratch directory) is refused with an
 * error, never a crash: Criterion runs each test in its own process, so a crash fails it. */
#include "gguf.h"
#include "model.h"
#include "skv-error.h"
#include "testutil.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GGUF_FILE "stories260K.gguf"
#define GGUF_FILE_BYTES 1185376u
#define GGUF_TENSORS 48u
#define GGUF_DATA_ALIGNMENT 32u
#define MSG_LEN 512

static void suite_fini(void)
{
	tu_scratch_cleanup();
}

TestSuite(gguf, .fini = suite_fini);

/* The shipped file's bytes. */
static uint8_t *gguf_bytes(size_t *len)
{
	uint8_t *buf = (uint8_t *)tu_read_file(tu_model_path(GGUF_FILE), len);
	cr_assert_eq(*len, GGUF_FILE_BYTES);
	return buf;
}

/* First occurrence of needle[0..n) in buf[0..len), or NULL (memmem without _GNU_SOURCE). */
static uint8_t *find_bytes(const uint8_t *buf, size_t len, const char *needle, size_t n)
{
	for (size_t i = 0; n && i + n <= len; i++) {
		if (buf[i] == (uint8_t)needle[0] && !memcmp(buf + i, needle, n))
			return (uint8_t *)(buf + i);
	}
	return NULL;
}

/* File offset of the field that follows a tensor info's name (its u32 n_dims). Tensor names
 * occur once in the file, in the tensor infos, preceded by their u64 length. */
static size_t tensor_info_after_name(const uint8_t *buf, size_t len, const char *name)
{
	size_t name_len = strlen(name);
	const uint8_t *hit = find_bytes(buf, len, name, name_len);
	uint64_t stored_len;

	cr_assert(hit != NULL, "tensor info %s not found", name);
	cr_assert_geq((size_t)(hit - buf), sizeof(stored_len));
	memcpy(&stored_len, hit - sizeof(stored_len), sizeof(stored_len));
	cr_assert_eq(stored_len, name_len);
	return (size_t)(hit - buf) + name_len;
}

/* File offset where the tensor-info section ends: after the last tensor's info. */
static size_t tensor_infos_end(const uint8_t *buf, size_t len, const char *last_name)
{
	size_t at = tensor_info_after_name(buf, len, last_name);
	uint32_t n_dims;

	memcpy(&n_dims, buf + at, sizeof(n_dims));
	cr_assert(n_dims >= 1 && n_dims <= 4);
	return at + sizeof(uint32_t) + n_dims * sizeof(uint64_t) + sizeof(uint32_t) +
	       sizeof(uint64_t);
}

/* File offset of a metadata key's value type field (after the key string). */
static size_t kv_after_key(const uint8_t *buf, size_t len, const char *key)
{
	return tensor_info_after_name(buf, len, key); /* same encoding: u64 length + bytes */
}

static void put_u32(uint8_t *buf, size_t at, uint32_t v)
{
	memcpy(buf + at, &v, sizeof(v));
}

static void put_u64(uint8_t *buf, size_t at, uint64_t v)
{
	memcpy(buf + at, &v, sizeof(v));
}

/* Opens a modified copy with skv_gguf_open; returns its result, closing on success. */
static int open_copy(const char *name, const void *buf, size_t len, char *msg)
{
	struct skv_gguf *g = NULL;
	const char *path = tu_write_scratch(name, buf, len);
	int err = skv_gguf_open(path, &g, msg, MSG_LEN);

	if (err)
		cr_assert_null(g);
	skv_gguf_close(g);
	return err;
}

static int open_model_copy(const char *name, const void *buf, size_t len, char *msg)
{
	struct skv_model *m = NULL;
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

/* A small GGUF built in memory for structures the shipped file does not have. */
struct gbuf {
	uint8_t *data;
	size_t len;
	size_t cap;
};

static void gb_bytes(struct gbuf *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		b->cap = (b->len + n) * 2 + 64;
		b->data = realloc(b->data, b->cap);
		cr_assert_not_null(b->data);
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

static void gb_u32(struct gbuf *b, uint32_t v)
{
	gb_bytes(b, &v, sizeof(v));
}

static void gb_u64(struct gbuf *b, uint64_t v)
{
	gb_bytes(b, &v, sizeof(v));
}

static void gb_str(struct gbuf *b, const char *s)
{
	gb_u64(b, strlen(s));
	gb_bytes(b, s, strlen(s));
}

static void gb_header(struct gbuf *b, uint64_t n_tensors, uint64_t n_kv)
{
	gb_bytes(b, "GGUF", 4);
	gb_u32(b, 3);
	gb_u64(b, n_tensors);
	gb_u64(b, n_kv);
}

static void gb_kv_u32(struct gbuf *b, const char *key, uint32_t v)
{
	gb_str(b, key);
	gb_u32(b, SKV_GGUF_UINT32);
	gb_u32(b, v);
}

static void gb_tensor_info(struct gbuf *b, const char *name, uint64_t cols, uint32_t type,
			   uint64_t offset)
{
	gb_str(b, name);
	gb_u32(b, 1);
	gb_u64(b, cols);
	gb_u32(b, type);
	gb_u64(b, offset);
}

static void gb_pad(struct gbuf *b, size_t alignment)
{
	while (b->len % alignment)
		gb_bytes(b, "", 1);
}

/* Deterministic generator for the fuzz loops (xorshift64). */
static uint64_t fuzz_next(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *state = x;
}

Test(gguf, parses_shipped_header)
{
	char msg[MSG_LEN] = "";
	struct skv_gguf *g = NULL;
	const char *path = tu_model_path(GGUF_FILE);
	struct skv_gguf_str arch;

	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_not_null(g);
	cr_assert_str_eq(skv_gguf_path(g), path);
	cr_assert_eq(skv_gguf_version(g), 3u);
	cr_assert_eq(skv_gguf_tensor_count(g), GGUF_TENSORS);
	cr_assert_eq(skv_gguf_get_str(g, "general.architecture", &arch), 0);
	cr_assert_eq(arch.len, 5u);
	cr_assert(memcmp(arch.ptr, "llama", 5) == 0);
	skv_gguf_close(g);
}

Test(gguf, tokenizer_arrays)
{
	struct skv_gguf *g = NULL;
	struct skv_gguf_str *tokens = NULL;
	uint64_t count = 0;
	const void *data = NULL;

	cr_assert_eq(skv_gguf_open(tu_model_path(GGUF_FILE), &g, NULL, 0), 0);
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &count), 0);
	cr_assert_eq(count, 512u);
	cr_assert(tokens[0].len == 5 && !memcmp(tokens[0].ptr, "<unk>", 5));
	cr_assert(tokens[1].len == 3 && !memcmp(tokens[1].ptr, "<s>", 3));
	cr_assert(tokens[2].len == 4 && !memcmp(tokens[2].ptr, "</s>", 4));
	for (uint64_t i = 0; i < count; i++)
		cr_assert_gt(tokens[i].len, 0u, "token %lu is empty", (unsigned long)i);
	free(tokens);

	cr_assert_eq(skv_gguf_get_array(g, "tokenizer.ggml.scores", SKV_GGUF_FLOAT32, &data,
					&count), 0);
	cr_assert_eq(count, 512u);
	cr_assert_not_null(data);
	cr_assert_eq(skv_gguf_get_array(g, "tokenizer.ggml.token_type", SKV_GGUF_INT32, &data,
					&count), 0);
	cr_assert_eq(count, 512u);
	int32_t type0, type1;
	memcpy(&type0, (const uint8_t *)data, sizeof(type0));
	memcpy(&type1, (const uint8_t *)data + 4, sizeof(type1));
	cr_assert_eq(type0, 2); /* <unk>: unknown */
	cr_assert_eq(type1, 3); /* <s>: control */
	skv_gguf_close(g);
}

Test(gguf, typed_getters)
{
	struct skv_gguf *g = NULL;
	uint32_t u = 0;
	float f = 0;

	cr_assert_eq(skv_gguf_open(tu_model_path(GGUF_FILE), &g, NULL, 0), 0);
	const struct {
		const char *key;
		uint32_t value;
	} want[] = {
		{ "llama.embedding_length", 64 },
		{ "llama.feed_forward_length", 172 },
		{ "llama.block_count", 5 },
		{ "llama.attention.head_count", 8 },
		{ "llama.attention.head_count_kv", 4 },
		{ "llama.context_length", 2048 },
		{ "llama.rope.dimension_count", 8 },
		{ "tokenizer.ggml.bos_token_id", 1 },
		{ "tokenizer.ggml.eos_token_id", 2 },
		{ "tokenizer.ggml.padding_token_id", UINT32_MAX },
	};
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		cr_assert_eq(skv_gguf_get_u32(g, want[i].key, &u), 0, "%s", want[i].key);
		cr_assert_eq(u, want[i].value, "%s = %u", want[i].key, u);
	}
	cr_assert_eq(skv_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f), 0);
	cr_assert_eq(f, 1e-5f);

	struct skv_gguf_str model;
	cr_assert_eq(skv_gguf_get_str(g, "tokenizer.ggml.model", &model), 0);
	cr_assert(model.len == 5 && !memcmp(model.ptr, "llama", 5));
	skv_gguf_close(g);
}

Test(gguf, missing_keys_are_enoent)
{
	struct skv_gguf *g = NULL;
	uint32_t u;
	float f;
	struct skv_gguf_str s, *strs;
	const void *data;
	uint64_t count;

	cr_assert_eq(skv_gguf_open(tu_model_path(GGUF_FILE), &g, NULL, 0), 0);
	cr_assert_eq(skv_gguf_get_u32(g, "general.alignment", &u), -ENOENT);
	cr_assert_eq(skv_gguf_get_u32(g, "llama.block_coun", &u), -ENOENT);
	cr_assert_eq(skv_gguf_get_u32(g, "llama.block_count.", &u), -ENOENT);
	cr_assert_eq(skv_gguf_get_u32(g, "", &u), -ENOENT);
	cr_assert_eq(skv_gguf_get_f32(g, "llama.rope.freq_base", &f), -ENOENT);
	cr_assert_eq(skv_gguf_get_str(g, "general.nothing", &s), -ENOENT);
	cr_assert_eq(skv_gguf_get_array(g, "tokenizer.ggml.merges", SKV_GGUF_INT32, &data,
					&count), -ENOENT);
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.merges", &strs, &count), -ENOENT);
	cr_assert_null(skv_gguf_find_tensor(g, "rope_freqs.weight"));
	cr_assert_null(skv_gguf_find_tensor(g, "token_embd.weigh"));
	cr_assert_null(skv_gguf_tensor_at(g, GGUF_TENSORS));
	skv_gguf_close(g);
}

Test(gguf, wrong_types_are_eformat)
{
	struct skv_gguf *g = NULL;
	uint32_t u;
	float f;
	struct skv_gguf_str s, *strs;
	const void *data;
	uint64_t count;

	cr_assert_eq(skv_gguf_open(tu_model_path(GGUF_FILE), &g, NULL, 0), 0);
	cr_assert_eq(skv_gguf_get_u32(g, "general.architecture", &u), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_u32(g, "llama.attention.layer_norm_rms_epsilon", &u),
		     -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_u32(g, "tokenizer.ggml.tokens", &u), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_f32(g, "llama.block_count", &f), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_str(g, "llama.block_count", &s), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_str(g, "tokenizer.ggml.tokens", &s), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_array(g, "tokenizer.ggml.scores", SKV_GGUF_INT32, &data,
					&count), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_array(g, "llama.block_count", SKV_GGUF_UINT32, &data, &count),
		     -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.scores", &strs, &count),
		     -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_str_array(g, "general.name", &strs, &count), -SKV_EFORMAT);
	/* Strings have no fixed size: asking get_array for them is a caller error. */
	cr_assert_eq(skv_gguf_get_array(g, "tokenizer.ggml.tokens", SKV_GGUF_STRING, &data,
					&count), -EINVAL);
	skv_gguf_close(g);
}

Test(gguf, tensors_lie_where_the_file_says)
{
	size_t len;
	uint8_t *buf = gguf_bytes(&len);
	struct skv_gguf *g = NULL;

	cr_assert_eq(skv_gguf_open(tu_model_path(GGUF_FILE), &g, NULL, 0), 0);
	size_t data_start = tensor_infos_end(buf, len, "blk.4.ffn_norm.weight");
	data_start = (data_start + GGUF_DATA_ALIGNMENT - 1) / GGUF_DATA_ALIGNMENT *
		     GGUF_DATA_ALIGNMENT;

	const struct skv_gguf_tensor *embd = skv_gguf_tensor_at(g, 0);
	cr_assert_not_null(embd);
	cr_assert(embd->name.len == 17 && !memcmp(embd->name.ptr, "token_embd.weight", 17));
	cr_assert_eq(skv_gguf_find_tensor(g, "token_embd.weight"), embd);
	cr_assert_eq(embd->n_dims, 2u);
	cr_assert_eq(embd->dims[0], 64u);
	cr_assert_eq(embd->dims[1], 512u);
	cr_assert_eq(embd->dims[2], 1u);
	cr_assert_eq(embd->dims[3], 1u);

	uint64_t end_of_data = 0;
	for (uint64_t i = 0; i < GGUF_TENSORS; i++) {
		const struct skv_gguf_tensor *t = skv_gguf_tensor_at(g, i);
		char name[80];
		cr_assert_not_null(t);
		cr_assert_lt(t->name.len, sizeof(name));
		memcpy(name, t->name.ptr, t->name.len);
		name[t->name.len] = '\0';
		cr_assert_eq(skv_gguf_find_tensor(g, name), t, "lookup of %s", name);
		cr_assert_eq(t->type, SKV_GGML_TYPE_F32, "%s", name);
		cr_assert_not_null(t->data, "%s", name);
		cr_assert_eq((uintptr_t)t->data % GGUF_DATA_ALIGNMENT, 0u, "%s", name);
		uint64_t elems = t->dims[0] * t->dims[1] * t->dims[2] * t->dims[3];
		cr_assert_eq(t->n_bytes, elems * sizeof(float), "%s", name);
		cr_assert_leq(data_start + t->offset + t->n_bytes, len, "%s", name);
		cr_assert(memcmp(t->data, buf + data_start + t->offset, t->n_bytes) == 0,
			  "%s differs from the file bytes at its offset", name);
		if (t->offset + t->n_bytes > end_of_data)
			end_of_data = t->offset + t->n_bytes;
	}
	/* The last tensor ends at the end of the file. */
	cr_assert_eq(data_start + end_of_data, len);
	skv_gguf_close(g);
	free(buf);
}

Test(gguf, missing_file_directory_and_empty)
{
	char msg[MSG_LEN] = "";
	struct skv_gguf *g = (struct skv_gguf *)&msg; /* must be reset to NULL on error */
	const char *missing = tu_model_path("no-such-file.gguf");

	cr_assert_eq(skv_gguf_open(missing, &g, msg, sizeof(msg)), -ENOENT);
	cr_assert_null(g);
	assert_msg_has(msg, missing);

	const char *empty = tu_write_scratch("empty.gguf", "", 0);
	cr_assert_eq(skv_gguf_open(empty, &g, msg, sizeof(msg)), -SKV_ETRUNCATED);
	assert_msg_has(msg, empty);
	assert_msg_has(msg, "empty");

	const char *dir = tu_scratch_dir("gguf");
	cr_assert_eq(skv_gguf_open(dir, &g, msg, sizeof(msg)), -EISDIR);
	assert_msg_has(msg, dir);
	cr_assert_null(g);
}

Test(gguf, wrong_magic)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = gguf_bytes(&len);

	buf[3] = 'G';
	cr_assert_eq(open_copy("magic.gguf", buf, len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "magic");
	cr_assert_eq(open_copy("short-magic.gguf", "GGx", 3, msg), -SKV_EFORMAT);
	free(buf);
}

Test(gguf, versions_2_and_4_are_refused)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = gguf_bytes(&len);

	put_u32(buf, 4, 2);
	cr_assert_eq(open_copy("v2.gguf", buf, len, msg), -SKV_EVERSION);
	assert_msg_has(msg, "version 2");
	assert_msg_has(msg, "only version 3");
	put_u32(buf, 4, 4);
	cr_assert_eq(open_copy("v4.gguf", buf, len, msg), -SKV_EVERSION);
	assert_msg_has(msg, "version 4");
	cr_assert_eq(open_model_copy("v4-model.gguf", buf, len, msg), -SKV_EVERSION);
	free(buf);
}

/* Every prefix of the header, metadata and tensor infos, and a sample of prefixes through the
 * data, is refused as truncated. The copy is written once and cut shorter step by step. */
Test(gguf, truncated_at_every_offset)
{
	char msg[MSG_LEN];
	size_t len;
	uint8_t *buf = gguf_bytes(&len);
	size_t infos_end = tensor_infos_end(buf, len, "blk.4.ffn_norm.weight");
	const char *path = tu_write_scratch("cut.gguf", buf, len);
	struct skv_gguf *g = NULL;

	for (size_t cut = len - 1; cut > infos_end; cut -= cut > 4099 ? 4099 : cut) {
		cr_assert_eq(truncate(path, (off_t)cut), 0);
		cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), -SKV_ETRUNCATED,
			     "cut at %zu: %s", cut, msg);
		cr_assert_null(g);
	}
	for (size_t cut = infos_end + 1; cut-- > 0;) {
		cr_assert_eq(truncate(path, (off_t)cut), 0);
		msg[0] = '\0';
		cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), -SKV_ETRUNCATED,
			     "cut at %zu: %s", cut, msg);
		cr_assert_null(g);
		cr_assert_neq(msg[0], '\0', "cut at %zu: no message", cut);
	}
	free(buf);
}

static void set_tensor_type(uint8_t *buf, size_t len, const char *name, uint32_t type)
{
	size_t at = tensor_info_after_name(buf, len, name);
	uint32_t n_dims;

	memcpy(&n_dims, buf + at, sizeof(n_dims));
	put_u32(buf, at + 4 + n_dims * 8, type);
}

static void set_tensor_dim(uint8_t *buf, size_t len, const char *name, unsigned dim,
			   uint64_t value)
{
	put_u64(buf, tensor_info_after_name(buf, len, name) + 4 + dim * 8, value);
}

/* The weight types streamkv reads load, in place, with the type the file gives; any other
 * type is refused at load with one line naming the tensor and the type. */
Test(gguf, weight_types_are_read_or_refused_as_edtype)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = gguf_bytes(&len);
	struct skv_gguf *g = NULL;
	struct skv_model *m = NULL;

	set_tensor_type(buf, len, "blk.0.attn_q.weight", 1); /* F16: half the bytes, still inside */
	cr_assert_eq(open_copy("f16.gguf", buf, len, msg), 0, "%s", msg);
	cr_assert_eq(skv_model_open(tu_write_scratch("f16-model.gguf", buf, len), &m, msg,
				    sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(m->layers[0].wq.type, 1u);
	cr_assert_eq(m->layers[0].wq.row_bytes, 64u * 2u);
	skv_model_close(m);

	set_tensor_type(buf, len, "blk.0.attn_q.weight", 2); /* Q4_0 */
	const char *path = tu_write_scratch("q4.gguf", buf, len);
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	const struct skv_gguf_tensor *t = skv_gguf_find_tensor(g, "blk.0.attn_q.weight");
	cr_assert_eq(t->type, 2u);
	cr_assert_eq(t->n_bytes, 64u * 64u / 32u * 18u);
	skv_gguf_close(g);
	cr_assert_eq(open_model_copy("q4-model.gguf", buf, len, msg), 0, "%s", msg);

	set_tensor_type(buf, len, "blk.0.attn_q.weight", 3); /* Q4_1: not read by streamkv */
	cr_assert_eq(open_model_copy("q4_1-model.gguf", buf, len, msg), -SKV_EDTYPE);
	assert_msg_has(msg, "Q4_1");
	assert_msg_has(msg, "blk.0.attn_q.weight");
	assert_msg_has(msg, "q4_1-model.gguf");

	/* A type this reader cannot size parses with data == NULL and is refused by the model. */
	set_tensor_type(buf, len, "blk.0.attn_q.weight", 200);
	path = tu_write_scratch("unknown-type.gguf", buf, len);
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_null(skv_gguf_find_tensor(g, "blk.0.attn_q.weight")->data);
	skv_gguf_close(g);
	cr_assert_eq(open_model_copy("unknown-type-model.gguf", buf, len, msg), -SKV_EDTYPE);
	assert_msg_has(msg, "unknown");

	/* Q4_0 on a row of 172 floats is not a whole number of blocks: malformed. */
	set_tensor_type(buf, len, "blk.0.attn_q.weight", 0);
	set_tensor_type(buf, len, "blk.1.ffn_down.weight", 2);
	cr_assert_eq(open_copy("q4-partial.gguf", buf, len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "blk.1.ffn_down.weight");
	free(buf);
}

Test(gguf, disagreeing_dims_are_eshape)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = gguf_bytes(&len);

	set_tensor_dim(buf, len, "blk.2.attn_k.weight", 1, 16);
	cr_assert_eq(open_copy("dims.gguf", buf, len, msg), 0, "%s", msg);
	cr_assert_eq(open_model_copy("dims-model.gguf", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "blk.2.attn_k.weight");
	assert_msg_has(msg, "[64, 16]");
	assert_msg_has(msg, "[64, 32]");
	set_tensor_dim(buf, len, "blk.2.attn_k.weight", 1, 32);

	/* The embedding must have one row per token of the vocabulary. */
	set_tensor_dim(buf, len, "token_embd.weight", 1, 256);
	cr_assert_eq(open_model_copy("embd-model.gguf", buf, len, msg), -SKV_ESHAPE);
	assert_msg_has(msg, "token_embd.weight");
	set_tensor_dim(buf, len, "token_embd.weight", 1, 512);

	/* Dimensions that make the data run past the end of the file. */
	set_tensor_dim(buf, len, "output.weight", 1, 1u << 20);
	cr_assert_eq(open_copy("past-end.gguf", buf, len, msg), -SKV_ETRUNCATED);
	assert_msg_has(msg, "output.weight");
	set_tensor_dim(buf, len, "output.weight", 1, UINT64_MAX / 2);
	cr_assert_eq(open_copy("overflow.gguf", buf, len, msg), -SKV_EFORMAT);
	set_tensor_dim(buf, len, "output.weight", 1, UINT64_MAX);
	cr_assert_eq(open_copy("negative.gguf", buf, len, msg), -SKV_EFORMAT);
	free(buf);
}

Test(gguf, huge_lengths_and_counts)
{
	char msg[MSG_LEN] = "";
	size_t len;
	uint8_t *buf = gguf_bytes(&len);
	uint8_t *copy = malloc(len);
	cr_assert_not_null(copy);

	const struct {
		const char *what;
		size_t at;
		uint64_t value;
	} edits[] = {
		{ "tensor_count", 8, UINT64_MAX },
		{ "tensor_count", 8, 1ull << 40 },
		{ "kv_count", 16, UINT64_MAX },
		{ "kv_count", 16, 1ull << 20 },
		{ "first key length", 24, UINT64_MAX },
		{ "first key length", 24, 1ull << 62 },
		{ "tokens count", kv_after_key(buf, len, "tokenizer.ggml.tokens") + 8, UINT64_MAX },
		{ "tokens count", kv_after_key(buf, len, "tokenizer.ggml.tokens") + 8, 1u << 30 },
		{ "first token length", kv_after_key(buf, len, "tokenizer.ggml.tokens") + 16,
		  UINT64_MAX - 3 },
		{ "scores count", kv_after_key(buf, len, "tokenizer.ggml.scores") + 8,
		  UINT64_MAX / 4 + 1 },
		{ "name length", kv_after_key(buf, len, "general.name") + 4, 1ull << 33 },
		{ "tensor name length", tensor_info_after_name(buf, len, "blk.3.ffn_up.weight") -
		  strlen("blk.3.ffn_up.weight") - 8, UINT64_MAX },
		{ "tensor offset", tensor_info_after_name(buf, len, "blk.3.ffn_up.weight") + 4 + 16 + 4,
		  UINT64_MAX - 31 },
	};
	for (size_t i = 0; i < sizeof(edits) / sizeof(edits[0]); i++) {
		memcpy(copy, buf, len);
		put_u64(copy, edits[i].at, edits[i].value);
		msg[0] = '\0';
		cr_assert_lt(open_copy("huge.gguf", copy, len, msg), 0, "%s = %llu accepted",
			     edits[i].what, (unsigned long long)edits[i].value);
		cr_assert_neq(msg[0], '\0');
	}

	/* An unknown value type and an unknown array element type are malformed. */
	memcpy(copy, buf, len);
	put_u32(copy, kv_after_key(buf, len, "general.name"), 13);
	cr_assert_eq(open_copy("kv-type.gguf", copy, len, msg), -SKV_EFORMAT);
	memcpy(copy, buf, len);
	put_u32(copy, kv_after_key(buf, len, "tokenizer.ggml.scores") + 4, 99);
	cr_assert_eq(open_copy("elem-type.gguf", copy, len, msg), -SKV_EFORMAT);
	/* A tensor with 5 dimensions. */
	memcpy(copy, buf, len);
	put_u32(copy, tensor_info_after_name(buf, len, "blk.0.attn_v.weight"), 5);
	cr_assert_eq(open_copy("dims5.gguf", copy, len, msg), -SKV_EFORMAT);
	free(copy);
	free(buf);
}

Test(gguf, nested_arrays)
{
	char msg[MSG_LEN] = "";
	struct gbuf b = { 0 };
	struct skv_gguf *g = NULL;
	const void *data;
	uint64_t count;

	/* [[1, 2], ["a"]]-like: an array of two arrays, one of u8 and one of strings. */
	gb_header(&b, 0, 1);
	gb_str(&b, "test.nested");
	gb_u32(&b, SKV_GGUF_ARRAY);
	gb_u32(&b, SKV_GGUF_ARRAY);
	gb_u64(&b, 2);
	gb_u32(&b, SKV_GGUF_UINT8);
	gb_u64(&b, 2);
	gb_bytes(&b, "\x01\x02", 2);
	gb_u32(&b, SKV_GGUF_STRING);
	gb_u64(&b, 1);
	gb_str(&b, "a");
	const char *path = tu_write_scratch("nested.gguf", b.data, b.len);
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	cr_assert_eq(skv_gguf_tensor_count(g), 0u);
	cr_assert_eq(skv_gguf_get_array(g, "test.nested", SKV_GGUF_UINT8, &data, &count),
		     -SKV_EFORMAT);
	skv_gguf_close(g);

	/* 100 levels of arrays: refused by the depth cap, not by the stack. */
	b.len = 0;
	gb_header(&b, 0, 1);
	gb_str(&b, "test.deep");
	gb_u32(&b, SKV_GGUF_ARRAY);
	for (int depth = 0; depth < 100; depth++) {
		gb_u32(&b, SKV_GGUF_ARRAY);
		gb_u64(&b, 1);
	}
	gb_u32(&b, SKV_GGUF_UINT8);
	gb_u64(&b, 0);
	cr_assert_eq(open_copy("deep.gguf", b.data, b.len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "deeper");
	free(b.data);
}

Test(gguf, alignment_and_duplicates)
{
	char msg[MSG_LEN] = "";
	struct gbuf b = { 0 };
	struct skv_gguf *g = NULL;
	float values[16] = { 1.0f, 2.0f };

	/* general.alignment 64: one tensor, placed at the next multiple of 64. */
	gb_header(&b, 1, 1);
	gb_kv_u32(&b, "general.alignment", 64);
	gb_tensor_info(&b, "t", 16, SKV_GGML_TYPE_F32, 0);
	gb_pad(&b, 64);
	size_t data_start = b.len;
	gb_bytes(&b, values, sizeof(values));
	const char *path = tu_write_scratch("align64.gguf", b.data, b.len);
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	const struct skv_gguf_tensor *t = skv_gguf_find_tensor(g, "t");
	cr_assert_not_null(t);
	cr_assert_eq(t->n_bytes, sizeof(values));
	cr_assert_eq((uintptr_t)t->data % 64, 0u);
	cr_assert(memcmp(t->data, values, sizeof(values)) == 0);
	cr_assert_eq(data_start % 64, 0u);
	skv_gguf_close(g);

	/* Alignment that is not a power of two, or zero. */
	put_u32(b.data, 24 + 8 + strlen("general.alignment") + 4, 48);
	cr_assert_eq(open_copy("align48.gguf", b.data, b.len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "alignment");
	put_u32(b.data, 24 + 8 + strlen("general.alignment") + 4, 0);
	cr_assert_eq(open_copy("align0.gguf", b.data, b.len, msg), -SKV_EFORMAT);

	/* A tensor offset that is not a multiple of the alignment. */
	free(b.data);
	b = (struct gbuf){ 0 };
	gb_header(&b, 2, 0);
	gb_tensor_info(&b, "a", 4, SKV_GGML_TYPE_F32, 0);
	gb_tensor_info(&b, "b", 4, SKV_GGML_TYPE_F32, 16);
	gb_pad(&b, GGUF_DATA_ALIGNMENT);
	gb_bytes(&b, values, sizeof(values));
	cr_assert_eq(open_copy("misaligned.gguf", b.data, b.len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "'b'");

	/* Duplicate tensor names and duplicate keys. */
	free(b.data);
	b = (struct gbuf){ 0 };
	gb_header(&b, 2, 0);
	gb_tensor_info(&b, "a", 4, SKV_GGML_TYPE_F32, 0);
	gb_tensor_info(&b, "a", 4, SKV_GGML_TYPE_F32, 32);
	gb_pad(&b, GGUF_DATA_ALIGNMENT);
	gb_bytes(&b, values, sizeof(values));
	gb_bytes(&b, values, sizeof(values));
	cr_assert_eq(open_copy("dup-tensor.gguf", b.data, b.len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "duplicate tensor");

	free(b.data);
	b = (struct gbuf){ 0 };
	gb_header(&b, 0, 2);
	gb_kv_u32(&b, "k", 1);
	gb_kv_u32(&b, "k", 2);
	cr_assert_eq(open_copy("dup-key.gguf", b.data, b.len, msg), -SKV_EFORMAT);
	assert_msg_has(msg, "duplicate metadata key");

	/* A tensor name longer than 64 bytes. */
	free(b.data);
	b = (struct gbuf){ 0 };
	gb_header(&b, 1, 0);
	gb_tensor_info(&b, "a-very-long-tensor-name-that-goes-on-and-on-past-the-64-byte-limit",
		       4, SKV_GGML_TYPE_F32, 0);
	gb_pad(&b, GGUF_DATA_ALIGNMENT);
	gb_bytes(&b, values, sizeof(values));
	cr_assert_eq(open_copy("long-name.gguf", b.data, b.len, msg), -SKV_EFORMAT);

	/* Integer conversion: a u64 that fits u32 is converted, one that does not is refused. */
	free(b.data);
	b = (struct gbuf){ 0 };
	gb_header(&b, 0, 3);
	gb_str(&b, "small");
	gb_u32(&b, SKV_GGUF_UINT64);
	gb_u64(&b, 7);
	gb_str(&b, "big");
	gb_u32(&b, SKV_GGUF_UINT64);
	gb_u64(&b, 1ull << 32);
	gb_str(&b, "negative");
	gb_u32(&b, SKV_GGUF_INT32);
	gb_u32(&b, (uint32_t)-1);
	path = tu_write_scratch("ints.gguf", b.data, b.len);
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	uint32_t u = 0;
	cr_assert_eq(skv_gguf_get_u32(g, "small", &u), 0);
	cr_assert_eq(u, 7u);
	cr_assert_eq(skv_gguf_get_u32(g, "big", &u), -SKV_EFORMAT);
	cr_assert_eq(skv_gguf_get_u32(g, "negative", &u), -SKV_EFORMAT);
	skv_gguf_close(g);
	free(b.data);
}

/* Random single-byte mutations of the header, metadata and tensor infos, with a fixed seed:
 * each is parsed (and, if it parses, loaded as a model) without crashing. The copy is
 * written once; each mutation is written in place and undone. */
Test(gguf, fuzz_single_byte_mutations)
{
	char msg[MSG_LEN];
	size_t len;
	uint8_t *buf = gguf_bytes(&len);
	size_t infos_end = tensor_infos_end(buf, len, "blk.4.ffn_norm.weight");
	const char *path = tu_write_scratch("fuzz.gguf", buf, len);
	uint64_t state = 0x5eed5eed12345678ull;
	unsigned parsed = 0, refused = 0;

	int fd = open(path, O_WRONLY);
	cr_assert_geq(fd, 0);
	for (int i = 0; i < 4000; i++) {
		size_t at = (size_t)(fuzz_next(&state) % infos_end);
		uint8_t byte = (uint8_t)fuzz_next(&state);
		if (byte == buf[at])
			byte ^= 0xff;
		cr_assert_eq(pwrite(fd, &byte, 1, (off_t)at), 1);

		struct skv_gguf *g = NULL;
		msg[0] = '\0';
		int err = skv_gguf_open(path, &g, msg, sizeof(msg));
		if (err) {
			cr_assert_lt(err, 0);
			cr_assert_null(g);
			cr_assert_neq(msg[0], '\0', "mutation %d at %zu: no message", i, at);
			refused++;
		} else {
			struct skv_gguf_str *tokens = NULL;
			uint64_t count;
			if (!skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &count))
				free(tokens);
			skv_gguf_close(g);
			struct skv_model *m = NULL;
			err = skv_model_open(path, &m, msg, sizeof(msg));
			cr_assert_leq(err, 0);
			skv_model_close(m);
			parsed++;
		}
		cr_assert_eq(pwrite(fd, &buf[at], 1, (off_t)at), 1);
	}
	close(fd);
	/* Both outcomes occur: the mutations reach past the first checks. */
	cr_assert_gt(parsed, 0u);
	cr_assert_gt(refused, 0u);
	free(buf);
}

Test(gguf, random_garbage)
{
	char msg[MSG_LEN];
	uint64_t state = 0x0123456789abcdefull;
	uint8_t garbage[8192];

	for (int round = 0; round < 200; round++) {
		size_t n = (size_t)(fuzz_next(&state) % sizeof(garbage)) + 1;
		for (size_t i = 0; i < n; i++)
			garbage[i] = (uint8_t)fuzz_next(&state);
		/* Half the rounds get a valid header prefix so the parser goes past the magic. */
		if (round % 2 && n >= 8) {
			memcpy(garbage, "GGUF", 4);
			put_u32(garbage, 4, 3);
		}
		msg[0] = '\0';
		cr_assert_lt(open_copy("garbage.gguf", garbage, n, msg), 0, "round %d", round);
		cr_assert_neq(msg[0], '\0');
		cr_assert_lt(open_model_copy("garbage.bin", garbage, n, msg), 0, "round %d", round);
	}
}
