/* libskv: see skv-client.h for the interface.
 *
 * Inside: the socket to skv-cached carries control only. Each stream has a channel (two rings
 * in shared memory, shm/channel.h) with the engine serving it. The client has one eventfd and
 * one wake word (in the doorbell page the daemon made for this connection): every engine rings
 * that word after writing any of this client's streams, and a wake-up system call happens only
 * when the client announced that it sleeps. Blocking waits sleep through shm/wake.h (io_uring,
 * futex fallback); an application that asks for skv_client_fd() switches the client to
 * event-loop mode, where the library announces sleep itself and the application polls. */
#include "skv-client.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "channel.h"
#include "kv-layout.h"
#include "libskv-pvt.h"
#include "proto.h"
#include "skv-error.h"
#include "wake.h"

/* How long a waiting client spins before it sleeps. A stream's tokens come every few tens of
 * microseconds on the shipped model; spinning through that gap keeps the engine from paying a
 * wake-up system call per token (measured in tools/README.md). SKV_CLIENT_SPIN_US overrides. */
#define CLIENT_SPIN_NS_DEFAULT 200000
#define CLIENT_REPLY_TIMEOUT_MS 30000
#define CLIENT_OPEN_RETRIES 200
#define CLIENT_OPEN_RETRY_US 50000
#define CLIENT_SLICE_NS 100000000ll /* 100 ms: how often a sleeper looks at the socket */

struct skv_client_stream {
	struct skv_client *client;
	size_t index;                   /* in client->streams */
	uint64_t id;
	void *chan_map;
	size_t chan_bytes;
	struct skv_chan chan;
	struct skv_wake_word *engine_word; /* the engine's doorbell page */
	int engine_efd;
	int64_t sink_slots, window_slots;
	uint64_t kv_bytes;
	uint64_t pending;               /* requests sent whose end event was not read */
	int resumable;                  /* OPEN_NAMED / ATTACH: name and token below */
	char name[SKV_STREAM_NAME_MAX];
	char token[SKV_TOKEN_HEX + 1];
	uint64_t tokens_seen_at_attach;
	uint64_t tokens;                /* the stream's tokens as of the last DONE or attach */
	int tokens_known;
	int resync;                     /* attached: skip the tail of an event the previous
					 * client had begun to read */
	int failed;                     /* -errno once the daemon said it failed */
	int failure_seen;               /* a read returned the failure */
	char why[SKV_MSG_TEXT];
	/* the event being assembled: a message whose bytes continue in the next ones */
	struct skv_chan_msg head;
	int assembling;
	char *buf;
	size_t buf_len, buf_cap;
};

struct skv_client {
	int sock;
	int efd;                        /* engines write it when the client sleeps */
	struct skv_wake_word *word;     /* in the client's doorbell page */
	struct skv_waiter *waiter;      /* blocking mode */
	int epfd;                       /* event-loop mode (skv_client_fd): efd + sock */
	int64_t spin_ns;
	uint32_t seq;
	int gone;                       /* the daemon hung up */
	struct skv_client_stream **streams;
	size_t n_streams, cap_streams;
	size_t cursor;                  /* skv_client_wait serves streams in turn */
	char err[320];
};

/* ---- small helpers ------------------------------------------------------------------------ */

static int client_err(struct skv_client *c, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int client_err(struct skv_client *c, int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->err, sizeof(c->err), fmt, ap);
	va_end(ap);
	return code;
}

static int64_t client_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* Deadline in ns from a timeout in ms (< 0: none, INT64_MAX). */
static int64_t client_deadline(int timeout_ms)
{
	return timeout_ms < 0 ? INT64_MAX : client_now_ns() + (int64_t)timeout_ms * 1000000ll;
}

const char *skv_client_last_error(const skv_client *c)
{
	return c ? c->err : "";
}

/* ---- options ------------------------------------------------------------------------------ */

int skv_client_opts_new(skv_client_opts **out)
{
	skv_client_opts *o = calloc(1, sizeof(*o));
	if (!o)
		return -ENOMEM;
	o->p.policy = SKV_CLIENT_SINK;
	o->p.evict = SKV_CLIENT_EVICT_TOKEN;
	o->p.sink_slots = -1;
	o->p.window_slots = -1;
	o->p.top_p = 0.9f;
	*out = o;
	return 0;
}

void skv_client_opts_free(skv_client_opts *o)
{
	free(o);
}

int skv_client_opts_policy(skv_client_opts *o, enum skv_client_policy policy)
{
	if ((unsigned)policy > SKV_CLIENT_RECOMPUTE)
		return -EINVAL;
	o->p.policy = (uint32_t)policy;
	return 0;
}

int skv_client_opts_policy_name(skv_client_opts *o, const char *name)
{
	static const char *const names[] = { "sink", "window", "dense", "recompute" };
	for (unsigned i = 0; name && i < sizeof(names) / sizeof(*names); i++)
		if (!strcmp(name, names[i]))
			return skv_client_opts_policy(o, (enum skv_client_policy)i);
	return -EINVAL;
}

int skv_client_opts_sinks(skv_client_opts *o, int64_t sinks)
{
	if (sinks < -1 || sinks > (1 << 24))
		return -EINVAL;
	o->p.sink_slots = sinks;
	return 0;
}

int skv_client_opts_window(skv_client_opts *o, int64_t window)
{
	if (window < -1 || window == 0 || window > (1 << 24))
		return -EINVAL;
	o->p.window_slots = window;
	return 0;
}

int skv_client_opts_evict(skv_client_opts *o, enum skv_client_evict evict)
{
	if ((unsigned)evict > SKV_CLIENT_EVICT_PROMPT)
		return -EINVAL;
	o->p.evict = (uint32_t)evict;
	return 0;
}

