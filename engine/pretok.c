/* Pre-tokenizers of byte-level BPE vocabularies: the regex sets llama.cpp names in
 * tokenizer.ggml.pre, compiled with PCRE2 (UTF, UCP, invalid UTF-8 tolerated, JIT when the
 * library has it). The contract is in tokenizer-pvt.h.
 *
 * A set is applied as llama.cpp's unicode_regex_split() does: every regex in turn splits each
 * word of the previous pass into its matches and the text between them, so a later regex never
 * sees across a boundary an earlier one drew. Each word is matched as a subject of its own, so
 * `$` and `(?!\S)` see the end of the word, not the text after it. */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "tokenizer-pvt.h"

#include <errno.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

#define PRETOK_MAX_REGEXES 6

/* GPT-2's pattern as llama.cpp writes it: without the final "|\s+" of the original, which
 * changes nothing because unmatched text becomes a word anyway. */
#define PRETOK_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"

/* Llama 3's pattern with its (?i:'s|...) spelt as explicit case pairs, as llama.cpp adapts
 * it: under UCP a caseless 's' would also match U+017F and 'k' U+212A, which the original
 * (matched by the Hugging Face tokenizers' onig) does not. */
#define PRETOK_CONTRACTIONS "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define PRETOK_LLAMA3 PRETOK_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" \
	"| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define PRETOK_QWEN2 PRETOK_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" \
	"| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* DeepSeek LLM's letters: the cased letters of Unicode (categories Lu, Ll, Lt) as code point
 * ranges. */
#define PRETOK_DEEPSEEK_LETTERS "\\s?[A-Za-z\\x{b5}\\x{c0}-\\x{d6}\\x{d8}-\\x{f6}\\x{f8}-\\x{1ba}" \
	"\\x{1bc}-\\x{1bf}\\x{1c4}-\\x{293}\\x{295}-\\x{2af}\\x{370}-\\x{373}\\x{376}\\x{377}" \
	"\\x{37b}-\\x{37d}\\x{37f}\\x{386}\\x{388}-\\x{38a}\\x{38c}\\x{38e}-\\x{3a1}" \
	"\\x{3a3}-\\x{3f5}\\x{3f7}-\\x{481}\\x{48a}-\\x{52f}\\x{531}-\\x{556}\\x{10a0}-\\x{10c5}" \
	"\\x{13a0}-\\x{13f5}\\x{13f8}-\\x{13fd}\\x{1c90}-\\x{1cba}\\x{1cbd}-\\x{1cbf}" \
	"\\x{1d00}-\\x{1d2b}\\x{1d6b}-\\x{1d77}\\x{1d79}-\\x{1d9a}\\x{1e00}-\\x{1f15}" \
	"\\x{1f18}-\\x{1f1d}\\x{1f20}-\\x{1f45}\\x{1f48}-\\x{1f4d}\\x{1f50}-\\x{1f57}\\x{1f59}" \
	"\\x{1f5b}\\x{1f5d}\\x{1f5f}-\\x{1f7d}\\x{1f80}-\\x{1fb4}\\x{1fb6}-\\x{1fbc}\\x{1fbe}" \
	"\\x{1fc2}-\\x{1fc4}\\x{1fc6}-\\x{1fcc}\\x{1fd0}-\\x{1fd3}\\x{1fd6}-\\x{1fdb}" \
	"\\x{1fe0}-\\x{1fec}\\x{1ff2}-\\x{1ff4}\\x{1ff6}-\\x{1ffc}\\x{2102}\\x{2107}" \
	"\\x{210a}-\\x{2113}\\x{2115}\\x{2119}-\\x{211d}\\x{2124}\\x{2126}\\x{2128}" \
	"\\x{212a}-\\x{212d}\\x{212f}-\\x{2134}\\x{2139}\\x{213c}-\\x{213f}\\x{2145}-\\x{2149}" \
	"\\x{214e}\\x{2183}\\x{2184}\\x{2c00}-\\x{2c7b}\\x{2c7e}-\\x{2ce4}\\x{2ceb}-\\x{2cee}" \
	"\\x{2cf2}\\x{2cf3}\\x{a640}-\\x{a66d}\\x{a680}-\\x{a69b}\\x{a722}-\\x{a76f}" \
	"\\x{a771}-\\x{a787}\\x{a78b}-\\x{a78e}\\x{ab70}-\\x{abbf}\\x{fb00}-\\x{fb06}" \
	"\\x{fb13}-\\x{fb17}\\x{ff21}-\\x{ff3a}\\x{ff41}-\\x{ff5a}\\x{10400}-\\x{1044f}" \
	"\\x{104b0}-\\x{104d3}\\x{104d8}-\\x{104fb}\\x{10c80}-\\x{10cb2}\\x{10cc0}-\\x{10cf2}" \
	"\\x{118a0}-\\x{118df}\\x{1e900}-\\x{1e943}]+"
