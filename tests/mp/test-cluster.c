/* Three streamkv nodes behind HAProxy on one machine (issue 15): tools/cluster puts each node
 * (skv-cached + skv-http --node-name --peers) in its own network namespace on a bridge, HAProxy
 * in front on 127.0.0.1 routes by conversation id with consistent hashing. Many conversations
 * run through it from several threads at once, each a fixed number of requests with time-outs:
 * they spread over the nodes (X-Skv-Node) and stay put; a node drained during the load sends its
 * conversations to the others (X-Skv-Conversation-Moved, counted) and undrained takes them back,
 * every answer equal to a run that never moved (greedy); a node killed with kill -9 during the
 * load leaves its conversations resumed elsewhere from the shared snapshot directory
 * (X-Skv-Conversation-Restored, checked against a replay from the round the snapshot held) or
 * lost with an OpenAI-style error, counted. The cluster is taken down after every test, also
 * after a failed assertion (the suite's .fini) and after a crash or a time-out of the test
 * process (a guardian process that waits for the test's end on a pipe).
 *
 * Needs root, `ip netns` and haproxy (tools/setup installs iproute2 and haproxy): otherwise
 * each cluster test is a skip with its reason. The generated HAProxy configuration is checked
 * against dist/haproxy/ without any of that. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mputil.h"
#include "testutil.h"

#define NODES 3
#define NODE_PORT 8080
#define CONVS 24               /* conversations per test */
#define THREADS 4              /* client threads, CONVS / THREADS conversations each */
#define ROUNDS 8               /* requests per conversation under load */
#define EXTRA_ROUNDS 2         /* after an undrain */
#define SCRIPTS 4              /* distinct first prompts */
#define MAX_TOKENS 12
#define REQ_TIMEOUT_S 60.0     /* one request answers within this */
#define RETRIES 4              /* attempts of one round after a failure (the kill test) */
#define ALL_ROUNDS (ROUNDS + EXTRA_ROUNDS)
#define KILL_GATE 3            /* the kill test: rounds before the pause that snapshots see */
#define KILL_END (ROUNDS + 1)  /* the kill test: one round after the node is back */

static const char *const first_prompt[SCRIPTS] = {
	"Once upon a time", "The little dog", "Tom had a red ball", "One day, Lily",
};
static const char *const next_prompt[ALL_ROUNDS] = {
	NULL, " Then", " The next day", " She said", " He was happy", " They ran",
	" The sun", " At night", " In the morning", " The end",
};

static const char *round_prompt(unsigned script, unsigned round)
{
	return round ? next_prompt[round] : first_prompt[script];
}

/* ---- the cluster ------------------------------------------------------------------------- */

struct cluster {
	char run_dir[PATH_MAX];
	char subnet[16];        /* A.B.C */
	char name[16];
	uint16_t port;          /* HAProxy's, on 127.0.0.1 */
	int up;
	int guard_fd;           /* write end of the guardian's pipe */
};

static struct cluster *cluster_live;   /* what .fini takes down */
static int cluster_passed;             /* the test reached its end: no logs on stderr */

static char *tool_path(const char *name, char *buf, size_t len)
{
	snprintf(buf, len, "%s/tools/%s", mp_env_path("SKV_SOURCE_ROOT"), name);
	return buf;
}

/* The program on PATH or in the sbin directories (root's tools), or NULL. */
static const char *find_prog(const char *name, char *buf, size_t len)
{
	const char *path = getenv("PATH");
	char dirs[4096];
	snprintf(dirs, sizeof(dirs), "%s:/usr/sbin:/sbin", path ? path : "/usr/bin:/bin");
	for (char *save, *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
		snprintf(buf, len, "%s/%s", d, name);
		if (access(buf, X_OK) == 0)
			return buf;
	}
	return NULL;
}

