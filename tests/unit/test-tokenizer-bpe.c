/* Byte-level BPE and GGUF vocabularies: llama.cpp's test vectors (models/vocab: every text of
 * X.gguf.inp must give exactly the ids of its line in X.gguf.out, no BOS), round trips on the
 * evaluation texts, the pre-tokenizers' splits, special tokens, the special ids, and the
 * refusals of files this tokenizer cannot read. GGUF files for the refusals are written here. */
#include "gguf.h"
#include "skv-error.h"
#include "testutil.h"
#include "tokenizer-pvt.h"
#include "tokenizer.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VECTOR_SEPARATOR "\n__ggml_vocab_test__\n"

static const char *env_path(const char *var, const char *name)
{
	static char slots[8][PATH_MAX];
	static int next;
	const char *dir = getenv(var);
	cr_assert(dir, "%s is not set (run the suite with meson test)", var);
	char *path = slots[next++ % 8];
	int n = snprintf(path, PATH_MAX, "%s/%s", dir, name);
	cr_assert(n > 0 && n < PATH_MAX);
	return path;
}

/* models/vocab/ggml-vocab-<name>.gguf, or a file beside it. */
static const char *vocab_path(const char *name, const char *suffix)
{
	char file[128];
	snprintf(file, sizeof(file), "ggml-vocab-%s.gguf%s", name, suffix);
	return env_path("SKV_VOCAB_DIR", file);
}

static int32_t gguf_vocab_size(const struct skv_gguf *g)
{
	struct skv_gguf_str *tokens;
	uint64_t n;
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &n), 0);
	free(tokens);
	return (int32_t)n;
}

static struct skv_tokenizer *load_path(const char *path)
{
	struct skv_gguf *g = NULL;
	struct skv_tokenizer *t = NULL;
	char msg[512] = "";
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	int rc = skv_tokenizer_from_gguf(g, gguf_vocab_size(g), &t, msg, sizeof(msg));
	cr_assert_eq(rc, 0, "%s: %s", path, msg);
	skv_gguf_close(g);
	return t;
}

static struct skv_tokenizer *load_vocab(const char *name)
{
	return load_path(vocab_path(name, ""));
}

/* Every text of path.inp against its line of ids in path.out. */
static void check_vectors_at(const struct skv_tokenizer *t, const char *inp, const char *outp)
{
	size_t in_len, out_len;
	char *in = tu_read_file(inp, &in_len);
	char *out = tu_read_file(outp, &out_len);
	char *text = in, *line = out;
	size_t n_texts = 0;
	for (char *sep; (sep = strstr(text, VECTOR_SEPARATOR)); text = sep + strlen(VECTOR_SEPARATOR)) {
		char *eol = strchr(line, '\n');
		cr_assert(eol, "%s: fewer lines than texts (%zu)", outp, n_texts);
		*eol = '\0';
		int32_t *ids;
		size_t n_ids;
		cr_assert_eq(skv_tokenizer_encode(t, text, (size_t)(sep - text), 0, 0, &ids, &n_ids), 0);
		char *cursor = line;
		size_t i = 0;
		for (;; i++) {
			char *end;
			long expected = strtol(cursor, &end, 10);
			if (end == cursor)
				break;
			cursor = end;
			cr_assert_lt(i, n_ids, "%s text %zu \"%.*s\": %zu ids, expected more (%s)", inp,
				     n_texts, (int)(sep - text), text, n_ids, line);
			cr_assert_eq(ids[i], expected, "%s text %zu \"%.*s\": id %zu is %d, expected %ld",
				     inp, n_texts, (int)(sep - text), text, i, ids[i], expected);
		}
		cr_assert_eq(i, n_ids, "%s text %zu \"%.*s\": %zu ids, expected %zu", inp, n_texts,
			     (int)(sep - text), text, n_ids, i);
		free(ids);
		line = eol + 1;
		n_texts++;
	}
	cr_assert_gt(n_texts, 40, "%s: only %zu texts", inp, n_texts);
	cr_assert_eq(*line, '\0', "%s: more lines than the %zu texts", outp, n_texts);
	free(in);
	free(out);
}

static void check_vectors(const char *name, const char *kind)
{
	struct skv_tokenizer *t = load_vocab(name);
	cr_assert_str_eq(skv_tokenizer_kind(t), kind);
	check_vectors_at(t, vocab_path(name, ".inp"), vocab_path(name, ".out"));
	skv_tokenizer_free(t);
}

Test(tokenizer_vectors, deepseek_llm) { check_vectors("deepseek-llm", "bpe"); }
Test(tokenizer_vectors, falcon) { check_vectors("falcon", "bpe"); }
Test(tokenizer_vectors, gpt_2) { check_vectors("gpt-2", "bpe"); }
Test(tokenizer_vectors, llama_spm) { check_vectors("llama-spm", "spm"); }
Test(tokenizer_vectors, mpt) { check_vectors("mpt", "bpe"); }
Test(tokenizer_vectors, phi_3) { check_vectors("phi-3", "spm"); }
Test(tokenizer_vectors, starcoder) { check_vectors("starcoder", "bpe"); }

/* --- GGUF files written by the test ------------------------------------------------------ */

struct gguf_w {
	char *bytes;
	size_t len, cap;
	uint64_t n_kv;
};

