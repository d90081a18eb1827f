/* The HTTP side: libmicrohttpd's internal epoll thread, every request answered by one access
 * handler (srv_access) in three calls at most: headers (early refusals: 401, 413), body chunks
 * (kept up to --max-body), end of body (route, check, hand to the backend, suspend).
 *
 * A generation job's connection is suspended until the backend decides its status. A streaming
 * answer then gets a callback response (chunked, text/event-stream): the content reader hands
 * libmicrohttpd whatever the backend appended since the last call, and suspends the connection
 * when there is nothing yet (the pattern microhttpd.h prescribes instead of returning 0 in a
 * busy loop); the backend resumes it when it appends. A non-streaming answer stays suspended
 * until its body is complete. /metrics fetches the daemon's listing on a short-lived thread of
 * its own (a blocking admin round trip must not stall the HTTP thread) and resumes its
 * connection when done. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "admin-conn.h"
#include "admin-report.h"
#include "http-gw.h"

#define SRV_SSE_BLOCK (64u * 1024)

const int gw_status_codes[GW_STATUS_CODES] = { 200, 400, 401, 404, 405, 409,
					       413, 429, 500, 503, 0, 0 };

int gw_status_index(int status)
{
	for (int i = 0; i < GW_STATUS_CODES - 2; i++)
		if (gw_status_codes[i] == status)
			return i;
	return GW_STATUS_CODES - 1; /* other */
}

enum srv_route {
	SRV_UNKNOWN,
	SRV_HEALTH,
	SRV_MODELS,
	SRV_MODEL,
	SRV_METRICS,
	SRV_COMPLETIONS,
	SRV_CHAT,
	SRV_CONVERSATION,
	SRV_CONV_EXPORT,        /* GET /v1/conversations/ID/export[?release=1] */
	SRV_CONV_IMPORT,        /* PUT /v1/conversations/ID */
	SRV_DRAIN,              /* POST /admin/drain */
	SRV_UNDRAIN,            /* POST /admin/undrain */
};

struct srv_metrics {
	struct gw *gw;
	struct MHD_Connection *conn;
	char *text;
	size_t len;
	int done;                     /* gw->lock */
};

/* One request (libmicrohttpd's con_cls). */
struct srv_conn {
	struct gw *gw;
	enum srv_route route;
	const char *path_arg;         /* /v1/models/NAME, /v1/conversations/ID: NAME or ID */
	struct gw_buf body;
	int too_big;
	struct gw_job *job;
	int sse;                      /* an SSE response is queued (counted as active) */
	struct srv_metrics *metrics;
	int by_peer;                  /* authorized by --peer-key */
	char conv_id[GW_CONV_ID_MAX + 2]; /* /v1/conversations/ID/export: ID */
};

/* Who answered, and where a conversation came from. */
static void srv_headers(struct srv_conn *sc, struct MHD_Response *r)
{
	MHD_add_response_header(r, "X-Skv-Node", sc->gw->opts.node_name);
	const struct gw_job *j = sc->job;
	if (!j)
		return;
	char v[GW_NODE_NAME_MAX + 32];
	if (j->moved_from[0]) {
		snprintf(v, sizeof(v), "from=%s", j->moved_from);
		MHD_add_response_header(r, "X-Skv-Conversation-Moved", v);
	}
	if (j->restored) {
		snprintf(v, sizeof(v), "snapshot; age-s=%lld", (long long)j->restored_age_s);
		MHD_add_response_header(r, "X-Skv-Conversation-Restored", v);
	}
}

static enum MHD_Result srv_queue(struct srv_conn *sc, struct MHD_Connection *conn, int status,
				 const char *body, size_t len, const char *type)
{
	struct MHD_Response *r =
		MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
	if (!r)
		return MHD_NO;
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
	if (sc->job && sc->job->req.conversation[0])
		MHD_add_response_header(r, "X-Conversation-Id", sc->job->req.conversation);
	srv_headers(sc, r);
	enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
	MHD_destroy_response(r);
	__atomic_add_fetch(&sc->gw->count.requests[gw_status_index(status)], 1, __ATOMIC_RELAXED);
	return ret;
}

static enum MHD_Result srv_error(struct srv_conn *sc, struct MHD_Connection *conn, int status,
				 const char *message, const char *type, const char *param,
				 const char *code)
{
	struct gw_buf b = { 0 };
	gw_error_body(&b, message, type, param, code);
	enum MHD_Result r = srv_queue(sc, conn, status, b.data, b.len, "application/json");
	gw_buf_free(&b);
	return r;
}