int skv_client_opts_abs_positions(skv_client_opts *o, int on)
{
	o->p.abs_positions = on != 0;
	return 0;
}

int skv_client_opts_kv(skv_client_opts *o, enum skv_client_kv kv)
{
	if (kv != SKV_CLIENT_KV_F32 && kv != SKV_CLIENT_KV_F16 && kv != SKV_CLIENT_KV_Q8)
		return -EINVAL;
	_Static_assert(SKV_CLIENT_KV_F32 == SKV_KV_DTYPE_F32 && SKV_CLIENT_KV_F16 == SKV_KV_DTYPE_F16 &&
			       SKV_CLIENT_KV_Q8 == SKV_KV_DTYPE_Q8,
		       "the wire carries these values");
	o->p.kv_dtype = (uint16_t)kv;
	return 0;
}

int skv_client_opts_sampling(skv_client_opts *o, float temperature, float top_p, uint64_t seed)
{
	if (!(temperature >= 0.0f && temperature <= 100.0f) || !(top_p > 0.0f && top_p <= 1.0f))
		return -EINVAL;
	o->p.temperature = temperature;
	o->p.top_p = top_p;
	o->p.seed = seed;
	return 0;
}

int skv_client_opts_idle_timeout(skv_client_opts *o, uint32_t seconds)
{
	o->p.idle_timeout_s = seconds;
	return 0;
}

/* ---- connection --------------------------------------------------------------------------- */

static void client_free(struct skv_client *c)
{
	skv_waiter_free(c->waiter);
	if (c->word)
		munmap(c->word, SKV_CLIENT_DOORBELL_BYTES);
	if (c->epfd >= 0)
		close(c->epfd);
	if (c->efd >= 0)
		close(c->efd);
	if (c->sock >= 0)
		close(c->sock);
	free(c->streams);
	free(c);
}

int skv_client_connect(const char *socket_path, skv_client **out, char *msg, size_t msg_len)
{
	char path[108];
	if (!socket_path) {
		if (skv_default_socket_path(path, sizeof(path)) < 0)
			return skv_errorf(msg, msg_len, -ENAMETOOLONG,
					  "the default socket path is too long");
		socket_path = path;
	}
	int fd = skv_msg_connect(socket_path);
	if (fd == -ENAMETOOLONG)
		return skv_errorf(msg, msg_len, fd, "%s: socket path too long", socket_path);
	if (fd < 0)
		return skv_errorf(msg, msg_len, fd,
				  "cannot reach skv-cached at %s: %s (is the daemon running?)",
				  socket_path, strerror(-fd));
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_CLIENT, .pid = (uint32_t)getpid(),
				       .engine_id = UINT32_MAX, .node = UINT32_MAX };
	int err = skv_msg_send(fd, SKV_MSG_HELLO, 0, &hello, NULL, 0);
	struct skv_msg_hdr h;
	union {
		struct skv_msg_hello_ok ok;
		struct skv_msg_error error;
	} body;
	int fds[SKV_MSG_MAX_FDS], n_fds = 0;
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	if (!err && poll(&pfd, 1, CLIENT_REPLY_TIMEOUT_MS) == 0)
		err = -ETIMEDOUT;
	if (!err)
		err = skv_msg_recv(fd, &h, &body, sizeof(body), fds, &n_fds);
	/* A daemon that refuses us (permission) answers ERROR and closes at once, so our
	 * HELLO may fail with EPIPE or the read with ECONNRESET before we see its answer:
	 * the ERROR is still queued, read it. */
	if (err == -EPIPE || err == -ECONNRESET) {
		n_fds = 0;
		int again = skv_msg_recv(fd, &h, &body, sizeof(body), fds, &n_fds);
		if (again == 1)
			err = again;
	}
	if (err == 1 && h.type == SKV_MSG_ERROR) {
		for (int i = 0; i < n_fds; i++)
			close(fds[i]);
		body.error.text[sizeof(body.error.text) - 1] = '\0';
		close(fd);
		return skv_errorf(msg, msg_len, body.error.code < 0 ? body.error.code : -EPROTO,
				  "skv-cached refused us: %s", body.error.text);
	}
	if (err != 1 || h.type != SKV_MSG_HELLO_OK || n_fds != 1) {
		for (int i = 0; i < n_fds; i++)
			close(fds[i]);
		close(fd);
		if (err == 1 || err == 0)
			err = -EPROTO;
		return skv_errorf(msg, msg_len, err, "no valid answer from skv-cached at %s: %s",
				  socket_path, skv_strerror(err));
	}
	struct skv_client *c = calloc(1, sizeof(*c));
	if (!c) {
		close(fds[0]);
		close(fd);
		return -ENOMEM;
	}
	c->sock = fd;
	c->epfd = -1;
	c->seq = 1;
	c->spin_ns = CLIENT_SPIN_NS_DEFAULT;
	c->word = mmap(NULL, SKV_CLIENT_DOORBELL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0],
		       0);
	close(fds[0]);
	if (c->word == MAP_FAILED) {
		c->word = NULL;
		err = skv_errorf(msg, msg_len, -errno, "cannot map the client's doorbell: %s",
				 strerror(errno));
		client_free(c);
		return err;
	}
	/* Non-blocking, as shm/wake.h recommends (io_uring polls it). */
	c->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	err = c->efd < 0 ? -errno : 0;
	if (!err)
		err = skv_waiter_new(SKV_WAIT_AUTO, c->word, c->efd, NULL, &c->waiter);
	if (err < 0) {
		client_free(c);
		return skv_errorf(msg, msg_len, err, "cannot set up waiting: %s",
				  skv_strerror(err));
	}
	skv_waiter_watch_fd(c->waiter, c->sock);
	const char *spin = getenv("SKV_CLIENT_SPIN_US");
	if (spin && *spin) {
		char *end;
		long long us = strtoll(spin, &end, 10);
		if (!*end && us >= 0 && us <= 10000000)
			c->spin_ns = us * 1000;
	}
	*out = c;
	return 0;
}

