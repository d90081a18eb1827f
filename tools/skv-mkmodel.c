/* skv-mkmodel: writes a GGUF v3 model of Llama architecture with random weights at a chosen
 * shape and weight type, so that speed and memory can be measured where matmuls and attention
 * have the sizes and the formats of real models (TinyLlama-1.1B, Llama-2-7B, Llama-3-8B in
 * F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K or llama.cpp's Q4_K_M / Q5_K_M mixes). The
 * weights are noise: such a model is for speed and memory figures only, never for quality.
 *
 *   skv-mkmodel --shape NAME [--layers L ...] [--type TYPE] [--threads N] -o OUT.gguf
 *   skv-mkmodel --dim D --hidden H --layers L --heads N [--kv-heads K] --vocab V --seq-len S
 *               -o OUT.gguf
 *
 * The file is what engine/gguf.c reads: GGUF v3, general.alignment 32, architecture llama
 * (--arch: qwen2, gptneox, falcon or mpt, each with its metadata prefix and tensor layout as
 * llama.cpp's converter writes it), tensors under llama.cpp's names, and a vocabulary in
 * tokenizer.ggml.{tokens,scores,token_type} converted from a llama2.c tokenizer file (the
 * inverse of what engine/tokenizer.c does when it reads a GGUF vocabulary), generated
 * byte-level, or copied from a vocabulary GGUF (--vocab-file: models/vocab's byte-level BPE
 * ones with their merges and pre-tokenizer). Biases are drawn like weights; norm weights are 1.
 *
 * Weights: every matrix [rows][cols] is drawn with standard deviation 1/sqrt(cols) (its fan-in),
 * so that each matmul keeps its input's scale and activations stay O(1) through any number of
 * layers; RMSNorm weights are 1. Each tensor has its own generator (splitmix64 seeded from
 * --seed and the tensor's name); splitmix64's state advances by a constant, so weight i of a
 * tensor is a function of the seed, the name and i alone: any range of weights is drawn
 * independently of the others, in parallel, and a file depends only on its flags (not on
 * --threads), and a model with fewer layers holds the same first layers as one with more.
 *
 * Types: the F32 values are converted (F16, BF16) or quantized by the ggml reference rules
 * (skv_quant_row, engine/quant.h) block by block, over all threads (OpenMP). Which type each
 * tensor gets is decided as llama.cpp's llama_tensor_get_type decides it for the same file type
 * (mk_tensor_wtype); 1-D norm weights stay F32 as llama.cpp leaves them.
 *
 * The file is streamed through a 4 MiB buffer (a 7B model is 27 GB in F32), into OUT.tmp,
 * which is fallocate'd first (a full disk fails at once, not after minutes), fsync'ed, then
 * renamed to OUT. A failure or a signal removes OUT.tmp. Errors are one line on stderr: exit 2
 * for usage (flags, shapes), 1 for the rest (files, disk). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <omp.h>

#include "gguf.h"
#include "kv-layout.h"
#include "quant.h"
#include "skv-error.h"
#include "tokenizer.h"

#ifndef SKV_MODELS_DIR
#define SKV_MODELS_DIR "models"
#endif

#define MK_EXIT_RUNTIME 1
#define MK_EXIT_USAGE 2

#define MK_ALIGNMENT 32u               /* general.alignment: the GGUF default, written out */
#define MK_NORM_EPS 1e-5f              /* Llama 2's RMSNorm epsilon */
#define MK_ROPE_THETA 10000.0f         /* Llama 2's RoPE base */
#define MK_ROPE_THETA_LLAMA3 500000.0f /* Llama 3's */
#define MK_MAX_HEAD_SIZE 512           /* 2 * SKV_ROPE_MAX_PAIRS (engine/attention.h) */
#define MK_BUF_BYTES (4u << 20)        /* the write buffer */
#define MK_NAME_MAX 64                 /* GGUF's limit on tensor names */
#define MK_MAX_LAYERS 65536            /* keeps the tensor table small; real models have < 200 */
#define MK_MAX_THREADS 1024
/* What one thread draws and converts at a time: 16 KiB of floats, a whole number of blocks of
 * every type (1, 32 and 256 weights). */
#define MK_PIECE_ELEMS 4096u
#define MK_QUANT_VERSION 2u            /* general.quantization_version: ggml's GGML_QNT_VERSION */

/* Vocabularies: ids 0, 1, 2 are <unk>, BOS, EOS (engine/tokenizer.h); a byte-level vocabulary
 * adds the 256 byte tokens <0xXX> at ids 3..258, where llama2.c's byte fallback looks. */
#define MK_SPECIAL_TOKENS 3
#define MK_BYTE_VOCAB (MK_SPECIAL_TOKENS + 256)
#define MK_LLAMA2_VOCAB 32000
#define MK_STORIES_VOCAB 512
#define MK_LLAMA2_TOKENIZER "llama2-tokenizer/tokenizer.bin"
#define MK_STORIES_TOKENIZER "stories260K/tok512.bin"

/* GGUF token types, llama.cpp's numbering (engine/tokenizer.c reads CONTROL). */
#define MK_TOKEN_NORMAL 1
#define MK_TOKEN_UNKNOWN 2
#define MK_TOKEN_CONTROL 3
#define MK_TOKEN_BYTE 6
#define MK_SPM_SPACE "\xe2\x96\x81" /* U+2581, SentencePiece's word-boundary mark */

struct mk_shape {
	const char *name;   /* preset name, or "custom" */
	int64_t dim;
	int64_t hidden;
	int64_t layers;
	int64_t heads;
	int64_t kv_heads;
	int64_t vocab;
	int64_t seq_len;
	int tied;           /* 1: no output.weight, the classifier is the embedding */
	float rope_theta;
	int arch;           /* MK_ARCH_*: the GGUF architecture written */
	int rope_llama3;    /* 1: Llama 3.1's llama3 rope scaling (factor 8, 1, 4, 8192) */
};

/* The architectures written: general.architecture and the metadata prefix. */
enum {
	MK_ARCH_LLAMA = 0,
	MK_ARCH_QWEN2 = 1,
	MK_ARCH_GPTNEOX = 2,
	MK_ARCH_FALCON = 3,
	MK_ARCH_MPT = 4,
};
static const char *const mk_arch_names[] = { "llama", "qwen2", "gptneox", "falcon", "mpt" };
#define MK_MPT_ALIBI_MAX_BIAS 8.0f /* MPT-7B's attn_config.alibi_bias_max */

static const struct mk_shape mk_presets[] = {
	/* TinyLlama-1.1B (Llama 2 architecture, grouped-query attention: 4 KV heads of 32). */
	{ "llama-1b", 2048, 5632, 22, 32, 4, MK_LLAMA2_VOCAB, 2048, 0, MK_ROPE_THETA,
	  MK_ARCH_LLAMA, 0 },
	/* Llama-2-7B. */
	{ "llama-7b", 4096, 11008, 32, 32, 32, MK_LLAMA2_VOCAB, 4096, 0, MK_ROPE_THETA,
	  MK_ARCH_LLAMA, 0 },
	/* Llama-3-8B's matrices and attention (8 KV heads of 32, RoPE base 500000), but Llama 2's
	 * vocabulary of 32000 instead of Llama 3's 128256: streamkv has no byte-level BPE
	 * tokenizer yet, and a model has to be usable with the tokenizer it ships. */
	{ "llama-8b", 4096, 14336, 32, 32, 8, MK_LLAMA2_VOCAB, 8192, 0, MK_ROPE_THETA_LLAMA3,
	  MK_ARCH_LLAMA, 0 },
	/* The shipped model (models/stories260K): its llama2.c header, tied classifier. */
	{ "stories260k", 64, 172, 5, 8, 4, MK_STORIES_VOCAB, 512, 1, MK_ROPE_THETA,
	  MK_ARCH_LLAMA, 0 },
	/* Llama-3.1-8B's matrices, RoPE base and llama3 rope scaling, vocabulary of 128256. */
	{ "llama-3-8b", 4096, 14336, 32, 32, 8, 128256, 131072, 0, MK_ROPE_THETA_LLAMA3,
	  MK_ARCH_LLAMA, 1 },
	/* Qwen2-0.5B: biases on q, k, v, 2 KV heads of 14, tied classifier, RoPE base 1e6. */
	{ "qwen2-0.5b", 896, 4864, 24, 14, 2, 151936, 32768, 1, 1000000.0f, MK_ARCH_QWEN2, 0 },
	/* Pythia-160M (gptneox): rotary on a quarter of each head of 64, parallel residual. */
	{ "pythia-160m", 768, 3072, 12, 12, 12, 50304, 2048, 0, MK_ROPE_THETA, MK_ARCH_GPTNEOX,
	  0 },
	/* Falcon-7B: multi-query attention (one KV head of 64 for 71 query heads). */
	{ "falcon-7b", 4544, 18176, 32, 71, 1, 65024, 2048, 0, MK_ROPE_THETA, MK_ARCH_FALCON, 0 },
	/* MPT-7B: ALiBi (max bias 8), LayerNorm and linears without biases, tied classifier,
	 * vocabulary padded to 50432. */
	{ "mpt-7b", 4096, 16384, 32, 32, 32, 50432, 2048, 1, MK_ROPE_THETA, MK_ARCH_MPT, 0 },
};

/* The --type choices: a ggml type for every 2-D weight, or one of llama.cpp's mixes, and the
 * general.file_type (llama.cpp's enum llama_ftype) llama.cpp writes for it. A single K-quant
 * type is what `llama-quantize --pure` makes: Q4_K and Q5_K are llama-quantize's aliases of
 * Q4_K_M and Q5_K_M, so their files say 15 and 17 as the mixes do. Q4_0 is pure too (without
 * --pure, llama-quantize would make output.weight Q6_K). */
