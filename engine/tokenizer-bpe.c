/* Byte-level BPE (GGUF tokenizer.ggml.model "gpt2") and the special tokens of every GGUF
 * vocabulary; the contract is in tokenizer.h, the shared struct in tokenizer-pvt.h.
 *
 * Encoding follows llama.cpp's llm_tokenizer_bpe_session, which matches the Hugging Face
 * tokenizers on its test vectors: special tokens are cut out of the text first (user-defined
 * ones always, control ones only when asked), the rest is split into words by the
 * pre-tokenizer's regexes (pretok.c), and each word is merged on its own. A word starts as one
 * symbol per byte, the token of that byte's GPT-2 character (bytes_to_unicode: printable
 * Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 upwards in byte order), and
 * the adjacent pair with the lowest merge rank (leftmost on ties) merges until no pair of
 * tokenizer.ggml.merges is left: the heap of candidates with lazy invalidation that the
 * SentencePiece path uses (tokenizer.c), O(n log n) per word. Decoding maps each character of
 * a normal token back to its byte; special tokens decode to their text.
 *
 * Special tokens are found leftmost-longest, as the Hugging Face tokenizers' added-token
 * matcher does (llama.cpp instead takes the longest token first over the whole text; the two
 * differ only where two special tokens overlap). */
#include "tokenizer-pvt.h"

#include "gguf.h"
#include "skv-error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Ranks travel as -rank in the shared candidate's float score: exact below 2^24. */
#define BPE_MAX_MERGES (1u << 24)

/* Above the last GPT-2 character (U+0100 + 67). */
#define BPE_CHAR_LIMIT 0x144

struct bpe_merge {
	uint64_t pair;   /* left id << 32 | right id */
	int32_t rank;    /* -1: empty slot */
	int32_t merged;  /* id of left ++ right */
};

struct tokenizer_bpe {
	struct pretok *pretok;
	bool ignore_merges;           /* a word that is a token is that token (Llama 3) */
	int32_t byte_token[256];      /* token of each byte's GPT-2 character; -1 if none */
	char byte_char[256][2];       /* that character in UTF-8 */
	uint8_t byte_char_len[256];   /* 1 or 2 */
	int16_t char_byte[BPE_CHAR_LIMIT]; /* the inverse: code point -> byte, or -1 */
	struct bpe_merge *merges;     /* (merge_mask + 1) slots, at most half full */
	uint64_t merge_mask;
	char *decoded;                /* every token's bytes, in id order */
	size_t *decoded_offset;       /* (vocab_size + 1) */
};

/* Per-encode scratch, so that a built tokenizer stays immutable and shareable. */
struct bpe_scratch {
	struct pretok_spans words;
	struct tokenizer_symbol *symbols;
	size_t symbols_cap;
	struct tokenizer_heap heap;
	char *mapped;                 /* a word in GPT-2 characters (ignore_merges lookups) */
	size_t mapped_cap;
};

void tokenizer_bpe_free(struct tokenizer_bpe *bpe)
{
	if (!bpe)
		return;
	pretok_free(bpe->pretok);
	free(bpe->merges);
	free(bpe->decoded);
	free(bpe->decoded_offset);
	free(bpe);
}

const char *tokenizer_bpe_pre_name(const struct skv_tokenizer *t)
{
	return pretok_name(t->bpe->pretok);
}

/* --- special tokens (both kinds) --------------------------------------------------------- */

static int bpe_special_cmp(const void *pa, const void *pb)
{
	const struct tokenizer_special *a = pa, *b = pb;
	unsigned char fa = (unsigned char)a->text[0], fb = (unsigned char)b->text[0];
	if (fa != fb)
		return fa < fb ? -1 : 1;
	if (a->len != b->len)
		return a->len > b->len ? -1 : 1;
	int by_text = memcmp(a->text, b->text, a->len);
	if (by_text)
		return by_text;
	return a->id < b->id ? -1 : a->id > b->id;
}

/* Sorted by first byte, then longest first, then by text: the tokens of one first byte and one
 * length form a group, searched by bisection, so finding the special token at a position costs
 * a bisection per distinct length (DeepSeek's 2,385 "[PAD...]" tokens are one group). */
