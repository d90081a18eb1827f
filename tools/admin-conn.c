#include "admin-conn.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"
#include "skv-error.h"
#include "tokenizer.h"

/* Every body the daemon may send an admin peer. */
union conn_body {
	struct skv_msg_hello_ok hello_ok;
	struct skv_msg_error error;
	struct skv_admin_server server;
	struct skv_admin_stream stream;
	struct skv_admin_arena arena;
	struct skv_admin_engine engine;
	struct skv_admin_tokens tokens;
	struct skv_admin_end end;
	struct skv_admin_event event;
	struct skv_admin_hist hist;
};

#define TERMINATE(field) ((field)[sizeof(field) - 1] = '\0')

/* One message within timeout_ms (< 0: no limit). 1 with h/body filled (fds closed), or < 0. */
static int conn_recv(struct admin_conn *c, struct skv_msg_hdr *h, union conn_body *body,
		     int timeout_ms, char *msg, size_t msg_len)
{
	struct pollfd pfd = { .fd = c->sock, .events = POLLIN };
	int r;
	while ((r = poll(&pfd, 1, timeout_ms)) < 0 && errno == EINTR)
		;
	if (r < 0)
		return -errno;
	if (r == 0)
		return skv_errorf(msg, msg_len, -ETIMEDOUT,
				   "skv-cached at %s did not answer within %d s", c->path,
				   ADMIN_REPLY_TIMEOUT_MS / 1000);
	int fds[SKV_MSG_MAX_FDS], n_fds = 0;
	int got = skv_msg_recv(c->sock, h, body, sizeof(*body), fds, &n_fds);
	for (int i = 0; i < n_fds; i++)
		close(fds[i]);
	if (got == 0 || got == -ECONNRESET || got == -EPIPE)
		return skv_errorf(msg, msg_len, -EPIPE, "skv-cached at %s went away", c->path);
	if (got < 0)
		return skv_errorf(msg, msg_len, got == -SKV_EFORMAT || got == -SKV_EVERSION ?
				   -EPROTO : got, "bad message from skv-cached at %s: %s", c->path,
				   skv_strerror(got));
	if (h->type == SKV_MSG_ERROR) {
		TERMINATE(body->error.text);
		c->error_code = body->error.code;
		return skv_errorf(msg, msg_len, -EREMOTEIO, "%s", body->error.text);
	}
	return 1;
}

static int conn_unexpected(const struct admin_conn *c, const struct skv_msg_hdr *h,
			   const char *waiting_for, char *msg, size_t msg_len)
{
	return skv_errorf(msg, msg_len, -EPROTO, "skv-cached at %s sent %s while we waited for %s",
			   c->path, skv_msg_name(h->type), waiting_for);
}

int admin_connect(struct admin_conn *c, const char *path, char *msg, size_t msg_len)
{
	memset(c, 0, sizeof(*c));
	c->sock = -1;
	c->seq = 1;
	if (snprintf(c->path, sizeof(c->path), "%s", path) >= (int)sizeof(c->path))
		return skv_errorf(msg, msg_len, -ENAMETOOLONG, "%s: socket path too long", path);
	int fd = skv_msg_connect(path);
	if (fd == -ENOENT || fd == -ECONNREFUSED)
		return skv_errorf(msg, msg_len, fd, "no daemon at %s (is skv-cached running?)",
				   path);
	if (fd < 0)
		return skv_errorf(msg, msg_len, fd, "cannot connect to skv-cached at %s: %s", path,
				   strerror(-fd));
	c->sock = fd;
	struct ucred cred;
	socklen_t cred_len = sizeof(cred);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) == 0)
		c->daemon_pid = cred.pid;

	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_ADMIN, .pid = (uint32_t)getpid(),
				       .engine_id = UINT32_MAX, .node = UINT32_MAX };
	int err = skv_msg_send(fd, SKV_MSG_HELLO, c->seq++, &hello, NULL, 0);
	if (err < 0 && err != -EPIPE && err != -ECONNRESET) {
		admin_disconnect(c);
		return skv_errorf(msg, msg_len, err, "cannot send to skv-cached at %s: %s", path,
				   strerror(-err));
	}
	struct skv_msg_hdr h;
	union conn_body body;
	/* A daemon that refuses us (permission) answers ERROR and hangs up at once; our HELLO
	 * may then fail with EPIPE while its ERROR still waits to be read. */
	err = conn_recv(c, &h, &body, ADMIN_REPLY_TIMEOUT_MS, msg, msg_len);
	if (err == -EREMOTEIO) {
		char why[SKV_MSG_TEXT];
		snprintf(why, sizeof(why), "%s", body.error.text);
		admin_disconnect(c);
		return skv_errorf(msg, msg_len, -EREMOTEIO, "skv-cached at %s refused us: %s", path,
				   why);
	}
	if (err == 1 && h.type != SKV_MSG_HELLO_OK)
		err = conn_unexpected(c, &h, "HELLO_OK", msg, msg_len);
	if (err == 1 && body.hello_ok.major != SKV_PROTO_MAJOR)
		err = skv_errorf(msg, msg_len, -EPROTO,
				  "skv-cached at %s speaks protocol %u.%u; skv-admin speaks %u.%u",
				  path, body.hello_ok.major, body.hello_ok.minor, SKV_PROTO_MAJOR,
				  SKV_PROTO_MINOR);
	if (err < 0) {
		admin_disconnect(c);
		return err;
	}
	c->instance = body.hello_ok.instance;
	TERMINATE(body.hello_ok.model_path);
	TERMINATE(body.hello_ok.tokenizer_path);
	snprintf(c->model_path, sizeof(c->model_path), "%s", body.hello_ok.model_path);
	snprintf(c->tokenizer_path, sizeof(c->tokenizer_path), "%s",
		 body.hello_ok.tokenizer_path);
	return 0;
}

