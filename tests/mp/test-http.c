/* skv-http against a real skv-cached with its engines, driven by real clients: curl (streaming
 * and not), a Python standard-library SSE reader (tests/http/sse-client.py), the official
 * `openai` package for Node.js (tests/http/openai-client.mjs, installed by this test into the
 * build directory with npm; a skip with its reason when node or npm cannot provide it), and raw
 * sockets where a client must misbehave (disconnect mid-answer, 1,000 streams at once).
 *
 * Greedy output through HTTP equals skv generate byte for byte; a conversation continued over
 * several requests equals one libskv stream fed the same text; every error status; a client
 * leaving cancels its generation (the daemon's stream is freed); a killed daemon gives 503 and a
 * restarted one is found again without restarting skv-http. */
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mputil.h"
#include "testutil.h"

#define GW_START_TIMEOUT_S 30.0
#define HTTP_IO_TIMEOUT_S 60.0

struct gw_proc {
	pid_t pid;
	uint16_t port;
	char log[PATH_MAX];
	char base[64];          /* http://127.0.0.1:PORT */
	const char *auth;       /* the Authorization header line /metrics needs, or NULL */
};

/* The named program on PATH (a static buffer per call site's copy), or NULL. */
static char *which(const char *name, char *buf, size_t len)
{
	const char *path = getenv("PATH");
	if (!path)
		return NULL;
	while (*path) {
		const char *colon = strchr(path, ':');
		size_t n = colon ? (size_t)(colon - path) : strlen(path);
		snprintf(buf, len, "%.*s/%s", (int)n, path, name);
		if (n && access(buf, X_OK) == 0)
			return buf;
		path += n + (colon != NULL);
	}
	return NULL;
}

/* One request on its own connection (Connection: close). Returns the status; *body gets the
 * body with chunked encoding undone (malloc'ed). */
static int http_req(uint16_t port, const char *method, const char *path, const char *headers,
		    const char *body, char **out_body)
{
	int fd = mp_tcp_connect(port);
	cr_assert(fd >= 0, "cannot connect to skv-http on port %u", port);
	char head[2048];
	size_t body_len = body ? strlen(body) : 0;
	int n = snprintf(head, sizeof(head),
			 "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s"
			 "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
			 method, path, headers ? headers : "", body_len);
	mp_write_all(fd, head, (size_t)n);
	if (body_len)
		mp_write_all(fd, body, body_len);
	size_t cap = 65536, len = 0;
	char *buf = malloc(cap);
	double deadline = mp_now() + HTTP_IO_TIMEOUT_S;
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		cr_assert(poll(&p, 1, 1000) >= 0);
		cr_assert(mp_now() < deadline, "no full answer to %s %s within %.0f s", method, path,
			  HTTP_IO_TIMEOUT_S);
		if (!p.revents)
			continue;
		if (cap - len < 4096)
			buf = realloc(buf, cap *= 2);
		ssize_t got = read(fd, buf + len, cap - len - 1);
		if (got <= 0)
			break;
		len += (size_t)got;
	}
	close(fd);
	buf[len] = '\0';
	int status = 0;
	cr_assert(sscanf(buf, "HTTP/1.%*d %d", &status) == 1, "not an HTTP answer: %.200s", buf);
	char *sep = strstr(buf, "\r\n\r\n");
	cr_assert(sep != NULL);
	*sep = '\0';
	char *payload = sep + 4;
	int chunked = strcasestr(buf, "transfer-encoding: chunked") != NULL;
	char *res = malloc(len + 1);
	size_t res_len = 0;
	if (!chunked) {
		res_len = len - (size_t)(payload - buf);
		memcpy(res, payload, res_len);
	} else {
		char *p = payload;
		for (;;) {
			unsigned long sz = strtoul(p, &p, 16);
			p = strstr(p, "\r\n");
			cr_assert(p != NULL, "bad chunked body");
			p += 2;
			if (!sz)
				break;
			memcpy(res + res_len, p, sz);
			res_len += sz;
			p += sz + 2;
		}
	}
	res[res_len] = '\0';
	free(buf);
	*out_body = res;
	return status;
}

static json_t *json_parse(const char *text)
{
	json_error_t e;
	json_t *v = json_loads(text, 0, &e);
	cr_assert(v != NULL, "not JSON (%s): %.300s", e.text, text);
	return v;
}

/* The text of a non-streaming answer (completions: text; chat: message.content). */
static char *answer_text(const char *body)
{
	json_t *v = json_parse(body);
	json_t *choice = json_array_get(json_object_get(v, "choices"), 0);
	json_t *t = json_object_get(choice, "text");
	if (!t)
		t = json_object_get(json_object_get(choice, "message"), "content");
	cr_assert(json_is_string(t), "no text in %.300s", body);
	char *s = strdup(json_string_value(t));
	json_decref(v);
	return s;
}

/* The text of an SSE body, asserting one data line per chunk and the closing [DONE]. */
static char *sse_text(const char *body, unsigned *chunks)
{
	size_t cap = strlen(body) + 1, len = 0;
	char *out = calloc(1, cap);
	*chunks = 0;
	int done = 0;
	for (const char *p = body; (p = strstr(p, "data: "));) {
		p += 6;
		const char *end = strstr(p, "\n\n");
		cr_assert(end != NULL, "an SSE event without its blank line");
		if (!strncmp(p, "[DONE]", 6)) {
			done = 1;
			break;
		}
		char *ev = strndup(p, (size_t)(end - p));
		json_t *v = json_parse(ev);
		json_t *choice = json_array_get(json_object_get(v, "choices"), 0);
		json_t *t = json_object_get(choice, "text");
		if (!t)
			t = json_object_get(json_object_get(choice, "delta"), "content");
		if (json_is_string(t)) {
			memcpy(out + len, json_string_value(t), json_string_length(t));
			len += json_string_length(t);
		}
		(*chunks)++;
		json_decref(v);
		free(ev);
		p = end;
	}
	cr_assert(done, "the SSE stream did not end with data: [DONE]: %.300s", body);
	out[len] = '\0';
	return out;
}