static enum MHD_Result srv_json(struct srv_conn *sc, struct MHD_Connection *conn, int status,
				const struct gw_buf *b)
{
	return srv_queue(sc, conn, status, b->data ? b->data : "", b->len, "application/json");
}

/* ---- authentication -------------------------------------------------------------------- */

static uint64_t srv_key_hash(const char *key)
{
	uint64_t h = 14695981039346656037ull;
	for (const char *p = key; p && *p; p++) {
		h ^= (unsigned char)*p;
		h *= 1099511628211ull;
	}
	return h;
}

/* Compare in full: the time taken says nothing about the key. */
static int srv_key_equal(const char *given, const char *want)
{
	size_t gl = strlen(given), wl = strlen(want);
	unsigned char diff = gl != wl;
	for (size_t i = 0; i < wl; i++)
		diff |= (unsigned char)(want[i] ^ (i < gl ? given[i] : 0));
	return !diff;
}

static int srv_authorized(struct gw *gw, struct MHD_Connection *conn, uint64_t *key_hash);

/* Moving and draining: an API key or --peer-key (*by_peer: the latter, which may export any
 * key's conversation). Open when neither is configured. */
static int srv_peer_authorized(struct gw *gw, struct MHD_Connection *conn, uint64_t *key_hash,
			       int *by_peer)
{
	*by_peer = 0;
	*key_hash = 0;
	if (!gw->opts.peer_key)
		return srv_authorized(gw, conn, key_hash);
	const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
						       MHD_HTTP_HEADER_AUTHORIZATION);
	if (!auth || strncasecmp(auth, "Bearer ", 7))
		return 0;
	const char *given = auth + 7;
	while (*given == ' ')
		given++;
	*by_peer = srv_key_equal(given, gw->opts.peer_key);
	return *by_peer || (gw->opts.n_api_keys && srv_authorized(gw, conn, key_hash));
}

/* 1 if the request carries the key (or none is needed); *key_hash: whose it is. */
static int srv_authorized(struct gw *gw, struct MHD_Connection *conn, uint64_t *key_hash)
{
	*key_hash = 0;
	if (!gw->opts.n_api_keys)
		return 1;
	const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
						       MHD_HTTP_HEADER_AUTHORIZATION);
	if (!auth || strncasecmp(auth, "Bearer ", 7))
		return 0;
	const char *given = auth + 7;
	while (*given == ' ')
		given++;
	/* Compare with every key in full: the time taken says nothing about the keys. */
	size_t gl = strlen(given);
	int found = 0;
	for (size_t k = 0; k < gw->opts.n_api_keys; k++) {
		const char *want = gw->opts.api_keys[k];
		size_t wl = strlen(want);
		unsigned char diff = gl != wl;
		for (size_t i = 0; i < wl; i++)
			diff |= (unsigned char)(want[i] ^ (i < gl ? given[i] : 0));
		if (!diff) {
			found = 1;
			*key_hash = srv_key_hash(want);
		}
	}
	return found;
}

/* ---- simple endpoints ------------------------------------------------------------------ */

static void srv_model_name(struct gw *gw, char *out, size_t len)
{
	pthread_mutex_lock(&gw->lock);
	snprintf(out, len, "%s", gw->model_name);
	pthread_mutex_unlock(&gw->lock);
}

static int srv_model_json(struct gw_buf *b, const char *name)
{
	gw_buf_puts(b, "{\"id\":");
	gw_json_string(b, name, strlen(name));
	return gw_buf_puts(b, ",\"object\":\"model\",\"created\":0,\"owned_by\":\"streamkv\"}");
}

static enum MHD_Result srv_models(struct srv_conn *sc, struct MHD_Connection *conn)
{
	char name[GW_MODEL_NAME_MAX];
	srv_model_name(sc->gw, name, sizeof(name));
	struct gw_buf b = { 0 };
	if (sc->route == SRV_MODEL) {
		if (strcmp(sc->path_arg, name)) {
			char msg[GW_MODEL_NAME_MAX + 64];
			snprintf(msg, sizeof(msg), "The model '%.128s' does not exist", sc->path_arg);
			return srv_error(sc, conn, 404, msg, "invalid_request_error", "model",
					 "model_not_found");
		}
		srv_model_json(&b, name);
	} else {
		gw_buf_puts(&b, "{\"object\":\"list\",\"data\":[");
		srv_model_json(&b, name);
		gw_buf_puts(&b, "]}");
	}
	gw_buf_puts(&b, "\n");
	enum MHD_Result r = srv_json(sc, conn, 200, &b);
	gw_buf_free(&b);
	return r;
}