/* tools/cluster CMD ARGS... --run-dir; returns its exit code, output in *out (malloc'ed). */
static int cluster_cmd(const struct cluster *cl, const char *const *args, char **out)
{
	char tool[PATH_MAX];
	const char *argv[32];
	unsigned n = 0;
	for (; args[n]; n++)
		argv[n] = args[n];
	argv[n++] = "--run-dir";
	argv[n++] = cl->run_dir;
	argv[n] = NULL;
	char *so, *se;
	int st = mp_run(tool_path("cluster", tool, sizeof(tool)), argv, &so, &se);
	size_t len = strlen(so) + strlen(se) + 2;
	*out = malloc(len);
	snprintf(*out, len, "%s%s", so, se);
	free(so);
	free(se);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
#define CLUSTER(cl, out, ...) cluster_cmd(cl, (const char *const[]){ __VA_ARGS__, NULL }, out)

static void cluster_expect(const struct cluster *cl, const char *const *args)
{
	char *out;
	int rc = cluster_cmd(cl, args, &out);
	cr_assert_eq(rc, 0, "tools/cluster %s: exit %d: %s", args[0], rc, out);
	free(out);
}
#define CLUSTER_OK(cl, ...) cluster_expect(cl, (const char *const[]){ __VA_ARGS__, NULL })

/* A process outside the test's tree that runs `tools/cluster down` once the test process is
 * gone, however it went (the write end of the pipe closes with it). */
static int guardian_start(const char *run_dir)
{
	int p[2];
	cr_assert(pipe2(p, O_CLOEXEC) == 0);
	char tool[PATH_MAX];
	tool_path("cluster", tool, sizeof(tool));
	fflush(NULL);
	pid_t pid = fork();
	cr_assert(pid >= 0);
	if (pid == 0) {
		/* The grandchild belongs to init, not to this test (which must not wait for it). */
		if (fork() != 0)
			_exit(0);
		setsid();
		close(p[1]);
		/* Not the test's output pipes: meson reads them to their end. */
		int null = open("/dev/null", O_RDWR);
		dup2(null, 0);
		dup2(null, 1);
		dup2(null, 2);
		char c;
		while (read(p[0], &c, 1) < 0 && errno == EINTR)
			;
		execl(tool, tool, "down", "--run-dir", run_dir, (char *)NULL);
		_exit(127);
	}
	waitpid(pid, NULL, 0);
	close(p[0]);
	return p[1];
}

static void dump_logs(const struct cluster *cl)
{
	char cmd[3 * PATH_MAX + 128];
	snprintf(cmd, sizeof(cmd), "tail -n 15 %s/node*/http.log %s/node*/cached.log %s/haproxy.log "
		 ">&2 2>/dev/null", cl->run_dir, cl->run_dir, cl->run_dir);
	if (system(cmd) != 0)
		fprintf(stderr, "(no logs in %s)\n", cl->run_dir);
}

static void cluster_down(struct cluster *cl)
{
	if (!cl->up)
		return;
	if (!cluster_passed)
		dump_logs(cl);
	char *out;
	int rc = CLUSTER(cl, &out, "down");
	if (rc != 0)
		fprintf(stderr, "tools/cluster down: exit %d: %s", rc, out);
	free(out);
	cl->up = 0;
	close(cl->guard_fd);
}

static void cluster_suite_init(void)
{
	signal(SIGPIPE, SIG_IGN);
	cluster_live = NULL;
	cluster_passed = 0;
}

static void cluster_suite_fini(void)
{
	if (cluster_live)
		cluster_down(cluster_live);
	cluster_live = NULL;
	mp_suite_fini();
}

/* Skip unless this machine can run a cluster: root, ip netns, haproxy. */
static void cluster_require(void)
{
	char buf[PATH_MAX];
	if (geteuid() != 0)
		MP_SKIP("network namespaces need root (tools/test runs as root on CI)");
	if (!find_prog("haproxy", buf, sizeof(buf)))
		MP_SKIP("no haproxy binary (tools/setup installs Debian's haproxy)");
	const char *ip = find_prog("ip", buf, sizeof(buf));
	if (!ip)
		MP_SKIP("no ip command (tools/setup installs iproute2)");
	char ns[32];
	snprintf(ns, sizeof(ns), "skvprobe%d", (int)getpid());
	char *out, *err;
	int st = mp_run(ip, (const char *const[]){ "netns", "add", ns, NULL }, &out, &err);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		char why[256];
		snprintf(why, sizeof(why), "ip netns add fails here: %.200s", err);
		free(out);
		free(err);
		MP_SKIP("%s", why);
	}
	free(out);
	free(err);
	st = mp_run(ip, (const char *const[]){ "netns", "del", ns, NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "ip netns del %s: %s", ns, err);
	free(out);
	free(err);
}

static void cluster_up(struct cluster *cl, const char *test, const char *snapshot_interval)
{
	cluster_require();
	memset(cl, 0, sizeof(*cl));
	snprintf(cl->run_dir, sizeof(cl->run_dir), "%s/run", tu_scratch_dir(test));
	/* Away from tools/cluster's default 10.77.0 and from each other. */
	snprintf(cl->subnet, sizeof(cl->subnet), "10.77.%d", 200 + (int)(getpid() % 50));
	snprintf(cl->name, sizeof(cl->name), "t%d", (int)(getpid() % 1000000));
	cl->port = mp_free_port();
	char port[8];
	snprintf(port, sizeof(port), "%u", cl->port);
	cl->guard_fd = guardian_start(cl->run_dir);
	cl->up = 1;
	cluster_live = cl;
	CLUSTER_OK(cl, "up", "--nodes", "3", "--build", mp_env_path("SKV_BUILD_ROOT"), "--port", port,
		   "--subnet", cl->subnet, "--name", cl->name, "--snapshot-interval",
		   snapshot_interval);
}

static void node_addr(const struct cluster *cl, unsigned node, char *buf, size_t len)
{
	snprintf(buf, len, "%s.%u", cl->subnet, node);
}

/* ---- HTTP, without assertions (client threads use it) ------------------------------------ */

struct reply {
	int status;             /* 0: no answer (err says why) */
	char node[32];          /* X-Skv-Node */
	char moved[64];         /* X-Skv-Conversation-Moved */
	char restored[64];      /* X-Skv-Conversation-Restored */
	char *body;             /* de-chunked, malloc'ed */
	char err[160];
};

static void reply_free(struct reply *r)
{
	free(r->body);
	r->body = NULL;
}

static void header_value(const char *head, const char *name, char *out, size_t len)
{
	out[0] = '\0';
	size_t nl = strlen(name);
	for (const char *p = head; (p = strstr(p, "\r\n")); ) {
		p += 2;
		if (!strncasecmp(p, name, nl) && p[nl] == ':') {
			const char *v = p + nl + 1;
			while (*v == ' ')
				v++;
			size_t n = strcspn(v, "\r\n");
			snprintf(out, len, "%.*s", (int)n, v);
			return;
		}
	}
}

/* One request on its own connection to addr:port. 0 with r filled, or -1 with r->err. */
static int http_do(const char *addr, uint16_t port, const char *method, const char *path,
		   const char *headers, const char *body, struct reply *r)
{
	memset(r, 0, sizeof(*r));
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		snprintf(r->err, sizeof(r->err), "socket: %s", strerror(errno));
		return -1;
	}
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, addr, &sa.sin_addr);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		snprintf(r->err, sizeof(r->err), "connect %s:%u: %s", addr, port, strerror(errno));
		close(fd);
		return -1;
	}
	size_t body_len = body ? strlen(body) : 0;
	char head[1024];
	int n = snprintf(head, sizeof(head),
			 "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s"
			 "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
			 method, path, addr, headers ? headers : "", body_len);
	size_t out_len = (size_t)n + body_len;
	char *out = malloc(out_len);
	memcpy(out, head, (size_t)n);
	if (body_len)
		memcpy(out + n, body, body_len);
	for (size_t off = 0; off < out_len;) {
		ssize_t w = write(fd, out + off, out_len - off);
		if (w <= 0) {
			snprintf(r->err, sizeof(r->err), "write: %s", strerror(errno));
			free(out);
			close(fd);
			return -1;
		}
		off += (size_t)w;
	}
	free(out);
	size_t cap = 65536, len = 0;
	char *buf = malloc(cap);
	double deadline = mp_now() + REQ_TIMEOUT_S;
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int left_ms = (int)((deadline - mp_now()) * 1000);
		if (left_ms <= 0) {
			snprintf(r->err, sizeof(r->err), "no full answer within %.0f s", REQ_TIMEOUT_S);
			free(buf);
			close(fd);
			return -1;
		}
		if (poll(&p, 1, left_ms) <= 0)
			continue;
		if (cap - len < 4096)
			buf = realloc(buf, cap *= 2);
		ssize_t got = read(fd, buf + len, cap - len - 1);
		if (got < 0) {
			snprintf(r->err, sizeof(r->err), "read: %s", strerror(errno));
			free(buf);
			close(fd);
			return -1;
		}
		if (!got)
			break;
		len += (size_t)got;
	}
	close(fd);
	buf[len] = '\0';
	char *sep = strstr(buf, "\r\n\r\n");
	if (sscanf(buf, "HTTP/1.%*d %d", &r->status) != 1 || !sep) {
		snprintf(r->err, sizeof(r->err), "not an HTTP answer (%zu bytes): %.80s", len, buf);
		r->status = 0;
		free(buf);
		return -1;
	}
	*sep = '\0';
	header_value(buf, "X-Skv-Node", r->node, sizeof(r->node));
	header_value(buf, "X-Skv-Conversation-Moved", r->moved, sizeof(r->moved));
	header_value(buf, "X-Skv-Conversation-Restored", r->restored, sizeof(r->restored));
	char *payload = sep + 4;
	size_t payload_len = len - (size_t)(payload - buf);
	r->body = malloc(payload_len + 1);
	size_t res_len = 0;
	if (!strcasestr(buf, "\r\ntransfer-encoding: chunked")) {
		memcpy(r->body, payload, payload_len);
		res_len = payload_len;
	} else {
		char *p = payload, *end = payload + payload_len;
		for (;;) {
			char *q;
			unsigned long sz = strtoul(p, &q, 16);
			char *crlf = q < end ? strstr(q, "\r\n") : NULL;
			if (!crlf || (size_t)(end - crlf) < 2 + sz) {
				snprintf(r->err, sizeof(r->err), "a chunked body cut short");
				r->body[res_len] = '\0';
				free(buf);
				return -1;
			}
			p = crlf + 2;
			if (!sz)
				break;
			memcpy(r->body + res_len, p, sz);
			res_len += sz;
			p += sz + 2;
		}
	}
	r->body[res_len] = '\0';
	free(buf);
	return 0;
}

