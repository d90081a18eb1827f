/* The backend thread: one libskv connection to skv-cached carrying every stream of the gateway,
 * in event-loop mode (skv_client_fd, skv_client_wait with timeout 0).
 *
 * Each loop: (re)connect when needed (backoff 0.1 s doubling to 2 s), take new jobs from the
 * queue, act on connections that went away, read every stream that has events, expire idle
 * conversations, then sleep in poll on the client fd and the gateway's eventfd.
 *
 * A job's text goes out as it comes, except what may still turn into a stop sequence or
 * complete a UTF-8 character (held back until the next token decides). A streaming job whose
 * reader is slow (more than GW_OUT_HIGH bytes unsent) is paused: its stream is not read, its
 * output ring fills and the engine skips it (backpressure through libskv) while the others go
 * on. libskv's fd stays readable while a paused stream has unread events, so while some are
 * paused the loop sleeps on the eventfd alone for up to a millisecond and then reads the
 * others again: a slow reader costs the others at most that much latency, never throughput.
 *
 * A one-shot request's stream is closed when its answer is complete or its client leaves
 * (the daemon drops it at once). A conversation's stream stays open; a client leaving it
 * mid-answer cancels the answer (skv_client_stream_cancel), and the stream takes the next
 * request once the engine confirmed the cancel (DONE). */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "admin-conn.h"
#include "http-gw.h"
#include "skv-client.h"
#include "skv-error.h"

#define BACKEND_BUCKETS 4096
#define BACKEND_EVENTS_PER_TURN 64      /* events of one stream before the next one's */
#define BACKEND_PAUSED_POLL_MS 1
#define BACKEND_STATS_S 1.0
#define BACKEND_BACKOFF_MIN_S 0.1
#define BACKEND_BACKOFF_MAX_S 2.0
#define BACKEND_STARTS_PER_PASS 16      /* new requests started between reads */
#define BACKEND_WATCH_S 0.05            /* how often suspended clients are checked */
#define BACKEND_WATCH_MAX 4096          /* of them at once */

struct gw_conv;

struct gw_stream {
	skv_client_stream *s;
	struct gw_job *job;              /* the request being answered; NULL between requests */
	struct gw_conv *conv;            /* NULL: one-shot */
	int paused;
	uint64_t skip_ends;              /* requests from before an attach to read to their end */
	struct gw_stream *hash_next;
	struct gw_stream *prev, *next;   /* every stream */
};

/* A conversation's stream settings: those of its first request. */
struct gw_conv_settings {
	int policy;                      /* -1: the default */
	int64_t sinks, window;           /* -1: the default */
	double temperature, top_p;
	uint64_t seed;
};

struct gw_conv {
	char id[GW_CONV_ID_MAX + 1];
	uint64_t key_hash;
	struct gw_stream *st;
	double last_used;
	uint64_t fed_messages, fed_hash; /* chat: the messages the stream holds */
	struct gw_conv *next;
	/* Durable: the daemon's resumable stream, re-attached after a restart of either side. */
	char name[SKV_CLIENT_NAME_MAX];
	char token[SKV_CLIENT_TOKEN_MAX]; /* "": none yet (being moved in) */
	int lost;                        /* its stream is gone: 410 until DELETE or idle */
	char lost_why[256];
	struct gw_task *task;            /* an export, import or pull in progress: busy */
	struct gw_job *parked;           /* requests waiting for a --snapshot-dir copy */
	struct gw_conv_settings set;
};

struct gw_backend {
	struct gw *gw;
	skv_client *client;
	int client_fd;
	int lost_before;                 /* a connection was lost: count the next as reconnect */
	double next_connect, backoff, next_stats, next_expire, next_watch;
	struct gw_stream *buckets[BACKEND_BUCKETS];
	struct gw_stream *streams;
	struct gw_conv *convs;
	size_t n_convs;
	int paused_ready;                /* the last pass left paused streams with events */
	struct gw_buf scratch;
	uint64_t seed_counter;
	int reattach_due;                /* connected: attach conversations once engines run */
	int state_dirty;                 /* --state-dir: conversations.json is behind */
	unsigned tasks_running;          /* worker threads not taken back yet */
	double next_snapshot;            /* --snapshot-dir */
	uint64_t last_seed;              /* backend_open's */
	struct pollfd watch_fds[BACKEND_WATCH_MAX];         /* backend_watch's */
	struct gw_stream *watch_streams[BACKEND_WATCH_MAX];
	char tmpl_why[512];              /* --chat-template auto found no format: why */
};