static struct skv_client_stream *client_find(struct skv_client *c, uint64_t id)
{
	for (size_t i = 0; i < c->n_streams; i++)
		if (c->streams[i]->id == id)
			return c->streams[i];
	return NULL;
}

static void client_fail_all(struct skv_client *c, const char *why)
{
	c->gone = 1;
	for (size_t i = 0; i < c->n_streams; i++) {
		struct skv_client_stream *s = c->streams[i];
		if (!s->failed) {
			s->failed = -EPIPE;
			snprintf(s->why, sizeof(s->why), "%s", why);
		}
	}
}

/* What a control message can carry back to the caller that waits for it. */
struct client_reply {
	struct skv_msg_opened opened;
	struct skv_msg_opened_named named; /* OPENED_NAMED (opened is filled from it too) */
	struct skv_msg_error error;
	struct skv_msg_stats stats;
	struct skv_msg_queued queued;
	int fds[SKV_MSG_MAX_FDS];
	int n_fds;
};

/* Take one control message (waiting up to timeout_ms) and apply it. Returns its type, 0 on
 * time-out, or < 0 when the daemon is gone (every stream failed). fds stay in r (the caller
 * closes them) only for OPENED. */
static int client_control(struct skv_client *c, int timeout_ms, struct client_reply *r)
{
	if (c->gone)
		return -EPIPE;
	struct pollfd pfd = { .fd = c->sock, .events = POLLIN };
	int p = poll(&pfd, 1, timeout_ms);
	if (p == 0)
		return 0;
	if (p < 0)
		return -errno;
	struct skv_msg_hdr h;
	union {
		struct skv_msg_opened opened;
		struct skv_msg_opened_named named;
		struct skv_msg_failed failed;
		struct skv_msg_stream stream;
		struct skv_msg_error error;
		struct skv_msg_stats stats;
		struct skv_msg_queued queued;
	} body;
	int fds[SKV_MSG_MAX_FDS], n_fds = 0;
	int got = skv_msg_recv(c->sock, &h, &body, sizeof(body), fds, &n_fds);
	if (got <= 0) {
		client_fail_all(c, "skv-cached went away");
		return got ? got : -EPIPE;
	}
	if ((h.type == SKV_MSG_OPENED || h.type == SKV_MSG_OPENED_NAMED) && r) {
		memcpy(r->fds, fds, sizeof(fds));
		r->n_fds = n_fds;
	} else {
		for (int i = 0; i < n_fds; i++)
			close(fds[i]);
	}
	switch (h.type) {
	case SKV_MSG_OPENED:
		if (r)
			r->opened = body.opened;
		break;
	case SKV_MSG_OPENED_NAMED:
		if (r) {
			r->named = body.named;
			r->opened = body.named.opened;
		}
		break;
	case SKV_MSG_FAILED: {
		struct skv_client_stream *s = client_find(c, body.failed.stream_id);
		if (s && !s->failed) {
			s->failed = body.failed.code < 0 ? body.failed.code : -EPIPE;
			snprintf(s->why, sizeof(s->why), "%.*s", (int)sizeof(body.failed.text) - 1,
				 body.failed.text);
		}
		break;
	}
	case SKV_MSG_ERROR:
		if (r)
			r->error = body.error;
		break;
	case SKV_MSG_STATS:
		if (r)
			r->stats = body.stats;
		break;
	case SKV_MSG_QUEUED:
		if (r)
			r->queued = body.queued;
		break;
	default:
		break;
	}
	return h.type;
}

/* Control messages that arrived while we were busy (a FAILED, a hang-up). */
static void client_poll_control(struct skv_client *c)
{
	while (!c->gone && client_control(c, 0, NULL) > 0)
		;
}

/* ---- streams: open and close -------------------------------------------------------------- */

static void client_stream_free(struct skv_client_stream *s)
{
	if (s->chan_map)
		munmap(s->chan_map, s->chan_bytes);
	if (s->engine_word)
		munmap(s->engine_word, SKV_DOORBELL_BYTES);
	if (s->engine_efd >= 0)
		close(s->engine_efd);
	free(s->buf);
	free(s);
}

