/* The daemon's answers to admin peers (skv-admin): snapshots of its tables, of each stream's
 * ring state in the arena and of each engine's statistics block.
 *
 * Reading never slows the data path: the ring states and engine statistics are read through
 * their seqlocks (shm/seqlock.h), which the engines never wait on; a read torn by a concurrent
 * write is retried (64 times: in a listing a row that still fails shows zero counters; for one
 * stream the request is answered with an ERROR to retry). A stream's row and its token ids come
 * from the same ring snapshot. Recompute streams keep no ring (each token re-runs a fresh
 * window), so their counters show zero. Token-rate baselines are shared by all admin peers: two
 * tools polling at once shorten each other's intervals. The token ids of a stream's slots are read without a
 * lock: a slot being overwritten at that moment shows its old or its new token, either of which
 * the stream really held. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "channel.h"
#include "daemon-pvt.h"
#include "kv-layout.h"
#include "seqlock.h"
#include "skv-error.h"

#define ADMIN_SNAPSHOT_TRIES 64

static void *admin_region(struct cached *d, const struct cached_stream *s)
{
	if (!s->region_bytes)
		return NULL;
	return (char *)skv_arena_base(d->arenas[s->arena]) + s->region_offset;
}

static int admin_engine_stats(const struct cached_engine *e, struct skv_engine_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (!e->doorbell)
		return -ENOENT;
	const struct skv_engine_stats *shared = skv_doorbell_stats(e->doorbell);
	return skv_seqlock_read(&shared->seq, &shared->steps, &out->steps, SKV_ENGINE_STATS_WORDS,
				ADMIN_SNAPSHOT_TRIES);
}

static void admin_hist_add(struct skv_hist *to, const struct skv_hist *from)
{
	for (unsigned b = 0; b < SKV_HIST_BUCKETS; b++)
		to->bucket[b] += from->bucket[b];
	to->count += from->count;
	to->sum_ns += from->sum_ns;
}

void cached_admin_retire(struct cached *d, struct cached_engine *e)
{
	struct skv_engine_stats es;
	if (admin_engine_stats(e, &es) < 0)
		return;
	d->retired.steps += es.steps;
	d->retired.rows += es.rows;
	d->retired.tokens_generated += es.tokens_generated;
	d->retired.prompt_tokens += es.prompt_tokens;
	d->retired.wake_syscalls += es.wake_syscalls;
	admin_hist_add(&d->retired.ttft, &es.ttft);
	admin_hist_add(&d->retired.itl, &es.itl);
	/* The page is reused by a restarted engine, which counts from zero. */
	struct skv_engine_stats *shared = skv_doorbell_stats(e->doorbell);
	struct skv_engine_stats zero = { 0 };
	skv_seqlock_write(&shared->seq, &shared->steps, &zero.steps, SKV_ENGINE_STATS_WORDS);
	e->rate_tokens = 0;
}

void cached_event(struct cached *d, uint32_t type, uint64_t stream_id, uint32_t engine,
		  uint64_t arg, const char *fmt, ...)
{
	if (!d->watchers)
		return;
	struct skv_admin_event ev = { .type = type, .engine = engine, .stream_id = stream_id,
				      .arg = arg };
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ev.time_s = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(ev.text, sizeof(ev.text), fmt, ap);
	va_end(ap);
	for (struct cached_conn *c = d->conns; c; c = c->next)
		if (c->watching && c->fd >= 0 && !c->dead)
			cached_conn_send(d, c, SKV_MSG_ADMIN_EVENT, &ev, NULL, 0);
}

/* Announce streams whose eviction count grew since the last look. */
void cached_admin_tick(struct cached *d)
{
	for (struct cached_stream *s = d->streams; s; s = s->next) {
		void *region = admin_region(d, s);
		struct skv_kv_ring ring;
		if (!region || skv_kv_ring_snapshot(skv_kv_region_ring(region), &ring,
						    ADMIN_SNAPSHOT_TRIES) < 0)
			continue;
		if (ring.tokens_evicted > s->evicted_reported) {
			cached_event(d, SKV_EVENT_EVICT, s->id, s->engine ? s->engine->id : UINT32_MAX,
				     ring.tokens_evicted, "%llu tokens evicted so far",
				     (unsigned long long)ring.tokens_evicted);
			s->evicted_reported = ring.tokens_evicted;
		}
	}
}

/* Fill row from one snapshot of the stream's ring, returned in *ring (0), or -EAGAIN when no
 * consistent snapshot could be taken (the counters are then zero). */
