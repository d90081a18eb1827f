/* Durable conversations, the backend thread's half (http-move.c does the blocking work on
 * worker threads): a conversation's stream is a resumable stream of the daemon, attached again
 * by name and token after a restart of skv-cached or (with --state-dir) of skv-http; exports,
 * imports and pulls from --peers run on a worker each while the conversation is busy, and
 * come back through gw->tasks_done. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "http-backend-pvt.h"
#include "http-gw.h"
#include "skv-client.h"

#define CONV_PEER_RETRY_S 5 /* a peer that did not answer is not asked again before this */
#define CONV_PEER_BUSY_TRIES 40 /* a peer that answered 409 busy, asked again 50 ms apart */
#define CONV_SNAPSHOT_BUSY_TRIES 100 /* the daemon busy snapshotting the stream: 20 ms apart */

/* ---- durable conversations: name -> token, re-attached after restarts ------------------- */

/* The daemon's name of a conversation's stream: "conv-ID" when the id fits a stream name (at
 * most 63 of A-Z a-z 0-9 . _ -), else "conv_" and 32 hexadecimal digits of a 128-bit hash of
 * the id (two FNV-1a passes). The prefixes differ, so the two forms never meet. */
void conv_stream_name(const char *id, char *out, size_t len)
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

struct gw_stream *conv_attach(struct gw_backend *b, struct gw_conv *conv,
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

/* Attach conv's stream again by name and token, after a restart of the daemon or of the
 * engine that the daemon restored it onto: 1 back, 0 lost (with the reason), -EPIPE the daemon
 * went (the caller reconnects). */
int conv_attach_again(struct gw_backend *b, struct gw_conv *conv)
{
	int err;
	struct gw_stream *st = conv_attach(b, conv, &err);
	uint64_t seen;
	if (st && conv->tokens && !skv_client_stream_tokens(st->s, &seen) && seen < conv->tokens) {
		/* Restored from a snapshot older than the last answer (a kill -9 of the daemon or
		 * of the engine): going on would silently forget the latest messages. */
		char why[256];
		snprintf(why, sizeof(why), "skv-cached restored its stream %s after a crash from a "
			 "snapshot %llu tokens older than the last answer", conv->name,
			 (unsigned long long)(conv->tokens - seen));
		backend_conv_lose(b, conv, why);
		return 0;
	}
	if (st)
		return 1;
	if (err == -EPIPE)
		return -EPIPE;
	char why[400];
	if (err == -ENOENT)
		snprintf(why, sizeof(why), "skv-cached no longer holds its stream %s (it "
			 "restarted without --state-dir, or the stream timed out detached)",
			 conv->name);
	else
		snprintf(why, sizeof(why), "cannot attach its stream %s again: %s", conv->name,
			 skv_client_last_error(b->client));
	backend_conv_lose(b, conv, why);
	return 0;
}

/* Connected, and the daemon has engines (so it restored its --state-dir): every conversation
 * without a stream is attached again by name and token, or lost with the reason. */
void conv_reattach(struct gw_backend *b)
{
	b->reattach_due = 0;
	unsigned back = 0, lost = 0;
	for (struct gw_conv *conv = b->convs; conv && b->client; conv = conv->next) {
		if (conv->st || conv->lost || conv->task || !conv->token[0])
			continue;
		int rc = conv_attach_again(b, conv);
		if (rc == -EPIPE) {
			backend_lost(b, skv_client_last_error(b->client));
			return;
		}
		back += rc == 1;
		lost += rc == 0;
	}
	if (back || lost)
		backend_log("re-attached %u conversation(s)%s", back, lost ? "; some lost" : "");
	__atomic_add_fetch(&b->gw->count.conversations_reattached, back, __ATOMIC_RELAXED);
	b->state_dirty |= back > 0;
}

static void conv_json_common(struct gw_backend *b, const struct gw_conv *c, json_t *o)
{
	char hex[24];
	(void)b;
	json_object_set_new(o, "id", json_string(c->id));
	json_object_set_new(o, "messages", json_integer((json_int_t)c->fed_messages));
	json_object_set_new(o, "tokens", json_integer((json_int_t)c->tokens));
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

static int conv_hex64(json_t *v, uint64_t *out)
{
	const char *s = json_string_value(v);
	char *end;
	if (!s || strlen(s) != 16)
		return -1;
	*out = strtoull(s, &end, 16);
	return *end ? -1 : 0;
}

/* The conversation fields of a JSON state (export or --state-dir) into c. -1: malformed. */
static int conv_from_json(struct gw_conv *c, json_t *o)
{
	json_t *m = json_object_get(o, "messages"), *set = json_object_get(o, "settings");
	if (!json_is_integer(m) || json_integer_value(m) < 0 ||
	    conv_hex64(json_object_get(o, "fed_hash"), &c->fed_hash) < 0 ||
	    conv_hex64(json_object_get(o, "key_hash"), &c->key_hash) < 0 ||
	    !json_is_object(set))
		return -1;
	c->fed_messages = (uint64_t)json_integer_value(m);
	json_t *tokens = json_object_get(o, "tokens"); /* absent in files of before 2026-12-03 */
	c->tokens = json_is_integer(tokens) && json_integer_value(tokens) > 0
			    ? (uint64_t)json_integer_value(tokens)
			    : 0;
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
void conv_state_flush(struct gw_backend *b)
{
	if (!b->state_dirty || !b->gw->opts.state_dir)
		return;
	b->state_dirty = 0;
	json_t *list = json_array();
	for (const struct gw_conv *c = b->convs; c; c = c->next) {
		if (!c->token[0] && !c->lost)
			continue; /* being moved in */
		json_t *o = json_object();
		conv_json_common(b, c, o);
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

void conv_state_load(struct gw_backend *b)
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
		if (conv_from_json(c, o) < 0 || (!lost && !c->token[0]))
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

static void conv_task_free(struct gw_task *t)
{
	gw_buf_free(&t->state_text);
	gw_buf_free(&t->body);
	json_decref(t->state);
	free(t);
}

/* The state of another node is ours to take: the same conversation, model and template. */
static int conv_check_state(struct gw_task *t, json_t *state)
{
	const char *id = json_string_value(json_object_get(state, "id"));
	const char *model = json_string_value(json_object_get(state, "model"));
	const char *tmpl = json_string_value(json_object_get(state, "template"));
	struct gw_conv probe;
	memset(&probe, 0, sizeof(probe));
	if (!id || !model || !tmpl || conv_from_json(&probe, state) < 0) {
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
static int conv_task_restore(struct gw_task *t, const char *body, size_t len)
{
	const char *snap;
	size_t snap_len;
	json_t *state;
	int status = gw_conv_unpack(body, len, &state, &snap, &snap_len, t->msg, sizeof(t->msg));
	if (status)
		return status;
	status = conv_check_state(t, state);
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

static void conv_task_export(struct gw_task *t)
{
	int fd;
	char why[512];
	int err;
	/* The daemon's own periodic snapshot of the stream (--snapshot-interval) may be under
	 * way: it takes milliseconds, so wait for it rather than fail the export. */
	for (int tries = 0;; tries++) {
		err = gw_move_snapshot(t->gw->opts.socket_path, t->stream_id, &fd, why, sizeof(why));
		if (err != -EBUSY || tries + 1 >= CONV_SNAPSHOT_BUSY_TRIES)
			break;
		usleep(20 * 1000);
	}
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

static int conv_snapshot_file(const struct gw *gw, const char *id, char *path, size_t len,
				 const char *suffix)
{
	return snprintf(path, len, "%s/%s.skvconv%s", gw->opts.snapshot_dir, id, suffix) <
	       (int)len ? 0 : -ENAMETOOLONG;
}

/* Ask every peer for the conversation (export?release=1), then --snapshot-dir. status 200:
 * restored here; 404: nobody has it (a new conversation); else why not. */
static void conv_task_pull(struct gw_task *t)
{
	struct gw *gw = t->gw;
	int busy = 0, gone = 0;
	char other[768] = "";
	struct gw_buf body = { 0 };
	for (size_t i = 0; i < gw->opts.n_peers; i++) {
		char node[GW_NODE_NAME_MAX], msg[768] = "";
		pthread_mutex_lock(&gw->lock);
		int skip = backend_now() < gw->peer_skip_until[i];
		pthread_mutex_unlock(&gw->lock);
		if (skip)
			continue;
		/* A peer busy with the conversation (its own --snapshot-dir copy, an answer; 503:
		 * its daemon could not snapshot it now) is asked again for up to
		 * CONV_PEER_BUSY_TRIES * 50 ms: it holds it live. */
		int status;
		for (int tries = 0;; tries++) {
			gw_buf_free(&body);
			status = gw_peer_fetch(gw->opts.peers[i], t->id, gw->opts.peer_key,
					       &gw->stopping, &body, node, sizeof(node), msg,
					       sizeof(msg));
			if ((status != 409 && status != 503) || tries + 1 >= CONV_PEER_BUSY_TRIES ||
			    __atomic_load_n(&gw->stopping, __ATOMIC_ACQUIRE))
				break;
			usleep(50 * 1000);
		}
		if (status < 0 || !strcmp(node, gw->opts.node_name)) {
			/* A peer down costs a new conversation its connect time-out once per
			 * CONV_PEER_RETRY_S, not every time; ourselves, listed among the peers,
			 * never again. */
			pthread_mutex_lock(&gw->lock);
			gw->peer_skip_until[i] = backend_now() + (status < 0 ? CONV_PEER_RETRY_S : 1e18);
			pthread_mutex_unlock(&gw->lock);
			if (status < 0)
				fprintf(stderr, "skv-http: peer %s: %s (not asked for %d s)\n",
					gw->opts.peers[i], msg, CONV_PEER_RETRY_S);
			continue;
		}
		if (status == 200) {
			snprintf(t->from, sizeof(t->from), "%s", node);
			t->status = conv_task_restore(t, body.data, body.len);
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
		if (status == 409 || status == 503)
			busy = 1; /* held live there: never the older file here (a fork) */
		if (status == 410)
			gone = 1;
		snprintf(other, sizeof(other), "%s", msg);
		if (status != 409 && status != 410)
			fprintf(stderr, "skv-http: peer %s: %s\n", gw->opts.peers[i], msg);
	}
	gw_buf_free(&body);
	/* A peer that answered busy holds the conversation live (it is exporting or answering):
	 * restoring the older file here as well would fork it. */
	if (gw->opts.snapshot_dir && !busy) {
		char path[4200];
		struct stat st;
		if (conv_snapshot_file(gw, t->id, path, sizeof(path), "") == 0 &&
		    stat(path, &st) == 0) {
			FILE *f = fopen(path, "rb");
			char *data = f && st.st_size > 0 ? malloc((size_t)st.st_size) : NULL;
			size_t got = data ? fread(data, 1, (size_t)st.st_size, f) : 0;
			if (f)
				fclose(f);
			if (data && got == (size_t)st.st_size) {
				t->status = conv_task_restore(t, data, got);
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

static void *conv_task_main(void *arg)
{
	struct gw_task *t = arg;
	switch (t->kind) {
	case TASK_EXPORT:
	case TASK_SNAPSHOT: conv_task_export(t); break;
	case TASK_IMPORT: t->status = conv_task_restore(t, t->snap, t->snap_len); break;
	case TASK_PULL: conv_task_pull(t); break;
	}
	struct gw *gw = t->gw;
	pthread_mutex_lock(&gw->lock);
	t->next = gw->tasks_done;
	gw->tasks_done = t;
	pthread_mutex_unlock(&gw->lock);
	backend_wake(gw);
	return NULL;
}

static void conv_task_done(struct gw_backend *b, struct gw_task *t);

static struct gw_task *conv_task_new(struct gw_backend *b, enum task_kind kind,
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

static void conv_task_start(struct gw_backend *b, struct gw_task *t)
{
	if (t->conv)
		t->conv->task = t;
	b->tasks_running++;
	pthread_t thread;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int err = pthread_create(&thread, &attr, conv_task_main, t);
	pthread_attr_destroy(&attr);
	if (err) {
		t->status = 500;
		snprintf(t->msg, sizeof(t->msg), "cannot start a thread: %s", strerror(err));
		b->tasks_running--;
		conv_task_done(b, t);
	}
}

/* The JSON state an export carries. */
static char *conv_export_state(struct gw_backend *b, const struct gw_conv *c, size_t *len)
{
	struct gw *gw = b->gw;
	json_t *o = json_object();
	json_object_set_new(o, "format", json_string("skv-conversation"));
	conv_json_common(b, c, o);
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

static void conv_job_done(struct gw_backend *b, struct gw_job *j, int status,
			     const struct gw_buf *body, const char *type)
{
	pthread_mutex_lock(&b->gw->lock);
	j->status = status;
	j->content_type = type;
	pthread_mutex_unlock(&b->gw->lock);
	j->done = 1;
	job_output(b, j, body->data ? body->data : "", body->len, 1);
}

const char *conv_status_type(int status)
{
	return status >= 500 ? "server_error" : "invalid_request_error";
}

/* GET /v1/conversations/ID/export: the snapshot is taken on a worker (the conversation is busy
 * meanwhile, so nothing changes between the copy and a release). */
void conv_export(struct gw_backend *b, struct gw_job *j)
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
	struct gw_task *t = status ? NULL : conv_task_new(b, TASK_EXPORT, j, conv, id);
	if (!status && t) {
		struct skv_client_stream_info info;
		skv_client_stream_info(conv->st->s, &info);
		t->stream_id = info.id;
		size_t len;
		char *text = conv_export_state(b, conv, &len);
		if (text && gw_buf_put(&t->state_text, text, len) == 0) {
			free(text);
			conv_task_start(b, t);
			return;
		}
		free(text);
		conv_task_free(t);
		t = NULL;
	}
	if (!status)
		status = 500, snprintf(msg, sizeof(msg), "out of memory");
	job_fail(b, j, status, msg, conv_status_type(status), code);
	gw_job_unref(b->gw, j);
}

/* PUT /v1/conversations/ID: the body is checked here, restored on a worker, attached when it
 * comes back. */
void conv_import(struct gw_backend *b, struct gw_job *j)
{
	struct gw *gw = b->gw;
	const char *id = j->req.conversation;
	char msg[GW_CONV_ID_MAX + 600];
	int status = 0;
	const char *code = NULL;
	struct gw_task *t = NULL;
	/* A copy of a conversation lost here may take its place (once it is in). */
	struct gw_conv *old = backend_conv_find(b, id);
	if (old && old->lost && !old->task && (j->by_peer || old->key_hash == j->key_hash))
		old = NULL;
	if (old) {
		status = 409, code = "conversation_exists";
		snprintf(msg, sizeof(msg), "conversation '%s' exists here: DELETE it first", id);
	} else if (__atomic_load_n(&gw->draining, __ATOMIC_ACQUIRE) && !j->release) {
		status = 503, code = "draining";
		snprintf(msg, sizeof(msg), "node %s is draining: it takes no conversation",
			 gw->opts.node_name);
	} else if (!b->client) {
		status = 503, code = "service_unavailable";
		snprintf(msg, sizeof(msg), "skv-cached is not reachable at %s", gw->opts.socket_path);
	} else if (!(t = conv_task_new(b, TASK_IMPORT, j, NULL, id))) {
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
			status = conv_check_state(t, state);
			if (status)
				snprintf(msg, sizeof(msg), "%.700s", t->msg);
			json_decref(state);
		}
		code = status == 422 ? "conversation_refused" : "invalid_conversation";
	}
	if (status) {
		if (t)
			conv_task_free(t);
		job_fail(b, j, status, msg, conv_status_type(status), code);
		gw_job_unref(gw, j);
		return;
	}
	t->conv = backend_conv_new(b, id, j->key_hash);
	if (!t->conv) {
		conv_task_free(t);
		job_fail(b, j, 500, "out of memory", "server_error", NULL);
		gw_job_unref(gw, j);
		return;
	}
	conv_task_start(b, t);
}

/* A request names a conversation this node does not have: ask the peers (and --snapshot-dir)
 * on a worker before opening a new one. Returns 1 if the job waits for that. */
int conv_pull(struct gw_backend *b, struct gw_job *j, const char *lost_why)
{
	struct gw *gw = b->gw;
	if (!gw->opts.n_peers && !gw->opts.snapshot_dir)
		return 0;
	struct gw_task *t = conv_task_new(b, TASK_PULL, j, NULL, j->req.conversation);
	if (!t)
		return 0;
	snprintf(t->lost_why, sizeof(t->lost_why), "%s", lost_why ? lost_why : "");
	t->conv = backend_conv_new(b, j->req.conversation, j->key_hash);
	if (!t->conv) {
		conv_task_free(t);
		return 0;
	}
	conv_task_start(b, t);
	return 1;
}

/* A restored stream is attached and becomes the conversation. 0, or the status with msg. */
static int conv_task_adopt(struct gw_backend *b, struct gw_task *t, char *msg, size_t len)
{
	struct gw_conv *conv = t->conv;
	snprintf(conv->name, sizeof(conv->name), "%s", t->name);
	snprintf(conv->token, sizeof(conv->token), "%s", t->token);
	conv_from_json(conv, t->state);
	conv->last_used = backend_now();
	b->state_dirty = 1;
	if (!b->client)
		return 0; /* attached at the next connection */
	int err;
	if (!conv_attach(b, conv, &err)) {
		snprintf(msg, len, "skv-cached restored the conversation but it cannot be attached: "
			 "%s", skv_client_last_error(b->client));
		return err == -EPIPE ? 503 : 500;
	}
	return 0;
}

static void conv_task_done(struct gw_backend *b, struct gw_task *t)
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
		    conv_snapshot_file(gw, t->id, path, sizeof(path), "") == 0 &&
		    conv_snapshot_file(gw, t->id, tmp, sizeof(tmp), ".tmp") == 0) {
			/* 0600: the file holds the stream's resume token */
			int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
			FILE *f = fd >= 0 ? fdopen(fd, "wb") : NULL;
			if (fd >= 0 && !f)
				close(fd);
			int ok = f && fwrite(t->body.data, 1, t->body.len, f) == t->body.len;
			if (f && fclose(f) != 0)
				ok = 0;
			if (!ok || rename(tmp, path) < 0) {
				backend_log("--snapshot-dir: cannot write %s: %s", path, strerror(errno));
				unlink(tmp);
				conv->snap_tokens = 0; /* again at the next interval */
			}
		} else if (t->status != 200) {
			backend_log("--snapshot-dir: conversation %s: %s", t->id, t->msg);
			conv->snap_tokens = 0;
		}
		conv_task_free(t);
		return;
	}
	if (t->kind == TASK_EXPORT) {
		if (t->status != 200) {
			job_fail(b, j, t->status, t->msg, conv_status_type(t->status), NULL);
		} else {
			if (j->release) {
				backend_conv_free(b, conv);
				__atomic_add_fetch(&gw->count.conversations_moved_out, 1,
						   __ATOMIC_RELAXED);
			}
			conv_job_done(b, j, 200, &t->body, "application/x-skv-conversation");
		}
		gw_job_unref(gw, j);
		conv_task_free(t);
		return;
	}
	/* Import or pull: t->conv is the placeholder made when it started. */
	int status = t->status;
	snprintf(msg, sizeof(msg), "%s", t->msg);
	if (status == 200) {
		status = conv_task_adopt(b, t, msg, sizeof(msg));
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
			/* The lost one it replaces (the placeholder was found first meanwhile). */
			for (struct gw_conv *c = b->convs; c; c = c->next) {
				if (c != conv && c->lost && !strcmp(c->id, conv->id)) {
					backend_conv_free(b, c);
					break;
				}
			}
			__atomic_add_fetch(&gw->count.conversations_moved_in, 1, __ATOMIC_RELAXED);
			struct gw_buf body = { 0 };
			gw_buf_puts(&body, "{\"id\":");
			gw_json_string(&body, t->id, strlen(t->id));
			gw_buf_printf(&body, ",\"object\":\"conversation\",\"imported\":true,"
				      "\"messages\":%llu,\"from\":",
				      (unsigned long long)conv->fed_messages);
			gw_json_string(&body, t->from, strlen(t->from));
			gw_buf_puts(&body, "}\n");
			conv_job_done(b, j, 200, &body, NULL);
			gw_buf_free(&body);
		} else {
			job_fail(b, j, status, msg, conv_status_type(status),
				 status == 409 ? "conversation_exists"
				 : status == 422 ? "conversation_refused" : NULL);
		}
		gw_job_unref(gw, j);
		conv_task_free(t);
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
		job_fail(b, j, status, msg, conv_status_type(status),
			 status == 410 ? "conversation_lost"
			 : status == 409 ? "conversation_busy" : "conversation_move_failed");
		gw_job_unref(gw, j);
	}
	conv_task_free(t);
}

void conv_take_tasks(struct gw_backend *b)
{
	struct gw *gw = b->gw;
	pthread_mutex_lock(&gw->lock);
	struct gw_task *done = gw->tasks_done;
	gw->tasks_done = NULL;
	pthread_mutex_unlock(&gw->lock);
	while (done) {
		struct gw_task *next = done->next;
		b->tasks_running--;
		conv_task_done(b, done);
		done = next;
	}
}

/* --snapshot-dir: every idle conversation exported into the shared directory as ID.skvconv
 * (through ID.skvconv.tmp and a rename), each --snapshot-interval seconds. */
void conv_snapshot_all(struct gw_backend *b, double now)
{
	struct gw *gw = b->gw;
	if (!gw->opts.snapshot_dir || !b->client || now < b->next_snapshot)
		return;
	b->next_snapshot = now + gw->opts.snapshot_interval;
	for (struct gw_conv *c = b->convs; c; c = c->next) {
		if (c->lost || c->task || !c->st || c->st->job || c->st->skip_ends)
			continue;
		/* unchanged since its last copy (same tokens, same messages): the file holds it */
		if (c->snap_tokens && c->snap_tokens == c->tokens && c->snap_messages == c->fed_messages)
			continue;
		c->snap_tokens = c->tokens;
		c->snap_messages = c->fed_messages;
		struct gw_task *t = conv_task_new(b, TASK_SNAPSHOT, NULL, c, c->id);
		if (!t)
			return;
		struct skv_client_stream_info info;
		skv_client_stream_info(c->st->s, &info);
		t->stream_id = info.id;
		size_t len;
		char *text = conv_export_state(b, c, &len);
		if (!text || gw_buf_put(&t->state_text, text, len) < 0) {
			free(text);
			conv_task_free(t);
			return;
		}
		free(text);
		conv_task_start(b, t);
	}
}