static int bpe_specials_index(struct skv_tokenizer *t)
{
	qsort(t->specials, t->n_specials, sizeof(*t->specials), bpe_special_cmp);
	t->special_group_end = malloc((t->n_specials ? t->n_specials : 1) *
				      sizeof(*t->special_group_end));
	if (!t->special_group_end)
		return -ENOMEM;
	for (size_t i = t->n_specials; i-- > 0;) {
		bool same = i + 1 < t->n_specials && t->specials[i + 1].len == t->specials[i].len &&
			    t->specials[i + 1].text[0] == t->specials[i].text[0];
		t->special_group_end[i] = same ? t->special_group_end[i + 1] : (uint32_t)(i + 1);
	}
	memset(t->special_first, 0, sizeof(t->special_first));
	memset(t->special_starts, 0, sizeof(t->special_starts));
	for (size_t i = 0; i < t->n_specials; i++) {
		unsigned char first = (unsigned char)t->specials[i].text[0];
		t->special_first[first + 1]++;
		if (t->specials[i].always)
			t->special_starts[first] = t->any_always = true;
	}
	for (int b = 0; b < 256; b++)
		t->special_first[b + 1] += t->special_first[b];
	return 0;
}

int32_t tokenizer_special_at(const struct skv_tokenizer *t, const char *text, size_t len,
			     bool parse_special, size_t *match_len)
{
	unsigned char first = (unsigned char)text[0];
	if (!parse_special && !t->special_starts[first])
		return -1;
	for (uint32_t group = t->special_first[first]; group < t->special_first[first + 1];
	     group = t->special_group_end[group]) {
		size_t want = t->specials[group].len;
		if (want > len)
			continue;
		uint32_t lo = group, hi = t->special_group_end[group];
		while (lo < hi) { /* the first entry whose text is >= text[0..want) */
			uint32_t mid = lo + (hi - lo) / 2;
			if (memcmp(t->specials[mid].text, text, want) < 0)
				lo = mid + 1;
			else
				hi = mid;
		}
		/* Equal texts (a token listed twice) sit together, lowest id first. */
		for (; lo < t->special_group_end[group] &&
		       memcmp(t->specials[lo].text, text, want) == 0; lo++) {
			if (t->specials[lo].always || parse_special) {
				*match_len = want;
				return t->specials[lo].id;
			}
		}
	}
	return -1;
}

/* An id key: absent keeps the default, UINT32_MAX or another id outside the vocabulary
 * means "none" (llama.cpp's converters write UINT32_MAX for unset ids). */
static int bpe_read_id(const struct skv_gguf *g, const char *key, int32_t vocab_size,
		       int32_t *id, char *msg, size_t msg_len)
{
	uint32_t value;
	int rc = skv_gguf_get_u32(g, key, &value);
	if (rc == -ENOENT)
		return 0;
	if (rc < 0)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT, "%s: %s is not a token id",
				  skv_gguf_path(g), key);
	*id = value < (uint32_t)vocab_size ? (int32_t)value : -1;
	return 0;
}

static bool bpe_text_is(const struct skv_gguf_str *s, const char *text)
{
	return s->len == strlen(text) && memcmp(s->ptr, text, s->len) == 0;
}