static int client_add_stream(struct skv_client *c, struct skv_client_stream *s)
{
	if (c->n_streams == c->cap_streams) {
		size_t cap = c->cap_streams ? 2 * c->cap_streams : 16;
		struct skv_client_stream **v = realloc(c->streams, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		c->streams = v;
		c->cap_streams = cap;
	}
	s->index = c->n_streams;
	c->streams[c->n_streams++] = s;
	return 0;
}

static void client_remove_stream(struct skv_client *c, struct skv_client_stream *s)
{
	if (s->index >= c->n_streams || c->streams[s->index] != s)
		return;
	c->streams[s->index] = c->streams[--c->n_streams];
	c->streams[s->index]->index = s->index;
}

/* Wait for the daemon's answer to an OPEN: OPENED, ERROR, or QUEUED first (the OPEN waits in
 * the admission queue: the daemon promises an answer within its queue time-out). */
static int client_open_reply(struct skv_client *c, struct client_reply *r)
{
	int64_t deadline = client_deadline(CLIENT_REPLY_TIMEOUT_MS);
	for (;;) {
		int64_t left = deadline - client_now_ns();
		if (left <= 0)
			return 0;
		memset(r, 0, sizeof(*r));
		int type = client_control(c, (int)(left / 1000000 + 1), r);
		if (type <= 0 || type == SKV_MSG_OPENED || type == SKV_MSG_OPENED_NAMED ||
		    type == SKV_MSG_ERROR)
			return type;
		if (type == SKV_MSG_QUEUED)
			deadline = client_deadline((int)r->queued.timeout_ms +
						   CLIENT_REPLY_TIMEOUT_MS);
	}
}

/* Send an OPEN (o), OPEN_NAMED (o resumable) or ATTACH (a) and set the stream up from the
 * answer. */
static int client_stream_open_once(struct skv_client *c, const skv_client_opts *o,
				   const struct skv_msg_attach *a, struct skv_client_stream **out)
{
	if (c->gone)
		return client_err(c, -EPIPE, "skv-cached went away");
	struct skv_client_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return client_err(c, -ENOMEM, "out of memory");
	s->client = c;
	s->engine_efd = -1;
	int sent;
	if (a) {
		sent = skv_msg_send(c->sock, SKV_MSG_ATTACH, c->seq++, a, &c->efd, 1);
	} else if (o->resumable) {
		struct skv_msg_open_named open = { .open = { .params = o->p } };
		memcpy(open.name, o->name, sizeof(open.name));
		sent = skv_msg_send(c->sock, SKV_MSG_OPEN_NAMED, c->seq++, &open, &c->efd, 1);
	} else {
		struct skv_msg_open open = { .params = o->p };
		sent = skv_msg_send(c->sock, SKV_MSG_OPEN, c->seq++, &open, &c->efd, 1);
	}
	if (sent < 0) {
		client_stream_free(s);
		client_fail_all(c, "skv-cached went away");
		return client_err(c, -EPIPE, "skv-cached went away");
	}
	struct client_reply r;
	int type = client_open_reply(c, &r);
	int want = a || o->resumable ? SKV_MSG_OPENED_NAMED : SKV_MSG_OPENED;
	if (type == SKV_MSG_OPENED || type == SKV_MSG_OPENED_NAMED) {
		if (type != want) {
			for (int i = 0; i < r.n_fds; i++)
				close(r.fds[i]);
			r.n_fds = 0;
		}
		type = want;
	}
	if (type == SKV_MSG_ERROR) {
		client_stream_free(s);
		r.error.text[sizeof(r.error.text) - 1] = '\0';
		return client_err(c, r.error.code < 0 ? r.error.code : -EPROTO, "%s", r.error.text);
	}
	if (type != want || r.n_fds != 3) {
		client_stream_free(s);
		for (int i = 0; type == want && i < r.n_fds; i++)
			close(r.fds[i]);
		if (type < 0)
			return client_err(c, -EPIPE, "skv-cached went away");
		return client_err(c, type == 0 ? -ETIMEDOUT : -EPROTO,
				  "no valid answer to %s from skv-cached", a ? "ATTACH" : "OPEN");
	}
	if (want == SKV_MSG_OPENED_NAMED) {
		s->resumable = 1;
		snprintf(s->name, sizeof(s->name), "%.*s", (int)sizeof(r.named.name) - 1,
			 r.named.name);
		memcpy(s->token, r.named.token, SKV_TOKEN_HEX);
		s->token[SKV_TOKEN_HEX] = '\0';
		s->tokens_seen_at_attach = r.named.tokens_seen;
		s->tokens = r.named.tokens_seen;
		s->tokens_known = 1;
	}
	s->id = r.opened.stream_id;
	s->sink_slots = r.opened.sink_slots;
	s->window_slots = r.opened.window_slots;
	s->kv_bytes = r.opened.kv_bytes;
	s->chan_bytes = r.opened.channel_bytes;
	s->chan_map = mmap(NULL, s->chan_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, r.fds[0], 0);
	s->engine_word = mmap(NULL, SKV_DOORBELL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED,
			      r.fds[1], 0);
	s->engine_efd = r.fds[2];
	close(r.fds[0]);
	close(r.fds[1]);
	int err = 0;
	if (s->chan_map == MAP_FAILED || s->engine_word == MAP_FAILED) {
		err = client_err(c, -errno, "cannot map the stream's channel: %s", strerror(errno));
		if (s->chan_map == MAP_FAILED)
			s->chan_map = NULL;
		if (s->engine_word == MAP_FAILED)
			s->engine_word = NULL;
	}
	if (!err) {
		err = skv_chan_attach(&s->chan, s->chan_map, s->chan_bytes, 0);
		if (err < 0)
			client_err(c, err, "bad channel from skv-cached: %s", skv_strerror(err));
	}
	if (!err && a) {
		/* Where the previous client left the stream: the requests it sent that have not
		 * ended are ours to read (client-written words of the channel, so copied once and
		 * bounded), the rest of an event it was reading is skipped, and a prompt it was in
		 * the middle of sending is dropped by the engine (RESET goes before our own). */
		uint32_t sent_n = __atomic_load_n(&s->chan.hdr->requests_sent, __ATOMIC_RELAXED);
		uint32_t ended_n = __atomic_load_n(&s->chan.hdr->requests_ended, __ATOMIC_RELAXED);
		uint32_t open_n = sent_n - ended_n;
		s->pending = open_n <= SKV_CHAN_RING_CAPACITY ? open_n : 0;
		s->resync = 1;
		struct skv_chan_msg reset = { .type = SKV_CHAN_RESET };
		if (skv_ring_push(&s->chan.in, &reset) < 0)
			err = client_err(c, -EAGAIN, "the stream's input ring is full");
		else
			skv_wake(s->engine_word, s->engine_efd);
	}
	if (!err && client_add_stream(c, s) < 0)
		err = client_err(c, -ENOMEM, "out of memory");
	if (err < 0) {
		/* The daemon has it: tell it to drop (or, resumable, to keep) the stream. */
		struct skv_msg_stream m = { .stream_id = r.opened.stream_id };
		skv_msg_send(c->sock, a ? SKV_MSG_DETACH : SKV_MSG_CLOSE, c->seq++, &m, NULL, 0);
		client_stream_free(s);
		return err;
	}
	*out = s;
	return 0;
}

/* A daemon that has just started may have no engine ready yet (-EAGAIN): that is transient,
 * so retry for a while before giving up. */
int skv_client_stream_open(skv_client *c, const skv_client_opts *o, skv_client_stream **out)
{
	skv_client_opts defaults;
	if (!o) {
		skv_client_opts *d;
		if (skv_client_opts_new(&d) < 0)
			return client_err(c, -ENOMEM, "out of memory");
		defaults = *d;
		skv_client_opts_free(d);
		o = &defaults;
	}
	for (int attempt = 0;; attempt++) {
		int err = client_stream_open_once(c, o, NULL, out);
		if (err != -EAGAIN || attempt >= CLIENT_OPEN_RETRIES)
			return err;
		usleep(CLIENT_OPEN_RETRY_US);
	}
}

void skv_client_stream_info(const skv_client_stream *s, struct skv_client_stream_info *out)
{
	memset(out, 0, sizeof(*out));
	out->id = s->id;
	out->sinks = s->sink_slots;
	out->window = s->window_slots;
	out->kv_bytes = s->kv_bytes;
}

_Static_assert(SKV_CLIENT_TOKEN_MAX == SKV_TOKEN_HEX + 1 && SKV_CLIENT_NAME_MAX == SKV_STREAM_NAME_MAX,
	       "skv-client.h repeats the wire sizes");

static int client_failed(struct skv_client_stream *s);

int skv_client_opts_resumable(skv_client_opts *o, const char *name)
{
	size_t n = name ? strlen(name) : 0;
	if (n >= sizeof(o->name))
		return -EINVAL;
	for (size_t i = 0; i < n; i++) {
		char ch = name[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
		      ch == '.' || ch == '_' || ch == '-'))
			return -EINVAL;
	}
	memset(o->name, 0, sizeof(o->name));
	memcpy(o->name, name ? name : "", n);
	o->resumable = 1;
	return 0;
}

