#include "skv-client.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "skv-error.h"
#include "wake.h"

/* How long a waiting client spins before it sleeps. A stream's tokens come every few tens of
 * microseconds on the shipped model; spinning through that gap keeps the engine from paying a
 * wake-up system call per token (measured in tools/README.md). SKV_CLIENT_SPIN_US overrides. */
#define CLIENT_SPIN_NS_DEFAULT 200000
#define CLIENT_REPLY_TIMEOUT_MS 30000
#define CLIENT_OPEN_RETRIES 200
#define CLIENT_SLICE_NS 100000000ll /* 100 ms */
#define CLIENT_OPEN_RETRY_US 50000

struct skv_client_stream {
	struct skv_client *client;
	uint64_t id;
	void *chan_map;
	size_t chan_bytes;
	struct skv_chan chan;
	struct skv_wake_word *doorbell; /* the engine's */
	int engine_efd;
	int efd;                        /* ours: the engine writes it to wake us */
	struct skv_waiter *waiter;
	int64_t sink_slots, window_slots;
	uint64_t kv_bytes;
	int failed;                     /* -errno once the daemon said it failed */
	char why[SKV_MSG_TEXT];
	struct skv_client_stream *next;
};

struct skv_client {
	int sock;
	int64_t spin_ns;
	uint32_t seq;
	int gone;                       /* the daemon hung up */
	struct skv_client_stream *streams;
};

void skv_client_params_default(struct skv_stream_params *p)
{
	memset(p, 0, sizeof(*p));
	p->policy = 0; /* sink */
	p->sink_slots = -1;
	p->window_slots = -1;
	p->top_p = 0.9f;
}

int skv_client_connect(const char *socket_path, struct skv_client **out, char *msg,
		       size_t msg_len)
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
	for (int i = 0; i < n_fds; i++)
		close(fds[i]);
	if (err == 1 && h.type == SKV_MSG_ERROR) {
		body.error.text[sizeof(body.error.text) - 1] = '\0';
		close(fd);
		return skv_errorf(msg, msg_len, body.error.code < 0 ? body.error.code : -EPROTO,
				     "skv-cached refused us: %s", body.error.text);
	}
	if (err != 1 || h.type != SKV_MSG_HELLO_OK) {
		close(fd);
		if (err == 1 || err == 0)
			err = -EPROTO;
		return skv_errorf(msg, msg_len, err, "no valid answer from skv-cached at %s: %s",
				     socket_path, skv_strerror(err));
	}
	struct skv_client *c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return -ENOMEM;
	}
	c->sock = fd;
	c->seq = 1;
	c->spin_ns = CLIENT_SPIN_NS_DEFAULT;
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
	for (struct skv_client_stream *s = c->streams; s; s = s->next)
		if (s->id == id)
			return s;
	return NULL;
}

static void client_fail_all(struct skv_client *c, const char *why)
{
	c->gone = 1;
	for (struct skv_client_stream *s = c->streams; s; s = s->next)
		if (!s->failed) {
			s->failed = -EPIPE;
			snprintf(s->why, sizeof(s->why), "%s", why);
		}
}

/* Take one control message (blocking) and apply it. Returns its type, or <= 0 (hang-up or
 * error: every stream is failed). opened/error receive those replies when non-NULL. */
static int client_control_stats(struct skv_client *c, int timeout_ms,
				struct skv_msg_opened *opened, int *fds, int *n_fds,
				struct skv_msg_error *error, struct skv_msg_stats *stats);

static int client_control(struct skv_client *c, int timeout_ms, struct skv_msg_opened *opened,
			  int *fds, int *n_fds, struct skv_msg_error *error)
{
	return client_control_stats(c, timeout_ms, opened, fds, n_fds, error, NULL);
}

static int client_control_stats(struct skv_client *c, int timeout_ms,
				struct skv_msg_opened *opened, int *fds, int *n_fds,
				struct skv_msg_error *error, struct skv_msg_stats *stats)
{
	struct pollfd pfd = { .fd = c->sock, .events = POLLIN };
	int r = poll(&pfd, 1, timeout_ms);
	if (r == 0)
		return -ETIMEDOUT;
	struct skv_msg_hdr h;
	union {
		struct skv_msg_opened opened;
		struct skv_msg_failed failed;
		struct skv_msg_stream stream;
		struct skv_msg_error error;
		struct skv_msg_stats stats;
	} body;
	int local_fds[SKV_MSG_MAX_FDS], local_n = 0;
	int got = skv_msg_recv(c->sock, &h, &body, sizeof(body), fds ? fds : local_fds,
			       n_fds ? n_fds : &local_n);
	if (got <= 0) {
		client_fail_all(c, "skv-cached went away");
		return got ? got : -EPIPE;
	}
	if (!fds)
		for (int i = 0; i < local_n; i++)
			close(local_fds[i]);
	switch (h.type) {
	case SKV_MSG_OPENED:
		if (opened)
			*opened = body.opened;
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
		if (error)
			*error = body.error;
		break;
	case SKV_MSG_STATS:
		if (stats)
			*stats = body.stats;
		break;
	default:
		break;
	}
	return h.type;
}

