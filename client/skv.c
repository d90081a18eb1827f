/* skv: the streamkv command-line client.
 *
 * Local mode runs the engine in this process on the shipped model (or --model):
 *   skv generate [flags] [PROMPT]   stream a continuation (from BOS when no prompt)
 *   skv tokenize FILE               print the ids `skv ppl` scores, BOS first, on one line
 *   skv ppl [flags] FILE            perplexity as the StreamingLLM paper evaluates it
 *   skv chat [flags]                a conversation on one endless stream (client/chat.c)
 * With --socket PATH, generate, ppl and chat run through the daemon and print the same bytes.
 * Every user mistake gets one line on stderr naming what was wrong, and a non-zero exit:
 * 2 for usage errors, 1 for everything else. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chat.h"
#include "forward.h"
#include "skv-client.h"
#include "model.h"
#include "proto.h"
#include "sampler.h"
#include "skv-error.h"
#include "stream.h"
#include "tokenizer.h"

#ifndef SKV_MODEL_DIR
#define SKV_MODEL_DIR "models/stories260K"
#endif

#define SKV_MAX_ROWS 512

/* Flags that only some commands take; giving one to another command is a usage error. */
enum {
	SKV_FLAG_STEPS = 1u << 0,    /* -n */
	SKV_FLAG_PPL = 1u << 1,      /* --tokens, --json */
	SKV_FLAG_POLICY = 1u << 2,   /* --policy, --sink, --window, --limit, --evict, --positions,
				      * --kv */
	SKV_FLAG_SAMPLING = 1u << 3, /* --temp, --top-p, --seed, --stats */
	SKV_FLAG_CHAT = 1u << 4,     /* --turns, --template, --max-answer, --echo */
};

