/* GGUF v3 reader: maps the file, validates it once, then answers lookups from the mapping.
 *
 * Validation order follows the file: header, metadata key/value pairs, tensor infos, then the
 * data section. Every length or count read from the file is checked against the bytes that
 * remain before it is used, with overflow-checked arithmetic, so a truncated or hostile file
 * ends in an error at the first structure that does not fit. Nothing after skv_gguf_open()
 * parses untrusted lengths again except skv_gguf_get_str_array(), which re-walks a string
 * array that open already walked and still bounds-checks it.
 *
 * The mapping is MAP_PRIVATE and read-only. Like every mmap-based reader, a file truncated by
 * another process while mapped raises SIGBUS on access; model files are expected to be
 * immutable while served. */
#include "gguf.h"
#include "mapfile.h"

#include "skv-error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader reads little-endian fields in place"
#endif

#define GGUF_MAGIC "GGUF"
#define GGUF_SUPPORTED_VERSION 3u
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_DIMS 4u
#define GGUF_MAX_NAME 64u        /* tensor names, per the specification */
#define GGUF_MAX_ARRAY_DEPTH 8u  /* arrays of arrays: more is hostile, not useful */

/* Bytes of the fixed header: magic, u32 version, u64 tensor_count, u64 metadata_kv_count. */
#define GGUF_HEADER_BYTES 24u
/* The smallest possible encodings, used to cap counts by the bytes that remain. A metadata
 * entry is a key string (u64 length), a u32 type and at least a one-byte value; a tensor info
 * is a name string, u32 n_dims, at least one u64 dimension, u32 type and u64 offset. An array
 * element that is itself a string or an array needs at least 8 or 12 bytes. */
#define GGUF_MIN_KV_BYTES 13u
#define GGUF_MIN_TENSOR_INFO_BYTES 32u
#define GGUF_MIN_STRING_BYTES 8u
#define GGUF_MIN_ARRAY_BYTES 12u

/* One metadata entry. Scalars and arrays of fixed-size elements point into the mapping. */
struct gguf_kv {
	struct skv_gguf_str key;
	uint32_t type;             /* enum skv_gguf_type */
	uint32_t elem_type;        /* arrays only */
	uint64_t count;            /* arrays only: elements */
	const uint8_t *value;      /* scalar bytes, string bytes, or an array's first element */
	uint64_t value_len;        /* strings only: bytes */
	const uint8_t *encoded;    /* the entry after its key: u32 type, then the value */
	uint64_t encoded_len;
};

struct skv_gguf {
	char *path;
	const uint8_t *map;                        /* whole file, PROT_READ */
	size_t map_size;
	uint32_t version;
	uint64_t alignment;                        /* general.alignment, a power of two */
	uint64_t data_offset;                      /* file offset of the data section */
	uint64_t kv_count;
	struct gguf_kv *kvs;                       /* [kv_count], sorted by key */
	uint64_t tensor_count;
	struct skv_gguf_tensor *tensors;           /* [tensor_count], file order */
	const struct skv_gguf_tensor **by_name;    /* [tensor_count], sorted by name */
};

/* The parse position plus what is being parsed, for messages. */
struct gguf_cursor {
	const uint8_t *base;
	uint64_t size;
	uint64_t pos;
	const char *path;
	char what[128];
	char *msg;
	size_t msg_len;
};

/* ggml block geometry of the types whose size is known here; other types parse, but their
 * tensors get data == NULL. */
struct gguf_type_info {
	const char *name;
	uint32_t block_elems;
	uint32_t block_bytes;
};

static const struct gguf_type_info gguf_types[] = {
	[0] = { "F32", 1, 4 },
	[1] = { "F16", 1, 2 },
	[2] = { "Q4_0", 32, 18 },
	[3] = { "Q4_1", 32, 20 },
	[6] = { "Q5_0", 32, 22 },
	[7] = { "Q5_1", 32, 24 },
	[8] = { "Q8_0", 32, 34 },
	[9] = { "Q8_1", 32, 36 },
	[10] = { "Q2_K", 256, 84 },
	[11] = { "Q3_K", 256, 110 },
	[12] = { "Q4_K", 256, 144 },
	[13] = { "Q5_K", 256, 176 },
	[14] = { "Q6_K", 256, 210 },
	[15] = { "Q8_K", 256, 292 },
	[24] = { "I8", 1, 1 },
	[25] = { "I16", 1, 2 },
	[26] = { "I32", 1, 4 },
	[27] = { "I64", 1, 8 },
	[28] = { "F64", 1, 8 },
	[30] = { "BF16", 1, 2 },
};

