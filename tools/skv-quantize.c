/* skv-quantize: rewrites a GGUF model's weights in another type, keeping everything else.
 *
 *   skv-quantize --type TYPE [--threads N] [--force] IN.gguf OUT.gguf
 *
 * What llama.cpp's llama-quantize --pure does, for the types streamkv reads: every weight
 * matrix (a tensor of two or more dimensions) becomes TYPE (F32, F16, BF16, Q8_0, Q4_0, Q4_K,
 * Q5_K or Q6_K), by the ggml reference rules (skv_quant_row, engine/quant.h), from the source
 * dequantized to F32 (skv_dequant_row); a matrix already in TYPE is copied byte for byte;
 * 1-D tensors (norms, biases) are copied as they are. A matrix whose rows are not a whole
 * number of TYPE's blocks falls back, and the fallback is printed: to Q8_0 if its rows are
 * whole 32-weight blocks (llama.cpp's fallback for Q6_K; for Q4_K and Q5_K it picks Q5_0 and
 * Q5_1, which streamkv does not read, so Q8_0, with more bits, stands in), else to F16, where
 * llama-quantize refuses the file ("Unsupported tensor size"). That is how stories260K, whose
 * FFN width 172 is not a multiple of 32, gets block-quantized copies to measure perplexity
 * drift on real weights.
 *
 * The metadata is copied entry by entry as the source holds it (skv_gguf_kv_at), except
 * general.file_type (the llama_ftype of TYPE), general.quantization_version (2) and
 * general.alignment (32, written out). The output goes to OUT.tmp, is fsync'ed and renamed
 * (an existing OUT only with --force). Errors are one line on stderr: exit 2 for usage, 1 for
 * the rest (files, a tensor of a type this reader cannot size). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <omp.h>

#include "gguf.h"
#include "quant.h"

#define QZ_EXIT_RUNTIME 1
#define QZ_EXIT_USAGE 2
#define QZ_ALIGNMENT 32u
#define QZ_QUANT_VERSION 2u
#define QZ_ROWS_PER_CHUNK 64u

static char qz_tmp[PATH_MAX];
static int qz_tmp_live;

static void qz_die(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("skv-quantize: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	if (qz_tmp_live)
		unlink(qz_tmp);
	exit(code);
}

static void qz_usage(FILE *f)
{
	fputs("usage: skv-quantize --type TYPE [--threads N] [--force] IN.gguf OUT.gguf\n"
	      "  --type TYPE   F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K or Q6_K: every weight matrix\n"
	      "                (rows that are not whole blocks of TYPE: Q8_0, else F16)\n"
	      "  --threads N   quantizing threads (default: every core)\n"
	      "  --force       replace OUT if it exists\n",
	      f);
}

/* llama_ftype of a file whose matrices are all of one type (llama.cpp's numbering; the K
 * types under their _M names, as --pure files are labelled). */
static uint32_t qz_file_type(uint32_t type)
{
	switch (type) {
	case SKV_WTYPE_F32: return 0;
	case SKV_WTYPE_F16: return 1;
	case SKV_WTYPE_Q4_0: return 2;
	case SKV_WTYPE_Q8_0: return 7;
	case SKV_WTYPE_Q4_K: return 15;
	case SKV_WTYPE_Q5_K: return 17;
	case SKV_WTYPE_Q6_K: return 18;
	case SKV_WTYPE_BF16: return 32;
	}
	return 0;
}

/* The output, through stdio; the first error is fatal. */
struct qz_out {
	FILE *f;
	uint64_t pos;
};

static void qz_put(struct qz_out *o, const void *p, size_t n)
{
	if (n && fwrite(p, 1, n, o->f) != n)
		qz_die(QZ_EXIT_RUNTIME, "%s: write failed: %s", qz_tmp, strerror(errno));
	o->pos += n;
}

static void qz_put_u32(struct qz_out *o, uint32_t v) { qz_put(o, &v, 4); }
static void qz_put_u64(struct qz_out *o, uint64_t v) { qz_put(o, &v, 8); }

