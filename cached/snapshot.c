/* Snapshots of streams (file format: shm/snapshot.h) and --state-dir.
 *
 * Taking one never stalls the other streams' steps on a lock: the daemon hands the stream's
 * engine a staging memfd (SNAPSHOT); the engine copies the region into it at the stream's next
 * request boundary, between two steps of its loop (the only writer of the region is that loop,
 * so the copy is consistent without any lock), and answers SNAPSHOTTED with the sampler state
 * and how long the copy took. The daemon then writes the file from the staging copy, in its
 * own loop, while the engine goes on.
 *
 * Restoring validates everything before any engine sees it: magic, version, sizes against the
 * file's real size, the sha256 over the whole file, the model's identity, the KV type, the
 * descriptor (equal to what this daemon lays out for the stream's parameters) and the ring
 * state. The stream comes back detached and resumable: its owner attaches with its name and
 * token as before the restart. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <nettle/sha2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
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

int cached_snapshot_start(struct cached *d, struct cached_stream *s, int out_fd, char *path,
			  uint64_t admin_id, uint32_t flags, char *why, size_t why_len)
{
	int err = 0;
	if (s->snap_staging_fd >= 0)
		err = -EBUSY, snprintf(why, why_len, "a snapshot of stream %llu is in progress",
				       (unsigned long long)s->id);
	else if (s->state != CACHED_STREAM_OPEN || s->dropping || !s->region_bytes || !s->engine ||
		 s->engine->state != CACHED_ENGINE_READY || !s->engine->conn)
		err = -EPIPE, snprintf(why, why_len, "stream %llu is not running",
				       (unsigned long long)s->id);
	else if (s->params.policy == SKV_POLICY_RECOMPUTE)
		err = -ENOTSUP, snprintf(why, why_len, "recompute streams keep their window outside "
					 "the KV region: they have no snapshot");
	int staging = -1;
	if (!err) {
		staging = memfd_create("skv-snapshot", MFD_CLOEXEC | MFD_ALLOW_SEALING);
		/* Its pages allocated here, so that the engine's copy does not fault them in
		 * while its other streams wait. */
		if (staging < 0 || ftruncate(staging, (off_t)s->region_bytes) < 0 ||
		    fallocate(staging, 0, 0, (off_t)s->region_bytes) < 0 ||
		    fcntl(staging, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
			err = -errno;
			snprintf(why, why_len, "cannot make the staging memory: %s", strerror(errno));
		}
	}
	if (!err) {
		struct skv_msg_snapshot m = { .stream_id = s->id, .flags = flags,
					      .region_bytes = s->region_bytes };
		err = cached_conn_send(d, s->engine->conn, SKV_MSG_SNAPSHOT, &m, &staging, 1);
		if (err)
			snprintf(why, why_len, "the stream's engine is going away");
	}
	if (err) {
		if (staging >= 0)
			close(staging);
		close(out_fd);
		free(path);
		return err;
	}
	s->snap_staging_fd = staging;
	s->snap_out_fd = out_fd;
	s->snap_path = path;
	s->snap_admin_id = admin_id;
	d->snaps_in_flight++;
	return 0;
}

static void snap_clear(struct cached *d, struct cached_stream *s)
{
	if (s->snap_staging_fd >= 0)
		close(s->snap_staging_fd);
	if (s->snap_out_fd >= 0)
		close(s->snap_out_fd);
	if (s->snap_path) {
		char tmp[PATH_MAX];
		snprintf(tmp, sizeof(tmp), "%s.tmp", s->snap_path);
		unlink(tmp); /* a half-written file never takes the place of a whole one */
	}
	free(s->snap_path);
	s->snap_path = NULL;
	s->snap_staging_fd = s->snap_out_fd = -1;
	if (d->snaps_in_flight)
		d->snaps_in_flight--;
}

