/* Admission control and idle time-outs: how skv-cached keeps a fixed-size arena shared fairly
 * among more clients than it holds.
 *
 * Admission. An OPEN is placed at once when a ready engine's arena has a free extent for its
 * region and fewer than --max-streams streams hold KV. Otherwise, with --admission reject (the
 * default), it gets ERROR -ENOSPC (-EAGAIN when no engine is ready) saying what is full. With
 * --admission queue it is answered QUEUED {position, time-out} at once and waits in one FIFO
 * (at most --queue-max OPENs; beyond, ERROR -ENOSPC); so does an OPEN that finds no engine
 * ready (engines starting, or restarting after a crash), which a client would otherwise have
 * to retry. Whenever room may have come free (a
 * region went back to the arena, an engine became ready) the daemon places queued OPENs in
 * order until the first that does not fit: strict FIFO, so a stream that needs a large region
 * is not starved by smaller ones behind it. An OPEN waits at most --queue-timeout seconds, then
 * gets ERROR -ETIMEDOUT. OPENs that no room would help (bad parameters, a region larger than a
 * whole arena) are refused at once, never queued. A client that has OPENs queued has its next
 * ones queued behind them unchecked, so that its answers come in the order it asked. A client
 * that goes away leaves the queue (the OPENs' eventfds are closed). Nothing here allocates per
 * stream beyond the queue entry: the arena bounds the KV, --queue-max the entries.
 *
 * Idle time-outs. A stream with a time-out (its own params.idle_timeout_s, else the daemon's
 * --idle-timeout; capped at CACHED_IDLE_MAX_S) is idle while neither its client nor its engine
 * moves anything through its channel: once a second the daemon compares the four ring indices
 * (input head and tail, output head and tail) through a read-only view of the channel's first
 * bytes with what it saw last. When they have not moved for the time-out, the stream fails to
 * its client (FAILED -ETIMEDOUT), its engine is asked to DROP it, and its region goes back to
 * the arena when the engine answers DROPPED (it may be in the middle of a step on it). A
 * request the engine is still working on moves the output ring, so only a stream nobody uses,
 * or whose client stopped reading a full output ring, times out. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "channel.h"
#include "daemon-pvt.h"
#include "ring.h"
#include "skv-error.h"

static void admission_error(struct cached *d, struct cached_conn *c, int code, const char *text)
{
	struct skv_msg_error e = { .code = code };
	snprintf(e.text, sizeof(e.text), "%s", text);
	cached_conn_send(d, c, SKV_MSG_ERROR, &e, NULL, 0);
}

static void pending_free(struct cached *d, struct cached_pending *q)
{
	if (q->client && q->client->n_queued)
		q->client->n_queued--;
	d->n_queued--;
	if (q->client_efd >= 0)
		close(q->client_efd);
	free(q);
}

void cached_admission_open(struct cached *d, struct cached_conn *c,
			   const struct skv_msg_open_named *open, int resumable, int client_efd)
{
	char why[SKV_MSG_TEXT] = "";
	int placed = 1;
	if (!c->n_queued) {
		int err = cached_check_open(d, open, resumable, c, why, sizeof(why));
		if (err < 0) {
			admission_error(d, c, err, why);
			close(client_efd);
			return;
		}
		/* Nobody waits: place it now. Somebody waits: it goes behind them. */
		placed = d->queue_head ? CACHED_WAIT_ARENA
				       : cached_place_stream(d, c, open, resumable, client_efd, why,
							     sizeof(why));
		if (placed <= 0) {
			if (placed < 0)
				admission_error(d, c, placed, why);
			close(client_efd);
			return;
		}
	}
	if (!d->admission_queue) {
		admission_error(d, c, placed == CACHED_WAIT_ENGINE ? -EAGAIN : -ENOSPC, why);
		close(client_efd);
		return;
	}
	if (d->n_queued >= d->queue_max) {
		char text[SKV_MSG_TEXT];
		snprintf(text, sizeof(text),
			 "the admission queue is full (%u OPENs wait, --queue-max): try again later",
			 d->n_queued);
		admission_error(d, c, -ENOSPC, text);
		close(client_efd);
		return;
	}
	struct cached_pending *q = calloc(1, sizeof(*q));
	if (!q) {
		admission_error(d, c, -ENOMEM, "the daemon has no memory to queue the OPEN");
		close(client_efd);
		return;
	}
	q->client = c;
	q->open = *open;
	q->resumable = resumable;
	q->client_efd = client_efd;
	if (!c->n_queued && !d->queue_head)
		d->queue_reason = (enum cached_wait_reason)placed;
	q->deadline = cached_now() + d->queue_timeout_s;
	if (d->queue_tail)
		d->queue_tail->next = q;
	else
		d->queue_head = q;
	d->queue_tail = q;
	d->n_queued++;
	c->n_queued++;
	d->stats.opens_queued++;
	struct skv_msg_queued m = { .position = d->n_queued,
				    .timeout_ms = d->queue_timeout_s * 1000u };
	cached_conn_send(d, c, SKV_MSG_QUEUED, &m, NULL, 0);
	if (d->verbose)
		cached_log("OPEN of pid %u queued at position %u", c->peer_pid, d->n_queued);
}

