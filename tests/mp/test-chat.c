/* skv chat through a real daemon: the paper's streaming chatbot, many turns on one stream.
 *
 * - 160 turns fed into one conversation with a window of 60: it completes; the stream's KV
 *   bytes and the daemon's arena use never change; at the end the daemon's own view of the
 *   stream (the admin protocol: ring state and the token id of every slot) shows the sinks
 *   still holding BOS and the first turn's first tokens, the window holding the latest turn and
 *   answer, and as many tokens seen as the CLI says it fed.
 * - greedy (and seeded) chat through the daemon prints what local mode prints, byte for byte,
 *   with per-token and per-prompt eviction.
 * - cancelling: through libskv, an endless answer cancelled ends with DONE reason CANCELLED
 *   and the next turn is answered, the cache holding exactly what was fed; through the CLI,
 *   SIGINT during an answer (local and through the daemon) cancels that answer only.
 * Every wait is bounded; every check is an assertion. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model.h"
#include "mputil.h"
#include "skv-error.h"
#include "testutil.h"
#include "tokenizer.h"

#define CHAT_TEMPLATE "Tom said, \"%s\"\nMom said," /* skv chat's default, filled in */
#define CHAT_WINDOW 60
#define CHAT_SINKS 4
#define CHAT_TURNS 160
#define CHAT_WAIT_S 120.0
#define CHAT_ADMIN_TIMEOUT_MS 5000
#define CHAT_PIPE_BYTES 4096 /* the smallest pipe: a long echo blocks in it */

extern char **environ;

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(chat, .init = suite_init, .fini = suite_fini, .timeout = 300);

/* ---- helpers ------------------------------------------------------------------------------ */

/* n turns, one per line, varied but the same every run. */
static char *chat_turns_text(size_t n)
{
	static const char *const asks[] = { "Where is", "Can I play with", "I like", "Look at",
					    "Do you see", "Let us find", "Why is", "I lost" };
	static const char *const things[] = { "the dog", "the cat", "Lily", "the big ball",
					      "the bird", "the red car", "Mom", "the tree" };
	size_t cap = n * 48 + 1, len = 0;
	char *text = malloc(cap);
	cr_assert(text != NULL);
	for (size_t i = 0; i < n; i++)
		len += (size_t)snprintf(text + len, cap - len, "%s %s?\n", asks[(i * 5) % 8],
					things[(i * 3 + i / 8) % 8]);
	return text;
}

static const char *chat_turns_file(size_t n)
{
	char *text = chat_turns_text(n);
	const char *path = tu_write_scratch("turns.txt", text, strlen(text));
	free(text);
	return path;
}

/* The n-th turn of chat_turns_text (0-based), filled into the template. */
static void chat_filled(size_t i, char *buf, size_t len)
{
	char *text = chat_turns_text(i + 1), *line = text;
	for (size_t k = 0; k < i; k++)
		line = strchr(line, '\n') + 1;
	*strchr(line, '\n') = '\0';
	snprintf(buf, len, CHAT_TEMPLATE, line);
	free(text);
}

struct chat_tok {
	struct skv_model *model;
	struct skv_tokenizer *tok;
};

static void chat_tok_open(struct chat_tok *t)
{
	char msg[256] = "";
	cr_assert(skv_model_open(tu_model_path("stories260K.bin"), &t->model, msg, sizeof(msg)) ==
			  0,
		  "%s", msg);
	cr_assert(skv_tokenizer_load(tu_model_path("tok512.bin"), t->model->cfg.vocab_size,
				     &t->tok, msg, sizeof(msg)) == 0,
		  "%s", msg);
}

static void chat_tok_close(struct chat_tok *t)
{
	skv_tokenizer_free(t->tok);
	skv_model_close(t->model);
}

/* A running skv chat with its stdin, stdout and stderr on pipes. */
struct chat_proc {
	pid_t pid;
	int in, out, err;  /* our ends; -1 once closed */
	char *out_text, *err_text;
	size_t out_len, err_len;
};