void skv_die(int code, const char *fmt, ...)
{
	va_list ap;
	fputs("skv: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(code);
}

static void skv_usage(FILE *out)
{
	fputs("usage: skv [--socket PATH] COMMAND [flags] [args]\n"
	      "\n"
	      "commands:\n"
	      "  generate [PROMPT]   stream a continuation of PROMPT (from BOS when absent)\n"
	      "  tokenize FILE       print the token ids of FILE, BOS first, on one line\n"
	      "  ppl FILE            perplexity of FILE, tokens fed one at a time\n"
	      "  chat                a conversation on one stream: turns from the terminal or\n"
	      "                      --turns, each answer streamed as it is generated\n"
	      "\n"
	      "model:\n"
	      "  --model PATH        llama2.c .bin or GGUF model (default: shipped stories260K)\n"
	      "  --tokenizer PATH    llama2.c tokenizer (default: the GGUF's own vocabulary, or\n"
	      "                      tok<vocab>.bin / tokenizer.bin next to a .bin model)\n"
	      "  --threads N         compute threads (default 1: fastest for small models)\n"
	      "cache policy:\n"
	      "  --policy NAME       sink (default), window, dense, recompute\n"
	      "  --sink N            attention sinks (sink: default 4)\n"
	      "  --window N          window slots (sink: trained length - sinks; window and\n"
	      "                      recompute: trained length)\n"
	      "  --limit N           dense: most tokens the cache may hold (default 16384)\n"
	      "  --evict MODE        token (default) or prompt: free room for prompt + answer at once\n"
	      "  --positions MODE    cache (default) or abs: where the sinks see the query\n"
	      "  --kv TYPE           f32 (default, exact), f16 (half precision) or q8 (int8 with a\n"
	      "                      scale per slot and head): the element type of keys and values\n"
	      "generate:\n"
	      "  --stream NAME       (with --socket) run on the resumable stream NAME: created on\n"
	      "                      first use, kept by the daemon after skv exits, attached to\n"
	      "                      again (continuing where it was, printing what a killed run\n"
	      "                      left unread) by the next --stream NAME; its secret token is\n"
	      "                      in $SKV_STREAM_DIR/NAME.token (default: streams/ beside the\n"
	      "                      default socket), or given in $SKV_STREAM_TOKEN\n"
	      "  --stream-close      end the stream NAME after this run and delete its token file\n"
	      "  -n N                tokens to generate (default 256)\n"
	      "  --temp T            temperature, 0 = greedy (default 1.0)\n"
	      "  --top-p P           nucleus sampling mass (default 0.9)\n"
	      "  --seed N            random seed (default: time)\n"
	      "  --stats             print tokens/s on stderr at the end (chat: after each turn)\n"
	      "ppl:\n"
	      "  --tokens N          score N predictions: BOS and the first N tokens of the text\n"
	      "  --json              print one JSON object\n"
	      "chat (also --temp, --top-p, --seed, --stats and the cache policy flags):\n"
	      "  --turns FILE        one turn per line, blank lines skipped; - = stdin\n"
	      "                      (default: the terminal, with a \"> \" prompt on a tty)\n"
	      "  --template T        how a turn is fed: a format (story, raw, llama2, llama3,\n"
	      "                      chatml, vicuna), auto (the one the model's\n"
	      "                      tokenizer.chat_template names), or a text where {turn} is\n"
	      "                      the turn and \\n a newline (default story: Tom said,\n"
	      "                      \"{turn}\"\\nMom said,)\n"
	      "  --max-answer N      tokens per answer at most (default 128); an answer also\n"
	      "                      ends at the model's end-of-text token; with --evict prompt\n"
	      "                      a turn and N tokens must fit the window\n"
	      "  --echo              with --turns: print each fed turn before its answer\n"
	      "  Ctrl-C stops the answer being written and goes on with the next turn; Ctrl-C\n"
	      "  while waiting for a turn ends the chat as Ctrl-D does; twice within a second,\n"
	      "  with exit status 130. At the end, one line on stderr: turns, tokens fed, cache\n"
	      "  size and whether the stream's KV bytes stayed constant.\n",
	      out);
}

static long long skv_parse_int(const char *flag, const char *text, long long lo, long long hi)
{
	char *end;
	errno = 0;
	long long v = strtoll(text, &end, 10);
	if (errno || end == text || *end || v < lo || v > hi)
		skv_die(SKV_EXIT_USAGE, "%s: '%s' is not a whole number in [%lld, %lld]", flag, text,
			lo, hi);
	return v;
}

static float skv_parse_float(const char *flag, const char *text, float lo, float hi)
{
	char *end;
	errno = 0;
	float v = strtof(text, &end);
	if (errno || end == text || *end || !(v >= lo && v <= hi))
		skv_die(SKV_EXIT_USAGE, "%s: '%s' is not a number in [%g, %g]", flag, text, lo, hi);
	return v;
}

enum {
	OPT_MODEL = 256,
	OPT_TOKENIZER,
	OPT_SOCKET,
	OPT_POLICY,
	OPT_SINK,
	OPT_WINDOW,
	OPT_LIMIT,
	OPT_EVICT,
	OPT_POSITIONS,
	OPT_KV,
	OPT_TEMP,
	OPT_TOPP,
	OPT_SEED,
	OPT_TOKENS,
	OPT_JSON,
	OPT_STATS,
	OPT_THREADS,
	OPT_TURNS,
	OPT_TEMPLATE,
	OPT_MAX_ANSWER,
	OPT_ECHO,
	OPT_STREAM,
	OPT_STREAM_CLOSE,
	OPT_HELP,
};

/* generate --stream NAME: a resumable stream kept in the daemon between runs (parsed option). */
static const char *skv_stream_name;
static int skv_stream_close;

static const struct option skv_long_opts[] = {
	{ "model", required_argument, NULL, OPT_MODEL },
	{ "tokenizer", required_argument, NULL, OPT_TOKENIZER },
	{ "socket", required_argument, NULL, OPT_SOCKET },
	{ "policy", required_argument, NULL, OPT_POLICY },
	{ "sink", required_argument, NULL, OPT_SINK },
	{ "window", required_argument, NULL, OPT_WINDOW },
	{ "limit", required_argument, NULL, OPT_LIMIT },
	{ "evict", required_argument, NULL, OPT_EVICT },
	{ "positions", required_argument, NULL, OPT_POSITIONS },
	{ "kv", required_argument, NULL, OPT_KV },
	{ "temp", required_argument, NULL, OPT_TEMP },
	{ "top-p", required_argument, NULL, OPT_TOPP },
	{ "seed", required_argument, NULL, OPT_SEED },
	{ "tokens", required_argument, NULL, OPT_TOKENS },
	{ "json", no_argument, NULL, OPT_JSON },
	{ "stats", no_argument, NULL, OPT_STATS },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "turns", required_argument, NULL, OPT_TURNS },
	{ "template", required_argument, NULL, OPT_TEMPLATE },
	{ "max-answer", required_argument, NULL, OPT_MAX_ANSWER },
	{ "echo", no_argument, NULL, OPT_ECHO },
	{ "stream", required_argument, NULL, OPT_STREAM },
	{ "stream-close", no_argument, NULL, OPT_STREAM_CLOSE },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* Parse flags anywhere on the line (getopt_long permutes them ahead of the positional
 * arguments; "--" ends the flags); returns the index of the command in the permuted argv. */
static int skv_parse_opts(int argc, char **argv, struct skv_opts *o)
{
	long long limit = -1, window = -1;
	memset(o, 0, sizeof(*o));
	skv_policy_default(&o->policy);
	o->steps = 256;
	o->temperature = 1.0f;
	o->top_p = 0.9f;
	o->max_tokens = -1;
	o->threads = 1;
	o->max_answer = SKV_CHAT_DEFAULT_MAX_ANSWER;

	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":n:h", skv_long_opts, NULL)) != -1) {
		switch (c) {
		case OPT_MODEL: o->model_path = optarg; break;
		case OPT_TOKENIZER: o->tokenizer_path = optarg; break;
		case OPT_SOCKET: o->socket_path = optarg; break;
		case OPT_STREAM: skv_stream_name = optarg; break;
		case OPT_STREAM_CLOSE: skv_stream_close = 1; break;
		case OPT_POLICY:
			o->given |= SKV_FLAG_POLICY;
			if (skv_policy_parse(optarg, &o->policy.kind) < 0)
				skv_die(SKV_EXIT_USAGE,
					"--policy: unknown policy '%s' (sink, window, dense, recompute)",
					optarg);
			break;
		case OPT_SINK:
			o->given |= SKV_FLAG_POLICY;
			o->policy.sink_slots = skv_parse_int("--sink", optarg, 0, SKV_KV_MAX_SLOTS);
			break;
		case OPT_WINDOW:
			o->given |= SKV_FLAG_POLICY;
			window = skv_parse_int("--window", optarg, 1, SKV_KV_MAX_SLOTS);
			break;
		case OPT_LIMIT:
			o->given |= SKV_FLAG_POLICY;
			limit = skv_parse_int("--limit", optarg, 1, SKV_KV_MAX_SLOTS);
			break;
		case OPT_EVICT:
			o->given |= SKV_FLAG_POLICY;
			if (!strcmp(optarg, "token"))
				o->policy.evict = SKV_EVICT_TOKEN;
			else if (!strcmp(optarg, "prompt"))
				o->policy.evict = SKV_EVICT_PROMPT;
			else
				skv_die(SKV_EXIT_USAGE, "--evict: '%s' is not token or prompt", optarg);
			break;
		case OPT_POSITIONS:
			o->given |= SKV_FLAG_POLICY;
			if (!strcmp(optarg, "cache"))
				o->policy.abs_positions = 0;
			else if (!strcmp(optarg, "abs"))
				o->policy.abs_positions = 1;
			else
				skv_die(SKV_EXIT_USAGE, "--positions: '%s' is not cache or abs", optarg);
			break;
		case OPT_KV:
			o->given |= SKV_FLAG_POLICY;
			if (!strcmp(optarg, "f32"))
				o->policy.kv_dtype = SKV_KV_DTYPE_F32;
			else if (!strcmp(optarg, "f16"))
				o->policy.kv_dtype = SKV_KV_DTYPE_F16;
			else if (!strcmp(optarg, "q8"))
				o->policy.kv_dtype = SKV_KV_DTYPE_Q8;
			else
				skv_die(SKV_EXIT_USAGE, "--kv: '%s' is not f32, f16 or q8", optarg);
			break;
		case 'n':
			o->given |= SKV_FLAG_STEPS;
			o->steps = skv_parse_int("-n", optarg, 0, LLONG_MAX);
			break;
		case OPT_TEMP:
			o->given |= SKV_FLAG_SAMPLING;
			o->temperature = skv_parse_float("--temp", optarg, 0.0f, 100.0f);
			break;
		case OPT_TOPP:
			o->given |= SKV_FLAG_SAMPLING;
			o->top_p = skv_parse_float("--top-p", optarg, 0.0f, 1.0f);
			break;
		case OPT_SEED:
			o->given |= SKV_FLAG_SAMPLING;
			o->seed = (unsigned long long)skv_parse_int("--seed", optarg, 0, LLONG_MAX);
			o->have_seed = 1;
			break;
		case OPT_TOKENS:
			o->given |= SKV_FLAG_PPL;
			o->max_tokens = skv_parse_int("--tokens", optarg, 1, LLONG_MAX);
			break;
		case OPT_JSON:
			o->given |= SKV_FLAG_PPL;
			o->json = 1;
			break;
		case OPT_STATS:
			o->given |= SKV_FLAG_SAMPLING;
			o->stats = 1;
			break;
		case OPT_THREADS: o->threads = skv_parse_int("--threads", optarg, 1, 256); break;
		case OPT_TURNS:
			o->given |= SKV_FLAG_CHAT;
			if (!*optarg)
				skv_die(SKV_EXIT_USAGE, "--turns needs a file name (- for stdin)");
			o->turns_path = optarg;
			break;
		case OPT_TEMPLATE:
			o->given |= SKV_FLAG_CHAT;
			skv_chat_check_template(optarg);
			o->chat_template = optarg;
			break;
		case OPT_MAX_ANSWER:
			o->given |= SKV_FLAG_CHAT;
			o->max_answer = skv_parse_int("--max-answer", optarg, 1, SKV_KV_MAX_SLOTS);
			break;
		case OPT_ECHO:
			o->given |= SKV_FLAG_CHAT;
			o->echo = 1;
			break;
		case 'h':
		case OPT_HELP: skv_usage(stdout); exit(0);
		case ':':
			/* optopt names a short flag; for a long one getopt has stepped past it. */
			if (optopt > 0 && optopt < 256)
				skv_die(SKV_EXIT_USAGE, "-%c needs a value", optopt);
			skv_die(SKV_EXIT_USAGE, "%s needs a value", argv[optind - 1]);
		default:
			if (optopt > 0 && optopt < 256)
				skv_die(SKV_EXIT_USAGE, "unknown flag '-%c' (see skv --help)", optopt);
			skv_die(SKV_EXIT_USAGE, "unknown flag '%s' (see skv --help)",
				argv[optind - 1]);
		}
	}
	if (o->policy.kind == SKV_POLICY_DENSE) {
		if (window >= 0)
			skv_die(SKV_EXIT_USAGE, "--window does not apply to dense: use --limit");
		o->policy.window_slots = limit;
	} else {
		if (limit >= 0)
			skv_die(SKV_EXIT_USAGE, "--limit applies to --policy dense only");
		o->policy.window_slots = window;
	}
	if (o->policy.sink_slots > 0 && o->policy.kind != SKV_POLICY_SINK)
		skv_die(SKV_EXIT_USAGE, "--sink: policy %s keeps no sinks; use --policy sink",
			skv_policy_name(o->policy.kind));
	if (o->policy.evict == SKV_EVICT_PROMPT && o->policy.kind != SKV_POLICY_SINK &&
	    o->policy.kind != SKV_POLICY_WINDOW)
		skv_die(SKV_EXIT_USAGE, "--evict prompt applies to the sink and window policies");
	if (o->policy.abs_positions && o->policy.kind != SKV_POLICY_SINK)
		skv_die(SKV_EXIT_USAGE, "--positions abs applies to the sink policy");
	if (o->echo && !o->turns_path)
		skv_die(SKV_EXIT_USAGE, "--echo applies to turns read with --turns FILE");
	return optind;
}