void admin_disconnect(struct admin_conn *c)
{
	if (c->sock >= 0)
		close(c->sock);
	c->sock = -1;
}

static int conn_request(struct admin_conn *c, uint32_t what, uint64_t stream_id, char *msg,
			size_t msg_len)
{
	if (c->sock < 0)
		return skv_errorf(msg, msg_len, -EPIPE, "not connected to skv-cached at %s",
				   c->path);
	struct skv_msg_admin_req req = { .what = what, .stream_id = stream_id };
	int err = skv_msg_send(c->sock, SKV_MSG_ADMIN_REQ, c->seq++, &req, NULL, 0);
	if (err == -EPIPE || err == -ECONNRESET)
		return skv_errorf(msg, msg_len, -EPIPE, "skv-cached at %s went away", c->path);
	if (err < 0)
		return skv_errorf(msg, msg_len, err, "cannot send to skv-cached at %s: %s", c->path,
				   strerror(-err));
	return 0;
}

/* A listing of rows of one type closed by ADMIN_END: the rows are appended to *rows (row_size
 * bytes each, *n of them), capped at ADMIN_MAX_ROWS. */
static int conn_listing(struct admin_conn *c, uint32_t what, uint16_t row_type, size_t row_size,
			void **rows, size_t *n, char *msg, size_t msg_len)
{
	int err = conn_request(c, what, 0, msg, msg_len);
	if (err < 0)
		return err;
	size_t cap = 0;
	for (;;) {
		struct skv_msg_hdr h;
		union conn_body body;
		err = conn_recv(c, &h, &body, ADMIN_REPLY_TIMEOUT_MS, msg, msg_len);
		if (err < 0)
			return err;
		if (h.type == SKV_MSG_ADMIN_END) {
			if (body.end.count != *n)
				return skv_errorf(msg, msg_len, -EPROTO,
						   "skv-cached sent %zu %s rows but its ADMIN_END "
						   "counts %llu", *n, skv_msg_name(row_type),
						   (unsigned long long)body.end.count);
			return 0;
		}
		if (h.type != row_type)
			return conn_unexpected(c, &h, skv_msg_name(row_type), msg, msg_len);
		if (*n >= ADMIN_MAX_ROWS)
			return skv_errorf(msg, msg_len, -EPROTO,
					   "skv-cached sent more than %u %s rows", ADMIN_MAX_ROWS,
					   skv_msg_name(row_type));
		if (*n == cap) {
			cap = cap ? 2 * cap : 16;
			void *grown = realloc(*rows, cap * row_size);
			if (!grown)
				return skv_errorf(msg, msg_len, -ENOMEM, "out of memory");
			*rows = grown;
		}
		memcpy((char *)*rows + *n * row_size, &body, row_size);
		(*n)++;
	}
}

void admin_snapshot_free(struct admin_snapshot *snap)
{
	free(snap->streams);
	free(snap->arenas);
	free(snap->engines);
	memset(snap, 0, sizeof(*snap));
}

