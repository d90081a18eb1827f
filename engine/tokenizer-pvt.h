/* Private to the tokenizer: the one vocabulary struct shared by the SentencePiece path
 * (tokenizer.c), the byte-level BPE path (tokenizer-bpe.c) and the pre-tokenizer regexes
 * (pretok.c). Nothing outside those three files includes this header. */
#ifndef SKV_TOKENIZER_PVT_H
#define SKV_TOKENIZER_PVT_H

#include "gguf.h"
#include "tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* GGUF token types, llama.cpp's numbering (tokenizer.ggml.token_type). */
#define TOKENIZER_TYPE_NORMAL 1
#define TOKENIZER_TYPE_UNKNOWN 2
#define TOKENIZER_TYPE_CONTROL 3
#define TOKENIZER_TYPE_USER_DEFINED 4
#define TOKENIZER_TYPE_UNUSED 5
#define TOKENIZER_TYPE_BYTE 6

enum tokenizer_kind {
	TOKENIZER_SPM = 0, /* llama2.c SentencePiece BPE: tok512.bin or GGUF "llama" */
	TOKENIZER_BPE = 1, /* byte-level BPE: GGUF "gpt2" */
};

/* A token matched verbatim in the text before any other tokenization. */
struct tokenizer_special {
	const char *text; /* raw GGUF text, into special_bytes; not NUL-terminated */
	uint32_t len;     /* bytes, >= 1 */
	int32_t id;
	bool always;      /* user-defined: matched even when special tokens are not parsed */
};

struct pretok;
struct tokenizer_bpe;

struct skv_tokenizer {
	int32_t vocab_size;
	enum tokenizer_kind kind;
	size_t max_piece_len;   /* longest piece, bytes */
	char *piece_bytes;      /* every piece followed by a NUL, in id order */
	size_t piece_bytes_len; /* bytes used in piece_bytes */
	size_t piece_bytes_cap; /* bytes allocated for piece_bytes while loading */
	size_t *piece_offset;   /* (vocab_size + 1): piece i is [offset[i], offset[i+1] - 1) */
	float *scores;          /* (vocab_size) merge scores (SPM); GGUF scores or 0 (BPE) */
	int32_t *lookup;        /* (lookup_mask + 1) hash slots: a token id, or -1 when empty */
	uint64_t lookup_mask;
	char byte_pieces[512];  /* byte b at [2b] followed by a NUL: what "<0xXX>" decodes to */
	bool spm_words;         /* SentencePiece may merge word by word (tokenizer_spm_encode) */

	/* Special ids: -1 when the vocabulary has none. tok512.bin: 1, 2, -1, -1. */
	int32_t bos_id, eos_id, eot_id, pad_id;
	bool add_bos;           /* the model expects BOS first (tokenizer.ggml.add_bos_token) */
	uint8_t *types;         /* (vocab_size) GGUF token types; NULL for tok512.bin */

	/* Control, unknown and user-defined tokens sorted by first byte, then longest first,
	 * then text, then id; special_first[b]..special_first[b+1] start with byte b. */
	struct tokenizer_special *specials;
	size_t n_specials;
	char *special_bytes;
	uint32_t special_first[257];
	uint32_t *special_group_end; /* (n_specials) past the last entry of i's first byte and length */
	bool special_starts[256]; /* some user-defined token starts with this byte */
	bool any_always;          /* the vocabulary has user-defined tokens */

	struct tokenizer_bpe *bpe; /* BPE only */
};

/* One symbol of the text being encoded; dead once merged into its left neighbour (id -1). */
struct tokenizer_symbol {
	int32_t id;
	int32_t prev; /* -1 at the start */
	int32_t next; /* -1 at the end */
};

/* A mergeable adjacent pair (left, left's next) as it was when pushed. */
struct tokenizer_candidate {
	float score;      /* SPM: score of merged_id; BPE: -rank (exact below 2^24 merges) */
	int32_t left;     /* symbol index; also the tie-break: leftmost first */
	int32_t left_id;  /* token ids of both symbols when pushed: a mismatch marks it stale */
	int32_t right_id;
	int32_t merged_id;
};

struct tokenizer_heap {
	struct tokenizer_candidate *items;
	size_t count;
	size_t cap;
};

/* A growing list of output ids. */
struct tokenizer_ids {
	int32_t *ids;
	size_t count;
	size_t cap;
};

static inline size_t tokenizer_piece_len(const struct skv_tokenizer *t, int32_t id)
{
	return t->piece_offset[id + 1] - t->piece_offset[id] - 1;
}

static inline const char *tokenizer_piece_ptr(const struct skv_tokenizer *t, int32_t id)
{
	return t->piece_bytes + t->piece_offset[id];
}

