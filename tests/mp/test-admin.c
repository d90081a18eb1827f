/* skv-admin against a real skv-cached: a known workload (streams opened through libskv with
 * known prompts and policies, each fed its prompt with GENERATE 0 so that it sits idle in a known
 * state), then the tool run as a child ($SKV_ADMIN_BIN, stdout and stderr captured), its
 * numbers checked against what the workload must have produced: the stream table, the token
 * ids and text of the sinks and the window, the ring's slot order, every `info` section and key,
 * the Prometheus exposition parsed line by line. Then the failure paths (no daemon, unknown
 * stream, usage errors: one line, exit 1 or 2), top's batch mode across a daemon restart, and
 * watch's events. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model.h"
#include "mputil.h"
#include "skv-error.h"
#include "stream.h"
#include "testutil.h"
#include "tokenizer.h"

extern char **environ;

#define SINKS 4
#define SINK_WINDOW 16
#define WINDOW_WINDOW 32
#define ARENA_MB 64                /* mp_daemon_start's --arena-mb */
#define CHILD_TIMEOUT_S 30.0
/* Long enough to evict from a 4 + 16 cache; short enough to fit a 32-slot window. */
static const char sink_prompt[] =
	"Once upon a time, there was a little girl named Lily. She loved to play outside in "
	"the sunshine. One day, she saw a big red ball in the park.";
static const char window_prompt[] = "The cat sat on the mat.";

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(admin, .init = suite_init, .fini = suite_fini, .timeout = 120);

/* ---- running skv-admin -------------------------------------------------------------------- */

static int admin_run(const char *sock, const char *const *args, char **out, char **err)
{
	const char *argv[32];
	unsigned n = 0;
	argv[n++] = "--socket";
	argv[n++] = sock;
	for (unsigned i = 0; args[i]; i++) {
		cr_assert(n < 31);
		argv[n++] = args[i];
	}
	argv[n] = NULL;
	return mp_run(mp_env_path("SKV_ADMIN_BIN"), argv, out, err);
}

/* Exit 0, nothing on stderr; returns stdout. */
static char *admin_ok(const char *sock, const char *const *args)
{
	char *out, *err;
	int status = admin_run(sock, args, &out, &err);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "skv-admin %s failed (status 0x%x): %s", args[0], status, err);
	cr_assert_str_eq(err, "", "skv-admin %s wrote to stderr: %s", args[0], err);
	free(err);
	return out;
}
#define ADMIN_OK(sock, ...) admin_ok(sock, (const char *const[]){ __VA_ARGS__, NULL })

static json_t *admin_json(const char *sock, const char *const *args)
{
	char *out = admin_ok(sock, args);
	json_error_t error;
	json_t *j = json_loads(out, 0, &error);
	cr_assert(j != NULL, "skv-admin %s --json: not JSON (line %d: %s):\n%s", args[0],
		  error.line, error.text, out);
	free(out);
	return j;
}
#define ADMIN_JSON(sock, ...) admin_json(sock, (const char *const[]){ __VA_ARGS__, NULL })

/* A failure: exit status want, nothing on stdout, exactly one line on stderr that starts with
 * "skv-admin: " and contains needle (if not NULL). */
static void admin_fails(const char *sock, const char *const *args, int want, const char *needle)
{
	char *out, *err;
	int status = admin_run(sock, args, &out, &err);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == want,
		  "skv-admin %s %s: status 0x%x, wanted exit %d; stderr: %s", args[0],
		  args[1] ? args[1] : "", status, want, err);
	cr_assert_str_eq(out, "", "skv-admin %s printed on stdout: %s", args[0], out);
	size_t len = strlen(err);
	cr_assert(len > 0 && err[len - 1] == '\n' && strchr(err, '\n') == err + len - 1,
		  "skv-admin %s: stderr is not one line: '%s'", args[0], err);
	cr_assert(strncmp(err, "skv-admin: ", 11) == 0, "stderr: %s", err);
	if (needle)
		cr_assert(strstr(err, needle) != NULL, "stderr lacks '%s': %s", needle, err);
	free(out);
	free(err);
}
#define ADMIN_FAILS(sock, want, needle, ...) \
	admin_fails(sock, (const char *const[]){ __VA_ARGS__, NULL }, want, needle)

/* skv-admin as a child that keeps running: stdout into a memfd (read with fd_text). Tracked
 * by pidfd for the final clean-up; the caller reaps it. */
static pid_t admin_spawn(const char *sock, const char *const *args, int *out_fd)
{
	const char *argv[32];
	unsigned n = 0;
	argv[n++] = mp_env_path("SKV_ADMIN_BIN");
	argv[n++] = "--socket";
	argv[n++] = sock;
	for (unsigned i = 0; args[i]; i++) {
		cr_assert(n < 31);
		argv[n++] = args[i];
	}
	argv[n] = NULL;
	*out_fd = (int)syscall(SYS_memfd_create, "admin-out", 1u /* MFD_CLOEXEC */);
	cr_assert(*out_fd >= 0, "memfd_create: %s", strerror(errno));
	posix_spawn_file_actions_t fa;
	cr_assert(posix_spawn_file_actions_init(&fa) == 0);
	cr_assert(posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0) ==
		  0);
	cr_assert(posix_spawn_file_actions_adddup2(&fa, *out_fd, STDOUT_FILENO) == 0);
	pid_t pid;
	int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
	cr_assert(rc == 0, "posix_spawn %s: %s", argv[0], strerror(rc));
	posix_spawn_file_actions_destroy(&fa);
	cr_assert(mp_track_pidfd(pid) >= 0);
	return pid;
}

/* What a child wrote so far (malloc'ed, NUL-terminated). */
static char *fd_text(int fd)
{
	off_t size = lseek(fd, 0, SEEK_END);
	cr_assert(size >= 0);
	char *buf = malloc((size_t)size + 1);
	cr_assert(buf != NULL);
	ssize_t n = pread(fd, buf, (size_t)size, 0);
	cr_assert(n == size, "pread: %s", strerror(errno));
	buf[size] = '\0';
	return buf;
}

/* Reap a spawned child within timeout_s; returns its wait status. */
static int reap(pid_t pid, double timeout_s)
{
	double deadline = mp_now() + timeout_s;
	for (;;) {
		int status;
		pid_t p = waitpid(pid, &status, WNOHANG);
		cr_assert(p >= 0, "waitpid: %s", strerror(errno));
		if (p == pid)
			return status;
		cr_assert(mp_now() < deadline, "skv-admin did not exit within %.0f s", timeout_s);
		mp_sleep_ms(10);
	}
}

/* ---- the workload ------------------------------------------------------------------------- */

struct workload {
	struct mp_daemon d;
	struct skv_client *client;
	struct skv_client_stream *sink, *window;
	uint64_t sink_kv, window_kv;          /* as OPENED told the client */
	struct skv_model *model;
	struct skv_tokenizer *tok;
	int32_t *sink_ids, *window_ids;       /* the prompts as the engine tokenizes them */
	size_t n_sink_ids, n_window_ids;
};

static void tokenize(struct workload *w, const char *text, int32_t **ids, size_t *n)
{
	cr_assert(skv_tokenizer_encode(w->tok, text, strlen(text), 1, 0, ids, n) == 0);
}

