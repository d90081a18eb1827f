/* skv-http's conversations outlive processes and move between nodes (issues 14 and 15): each
 * conversation is a named resumable stream of skv-cached, so
 *   - a daemon restarted with --state-dir gives every conversation back: the next turn equals
 *     the turn of a conversation that never saw the restart, byte for byte (greedy);
 *   - a daemon restarted without it answers 410 conversation_lost, never a silent new stream;
 *   - skv-http itself restarted (SIGTERM or kill -9) with --state-dir attaches them again;
 *   - GET /v1/conversations/ID/export and PUT /v1/conversations/ID carry one to another node,
 *     every bad body refused with its reason; --peers pulls one from a draining node by itself
 *     (X-Skv-Conversation-Moved), and --snapshot-dir brings one back from its last export.
 * Two nodes live in one test: the first daemon's socket is renamed before the second starts
 * (mp_daemon_start names every socket <scratch>/cached.sock). */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mputil.h"
#include "testutil.h"

#define GW_START_TIMEOUT_S 30.0
#define HTTP_IO_TIMEOUT_S 60.0
#define TURN_TOKENS 24
#define N_TURNS 4

struct gw_proc {
	pid_t pid;
	uint16_t port;
	char log[PATH_MAX];
};

/* An answer: status, headers (NUL-terminated), body (may hold NULs: len). */
struct http_answer {
	int status;
	char *head;
	char *body;
	size_t len;
};

static void answer_free(struct http_answer *a)
{
	free(a->head);
	free(a->body);
	memset(a, 0, sizeof(*a));
}

/* One request on its own connection (Connection: close); chunked bodies are undone. */
static void http_do(uint16_t port, const char *method, const char *path, const char *headers,
		    const char *body, size_t body_len, struct http_answer *a)
{
	int fd = mp_tcp_connect(port);
	cr_assert(fd >= 0, "cannot connect to skv-http on port %u", port);
	char head[2048];
	int n = snprintf(head, sizeof(head),
			 "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s"
			 "Content-Length: %zu\r\n\r\n",
			 method, path, headers ? headers : "", body_len);
	mp_write_all(fd, head, (size_t)n);
	if (body_len)
		mp_write_all(fd, body, body_len);
	size_t cap = 1 << 20, len = 0;
	char *buf = malloc(cap);
	double deadline = mp_now() + HTTP_IO_TIMEOUT_S;
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		cr_assert(poll(&p, 1, 1000) >= 0);
		cr_assert(mp_now() < deadline, "no full answer to %s %s within %.0f s", method, path,
			  HTTP_IO_TIMEOUT_S);
		if (!p.revents)
			continue;
		if (cap - len < 65536)
			buf = realloc(buf, cap *= 2);
		ssize_t got = read(fd, buf + len, cap - len - 1);
		if (got <= 0)
			break;
		len += (size_t)got;
	}
	close(fd);
	buf[len] = '\0';
	cr_assert(sscanf(buf, "HTTP/1.%*d %d", &a->status) == 1, "not an HTTP answer: %.200s", buf);
	char *sep = memmem(buf, len, "\r\n\r\n", 4);
	cr_assert(sep != NULL);
	a->head = strndup(buf, (size_t)(sep - buf) + 2);
	char *payload = sep + 4;
	size_t plen = len - (size_t)(payload - buf);
	a->body = malloc(plen + 1);
	a->len = 0;
	if (!strcasestr(a->head, "transfer-encoding: chunked")) {
		memcpy(a->body, payload, plen);
		a->len = plen;
	} else {
		char *p = payload;
		for (;;) {
			unsigned long sz = strtoul(p, &p, 16);
			p = strstr(p, "\r\n");
			cr_assert(p != NULL, "bad chunked body");
			p += 2;
			if (!sz)
				break;
			memcpy(a->body + a->len, p, sz);
			a->len += sz;
			p += sz + 2;
		}
	}
	a->body[a->len] = '\0';
	free(buf);
}

/* The value of a response header (copied), or NULL. */
static char *header(const struct http_answer *a, const char *name)
{
	char needle[128];
	snprintf(needle, sizeof(needle), "\r\n%s:", name);
	const char *p = strcasestr(a->head, needle);
	if (!p)
		return NULL;
	p += strlen(needle);
	while (*p == ' ')
		p++;
	return strndup(p, strcspn(p, "\r\n"));
}

static json_t *json_parse(const char *text)
{
	json_error_t e;
	json_t *v = json_loads(text, 0, &e);
	cr_assert(v != NULL, "not JSON (%s): %.300s", e.text, text);
	return v;
}

/* An error answer with this status and code (NULL: any), and a message. */
static void expect_error(const struct http_answer *a, int status, const char *code,
			 const char *needle, const char *what)
{
	cr_assert_eq(a->status, status, "%s: status %d, want %d: %s", what, a->status, status,
		     a->body);
	json_t *v = json_parse(a->body);
	json_t *e = json_object_get(v, "error");
	const char *msg = json_string_value(json_object_get(e, "message"));
	cr_assert(msg && msg[0], "%s: no message: %s", what, a->body);
	if (code)
		cr_assert_str_eq(json_string_value(json_object_get(e, "code")), code, "%s: %s", what,
				 a->body);
	if (needle)
		cr_assert(strstr(msg, needle), "%s: '%s' not in '%s'", what, needle, msg);
	json_decref(v);
}