/* The text of a completion: a JSON body's choices[0].text, or an SSE body's chunks up to
 * [DONE]. NULL (err filled) when the body is neither. */
static char *answer_text(const char *body, char *err, size_t err_len)
{
	json_error_t je;
	if (strncmp(body, "data: ", 6) != 0) {
		json_t *v = json_loads(body, 0, &je);
		json_t *t = json_object_get(json_array_get(json_object_get(v, "choices"), 0), "text");
		char *s = json_is_string(t) ? strdup(json_string_value(t)) : NULL;
		if (!s)
			snprintf(err, err_len, "no choices[0].text in %.100s", body);
		json_decref(v);
		return s;
	}
	size_t cap = strlen(body) + 1, len = 0;
	char *out = calloc(1, cap);
	for (const char *p = body; (p = strstr(p, "data: "));) {
		p += 6;
		const char *end = strstr(p, "\n\n");
		if (!end)
			break;
		if (!strncmp(p, "[DONE]", 6))
			return out;
		char *ev = strndup(p, (size_t)(end - p));
		json_t *v = json_loads(ev, 0, &je);
		free(ev);
		json_t *t = json_object_get(json_array_get(json_object_get(v, "choices"), 0), "text");
		if (json_is_string(t)) {
			memcpy(out + len, json_string_value(t), json_string_length(t));
			len += json_string_length(t);
		}
		json_decref(v);
		p = end;
	}
	snprintf(err, err_len, "an SSE stream without data: [DONE]: %.100s", body);
	free(out);
	return NULL;
}

/* One round of a conversation: POST /v1/completions with X-Conversation-Id (even rounds) or the
 * body's "conversation" field (odd ones), streamed every third round. Returns the answer's text
 * (malloc'ed) on 200, else NULL with r describing the failure. */
