/* SentencePiece-style BPE tokenizer with llama2.c semantics; the contract is in tokenizer.h.
 *
 * The vocabulary lives in one arena of NUL-terminated pieces with an offset table, plus an
 * open-addressing hash table from piece bytes to id. Encoding builds a doubly-linked list of
 * symbols (one per code point or fallback byte) and a binary max-heap of the adjacent pairs
 * whose concatenation is a piece. A merge leaves stale heap entries behind; they are recognised
 * when popped (lazy invalidation) by comparing the token ids they were made from with the
 * symbols' current ids.
 *
 * The vocabulary, the heap and the id list are shared with the byte-level BPE encoder
 * (tokenizer-bpe.c, through tokenizer-pvt.h); the public functions here dispatch on the kind. */
#include "tokenizer-pvt.h"

#include "gguf.h"
#include "skv-error.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* llama2.c starts its search for the best pair at this score and merges only above it. */
#define TOKENIZER_MIN_MERGE_SCORE (-1e10f)

/* llama2.c's byte fallback: the token of byte b is b + TOKENIZER_BYTE_TOKEN_BASE. */
#define TOKENIZER_BYTE_TOKEN_BASE 3

/* A UTF-8 code point has at most this many bytes; llama2.c groups continuation bytes up to it. */
#define TOKENIZER_MAX_CODE_POINT_BYTES 4

/* The SentencePiece word-boundary mark. */
#define TOKENIZER_SPM_SPACE "\xe2\x96\x81" /* U+2581 */
#define TOKENIZER_SPM_SPACE_LEN 3

#define TOKENIZER_FNV_OFFSET 0xcbf29ce484222325ull
#define TOKENIZER_FNV_PRIME 0x100000001b3ull

static inline uint64_t tokenizer_hash(uint64_t hash, const char *bytes, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		hash ^= (unsigned char)bytes[i];
		hash *= TOKENIZER_FNV_PRIME;
	}
	return hash;
}

/* FNV's low bits mix poorly for short keys; fold the high bits in before masking. */
static inline uint64_t tokenizer_slot(uint64_t hash)
{
	return hash ^ (hash >> 29) ^ (hash >> 47);
}

/* The id of the piece equal to a ++ b (b may be empty), or -1. Duplicate pieces resolve to the
 * lowest id, because the table keeps the first id inserted for a string. */
int32_t tokenizer_lookup2(const struct skv_tokenizer *t, const char *a, size_t a_len,
			  const char *b, size_t b_len)
{
	size_t len = a_len + b_len;
	if (len > t->max_piece_len)
		return -1;
	uint64_t slot = tokenizer_slot(tokenizer_hash(tokenizer_hash(TOKENIZER_FNV_OFFSET, a, a_len),
						      b, b_len));
	for (;; slot++) {
		int32_t id = t->lookup[slot & t->lookup_mask];
		if (id < 0)
			return -1;
		if (tokenizer_piece_len(t, id) != len)
			continue;
		const char *piece = tokenizer_piece_ptr(t, id);
		if (memcmp(piece, a, a_len) == 0 && memcmp(piece + a_len, b, b_len) == 0)
			return id;
	}
}

void skv_tokenizer_free(struct skv_tokenizer *t)
{
	if (!t)
		return;
	free(t->piece_bytes);
	free(t->piece_offset);
	free(t->scores);
	free(t->lookup);
	free(t->types);
	free(t->specials);
	free(t->special_bytes);
	free(t->special_group_end);
	tokenizer_bpe_free(t->bpe);
	free(t);
}

int tokenizer_alloc(int32_t vocab_size, struct skv_tokenizer **out)
{
	struct skv_tokenizer *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->vocab_size = vocab_size;
	t->piece_offset = calloc((size_t)vocab_size + 1, sizeof(*t->piece_offset));
	t->scores = calloc((size_t)vocab_size, sizeof(*t->scores));
	if (!t->piece_offset || !t->scores) {
		skv_tokenizer_free(t);
		return -ENOMEM;
	}
	for (int b = 0; b < 256; b++)
		t->byte_pieces[2 * b] = (char)b;
	/* llama2.c's ids; a GGUF vocabulary overrides them from its keys. */
	t->kind = TOKENIZER_SPM;
	t->bos_id = SKV_TOKEN_BOS;
	t->eos_id = SKV_TOKEN_EOS;
	t->eot_id = -1;
	t->pad_id = -1;
	t->add_bos = true;
	*out = t;
	return 0;
}

/* Reserve room for `len` more piece bytes plus the NUL; returns where they go, or NULL. Pieces
 * are appended in id order, each closed by tokenizer_commit(). */