static enum MHD_Result srv_health(struct srv_conn *sc, struct MHD_Connection *conn)
{
	struct gw *gw = sc->gw;
	uint64_t up = __atomic_load_n(&gw->count.daemon_up, __ATOMIC_RELAXED);
	uint64_t ready = __atomic_load_n(&gw->count.engines_ready, __ATOMIC_RELAXED);
	struct gw_buf b = { 0 };
	int draining = __atomic_load_n(&gw->draining, __ATOMIC_ACQUIRE);
	int ok = up && ready && !draining;
	gw_buf_printf(&b, "{\"status\":\"%s\",\"daemon\":%s,\"engines_ready\":%llu,"
		      "\"conversations\":%llu,\"node\":",
		      draining ? "draining" : ok ? "ok" : "unavailable", up ? "true" : "false",
		      (unsigned long long)ready,
		      (unsigned long long)__atomic_load_n(&gw->count.conversations,
							  __ATOMIC_RELAXED));
	gw_json_string(&b, gw->opts.node_name, strlen(gw->opts.node_name));
	gw_buf_puts(&b, "}\n");
	enum MHD_Result r = srv_json(sc, conn, ok ? 200 : 503, &b);
	gw_buf_free(&b);
	return r;
}

/* The gateway's own series, after the daemon's. */
static void srv_own_metrics(struct gw *gw, FILE *f)
{
	const struct gw_counters *c = &gw->count;
#define LOAD(x) ((unsigned long long)__atomic_load_n(&(x), __ATOMIC_RELAXED))
	fputs("# HELP skv_http_requests_total HTTP requests answered by skv-http, by status code "
	      "(code=\"other\": any other).\n# TYPE skv_http_requests_total counter\n", f);
	for (int i = 0; i < GW_STATUS_CODES; i++) {
		if (i == GW_STATUS_CODES - 2)
			continue;
		if (gw_status_codes[i])
			fprintf(f, "skv_http_requests_total{code=\"%d\"} %llu\n", gw_status_codes[i],
				LOAD(c->requests[i]));
		else
			fprintf(f, "skv_http_requests_total{code=\"other\"} %llu\n",
				LOAD(c->requests[i]));
	}
	static const struct {
		const char *name, *type, *help;
		size_t off;
	} series[] = {
		{ "skv_http_sse_streams", "gauge", "SSE answers being written.",
		  offsetof(struct gw_counters, active_streams) },
		{ "skv_http_requests_in_flight", "gauge", "Generation requests in progress.",
		  offsetof(struct gw_counters, active_jobs) },
		{ "skv_http_conversations", "gauge", "Open conversations.",
		  offsetof(struct gw_counters, conversations) },
		{ "skv_http_conversations_opened_total", "counter", "Conversations opened.",
		  offsetof(struct gw_counters, conversations_opened) },
		{ "skv_http_conversations_expired_total", "counter",
		  "Conversations closed by --conversation-idle.",
		  offsetof(struct gw_counters, conversations_expired) },
		{ "skv_http_completion_tokens_total", "counter", "Tokens generated for clients.",
		  offsetof(struct gw_counters, tokens) },
		{ "skv_http_prompt_tokens_total", "counter", "Prompt tokens fed.",
		  offsetof(struct gw_counters, prompt_tokens) },
		{ "skv_http_cancelled_total", "counter",
		  "Generations stopped because their client went away.",
		  offsetof(struct gw_counters, cancelled) },
		{ "skv_http_daemon_reconnects_total", "counter",
		  "Reconnections to skv-cached after losing it.",
		  offsetof(struct gw_counters, reconnects) },
		{ "skv_http_daemon_up", "gauge", "1 while skv-http is connected to skv-cached.",
		  offsetof(struct gw_counters, daemon_up) },
		{ "skv_http_conversations_moved_in_total", "counter",
		  "Conversations imported (PUT) or pulled from a peer.",
		  offsetof(struct gw_counters, conversations_moved_in) },
		{ "skv_http_conversations_moved_out_total", "counter",
		  "Conversations exported with release=1.",
		  offsetof(struct gw_counters, conversations_moved_out) },
		{ "skv_http_conversations_restored_total", "counter",
		  "Conversations restored from --snapshot-dir.",
		  offsetof(struct gw_counters, conversations_restored) },
		{ "skv_http_conversations_lost_total", "counter",
		  "Conversations whose stream was gone (410 conversation_lost).",
		  offsetof(struct gw_counters, conversations_lost) },
		{ "skv_http_conversations_reattached_total", "counter",
		  "Conversations attached again after a restart of skv-cached or skv-http.",
		  offsetof(struct gw_counters, conversations_reattached) },
		{ "skv_http_paused_streams", "gauge",
		  "Streams not read because their client reads slowly (backpressure).",
		  offsetof(struct gw_counters, paused_streams) },
	};
	for (size_t i = 0; i < sizeof(series) / sizeof(series[0]); i++) {
		uint64_t *v = (uint64_t *)((char *)&gw->count + series[i].off);
		fprintf(f, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", series[i].name, series[i].help,
			series[i].name, series[i].type, series[i].name, LOAD(*v));
	}
#undef LOAD
}