static void gw_start(struct gw_proc *g, const struct mp_daemon *d, const char *test,
		     const char *const *extra)
{
	memset(g, 0, sizeof(*g));
	g->port = mp_free_port();
	snprintf(g->base, sizeof(g->base), "http://127.0.0.1:%u", g->port);
	snprintf(g->log, sizeof(g->log), "%s/skv-http.log", tu_scratch_dir(test));
	char listen[64];
	snprintf(listen, sizeof(listen), "127.0.0.1:%u", g->port);
	const char *argv[32];
	unsigned argc = 0;
	argv[argc++] = mp_env_path("SKV_HTTP_BIN");
	argv[argc++] = "--socket";
	argv[argc++] = d->sock;
	argv[argc++] = "--listen";
	argv[argc++] = listen;
	for (unsigned i = 0; extra && extra[i]; i++)
		argv[argc++] = extra[i];
	argv[argc] = NULL;
	int log_fd = open(g->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
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

static void gw_stop(struct gw_proc *g)
{
	cr_assert(kill(g->pid, SIGTERM) == 0);
	int status;
	cr_assert(waitpid(g->pid, &status, 0) == g->pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "skv-http exited with status 0x%x", status);
}

/* A counter of the gateway in /metrics. */
static double metric(const struct gw_proc *g, const char *name)
{
	char *body;
	cr_assert_eq(http_req(g->port, "GET", "/metrics", g->auth, NULL, &body), 200);
	char needle[128];
	snprintf(needle, sizeof(needle), "\n%s ", name);
	char *p = strstr(body, needle);
	cr_assert(p != NULL, "no %s in /metrics", name);
	double v = strtod(p + strlen(needle), NULL);
	free(body);
	return v;
}

static void expect_error(const struct gw_proc *g, const char *method, const char *path,
			 const char *headers, const char *body, int want, const char *what)
{
	char *resp;
	int status = http_req(g->port, method, path, headers, body, &resp);
	cr_assert_eq(status, want, "%s: status %d, want %d (%s)", what, status, want, resp);
	json_t *v = json_parse(resp);
	json_t *e = json_object_get(v, "error");
	cr_assert(json_is_object(e), "%s: no error object: %s", what, resp);
	cr_assert(json_is_string(json_object_get(e, "message")), "%s: no message", what);
	cr_assert(json_object_get(e, "type") && json_object_get(e, "param") &&
		  json_object_get(e, "code"), "%s: the error lacks type/param/code: %s", what, resp);
	json_decref(v);
	free(resp);
}

TestSuite(http, .init = mp_suite_init, .fini = mp_suite_fini, .timeout = 600);

/* Greedy through HTTP (echo: the prompt as the engine read it, then the answer) equals skv
 * generate's output without its final newline, non-streaming and streaming, and from BOS equals
 * llama2.c's reference text. */
Test(http, greedy_equals_skv_generate)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "http-greedy", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-greedy", NULL);
	char *cli = MP_SKV("generate", "--socket", d.sock, "--temp", "0", "-n", "200",
			   "Once upon a time");
	size_t cl = strlen(cli);
	cr_assert(cl && cli[cl - 1] == '\n');
	cli[cl - 1] = '\0';
	char *body;
	const char *req = "{\"model\":\"stories260K\",\"prompt\":\"Once upon a time\","
			  "\"max_tokens\":200,\"temperature\":0,\"echo\":true}";
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL, req, &body), 200);
	char *text = answer_text(body);
	cr_assert_str_eq(text, cli);
	free(body);
	free(text);
	const char *sreq = "{\"prompt\":\"Once upon a time\",\"max_tokens\":200,\"temperature\":0,"
			   "\"echo\":true,\"stream\":true}";
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL, sreq, &body), 200);
	unsigned chunks;
	text = sse_text(body, &chunks);
	cr_assert_str_eq(text, cli);
	cr_assert_geq(chunks, 200u, "one chunk per token: %u chunks", chunks);
	free(body);
	free(text);

	char *ref = mp_greedy_reference();
	ref[strlen(ref) - 1] = '\0';
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL,
			      "{\"prompt\":\"\",\"max_tokens\":200,\"temperature\":0,\"echo\":true}",
			      &body), 200);
	text = answer_text(body);
	cr_assert_str_eq(text, ref, "from BOS: %s", text);
	free(ref);
	free(body);
	free(text);
	free(cli);
	gw_stop(&g);
}