static void client_stream_free(struct skv_client_stream *s)
{
	skv_waiter_free(s->waiter);
	if (s->chan_map)
		munmap(s->chan_map, s->chan_bytes);
	if (s->doorbell)
		munmap(s->doorbell, sizeof(*s->doorbell));
	if (s->engine_efd >= 0)
		close(s->engine_efd);
	if (s->efd >= 0)
		close(s->efd);
	free(s);
}

static int client_stream_open_once(struct skv_client *c, const struct skv_stream_params *params,
				   struct skv_client_stream **out, char *msg, size_t msg_len);

/* A daemon that has just started may have no engine ready yet (-EAGAIN): that is transient,
 * so retry for a while before giving up. */
int skv_client_stream_open(struct skv_client *c, const struct skv_stream_params *params,
			   struct skv_client_stream **out, char *msg, size_t msg_len)
{
	int err;
	for (int attempt = 0;; attempt++) {
		err = client_stream_open_once(c, params, out, msg, msg_len);
		if (err != -EAGAIN || attempt >= CLIENT_OPEN_RETRIES)
			return err;
		usleep(CLIENT_OPEN_RETRY_US);
	}
}

static int client_stream_open_once(struct skv_client *c, const struct skv_stream_params *params,
				   struct skv_client_stream **out, char *msg, size_t msg_len)
{
	if (c->gone)
		return skv_errorf(msg, msg_len, -EPIPE, "skv-cached went away");
	struct skv_client_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->client = c;
	s->engine_efd = -1;
	/* Non-blocking, as shm/wake.h recommends (io_uring polls it). */
	s->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->efd < 0) {
		int err = -errno;
		client_stream_free(s);
		return err;
	}
	struct skv_msg_open open = { .params = *params };
	int err = skv_msg_send(c->sock, SKV_MSG_OPEN, c->seq++, &open, &s->efd, 1);
	if (err < 0) {
		client_stream_free(s);
		client_fail_all(c, "skv-cached went away");
		return skv_errorf(msg, msg_len, -EPIPE, "skv-cached went away");
	}
	struct skv_msg_opened opened = { 0 };
	struct skv_msg_error error = { 0 };
	int fds[SKV_MSG_MAX_FDS], n_fds = 0;
	int type;
	do {
		n_fds = 0;
		type = client_control(c, CLIENT_REPLY_TIMEOUT_MS, &opened, fds, &n_fds, &error);
		if (type != SKV_MSG_OPENED)
			for (int i = 0; i < n_fds; i++)
				close(fds[i]);
	} while (type > 0 && type != SKV_MSG_OPENED && type != SKV_MSG_ERROR);
	if (type == SKV_MSG_ERROR) {
		client_stream_free(s);
		error.text[sizeof(error.text) - 1] = '\0';
		return skv_errorf(msg, msg_len, error.code < 0 ? error.code : -EPROTO, "%s",
				     error.text);
	}
	if (type != SKV_MSG_OPENED || n_fds != 3) {
		client_stream_free(s);
		for (int i = 0; type == SKV_MSG_OPENED && i < n_fds; i++)
			close(fds[i]);
		return skv_errorf(msg, msg_len, type < 0 ? type : -EPROTO,
				     "no valid answer to OPEN from skv-cached");
	}
	s->id = opened.stream_id;
	s->sink_slots = opened.sink_slots;
	s->window_slots = opened.window_slots;
	s->kv_bytes = opened.kv_bytes;
	s->chan_bytes = opened.channel_bytes;
	s->chan_map = mmap(NULL, s->chan_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
	s->doorbell = mmap(NULL, sizeof(*s->doorbell), PROT_READ | PROT_WRITE, MAP_SHARED, fds[1],
			   0);
	s->engine_efd = fds[2];
	close(fds[0]);
	close(fds[1]);
	err = 0;
	if (s->chan_map == MAP_FAILED || s->doorbell == MAP_FAILED) {
		if (s->chan_map == MAP_FAILED)
			s->chan_map = NULL;
		if (s->doorbell == MAP_FAILED)
			s->doorbell = NULL;
		err = skv_errorf(msg, msg_len, -errno, "cannot map the stream's channel");
	}
	if (!err) {
		err = skv_chan_attach(&s->chan, s->chan_map, s->chan_bytes, 0);
		if (err < 0)
			skv_errorf(msg, msg_len, err, "bad channel from skv-cached: %s",
				      skv_strerror(err));
	}
	if (!err)
		err = skv_waiter_new(SKV_WAIT_AUTO, &s->chan.out.hdr->wake, s->efd, NULL,
				     &s->waiter);
	if (err < 0) {
		/* The daemon has it: tell it to drop the stream. */
		struct skv_msg_stream m = { .stream_id = opened.stream_id };
		skv_msg_send(c->sock, SKV_MSG_CLOSE, c->seq++, &m, NULL, 0);
		client_stream_free(s);
		return err;
	}
	skv_waiter_watch_fd(s->waiter, c->sock);
	s->next = c->streams;
	c->streams = s;
	*out = s;
	return 0;
}