static const struct gguf_type_info *gguf_type_info(uint32_t type)
{
	if (type >= sizeof(gguf_types) / sizeof(gguf_types[0]) || !gguf_types[type].name)
		return NULL;
	return &gguf_types[type];
}

const char *skv_gguf_ggml_type_name(uint32_t ggml_type)
{
	const struct gguf_type_info *info = gguf_type_info(ggml_type);
	return info ? info->name : "unknown";
}

/* Size of a fixed-size metadata value type; 0 for strings, arrays and unknown types. */
static uint64_t gguf_value_size(uint32_t type)
{
	switch (type) {
	case SKV_GGUF_UINT8:
	case SKV_GGUF_INT8:
	case SKV_GGUF_BOOL:
		return 1;
	case SKV_GGUF_UINT16:
	case SKV_GGUF_INT16:
		return 2;
	case SKV_GGUF_UINT32:
	case SKV_GGUF_INT32:
	case SKV_GGUF_FLOAT32:
		return 4;
	case SKV_GGUF_UINT64:
	case SKV_GGUF_INT64:
	case SKV_GGUF_FLOAT64:
		return 8;
	default:
		return 0;
	}
}

static int gguf_str_cmp(const struct skv_gguf_str *a, const struct skv_gguf_str *b)
{
	uint64_t n = a->len < b->len ? a->len : b->len;
	int c = n ? memcmp(a->ptr, b->ptr, n) : 0;

	if (c)
		return c;
	return a->len < b->len ? -1 : a->len > b->len;
}

static int gguf_kv_cmp(const void *a, const void *b)
{
	return gguf_str_cmp(&((const struct gguf_kv *)a)->key, &((const struct gguf_kv *)b)->key);
}

static int gguf_tensor_ptr_cmp(const void *a, const void *b)
{
	const struct skv_gguf_tensor *ta = *(const struct skv_gguf_tensor *const *)a;
	const struct skv_gguf_tensor *tb = *(const struct skv_gguf_tensor *const *)b;
	return gguf_str_cmp(&ta->name, &tb->name);
}

/* A name from the file, made fit for a one-line message: at most 64 bytes, non-printable
 * bytes (newlines, NULs) shown as '?'. */
struct gguf_printable {
	char text[GGUF_MAX_NAME + 4];
};

static struct gguf_printable gguf_printable(const struct skv_gguf_str *s)
{
	struct gguf_printable p;
	uint64_t n = s->len > GGUF_MAX_NAME ? GGUF_MAX_NAME : s->len;

	for (uint64_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s->ptr[i];
		p.text[i] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
	}
	strcpy(p.text + n, s->len > n ? "..." : "");
	return p;
}

/* Takes n bytes at the cursor, or fails with -SKV_ETRUNCATED naming the offset. */
static int gguf_take(struct gguf_cursor *c, uint64_t n, const uint8_t **out)
{
	*out = NULL;
	if (n > c->size - c->pos)
		return skv_errorf(c->msg, c->msg_len, -SKV_ETRUNCATED,
				  "%s: truncated GGUF: %s at byte offset %" PRIu64 " needs %" PRIu64
				  " bytes, only %" PRIu64 " remain",
				  c->path, c->what, c->pos, n, c->size - c->pos);
	*out = c->base + c->pos;
	c->pos += n;
	return 0;
}

static int gguf_read_u32(struct gguf_cursor *c, uint32_t *out)
{
	const uint8_t *p;
	int err = gguf_take(c, sizeof(*out), &p);

	if (!err)
		memcpy(out, p, sizeof(*out));
	return err;
}

static int gguf_read_u64(struct gguf_cursor *c, uint64_t *out)
{
	const uint8_t *p;
	int err = gguf_take(c, sizeof(*out), &p);

	if (!err)
		memcpy(out, p, sizeof(*out));
	return err;
}

static int gguf_read_str(struct gguf_cursor *c, struct skv_gguf_str *out)
{
	const uint8_t *p;
	int err = gguf_read_u64(c, &out->len);

	if (!err)
		err = gguf_take(c, out->len, &p);
	if (!err)
		out->ptr = (const char *)p;
	return err;
}

