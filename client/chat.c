/* skv chat: the streaming chatbot of the StreamingLLM paper, on one endless stream.
 *
 * Every turn (a line from the terminal, or from --turns FILE as the paper feeds its benchmark's
 * turns into one conversation) is put into the template, fed to the same stream as everything
 * before it, and answered token by token. A template is a chat format of engine/chat-template.h
 * (named, or recognized from the model's tokenizer.chat_template with --template auto), whose
 * new-turn text closes the previous answer and opens the next one, or a text of the user's with
 * {turn} in it. A format with special tokens (<|im_end|>, </s>) has them encoded as their ids,
 * here and through the daemon (SKV_CLIENT_SPECIAL). The stream's cache never grows: its sinks stay the
 * first tokens of the conversation and its window the latest ones, so the conversation goes on
 * for as long as the user likes in the memory of one stream. Locally the engine runs in this
 * process; with --socket the daemon serves the stream and this process only prints what its
 * engine sends. Both print the same bytes.
 *
 * Per-token eviction slides the window one token at a time; per-prompt eviction (--evict
 * prompt) frees room for a whole turn and its longest answer before the turn is fed, so a turn
 * must fit the window with --max-answer tokens to spare: a turn that does not is refused here
 * (the engine would evict the whole window and then go on per token).
 *
 * Ctrl-C stops the answer being written (locally before the next token is fed; through the
 * daemon by skv_client_stream_cancel once the answer's first token came, so that the whole turn
 * is in the cache either way) and the chat goes on with the next turn. Ctrl-C while waiting for
 * a turn ends the chat as the end of the input does; two within a second end it too (a file of
 * turns never waits), with exit status 130.
 *
 * Through the daemon, the turns are tokenized here too (with the tokenizer of --model, the
 * shipped model by default: the daemon's own) to count the tokens fed and check that turns fit.
 * Of an answer, every token but the last sampled one is fed back into the stream: the last one
 * (or the end-of-text token) would only be fed to compute a next token nobody asked for, as the
 * engine does; the next turn follows it in the text. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chat-template.h"
#include "chat.h"
#include "forward.h"
#include "gguf.h"
#include "model.h"
#include "sampler.h"
#include "skv-error.h"
#include "tokenizer.h"

#define CHAT_PLACEHOLDER "{turn}"
#define CHAT_READ_CHUNK 4096
#define CHAT_POLL_MS 100          /* how often a waiting reader looks for Ctrl-C */
#define CHAT_QUIT_WITHIN_S 1.0    /* two Ctrl-C this close end the chat */
#define CHAT_EXIT_INTERRUPTED 130 /* 128 + SIGINT, as a shell reports it */

/* Set by the SIGINT handler, cleared when a turn starts. */
static volatile sig_atomic_t chat_interrupted;
static volatile sig_atomic_t chat_quit;
static struct timespec chat_last_sigint; /* the handler's own */

static void chat_on_sigint(int sig)
{
	(void)sig;
	int saved_errno = errno;
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	double since = (double)(now.tv_sec - chat_last_sigint.tv_sec) +
		       (double)(now.tv_nsec - chat_last_sigint.tv_nsec) * 1e-9;
	if (chat_last_sigint.tv_sec && since < CHAT_QUIT_WITHIN_S)
		chat_quit = 1;
	chat_last_sigint = now;
	chat_interrupted = 1;
	errno = saved_errno;
}

/* Where the turns come from: a line reader over a file descriptor that gives up its wait when
 * Ctrl-C comes (poll is interrupted even though the handler asks for restarted calls, which
 * keep output written to a slow pipe whole). */
struct chat_input {
	int fd;
	const char *name;       /* for messages */
	int from_file;          /* --turns: no turns at all is an error, so is a bad turn */
	int prompt;             /* print "> " before each turn (the terminal, no --turns) */
	char *buf;              /* [cap] bytes read; [start, len) not yet returned */
	size_t start, len, cap;
	int eof;
	unsigned long line;     /* line number of the turn last returned */
};