static void qz_put_str(struct qz_out *o, const char *s, uint64_t len)
{
	qz_put_u64(o, len);
	qz_put(o, s, (size_t)len);
}

static void qz_pad(struct qz_out *o)
{
	static const uint8_t zero[QZ_ALIGNMENT];
	qz_put(o, zero, (size_t)((QZ_ALIGNMENT - o->pos % QZ_ALIGNMENT) % QZ_ALIGNMENT));
}

static void qz_kv_u32(struct qz_out *o, const char *key, uint32_t v)
{
	qz_put_str(o, key, strlen(key));
	qz_put_u32(o, SKV_GGUF_UINT32);
	qz_put_u32(o, v);
}

/* What one tensor becomes. */
struct qz_tensor {
	const struct skv_gguf_tensor *src;
	uint32_t type;          /* SKV_WTYPE_* (== ggml type) */
	uint64_t rows, cols;    /* cols = dims[0]; rows = the product of the others */
	uint64_t offset, bytes; /* in the output's data section */
};

static int qz_is_key(const struct skv_gguf_str *k, const char *name)
{
	return k->len == strlen(name) && !memcmp(k->ptr, name, k->len);
}

static void qz_plan(const struct skv_gguf *g, uint32_t type, struct qz_tensor *ts)
{
	uint64_t n = skv_gguf_tensor_count(g), offset = 0;
	for (uint64_t i = 0; i < n; i++) {
		const struct skv_gguf_tensor *t = skv_gguf_tensor_at(g, i);
		struct qz_tensor *q = &ts[i];
		q->src = t;
		q->cols = t->dims[0];
		q->rows = 1;
		for (uint32_t d = 1; d < t->n_dims; d++)
			q->rows *= t->dims[d];
		if (!t->data || !skv_wtype_block_elems(t->type))
			qz_die(QZ_EXIT_RUNTIME, "%s: tensor '%.*s' is of type %s, which streamkv does not"
			       " read", skv_gguf_path(g), (int)t->name.len, t->name.ptr,
			       skv_gguf_ggml_type_name(t->type));
		q->type = t->n_dims >= 2 ? type : t->type;
		if (q->cols % skv_wtype_block_elems(q->type)) {
			q->type = q->cols % SKV_QK8_0 ? SKV_WTYPE_F16 : SKV_WTYPE_Q8_0;
			fprintf(stderr, "skv-quantize: %.*s: rows of %" PRIu64 " weights are not whole"
				" %s blocks: %s\n", (int)t->name.len, t->name.ptr, q->cols,
				skv_wtype_name(type), skv_wtype_name(q->type));
		}
		q->bytes = skv_wtype_row_bytes(q->type, q->cols) * q->rows;
		q->offset = offset;
		offset = (offset + q->bytes + QZ_ALIGNMENT - 1) / QZ_ALIGNMENT * QZ_ALIGNMENT;
	}
}