struct mk_type {
	const char *name;
	uint32_t base;        /* SKV_WTYPE_*: the type of the 2-D weights the mix does not raise */
	uint32_t file_type;   /* llama_ftype */
	int mix;              /* 1: llama.cpp's _M mix (mk_tensor_wtype) */
};

static const struct mk_type mk_types[] = {
	{ "F32", SKV_WTYPE_F32, 0, 0 },     /* LLAMA_FTYPE_ALL_F32 */
	{ "F16", SKV_WTYPE_F16, 1, 0 },     /* LLAMA_FTYPE_MOSTLY_F16 */
	{ "BF16", SKV_WTYPE_BF16, 32, 0 },  /* LLAMA_FTYPE_MOSTLY_BF16 */
	{ "Q8_0", SKV_WTYPE_Q8_0, 7, 0 },   /* LLAMA_FTYPE_MOSTLY_Q8_0 */
	{ "Q4_0", SKV_WTYPE_Q4_0, 2, 0 },   /* LLAMA_FTYPE_MOSTLY_Q4_0 */
	{ "Q4_K", SKV_WTYPE_Q4_K, 15, 0 },  /* LLAMA_FTYPE_MOSTLY_Q4_K_M, --pure */
	{ "Q5_K", SKV_WTYPE_Q5_K, 17, 0 },  /* LLAMA_FTYPE_MOSTLY_Q5_K_M, --pure */
	{ "Q6_K", SKV_WTYPE_Q6_K, 18, 0 },  /* LLAMA_FTYPE_MOSTLY_Q6_K */
	{ "Q4_K_M", SKV_WTYPE_Q4_K, 15, 1 },
	{ "Q5_K_M", SKV_WTYPE_Q5_K, 17, 1 },
};
#define MK_TYPE_NAMES "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, Q4_K_M or Q5_K_M"

struct mk_opts {
	struct mk_shape shape;    /* fields -1 until given */
	const char *preset;
	uint64_t seed;
	const char *tokenizer;    /* NULL: the default for the vocabulary size; "bytes" */
	const char *out;
	const struct mk_type *type;
	int threads;
	int force;
	int dry_run;
	int arch;                 /* -1 until given */
	const char *vocab_file;   /* a GGUF whose tokenizer.* keys the model gets */
	int rope_llama3;          /* -1 until given */
	float clamp_kqv;          /* mpt: attention.clamp_kqv, 0: none */
};

/* The vocabulary as GGUF stores it: pieces with U+2581 for spaces, <s>/</s> bare. */
struct mk_vocab {
	int32_t n;
	char *bytes;          /* every piece, back to back */
	uint64_t *offset;     /* [n + 1]: piece i is bytes[offset[i] .. offset[i+1]) */
	float *scores;        /* [n] */
	int32_t *types;       /* [n] GGUF token types */
	char source[PATH_MAX + 32];
	struct skv_gguf *gguf; /* --vocab-file: its tokenizer.* keys are copied as they are */
};

enum mk_init {
	MK_INIT_ONES,         /* RMSNorm weights */
	MK_INIT_RANDOM,       /* std 1/sqrt(dims[0]) */
};

/* What a tensor is to llama.cpp's choice of its type. */
enum mk_role {
	MK_ROLE_NORM,
	MK_ROLE_TOKEN_EMBD,
	MK_ROLE_OUTPUT,
	MK_ROLE_ATTN_Q,
	MK_ROLE_ATTN_K,
	MK_ROLE_ATTN_V,
	MK_ROLE_ATTN_OUTPUT,
	MK_ROLE_FFN_GATE,
	MK_ROLE_FFN_UP,
	MK_ROLE_FFN_DOWN,
	MK_ROLE_BIAS,
};

struct mk_tensor {
	char name[MK_NAME_MAX + 1];
	uint32_t n_dims;
	uint64_t dims[2];     /* ggml order: dims[0] is the row length (fan-in) */
	enum mk_init init;
	enum mk_role role;
	int64_t layer;        /* -1 outside the blocks */
	uint32_t type;        /* SKV_WTYPE_* */
	uint64_t offset;      /* from the start of the data section, aligned */
	uint64_t bytes;
};

struct mk_plan {
	struct mk_shape shape;
	const struct mk_type *type;
	uint64_t seed;
	float clamp_kqv;        /* mpt: written when > 0 */
	const struct mk_vocab *vocab;
	struct mk_tensor *tensors;
	uint64_t n_tensors;
	uint64_t n_kv;          /* metadata entries, counted by the first pass */
	uint64_t data_offset;   /* file offset of the data section */
	uint64_t file_bytes;
	uint64_t params;
};

/* A sequential writer. With fd < 0 it only counts, so the same code that writes the header
 * also measures it. The first error sticks; later calls do nothing. */
struct mk_writer {
	int fd;
	uint8_t *buf;
	size_t len;
	uint64_t pos;           /* bytes emitted so far (file offset) */
	uint64_t kv_count;      /* metadata entries emitted */
	int err;                /* 0 or -errno of the first failed write */
	uint64_t total;         /* for the progress line; 0: none */
	uint64_t shown;         /* progress shown up to here */
};

/* OUT.tmp while it exists and is ours: a signal handler removes it (unlink is
 * async-signal-safe). */
static char mk_tmp_path[PATH_MAX];
static volatile sig_atomic_t mk_tmp_live;