static char *conv_round(const char *addr, uint16_t port, const char *id, unsigned script,
			unsigned round, struct reply *r)
{
	json_t *req = json_pack("{s:s, s:i, s:i, s:b}", "prompt", round_prompt(script, round),
				"max_tokens", MAX_TOKENS, "temperature", 0, "stream", round % 3 == 2);
	char header[160] = "";
	if (round % 2)
		json_object_set_new(req, "conversation", json_string(id));
	else
		snprintf(header, sizeof(header), "X-Conversation-Id: %s\r\n", id);
	char *body = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	int rc = http_do(addr, port, "POST", "/v1/completions", header, body, r);
	free(body);
	if (rc < 0 || r->status != 200) {
		if (rc == 0)
			snprintf(r->err, sizeof(r->err), "status %d: %.120s", r->status, r->body);
		return NULL;
	}
	char *text = answer_text(r->body, r->err, sizeof(r->err));
	if (!text)
		r->status = 0;
	return text;
}

/* ---- conversations under load ------------------------------------------------------------ */

struct conv {
	char id[32];
	unsigned script;
	char node[ALL_ROUNDS][32];      /* who answered each round ("" if none did) */
	char moved[ALL_ROUNDS][64];
	char restored[ALL_ROUNDS][64];
	char *text[ALL_ROUNDS];         /* each round's answer */
	int status[ALL_ROUNDS];         /* the last attempt's status (0: no answer) */
	unsigned attempts[ALL_ROUNDS];
	char err[ALL_ROUNDS][160];
	int lost;                       /* ended with an error, at round lost_round */
	unsigned lost_round;
	int had_snapshot;               /* the kill test: its file in the snapshot directory */
};

struct load {
	const struct cluster *cl;
	struct conv *convs;
	unsigned first_round, last_round;       /* [first, last) */
	unsigned gate_round;                    /* rounds from here wait for the gate */
	int retry;                              /* the kill test: retry a failed round */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned completed;                     /* requests answered (any status) */
	int gate_open;
};

struct worker {
	struct load *load;
	unsigned first_conv, n_convs;
	pthread_t thread;
};

static void load_count(struct load *l)
{
	pthread_mutex_lock(&l->lock);
	l->completed++;
	pthread_cond_broadcast(&l->cond);
	pthread_mutex_unlock(&l->lock);
}

/* One line per round of a conversation, for failure messages (static buffer). */
static const char *conv_story(const struct conv *c)
{
	static char buf[4096];
	size_t n = 0;
	for (unsigned r = 0; r < ALL_ROUNDS && n < sizeof(buf) - 256; r++)
		if (c->attempts[r])
			n += (size_t)snprintf(buf + n, sizeof(buf) - n,
					      "\n  round %u: %u attempt(s), status %d on %s%s%s%s%s %s",
					      r, c->attempts[r], c->status[r], c->node[r],
					      c->moved[r][0] ? ", moved " : "", c->moved[r],
					      c->restored[r][0] ? ", restored " : "", c->restored[r],
					      c->err[r]);
	return buf;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct load *l = w->load;
	for (unsigned round = l->first_round; round < l->last_round; round++) {
		if (round == l->gate_round) {
			pthread_mutex_lock(&l->lock);
			while (!l->gate_open)
				pthread_cond_wait(&l->cond, &l->lock);
			pthread_mutex_unlock(&l->lock);
		}
		for (unsigned k = 0; k < w->n_convs; k++) {
			struct conv *c = &l->convs[w->first_conv + k];
			if (c->lost)
				continue;
			for (unsigned a = 0; a < (l->retry ? RETRIES : 1); a++) {
				struct reply r;
				c->attempts[round]++;
				char *text = conv_round("127.0.0.1", l->cl->port, c->id, c->script,
							round, &r);
				c->status[round] = r.status;
				snprintf(c->node[round], sizeof(c->node[round]), "%s", r.node);
				snprintf(c->moved[round], sizeof(c->moved[round]), "%s", r.moved);
				snprintf(c->restored[round], sizeof(c->restored[round]), "%s",
					 r.restored);
				snprintf(c->err[round], sizeof(c->err[round]), "%s", r.err);
				reply_free(&r);
				load_count(l);
				if (text) {
					c->text[round] = text;
					break;
				}
				/* A conversation the gateway reports lost (4xx) is not retried;
				 * a failed connection or a 5xx (the node died under it) is. */
				if (r.status >= 400 && r.status < 500) {
					c->lost = 1;
					c->lost_round = round;
					break;
				}
				mp_sleep_ms(300);
			}
			if (!c->text[round] && !c->lost) {
				c->lost = 1;
				c->lost_round = round;
			}
		}
	}
	return NULL;
}

static void load_start(struct load *l, struct worker *w, const struct cluster *cl,
		       struct conv *convs, unsigned first, unsigned last, unsigned gate, int retry)
{
	memset(l, 0, sizeof(*l));
	l->cl = cl;
	l->convs = convs;
	l->first_round = first;
	l->last_round = last;
	l->gate_round = gate;
	l->retry = retry;
	pthread_mutex_init(&l->lock, NULL);
	pthread_cond_init(&l->cond, NULL);
	for (unsigned t = 0; t < THREADS; t++) {
		w[t].load = l;
		w[t].first_conv = t * (CONVS / THREADS);
		w[t].n_convs = CONVS / THREADS;
		cr_assert(pthread_create(&w[t].thread, NULL, worker_main, &w[t]) == 0);
	}
}

/* Wait until the load has answered want requests (asserted within a bound). */
static void load_wait_completed(struct load *l, unsigned want)
{
	double deadline = mp_now() + 300;
	pthread_mutex_lock(&l->lock);
	while (l->completed < want && mp_now() < deadline) {
		pthread_mutex_unlock(&l->lock);
		mp_sleep_ms(20);
		pthread_mutex_lock(&l->lock);
	}
	unsigned got = l->completed;
	pthread_mutex_unlock(&l->lock);
	cr_assert_geq(got, want, "the load answered %u of %u requests within 300 s", got, want);
}

