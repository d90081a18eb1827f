/* Tokenizer tests: the fast encoder against a reference written from the description of
 * llama2.c's quadratic encode(), decoding, both vocabulary sources, and every load error. */
#include "gguf.h"
#include "skv-error.h"
#include "testutil.h"
#include "tokenizer.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TOK512_VOCAB 512
#define TOK512_BYTES 6227

/* --- reference: llama2.c's algorithm, written for clarity, not speed ----------------------- */

/* A llama2.c tokenizer file parsed here independently of the library. */
struct ref_vocab {
	int32_t size;
	char **pieces;    /* (size) NUL-terminated copies */
	size_t *lengths;  /* (size) */
	float *scores;    /* (size) */
	int32_t *sorted;  /* (size) ids ordered by piece bytes, then id */
};

static const struct ref_vocab *ref_sort_vocab; /* qsort() has no context argument */

static int ref_compare_bytes(const char *a, size_t a_len, const char *b, size_t b_len)
{
	size_t common = a_len < b_len ? a_len : b_len;
	int c = memcmp(a, b, common);
	if (c)
		return c;
	return a_len < b_len ? -1 : a_len > b_len;
}

static int ref_compare_ids(const void *pa, const void *pb)
{
	int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
	const struct ref_vocab *v = ref_sort_vocab;
	int c = ref_compare_bytes(v->pieces[a], v->lengths[a], v->pieces[b], v->lengths[b]);
	return c ? c : (a > b) - (a < b);
}

static void ref_vocab_load(struct ref_vocab *v, const char *path, int32_t size)
{
	size_t file_len;
	char *file = tu_read_file(path, &file_len);
	size_t offset = 4;

	v->size = size;
	v->pieces = calloc((size_t)size, sizeof(*v->pieces));
	v->lengths = calloc((size_t)size, sizeof(*v->lengths));
	v->scores = calloc((size_t)size, sizeof(*v->scores));
	v->sorted = calloc((size_t)size, sizeof(*v->sorted));
	cr_assert(v->pieces && v->lengths && v->scores && v->sorted);
	for (int32_t i = 0; i < size; i++) {
		int32_t len;
		cr_assert(offset + 8 <= file_len, "%s: reference reader ran out at token %d", path, i);
		memcpy(&v->scores[i], file + offset, 4);
		memcpy(&len, file + offset + 4, 4);
		offset += 8;
		cr_assert(len >= 0 && offset + (size_t)len <= file_len);
		v->pieces[i] = malloc((size_t)len + 1);
		cr_assert(v->pieces[i]);
		memcpy(v->pieces[i], file + offset, (size_t)len);
		v->pieces[i][len] = '\0';
		v->lengths[i] = (size_t)len;
		offset += (size_t)len;
		v->sorted[i] = i;
	}
	cr_assert_eq(offset, file_len, "%s holds more than %d tokens", path, size);
	free(file);
	ref_sort_vocab = v;
	qsort(v->sorted, (size_t)size, sizeof(*v->sorted), ref_compare_ids);
}

static void ref_vocab_free(struct ref_vocab *v)
{
	for (int32_t i = 0; i < v->size; i++)
		free(v->pieces[i]);
	free(v->pieces);
	free(v->lengths);
	free(v->scores);
	free(v->sorted);
}

/* The lowest id whose piece equals s[0..len), or -1 (binary search for the first match). */
static int32_t ref_lookup(const struct ref_vocab *v, const char *s, size_t len)
{
	size_t lo = 0, hi = (size_t)v->size;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		int32_t id = v->sorted[mid];
		if (ref_compare_bytes(v->pieces[id], v->lengths[id], s, len) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == (size_t)v->size)
		return -1;
	int32_t id = v->sorted[lo];
	return ref_compare_bytes(v->pieces[id], v->lengths[id], s, len) == 0 ? id : -1;
}

/* The id of piece(a) ++ piece(b), or -1. */
static int32_t ref_merge(const struct ref_vocab *v, int32_t a, int32_t b)
{
	size_t len = v->lengths[a] + v->lengths[b];
	char *joined = malloc(len + 1);
	cr_assert(joined);
	memcpy(joined, v->pieces[a], v->lengths[a]);
	memcpy(joined + v->lengths[a], v->pieces[b], v->lengths[b]);
	int32_t id = ref_lookup(v, joined, len);
	free(joined);
	return id;
}

static int32_t ref_byte(const struct ref_vocab *v, unsigned char byte)
{
	return byte + 3 < v->size ? byte + 3 : 0;
}

/* llama2.c encode(): BOS, dummy " ", code points (or their bytes + 3), then the quadratic merge
 * loop: scan every adjacent pair, take the highest score with a strict '>' starting at -1e10
 * (so the leftmost wins ties), merge it, repeat until no pair is a piece. The only liberty is a
 * memo of each pair's merge result, refreshed next to every merge, so that 20 KB texts stay
 * fast enough; the scan itself is the plain linear one. */
static int32_t *ref_encode(const struct ref_vocab *v, const char *text, size_t len, bool bos,
			   bool eos, size_t *n_out)
{
	int32_t *tokens = malloc((len + 3) * sizeof(*tokens));
	int32_t *merge = malloc((len + 3) * sizeof(*merge));
	char group[4];
	size_t n = 0, group_len = 0;
	cr_assert(tokens && merge);

	if (bos)
		tokens[n++] = 1;
	if (len > 0) {
		int32_t space = ref_lookup(v, " ", 1);
		tokens[n++] = space >= 0 ? space : ref_byte(v, ' ');
	}
	for (size_t i = 0; i < len; i++) {
		unsigned char byte = (unsigned char)text[i];
		if ((byte & 0xC0) != 0x80)
			group_len = 0;
		group[group_len++] = (char)byte;
		bool next_continues = i + 1 < len && ((unsigned char)text[i + 1] & 0xC0) == 0x80;
		if (next_continues && group_len < 4)
			continue;
		int32_t id = ref_lookup(v, group, group_len);
		if (id >= 0) {
			tokens[n++] = id;
		} else {
			for (size_t b = 0; b < group_len; b++)
				tokens[n++] = ref_byte(v, (unsigned char)group[b]);
		}
		group_len = 0;
	}

	for (size_t i = 0; i + 1 < n; i++)
		merge[i] = ref_merge(v, tokens[i], tokens[i + 1]);
	for (;;) {
		float best_score = -1e10f;
		size_t best = SIZE_MAX;
		for (size_t i = 0; i + 1 < n; i++) {
			if (merge[i] >= 0 && v->scores[merge[i]] > best_score) {
				best_score = v->scores[merge[i]];
				best = i;
			}
		}
		if (best == SIZE_MAX)
			break;
		tokens[best] = merge[best];
		memmove(&tokens[best + 1], &tokens[best + 2], (n - best - 2) * sizeof(*tokens));
		memmove(&merge[best + 1], &merge[best + 2], (n - best - 2) * sizeof(*merge));
		n--;
		if (best > 0)
			merge[best - 1] = ref_merge(v, tokens[best - 1], tokens[best]);
		if (best + 1 < n)
			merge[best] = ref_merge(v, tokens[best], tokens[best + 1]);
	}
	if (eos)
		tokens[n++] = 2;
	free(merge);
	*n_out = n;
	return tokens;
}