/* tokenizer.c: the vocabulary arena, hash lookup, heap and id list, used by both paths. */
int tokenizer_alloc(int32_t vocab_size, struct skv_tokenizer **out);
char *tokenizer_reserve(struct skv_tokenizer *t, size_t len);
void tokenizer_commit(struct skv_tokenizer *t, int32_t id, size_t len, float score);
int tokenizer_index(struct skv_tokenizer *t);
int32_t tokenizer_lookup2(const struct skv_tokenizer *t, const char *a, size_t a_len,
			  const char *b, size_t b_len);
void tokenizer_heap_sift_down(struct tokenizer_heap *heap, size_t i);
int tokenizer_heap_push(struct tokenizer_heap *heap, const struct tokenizer_candidate *c);
void tokenizer_heap_pop(struct tokenizer_heap *heap, struct tokenizer_candidate *top);

/* A GGUF vocabulary's tokenizer.ggml.tokens, which must hold exactly vocab_size tokens: 0, or
 * -ENOENT/-SKV_EFORMAT/-SKV_EVOCAB with msg naming the file (then *tokens is NULL). */
struct skv_gguf;
struct skv_gguf_str;
int tokenizer_gguf_tokens(const struct skv_gguf *g, int32_t vocab_size,
			  struct skv_gguf_str **tokens, uint64_t *n_tokens, char *msg,
			  size_t msg_len);

/* The candidate merge of symbols[left] with its right neighbour, if the vocabulary has one. */
typedef bool (*tokenizer_pair_fn)(const void *vocab, const struct tokenizer_symbol *symbols,
				  int32_t left, struct tokenizer_candidate *out);

/* Both tokenizers' merge loop over a linked list of symbols whose first candidates are in
 * heap: pop the best candidate, skip it if stale (either symbol changed since the push), merge
 * (the left symbol takes the merged id, the right one dies: id -1, next -1), push the merged
 * symbol's new pairs with both neighbours. O(n log n). Returns 0 or -ENOMEM. */
int tokenizer_merge(struct tokenizer_heap *heap, struct tokenizer_symbol *symbols,
		    tokenizer_pair_fn pair, const void *vocab);
int tokenizer_ids_push(struct tokenizer_ids *out, int32_t id);

/* tokenizer-bpe.c, for both kinds of GGUF vocabulary: the special ids (bos/eos/eot/pad
 * keys), add_bos_token, the token types and the special-token index, from the GGUF's raw
 * tokens[vocab_size] and its int32 token_type array (NULL: all normal). t->add_bos holds the
 * default for a file without the key. 0 or -errno with msg set. */
int tokenizer_gguf_specials(struct skv_tokenizer *t, const struct skv_gguf *g,
			    const struct skv_gguf_str *tokens, const void *types, char *msg,
			    size_t msg_len);

/* The longest special token at text[0..len), or -1: user-defined ones always, control and
 * unknown ones only when `parse_special`. *match_len gets its length. */
int32_t tokenizer_special_at(const struct skv_tokenizer *t, const char *text, size_t len,
			     bool parse_special, size_t *match_len);

/* tokenizer-bpe.c */
int tokenizer_bpe_from_gguf(const struct skv_gguf *g, int32_t vocab_size,
			    struct skv_tokenizer **out, char *msg, size_t msg_len);
int tokenizer_bpe_encode(const struct skv_tokenizer *t, const char *text, size_t len,
			 bool parse_special, struct tokenizer_ids *out);
const char *tokenizer_bpe_decode(const struct skv_tokenizer *t, int32_t token, size_t *len);
const char *tokenizer_bpe_pre_name(const struct skv_tokenizer *t);
void tokenizer_bpe_free(struct tokenizer_bpe *bpe);

/* pretok.c: the pre-tokenizer of a tokenizer.ggml.pre name, PCRE2 with UTF and UCP.
 * A pretok is immutable once built; splitting may run from many threads at once. */
struct pretok_span {
	size_t offset; /* from the start of the text */
	size_t len;    /* >= 1 */
};

struct pretok_spans {
	struct pretok_span *items;
	size_t count;
	size_t cap;
};

/* -ENOENT for a name this build does not know, -ENOMEM, or -EINVAL if PCRE2 refused a
 * pattern (a build without Unicode support). */
int pretok_new(const char *name, size_t name_len, struct pretok **out);
void pretok_free(struct pretok *p);
const char *pretok_name(const struct pretok *p);
bool pretok_ignore_merges(const struct pretok *p); /* a word that is a token skips merges */
bool pretok_add_bos(const struct pretok *p);       /* llama.cpp's default for add_bos */
/* The names pretok_new() accepts, comma-separated, for messages; one by one (NULL past the
 * last). */
const char *pretok_known_names(void);
const char *pretok_known(size_t index);

/* Split text[0..len) into words, replacing spans->items[0..count); each regex of the set
 * splits every current word into its matches and the text between them, in order. Bytes
 * that are not valid UTF-8 never match and end up in words of their own. 0 or -ENOMEM. */
int pretok_split(const struct pretok *p, const char *text, size_t len,
		 struct pretok_spans *spans);

#endif