static void chat_input_open(struct chat_input *in, const struct skv_opts *o)
{
	memset(in, 0, sizeof(*in));
	in->from_file = o->turns_path != NULL;
	if (!o->turns_path || !strcmp(o->turns_path, "-")) {
		in->fd = STDIN_FILENO;
		in->name = "stdin";
		in->prompt = !o->turns_path && isatty(STDIN_FILENO);
		return;
	}
	in->name = o->turns_path;
	in->fd = open(o->turns_path, O_RDONLY | O_CLOEXEC);
	if (in->fd < 0)
		skv_die(1, "%s: cannot open: %s", o->turns_path, strerror(errno));
	struct stat st;
	if (fstat(in->fd, &st) == 0 && S_ISDIR(st.st_mode))
		skv_die(1, "%s: is a directory, not a file of turns", o->turns_path);
}

static void chat_input_close(struct chat_input *in)
{
	if (in->fd != STDIN_FILENO)
		close(in->fd);
	free(in->buf);
}

static int chat_blank(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\v' && s[i] != '\f')
			return 0;
	return 1;
}

/* The next non-blank line, without its line end, NUL-terminated in in->buf until the next
 * call. Returns 1, 0 at the end of the input, or -EINTR when Ctrl-C came while waiting. */
static int chat_next_turn(struct chat_input *in, char **turn, size_t *len)
{
	int prompted = 0;
	for (;;) {
		size_t avail = in->len - in->start;
		char *line = avail ? in->buf + in->start : NULL;
		char *nl = avail ? memchr(line, '\n', avail) : NULL;
		if (nl || (in->eof && avail)) {
			size_t n = nl ? (size_t)(nl - line) : avail;
			in->start += n + (nl != NULL);
			in->line++;
			prompted = 0;
			if (n && line[n - 1] == '\r')
				n--;
			line[n] = '\0'; /* the newline's place, or the spare byte past len */
			if (chat_blank(line, n))
				continue;
			if (memchr(line, '\0', n))
				skv_die(1, "%s:%lu: the turn holds a NUL byte", in->name, in->line);
			*turn = line;
			*len = n;
			return 1;
		}
		if (in->eof)
			return 0;
		if (in->prompt && !prompted) {
			fputs("> ", stderr);
			prompted = 1;
		}
		if (in->start) {
			memmove(in->buf, in->buf + in->start, avail);
			in->start = 0;
			in->len = avail;
		}
		if (in->cap - in->len < CHAT_READ_CHUNK + 1) {
			size_t cap = in->cap ? in->cap * 2 : 2 * CHAT_READ_CHUNK;
			char *buf = realloc(in->buf, cap);
			if (!buf)
				skv_die(1, "%s: out of memory for a turn", in->name);
			in->buf = buf;
			in->cap = cap;
		}
		struct pollfd pfd = { .fd = in->fd, .events = POLLIN };
		if (poll(&pfd, 1, -1) < 0) {
			if (errno != EINTR)
				skv_die(1, "%s: cannot wait for input: %s", in->name, strerror(errno));
			if (chat_interrupted)
				return -EINTR;
			continue;
		}
		ssize_t got = read(in->fd, in->buf + in->len, in->cap - in->len - 1);
		if (got < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			skv_die(1, "%s: read error: %s", in->name, strerror(errno));
		}
		if (got == 0)
			in->eof = 1;
		in->len += (size_t)got;
	}
}

char *skv_chat_parse_template(const char *text)
{
	char *t = malloc(strlen(text) + 1);
	if (!t)
		skv_die(1, "out of memory");
	char *w = t;
	for (const char *r = text; *r; r++) {
		if (*r != '\\') {
			*w++ = *r;
			continue;
		}
		r++;
		switch (*r) {
		case 'n': *w++ = '\n'; break;
		case 't': *w++ = '\t'; break;
		case '\\': *w++ = '\\'; break;
		case '\0': skv_die(SKV_EXIT_USAGE, "--template: it ends in a lone backslash");
		default:
			skv_die(SKV_EXIT_USAGE, "--template: unknown escape '\\%c' (\\n, \\t, \\\\)",
				*r);
		}
	}
	*w = '\0';
	if (!strstr(t, CHAT_PLACEHOLDER))
		skv_die(SKV_EXIT_USAGE,
			"--template: '%s' has no %s: the template must say where the turn goes",
			text, CHAT_PLACEHOLDER);
	return t;
}