/* --- fixtures ------------------------------------------------------------------------------ */

static struct skv_tokenizer *tok512;
static struct ref_vocab ref512;

static struct skv_tokenizer *load_ok(const char *path, int32_t vocab_size)
{
	struct skv_tokenizer *t = NULL;
	char msg[256] = "";
	int rc = skv_tokenizer_load(path, vocab_size, &t, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "load %s: %s (%s)", path, msg, skv_strerror(rc));
	cr_assert_not_null(t);
	return t;
}

static void setup_tok512(void)
{
	tok512 = load_ok(tu_model_path("tok512.bin"), TOK512_VOCAB);
	ref_vocab_load(&ref512, tu_model_path("tok512.bin"), TOK512_VOCAB);
}

static void teardown_tok512(void)
{
	skv_tokenizer_free(tok512);
	tok512 = NULL;
	ref_vocab_free(&ref512);
}

static void teardown_scratch(void)
{
	tu_scratch_cleanup();
}

/* Assert that the library encodes text exactly as the reference does, for all bos/eos flags. */
static void check_matches_reference(const struct skv_tokenizer *t, const struct ref_vocab *v,
				    const char *name, const char *text, size_t len)
{
	for (int flags = 0; flags < 4; flags++) {
		bool bos = flags & 1, eos = flags & 2;
		size_t n_ref, n_ids;
		int32_t *ids;
		int32_t *expected = ref_encode(v, text, len, bos, eos, &n_ref);
		int rc = skv_tokenizer_encode(t, text, len, bos, eos, &ids, &n_ids);
		cr_assert_eq(rc, 0, "%s: encode failed: %s", name, skv_strerror(rc));
		cr_assert_eq(n_ids, n_ref, "%s (bos %d eos %d): %zu tokens, reference %zu", name, bos,
			     eos, n_ids, n_ref);
		for (size_t i = 0; i < n_ref; i++)
			cr_assert_eq(ids[i], expected[i],
				     "%s (bos %d eos %d): token %zu is %d, reference %d", name, bos,
				     eos, i, ids[i], expected[i]);
		free(ids);
		free(expected);
	}
}

/* decode() over BOS + encode(text) concatenated, as the caller of a generation loop does. */
static char *decode_all(const struct skv_tokenizer *t, const int32_t *ids, size_t n,
			size_t *out_len)
{
	size_t cap = 16, len = 0;
	char *out = malloc(cap);
	cr_assert(out);
	for (size_t i = 1; i < n; i++) {
		size_t piece_len;
		const char *piece = skv_tokenizer_decode(t, ids[i - 1], ids[i], &piece_len);
		cr_assert_not_null(piece, "token %d does not decode", ids[i]);
		while (len + piece_len + 1 > cap)
			cap *= 2;
		out = realloc(out, cap);
		cr_assert(out);
		memcpy(out + len, piece, piece_len);
		len += piece_len;
	}
	out[len] = '\0';
	*out_len = len;
	return out;
}

static void check_round_trip(const struct skv_tokenizer *t, const char *name, const char *text,
			     size_t len)
{
	int32_t *ids;
	size_t n_ids, decoded_len;
	cr_assert_eq(skv_tokenizer_encode(t, text, len, 1, 0, &ids, &n_ids), 0);
	cr_assert_geq(n_ids, 1);
	cr_assert_eq(ids[0], SKV_TOKEN_BOS);
	char *decoded = decode_all(t, ids, n_ids, &decoded_len);
	cr_assert_eq(decoded_len, len, "%s: decodes to %zu bytes, not %zu", name, decoded_len, len);
	cr_assert(memcmp(decoded, text, len) == 0, "%s: decodes to different bytes", name);
	free(decoded);
	free(ids);
}

struct named_text {
	const char *name;
	const char *text;
	size_t len; /* 0: strlen(text) */
};

#define NAMED(text) { #text, text, 0 }
#define NAMED_LEN(name, bytes) { name, bytes, sizeof(bytes) - 1 }

static const struct named_text edge_texts[] = {
	NAMED(""),
	NAMED("a"),
	NAMED("z"),
	NAMED(" "),
	NAMED("\n"),
	NAMED("\t"),
	NAMED("~"),
	NAMED("Once upon a time"),
	NAMED("Once upon a time, there was a little girl named Lily."),
	NAMED("  leading spaces and trailing  "),
	NAMED("line one\nline two\n\n\ttabbed\r\nwindows\n"),
	NAMED("The the THE tHe, \"quoted\" (parens) [brackets] {braces} 1234567890 !?;:"),
	NAMED("\xe2\x80\x99 curly \xe2\x80\x9cquotes\xe2\x80\x9d and \xe2\x80\x94 dash"),
	NAMED("h\xc3\xa9llo w\xc3\xb6rld \xc3\xa2\xe2\x82\xac\xe2\x84\xa2"),
	NAMED("\xe4\xb8\xad\xe6\x96\x87 Chinese"),
	NAMED("emoji \xf0\x9f\x98\x80\xf0\x9f\x8e\x89!"),
	NAMED("<0x41> <s> </s> <unk> \n<s>\n"),
	/* "oo", "ll" and "pp" are pieces: overlapping equal-score pairs, where leftmost matters. */
	NAMED("ooo"),
	NAMED("lllll"),
	NAMED("Hellllo, pppp oooo!"),
	/* U+200A is a piece: the 3-byte group is found, the 4-byte one with a stray byte is not. */
	NAMED("\xe2\x80\x8a"),
	NAMED_LEN("piece + stray continuation", "\xe2\x80\x8a\x80"),
	NAMED_LEN("lone continuation", "\x80"),
	NAMED_LEN("continuation run", "a\x80\x80\x80\x80\x80\x80\x80\x80\x80 b"),
	NAMED_LEN("truncated 3-byte", "\xe4\xb8 a"),
	NAMED_LEN("truncated at end", "abc \xe4"),
	NAMED_LEN("truncated 4-byte", "\xf0\x9f\x98"),
	NAMED_LEN("overlong 5 bytes", "\xf0\x9f\x98\x80\x80"),
	NAMED_LEN("0xFF and 0xFE", "\xff \xfe\xff"),
	NAMED_LEN("embedded NUL", "a\0b\0\0 c"),
	NAMED_LEN("only NUL", "\0"),
};