int skv_client_stream_resume_info(const skv_client_stream *s, struct skv_client_resume *out)
{
	memset(out, 0, sizeof(*out));
	if (!s->resumable)
		return -EINVAL;
	snprintf(out->name, sizeof(out->name), "%s", s->name);
	memcpy(out->token, s->token, sizeof(out->token));
	out->id = s->id;
	out->tokens_seen = s->tokens_seen_at_attach;
	return 0;
}

int skv_client_stream_attach(skv_client *c, const char *name, const char *token,
			     skv_client_stream **out)
{
	struct skv_msg_attach a = { .flags = 0 };
	if (!name || !token || strlen(name) >= sizeof(a.name) || !name[0] ||
	    strlen(token) != SKV_TOKEN_HEX)
		return client_err(c, -EINVAL,
				  "a resumable stream is named by 1 to %d characters and its token "
				  "is %d hexadecimal digits", SKV_STREAM_NAME_MAX - 1, SKV_TOKEN_HEX);
	memcpy(a.name, name, strlen(name));
	memcpy(a.token, token, SKV_TOKEN_HEX);
	return client_stream_open_once(c, NULL, &a, out);
}

int skv_client_stream_detach(skv_client_stream *s)
{
	if (!s)
		return 0;
	struct skv_client *c = s->client;
	int err = 0;
	if (!s->resumable) {
		return client_err(c, -EINVAL, "stream %llu is not resumable",
				  (unsigned long long)s->id);
	}
	client_remove_stream(c, s);
	if (!c->gone && !s->failed) {
		struct skv_msg_stream m = { .stream_id = s->id };
		err = skv_msg_send(c->sock, SKV_MSG_DETACH, c->seq++, &m, NULL, 0);
		struct client_reply r;
		for (int type = 0; !err;) {
			type = client_control(c, CLIENT_REPLY_TIMEOUT_MS, &r);
			if (type == SKV_MSG_DETACHED)
				break;
			if (type == SKV_MSG_ERROR) {
				r.error.text[sizeof(r.error.text) - 1] = '\0';
				err = client_err(c, r.error.code < 0 ? r.error.code : -EPROTO, "%s",
						 r.error.text);
			} else if (type <= 0) {
				err = client_err(c, type ? type : -ETIMEDOUT,
						 "skv-cached did not answer DETACH");
			}
		}
	} else if (s->failed) {
		err = client_failed(s);
	}
	client_stream_free(s);
	return err;
}

skv_client *libskv_stream_owner(const skv_client_stream *s)
{
	return s->client;
}

const struct skv_engine_stats *libskv_stream_engine_stats(const skv_client_stream *s)
{
	return skv_doorbell_stats(s->engine_word);
}

int skv_client_stream_tokens(const skv_client_stream *s, uint64_t *out)
{
	if (!s || !out)
		return -EINVAL;
	if (!s->tokens_known)
		return -ENODATA;
	*out = s->tokens;
	return 0;
}

uint64_t skv_client_stream_pending(const skv_client_stream *s)
{
	return s->pending;
}

void skv_client_stream_close(skv_client_stream *s)
{
	if (!s)
		return;
	struct skv_client *c = s->client;
	client_remove_stream(c, s);
	if (!c->gone) {
		struct skv_msg_stream m = { .stream_id = s->id };
		if (skv_msg_send(c->sock, SKV_MSG_CLOSE, c->seq++, &m, NULL, 0) == 0) {
			/* Wait for CLOSED so that the KV is free when we return. */
			for (;;) {
				int type = client_control(c, CLIENT_REPLY_TIMEOUT_MS, NULL);
				if (type <= 0 || type == SKV_MSG_CLOSED || type == SKV_MSG_ERROR)
					break;
			}
		}
	}
	client_stream_free(s);
}

