/* The daemon's private state, shared by cached/daemon.c (the event loop and the protocol) and
 * cached/main.c (flags, start-up, shutdown). Single-threaded: no locking. */
#ifndef SKV_DAEMON_PVT_H
#define SKV_DAEMON_PVT_H

#include <stdint.h>
#include <sys/types.h>

#include "channel.h"
#include "kv-layout.h"
#include "proto.h"
#include "wake.h"

#define CACHED_MAX_FDS 65536
#define CACHED_MAX_ENGINES 256
#define CACHED_MAX_ARENAS 64
/* DROPs an engine has unanswered at once; the rest wait in the daemon (see stream_drop). */
#define CACHED_DROP_WINDOW 32
/* Bytes of replies a peer may leave unread before the daemon gives up on it. */
#define CACHED_OUT_MAX_BYTES (16u << 20)
/* The longest idle time-out (--idle-timeout, or a stream's own): a week. */
#define CACHED_IDLE_MAX_S 604800u

enum cached_tag_kind {
	CACHED_TAG_NONE = 0,
	CACHED_TAG_LISTEN,
	CACHED_TAG_CONN,
	CACHED_TAG_PIDFD,
	CACHED_TAG_SIGNAL,
	CACHED_TAG_SNAP_WRITER,    /* the snapshot writer thread's eventfd (cached/snapshot.c) */
};

/* What an epoll event's fd is; indexed by fd. */
struct cached_tag {
	uint32_t kind;
	int fd;
	void *ptr;
};

/* The numbers are the admin protocol's (shm/proto.h), so rows carry them as they are. */
enum cached_engine_state {
	CACHED_ENGINE_NONE = SKV_ADMIN_ENGINE_NONE,
	CACHED_ENGINE_STARTING = SKV_ADMIN_ENGINE_STARTING, /* spawned, no HELLO yet */
	CACHED_ENGINE_READY = SKV_ADMIN_ENGINE_READY,       /* serving */
	CACHED_ENGINE_LOST = SKV_ADMIN_ENGINE_LOST,   /* connection dropped, process may linger */
	CACHED_ENGINE_EXITED = SKV_ADMIN_ENGINE_EXITED, /* process gone: its regions are free */
};

struct cached_conn;
struct cached_revive;
struct cached_snap_job;
struct cached_snap_writer;
struct cached_stream;

struct cached_engine {
	uint32_t id;
	enum cached_engine_state state;
	int supervised;            /* started (and restarted) by this daemon */
	unsigned arena;            /* index of its node's arena */
	int node;                  /* kernel node number, -1 with numa off */
	char cpus[256];            /* --cpus for the engine, "" when unpinned */
	pid_t pid;
	int pidfd;
	struct cached_conn *conn;
	int doorbell_fd;           /* one page: struct skv_wake_word its clients ring */
	struct skv_wake_word *doorbell;
	int efd;                   /* its eventfd (io_uring wake-ups) */
	uint32_t n_streams;
	uint32_t restarts;
	uint32_t drops_in_flight;  /* DROPs sent, DROPPED not yet back (<= CACHED_DROP_WINDOW) */
	struct cached_stream *drop_head, *drop_tail; /* streams whose DROP waits for the window */
	double started_at;
	double restart_window_start;
	int restarts_in_window;
	/* for rates between two admin listings */
	uint64_t rate_tokens;
	double rate_time;
};

struct cached_conn {
	int fd;
	uint32_t role;             /* 0 until HELLO */
	uint32_t peer_pid;
	uint32_t peer_uid;
	uint32_t peer_gid;
	int content_ok;            /* may read stream contents (daemon's uid, root, --admin-group) */
	uint32_t seq_out;
	uint32_t n_streams;
	struct cached_engine *engine; /* role engine */
	int watching;              /* admin: receives ADMIN_EVENTs */
	int doorbell_fd;           /* client: its doorbell page (-1: none yet) */
	uint32_t n_queued;         /* client: its OPENs in the admission queue */
	/* Messages the socket had no room for, in order (sent when it polls writable). */
	struct cached_outmsg *out_head, *out_tail;
	size_t out_bytes;
	int overflow;              /* more than CACHED_OUT_MAX_BYTES unread: to be dropped */
	int dead;
	uint64_t id;               /* unique per daemon run: names it in replies that come later */
	struct cached_conn *next;
};