/* curl (streaming with -N, and not), the stdlib Python SSE reader, and the answers agree. */
Test(http, curl_and_python)
{
	char curl_buf[PATH_MAX], py_buf[PATH_MAX];
	const char *curl = which("curl", curl_buf, sizeof(curl_buf));
	const char *python = which("python3", py_buf, sizeof(py_buf));
	if (!curl || !python)
		MP_SKIP("curl or python3 is not installed (tools/setup installs them)");
	struct mp_daemon d;
	mp_daemon_start(&d, "http-curl", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-curl", NULL);
	char url[128], chat_url[128];
	snprintf(url, sizeof(url), "%s/v1/completions", g.base);
	snprintf(chat_url, sizeof(chat_url), "%s/v1/chat/completions", g.base);
	const char *body = "{\"prompt\":\"The cat\",\"max_tokens\":60,\"temperature\":0}";
	const char *sbody = "{\"prompt\":\"The cat\",\"max_tokens\":60,\"temperature\":0,"
			    "\"stream\":true}";
	char *out, *err;
	int st = mp_run(curl, (const char *const[]){ "-sS", "-f", url, "-H",
						     "Content-Type: application/json", "-d", body,
						     NULL },
			&out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "curl: %s", err);
	char *plain = answer_text(out);
	free(out);
	free(err);
	st = mp_run(curl, (const char *const[]){ "-sS", "-N", "-f", url, "-d", sbody, NULL }, &out,
		    &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "curl -N: %s", err);
	unsigned chunks;
	char *streamed = sse_text(out, &chunks);
	cr_assert_str_eq(streamed, plain);
	cr_assert_eq(chunks, 61u, "60 token chunks and the final one, got %u", chunks);
	free(out);
	free(err);

	char script[PATH_MAX];
	snprintf(script, sizeof(script), "%s/tests/http/sse-client.py",
		 mp_env_path("SKV_SOURCE_ROOT"));
	st = mp_run(python, (const char *const[]){ script, url, sbody, NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "sse-client.py: %s", err);
	json_t *v = json_parse(out);
	cr_assert_eq(json_integer_value(json_object_get(v, "status")), 200);
	cr_assert(json_is_true(json_object_get(v, "done")));
	cr_assert_str_eq(json_string_value(json_object_get(v, "text")), plain);
	cr_assert_str_eq(json_string_value(json_object_get(v, "finish_reason")), "length");
	cr_assert(strstr(json_string_value(json_object_get(v, "content_type")),
			 "text/event-stream"));
	json_decref(v);
	free(out);
	free(err);

	/* Chat: streamed deltas equal the message. */
	const char *chat = "{\"messages\":[{\"role\":\"user\",\"content\":\"Look at the sky.\"}],"
			   "\"max_tokens\":50,\"temperature\":0}";
	char *resp;
	cr_assert_eq(http_req(g.port, "POST", "/v1/chat/completions", NULL, chat, &resp), 200);
	char *chat_plain = answer_text(resp);
	free(resp);
	const char *schat = "{\"messages\":[{\"role\":\"user\",\"content\":\"Look at the sky.\"}],"
			    "\"max_tokens\":50,\"temperature\":0,\"stream\":true}";
	st = mp_run(python, (const char *const[]){ script, chat_url, schat, NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "sse-client.py: %s", err);
	v = json_parse(out);
	cr_assert_str_eq(json_string_value(json_object_get(v, "text")), chat_plain);
	json_decref(v);
	free(out);
	free(err);
	free(chat_plain);
	free(plain);
	free(streamed);
	gw_stop(&g);
}

/* Stop sequences end the answer before them (finish_reason "stop"), streaming or not, also when
 * a stop spans tokens; the stream is closed at once. stream_options.include_usage adds usage. */
Test(http, stop_sequences)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "http-stop", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-stop", NULL);
	char *resp;
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL,
			      "{\"prompt\":\"Once upon a time\",\"max_tokens\":40,\"temperature\":0}",
			      &resp), 200);
	char *full = answer_text(resp);
	free(resp);
	/* ", there was a little girl named Lily..." */
	const char *cut = strstr(full, "tle gi");
	cr_assert(cut, "unexpected greedy text: %s", full);
	size_t want_len = (size_t)(cut - full);
	for (int stream = 0; stream < 2; stream++) {
		char body[512];
		snprintf(body, sizeof(body),
			 "{\"prompt\":\"Once upon a time\",\"max_tokens\":40,\"temperature\":0,"
			 "\"stop\":[\"zzz\",\"tle gi\"],\"stream\":%s,"
			 "\"stream_options\":{\"include_usage\":true}}",
			 stream ? "true" : "false");
		cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL, body, &resp), 200);
		char *text;
		if (stream) {
			unsigned chunks;
			text = sse_text(resp, &chunks);
			cr_assert(strstr(resp, "\"finish_reason\":\"stop\""), "%s", resp);
			cr_assert(strstr(resp, "\"choices\":[],\"usage\":{"), "no usage chunk: %s",
				  resp);
		} else {
			text = answer_text(resp);
			cr_assert(strstr(resp, "\"finish_reason\":\"stop\""), "%s", resp);
		}
		cr_assert_eq(strlen(text), want_len, "stream %d: '%s'", stream, text);
		cr_assert(!strncmp(text, full, want_len));
		free(text);
		free(resp);
	}
	mp_wait_streams_freed(&d, 10.0);
	free(full);
	gw_stop(&g);
}

