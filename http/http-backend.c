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
 * request once the engine confirmed the cancel (DONE). Conversations are resumable streams:
 * http-conv.c attaches them again after a restart and moves them between nodes. */
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
#include "http-backend-pvt.h"
#include "http-gw.h"
#include "skv-client.h"
#include "skv-error.h"

#define BACKEND_EVENTS_PER_TURN 64      /* events of one stream before the next one's */
#define BACKEND_PAUSED_POLL_MS 1
#define BACKEND_STATS_S 1.0
#define BACKEND_BACKOFF_MIN_S 0.1
#define BACKEND_BACKOFF_MAX_S 2.0
#define BACKEND_STARTS_PER_PASS 16      /* new requests started between reads */
#define BACKEND_WATCH_S 0.05            /* how often suspended clients are checked */

double backend_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void backend_log(const char *fmt, ...)
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

void backend_wake(struct gw *gw)
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
void job_output(struct gw_backend *b, struct gw_job *j, const char *data, size_t len,
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
void job_fail(struct gw_backend *b, struct gw_job *j, int status, const char *message,
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

struct gw_stream *backend_stream_add(struct gw_backend *b, skv_client_stream *s)
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

struct gw_conv *backend_conv_find(struct gw_backend *b, const char *id)
{
	for (struct gw_conv *c = b->convs; c; c = c->next)
		if (!strcmp(c->id, id))
			return c;
	return NULL;
}

void backend_conv_free(struct gw_backend *b, struct gw_conv *conv)
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
void backend_conv_unlink_file(struct gw_backend *b, const char *id)
{
	char path[4200];
	if (b->gw->opts.snapshot_dir &&
	    snprintf(path, sizeof(path), "%s/%s.skvconv", b->gw->opts.snapshot_dir, id) <
		    (int)sizeof(path))
		unlink(path);
}

struct gw_conv *backend_conv_new(struct gw_backend *b, const char *id, uint64_t key_hash)
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
void backend_conv_lose(struct gw_backend *b, struct gw_conv *conv, const char *why)
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
		if (st->conv)
			skv_client_stream_tokens(st->s, &st->conv->tokens);
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
				conv_state_flush(b);
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

/* Everything on the lost connection fails; conversations end with it. */
void backend_lost(struct gw_backend *b, const char *why)
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
		conv_reattach(b);
	/* /health says ok only once the conversations are back. */
	if (err == 0 && b->client && !b->reattach_due)
		__atomic_store_n(&b->gw->count.engines_ready, st.engines_ready, __ATOMIC_RELAXED);
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
			conv_attach(b, conv, &err);
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

void backend_start(struct gw_backend *b, struct gw_job *j)
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
		(j->req.kind == GW_EXPORT ? conv_export : conv_import)(b, j);
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
			if (conv_pull(b, j, why))
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
			job_fail(b, j, status, msg, conv_status_type(status), code);
			gw_job_unref(gw, j);
			return;
		}
		if (!conv && !j->no_fetch && conv_pull(b, j, NULL))
			return; /* conv_task_done starts it again */
		if (conv)
			st = conv->st;
	}
	if (!st) {
		skv_client_stream *s;
		char name[SKV_CLIENT_NAME_MAX];
		if (j->req.conversation[0])
			conv_stream_name(j->req.conversation, name, sizeof(name));
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
				struct gw_conv *conv = st->conv;
				if (r == -SKV_ERESTORED && conv && conv->token[0]) {
					/* Its engine died and the daemon restored the stream from its
					 * snapshot: the request in progress is gone, the conversation
					 * goes on from the snapshot if it holds the last answer. */
					if (st->job && !st->job->done)
						job_fail(b, st->job, 503, "the conversation's engine died "
							 "and skv-cached restored its stream from a "
							 "snapshot: send the request again",
							 "server_error", "service_unavailable");
					backend_request_over(b, st);
					st->conv = NULL;
					conv->st = NULL;
					backend_stream_close(b, st);
					backend_log("conversation %s: %s", conv->id, msg);
					if (conv_attach_again(b, conv) == -EPIPE) {
						backend_lost(b, skv_client_last_error(b->client));
						return 1;
					}
					break;
				}
				if (st->job && !st->job->done)
					job_fail(b, st->job, 503, msg, "server_error",
						 "service_unavailable");
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
			conv_take_tasks(b);
		int queued = backend_take_queue(b);
		backend_take_cancels(b);
		size_t n_paused = backend_unpause(b);
		__atomic_store_n(&gw->count.paused_streams, n_paused, __ATOMIC_RELAXED);
		int progressed = b->client ? backend_pump(b, n_paused) : 0;
		backend_expire(b, now);
		backend_watch(b, now);
		conv_snapshot_all(b, now);
		conv_state_flush(b);
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
		conv_take_tasks(b);
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
	conv_state_flush(b);
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
	if (gw->opts.n_peers &&
	    !(gw->peer_skip_until = calloc(gw->opts.n_peers, sizeof(*gw->peer_skip_until))))
		return -ENOMEM;
	conv_state_load(b);
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