static void *srv_metrics_thread(void *arg)
{
	struct srv_metrics *m = arg;
	struct gw *gw = m->gw;
	FILE *f = open_memstream(&m->text, &m->len);
	if (f) {
		struct admin_conn ac = { .sock = -1 };
		struct admin_snapshot snap = { 0 };
		char msg[256];
		if (admin_connect(&ac, gw->opts.socket_path, msg, sizeof(msg)) == 0 &&
		    admin_fetch(&ac, ADMIN_WANT_ALL, &snap, msg, sizeof(msg)) == 0)
			admin_metrics_print(f, &snap);
		else
			fprintf(f, "# skv-cached is not reachable: %s\n", msg);
		admin_snapshot_free(&snap);
		admin_disconnect(&ac);
		srv_own_metrics(gw, f);
		fclose(f);
	}
	pthread_mutex_lock(&gw->lock);
	m->done = 1;
	pthread_mutex_unlock(&gw->lock);
	MHD_resume_connection(m->conn);
	return NULL;
}

static enum MHD_Result srv_metrics_start(struct srv_conn *sc, struct MHD_Connection *conn)
{
	struct srv_metrics *m = calloc(1, sizeof(*m));
	if (!m)
		return srv_error(sc, conn, 500, "out of memory", "server_error", NULL, NULL);
	m->gw = sc->gw;
	m->conn = conn;
	sc->metrics = m;
	MHD_suspend_connection(conn);
	pthread_t t;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int err = pthread_create(&t, &attr, srv_metrics_thread, m);
	pthread_attr_destroy(&attr);
	if (err) {
		pthread_mutex_lock(&sc->gw->lock);
		m->done = 1;
		pthread_mutex_unlock(&sc->gw->lock);
		MHD_resume_connection(conn);
	}
	return MHD_YES;
}

static enum MHD_Result srv_metrics_resumed(struct srv_conn *sc, struct MHD_Connection *conn)
{
	struct srv_metrics *m = sc->metrics;
	pthread_mutex_lock(&sc->gw->lock);
	int done = m->done;
	pthread_mutex_unlock(&sc->gw->lock);
	if (!done) {
		MHD_suspend_connection(conn);
		return MHD_YES;
	}
	if (!m->text)
		return srv_error(sc, conn, 500, "cannot build the metrics", "server_error", NULL,
				 NULL);
	return srv_queue(sc, conn, 200, m->text, m->len, "text/plain; version=0.0.4");
}

/* ---- generation ------------------------------------------------------------------------ */

static ssize_t srv_sse_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
	struct gw_job *j = cls;
	struct gw *gw = j->gw;
	(void)pos;
	pthread_mutex_lock(&gw->lock);
	size_t avail = j->out.len - j->out_off;
	if (avail) {
		size_t n = avail < max ? avail : max;
		memcpy(buf, j->out.data + j->out_off, n);
		j->out_off += n;
		int kick = j->paused && j->out.len - j->out_off <= GW_OUT_HIGH / 2;
		if (kick)
			j->paused = 0;
		pthread_mutex_unlock(&gw->lock);
		if (kick)
			gw_backend_kick(gw);
		return (ssize_t)n;
	}
	if (j->finished) {
		pthread_mutex_unlock(&gw->lock);
		return MHD_CONTENT_READER_END_OF_STREAM;
	}
	if (j->conn) {
		j->suspended = 1;
		MHD_suspend_connection(j->conn);
	}
	pthread_mutex_unlock(&gw->lock);
	return 0;
}