static void mk_die(int code, const char *fmt, ...)
{
	va_list ap;

	if (mk_tmp_live)
		unlink(mk_tmp_path);
	fputs("skv-mkmodel: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

static void mk_on_signal(int sig)
{
	if (mk_tmp_live)
		unlink(mk_tmp_path);
	signal(sig, SIG_DFL);
	raise(sig);
}

static void mk_usage(FILE *out)
{
	fputs("usage: skv-mkmodel --shape NAME [shape flags to override it] [flags] -o OUT.gguf\n"
	      "       skv-mkmodel --dim D --hidden H --layers L --heads N [--kv-heads K]\n"
	      "                   --vocab V --seq-len S [flags] -o OUT.gguf\n"
	      "Writes a GGUF model of Llama architecture with random weights, for speed and memory\n"
	      "measurements only (its output is noise).\n"
	      "  --shape NAME        llama-1b (TinyLlama-1.1B: 4 KV heads of 32), llama-7b\n"
	      "                      (Llama-2-7B), llama-8b (Llama-3-8B: 8 KV heads of 32, RoPE\n"
	      "                      base 500000, but Llama 2's vocabulary of 32000 tokens: streamkv\n"
	      "                      has no byte-level BPE tokenizer for Llama 3's yet), stories260k,\n"
	      "                      llama-3-8b (Llama-3.1-8B, llama3 rope scaling), qwen2-0.5b,\n"
	      "                      pythia-160m (gptneox), falcon-7b, mpt-7b\n"
	      "  --dim, --hidden, --layers, --heads, --kv-heads (default: heads), --vocab,\n"
	      "  --seq-len           the shape; with --shape, each one given overrides the preset\n"
	      "  --type TYPE         weight type (default F32): F32, F16, BF16, Q8_0, Q4_0, Q4_K,\n"
	      "                      Q5_K, Q6_K (every 2-D weight of that type), or Q4_K_M, Q5_K_M\n"
	      "                      (llama.cpp's mixes: some tensors Q6_K); norms stay F32. Block\n"
	      "                      types need --dim and --hidden multiples of 32 (Q8_0, Q4_0) or\n"
	      "                      256 (K-quants)\n"
	      "  --threads N         threads that quantize (default: all cores)\n"
	      "  --classifier KIND   tied (the embedding) or separate (output.weight); default:\n"
	      "                      the preset's, separate for a custom shape\n"
	      "  --tokenizer FILE    llama2.c tokenizer holding exactly --vocab tokens; 'bytes' for a\n"
	      "                      generated byte-level vocabulary (default: models/llama2-tokenizer\n"
	      "                      for 32000, models/stories260K/tok512.bin for 512, else bytes)\n"
	      "  --arch ARCH         llama (default; the presets' own), qwen2 (biases on q, k, v) or\n"
	      "                      gptneox (Pythia: LayerNorm, GELU, fused qkv, rotary on 1/4) or\n"
	      "                      falcon (parallel attention and MLP on one LayerNorm) or mpt\n"
	      "                      (ALiBi with max bias 8, LayerNorm, GELU, fused qkv, no biases)\n"
	      "  --clamp-kqv C       mpt: q, k and v clamped to [-C, C] (MPT's clip_qkv)\n"
	      "  --rope-scaling S    llama3 (Llama 3.1: factor 8, low 1, high 4, context 8192) or\n"
	      "                      none (default; llama-3-8b: llama3)\n"
	      "  --vocab-file FILE   a GGUF vocabulary (models/vocab/ggml-vocab-*.gguf): its\n"
	      "                      tokenizer keys (model, pre, tokens, token_type, merges, scores,\n"
	      "                      special ids) are copied; --vocab becomes its token count\n"
	      "  --seed N            weights' seed (default 1)\n"
	      "  -o, --output OUT    the file to write (through OUT.tmp)\n"
	      "  --force             replace OUT (and a stale OUT.tmp) if it exists\n"
	      "  --dry-run           print what would be written, write nothing\n",
	      out);
}

static int64_t mk_parse_int(const char *flag, const char *text, int64_t lo, int64_t hi)
{
	char *end;
	errno = 0;
	long long v = strtoll(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		mk_die(MK_EXIT_USAGE, "%s: '%s' is not a whole number in [%" PRId64 ", %" PRId64 "]",
		       flag, text, lo, hi);
	return v;
}

enum {
	OPT_SHAPE = 256,
	OPT_DIM,
	OPT_HIDDEN,
	OPT_LAYERS,
	OPT_HEADS,
	OPT_KV_HEADS,
	OPT_VOCAB,
	OPT_SEQ_LEN,
	OPT_CLASSIFIER,
	OPT_TOKENIZER,
	OPT_SEED,
	OPT_TYPE,
	OPT_THREADS,
	OPT_FORCE,
	OPT_DRY_RUN,
	OPT_ARCH,
	OPT_ROPE_SCALING,
	OPT_VOCAB_FILE,
	OPT_CLAMP_KQV,
	OPT_HELP,
};

/* Shape flags overlay the preset afterwards, whatever their order on the command line. */
static void mk_parse(int argc, char **argv, struct mk_opts *o)
{
	static const struct option longs[] = {
		{ "shape", required_argument, NULL, OPT_SHAPE },
		{ "dim", required_argument, NULL, OPT_DIM },
		{ "hidden", required_argument, NULL, OPT_HIDDEN },
		{ "layers", required_argument, NULL, OPT_LAYERS },
		{ "heads", required_argument, NULL, OPT_HEADS },
		{ "kv-heads", required_argument, NULL, OPT_KV_HEADS },
		{ "vocab", required_argument, NULL, OPT_VOCAB },
		{ "seq-len", required_argument, NULL, OPT_SEQ_LEN },
		{ "classifier", required_argument, NULL, OPT_CLASSIFIER },
		{ "tokenizer", required_argument, NULL, OPT_TOKENIZER },
		{ "seed", required_argument, NULL, OPT_SEED },
		{ "type", required_argument, NULL, OPT_TYPE },
		{ "threads", required_argument, NULL, OPT_THREADS },
		{ "output", required_argument, NULL, 'o' },
		{ "force", no_argument, NULL, OPT_FORCE },
		{ "dry-run", no_argument, NULL, OPT_DRY_RUN },
		{ "arch", required_argument, NULL, OPT_ARCH },
		{ "rope-scaling", required_argument, NULL, OPT_ROPE_SCALING },
		{ "clamp-kqv", required_argument, NULL, OPT_CLAMP_KQV },
		{ "vocab-file", required_argument, NULL, OPT_VOCAB_FILE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	struct mk_shape given = { "custom", -1, -1, -1, -1, -1, -1, -1, -1, MK_ROPE_THETA,
				  MK_ARCH_LLAMA, 0 };
	int c;

	*o = (struct mk_opts){ .seed = 1, .type = &mk_types[0], .arch = -1, .rope_llama3 = -1 };
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":o:h", longs, NULL)) != -1) {
		switch (c) {
		case OPT_SHAPE: o->preset = optarg; break;
		case OPT_DIM: given.dim = mk_parse_int("--dim", optarg, 1, INT32_MAX); break;
		case OPT_HIDDEN: given.hidden = mk_parse_int("--hidden", optarg, 1, INT32_MAX); break;
		case OPT_LAYERS:
			given.layers = mk_parse_int("--layers", optarg, 1, MK_MAX_LAYERS);
			break;
		case OPT_HEADS: given.heads = mk_parse_int("--heads", optarg, 1, INT32_MAX); break;
		case OPT_KV_HEADS:
			given.kv_heads = mk_parse_int("--kv-heads", optarg, 1, INT32_MAX);
			break;
		case OPT_VOCAB: given.vocab = mk_parse_int("--vocab", optarg, 1, INT32_MAX); break;
		case OPT_SEQ_LEN:
			/* The default sink window is seq_len - 4 slots: keep it a valid region. */
			given.seq_len = mk_parse_int("--seq-len", optarg, 1, SKV_KV_MAX_SLOTS);
			break;
		case OPT_CLASSIFIER:
			if (!strcmp(optarg, "tied"))
				given.tied = 1;
			else if (!strcmp(optarg, "separate"))
				given.tied = 0;
			else
				mk_die(MK_EXIT_USAGE, "--classifier: '%s' is not tied or separate",
				       optarg);
			break;
		case OPT_TOKENIZER:
			if (!*optarg)
				mk_die(MK_EXIT_USAGE, "--tokenizer needs a file name or 'bytes'");
			o->tokenizer = optarg;
			break;
		case OPT_SEED:
			o->seed = (uint64_t)mk_parse_int("--seed", optarg, 0, INT64_MAX);
			break;
		case OPT_TYPE: {
			size_t i;
			for (i = 0; i < sizeof(mk_types) / sizeof(mk_types[0]); i++)
				if (!strcasecmp(optarg, mk_types[i].name))
					break;
			if (i == sizeof(mk_types) / sizeof(mk_types[0]))
				mk_die(MK_EXIT_USAGE, "--type: '%s' is not " MK_TYPE_NAMES, optarg);
			o->type = &mk_types[i];
			break;
		}
		case OPT_THREADS:
			o->threads = (int)mk_parse_int("--threads", optarg, 1, MK_MAX_THREADS);
			break;
		case 'o':
			if (!*optarg)
				mk_die(MK_EXIT_USAGE, "-o needs a file name");
			o->out = optarg;
			break;
		case OPT_FORCE: o->force = 1; break;
		case OPT_DRY_RUN: o->dry_run = 1; break;
		case OPT_ARCH:
			if (!strcmp(optarg, "llama"))
				o->arch = MK_ARCH_LLAMA;
			else if (!strcmp(optarg, "qwen2"))
				o->arch = MK_ARCH_QWEN2;
			else if (!strcmp(optarg, "gptneox"))
				o->arch = MK_ARCH_GPTNEOX;
			else if (!strcmp(optarg, "falcon"))
				o->arch = MK_ARCH_FALCON;
			else if (!strcmp(optarg, "mpt"))
				o->arch = MK_ARCH_MPT;
			else
				mk_die(MK_EXIT_USAGE, "--arch: '%s' is not llama, qwen2, gptneox, falcon"
				       " or mpt", optarg);
			break;
		case OPT_CLAMP_KQV: {
			char *end;
			errno = 0;
			double bound = strtod(optarg, &end);
			if (errno || end == optarg || *end || !(bound > 0.0) || bound > 1e30)
				mk_die(MK_EXIT_USAGE, "--clamp-kqv: '%s' is not a positive number",
				       optarg);
			o->clamp_kqv = (float)bound;
			break;
		}
		case OPT_VOCAB_FILE:
			if (!*optarg)
				mk_die(MK_EXIT_USAGE, "--vocab-file needs a GGUF file name");
			o->vocab_file = optarg;
			break;
		case OPT_ROPE_SCALING:
			if (!strcmp(optarg, "llama3"))
				o->rope_llama3 = 1;
			else if (!strcmp(optarg, "none"))
				o->rope_llama3 = 0;
			else
				mk_die(MK_EXIT_USAGE, "--rope-scaling: '%s' is not llama3 or none",
				       optarg);
			break;
		case 'h':
		case OPT_HELP: mk_usage(stdout); exit(0);
		/* optopt is the short option's letter; for a long option it is its value (missing
		 * argument) or 0 (unknown): argv names it then. */
		case ':':
			if (optopt > 0 && optopt < OPT_SHAPE)
				mk_die(MK_EXIT_USAGE, "-%c needs a value", optopt);
			mk_die(MK_EXIT_USAGE, "%s needs a value", argv[optind - 1]);
			break;
		default:
			if (optopt > 0 && optopt < OPT_SHAPE)
				mk_die(MK_EXIT_USAGE, "unknown flag '-%c' (see skv-mkmodel --help)",
				       optopt);
			mk_die(MK_EXIT_USAGE, "unknown flag '%s' (see skv-mkmodel --help)",
			       argv[optind - 1]);
		}
	}
	if (optind < argc)
		mk_die(MK_EXIT_USAGE, "unexpected argument '%s' (the output is -o OUT)", argv[optind]);

	struct mk_shape s = { "custom", -1, -1, -1, -1, -1, -1, -1, 0, MK_ROPE_THETA,
			      MK_ARCH_LLAMA, 0 };
	if (o->preset) {
		size_t i;
		for (i = 0; i < sizeof(mk_presets) / sizeof(mk_presets[0]); i++)
			if (!strcmp(o->preset, mk_presets[i].name))
				break;
		if (i == sizeof(mk_presets) / sizeof(mk_presets[0]))
			mk_die(MK_EXIT_USAGE,
			       "--shape: '%s' is not llama-1b, llama-7b, llama-8b, stories260k,"
			       " llama-3-8b, qwen2-0.5b, pythia-160m, falcon-7b or mpt-7b",
			       o->preset);
		s = mk_presets[i];
	}
	const struct {
		const char *flag;
		int64_t given;
		int64_t *field;
	} fields[] = {
		{ "--dim", given.dim, &s.dim },
		{ "--hidden", given.hidden, &s.hidden },
		{ "--layers", given.layers, &s.layers },
		{ "--heads", given.heads, &s.heads },
		{ "--kv-heads", given.kv_heads, &s.kv_heads },
		{ "--vocab", given.vocab, &s.vocab },
		{ "--seq-len", given.seq_len, &s.seq_len },
	};
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		if (fields[i].given > 0)
			*fields[i].field = fields[i].given;
	}
	if (s.kv_heads < 0)
		s.kv_heads = s.heads; /* no grouped-query attention unless asked */
	if (o->vocab_file) {
		struct skv_gguf *g;
		struct skv_gguf_str *tokens = NULL;
		uint64_t n_tokens = 0;
		char msg[512];
		if (skv_gguf_open(o->vocab_file, &g, msg, sizeof(msg)) < 0)
			mk_die(MK_EXIT_USAGE, "--vocab-file: %s", msg);
		if (skv_gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &n_tokens) < 0 ||
		    !n_tokens || n_tokens > INT32_MAX)
			mk_die(MK_EXIT_USAGE, "--vocab-file %s: no tokenizer.ggml.tokens array",
			       o->vocab_file);
		free(tokens);
		skv_gguf_close(g);
		if (given.vocab > 0 && given.vocab != (int64_t)n_tokens)
			mk_die(MK_EXIT_USAGE, "--vocab %" PRId64 " differs from the %" PRIu64
			       " tokens of %s", given.vocab, n_tokens, o->vocab_file);
		s.vocab = (int64_t)n_tokens;
	}
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		if (*fields[i].field < 0)
			mk_die(MK_EXIT_USAGE, "%s is required without --shape", fields[i].flag);
	}
	if (given.tied >= 0)
		s.tied = (int)given.tied;
	if (o->arch >= 0)
		s.arch = o->arch;
	if (o->rope_llama3 >= 0)
		s.rope_llama3 = o->rope_llama3;
	if (s.arch == MK_ARCH_GPTNEOX && s.kv_heads != s.heads)
		mk_die(MK_EXIT_USAGE, "--arch gptneox has no grouped-query attention: --kv-heads"
		       " must equal --heads");
	if (s.rope_llama3 && s.arch != MK_ARCH_LLAMA)
		mk_die(MK_EXIT_USAGE, "--rope-scaling llama3 is for --arch llama");
	if (o->clamp_kqv > 0.0f && s.arch != MK_ARCH_MPT)
		mk_die(MK_EXIT_USAGE, "--clamp-kqv is for --arch mpt");
	o->shape = s;
	if (!o->out)
		mk_die(MK_EXIT_USAGE, "no output file: give -o OUT.gguf");
}

