/* skv-bench-tokenizer: encoding time against text size, to show it grows linearly.
 *
 *   skv-bench-tokenizer VOCAB.gguf TEXT [--repeats N]
 *
 * Encodes prefixes of TEXT of 1/8, 1/4, 1/2 and all of its bytes, then two worst cases of the
 * same size as TEXT: one letter repeated (one word of n bytes for the BPE merge heap, n runs of
 * one byte for SentencePiece) and spaces (one pre-tokenizer word). Prints per size the median
 * over --repeats (default 5) of the encode time and its nanoseconds per byte: a flat ns/byte
 * column is linear time. */
#include "gguf.h"
#include "skv-error.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Median encode time of text[0..len) over `repeats` runs; *n_ids gets the token count. */
static int time_encode(const struct skv_tokenizer *t, const char *text, size_t len, int repeats,
		       double *median, size_t *n_ids)
{
	double *times = malloc((size_t)repeats * sizeof(*times));
	if (!times)
		return -ENOMEM;
	for (int r = 0; r < repeats; r++) {
		int32_t *ids;
		double start = now_seconds();
		int rc = skv_tokenizer_encode(t, text, len, 0, 0, &ids, n_ids);
		times[r] = now_seconds() - start;
		if (rc < 0) {
			free(times);
			return rc;
		}
		free(ids);
	}
	qsort(times, (size_t)repeats, sizeof(*times), cmp_double);
	*median = times[repeats / 2];
	free(times);
	return 0;
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	char *buf = NULL;
	if (fseek(f, 0, SEEK_END) == 0) {
		long size = ftell(f);
		if (size >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)size + 1))) {
			*len = fread(buf, 1, (size_t)size, f);
			if (*len != (size_t)size) {
				free(buf);
				buf = NULL;
			}
		}
	}
	fclose(f);
	return buf;
}

int main(int argc, char **argv)
{
	int repeats = 5;
	const char *vocab_path = NULL, *text_path = NULL;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
			repeats = atoi(argv[++i]);
			if (repeats < 1) {
				fprintf(stderr, "skv-bench-tokenizer: --repeats needs a count >= 1\n");
				return 2;
			}
		} else if (!vocab_path) {
			vocab_path = argv[i];
		} else if (!text_path) {
			text_path = argv[i];
		} else {
			fprintf(stderr, "usage: skv-bench-tokenizer VOCAB.gguf TEXT [--repeats N]\n");
			return 2;
		}
	}
	if (!vocab_path || !text_path) {
		fprintf(stderr, "usage: skv-bench-tokenizer VOCAB.gguf TEXT [--repeats N]\n");
		return 2;
	}

	char msg[512] = "";
	struct skv_gguf *g = NULL;
	if (skv_gguf_open(vocab_path, &g, msg, sizeof(msg)) < 0) {
		fprintf(stderr, "skv-bench-tokenizer: %s\n", msg);
		return 1;
	}
	struct skv_gguf_str *tokens;
	uint64_t n_tokens;
	if (skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &n_tokens) < 0) {
		fprintf(stderr, "skv-bench-tokenizer: %s: no tokenizer.ggml.tokens\n", vocab_path);
		return 1;
	}
	free(tokens);
	struct skv_tokenizer *t = NULL;
	if (skv_tokenizer_from_gguf(g, (int32_t)n_tokens, &t, msg, sizeof(msg)) < 0) {
		fprintf(stderr, "skv-bench-tokenizer: %s\n", msg);
		return 1;
	}
	skv_gguf_close(g);

	size_t len;
	char *text = read_file(text_path, &len);
	if (!text) {
		fprintf(stderr, "skv-bench-tokenizer: %s: cannot read the text\n", text_path);
		return 1;
	}
	printf("vocabulary %s (%s%s%s), text %s, median of %d\n", vocab_path,
	       skv_tokenizer_kind(t), *skv_tokenizer_pre(t) ? " " : "", skv_tokenizer_pre(t),
	       text_path, repeats);
	printf("%-12s %10s %10s %10s %8s\n", "input", "bytes", "tokens", "ms", "ns/byte");
	for (int shift = 3; shift >= 0; shift--) {
		size_t n = len >> shift;
		double seconds;
		size_t n_ids;
		if (time_encode(t, text, n, repeats, &seconds, &n_ids) < 0)
			return 1;
		printf("%-12s %10zu %10zu %10.2f %8.1f\n", shift ? "text prefix" : "text", n, n_ids,
		       seconds * 1e3, seconds * 1e9 / (double)n);
	}
	const char fills[] = { 'a', ' ' };
	const char *names[] = { "'a' x n", "' ' x n" };
	for (int f = 0; f < 2; f++) {
		memset(text, fills[f], len);
		for (int shift = 1; shift >= 0; shift--) {
			size_t n = len >> shift;
			double seconds;
			size_t n_ids;
			if (time_encode(t, text, n, repeats, &seconds, &n_ids) < 0)
				return 1;
			printf("%-12s %10zu %10zu %10.2f %8.1f\n", names[f], n, n_ids, seconds * 1e3,
			       seconds * 1e9 / (double)n);
		}
	}
	free(text);
	skv_tokenizer_free(t);
	return 0;
}