static void w_put(struct gguf_w *w, const void *data, size_t len)
{
	while (w->len + len > w->cap) {
		w->cap = w->cap ? 2 * w->cap : 1 << 16;
		w->bytes = realloc(w->bytes, w->cap);
		cr_assert(w->bytes);
	}
	memcpy(w->bytes + w->len, data, len);
	w->len += len;
}

static void w_u32(struct gguf_w *w, uint32_t v) { w_put(w, &v, 4); }
static void w_u64(struct gguf_w *w, uint64_t v) { w_put(w, &v, 8); }

static void w_str(struct gguf_w *w, const char *s, size_t len)
{
	w_u64(w, len);
	w_put(w, s, len);
}

static void w_begin(struct gguf_w *w)
{
	memset(w, 0, sizeof(*w));
	w_put(w, "GGUF", 4);
	w_u32(w, 3);
	w_u64(w, 0); /* tensors */
	w_u64(w, 0); /* key/value pairs, patched by w_finish() */
}

static void w_key(struct gguf_w *w, const char *key, enum skv_gguf_type type)
{
	w_str(w, key, strlen(key));
	w_u32(w, type);
	w->n_kv++;
}

static void w_kv_str(struct gguf_w *w, const char *key, const char *value)
{
	w_key(w, key, SKV_GGUF_STRING);
	w_str(w, value, strlen(value));
}

static void w_kv_u32(struct gguf_w *w, const char *key, uint32_t value)
{
	w_key(w, key, SKV_GGUF_UINT32);
	w_u32(w, value);
}

static void w_kv_strs(struct gguf_w *w, const char *key, const struct skv_gguf_str *strs,
		      uint64_t n)
{
	w_key(w, key, SKV_GGUF_ARRAY);
	w_u32(w, SKV_GGUF_STRING);
	w_u64(w, n);
	for (uint64_t i = 0; i < n; i++)
		w_str(w, strs[i].ptr, (size_t)strs[i].len);
}

static void w_kv_i32s(struct gguf_w *w, const char *key, const void *values, uint64_t n)
{
	w_key(w, key, SKV_GGUF_ARRAY);
	w_u32(w, SKV_GGUF_INT32);
	w_u64(w, n);
	w_put(w, values, 4 * n);
}

static const char *w_finish(struct gguf_w *w, const char *name)
{
	static const char zeros[32];
	memcpy(w->bytes + 16, &w->n_kv, 8);
	w_put(w, zeros, (32 - w->len % 32) % 32);
	const char *path = tu_write_scratch(name, w->bytes, w->len);
	free(w->bytes);
	return path;
}

/* A copy of vocabulary `src` with the given model and pre-tokenizer (NULL: no key), and
 * optionally its merges replaced by `merges[n_merges]`. */
static const char *copy_vocab(const char *src, const char *name, const char *model,
			      const char *pre, const struct skv_gguf_str *merges, uint64_t n_merges)
{
	struct skv_gguf *g = NULL;
	char msg[512] = "";
	cr_assert_eq(skv_gguf_open(vocab_path(src, ""), &g, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_gguf_str *tokens, *src_merges;
	uint64_t n_tokens, n_src_merges, n_types;
	const void *types;
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &n_tokens), 0);
	cr_assert_eq(skv_gguf_get_str_array(g, "tokenizer.ggml.merges", &src_merges,
					    &n_src_merges), 0);
	cr_assert_eq(skv_gguf_get_array(g, "tokenizer.ggml.token_type", SKV_GGUF_INT32, &types,
					&n_types), 0);
	uint32_t bos, eos;
	cr_assert_eq(skv_gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &bos), 0);
	cr_assert_eq(skv_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos), 0);

	struct gguf_w w;
	w_begin(&w);
	w_kv_str(&w, "tokenizer.ggml.model", model);
	if (pre)
		w_kv_str(&w, "tokenizer.ggml.pre", pre);
	w_kv_strs(&w, "tokenizer.ggml.tokens", tokens, n_tokens);
	w_kv_i32s(&w, "tokenizer.ggml.token_type", types, n_types);
	if (merges)
		w_kv_strs(&w, "tokenizer.ggml.merges", merges, n_merges);
	else if (n_merges == 0)
		w_kv_strs(&w, "tokenizer.ggml.merges", src_merges, n_src_merges);
	w_kv_u32(&w, "tokenizer.ggml.bos_token_id", bos);
	w_kv_u32(&w, "tokenizer.ggml.eos_token_id", eos);
	free(tokens);
	free(src_merges);
	skv_gguf_close(g);
	return w_finish(&w, name);
}

/* --- GPT-NeoX: no tokenizer.ggml.pre in the shipped file ------------------------------------ */

TestSuite(tokenizer_neox, .fini = tu_scratch_cleanup);