static int skv_file_exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* $SKV_MODEL_DIR, else the source tree's models/stories260K while it exists, else the installed
 * copy (meson install: share/streamkv/models/stories260K). */
static const char *skv_model_dir(void)
{
	const char *env = getenv("SKV_MODEL_DIR");
	struct stat st;
	if (env && *env)
		return env;
#ifdef SKV_INSTALLED_MODEL_DIR
	if (stat(SKV_MODEL_DIR, &st) < 0 && stat(SKV_INSTALLED_MODEL_DIR, &st) == 0)
		return SKV_INSTALLED_MODEL_DIR;
#endif
	(void)st;
	return SKV_MODEL_DIR;
}

void skv_local_open(const struct skv_opts *o, struct skv_local *L, int with_runner)
{
	char msg[512] = "";
	static char default_model[PATH_MAX], guess[PATH_MAX];
	const char *model_path = o->model_path;
	if (!model_path) {
		snprintf(default_model, sizeof(default_model), "%s/stories260K.bin", skv_model_dir());
		model_path = default_model;
	}
	/* auto: a big block-format model decodes from a copy on huge pages (mapfile.h). */
	int err = skv_model_open_mode(model_path, SKV_WEIGHTS_AUTO, &L->model, msg, sizeof(msg));
	if (err < 0)
		skv_die(1, "%s", msg[0] ? msg : skv_strerror(err));

	const struct skv_model_config *c = &L->model->cfg;
	if (o->tokenizer_path) {
		err = skv_tokenizer_load(o->tokenizer_path, c->vocab_size, &L->tok, msg,
					 sizeof(msg));
	} else if (L->model->gguf) {
		err = skv_tokenizer_from_gguf(L->model->gguf, c->vocab_size, &L->tok, msg,
					      sizeof(msg));
	} else {
		/* llama2.c's convention: tok<vocab>.bin, or tokenizer.bin for the 32k vocabulary. */
		const char *slash = strrchr(model_path, '/');
		int dir_len = slash ? (int)(slash - model_path) : 1;
		const char *dir = slash ? model_path : ".";
		snprintf(guess, sizeof(guess), "%.*s/tok%d.bin", dir_len, dir, c->vocab_size);
		if (!skv_file_exists(guess))
			snprintf(guess, sizeof(guess), "%.*s/tokenizer.bin", dir_len, dir);
		if (!skv_file_exists(guess))
			skv_die(1,
				"%s: no tokenizer found next to the model (tok%d.bin or "
				"tokenizer.bin); pass --tokenizer PATH",
				model_path, c->vocab_size);
		err = skv_tokenizer_load(guess, c->vocab_size, &L->tok, msg, sizeof(msg));
	}
	if (err < 0)
		skv_die(1, "%s", msg[0] ? msg : skv_strerror(err));

	L->runner = NULL;
	if (!with_runner)
		return;
	err = skv_runner_new(L->model, SKV_MAX_ROWS, (uint32_t)o->threads, &L->runner, msg,
			     sizeof(msg));
	if (err < 0)
		skv_die(1, "%s", msg[0] ? msg : skv_strerror(err));
}