static void load_open_gate(struct load *l)
{
	pthread_mutex_lock(&l->lock);
	l->gate_open = 1;
	pthread_cond_broadcast(&l->cond);
	pthread_mutex_unlock(&l->lock);
}

static void load_join(struct load *l, struct worker *w)
{
	load_open_gate(l);
	for (unsigned t = 0; t < THREADS; t++)
		pthread_join(w[t].thread, NULL);
}

static void convs_init(struct conv *convs, const char *prefix)
{
	memset(convs, 0, sizeof(struct conv) * CONVS);
	for (unsigned i = 0; i < CONVS; i++) {
		snprintf(convs[i].id, sizeof(convs[i].id), "%s-%02u", prefix, i);
		convs[i].script = i % SCRIPTS;
	}
}

static void convs_free(struct conv *convs)
{
	for (unsigned i = 0; i < CONVS; i++)
		for (unsigned r = 0; r < ALL_ROUNDS; r++)
			free(convs[i].text[r]);
}

/* Each script's answers, round by round, on one node directly, as one conversation that
 * never moves (the reference). */
static void reference_run(const struct cluster *cl, unsigned node, const char *tag,
			  char *ref[SCRIPTS][ALL_ROUNDS])
{
	char addr[32];
	node_addr(cl, node, addr, sizeof(addr));
	for (unsigned s = 0; s < SCRIPTS; s++) {
		char id[48];
		snprintf(id, sizeof(id), "ref-%s-%u", tag, s);
		for (unsigned round = 0; round < ALL_ROUNDS; round++) {
			struct reply r;
			ref[s][round] = conv_round(addr, NODE_PORT, id, s, round, &r);
			cr_assert(ref[s][round] != NULL, "reference %s round %u: %s", id, round, r.err);
			cr_assert(!r.moved[0] && !r.restored[0], "the reference moved");
			reply_free(&r);
		}
		struct reply r;
		char path[96];
		snprintf(path, sizeof(path), "/v1/conversations/%s", id);
		cr_assert_eq(http_do(addr, NODE_PORT, "DELETE", path, NULL, NULL, &r), 0, "%s", r.err);
		cr_assert_eq(r.status, 200, "DELETE %s: %d %s", id, r.status, r.body);
		reply_free(&r);
	}
	/* Different first prompts make different stories: a mix-up of conversations shows. */
	for (unsigned s = 1; s < SCRIPTS; s++)
		cr_assert_str_neq(ref[s][0], ref[0][0]);
}

static void reference_free(char *ref[SCRIPTS][ALL_ROUNDS])
{
	for (unsigned s = 0; s < SCRIPTS; s++)
		for (unsigned r = 0; r < ALL_ROUNDS; r++)
			free(ref[s][r]);
}

static unsigned node_number(const char *name)
{
	unsigned n = 0;
	if (sscanf(name, "node%u", &n) != 1 || n < 1 || n > NODES)
		return 0;
	return n;
}

/* The node that holds the most conversations (by their first round). */
static unsigned busiest_node(const struct conv *convs, unsigned per_node[NODES + 1])
{
	memset(per_node, 0, sizeof(unsigned) * (NODES + 1));
	for (unsigned i = 0; i < CONVS; i++)
		per_node[node_number(convs[i].node[0])]++;
	unsigned best = 1;
	for (unsigned n = 2; n <= NODES; n++)
		if (per_node[n] > per_node[best])
			best = n;
	return best;
}

/* Wait until HAProxy sees the node UP (tools/cluster status), asserted within 30 s. */
static void wait_node_up(const struct cluster *cl, const char *node)
{
	double deadline = mp_now() + 30;
	for (;;) {
		char *out;
		cr_assert_eq(CLUSTER(cl, &out, "status"), 0, "%s", out);
		char want[64];
		snprintf(want, sizeof(want), "\n%s ", node);
		char *line = strstr(out, want);
		char *end = line ? strchr(line + 1, '\n') : NULL;
		char *up = line ? strstr(line, " UP ") : NULL;
		int is_up = up && (!end || up < end);
		free(out);
		if (is_up)
			return;
		cr_assert(mp_now() < deadline, "HAProxy does not see %s UP", node);
		mp_sleep_ms(200);
	}
}

TestSuite(cluster, .init = cluster_suite_init, .fini = cluster_suite_fini, .timeout = 600);

/* dist/haproxy/streamkv-3-nodes.cfg is what tools/cluster-haproxy-cfg writes for 3 nodes, and
 * haproxy accepts it; bad arguments of both tools are refused in one line with exit code 2. */