void skv_chat_check_template(const char *arg)
{
	if (strstr(arg, CHAT_PLACEHOLDER)) {
		free(skv_chat_parse_template(arg));
		return;
	}
	if (strcmp(arg, "auto") && !skv_chat_template_find(arg))
		skv_die(SKV_EXIT_USAGE,
			"--template: unknown format '%s' (%s, auto, or a text holding %s)", arg,
			skv_chat_template_names(), CHAT_PLACEHOLDER);
}

/* The template with every {turn} replaced by the turn (malloc'ed). */
static char *chat_fill(const char *template, const char *turn, size_t turn_len, size_t *len)
{
	const size_t ph = strlen(CHAT_PLACEHOLDER);
	size_t count = 0;
	for (const char *p = template; (p = strstr(p, CHAT_PLACEHOLDER)); p += ph)
		count++;
	size_t n = strlen(template) - count * ph + count * turn_len;
	char *text = malloc(n + 1), *w = text;
	if (!text)
		skv_die(1, "out of memory for a turn");
	for (const char *p = template;;) {
		const char *at = strstr(p, CHAT_PLACEHOLDER);
		size_t keep = at ? (size_t)(at - p) : strlen(p);
		memcpy(w, p, keep);
		w += keep;
		if (!at)
			break;
		memcpy(w, turn, turn_len);
		w += turn_len;
		p = at + ph;
	}
	*w = '\0';
	*len = n;
	return text;
}

enum chat_end { CHAT_END_LENGTH, CHAT_END_EOS, CHAT_END_CANCELLED };

struct chat {
	const struct skv_opts *o;
	struct skv_local L;             /* tokenizer always; runner only locally */
	/* local */
	struct skv_stream *s;
	struct skv_sampler sampler;
	float *logits;                  /* [vocab] */
	/* through the daemon */
	struct skv_client *client;
	struct skv_client_stream *cs;
	uint64_t stream_id;
	/* the conversation */
	const char *policy;
	int64_t sinks, window;          /* resolved */
	int evict_prompt;
	uint64_t turns, fed, cancelled;
	uint64_t kv_first, kv_last;     /* the stream's KV bytes when opened, and now */
	int kv_constant;
	int trim;                       /* drop the answer's leading spaces (no --echo) */
	/* the template: a format, or the user's text with {turn} (escapes decoded) */
	const struct skv_chat_template *format;
	char *custom;
};

/* One answer's piece on stdout as it comes. */
static void chat_emit(struct chat *ch, const char *piece, size_t len)
{
	if (ch->trim) {
		while (len && *piece == ' ') {
			piece++;
			len--;
		}
		if (!len)
			return;
		ch->trim = 0;
	}
	skv_emit(piece, len);
	fflush(stdout);
}

/* Generate the answer after ids (already encoded) locally. Returns the tokens sampled (the
 * end-of-text token included), as the engine's DONE counts them. */
static uint64_t chat_answer_local(struct chat *ch, const int32_t *ids, size_t n,
				  enum chat_end *end)
{
	const struct skv_policy *p = skv_stream_policy(ch->s);
	skv_stream_make_room(ch->s, n + (uint64_t)ch->o->max_answer);
	skv_feed_or_die(ch->s, ids, n, ch->logits, p);
	int32_t prev = ids[n - 1];
	uint64_t made = 0;
	*end = CHAT_END_LENGTH;
	for (;;) {
		int32_t next = skv_sampler_sample(&ch->sampler, ch->logits);
		made++;
		if (skv_tokenizer_is_end(ch->L.tok, next)) { /* llama2.c's BOS, or EOS/EOT */
			*end = CHAT_END_EOS;
			break;
		}
		size_t len;
		const char *piece = skv_tokenizer_decode(ch->L.tok, prev, next, &len);
		/* What the engine would send: pieces the vocabulary prints (the daemon's path gets
		 * them filtered the same way). */
		if (skv_tokenizer_prints(ch->L.tok, next, piece, len))
			chat_emit(ch, piece, len);
		prev = next;
		if (made >= (uint64_t)ch->o->max_answer)
			break;
		if (chat_interrupted) {
			*end = CHAT_END_CANCELLED;
			break;
		}
		skv_feed_or_die(ch->s, &next, 1, ch->logits, p);
	}
	return made;
}