/* --- encoding vs the reference ------------------------------------------------------------- */

TestSuite(tokenizer, .init = setup_tok512, .fini = teardown_tok512);

Test(tokenizer, loads_tok512)
{
	size_t len;
	float score;
	cr_assert_eq(skv_tokenizer_vocab_size(tok512), TOK512_VOCAB);
	cr_assert_str_eq(skv_tokenizer_piece(tok512, SKV_TOKEN_UNK, &len), "<unk>");
	cr_assert_eq(len, 5);
	cr_assert_str_eq(skv_tokenizer_piece(tok512, SKV_TOKEN_BOS, &len), "\n<s>\n");
	cr_assert_str_eq(skv_tokenizer_piece(tok512, SKV_TOKEN_EOS, &len), "\n</s>\n");
	cr_assert_str_eq(skv_tokenizer_piece(tok512, 3, &len), "<0x00>");
	cr_assert_str_eq(skv_tokenizer_piece(tok512, 258, &len), "<0xFF>");
	for (int32_t id = 0; id < TOK512_VOCAB; id++) {
		const char *piece = skv_tokenizer_piece(tok512, id, &len);
		cr_assert_not_null(piece);
		cr_assert_eq(len, ref512.lengths[id], "token %d", id);
		cr_assert(memcmp(piece, ref512.pieces[id], len) == 0, "token %d", id);
		cr_assert_eq(piece[len], '\0', "token %d is not NUL-terminated", id);
		cr_assert_eq(skv_tokenizer_score(tok512, id, &score), 0);
		cr_assert_eq(score, ref512.scores[id], "token %d", id);
	}
}

Test(tokenizer, edge_texts_match_reference)
{
	for (size_t i = 0; i < sizeof(edge_texts) / sizeof(edge_texts[0]); i++) {
		const struct named_text *e = &edge_texts[i];
		check_matches_reference(tok512, &ref512, e->name, e->text,
					e->len ? e->len : strlen(e->text));
	}
}

static char *repeat(const char *unit, size_t times, size_t *len)
{
	size_t unit_len = strlen(unit);
	char *text = malloc(unit_len * times + 1);
	cr_assert(text);
	for (size_t i = 0; i < times; i++)
		memcpy(text + i * unit_len, unit, unit_len);
	text[unit_len * times] = '\0';
	*len = unit_len * times;
	return text;
}

Test(tokenizer, long_runs_match_reference)
{
	static const char *const units[] = { "a", "o", " ", "ab", " the", "\xe2\x80\x94", "\n", "ee " };
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		size_t len;
		char *text = repeat(units[i], 10000, &len);
		char name[64];
		snprintf(name, sizeof(name), "10000 x \"%s\"", units[i]);
		check_matches_reference(tok512, &ref512, name, text, len);
		free(text);
	}
}

Test(tokenizer, sample_text_matches_reference)
{
	size_t len;
	char *text = tu_read_file(tu_data_path("tokenizer-sample.txt"), &len);
	cr_assert_gt(len, 16000, "tokenizer-sample.txt should hold ~20 KB");
	check_matches_reference(tok512, &ref512, "tokenizer-sample.txt", text, len);
	check_round_trip(tok512, "tokenizer-sample.txt", text, len);
	free(text);
}

Test(tokenizer, once_upon_a_time_anchor)
{
	/* Computed with ref_encode() above; pinned so that a change in both shows up. */
	static const int32_t expected[] = { 1, 403, 407, 261, 378 };
	/* " Once" " upon" " a" " time" */
	static const char *const pieces[] = { " Once", " upon", " a", " time" };
	const char *text = "Once upon a time";
	int32_t *ids;
	size_t n_ids, n_ref;

	cr_assert_eq(skv_tokenizer_encode(tok512, text, strlen(text), 1, 0, &ids, &n_ids), 0);
	int32_t *ref = ref_encode(&ref512, text, strlen(text), true, false, &n_ref);
	cr_assert_eq(n_ref, sizeof(expected) / sizeof(expected[0]));
	cr_assert_eq(n_ids, n_ref);
	for (size_t i = 0; i < n_ids; i++) {
		cr_assert_eq(ref[i], expected[i], "reference token %zu", i);
		cr_assert_eq(ids[i], expected[i], "token %zu", i);
	}
	for (size_t i = 1; i < n_ids; i++) {
		size_t len;
		const char *piece = skv_tokenizer_piece(tok512, ids[i], &len);
		cr_assert_eq(len, strlen(pieces[i - 1]));
		cr_assert(memcmp(piece, pieces[i - 1], len) == 0, "token %zu is not \"%s\"", i,
			  pieces[i - 1]);
	}
	check_round_trip(tok512, "Once upon a time", text, strlen(text));
	free(ref);
	free(ids);
}

Test(tokenizer, round_trips)
{
	for (size_t i = 0; i < sizeof(edge_texts) / sizeof(edge_texts[0]); i++) {
		const struct named_text *e = &edge_texts[i];
		if (strstr(e->text, "<0x"))
			continue; /* the literal text "<0x41>" may merge into the byte token */
		check_round_trip(tok512, e->name, e->text, e->len ? e->len : strlen(e->text));
	}
}

Test(tokenizer, bos_eos_and_empty)
{
	int32_t *ids;
	size_t n_ids;
	cr_assert_eq(skv_tokenizer_encode(tok512, "", 0, 0, 0, &ids, &n_ids), 0);
	cr_assert_not_null(ids);
	cr_assert_eq(n_ids, 0);
	free(ids);
	cr_assert_eq(skv_tokenizer_encode(tok512, NULL, 0, 1, 1, &ids, &n_ids), 0);
	cr_assert_eq(n_ids, 2, "no dummy prefix for an empty text");
	cr_assert_eq(ids[0], SKV_TOKEN_BOS);
	cr_assert_eq(ids[1], SKV_TOKEN_EOS);
	free(ids);
	cr_assert_eq(skv_tokenizer_encode(tok512, NULL, 1, 1, 1, &ids, &n_ids), -EINVAL);
	cr_assert_null(ids);
	cr_assert_eq(n_ids, 0);
	cr_assert_eq(skv_tokenizer_encode(NULL, "a", 1, 1, 1, &ids, &n_ids), -EINVAL);
	/* len bounds the text: bytes after it are not read. */
	cr_assert_eq(skv_tokenizer_encode(tok512, "abcdef", 3, 0, 0, &ids, &n_ids), 0);
	int32_t *abc;
	size_t n_abc;
	cr_assert_eq(skv_tokenizer_encode(tok512, "abc", 3, 0, 0, &abc, &n_abc), 0);
	cr_assert_eq(n_ids, n_abc);
	cr_assert(memcmp(ids, abc, n_ids * sizeof(*ids)) == 0);
	free(abc);
	free(ids);
}