int tokenizer_gguf_specials(struct skv_tokenizer *t, const struct skv_gguf *g,
			    const struct skv_gguf_str *tokens, const void *types, char *msg,
			    size_t msg_len)
{
	const char *path = skv_gguf_path(g);
	int32_t n = t->vocab_size;
	int rc;

	if ((rc = bpe_read_id(g, "tokenizer.ggml.bos_token_id", n, &t->bos_id, msg, msg_len)) ||
	    (rc = bpe_read_id(g, "tokenizer.ggml.eos_token_id", n, &t->eos_id, msg, msg_len)) ||
	    (rc = bpe_read_id(g, "tokenizer.ggml.eot_token_id", n, &t->eot_id, msg, msg_len)) ||
	    (rc = bpe_read_id(g, "tokenizer.ggml.padding_token_id", n, &t->pad_id, msg, msg_len)))
		return rc;
	int add_bos;
	rc = skv_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos);
	if (rc == 0)
		t->add_bos = add_bos;
	else if (rc != -ENOENT)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: tokenizer.ggml.add_bos_token is not a bool", path);

	uint32_t eot_value;
	bool eot_keyed = skv_gguf_get_u32(g, "tokenizer.ggml.eot_token_id", &eot_value) != -ENOENT;

	t->types = malloc((size_t)n);
	if (!t->types)
		goto out_nomem;
	size_t n_specials = 0, special_bytes = 0;
	for (int32_t id = 0; id < n; id++) {
		int32_t type = TOKENIZER_TYPE_NORMAL;
		if (types)
			memcpy(&type, (const char *)types + (size_t)id * sizeof(type), sizeof(type));
		t->types[id] = type >= 0 && type <= 255 ? (uint8_t)type : 0;
		if ((type == TOKENIZER_TYPE_CONTROL || type == TOKENIZER_TYPE_UNKNOWN ||
		     type == TOKENIZER_TYPE_USER_DEFINED) && tokens[id].len > 0 &&
		    tokens[id].len <= UINT32_MAX) {
			n_specials++;
			special_bytes += (size_t)tokens[id].len;
		}
	}
	t->specials = calloc(n_specials ? n_specials : 1, sizeof(*t->specials));
	t->special_bytes = malloc(special_bytes ? special_bytes : 1);
	if (!t->specials || !t->special_bytes)
		goto out_nomem;
	size_t used = 0;
	for (int32_t id = 0; id < n; id++) {
		uint8_t type = t->types[id];
		if ((type != TOKENIZER_TYPE_CONTROL && type != TOKENIZER_TYPE_UNKNOWN &&
		     type != TOKENIZER_TYPE_USER_DEFINED) || tokens[id].len == 0 ||
		    tokens[id].len > UINT32_MAX)
			continue;
		struct tokenizer_special *s = &t->specials[t->n_specials++];
		memcpy(t->special_bytes + used, tokens[id].ptr, (size_t)tokens[id].len);
		s->text = t->special_bytes + used;
		s->len = (uint32_t)tokens[id].len;
		s->id = id;
		s->always = type == TOKENIZER_TYPE_USER_DEFINED;
		used += (size_t)tokens[id].len;
		/* Without an eot_token_id key, the end-of-turn marker is the control token that
		 * the chat formats end a turn with, as llama.cpp finds it. */
		if (!eot_keyed && t->eot_id < 0 && type == TOKENIZER_TYPE_CONTROL &&
		    (bpe_text_is(&tokens[id], "<|eot_id|>") || bpe_text_is(&tokens[id], "<|im_end|>") ||
		     bpe_text_is(&tokens[id], "<|end|>") || bpe_text_is(&tokens[id], "<end_of_turn>")))
			t->eot_id = id;
	}
	if (bpe_specials_index(t) < 0)
		goto out_nomem;
	return 0;

out_nomem:
	return skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory loading %d tokens", path, n);
}

/* --- loading ----------------------------------------------------------------------------- */

static inline uint64_t bpe_pair_slot(uint64_t pair)
{
	uint64_t h = pair * 0x9e3779b97f4a7c15ull;
	return h ^ (h >> 31);
}

static const struct bpe_merge *bpe_merge_find(const struct tokenizer_bpe *bpe, int32_t left,
					      int32_t right)
{
	uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
	for (uint64_t slot = bpe_pair_slot(pair);; slot++) {
		const struct bpe_merge *m = &bpe->merges[slot & bpe->merge_mask];
		if (m->rank < 0)
			return NULL;
		if (m->pair == pair)
			return m;
	}
}

/* GPT-2's bytes_to_unicode(): the printable bytes of Latin-1 but the soft hyphen stand for
 * themselves; the other 68 bytes, in byte order, for U+0100 onwards. */
static void bpe_byte_chars(struct tokenizer_bpe *bpe)
{
	uint32_t next = 0x100;
	for (int cp = 0; cp < BPE_CHAR_LIMIT; cp++)
		bpe->char_byte[cp] = -1;
	for (int b = 0; b < 256; b++) {
		bool itself = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
		uint32_t cp = itself ? (uint32_t)b : next++;
		bpe->char_byte[cp] = (int16_t)b;
		if (cp < 0x80) {
			bpe->byte_char[b][0] = (char)cp;
			bpe->byte_char_len[b] = 1;
		} else {
			bpe->byte_char[b][0] = (char)(0xc0 | (cp >> 6));
			bpe->byte_char[b][1] = (char)(0x80 | (cp & 0x3f));
			bpe->byte_char_len[b] = 2;
		}
	}
}

static int bpe_hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* The bytes token `id` stands for, written at dst (at most the piece's length): a normal
 * token's GPT-2 characters become their bytes (any other character, or a stray byte, is
 * copied as it is); "<0xXX>" byte tokens become the byte; special tokens are their text. */