static void chat_spawn(struct chat_proc *p, const char *const *args, int small_stdout)
{
	const char *argv[40];
	unsigned argc = 0;
	argv[argc++] = mp_env_path("SKV_BIN");
	for (; *args; args++) {
		cr_assert(argc < 39);
		argv[argc++] = *args;
	}
	argv[argc] = NULL;
	int in[2], out[2], err[2];
	cr_assert(pipe2(in, O_CLOEXEC) == 0 && pipe2(out, O_CLOEXEC) == 0 &&
		  pipe2(err, O_CLOEXEC) == 0);
	if (small_stdout)
		cr_assert(fcntl(out[1], F_SETPIPE_SZ, CHAT_PIPE_BYTES) >= CHAT_PIPE_BYTES,
			  "F_SETPIPE_SZ: %s", strerror(errno));
	pid_t pid = mp_fork();
	if (pid == 0) {
		dup2(in[0], STDIN_FILENO);
		dup2(out[1], STDOUT_FILENO);
		dup2(err[1], STDERR_FILENO);
		execve(argv[0], (char *const *)argv, environ);
		_exit(127);
	}
	close(in[0]);
	close(out[1]);
	close(err[1]);
	memset(p, 0, sizeof(*p));
	p->pid = pid;
	p->in = in[1];
	p->out = out[0];
	p->err = err[0];
	p->out_text = calloc(1, 1);
	p->err_text = calloc(1, 1);
	cr_assert(p->out_text && p->err_text);
}

static void chat_write(struct chat_proc *p, const char *text)
{
	size_t len = strlen(text);
	while (len) {
		ssize_t n = write(p->in, text, len);
		cr_assert(n > 0 || errno == EINTR, "write to skv chat: %s", strerror(errno));
		if (n > 0) {
			text += n;
			len -= (size_t)n;
		}
	}
}

static int chat_drain_one(int *fd, char **text, size_t *len)
{
	char buf[4096];
	ssize_t n = read(*fd, buf, sizeof(buf));
	if (n < 0 && errno == EINTR)
		return 1;
	cr_assert(n >= 0, "read from skv chat: %s", strerror(errno));
	if (n == 0) {
		close(*fd);
		*fd = -1;
		return 0;
	}
	*text = realloc(*text, *len + (size_t)n + 1);
	cr_assert(*text != NULL);
	memcpy(*text + *len, buf, (size_t)n);
	*len += (size_t)n;
	(*text)[*len] = '\0';
	return 1;
}

/* Take what stdout and stderr have within 100 ms; asserts the deadline is not past. */
static void chat_read_some(struct chat_proc *p, double deadline, const char *what)
{
	cr_assert(mp_now() < deadline, "skv chat: no %s in time; stderr: %s", what, p->err_text);
	struct pollfd fds[2] = { { .fd = p->out, .events = POLLIN },
				 { .fd = p->err, .events = POLLIN } };
	int ready = poll(fds, 2, 100);
	if (ready < 0 && errno == EINTR)
		return;
	cr_assert(ready >= 0, "poll: %s", strerror(errno));
	if (fds[0].revents)
		chat_drain_one(&p->out, &p->out_text, &p->out_len);
	if (fds[1].revents)
		chat_drain_one(&p->err, &p->err_text, &p->err_len);
}

/* Read until stderr holds a whole line starting with prefix, within timeout_s. */
static void chat_read_line(struct chat_proc *p, const char *prefix, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	for (;;) {
		const char *at = strstr(p->err_text, prefix);
		if (at && strchr(at, '\n'))
			return;
		cr_assert(p->out >= 0 || p->err >= 0, "skv chat ended without '%s': %s", prefix,
			  p->err_text);
		chat_read_some(p, deadline, prefix);
	}
}

/* Close its stdin (the end of the conversation), read everything, expect exit status 0. */
static void chat_finish(struct chat_proc *p)
{
	close(p->in);
	p->in = -1;
	double deadline = mp_now() + CHAT_WAIT_S;
	while (p->out >= 0 || p->err >= 0)
		chat_read_some(p, deadline, "end of output");
	int status;
	while (waitpid(p->pid, &status, 0) < 0)
		cr_assert(errno == EINTR);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "skv chat ended with status 0x%x: %s", status, p->err_text);
}