static double backend_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void backend_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void backend_log(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("skv-http: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* ---- jobs ------------------------------------------------------------------------------ */

static void job_free(struct gw *gw, struct gw_job *j)
{
	if (j->req.kind == GW_COMPLETION || j->req.kind == GW_CHAT)
		__atomic_sub_fetch(&gw->count.active_jobs, 1, __ATOMIC_RELAXED);
	gw_buf_free(&j->upload);
	gw_request_free(&j->req);
	gw_buf_free(&j->out);
	gw_buf_free(&j->gen);
	gw_buf_free(&j->content);
	free(j);
}

void gw_job_unref(struct gw *gw, struct gw_job *j)
{
	pthread_mutex_lock(&gw->lock);
	int last = --j->refs == 0;
	pthread_mutex_unlock(&gw->lock);
	if (last)
		job_free(gw, j);
}

static void backend_wake(struct gw *gw)
{
	uint64_t one = 1;
	if (write(gw->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		backend_log("cannot wake the backend: %s", strerror(errno));
}

void gw_backend_submit(struct gw *gw, struct gw_job *j)
{
	pthread_mutex_lock(&gw->lock);
	j->queue_next = NULL;
	if (gw->queue_tail)
		gw->queue_tail->queue_next = j;
	else
		gw->queue_head = j;
	gw->queue_tail = j;
	pthread_mutex_unlock(&gw->lock);
	backend_wake(gw);
}

void gw_backend_cancel(struct gw *gw, struct gw_job *j)
{
	pthread_mutex_lock(&gw->lock);
	j->cancel = 1;
	pthread_mutex_unlock(&gw->lock);
	__atomic_store_n(&gw->cancel_pending, 1, __ATOMIC_RELEASE);
	backend_wake(gw);
}

void gw_backend_kick(struct gw *gw)
{
	backend_wake(gw);
}

/* Append bytes to the job's output and wake its connection if it waits. With pause, a reader
 * that left too much unread pauses the stream. */
static void job_output(struct gw_backend *b, struct gw_job *j, const char *data, size_t len,
		       int finished)
{
	struct gw *gw = b->gw;
	pthread_mutex_lock(&gw->lock);
	if (j->out_off && j->out_off == j->out.len) {
		j->out.len = 0;
		j->out_off = 0;
	}
	if (gw_buf_put(&j->out, data, len) < 0)
		finished = 1; /* out of memory: end the answer where it is */
	if (finished)
		j->finished = 1;
	if (j->req.stream && !j->finished && j->out.len - j->out_off > GW_OUT_HIGH)
		j->paused = 1;
	struct MHD_Connection *conn = j->suspended ? j->conn : NULL;
	j->suspended = 0;
	int paused = j->paused;
	pthread_mutex_unlock(&gw->lock);
	if (j->st)
		j->st->paused = paused;
	if (conn)
		gw_server_resume(conn);
}

/* Decide the status of a job that has not answered yet (or end a stream already under way with
 * an error event) and hand the body over. */
static void job_fail(struct gw_backend *b, struct gw_job *j, int status, const char *message,
		     const char *type, const char *code)
{
	struct gw *gw = b->gw;
	struct gw_buf body = { 0 };
	gw_error_body(&body, message, type, NULL, code);
	pthread_mutex_lock(&gw->lock);
	int started = j->status == 200;
	if (!started)
		j->status = status;
	pthread_mutex_unlock(&gw->lock);
	j->done = 1;
	if (started && j->req.stream) {
		/* Headers are gone: say it as an event, then end the stream. */
		struct gw_buf ev = { 0 };
		gw_buf_puts(&ev, "data: ");
		gw_buf_put(&ev, body.data, body.len - 1); /* without its newline */
		gw_buf_puts(&ev, "\n\ndata: [DONE]\n\n");
		job_output(b, j, ev.data, ev.len, 1);
		gw_buf_free(&ev);
	} else {
		if (started) {
			pthread_mutex_lock(&gw->lock);
			j->status = status;
			pthread_mutex_unlock(&gw->lock);
		}
		job_output(b, j, body.data, body.len, 1);
	}
	gw_buf_free(&body);
}

/* The job may start writing (streaming: the headers go out now). */
static void job_started(struct gw_backend *b, struct gw_job *j)
{
	struct gw *gw = b->gw;
	pthread_mutex_lock(&gw->lock);
	j->status = 200;
	struct MHD_Connection *conn = j->req.stream && j->suspended ? j->conn : NULL;
	if (conn)
		j->suspended = 0;
	pthread_mutex_unlock(&gw->lock);
	if (conn)
		gw_server_resume(conn);
}

/* Send text on: one SSE chunk, or into the non-streaming body. */
static void job_emit(struct gw_backend *b, struct gw_job *j, const char *text, size_t len)
{
	size_t before = j->content.len;
	gw_utf8_clean(&j->content, text, len);
	if (!j->req.stream)
		return;
	b->scratch.len = 0;
	gw_sse_chunk(&b->scratch, j, b->gw->model_name, j->content.data + before,
		     j->content.len - before, NULL);
	j->sent_role = 1;
	job_output(b, j, b->scratch.data, b->scratch.len, 0);
}

/* The longest k < stop length such that the last k bytes of text are the stop's first k. */
static size_t job_stop_overlap(const char *text, size_t len, const char *stop, size_t stop_len)
{
	size_t k = stop_len - 1 < len ? stop_len - 1 : len;
	for (; k; k--)
		if (!memcmp(text + len - k, stop, k))
			return k;
	return 0;
}

/* Emit what of gen is certain. old_len: gen's length before the latest token. final: the
 * request ended, emit the rest. Returns 1 when a stop sequence ended the answer. */
static int job_progress(struct gw_backend *b, struct gw_job *j, size_t old_len, int final)
{
	const char *g = j->gen.data ? j->gen.data : "";
	size_t len = j->gen.len;
	if (j->trim) {
		while (j->emitted < len && g[j->emitted] == ' ')
			j->emitted++;
		if (j->emitted < len)
			j->trim = 0;
	}
	size_t end = len, hold = 0;
	const char *match = NULL;
	for (int i = 0; i < j->req.n_stop; i++) {
		size_t sl = j->req.stop_len[i];
		size_t from = old_len >= sl - 1 ? old_len - (sl - 1) : 0;
		if (from < j->emitted)
			from = j->emitted;
		if (from < len) {
			const char *m = memmem(g + from, len - from, j->req.stop[i], sl);
			if (m && (!match || m < match))
				match = m;
		}
		size_t h = job_stop_overlap(g + j->emitted, len - j->emitted, j->req.stop[i], sl);
		if (h > hold)
			hold = h;
	}
	if (match) {
		end = (size_t)(match - g);
	} else if (!final) {
		end = len - hold;
		end = j->emitted + gw_utf8_complete(g + j->emitted, end - j->emitted);
	}
	if (end > j->emitted)
		job_emit(b, j, g + j->emitted, end - j->emitted);
	j->emitted = end > j->emitted ? end : j->emitted;
	return match != NULL;
}

/* The answer is complete: the last chunk or the whole body. */
static void job_complete(struct gw_backend *b, struct gw_job *j, const char *finish_reason)
{
	j->done = 1;
	j->finish_reason = finish_reason;
	b->scratch.len = 0;
	if (j->req.stream) {
		gw_sse_chunk(&b->scratch, j, b->gw->model_name, "", 0, finish_reason);
		gw_sse_end(&b->scratch, j, b->gw->model_name);
	} else {
		gw_response_body(&b->scratch, j, b->gw->model_name);
	}
	job_output(b, j, b->scratch.data, b->scratch.len, 1);
}

/* ---- streams and conversations --------------------------------------------------------- */

static size_t backend_bucket(const skv_client_stream *s)
{
	return ((uintptr_t)s >> 6) % BACKEND_BUCKETS;
}

static struct gw_stream *backend_lookup(struct gw_backend *b, const skv_client_stream *s)
{
	for (struct gw_stream *st = b->buckets[backend_bucket(s)]; st; st = st->hash_next)
		if (st->s == s)
			return st;
	return NULL;
}

static struct gw_stream *backend_stream_add(struct gw_backend *b, skv_client_stream *s)
{
	struct gw_stream *st = calloc(1, sizeof(*st));
	if (!st)
		return NULL;
	st->s = s;
	size_t k = backend_bucket(s);
	st->hash_next = b->buckets[k];
	b->buckets[k] = st;
	st->next = b->streams;
	if (b->streams)
		b->streams->prev = st;
	b->streams = st;
	return st;
}

/* Forget the stream here; its handle stays libskv's (freed with the connection). */
static void backend_stream_unlink(struct gw_backend *b, struct gw_stream *st)
{
	struct gw_stream **pp = &b->buckets[backend_bucket(st->s)];
	while (*pp != st)
		pp = &(*pp)->hash_next;
	*pp = st->hash_next;
	if (st->prev)
		st->prev->next = st->next;
	else
		b->streams = st->next;
	if (st->next)
		st->next->prev = st->prev;
	free(st);
}

/* Close the stream (the daemon frees its KV) and forget it. */
static void backend_stream_close(struct gw_backend *b, struct gw_stream *st)
{
	skv_client_stream *s = st->s;
	backend_stream_unlink(b, st);
	skv_client_stream_close(s);
}

static struct gw_conv *backend_conv_find(struct gw_backend *b, const char *id)
{
	for (struct gw_conv *c = b->convs; c; c = c->next)
		if (!strcmp(c->id, id))
			return c;
	return NULL;
}

static void backend_conv_free(struct gw_backend *b, struct gw_conv *conv)
{
	struct gw_conv **pp = &b->convs;
	while (*pp != conv)
		pp = &(*pp)->next;
	*pp = conv->next;
	if (conv->st) {
		conv->st->conv = NULL;
		backend_stream_close(b, conv->st);
	}
	free(conv);
	b->n_convs--;
	b->state_dirty = 1;
	__atomic_store_n(&b->gw->count.conversations, b->n_convs, __ATOMIC_RELAXED);
}

/* --snapshot-dir: a conversation that ends for good takes its file with it (else a later
 * request under its id would bring it back). */
static void backend_conv_unlink_file(struct gw_backend *b, const char *id)
{
	char path[4200];
	if (b->gw->opts.snapshot_dir &&
	    snprintf(path, sizeof(path), "%s/%s.skvconv", b->gw->opts.snapshot_dir, id) <
		    (int)sizeof(path))
		unlink(path);
}

static struct gw_conv *backend_conv_new(struct gw_backend *b, const char *id, uint64_t key_hash)
{
	struct gw_conv *conv = calloc(1, sizeof(*conv));
	if (!conv)
		return NULL;
	snprintf(conv->id, sizeof(conv->id), "%s", id);
	conv->key_hash = key_hash;
	conv->fed_hash = GW_FNV_SEED;
	conv->last_used = backend_now();
	conv->set.policy = -1;
	conv->set.sinks = conv->set.window = -1;
	conv->next = b->convs;
	b->convs = conv;
	b->n_convs++;
	__atomic_store_n(&b->gw->count.conversations, b->n_convs, __ATOMIC_RELAXED);
	return conv;
}

/* Its stream is gone (the daemon lost it, its engine died): the conversation answers 410 from
 * now on instead of starting a new stream under the client's feet. */
static void backend_conv_lose(struct gw_backend *b, struct gw_conv *conv, const char *why)
{
	if (conv->st) {
		conv->st->conv = NULL;
		backend_stream_close(b, conv->st);
		conv->st = NULL;
	}
	conv->lost = 1;
	snprintf(conv->lost_why, sizeof(conv->lost_why), "%.*s", (int)sizeof(conv->lost_why) - 1,
		 why);
	b->state_dirty = 1;
	__atomic_add_fetch(&b->gw->count.conversations_lost, 1, __ATOMIC_RELAXED);
	backend_log("conversation %s is lost: %s", conv->id, why);
}

static uint64_t backend_hash(uint64_t h, const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 1099511628211ull;
	}
	return h;
}

static uint64_t backend_hash_message(uint64_t h, const char *role, const char *content,
				     size_t len)
{
	h = backend_hash(h, role, strlen(role));
	h = backend_hash(h, "\x1f", 1);
	h = backend_hash(h, content, len);
	return backend_hash(h, "\x1e", 1);
}

#define BACKEND_HASH_SEED 14695981039346656037ull

/* The request on st is over in the engine (DONE or ERROR read, or the stream failed). */
static void backend_request_over(struct gw_backend *b, struct gw_stream *st)
{
	struct gw_job *j = st->job;
	st->job = NULL;
	st->paused = 0;
	if (j) {
		if (st->conv && j->req.kind == GW_CHAT && !j->cancel && !j->stopped)
			st->conv->fed_hash = backend_hash_message(
				st->conv->fed_hash, "assistant",
				j->content.data ? j->content.data : "", j->content.len);
		if (st->conv)
			st->conv->fed_messages += j->req.kind == GW_CHAT;
		b->state_dirty |= st->conv != NULL;
		j->st = NULL;
		gw_job_unref(b->gw, j);
	}
	if (st->conv)
		st->conv->last_used = backend_now();
	else
		backend_stream_close(b, st);
}

/* The answer is complete before the engine ended the request (a stop sequence, a client that
 * left): a one-shot stream is closed now, a conversation's request is cancelled. */
static void backend_cut_short(struct gw_backend *b, struct gw_stream *st)
{
	if (!st->conv) {
		backend_request_over(b, st);
		return;
	}
	if (skv_client_stream_cancel(st->s) < 0) {
		struct gw_conv *conv = st->conv;
		char why[300];
		snprintf(why, sizeof(why), "cannot cancel on its stream: %s",
			 skv_client_last_error(b->client));
		backend_request_over(b, st);
		backend_conv_lose(b, conv, why);
	}
}

static void backend_state_flush(struct gw_backend *b);

static void backend_event(struct gw_backend *b, struct gw_stream *st,
			  const struct skv_client_event *ev)
{
	struct gw_job *j = st->job;
	struct gw *gw = b->gw;
	if (st->skip_ends) {
		/* A request of the stream's previous connection: read to its end, unseen. */
		st->skip_ends -= ev->type == SKV_CLIENT_EV_DONE || ev->type == SKV_CLIENT_EV_ERROR ||
				 ev->type == SKV_CLIENT_EV_SCORED;
		return;
	}
	switch (ev->type) {
	case SKV_CLIENT_EV_PROMPT:
		if (!j)
			break;
		j->prompt_tokens++;
		__atomic_add_fetch(&gw->count.prompt_tokens, 1, __ATOMIC_RELAXED);
		if (j->req.echo && !j->done) {
			size_t old = j->gen.len;
			gw_buf_put(&j->gen, ev->text, ev->len);
			job_progress(b, j, old, 0);
		}
		break;
	case SKV_CLIENT_EV_TOKEN:
		if (!j || j->done)
			break;
		j->completion_tokens++;
		__atomic_add_fetch(&gw->count.tokens, 1, __ATOMIC_RELAXED);
		size_t old = j->gen.len;
		gw_buf_put(&j->gen, ev->text, ev->len);
		if (job_progress(b, j, old, 0)) {
			j->stopped = 1;
			job_complete(b, j, "stop");
			backend_cut_short(b, st);
		}
		break;
	case SKV_CLIENT_EV_DONE:
		if (j && !j->done) {
			job_progress(b, j, j->gen.len, 1);
			const char *reason = ev->reason == SKV_CLIENT_DONE_LENGTH ? "length" : "stop";
			if (st->conv && gw->opts.state_dir) {
				/* --state-dir: the conversation's new state is on disk before its
				 * client sees the answer (a kill -9 right after loses nothing). */
				pthread_mutex_lock(&gw->lock);
				j->refs++;
				pthread_mutex_unlock(&gw->lock);
				backend_request_over(b, st);
				backend_state_flush(b);
				job_complete(b, j, reason);
				gw_job_unref(gw, j);
				break;
			}
			job_complete(b, j, reason);
		}
		backend_request_over(b, st);
		break;
	case SKV_CLIENT_EV_ERROR:
		if (j && !j->done) {
			char msg[512];
			snprintf(msg, sizeof(msg), "the engine refused the request: %.*s",
				 (int)ev->len, ev->text);
			job_fail(b, j, 500, msg, "server_error", NULL);
		}
		backend_request_over(b, st);
		break;
	default:
		break;
	}
}

/* ---- the connection to the daemon -------------------------------------------------------- */

static void backend_reattach(struct gw_backend *b);

/* Everything on the lost connection fails; conversations end with it. */
static void backend_lost(struct gw_backend *b, const char *why)
{
	backend_log("lost skv-cached at %s: %s; reconnecting", b->gw->opts.socket_path, why);
	while (b->streams) {
		struct gw_stream *st = b->streams;
		if (st->job && !st->job->done)
			job_fail(b, st->job, 503, "skv-cached went away in the middle of the request",
				 "server_error", "service_unavailable");
		struct gw_conv *conv = st->conv;
		backend_request_over(b, st);
		if (conv && conv->token[0]) {
			/* Resumable: the daemon may bring it back (--state-dir); attached again
			 * by name and token at the next connection. */
			backend_stream_unlink(b, st);
			conv->st = NULL;
		} else if (conv) {
			backend_conv_free(b, conv);
		}
	}
	skv_client_disconnect(b->client);
	b->client = NULL;
	b->reattach_due = 0;
	b->lost_before = 1;
	b->backoff = BACKEND_BACKOFF_MIN_S;
	b->next_connect = backend_now() + b->backoff;
	__atomic_store_n(&b->gw->count.daemon_up, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&b->gw->count.engines_ready, 0, __ATOMIC_RELAXED);
}

/* The model's name, when the operator did not give one: its file name without extension. */
static void backend_model_name(struct gw_backend *b)
{
	struct gw *gw = b->gw;
	if (gw->opts.model_name)
		return;
	struct admin_conn ac = { .sock = -1 };
	char msg[256];
	if (admin_connect(&ac, gw->opts.socket_path, msg, sizeof(msg)) < 0)
		return;
	const char *base = strrchr(ac.model_path, '/');
	base = base ? base + 1 : ac.model_path;
	char name[GW_MODEL_NAME_MAX];
	snprintf(name, sizeof(name), "%.*s", GW_MODEL_NAME_MAX - 1, base);
	char *dot = strrchr(name, '.');
	if (dot && dot != name)
		*dot = '\0';
	if (name[0]) {
		pthread_mutex_lock(&gw->lock);
		snprintf(gw->model_name, sizeof(gw->model_name), "%s", name);
		pthread_mutex_unlock(&gw->lock);
	}
	admin_disconnect(&ac);
}

/* --chat-template auto: the format the daemon's model names, looked up at each connection (a
 * restarted daemon may serve another model). Only this thread reads opts.tmpl. */
static void backend_pick_template(struct gw_backend *b)
{
	struct gw *gw = b->gw;
	if (!gw->opts.tmpl_auto)
		return;
	struct admin_conn ac = { .sock = -1 };
	char path[sizeof(ac.model_path) + 32];
	gw->opts.tmpl = NULL;
	if (admin_connect(&ac, gw->opts.socket_path, b->tmpl_why, sizeof(b->tmpl_why)) < 0)
		return;
	/* The daemon's paths are relative to its own working directory. */
	if (ac.model_path[0] != '/' && ac.daemon_pid > 0)
		snprintf(path, sizeof(path), "/proc/%d/cwd/%s", (int)ac.daemon_pid, ac.model_path);
	else
		snprintf(path, sizeof(path), "%s", ac.model_path);
	admin_disconnect(&ac);
	if (gw_template_auto(path, &gw->opts.tmpl, b->tmpl_why, sizeof(b->tmpl_why)) < 0)
		backend_log("%s", b->tmpl_why);
	else
		backend_log("chat template %s (--chat-template auto)",
			    gw_template_name(gw->opts.tmpl));
}

static void backend_connect(struct gw_backend *b)
{
	char why[512] = "";
	int err = skv_client_connect(b->gw->opts.socket_path, &b->client, why, sizeof(why));
	if (err == 0) {
		b->client_fd = skv_client_fd(b->client);
		if (b->client_fd < 0) {
			snprintf(why, sizeof(why), "%s", skv_client_last_error(b->client));
			skv_client_disconnect(b->client);
			b->client = NULL;
			err = -EIO;
		}
	}
	if (err < 0) {
		if (b->backoff <= BACKEND_BACKOFF_MIN_S)
			backend_log("%s (retrying)", why);
		b->backoff = b->backoff * 2 > BACKEND_BACKOFF_MAX_S ? BACKEND_BACKOFF_MAX_S
								      : b->backoff * 2;
		if (b->backoff < BACKEND_BACKOFF_MIN_S)
			b->backoff = BACKEND_BACKOFF_MIN_S;
		b->next_connect = backend_now() + b->backoff;
		return;
	}
	backend_log("connected to skv-cached at %s", b->gw->opts.socket_path);
	if (b->lost_before)
		__atomic_add_fetch(&b->gw->count.reconnects, 1, __ATOMIC_RELAXED);
	b->backoff = 0;
	b->reattach_due = 1;
	__atomic_store_n(&b->gw->count.daemon_up, 1, __ATOMIC_RELAXED);
	backend_model_name(b);
	backend_pick_template(b);
	b->next_stats = 0;
}

static void backend_stats(struct gw_backend *b)
{
	struct skv_client_stats st;
	int err = skv_client_stats(b->client, &st);
	b->next_stats = backend_now() + BACKEND_STATS_S;
	if (err == -EPIPE) {
		backend_lost(b, skv_client_last_error(b->client));
		return;
	}
	if (err == 0 && b->reattach_due && st.engines_ready)
		backend_reattach(b);
	/* /health says ok only once the conversations are back. */
	if (err == 0 && b->client && !b->reattach_due)
		__atomic_store_n(&b->gw->count.engines_ready, st.engines_ready, __ATOMIC_RELAXED);
}

static void backend_start(struct gw_backend *b, struct gw_job *j);

/* ---- durable conversations: name -> token, re-attached after restarts ------------------- */

/* The daemon's name of a conversation's stream: "conv-ID" when the id fits a stream name (at
 * most 63 of A-Z a-z 0-9 . _ -), else "conv_" and 32 hexadecimal digits of a 128-bit hash of
 * the id (two FNV-1a passes). The prefixes differ, so the two forms never meet. */
static void backend_stream_name(const char *id, char *out, size_t len)
{
	size_t n = strlen(id);
	if (n + 5 < SKV_CLIENT_NAME_MAX && !strchr(id, ':')) {
		snprintf(out, len, "conv-%s", id);
		return;
	}
	uint64_t h1 = gw_fnv64(GW_FNV_SEED, id, n);
	uint64_t h2 = gw_fnv64(h1 ^ 0x9e3779b97f4a7c15ull, id, n);
	snprintf(out, len, "conv_%016llx%016llx", (unsigned long long)h1, (unsigned long long)h2);
}

static struct gw_stream *backend_conv_attach(struct gw_backend *b, struct gw_conv *conv,
					     int *err_out)
{
	skv_client_stream *s;
	int err = skv_client_stream_attach(b->client, conv->name, conv->token, &s);
	*err_out = err;
	if (err < 0)
		return NULL;
	struct gw_stream *st = backend_stream_add(b, s);
	if (!st) {
		skv_client_stream_detach(s);
		*err_out = -ENOMEM;
		return NULL;
	}
	st->conv = conv;
	conv->st = st;
	/* A request the previous connection left running: cancel it and read it to its end. */
	uint64_t pending = skv_client_stream_pending(s);
	if (pending && skv_client_stream_cancel(s) == 0)
		st->skip_ends = pending;
	conv->last_used = backend_now();
	return st;
}

/* Connected, and the daemon has engines (so it restored its --state-dir): every conversation
 * without a stream is attached again by name and token, or lost with the reason. */
static void backend_reattach(struct gw_backend *b)
{
	b->reattach_due = 0;
	unsigned back = 0, lost = 0;
	for (struct gw_conv *conv = b->convs; conv && b->client; conv = conv->next) {
		if (conv->st || conv->lost || conv->task || !conv->token[0])
			continue;
		int err;
		if (backend_conv_attach(b, conv, &err)) {
			back++;
			continue;
		}
		if (err == -EPIPE) {
			backend_lost(b, skv_client_last_error(b->client));
			return;
		}
		char why[400];
		if (err == -ENOENT)
			snprintf(why, sizeof(why), "skv-cached no longer holds its stream %s (it "
				 "restarted without --state-dir, or the stream timed out detached)",
				 conv->name);
		else
			snprintf(why, sizeof(why), "cannot attach its stream %s again: %s",
				 conv->name, skv_client_last_error(b->client));
		backend_conv_lose(b, conv, why);
		lost++;
	}
	if (back || lost)
		backend_log("re-attached %u conversation(s)%s", back, lost ? "; some lost" : "");
	__atomic_add_fetch(&b->gw->count.conversations_reattached, back, __ATOMIC_RELAXED);
	b->state_dirty |= back > 0;
}

static void backend_conv_json_common(struct gw_backend *b, const struct gw_conv *c, json_t *o)
{
	char hex[24];
	(void)b;
	json_object_set_new(o, "id", json_string(c->id));
	json_object_set_new(o, "messages", json_integer((json_int_t)c->fed_messages));
	snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)c->fed_hash);
	json_object_set_new(o, "fed_hash", json_string(hex));
	snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)c->key_hash);
	json_object_set_new(o, "key_hash", json_string(hex));
	json_object_set_new(o, "settings",
			    json_pack("{s:i,s:I,s:I,s:f,s:f,s:I}", "policy", c->set.policy, "sinks",
				      (json_int_t)c->set.sinks, "window", (json_int_t)c->set.window,
				      "temperature", c->set.temperature, "top_p", c->set.top_p,
				      "seed", (json_int_t)c->set.seed));
}