char *tokenizer_reserve(struct skv_tokenizer *t, size_t len)
{
	size_t need = t->piece_bytes_len + len + 1;
	if (need < len)
		return NULL;
	if (need > t->piece_bytes_cap) {
		size_t cap = t->piece_bytes_cap ? t->piece_bytes_cap : 4096;
		while (cap < need)
			cap *= 2;
		char *grown = realloc(t->piece_bytes, cap);
		if (!grown)
			return NULL;
		t->piece_bytes = grown;
		t->piece_bytes_cap = cap;
	}
	return t->piece_bytes + t->piece_bytes_len;
}

/* Close piece `id` after its `len` bytes were written at tokenizer_reserve()'s pointer. */
void tokenizer_commit(struct skv_tokenizer *t, int32_t id, size_t len, float score)
{
	t->piece_offset[id] = t->piece_bytes_len;
	t->piece_bytes[t->piece_bytes_len + len] = '\0';
	t->piece_bytes_len += len + 1;
	t->piece_offset[id + 1] = t->piece_bytes_len;
	t->scores[id] = score;
	if (len > t->max_piece_len)
		t->max_piece_len = len;
}

/* Build the string -> id table once every piece is in; at most half full. */
int tokenizer_index(struct skv_tokenizer *t)
{
	char *tight = realloc(t->piece_bytes, t->piece_bytes_len);
	if (tight) {
		t->piece_bytes = tight;
		t->piece_bytes_cap = t->piece_bytes_len;
	}
	size_t slots = 16;
	while (slots < 2 * (size_t)t->vocab_size)
		slots *= 2;
	t->lookup = malloc(slots * sizeof(*t->lookup));
	if (!t->lookup)
		return -ENOMEM;
	memset(t->lookup, 0xff, slots * sizeof(*t->lookup));
	t->lookup_mask = slots - 1;
	for (int32_t id = 0; id < t->vocab_size; id++) {
		const char *piece = tokenizer_piece_ptr(t, id);
		size_t len = tokenizer_piece_len(t, id);
		if (tokenizer_lookup2(t, piece, len, "", 0) >= 0)
			continue; /* a duplicate: the lower id keeps the string */
		uint64_t slot = tokenizer_slot(tokenizer_hash(TOKENIZER_FNV_OFFSET, piece, len));
		while (t->lookup[slot & t->lookup_mask] >= 0)
			slot++;
		t->lookup[slot & t->lookup_mask] = id;
	}
	/* Whether SentencePiece encoding may run word by word (see tokenizer_spm_encode()). */
	t->spm_words = tokenizer_lookup2(t, " ", 1, "", 0) >= 0;
	for (size_t i = 1; i < t->piece_bytes_len && t->spm_words; i++)
		if (t->piece_bytes[i] == ' ' && t->piece_bytes[i - 1] != ' ' &&
		    t->piece_bytes[i - 1] != '\0')
			t->spm_words = false;
	return 0;
}

/* Read n bytes at *offset of a file of file_size bytes; the caller checked they are there. */
static int tokenizer_read(FILE *f, void *dst, size_t n, uint64_t *offset)
{
	if (n && fread(dst, 1, n, f) != n)
		return ferror(f) ? -EIO : -SKV_ETRUNCATED;
	*offset += n;
	return 0;
}

/* After the model's vocab_size tokens: count the well-formed entries that follow, to name the
 * file's real vocabulary size in the message; -1 if the rest is not a sequence of entries. */
static int64_t tokenizer_count_rest(FILE *f, uint64_t offset, uint64_t file_size,
				    int32_t max_token_length)
{
	int64_t extra = 0;
	while (offset < file_size) {
		unsigned char entry[8];
		int32_t len;
		if (file_size - offset < sizeof(entry) || fread(entry, 1, sizeof(entry), f) != 8)
			return -1;
		memcpy(&len, entry + 4, sizeof(len));
		offset += sizeof(entry);
		if (len < 0 || len > max_token_length || (uint64_t)len > file_size - offset)
			return -1;
		if (fseek(f, len, SEEK_CUR) != 0)
			return -1;
		offset += (uint64_t)len;
		extra++;
	}
	return extra;
}