int admin_fetch(struct admin_conn *c, unsigned want, struct admin_snapshot *snap, char *msg,
		size_t msg_len)
{
	memset(snap, 0, sizeof(*snap));
	int err = conn_request(c, SKV_ADMIN_SERVER, 0, msg, msg_len);
	struct skv_msg_hdr h;
	union conn_body body;
	if (err == 0)
		err = conn_recv(c, &h, &body, ADMIN_REPLY_TIMEOUT_MS, msg, msg_len);
	if (err == 1 && h.type != SKV_MSG_ADMIN_SERVER)
		err = conn_unexpected(c, &h, "ADMIN_SERVER", msg, msg_len);
	if (err < 0)
		return err;
	snap->server = body.server;
	TERMINATE(snap->server.version);
	TERMINATE(snap->server.model_path);
	TERMINATE(snap->server.socket_path);
	if (snap->server.instance != c->instance)
		return skv_errorf(msg, msg_len, -EPROTO,
				   "ADMIN_SERVER names instance %016llx, HELLO_OK named %016llx",
				   (unsigned long long)snap->server.instance,
				   (unsigned long long)c->instance);

	void *rows;
	if (want & ADMIN_WANT_STREAMS) {
		rows = NULL;
		err = conn_listing(c, SKV_ADMIN_STREAMS, SKV_MSG_ADMIN_STREAM,
				   sizeof(struct skv_admin_stream), &rows, &snap->n_streams, msg,
				   msg_len);
		snap->streams = rows;
		if (err < 0)
			goto fail;
	}
	if (want & ADMIN_WANT_ARENAS) {
		rows = NULL;
		err = conn_listing(c, SKV_ADMIN_ARENAS, SKV_MSG_ADMIN_ARENA,
				   sizeof(struct skv_admin_arena), &rows, &snap->n_arenas, msg,
				   msg_len);
		snap->arenas = rows;
		if (err < 0)
			goto fail;
		for (size_t i = 0; i < snap->n_arenas; i++)
			TERMINATE(snap->arenas[i].backing_desc);
	}
	if (want & ADMIN_WANT_ENGINES) {
		rows = NULL;
		err = conn_listing(c, SKV_ADMIN_ENGINES, SKV_MSG_ADMIN_ENGINE,
				   sizeof(struct skv_admin_engine), &rows, &snap->n_engines, msg,
				   msg_len);
		snap->engines = rows;
		if (err < 0)
			goto fail;
		for (size_t i = 0; i < snap->n_engines; i++)
			TERMINATE(snap->engines[i].cpus);
	}
	if (want & ADMIN_WANT_HIST) {
		/* A daemon from before the histograms answers ERROR and keeps the connection. */
		err = conn_request(c, SKV_ADMIN_HISTOGRAMS, 0, msg, msg_len);
		if (err == 0)
			err = conn_recv(c, &h, &body, ADMIN_REPLY_TIMEOUT_MS, msg, msg_len);
		if (err == 1 && h.type != SKV_MSG_ADMIN_HIST)
			err = conn_unexpected(c, &h, "ADMIN_HIST", msg, msg_len);
		if (err == 1) {
			snap->hist = body.hist;
			snap->have_hist = 1;
		} else if (err != -EREMOTEIO) {
			goto fail;
		}
	}
	return 0;
fail:
	admin_snapshot_free(snap);
	return err;
}

void admin_stream_detail_free(struct admin_stream_detail *d)
{
	free(d->sink_ids);
	free(d->window_ids);
	memset(d, 0, sizeof(*d));
}

/* One ADMIN_TOKENS chunk into its part; chunks of a part must come in order. A part whose size
 * or first position differs from the stream's row sets *torn: the daemon took the row and the
 * ids from two snapshots of the ring, and the engine appended in between. */
