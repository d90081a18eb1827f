/* skv-cached: the streamkv daemon.
 *
 * It owns the KV arenas (one per NUMA node, memfd-backed, huge pages when reserved), the packed
 * weights (one sealed memfd every engine maps read-only), the stream table and the control
 * socket; it starts and supervises the engine processes. It never runs the model and never
 * touches a stream's tokens: those flow through each stream's channel between the client and
 * the engine, and its KV stays in place in the arena.
 *
 * Events (one epoll loop, single-threaded): the listening socket; each peer's socket (clients,
 * engines, admin tools); each engine's pidfd (the process exited: its KV regions may be reused
 * only after that); a signalfd (SIGINT/SIGTERM: shut down, SIGCHLD: reap).
 *
 * Who frees a stream's KV region: the daemon, and only when no engine can touch it any more:
 * after the engine acknowledged DROP, or after the engine's process has exited. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "channel.h"
#include "daemon-pvt.h"
#include "forward.h"
#include "kv-layout.h"
#include "model.h"
#include "proto.h"
#include "skv-error.h"
#include "stream.h"
#include "topology.h"
#include "wake.h"

#define CACHED_MAX_EVENTS 64
#define CACHED_RESTART_WINDOW_S 30
#define CACHED_RESTART_MAX 5


void cached_log(const char *fmt, ...)
{
	va_list ap;
	fputs("skv-cached: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

double cached_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- epoll bookkeeping ------------------------------------------------------------------ */

int cached_watch_fd(struct cached *d, int fd, uint32_t kind, void *ptr)
{
	struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP };
	if (fd < 0 || fd >= CACHED_MAX_FDS)
		return -EMFILE;
	d->tags[fd] = (struct cached_tag){ .kind = kind, .ptr = ptr, .fd = fd };
	ev.data.fd = fd;
	if (epoll_ctl(d->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		d->tags[fd].kind = CACHED_TAG_NONE;
		return -errno;
	}
	return 0;
}

static void cached_unwatch(struct cached *d, int fd)
{
	if (fd < 0)
		return;
	epoll_ctl(d->epfd, EPOLL_CTL_DEL, fd, NULL);
	if (fd < CACHED_MAX_FDS)
		d->tags[fd].kind = CACHED_TAG_NONE;
}

/* ---- streams ------------------------------------------------------------------------------ */

static struct cached_stream *stream_find(struct cached *d, uint64_t id)
{
	for (struct cached_stream *s = d->streams; s; s = s->next)
		if (s->id == id)
			return s;
	return NULL;
}

struct cached_stream *cached_stream_find(struct cached *d, uint64_t id)
{
	return stream_find(d, id);
}

/* The idle time-out's view of the channel goes with the stream's KV. */
static void stream_unwatch_idle(struct cached *d, struct cached_stream *s)
{
	if (!s->chan_view)
		return;
	munmap((void *)(uintptr_t)s->chan_view, s->chan_view_bytes);
	s->chan_view = NULL;
	d->n_idle_tracked--;
}

/* Take s out of its engine's queue of DROPs not sent yet. */
static void stream_unqueue_drop(struct cached_stream *s)
{
	struct cached_engine *e = s->engine;
	if (!s->drop_queued || !e)
		return;
	struct cached_stream *prev = NULL;
	for (struct cached_stream *q = e->drop_head; q; prev = q, q = q->drop_next) {
		if (q != s)
			continue;
		if (prev)
			prev->drop_next = s->drop_next;
		else
			e->drop_head = s->drop_next;
		if (e->drop_tail == s)
			e->drop_tail = prev;
		break;
	}
	s->drop_queued = 0;
	s->drop_next = NULL;
}

/* The region goes back to the arena and the stream leaves its engine: only when no engine can
 * touch the region any more (DROPPED came back, or the engine's process has exited). The
 * table entry may stay (a failed stream waits for its client's CLOSE). */
static void stream_release(struct cached *d, struct cached_stream *s)
{
	if (s->snap)
		cached_snapshot_abort(d, s, "the stream ended before its snapshot was taken");
	if (s->region_bytes) {
		struct skv_kv_ring ring;
		char *region = (char *)skv_arena_base(d->arenas[s->arena]) + s->region_offset;
		if (skv_kv_ring_snapshot(skv_kv_region_ring(region), &ring, 64) == 0)
			d->stats.tokens_evicted_closed += ring.tokens_evicted;
		skv_arena_free(d->arenas[s->arena], s->region_offset);
		s->region_bytes = 0;
		d->n_kv_streams--;
		d->admission_dirty = 1;
	}
	stream_unwatch_idle(d, s);
	stream_unqueue_drop(s);
	if (s->engine && s->engine->n_streams)
		s->engine->n_streams--;
	s->engine = NULL;
	s->dropping = 0;
}

static void stream_destroy(struct cached *d, struct cached_stream *s)
{
	struct cached_stream **l = &d->streams;
	while (*l && *l != s)
		l = &(*l)->next;
	if (*l)
		*l = s->next;
	cached_event(d, SKV_EVENT_CLOSE, s->id, s->engine ? s->engine->id : UINT32_MAX, 0,
		     "stream closed");
	stream_release(d, s);
	if (s->client && s->client->n_streams)
		s->client->n_streams--;
	if (s->chan_fd >= 0)
		close(s->chan_fd);
	if (s->detached_at > 0.0)
		d->n_detached--;
	if (s->resumable && d->state_dir)
		cached_state_forget(d, s);
	d->n_streams--;
	d->stats.streams_closed++;
	free(s);
}

static void stream_fail(struct cached *d, struct cached_stream *s, int code, const char *why)
{
	if (s->client && s->state != CACHED_STREAM_FAILED) {
		struct skv_msg_failed f = { .stream_id = s->id, .code = code };
		snprintf(f.text, sizeof(f.text), "%s", why);
		cached_conn_send(d, s->client, SKV_MSG_FAILED, &f, NULL, 0);
	}
	if (s->state != CACHED_STREAM_FAILED) {
		d->stats.streams_failed++;
		cached_event(d, SKV_EVENT_FAIL, s->id, s->engine ? s->engine->id : UINT32_MAX,
			     (uint64_t)(int64_t)code, "%s", why);
	}
	s->state = CACHED_STREAM_FAILED;
}

static void stream_send_drop(struct cached *d, struct cached_stream *s)
{
	struct skv_msg_stream m = { .stream_id = s->id };
	s->engine->drops_in_flight++;
	cached_conn_send(d, s->engine->conn, SKV_MSG_DROP, &m, NULL, 0);
}

/* Ask the stream's (ready) engine to let go of it; DROPPED comes back, then the region is
 * free. At most CACHED_DROP_WINDOW DROPs are unanswered per engine: a client with a thousand
 * streams that dies would otherwise have the engine answer a thousand DROPPEDs at once, more
 * than its socket buffer holds. The rest wait here, in order, for answers. */