/* What engine/model.c's model_check_config and the attention kernels require, as usage errors
 * naming the flags. */
static void mk_check_shape(const struct mk_shape *s)
{
	if (s->dim % s->heads)
		mk_die(MK_EXIT_USAGE, "--heads %" PRId64 " does not divide --dim %" PRId64, s->heads,
		       s->dim);
	if (s->kv_heads > s->heads || s->heads % s->kv_heads)
		mk_die(MK_EXIT_USAGE, "--kv-heads %" PRId64 " does not divide --heads %" PRId64,
		       s->kv_heads, s->heads);
	int64_t head_size = s->dim / s->heads;
	if (head_size % 2)
		mk_die(MK_EXIT_USAGE, "head size --dim / --heads = %" PRId64
		       " is odd: RoPE rotates pairs of components", head_size);
	if (head_size > MK_MAX_HEAD_SIZE)
		mk_die(MK_EXIT_USAGE, "head size --dim / --heads = %" PRId64
		       " is above %d, the largest the engine's RoPE supports", head_size,
		       MK_MAX_HEAD_SIZE);
	if (s->vocab < MK_SPECIAL_TOKENS)
		mk_die(MK_EXIT_USAGE, "--vocab %" PRId64 " cannot hold <unk>, <s> and </s>",
		       s->vocab);
}

/* ---- vocabulary ---- */

static void mk_vocab_free(struct mk_vocab *v)
{
	free(v->bytes);
	free(v->offset);
	free(v->scores);
	free(v->types);
	skv_gguf_close(v->gguf);
}

static void mk_vocab_alloc(struct mk_vocab *v, int32_t n, size_t bytes)
{
	v->n = n;
	v->bytes = malloc(bytes ? bytes : 1);
	v->offset = calloc((size_t)n + 1, sizeof(*v->offset));
	v->scores = calloc((size_t)n, sizeof(*v->scores));
	v->types = calloc((size_t)n, sizeof(*v->types));
	if (!v->bytes || !v->offset || !v->scores || !v->types)
		mk_die(MK_EXIT_RUNTIME, "out of memory for a vocabulary of %" PRId32 " tokens", n);
}

static bool mk_is_byte_piece(const char *p, size_t len)
{
	static const char hex[] = "0123456789ABCDEF";
	return len == 6 && !memcmp(p, "<0x", 3) && p[5] == '>' && strchr(hex, p[3]) &&
	       strchr(hex, p[4]) && p[3] && p[4];
}

/* The inverse of llama2.c's tokenizer export (and of engine/tokenizer.c reading a GGUF): ' '
 * back to U+2581, BOS/EOS "\n<s>\n"/"\n</s>\n" back to control tokens <s>/</s>. Types as
 * llama.cpp's converter gives them from SentencePiece: <unk> unknown, <s>/</s> control, <0xXX>
 * byte, the rest normal. */
static void mk_vocab_from_llama2c(struct mk_vocab *v, const char *path, int32_t n)
{
	struct skv_tokenizer *tok = NULL;
	char msg[512];
	int err = skv_tokenizer_load(path, n, &tok, msg, sizeof(msg));
	if (err == -ENOENT)
		mk_die(MK_EXIT_RUNTIME, "%s; give --tokenizer FILE (a llama2.c tokenizer of %" PRId32
		       " tokens) or --tokenizer bytes", msg, n);
	if (err)
		mk_die(MK_EXIT_RUNTIME, "%s", msg);

	size_t total = 0;
	for (int32_t id = 0; id < n; id++) {
		size_t len;
		skv_tokenizer_piece(tok, id, &len);
		total += len * strlen(MK_SPM_SPACE); /* every byte a space, at worst */
	}
	mk_vocab_alloc(v, n, total);
	uint64_t at = 0;
	for (int32_t id = 0; id < n; id++) {
		size_t len;
		const char *p = skv_tokenizer_piece(tok, id, &len);
		skv_tokenizer_score(tok, id, &v->scores[id]);
		v->types[id] = MK_TOKEN_NORMAL;
		if (id == SKV_TOKEN_UNK)
			v->types[id] = MK_TOKEN_UNKNOWN;
		else if (id == SKV_TOKEN_BOS || id == SKV_TOKEN_EOS)
			v->types[id] = MK_TOKEN_CONTROL;
		else if (mk_is_byte_piece(p, len))
			v->types[id] = MK_TOKEN_BYTE;
		if (v->types[id] == MK_TOKEN_CONTROL && len >= 2 && p[0] == '\n' &&
		    p[len - 1] == '\n') {
			p++;
			len -= 2;
		}
		for (size_t i = 0; i < len; i++) {
			if (p[i] == ' ') {
				memcpy(v->bytes + at, MK_SPM_SPACE, strlen(MK_SPM_SPACE));
				at += strlen(MK_SPM_SPACE);
			} else {
				v->bytes[at++] = p[i];
			}
		}
		v->offset[id + 1] = at;
	}
	skv_tokenizer_free(tok);
	snprintf(v->source, sizeof(v->source), "%s", path);
}

/* <unk>, <s>, </s>, the 256 byte tokens, then <extra_N> fillers up to n: text encodes through
 * byte fallback, one token per byte. */
static void mk_vocab_bytes(struct mk_vocab *v, int32_t n)
{
	static const char *const special[MK_SPECIAL_TOKENS] = { "<unk>", "<s>", "</s>" };
	static const int32_t special_type[MK_SPECIAL_TOKENS] = {
		MK_TOKEN_UNKNOWN, MK_TOKEN_CONTROL, MK_TOKEN_CONTROL,
	};
	char piece[32];

	if (n < MK_BYTE_VOCAB)
		mk_die(MK_EXIT_USAGE, "--vocab %" PRId32 ": a generated byte-level vocabulary needs at"
		       " least %d tokens (<unk>, <s>, </s>, 256 bytes); give --tokenizer FILE", n,
		       MK_BYTE_VOCAB);
	mk_vocab_alloc(v, n, (size_t)n * sizeof(piece));
	uint64_t at = 0;
	for (int32_t id = 0; id < n; id++) {
		int len;
		if (id < MK_SPECIAL_TOKENS) {
			len = snprintf(piece, sizeof(piece), "%s", special[id]);
			v->types[id] = special_type[id];
		} else if (id < MK_BYTE_VOCAB) {
			len = snprintf(piece, sizeof(piece), "<0x%02X>", id - MK_SPECIAL_TOKENS);
			v->types[id] = MK_TOKEN_BYTE;
		} else {
			len = snprintf(piece, sizeof(piece), "<extra_%" PRId32 ">", id - MK_BYTE_VOCAB);
			v->types[id] = MK_TOKEN_NORMAL;
		}
		memcpy(v->bytes + at, piece, (size_t)len);
		at += (uint64_t)len;
		v->offset[id + 1] = at;
		v->scores[id] = 0.0f;
	}
	snprintf(v->source, sizeof(v->source), "generated byte-level vocabulary");
}

static void mk_vocab_load(struct mk_vocab *v, const struct mk_opts *o)
{
	int32_t n = (int32_t)o->shape.vocab;
	char path[PATH_MAX];
	char msg[512];

	if (o->vocab_file) {
		if (skv_gguf_open(o->vocab_file, &v->gguf, msg, sizeof(msg)) < 0)
			mk_die(MK_EXIT_RUNTIME, "--vocab-file: %s", msg);
		v->n = n;
		snprintf(v->source, sizeof(v->source), "%s", o->vocab_file);
	} else if (o->tokenizer && !strcmp(o->tokenizer, "bytes")) {
		mk_vocab_bytes(v, n);
	} else if (o->tokenizer) {
		mk_vocab_from_llama2c(v, o->tokenizer, n);
	} else if (n == MK_LLAMA2_VOCAB || n == MK_STORIES_VOCAB) {
		snprintf(path, sizeof(path), "%s/%s", SKV_MODELS_DIR,
			 n == MK_LLAMA2_VOCAB ? MK_LLAMA2_TOKENIZER : MK_STORIES_TOKENIZER);
		mk_vocab_from_llama2c(v, path, n);
	} else {
		mk_vocab_bytes(v, n);
	}
}