/* Expect path to be refused with err, one line naming the path and `needle`. */
static void check_refused(const char *path, int err, const char *needle)
{
	struct skv_gguf *g = NULL;
	char msg[512] = "";
	cr_assert_eq(skv_gguf_open(path, &g, msg, sizeof(msg)), 0, "%s", msg);
	struct skv_tokenizer *t = (struct skv_tokenizer *)(uintptr_t)1;
	int rc = skv_tokenizer_from_gguf(g, gguf_vocab_size(g), &t, msg, sizeof(msg));
	cr_assert_eq(rc, err, "%s: got %d (%s): %s", path, rc, skv_strerror(rc), msg);
	cr_assert_null(t);
	cr_assert(strstr(msg, path), "message does not name the file: %s", msg);
	cr_assert(strstr(msg, needle), "message lacks \"%s\": %s", needle, msg);
	cr_assert_null(strchr(msg, '\n'), "not one line: %s", msg);
	skv_gguf_close(g);
}

Test(tokenizer_neox, named_olmo_equals_mpt)
{
	/* The shipped file names no pre-tokenizer: refused, nothing stands in for it. */
	check_refused(vocab_path("gpt-neox", ""), -ENOENT, "tokenizer.ggml.pre is missing");

	/* Named as llama.cpp names it, the vocabulary (the same tokens, merges and types as
	 * MPT's) gives MPT's vectors; "gpt-neox" is the same pre-tokenizer. */
	const char *names[] = { "olmo", "gpt-neox" };
	for (size_t i = 0; i < 2; i++) {
		const char *path = copy_vocab("gpt-neox", "neox.gguf", "gpt2", names[i], NULL, 0);
		struct skv_tokenizer *t = load_path(path);
		cr_assert_str_eq(skv_tokenizer_pre(t), names[i]);
		check_vectors_at(t, vocab_path("mpt", ".inp"), vocab_path("mpt", ".out"));
		skv_tokenizer_free(t);
	}
}

Test(tokenizer_neox, hand_checked)
{
	struct skv_tokenizer *t = load_path(copy_vocab("gpt-neox", "neox.gguf", "gpt2", "olmo",
						       NULL, 0));
	struct {
		const char *text;
		int32_t ids[4];
		size_t n;
	} cases[] = {
		/* "Hello" and "\u0120world" (GPT-2's character for the space, U+0120). */
		{ "Hello world", { 12092, 1533 }, 2 },
		/* A run of spaces is one user-defined token, cut out before the regex. */
		{ "a   b", { 66, 50275, 67 }, 3 },
		/* <|endoftext|> is control: plain text unless special tokens are parsed. */
		{ "<|endoftext|>", { 0 }, 0 },
	};
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		int32_t *ids;
		size_t n;
		cr_assert_eq(skv_tokenizer_encode(t, cases[c].text, strlen(cases[c].text), 0, 0, &ids,
						  &n), 0);
		if (cases[c].n) {
			cr_assert_eq(n, cases[c].n, "\"%s\": %zu ids", cases[c].text, n);
			for (size_t i = 0; i < n; i++)
				cr_assert_eq(ids[i], cases[c].ids[i], "\"%s\": id %zu is %d",
					     cases[c].text, i, ids[i]);
		} else {
			cr_assert_gt(n, 1, "\"%s\" is plain text", cases[c].text);
			for (size_t i = 0; i < n; i++)
				cr_assert_neq(ids[i], 0);
		}
		free(ids);
	}
	size_t len;
	const char *piece = skv_tokenizer_decode(t, -1, 50275, &len);
	cr_assert_eq(len, 3);
	cr_assert(memcmp(piece, "   ", 3) == 0);
	cr_assert_eq(skv_tokenizer_bos(t), 0);
	cr_assert_eq(skv_tokenizer_eos(t), 0);
	cr_assert_eq(skv_tokenizer_add_bos(t), 0);
	skv_tokenizer_free(t);
}

/* --- round trips ----------------------------------------------------------------------------- */

static const char *const texts[] = {
	"pg11_alice_in_wonderland.txt", "pg1342_pride_and_prejudice.txt", "pg2701_moby_dick.txt",
	"pg84_frankenstein.txt",       "tinyshakespeare.txt",            "tinystories_train_head.txt",
};

/* decode(encode(x)) == x, the tokens decoded one after the other. */
static void check_round_trip(const struct skv_tokenizer *t, const char *what, const char *text,
			     size_t len, bool special)
{
	int32_t *ids;
	size_t n;
	int rc = special ? skv_tokenizer_encode_special(t, text, len, 0, 0, &ids, &n) :
			   skv_tokenizer_encode(t, text, len, 0, 0, &ids, &n);
	cr_assert_eq(rc, 0, "%s: %s", what, skv_strerror(rc));
	cr_assert(len == 0 || n > 0);
	char *back = malloc(len + 1);
	size_t at = 0;
	int32_t prev = -1;
	for (size_t i = 0; i < n; i++) {
		size_t piece_len;
		const char *piece = skv_tokenizer_decode(t, prev, ids[i], &piece_len);
		cr_assert(piece, "%s: token %zu (%d) does not decode", what, i, ids[i]);
		cr_assert_leq(at + piece_len, len, "%s: decodes longer than the text at token %zu",
			      what, i);
		cr_assert(memcmp(text + at, piece, piece_len) == 0,
			  "%s: token %zu (%d) decodes to \"%.*s\" at byte %zu", what, i, ids[i],
			  (int)piece_len, piece, at);
		memcpy(back + at, piece, piece_len);
		at += piece_len;
		prev = ids[i];
	}
	cr_assert_eq(at, len, "%s: %zu of %zu bytes back", what, at, len);
	free(back);
	free(ids);
}