void cached_snapshot_abort(struct cached *d, struct cached_stream *s, const char *why)
{
	snap_fail_result(d, s->snap_admin_id, s->id, -EPIPE, why);
	if (s->snap_path)
		cached_log("stream %llu (%s): no snapshot: %s", (unsigned long long)s->id, s->name,
			   why);
	snap_clear(d, s);
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

/* Header + page padding + region into fd, the sha256 over all of it in the header. */
static int snap_write(struct cached *d, struct cached_stream *s, const void *region,
		      const struct skv_stream_state *state, uint64_t *bytes)
{
	struct skv_snap_header h = {
		.magic = SKV_SNAP_MAGIC, .major = SKV_SNAP_MAJOR, .minor = SKV_SNAP_MINOR,
		.header_bytes = sizeof(h), .region_offset = SKV_SNAP_ALIGN,
		.region_bytes = s->region_bytes,
		.file_bytes = SKV_SNAP_ALIGN + s->region_bytes,
		.created_unix = (uint64_t)time(NULL), .params = s->params, .state = *state,
		.owner_uid = s->owner_uid,
	};
	struct skv_kv_desc desc;
	memcpy(&desc, region, sizeof(desc));
	h.kv_dtype = desc.dtype;
	struct skv_kv_ring ring;
	memcpy(&ring, (const char *)region + SKV_KV_RING_OFFSET, sizeof(ring));
	h.tokens_seen = ring.tokens_seen;
	if (s->resumable) {
		memcpy(h.name, s->name, sizeof(h.name));
		memcpy(h.token, s->token, sizeof(h.token));
	}
	int err = snap_model_id(d, h.model_id);
	if (err)
		return err;
	static const uint8_t zeros[SKV_SNAP_ALIGN];
	struct sha256_ctx ctx;
	sha256_init(&ctx);
	sha256_update(&ctx, sizeof(h), (const uint8_t *)&h);
	sha256_update(&ctx, SKV_SNAP_ALIGN - sizeof(h), zeros);
	sha256_update(&ctx, s->region_bytes, region);
	sha256_digest(&ctx, 32, h.sha256);
	int fd = s->snap_out_fd;
	if (ftruncate(fd, 0) < 0 && errno != EINVAL)
		return -errno;
	err = snap_write_all(fd, &h, sizeof(h), 0);
	if (!err)
		err = snap_write_all(fd, zeros, SKV_SNAP_ALIGN - sizeof(h), sizeof(h));
	if (!err)
		err = snap_write_all(fd, region, s->region_bytes, SKV_SNAP_ALIGN);
	if (!err && fsync(fd) < 0 && errno != EINVAL)
		err = -errno;
	*bytes = h.file_bytes;
	return err;
}

void cached_snapshot_done(struct cached *d, struct cached_conn *c,
			  const struct skv_msg_snapshotted *m)
{
	struct cached_stream *s = cached_stream_find(d, m->stream_id);
	if (!s || s->engine != c->engine || s->snap_staging_fd < 0)
		return; /* not one we asked for (any more) */
	struct skv_admin_result r = { .code = m->code, .stream_id = s->id, .copy_ns = m->copy_ns };
	memcpy(r.name, s->name, sizeof(r.name));
	if (m->code < 0) {
		snprintf(r.text, sizeof(r.text), "the engine could not copy stream %llu: %s",
			 (unsigned long long)s->id, skv_strerror(m->code));
	} else {
		void *region = mmap(NULL, s->region_bytes, PROT_READ, MAP_SHARED, s->snap_staging_fd,
				    0);
		if (region == MAP_FAILED) {
			r.code = -errno;
		} else {
			r.code = snap_write(d, s, region, &m->state, &r.bytes);
			struct skv_kv_ring ring;
			memcpy(&ring, (const char *)region + SKV_KV_RING_OFFSET, sizeof(ring));
			r.tokens_seen = ring.tokens_seen;
			munmap(region, s->region_bytes);
		}
		if (r.code < 0)
			snprintf(r.text, sizeof(r.text), "cannot write the snapshot: %s",
				 skv_strerror(r.code));
	}
	if (!r.code && s->snap_path) {
		char tmp[PATH_MAX];
		snprintf(tmp, sizeof(tmp), "%s.tmp", s->snap_path);
		if (rename(tmp, s->snap_path) < 0) {
			r.code = -errno;
			snprintf(r.text, sizeof(r.text), "cannot rename %.120s: %s", tmp, strerror(errno));
		} else if (d->saving || d->verbose) {
			cached_log("stream %llu (%s): %llu tokens snapshotted into %s (engine copy %.3f "
				   "ms)", (unsigned long long)s->id, s->name,
				   (unsigned long long)r.tokens_seen, s->snap_path,
				   (double)m->copy_ns * 1e-6);
		}
	}
	if (r.code && s->snap_path)
		cached_log("stream %llu (%s): %s", (unsigned long long)s->id, s->name, r.text);
	snap_result(d, s->snap_admin_id, &r);
	snap_clear(d, s);
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

int cached_restore_fd(struct cached *d, int fd, uint64_t *id, char *why, size_t why_len)
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
	uint8_t *file = malloc(h.file_bytes);
	if (!file)
		return skv_errorf(why, why_len, -ENOMEM, "no memory to read a %llu-byte snapshot",
				  (unsigned long long)h.file_bytes);
	int err = 0;
	for (uint64_t off = 0; off < h.file_bytes && !err;) {
		ssize_t n = pread(fd, file + off, h.file_bytes - off, (off_t)off);
		if (n <= 0)
			err = n < 0 ? -errno : -SKV_ETRUNCATED;
		else
			off += (uint64_t)n;
	}
	uint8_t sum[32], model[32];
	if (!err) {
		struct skv_snap_header *fh = (struct skv_snap_header *)file;
		memset(fh->sha256, 0, sizeof(fh->sha256));
		struct sha256_ctx ctx;
		sha256_init(&ctx);
		sha256_update(&ctx, h.file_bytes, file);
		sha256_digest(&ctx, 32, sum);
		if (memcmp(sum, h.sha256, 32))
			err = skv_errorf(why, why_len, -SKV_EFORMAT,
					 "corrupted snapshot: its sha256 does not match its bytes");
	} else {
		skv_errorf(why, why_len, err, "cannot read the snapshot: %s", skv_strerror(err));
	}
	if (!err && (err = snap_model_id(d, model)) < 0)
		skv_errorf(why, why_len, err, "cannot identify the model: %s", skv_strerror(err));
	if (!err && memcmp(model, h.model_id, 32))
		err = skv_errorf(why, why_len, -SKV_ESHAPE,
				 "snapshot of another model (id %02x%02x%02x%02x...): this daemon "
				 "serves %s (id %02x%02x%02x%02x...)", h.model_id[0], h.model_id[1],
				 h.model_id[2], h.model_id[3], d->model_path, model[0], model[1],
				 model[2], model[3]);
	const uint8_t *region = file + h.region_offset;
	struct skv_kv_desc desc;
	struct skv_kv_ring ring;
	char msg[256] = "";
	if (!err) {
		memcpy(&desc, region, sizeof(desc));
		memcpy(&ring, region + SKV_KV_RING_OFFSET, sizeof(ring));
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
	struct cached_restore r = { .region = region, .region_bytes = h.region_bytes,
				    .state = h.state, .owner_uid = h.owner_uid };
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
		if (!err)
			*id = before;
	}
	if (efd >= 0)
		close(efd);
	if (r.doorbell_fd >= 0)
		close(r.doorbell_fd);
	free(file);
	return err;
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
		r.code = cached_restore_fd(d, fd, &r.stream_id, why, sizeof(why));
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
		    s->snap_staging_fd >= 0)
			continue;
		char *path = NULL, tmp[PATH_MAX], why[SKV_MSG_TEXT];
		if (asprintf(&path, "%s/%u-%s.snap", d->state_dir, s->owner_uid, s->name) < 0) {
			path = NULL;
			continue;
		}
		snprintf(tmp, sizeof(tmp), "%s.tmp", path);
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
		int err = fd < 0 ? -errno : cached_restore_fd(d, fd, &id, why, sizeof(why));
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