Test(cluster, haproxy_config_and_bad_arguments)
{
	char tool[PATH_MAX], shipped[PATH_MAX];
	snprintf(shipped, sizeof(shipped), "%s/dist/haproxy/streamkv-3-nodes.cfg",
		 mp_env_path("SKV_SOURCE_ROOT"));
	char *out, *err;
	int st = mp_run(tool_path("cluster-haproxy-cfg", tool, sizeof(tool)),
			(const char *const[]){ "--nodes", "3", NULL }, &out, &err);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "cluster-haproxy-cfg: %s", err);
	size_t len;
	char *want = tu_read_file(shipped, &len);
	cr_assert_str_eq(out, want, "dist/haproxy/streamkv-3-nodes.cfg is not the generator's "
			 "output: run tools/cluster-haproxy-cfg --nodes 3 > "
			 "dist/haproxy/streamkv-3-nodes.cfg");
	for (unsigned i = 1; i <= 3; i++) {
		char line[64];
		snprintf(line, sizeof(line), "\tserver node%u 10.77.0.%u:8080\n", i, i);
		cr_assert(strstr(out, line), "no '%s' in the configuration", line);
	}
	cr_assert(strstr(out, "\tbalance hdr(X-Conversation-Id)\n"));
	cr_assert(strstr(out, "\thash-type consistent\n"));
	cr_assert(strstr(out, "\toption httpchk GET /health\n"));
	free(want);
	free(out);
	free(err);

	char hp[PATH_MAX];
	if (find_prog("haproxy", hp, sizeof(hp))) {
		st = mp_run(hp, (const char *const[]){ "-c", "-f", shipped, NULL }, &out, &err);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "haproxy -c: %s%s", out, err);
		free(out);
		free(err);
	}

	static const char *const bad_cfg[][4] = {
		{ "--nodes", "0", NULL }, { "--nodes", "three", NULL },
		{ "--node-port", "99999", NULL }, { "--subnet", "10.77", NULL },
		{ "--server", "node1", NULL }, { "--frobnicate", NULL },
	};
	for (unsigned i = 0; i < sizeof(bad_cfg) / sizeof(bad_cfg[0]); i++) {
		st = mp_run(tool, bad_cfg[i], &out, &err);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "%s %s: status 0x%x", bad_cfg[i][0],
			  bad_cfg[i][1] ? bad_cfg[i][1] : "", st);
		cr_assert(!strncmp(err, "cluster-haproxy-cfg: ", 21) && strchr(err, '\n') ==
			  err + strlen(err) - 1, "not one line: %s", err);
		free(out);
		free(err);
	}
	tool_path("cluster", tool, sizeof(tool));
	static const char *const bad_cluster[][6] = {
		{ "frobnicate", NULL }, { "up", "--nodes", "0", NULL },
		{ "up", "--name", "Bad_Name", NULL }, { "drain", NULL },
		{ "status", "--nodes", "3", NULL }, { "up", "--build", "/nonexistent", NULL },
	};
	for (unsigned i = 0; i < sizeof(bad_cluster) / sizeof(bad_cluster[0]); i++) {
		st = mp_run(tool, bad_cluster[i], &out, &err);
		cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "cluster %s: status 0x%x: %s",
			  bad_cluster[i][0], st, err);
		cr_assert(!strncmp(err, "cluster: ", 9) && strchr(err, '\n') == err + strlen(err) - 1,
			  "not one line: %s", err);
		free(out);
		free(err);
	}
	cluster_passed = 1;
}

/* Conversations spread over the three nodes and stay put; node X (the busiest) drained while
 * the load runs: each of its conversations moves once, to the node its id hashes to without
 * X, and the others never move; undrained, they move back. Every answer equals the reference. */
Test(cluster, spread_stay_drain)
{
	struct cluster cl;
	cluster_up(&cl, "cluster-drain", "5");
	char *ref[SCRIPTS][ALL_ROUNDS];
	reference_run(&cl, 1, "drain", ref);

	static struct conv convs[CONVS];
	convs_init(convs, "drain");
	struct load l;
	struct worker w[THREADS];
	/* Rounds 4 on wait until the drain is done: each conversation has rounds after it. */
	load_start(&l, w, &cl, convs, 0, ROUNDS, 4, 0);
	load_wait_completed(&l, CONVS);
	/* Every conversation has had its first round: where are they? */
	unsigned per_node[NODES + 1];
	load_wait_completed(&l, 2 * CONVS + CONVS / 2);
	unsigned drained = busiest_node(convs, per_node);
	char drained_name[16];
	snprintf(drained_name, sizeof(drained_name), "node%u", drained);
	CLUSTER_OK(&cl, "drain", drained_name);
	double drained_at = mp_now();
	load_open_gate(&l);
	load_join(&l, w);
	fprintf(stderr, "drain: conversations per node %u %u %u; drained %s after %u requests, "
		"%.1f s of load after it\n", per_node[1], per_node[2], per_node[3], drained_name,
		2 * CONVS + CONVS / 2, mp_now() - drained_at);

	for (unsigned n = 1; n <= NODES; n++)
		cr_assert_gt(per_node[n], 0, "node%u got none of %u conversations", n, CONVS);
	unsigned moved = 0, moved_from_drained = 0;
	for (unsigned i = 0; i < CONVS; i++) {
		struct conv *c = &convs[i];
		const char *home = c->node[0];
		const char *now = home;
		unsigned moves = 0;
		for (unsigned r = 0; r < ROUNDS; r++) {
			cr_assert_eq(c->status[r], 200, "%s round %u: %s", c->id, r, c->err[r]);
			cr_assert_str_eq(c->text[r], ref[c->script][r],
					 "%s round %u (on %s, moved '%s') differs from the reference",
					 c->id, r, c->node[r], c->moved[r]);
			if (c->moved[r][0]) {
				char want[64];
				snprintf(want, sizeof(want), "from=%s", now);
				cr_assert_str_eq(c->moved[r], want, "%s round %u", c->id, r);
				cr_assert_str_neq(c->node[r], drained_name);
				moves++;
				now = c->node[r];
			}
			cr_assert_str_eq(c->node[r], now, "%s round %u: answered by %s, not by %s "
					 "(and not moved)", c->id, r, c->node[r], now);
		}
		if (!strcmp(home, drained_name)) {
			cr_assert_eq(moves, 1u, "%s (on the drained %s) moved %u times", c->id, home,
				     moves);
			cr_assert_str_neq(c->node[ROUNDS - 1], drained_name);
			moved_from_drained++;
		} else {
			cr_assert_eq(moves, 0u, "%s (on %s) moved though its node stayed", c->id, home);
		}
		moved += moves;
	}
	cr_assert_eq(moved_from_drained, per_node[drained]);

	/* Undrained: the ring is as before, and the moved conversations go back home. */
	CLUSTER_OK(&cl, "undrain", drained_name);
	wait_node_up(&cl, drained_name);
	load_start(&l, w, &cl, convs, ROUNDS, ALL_ROUNDS, ALL_ROUNDS, 0);
	load_join(&l, w);
	unsigned moved_back = 0;
	for (unsigned i = 0; i < CONVS; i++) {
		struct conv *c = &convs[i];
		for (unsigned r = ROUNDS; r < ALL_ROUNDS; r++) {
			cr_assert_eq(c->status[r], 200, "%s round %u: %s", c->id, r, c->err[r]);
			cr_assert_str_eq(c->text[r], ref[c->script][r], "%s round %u", c->id, r);
			cr_assert_str_eq(c->node[r], c->node[0], "%s round %u: on %s, not back on %s",
					 c->id, r, c->node[r], c->node[0]);
		}
		if (c->moved[ROUNDS][0])
			moved_back++;
	}
	cr_assert_eq(moved_back, per_node[drained], "%u of %u conversations moved back", moved_back,
		     per_node[drained]);
	fprintf(stderr, "drain: %u conversations moved away from %s and %u back; %u stayed\n",
		moved, drained_name, moved_back, CONVS - per_node[drained]);
	convs_free(convs);
	reference_free(ref);
	cluster_passed = 1;
	cluster_down(&cl);
	cluster_live = NULL;
}