static void srv_sse_free(void *cls)
{
	struct gw_job *j = cls;
	gw_job_unref(j->gw, j);
}

static enum MHD_Result srv_job_resumed(struct srv_conn *sc, struct MHD_Connection *conn)
{
	struct gw *gw = sc->gw;
	struct gw_job *j = sc->job;
	pthread_mutex_lock(&gw->lock);
	int status = j->status, finished = j->finished;
	if (!status || (status == 200 && !j->req.stream && !finished) || sc->sse) {
		j->suspended = 1;
		MHD_suspend_connection(conn);
		pthread_mutex_unlock(&gw->lock);
		return MHD_YES;
	}
	if (status != 200 || !j->req.stream) {
		/* The whole body is there. */
		struct gw_buf body = { 0 };
		gw_buf_put(&body, j->out.data ? j->out.data : "", j->out.len);
		const char *type = j->content_type ? j->content_type : "application/json";
		pthread_mutex_unlock(&gw->lock);
		enum MHD_Result r = srv_queue(sc, conn, status, body.data, body.len, type);
		gw_buf_free(&body);
		return r;
	}
	j->refs++; /* the response's */
	pthread_mutex_unlock(&gw->lock);
	struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, SRV_SSE_BLOCK,
								   srv_sse_reader, j, srv_sse_free);
	if (!r) {
		gw_job_unref(gw, j);
		return MHD_NO;
	}
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
	MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
	if (j->req.conversation[0])
		MHD_add_response_header(r, "X-Conversation-Id", j->req.conversation);
	srv_headers(sc, r);
	enum MHD_Result ret = MHD_queue_response(conn, 200, r);
	MHD_destroy_response(r);
	sc->sse = 1;
	__atomic_add_fetch(&gw->count.active_streams, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&gw->count.requests[gw_status_index(200)], 1, __ATOMIC_RELAXED);
	return ret;
}

static struct gw_job *srv_job_new(struct gw *gw, uint64_t key_hash, struct MHD_Connection *conn)
{
	struct gw_job *j = calloc(1, sizeof(*j));
	if (!j)
		return NULL;
	j->gw = gw;
	j->key_hash = key_hash;
	j->conn = conn;
	j->refs = 2; /* the connection's and the backend's */
	j->created = (int64_t)time(NULL);
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	j->sock_fd = ci ? ci->connect_fd : -1;
	return j;
}

static void srv_job_hand_over(struct srv_conn *sc, struct MHD_Connection *conn, struct gw_job *j)
{
	struct gw *gw = sc->gw;
	uint64_t rnd = 0;
	if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != sizeof(rnd))
		rnd = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)j;
	snprintf(j->id, sizeof(j->id), "%s-%016llx", j->req.kind == GW_CHAT ? "chatcmpl" : "cmpl",
		 (unsigned long long)rnd);
	sc->job = j;
	pthread_mutex_lock(&gw->lock);
	j->suspended = 1;
	MHD_suspend_connection(conn);
	pthread_mutex_unlock(&gw->lock);
	gw_backend_submit(gw, j);
}

static enum MHD_Result srv_generate(struct srv_conn *sc, struct MHD_Connection *conn,
				    uint64_t key_hash)
{
	struct gw *gw = sc->gw;
	uint64_t active = __atomic_add_fetch(&gw->count.active_jobs, 1, __ATOMIC_RELAXED);
	struct gw_job *j = active > gw->opts.max_concurrent ? NULL : srv_job_new(gw, key_hash, conn);
	if (!j) {
		__atomic_sub_fetch(&gw->count.active_jobs, 1, __ATOMIC_RELAXED);
		char msg[128];
		snprintf(msg, sizeof(msg), "too many requests in progress (at most %u): retry later",
			 gw->opts.max_concurrent);
		return srv_error(sc, conn, active > gw->opts.max_concurrent ? 429 : 500, msg,
				 "rate_limit_error", NULL, "too_many_requests");
	}
	char model[GW_MODEL_NAME_MAX];
	srv_model_name(gw, model, sizeof(model));
	struct gw_buf err = { 0 };
	int status = gw_request_parse(&gw->opts, model, sc->route == SRV_CHAT ? GW_CHAT
									: GW_COMPLETION,
				      sc->body.data ? sc->body.data : "", sc->body.len, &j->req,
				      &err);
	const char *hdr = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Conversation-Id");
	if (!status && hdr && !j->req.conversation[0]) {
		if (gw_conv_id_valid(hdr))
			snprintf(j->req.conversation, sizeof(j->req.conversation), "%s", hdr);
		else
			status = 400, gw_error_body(&err, "X-Conversation-Id: not a valid id (1 to 128 "
						    "letters, digits and . _ : -)",
						    "invalid_request_error", "conversation", NULL);
	}
	if (status) {
		enum MHD_Result r = srv_json(sc, conn, status, &err);
		gw_buf_free(&err);
		j->refs = 1;
		gw_job_unref(gw, j);
		return r;
	}
	srv_job_hand_over(sc, conn, j);
	return MHD_YES;
}