static void queue_pop_head(struct cached *d)
{
	struct cached_pending *q = d->queue_head;
	d->queue_head = q->next;
	if (!d->queue_head)
		d->queue_tail = NULL;
	pending_free(d, q);
}

void cached_admission_pump(struct cached *d)
{
	d->admission_dirty = 0;
	while (d->queue_head) {
		struct cached_pending *q = d->queue_head;
		char why[SKV_MSG_TEXT] = "";
		int placed = cached_place_stream(d, q->client, &q->open, q->resumable,
						 q->client_efd, why, sizeof(why));
		if (placed > 0) {
			d->queue_reason = (enum cached_wait_reason)placed;
			return; /* still no room for the first: the others wait behind it */
		}
		if (placed < 0)
			admission_error(d, q->client, placed, why);
		queue_pop_head(d);
	}
}

void cached_admission_expire(struct cached *d, double now)
{
	/* One time-out for all: deadlines grow along the FIFO. */
	while (d->queue_head && now >= d->queue_head->deadline) {
		struct cached_pending *q = d->queue_head;
		char text[SKV_MSG_TEXT];
		const char *reason =
			d->queue_reason == CACHED_WAIT_LIMIT ? "the daemon's stream limit stayed reached"
			: d->queue_reason == CACHED_WAIT_ENGINE ? "no engine became ready"
							  : "the KV arena stayed full";
		snprintf(text, sizeof(text),
			 "waited %u s in the admission queue: %s; try again later, or start "
			 "skv-cached with a larger --arena-mb, --max-streams or --queue-timeout",
			 d->queue_timeout_s, reason);
		admission_error(d, q->client, -ETIMEDOUT, text);
		d->stats.opens_timed_out++;
		if (d->verbose)
			cached_log("OPEN of pid %u timed out in the admission queue", q->client->peer_pid);
		queue_pop_head(d);
	}
}

void cached_admission_forget(struct cached *d, struct cached_conn *c)
{
	struct cached_pending *prev = NULL;
	for (struct cached_pending *q = d->queue_head, *next; q; q = next) {
		next = q->next;
		if (q->client != c) {
			prev = q;
			continue;
		}
		if (prev)
			prev->next = next;
		else
			d->queue_head = next;
		if (d->queue_tail == q)
			d->queue_tail = prev;
		pending_free(d, q);
	}
	/* The OPENs behind the ones that left may fit now. */
	d->admission_dirty = 1;
}

int cached_timer_ms(struct cached *d, double now)
{
	if (d->admission_dirty)
		return 0;
	int timed = 0;
	double until = 0.0;
	if (d->watchers || d->n_idle_tracked || d->n_detached || d->snapshot_interval_s) {
		until = d->next_tick - now;
		timed = 1;
	}
	if (d->queue_head) {
		double q = d->queue_head->deadline - now;
		until = !timed || q < until ? q : until;
		timed = 1;
	}
	if (!timed)
		return -1;
	if (until <= 0.0)
		return 0;
	/* Round up: waking a hair early would spin until the deadline. */
	return until > 3600.0 ? 3600000 : (int)(until * 1000.0) + 1;
}

/* Relaxed loads: the indices are only compared with the previous look, never used to reach
 * memory, so neither a torn nor a stale value can do harm (a stale one is seen next second). */
static void idle_read(const struct cached_stream *s, uint32_t idx[4])
{
	const char *base = s->chan_view;
	const struct skv_ring_hdr *in = (const void *)(base + s->chan_in_offset);
	const struct skv_ring_hdr *out = (const void *)(base + s->chan_out_offset);
	idx[0] = __atomic_load_n(&in->head, __ATOMIC_RELAXED);
	idx[1] = __atomic_load_n(&in->tail, __ATOMIC_RELAXED);
	idx[2] = __atomic_load_n(&out->head, __ATOMIC_RELAXED);
	idx[3] = __atomic_load_n(&out->tail, __ATOMIC_RELAXED);
}

void cached_idle_tick(struct cached *d, double now)
{
	for (struct cached_stream *s = d->streams, *next; s; s = next) {
		next = s->next;
		/* Only streams an engine serves and nobody is closing yet. */
		if (!s->chan_view || s->dropping || s->state == CACHED_STREAM_CLOSING || !s->engine ||
		    s->engine->state != CACHED_ENGINE_READY)
			continue;
		uint32_t idx[4];
		idle_read(s, idx);
		if (memcmp(idx, s->chan_seen, sizeof(idx))) {
			memcpy(s->chan_seen, idx, sizeof(idx));
			s->active_at = now;
			continue;
		}
		if (now - s->active_at >= (double)s->idle_timeout_s)
			cached_stream_idle_expire(d, s);
	}
}