/* port 0: any free one. */
static void gw_start_on(struct gw_proc *g, const char *sock, const char *test, const char *name,
			uint16_t port, const char *const *extra)
{
	memset(g, 0, sizeof(*g));
	g->port = port ? port : mp_free_port();
	snprintf(g->log, sizeof(g->log), "%s/%s.log", tu_scratch_dir(test), name);
	char listen[64];
	snprintf(listen, sizeof(listen), "127.0.0.1:%u", g->port);
	const char *argv[40];
	unsigned argc = 0;
	argv[argc++] = mp_env_path("SKV_HTTP_BIN");
	argv[argc++] = "--socket";
	argv[argc++] = sock;
	argv[argc++] = "--listen";
	argv[argc++] = listen;
	argv[argc++] = "--node-name";
	argv[argc++] = name;
	for (unsigned i = 0; extra && extra[i]; i++)
		argv[argc++] = extra[i];
	argv[argc] = NULL;
	int log_fd = open(g->log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	cr_assert(log_fd >= 0);
	pid_t pid = mp_fork();
	if (pid == 0) {
		dup2(log_fd, STDOUT_FILENO);
		dup2(log_fd, STDERR_FILENO);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(log_fd);
	g->pid = pid;
	double deadline = mp_now() + GW_START_TIMEOUT_S;
	for (;;) {
		int fd = mp_tcp_connect(g->port);
		if (fd >= 0) {
			close(fd);
			break;
		}
		cr_assert(mp_now() < deadline && !mp_proc_gone(pid), "skv-http did not come up");
		mp_sleep_ms(10);
	}
}

static void gw_start(struct gw_proc *g, const char *sock, const char *test, const char *name,
		     const char *const *extra)
{
	gw_start_on(g, sock, test, name, 0, extra);
}

static void gw_signal_wait(struct gw_proc *g, int sig)
{
	cr_assert(kill(g->pid, sig) == 0);
	int status;
	cr_assert(waitpid(g->pid, &status, 0) == g->pid);
	if (sig == SIGTERM)
		cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
			  "skv-http exited with status 0x%x", status);
	g->pid = 0;
}

/* /health answers want (200 once the daemon's engines run and conversations are attached). */
static void wait_health(const struct gw_proc *g, int want, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	for (;;) {
		struct http_answer a;
		http_do(g->port, "GET", "/health", NULL, NULL, 0, &a);
		int st = a.status;
		answer_free(&a);
		if (st == want)
			return;
		cr_assert(mp_now() < deadline, "/health stayed %d, want %d", st, want);
		mp_sleep_ms(50);
	}
}

/* A daemon whose socket is renamed to <scratch>/<name>.sock, so that another can start. */
static void node_daemon(struct mp_daemon *d, const char *test, const char *name,
			const char *const *extra)
{
	mp_daemon_start(d, test, 1, NULL, extra);
	char sock[108], log[PATH_MAX];
	snprintf(sock, sizeof(sock), "%s/%s.sock", tu_scratch_dir(test), name);
	snprintf(log, sizeof(log), "%s/%s-daemon.log", tu_scratch_dir(test), name);
	cr_assert(rename(d->sock, sock) == 0, "rename %s: %s", d->sock, strerror(errno));
	cr_assert(rename(d->log, log) == 0);
	snprintf(d->sock, sizeof(d->sock), "%s", sock);
	snprintf(d->log, sizeof(d->log), "%s", log);
}

static const char *const turn_text[N_TURNS] = { "Once upon a time", " The sun was hot.",
						" Tom ran home.", " Then it rained." };
static const char *const chat_says[N_TURNS] = { "I like the dog.", "Can we go out?",
						"Yes, let us go.", "Where is the ball?" };

struct conv_run {
	const char *id;
	json_t *messages;               /* chat: the whole history, resent each time */
};

static char *answer_text(const struct http_answer *a, int chat)
{
	json_t *v = json_parse(a->body);
	json_t *choice = json_array_get(json_object_get(v, "choices"), 0);
	json_t *t = chat ? json_object_get(json_object_get(choice, "message"), "content")
			 : json_object_get(choice, "text");
	cr_assert(json_is_string(t), "no text in %.300s", a->body);
	char *s = strdup(json_string_value(t));
	json_decref(v);
	return s;
}

/* Turn i of a conversation: a completion (odd ones streamed as SSE) then a chat message with
 * the whole history. Returns both answers joined by '|'; a->status must be 200. */
static char *turn(uint16_t port, const char *auth, struct conv_run *c, int i,
		  struct http_answer *first)
{
	char hdr[512], body[512];
	snprintf(hdr, sizeof(hdr), "%sX-Conversation-Id: %s\r\nContent-Type: application/json\r\n",
		 auth ? auth : "", c->id);
	snprintf(body, sizeof(body), "{\"prompt\":\"%s\",\"max_tokens\":%d,\"temperature\":0}",
		 turn_text[i], TURN_TOKENS);
	struct http_answer a;
	http_do(port, "POST", "/v1/completions", hdr, body, strlen(body), &a);
	cr_assert_eq(a.status, 200, "turn %d of %s: %s", i, c->id, a.body);
	char *text = answer_text(&a, 0);
	if (first)
		*first = a;
	else
		answer_free(&a);
	if (!c->messages)
		c->messages = json_array();
	json_array_append_new(c->messages,
			      json_pack("{s:s,s:s}", "role", "user", "content", chat_says[i]));
	json_t *req = json_pack("{s:O,s:i,s:i}", "messages", c->messages, "max_tokens", TURN_TOKENS,
				"temperature", 0);
	char *cbody = json_dumps(req, 0);
	json_decref(req);
	http_do(port, "POST", "/v1/chat/completions", hdr, cbody, strlen(cbody), &a);
	free(cbody);
	cr_assert_eq(a.status, 200, "chat turn %d of %s: %s", i, c->id, a.body);
	char *said = answer_text(&a, 1);
	answer_free(&a);
	json_array_append_new(c->messages,
			      json_pack("{s:s,s:s}", "role", "assistant", "content", said));
	char *both;
	cr_assert(asprintf(&both, "%s|%s", text, said) > 0);
	free(text);
	free(said);
	return both;
}

/* The answers of an uninterrupted conversation, turn by turn (to free with free_turns). */
static void reference(uint16_t port, const char *auth, const char *id, char **out)
{
	struct conv_run c = { .id = id };
	for (int i = 0; i < N_TURNS; i++)
		out[i] = turn(port, auth, &c, i, NULL);
	json_decref(c.messages);
}

static void free_turns(char **t)
{
	for (int i = 0; i < N_TURNS; i++)
		free(t[i]);
}

static void expect_turn(uint16_t port, const char *auth, struct conv_run *c, int i,
			char *const *ref, const char *what)
{
	char *got = turn(port, auth, c, i, NULL);
	cr_assert_str_eq(got, ref[i], "%s: turn %d differs from the uninterrupted run", what, i);
	free(got);
}

TestSuite(http_durable, .init = mp_suite_init, .fini = mp_suite_fini, .timeout = 600);

/* skv-cached stopped (SIGTERM: it snapshots into --state-dir) and started again between two
 * turns: skv-http attaches the conversation again and it goes on as if nothing happened. */
Test(http_durable, daemon_restart_continues_byte_identical)
{
	const char *test = "httpd-restart";
	char state[PATH_MAX];
	snprintf(state, sizeof(state), "%s/state", tu_scratch_dir(test));
	cr_assert(mkdir(state, 0700) == 0);
	const char *const flags[] = { "--state-dir", state, NULL };
	struct mp_daemon d;
	mp_daemon_start(&d, test, 1, NULL, flags);
	struct gw_proc g;
	gw_start(&g, d.sock, test, "n1", NULL);
	char *ref[N_TURNS];
	reference(g.port, NULL, "ref", ref);
	struct conv_run c = { .id = "talk:1" }; /* ':' is not a stream name's: hashed */
	for (int i = 0; i < 2; i++)
		expect_turn(g.port, NULL, &c, i, ref, "before the restart");
	cr_assert(kill(d.pid, SIGTERM) == 0);
	cr_assert(mp_daemon_reap(&d, 20.0), "skv-cached did not stop on SIGTERM");
	wait_health(&g, 503, 10.0);
	struct http_answer a;
	const char *small = "{\"prompt\":\"x\",\"max_tokens\":2}";
	http_do(g.port, "POST", "/v1/completions", "X-Conversation-Id: talk:1\r\n", small,
		strlen(small), &a);
	expect_error(&a, 503, NULL, NULL, "a conversation while the daemon is down");
	answer_free(&a);
	mp_daemon_start(&d, test, 1, NULL, flags);
	wait_health(&g, 200, 20.0);
	for (int i = 2; i < N_TURNS; i++)
		expect_turn(g.port, NULL, &c, i, ref, "after the daemon's restart");
	json_decref(c.messages);
	free_turns(ref);
	gw_signal_wait(&g, SIGTERM);
}

/* Without --state-dir the restarted daemon has lost the stream: 410 conversation_lost (and no
 * new stream) until the client deletes the conversation. */
Test(http_durable, lost_stream_answers_410)
{
	const char *test = "httpd-lost";
	struct mp_daemon d;
	mp_daemon_start(&d, test, 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, d.sock, test, "n1", NULL);
	char *ref[N_TURNS];
	reference(g.port, NULL, "ref", ref);
	struct conv_run c = { .id = "gone" };
	expect_turn(g.port, NULL, &c, 0, ref, "before");
	struct http_answer ex;
	http_do(g.port, "GET", "/v1/conversations/gone/export", NULL, NULL, 0, &ex);
	cr_assert_eq(ex.status, 200, "%s", ex.body);
	cr_assert(kill(d.pid, SIGKILL) == 0);
	cr_assert(mp_daemon_reap(&d, 10.0));
	mp_sleep_ms(300);
	mp_daemon_start(&d, test, 1, NULL, NULL);
	wait_health(&g, 200, 20.0);
	const char *hdr = "X-Conversation-Id: gone\r\n";
	const char *body = "{\"prompt\":\"The end.\",\"max_tokens\":4}";
	struct http_answer a;
	for (int k = 0; k < 2; k++) {
		http_do(g.port, "POST", "/v1/completions", hdr, body, strlen(body), &a);
		expect_error(&a, 410, "conversation_lost", "no longer holds its stream",
			     "a conversation whose stream is gone");
		answer_free(&a);
	}
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 0, "no stream was opened for the lost conversation");
	/* A lost conversation's id takes an import: 409 only for a live one. */
	http_do(g.port, "PUT", "/v1/conversations/gone", NULL, "SKVCONV", 8, &a);
	expect_error(&a, 400, NULL, "truncated", "an import over a lost conversation is checked");
	answer_free(&a);
	http_do(g.port, "POST", "/v1/completions", hdr, body, strlen(body), &a);
	expect_error(&a, 410, "conversation_lost", NULL, "a refused import leaves it lost");
	answer_free(&a);
	/* Its export from before the kill brings it back where it was then. */
	http_do(g.port, "PUT", "/v1/conversations/gone", NULL, ex.body, ex.len, &a);
	cr_assert_eq(a.status, 200, "import over a lost conversation: %s", a.body);
	answer_free(&a);
	answer_free(&ex);
	expect_turn(g.port, NULL, &c, 1, ref, "imported over the lost one");
	json_decref(c.messages);
	free_turns(ref);
	http_do(g.port, "DELETE", "/v1/conversations/gone", NULL, NULL, 0, &a);
	cr_assert_eq(a.status, 200, "%s", a.body);
	answer_free(&a);
	http_do(g.port, "POST", "/v1/completions", hdr, body, strlen(body), &a);
	cr_assert_eq(a.status, 200, "after DELETE it starts anew: %s", a.body);
	answer_free(&a);
	gw_signal_wait(&g, SIGTERM);
}