static size_t bpe_decode_piece(const struct tokenizer_bpe *bpe, const char *piece, size_t len,
			       uint8_t type, char *dst)
{
	if (type == TOKENIZER_TYPE_CONTROL || type == TOKENIZER_TYPE_UNKNOWN ||
	    type == TOKENIZER_TYPE_USER_DEFINED || type == TOKENIZER_TYPE_UNUSED) {
		memcpy(dst, piece, len);
		return len;
	}
	if (type == TOKENIZER_TYPE_BYTE && len == 6 && memcmp(piece, "<0x", 3) == 0 &&
	    piece[5] == '>' && bpe_hex_digit(piece[3]) >= 0 && bpe_hex_digit(piece[4]) >= 0) {
		dst[0] = (char)(bpe_hex_digit(piece[3]) * 16 + bpe_hex_digit(piece[4]));
		return 1;
	}
	size_t n = 0;
	for (size_t i = 0; i < len;) {
		unsigned char lead = (unsigned char)piece[i];
		if (lead >= 0xc0 && lead < 0xe0 && i + 1 < len &&
		    ((unsigned char)piece[i + 1] & 0xc0) == 0x80) {
			uint32_t cp = (uint32_t)(lead & 0x1f) << 6 | ((unsigned char)piece[i + 1] & 0x3f);
			if (cp < BPE_CHAR_LIMIT && bpe->char_byte[cp] >= 0) {
				dst[n++] = (char)bpe->char_byte[cp];
				i += 2;
				continue;
			}
		} else if (lead < 0x80 && bpe->char_byte[lead] >= 0) {
			dst[n++] = (char)bpe->char_byte[lead];
			i++;
			continue;
		}
		/* Not a GPT-2 character: copy the whole UTF-8 sequence (or the stray byte). */
		size_t end = i + 1;
		while (end < len && ((unsigned char)piece[end] & 0xc0) == 0x80 && end - i < 4)
			end++;
		memcpy(dst + n, piece + i, end - i);
		n += end - i;
		i = end;
	}
	return n;
}

static int bpe_build_decoded(struct skv_tokenizer *t)
{
	struct tokenizer_bpe *bpe = t->bpe;
	bpe->decoded_offset = malloc(((size_t)t->vocab_size + 1) * sizeof(*bpe->decoded_offset));
	/* Decoding never lengthens a piece. */
	bpe->decoded = malloc(t->piece_bytes_len ? t->piece_bytes_len : 1);
	if (!bpe->decoded_offset || !bpe->decoded)
		return -ENOMEM;
	size_t used = 0;
	for (int32_t id = 0; id < t->vocab_size; id++) {
		bpe->decoded_offset[id] = used;
		used += bpe_decode_piece(bpe, tokenizer_piece_ptr(t, id), tokenizer_piece_len(t, id),
					 t->types[id], bpe->decoded + used);
	}
	bpe->decoded_offset[t->vocab_size] = used;
	return 0;
}

/* tokenizer.ggml.merges: "A B" per rank, split at the first space after the first byte (as
 * llama.cpp splits them); A, B and A ++ B must all be tokens. */