Test(tokenizer, byte_fallback)
{
	/* U+4E2D is not in the 512-token vocabulary: its three bytes become <0xE4><0xB8><0xAD>. */
	const char *text = "\xe4\xb8\xad";
	int32_t *ids;
	size_t n_ids, len;
	cr_assert_eq(skv_tokenizer_encode(tok512, text, 3, 1, 0, &ids, &n_ids), 0);
	cr_assert_eq(n_ids, 5);
	cr_assert_eq(ids[0], SKV_TOKEN_BOS);
	cr_assert_str_eq(skv_tokenizer_piece(tok512, ids[1], &len), " ");
	cr_assert_eq(ids[2], 0xe4 + 3);
	cr_assert_eq(ids[3], 0xb8 + 3);
	cr_assert_eq(ids[4], 0xad + 3);
	cr_assert_str_eq(skv_tokenizer_piece(tok512, ids[2], &len), "<0xE4>");
	for (size_t i = 2; i < n_ids; i++) {
		const char *byte = skv_tokenizer_decode(tok512, ids[i - 1], ids[i], &len);
		cr_assert_eq(len, 1);
		cr_assert_eq((unsigned char)byte[0], (unsigned char)text[i - 2]);
		cr_assert_eq(skv_piece_is_printable(byte, len), 0, "a lone UTF-8 byte is not printed");
	}
	check_round_trip(tok512, "U+4E2D", text, 3);
	free(ids);

	/* An embedded NUL is the byte token <0x00>, and decodes back to one NUL byte. */
	cr_assert_eq(skv_tokenizer_encode(tok512, "a\0b", 3, 0, 0, &ids, &n_ids), 0);
	bool found = false;
	for (size_t i = 0; i < n_ids; i++)
		found |= ids[i] == 3;
	cr_assert(found, "NUL did not become <0x00>");
	const char *nul = skv_tokenizer_decode(tok512, 'a', 3, &len);
	cr_assert_eq(len, 1);
	cr_assert_eq(nul[0], '\0');
	free(ids);
}

/* --- a synthetic vocabulary for the rules tok512.bin cannot reach -------------------------- */

struct synthetic_piece {
	const char *piece;
	float score;
};

/* Write a llama2.c tokenizer file: <unk>, BOS, EOS, then byte tokens for bytes 0 up to
 * n_bytes - 1, then `extra`; returns its path and the vocabulary size in *vocab_size. */
static const char *write_vocab(const char *name, int n_bytes, const struct synthetic_piece *extra,
			       size_t n_extra, int32_t *vocab_size)
{
	size_t cap = 64 * 1024, len = 4;
	char *file = calloc(1, cap);
	int32_t max_len = 0;
	cr_assert(file);
	for (int32_t id = 0; id < 3 + n_bytes + (int32_t)n_extra; id++) {
		char byte_piece[8];
		const char *piece;
		float score = 0.0f;
		if (id < 3) {
			static const char *const specials[] = { "<unk>", "\n<s>\n", "\n</s>\n" };
			piece = specials[id];
		} else if (id < 3 + n_bytes) {
			snprintf(byte_piece, sizeof(byte_piece), "<0x%02X>", id - 3);
			piece = byte_piece;
		} else {
			piece = extra[id - 3 - n_bytes].piece;
			score = extra[id - 3 - n_bytes].score;
		}
		int32_t piece_len = (int32_t)strlen(piece);
		cr_assert_lt(len + 8 + (size_t)piece_len, cap);
		memcpy(file + len, &score, 4);
		memcpy(file + len + 4, &piece_len, 4);
		memcpy(file + len + 8, piece, (size_t)piece_len);
		len += 8 + (size_t)piece_len;
		max_len = piece_len > max_len ? piece_len : max_len;
		*vocab_size = id + 1;
	}
	memcpy(file, &max_len, 4);
	const char *path = tu_write_scratch(name, file, len);
	free(file);
	return path;
}

TestSuite(tokenizer_synthetic, .fini = teardown_scratch);

Test(tokenizer_synthetic, merge_rules)
{
	/* No " " piece: the dummy prefix falls back to the byte token of ' '. */
	static const struct synthetic_piece extra[] = {
		{ "a", -1.0f },    { "b", -1.0f },      { "c", -1.0f },   { "d", -1.0f },
		{ "ab", -5.0f },   { "bc", -5.0f },     /* equal scores, different tokens */
		{ "cd", -2e10f },  /* below llama2.c's starting best: never merged */
		{ "da", NAN },     /* never wins a '>' comparison */
		{ "dd", -1e10f },  /* exactly the starting best: never merged */
		{ "aa", -9.9e9f }, /* just above it: merged */
		{ "abc", -3.0f },  { "ab", -0.5f },     /* a duplicate: the lower id (-5) counts */
		{ "", -1.0f },     { "bcd", -4.0f },    { "cdcd", 0.0f },
	};
	static const char *const texts[] = {
		"", "a", "abc", "abcd", "dabcd", "cdcd", "abab", "aabbccdd", "bcbc", "abcabc", "dddd",
		"aaaa", "dadada", "xyz abc", "bcd bcd", "ab\xe4\xb8\xad" "cd",
	};
	int32_t vocab_size;
	const char *path = write_vocab("synthetic.bin", 256, extra, sizeof(extra) / sizeof(extra[0]),
				       &vocab_size);
	struct skv_tokenizer *t = load_ok(path, vocab_size);
	struct ref_vocab ref;
	ref_vocab_load(&ref, path, vocab_size);
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
		check_matches_reference(t, &ref, texts[i], texts[i], strlen(texts[i]));

	int32_t *ids;
	size_t n_ids;
	/* "abc": ab and bc tie at -5, the leftmost merges, then "ab"+"c" = "abc". */
	cr_assert_eq(skv_tokenizer_encode(t, "abc", 3, 0, 0, &ids, &n_ids), 0);
	cr_assert_eq(n_ids, 2);
	cr_assert_eq(ids[0], ' ' + 3);
	cr_assert_str_eq(skv_tokenizer_piece(t, ids[1], NULL), "abc");
	free(ids);
	/* "dddd" never merges (score -1e10); "aaaa" does (score -9.9e9). */
	cr_assert_eq(skv_tokenizer_encode(t, "dddd", 4, 0, 0, &ids, &n_ids), 0);
	cr_assert_eq(n_ids, 5);
	free(ids);
	cr_assert_eq(skv_tokenizer_encode(t, "aaaa", 4, 0, 0, &ids, &n_ids), 0);
	cr_assert_eq(n_ids, 3);
	free(ids);
	ref_vocab_free(&ref);
	skv_tokenizer_free(t);
}