/* The modification time (CLOCK_REALTIME seconds) of the daemon's snapshot of the stream
 * name in dir (cached/snapshot.c: UID-NAME.snap), 0 if there is none. */
static double snapshot_time(const char *dir, const char *name)
{
	char path[PATH_MAX];
	struct stat st;
	int n = snprintf(path, sizeof(path), "%s/%u-%s.snap", dir, (unsigned)getuid(), name);
	cr_assert(n > 0 && (size_t)n < sizeof(path));
	if (stat(path, &st))
		return 0;
	return (double)st.st_mtim.tv_sec + st.st_mtim.tv_nsec * 1e-9;
}

static double wall_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A daemon snapshotting every second into <scratch>/state, a gateway, the uninterrupted
 * reference, and turn 0 of conversation id, waited on until a periodic snapshot holds it. */
struct snap_run {
	char state[PATH_MAX];
	const char *flags[5];
	struct mp_daemon d;
	struct gw_proc g;
	char *ref[N_TURNS];
	struct conv_run c;
};

static void snap_run_start(struct snap_run *r, const char *test, const char *id)
{
	snprintf(r->state, sizeof(r->state), "%s/state", tu_scratch_dir(test));
	cr_assert(mkdir(r->state, 0700) == 0);
	const char *const flags[] = { "--state-dir", r->state, "--snapshot-interval", "1", NULL };
	memcpy(r->flags, flags, sizeof(flags));
	mp_daemon_start(&r->d, test, 1, NULL, r->flags);
	gw_start(&r->g, r->d.sock, test, "n1", NULL);
	reference(r->g.port, NULL, "ref", r->ref);
	r->c = (struct conv_run){ .id = id };
	expect_turn(r->g.port, NULL, &r->c, 0, r->ref, "first turn");
	char name[80];
	snprintf(name, sizeof(name), "conv-%s", id);
	double after_first = wall_now(), deadline = mp_now() + 10.0;
	while (snapshot_time(r->state, name) <= after_first + 0.01) {
		cr_assert(mp_now() < deadline, "no periodic snapshot in %s", r->state);
		mp_sleep_ms(20);
	}
}