/* The official openai package for Node.js, installed here into the build directory. */
Test(http, node_openai)
{
	char node_buf[PATH_MAX], npm_buf[PATH_MAX];
	const char *node = which("node", node_buf, sizeof(node_buf));
	const char *npm = which("npm", npm_buf, sizeof(npm_buf));
	if (!node || !npm)
		MP_SKIP("node or npm is not installed (tools/setup installs nodejs and npm)");
	char prefix[PATH_MAX], probe[PATH_MAX + 64], script[PATH_MAX + 64];
	snprintf(prefix, sizeof(prefix), "%s/tests/http-node", mp_env_path("SKV_BUILD_ROOT"));
	snprintf(probe, sizeof(probe), "%s/node_modules/openai/package.json", prefix);
	char *out, *err;
	if (access(probe, R_OK) != 0) {
		int st = mp_run(npm, (const char *const[]){ "install", "--no-audit", "--no-fund",
							    "--prefix", prefix, "openai@4", NULL },
				&out, &err);
		int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0 && access(probe, R_OK) == 0;
		if (!ok) {
			char why[512];
			snprintf(why, sizeof(why), "npm install openai@4 failed: %.400s", err);
			free(out);
			free(err);
			MP_SKIP("%s", why);
		}
		free(out);
		free(err);
	}
	/* ES modules resolve packages next to the script: run a copy from the prefix. */
	char src[PATH_MAX];
	snprintf(src, sizeof(src), "%s/tests/http/openai-client.mjs",
		 mp_env_path("SKV_SOURCE_ROOT"));
	snprintf(script, sizeof(script), "%s/openai-client.mjs", prefix);
	FILE *in = fopen(src, "r"), *cp = fopen(script, "w");
	cr_assert(in && cp);
	char buf[4096];
	size_t n;
	while ((n = fread(buf, 1, sizeof(buf), in)))
		cr_assert_eq(fwrite(buf, 1, n, cp), n);
	fclose(in);
	cr_assert_eq(fclose(cp), 0);

	struct mp_daemon d;
	mp_daemon_start(&d, "http-node", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-node", NULL);
	char base[128];
	snprintf(base, sizeof(base), "%s/v1", g.base);
	int st = mp_run(node, (const char *const[]){ script, base, "stories260K", NULL }, &out,
			&err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "node openai-client.mjs: %s", err);
	json_t *v = json_parse(out);
	const char *completion = json_string_value(json_object_get(v, "completion"));
	cr_assert(completion && strlen(completion) > 20, "completion: %s", out);
	cr_assert_str_eq(json_string_value(json_object_get(v, "completion_stream")), completion);
	cr_assert_eq(json_integer_value(json_object_get(v, "completion_chunks")), 41);
	cr_assert_eq(json_integer_value(json_object_get(v, "completion_tokens")), 40);
	cr_assert_str_eq(json_string_value(json_object_get(v, "completion_finish")), "length");
	const char *chat = json_string_value(json_object_get(v, "chat"));
	cr_assert(chat && *chat, "chat: %s", out);
	cr_assert_str_eq(json_string_value(json_object_get(v, "chat_stream")), chat);
	cr_assert_str_eq(json_string_value(json_object_get(v, "chat_role")), "assistant");
	cr_assert_str_eq(json_string_value(json_array_get(json_object_get(v, "models"), 0)),
			 "stories260K");
	cr_assert_eq(json_integer_value(json_object_get(v, "unknown_model")), 404);

	/* The same answer as curl gets. */
	char *resp;
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL,
			      "{\"prompt\":\"Once upon a time\",\"max_tokens\":40,\"temperature\":0}",
			      &resp), 200);
	char *plain = answer_text(resp);
	cr_assert_str_eq(plain, completion);
	free(plain);
	free(resp);
	json_decref(v);
	free(out);
	free(err);
	gw_stop(&g);
}

/* Every refusal with its status and an OpenAI-style body; the server goes on serving. */
Test(http, errors)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "http-errors", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-errors",
		 (const char *const[]){ "--api-key", "sekrit", "--max-body", "2000",
					"--max-tokens", "100000000", "--max-concurrent", "1",
					"--max-window", "300", NULL });
	const char *auth = "Authorization: Bearer sekrit\r\n";
	g.auth = auth;
	const char *ok = "{\"prompt\":\"Hi\",\"max_tokens\":4,\"temperature\":0}";
	expect_error(&g, "POST", "/v1/completions", NULL, ok, 401, "no key");
	expect_error(&g, "POST", "/v1/completions", "Authorization: Bearer wrong\r\n", ok, 401,
		     "wrong key");
	expect_error(&g, "GET", "/v1/models", NULL, NULL, 401, "models without a key");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\": \"Hi\",", 400,
		     "malformed JSON");
	expect_error(&g, "POST", "/v1/completions", auth, "[1,2]", 400, "not an object");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":5}", 400, "prompt type");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"max_tokens\":\"9\"}",
		     400, "max_tokens type");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"stream\":1}", 400,
		     "stream type");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"stop\":[1]}", 400,
		     "stop type");
	expect_error(&g, "POST", "/v1/completions", auth,
		     "{\"prompt\":\"a\",\"max_tokens\":100000001}", 400,
		     "max_tokens over --max-tokens");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"max_tokens\":0}", 400,
		     "max_tokens 0");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"temperature\":3}",
		     400, "temperature range");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"window\":301}", 400,
		     "window over --max-window");
	expect_error(&g, "POST", "/v1/chat/completions", auth, "{\"messages\":[]}", 400,
		     "no messages");
	expect_error(&g, "POST", "/v1/chat/completions", auth,
		     "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 400, "bad role");
	expect_error(&g, "POST", "/v1/completions", auth, "{\"prompt\":\"a\",\"model\":\"gpt-4\"}",
		     404, "unknown model");
	expect_error(&g, "GET", "/v1/models/gpt-4", auth, NULL, 404, "unknown model id");
	expect_error(&g, "GET", "/v2/nothing", auth, NULL, 404, "unknown URL");
	expect_error(&g, "GET", "/v1/completions", auth, NULL, 405, "wrong method");
	expect_error(&g, "DELETE", "/v1/conversations/nobody", auth, NULL, 404,
		     "unknown conversation");
	char big[4096];
	memset(big, ' ', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	memcpy(big, "{\"prompt\":\"", 11);
	big[sizeof(big) - 3] = '"';
	big[sizeof(big) - 2] = '}';
	expect_error(&g, "POST", "/v1/completions", auth, big, 413, "body over --max-body");

	/* Unknown fields are ignored, as OpenAI does; the health check needs no key. */
	char *resp;
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", auth,
			      "{\"prompt\":\"Hi\",\"max_tokens\":4,\"frequency_penalty\":0,"
			      "\"user\":\"x\",\"logit_bias\":{}}", &resp), 200, "%s", resp);
	free(resp);
	cr_assert_eq(http_req(g.port, "GET", "/health", NULL, NULL, &resp), 200);
	free(resp);

	/* --max-concurrent 1: a second request while one streams is 429; a conversation taken by
	 * a request answers 409 to another. */
	int fd = mp_tcp_connect(g.port);
	const char *longreq = "{\"prompt\":\"Hi\",\"max_tokens\":100000000,\"temperature\":0,"
			      "\"ignore_eos\":true,\"stream\":true}";
	char head[512];
	int n = snprintf(head, sizeof(head),
			 "POST /v1/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %zu\r\n\r\n%s",
			 auth, strlen(longreq), longreq);
	mp_write_all(fd, head, (size_t)n);
	char first[64];
	cr_assert(read(fd, first, sizeof(first)) > 0);
	expect_error(&g, "POST", "/v1/completions", auth, ok, 429, "over --max-concurrent");
	close(fd); /* cancels it */
	for (int i = 0; i < 500 && metric(&g, "skv_http_requests_in_flight") > 0; i++)
		mp_sleep_ms(10);
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", auth, ok, &resp), 200, "%s", resp);
	free(resp);
	cr_assert(metric(&g, "skv_http_requests_total{code=\"401\"}") >= 0);
	gw_stop(&g);

	/* The daemon gone: 503 from the generation endpoints and /health. */
	struct gw_proc g2;
	gw_start(&g2, &d, "http-errors", (const char *const[]){ "--max-concurrent", "1", NULL });
	cr_assert(kill(d.pid, SIGKILL) == 0);
	cr_assert(mp_daemon_reap(&d, 10.0));
	double deadline = mp_now() + 10.0;
	while (http_req(g2.port, "GET", "/health", NULL, NULL, &resp) != 503) {
		free(resp);
		cr_assert(mp_now() < deadline, "/health still 200 with the daemon dead");
		mp_sleep_ms(20);
	}
	free(resp);
	expect_error(&g2, "POST", "/v1/completions", NULL, ok, 503, "daemon down");
	gw_stop(&g2);
}