/* A message waiting in a connection's output queue; its fds are the daemon's own copies. */
struct cached_outmsg {
	struct cached_outmsg *next;
	uint16_t type;
	uint32_t seq;
	int n_fds;
	int fds[SKV_MSG_MAX_FDS];
	size_t len;
	unsigned char body[];
};

/* Why an OPEN cannot be placed now: the reason a queue time-out gives. */
enum cached_wait_reason {
	CACHED_WAIT_ARENA = 1,     /* no arena has a free extent large enough */
	CACHED_WAIT_LIMIT,         /* --max-streams streams hold KV */
	CACHED_WAIT_ENGINE,        /* no engine is ready */
};

/* An OPEN in the admission queue (--admission queue): answered QUEUED, then OPENED or ERROR. */
struct cached_pending {
	struct cached_conn *client;
	struct skv_msg_open_named open; /* a plain OPEN: name "" and not resumable */
	int resumable;
	int client_efd;            /* the OPEN's eventfd, handed to the engine at placement */
	double deadline;           /* CLOCK_MONOTONIC seconds: ERROR -ETIMEDOUT then */
	struct cached_pending *next;
};

enum cached_stream_state {
	CACHED_STREAM_OPEN = SKV_ADMIN_STREAM_OPEN,
	CACHED_STREAM_CLOSING = SKV_ADMIN_STREAM_CLOSING, /* DROP sent; freed on DROPPED or exit */
	CACHED_STREAM_FAILED = SKV_ADMIN_STREAM_FAILED,   /* engine died; waits for CLOSE */
};

struct cached_stream {
	uint64_t id;
	enum cached_stream_state state;
	struct cached_conn *client;  /* NULL once the client is gone */
	struct cached_engine *engine;
	unsigned arena;
	uint64_t region_offset;
	uint64_t region_bytes;       /* 0 once returned to the arena */
	struct skv_stream_params params;
	double opened_at;
	uint64_t rate_tokens;        /* tokens_seen at the previous admin listing */
	double rate_time;
	uint64_t evicted_reported;   /* tokens_evicted already announced to watchers */
	int dropping;                /* DROP asked of the engine (sent or waiting for the window);
				      * the region is freed when DROPPED comes back */
	int drop_queued;             /* in its engine's drop queue, DROP not sent yet */
	struct cached_stream *drop_next;
	/* Idle time-out: a read-only view of the channel's header and ring indices (NULL when
	 * the stream has no time-out), the indices at the last look and when they last moved. */
	const void *chan_view;
	size_t chan_view_bytes;
	uint64_t chan_in_offset, chan_out_offset;
	uint32_t idle_timeout_s;     /* 0: none */
	uint32_t chan_seen[4];       /* in head, in tail, out head, out tail */
	double active_at;
	/* Who opened it: only that uid (or root) may attach to it or see it (cached/durable.c). */
	uint32_t owner_uid;
	/* Resumable streams (OPEN_NAMED): detached, not closed, when the client goes away. */
	int resumable;
	char name[SKV_STREAM_NAME_MAX];
	char token[SKV_TOKEN_HEX];   /* the secret a peer presents to ATTACH */
	int chan_fd;                 /* the daemon's copy of the channel, for the next client */
	double detached_at;          /* 0 while a client holds it */
	/* A snapshot in progress (cached/snapshot.c): the engine holds the stream at a
	 * boundary, the daemon copies the region, resumes it, and its writer thread writes the
	 * file. NULL: none in progress. */
	struct cached_snap_job *snap;
	int reviving;                /* its engine died; it comes back from its --state-dir
				      * snapshot (a cached_revive) and its client is told then */
	struct cached_stream *next;
};

struct cached_stats {
	uint64_t streams_opened;
	uint64_t streams_closed;
	uint64_t streams_failed;
	uint64_t engine_restarts;
	uint64_t tokens_evicted_closed; /* evictions of streams no longer in the table */
	uint64_t opens_queued;       /* OPENs that waited in the admission queue */
	uint64_t opens_timed_out;    /* ... and got ERROR -ETIMEDOUT */
	uint64_t streams_idle_closed; /* streams failed by the idle time-out */
};

struct skv_arena;
struct skv_model;