void skv_client_disconnect(skv_client *c)
{
	if (!c)
		return;
	/* Closing the connection closes its streams in the daemon; no need to wait for each. */
	while (c->n_streams) {
		struct skv_client_stream *s = c->streams[--c->n_streams];
		client_stream_free(s);
	}
	client_free(c);
}

/* ---- sending ------------------------------------------------------------------------------ */

static int client_failed(struct skv_client_stream *s)
{
	s->failure_seen = 1;
	return client_err(s->client, s->failed, "stream %llu failed: %s",
			  (unsigned long long)s->id, s->why[0] ? s->why : "unknown reason");
}

static int stream_has_room(void *arg)
{
	struct skv_client_stream *s = arg;
	return skv_ring_count(&s->chan.in) > 0 || s->failed;
}

static int client_block(struct skv_client *c, int (*ready)(void *), void *arg, int64_t deadline);

static int client_push(struct skv_client_stream *s, const struct skv_chan_msg *m)
{
	for (;;) {
		if (s->failed)
			return client_failed(s);
		int err = skv_ring_push(&s->chan.in, m);
		if (err == 0)
			return 0;
		if (err != -EAGAIN)
			return client_err(s->client, err, "the stream's channel is corrupt");
		/* Full: ask the engine to ring us when it frees a slot, and make sure it runs. */
		__atomic_store_n(&s->chan.hdr->client_wants_room, 1, __ATOMIC_SEQ_CST);
		skv_wake(s->engine_word, s->engine_efd);
		err = client_block(s->client, stream_has_room, s, INT64_MAX);
		if (err < 0)
			return err;
	}
}

static int client_request(struct skv_client_stream *s, const char *text, size_t len,
			  uint32_t type, uint64_t arg, uint32_t flags)
{
	if (!text && len)
		return client_err(s->client, -EINVAL, "no text but a length of %zu", len);
	for (size_t off = 0; off < len;) {
		struct skv_chan_msg m = { .type = SKV_CHAN_TEXT };
		size_t n = len - off < SKV_CHAN_DATA ? len - off : SKV_CHAN_DATA;
		memcpy(m.data, text + off, n);
		m.n = (uint32_t)n;
		int err = client_push(s, &m);
		if (err < 0)
			return err;
		off += n;
		/* Let the engine start on a long text while we are still sending it. */
		if (off % (SKV_CHAN_DATA * 256) == 0)
			skv_wake(s->engine_word, s->engine_efd);
	}
	struct skv_chan_msg end = { .type = type, .arg = arg, .flags = flags,
				    .epoch = __atomic_load_n(&s->chan.hdr->cancel,
							     __ATOMIC_RELAXED) };
	int err = client_push(s, &end);
	if (err < 0)
		return err;
	s->pending++;
	__atomic_store_n(&s->chan.hdr->requests_sent, s->chan.hdr->requests_sent + 1,
			 __ATOMIC_RELAXED);
	skv_wake(s->engine_word, s->engine_efd);
	return 0;
}

int skv_client_stream_generate(skv_client_stream *s, const char *prompt, size_t len,
			       uint64_t max_tokens, unsigned flags)
{
	if (flags & ~(SKV_CLIENT_ENDLESS | SKV_CLIENT_SPECIAL))
		return client_err(s->client, -EINVAL, "unknown generate flags %#x", flags);
	return client_request(s, prompt, len, SKV_CHAN_GENERATE, max_tokens,
			      (flags & SKV_CLIENT_ENDLESS ? SKV_GEN_IGNORE_BOS : 0) |
				      (flags & SKV_CLIENT_SPECIAL ? SKV_GEN_SPECIAL : 0));
}

int skv_client_stream_score(skv_client_stream *s, const char *text, size_t len,
			    uint64_t max_predictions)
{
	if (!len)
		return client_err(s->client, -EINVAL, "no text to score");
	return client_request(s, text, len, SKV_CHAN_SCORE, max_predictions, 0);
}

int skv_client_stream_cancel(skv_client_stream *s)
{
	if (s->failed)
		return client_failed(s);
	/* Release: the requests pushed before are visible to an engine that sees this. */
	__atomic_add_fetch(&s->chan.hdr->cancel, 1, __ATOMIC_RELEASE);
	skv_wake(s->engine_word, s->engine_efd);
	return 0;
}

/* ---- receiving ---------------------------------------------------------------------------- */

static int stream_ready(void *arg)
{
	struct skv_client_stream *s = arg;
	return skv_ring_count(&s->chan.out) > 0 || (s->failed && !s->failure_seen);
}

static int client_any_ready(void *arg)
{
	struct skv_client *c = arg;
	for (size_t i = 0; i < c->n_streams; i++)
		if (stream_ready(c->streams[i]))
			return 1;
	return 0;
}

static int stream_append(struct skv_client_stream *s, const uint8_t *data, uint32_t n)
{
	if (s->buf_len + n + 1 > s->buf_cap) {
		size_t cap = s->buf_cap ? 2 * s->buf_cap : 256;
		while (cap < s->buf_len + n + 1)
			cap *= 2;
		char *b = realloc(s->buf, cap);
		if (!b)
			return -ENOMEM;
		s->buf = b;
		s->buf_cap = cap;
	}
	memcpy(s->buf + s->buf_len, data, n);
	s->buf_len += n;
	s->buf[s->buf_len] = '\0';
	return 0;
}

/* Pop what the engine wrote, assembling an event whose bytes span several messages. Returns 1
 * with ev filled, 0 if no whole event is there yet, or an error. */
