/* GGUF v3 reader (read-only, memory-mapped).
 *
 * skv_gguf_open() maps the whole file read-only and validates every structure it parses
 * against the file size before trusting it: header, metadata key/value pairs (all value types,
 * nested arrays), tensor infos and the alignment of the data section. Lookups afterwards never
 * read outside the mapping. Only GGUF version 3 is accepted (2 is refused with SKV_EVERSION).
 *
 * Errors: -errno for I/O (missing file: -ENOENT), -SKV_ETRUNCATED when a structure runs past the
 * end of the file, -SKV_EFORMAT for a bad magic or a malformed field, -SKV_EVERSION. msg gets one
 * line naming the path and the fault (and the byte offset where it applies).
 *
 * Thread safety: an opened struct skv_gguf is immutable; lookups may run from any thread. */
#ifndef SKV_GGUF_H
#define SKV_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "mapfile.h"

/* Metadata value types, as numbered by the GGUF specification. */
enum skv_gguf_type {
	SKV_GGUF_UINT8 = 0,
	SKV_GGUF_INT8 = 1,
	SKV_GGUF_UINT16 = 2,
	SKV_GGUF_INT16 = 3,
	SKV_GGUF_UINT32 = 4,
	SKV_GGUF_INT32 = 5,
	SKV_GGUF_FLOAT32 = 6,
	SKV_GGUF_BOOL = 7,
	SKV_GGUF_STRING = 8,
	SKV_GGUF_ARRAY = 9,
	SKV_GGUF_UINT64 = 10,
	SKV_GGUF_INT64 = 11,
	SKV_GGUF_FLOAT64 = 12,
};

/* Tensor element types (ggml numbering); the weight types streamkv reads are in quant.h. */
#define SKV_GGML_TYPE_F32 0u

/* Name of a ggml tensor type for messages ("F32", "F16", "Q4_0", ...); "unknown" for a type
 * this reader cannot size. Never NULL. */
const char *skv_gguf_ggml_type_name(uint32_t ggml_type);

struct skv_gguf;

/* A string inside the mapping: not NUL-terminated. */
struct skv_gguf_str {
	const char *ptr;
	uint64_t len;
};

struct skv_gguf_tensor {
	struct skv_gguf_str name;
	uint32_t n_dims;        /* 1..4 */
	uint64_t dims[4];       /* ggml order: dims[0] is the innermost (contiguous) dimension */
	uint32_t type;          /* ggml type */
	uint64_t offset;        /* from the start of the data section, as in the file */
	const void *data;       /* into the mapping; NULL if type is unknown (size not computable) */
	uint64_t n_bytes;       /* bytes of data, validated to lie within the file */
};

int skv_gguf_open(const char *path, struct skv_gguf **out, char *msg, size_t msg_len);
/* The same with the file's bytes where mode says (mapfile.h); *used: which it made. */
int skv_gguf_open_mode(const char *path, enum skv_weights_mem mode, enum skv_weights_mem *used,
		       struct skv_gguf **out, char *msg, size_t msg_len);
void skv_gguf_close(struct skv_gguf *g); /* accepts NULL */

const char *skv_gguf_path(const struct skv_gguf *g);
uint32_t skv_gguf_version(const struct skv_gguf *g);

/* Scalar metadata. Return 0, -ENOENT if the key is absent, -SKV_EFORMAT if its type differs
 * (an integer key of another integer type is converted when the value fits). */
int skv_gguf_get_u32(const struct skv_gguf *g, const char *key, uint32_t *out);
int skv_gguf_get_f32(const struct skv_gguf *g, const char *key, float *out);
int skv_gguf_get_str(const struct skv_gguf *g, const char *key, struct skv_gguf_str *out);
/* A bool key: *out 0 or 1. */
int skv_gguf_get_bool(const struct skv_gguf *g, const char *key, int *out);

/* Array metadata of a fixed-size element type: *data points into the mapping (possibly
 * unaligned: read elements with memcpy), *count elements. -ENOENT, -SKV_EFORMAT if not an
 * array of elem_type. */
int skv_gguf_get_array(const struct skv_gguf *g, const char *key, enum skv_gguf_type elem_type,
		       const void **data, uint64_t *count);

/* Array of strings: *out is a malloc'ed array of *count entries pointing into the mapping;
 * the caller frees *out with free(). */
int skv_gguf_get_str_array(const struct skv_gguf *g, const char *key,
			   struct skv_gguf_str **out, uint64_t *count);

/* Tensor lookup by name; NULL if absent. Enumeration by index for tools. */
const struct skv_gguf_tensor *skv_gguf_find_tensor(const struct skv_gguf *g, const char *name);
uint64_t skv_gguf_tensor_count(const struct skv_gguf *g);
const struct skv_gguf_tensor *skv_gguf_tensor_at(const struct skv_gguf *g, uint64_t index);

/* Metadata enumeration for tools that copy a file's metadata (skv-quantize): entry index (in
 * key order) as its key, its type and its encoding after the key as the file holds it (the
 * u32 type, then the value, validated at open). 0, or -ENOENT past the last entry. */
uint64_t skv_gguf_kv_count(const struct skv_gguf *g);
int skv_gguf_kv_at(const struct skv_gguf *g, uint64_t index, struct skv_gguf_str *key,
		   uint32_t *type, const void **encoded, uint64_t *encoded_len);

#endif