struct cached {
	/* configuration */
	char socket_path[108];
	const char *model_path;
	const char *tokenizer_path;
	const char *engine_bin;
	unsigned engine_threads;       /* --threads of every engine */
	const char *engine_weights;    /* --weights of every engine: auto, map or huge */
	uid_t uid;
	gid_t group;
	int have_group;
	int verbose;
	enum skv_wait_backend wait_backend;
	uint64_t instance;
	uint64_t max_streams;      /* --max-streams: streams holding KV at once (0: no limit) */
	int admission_queue;       /* --admission queue (else reject) */
	uint32_t queue_timeout_s;  /* --queue-timeout */
	uint32_t queue_max;        /* --queue-max */
	uint32_t idle_timeout_s;   /* --idle-timeout (0: none) */
	uint32_t detach_timeout_s; /* --detach-timeout: a detached stream without an idle
				    * time-out of its own is closed after this long */
	gid_t admin_group;         /* --admin-group: may read stream contents */
	int have_admin_group;
	const char *state_dir;     /* --state-dir: snapshots on SIGTERM, restored at start */
	uint32_t snapshot_interval_s; /* --snapshot-interval: also every this often (0: never) */
	double next_checkpoint;
	/* resources */
	struct skv_model *model;
	int weights_fd;
	uint64_t weights_bytes;
	struct skv_arena *arenas[CACHED_MAX_ARENAS];
	int arena_node[CACHED_MAX_ARENAS];
	unsigned n_arenas;
	struct cached_engine engines[CACHED_MAX_ENGINES];
	unsigned n_engines;
	/* state */
	int epfd;
	int listen_fd;
	int signal_fd;
	volatile int stopping;
	struct cached_conn *conns;
	struct cached_stream *streams;
	uint64_t n_streams;
	uint64_t n_kv_streams;     /* streams holding a KV region (what --max-streams counts) */
	uint64_t n_idle_tracked;   /* streams with an idle time-out */
	uint64_t n_detached;       /* resumable streams no client holds */
	uint64_t next_stream_id;
	struct cached_pending *queue_head, *queue_tail; /* the admission queue, FIFO */
	uint32_t n_queued;
	enum cached_wait_reason queue_reason; /* why the queue's first OPEN does not fit */
	int admission_dirty;       /* room may have come free: try the queue */
	int overflowed;            /* some connection has overflow set */
	double next_tick;          /* the once-a-second look at idle streams and evictions */
	struct cached_stats stats;
	/* snapshots (cached/snapshot.c) */
	uint8_t model_id[32];
	int have_model_id;
	const struct cached_restore *restoring; /* while cached_place_stream places a restore */
	struct cached_snap_writer *snap_writer; /* the thread that writes files (NULL: none yet) */
	struct cached_revive *revive_head; /* streams of dead engines to restore (snapshot.c) */
	uint32_t snaps_in_flight;
	int saving;                /* SIGTERM with --state-dir: snapshots first, then stop */
	double save_deadline;
	int restore_due;           /* --state-dir: restore once an engine is ready */
	uint64_t next_conn_id;
	double started_at;
	unsigned watchers;
	/* Statistics of engine processes that have exited, so that totals never go back. */
	struct skv_engine_stats retired;
	struct cached_tag tags[CACHED_MAX_FDS];
};

void cached_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cached_drop_conn(struct cached *d, struct cached_conn *c);
int cached_run(struct cached *d);
int cached_watch_fd(struct cached *d, int fd, uint32_t kind, void *ptr);
int cached_spawn_engine(struct cached *d, struct cached_engine *e);
/* Create an engine's doorbell page and eventfd. */
int cached_engine_prepare(struct cached_engine *e);
/* Admin (cached/admin.c): answer an ADMIN_REQ; announce an event to watchers; the periodic
 * scan that announces evictions. */
void cached_admin_request(struct cached *d, struct cached_conn *c,
			  const struct skv_msg_admin_req *req);