int skv_tokenizer_load(const char *path, int32_t vocab_size, struct skv_tokenizer **out,
		       char *msg, size_t msg_len)
{
	struct skv_tokenizer *t = NULL;
	uint64_t offset = 0;
	int32_t max_token_length;
	struct stat st;
	int rc;

	*out = NULL;
	if (vocab_size <= SKV_TOKEN_EOS)
		return skv_errorf(msg, msg_len, -EINVAL,
				  "%s: a vocabulary of %d tokens cannot hold <unk>, BOS and EOS",
				  path, vocab_size);
	FILE *f = fopen(path, "rb");
	if (!f) {
		rc = -errno;
		return skv_errorf(msg, msg_len, rc, "%s: cannot open the tokenizer: %s", path,
				  skv_strerror(rc));
	}
	if (fstat(fileno(f), &st) != 0) {
		rc = -errno;
		rc = skv_errorf(msg, msg_len, rc, "%s: cannot stat the tokenizer: %s", path,
				skv_strerror(rc));
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = skv_errorf(msg, msg_len, S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL,
				"%s: not a regular file", path);
		goto out_close;
	}
	uint64_t file_size = (uint64_t)st.st_size;

	if (file_size < sizeof(max_token_length)) {
		rc = skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
				"%s: truncated at offset %llu: the file ends inside the 4-byte "
				"header (max_token_length); copy it again", path, (unsigned long long)file_size);
		goto out_close;
	}
	rc = tokenizer_read(f, &max_token_length, sizeof(max_token_length), &offset);
	if (rc < 0)
		goto out_io;
	if (max_token_length < 0) {
		rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
				"%s: max_token_length %d at offset 0 is negative", path,
				max_token_length);
		goto out_close;
	}

	rc = tokenizer_alloc(vocab_size, &t);
	if (rc < 0)
		goto out_nomem;
	for (int32_t id = 0; id < vocab_size; id++) {
		unsigned char entry[8];
		float score;
		int32_t len;

		if (file_size - offset < sizeof(entry)) {
			rc = skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
					"%s: truncated at offset %llu: the file ends after %d of the "
					"model's %d tokens; copy it again, or use the model's own",
					path, (unsigned long long)file_size, id, vocab_size);
			goto out_free;
		}
		rc = tokenizer_read(f, entry, sizeof(entry), &offset);
		if (rc < 0)
			goto out_io;
		memcpy(&score, entry, sizeof(score));
		memcpy(&len, entry + 4, sizeof(len));
		if (len < 0 || len > max_token_length) {
			rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					"%s: token %d: length %d at offset %llu is outside "
					"0..%d (max_token_length)", path, id, len,
					(unsigned long long)(offset - 4), max_token_length);
			goto out_free;
		}
		if ((uint64_t)len > file_size - offset) {
			rc = skv_errorf(msg, msg_len, -SKV_ETRUNCATED,
					"%s: truncated at offset %llu: token %d of %d needs %d bytes "
					"from offset %llu; copy the file again", path, (unsigned long long)file_size, id,
					vocab_size, len, (unsigned long long)offset);
			goto out_free;
		}
		char *dst = tokenizer_reserve(t, (size_t)len);
		if (!dst)
			goto out_nomem;
		rc = tokenizer_read(f, dst, (size_t)len, &offset);
		if (rc < 0)
			goto out_io;
		tokenizer_commit(t, id, (size_t)len, score);
	}

	if (offset != file_size) {
		int64_t extra = tokenizer_count_rest(f, offset, file_size, max_token_length);
		if (extra > 0)
			rc = skv_errorf(msg, msg_len, -SKV_EVOCAB,
					"%s: vocabulary mismatch: the file holds %lld tokens, the model "
					"has %d: it is the tokenizer of another model; use the model's own", path,
					(long long)(extra + vocab_size), vocab_size);
		else
			rc = skv_errorf(msg, msg_len, -SKV_EVOCAB,
					"%s: vocabulary mismatch: %llu bytes are left after the model's %d "
					"tokens (file %llu bytes, tokens end at offset %llu): it is the "
					"tokenizer of another model; use the model's own", path,
					(unsigned long long)(file_size - offset), vocab_size,
					(unsigned long long)file_size, (unsigned long long)offset);
		goto out_free;
	}
	rc = tokenizer_index(t);
	if (rc < 0)
		goto out_nomem;
	fclose(f);
	*out = t;
	return 0;

out_io:
	/* A short read of bytes fstat() promised: the file shrank or the device failed. */
	rc = skv_errorf(msg, msg_len, rc, "%s: read failed at offset %llu: %s", path,
			(unsigned long long)offset, skv_strerror(rc));
	goto out_free;
out_nomem:
	rc = skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory loading %d tokens", path,
			vocab_size);
out_free:
	skv_tokenizer_free(t);
out_close:
	fclose(f);
	return rc;
}

/* Copy a GGUF piece as llama2.c's tokenizer export writes it: U+2581 becomes ' ', and the control
 * pieces <s> and </s> are framed by newlines. Returns the bytes written (at most len + 2). */
static size_t tokenizer_export_piece(char *dst, const char *src, size_t len, int32_t type)
{
	if (type == TOKENIZER_TYPE_CONTROL &&
	    ((len == 3 && memcmp(src, "<s>", 3) == 0) || (len == 4 && memcmp(src, "</s>", 4) == 0))) {
		dst[0] = '\n';
		memcpy(dst + 1, src, len);
		dst[len + 1] = '\n';
		return len + 2;
	}
	size_t n = 0;
	for (size_t i = 0; i < len;) {
		if (len - i >= TOKENIZER_SPM_SPACE_LEN &&
		    memcmp(src + i, TOKENIZER_SPM_SPACE, TOKENIZER_SPM_SPACE_LEN) == 0) {
			dst[n++] = ' ';
			i += TOKENIZER_SPM_SPACE_LEN;
		} else {
			dst[n++] = src[i++];
		}
	}
	return n;
}

