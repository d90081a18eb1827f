/* Snapshots of streams (file format: shm/snapshot.h) and --state-dir.
 *
 * Taking one never stalls the other streams' steps: the daemon asks the stream's engine
 * (SNAPSHOT) to hold the stream at its next request boundary; the engine answers SNAPSHOTTED
 * with the sampler state and from then on does not step that stream (the only writer of the
 * region is the engine's loop, so the region stands still without any lock) while its other
 * streams go on. The daemon copies the region out of the arena it maps into private memory
 * (populated beforehand, so the copy takes no page faults) and sends SNAPSHOT_RESUME: the held
 * stream waits for that copy alone. A writer thread at a low CPU priority then hashes and
 * writes the file, so that neither the daemon's loop nor the engines wait for it.
 *
 * Restoring validates everything before any engine sees it: magic, version, sizes against the
 * file's real size, the model's identity, the KV type, the descriptor (equal to what this
 * daemon lays out for the stream's parameters) and the ring state; then the region is read
 * from the file straight into its place in the arena, the sha256 over the whole file computed
 * on the way, and a mismatch frees the place again (no copy of the file is held). The stream comes back detached and resumable: its owner attaches with its name and
 * token as before the restart. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <nettle/sha2.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "daemon-pvt.h"
#include "kv-layout.h"
#include "model.h"
#include "proto.h"
#include "skv-error.h"
#include "snapshot.h"
#include "stream.h"

#define SNAP_MODEL_PREFIX_BYTES (1u << 20) /* GGUF metadata + tensor infos, .bin header */
#define SNAP_SAVE_TIMEOUT_S 20.0
#define SNAP_WRITER_NICE 10 /* about a tenth of a nice-0 thread's share of a busy core */
#define SNAP_READ_CHUNK (4u << 20) /* a restore reads and hashes the region this much at a time */