static int backend_hex64(json_t *v, uint64_t *out)
{
	const char *s = json_string_value(v);
	char *end;
	if (!s || strlen(s) != 16)
		return -1;
	*out = strtoull(s, &end, 16);
	return *end ? -1 : 0;
}

/* The conversation fields of a JSON state (export or --state-dir) into c. -1: malformed. */
static int backend_conv_from_json(struct gw_conv *c, json_t *o)
{
	json_t *m = json_object_get(o, "messages"), *set = json_object_get(o, "settings");
	if (!json_is_integer(m) || json_integer_value(m) < 0 ||
	    backend_hex64(json_object_get(o, "fed_hash"), &c->fed_hash) < 0 ||
	    backend_hex64(json_object_get(o, "key_hash"), &c->key_hash) < 0 ||
	    !json_is_object(set))
		return -1;
	c->fed_messages = (uint64_t)json_integer_value(m);
	c->set.policy = (int)json_integer_value(json_object_get(set, "policy"));
	c->set.sinks = json_integer_value(json_object_get(set, "sinks"));
	c->set.window = json_integer_value(json_object_get(set, "window"));
	c->set.temperature = json_number_value(json_object_get(set, "temperature"));
	c->set.top_p = json_number_value(json_object_get(set, "top_p"));
	c->set.seed = (uint64_t)json_integer_value(json_object_get(set, "seed"));
	return 0;
}