static void snap_run_end(struct snap_run *r)
{
	json_decref(r->c.messages);
	free_turns(r->ref);
	gw_signal_wait(&r->g, SIGTERM);
}

/* kill -9 of skv-cached with --snapshot-interval: its restart restores the stream from the
 * last periodic snapshot, which may be older than the conversation's last answer. skv-http
 * notices (the stream holds fewer tokens than after that answer: skv_client_stream_tokens) and
 * answers 410 conversation_lost saying so, instead of going on without the latest messages. */
Test(http_durable, kill9_behind_the_last_snapshot_says_so)
{
	static struct snap_run r;
	snap_run_start(&r, "httpd-kill9", "behind");
	expect_turn(r.g.port, NULL, &r.c, 1, r.ref, "second turn");
	double after_second = wall_now();
	cr_assert(kill(r.d.pid, SIGKILL) == 0);
	cr_assert(mp_daemon_reap(&r.d, 10.0));
	int snapshot_held_it = snapshot_time(r.state, "conv-behind") >= after_second;
	mp_daemon_start(&r.d, "httpd-kill9", 1, NULL, r.flags);
	wait_health(&r.g, 200, 20.0);
	if (snapshot_held_it) {
		/* a snapshot fell between the second answer and the kill: nothing was lost */
		expect_turn(r.g.port, NULL, &r.c, 2, r.ref,
			    "restored from a snapshot of the last turn");
	} else {
		const char *hdr = "X-Conversation-Id: behind\r\n";
		const char *body = "{\"prompt\":\"The end.\",\"max_tokens\":4}";
		struct http_answer a;
		http_do(r.g.port, "POST", "/v1/completions", hdr, body, strlen(body), &a);
		expect_error(&a, 410, "conversation_lost", "older than the last answer",
			     "a conversation restored from before its last answer");
		answer_free(&a);
	}
	snap_run_end(&r);
}