/* The round after the killed node was started again: back on it, pulled from where it was,
 * never restored there from the snapshot directory while the other node still held it (that
 * would fork the conversation: skv-http asks a busy peer again instead of taking the file). */
static void expect_back_home(const struct conv *c, const char *home, const char *interim)
{
	char want[64];
	snprintf(want, sizeof(want), "from=%s", interim);
	cr_assert_eq(c->status[ROUNDS], 200, "%s after the restart: %s", c->id, c->err[ROUNDS]);
	cr_assert_str_eq(c->node[ROUNDS], home, "%s after the restart:%s", c->id, conv_story(c));
	cr_assert(!c->restored[ROUNDS][0] || c->moved[ROUNDS][0],
		  "%s forked: restored on %s from the snapshot directory though %s still held it:%s",
		  c->id, home, interim, conv_story(c));
	cr_assert_str_eq(c->moved[ROUNDS], want, "%s after the restart:%s", c->id, conv_story(c));
}

/* Replay on node: the script's rounds [0, held) then the prompts of rounds [from, to); 1 if the
 * answers of rounds [from, to) equal c's. */
static int replay_matches(const struct cluster *cl, unsigned node, const struct conv *c,
			  unsigned held, unsigned from, unsigned to)
{
	char addr[32], id[64];
	node_addr(cl, node, addr, sizeof(addr));
	snprintf(id, sizeof(id), "replay-%.31s-%u", c->id, held);
	int same = 1;
	struct reply r;
	for (unsigned round = 0; round < held; round++) {
		char *t = conv_round(addr, NODE_PORT, id, c->script, round, &r);
		cr_assert(t != NULL, "replay %s: %s", id, r.err);
		free(t);
		reply_free(&r);
	}
	for (unsigned round = from; round < to && same; round++) {
		if (!c->text[round])
			break;
		char *t = conv_round(addr, NODE_PORT, id, c->script, round, &r);
		cr_assert(t != NULL, "replay %s: %s", id, r.err);
		same = !strcmp(t, c->text[round]);
		free(t);
		reply_free(&r);
	}
	char path[96];
	snprintf(path, sizeof(path), "/v1/conversations/%s", id);
	cr_assert_eq(http_do(addr, NODE_PORT, "DELETE", path, NULL, NULL, &r), 0, "%s", r.err);
	reply_free(&r);
	return same;
}

/* Node X (the busiest) killed with kill -9 while the load runs: each of its conversations is
 * resumed on another node from the shared snapshot directory (X-Skv-Conversation-Restored; its
 * answers equal a replay from a round the snapshot held, so it lost at most the rounds after
 * that snapshot) or ends with an OpenAI-style error; counted. The others never notice. */