void skv_local_close(struct skv_local *L)
{
	skv_runner_free(L->runner);
	skv_tokenizer_free(L->tok);
	skv_model_close(L->model);
}

struct skv_stream *skv_open_stream(struct skv_local *L, struct skv_policy *policy)
{
	char msg[512] = "";
	struct skv_stream *s;
	int err = skv_policy_resolve(policy, L->model->cfg.seq_len, msg, sizeof(msg));
	if (err >= 0)
		err = skv_stream_new(L->runner, policy, &s, msg, sizeof(msg));
	if (err < 0)
		skv_die(err == -SKV_EINVAL_POLICY ? SKV_EXIT_USAGE : 1, "%s",
			msg[0] ? msg : skv_strerror(err));
	return s;
}

void skv_feed_or_die(struct skv_stream *s, const int32_t *tokens, size_t n, float *logits,
		     const struct skv_policy *p)
{
	int err = skv_stream_feed(s, tokens, n, logits, NULL);
	if (err == -SKV_ECACHEFULL)
		skv_die(1,
			"the dense cache is full after %llu tokens (--limit %lld); raise --limit or "
			"use --policy sink",
			(unsigned long long)skv_stream_tokens_seen(s), (long long)p->window_slots);
	if (err < 0)
		skv_die(1, "forward pass failed: %s", skv_strerror(err));
}