static uint64_t gguf_remaining(const struct gguf_cursor *c)
{
	return c->size - c->pos;
}

/* Walks one value of `type` without keeping it. depth counts enclosing arrays. */
static int gguf_skip_value(struct gguf_cursor *c, uint32_t type, unsigned depth);

/* Walks an array body (element type, count, elements); fills kv when given. */
static int gguf_parse_array(struct gguf_cursor *c, unsigned depth, struct gguf_kv *kv)
{
	uint32_t elem_type;
	uint64_t count;
	uint64_t start = c->pos;
	int err;

	if (depth >= GGUF_MAX_ARRAY_DEPTH)
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: %s at byte offset %" PRIu64 " nests arrays deeper than %u",
				  c->path, c->what, start, GGUF_MAX_ARRAY_DEPTH);
	err = gguf_read_u32(c, &elem_type);
	if (!err)
		err = gguf_read_u64(c, &count);
	if (err)
		return err;

	uint64_t elem_size = gguf_value_size(elem_type);
	uint64_t min_elem;
	if (elem_size)
		min_elem = elem_size;
	else if (elem_type == SKV_GGUF_STRING)
		min_elem = GGUF_MIN_STRING_BYTES;
	else if (elem_type == SKV_GGUF_ARRAY)
		min_elem = GGUF_MIN_ARRAY_BYTES;
	else
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: %s at byte offset %" PRIu64 " has unknown array element type %"
				  PRIu32, c->path, c->what, start, elem_type);
	/* Refuse a count the file cannot hold before walking it, so that a hostile count costs
	 * nothing. */
	if (count > gguf_remaining(c) / min_elem)
		return skv_errorf(c->msg, c->msg_len, -SKV_ETRUNCATED,
				  "%s: truncated GGUF: %s at byte offset %" PRIu64 " declares %" PRIu64
				  " elements, more than the %" PRIu64 " remaining bytes can hold",
				  c->path, c->what, start, count, gguf_remaining(c));
	if (kv) {
		kv->elem_type = elem_type;
		kv->count = count;
		kv->value = c->base + c->pos;
	}
	if (elem_size) {
		const uint8_t *p;
		return gguf_take(c, count * elem_size, &p);
	}
	for (uint64_t i = 0; i < count; i++) {
		err = gguf_skip_value(c, elem_type, depth + 1);
		if (err)
			return err;
	}
	return 0;
}

static int gguf_skip_value(struct gguf_cursor *c, uint32_t type, unsigned depth)
{
	const uint8_t *p;
	uint64_t size = gguf_value_size(type);

	if (size)
		return gguf_take(c, size, &p);
	if (type == SKV_GGUF_STRING) {
		struct skv_gguf_str s;
		return gguf_read_str(c, &s);
	}
	if (type == SKV_GGUF_ARRAY)
		return gguf_parse_array(c, depth, NULL);
	return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
			  "%s: %s at byte offset %" PRIu64 " has unknown value type %" PRIu32,
			  c->path, c->what, c->pos, type);
}

static int gguf_parse_kv(struct gguf_cursor *c, uint64_t index, struct gguf_kv *kv)
{
	int err;

	snprintf(c->what, sizeof(c->what), "metadata entry %" PRIu64 " key", index);
	err = gguf_read_str(c, &kv->key);
	if (err)
		return err;
	/* The key is in bounds now; name it in later messages (capped, it is untrusted). */
	snprintf(c->what, sizeof(c->what), "metadata '%s'", gguf_printable(&kv->key).text);
	const uint64_t start = c->pos;
	err = gguf_read_u32(c, &kv->type);
	if (err)
		return err;

	if (kv->type == SKV_GGUF_STRING) {
		struct skv_gguf_str s;
		err = gguf_read_str(c, &s);
		kv->value = (const uint8_t *)s.ptr;
		kv->value_len = s.len;
	} else if (kv->type == SKV_GGUF_ARRAY) {
		err = gguf_parse_array(c, 0, kv);
	} else {
		kv->value = c->base + c->pos;
		err = gguf_skip_value(c, kv->type, 0);
	}
	kv->encoded = c->base + start;
	kv->encoded_len = c->pos - start;
	return err;
}

static const struct gguf_kv *gguf_find_kv(const struct skv_gguf *g, const char *key)
{
	struct gguf_kv probe = { .key = { key, strlen(key) } };

	if (!g || !g->kv_count)
		return NULL;
	return bsearch(&probe, g->kvs, g->kv_count, sizeof(*g->kvs), gguf_kv_cmp);
}