void cached_event(struct cached *d, uint32_t type, uint64_t stream_id, uint32_t engine,
		  uint64_t arg, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
void cached_admin_tick(struct cached *d);
/* Fold an exited engine's last statistics into d->retired. */
void cached_admin_retire(struct cached *d, struct cached_engine *e);
/* Send a message to a peer. A full socket does not lose it: it waits in the connection's
 * output queue (fds duplicated) until the socket polls writable. Returns 0, -ENOBUFS when the
 * peer left more than CACHED_OUT_MAX_BYTES unread (it is dropped after the current event), or
 * -errno (-EPIPE: gone). */
int cached_conn_send(struct cached *d, struct cached_conn *c, uint16_t type, const void *body,
		     const int *fds, int n_fds);
double cached_now(void);

/* Place an OPEN now (daemon.c): resolve its policy, pick an engine with room, allocate the
 * region, ASSIGN it and answer OPENED. Returns 0 when answered (OPENED); a positive
 * enum cached_wait_reason when there is no room now (nothing sent, why says what is full);
 * or -errno for an OPEN no room would help (bad parameters: -EINVAL / -SKV_E*, larger than a
 * whole arena: -ENOSPC, no memory for the daemon's own bookkeeping), nothing sent and why
 * filled: the caller answers ERROR. client_efd stays the caller's. */
int cached_place_stream(struct cached *d, struct cached_conn *c,
			const struct skv_msg_open_named *open, int resumable, int client_efd,
			char *why, size_t why_len);
/* The checks of cached_place_stream that do not depend on room: 0 or its -errno, why filled. */
int cached_check_open(struct cached *d, const struct skv_msg_open_named *open, int resumable,
		      struct cached_conn *c, char *why, size_t why_len);
/* The idle time-out fired: FAILED -ETIMEDOUT to the client, DROP to the engine; the region
 * is freed on DROPPED. */
void cached_stream_idle_expire(struct cached *d, struct cached_stream *s);

/* Admission control and idle time-outs (cached/admission.c). */
/* An OPEN from a client: place it, queue it (--admission queue) or refuse it. */
void cached_admission_open(struct cached *d, struct cached_conn *c,
			   const struct skv_msg_open_named *open, int resumable, int client_efd);
/* Room may have come free: place queued OPENs in order while they fit. */
void cached_admission_pump(struct cached *d);
/* Answer ERROR -ETIMEDOUT to queued OPENs past their deadline. */
void cached_admission_expire(struct cached *d, double now);
/* The client is gone: forget its queued OPENs (their fds closed). */
void cached_admission_forget(struct cached *d, struct cached_conn *c);
/* Milliseconds epoll may sleep before a deadline or the next tick is due (-1: none). */
int cached_timer_ms(struct cached *d, double now);
/* Once a second: fail streams idle for their time-out. */
void cached_idle_tick(struct cached *d, double now);

/* A stream being restored from a snapshot: what cached_place_stream takes from it (the
 * region's bytes, validated; the engine state; name, token and owner). */
struct cached_restore {
	int fd;                                /* the snapshot file */
	const struct skv_snap_header *header;  /* checked */
	struct skv_kv_desc desc;               /* the region's, checked */
	struct skv_kv_ring ring;
	uint64_t region_bytes;
	struct skv_stream_state state;
	char name[SKV_STREAM_NAME_MAX];
	char token[SKV_TOKEN_HEX];
	uint32_t owner_uid;
	int doorbell_fd;             /* a placeholder client doorbell until someone attaches */
};

/* Snapshots (cached/snapshot.c). */
/* Read a restore's region from its file into region (region_bytes, its place in the arena),
 * hashing the whole file on the way: 0, or a negative code with why filled (a sha256 that
 * does not match, a short read, a file that changed since it was checked). */
int cached_restore_read(const struct cached_restore *r, void *region, char *why, size_t why_len);
/* Ask s's engine for a copy of it; the file goes to out_fd (taken), then renamed to path
 * (taken, malloc'ed; NULL: written in place). admin_id: who gets ADMIN_RESULT (0: nobody).
 * Returns 0, or -errno with why filled. */
int cached_snapshot_start(struct cached *d, struct cached_stream *s, int out_fd, char *path,
			  uint64_t admin_id, uint32_t flags, char *why, size_t why_len);
/* SNAPSHOTTED from an engine: copy the held region, resume the stream, hand the file to the
 * writer thread. */
void cached_snapshot_done(struct cached *d, struct cached_conn *c,
			  const struct skv_msg_snapshotted *m);
/* The writer thread's eventfd is readable: rename the files it wrote, answer the admins. */
void cached_snapshot_written(struct cached *d);
/* The stream is going away: forget its snapshot in progress. */
void cached_snapshot_abort(struct cached *d, struct cached_stream *s, const char *why);
/* Restore the snapshot file fd as a detached resumable stream. 0 (*id set, and *tokens_seen
 * unless NULL: the stream's tokens) or -errno / -SKV_E* with a one-line why; -EAGAIN when no
 * engine is ready, -ENOSPC when there is no room now. */
int cached_restore_fd(struct cached *d, int fd, uint64_t *id, uint64_t *tokens_seen, char *why,
		      size_t why_len);
/* ADMIN_SNAPSHOT / ADMIN_RESTORE (take fd). */
void cached_admin_snapshot(struct cached *d, struct cached_conn *c, uint64_t stream_id, int fd);
void cached_admin_restore(struct cached *d, struct cached_conn *c, int fd);
/* --state-dir: snapshot every resumable stream (SIGTERM); restore the directory (start). */
void cached_state_save(struct cached *d);
void cached_state_restore(struct cached *d);
/* --snapshot-interval: snapshot every resumable stream that has none in progress. */
void cached_state_checkpoint(struct cached *d);
/* A resumable stream ended for good: its --state-dir file goes. */
void cached_state_forget(struct cached *d, const struct cached_stream *s);
/* Its engine died: if s is resumable and --state-dir holds a snapshot of it, take it for a
 * restore (s gives up its name and file, s->reviving set; its client hears the outcome later)
 * and return 1; else 0 (the caller fails it). */
int cached_revive_take(struct cached *d, struct cached_stream *s);
/* Restore what cached_revive_take took, once an engine is ready; tell each old stream's
 * client where the stream is now (or why it is gone) through cached_stream_revived. */
void cached_revive_pump(struct cached *d, double now);
/* Free what is left of them (shutdown). */
void cached_revive_forget(struct cached *d);
/* The client of a reviving stream closed it before it heard: no restore, and its file goes. */
void cached_revive_cancel(struct cached *d, struct cached_stream *s);
/* The outcome of a revive for the stream entry old_id (daemon.c): FAILED with code and text to
 * its client; an entry no engine and no client holds goes. */
void cached_stream_revived(struct cached *d, uint64_t old_id, int code, const char *text);

/* Helpers of daemon.c for the files beside it. */
struct cached_stream *cached_stream_find(struct cached *d, uint64_t id);
/* Ask the stream's engine to let go of it (the region is freed on DROPPED). */
void cached_stream_drop(struct cached *d, struct cached_stream *s);
void cached_conn_error(struct cached *d, struct cached_conn *c, int code, const char *text);

/* The rest of a connection's sending (cached/conn.c): an ERROR with a formatted text; send
 * what waits in the output queue (the socket polls writable); free the queue (closing its fds)
 * when the connection goes. */
void cached_conn_errorf(struct cached *d, struct cached_conn *c, int code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void cached_conn_flush(struct cached *d, struct cached_conn *c);
void cached_conn_free_out(struct cached_conn *c);

/* Resumable streams and who may see what (cached/durable.c). */
/* A name as OPEN_NAMED may give it: 1..63 of [A-Za-z0-9._-]. */
int cached_name_valid(const char *name);
/* The resumable stream of that name visible to a peer of uid (root sees every uid's). */
struct cached_stream *cached_stream_by_name(struct cached *d, const char *name, uint32_t uid);
/* A fresh secret token (SKV_TOKEN_HEX hex characters). 0 or -errno. */
int cached_token_new(char token[SKV_TOKEN_HEX]);
/* Its client went away (or sent DETACH): keep the stream, forget the client. */
void cached_stream_detach(struct cached *d, struct cached_stream *s);
/* ATTACH (takes client_efd) and DETACH from a client. */
void cached_attach(struct cached *d, struct cached_conn *c, const struct skv_msg_attach *a,
		   int client_efd);
void cached_detach_request(struct cached *d, struct cached_conn *c, uint64_t stream_id);
/* Once a second: close detached streams past their time-out. */
void cached_detach_tick(struct cached *d, double now);
/* SO_PEERCRED of an accepted peer: may it use the daemon at all (1/0); may it read stream
 * contents (sets c->content_ok). */
int cached_peer_allowed(struct cached *d, uint32_t uid, uint32_t gid);
int cached_peer_in_group(uint32_t uid, uint32_t gid, gid_t group);

#endif