static void chat_proc_free(struct chat_proc *p)
{
	free(p->out_text);
	free(p->err_text);
}

/* One turn's --stats line. */
struct chat_turn {
	unsigned long long prompt, answer, fed, kv, stream;
	char end[24];
};

/* The --stats lines of every turn so far, in order; returns how many. */
static size_t chat_turns_of(const char *err, struct chat_turn *t, size_t cap, int remote)
{
	size_t n = 0;
	for (const char *p = err; (p = strstr(p, "chat: turn ")); p++) {
		unsigned long long index;
		double ms;
		cr_assert(n < cap, "more turns than expected");
		t[n].stream = 0;
		int got = sscanf(p, "chat: turn %llu: %llu + %llu tokens (%23[a-z ]) in %lf ms; %llu "
				    "fed in all, kv %llu bytes, stream %llu",
				 &index, &t[n].prompt, &t[n].answer, t[n].end, &ms, &t[n].fed,
				 &t[n].kv, &t[n].stream);
		cr_assert_eq(got, remote ? 8 : 7, "a turn's stats line does not parse: %.160s", p);
		cr_assert_eq(index, n + 1);
		n++;
	}
	return n;
}

/* The last line on stderr: the summary. */
static const char *chat_summary(const char *err)
{
	const char *line = NULL;
	for (const char *p = err; (p = strstr(p, "chat: ")); p++)
		if ((p == err || p[-1] == '\n') && strncmp(p, "chat: turn ", 11) != 0)
			line = p;
	cr_assert(line != NULL, "no summary: %s", err);
	return line;
}

/* The daemon's view of one stream: its row, its sink ids and window ids (oldest first). */
struct chat_view {
	struct skv_admin_stream row;
	int32_t sinks[64], window[1024];
	uint32_t n_sinks, n_window;
};

static void chat_admin_stream(struct mp_daemon *d, uint64_t id, struct chat_view *v)
{
	memset(v, 0, sizeof(*v));
	struct skv_msg_admin_req req = { .what = SKV_ADMIN_STREAM, .stream_id = id };
	cr_assert(skv_msg_send(d->admin, SKV_MSG_ADMIN_REQ, 0, &req, NULL, 0) == 0);
	int have_row = 0;
	for (;;) {
		struct skv_msg_hdr h;
		union {
			struct skv_admin_stream row;
			struct skv_admin_tokens tokens;
			struct skv_msg_error error;
			uint8_t raw[sizeof(struct skv_admin_tokens) + 64];
		} body;
		int rc = mp_raw_recv(d->admin, CHAT_ADMIN_TIMEOUT_MS, &h, &body, sizeof(body), NULL);
		cr_assert_eq(rc, 1, "admin: no answer about stream %llu (%d)", (unsigned long long)id,
			     rc);
		cr_assert(h.type != SKV_MSG_ERROR, "admin: stream %llu: %s", (unsigned long long)id,
			  body.error.text);
		if (h.type == SKV_MSG_ADMIN_END)
			break;
		if (h.type == SKV_MSG_ADMIN_STREAM) {
			v->row = body.row;
			have_row = 1;
			continue;
		}
		cr_assert_eq(h.type, SKV_MSG_ADMIN_TOKENS, "admin: unexpected %s",
			     skv_msg_name(h.type));
		const struct skv_admin_tokens *t = &body.tokens;
		int32_t *dst = t->part == 0 ? v->sinks : v->window;
		uint32_t cap = t->part == 0 ? 64 : 1024;
		cr_assert(t->offset + t->n <= cap && t->n <= SKV_ADMIN_TOKENS_MAX);
		memcpy(dst + t->offset, t->ids, t->n * sizeof(int32_t));
		if (t->part == 0)
			v->n_sinks = t->total;
		else
			v->n_window = t->total;
	}
	cr_assert(have_row, "admin: no row for stream %llu", (unsigned long long)id);
}

/* ==== 160 turns on one stream ============================================================== */