/* A stream fed its prompt and idle: GENERATE 0 feeds the prompt, then DONE. */
static struct skv_client_stream *open_fed(struct workload *w, uint32_t policy, int64_t sinks,
					  int64_t window, const char *prompt, uint64_t *kv)
{
	struct skv_stream_params p;
	mp_params_default(&p);
	p.policy = policy;
	p.sink_slots = sinks;
	p.window_slots = window;
	struct skv_client_stream *s = mp_open(w->client, &p, NULL);
	struct skv_client_stream_info info;
	skv_client_stream_info(s, &info);
	*kv = info.kv_bytes;
	mp_request(s, prompt, SKV_CHAN_GENERATE, 0);
	struct mp_result r = { 0 };
	mp_collect(s, &r, REQUEST_TIMEOUT_S);
	cr_assert(r.done && r.tokens == 0, "GENERATE 0 produced %llu tokens",
		  (unsigned long long)r.tokens);
	mp_result_free(&r);
	return s;
}

static void workload_start(struct workload *w, const char *test)
{
	memset(w, 0, sizeof(*w));
	char msg[256] = "";
	cr_assert(skv_model_open(tu_model_path("stories260K.bin"), &w->model, msg, sizeof(msg)) ==
		  0, "%s", msg);
	cr_assert(skv_tokenizer_load(tu_model_path("tok512.bin"), w->model->cfg.vocab_size,
				     &w->tok, msg, sizeof(msg)) == 0, "%s", msg);
	tokenize(w, sink_prompt, &w->sink_ids, &w->n_sink_ids);
	tokenize(w, window_prompt, &w->window_ids, &w->n_window_ids);
	cr_assert(w->n_sink_ids > SINKS + SINK_WINDOW, "the sink prompt does not evict");
	cr_assert(w->n_window_ids < WINDOW_WINDOW, "the window prompt does not fit its window");

	mp_daemon_start(&w->d, test, 2, NULL, NULL);
	w->client = mp_connect(&w->d);
	w->sink = open_fed(w, SKV_POLICY_SINK, SINKS, SINK_WINDOW, sink_prompt, &w->sink_kv);
	w->window = open_fed(w, SKV_POLICY_WINDOW, -1, WINDOW_WINDOW, window_prompt,
			     &w->window_kv);
}

static void workload_stop(struct workload *w)
{
	skv_client_disconnect(w->client);
	free(w->sink_ids);
	free(w->window_ids);
	skv_tokenizer_free(w->tok);
	skv_model_close(w->model);
}

/* llama2.c's decode over a run of ids: prev token = the previous id; prev before the first. */
static char *decode(const struct skv_tokenizer *tok, const int32_t *ids, size_t n, int32_t prev)
{
	size_t cap = 1, len = 0;
	for (size_t i = 0; i < n; i++) {
		size_t piece_len;
		cr_assert(skv_tokenizer_decode(tok, i ? ids[i - 1] : prev, ids[i], &piece_len));
		cap += piece_len;
	}
	char *text = malloc(cap);
	cr_assert(text != NULL);
	for (size_t i = 0; i < n; i++) {
		size_t piece_len;
		const char *piece = skv_tokenizer_decode(tok, i ? ids[i - 1] : prev, ids[i],
							 &piece_len);
		memcpy(text + len, piece, piece_len);
		len += piece_len;
	}
	text[len] = '\0';
	return text;
}

/* The text form of a decoded string: quoted, with \n, \t, \\ and \" escaped (ASCII input). */
static char *quoted(const char *s)
{
	char *q = malloc(2 * strlen(s) + 3);
	cr_assert(q != NULL);
	char *o = q;
	*o++ = '"';
	for (; *s; s++) {
		if (*s == '\n') {
			*o++ = '\\';
			*o++ = 'n';
		} else if (*s == '\t') {
			*o++ = '\\';
			*o++ = 't';
		} else if (*s == '\\' || *s == '"') {
			*o++ = '\\';
			*o++ = *s;
		} else {
			*o++ = *s;
		}
	}
	*o++ = '"';
	*o = '\0';
	return q;
}

/* ---- JSON helpers ------------------------------------------------------------------------- */

static json_int_t jint(const json_t *o, const char *key)
{
	const json_t *v = json_object_get(o, key);
	cr_assert(json_is_integer(v), "JSON field %s is missing or not an integer", key);
	return json_integer_value(v);
}

static const char *jstr(const json_t *o, const char *key)
{
	const json_t *v = json_object_get(o, key);
	cr_assert(json_is_string(v), "JSON field %s is missing or not a string", key);
	return json_string_value(v);
}

static void jrange(const json_t *o, const char *key, json_int_t first, json_int_t last)
{
	const json_t *v = json_object_get(o, key);
	cr_assert(json_is_array(v) && json_array_size(v) == 2, "JSON field %s is not a range", key);
	cr_assert_eq(json_integer_value(json_array_get(v, 0)), first, "%s starts wrong", key);
	cr_assert_eq(json_integer_value(json_array_get(v, 1)), last, "%s ends wrong", key);
}

static void jids(const json_t *o, const char *key, const int32_t *ids, size_t n)
{
	const json_t *v = json_object_get(o, key);
	cr_assert(json_is_array(v), "JSON field %s is not an array", key);
	cr_assert_eq(json_array_size(v), n, "%s holds %zu ids, not %zu", key, json_array_size(v),
		     n);
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(json_integer_value(json_array_get(v, i)), ids[i], "%s[%zu]", key, i);
}

/* The one row of the streams array with this policy. */
static const json_t *row_by_policy(const json_t *rows, const char *policy)
{
	const json_t *found = NULL;
	size_t i;
	json_t *row;
	json_array_foreach(rows, i, row) {
		if (strcmp(jstr(row, "policy"), policy) == 0) {
			cr_assert(found == NULL, "two %s streams", policy);
			found = row;
		}
	}
	cr_assert(found != NULL, "no %s stream", policy);
	return found;
}

/* The value of "key:" at the start of a line of text output (copied), asserted present once. */
static void text_field(const char *text, const char *key, char *value, size_t len)
{
	char pattern[128];
	snprintf(pattern, sizeof(pattern), "\n%s:", key);
	const char *at = strncmp(text, pattern + 1, strlen(pattern + 1)) == 0 ? text - 1 :
										   strstr(text, pattern);
	cr_assert(at != NULL, "no line '%s:' in:\n%s", key, text);
	cr_assert(strstr(at + 1, pattern) == NULL, "two lines '%s:' in:\n%s", key, text);
	at += strlen(pattern);
	size_t n = strcspn(at, "\n");
	cr_assert(n < len, "value of %s too long", key);
	memcpy(value, at, n);
	value[n] = '\0';
}

static void text_expect(const char *text, const char *key, const char *want)
{
	char value[4096];
	text_field(text, key, value, sizeof(value));
	cr_assert_str_eq(value, want, "%s:%s, expected %s", key, value, want);
}

static void text_expect_u(const char *text, const char *key, unsigned long long want)
{
	char expect[32];
	snprintf(expect, sizeof(expect), "%llu", want);
	text_expect(text, key, expect);
}

/* ==== the stream table ====================================================================== */