/* ---- the plan: tensors, sizes, offsets ---- */

static uint64_t mk_align(uint64_t x)
{
	return (x + MK_ALIGNMENT - 1) / MK_ALIGNMENT * MK_ALIGNMENT;
}

static void mk_add_tensor(struct mk_plan *p, const char *name, uint64_t cols, uint64_t rows,
			  enum mk_role role, int64_t layer)
{
	struct mk_tensor *t = &p->tensors[p->n_tensors++];
	snprintf(t->name, sizeof(t->name), "%s", name);
	t->n_dims = rows ? 2 : 1;
	t->dims[0] = cols;
	t->dims[1] = rows ? rows : 1;
	t->init = role == MK_ROLE_NORM ? MK_INIT_ONES : MK_INIT_RANDOM;
	t->role = role;
	t->layer = layer;
}

/* llama.cpp's use_more_bits: the first and last eighth of the layers and every third one
 * between them get more bits in the _M mixes. */
static bool mk_more_bits(int64_t layer, int64_t layers)
{
	return layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;
}

/* The type of a tensor, as llama.cpp's llama_tensor_get_type chooses it for architecture llama
 * without an importance matrix (llama-quantize, or --pure for a single type):
 *   - 1-D tensors (the norms) are never quantized: F32;
 *   - a single type (F16 ... Q6_K): every 2-D tensor in it;
 *   - Q4_K_M / Q5_K_M: the classifier (output.weight, or token_embd.weight when the classifier
 *     is tied) Q6_K, or Q8_0 if its rows are not whole 256-blocks; attn_v and ffn_down Q6_K in
 *     the layers mk_more_bits picks (llama.cpp counts attn_v tensors in layer order, so the
 *     count is the layer); in a 70B-type model (80 layers, grouped-query attention) the
 *     other attn_v are Q5_K rather than Q4_K; every other matrix the mix's base type.
 * llama.cpp falls back to another type when a row is not a whole number of blocks; the types
 * it falls back to are not read by streamkv, so mk_plan_build refuses such shapes instead. */
static uint32_t mk_tensor_wtype(const struct mk_type *ty, const struct mk_shape *s,
				const struct mk_tensor *t)
{
	if (t->n_dims < 2)
		return SKV_WTYPE_F32;
	if (!ty->mix)
		return ty->base;
	if (t->role == MK_ROLE_OUTPUT || (s->tied && t->role == MK_ROLE_TOKEN_EMBD))
		return t->dims[0] % SKV_QK_K ? SKV_WTYPE_Q8_0 : SKV_WTYPE_Q6_K;
	if (t->role == MK_ROLE_ATTN_V) {
		if (mk_more_bits(t->layer, s->layers))
			return SKV_WTYPE_Q6_K;
		if (s->layers == 80 && s->kv_heads != s->heads && ty->base == SKV_WTYPE_Q4_K)
			return SKV_WTYPE_Q5_K;
		return ty->base;
	}
	if (t->role == MK_ROLE_FFN_DOWN && mk_more_bits(t->layer, s->layers))
		return SKV_WTYPE_Q6_K;
	return ty->base;
}

/* Tensors in llama.cpp's order; shapes as engine/model.c expects them (ggml order [cols, rows]
 * of a row-major [rows][cols] matrix). Sizes are checked for overflow: a shape whose file
 * would not fit 64 bits is a usage error. */
static void mk_plan_build(struct mk_plan *p, const struct mk_shape *s)
{
	static const struct {
		const char *suffix;
		int rows;   /* 0 norm, 1 dim, 2 kv_dim, 3 hidden */
		int cols;   /* 1 dim, 3 hidden */
		enum mk_role role;
	} layer_tensors[] = {
		{ "attn_norm", 0, 1, MK_ROLE_NORM }, { "attn_q", 1, 1, MK_ROLE_ATTN_Q },
		{ "attn_k", 2, 1, MK_ROLE_ATTN_K }, { "attn_v", 2, 1, MK_ROLE_ATTN_V },
		{ "attn_output", 1, 1, MK_ROLE_ATTN_OUTPUT }, { "ffn_norm", 0, 1, MK_ROLE_NORM },
		{ "ffn_gate", 3, 1, MK_ROLE_FFN_GATE }, { "ffn_up", 3, 1, MK_ROLE_FFN_UP },
		{ "ffn_down", 1, 3, MK_ROLE_FFN_DOWN },
	};
	const uint64_t per_layer = sizeof(layer_tensors) / sizeof(layer_tensors[0]);
	const uint64_t dim = (uint64_t)s->dim, hidden = (uint64_t)s->hidden;
	const uint64_t kv_dim = (uint64_t)(s->dim / s->heads * s->kv_heads);
	const uint64_t sizes[4] = { 0, dim, kv_dim, hidden };
	char name[MK_NAME_MAX + 1];

	p->n_tensors = 0;
	p->tensors = calloc((size_t)s->layers * (per_layer + 3) + 4, sizeof(*p->tensors));
	if (!p->tensors)
		mk_die(MK_EXIT_RUNTIME, "out of memory for %" PRId64 " layers", s->layers);
	mk_add_tensor(p, "token_embd.weight", dim, (uint64_t)s->vocab, MK_ROLE_TOKEN_EMBD, -1);
	/* gptneox, as llama.cpp's converter writes it: q|k|v fused, every linear and norm with
	 * a bias, no gate. */
	static const struct {
		const char *name;
		int rows, cols;
		enum mk_role role;
	} neox_tensors[] = {
		{ "attn_norm.weight", 0, 1, MK_ROLE_NORM }, { "attn_norm.bias", 0, 1, MK_ROLE_BIAS },
		{ "attn_qkv.weight", 4, 1, MK_ROLE_ATTN_Q }, { "attn_qkv.bias", 0, 4, MK_ROLE_BIAS },
		{ "attn_output.weight", 1, 1, MK_ROLE_ATTN_OUTPUT },
		{ "attn_output.bias", 0, 1, MK_ROLE_BIAS },
		{ "ffn_norm.weight", 0, 1, MK_ROLE_NORM }, { "ffn_norm.bias", 0, 1, MK_ROLE_BIAS },
		{ "ffn_up.weight", 3, 1, MK_ROLE_FFN_UP }, { "ffn_up.bias", 0, 3, MK_ROLE_BIAS },
		{ "ffn_down.weight", 1, 3, MK_ROLE_FFN_DOWN }, { "ffn_down.bias", 0, 1, MK_ROLE_BIAS },
	};
	const uint64_t neox_sizes[5] = { 0, dim, kv_dim, hidden, dim + 2 * kv_dim };
	for (int64_t l = 0; s->arch == MK_ARCH_GPTNEOX && l < s->layers; l++) {
		for (size_t i = 0; i < sizeof(neox_tensors) / sizeof(neox_tensors[0]); i++) {
			snprintf(name, sizeof(name), "blk.%" PRId64 ".%s", l, neox_tensors[i].name);
			mk_add_tensor(p, name, neox_sizes[neox_tensors[i].cols],
				      neox_sizes[neox_tensors[i].rows], neox_tensors[i].role, l);
		}
	}
	/* falcon: one LayerNorm with bias, fused q|k|v, no biases on the linears. */
	static const struct {
		const char *name;
		int rows, cols;
		enum mk_role role;
	} falcon_tensors[] = {
		{ "attn_norm.weight", 0, 1, MK_ROLE_NORM }, { "attn_norm.bias", 0, 1, MK_ROLE_BIAS },
		{ "attn_qkv.weight", 4, 1, MK_ROLE_ATTN_Q },
		{ "attn_output.weight", 1, 1, MK_ROLE_ATTN_OUTPUT },
		{ "ffn_up.weight", 3, 1, MK_ROLE_FFN_UP }, { "ffn_down.weight", 1, 3, MK_ROLE_FFN_DOWN },
	};
	for (int64_t l = 0; s->arch == MK_ARCH_FALCON && l < s->layers; l++) {
		for (size_t i = 0; i < sizeof(falcon_tensors) / sizeof(falcon_tensors[0]); i++) {
			snprintf(name, sizeof(name), "blk.%" PRId64 ".%s", l, falcon_tensors[i].name);
			mk_add_tensor(p, name, neox_sizes[falcon_tensors[i].cols],
				      neox_sizes[falcon_tensors[i].rows], falcon_tensors[i].role, l);
		}
	}
	/* mpt as llama.cpp's converter writes MPT-7B (no_bias): two LayerNorms without biases,
	 * fused q|k|v, no biases on the linears, no gate; no position embedding (ALiBi). */
	static const struct {
		const char *name;
		int rows, cols;
		enum mk_role role;
	} mpt_tensors[] = {
		{ "attn_norm.weight", 0, 1, MK_ROLE_NORM },
		{ "attn_qkv.weight", 4, 1, MK_ROLE_ATTN_Q },
		{ "attn_output.weight", 1, 1, MK_ROLE_ATTN_OUTPUT },
		{ "ffn_norm.weight", 0, 1, MK_ROLE_NORM },
		{ "ffn_up.weight", 3, 1, MK_ROLE_FFN_UP }, { "ffn_down.weight", 1, 3, MK_ROLE_FFN_DOWN },
	};
	for (int64_t l = 0; s->arch == MK_ARCH_MPT && l < s->layers; l++) {
		for (size_t i = 0; i < sizeof(mpt_tensors) / sizeof(mpt_tensors[0]); i++) {
			snprintf(name, sizeof(name), "blk.%" PRId64 ".%s", l, mpt_tensors[i].name);
			mk_add_tensor(p, name, neox_sizes[mpt_tensors[i].cols],
				      neox_sizes[mpt_tensors[i].rows], mpt_tensors[i].role, l);
		}
	}
	for (int64_t l = 0; s->arch != MK_ARCH_GPTNEOX && s->arch != MK_ARCH_FALCON &&
			    s->arch != MK_ARCH_MPT && l < s->layers; l++) {
		for (uint64_t i = 0; i < per_layer; i++) {
			snprintf(name, sizeof(name), "blk.%" PRId64 ".%s.weight", l,
				 layer_tensors[i].suffix);
			mk_add_tensor(p, name, sizes[layer_tensors[i].cols],
				      sizes[layer_tensors[i].rows], layer_tensors[i].role, l);
			/* qwen2: F32 biases of q, k and v after their matrices, as llama.cpp
			 * orders them. */
			if (s->arch == MK_ARCH_QWEN2 && layer_tensors[i].role >= MK_ROLE_ATTN_Q &&
			    layer_tensors[i].role <= MK_ROLE_ATTN_V) {
				snprintf(name, sizeof(name), "blk.%" PRId64 ".%s.bias", l,
					 layer_tensors[i].suffix);
				mk_add_tensor(p, name, sizes[layer_tensors[i].rows], 0,
					      MK_ROLE_BIAS, l);
			}
		}
	}
	mk_add_tensor(p, "output_norm.weight", dim, 0, MK_ROLE_NORM, -1);
	if (s->arch == MK_ARCH_GPTNEOX || s->arch == MK_ARCH_FALCON)
		mk_add_tensor(p, "output_norm.bias", dim, 0, MK_ROLE_BIAS, -1);
	if (!s->tied)
		mk_add_tensor(p, "output.weight", dim, (uint64_t)s->vocab, MK_ROLE_OUTPUT, -1);

	/* Types first: a width that is not a whole number of blocks is refused before anything
	 * is sized or written, naming the first tensor (in file order) it concerns. */
	for (uint64_t i = 0; i < p->n_tensors; i++) {
		struct mk_tensor *t = &p->tensors[i];
		t->type = mk_tensor_wtype(p->type, s, t);
		uint32_t block = skv_wtype_block_elems(t->type);
		if (!block)
			mk_die(MK_EXIT_RUNTIME, "%s: type %u has no block size (engine/quant.c)",
			       t->name, t->type);
		if (t->dims[0] % block)
			mk_die(MK_EXIT_USAGE, "--type %s: %s is %" PRIu64 " weights wide (--%s), not a"
			       " multiple of the %u-weight block of %s", p->type->name, t->name,
			       t->dims[0], t->role == MK_ROLE_FFN_DOWN ? "hidden" : "dim", block,
			       skv_wtype_name(t->type));
	}

	uint64_t offset = 0;
	p->params = 0;
	for (uint64_t i = 0; i < p->n_tensors; i++) {
		struct mk_tensor *t = &p->tensors[i];
		uint64_t elems, row_bytes = skv_wtype_row_bytes(t->type, t->dims[0]);
		if (!row_bytes ||
		    __builtin_mul_overflow(t->dims[0], t->dims[1], &elems) ||
		    __builtin_mul_overflow(row_bytes, t->dims[1], &t->bytes) ||
		    __builtin_add_overflow(p->params, elems, &p->params) ||
		    offset > UINT64_MAX / 2)
			mk_die(MK_EXIT_USAGE, "this shape's file would not fit a 64-bit size");
		t->offset = mk_align(offset);
		if (__builtin_add_overflow(t->offset, t->bytes, &offset))
			mk_die(MK_EXIT_USAGE, "this shape's file would not fit a 64-bit size");
	}
}