static int admin_stream_row(struct cached *d, struct cached_stream *s,
			    struct skv_admin_stream *row, double now, struct skv_kv_ring *ring_out)
{
	memset(row, 0, sizeof(*row));
	row->id = s->id;
	row->engine = s->engine ? s->engine->id : UINT32_MAX;
	row->node = s->engine ? s->engine->node : -1;
	row->client_pid = s->client ? s->client->peer_pid : 0;
	row->state = s->state;
	row->policy = s->params.policy;
	row->evict = s->params.evict;
	row->sink_slots = s->params.sink_slots;
	row->window_slots = s->params.window_slots;
	row->abs_positions = s->params.abs_positions;
	row->kv_dtype = s->params.kv_dtype ? s->params.kv_dtype : SKV_KV_DTYPE_F32;
	row->kv_bytes = s->region_bytes;
	row->age_s = now - s->opened_at;
	void *region = admin_region(d, s);
	struct skv_kv_ring ring;
	if (!region)
		return -ENOENT;
	if (skv_kv_ring_snapshot(skv_kv_region_ring(region), &ring, ADMIN_SNAPSHOT_TRIES) < 0)
		return -EAGAIN;
	struct skv_kv_desc desc;
	memcpy(&desc, region, sizeof(desc));
	if (ring_out)
		*ring_out = ring;
	row->tokens_seen = ring.tokens_seen;
	row->tokens_evicted = ring.tokens_evicted;
	row->window_start = ring.window_start;
	row->sink_fill = skv_kv_ring_sink_fill(&ring, &desc);
	row->window_fill = skv_kv_ring_window_fill(&ring, &desc);
	row->ring_head = desc.window_slots
				 ? desc.sink_slots +
					   (uint32_t)((ring.window_start - desc.sink_slots) %
						      desc.window_slots)
				 : desc.sink_slots;
	if (now > s->rate_time && ring.tokens_seen >= s->rate_tokens)
		row->tokens_per_s = (double)(ring.tokens_seen - s->rate_tokens) / (now - s->rate_time);
	s->rate_tokens = ring.tokens_seen;
	s->rate_time = now;
	return 0;
}

static int admin_send_end(struct cached *d, struct cached_conn *c, uint64_t count)
{
	struct skv_admin_end end = { .count = count };
	return cached_conn_send(d, c, SKV_MSG_ADMIN_END, &end, NULL, 0);
}

/* Sinks, then the window oldest first, as token ids in chunks: the slots of the same ring
 * snapshot the row was made from. */
static int admin_send_tokens(struct cached *d, struct cached_conn *c, struct cached_stream *s,
			     const struct skv_kv_ring *snapshot)
{
	void *region = admin_region(d, s);
	if (!region)
		return 0;
	struct skv_kv_desc desc;
	struct skv_kv_ring ring = *snapshot;
	memcpy(&desc, region, sizeof(desc));
	const int32_t *slots = skv_kv_region_tokens(region, &desc);
	uint32_t counts[2] = { skv_kv_ring_sink_fill(&ring, &desc),
			       skv_kv_ring_window_fill(&ring, &desc) };
	for (uint32_t part = 0; part < 2; part++) {
		uint32_t total = counts[part];
		uint32_t off = 0;
		do {
			struct skv_admin_tokens t = { .stream_id = s->id, .part = part,
						      .offset = off, .total = total,
						      .first_pos = part ? ring.window_start : 0 };
			t.n = total - off < SKV_ADMIN_TOKENS_MAX ? total - off : SKV_ADMIN_TOKENS_MAX;
			for (uint32_t i = 0; i < t.n; i++) {
				uint64_t pos = part ? ring.window_start + off + i : off + i;
				int64_t slot = skv_kv_ring_slot_of(&ring, &desc, pos);
				t.ids[i] = slot < 0 ? -1
						    : __atomic_load_n(&slots[slot], __ATOMIC_RELAXED);
			}
			int err = cached_conn_send(d, c, SKV_MSG_ADMIN_TOKENS, &t, NULL, 0);
			if (err < 0)
				return err;
			off += t.n;
		} while (off < total);
	}
	return 0;
}