static int bpe_load_merges(struct skv_tokenizer *t, const struct skv_gguf *g, char *msg,
			   size_t msg_len)
{
	const char *path = skv_gguf_path(g);
	struct tokenizer_bpe *bpe = t->bpe;
	struct skv_gguf_str *merges = NULL;
	uint64_t n_merges;
	int rc = skv_gguf_get_str_array(g, "tokenizer.ggml.merges", &merges, &n_merges);
	if (rc < 0)
		return skv_errorf(msg, msg_len, rc, "%s: tokenizer.ggml.merges: %s", path,
				  rc == -ENOENT ? "missing (a byte-level BPE vocabulary needs its "
						  "merges)" :
				  rc == -SKV_EFORMAT ? "not an array of strings" : skv_strerror(rc));
	if (n_merges >= BPE_MAX_MERGES) {
		rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
				"%s: tokenizer.ggml.merges holds %llu merges, more than the %u "
				"this tokenizer ranks exactly", path, (unsigned long long)n_merges,
				BPE_MAX_MERGES);
		goto out;
	}
	size_t slots = 16;
	while (slots < 2 * (size_t)n_merges)
		slots *= 2;
	bpe->merges = malloc(slots * sizeof(*bpe->merges));
	if (!bpe->merges) {
		rc = skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory loading %llu merges", path,
				(unsigned long long)n_merges);
		goto out;
	}
	for (size_t i = 0; i < slots; i++)
		bpe->merges[i].rank = -1;
	bpe->merge_mask = slots - 1;

	for (uint64_t rank = 0; rank < n_merges; rank++) {
		const char *text = merges[rank].ptr;
		size_t len = (size_t)merges[rank].len;
		const char *space = len > 1 ? memchr(text + 1, ' ', len - 1) : NULL;
		int shown = len > 80 ? 80 : (int)len;
		if (!space) {
			rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					"%s: tokenizer.ggml.merges[%llu] \"%.*s\" is not two tokens "
					"separated by a space", path, (unsigned long long)rank, shown,
					text);
			goto out;
		}
		size_t left_len = (size_t)(space - text), right_len = len - left_len - 1;
		int32_t left = tokenizer_lookup2(t, text, left_len, "", 0);
		int32_t right = tokenizer_lookup2(t, space + 1, right_len, "", 0);
		int32_t merged = tokenizer_lookup2(t, text, left_len, space + 1, right_len);
		if (left < 0 || right < 0 || merged < 0) {
			const char *missing = left < 0 ? text : right < 0 ? space + 1 : NULL;
			size_t missing_len = left < 0 ? left_len : right_len;
			if (missing)
				rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
						"%s: tokenizer.ggml.merges[%llu] \"%.*s\" names \"%.*s\", "
						"which is not in tokenizer.ggml.tokens", path,
						(unsigned long long)rank, shown, text,
						missing_len > 80 ? 80 : (int)missing_len, missing);
			else
				rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
						"%s: tokenizer.ggml.merges[%llu] \"%.*s\" makes a token "
						"that is not in tokenizer.ggml.tokens", path,
						(unsigned long long)rank, shown, text);
			goto out;
		}
		uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
		uint64_t slot = bpe_pair_slot(pair);
		for (;; slot++) {
			struct bpe_merge *m = &bpe->merges[slot & bpe->merge_mask];
			if (m->rank < 0) {
				m->pair = pair;
				m->rank = (int32_t)rank;
				m->merged = merged;
				break;
			}
			if (m->pair == pair)
				break; /* a repeated merge keeps its first (lowest) rank */
		}
	}
	rc = 0;
out:
	free(merges);
	return rc;
}

int tokenizer_bpe_from_gguf(const struct skv_gguf *g, int32_t vocab_size,
			    struct skv_tokenizer **out, char *msg, size_t msg_len)
{
	const char *path = skv_gguf_path(g);
	struct skv_gguf_str *tokens = NULL;
	struct skv_tokenizer *t = NULL;
	struct skv_gguf_str pre;
	const void *scores = NULL, *types = NULL;
	uint64_t n_tokens, n_scores = 0, n_types = 0;
	int rc;

	/* The pre-tokenizer first: a vocabulary this build cannot split is refused before any
	 * work, and nothing stands in for a missing or unknown name. */
	rc = skv_gguf_get_str(g, "tokenizer.ggml.pre", &pre);
	if (rc < 0)
		return skv_errorf(msg, msg_len, rc == -ENOENT ? -ENOENT : -SKV_EFORMAT,
				  "%s: tokenizer.ggml.pre is %s: a byte-level BPE vocabulary must "
				  "name its pre-tokenizer (one of %s)", path,
				  rc == -ENOENT ? "missing" : "not a string", pretok_known_names());
	struct pretok *pretok = NULL;
	rc = pretok_new(pre.ptr, (size_t)pre.len, &pretok);
	if (rc == -ENOENT)
		return skv_errorf(msg, msg_len, -SKV_EFORMAT,
				  "%s: unknown pre-tokenizer \"%.*s\" (tokenizer.ggml.pre); streamkv "
				  "knows %s", path, pre.len > 64 ? 64 : (int)pre.len, pre.ptr,
				  pretok_known_names());
	if (rc < 0)
		return skv_errorf(msg, msg_len, rc,
				  "%s: pre-tokenizer \"%.*s\": %s", path,
				  pre.len > 64 ? 64 : (int)pre.len, pre.ptr,
				  rc == -ENOMEM ? "out of memory" :
				  "PCRE2 refused its regexes (a PCRE2 built without Unicode support?)");