static enum MHD_Result srv_delete(struct srv_conn *sc, struct MHD_Connection *conn,
				  uint64_t key_hash)
{
	if (!gw_conv_id_valid(sc->path_arg))
		return srv_error(sc, conn, 404, "no such conversation", "invalid_request_error", NULL,
				 "conversation_not_found");
	struct gw_job *j = srv_job_new(sc->gw, key_hash, conn);
	if (!j)
		return srv_error(sc, conn, 500, "out of memory", "server_error", NULL, NULL);
	j->req.kind = GW_DELETE;
	snprintf(j->req.conversation, sizeof(j->req.conversation), "%s", sc->path_arg);
	srv_job_hand_over(sc, conn, j);
	return MHD_YES;
}

/* GET /v1/conversations/ID/export[?release=1] and PUT /v1/conversations/ID: the backend does
 * the work (a worker thread the blocking part). */
static enum MHD_Result srv_move(struct srv_conn *sc, struct MHD_Connection *conn,
				uint64_t key_hash)
{
	int import = sc->route == SRV_CONV_IMPORT;
	const char *id = import ? sc->path_arg : sc->conv_id;
	if (!gw_conv_id_valid(id))
		return srv_error(sc, conn, 404, "no such conversation", "invalid_request_error", NULL,
				 "conversation_not_found");
	struct gw_job *j = srv_job_new(sc->gw, key_hash, conn);
	if (!j)
		return srv_error(sc, conn, 500, "out of memory", "server_error", NULL, NULL);
	j->req.kind = import ? GW_IMPORT : GW_EXPORT;
	j->by_peer = sc->by_peer;
	snprintf(j->req.conversation, sizeof(j->req.conversation), "%.*s", GW_CONV_ID_MAX, id);
	if (import) {
		j->upload = sc->body;
		memset(&sc->body, 0, sizeof(sc->body));
		/* A pull that failed here gives it back: a draining node takes that. */
		j->release = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
							 "X-Skv-Give-Back") != NULL;
	} else {
		const char *rel = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND,
							      "release");
		j->release = rel && (!strcmp(rel, "1") || !strcmp(rel, "true"));
	}
	srv_job_hand_over(sc, conn, j);
	return MHD_YES;
}

/* POST /admin/drain, /admin/undrain (SIGUSR1 drains too): while draining, /health answers 503
 * and new conversations are refused; the ones here go on and may be exported. */
static enum MHD_Result srv_drain(struct srv_conn *sc, struct MHD_Connection *conn)
{
	struct gw *gw = sc->gw;
	int on = sc->route == SRV_DRAIN;
	__atomic_store_n(&gw->draining, on, __ATOMIC_RELEASE);
	fprintf(stderr, "skv-http: %s (POST /admin/%s)\n", on ? "draining" : "no longer draining",
		on ? "drain" : "undrain");
	struct gw_buf b = { 0 };
	gw_buf_printf(&b, "{\"status\":\"%s\",\"conversations\":%llu,\"node\":",
		      on ? "draining" : "ok",
		      (unsigned long long)__atomic_load_n(&gw->count.conversations,
							  __ATOMIC_RELAXED));
	gw_json_string(&b, gw->opts.node_name, strlen(gw->opts.node_name));
	gw_buf_puts(&b, "}\n");
	enum MHD_Result r = srv_json(sc, conn, 200, &b);
	gw_buf_free(&b);
	return r;
}