/* A request whose answer is read raw: HTTP/1.0, so that the body is the SSE bytes themselves,
 * without chunk headers that could split a "data: " (the connection closes at the end). */
static int http_open_stream(uint16_t port, const char *body)
{
	int fd = mp_tcp_connect(port);
	cr_assert(fd >= 0);
	char head[1024];
	int n = snprintf(head, sizeof(head),
			 "POST /v1/completions HTTP/1.0\r\nHost: x\r\n"
			 "Content-Length: %zu\r\n\r\n%s",
			 strlen(body), body);
	mp_write_all(fd, head, (size_t)n);
	return fd;
}

/* A client that leaves mid-answer: its generation stops at once (the daemon frees the stream),
 * and a conversation's answer is cancelled with the conversation kept. */
Test(http, disconnect_cancels)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "http-cancel", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-cancel", (const char *const[]){ "--max-tokens", "100000000", NULL });
	int fd = http_open_stream(g.port, "{\"prompt\":\"Hi\",\"max_tokens\":100000000,"
					  "\"ignore_eos\":true,\"stream\":true}");
	char buf[8192];
	size_t got = 0;
	while (got < 4000) {
		ssize_t n = read(fd, buf, sizeof(buf));
		cr_assert(n > 0);
		got += (size_t)n;
	}
	struct skv_msg_stats st;
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 1u, "the generation runs");
	double t0 = mp_now();
	close(fd);
	mp_wait_streams_freed(&d, 10.0);
	cr_assert_lt(mp_now() - t0, 10.0);
	cr_assert_eq(metric(&g, "skv_http_cancelled_total"), 1.0);
	/* The engine stopped: no token is generated any more. */
	double before = metric(&g, "streamkv_tokens_generated_total");
	mp_sleep_ms(300);
	cr_assert_eq(metric(&g, "streamkv_tokens_generated_total"), before);

	/* In a conversation: cancelled, the stream stays and takes the next request. */
	fd = http_open_stream(g.port, "{\"prompt\":\"Hi\",\"max_tokens\":100000000,"
				      "\"ignore_eos\":true,\"stream\":true,\"conversation\":\"c\"}");
	for (got = 0; got < 4000;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		cr_assert(n > 0);
		got += (size_t)n;
	}
	close(fd);
	char *resp;
	double deadline = mp_now() + 10.0;
	int status;
	while ((status = http_req(g.port, "POST", "/v1/completions", NULL,
				  "{\"prompt\":\" Bye.\",\"max_tokens\":5,\"conversation\":\"c\"}",
				  &resp)) == 409) {
		free(resp);
		cr_assert(mp_now() < deadline, "the cancelled conversation stays busy");
		mp_sleep_ms(10);
	}
	cr_assert_eq(status, 200, "%s", resp);
	free(resp);
	mp_stats(&d, &st);
	cr_assert_eq(st.streams, 1u, "the conversation's stream stays");
	cr_assert_eq(metric(&g, "skv_http_cancelled_total"), 2.0);
	cr_assert_eq(http_req(g.port, "DELETE", "/v1/conversations/c", NULL, NULL, &resp), 200);
	free(resp);
	mp_wait_streams_freed(&d, 10.0);

	/* Not streaming: the connection waits suspended for the whole body; a client that closes
	 * it is noticed all the same. */
	fd = http_open_stream(g.port, "{\"prompt\":\"Hi\",\"max_tokens\":100000000,"
				      "\"ignore_eos\":true}");
	deadline = mp_now() + 10.0;
	do {
		mp_stats(&d, &st);
		cr_assert(mp_now() < deadline, "the non-streaming generation did not start");
		mp_sleep_ms(10);
	} while (st.streams != 1);
	close(fd);
	mp_wait_streams_freed(&d, 10.0);
	cr_assert_eq(metric(&g, "skv_http_cancelled_total"), 3.0);
	gw_stop(&g);
}