int tokenizer_gguf_tokens(const struct skv_gguf *g, int32_t vocab_size,
			  struct skv_gguf_str **tokens, uint64_t *n_tokens, char *msg, size_t msg_len)
{
	const char *path = skv_gguf_path(g);
	int rc = skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", tokens, n_tokens);
	if (rc < 0)
		return skv_errorf(msg, msg_len, rc, "%s: tokenizer.ggml.tokens: %s", path,
				  rc == -ENOENT ? "missing" :
				  rc == -SKV_EFORMAT ? "not an array of strings" : skv_strerror(rc));
	if (*n_tokens != (uint64_t)vocab_size) {
		rc = skv_errorf(msg, msg_len, -SKV_EVOCAB,
				"%s: tokenizer.ggml.tokens holds %llu tokens, the model has %d", path,
				(unsigned long long)*n_tokens, vocab_size);
		free(*tokens);
		*tokens = NULL;
		return rc;
	}
	return 0;
}

/* GGUF "llama": the SentencePiece vocabulary with llama2.c's encoder. */
static int tokenizer_spm_from_gguf(const struct skv_gguf *g, int32_t vocab_size,
				   struct skv_tokenizer **out, char *msg, size_t msg_len)
{
	const char *path = skv_gguf_path(g);
	struct skv_gguf_str *tokens = NULL;
	struct skv_tokenizer *t = NULL;
	const void *scores, *types;
	uint64_t n_tokens, n_scores, n_types;
	int rc;

	rc = tokenizer_gguf_tokens(g, vocab_size, &tokens, &n_tokens, msg, msg_len);
	if (rc < 0)
		return rc;
	rc = skv_gguf_get_array(g, "tokenizer.ggml.scores", SKV_GGUF_FLOAT32, &scores, &n_scores);
	if (rc < 0) {
		rc = skv_errorf(msg, msg_len, rc, "%s: tokenizer.ggml.scores: %s", path,
				rc == -ENOENT ? "missing" :
				rc == -SKV_EFORMAT ? "not an array of float32" : skv_strerror(rc));
		goto out;
	}
	rc = skv_gguf_get_array(g, "tokenizer.ggml.token_type", SKV_GGUF_INT32, &types, &n_types);
	if (rc < 0) {
		rc = skv_errorf(msg, msg_len, rc, "%s: tokenizer.ggml.token_type: %s", path,
				rc == -ENOENT ? "missing" :
				rc == -SKV_EFORMAT ? "not an array of int32" : skv_strerror(rc));
		goto out;
	}
	if (n_scores != n_tokens || n_types != n_tokens) {
		rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
				"%s: %llu tokens but %llu scores and %llu token types", path,
				(unsigned long long)n_tokens, (unsigned long long)n_scores,
				(unsigned long long)n_types);
		goto out;
	}

	rc = tokenizer_alloc(vocab_size, &t);
	if (rc < 0)
		goto out_nomem;
	for (int32_t id = 0; id < vocab_size; id++) {
		float score;
		int32_t type;
		/* The arrays point into the mapping, unaligned: copy each element out. */
		memcpy(&score, (const char *)scores + (size_t)id * sizeof(score), sizeof(score));
		memcpy(&type, (const char *)types + (size_t)id * sizeof(type), sizeof(type));
		if (tokens[id].len > INT32_MAX) {
			rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					"%s: tokenizer.ggml.tokens[%d] is %llu bytes long", path, id,
					(unsigned long long)tokens[id].len);
			goto out;
		}
		char *dst = tokenizer_reserve(t, (size_t)tokens[id].len + 2);
		if (!dst)
			goto out_nomem;
		size_t len = tokenizer_export_piece(dst, tokens[id].ptr, (size_t)tokens[id].len, type);
		tokenizer_commit(t, id, len, score);
	}
	rc = tokenizer_index(t);
	if (rc < 0)
		goto out_nomem;
	rc = tokenizer_gguf_specials(t, g, tokens, types, msg, msg_len);
	if (rc < 0)
		goto out;
	*out = t;
	t = NULL;
	goto out;

out_nomem:
	rc = skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory loading %d tokens", path,
			vocab_size);
out:
	skv_tokenizer_free(t);
	free(tokens);
	return rc;
}

int skv_tokenizer_from_gguf(const struct skv_gguf *g, int32_t vocab_size,
			    struct skv_tokenizer **out, char *msg, size_t msg_len)
{
	const char *path = skv_gguf_path(g);
	struct skv_gguf_str model;