static void check_round_trips(struct skv_tokenizer *t, const char *vocab)
{
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		size_t len;
		char *text = tu_read_file(env_path("SKV_TEXT_DIR", texts[i]), &len);
		char what[256];
		snprintf(what, sizeof(what), "%s on %s", vocab, texts[i]);
		check_round_trip(t, what, text, len, false);
		free(text);
	}
	/* Special tokens, text around them, and bytes that are not UTF-8. */
	static const char mixed[] = "<|endoftext|>Hi<|endoftext|> \xff\xfe \xc3(\xe2\x82 \xf0\x9f\x98 "
				    "caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 12345 \t\n\r\n";
	char what[256];
	snprintf(what, sizeof(what), "%s on mixed text", vocab);
	check_round_trip(t, what, mixed, sizeof(mixed) - 1, true);
	check_round_trip(t, what, mixed, sizeof(mixed) - 1, false);
	skv_tokenizer_free(t);
}

TestSuite(tokenizer_round_trip, .fini = tu_scratch_cleanup, .timeout = 300);

Test(tokenizer_round_trip, gpt_2) { check_round_trips(load_vocab("gpt-2"), "gpt-2"); }

/* Falcon, GPT-NeoX, MPT and StarCoder cannot spell bytes 0xc0, 0xc1 and 0xf5..0xff (no UTF-8
 * text has them), and DeepSeek's user-defined tokens "\u00f8".."\u00ff" take the characters
 * that stand for bytes 0xf8..0xff (so such a byte encodes, as in llama.cpp, to a token that
 * decodes to the letter): their mixed text keeps to UTF-8. */

static void check_round_trips_utf8(struct skv_tokenizer *t, const char *vocab)
{
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		size_t len;
		char *text = tu_read_file(env_path("SKV_TEXT_DIR", texts[i]), &len);
		char what[256];
		snprintf(what, sizeof(what), "%s on %s", vocab, texts[i]);
		check_round_trip(t, what, text, len, false);
		free(text);
	}
	static const char mixed[] = "<|endoftext|>Hi<|endoftext|> caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 "
				    "\xf0\x9f\x98\x81 12345 \t\n\r\n  x";
	char what[256];
	snprintf(what, sizeof(what), "%s on mixed text", vocab);
	check_round_trip(t, what, mixed, sizeof(mixed) - 1, true);
	check_round_trip(t, what, mixed, sizeof(mixed) - 1, false);
	skv_tokenizer_free(t);
}

Test(tokenizer_round_trip, deepseek_llm)
{
	check_round_trips_utf8(load_vocab("deepseek-llm"), "deepseek-llm");
}
Test(tokenizer_round_trip, falcon) { check_round_trips_utf8(load_vocab("falcon"), "falcon"); }
Test(tokenizer_round_trip, mpt) { check_round_trips_utf8(load_vocab("mpt"), "mpt"); }
Test(tokenizer_round_trip, starcoder)
{
	check_round_trips_utf8(load_vocab("starcoder"), "starcoder");
}
Test(tokenizer_round_trip, gpt_neox)
{
	check_round_trips_utf8(load_path(copy_vocab("gpt-neox", "neox.gguf", "gpt2", "olmo", NULL,
						    0)), "gpt-neox");
}

/* The Llama 3 and Qwen2 pre-tokenizers, which have no vocabulary here, on GPT-2's. */
Test(tokenizer_round_trip, llama_bpe_and_qwen2_regexes)
{
	const char *pres[] = { "llama-bpe", "qwen2" };
	for (size_t i = 0; i < 2; i++) {
		struct skv_tokenizer *t = load_path(copy_vocab("gpt-2", "gpt2-pre.gguf", "gpt2",
							       pres[i], NULL, 0));
		cr_assert_str_eq(skv_tokenizer_pre(t), pres[i]);
		cr_assert_eq(skv_tokenizer_add_bos(t), i == 0, "llama-bpe adds BOS, qwen2 not");
		check_round_trips(t, pres[i]);
	}
}

/* --- pre-tokenizer splits -------------------------------------------------------------------- */

static void check_split(const char *pre, const char *text, const char *const *words)
{
	struct pretok *p = NULL;
	cr_assert_eq(pretok_new(pre, strlen(pre), &p), 0, "%s", pre);
	struct pretok_spans spans = { 0 };
	cr_assert_eq(pretok_split(p, text, strlen(text), &spans), 0);
	size_t n = 0;
	while (words[n])
		n++;
	for (size_t i = 0; i < spans.count && i < n; i++)
		cr_assert(spans.items[i].len == strlen(words[i]) &&
			  memcmp(text + spans.items[i].offset, words[i], strlen(words[i])) == 0,
			  "%s \"%s\": word %zu is \"%.*s\", expected \"%s\"", pre, text, i,
			  (int)spans.items[i].len, text + spans.items[i].offset, words[i]);
	cr_assert_eq(spans.count, n, "%s \"%s\": %zu words, expected %zu", pre, text, spans.count,
		     n);
	free(spans.items);
	pretok_free(p);
}