Test(admin, streams_match_the_workload)
{
	struct workload w;
	workload_start(&w, "streams");
	const char *sock = w.d.sock;
	size_t n = w.n_sink_ids, n2 = w.n_window_ids;

	json_t *rows = ADMIN_JSON(sock, "streams", "--json");
	cr_assert(json_is_array(rows) && json_array_size(rows) == 2, "streams --json: %zu rows",
		  json_array_size(rows));
	const json_t *sink = row_by_policy(rows, "sink");
	cr_assert_eq(jint(sink, "sink_slots"), SINKS);
	cr_assert_eq(jint(sink, "window_slots"), SINK_WINDOW);
	cr_assert_eq(jint(sink, "sink_fill"), SINKS);
	cr_assert_eq(jint(sink, "window_fill"), SINK_WINDOW, "window fill = min(window, n - sinks)");
	cr_assert_eq(jint(sink, "tokens_seen"), (json_int_t)n);
	cr_assert_eq(jint(sink, "tokens_evicted"), (json_int_t)(n - SINKS - SINK_WINDOW),
		     "evicted = seen - sinks - window");
	cr_assert_eq(jint(sink, "window_start"), (json_int_t)(n - SINK_WINDOW));
	cr_assert_eq(jint(sink, "ring_head"),
		     SINKS + (json_int_t)((n - SINK_WINDOW - SINKS) % SINK_WINDOW));
	cr_assert_eq(jint(sink, "kv_bytes"), (json_int_t)w.sink_kv);
	cr_assert_eq(jint(sink, "client_pid"), getpid());
	cr_assert(jint(sink, "engine") < 2);
	cr_assert(jint(sink, "id") > 0);
	cr_assert_str_eq(jstr(sink, "state"), "open");
	cr_assert_str_eq(jstr(sink, "evict"), "token");
	cr_assert_str_eq(jstr(sink, "positions"), "cache");
	cr_assert(json_is_number(json_object_get(sink, "age_seconds")));
	cr_assert(json_is_number(json_object_get(sink, "tokens_per_second")));

	const json_t *window = row_by_policy(rows, "window");
	cr_assert_eq(jint(window, "sink_slots"), 0);
	cr_assert_eq(jint(window, "window_slots"), WINDOW_WINDOW);
	cr_assert_eq(jint(window, "sink_fill"), 0);
	cr_assert_eq(jint(window, "window_fill"), (json_int_t)n2);
	cr_assert_eq(jint(window, "tokens_seen"), (json_int_t)n2);
	cr_assert_eq(jint(window, "tokens_evicted"), 0);
	cr_assert_eq(jint(window, "window_start"), 0);
	cr_assert_eq(jint(window, "kv_bytes"), (json_int_t)w.window_kv);
	json_int_t sink_id = jint(sink, "id"), window_id = jint(window, "id");
	cr_assert_neq(sink_id, window_id);

	/* Sorting: by tokens seen (largest first by default, or :asc), by id. */
	json_t *sorted = ADMIN_JSON(sock, "streams", "--json", "--sort", "tokens_seen");
	cr_assert_eq(jint(json_array_get(sorted, 0), "id"), sink_id);
	json_decref(sorted);
	sorted = ADMIN_JSON(sock, "streams", "--json", "--sort", "seen:asc");
	cr_assert_eq(jint(json_array_get(sorted, 0), "id"), window_id);
	json_decref(sorted);
	sorted = ADMIN_JSON(sock, "streams", "--json", "--sort", "id:desc");
	cr_assert_eq(jint(json_array_get(sorted, 0), "id"), sink_id > window_id ? sink_id : window_id);
	json_decref(sorted);

	/* The table: a header and one line per stream, in id order by default. */
	char *table = ADMIN_OK(sock, "streams");
	char *line2 = strchr(table, '\n');
	cr_assert(line2 && strstr(table, "ID") && strstr(table, "POLICY") && line2 > table);
	char want[64];
	unsigned lines = 0;
	for (const char *p = table; (p = strchr(p, '\n')); p++)
		lines++;
	cr_assert_eq(lines, 3, "streams table:\n%s", table);
	snprintf(want, sizeof(want), "%u/%u", SINK_WINDOW, SINK_WINDOW);
	cr_assert(strstr(table, want), "no %s in:\n%s", want, table);
	snprintf(want, sizeof(want), "%zu/%u", n2, WINDOW_WINDOW);
	cr_assert(strstr(table, want), "no %s in:\n%s", want, table);
	long first_id = strtol(line2 + 1, NULL, 10);
	cr_assert_eq(first_id, sink_id < window_id ? sink_id : window_id, "not in id order:\n%s",
		     table);
	free(table);
	json_decref(rows);
	workload_stop(&w);
}

/* ==== one stream in depth ================================================================== */

