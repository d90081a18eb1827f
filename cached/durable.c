/* Streams that outlive their client's connection, and who may see what.
 *
 * A resumable stream (OPEN_NAMED) has a name, unique per uid, and a secret token of 128 random
 * bits that only its opener learns (OPENED_NAMED). When the client's connection drops, or the
 * client sends DETACH, the stream is detached instead of closed: its engine keeps serving the
 * requests already in its input ring (pausing once the output ring is full, since nobody reads
 * it), its KV stays in the arena, and the daemon keeps its channel memfd. A peer of the same
 * uid, or root, that presents name and token ATTACHes: the engine is told the new client's
 * eventfd and doorbell (REATTACH) and the client gets the same channel back, so it reads the
 * tokens the old client left unread and continues exactly where the stream was. A detached
 * stream is closed after its idle time-out, else after --detach-timeout.
 *
 * Peers (SO_PEERCRED): the daemon's uid and root may do everything; members of --group may
 * be clients and admins that see only their own streams' metadata; only the daemon's uid,
 * root and members of --admin-group may read stream contents (token ids, window text). Only
 * the daemon's uid and root may be engines, so the arena fd never reaches anyone else. */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "arena.h"
#include "daemon-pvt.h"
#include "kv-layout.h"
#include "proto.h"
#include "skv-error.h"

int cached_name_valid(const char *name)
{
	size_t n = strlen(name);
	if (!n || n >= SKV_STREAM_NAME_MAX)
		return 0;
	for (size_t i = 0; i < n; i++) {
		char ch = name[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
		      ch == '.' || ch == '_' || ch == '-'))
			return 0;
	}
	return 1;
}

struct cached_stream *cached_stream_by_name(struct cached *d, const char *name, uint32_t uid)
{
	struct cached_stream *any = NULL;
	for (struct cached_stream *s = d->streams; s; s = s->next) {
		if (!s->resumable || strncmp(s->name, name, sizeof(s->name)))
			continue;
		if (s->owner_uid == uid)
			return s;
		if (uid == 0 && !any)
			any = s;
	}
	return any;
}

int cached_token_new(char token[SKV_TOKEN_HEX])
{
	static const char hex[] = "0123456789abcdef";
	uint8_t raw[SKV_TOKEN_HEX / 2];
	size_t got = 0;
	while (got < sizeof(raw)) {
		ssize_t n = getrandom(raw + got, sizeof(raw) - got, 0);
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n > 0)
			got += (size_t)n;
	}
	for (size_t i = 0; i < sizeof(raw); i++) {
		token[2 * i] = hex[raw[i] >> 4];
		token[2 * i + 1] = hex[raw[i] & 15];
	}
	return 0;
}

/* Compare in time independent of where they differ: a peer learns nothing from timing. */
static int token_equal(const char *a, const char *b)
{
	unsigned diff = 0;
	for (size_t i = 0; i < SKV_TOKEN_HEX; i++)
		diff |= (unsigned)(a[i] ^ b[i]);
	return diff == 0;
}

void cached_stream_detach(struct cached *d, struct cached_stream *s)
{
	if (s->client && s->client->n_streams)
		s->client->n_streams--;
	s->client = NULL;
	if (s->detached_at <= 0.0)
		d->n_detached++;
	s->detached_at = cached_now();
	if (d->verbose)
		cached_log("stream %llu (%s): detached", (unsigned long long)s->id, s->name);
	cached_event(d, SKV_EVENT_CLOSE, s->id, s->engine ? s->engine->id : UINT32_MAX, 1,
		     "stream detached (resumable)");
}

void cached_detach_request(struct cached *d, struct cached_conn *c, uint64_t stream_id)
{
	struct cached_stream *s = cached_stream_find(d, stream_id);
	if (!s || s->client != c) {
		char text[SKV_MSG_TEXT];
		snprintf(text, sizeof(text), "DETACH: no stream %llu of yours",
			 (unsigned long long)stream_id);
		cached_conn_error(d, c, -ENOENT, text);
		return;
	}
	if (!s->resumable || s->state != CACHED_STREAM_OPEN || s->dropping) {
		cached_conn_error(d, c, -EINVAL,
				  "DETACH: only an open resumable stream can be detached");
		return;
	}
	cached_stream_detach(d, s);
	struct skv_msg_stream m = { .stream_id = stream_id };
	cached_conn_send(d, c, SKV_MSG_DETACHED, &m, NULL, 0);
}