	*out = NULL;
	if (vocab_size <= SKV_TOKEN_EOS)
		return skv_errorf(msg, msg_len, -EINVAL,
				  "%s: a vocabulary of %d tokens cannot hold <unk>, BOS and EOS",
				  path, vocab_size);
	int rc = skv_gguf_get_str(g, "tokenizer.ggml.model", &model);
	if (rc < 0)
		return skv_errorf(msg, msg_len, rc == -ENOENT ? -ENOENT : -SKV_EFORMAT,
				  "%s: tokenizer.ggml.model is %s; expected \"llama\" (SentencePiece) "
				  "or \"gpt2\" (byte-level BPE)", path,
				  rc == -ENOENT ? "missing" : "not a string");
	if (model.len == 5 && memcmp(model.ptr, "llama", 5) == 0)
		return tokenizer_spm_from_gguf(g, vocab_size, out, msg, msg_len);
	if (model.len == 4 && memcmp(model.ptr, "gpt2", 4) == 0)
		return tokenizer_bpe_from_gguf(g, vocab_size, out, msg, msg_len);
	return skv_errorf(msg, msg_len, -SKV_EFORMAT,
			  "%s: unknown tokenizer model \"%.*s\" (tokenizer.ggml.model): streamkv "
			  "reads \"llama\" (SentencePiece) and \"gpt2\" (byte-level BPE)", path,
			  model.len > 64 ? 64 : (int)model.len, model.ptr);
}

int32_t skv_tokenizer_vocab_size(const struct skv_tokenizer *t)
{
	return t->vocab_size;
}

int32_t skv_tokenizer_bos(const struct skv_tokenizer *t)
{
	return t->bos_id;
}

int32_t skv_tokenizer_eos(const struct skv_tokenizer *t)
{
	return t->eos_id;
}

int32_t skv_tokenizer_eot(const struct skv_tokenizer *t)
{
	return t->eot_id;
}

int32_t skv_tokenizer_pad(const struct skv_tokenizer *t)
{
	return t->pad_id;
}

int skv_tokenizer_add_bos(const struct skv_tokenizer *t)
{
	return t->add_bos;
}

int skv_tokenizer_is_control(const struct skv_tokenizer *t, int32_t token)
{
	if (!t || token < 0 || token >= t->vocab_size)
		return 0;
	if (!t->types)
		return token <= SKV_TOKEN_EOS;
	return t->types[token] == TOKENIZER_TYPE_CONTROL || t->types[token] == TOKENIZER_TYPE_UNKNOWN;
}

int skv_tokenizer_is_end(const struct skv_tokenizer *t, int32_t token)
{
	if (!t || token < 0)
		return 0;
	if (token == skv_tokenizer_eot(t))
		return 1;
	if (t->kind == TOKENIZER_BPE)
		return token == skv_tokenizer_eos(t);
	return token == skv_tokenizer_bos(t) || (t->types && token == skv_tokenizer_eos(t));
}

int skv_tokenizer_prints(const struct skv_tokenizer *t, int32_t token, const char *piece,
			 size_t len)
{
	if (!piece)
		return 0;
	if (t->kind == TOKENIZER_BPE)
		return len > 0 && !skv_tokenizer_is_control(t, token);
	return skv_piece_is_printable(piece, len);
}

const char *skv_tokenizer_kind(const struct skv_tokenizer *t)
{
	return t->kind == TOKENIZER_BPE ? "bpe" : "spm";
}

const char *skv_tokenizer_pre(const struct skv_tokenizer *t)
{
	return t->kind == TOKENIZER_BPE ? tokenizer_bpe_pre_name(t) : "";
}

const char *skv_tokenizer_piece(const struct skv_tokenizer *t, int32_t token, size_t *len)
{
	if (!t || token < 0 || token >= t->vocab_size)
		return NULL;
	if (len)
		*len = tokenizer_piece_len(t, token);
	return tokenizer_piece_ptr(t, token);
}

int skv_tokenizer_score(const struct skv_tokenizer *t, int32_t token, float *score)
{
	if (!t || token < 0 || token >= t->vocab_size)
		return -EINVAL;
	*score = t->scores[token];
	return 0;
}

static int tokenizer_hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

const char *skv_tokenizer_decode(const struct skv_tokenizer *t, int32_t prev_token, int32_t token,
				 size_t *len)
{
	size_t piece_len;
	const char *piece = skv_tokenizer_piece(t, token, &piece_len);
	if (!piece)
		return NULL;
	if (t->kind == TOKENIZER_BPE)
		return tokenizer_bpe_decode(t, token, len);
	/* SentencePiece drops the space a piece starts with right after BOS; the byte test comes
	 * after, as in llama2.c, so " <0x41>" after BOS would still be the byte 'A'. */
	if (t->bos_id >= 0 && prev_token == t->bos_id && piece_len > 0 && piece[0] == ' ') {
		piece++;
		piece_len--;
	}
	/* Only the exact form "<0xXX>" is a byte (llama2.c's sscanf would also take "<0xA" and
	 * the like, which no real vocabulary holds). */
	if (piece_len == 6 && memcmp(piece, "<0x", 3) == 0 && piece[5] == '>') {
		int hi = tokenizer_hex_digit(piece[3]), lo = tokenizer_hex_digit(piece[4]);
		if (hi >= 0 && lo >= 0) {
			piece = &t->byte_pieces[2 * (hi * 16 + lo)];
			piece_len = 1;
		}
	}
	if (len)
		*len = piece_len;
	return piece;
}