Test(admin, stream_decodes_sinks_window_and_ring)
{
	struct workload w;
	workload_start(&w, "stream");
	const char *sock = w.d.sock;
	size_t n = w.n_sink_ids, n2 = w.n_window_ids;
	json_t *rows = ADMIN_JSON(sock, "streams", "--json");
	char sink_id[32], window_id[32];
	snprintf(sink_id, sizeof(sink_id), "%" JSON_INTEGER_FORMAT,
		 jint(row_by_policy(rows, "sink"), "id"));
	snprintf(window_id, sizeof(window_id), "%" JSON_INTEGER_FORMAT,
		 jint(row_by_policy(rows, "window"), "id"));
	json_decref(rows);

	/* Sink stream: the first 4 prompt tokens (BOS first) pinned, the last 16 in the window. */
	json_t *d = ADMIN_JSON(sock, "stream", sink_id, "--json");
	cr_assert_eq(w.sink_ids[0], SKV_TOKEN_BOS);
	jids(d, "sink_ids", w.sink_ids, SINKS);
	const int32_t *last = w.sink_ids + n - SINK_WINDOW;
	jids(d, "window_ids", last, SINK_WINDOW);
	cr_assert_eq(jint(d, "sink_first_position"), 0);
	cr_assert_eq(jint(d, "window_first_position"), (json_int_t)(n - SINK_WINDOW));
	char *sink_text = decode(w.tok, w.sink_ids, SINKS, -1);
	/* Tokens between the sinks and the window were evicted: the window's first token has no
	 * known predecessor. */
	char *window_text = decode(w.tok, last, SINK_WINDOW, -1);
	cr_assert_str_eq(jstr(d, "sink_text"), sink_text);
	cr_assert_str_eq(jstr(d, "window_text"), window_text);
	const json_t *pos = json_object_get(d, "model_positions");
	jrange(pos, "sinks_cache", 0, SINKS - 1);
	jrange(pos, "window_cache", SINKS, SINKS + SINK_WINDOW - 1);
	jrange(pos, "sinks_absolute", 0, SINKS - 1);
	jrange(pos, "window_absolute", (json_int_t)(n - SINK_WINDOW), (json_int_t)n - 1);
	const json_t *ring = json_object_get(d, "ring");
	cr_assert(json_object_get(ring, "note") == NULL, "ring note: %s", jstr(ring, "note"));
	jrange(ring, "window_slot_range", SINKS, SINKS + SINK_WINDOW - 1);
	/* Oldest first: from the head to the ring's end, then from its start. */
	json_int_t head = SINKS + (json_int_t)((n - SINK_WINDOW - SINKS) % SINK_WINDOW);
	cr_assert_eq(jint(ring, "ring_head"), head);
	const json_t *runs = json_object_get(ring, "runs");
	json_int_t first_run = SINKS + SINK_WINDOW - head;
	cr_assert_eq(json_array_size(runs), head == SINKS ? 1 : 2);
	jrange(json_array_get(runs, 0), "slots", head, SINKS + SINK_WINDOW - 1);
	jrange(json_array_get(runs, 0), "positions", (json_int_t)(n - SINK_WINDOW),
	       (json_int_t)(n - SINK_WINDOW) + first_run - 1);
	if (head != SINKS) {
		jrange(json_array_get(runs, 1), "slots", SINKS, head - 1);
		jrange(json_array_get(runs, 1), "positions",
		       (json_int_t)(n - SINK_WINDOW) + first_run, (json_int_t)n - 1);
	}
	json_decref(d);

	/* The same in text. */
	char *text = ADMIN_OK(sock, "stream", sink_id);
	cr_assert(strncmp(text, "# Stream\n", 9) == 0);
	cr_assert(strstr(text, "\n# Sinks\n") && strstr(text, "\n# Window\n") &&
		  strstr(text, "\n# Ring\n"), "sections missing:\n%s", text);
	text_expect(text, "id", sink_id);
	text_expect(text, "policy", "sink");
	text_expect_u(text, "tokens_seen", n);
	text_expect_u(text, "tokens_evicted", n - SINKS - SINK_WINDOW);
	text_expect_u(text, "window_fill", SINK_WINDOW);
	char *q = quoted(sink_text);
	text_expect(text, "sink_text", q);
	free(q);
	q = quoted(window_text);
	text_expect(text, "window_text", q);
	free(q);
	char want[256];
	snprintf(want, sizeof(want), "%zu..%zu", n - SINK_WINDOW, n - 1);
	text_expect(text, "window_positions", want);
	snprintf(want, sizeof(want), "%u..%u", SINKS, SINKS + SINK_WINDOW - 1);
	text_expect(text, "window_cache_positions", want);
	text_expect(text, "sink_positions", "0..3");
	if (head == SINKS)
		snprintf(want, sizeof(want), "slots %u..%u = positions %zu..%zu", SINKS,
			 SINKS + SINK_WINDOW - 1, n - SINK_WINDOW, n - 1);
	else
		snprintf(want, sizeof(want),
			 "slots %lld..%u = positions %zu..%lld, slots %u..%lld = positions %lld..%zu",
			 (long long)head, SINKS + SINK_WINDOW - 1, n - SINK_WINDOW,
			 (long long)(n - SINK_WINDOW) + first_run - 1, SINKS, (long long)head - 1,
			 (long long)(n - SINK_WINDOW) + first_run, n - 1);
	text_expect(text, "slot_order", want);
	free(text);
	free(sink_text);
	free(window_text);

	/* Window stream: no sinks; the whole prompt in the window, BOS first. */
	d = ADMIN_JSON(sock, "stream", window_id, "--json");
	jids(d, "sink_ids", NULL, 0);
	jids(d, "window_ids", w.window_ids, n2);
	window_text = decode(w.tok, w.window_ids, n2, -1);
	cr_assert_str_eq(jstr(d, "sink_text"), "");
	cr_assert_str_eq(jstr(d, "window_text"), window_text);
	pos = json_object_get(d, "model_positions");
	cr_assert(json_is_null(json_object_get(pos, "sinks_cache")));
	jrange(pos, "window_cache", 0, (json_int_t)n2 - 1);
	jrange(pos, "window_absolute", 0, (json_int_t)n2 - 1);
	free(window_text);
	json_decref(d);
	workload_stop(&w);
}

/* ==== info, arenas, engines ================================================================ */

static const char *const info_sections[][2] = {
	{ "server", "Server" }, { "memory", "Memory" }, { "arenas", "Arenas" },
	{ "engines", "Engines" }, { "streams", "Streams" }, { "stats", "Stats" },
};

/* The documented keys of every section (tools/admin-report.c), and arena0/engine0/engine1. */
static const char *const info_keys[][16] = {
	{ "skv_version", "protocol_version", "instance_id", "process_id", "uptime_seconds",
	  "model_path", "socket_path", NULL },
	{ "arena_bytes", "arena_used_bytes", "arena_free_bytes", "arena_largest_free_bytes",
	  "used_memory_ratio", "kv_bytes", NULL },
	{ "arenas", "arenas_hugetlb", "arena0", NULL },
	{ "engines", "engines_ready", "engine0", "engine1", NULL },
	{ "streams", "streams_open", "streams_closing", "streams_failed", "streams_sink",
	  "streams_window", "streams_dense", "streams_recompute", "streams_evicting",
	  "sink_tokens", "window_tokens", "window_slots", "window_fill_ratio", NULL },
	{ "streams_opened_total", "streams_closed_total", "streams_failed_total",
	  "engine_restarts_total", "tokens_generated_total", "prompt_tokens_total",
	  "tokens_evicted_total", "wake_syscalls_total", "engine_steps_total", "tokens_per_second",
	  "ttft_observations_total", "ttft_mean_seconds", "itl_observations_total",
	  "itl_mean_seconds", NULL },
};