static void qz_header(struct qz_out *o, const struct skv_gguf *g, uint32_t type,
		      const struct qz_tensor *ts)
{
	static const char *const rewritten[] = { "general.file_type", "general.quantization_version",
						 "general.alignment" };
	const uint64_t n_kv = skv_gguf_kv_count(g);
	uint64_t kept = 0;
	for (int pass = 0; pass < 2; pass++) {
		if (pass == 1) {
			qz_put(o, "GGUF", 4);
			qz_put_u32(o, 3);
			qz_put_u64(o, skv_gguf_tensor_count(g));
			qz_put_u64(o, kept + 3);
		}
		kept = 0;
		for (uint64_t i = 0; i < n_kv; i++) {
			struct skv_gguf_str key;
			uint32_t kv_type;
			const void *enc;
			uint64_t enc_len;
			skv_gguf_kv_at(g, i, &key, &kv_type, &enc, &enc_len);
			int skip = 0;
			for (size_t r = 0; r < sizeof(rewritten) / sizeof(rewritten[0]); r++)
				skip |= qz_is_key(&key, rewritten[r]);
			if (skip)
				continue;
			kept++;
			if (pass == 1) {
				qz_put_str(o, key.ptr, key.len);
				qz_put(o, enc, (size_t)enc_len);
			}
		}
	}
	qz_kv_u32(o, "general.alignment", QZ_ALIGNMENT);
	qz_kv_u32(o, "general.file_type", qz_file_type(type));
	qz_kv_u32(o, "general.quantization_version", QZ_QUANT_VERSION);
	for (uint64_t i = 0; i < skv_gguf_tensor_count(g); i++) {
		const struct qz_tensor *q = &ts[i];
		qz_put_str(o, q->src->name.ptr, q->src->name.len);
		qz_put_u32(o, q->src->n_dims);
		for (uint32_t d = 0; d < q->src->n_dims; d++)
			qz_put_u64(o, q->src->dims[d]);
		qz_put_u32(o, q->type);
		qz_put_u64(o, q->offset);
	}
	qz_pad(o);
}

/* One tensor's data: rows dequantized to F32 and quantized again, QZ_ROWS_PER_CHUNK rows per
 * task over the threads; a tensor already of its type is copied. */
static void qz_tensor_data(struct qz_out *o, const struct qz_tensor *q, uint8_t *buf,
			   float *scratch)
{
	const uint64_t src_rb = skv_wtype_row_bytes(q->src->type, q->cols);
	const uint64_t dst_rb = skv_wtype_row_bytes(q->type, q->cols);
	if (q->type == q->src->type) {
		qz_put(o, q->src->data, (size_t)q->bytes);
		return;
	}
	for (uint64_t r0 = 0; r0 < q->rows; r0 += QZ_ROWS_PER_CHUNK) {
		const uint64_t nr = q->rows - r0 < QZ_ROWS_PER_CHUNK ? q->rows - r0 : QZ_ROWS_PER_CHUNK;
		int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
		for (uint64_t r = 0; r < nr; r++) {
			float *x = scratch + (size_t)omp_get_thread_num() * q->cols;
			const uint8_t *src = (const uint8_t *)q->src->data + (r0 + r) * src_rb;
			failed |= skv_dequant_row(q->src->type, src, x, q->cols) < 0;
			if (q->type == SKV_WTYPE_F32)
				memcpy(buf + r * dst_rb, x, (size_t)dst_rb);
			else
				failed |= skv_quant_row(q->type, x, buf + r * dst_rb, q->cols) < 0;
		}
		if (failed)
			qz_die(QZ_EXIT_RUNTIME, "%.*s: cannot convert %s to %s (engine/quant.c)",
			       (int)q->src->name.len, q->src->name.ptr, skv_wtype_name(q->src->type),
			       skv_wtype_name(q->type));
		qz_put(o, buf, (size_t)(nr * dst_rb));
	}
}