static void stream_drop(struct cached *d, struct cached_stream *s)
{
	struct cached_engine *e = s->engine;
	if (s->dropping)
		return;
	s->dropping = 1;
	if (e->drops_in_flight < CACHED_DROP_WINDOW) {
		stream_send_drop(d, s);
		return;
	}
	s->drop_queued = 1;
	s->drop_next = NULL;
	if (e->drop_tail)
		e->drop_tail->drop_next = s;
	else
		e->drop_head = s;
	e->drop_tail = s;
}

void cached_stream_drop(struct cached *d, struct cached_stream *s)
{
	stream_drop(d, s);
}

/* A DROPPED came back: send the DROPs that waited for the window. */
static void engine_drop_acked(struct cached *d, struct cached_engine *e)
{
	if (e->drops_in_flight)
		e->drops_in_flight--;
	while (e->drop_head && e->drops_in_flight < CACHED_DROP_WINDOW && e->conn) {
		struct cached_stream *s = e->drop_head;
		e->drop_head = s->drop_next;
		if (!e->drop_head)
			e->drop_tail = NULL;
		s->drop_queued = 0;
		s->drop_next = NULL;
		stream_send_drop(d, s);
	}
}

/* The engine can answer no more DROPs: forget the window (its death frees the regions). */
static void engine_drops_reset(struct cached_engine *e)
{
	for (struct cached_stream *s = e->drop_head, *next; s; s = next) {
		next = s->drop_next;
		s->drop_queued = 0;
		s->drop_next = NULL;
	}
	e->drop_head = e->drop_tail = NULL;
	e->drops_in_flight = 0;
}

void cached_stream_idle_expire(struct cached *d, struct cached_stream *s)
{
	char why[SKV_MSG_TEXT];
	snprintf(why, sizeof(why), "idle for %u s: closed by the daemon's idle time-out",
		 s->idle_timeout_s);
	stream_fail(d, s, -ETIMEDOUT, why);
	d->stats.streams_idle_closed++;
	/* Nothing more to watch: it is going away. */
	stream_unwatch_idle(d, s);
	if (d->verbose)
		cached_log("stream %llu: idle for %u s; dropping it", (unsigned long long)s->id,
			   s->idle_timeout_s);
	stream_drop(d, s);
}

/* The least loaded ready engine whose arena has room for bytes, with the region allocated
 * there (*offset); NULL when none has (*any_ready says whether any engine is ready). With
 * several nodes a full arena does not refuse a stream that another node's arena can take. */
static struct cached_engine *cached_pick_engine(struct cached *d, uint64_t bytes,
						uint64_t *offset, int *any_ready)
{
	uint64_t tried = 0; /* arenas found full, by index */
	*any_ready = 0;
	for (;;) {
		struct cached_engine *best = NULL;
		for (unsigned i = 0; i < d->n_engines; i++) {
			struct cached_engine *e = &d->engines[i];
			if (e->state != CACHED_ENGINE_READY)
				continue;
			*any_ready = 1;
			if (tried & (1ull << e->arena))
				continue;
			if (!best || e->n_streams < best->n_streams)
				best = e;
		}
		if (!best)
			return NULL;
		int64_t got = skv_arena_alloc(d->arenas[best->arena], bytes);
		if (got >= 0) {
			*offset = (uint64_t)got;
			return best;
		}
		tried |= 1ull << best->arena;
	}
}

/* A sealed page shared with peers: its size is fixed for good, so no peer can shrink it under
 * another's mapping (a SIGBUS in the engine or the daemon). Returns the fd or -errno. */
static int cached_make_page(const char *name, size_t bytes)
{
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)bytes) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		int err = -errno;
		close(fd);
		return err;
	}
	return fd;
}

/* The stream's channel: a sealed memfd formatted here. With an idle time-out the daemon keeps a
 * read-only view of its first bytes, up to the output ring's header, to see whether the ring
 * indices move (the slots in between are never touched through it, so they cost no memory
 * here). Returns the fd or -errno. */