/* Metadata: parse every entry, then sort by key and refuse duplicates (a lookup must not
 * depend on which of two entries wins). */
static int gguf_parse_metadata(struct skv_gguf *g, struct gguf_cursor *c)
{
	int err;

	if (g->kv_count) {
		g->kvs = calloc(g->kv_count, sizeof(*g->kvs));
		if (!g->kvs)
			return skv_errorf(c->msg, c->msg_len, -ENOMEM,
					  "%s: out of memory for %" PRIu64 " metadata entries",
					  c->path, g->kv_count);
	}
	for (uint64_t i = 0; i < g->kv_count; i++) {
		err = gguf_parse_kv(c, i, &g->kvs[i]);
		if (err)
			return err;
	}
	if (g->kv_count > 1)
		qsort(g->kvs, g->kv_count, sizeof(*g->kvs), gguf_kv_cmp);
	for (uint64_t i = 1; i < g->kv_count; i++) {
		if (!gguf_kv_cmp(&g->kvs[i - 1], &g->kvs[i]))
			return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
					  "%s: duplicate metadata key '%s'", c->path,
					  gguf_printable(&g->kvs[i].key).text);
	}

	uint32_t alignment = GGUF_DEFAULT_ALIGNMENT;
	err = skv_gguf_get_u32(g, "general.alignment", &alignment);
	if (err == -SKV_EFORMAT)
		return skv_errorf(c->msg, c->msg_len, err,
				  "%s: general.alignment is not an unsigned 32-bit integer", c->path);
	if (alignment == 0 || (alignment & (alignment - 1)))
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: general.alignment %" PRIu32 " is not a power of two",
				  c->path, alignment);
	g->alignment = alignment;
	return 0;
}

static int gguf_parse_tensor_info(struct gguf_cursor *c, uint64_t index,
				  struct skv_gguf_tensor *t)
{
	uint64_t start = c->pos;
	int err;

	snprintf(c->what, sizeof(c->what), "tensor info %" PRIu64, index);
	err = gguf_read_str(c, &t->name);
	if (err)
		return err;
	if (t->name.len > GGUF_MAX_NAME)
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: tensor info %" PRIu64 " at byte offset %" PRIu64
				  " has a %" PRIu64 "-byte name (at most %u allowed)",
				  c->path, index, start, t->name.len, GGUF_MAX_NAME);
	snprintf(c->what, sizeof(c->what), "tensor info '%s'", gguf_printable(&t->name).text);
	err = gguf_read_u32(c, &t->n_dims);
	if (err)
		return err;
	if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: %s has %" PRIu32 " dimensions (1 to %u allowed)",
				  c->path, c->what, t->n_dims, GGUF_MAX_DIMS);
	for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
		t->dims[d] = 1;
		if (d < t->n_dims) {
			err = gguf_read_u64(c, &t->dims[d]);
			if (err)
				return err;
			if (t->dims[d] > INT64_MAX)
				return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
						  "%s: %s dimension %" PRIu32 " is %" PRIu64
						  ", out of range", c->path, c->what, d,
						  t->dims[d]);
		}
	}
	err = gguf_read_u32(c, &t->type);
	if (!err)
		err = gguf_read_u64(c, &t->offset);
	return err;
}

/* Places a tensor's data: aligned offset, size from the type's block geometry, inside the
 * file. Unknown types keep data == NULL but must still start inside the file. */