int skv_piece_is_printable(const char *piece, size_t len)
{
	if (!piece || len == 0)
		return 0;
	if (len > 1)
		return 1;
	/* isprint()/isspace() in the C locale, spelled out so the answer ignores setlocale(). */
	unsigned char byte = (unsigned char)piece[0];
	bool printable = byte >= 0x20 && byte <= 0x7e;
	bool space = byte == ' ' || (byte >= '\t' && byte <= '\r');
	return printable || space;
}

/* --- encoding ----------------------------------------------------------------------------- */

/* Higher score first; on equal scores the leftmost pair, as llama2.c's strict '>' scan picks. */
static inline bool tokenizer_candidate_before(const struct tokenizer_candidate *a,
					      const struct tokenizer_candidate *b)
{
	if (a->score != b->score)
		return a->score > b->score;
	return a->left < b->left;
}

void tokenizer_heap_sift_down(struct tokenizer_heap *heap, size_t i)
{
	struct tokenizer_candidate *items = heap->items;
	struct tokenizer_candidate moving = items[i];
	for (;;) {
		size_t child = 2 * i + 1;
		if (child >= heap->count)
			break;
		if (child + 1 < heap->count &&
		    tokenizer_candidate_before(&items[child + 1], &items[child]))
			child++;
		if (!tokenizer_candidate_before(&items[child], &moving))
			break;
		items[i] = items[child];
		i = child;
	}
	items[i] = moving;
}