/* --state-dir: conversations.json holds every conversation's name and token (0600), written
 * after each pass of the loop that changed one, so a restarted skv-http attaches them again. */
static void backend_state_flush(struct gw_backend *b)
{
	if (!b->state_dirty || !b->gw->opts.state_dir)
		return;
	b->state_dirty = 0;
	json_t *list = json_array();
	for (const struct gw_conv *c = b->convs; c; c = c->next) {
		if (!c->token[0] && !c->lost)
			continue; /* being moved in */
		json_t *o = json_object();
		backend_conv_json_common(b, c, o);
		json_object_set_new(o, "name", json_string(c->name));
		json_object_set_new(o, "token", json_string(c->token));
		if (c->lost)
			json_object_set_new(o, "lost", json_string(c->lost_why));
		json_array_append_new(list, o);
	}
	json_t *root = json_pack("{s:s,s:i,s:o}", "format", "skv-http-conversations", "version", 1,
				 "conversations", list);
	char *text = json_dumps(root, JSON_COMPACT);
	json_decref(root);
	char msg[600];
	if (!text || gw_state_save(b->gw->opts.state_dir, text, strlen(text), msg,
				   sizeof(msg)) < 0) {
		backend_log("--state-dir: %s", text ? msg : "out of memory");
		b->state_dirty = 1;
	}
	free(text);
}

static void backend_state_load(struct gw_backend *b)
{
	const char *dir = b->gw->opts.state_dir;
	if (!dir)
		return;
	char msg[600];
	json_t *root = gw_state_load(dir, msg, sizeof(msg));
	if (!root) {
		if (msg[0])
			backend_log("--state-dir: %s; starting without its conversations", msg);
		return;
	}
	size_t i, n = 0;
	json_t *o;
	json_array_foreach(json_object_get(root, "conversations"), i, o) {
		const char *id = json_string_value(json_object_get(o, "id"));
		const char *name = json_string_value(json_object_get(o, "name"));
		const char *token = json_string_value(json_object_get(o, "token"));
		const char *lost = json_string_value(json_object_get(o, "lost"));
		if (!id || !gw_conv_id_valid(id) || !name || !token || backend_conv_find(b, id) ||
		    strlen(name) >= SKV_CLIENT_NAME_MAX || strlen(token) >= SKV_CLIENT_TOKEN_MAX)
			continue;
		struct gw_conv *c = backend_conv_new(b, id, 0);
		if (!c)
			break;
		snprintf(c->name, sizeof(c->name), "%s", name);
		snprintf(c->token, sizeof(c->token), "%s", token);
		if (backend_conv_from_json(c, o) < 0 || (!lost && !c->token[0]))
			lost = "its entry in --state-dir is malformed";
		if (lost) {
			c->lost = 1;
			snprintf(c->lost_why, sizeof(c->lost_why), "%s", lost);
		}
		n++;
	}
	json_decref(root);
	backend_log("--state-dir %s: %zu conversation(s) to attach again", dir, n);
}

/* ---- moving conversations: export, import, pull from a peer ------------------------------ */

enum task_kind { TASK_EXPORT = 1, TASK_IMPORT, TASK_PULL, TASK_SNAPSHOT };

/* One blocking piece of work (an admin round trip, a peer's HTTP transfer) on a thread of its
 * own; the backend keeps the conversation busy (conv->task) until it takes the result back
 * from gw->tasks_done. The worker reads only what is copied into the task. */
struct gw_task {
	enum task_kind kind;
	struct gw *gw;
	struct gw_job *job;             /* NULL for --snapshot-dir exports */
	struct gw_conv *conv;           /* the backend's; not touched by the worker */
	char id[GW_CONV_ID_MAX + 1];
	char model[GW_MODEL_NAME_MAX], tmpl[64];
	uint64_t key_hash;
	int check_key;
	uint64_t stream_id;             /* export */
	struct gw_buf state_text;       /* export: the JSON state */
	const char *snap;               /* import: the whole body (job->upload) */
	size_t snap_len;
	/* results */
	int status;
	char msg[768];
	struct gw_buf body;             /* export: the whole body */
	json_t *state;                  /* import, pull */
	char name[SKV_CLIENT_NAME_MAX], token[SKV_CLIENT_TOKEN_MAX];
	char from[GW_NODE_NAME_MAX];
	char lost_why[256];             /* pull: of a conversation lost here */
	int from_file;                  /* pull: restored from --snapshot-dir */
	int64_t age_s;                  /* its age */
	struct gw_task *next;
};

static void task_free(struct gw_task *t)
{
	gw_buf_free(&t->state_text);
	gw_buf_free(&t->body);
	json_decref(t->state);
	free(t);
}

/* The state of another node is ours to take: the same conversation, model and template. */
static int task_check_state(struct gw_task *t, json_t *state)
{
	const char *id = json_string_value(json_object_get(state, "id"));
	const char *model = json_string_value(json_object_get(state, "model"));
	const char *tmpl = json_string_value(json_object_get(state, "template"));
	struct gw_conv probe;
	memset(&probe, 0, sizeof(probe));
	if (!id || !model || !tmpl || backend_conv_from_json(&probe, state) < 0) {
		snprintf(t->msg, sizeof(t->msg), "corrupted conversation: its state lacks id, model, "
			 "template, messages, fed_hash, key_hash or settings");
		return 400;
	}
	if (strcmp(id, t->id)) {
		snprintf(t->msg, sizeof(t->msg), "the body holds conversation '%.128s', not '%s'", id,
			 t->id);
		return 400;
	}
	if (strcmp(model, t->model)) {
		snprintf(t->msg, sizeof(t->msg), "a conversation of model '%.128s': this gateway "
			 "serves '%s'", model, t->model);
		return 422;
	}
	if (strcmp(tmpl, t->tmpl)) {
		snprintf(t->msg, sizeof(t->msg), "a conversation rendered with chat template "
			 "'%.60s': this gateway uses '%s'", tmpl, t->tmpl);
		return 422;
	}
	if (t->check_key && probe.key_hash != t->key_hash) {
		snprintf(t->msg, sizeof(t->msg), "conversation '%s' belongs to another API key",
			 t->id);
		return 422;
	}
	return 0;
}

/* Unpack, check and restore a body into the daemon: 200, or the status with t->msg. */
static int task_restore(struct gw_task *t, const char *body, size_t len)
{
	const char *snap;
	size_t snap_len;
	json_t *state;
	int status = gw_conv_unpack(body, len, &state, &snap, &snap_len, t->msg, sizeof(t->msg));
	if (status)
		return status;
	status = task_check_state(t, state);
	if (status) {
		json_decref(state);
		return status;
	}
	char why[512];
	int err = gw_move_restore(t->gw->opts.socket_path, snap, snap_len, t->name,
				  sizeof(t->name), t->token, sizeof(t->token), why, sizeof(why));
	if (err < 0) {
		json_decref(state);
		snprintf(t->msg, sizeof(t->msg), "skv-cached refused the conversation's snapshot: %s",
			 why);
		return err == -EEXIST   ? 409
		       : err == -EACCES ? 500
		       : err == -ENOENT || err == -ECONNREFUSED || err == -EPIPE ||
				 err == -ETIMEDOUT
			       ? 503
			       : 422;
	}
	const char *from = json_string_value(json_object_get(state, "node"));
	if (!t->from[0])
		snprintf(t->from, sizeof(t->from), "%s", from ? from : "");
	t->state = state;
	return 200;
}

static void task_export(struct gw_task *t)
{
	int fd;
	char why[512];
	int err = gw_move_snapshot(t->gw->opts.socket_path, t->stream_id, &fd, why, sizeof(why));
	if (err < 0) {
		t->status = 503;
		snprintf(t->msg, sizeof(t->msg), "skv-cached could not snapshot the conversation's "
			 "stream: %s", why);
		return;
	}
	err = gw_conv_pack(&t->body, t->state_text.data, t->state_text.len, fd);
	close(fd);
	t->status = err < 0 ? 500 : 200;
	if (err < 0)
		snprintf(t->msg, sizeof(t->msg), "cannot read the snapshot: %s", strerror(-err));
}

static int backend_snapshot_file(const struct gw *gw, const char *id, char *path, size_t len,
				 const char *suffix)
{
	return snprintf(path, len, "%s/%s.skvconv%s", gw->opts.snapshot_dir, id, suffix) <
	       (int)len ? 0 : -ENAMETOOLONG;
}

/* Ask every peer for the conversation (export?release=1), then --snapshot-dir. status 200:
 * restored here; 404: nobody has it (a new conversation); else why not. */