Test(admin, info_has_every_section_and_key)
{
	struct workload w;
	workload_start(&w, "info");
	const char *sock = w.d.sock;
	size_t n = w.n_sink_ids, n2 = w.n_window_ids;
	struct skv_msg_stats st;
	mp_stats(&w.d, &st);

	char *text = ADMIN_OK(sock, "info");
	/* Sections in order, each "# Title" line followed by key:value lines. */
	const char *at = text;
	for (size_t s = 0; s < sizeof(info_sections) / sizeof(*info_sections); s++) {
		char header[32];
		snprintf(header, sizeof(header), "# %s\n", info_sections[s][1]);
		const char *h = strstr(at, header);
		cr_assert(h != NULL, "no section %s after the previous one:\n%s", header, text);
		at = h + strlen(header);
		for (unsigned k = 0; info_keys[s][k]; k++) {
			char value[1024];
			text_field(text, info_keys[s][k], value, sizeof(value));
		}
	}
	/* Every line is a header, empty, or key:value. */
	for (const char *line = text; *line;) {
		size_t len = strcspn(line, "\n");
		cr_assert(len == 0 || line[0] == '#' || memchr(line, ':', len),
			  "bad info line: %.*s", (int)len, line);
		line += len + (line[len] == '\n');
	}
	char want[64];
	snprintf(want, sizeof(want), "%016llx", (unsigned long long)st.instance);
	text_expect(text, "instance_id", want);
	text_expect_u(text, "process_id", (unsigned long long)w.d.pid);
	text_expect(text, "socket_path", w.d.sock);
	text_expect_u(text, "streams", 2);
	text_expect_u(text, "streams_open", 2);
	text_expect_u(text, "streams_sink", 1);
	text_expect_u(text, "streams_window", 1);
	text_expect_u(text, "streams_evicting", 1);
	text_expect_u(text, "sink_tokens", SINKS);
	text_expect_u(text, "window_tokens", SINK_WINDOW + n2);
	text_expect_u(text, "window_slots", SINK_WINDOW + WINDOW_WINDOW);
	text_expect_u(text, "kv_bytes", w.sink_kv + w.window_kv);
	text_expect_u(text, "arena_used_bytes", st.arena_used_bytes);
	text_expect_u(text, "arena_bytes", st.arena_bytes);
	text_expect_u(text, "engines", 2);
	text_expect_u(text, "engines_ready", 2);
	text_expect_u(text, "streams_opened_total", 2);
	text_expect_u(text, "tokens_evicted_total", n - SINKS - SINK_WINDOW);
	text_expect_u(text, "prompt_tokens_total", n + n2);
	text_expect_u(text, "tokens_generated_total", 0);
	char value[1024];
	text_field(text, "engine0", value, sizeof(value));
	cr_assert(strstr(value, "state=ready") && strstr(value, "pid="), "engine0:%s", value);
	text_field(text, "arena0", value, sizeof(value));
	cr_assert(strstr(value, "used_bytes=") && strstr(value, "usage_ratio="), "arena0:%s",
		  value);

	/* JSON: the same sections and keys, and the same integers and strings as the text. */
	json_t *info = ADMIN_JSON(sock, "info", "--json");
	for (size_t s = 0; s < sizeof(info_sections) / sizeof(*info_sections); s++) {
		const json_t *section = json_object_get(info, info_sections[s][0]);
		cr_assert(json_is_object(section), "info --json has no %s", info_sections[s][0]);
		for (unsigned k = 0; info_keys[s][k]; k++)
			cr_assert(json_object_get(section, info_keys[s][k]) != NULL,
				  "info --json %s has no %s", info_sections[s][0], info_keys[s][k]);
		const char *key;
		json_t *v;
		json_object_foreach((json_t *)section, key, v) {
			if (json_is_integer(v)) {
				if (strcmp(key, "tokens_per_second") == 0)
					continue;
				text_expect_u(text, key, (unsigned long long)json_integer_value(v));
			} else if (json_is_string(v)) {
				text_expect(text, key, json_string_value(v));
			}
		}
	}
	json_decref(info);
	free(text);

	/* One section alone; an unknown one is a usage error. */
	text = ADMIN_OK(sock, "info", "streams");
	cr_assert(strncmp(text, "# Streams\n", 10) == 0 && !strstr(text, "# Server"), "%s", text);
	free(text);
	info = ADMIN_JSON(sock, "info", "memory", "--json");
	cr_assert_eq(json_object_size(info), 1);
	cr_assert(json_is_real(json_object_get(json_object_get(info, "memory"),
					       "used_memory_ratio")));
	json_decref(info);
	ADMIN_FAILS(sock, 2, "nosuch", "info", "nosuch");
	workload_stop(&w);
}

Test(admin, arenas_and_engines)
{
	struct workload w;
	workload_start(&w, "arenas");
	const char *sock = w.d.sock;
	struct skv_msg_stats st;
	mp_stats(&w.d, &st);

	json_t *arenas = ADMIN_JSON(sock, "arenas", "--json");
	cr_assert(json_is_array(arenas) && json_array_size(arenas) == st.arenas);
	uint64_t used = 0, live = 0;
	size_t i;
	json_t *a;
	json_array_foreach(arenas, i, a) {
		cr_assert_eq(jint(a, "index"), (json_int_t)i);
		cr_assert_eq(jint(a, "bytes"), (json_int_t)ARENA_MB << 20);
		cr_assert(jint(a, "used_bytes") + jint(a, "free_bytes") <= jint(a, "bytes"));
		cr_assert(jint(a, "largest_free_bytes") <= jint(a, "free_bytes"));
		const char *backing = jstr(a, "backing");
		cr_assert(strcmp(backing, "pages") == 0 || strcmp(backing, "hugetlb") == 0);
		cr_assert(strlen(jstr(a, "backing_desc")) > 0);
		cr_assert(jint(a, "page_bytes") >= 4096);
		cr_assert(json_is_real(json_object_get(a, "usage_ratio")));
		used += (uint64_t)jint(a, "used_bytes");
		live += (uint64_t)jint(a, "live_allocs");
		if (jint(a, "live_allocs"))
			cr_assert(jint(a, "size_classes_used") >= 1);
	}
	cr_assert_eq(used, st.arena_used_bytes);
	cr_assert(used >= w.sink_kv + w.window_kv);
	cr_assert_eq(live, 2, "two streams, two KV regions");
	json_decref(arenas);
	char *text = ADMIN_OK(sock, "arenas");
	cr_assert(strstr(text, "ARENA") && strstr(text, "backing: "), "%s", text);
	free(text);

	json_t *engines = ADMIN_JSON(sock, "engines", "--json");
	cr_assert(json_is_array(engines) && json_array_size(engines) == 2);
	json_int_t streams = 0, prompt = 0;
	json_array_foreach(engines, i, a) {
		cr_assert_eq(jint(a, "pid"), st.engine_pid[i]);
		cr_assert_str_eq(jstr(a, "state"), "ready");
		cr_assert_eq(jint(a, "supervised"), 1);
		cr_assert_eq(jint(a, "restarts"), 0);
		streams += jint(a, "streams");
		prompt += jint(a, "prompt_tokens");
		cr_assert(jint(a, "last_batch_rows") >= 0 && jint(a, "steps") >= 0);
		cr_assert(json_is_string(json_object_get(a, "cpus")));
	}
	cr_assert_eq(streams, 2);
	cr_assert_eq(prompt, (json_int_t)(w.n_sink_ids + w.n_window_ids));
	json_decref(engines);
	text = ADMIN_OK(sock, "engines");
	char pid[16];
	snprintf(pid, sizeof(pid), " %d ", st.engine_pid[1]);
	cr_assert(strstr(text, "PID") && strstr(text, pid) && strstr(text, "ready"), "%s", text);
	free(text);
	workload_stop(&w);
}

/* ==== metrics ============================================================================== */

struct sample {
	char name[128];
	char labels[256];
	double value;
};

struct family {
	char name[128];
	char type[16];
	int help;
};

static int metric_name_ok(const char *s, size_t len)
{
	if (!len || !(s[0] == '_' || s[0] == ':' || ((s[0] | 0x20) >= 'a' && (s[0] | 0x20) <= 'z')))
		return 0;
	for (size_t i = 1; i < len; i++)
		if (!(s[i] == '_' || s[i] == ':' || (s[i] >= '0' && s[i] <= '9') ||
		      ((s[i] | 0x20) >= 'a' && (s[i] | 0x20) <= 'z')))
			return 0;
	return 1;
}

static struct family *family_find(struct family *f, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(f[i].name, name) == 0)
			return &f[i];
	return NULL;
}

/* Parse the text exposition format strictly: every line a HELP, a TYPE, another comment, or
 * name{label="value",...} value; a family's TYPE comes before its samples and once. */