Test(chat, turns_160_one_stream_constant_memory_sinks_kept)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "chat_160", 1, NULL, NULL);
	char window_text[16];
	snprintf(window_text, sizeof(window_text), "%d", CHAT_WINDOW);
	struct chat_proc p;
	chat_spawn(&p,
		   (const char *const[]){ "--socket", d.sock, "chat", "--turns", "-", "--window",
					  window_text, "--max-answer", "24", "--temp", "0",
					  "--stats", NULL },
		   0);
	/* Every turn goes in now; stdin stays open so that the stream is still there to look
	 * at once the last turn is answered. */
	char *turns = chat_turns_text(CHAT_TURNS);
	chat_write(&p, turns);
	free(turns);

	chat_read_line(&p, "chat: turn 1:", CHAT_WAIT_S);
	struct skv_msg_stats st_first, st_last;
	mp_stats(&d, &st_first);
	cr_assert_eq(st_first.streams, 1);
	cr_assert_gt(st_first.arena_used_bytes, 0);

	char last[32];
	snprintf(last, sizeof(last), "chat: turn %d:", CHAT_TURNS);
	chat_read_line(&p, last, CHAT_WAIT_S);
	mp_stats(&d, &st_last);
	cr_assert_eq(st_last.streams, 1);
	cr_assert_eq(st_last.arena_used_bytes, st_first.arena_used_bytes,
		     "the daemon's KV arena use changed during the conversation");

	struct chat_turn t[CHAT_TURNS + 1];
	cr_assert_eq(chat_turns_of(p.err_text, t, CHAT_TURNS + 1, 1), CHAT_TURNS);
	uint64_t fed = 0;
	for (size_t i = 0; i < CHAT_TURNS; i++) {
		fed += t[i].prompt + t[i].answer - 1 + (strcmp(t[i].end, "end of text") == 0);
		cr_assert_eq(t[i].fed, fed, "turn %zu: fed %llu, expected %llu", i + 1, t[i].fed,
			     (unsigned long long)fed);
		cr_assert_eq(t[i].kv, t[0].kv, "turn %zu: the stream's KV bytes changed", i + 1);
		cr_assert_eq(t[i].stream, t[0].stream, "turn %zu on another stream", i + 1);
	}

	/* The daemon's own view of the stream after 160 turns. */
	struct chat_view v;
	chat_admin_stream(&d, t[0].stream, &v);
	cr_assert_eq(v.row.kv_bytes, t[0].kv);
	cr_assert_eq(v.row.sink_slots, CHAT_SINKS);
	cr_assert_eq(v.row.window_slots, CHAT_WINDOW);
	cr_assert_eq(v.row.tokens_seen, fed, "the engine saw %llu tokens, the CLI fed %llu",
		     (unsigned long long)v.row.tokens_seen, (unsigned long long)fed);
	cr_assert_gt(fed, 20 * (CHAT_SINKS + CHAT_WINDOW), "too little fed to evict many times");
	cr_assert_eq(v.row.tokens_evicted, fed - CHAT_SINKS - CHAT_WINDOW);
	cr_assert_eq(v.n_sinks, CHAT_SINKS);
	cr_assert_eq(v.n_window, CHAT_WINDOW);

	/* Sinks: BOS and the first turn's first tokens. Window: ends with the last turn, then
	 * the answer tokens fed after it. */
	struct chat_tok tk;
	chat_tok_open(&tk);
	char filled[256];
	int32_t *ids;
	size_t n_ids;
	chat_filled(0, filled, sizeof(filled));
	cr_assert(skv_tokenizer_encode(tk.tok, filled, strlen(filled), 1, 0, &ids, &n_ids) == 0);
	cr_assert_geq(n_ids, CHAT_SINKS);
	cr_assert_eq(ids[0], SKV_TOKEN_BOS);
	for (size_t i = 0; i < CHAT_SINKS; i++)
		cr_assert_eq(v.sinks[i], ids[i], "sink %zu holds %d, the stream began with %d", i,
			     v.sinks[i], ids[i]);
	free(ids);
	chat_filled(CHAT_TURNS - 1, filled, sizeof(filled));
	cr_assert(skv_tokenizer_encode(tk.tok, filled, strlen(filled), 0, 0, &ids, &n_ids) == 0);
	const struct chat_turn *lt = &t[CHAT_TURNS - 1];
	size_t answer_fed = lt->answer - 1 + (strcmp(lt->end, "end of text") == 0);
	cr_assert_eq(n_ids, lt->prompt);
	cr_assert_leq(n_ids + answer_fed, CHAT_WINDOW);
	size_t at = CHAT_WINDOW - answer_fed - n_ids;
	for (size_t i = 0; i < n_ids; i++)
		cr_assert_eq(v.window[at + i], ids[i], "window slot %zu: %d, the last turn's %d",
			     at + i, v.window[at + i], ids[i]);
	free(ids);
	chat_tok_close(&tk);

	chat_finish(&p);
	const char *sum = chat_summary(p.err_text);
	char want[160];
	snprintf(want, sizeof(want),
		 "chat: %d turns, %llu tokens fed; cache %d sinks + %d window slots (sink, evict "
		 "token); kv %llu bytes, constant\n",
		 CHAT_TURNS, (unsigned long long)fed, CHAT_SINKS, CHAT_WINDOW,
		 (unsigned long long)t[0].kv);
	cr_assert_str_eq(sum, want);
	/* One answer line at least per turn on stdout. */
	size_t lines = 0;
	for (const char *c = p.out_text; (c = strchr(c, '\n')); c++)
		lines++;
	cr_assert_geq(lines, CHAT_TURNS);
	chat_proc_free(&p);
	mp_wait_streams_freed(&d, 10.0);
}