/* kill -9 of the engine serving a conversation, after a periodic snapshot of its last answer:
 * skv-cached restores the stream onto the restarted engine and tells skv-http
 * (-SKV_ERESTORED), which attaches it again; the next turns equal the uninterrupted run. */
Test(http_durable, engine_kill9_restores_the_conversation)
{
	static struct snap_run r;
	snap_run_start(&r, "httpd-engine9", "engine9");
	struct skv_msg_stats st;
	mp_stats(&r.d, &st);
	cr_assert(st.engine_pid[0] > 0 && kill((pid_t)st.engine_pid[0], SIGKILL) == 0);
	double deadline = mp_now() + 30.0;
	for (;;) {
		char *log = tu_read_file(r.g.log, NULL);
		int told = log && strstr(log, "conversation engine9: ");
		free(log);
		if (told)
			break;
		cr_assert(mp_now() < deadline, "skv-http was not told of the restore (%s)",
			  r.g.log);
		mp_sleep_ms(50);
	}
	wait_health(&r.g, 200, 20.0);
	for (int i = 1; i < N_TURNS; i++)
		expect_turn(r.g.port, NULL, &r.c, i, r.ref, "after its engine's kill -9");
	snap_run_end(&r);
}

/* skv-http with --state-dir stopped (SIGTERM) and killed (-9): the next one attaches every
 * conversation from DIR/conversations.json (mode 0600: it holds the tokens). */
Test(http_durable, gateway_restart_with_state_dir)
{
	const char *test = "httpd-gwstate";
	struct mp_daemon d;
	mp_daemon_start(&d, test, 1, NULL, NULL);
	char state[PATH_MAX];
	snprintf(state, sizeof(state), "%s/gw-state", tu_scratch_dir(test));
	cr_assert(mkdir(state, 0700) == 0);
	const char *const flags[] = { "--state-dir", state, NULL };
	struct gw_proc g;
	gw_start(&g, d.sock, test, "n1", flags);
	char *ref[N_TURNS];
	reference(g.port, NULL, "ref", ref);
	struct conv_run c = { .id = "kept" };
	expect_turn(g.port, NULL, &c, 0, ref, "first");
	char file[PATH_MAX + 32];
	snprintf(file, sizeof(file), "%s/conversations.json", state);
	struct stat sb;
	cr_assert(stat(file, &sb) == 0, "no %s", file);
	cr_assert_eq(sb.st_mode & 0777, 0600, "mode %o", sb.st_mode & 0777);
	gw_signal_wait(&g, SIGTERM);
	gw_start(&g, d.sock, test, "n1", flags);
	wait_health(&g, 200, 10.0);
	expect_turn(g.port, NULL, &c, 1, ref, "after skv-http's SIGTERM");
	gw_signal_wait(&g, SIGKILL);
	gw_start(&g, d.sock, test, "n1", flags);
	wait_health(&g, 200, 10.0);
	expect_turn(g.port, NULL, &c, 2, ref, "after skv-http's kill -9");
	expect_turn(g.port, NULL, &c, 3, ref, "after skv-http's kill -9");
	json_decref(c.messages);
	free_turns(ref);
	gw_signal_wait(&g, SIGTERM);
}

/* Export on one node, import on another: the conversation continues there byte for byte;
 * every bad body is refused with its reason, an id that exists with 409. */
