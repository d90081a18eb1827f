/* The daemon's private state, shared by cached/daemon.c (the event loop and the protocol) and
 * cached/main.c (flags, start-up, shutdown). Single-threaded: no locking. */
#ifndef SKV_DAEMON_PVT_H
#define SKV_DAEMON_PVT_H

#include <stdint.h>
#include <sys/types.h>

#include "channel.h"
#include "proto.h"
#include "wake.h"

#define CACHED_MAX_FDS 65536
#define CACHED_MAX_ENGINES 256
#define CACHED_MAX_ARENAS 64

enum cached_tag_kind {
	CACHED_TAG_NONE = 0,
	CACHED_TAG_LISTEN,
	CACHED_TAG_CONN,
	CACHED_TAG_PIDFD,
	CACHED_TAG_SIGNAL,
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

struct cached_engine {
	uint32_t id;
	enum cached_engine_state state;
	int supervised;            /* started (and restarted) by this daemon */
	unsigned arena;            /* index of its node's arena */
	int node;                  /* kernel node number, -1 with numa off */
	char cpus[32];             /* --cpus for the engine, "" when unpinned */
	pid_t pid;
	int pidfd;
	struct cached_conn *conn;
	int doorbell_fd;           /* one page: struct skv_wake_word its clients ring */
	struct skv_wake_word *doorbell;
	int efd;                   /* its eventfd (io_uring wake-ups) */
	uint32_t n_streams;
	uint32_t restarts;
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
	uint32_t seq_out;
	uint32_t n_streams;
	struct cached_engine *engine; /* role engine */
	int watching;              /* admin: receives ADMIN_EVENTs */
	int dead;
	struct cached_conn *next;
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
	struct cached_stream *next;
};

struct cached_stats {
	uint64_t streams_opened;
	uint64_t streams_closed;
	uint64_t streams_failed;
	uint64_t engine_restarts;
	uint64_t tokens_evicted_closed; /* evictions of streams no longer in the table */
};

struct skv_arena;
struct skv_model;

struct cached {
	/* configuration */
	char socket_path[108];
	const char *model_path;
	const char *tokenizer_path;
	const char *engine_bin;
	uid_t uid;
	gid_t group;
	int have_group;
	int verbose;
	enum skv_wait_backend wait_backend;
	uint64_t instance;
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
	uint64_t next_stream_id;
	struct cached_stats stats;
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
int cached_conn_send(struct cached *d, struct cached_conn *c, uint16_t type, const void *body,
		     const int *fds, int n_fds);
double cached_now(void);

#endif
