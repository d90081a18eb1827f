/* Tokenizers: SentencePiece-style BPE with llama2.c semantics, and byte-level BPE (GPT-2 style).
 *
 * SentencePiece (kind "spm": llama2.c tokenizer files and GGUF tokenizer.ggml.model "llama").
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
 * A GGUF vocabulary's user-defined tokens (Phi-3's "</s>") are cut out of the text first and
 * the text after one gets its own dummy prefix, as llama.cpp does (llama2.c files have none).
 * These ids equal llama.cpp's for GGUF "llama" vocabularies on its test vectors (Llama 2 SPM,
 * Phi-3); they may differ from llama.cpp's on invalid UTF-8 (llama2.c's byte grouping).
 *
 * Byte-level BPE (kind "bpe": GGUF tokenizer.ggml.model "gpt2"), as llama.cpp and the Hugging
 * Face tokenizers encode: special tokens are cut out of the text first (user-defined ones
 * always, control ones only by skv_tokenizer_encode_special()), the rest is split into words by
 * the regexes of the pre-tokenizer tokenizer.ggml.pre names (gpt-2, mpt, olmo or gpt-neox,
 * llama-bpe, qwen2, falcon, starcoder, deepseek-llm, and the few more of llama.cpp's names
 * listed in pretok.c; PCRE2), each word's bytes become GPT-2's byte characters and merge by
 * the rank of tokenizer.ggml.merges, lowest first, leftmost on ties, in O(n log n). Bytes that
 * are not valid UTF-8 stay bytes (their own words), so decode(encode(x)) == x for any x whose
 * bytes all have a character in the vocabulary (a byte without one is dropped, as in llama.cpp;
 * Falcon, MPT, GPT-NeoX and StarCoder lack some bytes no UTF-8 text has, and DeepSeek's
 * user-defined "\u00f8".."\u00ff" stand where bytes 0xf8..0xff would). Decoding gives each token's bytes: normal tokens
 * through the inverse byte map, special tokens as their text; prev_token is not used.
 *
 * Thread safety: a built tokenizer is immutable; encode/decode may run concurrently. */
#ifndef SKV_TOKENIZER_H
#define SKV_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct skv_gguf;
struct skv_tokenizer;

/* The ids of llama2.c files; a GGUF vocabulary's are skv_tokenizer_bos() / _eos(). */
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

/* Build from a GGUF file's vocabulary, by tokenizer.ggml.model: "llama" (SentencePiece) or
 * "gpt2" (byte-level BPE); a missing or other model is refused (-ENOENT / -SKV_EFORMAT, msg
 * naming it). -SKV_EVOCAB if the vocabulary's size differs from vocab_size, -ENOENT/-SKV_EFORMAT
 * if the tokenizer keys are missing or malformed, -EINVAL for vocab_size < 3. "llama" needs
 * tokens, scores and token_type with equal counts. "gpt2" needs tokens, merges (each "A B" with
 * A, B and AB in the vocabulary, else refused naming the merge) and a tokenizer.ggml.pre this
 * build knows (an unknown or missing one is refused naming it: nothing stands in for it);
 * token_type and scores are optional. Both read tokenizer.ggml.{bos,eos,eot,padding}_token_id
 * and add_bos_token. The tokenizer copies what it needs: g may be closed afterwards. */
int skv_tokenizer_from_gguf(const struct skv_gguf *g, int32_t vocab_size,
			    struct skv_tokenizer **out, char *msg, size_t msg_len);

void skv_tokenizer_free(struct skv_tokenizer *t); /* accepts NULL */

int32_t skv_tokenizer_vocab_size(const struct skv_tokenizer *t);