Test(http_durable, export_import_between_nodes)
{
	const char *test = "httpd-move";
	struct mp_daemon d1, d2;
	node_daemon(&d1, test, "n1", NULL);
	node_daemon(&d2, test, "n2", NULL);
	struct gw_proc g1, g2, g3;
	gw_start(&g1, d1.sock, test, "n1", NULL);
	gw_start(&g2, d2.sock, test, "n2", NULL);
	gw_start(&g3, d2.sock, test, "n3", (const char *const[]){ "--model-name", "other", NULL });
	char *ref[N_TURNS];
	reference(g1.port, NULL, "ref", ref);
	struct conv_run c = { .id = "mover" };
	expect_turn(g1.port, NULL, &c, 0, ref, "on n1");
	expect_turn(g1.port, NULL, &c, 1, ref, "on n1");

	struct http_answer ex;
	http_do(g1.port, "GET", "/v1/conversations/mover/export", NULL, NULL, 0, &ex);
	cr_assert_eq(ex.status, 200, "%s", ex.body);
	char *type = header(&ex, "Content-Type"), *node = header(&ex, "X-Skv-Node");
	cr_assert_str_eq(type, "application/x-skv-conversation");
	cr_assert_str_eq(node, "n1");
	free(type);
	free(node);
	cr_assert(ex.len > 40 + 4096 && !memcmp(ex.body, "SKVCONV", 8), "%zu bytes", ex.len);
	uint64_t json_len = 0;
	memcpy(&json_len, ex.body + 16, 8);
	json_t *state = json_loadb(ex.body + 40, json_len, 0, NULL);
	cr_assert(state, "the JSON state");
	cr_assert_str_eq(json_string_value(json_object_get(state, "id")), "mover");
	cr_assert_eq(json_integer_value(json_object_get(state, "messages")), 4, "2 chat turns");
	json_decref(state);

	struct http_answer a;
	/* Bad bodies, each with its reason. */
	http_do(g2.port, "PUT", "/v1/conversations/mover", NULL, "hello", 5, &a);
	expect_error(&a, 400, NULL, "SKVCONV", "not a conversation");
	answer_free(&a);
	http_do(g2.port, "PUT", "/v1/conversations/mover", NULL, ex.body, ex.len - 1000, &a);
	expect_error(&a, 400, NULL, "truncated", "truncated");
	answer_free(&a);
	char *bad = malloc(ex.len);
	memcpy(bad, ex.body, ex.len);
	bad[40 + 2] ^= 1; /* the JSON state */
	http_do(g2.port, "PUT", "/v1/conversations/mover", NULL, bad, ex.len, &a);
	expect_error(&a, 400, NULL, "checksum", "a corrupted state");
	answer_free(&a);
	memcpy(bad, ex.body, ex.len);
	bad[ex.len - 7] ^= 0x10; /* the snapshot's K/V bytes: the daemon's sha256 */
	http_do(g2.port, "PUT", "/v1/conversations/mover", NULL, bad, ex.len, &a);
	expect_error(&a, 422, "conversation_refused", "sha256", "a corrupted snapshot");
	answer_free(&a);
	memcpy(bad, ex.body, ex.len);
	bad[8] = 2; /* format 2.0 */
	http_do(g2.port, "PUT", "/v1/conversations/mover", NULL, bad, ex.len, &a);
	expect_error(&a, 422, NULL, "newer", "a newer format");
	answer_free(&a);
	free(bad);
	http_do(g2.port, "PUT", "/v1/conversations/other-id", NULL, ex.body, ex.len, &a);
	expect_error(&a, 400, NULL, "not 'other-id'", "another id");
	answer_free(&a);
	http_do(g3.port, "PUT", "/v1/conversations/mover", NULL, ex.body, ex.len, &a);
	expect_error(&a, 422, "conversation_refused", "model", "another model");
	answer_free(&a);
	http_do(g1.port, "PUT", "/v1/conversations/mover", NULL, ex.body, ex.len, &a);
	expect_error(&a, 409, "conversation_exists", NULL, "an id that exists");
	answer_free(&a);

	/* The good one; n1 lets it go with release=1. */
	http_do(g2.port, "PUT", "/v1/conversations/mover", NULL, ex.body, ex.len, &a);
	cr_assert_eq(a.status, 200, "import: %s", a.body);
	answer_free(&a);
	answer_free(&ex);
	http_do(g1.port, "GET", "/v1/conversations/mover/export?release=1", NULL, NULL, 0, &ex);
	cr_assert_eq(ex.status, 200, "%s", ex.body);
	answer_free(&ex);
	http_do(g1.port, "GET", "/v1/conversations/mover/export", NULL, NULL, 0, &a);
	expect_error(&a, 404, "conversation_not_found", NULL, "released");
	answer_free(&a);
	expect_turn(g2.port, NULL, &c, 2, ref, "on n2 after the move");
	expect_turn(g2.port, NULL, &c, 3, ref, "on n2 after the move");
	json_decref(c.messages);
	free_turns(ref);
	gw_signal_wait(&g3, SIGTERM);
	gw_signal_wait(&g2, SIGTERM);
	gw_signal_wait(&g1, SIGTERM);
}

/* Two nodes that know each other (--peers, --peer-key): n1 drains (POST /admin/drain), the
 * conversation's next request lands on n2, which pulls it from n1 and says so; a conversation
 * nobody has is a new one. */