static int stream_take(struct skv_client_stream *s, struct skv_client_event *ev)
{
	for (;;) {
		struct skv_chan_msg m;
		int err = skv_ring_pop(&s->chan.out, &m);
		if (err == -EAGAIN)
			return 0;
		if (err < 0)
			return client_err(s->client, err, "the stream's channel is corrupt");
		/* The engine waits for room in a full output ring: it has some now. */
		if (__atomic_load_n(&s->chan.hdr->engine_wants_room, __ATOMIC_SEQ_CST)) {
			__atomic_store_n(&s->chan.hdr->engine_wants_room, 0, __ATOMIC_RELAXED);
			skv_wake(s->engine_word, s->engine_efd);
		}
		uint32_t n = m.n < SKV_CHAN_DATA ? m.n : SKV_CHAN_DATA;
		int texty = m.type == SKV_CHAN_TOKEN || m.type == SKV_CHAN_ECHO ||
			    m.type == SKV_CHAN_ERROR;
		uint32_t flags = texty ? m.flags : 0;
		if ((flags & SKV_CHAN_CONTINUES) && !s->assembling && s->resync)
			continue; /* the rest of an event the previous client had begun */
		s->resync = 0;
		if (flags & SKV_CHAN_CONTINUES) {
			if (!s->assembling)
				return client_err(s->client, -EPROTO,
						  "the engine sent a continuation of nothing");
		} else {
			s->head = m;
			s->buf_len = 0;
		}
		if (stream_append(s, m.data, n) < 0)
			return client_err(s->client, -ENOMEM, "out of memory");
		s->assembling = (flags & SKV_CHAN_MORE) != 0;
		if (s->assembling)
			continue;
		break;
	}
	const struct skv_chan_msg *m = &s->head;
	memset(ev, 0, sizeof(*ev));
	ev->text = s->buf;
	ev->len = s->buf_len;
	switch (m->type) {
	case SKV_CHAN_TOKEN:
	case SKV_CHAN_ECHO:
		ev->type = m->type == SKV_CHAN_TOKEN ? SKV_CLIENT_EV_TOKEN : SKV_CLIENT_EV_PROMPT;
		ev->token = (int32_t)m->arg;
		break;
	case SKV_CHAN_DONE:
		ev->type = SKV_CLIENT_EV_DONE;
		ev->count = m->arg;
		ev->reason = m->flags & SKV_CHAN_DONE_MASK;
		if (s->buf_len >= sizeof(uint64_t)) {
			memcpy(&s->tokens, s->buf, sizeof(uint64_t));
			s->tokens_known = 1;
		}
		ev->len = 0;
		break;
	case SKV_CHAN_SCORED:
		ev->type = SKV_CLIENT_EV_SCORED;
		ev->count = m->arg;
		if (s->buf_len >= sizeof(double))
			memcpy(&ev->nll, s->buf, sizeof(double));
		ev->len = 0;
		break;
	case SKV_CHAN_ERROR:
		ev->type = SKV_CLIENT_EV_ERROR;
		ev->error = (int)(int64_t)m->arg;
		if (ev->error >= 0)
			ev->error = -EPROTO;
		break;
	default:
		return client_err(s->client, -EPROTO, "unknown message type %u from the engine",
				  m->type);
	}
	if (ev->type >= SKV_CLIENT_EV_DONE) {
		if (s->pending)
			s->pending--;
		__atomic_store_n(&s->chan.hdr->requests_ended, s->chan.hdr->requests_ended + 1,
				 __ATOMIC_RELAXED);
	}
	if (ev->type == SKV_CLIENT_EV_ERROR)
		client_err(s->client, ev->error, "request failed: %s", s->buf);
	return 1;
}

/* Event-loop mode: announce that we sleep so that engines write our eventfd, after draining
 * it. If something arrived meanwhile, make the fd readable ourselves: the application polls
 * it next and must not miss that. */