/* llama2.c's safe_printf: a raw byte piece that is neither printable nor white space is
 * dropped, everything else is written as is. */
void skv_emit(const char *piece, size_t len)
{
	fwrite(piece, 1, len, stdout);
}

double skv_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int skv_cmd_generate(struct skv_opts *o, int argc, char **argv)
{
	if (argc > 1)
		skv_die(SKV_EXIT_USAGE, "generate takes one PROMPT argument (quote it), got %d",
			argc);
	const char *prompt = argc ? argv[0] : "";
	struct skv_local L;
	skv_local_open(o, &L, 1);
	struct skv_stream *s = skv_open_stream(&L, &o->policy);
	const struct skv_model_config *c = &L.model->cfg;

	int32_t *ids;
	size_t n_ids;
	if (skv_tokenizer_encode(L.tok, prompt, strlen(prompt), skv_tokenizer_add_bos(L.tok), 0, &ids,
				 &n_ids) < 0)
		skv_die(1, "out of memory encoding the prompt");

	struct skv_sampler sampler;
	uint64_t seed = o->have_seed ? o->seed : (uint64_t)time(NULL);
	if (skv_sampler_init(&sampler, c->vocab_size, o->temperature, o->top_p, seed) < 0)
		skv_die(1, "out of memory");
	float *logits = malloc((size_t)c->vocab_size * sizeof(float));
	if (!logits)
		skv_die(1, "out of memory");

	/* Echo the prompt as its tokens decode (as run.c does), then feed it in one go. */
	for (size_t i = 1; i < n_ids; i++) {
		size_t len;
		const char *piece = skv_tokenizer_decode(L.tok, ids[i - 1], ids[i], &len);
		if (skv_tokenizer_prints(L.tok, ids[i], piece, len))
			skv_emit(piece, len);
	}
	fflush(stdout);
	skv_stream_make_room(s, n_ids + (uint64_t)o->steps);
	double t0 = skv_now();
	skv_feed_or_die(s, ids, n_ids, logits, &o->policy);
	double t_prompt = skv_now();

	int32_t prev = ids[n_ids - 1];
	long long made = 0;
	while (made < o->steps) {
		int32_t next = skv_sampler_sample(&sampler, logits);
		made++;
		if (skv_tokenizer_is_end(L.tok, next)) /* llama2.c's end-of-story BOS, or EOS/EOT */
			break;
		size_t len;
		const char *piece = skv_tokenizer_decode(L.tok, prev, next, &len);
		if (skv_tokenizer_prints(L.tok, next, piece, len))
			skv_emit(piece, len);
		fflush(stdout);
		prev = next;
		if (made < o->steps)
			skv_feed_or_die(s, &next, 1, logits, &o->policy);
	}
	fputc('\n', stdout);
	double t_end = skv_now();
	if (o->stats)
		fprintf(stderr, "prompt: %zu tokens in %.3f s; generated %lld tokens, %.1f tokens/s\n",
			n_ids, t_prompt - t0, made,
			made > 1 ? (double)(made - 1) / (t_end - t_prompt) : 0.0);

	free(logits);
	free(ids);
	skv_sampler_fini(&sampler);
	skv_stream_free(s);
	skv_local_close(&L);
	return 0;
}

static char *skv_slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		skv_die(1, "%s: cannot open: %s", path, strerror(errno));
	size_t cap = 1 << 16, n = 0;
	char *buf = malloc(cap);
	for (;;) {
		if (!buf)
			skv_die(1, "%s: out of memory", path);
		n += fread(buf + n, 1, cap - n, f);
		if (n < cap)
			break;
		cap *= 2;
		buf = realloc(buf, cap);
	}
	if (ferror(f))
		skv_die(1, "%s: read error: %s", path, strerror(errno));
	fclose(f);
	*len = n;
	return buf;
}

static int32_t *skv_encode_file(struct skv_local *L, const char *path, size_t *n_ids)
{
	size_t len;
	char *text = skv_slurp(path, &len);
	int32_t *ids;
	if (skv_tokenizer_encode(L->tok, text, len, skv_tokenizer_add_bos(L->tok), 0, &ids, n_ids) < 0)
		skv_die(1, "%s: out of memory encoding the text", path);
	free(text);
	return ids;
}

static int skv_cmd_tokenize(struct skv_opts *o, int argc, char **argv)
{
	if (argc != 1)
		skv_die(SKV_EXIT_USAGE, "usage: skv tokenize FILE");
	struct skv_local L;
	skv_local_open(o, &L, 1);
	size_t n;
	int32_t *ids = skv_encode_file(&L, argv[0], &n);
	for (size_t i = 0; i < n; i++)
		printf(i ? " %d" : "%d", ids[i]);
	putchar('\n');
	free(ids);
	skv_local_close(&L);
	return 0;
}