/* ==== through the daemon = local =========================================================== */

static void chat_expect_same(const struct mp_daemon *d, const char *const *flags, char **out)
{
	const char *local_args[40], *remote_args[40];
	unsigned nl = 0, nr = 0;
	remote_args[nr++] = "--socket";
	remote_args[nr++] = d->sock;
	local_args[nl++] = remote_args[nr++] = "chat";
	for (; *flags; flags++) {
		cr_assert(nr < 38);
		local_args[nl++] = remote_args[nr++] = *flags;
	}
	local_args[nl] = remote_args[nr] = NULL;
	char *lo, *le, *ro, *re;
	int ls = mp_run(mp_env_path("SKV_BIN"), local_args, &lo, &le);
	int rs = mp_run(mp_env_path("SKV_BIN"), remote_args, &ro, &re);
	cr_assert(WIFEXITED(ls) && WEXITSTATUS(ls) == 0, "local chat failed: %s", le);
	cr_assert(WIFEXITED(rs) && WEXITSTATUS(rs) == 0, "chat through the daemon failed: %s", re);
	cr_assert(strlen(lo) > 0);
	cr_assert_str_eq(ro, lo, "through the daemon:\n%s\n--- locally:\n%s", ro, lo);
	/* The same counts too: the engine's tokens and the local stream's. */
	cr_assert_str_eq(re, le);
	*out = lo;
	free(le);
	free(ro);
	free(re);
}

Test(chat, greedy_through_the_daemon_equals_local)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "chat_equal", 2, NULL, NULL);
	const char *turns = chat_turns_file(40);
	char *by_token, *by_prompt, *sampled;
	chat_expect_same(&d,
			 (const char *const[]){ "--turns", turns, "--window", "60", "--max-answer",
						"24", "--temp", "0", NULL },
			 &by_token);
	chat_expect_same(&d,
			 (const char *const[]){ "--turns", turns, "--window", "60", "--max-answer",
						"24", "--temp", "0", "--evict", "prompt", "--echo",
						NULL },
			 &by_prompt);
	/* The eviction modes did differ (the window filled many times). */
	cr_assert(strstr(by_prompt, by_token) == NULL);
	chat_expect_same(&d,
			 (const char *const[]){ "--turns", turns, "--policy", "window", "--window",
						"48", "--max-answer", "30", "--temp", "0.8",
						"--seed", "7", NULL },
			 &sampled);
	cr_assert_str_neq(sampled, by_token);
	free(by_token);
	free(by_prompt);
	free(sampled);
	mp_wait_streams_freed(&d, 10.0);
}

/* ==== cancelling =========================================================================== */