int tokenizer_heap_push(struct tokenizer_heap *heap, const struct tokenizer_candidate *c)
{
	if (heap->count == heap->cap) {
		size_t cap = heap->cap ? 2 * heap->cap : 64;
		struct tokenizer_candidate *grown = realloc(heap->items, cap * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		heap->items = grown;
		heap->cap = cap;
	}
	size_t i = heap->count++;
	while (i > 0) {
		size_t parent = (i - 1) / 2;
		if (!tokenizer_candidate_before(c, &heap->items[parent]))
			break;
		heap->items[i] = heap->items[parent];
		i = parent;
	}
	heap->items[i] = *c;
	return 0;
}

void tokenizer_heap_pop(struct tokenizer_heap *heap, struct tokenizer_candidate *top)
{
	*top = heap->items[0];
	heap->items[0] = heap->items[--heap->count];
	if (heap->count)
		tokenizer_heap_sift_down(heap, 0);
}

/* Fill *c for the pair (left, left's next) if its concatenation is a piece llama2.c would merge
 * (score above its starting best); returns whether it is. */
int tokenizer_merge(struct tokenizer_heap *heap, struct tokenizer_symbol *symbols,
		    tokenizer_pair_fn pair, const void *vocab)
{
	int rc;
	while (heap->count) {
		struct tokenizer_candidate best, next;
		tokenizer_heap_pop(heap, &best);
		struct tokenizer_symbol *left = &symbols[best.left];
		/* Stale unless both symbols are unchanged since the push: a merge changes the
		 * surviving symbol's id and kills the other (id -1). */
		if (left->id != best.left_id || left->next < 0 ||
		    symbols[left->next].id != best.right_id)
			continue;
		int32_t right = left->next;
		left->id = best.merged_id;
		left->next = symbols[right].next;
		if (left->next >= 0)
			symbols[left->next].prev = best.left;
		symbols[right].id = -1;
		symbols[right].next = -1;
		/* The merged symbol forms new pairs with both neighbours. */
		if (left->prev >= 0 && pair(vocab, symbols, left->prev, &next) &&
		    (rc = tokenizer_heap_push(heap, &next)) < 0)
			return rc;
		if (pair(vocab, symbols, best.left, &next) &&
		    (rc = tokenizer_heap_push(heap, &next)) < 0)
			return rc;
	}
	return 0;
}

static bool tokenizer_pair(const struct skv_tokenizer *t, const struct tokenizer_symbol *symbols,
			   int32_t left, struct tokenizer_candidate *c);

static bool tokenizer_pair_any(const void *vocab, const struct tokenizer_symbol *symbols,
			       int32_t left, struct tokenizer_candidate *c)
{
	return tokenizer_pair(vocab, symbols, left, c);
}

static bool tokenizer_pair(const struct skv_tokenizer *t, const struct tokenizer_symbol *symbols,
			   int32_t left, struct tokenizer_candidate *c)
{
	int32_t right = symbols[left].next;
	if (right < 0)
		return false;
	int32_t left_id = symbols[left].id, right_id = symbols[right].id;
	int32_t merged = tokenizer_lookup2(t, tokenizer_piece_ptr(t, left_id),
					   tokenizer_piece_len(t, left_id),
					   tokenizer_piece_ptr(t, right_id),
					   tokenizer_piece_len(t, right_id));
	/* NaN scores fail the comparison too, as they never win llama2.c's scan. */
	if (merged < 0 || !(t->scores[merged] > TOKENIZER_MIN_MERGE_SCORE))
		return false;
	c->score = t->scores[merged];
	c->left = left;
	c->left_id = left_id;
	c->right_id = right_id;
	c->merged_id = merged;
	return true;
}

static inline int32_t tokenizer_byte_token(const struct skv_tokenizer *t, unsigned char byte)
{
	int32_t id = (int32_t)byte + TOKENIZER_BYTE_TOKEN_BASE;
	return id < t->vocab_size ? id : SKV_TOKEN_UNK;
}

static inline bool tokenizer_is_continuation(unsigned char byte)
{
	return (byte & 0xc0) == 0x80;
}

/* Split text into llama2.c's initial symbols, appended at symbols[*n] (ids only): a byte takes
 * the continuation bytes that follow it, up to 4 bytes in all (so a run of stray continuation
 * bytes is cut into groups of 4 the same way); a group that is a piece becomes one symbol,
 * otherwise each of its bytes becomes its fallback token. */
static void tokenizer_split(const struct skv_tokenizer *t, const char *text, size_t len,
			    struct tokenizer_symbol *symbols, int32_t *n)
{
	size_t i = 0;
	while (i < len) {
		size_t start = i++;
		while (i < len && i - start < TOKENIZER_MAX_CODE_POINT_BYTES &&
		       tokenizer_is_continuation((unsigned char)text[i]))
			i++;
		int32_t id = tokenizer_lookup2(t, text + start, i - start, "", 0);
		if (id >= 0) {
			symbols[(*n)++].id = id;
			continue;
		}
		for (size_t b = start; b < i; b++)
			symbols[(*n)++].id = tokenizer_byte_token(t, (unsigned char)text[b]);
	}
}

int tokenizer_ids_push(struct tokenizer_ids *out, int32_t id)
{
	if (out->count == out->cap) {
		size_t cap = out->cap ? 2 * out->cap : 64;
		int32_t *grown = realloc(out->ids, cap * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		out->ids = grown;
		out->cap = cap;
	}
	out->ids[out->count++] = id;
	return 0;
}

/* Merge one list of symbols[0..n_symbols) (ids set) to the end, appending the result to *out. */
static int tokenizer_spm_merge(const struct skv_tokenizer *t, struct tokenizer_symbol *symbols,
			       int32_t n_symbols, struct tokenizer_heap *heap,
			       struct tokenizer_ids *out)
{
	int rc = 0;

	for (int32_t i = 0; i < n_symbols; i++) {
		symbols[i].prev = i - 1;
		symbols[i].next = i + 1 < n_symbols ? i + 1 : -1;
	}
	/* Every mergeable adjacent pair, heapified bottom-up in O(n). */
	heap->count = 0;
	if (n_symbols > 1) {
		if (heap->cap < (size_t)n_symbols) {
			struct tokenizer_candidate *grown =
				realloc(heap->items, (size_t)n_symbols * sizeof(*grown));
			if (!grown)
				return -ENOMEM;
			heap->items = grown;
			heap->cap = (size_t)n_symbols;
		}
		for (int32_t i = 0; i + 1 < n_symbols; i++)
			if (tokenizer_pair(t, symbols, i, &heap->items[heap->count]))
				heap->count++;
		for (size_t i = heap->count / 2; i-- > 0;)
			tokenizer_heap_sift_down(heap, i);
	}

	rc = tokenizer_merge(heap, symbols, tokenizer_pair_any, t);
	if (rc < 0)
		return rc;

	for (int32_t i = n_symbols ? 0 : -1; i >= 0 && rc == 0; i = symbols[i].next)
		rc = tokenizer_ids_push(out, symbols[i].id);
	return rc;
}

/* llama2.c's encode() of text[0..len), appended to *out; BOS (when asked) is a symbol of the
 * list as in llama2.c, which merges it like any other.
 *
 * llama2.c merges over the whole text at once; here the text is cut before every space that
 * follows a non-space, and each word is merged alone, when the vocabulary allows it
 * (t->spm_words: it has a " " piece and no piece holds a space after another character). Then
 * no pair across a cut can ever merge, since its concatenation would hold a non-space character
 * (or a byte token's '>') followed by a space, and merges on either side never change the
 * candidates of the other; so each word ends as it would in the whole text, with the same
 * order of merges inside it, and the result is llama2.c's exactly. A word's heap fits in the
 * caches, where one heap over a megabyte of text does not. */
static int tokenizer_spm_encode(const struct skv_tokenizer *t, const char *text, size_t len,
				bool bos, struct tokenizer_ids *out)
{
	struct tokenizer_heap heap = { 0 };
	struct tokenizer_symbol *symbols;
	int rc = 0;

	/* BOS, the dummy prefix, at most one symbol per byte. */
	symbols = malloc(((size_t)len + 2) * sizeof(*symbols));
	if (!symbols)
		return -ENOMEM;

	size_t start = 0;
	bool first = true;
	while (rc == 0 && (first || start < len)) {
		size_t end = len;
		if (t->spm_words)
			for (end = start + 1; end < len; end++)
				if (text[end] == ' ' && text[end - 1] != ' ')
					break;
		if (end > len)
			end = len;
		int32_t n_symbols = 0;
		if (first) {
			if (bos && t->bos_id >= 0)
				symbols[n_symbols++].id = t->bos_id;
			if (len > 0) {
				int32_t space = tokenizer_lookup2(t, " ", 1, "", 0);
				symbols[n_symbols++].id = space >= 0 ? space :
								       tokenizer_byte_token(t, ' ');
			}
		}
		tokenizer_split(t, text + start, end - start, symbols, &n_symbols);
		rc = tokenizer_spm_merge(t, symbols, n_symbols, &heap, out);
		first = false;
		start = end;
	}
	free(heap.items);
	free(symbols);
	return rc;
}

/* SentencePiece with special tokens cut out first (user-defined ones always, the others when
 * parse_special), as llama.cpp does: the text between them is encoded by llama2.c's encoder,
 * each stretch with its own dummy prefix (llama.cpp's add_space_prefix after a special token). */
static int tokenizer_spm_encode_special(const struct skv_tokenizer *t, const char *text,
					size_t len, bool parse_special, struct tokenizer_ids *out)
{
	size_t start = 0, pos = 0;
	int rc;

	while (pos < len) {
		size_t match_len;
		int32_t id = tokenizer_special_at(t, text + pos, len - pos, parse_special,
						  &match_len);
		if (id < 0) {
			pos++;
			continue;
		}
		if (pos > start && (rc = tokenizer_spm_encode(t, text + start, pos - start, false,
							      out)) < 0)
			return rc;
		if ((rc = tokenizer_ids_push(out, id)) < 0)
			return rc;
		start = pos += match_len;
	}
	if (len > start)
		return tokenizer_spm_encode(t, text + start, len - start, false, out);
	return 0;
}

static int tokenizer_encode(const struct skv_tokenizer *t, const char *text, size_t len,
			    int bos, int eos, bool parse_special, int32_t **ids, size_t *n_ids)
{
	struct tokenizer_ids out = { 0 };
	int rc;

	*ids = NULL;
	*n_ids = 0;
	if (!t || (!text && len > 0))
		return -EINVAL;
	if (len > INT32_MAX - 3)
		return -EOVERFLOW;
	/* Without special tokens to find (a llama2.c file has none; Llama 2's GGUF has no
	 * user-defined ones), this is llama2.c's encode() as it is. */
	if (t->kind == TOKENIZER_SPM && (parse_special ? t->n_specials == 0 : !t->any_always)) {
		rc = tokenizer_spm_encode(t, text, len, bos, &out);
	} else {
		rc = bos && t->bos_id >= 0 ? tokenizer_ids_push(&out, t->bos_id) : 0;
		if (rc == 0)
			rc = t->kind == TOKENIZER_BPE ?
				     tokenizer_bpe_encode(t, text, len, parse_special, &out) :
				     tokenizer_spm_encode_special(t, text, len, parse_special, &out);
	}
	if (rc == 0 && eos && t->eos_id >= 0)
		rc = tokenizer_ids_push(&out, t->eos_id);
	if (rc < 0) {
		free(out.ids);
		return rc;
	}
	/* A tight allocation for the caller, never NULL. */
	int32_t *tight = realloc(out.ids, (out.count + 1) * sizeof(*tight));
	*ids = tight ? tight : out.ids;
	*n_ids = out.count;
	return *ids ? 0 : -ENOMEM;
}

int skv_tokenizer_encode(const struct skv_tokenizer *t, const char *text, size_t len, int bos,
			 int eos, int32_t **ids, size_t *n_ids)
{
	return tokenizer_encode(t, text, len, bos, eos, false, ids, n_ids);
}

int skv_tokenizer_encode_special(const struct skv_tokenizer *t, const char *text, size_t len,
				 int bos, int eos, int32_t **ids, size_t *n_ids)
{
	return tokenizer_encode(t, text, len, bos, eos, true, ids, n_ids);
}