static void task_pull(struct gw_task *t)
{
	struct gw *gw = t->gw;
	int busy = 0, gone = 0;
	char other[768] = "";
	struct gw_buf body = { 0 };
	for (size_t i = 0; i < gw->opts.n_peers; i++) {
		char node[GW_NODE_NAME_MAX], msg[768] = "";
		int status = gw_peer_fetch(gw->opts.peers[i], t->id, gw->opts.peer_key,
					   &gw->stopping, &body, node, sizeof(node), msg,
					   sizeof(msg));
		if (!strcmp(node, gw->opts.node_name))
			continue; /* ourselves, listed among the peers */
		if (status == 200) {
			snprintf(t->from, sizeof(t->from), "%s", node);
			t->status = task_restore(t, body.data, body.len);
			if (t->status != 200) {
				/* The peer let it go: give it back, and say where it went wrong. */
				char inner[768], back[768] = "";
				snprintf(inner, sizeof(inner), "%s", t->msg);
				int put = gw_peer_put(gw->opts.peers[i], t->id, gw->opts.peer_key,
						      body.data, body.len, back, sizeof(back));
				snprintf(t->msg, sizeof(t->msg), "conversation '%s' came from %.100s "
					 "but could not be taken here: %.300s (%s%.200s)", t->id,
					 node[0] ? node : gw->opts.peers[i], inner,
					 put == 200 ? "given back to it" : "not given back: ",
					 put == 200 ? "" : back);
				json_decref(t->state);
				t->state = NULL;
				if (t->status != 409)
					t->status = 502;
			}
			gw_buf_free(&body);
			return;
		}
		if (status == 404)
			continue;
		if (status == 409)
			busy = 1;
		if (status == 410)
			gone = 1;
		snprintf(other, sizeof(other), "%s", msg);
		if (status != 409 && status != 410)
			fprintf(stderr, "skv-http: peer %s: %s\n", gw->opts.peers[i], msg);
	}
	gw_buf_free(&body);
	if (gw->opts.snapshot_dir) {
		char path[4200];
		struct stat st;
		if (backend_snapshot_file(gw, t->id, path, sizeof(path), "") == 0 &&
		    stat(path, &st) == 0) {
			FILE *f = fopen(path, "rb");
			char *data = f && st.st_size > 0 ? malloc((size_t)st.st_size) : NULL;
			size_t got = data ? fread(data, 1, (size_t)st.st_size, f) : 0;
			if (f)
				fclose(f);
			if (data && got == (size_t)st.st_size) {
				t->status = task_restore(t, data, got);
				t->age_s = (int64_t)time(NULL) - (int64_t)st.st_mtime;
				t->age_s = t->age_s < 0 ? 0 : t->age_s;
				t->from_file = 1;
				if (t->status == 200) {
					free(data);
					return;
				}
				fprintf(stderr, "skv-http: %s: not restored: %s\n", path, t->msg);
				t->from_file = 0;
			}
			free(data);
			t->from[0] = '\0';
		}
	}
	t->status = busy ? 409 : gone ? 410 : 404;
	if (busy || gone)
		snprintf(t->msg, sizeof(t->msg), "%s", other);
}

static void *task_main(void *arg)
{
	struct gw_task *t = arg;
	switch (t->kind) {
	case TASK_EXPORT:
	case TASK_SNAPSHOT: task_export(t); break;
	case TASK_IMPORT: t->status = task_restore(t, t->snap, t->snap_len); break;
	case TASK_PULL: task_pull(t); break;
	}
	struct gw *gw = t->gw;
	pthread_mutex_lock(&gw->lock);
	t->next = gw->tasks_done;
	gw->tasks_done = t;
	pthread_mutex_unlock(&gw->lock);
	backend_wake(gw);
	return NULL;
}

static void backend_task_done(struct gw_backend *b, struct gw_task *t);

static struct gw_task *backend_task_new(struct gw_backend *b, enum task_kind kind,
					struct gw_job *j, struct gw_conv *conv, const char *id)
{
	struct gw_task *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->kind = kind;
	t->gw = b->gw;
	t->job = j;
	t->conv = conv;
	snprintf(t->id, sizeof(t->id), "%s", id);
	pthread_mutex_lock(&b->gw->lock);
	snprintf(t->model, sizeof(t->model), "%s", b->gw->model_name);
	pthread_mutex_unlock(&b->gw->lock);
	snprintf(t->tmpl, sizeof(t->tmpl), "%s",
		 b->gw->opts.tmpl ? gw_template_name(b->gw->opts.tmpl) : "");
	return t;
}

static void backend_task_start(struct gw_backend *b, struct gw_task *t)
{
	if (t->conv)
		t->conv->task = t;
	b->tasks_running++;
	pthread_t thread;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int err = pthread_create(&thread, &attr, task_main, t);
	pthread_attr_destroy(&attr);
	if (err) {
		t->status = 500;
		snprintf(t->msg, sizeof(t->msg), "cannot start a thread: %s", strerror(err));
		b->tasks_running--;
		backend_task_done(b, t);
	}
}

/* The JSON state an export carries. */
static char *backend_export_state(struct gw_backend *b, const struct gw_conv *c, size_t *len)
{
	struct gw *gw = b->gw;
	json_t *o = json_object();
	json_object_set_new(o, "format", json_string("skv-conversation"));
	backend_conv_json_common(b, c, o);
	pthread_mutex_lock(&gw->lock);
	json_object_set_new(o, "model", json_string(gw->model_name));
	pthread_mutex_unlock(&gw->lock);
	json_object_set_new(o, "template",
			    json_string(gw->opts.tmpl ? gw_template_name(gw->opts.tmpl) : ""));
	json_object_set_new(o, "node", json_string(gw->opts.node_name));
	json_object_set_new(o, "stream_name", json_string(c->name));
	json_object_set_new(o, "exported_at", json_integer((json_int_t)time(NULL)));
	char *text = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(o);
	*len = text ? strlen(text) : 0;
	return text;
}

static void backend_job_done(struct gw_backend *b, struct gw_job *j, int status,
			     const struct gw_buf *body, const char *type)
{
	pthread_mutex_lock(&b->gw->lock);
	j->status = status;
	j->content_type = type;
	pthread_mutex_unlock(&b->gw->lock);
	j->done = 1;
	job_output(b, j, body->data ? body->data : "", body->len, 1);
}

static const char *backend_status_type(int status)
{
	return status >= 500 ? "server_error" : "invalid_request_error";
}

/* GET /v1/conversations/ID/export: the snapshot is taken on a worker (the conversation is busy
 * meanwhile, so nothing changes between the copy and a release). */
static void backend_export(struct gw_backend *b, struct gw_job *j)
{
	struct gw_conv *conv = backend_conv_find(b, j->req.conversation);
	char msg[GW_CONV_ID_MAX + 400];
	const char *id = j->req.conversation;
	int status = 0;
	const char *code = NULL;
	/* A conversation this node is itself pulling from its peers is not here (and a node
	 * listed among its own --peers must not make itself wait). */
	if (!conv || (!j->by_peer && conv->key_hash != j->key_hash) ||
	    (conv->task && conv->task->kind == TASK_PULL)) {
		status = 404, code = "conversation_not_found";
		snprintf(msg, sizeof(msg), "no conversation '%s'", id);
	} else if (conv->lost) {
		status = 410, code = "conversation_lost";
		snprintf(msg, sizeof(msg), "conversation '%s' is lost: %s", id, conv->lost_why);
	} else if (conv->task || (conv->st && (conv->st->job || conv->st->skip_ends))) {
		status = 409, code = "conversation_busy";
		snprintf(msg, sizeof(msg), "conversation '%s' is answering a request or being "
			 "moved: retry when it is done", id);
	} else if (!conv->st || !b->client) {
		status = 503, code = "service_unavailable";
		snprintf(msg, sizeof(msg), "conversation '%s' waits for skv-cached to come back", id);
	}
	struct gw_task *t = status ? NULL : backend_task_new(b, TASK_EXPORT, j, conv, id);
	if (!status && t) {
		struct skv_client_stream_info info;
		skv_client_stream_info(conv->st->s, &info);
		t->stream_id = info.id;
		size_t len;
		char *text = backend_export_state(b, conv, &len);
		if (text && gw_buf_put(&t->state_text, text, len) == 0) {
			free(text);
			backend_task_start(b, t);
			return;
		}
		free(text);
		task_free(t);
		t = NULL;
	}
	if (!status)
		status = 500, snprintf(msg, sizeof(msg), "out of memory");
	job_fail(b, j, status, msg, backend_status_type(status), code);
	gw_job_unref(b->gw, j);
}

/* PUT /v1/conversations/ID: the body is checked here, restored on a worker, attached when it
 * comes back. */
static void backend_import(struct gw_backend *b, struct gw_job *j)
{
	struct gw *gw = b->gw;
	const char *id = j->req.conversation;
	char msg[GW_CONV_ID_MAX + 600];
	int status = 0;
	const char *code = NULL;
	struct gw_task *t = NULL;
	if (backend_conv_find(b, id)) {
		status = 409, code = "conversation_exists";
		snprintf(msg, sizeof(msg), "conversation '%s' exists here: DELETE it first", id);
	} else if (__atomic_load_n(&gw->draining, __ATOMIC_ACQUIRE) && !j->release) {
		status = 503, code = "draining";
		snprintf(msg, sizeof(msg), "node %s is draining: it takes no conversation",
			 gw->opts.node_name);
	} else if (!b->client) {
		status = 503, code = "service_unavailable";
		snprintf(msg, sizeof(msg), "skv-cached is not reachable at %s", gw->opts.socket_path);
	} else if (!(t = backend_task_new(b, TASK_IMPORT, j, NULL, id))) {
		status = 500, snprintf(msg, sizeof(msg), "out of memory");
	} else {
		json_t *state;
		const char *snap;
		size_t snap_len;
		t->snap = j->upload.data ? j->upload.data : "";
		t->snap_len = j->upload.len;
		status = gw_conv_unpack(t->snap, t->snap_len, &state, &snap, &snap_len, msg,
					sizeof(msg));
		if (!status) {
			t->key_hash = j->key_hash;
			t->check_key = !j->by_peer && gw->opts.n_api_keys;
			status = task_check_state(t, state);
			if (status)
				snprintf(msg, sizeof(msg), "%.700s", t->msg);
			json_decref(state);
		}
		code = status == 422 ? "conversation_refused" : "invalid_conversation";
	}
	if (status) {
		if (t)
			task_free(t);
		job_fail(b, j, status, msg, backend_status_type(status), code);
		gw_job_unref(gw, j);
		return;
	}
	t->conv = backend_conv_new(b, id, j->key_hash);
	if (!t->conv) {
		task_free(t);
		job_fail(b, j, 500, "out of memory", "server_error", NULL);
		gw_job_unref(gw, j);
		return;
	}
	backend_task_start(b, t);
}