static int gguf_place_tensor(struct skv_gguf *g, struct gguf_cursor *c, struct skv_gguf_tensor *t)
{
	struct gguf_printable name = gguf_printable(&t->name);
	uint64_t elems = 1, start;

	if (t->offset & (g->alignment - 1))
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: tensor '%s' data offset %" PRIu64
				  " is not a multiple of the alignment %" PRIu64,
				  c->path, name.text, t->offset, g->alignment);
	for (uint32_t d = 0; d < t->n_dims; d++) {
		if (__builtin_mul_overflow(elems, t->dims[d], &elems) || elems > INT64_MAX)
			return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
					  "%s: tensor '%s' element count overflows", c->path,
					  name.text);
	}
	if (__builtin_add_overflow(g->data_offset, t->offset, &start) || start > c->size)
		return skv_errorf(c->msg, c->msg_len, -SKV_ETRUNCATED,
				  "%s: truncated GGUF: tensor '%s' data starts past the end of the"
				  " file (data section at %" PRIu64 " + offset %" PRIu64 ", file has %"
				  PRIu64 " bytes)", c->path, name.text, g->data_offset,
				  t->offset, c->size);

	const struct gguf_type_info *info = gguf_type_info(t->type);
	if (!info) {
		t->data = NULL;
		t->n_bytes = 0;
		return 0;
	}
	if (t->dims[0] % info->block_elems)
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: tensor '%s' of type %s has %" PRIu64
				  " columns, not a multiple of its block size %" PRIu32,
				  c->path, name.text, info->name, t->dims[0],
				  info->block_elems);
	if (__builtin_mul_overflow(elems / info->block_elems, (uint64_t)info->block_bytes,
				   &t->n_bytes))
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: tensor '%s' byte size overflows", c->path, name.text);
	if (t->n_bytes > c->size - start)
		return skv_errorf(c->msg, c->msg_len, -SKV_ETRUNCATED,
				  "%s: truncated GGUF: tensor '%s' data at byte offset %" PRIu64
				  " needs %" PRIu64 " bytes (%" PRIu64 " x %s), only %" PRIu64
				  " remain", c->path, name.text, start, t->n_bytes, elems,
				  info->name, c->size - start);
	t->data = c->base + start;
	return 0;
}

static int gguf_parse_tensors(struct skv_gguf *g, struct gguf_cursor *c)
{
	int err;

	if (!g->tensor_count)
		return 0;
	g->tensors = calloc(g->tensor_count, sizeof(*g->tensors));
	g->by_name = calloc(g->tensor_count, sizeof(*g->by_name));
	if (!g->tensors || !g->by_name)
		return skv_errorf(c->msg, c->msg_len, -ENOMEM,
				  "%s: out of memory for %" PRIu64 " tensor infos",
				  c->path, g->tensor_count);
	for (uint64_t i = 0; i < g->tensor_count; i++) {
		err = gguf_parse_tensor_info(c, i, &g->tensors[i]);
		if (err)
			return err;
	}

	/* The data section begins at the next multiple of the alignment after the infos. */
	uint64_t mask = g->alignment - 1;
	if (__builtin_add_overflow(c->pos, mask, &g->data_offset))
		return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
				  "%s: data section offset overflows", c->path);
	g->data_offset &= ~mask;

	for (uint64_t i = 0; i < g->tensor_count; i++) {
		err = gguf_place_tensor(g, c, &g->tensors[i]);
		if (err)
			return err;
		g->by_name[i] = &g->tensors[i];
	}
	qsort(g->by_name, g->tensor_count, sizeof(*g->by_name), gguf_tensor_ptr_cmp);
	for (uint64_t i = 1; i < g->tensor_count; i++) {
		if (!gguf_tensor_ptr_cmp(&g->by_name[i - 1], &g->by_name[i]))
			return skv_errorf(c->msg, c->msg_len, -SKV_EFORMAT,
					  "%s: duplicate tensor name '%s'", c->path,
					  gguf_printable(&g->by_name[i]->name).text);
	}
	return 0;
}

static int gguf_parse(struct skv_gguf *g, char *msg, size_t msg_len)
{
	struct gguf_cursor c = {
		.base = g->map, .size = g->map_size, .path = g->path, .msg = msg, .msg_len = msg_len,
	};
	const uint8_t *p;
	uint32_t magic_len = (uint32_t)strlen(GGUF_MAGIC);
	int err;

	/* A short file that starts like the magic is truncated; anything else is not GGUF. */
	if (memcmp(g->map, GGUF_MAGIC, c.size < magic_len ? c.size : magic_len))
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: not a GGUF file (bad magic, expected \"GGUF\")", g->path);
	if (c.size < GGUF_HEADER_BYTES)
		return skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				  "%s: truncated GGUF: %zu bytes, shorter than the %u-byte header",
				  g->path, g->map_size, GGUF_HEADER_BYTES);
	snprintf(c.what, sizeof(c.what), "header");
	err = gguf_take(&c, magic_len, &p);
	if (!err)
		err = gguf_read_u32(&c, &g->version);
	if (err)
		return err;
	if (g->version != GGUF_SUPPORTED_VERSION)
		return skv_errorf(msg, msg_len, -SKV_EVERSION,
				  "%s: GGUF version %" PRIu32 " is not supported (only version %u is)",
				  g->path, g->version, GGUF_SUPPORTED_VERSION);
	err = gguf_read_u64(&c, &g->tensor_count);
	if (!err)
		err = gguf_read_u64(&c, &g->kv_count);
	if (err)
		return err;

	/* Cap both counts by what the rest of the file could hold at the smallest encodings,
	 * before allocating anything for them. */
	uint64_t room = gguf_remaining(&c);
	if (g->kv_count > room / GGUF_MIN_KV_BYTES ||
	    g->tensor_count > room / GGUF_MIN_TENSOR_INFO_BYTES ||
	    g->kv_count * GGUF_MIN_KV_BYTES > room - g->tensor_count * GGUF_MIN_TENSOR_INFO_BYTES)
		return skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				  "%s: truncated GGUF: header declares %" PRIu64 " tensors and %" PRIu64
				  " metadata entries, more than the remaining %" PRIu64
				  " bytes can hold", g->path, g->tensor_count, g->kv_count, room);

	err = gguf_parse_metadata(g, &c);
	if (!err)
		err = gguf_parse_tensors(g, &c);
	return err;
}