static void admin_server(struct cached *d, struct cached_conn *c)
{
	struct skv_admin_server sv = {
		.instance = d->instance,
		.uptime_s = cached_now() - d->started_at,
		.pid = (uint32_t)getpid(),
		.proto_major = SKV_PROTO_MAJOR,
		.proto_minor = SKV_PROTO_MINOR,
		.engines = d->n_engines,
		.arenas = d->n_arenas,
		.streams = d->n_streams,
		.streams_queued = d->n_queued,
		.streams_opened = d->stats.streams_opened,
		.streams_closed = d->stats.streams_closed,
		.streams_failed = d->stats.streams_failed,
		.engine_restarts = d->stats.engine_restarts,
		.tokens_evicted = d->stats.tokens_evicted_closed,
		.tokens_generated = d->retired.tokens_generated,
		.prompt_tokens = d->retired.prompt_tokens,
		.wake_syscalls = d->retired.wake_syscalls,
		.steps = d->retired.steps,
	};
	for (unsigned i = 0; i < d->n_engines; i++) {
		struct skv_engine_stats es;
		if (d->engines[i].state == CACHED_ENGINE_READY)
			sv.engines_ready++;
		if (admin_engine_stats(&d->engines[i], &es) == 0) {
			sv.tokens_generated += es.tokens_generated;
			sv.prompt_tokens += es.prompt_tokens;
			sv.wake_syscalls += es.wake_syscalls;
			sv.steps += es.steps;
		}
	}
	for (unsigned a = 0; a < d->n_arenas; a++) {
		struct skv_arena_heap_stats hs;
		skv_arena_heap_stats(skv_arena_heap(d->arenas[a]), &hs);
		sv.arena_bytes += skv_arena_info(d->arenas[a])->bytes;
		sv.arena_used_bytes += hs.used_bytes;
	}
	for (struct cached_stream *s = d->streams; s; s = s->next) {
		void *region = admin_region(d, s);
		struct skv_kv_ring ring;
		if (region && skv_kv_ring_snapshot(skv_kv_region_ring(region), &ring,
						   ADMIN_SNAPSHOT_TRIES) == 0)
			sv.tokens_evicted += ring.tokens_evicted;
	}
	snprintf(sv.version, sizeof(sv.version), "%s", SKV_VERSION);
	snprintf(sv.model_path, sizeof(sv.model_path), "%s", d->model_path);
	snprintf(sv.socket_path, sizeof(sv.socket_path), "%s", d->socket_path);
	cached_conn_send(d, c, SKV_MSG_ADMIN_SERVER, &sv, NULL, 0);
}

static void admin_arenas(struct cached *d, struct cached_conn *c)
{
	for (unsigned a = 0; a < d->n_arenas; a++) {
		const struct skv_arena_info *info = skv_arena_info(d->arenas[a]);
		struct skv_arena_heap_stats hs;
		skv_arena_heap_stats(skv_arena_heap(d->arenas[a]), &hs);
		struct skv_admin_arena row = {
			.index = a, .node = info->node_os, .backing = info->backing,
			.flags = info->flags, .page_bytes = info->page_bytes, .bytes = info->bytes,
			.used_bytes = hs.used_bytes, .free_bytes = hs.free_bytes,
			.largest_free_bytes = hs.largest_free, .live_allocs = hs.live_allocs,
			.free_extents = hs.free_extents, .failed_allocs = hs.failed_allocs,
		};
		for (unsigned k = 0; k < SKV_ARENA_HEAP_CLASSES; k++)
			if (hs.class_live[k])
				row.size_classes_used++;
		/* Cut to the row's field; the daemon's log has the whole line. */
		snprintf(row.backing_desc, sizeof(row.backing_desc), "%.*s",
			 (int)sizeof(row.backing_desc) - 1, info->backing_desc);
		if (cached_conn_send(d, c, SKV_MSG_ADMIN_ARENA, &row, NULL, 0) < 0)
			return;
	}
	admin_send_end(d, c, d->n_arenas);
}

static void admin_engines(struct cached *d, struct cached_conn *c)
{
	double now = cached_now();
	uint64_t sent = 0;
	for (unsigned i = 0; i < d->n_engines; i++) {
		struct cached_engine *e = &d->engines[i];
		if (e->state == CACHED_ENGINE_NONE)
			continue;
		struct skv_engine_stats es;
		admin_engine_stats(e, &es);
		struct skv_admin_engine row = {
			.id = e->id, .pid = (uint32_t)(e->pid > 0 ? e->pid : 0), .node = e->node,
			.state = e->state, .supervised = (uint32_t)e->supervised,
			.streams = e->n_streams, .restarts = e->restarts,
			.last_batch_rows = (uint32_t)es.last_batch_rows, .steps = es.steps,
			.tokens_generated = es.tokens_generated, .prompt_tokens = es.prompt_tokens,
			.rows = es.rows, .wake_syscalls = es.wake_syscalls,
		};
		if (e->rate_time > 0 && now > e->rate_time && es.tokens_generated >= e->rate_tokens)
			row.tokens_per_s =
				(double)(es.tokens_generated - e->rate_tokens) / (now - e->rate_time);
		e->rate_tokens = es.tokens_generated;
		e->rate_time = now;
		snprintf(row.cpus, sizeof(row.cpus), "%s", e->cpus);
		if (cached_conn_send(d, c, SKV_MSG_ADMIN_ENGINE, &row, NULL, 0) < 0)
			return;
		sent++;
	}
	admin_send_end(d, c, sent);
}