int main(int argc, char **argv)
{
	static const struct option longs[] = {
		{ "type", required_argument, NULL, 't' },
		{ "threads", required_argument, NULL, 'j' },
		{ "force", no_argument, NULL, 'f' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *type_name = NULL;
	int threads = 0, force = 0, c;
	while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
		switch (c) {
		case 't': type_name = optarg; break;
		case 'j': {
			char *end;
			errno = 0;
			long v = strtol(optarg, &end, 10);
			if (errno || *end || end == optarg || v < 1 || v > 1024)
				qz_die(QZ_EXIT_USAGE, "--threads: '%s' is not a number from 1 to 1024",
				       optarg);
			threads = (int)v;
			break;
		}
		case 'f': force = 1; break;
		case 'h': qz_usage(stdout); return 0;
		default: qz_usage(stderr); return QZ_EXIT_USAGE;
		}
	}
	if (!type_name)
		qz_die(QZ_EXIT_USAGE, "--type is required (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K or"
		       " Q6_K)");
	uint32_t type;
	if (skv_wtype_parse(type_name, &type) || type == SKV_WTYPE_Q8_K)
		qz_die(QZ_EXIT_USAGE, "--type: '%s' is not F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K or"
		       " Q6_K", type_name);
	if (argc - optind != 2)
		qz_die(QZ_EXIT_USAGE, "give the input and the output file (got %d names)",
		       argc - optind);
	const char *in = argv[optind], *out = argv[optind + 1];

	char msg[512];
	struct skv_gguf *g = NULL;
	if (skv_gguf_open(in, &g, msg, sizeof(msg)) < 0)
		qz_die(QZ_EXIT_RUNTIME, "%s", msg);
	struct stat si, so;
	if (!stat(out, &so) && !stat(in, &si) && si.st_dev == so.st_dev && si.st_ino == so.st_ino)
		qz_die(QZ_EXIT_USAGE, "%s is the input file: write to another name", out);
	if (!force && !access(out, F_OK))
		qz_die(QZ_EXIT_RUNTIME, "%s exists: give --force to replace it", out);

	uint64_t n = skv_gguf_tensor_count(g), max_cols = 0, max_row_bytes = 0;
	struct qz_tensor *ts = calloc(n ? n : 1, sizeof(*ts));
	if (!ts)
		qz_die(QZ_EXIT_RUNTIME, "out of memory for %" PRIu64 " tensors", n);
	qz_plan(g, type, ts);
	for (uint64_t i = 0; i < n; i++) {
		if (ts[i].cols > max_cols)
			max_cols = ts[i].cols;
		uint64_t rb = skv_wtype_row_bytes(ts[i].type, ts[i].cols);
		if (rb > max_row_bytes)
			max_row_bytes = rb;
	}
	omp_set_num_threads(threads ? threads : omp_get_num_procs());
	uint8_t *buf = malloc((size_t)(max_row_bytes * QZ_ROWS_PER_CHUNK) + 1);
	float *scratch = malloc((size_t)(max_cols * (uint64_t)omp_get_max_threads()) * sizeof(float) + 1);
	if (!buf || !scratch)
		qz_die(QZ_EXIT_RUNTIME, "out of memory for rows of %" PRIu64 " weights", max_cols);

	if ((size_t)snprintf(qz_tmp, sizeof(qz_tmp), "%s.tmp", out) >= sizeof(qz_tmp))
		qz_die(QZ_EXIT_USAGE, "the name '%s' is too long", out);
	int fd = open(qz_tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0 && errno == EEXIST && force && !unlink(qz_tmp))
		fd = open(qz_tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		qz_die(QZ_EXIT_RUNTIME, "cannot create %s: %s%s", qz_tmp, strerror(errno),
		       errno == EEXIST ? " (left by a killed run? remove it or give --force)" : "");
	qz_tmp_live = 1;
	struct qz_out o = { .f = fdopen(fd, "wb") };
	if (!o.f)
		qz_die(QZ_EXIT_RUNTIME, "%s: %s", qz_tmp, strerror(errno));

	qz_header(&o, g, type, ts);
	const uint64_t data_start = o.pos;
	for (uint64_t i = 0; i < n; i++) {
		while (o.pos - data_start < ts[i].offset)
			qz_put(&o, "", 1);
		qz_tensor_data(&o, &ts[i], buf, scratch);
	}
	if (fflush(o.f) || fsync(fd) || fclose(o.f))
		qz_die(QZ_EXIT_RUNTIME, "%s: write failed: %s", qz_tmp, strerror(errno));
	if (rename(qz_tmp, out))
		qz_die(QZ_EXIT_RUNTIME, "cannot rename %s to %s: %s", qz_tmp, out, strerror(errno));
	qz_tmp_live = 0;
	printf("wrote %s: %" PRIu64 " tensors, matrices in %s, %" PRIu64 " bytes, from %s\n", out, n,
	       skv_wtype_name(type), o.pos, in);
	free(buf);
	free(scratch);
	free(ts);
	skv_gguf_close(g);
	return 0;
}