void skv_client_stream_info(const struct skv_client_stream *s, int64_t *sink_slots,
			    int64_t *window_slots, uint64_t *kv_bytes)
{
	if (sink_slots)
		*sink_slots = s->sink_slots;
	if (window_slots)
		*window_slots = s->window_slots;
	if (kv_bytes)
		*kv_bytes = s->kv_bytes;
}

/* Control messages that arrived while we slept (a FAILED, a hang-up). */
static void client_poll_control(struct skv_client *c)
{
	while (!c->gone) {
		struct pollfd pfd = { .fd = c->sock, .events = POLLIN };
		if (poll(&pfd, 1, 0) <= 0)
			return;
		if (client_control(c, 0, NULL, NULL, NULL, NULL) <= 0)
			return;
	}
}

static int client_failed(struct skv_client_stream *s, char *msg, size_t msg_len)
{
	return skv_errorf(msg, msg_len, -EPIPE, "stream %llu failed: %s",
			     (unsigned long long)s->id, s->why[0] ? s->why : "unknown reason");
}

static int client_has_room(void *arg)
{
	struct skv_client_stream *s = arg;
	return skv_ring_count(&s->chan.in) > 0;
}

static int client_has_output(void *arg)
{
	struct skv_client_stream *s = arg;
	return skv_ring_count(&s->chan.out) > 0;
}

static int client_push(struct skv_client_stream *s, const struct skv_chan_msg *m, char *msg,
		       size_t msg_len)
{
	for (;;) {
		if (s->failed)
			return client_failed(s, msg, msg_len);
		int err = skv_ring_push(&s->chan.in, m);
		if (err == 0)
			return 0;
		if (err != -EAGAIN)
			return skv_errorf(msg, msg_len, err, "the stream's channel is corrupt");
		/* Full: ask the engine to ring us when it frees a slot, and make sure it runs. */
		__atomic_store_n(&s->chan.hdr->client_wants_room, 1, __ATOMIC_SEQ_CST);
		skv_wake(s->doorbell, s->engine_efd);
		int w = skv_waiter_wait(s->waiter, client_has_room, s, s->client->spin_ns,
					CLIENT_SLICE_NS);
		if (w == 2 || w == 0)
			client_poll_control(s->client);
		else if (w < 0 && w != -EINTR)
			return w;
	}
}

int skv_client_stream_request(struct skv_client_stream *s, const char *text, size_t len,
			      uint32_t type, uint64_t arg, char *msg, size_t msg_len)
{
	return skv_client_stream_request_flags(s, text, len, type, arg, 0, msg, msg_len);
}

int skv_client_stream_request_flags(struct skv_client_stream *s, const char *text, size_t len,
				    uint32_t type, uint64_t arg, uint32_t flags, char *msg,
				    size_t msg_len)
{
	if (type != SKV_CHAN_GENERATE && type != SKV_CHAN_SCORE)
		return -EINVAL;
	for (size_t off = 0; off < len;) {
		struct skv_chan_msg m = { .type = SKV_CHAN_TEXT };
		size_t n = len - off < SKV_CHAN_DATA ? len - off : SKV_CHAN_DATA;
		memcpy(m.data, text + off, n);
		m.n = (uint32_t)n;
		int err = client_push(s, &m, msg, msg_len);
		if (err < 0)
			return err;
		off += n;
		/* Let the engine start on a long text while we are still sending it. */
		if (off % (SKV_CHAN_DATA * 256) == 0)
			skv_wake(s->doorbell, s->engine_efd);
	}
	struct skv_chan_msg end = { .type = type, .arg = arg, .flags = flags };
	int err = client_push(s, &end, msg, msg_len);
	if (err < 0)
		return err;
	skv_wake(s->doorbell, s->engine_efd);
	return 0;
}