/* Who may see what (cached/durable.c): a peer sees its own streams; the daemon's uid, root
 * and --admin-group members see every stream, contents included. */
static int admin_may_see(const struct cached_conn *c, const struct cached_stream *s)
{
	return c->content_ok || s->owner_uid == c->peer_uid;
}

void cached_admin_request(struct cached *d, struct cached_conn *c,
			  const struct skv_msg_admin_req *req)
{
	double now = cached_now();
	switch (req->what) {
	case SKV_ADMIN_SERVER:
		admin_server(d, c);
		return;
	case SKV_ADMIN_STREAMS: {
		uint64_t sent = 0;
		for (struct cached_stream *s = d->streams; s; s = s->next) {
			struct skv_admin_stream row;
			if (!admin_may_see(c, s))
				continue;
			admin_stream_row(d, s, &row, now, NULL);
			if (cached_conn_send(d, c, SKV_MSG_ADMIN_STREAM, &row, NULL, 0) < 0)
				return;
			sent++;
		}
		admin_send_end(d, c, sent);
		return;
	}
	case SKV_ADMIN_STREAM: {
		struct cached_stream *s = d->streams;
		while (s && s->id != req->stream_id)
			s = s->next;
		if (!s || !admin_may_see(c, s)) {
			struct skv_msg_error e = { .code = -ENOENT };
			snprintf(e.text, sizeof(e.text), "no stream %llu",
				 (unsigned long long)req->stream_id);
			cached_conn_send(d, c, SKV_MSG_ERROR, &e, NULL, 0);
			return;
		}
		struct skv_admin_stream row;
		struct skv_kv_ring ring;
		int snap = admin_stream_row(d, s, &row, now, &ring);
		if (snap == -EAGAIN) {
			struct skv_msg_error e = { .code = -EAGAIN };
			snprintf(e.text, sizeof(e.text),
				 "stream %llu is being written too fast to read; try again",
				 (unsigned long long)s->id);
			cached_conn_send(d, c, SKV_MSG_ERROR, &e, NULL, 0);
			return;
		}
		if (cached_conn_send(d, c, SKV_MSG_ADMIN_STREAM, &row, NULL, 0) < 0)
			return;
		if (snap == 0 && admin_send_tokens(d, c, s, &ring) < 0) {
			struct skv_msg_error e = { .code = -EIO };
			snprintf(e.text, sizeof(e.text), "cannot send the tokens of stream %llu",
				 (unsigned long long)s->id);
			cached_conn_send(d, c, SKV_MSG_ERROR, &e, NULL, 0);
			return;
		}
		admin_send_end(d, c, 1);
		return;
	}
	case SKV_ADMIN_ARENAS:
		admin_arenas(d, c);
		return;
	case SKV_ADMIN_ENGINES:
		admin_engines(d, c);
		return;
	case SKV_ADMIN_HISTOGRAMS: {
		_Static_assert(SKV_HIST_BUCKETS == 16, "skv_admin_hist has 16 buckets");
		struct skv_admin_hist h = { 0 };
		for (unsigned i = 0; i <= d->n_engines; i++) {
			struct skv_engine_stats es;
			if (i == d->n_engines)
				es = d->retired; /* engines that have exited */
			else if (admin_engine_stats(&d->engines[i], &es) < 0)
				continue;
			for (unsigned b = 0; b < SKV_HIST_BUCKETS; b++) {
				h.ttft_bucket[b] += es.ttft.bucket[b];
				h.itl_bucket[b] += es.itl.bucket[b];
			}
			h.ttft_count += es.ttft.count;
			h.ttft_sum_ns += es.ttft.sum_ns;
			h.itl_count += es.itl.count;
			h.itl_sum_ns += es.itl.sum_ns;
		}
		cached_conn_send(d, c, SKV_MSG_ADMIN_HIST, &h, NULL, 0);
		return;
	}
	case SKV_ADMIN_WATCH:
		if (!c->watching) {
			c->watching = 1;
			d->watchers++;
		}
		return;
	default: {
		struct skv_msg_error e = { .code = -EINVAL };
		snprintf(e.text, sizeof(e.text), "ADMIN_REQ: unknown request %u", req->what);
		cached_conn_send(d, c, SKV_MSG_ERROR, &e, NULL, 0);
	}
	}
}