Test(tokenizer_synthetic, byte_tokens_outside_a_small_vocabulary)
{
	/* 40 tokens: byte tokens only for bytes 0..35; other bytes fall back to <unk>. */
	static const struct synthetic_piece extra[] = { { "a", -1.0f } };
	int32_t vocab_size;
	const char *path = write_vocab("small.bin", 36, extra, 1, &vocab_size);
	cr_assert_eq(vocab_size, 40);
	struct skv_tokenizer *t = load_ok(path, vocab_size);
	struct ref_vocab ref;
	ref_vocab_load(&ref, path, vocab_size);
	check_matches_reference(t, &ref, "ab\n", "ab\n", 3);
	int32_t *ids;
	size_t n_ids;
	cr_assert_eq(skv_tokenizer_encode(t, "ab\n", 3, 0, 0, &ids, &n_ids), 0);
	cr_assert_eq(n_ids, 4);
	cr_assert_eq(ids[0], ' ' + 3);
	cr_assert_eq(ids[1], 39);
	cr_assert_eq(ids[2], SKV_TOKEN_UNK);
	cr_assert_eq(ids[3], '\n' + 3);
	free(ids);
	ref_vocab_free(&ref);
	skv_tokenizer_free(t);
}

/* --- decoding ------------------------------------------------------------------------------ */

static int32_t id_of(const struct skv_tokenizer *t, const char *piece)
{
	for (int32_t id = 0; id < skv_tokenizer_vocab_size(t); id++) {
		size_t len;
		const char *p = skv_tokenizer_piece(t, id, &len);
		if (len == strlen(piece) && memcmp(p, piece, len) == 0)
			return id;
	}
	cr_assert_fail("piece \"%s\" is not in the vocabulary", piece);
	return -1;
}

Test(tokenizer, decode_rules)
{
	size_t len;
	int32_t the = id_of(tok512, " the");
	const char *s = skv_tokenizer_decode(tok512, SKV_TOKEN_BOS, the, &len);
	cr_assert_eq(len, 3);
	cr_assert(memcmp(s, "the", 3) == 0, "the space after BOS is dropped");
	s = skv_tokenizer_decode(tok512, the, the, &len);
	cr_assert_eq(len, 4);
	cr_assert(memcmp(s, " the", 4) == 0, "the space is kept elsewhere");
	s = skv_tokenizer_decode(tok512, SKV_TOKEN_BOS, id_of(tok512, " "), &len);
	cr_assert_eq(len, 0, "the dummy prefix alone after BOS prints nothing");
	cr_assert_eq(skv_piece_is_printable(s, len), 0);
	s = skv_tokenizer_decode(tok512, SKV_TOKEN_BOS, 0x0a + 3, &len);
	cr_assert_eq(len, 1);
	cr_assert_eq(s[0], '\n');
	cr_assert_eq(s[1], '\0', "byte pieces are NUL-terminated too");
	s = skv_tokenizer_decode(tok512, 5, 0x41 + 3, &len);
	cr_assert_eq(len, 1);
	cr_assert_eq(s[0], 'A');
	s = skv_tokenizer_decode(tok512, 5, SKV_TOKEN_EOS, &len);
	cr_assert_str_eq(s, "\n</s>\n");
	s = skv_tokenizer_decode(tok512, 5, SKV_TOKEN_UNK, &len);
	cr_assert_str_eq(s, "<unk>");
	cr_assert_eq(len, 5);

	static const int32_t bad_ids[] = { -1, TOK512_VOCAB, TOK512_VOCAB + 1, INT32_MAX, INT32_MIN };
	for (size_t i = 0; i < sizeof(bad_ids) / sizeof(bad_ids[0]); i++) {
		float score;
		cr_assert_null(skv_tokenizer_decode(tok512, SKV_TOKEN_BOS, bad_ids[i], &len),
			       "id %d", bad_ids[i]);
		cr_assert_null(skv_tokenizer_piece(tok512, bad_ids[i], &len), "id %d", bad_ids[i]);
		cr_assert_eq(skv_tokenizer_score(tok512, bad_ids[i], &score), -EINVAL);
	}
	/* prev_token only matters when it is BOS; an invalid one is no error. */
	cr_assert_not_null(skv_tokenizer_decode(tok512, -7, the, &len));
	cr_assert_eq(len, 4);
}

Test(tokenizer, piece_is_printable)
{
	cr_assert_eq(skv_piece_is_printable(NULL, 0), 0);
	cr_assert_eq(skv_piece_is_printable("", 0), 0);
	cr_assert_eq(skv_piece_is_printable("a", 1), 1);
	cr_assert_eq(skv_piece_is_printable(" ", 1), 1);
	cr_assert_eq(skv_piece_is_printable("\n", 1), 1);
	cr_assert_eq(skv_piece_is_printable("\t", 1), 1);
	cr_assert_eq(skv_piece_is_printable("\r", 1), 1);
	cr_assert_eq(skv_piece_is_printable("~", 1), 1);
	cr_assert_eq(skv_piece_is_printable("\x7f", 1), 0);
	cr_assert_eq(skv_piece_is_printable("\x01", 1), 0);
	cr_assert_eq(skv_piece_is_printable("\0", 1), 0);
	cr_assert_eq(skv_piece_is_printable("\xe4", 1), 0);
	cr_assert_eq(skv_piece_is_printable("\xe4\xb8", 2), 1, "only single bytes are filtered");
	cr_assert_eq(skv_piece_is_printable(" the", 4), 1);
}

/* --- concurrency: an immutable tokenizer shared by threads --------------------------------- */

struct encode_job {
	const struct skv_tokenizer *t;
	const char *text;
	size_t len;
	int32_t *ids;
	size_t n_ids;
	int rc;
};

static void *encode_thread(void *arg)
{
	struct encode_job *job = arg;
	for (int round = 0; round < 5; round++) {
		free(job->ids);
		job->rc = skv_tokenizer_encode(job->t, job->text, job->len, 1, 0, &job->ids,
					       &job->n_ids);
		if (job->rc < 0)
			break;
	}
	return NULL;
}