/* A request names a conversation this node does not have: ask the peers (and --snapshot-dir)
 * on a worker before opening a new one. Returns 1 if the job waits for that. */
static int backend_pull(struct gw_backend *b, struct gw_job *j, const char *lost_why)
{
	struct gw *gw = b->gw;
	if (!gw->opts.n_peers && !gw->opts.snapshot_dir)
		return 0;
	struct gw_task *t = backend_task_new(b, TASK_PULL, j, NULL, j->req.conversation);
	if (!t)
		return 0;
	snprintf(t->lost_why, sizeof(t->lost_why), "%s", lost_why ? lost_why : "");
	t->conv = backend_conv_new(b, j->req.conversation, j->key_hash);
	if (!t->conv) {
		task_free(t);
		return 0;
	}
	backend_task_start(b, t);
	return 1;
}

/* A restored stream is attached and becomes the conversation. 0, or the status with msg. */
static int backend_task_adopt(struct gw_backend *b, struct gw_task *t, char *msg, size_t len)
{
	struct gw_conv *conv = t->conv;
	snprintf(conv->name, sizeof(conv->name), "%s", t->name);
	snprintf(conv->token, sizeof(conv->token), "%s", t->token);
	backend_conv_from_json(conv, t->state);
	conv->last_used = backend_now();
	b->state_dirty = 1;
	if (!b->client)
		return 0; /* attached at the next connection */
	int err;
	if (!backend_conv_attach(b, conv, &err)) {
		snprintf(msg, len, "skv-cached restored the conversation but it cannot be attached: "
			 "%s", skv_client_last_error(b->client));
		return err == -EPIPE ? 503 : 500;
	}
	return 0;
}

static void backend_task_done(struct gw_backend *b, struct gw_task *t)
{
	struct gw *gw = b->gw;
	struct gw_conv *conv = t->conv;
	struct gw_job *j = t->job;
	char msg[1024];
	if (conv)
		conv->task = NULL;
	if (t->kind == TASK_SNAPSHOT) {
		/* Requests that came while the copy was made go on now. */
		struct gw_job *parked = conv->parked;
		conv->parked = NULL;
		while (parked) {
			struct gw_job *next = parked->queue_next;
			backend_start(b, parked);
			parked = next;
		}
		char path[4200], tmp[4200];
		if (t->status == 200 &&
		    backend_snapshot_file(gw, t->id, path, sizeof(path), "") == 0 &&
		    backend_snapshot_file(gw, t->id, tmp, sizeof(tmp), ".tmp") == 0) {
			FILE *f = fopen(tmp, "wb");
			int ok = f && fwrite(t->body.data, 1, t->body.len, f) == t->body.len;
			if (f && fclose(f) != 0)
				ok = 0;
			if (!ok || rename(tmp, path) < 0) {
				backend_log("--snapshot-dir: cannot write %s: %s", path, strerror(errno));
				unlink(tmp);
			}
		} else if (t->status != 200) {
			backend_log("--snapshot-dir: conversation %s: %s", t->id, t->msg);
		}
		task_free(t);
		return;
	}
	if (t->kind == TASK_EXPORT) {
		if (t->status != 200) {
			job_fail(b, j, t->status, t->msg, backend_status_type(t->status), NULL);
		} else {
			if (j->release) {
				backend_conv_free(b, conv);
				__atomic_add_fetch(&gw->count.conversations_moved_out, 1,
						   __ATOMIC_RELAXED);
			}
			backend_job_done(b, j, 200, &t->body, "application/x-skv-conversation");
		}
		gw_job_unref(gw, j);
		task_free(t);
		return;
	}
	/* Import or pull: t->conv is the placeholder made when it started. */
	int status = t->status;
	snprintf(msg, sizeof(msg), "%s", t->msg);
	if (status == 200) {
		status = backend_task_adopt(b, t, msg, sizeof(msg));
		status = status ? status : 200;
	}
	if (status == 404 && t->lost_why[0]) {
		/* Lost here, and no copy anywhere: still lost. */
		conv->lost = 1;
		snprintf(conv->lost_why, sizeof(conv->lost_why), "%s", t->lost_why);
		status = 410;
		snprintf(msg, sizeof(msg), "conversation '%s' is lost: %.400s; no peer and no "
			 "--snapshot-dir file has it; DELETE /v1/conversations/%s to start it anew",
			 t->id, t->lost_why, t->id);
	} else if (status != 200) {
		backend_conv_free(b, conv);
		conv = NULL;
	}
	if (t->kind == TASK_IMPORT) {
		if (status == 200) {
			__atomic_add_fetch(&gw->count.conversations_moved_in, 1, __ATOMIC_RELAXED);
			struct gw_buf body = { 0 };
			gw_buf_puts(&body, "{\"id\":");
			gw_json_string(&body, t->id, strlen(t->id));
			gw_buf_printf(&body, ",\"object\":\"conversation\",\"imported\":true,"
				      "\"messages\":%llu,\"from\":",
				      (unsigned long long)conv->fed_messages);
			gw_json_string(&body, t->from, strlen(t->from));
			gw_buf_puts(&body, "}\n");
			backend_job_done(b, j, 200, &body, NULL);
			gw_buf_free(&body);
		} else {
			job_fail(b, j, status, msg, backend_status_type(status),
				 status == 409 ? "conversation_exists"
				 : status == 422 ? "conversation_refused" : NULL);
		}
		gw_job_unref(gw, j);
		task_free(t);
		return;
	}
	/* Pull: the request goes on, on the conversation moved here or on a new one. */
	j->no_fetch = 1;
	if (status == 200) {
		if (t->from_file) {
			j->restored = 1;
			j->restored_age_s = t->age_s;
			__atomic_add_fetch(&gw->count.conversations_restored, 1, __ATOMIC_RELAXED);
		} else {
			snprintf(j->moved_from, sizeof(j->moved_from), "%s", t->from);
			__atomic_add_fetch(&gw->count.conversations_moved_in, 1, __ATOMIC_RELAXED);
		}
		backend_start(b, j);
	} else if (status == 404) {
		backend_start(b, j);
	} else {
		job_fail(b, j, status, msg, backend_status_type(status),
			 status == 410 ? "conversation_lost"
			 : status == 409 ? "conversation_busy" : "conversation_move_failed");
		gw_job_unref(gw, j);
	}
	task_free(t);
}

static void backend_take_tasks(struct gw_backend *b)
{
	struct gw *gw = b->gw;
	pthread_mutex_lock(&gw->lock);
	struct gw_task *done = gw->tasks_done;
	gw->tasks_done = NULL;
	pthread_mutex_unlock(&gw->lock);
	while (done) {
		struct gw_task *next = done->next;
		b->tasks_running--;
		backend_task_done(b, done);
		done = next;
	}
}

/* --snapshot-dir: every idle conversation exported into the shared directory as ID.skvconv
 * (through ID.skvconv.tmp and a rename), each --snapshot-interval seconds. */
static void backend_snapshot_all(struct gw_backend *b, double now)
{
	struct gw *gw = b->gw;
	if (!gw->opts.snapshot_dir || !b->client || now < b->next_snapshot)
		return;
	b->next_snapshot = now + gw->opts.snapshot_interval;
	for (struct gw_conv *c = b->convs; c; c = c->next) {
		if (c->lost || c->task || !c->st || c->st->job || c->st->skip_ends)
			continue;
		struct gw_task *t = backend_task_new(b, TASK_SNAPSHOT, NULL, c, c->id);
		if (!t)
			return;
		struct skv_client_stream_info info;
		skv_client_stream_info(c->st->s, &info);
		t->stream_id = info.id;
		size_t len;
		char *text = backend_export_state(b, c, &len);
		if (!text || gw_buf_put(&t->state_text, text, len) < 0) {
			free(text);
			task_free(t);
			return;
		}
		free(text);
		backend_task_start(b, t);
	}
}

/* ---- starting a job ---------------------------------------------------------------------- */

static int backend_open_status(int err, const char **type, const char **code)
{
	*type = "server_error";
	*code = "service_unavailable";
	if (err == -EINVAL || err == -SKV_EINVAL_POLICY) {
		*type = "invalid_request_error";
		*code = NULL;
		return 400;
	}
	if (err == -ENOSPC || err == -ETIMEDOUT) {
		*type = "rate_limit_error";
		*code = "daemon_full";
		return 429;
	}
	return 503;
}

static int backend_open(struct gw_backend *b, struct gw_job *j, const char *name,
			skv_client_stream **out)
{
	const struct gw_request *r = &j->req;
	skv_client_opts *o;
	if (skv_client_opts_new(&o) < 0)
		return -ENOMEM;
	uint64_t seed = r->have_seed ? r->seed
				     : (uint64_t)time(NULL) * 1000003u + ++b->seed_counter;
	int err = 0;
	if (r->policy >= 0)
		err = skv_client_opts_policy(o, (enum skv_client_policy)r->policy);
	if (!err && r->sinks >= 0)
		err = skv_client_opts_sinks(o, r->sinks);
	if (!err && r->window >= 0)
		err = skv_client_opts_window(o, r->window);
	if (!err)
		err = skv_client_opts_sampling(o, r->temperature, r->top_p, seed);
	if (!err && name)
		err = skv_client_opts_resumable(o, name);
	if (!err)
		err = skv_client_stream_open(b->client, o, out);
	b->last_seed = seed;
	skv_client_opts_free(o);
	return err;
}