int skv_gguf_open(const char *path, struct skv_gguf **out, char *msg, size_t msg_len)
{
	return skv_gguf_open_mode(path, SKV_WEIGHTS_MAP, NULL, out, msg, msg_len);
}

int skv_gguf_open_mode(const char *path, enum skv_weights_mem mode, enum skv_weights_mem *used,
		       struct skv_gguf **out, char *msg, size_t msg_len)
{
	struct skv_gguf *g;
	int err;

	*out = NULL;
	g = calloc(1, sizeof(*g));
	if (!g)
		return skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory", path);
	g->path = strdup(path);
	if (!g->path) {
		err = skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory", path);
		goto out_free;
	}
	err = skv_map_file_mode(path, "GGUF file", mode, (const void **)&g->map, &g->map_size, used,
				msg, msg_len);
	if (err)
		goto out_free;
	if (!g->map_size) {
		err = skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				 "%s: empty file, not a GGUF model", path);
		goto out_free;
	}
	err = gguf_parse(g, msg, msg_len);
	if (err)
		goto out_free;
	*out = g;
	return 0;

out_free:
	skv_gguf_close(g);
	return err;
}

void skv_gguf_close(struct skv_gguf *g)
{
	if (!g)
		return;
	if (g->map)
		munmap((void *)g->map, g->map_size);
	free(g->by_name);
	free(g->tensors);
	free(g->kvs);
	free(g->path);
	free(g);
}

const char *skv_gguf_path(const struct skv_gguf *g)
{
	return g->path;
}

uint32_t skv_gguf_version(const struct skv_gguf *g)
{
	return g->version;
}

int skv_gguf_get_u32(const struct skv_gguf *g, const char *key, uint32_t *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	uint64_t u = 0;
	int64_t s = 0;
	bool is_signed = false;

	if (!kv)
		return -ENOENT;
	switch (kv->type) {
	case SKV_GGUF_UINT8: {
		uint8_t v;
		memcpy(&v, kv->value, sizeof(v));
		u = v;
		break;
	}
	case SKV_GGUF_UINT16: {
		uint16_t v;
		memcpy(&v, kv->value, sizeof(v));
		u = v;
		break;
	}
	case SKV_GGUF_UINT32: {
		uint32_t v;
		memcpy(&v, kv->value, sizeof(v));
		u = v;
		break;
	}
	case SKV_GGUF_UINT64:
		memcpy(&u, kv->value, sizeof(u));
		break;
	case SKV_GGUF_INT8: {
		int8_t v;
		memcpy(&v, kv->value, sizeof(v));
		s = v;
		is_signed = true;
		break;
	}
	case SKV_GGUF_INT16: {
		int16_t v;
		memcpy(&v, kv->value, sizeof(v));
		s = v;
		is_signed = true;
		break;
	}
	case SKV_GGUF_INT32: {
		int32_t v;
		memcpy(&v, kv->value, sizeof(v));
		s = v;
		is_signed = true;
		break;
	}
	case SKV_GGUF_INT64:
		memcpy(&s, kv->value, sizeof(s));
		is_signed = true;
		break;
	default:
		return -SKV_EFORMAT;
	}
	if (is_signed) {
		if (s < 0)
			return -SKV_EFORMAT;
		u = (uint64_t)s;
	}
	if (u > UINT32_MAX)
		return -SKV_EFORMAT;
	*out = (uint32_t)u;
	return 0;
}