/* ---- the writer ---- */

static void mk_progress(struct mk_writer *w, bool done)
{
	if (!w->total || (!done && w->pos - w->shown < (256u << 20)))
		return;
	w->shown = w->pos;
	fprintf(stderr, "\r%5.1f%% of %.2f GB%s", 100.0 * (double)w->pos / (double)w->total,
		(double)w->total / 1e9, done ? "\n" : "");
}

static void mk_flush(struct mk_writer *w)
{
	size_t done = 0;

	while (w->fd >= 0 && !w->err && done < w->len) {
		ssize_t n = write(w->fd, w->buf + done, w->len - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			w->err = -errno;
		else if (n == 0)
			w->err = -EIO;
		else
			done += (size_t)n;
	}
	w->len = 0;
	mk_progress(w, false);
}

/* Room for n <= MK_BUF_BYTES bytes at the end of the buffer; the caller fills them. */
static uint8_t *mk_reserve(struct mk_writer *w, size_t n)
{
	if (w->fd < 0) {
		w->pos += n;
		return NULL;
	}
	if (MK_BUF_BYTES - w->len < n)
		mk_flush(w);
	uint8_t *p = w->buf + w->len;
	w->len += n;
	w->pos += n;
	return p;
}

/* Room for n <= MK_BUF_BYTES bytes of tensor data, 32-byte aligned in memory (the buffer is,
 * and a chunk starts at a multiple of 32 into it) so that floats and blocks are written in
 * place. */
static uint8_t *mk_reserve_data(struct mk_writer *w, size_t n)
{
	if (w->fd >= 0 && w->len % MK_ALIGNMENT)
		mk_flush(w);
	return mk_reserve(w, n);
}

static void mk_put(struct mk_writer *w, const void *data, size_t n)
{
	while (n) {
		size_t chunk = n < MK_BUF_BYTES ? n : MK_BUF_BYTES;
		uint8_t *p = mk_reserve(w, chunk);
		if (p)
			memcpy(p, data, chunk);
		data = (const uint8_t *)data + chunk;
		n -= chunk;
	}
}

static void mk_put_u32(struct mk_writer *w, uint32_t v) { mk_put(w, &v, sizeof(v)); }
static void mk_put_u64(struct mk_writer *w, uint64_t v) { mk_put(w, &v, sizeof(v)); }

static void mk_put_str(struct mk_writer *w, const char *s, uint64_t len)
{
	mk_put_u64(w, len);
	mk_put(w, s, (size_t)len);
}

static void mk_key(struct mk_writer *w, const char *key, uint32_t type)
{
	w->kv_count++;
	mk_put_str(w, key, strlen(key));
	mk_put_u32(w, type);
}

static void mk_kv_str(struct mk_writer *w, const char *key, const char *value)
{
	mk_key(w, key, SKV_GGUF_STRING);
	mk_put_str(w, value, strlen(value));
}

static void mk_kv_u32(struct mk_writer *w, const char *key, uint32_t value)
{
	mk_key(w, key, SKV_GGUF_UINT32);
	mk_put_u32(w, value);
}

static void mk_kv_u64(struct mk_writer *w, const char *key, uint64_t value)
{
	mk_key(w, key, SKV_GGUF_UINT64);
	mk_put_u64(w, value);
}

static void mk_kv_f32(struct mk_writer *w, const char *key, float value)
{
	mk_key(w, key, SKV_GGUF_FLOAT32);
	mk_put(w, &value, sizeof(value));
}

static void mk_pad(struct mk_writer *w)
{
	static const uint8_t zeros[MK_ALIGNMENT];
	mk_put(w, zeros, (size_t)(mk_align(w->pos) - w->pos));
}

/* The tokenizer keys of a vocabulary GGUF, as it states them (the ones it has). */
static void mk_copy_vocab(struct mk_writer *w, const struct skv_gguf *g)
{
	static const char *const str_keys[] = { "tokenizer.ggml.model", "tokenizer.ggml.pre",
						"tokenizer.chat_template" };
	static const char *const str_arrays[] = { "tokenizer.ggml.tokens",
						  "tokenizer.ggml.merges" };
	static const struct {
		const char *key;
		uint32_t type;
		size_t size;
	} arrays[] = {
		{ "tokenizer.ggml.token_type", SKV_GGUF_INT32, 4 },
		{ "tokenizer.ggml.scores", SKV_GGUF_FLOAT32, 4 },
	};
	static const char *const ids[] = {
		"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
		"tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id",
		"tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id",
	};
	static const char *const bools[] = { "tokenizer.ggml.add_bos_token",
					     "tokenizer.ggml.add_eos_token",
					     "tokenizer.ggml.add_space_prefix" };
	struct skv_gguf_str str;
	for (size_t i = 0; i < sizeof(str_keys) / sizeof(str_keys[0]); i++) {
		if (skv_gguf_get_str(g, str_keys[i], &str))
			continue;
		mk_key(w, str_keys[i], SKV_GGUF_STRING);
		mk_put_str(w, str.ptr, str.len);
	}
	for (size_t i = 0; i < sizeof(str_arrays) / sizeof(str_arrays[0]); i++) {
		struct skv_gguf_str *items = NULL;
		uint64_t n = 0;
		if (skv_gguf_get_str_array(g, str_arrays[i], &items, &n))
			continue;
		mk_key(w, str_arrays[i], SKV_GGUF_ARRAY);
		mk_put_u32(w, SKV_GGUF_STRING);
		mk_put_u64(w, n);
		for (uint64_t j = 0; j < n; j++)
			mk_put_str(w, items[j].ptr, items[j].len);
		free(items);
	}
	for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++) {
		const void *data;
		uint64_t n;
		if (skv_gguf_get_array(g, arrays[i].key, arrays[i].type, &data, &n))
			continue;
		mk_key(w, arrays[i].key, SKV_GGUF_ARRAY);
		mk_put_u32(w, arrays[i].type);
		mk_put_u64(w, n);
		mk_put(w, data, (size_t)n * arrays[i].size);
	}
	for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
		uint32_t id;
		if (!skv_gguf_get_u32(g, ids[i], &id))
			mk_kv_u32(w, ids[i], id);
	}
	for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++) {
		int b;
		if (skv_gguf_get_bool(g, bools[i], &b))
			continue;
		mk_key(w, bools[i], SKV_GGUF_BOOL);
		uint8_t byte = (uint8_t)b;
		mk_put(w, &byte, 1);
	}
}