Test(tokenizer, concurrent_encode)
{
	size_t len;
	char *text = tu_read_file(tu_data_path("tokenizer-sample.txt"), &len);
	struct encode_job jobs[4];
	pthread_t threads[4];
	int32_t *ids;
	size_t n_ids;
	cr_assert_eq(skv_tokenizer_encode(tok512, text, len, 1, 0, &ids, &n_ids), 0);
	for (int i = 0; i < 4; i++) {
		jobs[i] = (struct encode_job){ .t = tok512, .text = text, .len = len };
		cr_assert_eq(pthread_create(&threads[i], NULL, encode_thread, &jobs[i]), 0);
	}
	for (int i = 0; i < 4; i++) {
		cr_assert_eq(pthread_join(threads[i], NULL), 0);
		cr_assert_eq(jobs[i].rc, 0);
		cr_assert_eq(jobs[i].n_ids, n_ids);
		cr_assert(memcmp(jobs[i].ids, ids, n_ids * sizeof(*ids)) == 0, "thread %d", i);
		free(jobs[i].ids);
	}
	free(ids);
	free(text);
}

/* --- the GGUF vocabulary ------------------------------------------------------------------- */

Test(tokenizer, gguf_vocabulary_equals_tok512)
{
	struct skv_gguf *g = NULL;
	struct skv_tokenizer *t = NULL;
	char msg[256] = "";
	int rc = skv_gguf_open(tu_model_path("stories260K.gguf"), &g, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "gguf: %s", msg);
	rc = skv_tokenizer_from_gguf(g, TOK512_VOCAB, &t, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "from_gguf: %s", msg);
	cr_assert_eq(skv_tokenizer_vocab_size(t), TOK512_VOCAB);
	for (int32_t id = 0; id < TOK512_VOCAB; id++) {
		size_t len_gguf, len_bin;
		float score_gguf, score_bin;
		const char *p_gguf = skv_tokenizer_piece(t, id, &len_gguf);
		const char *p_bin = skv_tokenizer_piece(tok512, id, &len_bin);
		cr_assert_eq(len_gguf, len_bin, "token %d: %zu bytes vs %zu", id, len_gguf, len_bin);
		cr_assert(memcmp(p_gguf, p_bin, len_bin) == 0, "token %d: \"%s\" vs \"%s\"", id,
			  p_gguf, p_bin);
		cr_assert_eq(skv_tokenizer_score(t, id, &score_gguf), 0);
		cr_assert_eq(skv_tokenizer_score(tok512, id, &score_bin), 0);
		cr_assert_eq(score_gguf, score_bin, "token %d: score %g vs %g", id, score_gguf,
			     score_bin);
	}

	size_t sample_len;
	char *sample = tu_read_file(tu_data_path("tokenizer-sample.txt"), &sample_len);
	for (size_t i = 0; i <= sizeof(edge_texts) / sizeof(edge_texts[0]); i++) {
		const char *text = i < sizeof(edge_texts) / sizeof(edge_texts[0]) ?
					   edge_texts[i].text : sample;
		size_t len = i < sizeof(edge_texts) / sizeof(edge_texts[0]) ?
				     (edge_texts[i].len ? edge_texts[i].len : strlen(text)) :
				     sample_len;
		int32_t *ids_gguf, *ids_bin;
		size_t n_gguf, n_bin;
		cr_assert_eq(skv_tokenizer_encode(t, text, len, 1, 1, &ids_gguf, &n_gguf), 0);
		cr_assert_eq(skv_tokenizer_encode(tok512, text, len, 1, 1, &ids_bin, &n_bin), 0);
		cr_assert_eq(n_gguf, n_bin, "text %zu", i);
		cr_assert(memcmp(ids_gguf, ids_bin, n_bin * sizeof(*ids_bin)) == 0, "text %zu", i);
		free(ids_gguf);
		free(ids_bin);
	}
	free(sample);

	/* The GGUF holds 512 tokens: any other model size is refused with both sizes named. */
	struct skv_tokenizer *wrong = NULL;
	rc = skv_tokenizer_from_gguf(g, 256, &wrong, msg, sizeof(msg));
	cr_assert_eq(rc, -SKV_EVOCAB, "%s", skv_strerror(rc));
	cr_assert_null(wrong);
	cr_assert(strstr(msg, "stories260K.gguf") && strstr(msg, "512") && strstr(msg, "256"),
		  "message: %s", msg);

	skv_tokenizer_free(t);
	skv_gguf_close(g);
}

/* GGUF files made at test time: a header without tensors and the given metadata. */
struct gguf_builder {
	char *bytes;
	size_t len, cap;
	uint64_t n_kv;
};

static void gguf_put(struct gguf_builder *b, const void *data, size_t len)
{
	while (b->len + len > b->cap) {
		b->cap = b->cap ? 2 * b->cap : 1024;
		b->bytes = realloc(b->bytes, b->cap);
		cr_assert(b->bytes);
	}
	memcpy(b->bytes + b->len, data, len);
	b->len += len;
}

static void gguf_put_u32(struct gguf_builder *b, uint32_t v) { gguf_put(b, &v, 4); }
static void gguf_put_u64(struct gguf_builder *b, uint64_t v) { gguf_put(b, &v, 8); }

static void gguf_put_str(struct gguf_builder *b, const char *str)
{
	gguf_put_u64(b, strlen(str));
	gguf_put(b, str, strlen(str));
}

static void gguf_begin(struct gguf_builder *b)
{
	memset(b, 0, sizeof(*b));
	gguf_put(b, "GGUF", 4);
	gguf_put_u32(b, 3);
	gguf_put_u64(b, 0); /* tensors */
	gguf_put_u64(b, 0); /* metadata pairs, patched by gguf_finish() */
	/* Every vocabulary names its tokenizer model (a GGUF without one is refused). */
	gguf_put_str(b, "tokenizer.ggml.model");
	gguf_put_u32(b, SKV_GGUF_STRING);
	gguf_put_str(b, "llama");
	b->n_kv++;
}

static void gguf_kv_strings(struct gguf_builder *b, const char *key, const char *const *strs,
			    size_t n)
{
	gguf_put_str(b, key);
	gguf_put_u32(b, SKV_GGUF_ARRAY);
	gguf_put_u32(b, SKV_GGUF_STRING);
	gguf_put_u64(b, n);
	for (size_t i = 0; i < n; i++)
		gguf_put_str(b, strs[i]);
	b->n_kv++;
}

/* An array of 4-byte elements (float32 or int32). */
static void gguf_kv_array4(struct gguf_builder *b, const char *key, enum skv_gguf_type type,
			   const void *values, size_t n)
{
	gguf_put_str(b, key);
	gguf_put_u32(b, SKV_GGUF_ARRAY);
	gguf_put_u32(b, type);
	gguf_put_u64(b, n);
	gguf_put(b, values, 4 * n);
	b->n_kv++;
}