/* A client that stops reading its SSE answer is paused alone (bounded buffering, then its
 * stream is not read: backpressure through libskv); the others are served meanwhile, and the
 * slow one gets every token once it reads again. */
Test(http, slow_reader)
{
	enum { SLOW_TOKENS = 60000 };
	struct mp_daemon d;
	mp_daemon_start(&d, "http-slow", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-slow", (const char *const[]){ "--max-tokens", "100000", NULL });
	char body[256];
	snprintf(body, sizeof(body),
		 "{\"prompt\":\"Hi\",\"max_tokens\":%d,\"temperature\":0,\"ignore_eos\":true,"
		 "\"stream\":true}", SLOW_TOKENS);
	int fd = http_open_stream(g.port, body);
	double deadline = mp_now() + 60.0;
	while (metric(&g, "skv_http_paused_streams") < 1.0) {
		cr_assert(mp_now() < deadline, "the unread stream was never paused");
		mp_sleep_ms(20);
	}
	/* Paused: the engine stops on it (its ring full), others run. */
	double tokens = metric(&g, "skv_http_completion_tokens_total");
	mp_sleep_ms(300);
	cr_assert_lt(metric(&g, "skv_http_completion_tokens_total") - tokens, 2048.0,
		     "a paused stream's tokens are still taken");
	for (int i = 0; i < 3; i++) {
		char *resp;
		cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL,
				      "{\"prompt\":\"Once\",\"max_tokens\":50,\"stream\":true}",
				      &resp), 200);
		unsigned chunks;
		char *text = sse_text(resp, &chunks);
		cr_assert_eq(chunks, 51u);
		free(text);
		free(resp);
	}
	/* Now read it all: every token, then [DONE]. */
	size_t events = 0, tail_len = 0;
	char tail[16] = "";
	int done = 0;
	char buf[65536];
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		cr_assert(n >= 0, "read: %s", strerror(errno));
		if (n == 0)
			break;
		char joined[sizeof(buf) + 16];
		memcpy(joined, tail, tail_len);
		memcpy(joined + tail_len, buf, (size_t)n);
		size_t jl = tail_len + (size_t)n;
		for (char *p = joined; (p = memmem(p, jl - (size_t)(p - joined), "data: ", 6));
		     p += 6) {
			if ((size_t)(p - joined) + 6 <= tail_len)
				continue;
			if (jl - (size_t)(p - joined) >= 12 && !memcmp(p + 6, "[DONE]", 6))
				done = 1;
			else
				events++;
		}
		tail_len = jl < sizeof(tail) ? jl : sizeof(tail);
		memcpy(tail, joined + jl - tail_len, tail_len);
	}
	close(fd);
	cr_assert(done, "no [DONE] after %zu events", events);
	cr_assert_eq(events, (size_t)SLOW_TOKENS + 1, "%zu events", events);
	gw_stop(&g);
}

/* Collect the generated text of one request on a libskv stream. */
static char *lib_generate(skv_client_stream *s, const char *text, uint64_t n)
{
	cr_assert_eq(skv_client_stream_generate(s, text, strlen(text), n, 0), 0);
	struct mp_result r = { 0 };
	size_t cap = 4096, len = 0;
	char *out = calloc(1, cap);
	for (;;) {
		struct skv_client_event ev;
		int rc = skv_client_stream_read(s, &ev, 60000);
		cr_assert_eq(rc, 1);
		if (ev.type == SKV_CLIENT_EV_TOKEN) {
			cr_assert(len + ev.len < cap);
			memcpy(out + len, ev.text, ev.len);
			len += ev.len;
		}
		if (ev.type == SKV_CLIENT_EV_DONE)
			break;
		cr_assert_neq(ev.type, SKV_CLIENT_EV_ERROR);
	}
	(void)r;
	out[len] = '\0';
	return out;
}

static skv_client_stream *lib_open(skv_client *c)
{
	skv_client_opts *o;
	cr_assert_eq(skv_client_opts_new(&o), 0);
	cr_assert_eq(skv_client_opts_sampling(o, 0.0f, 1.0f, 0), 0);
	skv_client_stream *s;
	cr_assert_eq(skv_client_stream_open(c, o, &s), 0, "%s", skv_client_last_error(c));
	skv_client_opts_free(o);
	return s;
}

/* A conversation continued over four requests equals one libskv stream fed the same turns;
 * chat, with the whole history sent each time, feeds only the new message. Conversations belong
 * to their key, end by DELETE or by --conversation-idle. */