/* ---- routing --------------------------------------------------------------------------- */

static enum srv_route srv_route_of(const char *url, const char *method, const char **arg,
				   const char **method_needed)
{
	static const struct {
		const char *path, *method;
		enum srv_route route;
	} fixed[] = {
		{ "/health", "GET", SRV_HEALTH },
		{ "/metrics", "GET", SRV_METRICS },
		{ "/v1/models", "GET", SRV_MODELS },
		{ "/v1/completions", "POST", SRV_COMPLETIONS },
		{ "/v1/chat/completions", "POST", SRV_CHAT },
		{ "/admin/drain", "POST", SRV_DRAIN },
		{ "/admin/undrain", "POST", SRV_UNDRAIN },
	};
	for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
		if (!strcmp(url, fixed[i].path)) {
			*method_needed = fixed[i].method;
			return fixed[i].route;
		}
	}
	if (!strncmp(url, "/v1/models/", 11) && url[11]) {
		*arg = url + 11;
		*method_needed = "GET";
		return SRV_MODEL;
	}
	if (!strncmp(url, "/v1/conversations/", 18) && url[18]) {
		*arg = url + 18;
		const char *slash = strchr(*arg, '/');
		if (slash && !strcmp(slash, "/export")) {
			*method_needed = "GET";
			return SRV_CONV_EXPORT;
		}
		if (slash)
			return SRV_UNKNOWN;
		int put = !strcmp(method, "PUT");
		*method_needed = put ? "PUT" : "DELETE";
		return put ? SRV_CONV_IMPORT : SRV_CONVERSATION;
	}
	return SRV_UNKNOWN;
}

static size_t srv_body_limit(const struct srv_conn *sc)
{
	return sc->route == SRV_CONV_IMPORT ? (size_t)GW_CONV_MAX_BYTES : sc->gw->opts.max_body;
}

static enum MHD_Result srv_access(void *cls, struct MHD_Connection *conn, const char *url,
				  const char *method, const char *version,
				  const char *upload_data, size_t *upload_data_size,
				  void **con_cls)
{
	struct gw *gw = cls;
	struct srv_conn *sc = *con_cls;
	(void)version;
	if (!sc) {
		sc = calloc(1, sizeof(*sc));
		if (!sc)
			return MHD_NO;
		sc->gw = gw;
		*con_cls = sc;
		const char *needed = NULL;
		sc->route = srv_route_of(url, method, &sc->path_arg, &needed);
		if (sc->route == SRV_CONV_EXPORT)
			snprintf(sc->conv_id, sizeof(sc->conv_id), "%.*s",
				 (int)(strchr(sc->path_arg, '/') - sc->path_arg), sc->path_arg);
		if (sc->route == SRV_UNKNOWN) {
			char msg[300];
			snprintf(msg, sizeof(msg), "Unknown request URL: %s %.200s", method, url);
			return srv_error(sc, conn, 404, msg, "invalid_request_error", NULL,
					 "unknown_url");
		}
		if (strcmp(method, needed)) {
			char msg[300];
			snprintf(msg, sizeof(msg), "%.200s takes %s, not %.16s", url, needed, method);
			return srv_error(sc, conn, 405, msg, "invalid_request_error", NULL,
					 "method_not_allowed");
		}
		uint64_t key_hash;
		int moving = sc->route == SRV_CONV_EXPORT || sc->route == SRV_CONV_IMPORT ||
			     sc->route == SRV_DRAIN || sc->route == SRV_UNDRAIN;
		if (moving ? !srv_peer_authorized(gw, conn, &key_hash, &sc->by_peer)
			   : sc->route != SRV_HEALTH && !srv_authorized(gw, conn, &key_hash))
			return srv_error(sc, conn, 401,
					 "Incorrect API key provided: send Authorization: Bearer "
					 "KEY",
					 "invalid_request_error", NULL, "invalid_api_key");
		const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
							     MHD_HTTP_HEADER_CONTENT_LENGTH);
		if (cl && strtoull(cl, NULL, 10) > srv_body_limit(sc))
			sc->too_big = 1;
		return MHD_YES;
	}
	if (*upload_data_size) {
		if (!sc->too_big && sc->body.len + *upload_data_size > srv_body_limit(sc))
			sc->too_big = 1;
		if (!sc->too_big && gw_buf_put(&sc->body, upload_data, *upload_data_size) < 0)
			return MHD_NO;
		*upload_data_size = 0;
		return MHD_YES;
	}
	if (sc->job)
		return srv_job_resumed(sc, conn);
	if (sc->metrics)
		return srv_metrics_resumed(sc, conn);
	if (sc->too_big) {
		char msg[128];
		snprintf(msg, sizeof(msg), "the body is larger than %zu bytes (%s)",
			 srv_body_limit(sc),
			 sc->route == SRV_CONV_IMPORT ? "a conversation's limit" : "--max-body");
		return srv_error(sc, conn, 413, msg, "invalid_request_error", NULL,
				 "request_too_large");
	}
	uint64_t key_hash;
	if (sc->route == SRV_CONV_EXPORT || sc->route == SRV_CONV_IMPORT)
		srv_peer_authorized(gw, conn, &key_hash, &sc->by_peer);
	else
		srv_authorized(gw, conn, &key_hash);
	switch (sc->route) {
	case SRV_HEALTH: return srv_health(sc, conn);
	case SRV_MODELS:
	case SRV_MODEL: return srv_models(sc, conn);
	case SRV_METRICS: return srv_metrics_start(sc, conn);
	case SRV_COMPLETIONS:
	case SRV_CHAT: return srv_generate(sc, conn, key_hash);
	case SRV_CONVERSATION: return srv_delete(sc, conn, key_hash);
	case SRV_CONV_EXPORT:
	case SRV_CONV_IMPORT: return srv_move(sc, conn, key_hash);
	case SRV_DRAIN:
	case SRV_UNDRAIN: return srv_drain(sc, conn);
	default: return MHD_NO;
	}
}

