/* skv chat (client/chat.c), and what it shares with the rest of the skv CLI (client/skv.c):
 * the parsed flags, the local engine, and the helpers that end the process with one line on
 * stderr. Only the skv executable uses this header; nothing here is a library interface. */
#ifndef SKV_CHAT_H
#define SKV_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "skv-client.h"
#include "stream.h"

#define SKV_EXIT_USAGE 2

struct skv_opts {
	const char *model_path;
	const char *tokenizer_path;
	const char *socket_path;
	struct skv_policy policy;
	long long steps;        /* generate: tokens to produce */
	float temperature;
	float top_p;
	unsigned long long seed;
	int have_seed;
	long long max_tokens;   /* ppl: predictions to score, -1 = all */
	int json;
	int stats;
	long long threads;      /* OpenMP threads of the forward pass */
	const char *turns_path; /* chat: file of turns, "-" = stdin; NULL: the terminal */
	const char *chat_template; /* chat: --template as given: a format's name, "auto", or a
				    * text holding "{turn}"; NULL: SKV_CHAT_DEFAULT_TEMPLATE */
	long long max_answer;   /* chat: tokens per answer */
	int echo;               /* chat: print each turn before its answer */
	unsigned given;         /* SKV_FLAG_* bits of the command-specific flags given */
};

/* Everything a local command needs: model, tokenizer, runner (NULL when only tokenizing). */
struct skv_local {
	struct skv_model *model;
	struct skv_tokenizer *tok;
	struct skv_runner *runner;
};

/* "skv: " + the message + newline on stderr, then exit(code). */
void skv_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

/* The model and its tokenizer (with_runner: and a runner), or die with the reason. */
void skv_local_open(const struct skv_opts *o, struct skv_local *L, int with_runner);
void skv_local_close(struct skv_local *L);
/* Resolve policy against the model and open a local stream, or die (2 for a bad policy). */
struct skv_stream *skv_open_stream(struct skv_local *L, struct skv_policy *policy);
/* Feed tokens; dies with a clear line when the dense cache is full or the pass fails. */
void skv_feed_or_die(struct skv_stream *s, const int32_t *tokens, size_t n, float *logits,
		     const struct skv_policy *p);
/* Write a decoded piece on stdout as llama2.c does (lone control bytes dropped). */
void skv_emit(const char *piece, size_t len); /* to stdout as is (callers filter) */
double skv_now(void);
/* Connect to the daemon and open a stream with the flags' policy and sampling, or die. */
struct skv_client_stream *skv_remote_open(const struct skv_opts *o, struct skv_client **c,
					  uint64_t seed);

/* Turn "User: {turn}\n" as typed on the command line (\n, \t, \\ decoded) into a template
 * (malloc'ed: the caller frees it); dies with exit status 2 on an unknown escape or a template
 * without {turn}. */
char *skv_chat_parse_template(const char *text);
/* Check --template's argument as flags are parsed: a text holding {turn} must parse, anything
 * else must be "auto" or a format engine/chat-template.h knows; dies with exit status 2. */
void skv_chat_check_template(const char *arg);
/* The format when --template is not given (the shipped story model's). */
#define SKV_CHAT_DEFAULT_TEMPLATE "story"
#define SKV_CHAT_DEFAULT_MAX_ANSWER 128

/* skv chat: locally (o->socket_path NULL) or through the daemon. argc/argv: the arguments
 * after the command (none are taken). Returns the exit status. */
int skv_cmd_chat(struct skv_opts *o, int argc, char **argv);

#endif