static void backend_delete(struct gw_backend *b, struct gw_job *j)
{
	struct gw_conv *conv = backend_conv_find(b, j->req.conversation);
	char msg[GW_CONV_ID_MAX + 64];
	if (!conv || conv->key_hash != j->key_hash) {
		snprintf(msg, sizeof(msg), "no conversation '%s'", j->req.conversation);
		job_fail(b, j, 404, msg, "invalid_request_error", "conversation_not_found");
	} else if (conv->task || (conv->st && (conv->st->job || conv->st->skip_ends))) {
		snprintf(msg, sizeof(msg), "conversation '%s' is answering a request or being moved",
			 j->req.conversation);
		job_fail(b, j, 409, msg, "invalid_request_error", "conversation_busy");
	} else {
		int err;
		/* Detached (the daemon restarted and it is not attached yet): end it there too. */
		if (!conv->st && !conv->lost && conv->token[0] && b->client && !b->reattach_due)
			backend_conv_attach(b, conv, &err);
		backend_conv_unlink_file(b, conv->id);
		backend_conv_free(b, conv);
		struct gw_buf body = { 0 };
		gw_buf_puts(&body, "{\"id\":");
		gw_json_string(&body, j->req.conversation, strlen(j->req.conversation));
		gw_buf_puts(&body, ",\"object\":\"conversation.deleted\",\"deleted\":true}\n");
		pthread_mutex_lock(&b->gw->lock);
		j->status = 200;
		pthread_mutex_unlock(&b->gw->lock);
		job_output(b, j, body.data, body.len, 1);
		gw_buf_free(&body);
	}
	gw_job_unref(b->gw, j);
}

/* The text a chat request adds to its stream: the messages the stream has not seen. A client
 * may send the whole history (the usual OpenAI way: the messages the conversation already holds,
 * recognised by their hash, are skipped) or only the new turn. */
static int backend_chat_text(struct gw_backend *b, struct gw_job *j, struct gw_conv *conv,
			     struct gw_buf *text)
{
	const struct gw_request *r = &j->req;
	size_t skip = 0;
	if (conv && conv->fed_messages && r->n_messages >= conv->fed_messages) {
		uint64_t h = BACKEND_HASH_SEED;
		for (size_t i = 0; i < conv->fed_messages; i++)
			h = backend_hash_message(h, r->messages[i].role, r->messages[i].content,
						 r->messages[i].content_len);
		if (h == conv->fed_hash)
			skip = conv->fed_messages;
	}
	if (gw_template_render(b->gw->opts.tmpl, r->messages, r->n_messages, skip, text) < 0)
		return -ENOMEM;
	for (size_t i = skip; i < r->n_messages; i++) {
		if (conv) {
			conv->fed_hash = backend_hash_message(conv->fed_hash, r->messages[i].role,
							      r->messages[i].content,
							      r->messages[i].content_len);
			conv->fed_messages++;
		}
	}
	return 0;
}

static void backend_start(struct gw_backend *b, struct gw_job *j)
{
	struct gw *gw = b->gw;
	pthread_mutex_lock(&gw->lock);
	int gone = j->cancel;
	pthread_mutex_unlock(&gw->lock);
	if (gone) {
		gw_job_unref(gw, j);
		return;
	}
	if (j->req.kind == GW_DELETE) {
		backend_delete(b, j);
		return;
	}
	if (j->req.kind == GW_EXPORT || j->req.kind == GW_IMPORT) {
		(j->req.kind == GW_EXPORT ? backend_export : backend_import)(b, j);
		return;
	}
	if (!b->client) {
		char msg[600];
		snprintf(msg, sizeof(msg), "skv-cached is not reachable at %s", gw->opts.socket_path);
		job_fail(b, j, 503, msg, "server_error", "service_unavailable");
		gw_job_unref(gw, j);
		return;
	}
	if (j->req.kind == GW_CHAT && !gw->opts.tmpl) {
		job_fail(b, j, 500, b->tmpl_why, "server_error", NULL);
		gw_job_unref(gw, j);
		return;
	}
	struct gw_conv *conv = NULL;
	struct gw_stream *st = NULL;
	char msg[768];
	if (j->req.conversation[0]) {
		conv = backend_conv_find(b, j->req.conversation);
		if (conv && conv->key_hash != j->key_hash) {
			snprintf(msg, sizeof(msg), "no conversation '%s'", j->req.conversation);
			job_fail(b, j, 404, msg, "invalid_request_error", "conversation_not_found");
			gw_job_unref(gw, j);
			return;
		}
		if (conv && conv->task && conv->task->kind == TASK_SNAPSHOT) {
			j->queue_next = conv->parked; /* goes on when the copy is made */
			conv->parked = j;
			return;
		}
		if (conv && conv->lost && gw->opts.snapshot_dir && !j->no_fetch) {
			/* Its last --snapshot-dir export may bring it back. */
			char why[sizeof(conv->lost_why)];
			snprintf(why, sizeof(why), "%s", conv->lost_why);
			backend_conv_free(b, conv);
			if (backend_pull(b, j, why))
				return;
			conv = backend_conv_new(b, j->req.conversation, j->key_hash);
			if (conv) {
				conv->lost = 1;
				snprintf(conv->lost_why, sizeof(conv->lost_why), "%s", why);
			}
		}
		int status = 0;
		const char *code = "conversation_busy";
		if (conv && conv->lost) {
			status = 410, code = "conversation_lost";
			snprintf(msg, sizeof(msg), "conversation '%s' is lost: %s; DELETE "
				 "/v1/conversations/%s to start it anew", conv->id, conv->lost_why,
				 conv->id);
		} else if (conv && conv->task) {
			status = 409;
			snprintf(msg, sizeof(msg), "conversation '%s' is being moved: retry",
				 conv->id);
		} else if (conv && !conv->st) {
			status = 503, code = "service_unavailable";
			snprintf(msg, sizeof(msg), "conversation '%s' waits for skv-cached, which "
				 "restarted, to have engines again: retry", conv->id);
		} else if (conv && (conv->st->job || conv->st->skip_ends)) {
			status = 409;
			snprintf(msg, sizeof(msg),
				 "conversation '%s' is answering another request: one at a time",
				 j->req.conversation);
		} else if (!conv && __atomic_load_n(&gw->draining, __ATOMIC_ACQUIRE)) {
			status = 503, code = "draining";
			snprintf(msg, sizeof(msg), "node %s is draining: it starts no new "
				 "conversation", gw->opts.node_name);
		}
		if (status) {
			job_fail(b, j, status, msg, backend_status_type(status), code);
			gw_job_unref(gw, j);
			return;
		}
		if (!conv && !j->no_fetch && backend_pull(b, j, NULL))
			return; /* backend_task_done starts it again */
		if (conv)
			st = conv->st;
	}
	if (!st) {
		skv_client_stream *s;
		char name[SKV_CLIENT_NAME_MAX];
		if (j->req.conversation[0])
			backend_stream_name(j->req.conversation, name, sizeof(name));
		int err = backend_open(b, j, j->req.conversation[0] ? name : NULL, &s);
		if (err < 0) {
			const char *type, *code;
			int status = backend_open_status(err, &type, &code);
			snprintf(msg, sizeof(msg), "cannot open a stream: %s",
				 skv_client_last_error(b->client));
			if (err == -EEXIST) {
				status = 409, type = "invalid_request_error";
				code = "conversation_exists";
				snprintf(msg, sizeof(msg), "skv-cached already holds a stream %s of "
					 "conversation '%s' that this gateway has no token for (another "
					 "skv-http's, or one left detached by a skv-http that stopped "
					 "without --state-dir)", name, j->req.conversation);
			}
			job_fail(b, j, status, msg, type, code);
			gw_job_unref(gw, j);
			if (err == -EPIPE)
				backend_lost(b, skv_client_last_error(b->client));
			return;
		}
		st = backend_stream_add(b, s);
		if (st && j->req.conversation[0]) {
			conv = backend_conv_new(b, j->req.conversation, j->key_hash);
			if (conv) {
				conv->st = st;
				st->conv = conv;
				struct skv_client_resume ri;
				if (skv_client_stream_resume_info(s, &ri) == 0) {
					snprintf(conv->name, sizeof(conv->name), "%s", ri.name);
					snprintf(conv->token, sizeof(conv->token), "%s", ri.token);
				}
				conv->set = (struct gw_conv_settings){
					.policy = j->req.policy, .sinks = j->req.sinks,
					.window = j->req.window, .temperature = j->req.temperature,
					.top_p = j->req.top_p, .seed = b->last_seed };
				b->state_dirty = 1;
				__atomic_add_fetch(&gw->count.conversations_opened, 1,
						   __ATOMIC_RELAXED);
			}
		}
		if (!st || (j->req.conversation[0] && !conv)) {
			if (st)
				backend_stream_close(b, st);
			else
				skv_client_stream_close(s);
			job_fail(b, j, 500, "out of memory", "server_error", NULL);
			gw_job_unref(gw, j);
			return;
		}
	}
	struct gw_buf text = { 0 };
	int err = 0;
	uint64_t fed_messages = conv ? conv->fed_messages : 0, fed_hash = conv ? conv->fed_hash : 0;
	if (j->req.kind == GW_CHAT) {
		err = backend_chat_text(b, j, conv, &text);
		j->trim = gw_template_trims(gw->opts.tmpl);
	} else {
		err = gw_buf_put(&text, j->req.prompt, j->req.prompt_len);
	}
	st->job = j;
	j->st = st;
	if (!err)
		err = skv_client_stream_generate(st->s, text.data ? text.data : "", text.len,
						 j->req.max_tokens,
						 (j->req.ignore_eos ? SKV_CLIENT_ENDLESS : 0) |
							 (j->req.kind == GW_CHAT &&
								  gw_template_special(gw->opts.tmpl)
							  ? SKV_CLIENT_SPECIAL
							  : 0));
	gw_buf_free(&text);
	if (err < 0) {
		snprintf(msg, sizeof(msg), "cannot send the request: %s",
			 skv_client_last_error(b->client));
		job_fail(b, j, 503, msg, "server_error", "service_unavailable");
		backend_request_over(b, st);
		if (conv) {
			/* The stream did not take these messages. */
			conv->fed_messages = fed_messages;
			conv->fed_hash = fed_hash;
		}
		if (err == -EPIPE)
			backend_lost(b, skv_client_last_error(b->client));
		else if (conv)
			backend_conv_lose(b, conv, msg);
		return;
	}
	if (conv)
		conv->last_used = backend_now();
	job_started(b, j);
}

/* Start up to BACKEND_STARTS_PER_PASS queued jobs (each open waits for the daemon): a burst of
 * new requests is taken in slices, with the running streams read in between. Returns 1 if more
 * are waiting. */