static size_t parse_prometheus(const char *text, struct sample *samples, size_t cap,
			       struct family *families, size_t *n_families)
{
	size_t n = 0;
	*n_families = 0;
	char line[1024];
	for (const char *p = text; *p;) {
		size_t len = strcspn(p, "\n");
		cr_assert(p[len] == '\n', "the exposition does not end in a newline");
		cr_assert(len < sizeof(line));
		memcpy(line, p, len);
		line[len] = '\0';
		p += len + 1;
		if (len == 0)
			continue;
		if (strncmp(line, "# HELP ", 7) == 0 || strncmp(line, "# TYPE ", 7) == 0) {
			char *name = line + 7;
			size_t name_len = strcspn(name, " ");
			cr_assert(metric_name_ok(name, name_len) && name[name_len] == ' ' &&
					  name_len < sizeof(families->name),
				  "bad line: %s", line);
			name[name_len] = '\0';
			const char *rest = name + name_len + 1;
			struct family *f = family_find(families, *n_families, name);
			if (!f) {
				cr_assert(*n_families < 64);
				f = &families[(*n_families)++];
				memset(f, 0, sizeof(*f));
				memcpy(f->name, name, name_len + 1);
			}
			if (line[2] == 'H') {
				cr_assert(!f->help && strlen(rest) > 0, "HELP for %s: %s", name, rest);
				f->help = 1;
			} else {
				cr_assert(!f->type[0], "two TYPE lines for %s", name);
				cr_assert(!strcmp(rest, "counter") || !strcmp(rest, "gauge") ||
						  !strcmp(rest, "histogram") || !strcmp(rest, "summary") ||
						  !strcmp(rest, "untyped"),
					  "TYPE %s %s", name, rest);
				snprintf(f->type, sizeof(f->type), "%s", rest);
			}
			continue;
		}
		if (line[0] == '#')
			continue;
		cr_assert(n < cap);
		struct sample *s = &samples[n++];
		size_t name_len = strcspn(line, "{ ");
		cr_assert(metric_name_ok(line, name_len), "bad metric name: %s", line);
		cr_assert(name_len < sizeof(s->name));
		memcpy(s->name, line, name_len);
		s->name[name_len] = '\0';
		const char *q = line + name_len;
		s->labels[0] = '\0';
		if (*q == '{') {
			const char *end = strchr(q, '}');
			cr_assert(end != NULL, "unclosed labels: %s", line);
			cr_assert((size_t)(end - q - 1) < sizeof(s->labels));
			memcpy(s->labels, q + 1, (size_t)(end - q - 1));
			s->labels[end - q - 1] = '\0';
			/* name="value" pairs, comma-separated. */
			for (const char *l = s->labels; *l;) {
				size_t ln = strcspn(l, "=");
				cr_assert(metric_name_ok(l, ln) && l[ln] == '=' && l[ln + 1] == '"',
					  "bad label in %s", line);
				l += ln + 2;
				while (*l && *l != '"')
					l += *l == '\\' ? 2 : 1;
				cr_assert(*l == '"', "unterminated label value in %s", line);
				l++;
				cr_assert(*l == '\0' || *l == ',', "bad label list in %s", line);
				if (*l == ',')
					l++;
			}
			q = end + 1;
		}
		cr_assert(*q == ' ', "no value: %s", line);
		q++;
		char *end;
		if (!strcmp(q, "+Inf"))
			s->value = INFINITY;
		else if (!strcmp(q, "-Inf"))
			s->value = -INFINITY;
		else if (!strcmp(q, "NaN"))
			s->value = NAN;
		else {
			s->value = strtod(q, &end);
			cr_assert(end != q && *end == '\0', "bad value: %s", line);
		}
		/* Its family: the name, or for histograms the name without its suffix. */
		struct family *f = family_find(families, *n_families, s->name);
		if (!f) {
			char base[128];
			snprintf(base, sizeof(base), "%s", s->name);
			static const char *const suffixes[] = { "_bucket", "_sum", "_count" };
			for (unsigned k = 0; k < 3 && !f; k++) {
				size_t bl = strlen(base), sl = strlen(suffixes[k]);
				if (bl > sl && strcmp(base + bl - sl, suffixes[k]) == 0) {
					base[bl - sl] = '\0';
					f = family_find(families, *n_families, base);
					if (f && strcmp(f->type, "histogram") != 0)
						f = NULL;
					snprintf(base, sizeof(base), "%s", s->name);
				}
			}
		}
		cr_assert(f && f->type[0] && f->help, "sample %s has no TYPE/HELP before it",
			  s->name);
	}
	return n;
}

static const struct sample *sample_get(const struct sample *s, size_t n, const char *name,
				       const char *labels)
{
	for (size_t i = 0; i < n; i++)
		if (!strcmp(s[i].name, name) && (!labels || !strcmp(s[i].labels, labels)))
			return &s[i];
	cr_assert_fail("no sample %s{%s}", name, labels ? labels : "");
	return NULL;
}

static void check_histogram(const struct sample *s, size_t n, const char *name)
{
	char bucket[160], count[160];
	snprintf(bucket, sizeof(bucket), "%s_bucket", name);
	snprintf(count, sizeof(count), "%s_count", name);
	double prev = 0, last = -1;
	unsigned buckets = 0, inf = 0;
	for (size_t i = 0; i < n; i++) {
		if (strcmp(s[i].name, bucket) != 0)
			continue;
		cr_assert(strncmp(s[i].labels, "le=\"", 4) == 0, "%s{%s}", bucket, s[i].labels);
		cr_assert(s[i].value >= prev, "%s is not cumulative", bucket);
		prev = last = s[i].value;
		inf += strcmp(s[i].labels, "le=\"+Inf\"") == 0;
		buckets++;
	}
	cr_assert(buckets >= 2 && inf == 1, "%s: %u buckets, %u +Inf", name, buckets, inf);
	cr_assert_eq(last, sample_get(s, n, count, NULL)->value, "%s: +Inf bucket != count", name);
	snprintf(count, sizeof(count), "%s_sum", name);
	cr_assert(sample_get(s, n, count, NULL)->value >= 0);
}