static void srv_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
			  enum MHD_RequestTerminationCode toe)
{
	struct gw *gw = cls;
	struct srv_conn *sc = *con_cls;
	(void)conn;
	(void)toe;
	if (!sc)
		return;
	if (sc->job) {
		struct gw_job *j = sc->job;
		pthread_mutex_lock(&gw->lock);
		j->conn = NULL;
		j->suspended = 0;
		int unfinished = !j->finished;
		pthread_mutex_unlock(&gw->lock);
		if (unfinished)
			gw_backend_cancel(gw, j);
		gw_job_unref(gw, j);
	}
	if (sc->sse)
		__atomic_sub_fetch(&gw->count.active_streams, 1, __ATOMIC_RELAXED);
	if (sc->metrics) {
		free(sc->metrics->text);
		free(sc->metrics);
	}
	gw_buf_free(&sc->body);
	free(sc);
	*con_cls = NULL;
}

void gw_server_resume(struct MHD_Connection *conn)
{
	MHD_resume_connection(conn);
}

int gw_server_start(struct gw *gw, struct MHD_Daemon **out, char *msg, size_t msg_len)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(gw->opts.listen_port) };
	struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6,
				     .sin6_port = htons(gw->opts.listen_port) };
	const struct sockaddr *sa = (const struct sockaddr *)&sin;
	unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME |
			 MHD_USE_ERROR_LOG;
	if (inet_pton(AF_INET, gw->opts.listen_host, &sin.sin_addr) != 1) {
		if (inet_pton(AF_INET6, gw->opts.listen_host, &sin6.sin6_addr) != 1) {
			snprintf(msg, msg_len, "--listen: '%s' is not an IPv4 or IPv6 address",
				 gw->opts.listen_host);
			return -EINVAL;
		}
		sa = (const struct sockaddr *)&sin6;
		flags |= MHD_USE_IPv6;
	}
	/* Every request may hold a connection; keep-alive ones wait a while for the next. */
	unsigned limit = gw->opts.max_concurrent * 2 + 64;
	struct MHD_Daemon *d = MHD_start_daemon(
		flags, gw->opts.listen_port, NULL, NULL, srv_access, gw, MHD_OPTION_SOCK_ADDR, sa,
		MHD_OPTION_NOTIFY_COMPLETED, srv_completed, gw, MHD_OPTION_CONNECTION_LIMIT, limit,
		MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600, MHD_OPTION_LISTEN_BACKLOG_SIZE,
		(unsigned)4096, MHD_OPTION_END);
	if (!d) {
		snprintf(msg, msg_len, "cannot listen on %s:%u: %s", gw->opts.listen_host,
			 gw->opts.listen_port, strerror(errno ? errno : EADDRINUSE));
		return -EADDRINUSE;
	}
	*out = d;
	return 0;
}