static int conn_tokens_chunk(struct admin_stream_detail *d, const struct skv_admin_tokens *t,
			     int *torn, char *msg, size_t msg_len)
{
	if (t->stream_id != d->row.id || t->part > 1 || t->n > SKV_ADMIN_TOKENS_MAX ||
	    t->total > ADMIN_MAX_PART_TOKENS || t->offset > t->total ||
	    t->n > t->total - t->offset)
		return skv_errorf(msg, msg_len, -EPROTO,
				   "bad ADMIN_TOKENS chunk: stream %llu part %u offset %u n %u of %u",
				   (unsigned long long)t->stream_id, t->part, t->offset, t->n,
				   t->total);
	int32_t **ids = t->part == 0 ? &d->sink_ids : &d->window_ids;
	uint32_t *have = t->part == 0 ? &d->n_sink : &d->n_window;
	uint32_t *total = t->part == 0 ? &d->sink_total : &d->window_total;
	uint64_t *first = t->part == 0 ? &d->sink_first_pos : &d->window_first_pos;
	if (!*ids) {
		if (t->offset != 0)
			return skv_errorf(msg, msg_len, -EPROTO,
					   "ADMIN_TOKENS part %u starts at offset %u", t->part,
					   t->offset);
		*ids = calloc(t->total ? t->total : 1, sizeof(int32_t));
		if (!*ids)
			return skv_errorf(msg, msg_len, -ENOMEM, "out of memory");
		*first = t->first_pos;
		*total = t->total;
		*have = 0;
		uint32_t row_fill = t->part == 0 ? d->row.sink_fill : d->row.window_fill;
		uint64_t row_first = t->part == 0 ? 0 : d->row.window_start;
		if (t->total != row_fill || (t->total && t->first_pos != row_first))
			*torn = 1;
	}
	if (t->total != *total || t->offset != *have || t->first_pos != *first)
		return skv_errorf(msg, msg_len, -EPROTO,
				   "ADMIN_TOKENS part %u: offset %u of %u (first position %llu) does "
				   "not follow %u ids of %u at position %llu",
				   t->part, t->offset, t->total, (unsigned long long)t->first_pos,
				   *have, *total, (unsigned long long)*first);
	memcpy(*ids + t->offset, t->ids, (size_t)t->n * sizeof(int32_t));
	*have += t->n;
	return 0;
}

/* One SKV_ADMIN_STREAM exchange; -EAGAIN when its row and ids disagree. */
static int conn_fetch_stream_once(struct admin_conn *c, uint64_t stream_id,
				  struct admin_stream_detail *d, char *msg, size_t msg_len)
{
	memset(d, 0, sizeof(*d));
	int err = conn_request(c, SKV_ADMIN_STREAM, stream_id, msg, msg_len);
	if (err < 0)
		return err;
	int have_row = 0, torn = 0;
	for (;;) {
		struct skv_msg_hdr h;
		union conn_body body;
		err = conn_recv(c, &h, &body, ADMIN_REPLY_TIMEOUT_MS, msg, msg_len);
		if (err < 0)
			goto fail;
		if (!have_row) {
			if (h.type != SKV_MSG_ADMIN_STREAM) {
				err = conn_unexpected(c, &h, "ADMIN_STREAM", msg, msg_len);
				goto fail;
			}
			d->row = body.stream;
			have_row = 1;
			if (d->row.id != stream_id) {
				err = skv_errorf(msg, msg_len, -EPROTO,
						  "asked for stream %llu, skv-cached answered with "
						  "stream %llu", (unsigned long long)stream_id,
						  (unsigned long long)d->row.id);
				goto fail;
			}
			continue;
		}
		if (h.type == SKV_MSG_ADMIN_END)
			break;
		if (h.type != SKV_MSG_ADMIN_TOKENS) {
			err = conn_unexpected(c, &h, "ADMIN_TOKENS or ADMIN_END", msg, msg_len);
			goto fail;
		}
		err = conn_tokens_chunk(d, &body.tokens, &torn, msg, msg_len);
		if (err < 0)
			goto fail;
	}
	/* Parts the daemon began must be complete; parts it sent nothing for are empty. */
	if ((d->sink_ids && d->n_sink != d->sink_total) ||
	    (d->window_ids && d->n_window != d->window_total)) {
		err = skv_errorf(msg, msg_len, -EPROTO,
				  "stream %llu: skv-cached sent %u of %u sink ids and %u of %u "
				  "window ids", (unsigned long long)stream_id, d->n_sink,
				  d->sink_total, d->n_window, d->window_total);
		goto fail;
	}
	if ((!d->sink_ids && d->row.sink_fill) || (!d->window_ids && d->row.window_fill))
		torn = 1;
	if (torn) {
		err = skv_errorf(msg, msg_len, -EAGAIN,
				  "stream %llu changed between its row (%u sinks, %u in the window "
				  "from %llu) and its ids (%u, %u from %llu) in %d reads; try again",
				  (unsigned long long)stream_id, d->row.sink_fill, d->row.window_fill,
				  (unsigned long long)d->row.window_start, d->n_sink, d->n_window,
				  (unsigned long long)d->window_first_pos, ADMIN_STREAM_TRIES);
		goto fail;
	}
	return 0;
fail:
	admin_stream_detail_free(d);
	return err;
}