static void client_arm(struct skv_client *c)
{
	client_poll_control(c);
	if (__atomic_load_n(&c->word->sleeping, __ATOMIC_SEQ_CST) == SKV_SLEEP_EVENTFD)
		return; /* armed, and no engine claimed it since: nothing new */
	uint64_t v;
	if (read(c->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return;
	__atomic_store_n(&c->word->sleeping, SKV_SLEEP_EVENTFD, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (client_any_ready(c)) {
		uint32_t expect = SKV_SLEEP_EVENTFD;
		if (__atomic_compare_exchange_n(&c->word->sleeping, &expect, SKV_SLEEP_AWAKE, 0,
						__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
			v = 1;
			if (write(c->efd, &v, sizeof(v)) < 0)
				return;
		}
		/* else an engine claimed the wake-up: it writes the eventfd */
	}
}

/* Wait until ready(arg) or the deadline. Returns 1 if ready, 0 on time-out, or an error (the
 * daemon gone is seen by the caller through the streams' failed state). */
static int client_block(struct skv_client *c, int (*ready)(void *), void *arg, int64_t deadline)
{
	for (;;) {
		if (ready(arg))
			return 1;
		if (c->gone)
			return ready(arg);
		int64_t now = client_now_ns();
		if (now >= deadline)
			return 0;
		int64_t slice = deadline - now < CLIENT_SLICE_NS ? deadline - now : CLIENT_SLICE_NS;
		if (c->epfd < 0) {
			/* Sleep in slices: on the futex fallback a control message (FAILED, a
			 * hang-up) does not wake us, so look at the socket between slices. */
			int w = skv_waiter_wait(c->waiter, ready, arg, c->spin_ns, slice);
			if (w == 2 || w == 0)
				client_poll_control(c);
			else if (w < 0 && w != -EINTR)
				return client_err(c, w, "waiting failed: %s", skv_strerror(w));
			continue;
		}
		/* Event-loop mode: spin, then arm and poll our epoll fd. */
		int64_t spin_end = client_now_ns() + c->spin_ns;
		while (!ready(arg) && client_now_ns() < spin_end)
			skv_cpu_relax();
		if (ready(arg))
			return 1;
		client_arm(c);
		if (ready(arg))
			return 1;
		struct pollfd pfd = { .fd = c->epfd, .events = POLLIN };
		if (poll(&pfd, 1, (int)(slice / 1000000) + 1) < 0 && errno != EINTR)
			return client_err(c, -errno, "poll: %s", strerror(errno));
		client_poll_control(c);
	}
}

int skv_client_stream_read(skv_client_stream *s, struct skv_client_event *ev, int timeout_ms)
{
	struct skv_client *c = s->client;
	int64_t deadline = client_deadline(timeout_ms);
	for (;;) {
		int r = stream_take(s, ev);
		if (r)
			return r;
		if (s->failed)
			return client_failed(s);
		if (timeout_ms == 0) {
			if (c->epfd >= 0)
				client_arm(c);
			else
				client_poll_control(c);
			r = stream_take(s, ev);
			if (r)
				return r;
			return s->failed ? client_failed(s) : 0;
		}
		r = client_block(c, stream_ready, s, deadline);
		if (r < 0)
			return r;
		if (r == 0 && !stream_ready(s))
			return 0;
	}
}

int skv_client_stream_run(skv_client_stream *s, skv_client_event_fn fn, void *arg)
{
	if (!s->pending)
		return client_err(s->client, -EINVAL, "no request in progress");
	for (;;) {
		struct skv_client_event ev;
		int r = skv_client_stream_read(s, &ev, -1);
		if (r < 0)
			return r;
		int stop = fn(s, &ev, arg);
		if (stop)
			return stop;
		if (ev.type >= SKV_CLIENT_EV_DONE && !s->pending)
			return 0;
	}
}

/* The next stream with something to read, from the cursor on (in turn). */
static struct skv_client_stream *client_next_ready(struct skv_client *c)
{
	for (size_t k = 0; k < c->n_streams; k++) {
		size_t i = (c->cursor + k) % c->n_streams;
		if (stream_ready(c->streams[i])) {
			c->cursor = i + 1;
			return c->streams[i];
		}
	}
	return NULL;
}

int skv_client_wait(skv_client *c, skv_client_stream **ready, int timeout_ms)
{
	int64_t deadline = client_deadline(timeout_ms);
	for (;;) {
		struct skv_client_stream *s = client_next_ready(c);
		if (s) {
			*ready = s;
			return 1;
		}
		if (c->gone && !c->n_streams)
			return client_err(c, -EPIPE, "skv-cached went away");
		if (timeout_ms == 0) {
			if (c->epfd >= 0)
				client_arm(c);
			else
				client_poll_control(c);
			s = client_next_ready(c);
			if (s) {
				*ready = s;
				return 1;
			}
			return c->gone ? client_err(c, -EPIPE, "skv-cached went away") : 0;
		}
		int r = client_block(c, client_any_ready, c, deadline);
		if (r < 0)
			return r;
		if (r == 0 && !client_any_ready(c))
			return c->gone ? client_err(c, -EPIPE, "skv-cached went away") : 0;
	}
}

int skv_client_fd(skv_client *c)
{
	if (c->epfd >= 0)
		return c->epfd;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		return client_err(c, -errno, "epoll_create1: %s", strerror(errno));
	struct epoll_event e1 = { .events = EPOLLIN, .data.fd = c->efd };
	struct epoll_event e2 = { .events = EPOLLIN, .data.fd = c->sock };
	if (epoll_ctl(ep, EPOLL_CTL_ADD, c->efd, &e1) < 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, c->sock, &e2) < 0) {
		int err = -errno;
		close(ep);
		return client_err(c, err, "epoll_ctl: %s", strerror(-err));
	}
	/* From now on the application polls: no io_uring read may drain the eventfd. */
	skv_waiter_free(c->waiter);
	c->waiter = NULL;
	c->epfd = ep;
	__atomic_store_n(&c->word->sleeping, SKV_SLEEP_AWAKE, __ATOMIC_SEQ_CST);
	client_arm(c);
	return ep;
}

int skv_client_stats(skv_client *c, struct skv_client_stats *out)
{
	if (c->gone)
		return client_err(c, -EPIPE, "skv-cached went away");
	struct skv_msg_stream req = { 0 };
	if (skv_msg_send(c->sock, SKV_MSG_STATS_REQ, c->seq++, &req, NULL, 0) < 0) {
		client_fail_all(c, "skv-cached went away");
		return client_err(c, -EPIPE, "skv-cached went away");
	}
	struct client_reply r;
	for (;;) {
		int type = client_control(c, CLIENT_REPLY_TIMEOUT_MS, &r);
		if (type == SKV_MSG_STATS) {
			memset(out, 0, sizeof(*out));
			out->streams = r.stats.streams;
			out->streams_opened = r.stats.streams_opened;
			out->streams_queued = r.stats.streams_queued;
			out->engines = r.stats.engines;
			out->engines_ready = r.stats.engines_ready;
			out->arena_bytes = r.stats.arena_bytes;
			out->arena_used_bytes = r.stats.arena_used_bytes;
			memcpy(out->engine_pid, r.stats.engine_pid, sizeof(out->engine_pid));
			return 0;
		}
		if (type == SKV_MSG_ERROR) {
			r.error.text[sizeof(r.error.text) - 1] = '\0';
			return client_err(c, r.error.code < 0 ? r.error.code : -EPROTO, "%s",
					  r.error.text);
		}
		if (type < 0)
			return client_err(c, -EPIPE, "skv-cached went away");
		if (type == 0)
			return client_err(c, -ETIMEDOUT, "skv-cached did not answer");
	}
}