/* The same through the daemon: the engine feeds and samples, we print its tokens. Ctrl-C is
 * passed on once the first token came, so that the whole turn is in the cache, as locally. */
static uint64_t chat_answer_remote(struct chat *ch, const char *text, size_t len,
				   enum chat_end *end)
{
	unsigned flags = ch->format && skv_chat_template_special(ch->format) ? SKV_CLIENT_SPECIAL : 0;
	int err = skv_client_stream_generate(ch->cs, text, len, (uint64_t)ch->o->max_answer, flags);
	if (err < 0)
		skv_die(1, "%s", skv_client_last_error(ch->client));
	int cancel_sent = 0, answering = 0;
	for (;;) {
		if (chat_interrupted && answering && !cancel_sent) {
			err = skv_client_stream_cancel(ch->cs);
			if (err < 0)
				skv_die(1, "%s", skv_client_last_error(ch->client));
			cancel_sent = 1;
		}
		struct skv_client_event ev;
		err = skv_client_stream_read(ch->cs, &ev, cancel_sent ? -1 : CHAT_POLL_MS);
		if (err < 0)
			skv_die(1, "%s", skv_client_last_error(ch->client));
		if (!err)
			continue;
		switch (ev.type) {
		case SKV_CLIENT_EV_TOKEN:
			answering = 1;
			chat_emit(ch, ev.text, ev.len);
			break;
		case SKV_CLIENT_EV_PROMPT: break; /* the turn is echoed from its text */
		case SKV_CLIENT_EV_ERROR: skv_die(1, "%.*s", (int)ev.len, ev.text);
		case SKV_CLIENT_EV_DONE:
			*end = ev.reason == SKV_CLIENT_DONE_EOS	? CHAT_END_EOS
			       : ev.reason == SKV_CLIENT_DONE_CANCELLED ? CHAT_END_CANCELLED
									: CHAT_END_LENGTH;
			return ev.count;
		default: skv_die(1, "the daemon sent an event of type %d to a chat", (int)ev.type);
		}
	}
}

static uint64_t chat_kv_bytes(const struct chat *ch)
{
	if (ch->s)
		return skv_stream_kv_bytes(ch->s);
	struct skv_client_stream_info info;
	skv_client_stream_info(ch->cs, &info);
	return info.kv_bytes;
}

/* Feed one turn and answer it. Returns 0, or 1 when the turn was refused (the terminal goes on
 * with the next one; from a file, the refusal ends the chat before this returns). */