	rc = tokenizer_gguf_tokens(g, vocab_size, &tokens, &n_tokens, msg, msg_len);
	if (rc < 0) {
		pretok_free(pretok);
		return rc;
	}
	/* Scores and token types are optional here (llama.cpp reads files without them). */
	rc = skv_gguf_get_array(g, "tokenizer.ggml.scores", SKV_GGUF_FLOAT32, &scores, &n_scores);
	if (rc == -ENOENT) {
		scores = NULL;
	} else if (rc < 0 || n_scores != n_tokens) {
		rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
				"%s: tokenizer.ggml.scores is not %llu float32 scores", path,
				(unsigned long long)n_tokens);
		goto out;
	}
	rc = skv_gguf_get_array(g, "tokenizer.ggml.token_type", SKV_GGUF_INT32, &types, &n_types);
	if (rc == -ENOENT) {
		types = NULL;
	} else if (rc < 0 || n_types != n_tokens) {
		rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
				"%s: tokenizer.ggml.token_type is not %llu int32 token types", path,
				(unsigned long long)n_tokens);
		goto out;
	}

	rc = tokenizer_alloc(vocab_size, &t);
	if (rc < 0)
		goto out_nomem;
	t->kind = TOKENIZER_BPE;
	t->bos_id = t->eos_id = -1;
	t->bpe = calloc(1, sizeof(*t->bpe));
	if (!t->bpe)
		goto out_nomem;
	t->bpe->pretok = pretok;
	pretok = NULL;
	t->bpe->ignore_merges = pretok_ignore_merges(t->bpe->pretok);
	t->add_bos = pretok_add_bos(t->bpe->pretok);
	bpe_byte_chars(t->bpe);
	for (int32_t id = 0; id < vocab_size; id++) {
		float score = 0.0f;
		if (scores)
			memcpy(&score, (const char *)scores + (size_t)id * sizeof(score), sizeof(score));
		if (tokens[id].len > INT32_MAX) {
			rc = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					"%s: tokenizer.ggml.tokens[%d] is %llu bytes long", path, id,
					(unsigned long long)tokens[id].len);
			goto out;
		}
		char *dst = tokenizer_reserve(t, (size_t)tokens[id].len);
		if (!dst)
			goto out_nomem;
		memcpy(dst, tokens[id].ptr, (size_t)tokens[id].len);
		tokenizer_commit(t, id, (size_t)tokens[id].len, score);
	}
	rc = tokenizer_index(t);
	if (rc < 0)
		goto out_nomem;
	rc = tokenizer_gguf_specials(t, g, tokens, types, msg, msg_len);
	if (rc < 0)
		goto out;
	for (int b = 0; b < 256; b++)
		t->bpe->byte_token[b] = tokenizer_lookup2(t, t->bpe->byte_char[b],
							  t->bpe->byte_char_len[b], "", 0);
	rc = bpe_load_merges(t, g, msg, msg_len);
	if (rc < 0)
		goto out;
	rc = bpe_build_decoded(t);
	if (rc < 0)
		goto out_nomem;
	*out = t;
	t = NULL;
	goto out;

out_nomem:
	rc = skv_errorf(msg, msg_len, -ENOMEM, "%s: out of memory loading %d tokens", path,
			vocab_size);
out:
	pretok_free(pretok);
	skv_tokenizer_free(t);
	free(tokens);
	return rc;
}

/* --- encoding and decoding --------------------------------------------------------------- */

const char *tokenizer_bpe_decode(const struct skv_tokenizer *t, int32_t token, size_t *len)
{
	const struct tokenizer_bpe *bpe = t->bpe;
	if (len)
		*len = bpe->decoded_offset[token + 1] - bpe->decoded_offset[token];
	return bpe->decoded + bpe->decoded_offset[token];
}

static bool bpe_pair(const struct tokenizer_bpe *bpe, const struct tokenizer_symbol *symbols,
		     int32_t left, struct tokenizer_candidate *c);

static bool bpe_pair_any(const void *vocab, const struct tokenizer_symbol *symbols, int32_t left,
			 struct tokenizer_candidate *c)
{
	return bpe_pair(vocab, symbols, left, c);
}

static bool bpe_pair(const struct tokenizer_bpe *bpe, const struct tokenizer_symbol *symbols,
		     int32_t left, struct tokenizer_candidate *c)
{
	int32_t right = symbols[left].next;
	if (right < 0 || symbols[left].id < 0 || symbols[right].id < 0)
		return false;
	const struct bpe_merge *m = bpe_merge_find(bpe, symbols[left].id, symbols[right].id);
	if (!m)
		return false;
	c->score = -(float)m->rank;
	c->left = left;
	c->left_id = symbols[left].id;
	c->right_id = symbols[right].id;
	c->merged_id = m->merged;
	return true;
}