Test(admin, metrics_parse_as_prometheus_text)
{
	struct workload w;
	workload_start(&w, "metrics");
	const char *sock = w.d.sock;
	struct skv_msg_stats st;
	mp_stats(&w.d, &st);
	char *text = ADMIN_OK(sock, "metrics");
	static struct sample samples[256];
	static struct family families[64];
	size_t n_families;
	size_t n = parse_prometheus(text, samples, 256, families, &n_families);

	static const char *const counters[] = {
		"streamkv_tokens_generated_total", "streamkv_prompt_tokens_total",
		"streamkv_tokens_evicted_total", "streamkv_streams_opened_total",
		"streamkv_streams_closed_total", "streamkv_streams_failed_total",
		"streamkv_engine_restarts_total", "streamkv_ring_wakeups_total",
	};
	for (size_t i = 0; i < sizeof(counters) / sizeof(*counters); i++) {
		const struct family *f = family_find(families, n_families, counters[i]);
		cr_assert(f && !strcmp(f->type, "counter"), "%s is not a counter", counters[i]);
		sample_get(samples, n, counters[i], "");
	}
	/* Counters, and only counters, end in _total. */
	for (size_t i = 0; i < n_families; i++) {
		size_t len = strlen(families[i].name);
		int total = len > 6 && !strcmp(families[i].name + len - 6, "_total");
		cr_assert_eq(total, !strcmp(families[i].type, "counter"), "%s is a %s",
			     families[i].name, families[i].type);
		cr_assert(strncmp(families[i].name, "streamkv_", 9) == 0, "%s", families[i].name);
	}
	cr_assert_eq(sample_get(samples, n, "streamkv_streams", "")->value, 2);
	cr_assert_eq(sample_get(samples, n, "streamkv_streams_opened_total", "")->value, 2);
	cr_assert_eq(sample_get(samples, n, "streamkv_tokens_evicted_total", "")->value,
		     (double)(w.n_sink_ids - SINKS - SINK_WINDOW));
	cr_assert_eq(sample_get(samples, n, "streamkv_prompt_tokens_total", "")->value,
		     (double)(w.n_sink_ids + w.n_window_ids));
	cr_assert(!strcmp(family_find(families, n_families, "streamkv_streams")->type, "gauge"));

	/* Per arena, labelled as the arenas listing says. */
	json_t *arenas = ADMIN_JSON(sock, "arenas", "--json");
	size_t i;
	json_t *a;
	json_array_foreach(arenas, i, a) {
		char labels[64];
		json_int_t node = jint(a, "node");
		if (node >= 0)
			snprintf(labels, sizeof(labels), "arena=\"%zu\",node=\"%lld\"", i,
				 (long long)node);
		else
			snprintf(labels, sizeof(labels), "arena=\"%zu\",node=\"none\"", i);
		cr_assert_eq(sample_get(samples, n, "streamkv_kv_bytes_in_use", labels)->value,
			     (double)jint(a, "used_bytes"));
		double ratio = sample_get(samples, n, "streamkv_arena_usage_ratio", labels)->value;
		cr_assert(fabs(ratio - (double)jint(a, "used_bytes") / (double)jint(a, "bytes")) <
			  1e-12);
	}
	json_decref(arenas);
	const struct family *f = family_find(families, n_families, "streamkv_kv_bytes_in_use");
	cr_assert(f && !strcmp(f->type, "gauge"));
	f = family_find(families, n_families, "streamkv_arena_usage_ratio");
	cr_assert(f && !strcmp(f->type, "gauge"));

	/* Latency histograms, as the engines measured them. */
	f = family_find(families, n_families, "streamkv_time_to_first_token_seconds");
	cr_assert(f && !strcmp(f->type, "histogram"));
	check_histogram(samples, n, "streamkv_time_to_first_token_seconds");
	check_histogram(samples, n, "streamkv_inter_token_latency_seconds");
	free(text);
	ADMIN_FAILS(sock, 2, "--json", "metrics", "--json");
	workload_stop(&w);
}

/* ==== failures ============================================================================= */

Test(admin, no_daemon_exits_2_with_one_line)
{
	const char *dir = tu_scratch_dir("nodaemon");
	char sock[PATH_MAX];
	snprintf(sock, sizeof(sock), "%s/nobody-listens.sock", dir);
	static const char *const commands[] = { "info", "streams", "arenas", "engines", "top",
						"watch", "metrics" };
	for (size_t i = 0; i < sizeof(commands) / sizeof(*commands); i++) {
		admin_fails(sock, (const char *const[]){ commands[i], NULL }, 2, sock);
		admin_fails(sock, (const char *const[]){ commands[i], NULL }, 2, "skv-cached running");
	}
	ADMIN_FAILS(sock, 2, "no daemon", "stream", "1");
}

Test(admin, unknown_stream_and_usage_errors)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "usage", 1, NULL, NULL);
	ADMIN_FAILS(d.sock, 1, "no stream 999999", "stream", "999999");
	ADMIN_FAILS(d.sock, 1, "no stream 999999", "stream", "999999", "--json");
	ADMIN_FAILS(d.sock, 2, "'abc'", "stream", "abc");
	ADMIN_FAILS(d.sock, 2, "'-5'", "stream", "--", "-5");
	ADMIN_FAILS(d.sock, 2, "stream", "stream");
	ADMIN_FAILS(d.sock, 2, "unknown command 'frob'", "frob");
	ADMIN_FAILS(d.sock, 2, "--frob", "info", "--frob");
	ADMIN_FAILS(d.sock, 2, "unknown key 'nope'", "streams", "--sort", "nope");
	ADMIN_FAILS(d.sock, 2, "--sort", "info", "--sort", "id");
	ADMIN_FAILS(d.sock, 2, "--interval", "top", "--interval", "0");
	ADMIN_FAILS(d.sock, 2, "--interval", "top", "--interval");
	ADMIN_FAILS(d.sock, 2, "unexpected argument", "streams", "extra");
	ADMIN_FAILS(d.sock, 2, "--json", "top", "--json");
	admin_fails(d.sock, (const char *const[]){ NULL }, 2, "no command");
	/* The daemon is unharmed. */
	char *out = ADMIN_OK(d.sock, "info", "server");
	free(out);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.engines_ready, 1);
}

/* ==== top, watch =========================================================================== */

Test(admin, top_batch_frames)
{
	struct workload w;
	workload_start(&w, "top");
	const char *sock = w.d.sock;
	json_t *rows = ADMIN_JSON(sock, "streams", "--json");
	char *frame = ADMIN_OK(sock, "top");
	cr_assert(strncmp(frame, "skv-cached ", 11) == 0, "%s", frame);
	cr_assert(strstr(frame, "engines 2/2 ready") && strstr(frame, "streams 2"), "%s", frame);
	cr_assert(strstr(frame, "batch mode"), "%s", frame);
	char *header = strstr(frame, "\n    ID ");
	cr_assert(header != NULL, "no table header:\n%s", frame);
	size_t i;
	json_t *row;
	json_array_foreach(rows, i, row) {
		char id[32];
		snprintf(id, sizeof(id), "\n%6lld ", (long long)jint(row, "id"));
		cr_assert(strstr(header, id), "no row %s in:\n%s", id, frame);
	}
	free(frame);
	/* Three frames, a blank line between them, sorted as asked. */
	frame = ADMIN_OK(sock, "top", "-n", "3", "--interval", "0.1", "--sort", "seen");
	unsigned frames = 0;
	for (const char *p = frame; (p = strstr(p, "skv-cached ")); p++)
		frames += p == frame || p[-1] == '\n';
	cr_assert_eq(frames, 3, "%s", frame);
	cr_assert_eq(strstr(frame, "\n\nskv-cached ") != NULL, 1);
	char id[32];
	snprintf(id, sizeof(id), "\n%6lld ", (long long)jint(row_by_policy(rows, "sink"), "id"));
	header = strstr(frame, "\n    ID ");
	cr_assert(header && strncmp(strchr(header + 1, '\n'), id, strlen(id)) == 0,
		  "the stream with most tokens is not first:\n%s", frame);
	free(frame);
	json_decref(rows);
	workload_stop(&w);
}