void cached_attach(struct cached *d, struct cached_conn *c, const struct skv_msg_attach *a,
		   int client_efd)
{
	char name[SKV_STREAM_NAME_MAX], text[SKV_MSG_TEXT];
	snprintf(name, sizeof(name), "%.*s", (int)sizeof(a->name) - 1, a->name);
	struct cached_stream *s = cached_name_valid(name) && !a->flags
					  ? cached_stream_by_name(d, name, c->peer_uid)
					  : NULL;
	/* One answer for "no such name", "not yours" and "wrong token": a peer that guesses
	 * learns nothing about other users' streams. */
	if (!s || !token_equal(s->token, a->token) ||
	    (s->owner_uid != c->peer_uid && c->peer_uid != 0)) {
		snprintf(text, sizeof(text),
			 "ATTACH: no resumable stream '%s' of yours with that token (it may have "
			 "been closed, or timed out while detached)", name);
		cached_log("refused ATTACH to '%s' by uid %u (pid %u)", name, c->peer_uid,
			   c->peer_pid);
		cached_conn_error(d, c, -ENOENT, text);
		close(client_efd);
		return;
	}
	if (s->state != CACHED_STREAM_OPEN || s->dropping || !s->engine ||
	    s->engine->state != CACHED_ENGINE_READY || !s->engine->conn) {
		snprintf(text, sizeof(text), "ATTACH: stream '%s' has ended (its engine died, or it "
			 "is closing); open a new one", name);
		cached_conn_error(d, c, -EPIPE, text);
		close(client_efd);
		return;
	}
	if (s->client) {
		snprintf(text, sizeof(text), "ATTACH: stream '%s' is attached to another connection "
			 "(pid %u); detach it there first", name, s->client->peer_pid);
		cached_conn_error(d, c, -EBUSY, text);
		close(client_efd);
		return;
	}
	/* The engine first: it rings the new client from its next step on. */
	struct skv_msg_stream m = { .stream_id = s->id };
	int fds_e[2] = { client_efd, c->doorbell_fd };
	if (cached_conn_send(d, s->engine->conn, SKV_MSG_REATTACH, &m, fds_e, 2) < 0) {
		cached_conn_error(d, c, -EAGAIN, "ATTACH: the stream's engine is going away");
		close(client_efd);
		return;
	}
	close(client_efd);
	struct cached_engine *e = s->engine;
	s->client = c;
	c->n_streams++;
	if (s->detached_at > 0.0)
		d->n_detached--;
	s->detached_at = 0.0;
	s->active_at = cached_now();
	struct skv_msg_opened_named on = {
		.opened = { .stream_id = s->id, .engine_id = e->id,
			    .node = (uint32_t)(e->node < 0 ? 0 : e->node),
			    .sink_slots = s->params.sink_slots,
			    .window_slots = s->params.window_slots,
			    .channel_bytes = skv_chan_bytes(), .kv_bytes = s->region_bytes },
	};
	memcpy(on.name, s->name, sizeof(on.name));
	memcpy(on.token, s->token, sizeof(on.token));
	struct skv_kv_ring ring;
	char *region = (char *)skv_arena_base(d->arenas[s->arena]) + s->region_offset;
	if (s->region_bytes && skv_kv_ring_snapshot(skv_kv_region_ring(region), &ring, 64) == 0)
		on.tokens_seen = ring.tokens_seen;
	int fds_c[3] = { s->chan_fd, e->doorbell_fd, e->efd };
	cached_conn_send(d, c, SKV_MSG_OPENED_NAMED, &on, fds_c, 3);
	cached_event(d, SKV_EVENT_OPEN, s->id, e->id, 1, "stream re-attached (pid %u)",
		     c->peer_pid);
	if (d->verbose)
		cached_log("stream %llu (%s): attached by pid %u", (unsigned long long)s->id,
			   s->name, c->peer_pid);
}

void cached_detach_tick(struct cached *d, double now)
{
	for (struct cached_stream *s = d->streams; s; s = s->next) {
		if (s->detached_at <= 0.0 || s->client || s->state != CACHED_STREAM_OPEN ||
		    s->dropping || s->reviving || !s->engine ||
		    s->engine->state != CACHED_ENGINE_READY)
			continue;
		/* A stream with an idle time-out of its own is closed by that (admission.c). */
		if (s->idle_timeout_s || now - s->detached_at < (double)d->detach_timeout_s)
			continue;
		cached_log("stream %llu (%s): detached for %u s; closing it",
			   (unsigned long long)s->id, s->name, d->detach_timeout_s);
		s->state = CACHED_STREAM_CLOSING;
		cached_stream_drop(d, s);
	}
}

/* ---- who may see what ------------------------------------------------------------------- */

int cached_peer_in_group(uint32_t uid, uint32_t gid, gid_t group)
{
	if (gid == group)
		return 1;
	struct passwd *pw = getpwuid(uid);
	if (!pw)
		return 0;
	gid_t groups[256];
	int n = 256;
	if (getgrouplist(pw->pw_name, pw->pw_gid, groups, &n) < 0)
		return 0;
	for (int i = 0; i < n; i++)
		if (groups[i] == group)
			return 1;
	return 0;
}

int cached_peer_allowed(struct cached *d, uint32_t uid, uint32_t gid)
{
	if (uid == 0 || uid == d->uid)
		return 1;
	if (d->have_group && cached_peer_in_group(uid, gid, d->group))
		return 1;
	return d->have_admin_group && cached_peer_in_group(uid, gid, d->admin_group);
}