/* Read events until DONE; returns its reason, *count its count, *tokens the TOKEN events. */
static int chat_read_done(struct skv_client_stream *s, uint64_t *count, uint64_t *tokens)
{
	double deadline = mp_now() + REQUEST_TIMEOUT_S;
	for (;;) {
		struct skv_client_event ev;
		int rc = skv_client_stream_read(s, &ev, 1000);
		cr_assert(rc >= 0, "stream read: %s", skv_strerror(rc));
		cr_assert(mp_now() < deadline, "no DONE within %.0f s", REQUEST_TIMEOUT_S);
		if (!rc)
			continue;
		cr_assert(ev.type != SKV_CLIENT_EV_ERROR, "error: %.*s", (int)ev.len, ev.text);
		if (ev.type == SKV_CLIENT_EV_TOKEN)
			(*tokens)++;
		if (ev.type == SKV_CLIENT_EV_DONE) {
			*count = ev.count;
			return ev.reason;
		}
	}
}

Test(chat, libskv_cancel_long_answer_then_next_turn)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "chat_cancel", 1, NULL, NULL);
	struct skv_client *c = mp_connect(&d);
	skv_client_opts *o;
	cr_assert(skv_client_opts_new(&o) == 0);
	cr_assert(skv_client_opts_window(o, CHAT_WINDOW) == 0);
	struct skv_client_stream *s;
	cr_assert(skv_client_stream_open(c, o, &s) == 0, "%s", skv_client_last_error(c));
	skv_client_opts_free(o);
	struct skv_client_stream_info info;
	skv_client_stream_info(s, &info);

	struct chat_tok tk;
	chat_tok_open(&tk);
	char first[256], second[256];
	chat_filled(0, first, sizeof(first));
	chat_filled(1, second, sizeof(second));
	int32_t *ids;
	size_t n_first, n_second;
	cr_assert(skv_tokenizer_encode(tk.tok, first, strlen(first), 1, 0, &ids, &n_first) == 0);
	free(ids);
	cr_assert(skv_tokenizer_encode(tk.tok, second, strlen(second), 0, 0, &ids, &n_second) == 0);
	free(ids);
	chat_tok_close(&tk);

	/* An answer that would never end: cancel it after 200 tokens. */
	cr_assert(skv_client_stream_generate(s, first, strlen(first), LONG_GENERATION,
					     SKV_CLIENT_ENDLESS) == 0);
	uint64_t tokens = 0;
	while (tokens < 200) {
		struct skv_client_event ev;
		int rc = skv_client_stream_read(s, &ev, (int)(REQUEST_TIMEOUT_S * 1000));
		cr_assert_eq(rc, 1, "no token: %s", skv_strerror(rc));
		if (ev.type == SKV_CLIENT_EV_PROMPT) /* the turn's echo */
			continue;
		cr_assert_eq(ev.type, SKV_CLIENT_EV_TOKEN, "event %d before 200 tokens", ev.type);
		tokens++;
	}
	cr_assert(skv_client_stream_cancel(s) == 0);
	uint64_t count = 0;
	int reason = chat_read_done(s, &count, &tokens);
	cr_assert_eq(reason, SKV_CLIENT_DONE_CANCELLED);
	cr_assert_eq(count, tokens, "DONE counts %llu tokens, %llu came",
		     (unsigned long long)count, (unsigned long long)tokens);
	cr_assert_lt(count, LONG_GENERATION);
	cr_assert_eq(skv_client_stream_pending(s), 0);

	/* The cache holds the turn and every answer token but the last: what the CLI counts. */
	struct chat_view v;
	chat_admin_stream(&d, info.id, &v);
	uint64_t fed = n_first + count - 1;
	cr_assert_eq(v.row.tokens_seen, fed, "seen %llu, expected %llu",
		     (unsigned long long)v.row.tokens_seen, (unsigned long long)fed);

	/* The next turn is answered on the same stream, in the same memory. */
	cr_assert(skv_client_stream_generate(s, second, strlen(second), 20, 0) == 0);
	uint64_t count2 = 0, tokens2 = 0;
	reason = chat_read_done(s, &count2, &tokens2);
	cr_assert(reason == SKV_CLIENT_DONE_LENGTH || reason == SKV_CLIENT_DONE_EOS,
		  "the next turn ended with reason %d", reason);
	cr_assert_gt(tokens2, 0);
	cr_assert_eq(count2, tokens2 + (reason == SKV_CLIENT_DONE_EOS));
	chat_admin_stream(&d, info.id, &v);
	cr_assert_eq(v.row.tokens_seen, fed + n_second + count2 - 1);
	cr_assert_eq(v.row.kv_bytes, info.kv_bytes);
	cr_assert_eq(v.sinks[0], SKV_TOKEN_BOS);
	skv_client_stream_close(s);
	skv_client_disconnect(c);
	mp_wait_streams_freed(&d, 10.0);
}