/* One word: merges by rank, then its symbols' ids (a byte whose character is not in the
 * vocabulary has none and is dropped, as llama.cpp and the Hugging Face tokenizers do). */
static int bpe_word(const struct skv_tokenizer *t, struct bpe_scratch *s, const char *word,
		    size_t len, struct tokenizer_ids *out)
{
	const struct tokenizer_bpe *bpe = t->bpe;
	int rc = 0;

	if (bpe->ignore_merges) {
		if (s->mapped_cap < 2 * len) {
			char *grown = realloc(s->mapped, 2 * len);
			if (!grown)
				return -ENOMEM;
			s->mapped = grown;
			s->mapped_cap = 2 * len;
		}
		size_t n = 0;
		for (size_t i = 0; i < len; i++) {
			unsigned char b = (unsigned char)word[i];
			memcpy(s->mapped + n, bpe->byte_char[b], bpe->byte_char_len[b]);
			n += bpe->byte_char_len[b];
		}
		int32_t whole = tokenizer_lookup2(t, s->mapped, n, "", 0);
		if (whole >= 0)
			return tokenizer_ids_push(out, whole);
	}
	if (len == 1) {
		int32_t id = bpe->byte_token[(unsigned char)word[0]];
		return id >= 0 ? tokenizer_ids_push(out, id) : 0;
	}
	if (s->symbols_cap < len) {
		struct tokenizer_symbol *grown = realloc(s->symbols, len * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		s->symbols = grown;
		s->symbols_cap = len;
	}
	if (s->heap.cap < len) {
		struct tokenizer_candidate *grown = realloc(s->heap.items, len * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		s->heap.items = grown;
		s->heap.cap = len;
	}
	struct tokenizer_symbol *symbols = s->symbols;
	int32_t n_symbols = (int32_t)len;
	for (int32_t i = 0; i < n_symbols; i++) {
		symbols[i].id = bpe->byte_token[(unsigned char)word[i]];
		symbols[i].prev = i - 1;
		symbols[i].next = i + 1 < n_symbols ? i + 1 : -1;
	}
	struct tokenizer_heap *heap = &s->heap;
	heap->count = 0;
	for (int32_t i = 0; i + 1 < n_symbols; i++)
		if (bpe_pair(bpe, symbols, i, &heap->items[heap->count]))
			heap->count++;
	for (size_t i = heap->count / 2; i-- > 0;)
		tokenizer_heap_sift_down(heap, i);

	if ((rc = tokenizer_merge(heap, symbols, bpe_pair_any, bpe)) < 0)
		return rc;
	for (int32_t i = 0; i >= 0 && rc == 0; i = symbols[i].next)
		if (symbols[i].id >= 0)
			rc = tokenizer_ids_push(out, symbols[i].id);
	return rc;
}

/* Text between special tokens: words by the pre-tokenizer, each merged on its own. */
static int bpe_fragment(const struct skv_tokenizer *t, struct bpe_scratch *s, const char *text,
			size_t len, struct tokenizer_ids *out)
{
	int rc = pretok_split(t->bpe->pretok, text, len, &s->words);
	for (size_t w = 0; rc == 0 && w < s->words.count; w++)
		rc = bpe_word(t, s, text + s->words.items[w].offset, s->words.items[w].len, out);
	return rc;
}

int tokenizer_bpe_encode(const struct skv_tokenizer *t, const char *text, size_t len,
			 bool parse_special, struct tokenizer_ids *out)
{
	struct bpe_scratch s = { 0 };
	size_t start = 0, pos = 0;
	int rc = 0;

	while (pos < len) {
		size_t match_len;
		int32_t id = tokenizer_special_at(t, text + pos, len - pos, parse_special,
						  &match_len);
		if (id < 0) {
			pos++;
			continue;
		}
		if (pos > start && (rc = bpe_fragment(t, &s, text + start, pos - start, out)) < 0)
			goto out;
		if ((rc = tokenizer_ids_push(out, id)) < 0)
			goto out;
		start = pos += match_len;
	}
	if (len > start)
		rc = bpe_fragment(t, &s, text + start, len - start, out);
out:
	free(s.words.items);
	free(s.symbols);
	free(s.heap.items);
	free(s.mapped);
	return rc;
}