#define PRETOK_DEEPSEEK_PUNCT "\\s?[!-/:-~\\x{ff01}-\\x{ff0f}\\x{ff1a}-\\x{ff5e}" \
	"\\x{2018}-\\x{201f}\\x{3000}-\\x{3002}]+"
#define PRETOK_DEEPSEEK_CJK "[\\x{4e00}-\\x{9fa5}\\x{800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+"

struct pretok_set {
	const char *names[4]; /* tokenizer.ggml.pre values, NULL-terminated */
	const char *regexes[PRETOK_MAX_REGEXES];
	bool ignore_merges;
	bool add_bos;
};

static const struct pretok_set pretok_sets[] = {
	{ { "gpt-2", "phi-2" }, { PRETOK_GPT2 }, false, false },
	{ { "mpt" }, { PRETOK_GPT2 }, false, false },
	/* Pythia and OLMo share the GPT-NeoX tokenizer; llama.cpp calls it "olmo". */
	{ { "olmo", "gpt-neox" }, { PRETOK_GPT2 }, false, false },
	{ { "llama-bpe", "llama3", "llama-v3" }, { PRETOK_LLAMA3 }, true, true },
	{ { "qwen2", "stablelm2" }, { PRETOK_QWEN2 }, false, false },
	/* Llama 3's regex without its whole-word tokens and BOS. */
	{ { "dbrx", "smaug-bpe" }, { PRETOK_LLAMA3 }, false, false },
	{ { "falcon" }, { "[\\p{P}\\$\\+<=>\\^~\\|`]+", PRETOK_GPT2, "[0-9][0-9][0-9]" },
	  false, false },
	{ { "starcoder" }, { "\\p{N}", PRETOK_GPT2 }, false, false },
	{ { "deepseek-llm" },
	  { "[\\r\\n]", PRETOK_DEEPSEEK_LETTERS, PRETOK_DEEPSEEK_PUNCT, "\\s+$",
	    PRETOK_DEEPSEEK_CJK, "\\p{N}+" },
	  false, false },
	{ { "deepseek-coder" },
	  { "[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", PRETOK_DEEPSEEK_CJK, "\\p{N}" },
	  false, false },
	/* llama.cpp's fallback set, for files that name it ("default"); a file that names
	 * nothing is refused instead. */
	{ { "default" },
	  { "[\\p{P}\\$\\+<=>\\^~\\|]+", PRETOK_GPT2, "\\p{N}+", "[0-9][0-9][0-9]" },
	  false, false },
};

#define PRETOK_N_SETS (sizeof(pretok_sets) / sizeof(pretok_sets[0]))

struct pretok {
	const struct pretok_set *set;
	const char *name; /* the name it was asked for */
	pcre2_code *codes[PRETOK_MAX_REGEXES];
	size_t n_codes;
	uint32_t max_ovector_pairs;
};

const char *pretok_known_names(void)
{
	return "gpt-2 (phi-2), mpt, olmo (gpt-neox), llama-bpe (llama3, llama-v3), qwen2 "
	       "(stablelm2), dbrx (smaug-bpe), falcon, starcoder, deepseek-llm, deepseek-coder, "
	       "default";
}

const char *pretok_known(size_t index)
{
	for (size_t s = 0; s < PRETOK_N_SETS; s++)
		for (size_t n = 0; n < 4 && pretok_sets[s].names[n]; n++)
			if (index-- == 0)
				return pretok_sets[s].names[n];
	return NULL;
}

void pretok_free(struct pretok *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->n_codes; i++)
		pcre2_code_free(p->codes[i]);
	free(p);
}