int skv_gguf_get_f32(const struct skv_gguf *g, const char *key, float *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);

	if (!kv)
		return -ENOENT;
	if (kv->type != SKV_GGUF_FLOAT32)
		return -SKV_EFORMAT;
	memcpy(out, kv->value, sizeof(*out));
	return 0;
}

int skv_gguf_get_bool(const struct skv_gguf *g, const char *key, int *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);

	if (!kv)
		return -ENOENT;
	if (kv->type != SKV_GGUF_BOOL)
		return -SKV_EFORMAT;
	*out = kv->value[0] != 0;
	return 0;
}

int skv_gguf_get_str(const struct skv_gguf *g, const char *key, struct skv_gguf_str *out)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);

	if (!kv)
		return -ENOENT;
	if (kv->type != SKV_GGUF_STRING)
		return -SKV_EFORMAT;
	out->ptr = (const char *)kv->value;
	out->len = kv->value_len;
	return 0;
}

int skv_gguf_get_array(const struct skv_gguf *g, const char *key, enum skv_gguf_type elem_type,
		       const void **data, uint64_t *count)
{
	const struct gguf_kv *kv;

	if (!gguf_value_size(elem_type))
		return -EINVAL; /* strings and arrays have no fixed size: use get_str_array */
	kv = gguf_find_kv(g, key);
	if (!kv)
		return -ENOENT;
	if (kv->type != SKV_GGUF_ARRAY || kv->elem_type != (uint32_t)elem_type)
		return -SKV_EFORMAT;
	*data = kv->value;
	*count = kv->count;
	return 0;
}

int skv_gguf_get_str_array(const struct skv_gguf *g, const char *key,
			   struct skv_gguf_str **out, uint64_t *count)
{
	const struct gguf_kv *kv = gguf_find_kv(g, key);
	struct skv_gguf_str *strs;

	if (!kv)
		return -ENOENT;
	if (kv->type != SKV_GGUF_ARRAY || kv->elem_type != SKV_GGUF_STRING)
		return -SKV_EFORMAT;
	/* count was capped at open by the file size / 8, so this cannot overflow. */
	strs = malloc((kv->count ? kv->count : 1) * sizeof(*strs));
	if (!strs)
		return -ENOMEM;

	struct gguf_cursor c = {
		.base = g->map, .size = g->map_size, .pos = (uint64_t)(kv->value - g->map),
		.path = g->path,
	};
	for (uint64_t i = 0; i < kv->count; i++) {
		if (gguf_read_str(&c, &strs[i])) {
			free(strs); /* walked at open: unreachable unless the mapping changed */
			return -SKV_EFORMAT;
		}
	}
	*out = strs;
	*count = kv->count;
	return 0;
}

const struct skv_gguf_tensor *skv_gguf_find_tensor(const struct skv_gguf *g, const char *name)
{
	struct skv_gguf_tensor probe = { .name = { name, strlen(name) } };
	const struct skv_gguf_tensor *key = &probe;
	const struct skv_gguf_tensor *const *hit;

	if (!g || !g->tensor_count)
		return NULL;
	hit = bsearch(&key, g->by_name, g->tensor_count, sizeof(*g->by_name),
		      gguf_tensor_ptr_cmp);
	return hit ? *hit : NULL;
}

uint64_t skv_gguf_tensor_count(const struct skv_gguf *g)
{
	return g->tensor_count;
}

const struct skv_gguf_tensor *skv_gguf_tensor_at(const struct skv_gguf *g, uint64_t index)
{
	if (index >= g->tensor_count)
		return NULL;
	return &g->tensors[index];
}

uint64_t skv_gguf_kv_count(const struct skv_gguf *g)
{
	return g->kv_count;
}

int skv_gguf_kv_at(const struct skv_gguf *g, uint64_t index, struct skv_gguf_str *key,
		   uint32_t *type, const void **encoded, uint64_t *encoded_len)
{
	if (index >= g->kv_count)
		return -ENOENT;
	const struct gguf_kv *kv = &g->kvs[index];
	*key = kv->key;
	*type = kv->type;
	*encoded = kv->encoded;
	*encoded_len = kv->encoded_len;
	return 0;
}