static void skv_print_ppl(const struct skv_opts *o, double ppl, size_t predictions,
			  enum skv_policy_kind kind, int64_t sinks, int64_t window, int abs_positions)
{
	if (o->json)
		printf("{\"ppl\": %.6f, \"tokens\": %zu, \"policy\": \"%s\", \"sink\": %lld, "
		       "\"window\": %lld, \"positions\": \"%s\", \"kv\": \"%s\"}\n",
		       ppl, predictions, skv_policy_name(kind), (long long)sinks, (long long)window,
		       abs_positions ? "abs" : "cache",
		       skv_kv_dtype_name(o->policy.kv_dtype ? o->policy.kv_dtype : SKV_KV_DTYPE_F32));
	else
		printf("ppl %.4f over %zu tokens (policy %s, %lld sinks, window %lld)\n", ppl,
		       predictions, skv_policy_name(kind), (long long)sinks, (long long)window);
}

static int skv_cmd_ppl(struct skv_opts *o, int argc, char **argv)
{
	if (argc != 1)
		skv_die(SKV_EXIT_USAGE, "usage: skv ppl [flags] FILE");
	struct skv_local L;
	skv_local_open(o, &L, 1);
	size_t n_ids;
	int32_t *ids = skv_encode_file(&L, argv[0], &n_ids);
	if (n_ids < 2)
		skv_die(1, "%s: no text to score", argv[0]);
	size_t predictions = n_ids - 1;
	if (o->max_tokens > 0 && (size_t)o->max_tokens < predictions)
		predictions = (size_t)o->max_tokens;

	struct skv_stream *s = skv_open_stream(&L, &o->policy);
	int32_t vocab = L.model->cfg.vocab_size;
	float *logits = malloc((size_t)vocab * sizeof(float));
	if (!logits)
		skv_die(1, "out of memory");

	/* The paper's evaluation: one token at a time, each step predicting the next. */
	double nll = 0.0, t0 = skv_now(), last_report = t0;
	int tty = isatty(STDERR_FILENO);
	for (size_t i = 0; i < predictions; i++) {
		skv_feed_or_die(s, &ids[i], 1, logits, &o->policy);
		nll += skv_nll(logits, vocab, ids[i + 1]);
		double now = skv_now();
		if (now - last_report >= (tty ? 0.5 : 10.0) || i + 1 == predictions) {
			fprintf(stderr, "%s%zu/%zu tokens, ppl %.4f, %.0f tokens/s%s",
				tty ? "\r" : "", i + 1, predictions, exp(nll / (double)(i + 1)),
				(double)(i + 1) / (now - t0), tty ? "" : "\n");
			last_report = now;
		}
	}
	if (tty)
		fputc('\n', stderr);
	double ppl = exp(nll / (double)predictions);
	const struct skv_policy *p = skv_stream_policy(s);
	skv_print_ppl(o, ppl, predictions, p->kind, p->sink_slots, p->window_slots,
		      p->abs_positions);
	free(logits);
	free(ids);
	skv_stream_free(s);
	skv_local_close(&L);
	return 0;
}

/* ---- through the daemon (--socket) -------------------------------------------------------- */

struct skv_client_stream *skv_remote_open(const struct skv_opts *o, struct skv_client **c,
					  uint64_t seed)
{
	char msg[512] = "";
	int err = skv_client_connect(o->socket_path, c, msg, sizeof(msg));
	if (err < 0)
		skv_die(1, "%s", msg);
	skv_client_opts *co;
	if (skv_client_opts_new(&co) < 0)
		skv_die(1, "out of memory");
	/* The flags were checked when parsed; the daemon checks them against the model. */
	if (skv_client_opts_policy(co, (enum skv_client_policy)o->policy.kind) < 0 ||
	    skv_client_opts_evict(co, (enum skv_client_evict)o->policy.evict) < 0 ||
	    skv_client_opts_sinks(co, o->policy.sink_slots) < 0 ||
	    skv_client_opts_window(co, o->policy.window_slots) < 0 ||
	    skv_client_opts_abs_positions(co, o->policy.abs_positions) < 0 ||
	    (o->policy.kv_dtype &&
	     skv_client_opts_kv(co, (enum skv_client_kv)o->policy.kv_dtype) < 0) ||
	    skv_client_opts_sampling(co, o->temperature, o->top_p, seed) < 0)
		skv_die(SKV_EXIT_USAGE, "invalid stream options");
	struct skv_client_stream *s;
	if (skv_stream_name && skv_client_opts_resumable(co, skv_stream_name) < 0)
		skv_die(SKV_EXIT_USAGE, "--stream: '%s' is not 1 to %d of A-Z a-z 0-9 . _ -",
			skv_stream_name, SKV_CLIENT_NAME_MAX - 1);
	err = skv_client_stream_open(*c, co, &s);
	skv_client_opts_free(co);
	if (err < 0)
		skv_die(err == -EINVAL || err == -SKV_EINVAL_POLICY ? SKV_EXIT_USAGE : 1, "%s",
			skv_client_last_error(*c));
	return s;
}