/* SIGINT while the CLI prints a turn: that turn's answer is cancelled, the next turn is
 * answered, the chat goes on until its input ends (exit 0). The turn is long enough for its
 * echo to fill the smallest pipe, so the signal lands while skv is certainly inside turn 1. */
static void chat_sigint_case(struct mp_daemon *d)
{
	char *long_turn = malloc(8192);
	cr_assert(long_turn != NULL);
	size_t len = 0;
	while (len < 6000)
		len += (size_t)snprintf(long_turn + len, 8192 - len,
					"Tom and Lily played with the big red ball in the park. ");
	long_turn[len++] = '\n';
	long_turn[len] = '\0';

	const char *args[20];
	unsigned n = 0;
	if (d) {
		args[n++] = "--socket";
		args[n++] = d->sock;
	}
	const char *rest[] = { "chat", "--turns", "-", "--echo", "--temp", "0", "--max-answer",
			       "400", "--stats", NULL };
	for (unsigned i = 0; rest[i]; i++)
		args[n++] = rest[i];
	args[n] = NULL;
	struct chat_proc p;
	chat_spawn(&p, args, 1);
	chat_write(&p, long_turn);
	free(long_turn);
	char wchan[64];
	cr_assert(mp_wait_wchan(p.pid, (const char *const[]){ "pipe_write", "pipe_wait", NULL },
				30.0, wchan, sizeof(wchan)),
		  "skv chat did not block writing the echo (wchan %s)", wchan);
	cr_assert(kill(p.pid, SIGINT) == 0);
	chat_write(&p, "Where is the cat?\n");
	chat_read_line(&p, "chat: turn 2:", CHAT_WAIT_S);

	struct chat_turn t[4];
	size_t turns = chat_turns_of(p.err_text, t, 4, d != NULL);
	cr_assert_geq(turns, 1);
	cr_assert_str_eq(t[0].end, "cancelled", "turn 1 ended by %s", t[0].end);
	cr_assert(t[0].answer >= 1 && t[0].answer < 400);
	cr_assert_eq(turns, 2);
	if (d) {
		/* The engine holds what the CLI says it fed, the cut answer included. */
		struct chat_view v;
		chat_admin_stream(d, t[0].stream, &v);
		cr_assert_eq(v.row.tokens_seen, t[1].fed);
	}
	chat_finish(&p);
	cr_assert_eq(chat_turns_of(p.err_text, t, 4, d != NULL), 2);
	cr_assert_str_neq(t[1].end, "cancelled");
	cr_assert_gt(t[1].answer, 0);
	cr_assert(strstr(chat_summary(p.err_text), "2 turns") &&
			  strstr(chat_summary(p.err_text), "; 1 answer cancelled\n"),
		  "summary: %s", chat_summary(p.err_text));
	/* Both turns were echoed, the second after the first one's (cut) answer. */
	cr_assert(strstr(p.out_text, "Tom said, \"Where is the cat?\"\nMom said,"));
	chat_proc_free(&p);
}

Test(chat, sigint_cancels_one_answer_local)
{
	tu_scratch_dir("chat_sigint_local");
	chat_sigint_case(NULL);
}

Test(chat, sigint_cancels_one_answer_through_the_daemon)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "chat_sigint", 1, NULL, NULL);
	chat_sigint_case(&d);
	mp_wait_streams_freed(&d, 10.0);
}