Test(admin, top_names_a_daemon_restart)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "restart", 1, NULL, NULL);
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	uint64_t old_instance = st.instance;
	int out_fd;
	pid_t top = admin_spawn(d.sock, (const char *const[]){ "top", "--interval", "0.2", "-n",
							       "150", NULL }, &out_fd);
	mp_sleep_ms(500);
	cr_assert_eq(kill(d.pid, SIGTERM), 0);
	cr_assert(mp_daemon_reap(&d, 10.0), "skv-cached did not exit on SIGTERM");
	mp_sleep_ms(500);
	struct mp_daemon again;
	mp_daemon_start(&again, "restart", 1, NULL, NULL);
	mp_stats(&again, &st);
	char want[128];
	snprintf(want, sizeof(want), "instance %016llx -> %016llx",
		 (unsigned long long)old_instance, (unsigned long long)st.instance);
	double deadline = mp_now() + CHILD_TIMEOUT_S;
	char *text = NULL;
	for (;;) {
		free(text);
		text = fd_text(out_fd);
		if (strstr(text, want) || mp_now() > deadline)
			break;
		mp_sleep_ms(50);
	}
	kill(top, SIGINT);
	int status = reap(top, CHILD_TIMEOUT_S);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "top: status 0x%x", status);
	free(text);
	text = fd_text(out_fd);
	cr_assert(strstr(text, "lost skv-cached") || strstr(text, "unreachable since"),
		  "top did not say that the daemon went away:\n%s", text);
	cr_assert(strstr(text, "skv-cached restarted") && strstr(text, want),
		  "top did not name the restart (%s):\n%s", want, text);
	free(text);
	close(out_fd);
}

Test(admin, watch_prints_events)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "watch", 1, NULL, NULL);
	int text_fd, json_fd;
	pid_t text_watch = admin_spawn(d.sock, (const char *const[]){ "watch", NULL }, &text_fd);
	pid_t json_watch = admin_spawn(d.sock, (const char *const[]){ "watch", "--json", NULL },
				       &json_fd);
	struct skv_client *c = mp_connect(&d);
	/* The watchers register when they get to it: open and close streams until both saw one
	 * stream's open and close. */
	double deadline = mp_now() + CHILD_TIMEOUT_S;
	char open_line[64], close_line[64], json_open[64];
	char *text = NULL, *json = NULL;
	for (;;) {
		struct skv_stream_params p;
		mp_params_default(&p);
		struct skv_client_stream *s = mp_open(c, &p, NULL);
		json_t *rows = ADMIN_JSON(d.sock, "streams", "--json");
		cr_assert_eq(json_array_size(rows), 1);
		long long id = (long long)jint(json_array_get(rows, 0), "id");
		json_decref(rows);
		skv_client_stream_close(s);
		mp_wait_streams_freed(&d, 10.0);
		snprintf(open_line, sizeof(open_line), " open stream=%lld engine=", id);
		snprintf(close_line, sizeof(close_line), " close stream=%lld engine=", id);
		snprintf(json_open, sizeof(json_open), "\"stream\":%lld,", id);
		for (int tries = 0; tries < 20; tries++) {
			free(text);
			free(json);
			text = fd_text(text_fd);
			json = fd_text(json_fd);
			if (strstr(text, open_line) && strstr(text, close_line) &&
			    strstr(json, json_open))
				break;
			mp_sleep_ms(25);
		}
		if (strstr(text, open_line) && strstr(text, close_line) && strstr(json, json_open))
			break;
		cr_assert(mp_now() < deadline, "watch saw no open/close:\n%s\n%s", text, json);
	}
	skv_client_disconnect(c);
	kill(text_watch, SIGINT);
	kill(json_watch, SIGTERM);
	int status = reap(text_watch, CHILD_TIMEOUT_S);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "watch: status 0x%x", status);
	status = reap(json_watch, CHILD_TIMEOUT_S);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "watch --json: status 0x%x",
		  status);
	/* Text: "TIME TYPE stream=ID engine=E arg=N text" per line; JSON: one object per line. */
	for (const char *line = text; *line;) {
		size_t len = strcspn(line, "\n");
		cr_assert(line[len] == '\n');
		cr_assert(len > 25 && line[4] == '-' && line[10] == 'T' && strstr(line, " stream=") &&
			  strstr(line, " engine="), "bad event line: %.*s", (int)len, line);
		line += len + 1;
	}
	for (const char *line = json; *line;) {
		size_t len = strcspn(line, "\n");
		json_error_t error;
		json_t *ev = json_loadb(line, len, 0, &error);
		cr_assert(ev != NULL, "watch --json line is not JSON: %.*s", (int)len, line);
		jstr(ev, "time");
		jstr(ev, "type");
		jstr(ev, "text");
		cr_assert(json_object_get(ev, "stream") && json_object_get(ev, "engine"));
		json_decref(ev);
		line += len + (line[len] == '\n');
	}
	free(text);
	free(json);
	close(text_fd);
	close(json_fd);
}

/* A stream shorter than its sinks: everything it holds is a sink, its window is empty, and the
 * next token's slot (the ring's head) is the first window slot. */
Test(admin, stream_shorter_than_its_sinks)
{
	struct workload w;
	memset(&w, 0, sizeof(w));
	char msg[256] = "";
	cr_assert(skv_model_open(tu_model_path("stories260K.bin"), &w.model, msg, sizeof(msg)) ==
		  0, "%s", msg);
	cr_assert(skv_tokenizer_load(tu_model_path("tok512.bin"), w.model->cfg.vocab_size, &w.tok,
				     msg, sizeof(msg)) == 0, "%s", msg);
	tokenize(&w, "Hi", &w.sink_ids, &w.n_sink_ids);
	cr_assert(w.n_sink_ids < SINKS);
	mp_daemon_start(&w.d, "short", 1, NULL, NULL);
	w.client = mp_connect(&w.d);
	w.sink = open_fed(&w, SKV_POLICY_SINK, SINKS, SINK_WINDOW, "Hi", &w.sink_kv);
	json_t *rows = ADMIN_JSON(w.d.sock, "streams", "--json");
	char id[32];
	snprintf(id, sizeof(id), "%" JSON_INTEGER_FORMAT, jint(json_array_get(rows, 0), "id"));
	json_decref(rows);
	json_t *d = ADMIN_JSON(w.d.sock, "stream", id, "--json");
	cr_assert_eq(jint(d, "tokens_seen"), (json_int_t)w.n_sink_ids);
	cr_assert_eq(jint(d, "sink_fill"), (json_int_t)w.n_sink_ids);
	cr_assert_eq(jint(d, "window_fill"), 0);
	cr_assert_eq(jint(d, "tokens_evicted"), 0);
	jids(d, "sink_ids", w.sink_ids, w.n_sink_ids);
	jids(d, "window_ids", NULL, 0);
	char *sink_text = decode(w.tok, w.sink_ids, w.n_sink_ids, -1);
	cr_assert_str_eq(jstr(d, "sink_text"), sink_text);
	cr_assert_str_eq(jstr(d, "window_text"), "");
	free(sink_text);
	const json_t *ring = json_object_get(d, "ring");
	cr_assert_eq(json_array_size(json_object_get(ring, "runs")), 0);
	cr_assert_eq(jint(d, "ring_head"), SINKS, "the next window token goes to slot %d", SINKS);
	json_decref(d);
	char *text = ADMIN_OK(w.d.sock, "stream", id);
	text_expect(text, "window_positions", "-");
	text_expect(text, "slot_order", "-");
	free(text);
	workload_stop(&w);
}