Test(http, conversations)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "http-conv", 1, NULL, NULL);
	struct gw_proc g;
	char keyfile[PATH_MAX];
	snprintf(keyfile, sizeof(keyfile), "%s/key", tu_scratch_dir("http-conv"));
	FILE *kf = fopen(keyfile, "w");
	cr_assert(kf);
	fputs("# keys\nalpha\nbeta\n", kf);
	fclose(kf);
	gw_start(&g, &d, "http-conv",
		 (const char *const[]){ "--api-key-file", keyfile, "--conversation-idle", "2",
					NULL });
	const char *auth = "Authorization: Bearer alpha\r\n";
	g.auth = auth;
	static const char *const turns[] = { "Once upon a time", " The sun was hot.",
					     " Tom ran home.", " Then it rained." };
	skv_client *c = mp_connect(&d);
	skv_client_stream *ref = lib_open(c);
	for (int i = 0; i < 4; i++) {
		char body[256], *resp;
		snprintf(body, sizeof(body),
			 "{\"prompt\":\"%s\",\"max_tokens\":24,\"temperature\":0,%s}", turns[i],
			 i % 2 ? "\"conversation\":\"story-1\"" : "\"stream\":false");
		const char *hdr = i % 2 ? auth : "Authorization: Bearer alpha\r\n"
						 "X-Conversation-Id: story-1\r\n";
		cr_assert_eq(http_req(g.port, "POST", "/v1/completions", hdr, body, &resp), 200,
			     "%s", resp);
		char *got = answer_text(resp);
		char *want = lib_generate(ref, turns[i], 24);
		cr_assert_str_eq(got, want, "turn %d", i);
		free(got);
		free(want);
		free(resp);
	}
	skv_client_stream_close(ref);
	cr_assert_eq(metric(&g, "skv_http_conversations"), 1.0);

	/* Chat with the whole history each time: only the new message is fed. */
	ref = lib_open(c);
	json_t *msgs = json_array();
	static const char *const says[] = { "I like the dog.", "Can we go out?", "Yes, let us go." };
	for (int i = 0; i < 3; i++) {
		json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "user", "content",
						      says[i]));
		json_t *req = json_pack("{s:O,s:i,s:i,s:s}", "messages", msgs, "max_tokens", 20,
					"temperature", 0, "conversation", "chat-1");
		char *body = json_dumps(req, 0), *resp;
		cr_assert_eq(http_req(g.port, "POST", "/v1/chat/completions", auth, body, &resp),
			     200, "%s", resp);
		char *got = answer_text(resp);
		char fed[256];
		snprintf(fed, sizeof(fed), "Tom said, \"%s\"\nMom said,", says[i]);
		char *want = lib_generate(ref, fed, 20);
		const char *w = want;
		while (*w == ' ')
			w++;
		cr_assert_str_eq(got, w, "chat turn %d", i);
		json_array_append_new(msgs, json_pack("{s:s,s:s}", "role", "assistant", "content",
						      got));
		free(got);
		free(want);
		free(resp);
		free(body);
		json_decref(req);
	}
	json_decref(msgs);
	skv_client_stream_close(ref);
	skv_client_disconnect(c);

	/* Another key does not see it: 404 to a request and to DELETE. */
	const char *beta = "Authorization: Bearer beta\r\n";
	char *resp;
	expect_error(&g, "POST", "/v1/completions", beta,
		     "{\"prompt\":\"a\",\"max_tokens\":2,\"conversation\":\"story-1\"}", 404,
		     "another key's conversation");
	expect_error(&g, "DELETE", "/v1/conversations/story-1", beta, NULL, 404,
		     "deleting another key's conversation");
	cr_assert_eq(http_req(g.port, "DELETE", "/v1/conversations/story-1", auth, NULL, &resp),
		     200, "%s", resp);
	free(resp);
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", beta,
			      "{\"prompt\":\"a\",\"max_tokens\":2,\"conversation\":\"k\"}", &resp),
		     200);
	free(resp);
	/* DELETE ends it; the idle time-out ends another. */
	cr_assert_eq(http_req(g.port, "DELETE", "/v1/conversations/k", beta, NULL, &resp), 200,
		     "%s", resp);
	free(resp);
	cr_assert_eq(http_req(g.port, "DELETE", "/v1/conversations/k", beta, NULL, &resp), 404);
	free(resp);
	cr_assert_eq(metric(&g, "skv_http_conversations"), 1.0, "chat-1 is left");
	cr_assert_eq(http_req(g.port, "DELETE", "/v1/conversations/chat-1", auth, NULL, &resp), 200);
	free(resp);
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", beta,
			      "{\"prompt\":\"a\",\"max_tokens\":2,\"conversation\":\"idle\"}",
			      &resp), 200);
	free(resp);
	cr_assert_eq(metric(&g, "skv_http_conversations"), 1.0);
	double deadline = mp_now() + 10.0;
	while (metric(&g, "skv_http_conversations") > 0)
		cr_assert(mp_now() < deadline, "the idle conversation stays");
	cr_assert_eq(metric(&g, "skv_http_conversations_expired_total"), 1.0);
	mp_wait_streams_freed(&d, 10.0);
	gw_stop(&g);
}

/* Strict flags: one line saying what was wrong, exit status 2. */
Test(http, flags)
{
	static const char *const bad[][5] = { /* NULL-terminated rows */
		{ "--listen", "127.0.0.1:8080", NULL },           /* no --socket */
		{ "--socket", "x", "--listen", "nowhere" },
		{ "--socket", "x", "--max-tokens", "0" },
		{ "--socket", "x", "--chat-template", "klingon" },
		{ "--socket", "x", "--bogus", NULL },
		{ "--socket", "x", "--api-key", "" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *out, *err;
		int st = mp_run(mp_env_path("SKV_HTTP_BIN"), bad[i], &out, &err);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "case %zu: status 0x%x", i, st);
		cr_assert(!strncmp(err, "skv-http: ", 10) && strchr(err, '\n') == err + strlen(err) - 1,
			  "case %zu: not one line: %s", i, err);
		free(out);
		free(err);
	}
	char *out, *err;
	int st = mp_run(mp_env_path("SKV_HTTP_BIN"), (const char *const[]){ "--help", NULL }, &out,
			&err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(out, "--conversation-idle"));
	free(out);
	free(err);
}