Test(tokenizer_pretok, splits)
{
	/* Llama 3: digits in threes, a letter run takes one non-letter before it, case-free
	 * contractions, a lone space before a digit stands alone. */
	check_split("llama-bpe", "Hello 123456 world's DON'T\n\n  x",
		    (const char *const[]){ "Hello", " ", "123", "456", " world", "'s", " DON", "'T",
					   "\n\n", " ", " x", NULL });
	/* Qwen2: single digits. */
	check_split("qwen2", "ab 1234",
		    (const char *const[]){ "ab", " ", "1", "2", "3", "4", NULL });
	/* GPT-2: contractions are lower case only; spaces before a word stay one short. */
	check_split("gpt-2", "I'm DON'T   go 42!",
		    (const char *const[]){ "I", "'m", " DON", "'", "T", "  ", " go", " 42", "!",
					   NULL });
	/* Falcon: punctuation first, then GPT-2's regex, then digits in threes. */
	check_split("falcon", "a,b 1234567",
		    (const char *const[]){ "a", ",", "b", " ", "123", "456", "7", NULL });
	/* StarCoder: every digit alone. */
	check_split("starcoder", "x 12",
		    (const char *const[]){ "x", " ", "1", "2", NULL });
	/* DeepSeek LLM: newlines alone, letters with one space, CJK runs, digits. */
	check_split("deepseek-llm", "Hi there\n\xe4\xb8\xad\xe6\x96\x87 42",
		    (const char *const[]){ "Hi", " there", "\n", "\xe4\xb8\xad\xe6\x96\x87", " ",
					   "42", NULL });
	/* Bytes that are not UTF-8 never match: they are words of their own between matches. */
	check_split("gpt-2", "ab\xff" "cd",
		    (const char *const[]){ "ab", "\xff", "cd", NULL });

	struct pretok *p = (struct pretok *)(uintptr_t)1;
	cr_assert_eq(pretok_new("gpt-3", 5, &p), -ENOENT);
	cr_assert_null(p);
}

Test(tokenizer_pretok, every_set_covers_the_text)
{
	/* Every name compiles, and its words are the text cut in order, nothing lost. */
	size_t len;
	char *text = tu_read_file(env_path("SKV_TEXT_DIR", "pg84_frankenstein.txt"), &len);
	static const char odd[] = "\xff\xfe caf\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87 12345 !? \t\n";
	size_t n_names = 0;
	for (const char *name; (name = pretok_known(n_names)); n_names++) {
		struct pretok *p = NULL;
		cr_assert_eq(pretok_new(name, strlen(name), &p), 0, "%s", name);
		cr_assert_str_eq(pretok_name(p), name);
		struct pretok_spans spans = { 0 };
		for (int pass = 0; pass < 2; pass++) {
			const char *subject = pass ? odd : text;
			size_t subject_len = pass ? sizeof(odd) - 1 : len;
			cr_assert_eq(pretok_split(p, subject, subject_len, &spans), 0);
			size_t at = 0;
			for (size_t i = 0; i < spans.count; i++) {
				cr_assert_eq(spans.items[i].offset, at, "%s: word %zu", name, i);
				cr_assert_gt(spans.items[i].len, 0);
				at += spans.items[i].len;
			}
			cr_assert_eq(at, subject_len, "%s: words cover %zu of %zu bytes", name, at,
				     subject_len);
		}
		free(spans.items);
		pretok_free(p);
	}
	cr_assert_geq(n_names, 12);
	free(text);
}

/* --- special tokens and ids ------------------------------------------------------------------ */

static void check_ids(struct skv_tokenizer *t, const char *text, bool special,
		      const int32_t *expected, size_t n_expected)
{
	int32_t *ids;
	size_t n;
	int rc = special ? skv_tokenizer_encode_special(t, text, strlen(text), 0, 0, &ids, &n) :
			   skv_tokenizer_encode(t, text, strlen(text), 0, 0, &ids, &n);
	cr_assert_eq(rc, 0);
	cr_assert_eq(n, n_expected, "\"%s\": %zu ids, expected %zu", text, n, n_expected);
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(ids[i], expected[i], "\"%s\": id %zu is %d, expected %d", text, i,
			     ids[i], expected[i]);
	free(ids);
}

Test(tokenizer_special, gpt_2)
{
	struct skv_tokenizer *t = load_vocab("gpt-2");
	/* Parsed only when asked: otherwise "<|endoftext|>" is the text "<", "|", ... */
	check_ids(t, "a<|endoftext|>b", true, (const int32_t[]){ 64, 50256, 65 }, 3);
	check_ids(t, "<|endoftext|>", false, (const int32_t[]){ 27, 91, 437, 1659, 5239, 91, 29 },
		  7);
	/* BOS and EOS by flag: GPT-2's are both <|endoftext|>. */
	int32_t *ids;
	size_t n;
	cr_assert_eq(skv_tokenizer_encode(t, "a", 1, 1, 1, &ids, &n), 0);
	cr_assert_eq(n, 3);
	cr_assert(ids[0] == 50256 && ids[1] == 64 && ids[2] == 50256);
	free(ids);
	size_t len;
	const char *piece = skv_tokenizer_decode(t, 64, 50256, &len);
	cr_assert(len == 13 && memcmp(piece, "<|endoftext|>", 13) == 0);
	piece = skv_tokenizer_decode(t, -1, 220, &len); /* "\u0120" */
	cr_assert(len == 1 && piece[0] == ' ');
	cr_assert_null(skv_tokenizer_decode(t, -1, 50257, &len));
	cr_assert(skv_tokenizer_is_control(t, 50256));
	cr_assert(!skv_tokenizer_is_control(t, 64));
	cr_assert(!skv_tokenizer_is_control(t, 50257));
	cr_assert_eq(skv_tokenizer_bos(t), 50256);
	cr_assert_eq(skv_tokenizer_eos(t), 50256);
	cr_assert_eq(skv_tokenizer_eot(t), -1);
	cr_assert_eq(skv_tokenizer_add_bos(t), 0);
	cr_assert_str_eq(skv_tokenizer_kind(t), "bpe");
	cr_assert_str_eq(skv_tokenizer_pre(t), "gpt-2");
	skv_tokenizer_free(t);
}