Test(http_durable, drain_and_pull_from_peer)
{
	const char *test = "httpd-peers";
	struct mp_daemon d1, d2;
	node_daemon(&d1, test, "n1", NULL);
	node_daemon(&d2, test, "n2", NULL);
	struct gw_proc g1, g2;
	uint16_t p1 = mp_free_port(), p2;
	do
		p2 = mp_free_port();
	while (p2 == p1);
	char peer1[128], peer2[64];
	/* n2 lists itself first, as a balancer's script that gives every node the same list
	 * would. */
	snprintf(peer1, sizeof(peer1), "http://127.0.0.1:%u,http://127.0.0.1:%u", p2, p1);
	snprintf(peer2, sizeof(peer2), "http://127.0.0.1:%u/", p2);
	gw_start_on(&g1, d1.sock, test, "n1", p1,
		    (const char *const[]){ "--api-key", "user", "--peer-key", "between", "--peers",
					   peer2, NULL });
	gw_start_on(&g2, d2.sock, test, "n2", p2,
		    (const char *const[]){ "--api-key", "user", "--peer-key", "between", "--peers",
					   peer1, NULL });
	const char *user = "Authorization: Bearer user\r\n";
	const char *peer = "Authorization: Bearer between\r\n";
	char *ref[N_TURNS];
	reference(g1.port, user, "ref", ref);
	struct conv_run c = { .id = "wander" };
	expect_turn(g1.port, user, &c, 0, ref, "on n1");
	expect_turn(g1.port, user, &c, 1, ref, "on n1");

	struct http_answer a;
	http_do(g1.port, "POST", "/admin/drain", NULL, NULL, 0, &a);
	cr_assert_eq(a.status, 401, "drain needs a key");
	answer_free(&a);
	http_do(g1.port, "GET", "/v1/conversations/wander/export", "Authorization: Bearer no\r\n",
		NULL, 0, &a);
	cr_assert_eq(a.status, 401, "export needs a key");
	answer_free(&a);
	http_do(g1.port, "POST", "/admin/drain", peer, NULL, 0, &a);
	cr_assert_eq(a.status, 200, "%s", a.body);
	answer_free(&a);
	http_do(g1.port, "GET", "/health", NULL, NULL, 0, &a);
	cr_assert_eq(a.status, 503);
	json_t *v = json_parse(a.body);
	cr_assert_str_eq(json_string_value(json_object_get(v, "status")), "draining");
	cr_assert_str_eq(json_string_value(json_object_get(v, "node")), "n1");
	json_decref(v);
	answer_free(&a);
	const char *small = "{\"prompt\":\"a\",\"max_tokens\":2}";
	http_do(g1.port, "POST", "/v1/completions",
		"Authorization: Bearer user\r\nX-Conversation-Id: newcomer\r\n", small,
		strlen(small), &a);
	expect_error(&a, 503, "draining", NULL, "a new conversation on a draining node");
	answer_free(&a);

	/* The balancer sends the conversation to n2 now. */
	struct http_answer first;
	char *got = turn(g2.port, user, &c, 2, &first);
	cr_assert_str_eq(got, ref[2], "moved: turn 2 differs from the uninterrupted run");
	free(got);
	char *moved = header(&first, "X-Skv-Conversation-Moved"), *node = header(&first, "X-Skv-Node");
	cr_assert(moved && !strcmp(moved, "from=n1"), "X-Skv-Conversation-Moved: %s", moved);
	cr_assert_str_eq(node, "n2");
	free(moved);
	free(node);
	answer_free(&first);
	expect_turn(g2.port, user, &c, 3, ref, "on n2");
	http_do(g2.port, "POST", "/v1/completions",
		"Authorization: Bearer user\r\nX-Conversation-Id: fresh\r\n", small, strlen(small),
		&a);
	cr_assert_eq(a.status, 200, "a conversation no peer has: %s", a.body);
	char *none = header(&a, "X-Skv-Conversation-Moved");
	cr_assert_null(none, "a new conversation did not move");
	answer_free(&a);
	http_do(g1.port, "GET", "/v1/conversations/wander/export", peer, NULL, 0, &a);
	expect_error(&a, 404, "conversation_not_found", NULL, "n1 let it go");
	answer_free(&a);
	http_do(g1.port, "POST", "/admin/undrain", peer, NULL, 0, &a);
	cr_assert_eq(a.status, 200);
	answer_free(&a);
	wait_health(&g1, 200, 5.0);
	/* SIGUSR1 drains too. */
	cr_assert(kill(g2.pid, SIGUSR1) == 0);
	wait_health(&g2, 503, 5.0);
	json_decref(c.messages);
	free_turns(ref);
	gw_signal_wait(&g2, SIGTERM);
	gw_signal_wait(&g1, SIGTERM);
}

/* A conversation whose requests alternate between two nodes moves at each one (pulled by the
 * node it lands on) and still equals the same conversation on one node; completions only, the
 * first prompt starting with a space. */
Test(http_durable, moves_back_and_forth)
{
	const char *test = "httpd-pingpong";
	struct mp_daemon d1, d2;
	node_daemon(&d1, test, "n1", NULL);
	node_daemon(&d2, test, "n2", NULL);
	uint16_t p1 = mp_free_port(), p2;
	do
		p2 = mp_free_port();
	while (p2 == p1);
	char peer1[64], peer2[64];
	snprintf(peer1, sizeof(peer1), "http://127.0.0.1:%u", p1);
	snprintf(peer2, sizeof(peer2), "http://127.0.0.1:%u", p2);
	struct gw_proc g1, g2;
	gw_start_on(&g1, d1.sock, test, "n1", p1, (const char *const[]){ "--peers", peer2, NULL });
	gw_start_on(&g2, d2.sock, test, "n2", p2, (const char *const[]){ "--peers", peer1, NULL });
	static const char *const prompts[] = { " and then", " the dog ran.", "  Two spaces",
					       "\\n\\nNew lines.", " End", "" };
	const int n = (int)(sizeof(prompts) / sizeof(prompts[0]));
	for (int i = 0; i < n; i++) {
		char body[256], *text[2];
		snprintf(body, sizeof(body), "{\"prompt\":\"%s\",\"max_tokens\":16,\"temperature\":0}",
			 prompts[i]);
		for (int k = 0; k < 2; k++) {
			/* k 0: always on n1; k 1: on n1 and n2 in turn. */
			uint16_t port = k && i % 2 ? p2 : p1;
			struct http_answer a;
			http_do(port, "POST", "/v1/completions",
				k ? "X-Conversation-Id: pingpong\r\n" : "X-Conversation-Id: still\r\n",
				body, strlen(body), &a);
			cr_assert_eq(a.status, 200, "turn %d (%s): %s", i, k ? "moving" : "still", a.body);
			text[k] = answer_text(&a, 0);
			char *moved = header(&a, "X-Skv-Conversation-Moved");
			if (k && i)
				cr_assert(moved && !strcmp(moved, i % 2 ? "from=n1" : "from=n2"),
					  "turn %d: X-Skv-Conversation-Moved: %s", i, moved);
			free(moved);
			answer_free(&a);
		}
		cr_assert_str_eq(text[1], text[0], "turn %d differs after a move", i);
		free(text[0]);
		free(text[1]);
	}
	gw_signal_wait(&g2, SIGTERM);
	gw_signal_wait(&g1, SIGTERM);
}