/* Header, metadata and tensor infos, up to the (padded) start of the data section. */
static void mk_emit_header(struct mk_writer *w, const struct mk_plan *p)
{
	const struct mk_shape *s = &p->shape;
	const struct mk_vocab *v = p->vocab;
	char text[256];

	mk_put(w, "GGUF", 4);
	mk_put_u32(w, 3);
	mk_put_u64(w, p->n_tensors);
	mk_put_u64(w, p->n_kv); /* 0 in the counting pass: the same 8 bytes */

	const char *arch = mk_arch_names[s->arch];
	char key[96];
#define MK_KEY(suffix) (snprintf(key, sizeof(key), "%s." suffix, arch), key)
	mk_kv_str(w, "general.architecture", arch);
	snprintf(text, sizeof(text), "skv-mkmodel %s seed %" PRIu64, s->name, p->seed);
	mk_kv_str(w, "general.name", text);
	mk_kv_str(w, "general.description",
		  "random weights from skv-mkmodel: for speed and memory measurements only");
	mk_kv_u32(w, "general.alignment", MK_ALIGNMENT);
	mk_kv_u32(w, "general.file_type", p->type->file_type);
	mk_kv_u32(w, "general.quantization_version", MK_QUANT_VERSION);
	mk_kv_u64(w, "skv.mkmodel.seed", p->seed);
	mk_kv_str(w, "skv.mkmodel.type", p->type->name);
	mk_kv_u32(w, MK_KEY("context_length"), (uint32_t)s->seq_len);
	mk_kv_u32(w, MK_KEY("embedding_length"), (uint32_t)s->dim);
	mk_kv_u32(w, MK_KEY("block_count"), (uint32_t)s->layers);
	mk_kv_u32(w, MK_KEY("feed_forward_length"), (uint32_t)s->hidden);
	/* Pythia's rotary_pct 0.25: a quarter of each head rotates (kept even). */
	uint32_t head_size = (uint32_t)(s->dim / s->heads);
	if (s->arch != MK_ARCH_MPT)
		mk_kv_u32(w, MK_KEY("rope.dimension_count"),
			  s->arch == MK_ARCH_GPTNEOX ? (head_size / 4 + 1) / 2 * 2 : head_size);
	mk_kv_u32(w, MK_KEY("attention.head_count"), (uint32_t)s->heads);
	mk_kv_u32(w, MK_KEY("attention.head_count_kv"), (uint32_t)s->kv_heads);
	if (s->arch == MK_ARCH_FALCON) {
		mk_kv_f32(w, MK_KEY("attention.layer_norm_epsilon"), MK_NORM_EPS);
	} else if (s->arch == MK_ARCH_MPT) {
		mk_kv_f32(w, MK_KEY("attention.layer_norm_epsilon"), MK_NORM_EPS);
		mk_kv_f32(w, MK_KEY("attention.max_alibi_bias"), MK_MPT_ALIBI_MAX_BIAS);
		if (p->clamp_kqv > 0.0f)
			mk_kv_f32(w, MK_KEY("attention.clamp_kqv"), p->clamp_kqv);
	} else if (s->arch == MK_ARCH_GPTNEOX) {
		mk_kv_f32(w, MK_KEY("attention.layer_norm_epsilon"), MK_NORM_EPS);
		mk_key(w, MK_KEY("use_parallel_residual"), SKV_GGUF_BOOL);
		uint8_t yes = 1;
		mk_put(w, &yes, 1);
	} else {
		mk_kv_f32(w, MK_KEY("attention.layer_norm_rms_epsilon"), MK_NORM_EPS);
	}
	if (s->arch != MK_ARCH_MPT)
		mk_kv_f32(w, MK_KEY("rope.freq_base"), s->rope_theta);
	mk_kv_u32(w, MK_KEY("vocab_size"), (uint32_t)s->vocab);
	if (s->rope_llama3) {
		/* Llama 3.1's rope_scaling, under the names of its Hugging Face config. */
		mk_kv_str(w, MK_KEY("rope.scaling.type"), "llama3");
		mk_kv_f32(w, MK_KEY("rope.scaling.factor"), 8.0f);
		mk_kv_f32(w, MK_KEY("rope.scaling.low_freq_factor"), 1.0f);
		mk_kv_f32(w, MK_KEY("rope.scaling.high_freq_factor"), 4.0f);
		mk_kv_u32(w, MK_KEY("rope.scaling.original_context_length"), 8192);
	}
#undef MK_KEY

	if (v->gguf) {
		mk_copy_vocab(w, v->gguf);
		goto tensors;
	}
	mk_kv_str(w, "tokenizer.ggml.model", "llama");
	mk_key(w, "tokenizer.ggml.tokens", SKV_GGUF_ARRAY);
	mk_put_u32(w, SKV_GGUF_STRING);
	mk_put_u64(w, (uint64_t)v->n);
	for (int32_t id = 0; id < v->n; id++)
		mk_put_str(w, v->bytes + v->offset[id], v->offset[id + 1] - v->offset[id]);
	mk_key(w, "tokenizer.ggml.scores", SKV_GGUF_ARRAY);
	mk_put_u32(w, SKV_GGUF_FLOAT32);
	mk_put_u64(w, (uint64_t)v->n);
	mk_put(w, v->scores, (size_t)v->n * sizeof(*v->scores));
	mk_key(w, "tokenizer.ggml.token_type", SKV_GGUF_ARRAY);
	mk_put_u32(w, SKV_GGUF_INT32);
	mk_put_u64(w, (uint64_t)v->n);
	mk_put(w, v->types, (size_t)v->n * sizeof(*v->types));
	mk_kv_u32(w, "tokenizer.ggml.unknown_token_id", SKV_TOKEN_UNK);
	mk_kv_u32(w, "tokenizer.ggml.bos_token_id", SKV_TOKEN_BOS);
	mk_kv_u32(w, "tokenizer.ggml.eos_token_id", SKV_TOKEN_EOS);

tensors:
	for (uint64_t i = 0; i < p->n_tensors; i++) {
		const struct mk_tensor *t = &p->tensors[i];
		mk_put_str(w, t->name, strlen(t->name));
		mk_put_u32(w, t->n_dims);
		for (uint32_t d = 0; d < t->n_dims; d++)
			mk_put_u64(w, t->dims[d]);
		mk_put_u32(w, t->type);
		mk_put_u64(w, t->offset);
	}
	mk_pad(w);
}

/* splitmix64 (Steele, Lea, Flood 2014): the state advances by a constant (the golden gamma)
 * and each output is a mix of the state, so output i of a stream is the mix of its initial
 * state + (i + 1) gammas: any output is drawn without the ones before it. */
#define MK_SPLITMIX_GAMMA 0x9e3779b97f4a7c15ull

static uint64_t mk_splitmix_mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* A tensor's generator: the seed and the tensor's name (FNV-1a), mixed; weight i of the tensor
 * is output i of the stream that starts here. */
static uint64_t mk_tensor_state(uint64_t seed, const char *name)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (const char *c = name; *c; c++)
		h = (h ^ (unsigned char)*c) * 0x100000001b3ull;
	return (seed ^ h) + MK_SPLITMIX_GAMMA; /* one output drawn and dropped */
}

/* Irwin-Hall with four 16-bit uniforms from one 64-bit draw: mean 0, the given standard
 * deviation, bounded at +-3.46 of it. Integer sums and one float multiply: the same bytes on
 * every IEEE machine. The sum of four uniforms on 0..65535 has variance 4 (65536^2 - 1) / 12. */
#define MK_IH_MEAN 131070
#define MK_IH_STD 37837.22f

/* Weights first .. first + n - 1 of tensor t (row-major, as the file stores them) into dst. */
static void mk_draw(const struct mk_tensor *t, uint64_t state, float scale, uint64_t first,
		    uint64_t n, float *dst)
{
	if (t->init == MK_INIT_ONES) {
		for (uint64_t i = 0; i < n; i++)
			dst[i] = 1.0f;
		return;
	}
	uint64_t z = state + first * MK_SPLITMIX_GAMMA;
	for (uint64_t i = 0; i < n; i++) {
		z += MK_SPLITMIX_GAMMA;
		uint64_t r = mk_splitmix_mix(z);
		int32_t sum = (int32_t)((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) +
					(r >> 48));
		dst[i] = (float)(sum - MK_IH_MEAN) * scale;
	}
}

/* A tensor's data, in chunks of whole blocks that fill the write buffer. Each chunk is cut
 * into pieces of MK_PIECE_ELEMS weights, drawn and converted by the threads in parallel
 * straight into the buffer (F32 is drawn into it directly); scratch holds one piece per
 * thread. Pieces are handed out dynamically: on a shared machine a thread that is not
 * scheduled does not hold the others up at the chunk's end. Blocks are quantized
 * independently of each other, so the bytes do not depend on the number of threads. */