/* Print a stream's prompt echo and tokens as they come, until its request ends. */
static int skv_remote_print(struct skv_client_stream *s, const struct skv_client_event *ev,
			    void *arg)
{
	(void)s;
	(void)arg;
	if (ev->type == SKV_CLIENT_EV_PROMPT || ev->type == SKV_CLIENT_EV_TOKEN) {
		fwrite(ev->text, 1, ev->len, stdout);
		fflush(stdout);
	} else if (ev->type == SKV_CLIENT_EV_ERROR) {
		skv_die(1, "%.*s", (int)ev->len, ev->text);
	}
	return 0;
}

/* Where --stream NAME keeps its token: $SKV_STREAM_DIR, else streams/ beside the default
 * socket (made 0700). */
static void skv_token_path(const char *name, char *path, size_t len)
{
	char dir[PATH_MAX];
	const char *env = getenv("SKV_STREAM_DIR");
	if (env && *env) {
		snprintf(dir, sizeof(dir), "%s", env);
	} else {
		if (skv_default_socket_path(dir, sizeof(dir)) < 0)
			skv_die(1, "the default socket path is too long; set SKV_STREAM_DIR");
		char *slash = strrchr(dir, '/');
		if (slash)
			*slash = '\0';
		mkdir(dir, 0700);
		snprintf(dir + strlen(dir), sizeof(dir) - strlen(dir), "/streams");
	}
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		skv_die(1, "cannot make %s: %s", dir, strerror(errno));
	if ((size_t)snprintf(path, len, "%s/%s.token", dir, name) >= len)
		skv_die(1, "%s: path too long", dir);
}

/* The token of --stream NAME: $SKV_STREAM_TOKEN, else its file; 0 if there is none yet. */
static int skv_token_read(const char *path, char token[SKV_CLIENT_TOKEN_MAX])
{
	const char *env = getenv("SKV_STREAM_TOKEN");
	if (env && *env) {
		snprintf(token, SKV_CLIENT_TOKEN_MAX, "%s", env);
		return 1;
	}
	FILE *f = fopen(path, "r");
	if (!f) {
		if (errno == ENOENT)
			return 0;
		skv_die(1, "%s: %s", path, strerror(errno));
	}
	char line[128] = "";
	if (!fgets(line, sizeof(line), f))
		line[0] = '\0';
	fclose(f);
	line[strcspn(line, "\r\n")] = '\0';
	snprintf(token, SKV_CLIENT_TOKEN_MAX, "%s", line);
	return 1;
}

static void skv_token_write(const char *path, const struct skv_client_resume *r)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		skv_die(1, "cannot keep the token of stream %s in %s: %s", r->name, path,
			strerror(errno));
	FILE *f = fdopen(fd, "w");
	if (!f || fprintf(f, "%s\n", r->token) < 0 || fclose(f) != 0)
		skv_die(1, "cannot write %s: %s", path, strerror(errno));
}

/* generate --stream NAME: attach if a token is known, else open it; first print what a
 * previous run left unread (its requests still in progress). */
static struct skv_client_stream *skv_stream_attach_or_open(struct skv_opts *o,
							    struct skv_client **c, uint64_t seed,
							    char *path, size_t path_len)
{
	char token[SKV_CLIENT_TOKEN_MAX];
	skv_token_path(skv_stream_name, path, path_len);
	if (!skv_token_read(path, token)) {
		struct skv_client_stream *s = skv_remote_open(o, c, seed);
		struct skv_client_resume r;
		if (skv_client_stream_resume_info(s, &r) < 0)
			skv_die(1, "the daemon did not make stream %s resumable", skv_stream_name);
		skv_token_write(path, &r);
		return s;
	}
	char msg[512] = "";
	int err = skv_client_connect(o->socket_path, c, msg, sizeof(msg));
	if (err < 0)
		skv_die(1, "%s", msg);
	struct skv_client_stream *s;
	err = skv_client_stream_attach(*c, skv_stream_name, token, &s);
	if (err < 0)
		skv_die(1, "stream %s: %s (remove %s to start a new stream of that name)",
			skv_stream_name, skv_client_last_error(*c), path);
	while (skv_client_stream_pending(s) && (err = skv_client_stream_run(s, skv_remote_print,
									     NULL)) == 0)
		;
	if (err < 0)
		skv_die(1, "%s", skv_client_last_error(*c));
	return s;
}

static int skv_remote_generate(struct skv_opts *o, int argc, char **argv)
{
	if (argc > 1)
		skv_die(SKV_EXIT_USAGE, "generate takes one PROMPT argument (quote it), got %d",
			argc);
	const char *prompt = argc ? argv[0] : "";
	struct skv_client *c;
	uint64_t seed = o->have_seed ? o->seed : (uint64_t)time(NULL);
	char token_path[PATH_MAX] = "";
	struct skv_client_stream *s = skv_stream_name
		? skv_stream_attach_or_open(o, &c, seed, token_path, sizeof(token_path))
		: skv_remote_open(o, &c, seed);
	int err = skv_client_stream_generate(s, prompt, strlen(prompt), (uint64_t)o->steps, 0);
	if (!err)
		err = skv_client_stream_run(s, skv_remote_print, NULL);
	if (err < 0)
		skv_die(1, "%s", skv_client_last_error(c));
	fputc('\n', stdout);
	if (skv_stream_name && !skv_stream_close) {
		if (skv_client_stream_detach(s) < 0)
			skv_die(1, "%s", skv_client_last_error(c));
	} else {
		skv_client_stream_close(s);
		if (skv_stream_name && unlink(token_path) < 0 && errno != ENOENT)
			skv_die(1, "cannot remove %s: %s", token_path, strerror(errno));
	}
	skv_client_disconnect(c);
	return 0;
}