int pretok_new(const char *name, size_t name_len, struct pretok **out)
{
	const struct pretok_set *set = NULL;
	const char *matched = NULL;

	*out = NULL;
	for (size_t s = 0; s < PRETOK_N_SETS && !set; s++)
		for (size_t n = 0; n < 4 && pretok_sets[s].names[n]; n++)
			if (strlen(pretok_sets[s].names[n]) == name_len &&
			    memcmp(pretok_sets[s].names[n], name, name_len) == 0) {
				set = &pretok_sets[s];
				matched = set->names[n];
				break;
			}
	if (!set)
		return -ENOENT;
	struct pretok *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->set = set;
	p->name = matched;
	/* Invalid UTF-8 in a prompt is the user's bytes, not an error: MATCH_INVALID_UTF lets
	 * such bytes sit between matches. DOLLAR_ENDONLY makes `$` the end of the word only,
	 * as in the ECMAScript regexes llama.cpp runs. */
	uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | PCRE2_DOLLAR_ENDONLY;
	for (size_t i = 0; i < PRETOK_MAX_REGEXES && set->regexes[i]; i++) {
		int code_err;
		PCRE2_SIZE err_offset;
		pcre2_code *code = pcre2_compile((PCRE2_SPTR)set->regexes[i], PCRE2_ZERO_TERMINATED,
						 options, &code_err, &err_offset, NULL);
		if (!code) {
			pretok_free(p);
			return code_err == PCRE2_ERROR_NOMEMORY ? -ENOMEM : -EINVAL;
		}
		/* Without JIT support pcre2_match() interprets the same code. */
		(void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
		p->codes[p->n_codes++] = code;
		uint32_t captures = 0;
		pcre2_pattern_info(code, PCRE2_INFO_CAPTURECOUNT, &captures);
		if (captures + 1 > p->max_ovector_pairs)
			p->max_ovector_pairs = captures + 1;
	}
	*out = p;
	return 0;
}

const char *pretok_name(const struct pretok *p)
{
	return p->name;
}

bool pretok_ignore_merges(const struct pretok *p)
{
	return p->set->ignore_merges;
}

bool pretok_add_bos(const struct pretok *p)
{
	return p->set->add_bos;
}

static int pretok_push(struct pretok_spans *spans, size_t offset, size_t len)
{
	if (spans->count == spans->cap) {
		size_t cap = spans->cap ? 2 * spans->cap : 64;
		struct pretok_span *grown = realloc(spans->items, cap * sizeof(*grown));
		if (!grown)
			return -ENOMEM;
		spans->items = grown;
		spans->cap = cap;
	}
	spans->items[spans->count].offset = offset;
	spans->items[spans->count].len = len;
	spans->count++;
	return 0;
}

/* One match from `start` in subject[0..len): 1 with [*begin, *end), 0 for none, or -errno.
 * A JIT stack overflow (a very long run of one class) is retried by the interpreter, whose
 * backtracking lives on the heap. */
static int pretok_match(const pcre2_code *code, const char *subject, size_t len, size_t start,
			pcre2_match_data *md, size_t *begin, size_t *end)
{
	int rc = pcre2_match(code, (PCRE2_SPTR)subject, len, start, 0, md, NULL);
	if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
		rc = pcre2_match(code, (PCRE2_SPTR)subject, len, start, PCRE2_NO_JIT, md, NULL);
	if (rc == PCRE2_ERROR_NOMATCH)
		return 0;
	if (rc == PCRE2_ERROR_NOMEMORY || rc == PCRE2_ERROR_HEAPLIMIT)
		return -ENOMEM;
	if (rc < 0)
		return -EINVAL;
	const PCRE2_SIZE *ovector = pcre2_get_ovector_pointer(md);
	*begin = ovector[0];
	*end = ovector[1];
	return 1;
}

/* Split the word text[offset..offset+len) by one regex, appending to *next. */
static int pretok_split_word(const pcre2_code *code, pcre2_match_data *md, const char *text,
			     size_t offset, size_t len, struct pretok_spans *next)
{
	const char *subject = text + offset;
	size_t start = 0, done = 0;
	int rc;

	while (start < len) {
		size_t begin, end;
		rc = pretok_match(code, subject, len, start, md, &begin, &end);
		if (rc < 0)
			return rc;
		if (rc == 0)
			break;
		if (end == begin) {
			/* None of the sets matches empty; step over a character if one ever does. */
			start = begin + 1;
			while (start < len && ((unsigned char)subject[start] & 0xc0) == 0x80)
				start++;
			continue;
		}
		if (begin > done && (rc = pretok_push(next, offset + done, begin - done)) < 0)
			return rc;
		if ((rc = pretok_push(next, offset + begin, end - begin)) < 0)
			return rc;
		done = start = end;
	}
	if (done < len && (rc = pretok_push(next, offset + done, len - done)) < 0)
		return rc;
	return 0;
}

int pretok_split(const struct pretok *p, const char *text, size_t len,
		 struct pretok_spans *spans)
{
	struct pretok_spans next = { 0 };
	int rc = 0;

	spans->count = 0;
	if (len == 0)
		return 0;
	if ((rc = pretok_push(spans, 0, len)) < 0)
		return rc;
	pcre2_match_data *md = pcre2_match_data_create(p->max_ovector_pairs, NULL);
	if (!md)
		return -ENOMEM;
	for (size_t r = 0; r < p->n_codes; r++) {
		next.count = 0;
		for (size_t w = 0; w < spans->count; w++) {
			rc = pretok_split_word(p->codes[r], md, text, spans->items[w].offset,
					       spans->items[w].len, &next);
			if (rc < 0)
				goto out;
		}
		struct pretok_spans swap = *spans;
		*spans = next;
		next = swap;
	}
out:
	free(next.items);
	pcre2_match_data_free(md);
	return rc;
}