/* Encode text[0..len) (need not be NUL-terminated). *ids is malloc'ed (caller frees), *n_ids
 * receives the count. bos: prepend skv_tokenizer_bos() (1 for llama2.c files); eos: append
 * skv_tokenizer_eos() (2); either is skipped when the vocabulary has none. Control tokens
 * written in the text ("<|endoftext|>", "<s>") are plain text here. Returns 0 or -ENOMEM
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
/* As skv_tokenizer_encode(), but control (and unknown and user-defined) tokens written in the
 * text become their ids, longest match first from the left; for SentencePiece each stretch of
 * text between them gets its own dummy prefix, as llama.cpp encodes with parse_special. */
int skv_tokenizer_encode_special(const struct skv_tokenizer *t, const char *text, size_t len,
				 int bos, int eos, int32_t **ids, size_t *n_ids);

/* The vocabulary's special ids, -1 where it has none: BOS and EOS are 1 and 2 for llama2.c
 * files and a GGUF "llama" without the keys; EOT is tokenizer.ggml.eot_token_id or, without
 * that key, the control token <|eot_id|>, <|im_end|>, <|end|> or <end_of_turn> (llama.cpp's
 * rule), else -1; PAD is tokenizer.ggml.padding_token_id. */
int32_t skv_tokenizer_bos(const struct skv_tokenizer *t);
int32_t skv_tokenizer_eos(const struct skv_tokenizer *t);
int32_t skv_tokenizer_eot(const struct skv_tokenizer *t);
int32_t skv_tokenizer_pad(const struct skv_tokenizer *t);

/* Whether prompts start with BOS for this model: tokenizer.ggml.add_bos_token, else
 * llama.cpp's default (SentencePiece and llama-bpe: 1, other byte-level BPE: 0). */
int skv_tokenizer_add_bos(const struct skv_tokenizer *t);

/* 1 if `token` is a control (or unknown-type) token, which a printer of generated text skips:
 * GGUF token types 3 and 2; in a llama2.c file, <unk>, BOS and EOS (ids 0..2). 0 otherwise,
 * also for an id out of range. */
int skv_tokenizer_is_control(const struct skv_tokenizer *t, int32_t token);

/* 1 if generating `token` ends the text: for SentencePiece vocabularies BOS (llama2.c's stories
 * mark the end of one story by starting the next; run.c stops there), EOS where the vocabulary
 * comes with token types (a GGUF), and EOT; for byte-level BPE, EOS and EOT. */
int skv_tokenizer_is_end(const struct skv_tokenizer *t, int32_t token);

/* Whether a generated token's decoded piece is printed: SentencePiece follows llama2.c
 * (skv_piece_is_printable: a lone non-printable byte is dropped); byte-level BPE prints every
 * byte (a character's UTF-8 bytes may come in several tokens) except control tokens. */
int skv_tokenizer_prints(const struct skv_tokenizer *t, int32_t token, const char *piece,
			 size_t len);

/* "spm" or "bpe"; the pre-tokenizer's name as tokenizer.ggml.pre spells it ("" for spm). */
const char *skv_tokenizer_kind(const struct skv_tokenizer *t);
const char *skv_tokenizer_pre(const struct skv_tokenizer *t);

const char *skv_tokenizer_decode(const struct skv_tokenizer *t, int32_t prev_token, int32_t token,
				 size_t *len);

/* The raw piece of a token, as stored (for tools; byte-level BPE pieces are in GPT-2's byte
 * characters, e.g. "\xc4\xa0the" for " the"); NULL if out of range. */
const char *skv_tokenizer_piece(const struct skv_tokenizer *t, int32_t token, size_t *len);

/* The merge score of a token into *score: 0, or -EINVAL if token is out of range. */
int skv_tokenizer_score(const struct skv_tokenizer *t, int32_t token, float *score);

/* Whether a decoded piece should be printed, as llama2.c's safe_printf() decides: 0 for an empty
 * piece and for a single byte that is neither printable nor white space in the C locale (a lone
 * byte of a split UTF-8 sequence, a control byte), 1 otherwise. */
int skv_piece_is_printable(const char *piece, size_t len);

#endif