/* Kill the daemon: 503; start it again: skv-http finds it by itself and serves. */
Test(http, daemon_restart)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "http-restart", 1, NULL, NULL);
	struct gw_proc g;
	gw_start(&g, &d, "http-restart", NULL);
	const char *req = "{\"prompt\":\"Once upon a time\",\"max_tokens\":30,\"temperature\":0}";
	char *resp;
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL, req, &resp), 200);
	char *before = answer_text(resp);
	free(resp);
	cr_assert(kill(d.pid, SIGKILL) == 0);
	cr_assert(mp_daemon_reap(&d, 10.0));
	double deadline = mp_now() + 10.0;
	while (http_req(g.port, "GET", "/health", NULL, NULL, &resp) != 503) {
		free(resp);
		cr_assert(mp_now() < deadline);
		mp_sleep_ms(20);
	}
	free(resp);
	expect_error(&g, "POST", "/v1/completions", NULL, req, 503, "daemon killed");
	mp_sleep_ms(500); /* let its engines go */
	mp_daemon_start(&d, "http-restart", 1, NULL, NULL);
	deadline = mp_now() + 15.0;
	while (http_req(g.port, "GET", "/health", NULL, NULL, &resp) != 200) {
		free(resp);
		cr_assert(mp_now() < deadline, "skv-http did not find the restarted daemon");
		mp_sleep_ms(50);
	}
	free(resp);
	cr_assert_eq(http_req(g.port, "POST", "/v1/completions", NULL, req, &resp), 200, "%s",
		     resp);
	char *after = answer_text(resp);
	cr_assert_str_eq(after, before);
	cr_assert_geq(metric(&g, "skv_http_daemon_reconnects_total"), 1.0);
	free(resp);
	free(before);
	free(after);
	gw_stop(&g);
}

/* 1,000 SSE streams at once: every one complete, none lost. */
Test(http, thousand_streams)
{
	enum { N = 1000, TOKENS = 16 };
	struct rlimit rl;
	cr_assert(getrlimit(RLIMIT_NOFILE, &rl) == 0);
	if (rl.rlim_max < 4 * N)
		MP_SKIP("RLIMIT_NOFILE hard limit %llu is below %d", (unsigned long long)rl.rlim_max,
			4 * N);
	rl.rlim_cur = rl.rlim_max;
	cr_assert(setrlimit(RLIMIT_NOFILE, &rl) == 0);
	struct mp_daemon d;
	mp_daemon_start(&d, "http-1000", 2, NULL,
			(const char *const[]){ "--arena-mb", "512", NULL });
	struct gw_proc g;
	gw_start(&g, &d, "http-1000", NULL);
	static int fds[N];
	static size_t counts[N];
	static int done[N];
	static char tails[N][32];
	const char *body = "{\"prompt\":\"Once\",\"max_tokens\":16,\"temperature\":0,"
			   "\"ignore_eos\":true,\"stream\":true,\"window\":60}";
	for (int i = 0; i < N; i++) {
		fds[i] = http_open_stream(g.port, body);
		fcntl(fds[i], F_SETFL, O_NONBLOCK);
	}
	static struct pollfd pfd[N];
	int open_fds = N;
	double deadline = mp_now() + 300.0;
	while (open_fds) {
		int k = 0;
		for (int i = 0; i < N; i++)
			if (fds[i] >= 0)
				pfd[k++] = (struct pollfd){ .fd = fds[i], .events = POLLIN };
		cr_assert(poll(pfd, (nfds_t)k, 1000) >= 0);
		cr_assert(mp_now() < deadline, "%d streams still open", open_fds);
		for (int i = 0; i < N; i++) {
			if (fds[i] < 0)
				continue;
			char buf[16384];
			ssize_t n = read(fds[i], buf, sizeof(buf) - 1);
			if (n < 0 && errno == EAGAIN)
				continue;
			if (n > 0) {
				/* Count events across read boundaries: join with the tail kept. */
				char joined[sizeof(buf) + 32];
				size_t tl = strlen(tails[i]);
				memcpy(joined, tails[i], tl);
				memcpy(joined + tl, buf, (size_t)n);
				size_t jl = tl + (size_t)n;
				joined[jl] = '\0';
				for (char *p = joined; (p = strstr(p, "data: ")); p += 6) {
					if (!strncmp(p + 6, "[DONE]", 6))
						done[i] = 1;
					else if ((size_t)(p - joined) + 6 > tl)
						counts[i]++; /* not seen whole before */
				}
				size_t keep = jl < 16 ? jl : 16;
				memcpy(tails[i], joined + jl - keep, keep);
				tails[i][keep] = '\0';
				continue;
			}
			close(fds[i]);
			fds[i] = -1;
			open_fds--;
		}
	}
	int complete = 0;
	for (int i = 0; i < N; i++)
		complete += done[i] && counts[i] == TOKENS + 1;
	cr_assert_eq(complete, N, "%d of %d streams complete (stream 0: %zu events, done %d)",
		     complete, N, counts[0], done[0]);
	mp_wait_streams_freed(&d, 30.0);
	gw_stop(&g);
}