/* The model's identity: sha256 over its shape and the first MiB of its file. */
static int snap_model_id(struct cached *d, uint8_t out[32])
{
	if (d->have_model_id) {
		memcpy(out, d->model_id, 32);
		return 0;
	}
	int fd = open(d->model_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	struct stat st;
	if (fstat(fd, &st) < 0) {
		close(fd);
		return -errno;
	}
	size_t n = (size_t)st.st_size < SNAP_MODEL_PREFIX_BYTES ? (size_t)st.st_size
								 : SNAP_MODEL_PREFIX_BYTES;
	uint8_t *buf = malloc(n ? n : 1);
	ssize_t got = buf ? pread(fd, buf, n, 0) : -1;
	close(fd);
	if (got != (ssize_t)n) {
		free(buf);
		return -EIO;
	}
	struct sha256_ctx ctx;
	sha256_init(&ctx);
	const struct skv_model_config *c = &d->model->cfg;
	int32_t shape[] = { c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
			    c->vocab_size, c->seq_len, c->head_size };
	uint64_t size = (uint64_t)st.st_size;
	sha256_update(&ctx, sizeof(shape), (const uint8_t *)shape);
	sha256_update(&ctx, sizeof(size), (const uint8_t *)&size);
	sha256_update(&ctx, n, buf);
	sha256_digest(&ctx, 32, d->model_id);
	free(buf);
	d->have_model_id = 1;
	memcpy(out, d->model_id, 32);
	return 0;
}

static struct cached_conn *snap_conn_by_id(struct cached *d, uint64_t id)
{
	for (struct cached_conn *c = d->conns; c && id; c = c->next)
		if (c->id == id && c->fd >= 0 && !c->dead)
			return c;
	return NULL;
}

static void snap_result(struct cached *d, uint64_t admin_id, const struct skv_admin_result *r)
{
	struct cached_conn *c = snap_conn_by_id(d, admin_id);
	if (c)
		cached_conn_send(d, c, SKV_MSG_ADMIN_RESULT, r, NULL, 0);
}

static void snap_fail_result(struct cached *d, uint64_t admin_id, uint64_t id, int code,
			     const char *text)
{
	struct skv_admin_result r = { .code = code, .stream_id = id };
	snprintf(r.text, sizeof(r.text), "%s", text);
	snap_result(d, admin_id, &r);
}

/* ---- taking one ----------------------------------------------------------------------------- */

/* One snapshot in progress. The loop owns it until it is handed to the writer thread
 * (writing = 1); the thread then touches only h, copy, bytes, fd and code, and gives it back
 * through the done list. Everything else is the loop's. */
struct cached_snap_job {
	struct skv_snap_header h;    /* the thread fills in sha256 */
	void *copy;                  /* [bytes], populated at the start: the region, copied */
	uint64_t bytes;
	int fd;                      /* the file (the admin's, or --state-dir's temporary one) */
	int code;                    /* the thread's result: 0 or -errno */
	/* the loop's */
	uint64_t stream_id;
	uint64_t admin_id;           /* who gets ADMIN_RESULT (0: nobody) */
	char *path;                  /* --state-dir: rename its temporary to it (NULL: in place) */
	char name[SKV_STREAM_NAME_MAX];
	uint64_t copy_ns;            /* how long the stream was held for the copy */
	int writing;                 /* with the thread */
	int abandoned;               /* its stream ended meanwhile: no file comes of it */
	struct cached_snap_job *next;
};

/* Hashing and writing 10 MB takes tens of milliseconds of CPU: a thread of its own, at a low
 * priority, so that it neither holds up the daemon's loop nor takes much of a core from the
 * engines the daemon shares the machine with. */
struct cached_snap_writer {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;
	struct cached_snap_job *todo_head, *todo_tail; /* under lock */
	struct cached_snap_job *done;                  /* under lock */
	int efd;                                       /* the thread -> the loop: done moved */
};

/* Where --state-dir's file DIR/NAME is written before it is renamed into place: DIR/.NAME.tmp,
 * hidden, so that whatever lists the directory sees whole snapshots only. */
static void snap_tmp_path(const char *path, char *out, size_t len)
{
	const char *slash = strrchr(path, '/');
	int dir = slash ? (int)(slash - path) + 1 : 0;
	snprintf(out, len, "%.*s.%s.tmp", dir, path, path + dir);
}

static int snap_write_all(int fd, const void *buf, size_t len, off_t off)
{
	const char *p = buf;
	while (len) {
		ssize_t n = pwrite(fd, p, len, off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

/* Header + page padding + region into the job's fd, the sha256 over all of it in the header.
 * The writer thread's: it touches the job and nothing else. */
static int snap_write(struct cached_snap_job *job)
{
	static const uint8_t zeros[SKV_SNAP_ALIGN];
	struct skv_snap_header *h = &job->h;
	struct sha256_ctx ctx;
	sha256_init(&ctx);
	sha256_update(&ctx, sizeof(*h), (const uint8_t *)h);
	sha256_update(&ctx, SKV_SNAP_ALIGN - sizeof(*h), zeros);
	sha256_update(&ctx, job->bytes, job->copy);
	sha256_digest(&ctx, 32, h->sha256);
	int fd = job->fd;
	if (ftruncate(fd, 0) < 0 && errno != EINVAL)
		return -errno;
	int err = snap_write_all(fd, h, sizeof(*h), 0);
	if (!err)
		err = snap_write_all(fd, zeros, SKV_SNAP_ALIGN - sizeof(*h), sizeof(*h));
	if (!err)
		err = snap_write_all(fd, job->copy, job->bytes, SKV_SNAP_ALIGN);
	if (!err && fsync(fd) < 0 && errno != EINVAL)
		err = -errno;
	return err;
}

static void *snap_writer_main(void *arg)
{
	struct cached_snap_writer *w = arg;
	/* Below the engines (and below a daemon run under a real-time policy), not so far below
	 * that a busy machine starves it: periodic snapshots that are never written bound
	 * nothing. */
	struct sched_param normal = { 0 };
	pthread_setschedparam(pthread_self(), SCHED_OTHER, &normal);
	setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), SNAP_WRITER_NICE);
	for (;;) {
		pthread_mutex_lock(&w->lock);
		while (!w->todo_head)
			pthread_cond_wait(&w->wake, &w->lock);
		struct cached_snap_job *job = w->todo_head;
		w->todo_head = job->next;
		if (!w->todo_head)
			w->todo_tail = NULL;
		pthread_mutex_unlock(&w->lock);
		job->code = snap_write(job);
		pthread_mutex_lock(&w->lock);
		job->next = w->done;
		w->done = job;
		pthread_mutex_unlock(&w->lock);
		uint64_t one = 1;
		while (write(w->efd, &one, sizeof(one)) < 0 && errno == EINTR)
			;
	}
	return NULL;
}

/* Started at the first snapshot; it lives as long as the daemon. */
static int snap_writer_get(struct cached *d, struct cached_snap_writer **out)
{
	if (d->snap_writer) {
		*out = d->snap_writer;
		return 0;
	}
	struct cached_snap_writer *w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	int err = w->efd < 0 ? -errno : cached_watch_fd(d, w->efd, CACHED_TAG_SNAP_WRITER, w);
	if (!err) {
		pthread_mutex_init(&w->lock, NULL);
		pthread_cond_init(&w->wake, NULL);
		err = -pthread_create(&w->thread, NULL, snap_writer_main, w);
	}
	if (err) {
		if (w->efd >= 0)
			close(w->efd);
		free(w);
		return err;
	}
	d->snap_writer = *out = w;
	return 0;
}

static void snap_job_free(struct cached *d, struct cached_snap_job *job, int unlink_tmp)
{
	if (job->copy)
		munmap(job->copy, job->bytes);
	if (job->fd >= 0)
		close(job->fd);
	if (job->path && unlink_tmp) {
		char tmp[PATH_MAX];
		snap_tmp_path(job->path, tmp, sizeof(tmp));
		unlink(tmp); /* a half-written file never takes the place of a whole one */
	}
	free(job->path);
	free(job);
	if (d->snaps_in_flight)
		d->snaps_in_flight--;
}

int cached_snapshot_start(struct cached *d, struct cached_stream *s, int out_fd, char *path,
			  uint64_t admin_id, uint32_t flags, char *why, size_t why_len)
{
	int err = 0;
	struct cached_snap_writer *w = NULL;
	if (s->snap)
		err = -EBUSY, snprintf(why, why_len, "a snapshot of stream %llu is in progress",
				       (unsigned long long)s->id);
	else if (s->state != CACHED_STREAM_OPEN || s->dropping || !s->region_bytes || !s->engine ||
		 s->engine->state != CACHED_ENGINE_READY || !s->engine->conn)
		err = -EPIPE, snprintf(why, why_len, "stream %llu is not running",
				       (unsigned long long)s->id);
	else if ((err = snap_writer_get(d, &w)) < 0)
		snprintf(why, why_len, "cannot start the snapshot writer: %s", skv_strerror(err));
	struct cached_snap_job *job = NULL;
	if (!err) {
		job = calloc(1, sizeof(*job));
		/* Its pages faulted in here, before the stream is held, not during the copy. */
		void *copy = job ? mmap(NULL, s->region_bytes, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
				 : MAP_FAILED;
		if (copy == MAP_FAILED) {
			err = -ENOMEM;
			snprintf(why, why_len, "no memory for a %llu-byte copy",
				 (unsigned long long)s->region_bytes);
		} else {
			job->copy = copy;
			job->bytes = s->region_bytes;
		}
	}
	if (!err) {
		struct skv_msg_snapshot m = { .stream_id = s->id, .flags = flags,
					      .region_bytes = s->region_bytes };
		err = cached_conn_send(d, s->engine->conn, SKV_MSG_SNAPSHOT, &m, NULL, 0);
		if (err)
			snprintf(why, why_len, "the stream's engine is going away");
	}
	if (err) {
		if (job && job->copy)
			munmap(job->copy, job->bytes);
		free(job);
		close(out_fd);
		free(path);
		return err;
	}
	job->fd = out_fd;
	job->path = path;
	job->admin_id = admin_id;
	job->stream_id = s->id;
	memcpy(job->name, s->name, sizeof(job->name));
	s->snap = job;
	d->snaps_in_flight++;
	return 0;
}

void cached_snapshot_abort(struct cached *d, struct cached_stream *s, const char *why)
{
	struct cached_snap_job *job = s->snap;
	if (!job)
		return;
	s->snap = NULL;
	if (job->path)
		cached_log("stream %llu (%s): no snapshot: %s", (unsigned long long)s->id, s->name,
			   why);
	if (job->writing) {
		/* The thread has it: it comes back through cached_snapshot_written, and goes. */
		job->abandoned = 1;
		return;
	}
	snap_fail_result(d, job->admin_id, s->id, -EPIPE, why);
	snap_job_free(d, job, 1);
}

void cached_snapshot_done(struct cached *d, struct cached_conn *c,
			  const struct skv_msg_snapshotted *m)
{
	struct cached_stream *s = cached_stream_find(d, m->stream_id);
	if (!s || s->engine != c->engine || !s->region_bytes)
		return; /* not one of this engine's (any more) */
	struct skv_msg_stream resume = { .stream_id = s->id };
	struct cached_snap_job *job = s->snap;
	if (!job || job->writing) {
		/* Not one we wait for (any more): never leave the stream held. */
		if (!m->code)
			cached_conn_send(d, c, SKV_MSG_SNAPSHOT_RESUME, &resume, NULL, 0);
		return;
	}
	if (m->code < 0) {
		char text[SKV_MSG_TEXT];
		snprintf(text, sizeof(text), "the engine could not hold stream %llu: %s",
			 (unsigned long long)s->id, skv_strerror(m->code));
		if (job->path)
			cached_log("stream %llu (%s): %s", (unsigned long long)s->id, s->name, text);
		snap_fail_result(d, job->admin_id, s->id, m->code, text);
		s->snap = NULL;
		snap_job_free(d, job, 1);
		return;
	}
	/* Held: nothing writes the region until SNAPSHOT_RESUME. The engine's writes came before
	 * its sendmsg, our read after our recvmsg. */
	const char *region = (const char *)skv_arena_base(d->arenas[s->arena]) + s->region_offset;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	memcpy(job->copy, region, job->bytes);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	cached_conn_send(d, c, SKV_MSG_SNAPSHOT_RESUME, &resume, NULL, 0);
	job->copy_ns = (uint64_t)((t1.tv_sec - t0.tv_sec) * 1000000000ll + (t1.tv_nsec - t0.tv_nsec));

	struct skv_snap_header *h = &job->h;
	*h = (struct skv_snap_header){
		.magic = SKV_SNAP_MAGIC, .major = SKV_SNAP_MAJOR, .minor = SKV_SNAP_MINOR,
		.header_bytes = sizeof(*h), .region_offset = SKV_SNAP_ALIGN,
		.region_bytes = job->bytes, .file_bytes = SKV_SNAP_ALIGN + job->bytes,
		.created_unix = (uint64_t)time(NULL), .params = s->params, .state = m->state,
		.owner_uid = s->owner_uid,
	};
	struct skv_kv_desc desc;
	memcpy(&desc, job->copy, sizeof(desc));
	h->kv_dtype = desc.dtype;
	struct skv_kv_ring ring;
	memcpy(&ring, (const char *)job->copy + SKV_KV_RING_OFFSET, sizeof(ring));
	/* A recompute stream's ring counts its window only. */
	h->tokens_seen = s->params.policy == SKV_POLICY_RECOMPUTE ? m->state.tokens_seen
								    : ring.tokens_seen;
	if (s->resumable) {
		memcpy(h->name, s->name, sizeof(h->name));
		memcpy(h->token, s->token, sizeof(h->token));
	}
	int err = snap_model_id(d, h->model_id);
	if (err < 0) {
		char text[SKV_MSG_TEXT];
		snprintf(text, sizeof(text), "cannot identify the model: %s", skv_strerror(err));
		snap_fail_result(d, job->admin_id, s->id, err, text);
		s->snap = NULL;
		snap_job_free(d, job, 1);
		return;
	}
	struct cached_snap_writer *w = d->snap_writer;
	job->writing = 1;
	job->next = NULL;
	pthread_mutex_lock(&w->lock);
	if (w->todo_tail)
		w->todo_tail->next = job;
	else
		w->todo_head = job;
	w->todo_tail = job;
	pthread_cond_signal(&w->wake);
	pthread_mutex_unlock(&w->lock);
}

void cached_snapshot_written(struct cached *d)
{
	struct cached_snap_writer *w = d->snap_writer;
	uint64_t n;
	while (read(w->efd, &n, sizeof(n)) > 0)
		;
	pthread_mutex_lock(&w->lock);
	struct cached_snap_job *done = w->done;
	w->done = NULL;
	pthread_mutex_unlock(&w->lock);
	for (struct cached_snap_job *job = done, *next; job; job = next) {
		next = job->next;
		struct cached_stream *s = cached_stream_find(d, job->stream_id);
		if (s && s->snap == job)
			s->snap = NULL;
		struct skv_admin_result r = { .code = job->code, .stream_id = job->stream_id,
					      .copy_ns = job->copy_ns, .bytes = job->h.file_bytes,
					      .tokens_seen = job->h.tokens_seen };
		memcpy(r.name, job->name, sizeof(r.name));
		if (job->abandoned) {
			/* Its stream ended for good: a file renamed into place now would bring it
			 * back at the next start. */
			r.code = -EPIPE;
			snprintf(r.text, sizeof(r.text), "the stream ended before its snapshot was "
				 "written");
		} else if (r.code < 0) {
			snprintf(r.text, sizeof(r.text), "cannot write the snapshot: %s",
				 skv_strerror(r.code));
		} else if (job->path) {
			char tmp[PATH_MAX];
			snap_tmp_path(job->path, tmp, sizeof(tmp));
			if (rename(tmp, job->path) < 0) {
				r.code = -errno;
				snprintf(r.text, sizeof(r.text), "cannot rename %.120s: %s", tmp,
					 strerror(errno));
			} else if (d->saving || d->verbose) {
				cached_log("stream %llu (%s): %llu tokens snapshotted into %s (held "
					   "%.3f ms for the copy)", (unsigned long long)job->stream_id,
					   job->name, (unsigned long long)r.tokens_seen, job->path,
					   (double)r.copy_ns * 1e-6);
			}
		}
		if (r.code && job->path && !job->abandoned)
			cached_log("stream %llu (%s): %s", (unsigned long long)job->stream_id,
				   job->name, r.text);
		snap_result(d, job->admin_id, &r);
		snap_job_free(d, job, r.code != 0);
	}
}

/* ---- restoring ---------------------------------------------------------------------------- */

static int snap_ring_valid(const struct skv_kv_desc *desc, const struct skv_kv_ring *r)
{
	uint64_t S = desc->sink_slots, W = desc->window_slots;
	if (r->seq & 1 || r->window_start < S)
		return 0; /* odd: copied in the middle of a write */
	if (r->tokens_seen <= S)
		return r->window_start == S && r->tokens_evicted == 0;
	if (r->window_start > r->tokens_seen || r->tokens_seen - r->window_start > W)
		return 0;
	return r->tokens_evicted == r->window_start - S;
}

/* len bytes of the snapshot at off (a signal's interruption retried): 0, or an error with
 * why filled (a file shorter than its header says is truncated). */
static int snap_pread_all(int fd, void *buf, size_t len, uint64_t off, char *why, size_t why_len)
{
	for (size_t done = 0; done < len;) {
		ssize_t n = pread(fd, (uint8_t *)buf + done, len - done, (off_t)(off + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return skv_errorf(why, why_len, n < 0 ? -errno : -SKV_ETRUNCATED,
					  "cannot read the snapshot: %s",
					  n < 0 ? strerror(errno) : "truncated");
		done += (size_t)n;
	}
	return 0;
}

int cached_restore_fd(struct cached *d, int fd, uint64_t *id, uint64_t *tokens_seen, char *why,
		      size_t why_len)
{
	struct skv_snap_header h;
	struct stat st;
	if (fstat(fd, &st) < 0)
		return skv_errorf(why, why_len, -errno, "cannot read the snapshot: %s",
				  strerror(errno));
	ssize_t got = pread(fd, &h, sizeof(h), 0);
	if (got < 0)
		return skv_errorf(why, why_len, -errno, "cannot read the snapshot: %s",
				  strerror(errno));
	if ((size_t)got < sizeof(h) || h.magic != SKV_SNAP_MAGIC) {
		if ((size_t)got >= sizeof(uint32_t) && h.magic == SKV_SNAP_MAGIC)
			return skv_errorf(why, why_len, -SKV_ETRUNCATED,
					  "truncated snapshot: %lld of at least %zu bytes",
					  (long long)st.st_size, sizeof(h));
		return skv_errorf(why, why_len, -SKV_EFORMAT, "not a streamkv snapshot (bad magic)");
	}
	if (h.major != SKV_SNAP_MAJOR)
		return skv_errorf(why, why_len, -SKV_EVERSION,
				  "snapshot format %u.%u is %s than this daemon's %u.%u", h.major,
				  h.minor, h.major > SKV_SNAP_MAJOR ? "newer" : "older",
				  SKV_SNAP_MAJOR, SKV_SNAP_MINOR);
	if (h.header_bytes != sizeof(h) || h.region_offset != SKV_SNAP_ALIGN ||
	    h.region_bytes < sizeof(struct skv_kv_desc) || h.region_bytes > (1ull << 40) ||
	    h.file_bytes != h.region_offset + h.region_bytes)
		return skv_errorf(why, why_len, -SKV_EFORMAT, "corrupted snapshot: bad sizes");
	if ((uint64_t)st.st_size < h.file_bytes)
		return skv_errorf(why, why_len, -SKV_ETRUNCATED,
				  "truncated snapshot: %lld of %llu bytes", (long long)st.st_size,
				  (unsigned long long)h.file_bytes);
	/* Only the header and the region's first bytes (descriptor, ring state) are read here;
	 * the region itself goes straight from the file into its place in the arena
	 * (cached_restore_read), hashed on the way: a restore holds no copy of the file. */
	int err = 0;
	uint8_t head[SKV_KV_RING_OFFSET + sizeof(struct skv_kv_ring)];
	if (h.region_bytes < sizeof(head))
		err = skv_errorf(why, why_len, -SKV_EFORMAT, "corrupted snapshot: bad sizes");
	if (!err)
		err = snap_pread_all(fd, head, sizeof(head), h.region_offset, why, why_len);
	uint8_t model[32];
	if (!err && (err = snap_model_id(d, model)) < 0)
		skv_errorf(why, why_len, err, "cannot identify the model: %s", skv_strerror(err));
	if (!err && memcmp(model, h.model_id, 32))
		err = skv_errorf(why, why_len, -SKV_ESHAPE,
				 "snapshot of another model (id %02x%02x%02x%02x...): this daemon "
				 "serves %s (id %02x%02x%02x%02x...)", h.model_id[0], h.model_id[1],
				 h.model_id[2], h.model_id[3], d->model_path, model[0], model[1],
				 model[2], model[3]);
	struct skv_kv_desc desc;
	struct skv_kv_ring ring;
	char msg[256] = "";
	if (!err) {
		memcpy(&desc, head, sizeof(desc));
		memcpy(&ring, head + SKV_KV_RING_OFFSET, sizeof(ring));
		if (!skv_kv_dtype_bytes(h.kv_dtype) || desc.dtype != h.kv_dtype ||
		    h.params.kv_dtype != h.kv_dtype)
			err = skv_errorf(why, why_len, -SKV_EDTYPE,
					 "snapshot of another KV type (%u): this daemon knows f32, "
					 "f16 and q8", h.kv_dtype);
	}
	if (!err && skv_kv_layout_check(&desc, h.region_bytes, msg, sizeof(msg)) < 0)
		err = skv_errorf(why, why_len, -SKV_EFORMAT, "corrupted snapshot: %s", msg);
	if (!err && !snap_ring_valid(&desc, &ring))
		err = skv_errorf(why, why_len, -SKV_EFORMAT,
				 "corrupted snapshot: its ring state is impossible");
	struct cached_restore r = { .fd = fd, .header = &h, .desc = desc, .ring = ring,
				    .region_bytes = h.region_bytes, .state = h.state,
				    .owner_uid = h.owner_uid };
	struct skv_msg_open_named open = { .open = { .params = h.params } };
	if (!err) {
		memcpy(r.token, h.token, sizeof(r.token));
		memcpy(open.name, h.name, sizeof(open.name));
		open.name[sizeof(open.name) - 1] = '\0';
		if (!h.name[0] || memchr(h.token, 0, sizeof(h.token)))
			err = cached_token_new(r.token); /* not resumable before: it is now */
		if (err)
			skv_errorf(why, why_len, err, "cannot make a token: %s", skv_strerror(err));
	}
	int efd = -1;
	r.doorbell_fd = -1;
	if (!err) {
		/* A detached stream's engine rings nobody yet: a doorbell of its own until ATTACH. */
		efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		r.doorbell_fd = memfd_create("skv-detached-doorbell", MFD_CLOEXEC | MFD_ALLOW_SEALING);
		if (efd < 0 || r.doorbell_fd < 0 ||
		    ftruncate(r.doorbell_fd, SKV_CLIENT_DOORBELL_BYTES) < 0)
			err = skv_errorf(why, why_len, -errno, "cannot restore: %s", strerror(errno));
	}
	if (!err) {
		uint64_t before = d->next_stream_id;
		d->restoring = &r;
		int placed = cached_place_stream(d, NULL, &open, 1, efd, why, why_len);
		d->restoring = NULL;
		if (placed > 0)
			err = placed == CACHED_WAIT_ENGINE ? -EAGAIN : -ENOSPC;
		else
			err = placed;
		if (!err) {
			*id = before;
			if (tokens_seen)
				*tokens_seen = h.tokens_seen;
		}
	}
	if (efd >= 0)
		close(efd);
	if (r.doorbell_fd >= 0)
		close(r.doorbell_fd);
	return err;
}

int cached_restore_read(const struct cached_restore *r, void *region, char *why, size_t why_len)
{
	const struct skv_snap_header *h = r->header;
	struct skv_snap_header zeroed = *h;
	memset(zeroed.sha256, 0, sizeof(zeroed.sha256));
	struct sha256_ctx ctx;
	sha256_init(&ctx);
	sha256_update(&ctx, sizeof(zeroed), (const uint8_t *)&zeroed);
	/* The header's page past the header (zeros as written, hashed as they are). */
	uint8_t pad[SKV_SNAP_ALIGN - sizeof(struct skv_snap_header)];
	int err = snap_pread_all(r->fd, pad, sizeof(pad), sizeof(zeroed), why, why_len);
	if (err)
		return err;
	sha256_update(&ctx, sizeof(pad), pad);
	uint8_t *dst = region;
	for (uint64_t off = 0; off < r->region_bytes;) {
		uint64_t want = r->region_bytes - off;
		want = want > SNAP_READ_CHUNK ? SNAP_READ_CHUNK : want;
		if ((err = snap_pread_all(r->fd, dst + off, want, h->region_offset + off, why,
					  why_len)))
			return err;
		sha256_update(&ctx, want, dst + off);
		off += want;
	}
	uint8_t sum[32];
	sha256_digest(&ctx, 32, sum);
	if (memcmp(sum, h->sha256, 32))
		return skv_errorf(why, why_len, -SKV_EFORMAT,
				  "corrupted snapshot: its sha256 does not match its bytes");
	/* What was checked is what was read (the file cannot have changed in between). */
	if (memcmp(dst, &r->desc, sizeof(r->desc)) ||
	    memcmp(dst + SKV_KV_RING_OFFSET, &r->ring, sizeof(r->ring)))
		return skv_errorf(why, why_len, -SKV_EFORMAT,
				  "the snapshot changed while it was read");
	return 0;
}

/* ---- admin requests ----------------------------------------------------------------------- */

void cached_admin_snapshot(struct cached *d, struct cached_conn *c, uint64_t stream_id, int fd)
{
	struct cached_stream *s = cached_stream_find(d, stream_id);
	char why[SKV_MSG_TEXT];
	if (!s || !(c->content_ok || s->owner_uid == c->peer_uid)) {
		close(fd);
		snprintf(why, sizeof(why), "no stream %llu", (unsigned long long)stream_id);
		snap_fail_result(d, c->id, stream_id, -ENOENT, why);
		return;
	}
	int err = cached_snapshot_start(d, s, fd, NULL, c->id, 0, why, sizeof(why));
	if (err < 0)
		snap_fail_result(d, c->id, stream_id, err, why);
}

void cached_admin_restore(struct cached *d, struct cached_conn *c, int fd)
{
	char why[SKV_MSG_TEXT] = "";
	struct skv_admin_result r = { 0 };
	if (!c->content_ok) {
		r.code = -EACCES;
		snprintf(r.text, sizeof(r.text), "permission denied: only uid %u, root and "
			 "--admin-group may restore snapshots", (unsigned)d->uid);
	} else {
		r.code = cached_restore_fd(d, fd, &r.stream_id, NULL, why, sizeof(why));
		if (r.code < 0) {
			snprintf(r.text, sizeof(r.text), "%s", why);
		} else {
			struct cached_stream *s = cached_stream_find(d, r.stream_id);
			if (s) {
				memcpy(r.name, s->name, sizeof(r.name));
				snprintf(r.text, sizeof(r.text), "%.*s", SKV_TOKEN_HEX, s->token);
				r.bytes = s->region_bytes;
			}
		}
	}
	close(fd);
	cached_conn_send(d, c, SKV_MSG_ADMIN_RESULT, &r, NULL, 0);
}

/* ---- --state-dir ------------------------------------------------------------------------- */

static unsigned state_snapshot_all(struct cached *d, uint32_t flags)
{
	unsigned asked = 0;
	for (struct cached_stream *s = d->streams; s; s = s->next) {
		if (!s->resumable || s->state != CACHED_STREAM_OPEN || s->dropping ||
		    s->snap)
			continue;
		char *path = NULL, tmp[PATH_MAX], why[SKV_MSG_TEXT];
		if (asprintf(&path, "%s/%u-%s.snap", d->state_dir, s->owner_uid, s->name) < 0) {
			path = NULL;
			continue;
		}
		snap_tmp_path(path, tmp, sizeof(tmp));
		int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd < 0) {
			cached_log("stream %llu (%s): cannot create %s: %s", (unsigned long long)s->id,
				   s->name, tmp, strerror(errno));
			free(path);
			continue;
		}
		if (cached_snapshot_start(d, s, fd, path, 0, flags, why, sizeof(why)) < 0) {
			cached_log("stream %llu (%s): no snapshot: %s", (unsigned long long)s->id,
				   s->name, why);
			unlink(tmp);
			continue;
		}
		asked++;
	}
	return asked;
}

void cached_state_save(struct cached *d)
{
	d->saving = 1;
	d->save_deadline = cached_now() + SNAP_SAVE_TIMEOUT_S;
	/* Periodic ones in flight still count: they are written before we stop. */
	unsigned asked = state_snapshot_all(d, SKV_SNAP_NOW);
	cached_log("%u resumable stream(s) to snapshot", asked);
}

void cached_state_checkpoint(struct cached *d)
{
	state_snapshot_all(d, SKV_SNAP_STEP);
}

void cached_state_forget(struct cached *d, const struct cached_stream *s)
{
	char path[PATH_MAX];
	if ((size_t)snprintf(path, sizeof(path), "%s/%u-%s.snap", d->state_dir, s->owner_uid,
			     s->name) < sizeof(path))
		unlink(path);
}

void cached_state_restore(struct cached *d)
{
	DIR *dir = opendir(d->state_dir);
	if (!dir) {
		cached_log("--state-dir %s: %s", d->state_dir, strerror(errno));
		return;
	}
	unsigned restored = 0, refused = 0;
	for (struct dirent *de; (de = readdir(dir));) {
		size_t n = strlen(de->d_name);
		if (n < 6 || strcmp(de->d_name + n - 5, ".snap"))
			continue;
		char path[PATH_MAX], why[SKV_MSG_TEXT] = "";
		snprintf(path, sizeof(path), "%s/%s", d->state_dir, de->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		uint64_t id = 0;
		int err = fd < 0 ? -errno : cached_restore_fd(d, fd, &id, NULL, why, sizeof(why));
		if (fd >= 0)
			close(fd);
		if (!err) {
			/* Kept until the stream ends for good (cached_state_forget): a kill -9
			 * before the next snapshot finds it again. */
			restored++;
			continue;
		}
		/* Kept aside with its reason in the log, never retried silently. */
		char aside[PATH_MAX + 16];
		snprintf(aside, sizeof(aside), "%s.refused", path);
		rename(path, aside);
		cached_log("%s: not restored: %s (kept as %s)", path,
			   why[0] ? why : skv_strerror(err), aside);
		refused++;
	}
	closedir(dir);
	cached_log("restored %u stream(s) from %s%s", restored, d->state_dir,
		   refused ? " (some refused: see above)" : "");
}

/* ---- an engine that died ------------------------------------------------------------------ */

#define SNAP_REVIVE_TIMEOUT_S 30.0 /* for an engine to be ready, and room for the stream */

/* A stream of a dead engine, to come back from its --state-dir file. */
struct cached_revive {
	char *path;
	uint64_t old_id;             /* the entry its client holds until told the outcome */
	char name[SKV_STREAM_NAME_MAX];
	double deadline;
	struct cached_revive *next;
};

int cached_revive_take(struct cached *d, struct cached_stream *s)
{
	if (s->reviving)
		return 1;
	if (!d->state_dir || !s->resumable || s->state != CACHED_STREAM_OPEN || s->dropping)
		return 0;
	char *path = NULL;
	struct stat st;
	if (asprintf(&path, "%s/%u-%s.snap", d->state_dir, s->owner_uid, s->name) < 0)
		return 0;
	struct cached_revive *r = stat(path, &st) == 0 ? calloc(1, sizeof(*r)) : NULL;
	if (!r) {
		free(path); /* never snapshotted yet: it ends with its engine */
		return 0;
	}
	r->path = path;
	r->old_id = s->id;
	memcpy(r->name, s->name, sizeof(r->name));
	r->deadline = cached_now() + SNAP_REVIVE_TIMEOUT_S;
	struct cached_revive **tail = &d->revive_head;
	while (*tail)
		tail = &(*tail)->next;
	*tail = r;
	/* Its name and its file belong to the restored stream from now on: the old entry is
	 * no longer found by name, nor snapshotted, and its end does not unlink the file. */
	s->reviving = 1;
	s->resumable = 0;
	/* A snapshot it had in progress would rename a file into that place later: no more. */
	if (s->snap)
		cached_snapshot_abort(d, s, "its engine died");
	cached_log("stream %llu (%s): its engine died; restoring it from %s",
		   (unsigned long long)s->id, s->name, path);
	return 1;
}

void cached_revive_pump(struct cached *d, double now)
{
	int ready = 0;
	for (unsigned i = 0; i < d->n_engines && !ready; i++)
		ready = d->engines[i].state == CACHED_ENGINE_READY;
	for (struct cached_revive **l = &d->revive_head; *l;) {
		struct cached_revive *r = *l;
		char why[SKV_MSG_TEXT] = "", text[SKV_MSG_TEXT];
		uint64_t id = 0, seen = 0;
		int err = -EAGAIN;
		if (ready) {
			int fd = open(r->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
			err = fd < 0 ? -errno : cached_restore_fd(d, fd, &id, &seen, why, sizeof(why));
			if (fd >= 0)
				close(fd);
		}
		int waiting = err == -EAGAIN || err == -ENOSPC;
		if (waiting && now < r->deadline) {
			l = &r->next;
			continue;
		}
		int code = -EPIPE;
		if (!err) {
			code = -SKV_ERESTORED;
			snprintf(text, sizeof(text), "its engine died; stream %s was restored from its "
				 "snapshot at token %llu: attach again to continue", r->name,
				 (unsigned long long)seen);
			cached_log("stream %llu (%s): restored from its snapshot as stream %llu at "
				   "token %llu", (unsigned long long)r->old_id, r->name,
				   (unsigned long long)id, (unsigned long long)seen);
		} else {
			snprintf(text, sizeof(text), "its engine died and its snapshot could not be "
				 "restored: %s", why[0] ? why : skv_strerror(err));
			cached_log("stream %llu (%s): %s", (unsigned long long)r->old_id, r->name, text);
			if (waiting) {
				unlink(r->path); /* ended for good, as its client is told */
			} else {
				char aside[PATH_MAX + 16];
				snprintf(aside, sizeof(aside), "%s.refused", r->path);
				rename(r->path, aside);
			}
		}
		cached_stream_revived(d, r->old_id, code, text);
		*l = r->next;
		free(r->path);
		free(r);
	}
}

void cached_revive_cancel(struct cached *d, struct cached_stream *s)
{
	for (struct cached_revive **l = &d->revive_head; *l; l = &(*l)->next) {
		struct cached_revive *r = *l;
		if (r->old_id != s->id)
			continue;
		cached_log("stream %llu (%s): closed by its client; not restoring it",
			   (unsigned long long)s->id, r->name);
		unlink(r->path);
		*l = r->next;
		free(r->path);
		free(r);
		break;
	}
	s->reviving = 0;
}

void cached_revive_forget(struct cached *d)
{
	/* Their files stay: the next start restores them. */
	while (d->revive_head) {
		struct cached_revive *r = d->revive_head;
		d->revive_head = r->next;
		free(r->path);
		free(r);
	}
}