/* Write the file, open it, and return the GGUF handle. */
static struct skv_gguf *gguf_finish(struct gguf_builder *b, const char *name)
{
	static const char zeros[32];
	memcpy(b->bytes + 16, &b->n_kv, 8);
	gguf_put(b, zeros, (32 - b->len % 32) % 32);
	struct skv_gguf *g = NULL;
	char msg[256] = "";
	int rc = skv_gguf_open(tu_write_scratch(name, b->bytes, b->len), &g, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "test GGUF %s: %s", name, msg);
	free(b->bytes);
	return g;
}

static const char *const gguf_tokens[] = {
	"<unk>", "<s>", "</s>", "\xe2\x96\x81" "a" "\xe2\x96\x81" "b", "<s>", "\xe2\x96\x81", "x\xe2\x96",
};
static const float gguf_scores[] = { 0.0f, 0.0f, 0.0f, -1.0f, -2.0f, -3.0f, -4.0f };
static const int32_t gguf_types[] = { 2, 3, 3, 1, 1, 1, 1 };
#define GGUF_TEST_VOCAB 7

Test(tokenizer_synthetic, gguf_export_mapping)
{
	/* U+2581 becomes ' ' everywhere; only *control* <s> and </s> get llama2.c's newlines; a
	 * truncated U+2581 is copied as is. */
	static const char *const expected[] = {
		"<unk>", "\n<s>\n", "\n</s>\n", " a b", "<s>", " ", "x\xe2\x96",
	};
	struct gguf_builder b;
	gguf_begin(&b);
	gguf_kv_strings(&b, "tokenizer.ggml.tokens", gguf_tokens, GGUF_TEST_VOCAB);
	gguf_kv_array4(&b, "tokenizer.ggml.scores", SKV_GGUF_FLOAT32, gguf_scores, GGUF_TEST_VOCAB);
	gguf_kv_array4(&b, "tokenizer.ggml.token_type", SKV_GGUF_INT32, gguf_types,
		       GGUF_TEST_VOCAB);
	struct skv_gguf *g = gguf_finish(&b, "mapping.gguf");
	struct skv_tokenizer *t = NULL;
	char msg[256] = "";
	cr_assert_eq(skv_tokenizer_from_gguf(g, GGUF_TEST_VOCAB, &t, msg, sizeof(msg)), 0, "%s", msg);
	skv_gguf_close(g); /* the tokenizer keeps copies */
	for (int32_t id = 0; id < GGUF_TEST_VOCAB; id++) {
		size_t len;
		float score;
		const char *piece = skv_tokenizer_piece(t, id, &len);
		cr_assert_eq(len, strlen(expected[id]), "token %d", id);
		cr_assert(memcmp(piece, expected[id], len) == 0, "token %d: \"%s\"", id, piece);
		cr_assert_eq(skv_tokenizer_score(t, id, &score), 0);
		cr_assert_eq(score, gguf_scores[id]);
	}
	skv_tokenizer_free(t);
}

/* Build a GGUF with some tokenizer keys and expect from_gguf to fail with err naming `key`. */
static void check_gguf_fails(const char *name, bool tokens, enum skv_gguf_type score_type,
			     size_t n_types, int32_t vocab_size, int err, const char *needle)
{
	struct gguf_builder b;
	gguf_begin(&b);
	if (tokens)
		gguf_kv_strings(&b, "tokenizer.ggml.tokens", gguf_tokens, GGUF_TEST_VOCAB);
	if (score_type != SKV_GGUF_STRING)
		gguf_kv_array4(&b, "tokenizer.ggml.scores", score_type, gguf_scores,
			       GGUF_TEST_VOCAB);
	if (n_types)
		gguf_kv_array4(&b, "tokenizer.ggml.token_type", SKV_GGUF_INT32, gguf_types, n_types);
	struct skv_gguf *g = gguf_finish(&b, name);
	struct skv_tokenizer *t = (struct skv_tokenizer *)(uintptr_t)1;
	char msg[256] = "";
	int rc = skv_tokenizer_from_gguf(g, vocab_size, &t, msg, sizeof(msg));
	cr_assert_eq(rc, err, "%s: got %d (%s): %s", name, rc, skv_strerror(rc), msg);
	cr_assert_null(t);
	cr_assert(strstr(msg, name), "message does not name the file: %s", msg);
	cr_assert(strstr(msg, needle), "message lacks \"%s\": %s", needle, msg);
	skv_gguf_close(g);
}

Test(tokenizer_synthetic, gguf_errors)
{
	/* SKV_GGUF_STRING as score type stands for "no scores key". */
	check_gguf_fails("no-tokens.gguf", false, SKV_GGUF_FLOAT32, GGUF_TEST_VOCAB,
			 GGUF_TEST_VOCAB, -ENOENT, "tokenizer.ggml.tokens");
	check_gguf_fails("no-scores.gguf", true, SKV_GGUF_STRING, GGUF_TEST_VOCAB, GGUF_TEST_VOCAB,
			 -ENOENT, "tokenizer.ggml.scores");
	check_gguf_fails("int-scores.gguf", true, SKV_GGUF_INT32, GGUF_TEST_VOCAB, GGUF_TEST_VOCAB,
			 -SKV_EFORMAT, "tokenizer.ggml.scores");
	check_gguf_fails("no-types.gguf", true, SKV_GGUF_FLOAT32, 0, GGUF_TEST_VOCAB, -ENOENT,
			 "tokenizer.ggml.token_type");
	check_gguf_fails("short-types.gguf", true, SKV_GGUF_FLOAT32, GGUF_TEST_VOCAB - 1,
			 GGUF_TEST_VOCAB, -SKV_EFORMAT, "token types");
	check_gguf_fails("vocab.gguf", true, SKV_GGUF_FLOAT32, GGUF_TEST_VOCAB, 512, -SKV_EVOCAB,
			 "512");
	check_gguf_fails("tiny.gguf", true, SKV_GGUF_FLOAT32, GGUF_TEST_VOCAB, 2, -EINVAL, "2");
}

/* --- load errors --------------------------------------------------------------------------- */

TestSuite(tokenizer_load, .fini = teardown_scratch);