Test(tokenizer_special, sentencepiece)
{
	struct skv_tokenizer *t = load_vocab("llama-spm");
	int32_t *plain, *parsed;
	size_t n_plain, n_parsed;
	/* <s> in the text: plain text by default; BOS when special tokens are parsed, and the
	 * text after it gets its own dummy prefix (llama.cpp: "▁Hi"). */
	cr_assert_eq(skv_tokenizer_encode(t, "<s>Hi", 5, 0, 0, &plain, &n_plain), 0);
	for (size_t i = 0; i < n_plain; i++)
		cr_assert_neq(plain[i], 1);
	cr_assert_eq(skv_tokenizer_encode_special(t, "<s>Hi", 5, 0, 0, &parsed, &n_parsed), 0);
	int32_t *hi;
	size_t n_hi;
	cr_assert_eq(skv_tokenizer_encode(t, "Hi", 2, 0, 0, &hi, &n_hi), 0);
	cr_assert_eq(n_parsed, 1 + n_hi);
	cr_assert_eq(parsed[0], 1);
	cr_assert(memcmp(parsed + 1, hi, n_hi * sizeof(*hi)) == 0);
	free(plain);
	free(parsed);
	free(hi);
	cr_assert_eq(skv_tokenizer_bos(t), 1);
	cr_assert_eq(skv_tokenizer_eos(t), 2);
	cr_assert_eq(skv_tokenizer_eot(t), -1);
	cr_assert_eq(skv_tokenizer_add_bos(t), 1);
	cr_assert_str_eq(skv_tokenizer_kind(t), "spm");
	cr_assert_str_eq(skv_tokenizer_pre(t), "");
	skv_tokenizer_free(t);

	/* Phi-3: EOS 32000 from the file, EOT found as the control token <|end|>. */
	t = load_vocab("phi-3");
	cr_assert_eq(skv_tokenizer_eos(t), 32000);
	cr_assert_eq(skv_tokenizer_eot(t), 32007);
	cr_assert(skv_tokenizer_is_control(t, 32007));
	cr_assert(!skv_tokenizer_is_control(t, 2)); /* </s> is user-defined in Phi-3 */
	/* User-defined tokens are cut out even from plain text, as llama.cpp does, and the text
	 * after one gets its own dummy prefix: "a</s>b" is "a", </s>, "b". */
	int32_t *a, *b, *both;
	size_t n_a, n_b, n_both;
	cr_assert_eq(skv_tokenizer_encode(t, "a", 1, 0, 0, &a, &n_a), 0);
	cr_assert_eq(skv_tokenizer_encode(t, "b", 1, 0, 0, &b, &n_b), 0);
	cr_assert_eq(skv_tokenizer_encode(t, "a</s>b", 6, 0, 0, &both, &n_both), 0);
	cr_assert_eq(n_both, n_a + 1 + n_b);
	cr_assert(memcmp(both, a, n_a * sizeof(*a)) == 0);
	cr_assert_eq(both[n_a], 2);
	cr_assert(memcmp(both + n_a + 1, b, n_b * sizeof(*b)) == 0);
	free(a);
	free(b);
	free(both);
	cr_assert_eq(skv_tokenizer_pad(t), 32000);
	int32_t *ids;
	size_t n;
	cr_assert_eq(skv_tokenizer_encode(t, "a", 1, 1, 1, &ids, &n), 0);
	cr_assert(n >= 3 && ids[0] == 1 && ids[n - 1] == 32000);
	free(ids);
	skv_tokenizer_free(t);
}

Test(tokenizer_special, deepseek_ids)
{
	struct skv_tokenizer *t = load_vocab("deepseek-llm");
	cr_assert_eq(skv_tokenizer_bos(t), 100000);
	cr_assert_eq(skv_tokenizer_eos(t), 100001);
	cr_assert_eq(skv_tokenizer_add_bos(t), 1);
	cr_assert_str_eq(skv_tokenizer_pre(t), "deepseek-llm");
	skv_tokenizer_free(t);
}

/* --- refusals -------------------------------------------------------------------------------- */

TestSuite(tokenizer_refusals, .fini = tu_scratch_cleanup);