static int chat_turn(struct chat *ch, struct chat_input *in, const char *turn, size_t turn_len)
{
	const struct skv_opts *o = ch->o;
	size_t text_len;
	char *text;
	int special = 0;
	if (ch->custom) {
		text = chat_fill(ch->custom, turn, turn_len, &text_len);
	} else {
		/* The new turn only: after the first, the stream holds the previous answer but
		 * not its end, which the format writes before the turn (chat-template.h). */
		const struct skv_chat_message turns[] = {
			{ "user", "", 0 },
			{ "assistant", "", 0 },
			{ "user", turn, turn_len },
		};
		size_t from = ch->turns ? 0 : 2;
		if (skv_chat_template_render(ch->format, turns + from, 3 - from, ch->turns ? 2 : 0,
					     1, &text, &text_len) < 0)
			skv_die(1, "out of memory for a turn");
		special = skv_chat_template_special(ch->format);
	}
	int32_t *ids;
	size_t n_ids;
	if ((special ? skv_tokenizer_encode_special : skv_tokenizer_encode)(
		    ch->L.tok, text, text_len, ch->fed == 0 && skv_tokenizer_add_bos(ch->L.tok), 0,
		    &ids, &n_ids) < 0)
		skv_die(1, "out of memory encoding a turn");
	uint64_t need = (uint64_t)n_ids + (uint64_t)o->max_answer;
	if (ch->evict_prompt && need > (uint64_t)ch->window) {
		char where[PATH_MAX + 32] = "";
		if (in->from_file)
			snprintf(where, sizeof(where), "%s:%lu: ", in->name, in->line);
		fprintf(stderr,
			"skv: %sthe turn is %zu tokens: with --max-answer %lld it needs %llu of the "
			"%lld window slots at once (--evict prompt); shorten it, lower --max-answer or "
			"raise --window\n",
			where, n_ids, o->max_answer, (unsigned long long)need, (long long)ch->window);
		if (in->from_file)
			exit(1);
		free(ids);
		free(text);
		return 1;
	}

	chat_interrupted = 0;
	if (o->echo) {
		fwrite(text, 1, text_len, stdout);
		fflush(stdout);
	}
	ch->trim = !o->echo && (ch->custom || skv_chat_template_trims(ch->format));
	double t0 = skv_now();
	enum chat_end end;
	uint64_t sampled = ch->s ? chat_answer_local(ch, ids, n_ids, &end)
				 : chat_answer_remote(ch, text, text_len, &end);
	fputc('\n', stdout);
	fflush(stdout);
	double ms = (skv_now() - t0) * 1e3;

	ch->turns++;
	ch->cancelled += end == CHAT_END_CANCELLED;
	/* What the stream now holds more: the turn, and every answer token but the last
	 * sampled one (see the file comment). Locally the stream says so itself. */
	if (ch->s)
		ch->fed = skv_stream_tokens_seen(ch->s);
	else
		ch->fed += n_ids + (sampled ? sampled - 1 : 0);
	uint64_t kv = chat_kv_bytes(ch);
	if (kv != ch->kv_first)
		ch->kv_constant = 0;
	ch->kv_last = kv;
	if (o->stats) {
		static const char *const ends[] = { "length", "end of text", "cancelled" };
		uint64_t answer = sampled - (end == CHAT_END_EOS);
		char stream[48] = "";
		if (ch->cs)
			snprintf(stream, sizeof(stream), ", stream %llu",
				 (unsigned long long)ch->stream_id);
		fprintf(stderr,
			"chat: turn %llu: %zu + %llu tokens (%s) in %.1f ms; %llu fed in all, kv %llu "
			"bytes%s\n",
			(unsigned long long)ch->turns, n_ids, (unsigned long long)answer, ends[end],
			ms, (unsigned long long)ch->fed, (unsigned long long)kv, stream);
	}
	free(ids);
	free(text);
	return 0;
}

static void chat_open_local(struct chat *ch)
{
	const struct skv_opts *o = ch->o;
	skv_local_open(o, &ch->L, 1);
	struct skv_policy policy = o->policy;
	ch->s = skv_open_stream(&ch->L, &policy);
	const struct skv_policy *p = skv_stream_policy(ch->s);
	ch->sinks = p->sink_slots;
	ch->window = p->window_slots;
	int32_t vocab = ch->L.model->cfg.vocab_size;
	uint64_t seed = o->have_seed ? o->seed : (uint64_t)time(NULL);
	if (skv_sampler_init(&ch->sampler, vocab, o->temperature, o->top_p, seed) < 0)
		skv_die(1, "out of memory");
	ch->logits = malloc((size_t)vocab * sizeof(float));
	if (!ch->logits)
		skv_die(1, "out of memory");
}

static void chat_open_remote(struct chat *ch)
{
	const struct skv_opts *o = ch->o;
	skv_local_open(o, &ch->L, 0); /* the tokenizer, to count tokens */
	uint64_t seed = o->have_seed ? o->seed : (uint64_t)time(NULL);
	ch->cs = skv_remote_open(o, &ch->client, seed);
	struct skv_client_stream_info info;
	skv_client_stream_info(ch->cs, &info);
	ch->stream_id = info.id;
	ch->sinks = info.sinks;
	ch->window = info.window;
}

static void chat_close(struct chat *ch)
{
	if (ch->s) {
		skv_stream_free(ch->s);
		skv_sampler_fini(&ch->sampler);
		free(ch->logits);
	}
	skv_client_stream_close(ch->cs);
	skv_client_disconnect(ch->client);
	skv_local_close(&ch->L);
	free(ch->custom);
}