static void mk_emit_tensor(struct mk_writer *w, const struct mk_plan *p, const struct mk_tensor *t,
			   float *scratch)
{
	const uint64_t total = t->dims[0] * t->dims[1];
	const uint64_t state = mk_tensor_state(p->seed, t->name);
	const float scale = 1.0f / (sqrtf((float)t->dims[0]) * MK_IH_STD);
	const uint64_t block_elems = skv_wtype_block_elems(t->type);
	const uint64_t block_bytes = skv_wtype_block_bytes(t->type);
	const uint64_t piece_bytes = MK_PIECE_ELEMS / block_elems * block_bytes;
	const uint64_t chunk_elems = MK_BUF_BYTES / piece_bytes * MK_PIECE_ELEMS;

	mk_pad(w);
	for (uint64_t first = 0; first < total && !w->err; first += chunk_elems) {
		const uint64_t n = total - first < chunk_elems ? total - first : chunk_elems;
		uint8_t *out = mk_reserve_data(w, (size_t)(n / block_elems * block_bytes));
		if (!out)
			continue;
		const int64_t pieces = (int64_t)((n + MK_PIECE_ELEMS - 1) / MK_PIECE_ELEMS);
		int failed = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : failed)
		for (int64_t k = 0; k < pieces; k++) {
			uint64_t at = (uint64_t)k * MK_PIECE_ELEMS;
			uint64_t len = n - at < MK_PIECE_ELEMS ? n - at : MK_PIECE_ELEMS;
			uint8_t *dst = out + (uint64_t)k * piece_bytes;
			if (t->type == SKV_WTYPE_F32) {
				mk_draw(t, state, scale, first + at, len, (float *)(void *)dst);
				continue;
			}
			float *piece = scratch + (size_t)omp_get_thread_num() * MK_PIECE_ELEMS;
			mk_draw(t, state, scale, first + at, len, piece);
			failed |= skv_quant_row(t->type, piece, dst, len) < 0;
		}
		if (failed)
			mk_die(MK_EXIT_RUNTIME, "%s: skv_quant_row refused %s (engine/quant.c)",
			       t->name, skv_wtype_name(t->type));
	}
}

/* ---- the file ---- */

static double mk_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* OUT.tmp, created exclusively: two writers never share it, and a stale one (a run killed
 * with SIGKILL) is replaced only with --force. */
static int mk_open_tmp(const struct mk_opts *o)
{
	if ((size_t)snprintf(mk_tmp_path, sizeof(mk_tmp_path), "%s.tmp", o->out) >=
	    sizeof(mk_tmp_path))
		mk_die(MK_EXIT_USAGE, "-o: the name '%s' is too long", o->out);
	/* A signal between creating the file and marking it ours would leave it behind: hold
	 * them until both are done. */
	sigset_t fatal, old;
	sigemptyset(&fatal);
	sigaddset(&fatal, SIGINT);
	sigaddset(&fatal, SIGTERM);
	sigaddset(&fatal, SIGHUP);
	sigprocmask(SIG_BLOCK, &fatal, &old);
	int fd = open(mk_tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0 && errno == EEXIST && o->force && !unlink(mk_tmp_path))
		fd = open(mk_tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	int open_errno = errno;
	if (fd >= 0)
		mk_tmp_live = 1;
	sigprocmask(SIG_SETMASK, &old, NULL);
	errno = open_errno;
	if (fd < 0 && errno == EEXIST)
		mk_die(MK_EXIT_RUNTIME, "%s exists (another skv-mkmodel writing it, or left by a"
		       " killed one): remove it or give --force", mk_tmp_path);
	if (fd < 0)
		mk_die(MK_EXIT_RUNTIME, "cannot create %s: %s", mk_tmp_path, strerror(errno));
	return fd;
}

/* OUT.tmp -> OUT. Without --force an OUT that appeared meanwhile is not replaced. */
static void mk_publish(const struct mk_opts *o)
{
	int err = 0;

	if (o->force) {
		if (rename(mk_tmp_path, o->out))
			err = errno;
	} else if (renameat2(AT_FDCWD, mk_tmp_path, AT_FDCWD, o->out, RENAME_NOREPLACE)) {
		err = errno;
		/* Filesystems without RENAME_NOREPLACE: link() refuses an existing name too. */
		if ((err == EINVAL || err == ENOSYS) && !link(mk_tmp_path, o->out)) {
			unlink(mk_tmp_path);
			err = 0;
		} else if (err == EINVAL || err == ENOSYS) {
			err = errno;
		}
	}
	if (err == EEXIST)
		mk_die(MK_EXIT_RUNTIME, "%s appeared while writing: not replaced (give --force)",
		       o->out);
	if (err)
		mk_die(MK_EXIT_RUNTIME, "cannot rename %s to %s: %s", mk_tmp_path, o->out,
		       strerror(err));
	mk_tmp_live = 0;
}

static void mk_write_file(const struct mk_opts *o, const struct mk_plan *p)
{
	struct mk_writer w = { .fd = mk_open_tmp(o) };

	w.buf = aligned_alloc(MK_ALIGNMENT, MK_BUF_BYTES);
	if (!w.buf)
		mk_die(MK_EXIT_RUNTIME, "out of memory for the write buffer");
	if (isatty(STDERR_FILENO))
		w.total = p->file_bytes;
	/* Reserve the whole file first: a full disk or a file size limit fails now. */
	if (fallocate(w.fd, 0, 0, (off_t)p->file_bytes) && errno != EOPNOTSUPP && errno != ENOSYS)
		mk_die(MK_EXIT_RUNTIME, "%s: cannot reserve %" PRIu64 " bytes: %s", mk_tmp_path,
		       p->file_bytes, strerror(errno));

	float *scratch = malloc((size_t)omp_get_max_threads() * MK_PIECE_ELEMS * sizeof(float));
	if (!scratch)
		mk_die(MK_EXIT_RUNTIME, "out of memory for the threads' scratch");

	mk_emit_header(&w, p);
	for (uint64_t i = 0; i < p->n_tensors && !w.err; i++)
		mk_emit_tensor(&w, p, &p->tensors[i], scratch);
	free(scratch);
	mk_flush(&w);
	if (!w.err && w.pos != p->file_bytes)
		w.err = -EIO; /* the plan and the writer disagree: a bug, never a short file */
	if (w.err)
		mk_die(MK_EXIT_RUNTIME, "%s: write failed after %" PRIu64 " of %" PRIu64 " bytes: %s",
		       mk_tmp_path, w.pos, p->file_bytes, strerror(-w.err));
	if (w.total)
		mk_progress(&w, true);
	if (fsync(w.fd))
		mk_die(MK_EXIT_RUNTIME, "%s: fsync failed: %s", mk_tmp_path, strerror(errno));
	if (close(w.fd))
		mk_die(MK_EXIT_RUNTIME, "%s: close failed: %s", mk_tmp_path, strerror(errno));
	free(w.buf);
	mk_publish(o);
}

int main(int argc, char **argv)
{
	struct mk_opts o;
	struct mk_vocab vocab = { 0 };
	struct mk_plan plan = { 0 };
	struct stat st;

	mk_parse(argc, argv, &o);
	mk_check_shape(&o.shape);
	plan.shape = o.shape;
	plan.type = o.type;
	plan.seed = o.seed;
	plan.clamp_kqv = o.clamp_kqv;
	mk_plan_build(&plan, &o.shape);

	/* The output before the slow parts: an existing file is refused at once. */
	if (!stat(o.out, &st) && S_ISDIR(st.st_mode))
		mk_die(MK_EXIT_RUNTIME, "%s is a directory", o.out);
	if (!o.force && !access(o.out, F_OK))
		mk_die(MK_EXIT_RUNTIME, "%s exists: give --force to replace it", o.out);

	mk_vocab_load(&vocab, &o);
	plan.vocab = &vocab;

	/* First pass: count the header's bytes and metadata entries. */
	struct mk_writer count = { .fd = -1 };
	mk_emit_header(&count, &plan);
	plan.n_kv = count.kv_count;
	plan.data_offset = count.pos;
	const struct mk_tensor *last = &plan.tensors[plan.n_tensors - 1];
	if (__builtin_add_overflow(plan.data_offset, last->offset + last->bytes, &plan.file_bytes))
		mk_die(MK_EXIT_USAGE, "this shape's file would not fit a 64-bit size");

	const struct mk_shape *s = &o.shape;
	char summary[sizeof(vocab.source) + 512];
	snprintf(summary, sizeof(summary),
		 "%s shape (dim %" PRId64 ", hidden %" PRId64 ", %" PRId64 " layers, %" PRId64
		 " heads, %" PRId64 " kv heads, vocab %" PRId64 ", seq %" PRId64 ", classifier %s,"
		 " %s %g%s), architecture %s, %s weights, %" PRIu64 " parameters, %" PRIu64 " bytes, seed %"
		 PRIu64 ", vocabulary: %s",
		 s->name, s->dim, s->hidden, s->layers, s->heads, s->kv_heads, s->vocab, s->seq_len,
		 s->tied ? "tied" : "separate", s->arch == MK_ARCH_MPT ? "ALiBi max bias" : "rope base",
		 s->arch == MK_ARCH_MPT ? (double)MK_MPT_ALIBI_MAX_BIAS : (double)s->rope_theta,
		 s->rope_llama3 ? ", llama3 scaling" : "", mk_arch_names[s->arch], o.type->name,
		 plan.params,
		 plan.file_bytes, o.seed, vocab.source);
	if (o.dry_run) {
		printf("would write %s: %s\n", o.out, summary);
	} else {
		signal(SIGINT, mk_on_signal);
		signal(SIGTERM, mk_on_signal);
		signal(SIGHUP, mk_on_signal);
		omp_set_num_threads(o.threads ? o.threads : omp_get_num_procs());
		double t0 = mk_now();
		mk_write_file(&o, &plan);
		printf("wrote %s: %s, in %.1f s with %d threads\n", o.out, summary, mk_now() - t0,
		       omp_get_max_threads());
	}
	if (fflush(stdout) || ferror(stdout))
		mk_die(MK_EXIT_RUNTIME, "cannot write to stdout: %s", strerror(errno));
	free(plan.tensors);
	mk_vocab_free(&vocab);
	return 0;
}