/* The message count in the JSON state of an exported conversation file (-1: none yet). */
static long file_messages(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	char head[40];
	long n = -1;
	uint64_t json_len = 0;
	if (fread(head, 1, 40, f) == 40 && !memcmp(head, "SKVCONV", 8)) {
		memcpy(&json_len, head + 16, 8);
		char *json = json_len < (1u << 20) ? malloc(json_len) : NULL;
		if (json && fread(json, 1, json_len, f) == json_len) {
			json_t *v = json_loadb(json, json_len, 0, NULL);
			n = v ? (long)json_integer_value(json_object_get(v, "messages")) : -1;
			json_decref(v);
		}
		free(json);
	}
	fclose(f);
	return n;
}

/* --snapshot-dir: a node dies (its daemon and skv-http killed -9); the other node, whose peer
 * does not answer, restores the conversation from its last periodic export and says how old it
 * is. DELETE takes the file with it. */
Test(http_durable, snapshot_dir_outlives_a_dead_node)
{
	const char *test = "httpd-snapdir";
	struct mp_daemon d1, d2;
	node_daemon(&d1, test, "n1", NULL);
	node_daemon(&d2, test, "n2", NULL);
	char snaps[PATH_MAX], file[PATH_MAX + 32], peer1[64];
	snprintf(snaps, sizeof(snaps), "%s/snapshots", tu_scratch_dir(test));
	cr_assert(mkdir(snaps, 0700) == 0);
	snprintf(file, sizeof(file), "%s/saved.skvconv", snaps);
	uint16_t p1 = mp_free_port();
	snprintf(peer1, sizeof(peer1), "http://127.0.0.1:%u", p1);
	struct gw_proc g1, g2;
	gw_start_on(&g1, d1.sock, test, "n1", p1,
		    (const char *const[]){ "--snapshot-dir", snaps, "--snapshot-interval", "1",
					   NULL });
	gw_start(&g2, d2.sock, test, "n2",
		 (const char *const[]){ "--snapshot-dir", snaps, "--peers", peer1, NULL });
	char *ref[N_TURNS];
	reference(g2.port, NULL, "ref", ref);
	struct conv_run c = { .id = "saved" };
	expect_turn(g1.port, NULL, &c, 0, ref, "on n1");
	expect_turn(g1.port, NULL, &c, 1, ref, "on n1");
	double deadline = mp_now() + 15.0;
	while (file_messages(file) != 4) {
		cr_assert(mp_now() < deadline, "no export of both turns in %s", file);
		mp_sleep_ms(100);
	}
	gw_signal_wait(&g1, SIGKILL);
	cr_assert(kill(d1.pid, SIGKILL) == 0);
	cr_assert(mp_daemon_reap(&d1, 10.0));

	struct http_answer first;
	char *got = turn(g2.port, NULL, &c, 2, &first);
	cr_assert_str_eq(got, ref[2], "restored: turn 2 differs from the uninterrupted run");
	free(got);
	char *restored = header(&first, "X-Skv-Conversation-Restored");
	long age = -1;
	cr_assert(restored && sscanf(restored, "snapshot; age-s=%ld", &age) == 1 && age >= 0 &&
		  age < 60, "X-Skv-Conversation-Restored: %s", restored);
	free(restored);
	answer_free(&first);
	expect_turn(g2.port, NULL, &c, 3, ref, "on n2");
	struct http_answer a;
	http_do(g2.port, "DELETE", "/v1/conversations/saved", NULL, NULL, 0, &a);
	cr_assert_eq(a.status, 200, "%s", a.body);
	answer_free(&a);
	cr_assert(access(file, F_OK) < 0, "DELETE leaves %s", file);
	json_decref(c.messages);
	free_turns(ref);
	gw_signal_wait(&g2, SIGTERM);
}

/* Strict flags: one line, exit status 2 (1 for a directory that cannot be written). */
Test(http_durable, flags)
{
	static const char *const bad[][7] = { /* NULL-terminated rows */
		{ "--socket", "x", "--node-name", "a b", NULL },
		{ "--socket", "x", "--peers", "ftp://host", NULL },
		{ "--socket", "x", "--peers", ",", NULL },
		{ "--socket", "x", "--peer-key", "", NULL },
		{ "--socket", "x", "--snapshot-interval", "5", NULL },
		{ "--socket", "x", "--snapshot-interval", "0", "--snapshot-dir", "/" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *out, *err;
		int st = mp_run(mp_env_path("SKV_HTTP_BIN"), bad[i], &out, &err);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "case %zu: status 0x%x (%s)", i, st,
			  err);
		cr_assert(!strncmp(err, "skv-http: ", 10) && strchr(err, '\n') == err + strlen(err) - 1,
			  "case %zu: not one line: %s", i, err);
		free(out);
		free(err);
	}
	char *out, *err;
	int st = mp_run(mp_env_path("SKV_HTTP_BIN"),
			(const char *const[]){ "--socket", "x", "--state-dir", "/nonexistent/dir", NULL },
			&out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 1 && strstr(err, "--state-dir"), "%s", err);
	free(out);
	free(err);
}
