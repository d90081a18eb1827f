/* SentencePiece-style BPE tokenizer with llama2.c semantics.
 *
 * Encoding equals llama2.c's encode(): optional BOS, a dummy-prefix " " token when the text is
 * non-empty, one token per UTF-8 code point found in the vocabulary (byte-fallback tokens
 * <0xXX> = id byte + 3 otherwise, grouping bytes exactly as llama2.c does, invalid UTF-8
 * included), then repeated merges of the adjacent pair whose concatenation has the highest score,
 * the leftmost pair on ties. Unlike llama2.c's quadratic loop, merges run from a priority queue in
 * O(n log n). Decoding equals llama2.c's decode(): the leading space of a piece that follows BOS
 * is dropped, and "<0xXX>" pieces become the raw byte.
 *
 * Sources: the llama2.c tokenizer file (tok512.bin: int32 max_token_length, then per token
 * float32 score, int32 length, bytes) for a given vocabulary size, or a GGUF file's
 * tokenizer.ggml.{tokens,scores,token_type} (U+2581 becomes ' ', control tokens <s>/</s> become
 * "\n<s>\n"/"\n</s>\n" as llama2.c's export writes them), so that both give identical results.
 *
 * Thread safety: a built tokenizer is immutable; encode/decode may run concurrently. */
#ifndef SKV_TOKENIZER_H
#define SKV_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct skv_gguf;
struct skv_tokenizer;

#define SKV_TOKEN_UNK 0
#define SKV_TOKEN_BOS 1
#define SKV_TOKEN_EOS 2

/* Load a llama2.c tokenizer file holding exactly vocab_size tokens. A file with fewer
 * (truncated) or more entries (another model's vocabulary) is refused: -SKV_ETRUNCATED or
 * -SKV_EVOCAB, with msg naming the path and both sizes. A length field that is negative or above
 * the header's max_token_length is -SKV_EFORMAT; a missing file -ENOENT; vocab_size < 3 (no room
 * for <unk>, BOS, EOS) -EINVAL. On error *out is NULL. Duplicate pieces encode as the lowest id. */
int skv_tokenizer_load(const char *path, int32_t vocab_size, struct skv_tokenizer **out,
		       char *msg, size_t msg_len);

/* Build from a GGUF file's vocabulary; -SKV_EVOCAB if its size differs from vocab_size,
 * -ENOENT/-SKV_EFORMAT if the tokenizer keys are missing or malformed (tokens, scores and
 * token_type are all required, with equal counts), -EINVAL for vocab_size < 3. The tokenizer
 * copies what it needs: g may be closed afterwards. */
int skv_tokenizer_from_gguf(const struct skv_gguf *g, int32_t vocab_size,
			    struct skv_tokenizer **out, char *msg, size_t msg_len);

void skv_tokenizer_free(struct skv_tokenizer *t); /* accepts NULL */

int32_t skv_tokenizer_vocab_size(const struct skv_tokenizer *t);

/* Encode text[0..len) (need not be NUL-terminated). *ids is malloc'ed (caller frees), *n_ids
 * receives the count. bos: prepend BOS (1); eos: append EOS (2). Returns 0 or -ENOMEM
 * (-EINVAL for a NULL tokenizer or NULL text with len > 0, -EOVERFLOW for len > INT32_MAX - 3).
 * Bytes are bytes: an embedded NUL is encoded (as its byte-fallback token) where llama2.c's C
 * strings would stop. Where llama2.c would emit an invalid id, this does not: a vocabulary
 * without a " " piece gets the byte-fallback token of ' ' as dummy prefix, and a byte-fallback
 * id (byte + 3) outside the vocabulary becomes SKV_TOKEN_UNK. */
int skv_tokenizer_encode(const struct skv_tokenizer *t, const char *text, size_t len, int bos,
			 int eos, int32_t **ids, size_t *n_ids);

/* The bytes `token` prints after `prev_token`, as llama2.c's decode(): a pointer to the piece
 * (or to an internal one-byte string for <0xXX> pieces), length in *len. Never NULL for a
 * valid id; NULL for an id out of range. */
const char *skv_tokenizer_decode(const struct skv_tokenizer *t, int32_t prev_token, int32_t token,
				 size_t *len);

/* The raw piece of a token, as stored (for tools); NULL if out of range. */
const char *skv_tokenizer_piece(const struct skv_tokenizer *t, int32_t token, size_t *len);

/* The merge score of a token into *score: 0, or -EINVAL if token is out of range. */
int skv_tokenizer_score(const struct skv_tokenizer *t, int32_t token, float *score);

/* Whether a decoded piece should be printed, as llama2.c's safe_printf() decides: 0 for an empty
 * piece and for a single byte that is neither printable nor white space in the C locale (a lone
 * byte of a split UTF-8 sequence, a control byte), 1 otherwise. */
int skv_piece_is_printable(const char *piece, size_t len);

#endif