Test(tokenizer_refusals, unknown_model_and_pre)
{
	check_refused(copy_vocab("gpt-2", "bert.gguf", "bert", "gpt-2", NULL, 0), -SKV_EFORMAT,
		      "unknown tokenizer model \"bert\"");
	check_refused(copy_vocab("gpt-2", "pre.gguf", "gpt2", "gpt-3", NULL, 0), -SKV_EFORMAT,
		      "unknown pre-tokenizer \"gpt-3\"");
	check_refused(copy_vocab("gpt-2", "no-pre.gguf", "gpt2", NULL, NULL, 0), -ENOENT,
		      "tokenizer.ggml.pre is missing");

	struct gguf_w w;
	w_begin(&w);
	const struct skv_gguf_str tokens[] = { { "a", 1 }, { "b", 1 }, { "c", 1 } };
	w_kv_strs(&w, "tokenizer.ggml.tokens", tokens, 3);
	check_refused(w_finish(&w, "no-model.gguf"), -ENOENT, "tokenizer.ggml.model is missing");
}

Test(tokenizer_refusals, malformed_merges)
{
	/* A merge naming a token that is not in the vocabulary. */
	const struct skv_gguf_str bad_token[] = { { "\xc4\xa0 t", 4 }, { "zq\xc4\xa0 qz", 7 } };
	check_refused(copy_vocab("gpt-2", "merge.gguf", "gpt2", "gpt-2", bad_token, 2),
		      -SKV_EFORMAT, "tokenizer.ggml.merges[1] \"zq\xc4\xa0 qz\" names \"zq\xc4\xa0\"");
	/* A merge of two tokens whose concatenation is not one ("z" and U+0120). */
	const struct skv_gguf_str no_result[] = { { "z \xc4\xa0", 4 } };
	check_refused(copy_vocab("gpt-2", "merge2.gguf", "gpt2", "gpt-2", no_result, 1),
		      -SKV_EFORMAT, "makes a token that is not in tokenizer.ggml.tokens");
	/* Not two tokens at all. */
	const struct skv_gguf_str no_space[] = { { "Hello", 5 } };
	check_refused(copy_vocab("gpt-2", "merge3.gguf", "gpt2", "gpt-2", no_space, 1),
		      -SKV_EFORMAT, "is not two tokens separated by a space");
	/* No merges key. */
	check_refused(copy_vocab("gpt-2", "merge4.gguf", "gpt2", "gpt-2", NULL, 1), -ENOENT,
		      "tokenizer.ggml.merges: missing");
}

/* --- merges, ignore_merges, concurrency ------------------------------------------------------ */

/* A vocabulary of a, b, c, ab, bc, abc with the one merge "b c". */
static const char *small_vocab(const char *name, const char *pre)
{
	static const struct skv_gguf_str tokens[] = {
		{ "a", 1 }, { "b", 1 }, { "c", 1 }, { "ab", 2 }, { "bc", 2 }, { "abc", 3 },
	};
	static const int32_t types[] = { 1, 1, 1, 1, 1, 1 };
	static const struct skv_gguf_str merges[] = { { "b c", 3 } };
	struct gguf_w w;
	w_begin(&w);
	w_kv_str(&w, "tokenizer.ggml.model", "gpt2");
	w_kv_str(&w, "tokenizer.ggml.pre", pre);
	w_kv_strs(&w, "tokenizer.ggml.tokens", tokens, 6);
	w_kv_i32s(&w, "tokenizer.ggml.token_type", types, 6);
	w_kv_strs(&w, "tokenizer.ggml.merges", merges, 1);
	return w_finish(&w, name);
}

Test(tokenizer_refusals, merges_by_rank_and_ignore_merges)
{
	/* Only listed merges apply, even where the concatenation is a token: "abc" is a, bc. */
	struct skv_tokenizer *t = load_path(small_vocab("small-gpt2.gguf", "gpt-2"));
	check_ids(t, "abc", false, (const int32_t[]){ 0, 4 }, 2);
	check_ids(t, "ab", false, (const int32_t[]){ 0, 1 }, 2);
	/* No BOS or EOS keys: the flags add nothing. */
	int32_t *ids;
	size_t n;
	cr_assert_eq(skv_tokenizer_encode(t, "c", 1, 1, 1, &ids, &n), 0);
	cr_assert(n == 1 && ids[0] == 2);
	free(ids);
	cr_assert_eq(skv_tokenizer_bos(t), -1);
	cr_assert_eq(skv_tokenizer_eos(t), -1);
	skv_tokenizer_free(t);
	/* Llama 3 takes a word that is a token as it is (llama.cpp's ignore_merges). */
	t = load_path(small_vocab("small-llama3.gguf", "llama-bpe"));
	check_ids(t, "abc", false, (const int32_t[]){ 5 }, 1);
	check_ids(t, "ab", false, (const int32_t[]){ 3 }, 1);
	/* A word that is not a token still merges by rank only (no "a b" merge). */
	check_ids(t, "cab", false, (const int32_t[]){ 2, 0, 1 }, 3);
	skv_tokenizer_free(t);
}

struct encode_job {
	const struct skv_tokenizer *t;
	const char *text;
	size_t len;
	int32_t *ids;
	size_t n;
	int rc;
};

static void *encode_thread(void *arg)
{
	struct encode_job *job = arg;
	job->rc = skv_tokenizer_encode_special(job->t, job->text, job->len, 1, 0, &job->ids,
					       &job->n);
	return NULL;
}