/* --template: the user's text, a named format, or the one the model's GGUF names (auto). */
static void chat_pick_template(struct chat *ch)
{
	const char *arg = ch->o->chat_template ? ch->o->chat_template : SKV_CHAT_DEFAULT_TEMPLATE;
	if (strstr(arg, CHAT_PLACEHOLDER)) {
		ch->custom = skv_chat_parse_template(arg);
		return;
	}
	if (strcmp(arg, "auto")) {
		ch->format = skv_chat_template_find(arg);
		if (!ch->format)
			skv_die(SKV_EXIT_USAGE, "--template: unknown format '%s' (%s)", arg,
				skv_chat_template_names());
		return;
	}
	struct skv_gguf_str jinja;
	if (!ch->L.model->gguf ||
	    skv_gguf_get_str(ch->L.model->gguf, "tokenizer.chat_template", &jinja) < 0)
		skv_die(SKV_EXIT_USAGE,
			"--template auto: the model has no tokenizer.chat_template; name a format "
			"(%s)", skv_chat_template_names());
	if (skv_chat_template_recognize(jinja.ptr, (size_t)jinja.len, &ch->format) < 0)
		skv_die(SKV_EXIT_USAGE,
			"--template auto: the model's tokenizer.chat_template is none of the formats "
			"known here; name one (%s)", skv_chat_template_names());
}

int skv_cmd_chat(struct skv_opts *o, int argc, char **argv)
{
	(void)argv;
	if (argc > 0)
		skv_die(SKV_EXIT_USAGE,
			"chat takes no arguments: turns come from the terminal or --turns FILE");
	struct chat_input in;
	chat_input_open(&in, o);
	/* A file of turns is checked before the model is loaded or the daemon asked. */
	char *turn = NULL;
	size_t turn_len = 0;
	int got = 0;
	if (in.from_file) {
		got = chat_next_turn(&in, &turn, &turn_len);
		if (got == 0)
			skv_die(1, "%s: no turns in it (one turn per line; blank lines are skipped)",
				in.name);
	}

	struct chat ch = { .o = o, .kv_constant = 1 };
	ch.policy = skv_policy_name(o->policy.kind);
	ch.evict_prompt = o->policy.evict == SKV_EVICT_PROMPT;
	if (o->socket_path)
		chat_open_remote(&ch);
	else
		chat_open_local(&ch);
	if (ch.evict_prompt && o->max_answer >= ch.window)
		skv_die(SKV_EXIT_USAGE,
			"--max-answer %lld leaves no room for a turn in the %lld window slots with "
			"--evict prompt; lower --max-answer or raise --window",
			o->max_answer, (long long)ch.window);
	chat_pick_template(&ch);
	ch.kv_first = ch.kv_last = chat_kv_bytes(&ch);

	struct sigaction sa = { .sa_handler = chat_on_sigint, .sa_flags = SA_RESTART };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);

	int status = 0;
	for (;;) {
		if (!got) {
			chat_interrupted = 0;
			got = chat_next_turn(&in, &turn, &turn_len);
			if (got <= 0) {
				if (in.prompt)
					fputc('\n', stderr);
				break;
			}
		}
		chat_turn(&ch, &in, turn, turn_len);
		got = 0;
		if (chat_quit) {
			status = CHAT_EXIT_INTERRUPTED;
			break;
		}
	}
	char cancelled[48] = "";
	if (ch.cancelled)
		snprintf(cancelled, sizeof(cancelled), "; %llu answer%s cancelled",
			 (unsigned long long)ch.cancelled, ch.cancelled == 1 ? "" : "s");
	fprintf(stderr,
		"chat: %llu turns, %llu tokens fed; cache %lld sinks + %lld window slots (%s, "
		"evict %s); kv %llu bytes, %s%s\n",
		(unsigned long long)ch.turns, (unsigned long long)ch.fed, (long long)ch.sinks,
		(long long)ch.window, ch.policy, ch.evict_prompt ? "prompt" : "token",
		(unsigned long long)ch.kv_last, ch.kv_constant ? "constant" : "not constant",
		cancelled);
	chat_close(&ch);
	chat_input_close(&in);
	return status;
}