/* Load and expect err; msg must name the path and contain each of the `needles`. */
static void check_load_fails(const char *path, int32_t vocab_size, int err, const char *needle1,
			     const char *needle2)
{
	struct skv_tokenizer *t = (struct skv_tokenizer *)(uintptr_t)1;
	char msg[256] = "";
	int rc = skv_tokenizer_load(path, vocab_size, &t, msg, sizeof(msg));
	cr_assert_eq(rc, err, "%s (vocab %d): got %d (%s), want %d (%s): %s", path, vocab_size, rc,
		     skv_strerror(rc), err, skv_strerror(err), msg);
	cr_assert_null(t, "*out is cleared on failure");
	cr_assert(strstr(msg, path), "message does not name the path: %s", msg);
	cr_assert_null(strchr(msg, '\n'), "message is one line: %s", msg);
	if (needle1)
		cr_assert(strstr(msg, needle1), "message lacks \"%s\": %s", needle1, msg);
	if (needle2)
		cr_assert(strstr(msg, needle2), "message lacks \"%s\": %s", needle2, msg);
	/* A NULL message buffer is allowed. */
	cr_assert_eq(skv_tokenizer_load(path, vocab_size, &t, NULL, 0), err);
}

static char *tok512_bytes(void)
{
	size_t len;
	char *bytes = tu_read_file(tu_model_path("tok512.bin"), &len);
	cr_assert_eq(len, TOK512_BYTES);
	return bytes;
}

Test(tokenizer_load, missing_file)
{
	check_load_fails("/nonexistent/streamkv/tok512.bin", TOK512_VOCAB, -ENOENT, NULL, NULL);
}

Test(tokenizer_load, directory)
{
	check_load_fails(tu_scratch_dir("directory"), TOK512_VOCAB, -EISDIR, NULL, NULL);
}

Test(tokenizer_load, bad_vocab_size)
{
	check_load_fails(tu_model_path("tok512.bin"), 0, -EINVAL, NULL, NULL);
	check_load_fails(tu_model_path("tok512.bin"), -512, -EINVAL, NULL, NULL);
	check_load_fails(tu_model_path("tok512.bin"), 2, -EINVAL, NULL, NULL);
}

Test(tokenizer_load, empty_file)
{
	check_load_fails(tu_write_scratch("empty.bin", "", 0), TOK512_VOCAB, -SKV_ETRUNCATED,
			 "offset 0", NULL);
}

Test(tokenizer_load, truncated)
{
	/* Inside the header, inside an entry's score/length, inside a piece, at an entry boundary,
	 * and one byte short of the end. */
	static const size_t cuts[] = { 1, 3, 4, 6, 11, 12, 13, 100, 3001, TOK512_BYTES - 1 };
	char *bytes = tok512_bytes();
	for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
		char name[32], offset[32];
		snprintf(name, sizeof(name), "cut-%zu.bin", cuts[i]);
		snprintf(offset, sizeof(offset), "offset %zu", cuts[i]);
		check_load_fails(tu_write_scratch(name, bytes, cuts[i]), TOK512_VOCAB,
				 -SKV_ETRUNCATED, offset, NULL);
	}
	free(bytes);
}

/* Offset of token id's length field in tok512.bin. */
static size_t tok512_length_offset(const char *bytes, int32_t id)
{
	size_t offset = 4;
	for (int32_t i = 0; i < id; i++) {
		int32_t len;
		memcpy(&len, bytes + offset + 4, 4);
		offset += 8 + (size_t)len;
	}
	return offset + 4;
}

Test(tokenizer_load, bad_lengths)
{
	static const int32_t bad[] = { -1, INT32_MIN, 8 /* > max_token_length 7 */, INT32_MAX };
	char *bytes = tok512_bytes();
	size_t at = tok512_length_offset(bytes, 300);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *copy = malloc(TOK512_BYTES);
		cr_assert(copy);
		memcpy(copy, bytes, TOK512_BYTES);
		memcpy(copy + at, &bad[i], 4);
		char name[32], where[32];
		snprintf(name, sizeof(name), "len-%zu.bin", i);
		snprintf(where, sizeof(where), "offset %zu", at);
		check_load_fails(tu_write_scratch(name, copy, TOK512_BYTES), TOK512_VOCAB,
				 -SKV_EFORMAT, "token 300", where);
		free(copy);
	}
	int32_t negative = -5;
	memcpy(bytes, &negative, 4);
	check_load_fails(tu_write_scratch("max-len.bin", bytes, TOK512_BYTES), TOK512_VOCAB,
			 -SKV_EFORMAT, "max_token_length", NULL);
	free(bytes);
}

Test(tokenizer_load, vocabulary_mismatch)
{
	const char *path = tu_model_path("tok512.bin");
	/* 256 tokens leave 256 more in the file: another model's vocabulary. */
	check_load_fails(path, 256, -SKV_EVOCAB, "512", "256");
	/* 1000 tokens run past the end of the file. */
	check_load_fails(path, 1000, -SKV_ETRUNCATED, "1000", "offset 6227");
	/* Trailing bytes that are not whole entries are refused as well. */
	char *bytes = tok512_bytes();
	char *longer = malloc(TOK512_BYTES + 3);
	cr_assert(longer);
	memcpy(longer, bytes, TOK512_BYTES);
	memcpy(longer + TOK512_BYTES, "xyz", 3);
	check_load_fails(tu_write_scratch("trailing.bin", longer, TOK512_BYTES + 3), TOK512_VOCAB,
			 -SKV_EVOCAB, "3 bytes", NULL);
	free(longer);
	free(bytes);
}

/* --- the Llama 2 32k vocabulary, when the machine has it ----------------------------------- */

Test(tokenizer_llama2, matches_reference)
{
	const char *path = getenv("SKV_LLAMA2_TOKENIZER");
	if (!path || !*path)
		cr_skip_test("SKV_LLAMA2_TOKENIZER is not set (a llama2.c tokenizer.bin of 32000 "
			     "tokens)");
	struct stat st;
	if (stat(path, &st) != 0)
		cr_skip_test("%s is not there", path);
	struct skv_tokenizer *t = load_ok(path, 32000);
	struct ref_vocab ref;
	ref_vocab_load(&ref, path, 32000);
	for (size_t i = 0; i < sizeof(edge_texts) / sizeof(edge_texts[0]); i++) {
		const struct named_text *e = &edge_texts[i];
		check_matches_reference(t, &ref, e->name, e->text, e->len ? e->len : strlen(e->text));
	}
	size_t len;
	char *spaces = repeat(" ", 5000, &len);
	check_matches_reference(t, &ref, "5000 spaces", spaces, len);
	free(spaces);
	char *sample = tu_read_file(tu_data_path("tokenizer-sample.txt"), &len);
	check_matches_reference(t, &ref, "tokenizer-sample.txt", sample, len);
	check_round_trip(t, "tokenizer-sample.txt", sample, len);
	free(sample);
	ref_vocab_free(&ref);
	skv_tokenizer_free(t);
}