static int backend_take_queue(struct gw_backend *b)
{
	struct gw *gw = b->gw;
	struct gw_job *taken[BACKEND_STARTS_PER_PASS];
	int n = 0, more;
	pthread_mutex_lock(&gw->lock);
	while (n < BACKEND_STARTS_PER_PASS && gw->queue_head) {
		taken[n++] = gw->queue_head;
		gw->queue_head = gw->queue_head->queue_next;
	}
	if (!gw->queue_head)
		gw->queue_tail = NULL;
	more = gw->queue_head != NULL;
	pthread_mutex_unlock(&gw->lock);
	for (int i = 0; i < n; i++)
		backend_start(b, taken[i]);
	return more;
}

/* Connections that went away: their generations stop now. */
static void backend_take_cancels(struct gw_backend *b)
{
	struct gw *gw = b->gw;
	if (!__atomic_exchange_n(&gw->cancel_pending, 0, __ATOMIC_ACQUIRE))
		return;
	for (struct gw_stream *st = b->streams, *next; st; st = next) {
		next = st->next;
		struct gw_job *j = st->job;
		if (!j)
			continue;
		pthread_mutex_lock(&gw->lock);
		int cancel = j->cancel;
		pthread_mutex_unlock(&gw->lock);
		if (!cancel || j->done)
			continue;
		j->done = 1;
		__atomic_add_fetch(&gw->count.cancelled, 1, __ATOMIC_RELAXED);
		backend_cut_short(b, st);
	}
}

/* Streams whose reader caught up are read again. */
static size_t backend_unpause(struct gw_backend *b)
{
	size_t paused = 0;
	struct gw *gw = b->gw;
	pthread_mutex_lock(&gw->lock);
	for (struct gw_stream *st = b->streams; st; st = st->next) {
		if (!st->paused)
			continue;
		if (!st->job || !st->job->paused)
			st->paused = 0;
		else
			paused++;
	}
	pthread_mutex_unlock(&gw->lock);
	return paused;
}

/* Read every stream that has events (paused ones excepted). Returns 1 if anything was read. */
static int backend_pump(struct gw_backend *b, size_t n_paused)
{
	int progressed = 0;
	size_t paused_seen = 0;
	b->paused_ready = 0;
	while (b->client) {
		skv_client_stream *s;
		int r = skv_client_wait(b->client, &s, 0);
		if (r < 0) {
			backend_lost(b, skv_client_last_error(b->client));
			return 1;
		}
		if (r == 0)
			break;
		struct gw_stream *st = backend_lookup(b, s);
		if (st && st->paused) {
			if (++paused_seen > n_paused) {
				b->paused_ready = 1;
				break;
			}
			continue;
		}
		paused_seen = 0;
		progressed = 1;
		for (int k = 0; k < BACKEND_EVENTS_PER_TURN; k++) {
			struct skv_client_event ev;
			r = skv_client_stream_read(s, &ev, 0);
			if (r == 0)
				break;
			if (r < 0) {
				if (!st) {
					skv_client_stream_close(s);
					break;
				}
				char msg[600];
				snprintf(msg, sizeof(msg), "the stream failed: %s",
					 skv_client_last_error(b->client));
				struct skv_client_stats stats;
				if (st->conv && skv_client_stats(b->client, &stats) == -EPIPE) {
					/* The daemon went: its conversations may come back. */
					backend_lost(b, msg);
					return 1;
				}
				if (st->job && !st->job->done)
					job_fail(b, st->job, 503, msg, "server_error",
						 "service_unavailable");
				struct gw_conv *conv = st->conv;
				backend_request_over(b, st);
				if (conv)
					backend_conv_lose(b, conv, msg);
				break;
			}
			if (!st)
				continue;
			struct gw_job *before = st->job;
			backend_event(b, st, &ev);
			/* The request ended (a one-shot stream is gone) or the reader is slow. */
			if (!backend_lookup(b, s) || !before || st->job != before || st->paused)
				break;
		}
	}
	return progressed;
}

static void backend_expire(struct gw_backend *b, double now)
{
	if (now < b->next_expire)
		return;
	b->next_expire = now + 1.0;
	for (struct gw_conv *c = b->convs, *next; c; c = next) {
		next = c->next;
		if (!c->task && !(c->st && (c->st->job || c->st->skip_ends)) &&
		    now - c->last_used >= b->gw->opts.conversation_idle) {
			backend_conv_unlink_file(b, c->id);
			backend_conv_free(b, c);
			__atomic_add_fetch(&b->gw->count.conversations_expired, 1, __ATOMIC_RELAXED);
		}
	}
}

/* A non-streaming answer's connection stays suspended until the body is complete, and
 * libmicrohttpd does not look at a suspended socket: look here for a client that closed it
 * (POLLRDHUP: its FIN arrived) and stop its generation. The socket cannot be closed under us:
 * libmicrohttpd closes only connections it has been handed back, and this job's is not until
 * its output is finished. (A client that shuts down only its sending side while it waits counts
 * as gone too.) */
static void backend_watch(struct gw_backend *b, double now)
{
	if (now < b->next_watch)
		return;
	b->next_watch = now + BACKEND_WATCH_S;
	struct pollfd *pfd = b->watch_fds;
	struct gw_stream **who = b->watch_streams;
	nfds_t n = 0;
	for (struct gw_stream *st = b->streams; st && n < BACKEND_WATCH_MAX; st = st->next) {
		struct gw_job *j = st->job;
		if (!j || j->done || j->req.stream || j->sock_fd < 0)
			continue;
		pfd[n] = (struct pollfd){ .fd = j->sock_fd, .events = POLLRDHUP };
		who[n++] = st;
	}
	if (!n || poll(pfd, n, 0) <= 0)
		return;
	for (nfds_t i = 0; i < n; i++) {
		if (!(pfd[i].revents & (POLLRDHUP | POLLHUP | POLLERR)))
			continue;
		struct gw_job *j = who[i]->job;
		__atomic_add_fetch(&b->gw->count.cancelled, 1, __ATOMIC_RELAXED);
		job_fail(b, j, 499, "the client closed the connection", "invalid_request_error",
			 "client_closed_request");
		backend_cut_short(b, who[i]);
	}
}

static void *backend_main(void *arg)
{
	struct gw_backend *b = arg;
	struct gw *gw = b->gw;
	while (!__atomic_load_n(&gw->stopping, __ATOMIC_ACQUIRE)) {
		double now = backend_now();
		if (!b->client && now >= b->next_connect)
			backend_connect(b);
		if (b->client && now >= b->next_stats)
			backend_stats(b);
		if (b->tasks_running)
			backend_take_tasks(b);
		int queued = backend_take_queue(b);
		backend_take_cancels(b);
		size_t n_paused = backend_unpause(b);
		__atomic_store_n(&gw->count.paused_streams, n_paused, __ATOMIC_RELAXED);
		int progressed = b->client ? backend_pump(b, n_paused) : 0;
		backend_expire(b, now);
		backend_watch(b, now);
		backend_snapshot_all(b, now);
		backend_state_flush(b);
		if (progressed || queued)
			continue;
		struct pollfd pfd[2] = { { .fd = gw->wake_fd, .events = POLLIN },
					 { .fd = b->client ? b->client_fd : -1, .events = POLLIN } };
		int timeout_ms = (int)(BACKEND_WATCH_S * 1e3);
		if (!b->client) {
			double wait = b->next_connect - backend_now();
			timeout_ms = wait <= 0 ? 0 : (int)(wait * 1e3) + 1;
			if (timeout_ms > 250)
				timeout_ms = 250;
		}
		if (b->paused_ready) {
			pfd[1].fd = -1;
			timeout_ms = BACKEND_PAUSED_POLL_MS;
		}
		if (poll(pfd, 2, timeout_ms) > 0 && (pfd[0].revents & POLLIN)) {
			uint64_t v;
			if (read(gw->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				backend_log("cannot read the wake eventfd: %s", strerror(errno));
		}
	}
	/* Every connection must be resumed before libmicrohttpd stops: answer what is queued. */
	pthread_mutex_lock(&gw->lock);
	struct gw_job *queued = gw->queue_head;
	gw->queue_head = gw->queue_tail = NULL;
	pthread_mutex_unlock(&gw->lock);
	while (queued) {
		struct gw_job *next = queued->queue_next;
		job_fail(b, queued, 503, "skv-http is shutting down", "server_error",
			 "service_unavailable");
		gw_job_unref(gw, queued);
		queued = next;
	}
	/* Exports and pulls in progress end first (their transfers see gw->stopping). */
	while (b->tasks_running) {
		backend_take_tasks(b);
		if (b->tasks_running)
			usleep(10000);
	}
	while (b->streams) {
		struct gw_stream *st = b->streams;
		if (st->job && !st->job->done)
			job_fail(b, st->job, 503, "skv-http is shutting down", "server_error",
				 "service_unavailable");
		struct gw_conv *conv = st->conv;
		backend_request_over(b, st);
		if (conv && conv->token[0] && gw->opts.state_dir) {
			/* Left detached: the next skv-http attaches it from --state-dir. */
			backend_stream_unlink(b, st);
			conv->st = NULL;
		} else if (conv) {
			backend_conv_free(b, conv);
		}
	}
	b->state_dirty |= gw->opts.state_dir != NULL;
	backend_state_flush(b);
	while (b->convs) {
		struct gw_conv *conv = b->convs;
		b->convs = conv->next;
		free(conv);
	}
	skv_client_disconnect(b->client);
	return NULL;
}

int gw_backend_start(struct gw *gw)
{
	struct gw_backend *b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->gw = gw;
	b->client_fd = -1;
	gw->backend = b;
	gw->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (gw->wake_fd < 0)
		return -errno;
	/* Before any thread: libcurl's global state (the peers' transfers). */
	if (gw->opts.n_peers && curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		return -ENOMEM;
	backend_state_load(b);
	b->next_snapshot = backend_now() + gw->opts.snapshot_interval;
	/* The first attempt here, so that the model's name is known before the first request. */
	backend_connect(b);
	int err = pthread_create(&gw->backend_thread, NULL, backend_main, b);
	return err ? -err : 0;
}

void gw_backend_stop(struct gw *gw)
{
	if (!gw->backend)
		return;
	__atomic_store_n(&gw->stopping, 1, __ATOMIC_RELEASE);
	backend_wake(gw);
	pthread_join(gw->backend_thread, NULL);
	gw_buf_free(&gw->backend->scratch);
	free(gw->backend);
	gw->backend = NULL;
	close(gw->wake_fd);
}