Test(tokenizer_round_trip, concurrent_encodes)
{
	/* One tokenizer, four threads at once: each gets what one thread alone gets. */
	const char *vocabs[] = { "gpt-2", "deepseek-llm", "llama-spm" };
	size_t len;
	char *text = tu_read_file(env_path("SKV_TEXT_DIR", "pg11_alice_in_wonderland.txt"), &len);
	for (size_t v = 0; v < 3; v++) {
		struct skv_tokenizer *t = load_vocab(vocabs[v]);
		struct encode_job alone = { t, text, len, NULL, 0, 0 };
		encode_thread(&alone);
		cr_assert_eq(alone.rc, 0);
		struct encode_job jobs[4];
		pthread_t threads[4];
		for (int i = 0; i < 4; i++) {
			jobs[i] = (struct encode_job){ t, text, len, NULL, 0, 0 };
			cr_assert_eq(pthread_create(&threads[i], NULL, encode_thread, &jobs[i]), 0);
		}
		for (int i = 0; i < 4; i++) {
			cr_assert_eq(pthread_join(threads[i], NULL), 0);
			cr_assert_eq(jobs[i].rc, 0);
			cr_assert_eq(jobs[i].n, alone.n, "%s thread %d", vocabs[v], i);
			cr_assert(memcmp(jobs[i].ids, alone.ids, alone.n * sizeof(*alone.ids)) == 0,
				  "%s thread %d", vocabs[v], i);
			free(jobs[i].ids);
		}
		free(alone.ids);
		skv_tokenizer_free(t);
	}
	free(text);
}

Test(tokenizer_refusals, special_matching)
{
	/* Byte tokens for the letters, user-defined "xy", "xyz", "[A1]".."[A3]", control "[A4]"
	 * and "<c>": leftmost-longest, control ones only when parsed. */
	static const struct skv_gguf_str tokens[] = {
		{ "x", 1 },    { "y", 1 },    { "z", 1 },    { "[", 1 },    { "]", 1 },
		{ "A", 1 },    { "1", 1 },    { "<", 1 },    { ">", 1 },    { "c", 1 },
		{ "xy", 2 },   { "xyz", 3 },  { "[A1]", 4 }, { "[A2]", 4 }, { "[A3]", 4 },
		{ "[A4]", 4 }, { "<c>", 3 },   { "<0x34>", 6 },
	};
	static const int32_t types[] = { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 3, 3, 6 };
	static const struct skv_gguf_str merges[] = { { "x y", 3 } };
	struct gguf_w w;
	w_begin(&w);
	w_kv_str(&w, "tokenizer.ggml.model", "gpt2");
	w_kv_str(&w, "tokenizer.ggml.pre", "gpt-2");
	w_kv_strs(&w, "tokenizer.ggml.tokens", tokens, 18);
	w_kv_i32s(&w, "tokenizer.ggml.token_type", types, 18);
	w_kv_strs(&w, "tokenizer.ggml.merges", merges, 1);
	struct skv_tokenizer *t = load_path(w_finish(&w, "specials.gguf"));
	check_ids(t, "xyzxy", false, (const int32_t[]){ 11, 10 }, 2);
	check_ids(t, "[A2][A3][A1]", false, (const int32_t[]){ 13, 14, 12 }, 3);
	/* [A4] and <c> are control: text unless parsed (and "4", which the vocabulary cannot
	 * spell, is dropped, as llama.cpp drops it). */
	check_ids(t, "[A4]<c>", false, (const int32_t[]){ 3, 5, 4, 7, 9, 8 }, 6);
	check_ids(t, "[A4]<c>", true, (const int32_t[]){ 15, 16 }, 2);
	check_ids(t, "y[A2]x", true, (const int32_t[]){ 1, 13, 0 }, 3);
	/* A byte-type token decodes to its byte; a control token to its text. */
	size_t len;
	const char *piece = skv_tokenizer_decode(t, -1, 17, &len);
	cr_assert(len == 1 && piece[0] == '4');
	piece = skv_tokenizer_decode(t, -1, 16, &len);
	cr_assert(len == 3 && memcmp(piece, "<c>", 3) == 0);
	skv_tokenizer_free(t);
}

Test(tokenizer_round_trip, sentencepiece_word_by_word_is_exact, .timeout = 300)
{
	/* SentencePiece merges word by word when the vocabulary allows it; merging the whole
	 * text at once (llama2.c's way) must give the same ids on every text. */
	struct skv_tokenizer *t = load_vocab("llama-spm");
	cr_assert(t->spm_words, "Llama 2's vocabulary has no space inside a piece");
	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++) {
		size_t len;
		char *text = tu_read_file(env_path("SKV_TEXT_DIR", texts[i]), &len);
		int32_t *words, *whole;
		size_t n_words, n_whole;
		t->spm_words = true;
		cr_assert_eq(skv_tokenizer_encode(t, text, len, 1, 0, &words, &n_words), 0);
		t->spm_words = false;
		cr_assert_eq(skv_tokenizer_encode(t, text, len, 1, 0, &whole, &n_whole), 0);
		cr_assert_eq(n_words, n_whole, "%s", texts[i]);
		cr_assert(memcmp(words, whole, n_whole * sizeof(*whole)) == 0, "%s", texts[i]);
		free(words);
		free(whole);
		free(text);
	}
	skv_tokenizer_free(t);
}