static int cached_make_channel(struct cached_stream *s, size_t *bytes)
{
	char name[64];
	snprintf(name, sizeof(name), "skv-chan-%llu", (unsigned long long)s->id);
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	*bytes = skv_chan_bytes();
	void *p = MAP_FAILED;
	int err = 0;
	if (ftruncate(fd, (off_t)*bytes) < 0 ||
	    (p = mmap(NULL, *bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED)
		err = -errno;
	if (!err)
		err = skv_chan_init(p, *bytes, s->id);
	if (!err) {
		/* Our own numbers, read before any peer can see the memory. */
		const struct skv_chan_hdr *h = p;
		s->chan_in_offset = h->in_offset;
		s->chan_out_offset = h->out_offset;
	}
	if (p != MAP_FAILED)
		munmap(p, *bytes);
	/* Its size is fixed for good: a peer cannot shrink it under the other's mapping. */
	if (!err && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
		err = -errno;
	if (!err && s->idle_timeout_s) {
		size_t view = s->chan_out_offset + sizeof(struct skv_ring_hdr);
		void *v = mmap(NULL, view, PROT_READ, MAP_SHARED, fd, 0);
		if (v == MAP_FAILED) {
			err = -errno;
		} else {
			s->chan_view = v;
			s->chan_view_bytes = view;
		}
	}
	if (err) {
		close(fd);
		return err;
	}
	return fd;
}

/* An OPEN's policy and the shape of its KV region; why gets the reason of a refusal. */
static int open_resolve(struct cached *d, const struct skv_stream_params *in, struct skv_policy *p,
			struct skv_kv_desc *desc, char *why, size_t why_len)
{
	char msg[256] = "";
	skv_policy_default(p);
	if (in->policy > SKV_POLICY_RECOMPUTE || in->evict > SKV_EVICT_PROMPT ||
	    !(in->temperature >= 0.0f && in->temperature <= 100.0f) || in->top_p != in->top_p) {
		snprintf(why, why_len, "OPEN: invalid policy or sampling parameters");
		return -EINVAL;
	}
	p->kind = (enum skv_policy_kind)in->policy;
	p->evict = (enum skv_evict_mode)in->evict;
	p->sink_slots = in->sink_slots;
	p->window_slots = in->window_slots;
	p->abs_positions = in->abs_positions != 0;
	p->kv_dtype = in->kv_dtype;
	int err = skv_policy_resolve(p, d->model->cfg.seq_len, msg, sizeof(msg));
	if (!err)
		err = skv_kv_layout_init_dtype(desc, (uint32_t)d->model->cfg.n_layers,
					       (uint32_t)d->model->cfg.n_kv_heads,
					       (uint32_t)d->model->cfg.head_size,
					       (uint32_t)p->sink_slots, (uint32_t)p->window_slots,
					       p->kv_dtype);
	if (err)
		snprintf(why, why_len, "OPEN: %s", msg[0] ? msg : skv_strerror(err));
	return err;
}

/* open_resolve, and refuse a stream larger than a whole arena: no amount of waiting would
 * make room for it. */
static int open_check(struct cached *d, const struct skv_msg_open_named *named, int resumable,
		      struct cached_conn *c, struct skv_policy *p, struct skv_kv_desc *desc,
		      char *why, size_t why_len)
{
	const struct skv_msg_open *open = &named->open;
	int err = open_resolve(d, &open->params, p, desc, why, why_len);
	if (err)
		return err;
	if (resumable && named->name[0]) {
		char name[SKV_STREAM_NAME_MAX];
		snprintf(name, sizeof(name), "%.*s", (int)sizeof(named->name) - 1, named->name);
		if (!cached_name_valid(name) || memchr(named->name, 0, sizeof(named->name)) == NULL) {
			snprintf(why, why_len, "OPEN: a stream name is 1 to %d of A-Z a-z 0-9 . _ -",
				 SKV_STREAM_NAME_MAX - 1);
			return -EINVAL;
		}
		uint32_t owner = c ? c->peer_uid : d->restoring->owner_uid;
		struct cached_stream *other = cached_stream_by_name(d, name, owner);
		if (other && other->owner_uid == owner) {
			snprintf(why, why_len,
				 "OPEN: you already have a stream named %s: attach to it, or pick "
				 "another name", name);
			return -EEXIST;
		}
	}
	uint64_t largest = 0;
	for (unsigned a = 0; a < d->n_arenas; a++) {
		struct skv_arena_heap_stats hs;
		skv_arena_heap_stats(skv_arena_heap(d->arenas[a]), &hs);
		largest = hs.heap_bytes > largest ? hs.heap_bytes : largest;
	}
	if (desc->region_bytes > largest) {
		snprintf(why, why_len,
			 "a stream of this policy needs %llu bytes of KV, more than a whole KV arena "
			 "(%llu); start the daemon with a larger --arena-mb",
			 (unsigned long long)desc->region_bytes, (unsigned long long)largest);
		return -ENOSPC;
	}
	return 0;
}

int cached_check_open(struct cached *d, const struct skv_msg_open_named *open, int resumable,
		      struct cached_conn *c, char *why, size_t why_len)
{
	struct skv_policy p;
	struct skv_kv_desc desc;
	return open_check(d, open, resumable, c, &p, &desc, why, why_len);
}

int cached_place_stream(struct cached *d, struct cached_conn *c,
			const struct skv_msg_open_named *open, int resumable, int client_efd,
			char *why, size_t why_len)
{
	struct skv_policy p;
	struct skv_kv_desc desc;
	const struct skv_stream_params *in = &open->open.params;
	int err = open_check(d, open, resumable, c, &p, &desc, why, why_len);
	if (err)
		return err;
	if (d->restoring && (d->restoring->region_bytes != desc.region_bytes ||
			     memcmp(&d->restoring->desc, &desc, sizeof(desc)))) {
		snprintf(why, why_len,
			 "the snapshot's KV layout (%llu bytes) is not the one this daemon lays out "
			 "for its parameters (%llu bytes, KV %s)",
			 (unsigned long long)d->restoring->region_bytes,
			 (unsigned long long)desc.region_bytes, skv_kv_dtype_name(desc.dtype));
		return -SKV_ESHAPE;
	}
	if (d->max_streams && d->n_kv_streams >= d->max_streams) {
		snprintf(why, why_len,
			 "the daemon's stream limit (%llu) is reached: close a stream, or start "
			 "skv-cached with a larger --max-streams",
			 (unsigned long long)d->max_streams);
		return CACHED_WAIT_LIMIT;
	}
	uint64_t offset = 0;
	int any_ready;
	struct cached_engine *e = cached_pick_engine(d, desc.region_bytes, &offset, &any_ready);
	if (!e && !any_ready) {
		snprintf(why, why_len, "no engine is ready to serve a stream; try again");
		return CACHED_WAIT_ENGINE;
	}
	if (!e) {
		snprintf(why, why_len,
			 "the KV arena%s full: a stream needs %llu bytes; close streams or start the "
			 "daemon with a larger --arena-mb",
			 d->n_arenas > 1 ? "s are" : " is", (unsigned long long)desc.region_bytes);
		return CACHED_WAIT_ARENA;
	}
	/* Lay the region out before anyone sees it: descriptor, empty ring (or a restored
	 * region as the snapshot holds it, its descriptor checked equal to desc). */
	const struct cached_restore *restoring = d->restoring;
	char *region = (char *)skv_arena_base(d->arenas[e->arena]) + offset;
	if (restoring) {
		if ((err = cached_restore_read(restoring, region, why, why_len)) < 0) {
			skv_arena_free(d->arenas[e->arena], offset);
			return err;
		}
	} else {
		memcpy(region, &desc, sizeof(desc));
		skv_kv_ring_reset(skv_kv_region_ring(region), &desc);
	}

	struct cached_stream *s = calloc(1, sizeof(*s));
	size_t chan_bytes = 0;
	int chan_fd = -ENOMEM;
	if (s) {
		s->id = d->next_stream_id;
		s->chan_fd = -1;
		s->idle_timeout_s = in->idle_timeout_s ? in->idle_timeout_s : d->idle_timeout_s;
		if (s->idle_timeout_s > CACHED_IDLE_MAX_S)
			s->idle_timeout_s = CACHED_IDLE_MAX_S;
		chan_fd = cached_make_channel(s, &chan_bytes);
	}
	if (chan_fd < 0) {
		skv_arena_free(d->arenas[e->arena], offset);
		if (s)
			snprintf(why, why_len, "cannot create the stream's channel: %s",
				 skv_strerror(chan_fd));
		else
			snprintf(why, why_len, "the daemon has no memory for another stream");
		free(s);
		return chan_fd;
	}
	d->next_stream_id++;
	s->client = c;
	s->engine = e;
	s->arena = e->arena;
	s->region_offset = offset;
	s->region_bytes = desc.region_bytes;
	s->params = *in;
	s->params.sink_slots = p.sink_slots;
	s->params.window_slots = p.window_slots;
	s->params.kv_dtype = (uint16_t)p.kv_dtype;
	s->params.idle_timeout_s = s->idle_timeout_s;
	s->state = CACHED_STREAM_OPEN;
	s->owner_uid = c ? c->peer_uid : restoring->owner_uid;
	s->opened_at = s->rate_time = s->active_at = cached_now();
	if (resumable) {
		/* The daemon keeps the channel for whoever attaches next. */
		s->resumable = 1;
		if (open->name[0])
			snprintf(s->name, sizeof(s->name), "%.*s", (int)sizeof(s->name) - 1,
				 open->name);
		else
			snprintf(s->name, sizeof(s->name), "s%llu", (unsigned long long)s->id);
		s->chan_fd = fcntl(chan_fd, F_DUPFD_CLOEXEC, 0);
		err = s->chan_fd < 0 ? -errno : 0;
		if (!err && restoring)
			memcpy(s->token, restoring->token, sizeof(s->token));
		else if (!err)
			err = cached_token_new(s->token);
		if (err < 0) {
			if (s->chan_fd >= 0)
				close(s->chan_fd);
			close(chan_fd);
			if (s->chan_view) {
				munmap((void *)(uintptr_t)s->chan_view, s->chan_view_bytes);
				d->n_idle_tracked--;
			}
			skv_arena_free(d->arenas[e->arena], offset);
			free(s);
			snprintf(why, why_len, "cannot make the stream resumable: %s",
				 skv_strerror(err));
			return err;
		}
	}
	if (s->chan_view)
		d->n_idle_tracked++;

	struct skv_msg_assign a = { .stream_id = s->id, .params = s->params,
				    .region_offset = offset, .region_bytes = desc.region_bytes,
				    .channel_bytes = chan_bytes };
	int fds_e[3] = { chan_fd, client_efd, c ? c->doorbell_fd : restoring->doorbell_fd };
	if (restoring) {
		struct skv_msg_assign_restored ar = { .assign = a, .state = restoring->state };
		err = cached_conn_send(d, e->conn, SKV_MSG_ASSIGN_RESTORED, &ar, fds_e, 3);
	} else {
		err = cached_conn_send(d, e->conn, SKV_MSG_ASSIGN, &a, fds_e, 3);
	}
	if (err) {
		/* Not delivered: the engine is going away and never learns of the region, which is
		 * ours again at once. */
		close(chan_fd);
		if (s->chan_fd >= 0)
			close(s->chan_fd);
		if (s->chan_view) {
			munmap((void *)(uintptr_t)s->chan_view, s->chan_view_bytes);
			d->n_idle_tracked--;
		}
		skv_arena_free(d->arenas[e->arena], offset);
		free(s);
		snprintf(why, why_len, "the engine went away while the stream was opening; try again");
		return CACHED_WAIT_ENGINE;
	}
	s->next = d->streams;
	d->streams = s;
	d->n_streams++;
	d->n_kv_streams++;
	d->stats.streams_opened++;
	e->n_streams++;
	if (!c) {
		/* Restored: detached until its owner attaches with the token. */
		close(chan_fd);
		s->detached_at = cached_now();
		d->n_detached++;
		cached_event(d, SKV_EVENT_OPEN, s->id, e->id, 2, "stream %s restored", s->name);
		cached_log("stream %llu (%s) restored on engine %u", (unsigned long long)s->id,
			   s->name, e->id);
		return 0;
	}
	c->n_streams++;
	struct skv_msg_opened o = { .stream_id = s->id, .engine_id = e->id,
				    .node = (uint32_t)(e->node < 0 ? 0 : e->node),
				    .sink_slots = p.sink_slots, .window_slots = p.window_slots,
				    .channel_bytes = chan_bytes, .kv_bytes = desc.region_bytes };
	int fds_c[3] = { chan_fd, e->doorbell_fd, e->efd };
	if (s->resumable) {
		struct skv_msg_opened_named on = { .opened = o };
		memcpy(on.name, s->name, sizeof(on.name));
		memcpy(on.token, s->token, sizeof(on.token));
		cached_conn_send(d, c, SKV_MSG_OPENED_NAMED, &on, fds_c, 3);
	} else {
		cached_conn_send(d, c, SKV_MSG_OPENED, &o, fds_c, 3);
	}
	close(chan_fd);
	cached_event(d, SKV_EVENT_OPEN, s->id, e->id, 0, "%s, %lld sinks, window %lld",
		     skv_policy_name(p.kind), (long long)p.sink_slots, (long long)p.window_slots);
	if (d->verbose)
		cached_log("stream %llu opened on engine %u (%s, %lld sinks, window %lld, idle "
			   "time-out %u s)", (unsigned long long)s->id, e->id, skv_policy_name(p.kind),
			   (long long)p.sink_slots, (long long)p.window_slots, s->idle_timeout_s);
	return 0;
}

static void cached_close_stream(struct cached *d, struct cached_conn *c, uint64_t id)
{
	struct cached_stream *s = stream_find(d, id);
	if (!s || s->client != c) {
		cached_conn_errorf(d, c, -ENOENT, "CLOSE: no stream %llu of yours", (unsigned long long)id);
		return;
	}
	struct skv_msg_stream m = { .stream_id = id };
	if (s->state == CACHED_STREAM_CLOSING)
		return;
	if (s->reviving)
		cached_revive_cancel(d, s); /* closed for good before its restore */
	if (s->dropping) {
		/* Already being dropped (its idle time-out): CLOSED goes out with DROPPED. */
		s->state = CACHED_STREAM_CLOSING;
		return;
	}
	if (s->engine && s->engine->state == CACHED_ENGINE_READY) {
		s->state = CACHED_STREAM_CLOSING;
		stream_drop(d, s);
		return; /* CLOSED goes out when the engine acknowledges */
	}
	/* No engine can touch it (failed and its engine exited): free it now. */
	if (!s->engine || s->engine->state == CACHED_ENGINE_EXITED) {
		cached_conn_send(d, c, SKV_MSG_CLOSED, &m, NULL, 0);
		stream_destroy(d, s);
	} else {
		s->state = CACHED_STREAM_CLOSING; /* freed when the engine's process has exited */
		s->client = NULL;
		c->n_streams--;
		cached_conn_send(d, c, SKV_MSG_CLOSED, &m, NULL, 0);
	}
}

/* ---- engines ------------------------------------------------------------------------------ */

int cached_spawn_engine(struct cached *d, struct cached_engine *e)
{
	char id[16], node[16], threads[16];
	snprintf(id, sizeof(id), "%u", e->id);
	snprintf(threads, sizeof(threads), "%u", d->engine_threads ? d->engine_threads : 1);
	snprintf(node, sizeof(node), "%d", e->node < 0 ? 0 : e->node);
	pid_t pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		/* Child: die with the daemon even if the socket hang-up were missed. */
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		char *argv[16];
		int n = 0;
		argv[n++] = (char *)d->engine_bin;
		argv[n++] = "--socket";
		argv[n++] = d->socket_path;
		argv[n++] = "--engine-id";
		argv[n++] = id;
		argv[n++] = "--node";
		argv[n++] = node;
		argv[n++] = "--threads";
		argv[n++] = threads;
		argv[n++] = "--weights";
		argv[n++] = (char *)(d->engine_weights ? d->engine_weights : "auto");
		if (e->cpus[0]) {
			argv[n++] = "--cpus";
			argv[n++] = e->cpus;
		}
		argv[n] = NULL;
		execv(d->engine_bin, argv);
		fprintf(stderr, "skv-cached: cannot start %s: %s\n", d->engine_bin, strerror(errno));
		_exit(127);
	}
	e->pid = pid;
	e->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (e->pidfd < 0)
		return -errno;
	e->state = CACHED_ENGINE_STARTING;
	e->started_at = cached_now();
	return cached_watch_fd(d, e->pidfd, CACHED_TAG_PIDFD, e);
}

/* The engine's process is gone: its streams fail, their regions are free to reuse. */
static void cached_engine_exited(struct cached *d, struct cached_engine *e, int status)
{
	cached_unwatch(d, e->pidfd);
	close(e->pidfd);
	e->pidfd = -1;
	e->pid = 0;
	e->state = CACHED_ENGINE_EXITED;
	for (struct cached_stream *s = d->streams, *next; s; s = next) {
		next = s->next;
		if (s->engine != e)
			continue;
		if (s->state == CACHED_STREAM_CLOSING) {
			/* Its client asked to close it: the close is complete now. */
			struct skv_msg_stream m = { .stream_id = s->id };
			if (s->client)
				cached_conn_send(d, s->client, SKV_MSG_CLOSED, &m, NULL, 0);
			stream_destroy(d, s);
			continue;
		}
		if (!cached_revive_take(d, s))
			stream_fail(d, s, -EPIPE, "its engine died; open a new stream");
		if (!s->client)
			stream_destroy(d, s);
		else
			stream_release(d, s); /* the entry waits for the client's CLOSE */
	}
	e->n_streams = 0;
	engine_drops_reset(e);
	cached_admin_retire(d, e);
	if (!e->supervised) {
		/* Started by hand: nobody restarts it; its slot and fds are free again. */
		if (e->doorbell)
			munmap(e->doorbell, SKV_DOORBELL_BYTES);
		if (e->doorbell_fd >= 0)
			close(e->doorbell_fd);
		if (e->efd >= 0)
			close(e->efd);
		e->doorbell = NULL;
		e->doorbell_fd = e->efd = -1;
		e->state = CACHED_ENGINE_NONE;
	}
	if (WIFSIGNALED(status)) {
		cached_log("engine %u died of signal %d", e->id, WTERMSIG(status));
		cached_event(d, SKV_EVENT_ENGINE_EXIT, 0, e->id, (uint64_t)WTERMSIG(status),
			     "engine died of signal %d", WTERMSIG(status));
	} else {
		cached_log("engine %u exited with status %d", e->id, WEXITSTATUS(status));
		cached_event(d, SKV_EVENT_ENGINE_EXIT, 0, e->id, (uint64_t)WEXITSTATUS(status),
			     "engine exited with status %d", WEXITSTATUS(status));
	}
	if (d->stopping || !e->supervised)
		return;
	double now = cached_now();
	if (now - e->restart_window_start > CACHED_RESTART_WINDOW_S) {
		e->restart_window_start = now;
		e->restarts_in_window = 0;
	}
	if (++e->restarts_in_window > CACHED_RESTART_MAX) {
		cached_log("engine %u keeps dying (%d times in %d s); not restarting it", e->id,
			   CACHED_RESTART_MAX, CACHED_RESTART_WINDOW_S);
		return;
	}
	e->restarts++;
	d->stats.engine_restarts++;
	int err = cached_spawn_engine(d, e);
	if (err < 0)
		cached_log("cannot restart engine %u: %s", e->id, strerror(-err));
}

void cached_stream_revived(struct cached *d, uint64_t old_id, int code, const char *text)
{
	struct cached_stream *s = stream_find(d, old_id);
	if (!s || !s->reviving)
		return; /* its client closed it, or went away, meanwhile */
	s->reviving = 0;
	stream_fail(d, s, code, text);
	if (!s->client && (!s->engine || s->engine->state == CACHED_ENGINE_EXITED))
		stream_destroy(d, s);
}

/* Its control connection dropped: stop sending it streams, tell their clients at once (those
 * restored from their snapshots once they are). The regions stay reserved until the process
 * has exited (pidfd). */
static void cached_engine_lost(struct cached *d, struct cached_engine *e)
{
	if (e->state == CACHED_ENGINE_READY || e->state == CACHED_ENGINE_STARTING)
		e->state = CACHED_ENGINE_LOST;
	e->conn = NULL;
	engine_drops_reset(e);
	/* Streams being closed get CLOSED once the process has exited (their regions are only
	 * safe then); the others fail now. */
	for (struct cached_stream *s = d->streams; s; s = s->next)
		if (s->engine == e && s->state != CACHED_STREAM_CLOSING &&
		    !cached_revive_take(d, s)) /* with a snapshot: restored, told later */
			stream_fail(d, s, -EPIPE, "its engine died; open a new stream");
	if (e->pidfd < 0 && e->state != CACHED_ENGINE_EXITED) {
		/* No pidfd (it could not be opened): nothing will tell us more. */
		cached_engine_exited(d, e, 0);
	}
}

int cached_engine_prepare(struct cached_engine *e)
{
	char name[32];
	snprintf(name, sizeof(name), "skv-doorbell-%u", e->id);
	e->doorbell_fd = cached_make_page(name, SKV_DOORBELL_BYTES);
	if (e->doorbell_fd < 0)
		return e->doorbell_fd;
	e->doorbell = mmap(NULL, SKV_DOORBELL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED,
			   e->doorbell_fd, 0);
	if (e->doorbell == MAP_FAILED) {
		e->doorbell = NULL;
		return -errno;
	}
	/* Non-blocking, as shm/wake.h recommends: io_uring then waits for it by polling
	 * instead of parking a worker thread in read(). */
	e->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	return e->efd < 0 ? -errno : 0;
}

static void cached_engine_hello(struct cached *d, struct cached_conn *c,
				const struct skv_msg_hello *h)
{
	struct cached_engine *e = NULL;
	/* An engine receives its node's whole arena, every stream's KV: only the daemon's own
	 * uid and root may be one, whatever --group admits. */
	if (c->peer_uid != 0 && c->peer_uid != d->uid) {
		cached_log("refused an engine of uid %u (pid %u)", c->peer_uid, c->peer_pid);
		cached_conn_errorf(d, c, -EACCES,
			   "permission denied: only uid %u or root may serve as an engine",
			   (unsigned)d->uid);
		cached_drop_conn(d, c);
		return;
	}
	if (h->engine_id != UINT32_MAX) {
		for (unsigned i = 0; i < d->n_engines; i++)
			if (d->engines[i].id == h->engine_id && d->engines[i].supervised &&
			    d->engines[i].pid == (pid_t)c->peer_pid)
				e = &d->engines[i];
		if (!e) {
			cached_conn_errorf(d, c, -EPERM, "engine id %u is not one this daemon started",
				   h->engine_id);
			cached_drop_conn(d, c);
			return;
		}
	} else {
		/* Started by hand: not restarted by us; it runs on the node it asks for. A slot
		 * of a hand-started engine that has exited is reused. */
		unsigned slot = d->n_engines;
		for (unsigned i = 0; i < d->n_engines; i++)
			if (!d->engines[i].supervised && d->engines[i].state == CACHED_ENGINE_NONE) {
				slot = i;
				break;
			}
		if (slot == CACHED_MAX_ENGINES) {
			cached_conn_errorf(d, c, -ENOSPC, "too many engines (%d)", CACHED_MAX_ENGINES);
			cached_drop_conn(d, c);
			return;
		}
		unsigned node_arena = 0;
		for (unsigned a = 0; a < d->n_arenas; a++)
			if (h->node != UINT32_MAX && d->arena_node[a] == (int)h->node)
				node_arena = a;
		e = &d->engines[slot];
		memset(e, 0, sizeof(*e));
		e->id = slot;
		if (slot == d->n_engines)
			d->n_engines++;
		e->arena = node_arena;
		e->node = d->arena_node[node_arena];
		e->pidfd = (int)syscall(SYS_pidfd_open, (pid_t)c->peer_pid, 0);
		e->pid = (pid_t)c->peer_pid;
		e->doorbell_fd = e->efd = -1;
		if (e->pidfd >= 0)
			cached_watch_fd(d, e->pidfd, CACHED_TAG_PIDFD, e);
		if (cached_engine_prepare(e) < 0) {
			cached_conn_errorf(d, c, -ENOMEM, "cannot create the engine's doorbell");
			cached_drop_conn(d, c);
			return;
		}
	}
	c->role = SKV_ROLE_ENGINE;
	c->engine = e;
	e->conn = c;
	e->state = CACHED_ENGINE_READY;
	struct skv_msg_hello_ok ok = {
		.major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR, .role = SKV_ROLE_ENGINE,
		.instance = d->instance, .engine_id = e->id,
		.node = (uint32_t)(e->node < 0 ? 0 : e->node),
		.arena_bytes = skv_arena_info(d->arenas[e->arena])->bytes,
		.weights_bytes = d->weights_bytes, .wait_backend = (uint32_t)d->wait_backend,
	};
	snprintf(ok.model_path, sizeof(ok.model_path), "%s", d->model_path);
	snprintf(ok.tokenizer_path, sizeof(ok.tokenizer_path), "%s", d->tokenizer_path);
	int fds[4] = { skv_arena_fd(d->arenas[e->arena]), d->weights_fd, e->doorbell_fd,
		       e->efd };
	if (cached_conn_send(d, c, SKV_MSG_HELLO_OK, &ok, fds, 4) < 0) {
		cached_drop_conn(d, c);
		return;
	}
	d->admission_dirty = 1; /* OPENs queued while no engine was ready */
	cached_event(d, SKV_EVENT_ENGINE_START, 0, e->id, c->peer_pid, "engine ready (pid %u)",
		     c->peer_pid);
	cached_log("engine %u ready (pid %u, node %d%s%s)", e->id, c->peer_pid, e->node,
			   e->cpus[0] ? ", cpu " : "", e->cpus);
}

/* ---- peers ------------------------------------------------------------------------------- */

void cached_drop_conn(struct cached *d, struct cached_conn *c)
{
	if (c->fd < 0)
		return;
	cached_unwatch(d, c->fd);
	close(c->fd);
	c->fd = -1;
	if (c->doorbell_fd >= 0)
		close(c->doorbell_fd);
	c->doorbell_fd = -1;
	cached_conn_free_out(c);
	if (c->n_queued)
		cached_admission_forget(d, c);
	if (c->engine) {
		cached_engine_lost(d, c->engine);
		c->engine = NULL;
	}
	/* A client's streams: the engines drop them, then the regions are freed. */
	for (struct cached_stream *s = d->streams, *next; s; s = next) {
		next = s->next;
		if (s->client != c)
			continue;
		if (s->resumable && s->state == CACHED_STREAM_OPEN && !s->dropping && s->engine &&
		    s->engine->state == CACHED_ENGINE_READY) {
			cached_stream_detach(d, s);
			continue;
		}
		s->client = NULL;
		if (s->engine && s->engine->state == CACHED_ENGINE_READY) {
			s->state = CACHED_STREAM_CLOSING;
			stream_drop(d, s);
		} else if (!s->engine || s->engine->state == CACHED_ENGINE_EXITED) {
			stream_destroy(d, s);
		}
	}
	if (c->watching) {
		c->watching = 0;
		d->watchers--;
	}
	c->dead = 1; /* freed by the loop once no event can still name it */
}

static void cached_accept(struct cached *d)
{
	for (;;) {
		int fd = accept4(d->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		struct ucred cred;
		socklen_t len = sizeof(cred);
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
			close(fd);
			continue;
		}
		struct cached_conn *c = calloc(1, sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->doorbell_fd = -1;
		c->peer_pid = (uint32_t)cred.pid;
		c->peer_uid = cred.uid;
		c->peer_gid = cred.gid;
		c->id = ++d->next_conn_id;
		c->content_ok = cred.uid == 0 || cred.uid == d->uid ||
				(d->have_admin_group &&
				 cached_peer_in_group(cred.uid, cred.gid, d->admin_group));
		c->next = d->conns;
		d->conns = c;
		if (!cached_peer_allowed(d, cred.uid, cred.gid)) {
			cached_log("refused a peer of uid %u (pid %d)", cred.uid, cred.pid);
			cached_conn_errorf(d, c, -EACCES,
				   "permission denied: uid %u may not use this daemon (uid %u%s)",
				   cred.uid, d->uid, d->have_group ? " or its --group" : "");
			cached_drop_conn(d, c);
			continue;
		}
		if (cached_watch_fd(d, fd, CACHED_TAG_CONN, c) < 0) {
			cached_conn_errorf(d, c, -EMFILE, "the daemon has too many connections");
			cached_drop_conn(d, c);
		}
	}
}

static void cached_hello(struct cached *d, struct cached_conn *c, const struct skv_msg_hello *h)
{
	if (h->major != SKV_PROTO_MAJOR) {
		cached_conn_errorf(d, c, -SKV_EVERSION,
			   "protocol %u.%u is not supported: this daemon speaks %u.%u", h->major,
			   h->minor, SKV_PROTO_MAJOR, SKV_PROTO_MINOR);
		cached_drop_conn(d, c);
		return;
	}
	switch (h->role) {
	case SKV_ROLE_ENGINE:
		cached_engine_hello(d, c, h);
		return;
	case SKV_ROLE_CLIENT:
	case SKV_ROLE_ADMIN: {
		c->role = h->role;
		struct skv_msg_hello_ok ok = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
					       .role = h->role, .instance = d->instance };
		snprintf(ok.model_path, sizeof(ok.model_path), "%s", d->model_path);
		snprintf(ok.tokenizer_path, sizeof(ok.tokenizer_path), "%s", d->tokenizer_path);
		if (h->role == SKV_ROLE_ADMIN) {
			if (cached_conn_send(d, c, SKV_MSG_HELLO_OK, &ok, NULL, 0) < 0)
				cached_drop_conn(d, c);
			return;
		}
		/* A client's doorbell: the wake word all its streams' engines ring. */
		char name[48];
		snprintf(name, sizeof(name), "skv-client-doorbell-%u", c->peer_pid);
		if (c->doorbell_fd < 0)
			c->doorbell_fd = cached_make_page(name, SKV_CLIENT_DOORBELL_BYTES);
		if (c->doorbell_fd < 0) {
			cached_conn_errorf(d, c, c->doorbell_fd, "cannot create the client's doorbell: %s",
				   skv_strerror(c->doorbell_fd));
			cached_drop_conn(d, c);
			return;
		}
		if (cached_conn_send(d, c, SKV_MSG_HELLO_OK, &ok, &c->doorbell_fd, 1) < 0)
			cached_drop_conn(d, c);
		return;
	}
	default:
		cached_conn_errorf(d, c, -SKV_EFORMAT, "HELLO: unknown role %u", h->role);
		cached_drop_conn(d, c);
	}
}

static void cached_close_fds(int *fds, int n)
{
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

static void cached_send_stats(struct cached *d, struct cached_conn *c)
{
	struct skv_msg_stats st = {
		.instance = d->instance,
		.streams = d->n_streams,
		.streams_opened = d->stats.streams_opened,
		.streams_closed = d->stats.streams_closed,
		.streams_failed = d->stats.streams_failed,
		.engine_restarts = d->stats.engine_restarts,
		.engines = d->n_engines,
		.arenas = d->n_arenas,
		.streams_queued = d->n_queued,
	};
	for (unsigned i = 0; i < d->n_engines; i++) {
		if (d->engines[i].state == CACHED_ENGINE_READY)
			st.engines_ready++;
		if (i < 16)
			st.engine_pid[i] = d->engines[i].pid;
	}
	for (unsigned a = 0; a < d->n_arenas; a++) {
		struct skv_arena_heap_stats hs;
		skv_arena_heap_stats(skv_arena_heap(d->arenas[a]), &hs);
		st.arena_bytes += skv_arena_info(d->arenas[a])->bytes;
		st.arena_used_bytes += hs.used_bytes;
		if (hs.largest_free > st.arena_largest_free_bytes)
			st.arena_largest_free_bytes = hs.largest_free;
	}
	cached_conn_send(d, c, SKV_MSG_STATS, &st, NULL, 0);
}

/* One message from a peer; every unexpected one ends the connection. */
static void cached_message(struct cached *d, struct cached_conn *c, const struct skv_msg_hdr *h,
			   const void *body, int *fds, int n_fds)
{
	if (!c->role) {
		if (h->type != SKV_MSG_HELLO) {
			cached_conn_errorf(d, c, -SKV_EFORMAT, "%s before HELLO", skv_msg_name(h->type));
			cached_close_fds(fds, n_fds);
			cached_drop_conn(d, c);
			return;
		}
		cached_close_fds(fds, n_fds);
		cached_hello(d, c, body);
		return;
	}
	if (c->role == SKV_ROLE_CLIENT && h->type == SKV_MSG_OPEN && n_fds == 1) {
		struct skv_msg_open_named named = { .open = *(const struct skv_msg_open *)body };
		cached_admission_open(d, c, &named, 0, fds[0]); /* takes the fd */
		return;
	}
	if (c->role == SKV_ROLE_CLIENT && h->type == SKV_MSG_OPEN_NAMED && n_fds == 1) {
		cached_admission_open(d, c, body, 1, fds[0]);
		return;
	}
	if (c->role == SKV_ROLE_CLIENT && h->type == SKV_MSG_ATTACH && n_fds == 1) {
		cached_attach(d, c, body, fds[0]); /* takes the fd */
		return;
	}
	if (c->role == SKV_ROLE_CLIENT && h->type == SKV_MSG_DETACH && n_fds == 0) {
		cached_detach_request(d, c, ((const struct skv_msg_stream *)body)->stream_id);
		return;
	}
	if (c->role == SKV_ROLE_CLIENT && h->type == SKV_MSG_CLOSE && n_fds == 0) {
		cached_close_stream(d, c, ((const struct skv_msg_stream *)body)->stream_id);
		return;
	}
	if ((c->role == SKV_ROLE_CLIENT || c->role == SKV_ROLE_ADMIN) &&
	    h->type == SKV_MSG_STATS_REQ && n_fds == 0) {
		cached_send_stats(d, c);
		return;
	}
	if (c->role == SKV_ROLE_ADMIN && h->type == SKV_MSG_ADMIN_SNAPSHOT && n_fds == 1) {
		cached_admin_snapshot(d, c, ((const struct skv_msg_admin_req *)body)->stream_id,
				      fds[0]);
		return;
	}
	if (c->role == SKV_ROLE_ADMIN && h->type == SKV_MSG_ADMIN_RESTORE && n_fds == 1) {
		cached_admin_restore(d, c, fds[0]);
		return;
	}
	if (c->role == SKV_ROLE_ENGINE && h->type == SKV_MSG_SNAPSHOTTED && n_fds == 0) {
		cached_snapshot_done(d, c, body);
		return;
	}
	if (c->role == SKV_ROLE_ADMIN && h->type == SKV_MSG_ADMIN_REQ && n_fds == 0) {
		cached_admin_request(d, c, body);
		return;
	}
	if (c->role == SKV_ROLE_ENGINE && h->type == SKV_MSG_DROPPED && n_fds == 0) {
		struct cached_stream *s = stream_find(d, ((const struct skv_msg_stream *)body)->stream_id);
		if (!s || s->engine != c->engine || !s->dropping || s->drop_queued)
			return; /* not a DROP of ours: nothing to free */
		engine_drop_acked(d, c->engine);
		if (s->state == CACHED_STREAM_CLOSING) {
			struct skv_msg_stream m = { .stream_id = s->id };
			if (s->client)
				cached_conn_send(d, s->client, SKV_MSG_CLOSED, &m, NULL, 0);
			stream_destroy(d, s);
		} else if (!s->client) {
			stream_destroy(d, s);
		} else {
			/* Failed by its idle time-out: its KV is free, the entry waits for CLOSE. */
			stream_release(d, s);
		}
		return;
	}
	if (c->role == SKV_ROLE_ENGINE && h->type == SKV_MSG_STREAM_ERROR && n_fds == 0) {
		const struct skv_msg_failed *f = body;
		struct cached_stream *s = stream_find(d, f->stream_id);
		if (s && s->engine == c->engine) {
			char text[SKV_MSG_TEXT];
			snprintf(text, sizeof(text), "%.*s", (int)sizeof(f->text) - 1, f->text);
			stream_fail(d, s, f->code, text);
		}
		return;
	}
	cached_close_fds(fds, n_fds);
	cached_conn_errorf(d, c, -SKV_EFORMAT, "unexpected %s (with %d fds) from a %s",
		   skv_msg_name(h->type), n_fds,
		   c->role == SKV_ROLE_ENGINE ? "engine" : c->role == SKV_ROLE_CLIENT ? "client" : "peer");
	cached_drop_conn(d, c);
}

static void cached_readable(struct cached *d, struct cached_conn *c)
{
	while (c->fd >= 0) {
		struct skv_msg_hdr h;
		union {
			struct skv_msg_hello hello;
			struct skv_msg_open open;
			struct skv_msg_stream stream;
			struct skv_msg_failed failed;
			uint8_t raw[2048];
		} body;
		int fds[SKV_MSG_MAX_FDS], n_fds = 0;
		int got = skv_msg_recv(c->fd, &h, &body, sizeof(body), fds, &n_fds);
		if (got == -EAGAIN)
			return;
		if (got == 0) {
			cached_drop_conn(d, c);
			return;
		}
		if (got < 0) {
			if (got == -SKV_EFORMAT)
				cached_conn_errorf(d, c, got, "malformed message: dropping the connection");
			cached_drop_conn(d, c);
			return;
		}
		cached_message(d, c, &h, &body, fds, n_fds);
	}
}

static void cached_reap(struct cached *d, struct cached_engine *e)
{
	siginfo_t info;
	memset(&info, 0, sizeof(info));
	if (waitid(P_PIDFD, (id_t)e->pidfd, &info, WEXITED | WNOHANG) < 0 || !info.si_pid) {
		/* Not our child (started by hand): the pidfd only says it exited. */
		if (errno == ECHILD || !info.si_pid) {
			if (e->conn)
				cached_drop_conn(d, e->conn);
			cached_engine_exited(d, e, 0);
		}
		return;
	}
	int status = info.si_code == CLD_EXITED ? (info.si_status & 0xff) << 8
						: info.si_status & 0x7f;
	if (e->conn)
		cached_drop_conn(d, e->conn);
	cached_engine_exited(d, e, status);
}

/* ---- start-up and the loop ---------------------------------------------------------------- */

static void cached_free_dead(struct cached *d)
{
	/* Peers whose replies could not be kept: they left too much unread (holding it without
	 * bound would make the daemon the one to run out of memory) or memory ran out. */
	if (d->overflowed) {
		d->overflowed = 0;
		for (struct cached_conn *c = d->conns; c; c = c->next)
			if (c->overflow && c->fd >= 0) {
				cached_log("peer pid %u: its unread replies cannot be kept (over %u "
					   "MiB, or no memory): dropping it", c->peer_pid,
					   CACHED_OUT_MAX_BYTES >> 20);
				cached_drop_conn(d, c);
			}
	}
	struct cached_conn **l = &d->conns;
	while (*l) {
		struct cached_conn *c = *l;
		if (c->dead) {
			*l = c->next;
			free(c);
		} else {
			l = &c->next;
		}
	}
}

int cached_run(struct cached *d)
{
	struct epoll_event evs[CACHED_MAX_EVENTS];
	d->next_tick = cached_now() + 1.0;
	while (!d->stopping) {
		/* Sleep until a peer speaks, or until the next queue deadline or once-a-second
		 * look (idle streams, evictions for watchers) is due. */
		int ms = cached_timer_ms(d, cached_now());
		if ((d->saving || d->restore_due || d->revive_head) && (ms < 0 || ms > 200))
			ms = 200; /* a deadline of the shutdown's snapshots, a restore to start */
		int n = epoll_wait(d->epfd, evs, CACHED_MAX_EVENTS, ms);
		if (n < 0 && errno != EINTR) {
			cached_log("epoll_wait: %s", strerror(errno));
			return 1;
		}
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd < 0 || fd >= CACHED_MAX_FDS)
				continue;
			struct cached_tag *t = &d->tags[fd];
			if (t->fd != fd || t->kind == CACHED_TAG_NONE)
				continue;
			switch (t->kind) {
			case CACHED_TAG_LISTEN:
				cached_accept(d);
				break;
			case CACHED_TAG_CONN: {
				struct cached_conn *c = t->ptr;
				if (evs[i].events & EPOLLOUT)
					cached_conn_flush(d, c);
				if (c->fd >= 0 && (evs[i].events & ~(uint32_t)EPOLLOUT))
					cached_readable(d, c);
				break;
			}
			case CACHED_TAG_PIDFD:
				cached_reap(d, t->ptr);
				break;
			case CACHED_TAG_SNAP_WRITER:
				cached_snapshot_written(d);
				break;
			case CACHED_TAG_SIGNAL: {
				struct signalfd_siginfo si;
				while (read(fd, &si, sizeof(si)) == sizeof(si)) {
					if ((si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM) &&
					    d->state_dir && !d->saving) {
						/* Snapshots first: stop once they are written. */
						cached_log("signal %u: snapshotting streams into %s, then "
							   "shutting down", si.ssi_signo, d->state_dir);
						cached_state_save(d);
					} else if (si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM) {
						cached_log("signal %u: shutting down", si.ssi_signo);
						d->stopping = 1;
					}
				}
				break;
			}
			default:
				break;
			}
		}
		double now = cached_now();
		if (d->saving && (!d->snaps_in_flight || now > d->save_deadline)) {
			if (d->snaps_in_flight)
				cached_log("%u snapshot(s) not written in time; shutting down",
					   d->snaps_in_flight);
			d->stopping = 1;
		}
		if (d->restore_due) {
			for (unsigned i = 0; i < d->n_engines; i++)
				if (d->engines[i].state == CACHED_ENGINE_READY) {
					d->restore_due = 0;
					cached_state_restore(d);
					break;
				}
		}
		if (d->revive_head)
			cached_revive_pump(d, now);
		if (now >= d->next_tick) {
			d->next_tick = now + 1.0;
			if (d->watchers)
				cached_admin_tick(d);
			if (d->n_idle_tracked)
				cached_idle_tick(d, now);
			if (d->n_detached)
				cached_detach_tick(d, now);
			if (d->snapshot_interval_s && now >= d->next_checkpoint && !d->saving) {
				d->next_checkpoint = now + d->snapshot_interval_s;
				cached_state_checkpoint(d);
			}
		}
		/* Streams freed above make room: place waiting OPENs before any times out. */
		if (d->admission_dirty)
			cached_admission_pump(d);
		cached_admission_expire(d, now);
		cached_free_dead(d);
	}
	cached_revive_forget(d);
	return 0;
}