Test(cluster, kill9_of_a_node)
{
	struct cluster cl;
	cluster_up(&cl, "cluster-kill", "1");
	char *ref[SCRIPTS][ALL_ROUNDS];
	reference_run(&cl, 1, "kill", ref);

	static struct conv convs[CONVS];
	convs_init(convs, "kill");
	struct load l;
	struct worker w[THREADS];
	load_start(&l, w, &cl, convs, 0, ROUNDS, KILL_GATE, 1);
	load_wait_completed(&l, KILL_GATE * CONVS);
	/* Rounds before the gate done everywhere: let snapshot passes (each 1 s) see them, then
	 * kill during the load of the next rounds. */
	mp_sleep_ms(2500);
	unsigned per_node[NODES + 1];
	unsigned killed = busiest_node(convs, per_node);
	char killed_name[16];
	snprintf(killed_name, sizeof(killed_name), "node%u", killed);
	load_open_gate(&l);
	load_wait_completed(&l, KILL_GATE * CONVS + CONVS / 3);
	unsigned snapshotted = 0;
	for (unsigned i = 0; i < CONVS; i++) {
		char path[PATH_MAX + 64];
		snprintf(path, sizeof(path), "%s/snapshots/%.31s.skvconv", cl.run_dir,
			 convs[i].id);
		convs[i].had_snapshot = access(path, F_OK) == 0;
		snapshotted += (unsigned)convs[i].had_snapshot;
	}
	CLUSTER_OK(&cl, "kill", killed_name);
	load_join(&l, w);
	/* Started again (empty), the node takes its conversations back from where they went. */
	CLUSTER_OK(&cl, "start", killed_name);
	wait_node_up(&cl, killed_name);
	load_start(&l, w, &cl, convs, ROUNDS, KILL_END, KILL_END, 1);
	load_join(&l, w);

	unsigned resumed = 0, lost = 0, retried = 0, exact = 0, anew = 0;
	unsigned survivor = killed % NODES + 1;
	for (unsigned i = 0; i < CONVS; i++) {
		struct conv *c = &convs[i];
		int on_killed = !strcmp(c->node[0], killed_name);
		unsigned restored_round = ROUNDS;
		for (unsigned r = 0; r < KILL_END; r++)
			retried += c->attempts[r] > 1 ? c->attempts[r] - 1 : 0;
		for (unsigned r = 0; r < ROUNDS; r++)
			if (c->restored[r][0] && restored_round == ROUNDS)
				restored_round = r;
		if (!on_killed) {
			for (unsigned r = 0; r < KILL_END; r++) {
				cr_assert_eq(c->status[r], 200, "%s (on %s) round %u: %s", c->id,
					     c->node[0], r, c->err[r]);
				cr_assert_str_eq(c->text[r], ref[c->script][r], "%s round %u", c->id, r);
				cr_assert_str_eq(c->node[r], c->node[0], "%s round %u", c->id, r);
				cr_assert(!c->moved[r][0] && !c->restored[r][0], "%s round %u", c->id, r);
			}
			continue;
		}
		if (c->lost) {
			/* A clear error: an OpenAI-style body, or the node's connection cut. */
			unsigned r = c->lost_round;
			cr_assert(c->err[r][0], "%s lost at round %u without a reason", c->id, r);
			lost++;
			fprintf(stderr, "kill: %s lost at round %u: %s\n", c->id, r, c->err[r]);
			continue;
		}
		if (restored_round == ROUNDS && !c->had_snapshot) {
			/* No snapshot yet and its node unreachable: the node it lands on cannot
			 * tell it from a new conversation and starts it anew (counted; the
			 * limit ARCHITECTURE.md states). */
			unsigned r = 0;
			while (r < ROUNDS && !strcmp(c->node[r], killed_name))
				r++;
			cr_assert_lt(r, ROUNDS, "%s stayed on the killed %s:%s", c->id, killed_name,
				     conv_story(c));
			for (unsigned k = r; k < ROUNDS; k++)
				cr_assert_str_eq(c->node[k], c->node[r], "%s round %u:%s", c->id, k,
						 conv_story(c));
			expect_back_home(c, killed_name, c->node[r]);
			anew++;
			fprintf(stderr, "kill: %s had no snapshot: started anew on %s at round %u\n",
				c->id, c->node[r], r);
			continue;
		}
		cr_assert_lt(restored_round, ROUNDS, "%s (on the killed %s, with a snapshot) answered "
			     "every round and was never restored:%s", c->id, killed_name,
			     conv_story(c));
		cr_assert_str_neq(c->node[restored_round], killed_name);
		for (unsigned r = 0; r < restored_round; r++)
			cr_assert_str_eq(c->text[r], ref[c->script][r], "%s round %u", c->id, r);
		for (unsigned r = restored_round; r < ROUNDS; r++) {
			cr_assert_eq(c->status[r], 200, "%s round %u: %s", c->id, r, c->err[r]);
			cr_assert_str_eq(c->node[r], c->node[restored_round], "%s round %u", c->id, r);
		}
		expect_back_home(c, killed_name, c->node[restored_round]);
		/* The snapshot held rounds [0, held) for some held <= restored_round, with the
		 * ones before the pause at least. */
		unsigned held = restored_round;
		while (held >= 1 &&
		       !replay_matches(&cl, survivor, c, held, restored_round,
				       KILL_END))
			held--;
		cr_assert_geq(held, 1u, "%s: restored at round %u, its answers match no replay from "
			      "a snapshot of rounds 1..%u:%s", c->id, restored_round, restored_round,
			      conv_story(c));
		exact += held == restored_round;
		fprintf(stderr, "kill: %s restored on %s at round %u (%s), held %u rounds\n", c->id,
			c->node[restored_round], restored_round, c->restored[restored_round], held);
		resumed++;
	}
	cr_assert_eq(resumed + lost + anew, per_node[killed]);
	fprintf(stderr, "kill: %s held %u conversations (%u of all %u had a snapshot file): %u "
		"resumed elsewhere (%u with nothing lost), %u lost with an error, %u without a "
		"snapshot started anew; back on %s once it was started again: %u moved back; %u "
		"requests retried; "
		"the other %u went on untouched\n",
		killed_name, per_node[killed], snapshotted, CONVS, resumed, exact, lost, anew,
		killed_name, per_node[killed] - lost, retried,
		CONVS - per_node[killed]);
	convs_free(convs);
	reference_free(ref);
	cluster_passed = 1;
	cluster_down(&cl);
	cluster_live = NULL;
}