int skv_client_stream_next(struct skv_client_stream *s, struct skv_chan_msg *out,
			   int64_t timeout_ns, char *msg, size_t msg_len)
{
	for (;;) {
		int err = skv_ring_pop(&s->chan.out, out);
		if (err == 0) {
			/* The engine waits for room in a full output ring: it has some now. */
			if (__atomic_load_n(&s->chan.hdr->engine_wants_room, __ATOMIC_SEQ_CST)) {
				__atomic_store_n(&s->chan.hdr->engine_wants_room, 0,
						 __ATOMIC_RELAXED);
				skv_wake(s->doorbell, s->engine_efd);
			}
			return 1;
		}
		if (err != -EAGAIN)
			return skv_errorf(msg, msg_len, err, "the stream's channel is corrupt");
		if (s->failed)
			return client_failed(s, msg, msg_len);
		/* Sleep in slices: on the futex fallback a control message (FAILED, a hang-up)
		 * does not wake us, so look at the socket between slices. */
		int64_t slice = timeout_ns < 0 || timeout_ns > CLIENT_SLICE_NS ? CLIENT_SLICE_NS
									     : timeout_ns;
		int w = skv_waiter_wait(s->waiter, client_has_output, s, s->client->spin_ns, slice);
		if (w == 2 || w == 0)
			client_poll_control(s->client);
		if (w == 0 && timeout_ns >= 0 && !client_has_output(s)) {
			timeout_ns -= slice;
			if (timeout_ns <= 0)
				return 0;
		} else if (w < 0 && w != -EINTR) {
			return w;
		}
	}
}

int skv_client_stats(struct skv_client *c, struct skv_msg_stats *out, char *msg, size_t msg_len)
{
	if (c->gone)
		return skv_errorf(msg, msg_len, -EPIPE, "skv-cached went away");
	struct skv_msg_stream req = { 0 };
	if (skv_msg_send(c->sock, SKV_MSG_STATS_REQ, c->seq++, &req, NULL, 0) < 0) {
		client_fail_all(c, "skv-cached went away");
		return skv_errorf(msg, msg_len, -EPIPE, "skv-cached went away");
	}
	struct skv_msg_error error = { 0 };
	for (;;) {
		int type = client_control_stats(c, CLIENT_REPLY_TIMEOUT_MS, NULL, NULL, NULL, &error,
						out);
		if (type == SKV_MSG_STATS)
			return 0;
		if (type == SKV_MSG_ERROR) {
			error.text[sizeof(error.text) - 1] = '\0';
			return skv_errorf(msg, msg_len, error.code < 0 ? error.code : -EPROTO,
					     "%s", error.text);
		}
		if (type <= 0)
			return skv_errorf(msg, msg_len, type ? type : -EPIPE,
					     "skv-cached went away");
	}
}

void skv_client_stream_close(struct skv_client_stream *s)
{
	if (!s)
		return;
	struct skv_client *c = s->client;
	struct skv_client_stream **l = &c->streams;
	while (*l && *l != s)
		l = &(*l)->next;
	if (*l)
		*l = s->next;
	if (!c->gone) {
		struct skv_msg_stream m = { .stream_id = s->id };
		if (skv_msg_send(c->sock, SKV_MSG_CLOSE, c->seq++, &m, NULL, 0) == 0) {
			/* Wait for CLOSED so that the KV is free when we return. */
			for (;;) {
				int type = client_control(c, CLIENT_REPLY_TIMEOUT_MS, NULL, NULL, NULL,
							  NULL);
				if (type <= 0 || type == SKV_MSG_CLOSED || type == SKV_MSG_ERROR ||
				    (type == SKV_MSG_FAILED && s->failed))
					break;
			}
		}
	}
	client_stream_free(s);
}

void skv_client_disconnect(struct skv_client *c)
{
	if (!c)
		return;
	while (c->streams)
		skv_client_stream_close(c->streams);
	close(c->sock);
	free(c);
}