static int skv_remote_ppl(struct skv_opts *o, int argc, char **argv)
{
	if (argc != 1)
		skv_die(SKV_EXIT_USAGE, "usage: skv ppl [flags] FILE");
	size_t len;
	char *text = skv_slurp(argv[0], &len);
	if (!len)
		skv_die(1, "%s: no text to score", argv[0]);
	struct skv_client *c;
	struct skv_client_stream *s = skv_remote_open(o, &c, 1);
	int err = skv_client_stream_score(s, text, len,
					  o->max_tokens > 0 ? (uint64_t)o->max_tokens : 0);
	if (err < 0)
		skv_die(1, "%s", skv_client_last_error(c));
	free(text);
	struct skv_client_event ev;
	do {
		err = skv_client_stream_read(s, &ev, -1);
		if (err < 0)
			skv_die(1, "%s", skv_client_last_error(c));
		if (ev.type == SKV_CLIENT_EV_ERROR)
			skv_die(1, "%.*s", (int)ev.len, ev.text);
	} while (ev.type != SKV_CLIENT_EV_SCORED);
	double ppl = exp(ev.nll / (double)ev.count);
	struct skv_client_stream_info info;
	skv_client_stream_info(s, &info);
	skv_print_ppl(o, ppl, (size_t)ev.count, o->policy.kind, info.sinks, info.window,
		      o->policy.abs_positions);
	skv_client_stream_close(s);
	skv_client_disconnect(c);
	return 0;
}

/* Output that cannot be written (a full disk, a closed pipe) is an error, not a success. */
static void skv_close_stdout(void)
{
	if (fclose(stdout) != 0) {
		fprintf(stderr, "skv: cannot write the output: %s\n", strerror(errno));
		_exit(1);
	}
}

static void skv_check_flags(const struct skv_opts *o, const char *cmd, unsigned allowed)
{
	static const struct {
		unsigned bit;
		const char *flags;
	} groups[] = {
		{ SKV_FLAG_STEPS, "-n is for generate (chat: --max-answer)" },
		{ SKV_FLAG_SAMPLING, "--temp, --top-p, --seed and --stats are for generate and chat" },
		{ SKV_FLAG_PPL, "--tokens and --json are for ppl" },
		{ SKV_FLAG_POLICY, "cache policy flags are for generate, ppl and chat" },
		{ SKV_FLAG_CHAT, "--turns, --template, --max-answer and --echo are for chat" },
	};
	for (size_t i = 0; i < sizeof(groups) / sizeof(*groups); i++)
		if ((o->given & groups[i].bit) && !(allowed & groups[i].bit))
			skv_die(SKV_EXIT_USAGE, "%s: %s", cmd, groups[i].flags);
}

int main(int argc, char **argv)
{
	/* Static: what the options hold (the chat template) lives until exit, reachable. */
	static struct skv_opts o;
	atexit(skv_close_stdout);
	int first = skv_parse_opts(argc, argv, &o);
	if (first >= argc)
		skv_die(SKV_EXIT_USAGE, "no command given (generate, tokenize, ppl, chat; see skv --help)");
	const char *cmd = argv[first];
	int remote = o.socket_path != NULL;
	if ((skv_stream_name || skv_stream_close) && (strcmp(cmd, "generate") || !remote))
		skv_die(SKV_EXIT_USAGE, "--stream is for generate through the daemon (--socket)");
	if (skv_stream_close && !skv_stream_name)
		skv_die(SKV_EXIT_USAGE, "--stream-close needs --stream NAME");
	if (!strcmp(cmd, "generate")) {
		skv_check_flags(&o, cmd, SKV_FLAG_STEPS | SKV_FLAG_SAMPLING | SKV_FLAG_POLICY);
		return (remote ? skv_remote_generate : skv_cmd_generate)(&o, argc - first - 1,
									argv + first + 1);
	}
	if (!strcmp(cmd, "tokenize")) {
		skv_check_flags(&o, cmd, 0);
		if (remote)
			skv_die(SKV_EXIT_USAGE, "tokenize runs locally: drop --socket");
		return skv_cmd_tokenize(&o, argc - first - 1, argv + first + 1);
	}
	if (!strcmp(cmd, "ppl")) {
		skv_check_flags(&o, cmd, SKV_FLAG_PPL | SKV_FLAG_POLICY);
		return (remote ? skv_remote_ppl : skv_cmd_ppl)(&o, argc - first - 1,
							      argv + first + 1);
	}
	if (!strcmp(cmd, "chat")) {
		skv_check_flags(&o, cmd, SKV_FLAG_SAMPLING | SKV_FLAG_POLICY | SKV_FLAG_CHAT);
		return skv_cmd_chat(&o, argc - first - 1, argv + first + 1);
	}
	skv_die(SKV_EXIT_USAGE,
		"unknown command '%s' (generate, tokenize, ppl, chat; see skv --help)", cmd);
}