int admin_fetch_stream(struct admin_conn *c, uint64_t stream_id, struct admin_stream_detail *d,
		       char *msg, size_t msg_len)
{
	int err = -EAGAIN;
	for (int tries = 0; tries < ADMIN_STREAM_TRIES && err == -EAGAIN; tries++)
		err = conn_fetch_stream_once(c, stream_id, d, msg, msg_len);
	return err;
}

int admin_watch_start(struct admin_conn *c, char *msg, size_t msg_len)
{
	return conn_request(c, SKV_ADMIN_WATCH, 0, msg, msg_len);
}

int admin_watch_next(struct admin_conn *c, struct skv_admin_event *ev, int timeout_ms, char *msg,
		     size_t msg_len)
{
	struct pollfd pfd = { .fd = c->sock, .events = POLLIN };
	int r = poll(&pfd, 1, timeout_ms);
	if (r < 0 && errno == EINTR)
		return 0;
	if (r < 0)
		return -errno;
	if (r == 0)
		return 0;
	struct skv_msg_hdr h;
	union conn_body body;
	int err = conn_recv(c, &h, &body, 0, msg, msg_len);
	if (err < 0)
		return err;
	if (h.type != SKV_MSG_ADMIN_EVENT)
		return conn_unexpected(c, &h, "ADMIN_EVENT", msg, msg_len);
	*ev = body.event;
	TERMINATE(ev->text);
	return 1;
}

static int conn_file_exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int admin_tokenizer_open(const struct admin_conn *c, const char *override,
			 struct skv_model **model, struct skv_tokenizer **tok, char *msg,
			 size_t msg_len)
{
	*model = NULL;
	*tok = NULL;
	if (!c->model_path[0])
		return skv_errorf(msg, msg_len, -ENOENT,
				   "skv-cached did not name its model in HELLO_OK");
	/* The daemon's paths are relative to its own working directory. */
	char model_path[PATH_MAX], guess[PATH_MAX];
	if (c->model_path[0] != '/' && c->daemon_pid > 0)
		snprintf(model_path, sizeof(model_path), "/proc/%d/cwd/%s", (int)c->daemon_pid,
			 c->model_path);
	else
		snprintf(model_path, sizeof(model_path), "%s", c->model_path);
	int err = skv_model_open(model_path, model, msg, msg_len);
	if (err < 0)
		return err;
	int32_t vocab = (*model)->cfg.vocab_size;
	if (override || c->tokenizer_path[0]) {
		const char *path = override ? override : c->tokenizer_path;
		if (!override && path[0] != '/' && c->daemon_pid > 0) {
			snprintf(guess, sizeof(guess), "/proc/%d/cwd/%s", (int)c->daemon_pid, path);
			path = guess;
		}
		err = skv_tokenizer_load(path, vocab, tok, msg, msg_len);
	} else if ((*model)->gguf) {
		err = skv_tokenizer_from_gguf((*model)->gguf, vocab, tok, msg, msg_len);
	} else {
		/* llama2.c's convention, as skv: tok<vocab>.bin, or tokenizer.bin (32k vocab). */
		const char *slash = strrchr(model_path, '/');
		int dir_len = slash ? (int)(slash - model_path) : 1;
		const char *dir = slash ? model_path : ".";
		snprintf(guess, sizeof(guess), "%.*s/tok%d.bin", dir_len, dir, vocab);
		if (!conn_file_exists(guess))
			snprintf(guess, sizeof(guess), "%.*s/tokenizer.bin", dir_len, dir);
		if (!conn_file_exists(guess))
			err = skv_errorf(msg, msg_len, -ENOENT,
					  "%s: no tokenizer next to the model (tok%d.bin or "
					  "tokenizer.bin); pass --tokenizer PATH", c->model_path,
					  vocab);
		else
			err = skv_tokenizer_load(guess, vocab, tok, msg, msg_len);
	}
	if (err < 0) {
		skv_model_close(*model);
		*model = NULL;
		*tok = NULL;
	}
	return err;
}
