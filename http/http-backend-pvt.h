/* The backend's private state, shared by http-backend.c (the libskv connection, streams,
 * requests) and http-conv.c (durable conversations: re-attaching, --state-dir, moving between
 * nodes). Everything here belongs to the backend thread, except what struct gw_task's comment
 * gives to a worker. */
#ifndef SKV_HTTP_BACKEND_PVT_H
#define SKV_HTTP_BACKEND_PVT_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>

#include "http-gw.h"
#include "skv-client.h"

#define BACKEND_BUCKETS 4096
#define BACKEND_WATCH_MAX 4096          /* suspended clients watched at once */

struct gw_conv;

struct gw_stream {
	skv_client_stream *s;
	struct gw_job *job;              /* the request being answered; NULL between requests */
	struct gw_conv *conv;            /* NULL: one-shot */
	int paused;
	uint64_t skip_ends;              /* requests from before an attach to read to their end */
	struct gw_stream *hash_next;
	struct gw_stream *prev, *next;   /* every stream */
};

/* A conversation's stream settings: those of its first request. */
struct gw_conv_settings {
	int policy;                      /* -1: the default */
	int64_t sinks, window;           /* -1: the default */
	double temperature, top_p;
	uint64_t seed;
};

struct gw_conv {
	char id[GW_CONV_ID_MAX + 1];
	uint64_t key_hash;
	struct gw_stream *st;
	double last_used;
	uint64_t fed_messages, fed_hash; /* chat: the messages the stream holds */
	uint64_t tokens;                 /* the stream's tokens after its last answer (0: unknown) */
	uint64_t snap_tokens, snap_messages; /* --snapshot-dir: what its last copy held */
	struct gw_conv *next;
	/* Durable: the daemon's resumable stream, re-attached after a restart of either side. */
	char name[SKV_CLIENT_NAME_MAX];
	char token[SKV_CLIENT_TOKEN_MAX]; /* "": none yet (being moved in) */
	int lost;                        /* its stream is gone: 410 until DELETE or idle */
	char lost_why[256];
	struct gw_task *task;            /* an export, import or pull in progress: busy */
	struct gw_job *parked;           /* requests waiting for a --snapshot-dir copy */
	struct gw_conv_settings set;
};

struct gw_backend {
	struct gw *gw;
	skv_client *client;
	int client_fd;
	int lost_before;                 /* a connection was lost: count the next as reconnect */
	double next_connect, backoff, next_stats, next_expire, next_watch;
	struct gw_stream *buckets[BACKEND_BUCKETS];
	struct gw_stream *streams;
	struct gw_conv *convs;
	size_t n_convs;
	int paused_ready;                /* the last pass left paused streams with events */
	struct gw_buf scratch;
	uint64_t seed_counter;
	int reattach_due;                /* connected: attach conversations once engines run */
	int state_dirty;                 /* --state-dir: conversations.json is behind */
	unsigned tasks_running;          /* worker threads not taken back yet */
	double next_snapshot;            /* --snapshot-dir */
	uint64_t last_seed;              /* backend_open's */
	struct pollfd watch_fds[BACKEND_WATCH_MAX];         /* backend_watch's */
	struct gw_stream *watch_streams[BACKEND_WATCH_MAX];
	char tmpl_why[512];              /* --chat-template auto found no format: why */
};

enum task_kind { TASK_EXPORT = 1, TASK_IMPORT, TASK_PULL, TASK_SNAPSHOT };

/* One blocking piece of work (an admin round trip, a peer's HTTP transfer) on a thread of its
 * own; the backend keeps the conversation busy (conv->task) until it takes the result back
 * from gw->tasks_done. The worker reads only what is copied into the task. */
struct gw_task {
	enum task_kind kind;
	struct gw *gw;
	struct gw_job *job;             /* NULL for --snapshot-dir exports */
	struct gw_conv *conv;           /* the backend's; not touched by the worker */
	char id[GW_CONV_ID_MAX + 1];
	char model[GW_MODEL_NAME_MAX], tmpl[64];
	uint64_t key_hash;
	int check_key;
	uint64_t stream_id;             /* export */
	struct gw_buf state_text;       /* export: the JSON state */
	const char *snap;               /* import: the whole body (job->upload) */
	size_t snap_len;
	/* results */
	int status;
	char msg[768];
	struct gw_buf body;             /* export: the whole body */
	json_t *state;                  /* import, pull */
	char name[SKV_CLIENT_NAME_MAX], token[SKV_CLIENT_TOKEN_MAX];
	char from[GW_NODE_NAME_MAX];
	char lost_why[256];             /* pull: of a conversation lost here */
	int from_file;                  /* pull: restored from --snapshot-dir */
	int64_t age_s;                  /* its age */
	struct gw_task *next;
};

/* ---- http-backend.c, for http-conv.c ---------------------------------------------------- */

double backend_now(void);
void backend_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void backend_wake(struct gw *gw);
/* Append to a job's output (finished: no more will come) and wake its connection. */
void job_output(struct gw_backend *b, struct gw_job *j, const char *data, size_t len,
		int finished);
/* The job's error status and body (or an error event on a started SSE stream). */
void job_fail(struct gw_backend *b, struct gw_job *j, int status, const char *message,
	      const char *type, const char *code);
struct gw_stream *backend_stream_add(struct gw_backend *b, skv_client_stream *s);
struct gw_conv *backend_conv_find(struct gw_backend *b, const char *id);
struct gw_conv *backend_conv_new(struct gw_backend *b, const char *id, uint64_t key_hash);
/* Closes its stream for good (if any) and forgets it. */
void backend_conv_free(struct gw_backend *b, struct gw_conv *conv);
/* 410 from now on, with why. */
void backend_conv_lose(struct gw_backend *b, struct gw_conv *conv, const char *why);
/* --snapshot-dir: remove ID.skvconv. */
void backend_conv_unlink_file(struct gw_backend *b, const char *id);
/* The daemon went away: jobs fail, conversations keep their name and token. */
void backend_lost(struct gw_backend *b, const char *why);
/* Start a request (again, after a pull). Takes the backend's reference of j. */
void backend_start(struct gw_backend *b, struct gw_job *j);

/* ---- http-conv.c ------------------------------------------------------------------------- */

/* The daemon's stream name of a conversation id. */
void conv_stream_name(const char *id, char *out, size_t len);
/* Attach conv's stream by name and token (NULL and *err_out on failure). */
struct gw_stream *conv_attach(struct gw_backend *b, struct gw_conv *conv, int *err_out);
/* Connected with engines ready: every conversation without a stream attached again, or lost. */
void conv_reattach(struct gw_backend *b);
int conv_attach_again(struct gw_backend *b, struct gw_conv *conv);
/* --state-dir: conversations.json rewritten if anything changed; read at start. */
void conv_state_flush(struct gw_backend *b);
void conv_state_load(struct gw_backend *b);
const char *conv_status_type(int status);
/* GET .../export and PUT /v1/conversations/ID jobs. */
void conv_export(struct gw_backend *b, struct gw_job *j);
void conv_import(struct gw_backend *b, struct gw_job *j);
/* A request for an id not here: 1 if it waits for the peers (and --snapshot-dir); lost_why:
 * the conversation was lost here (410 again if nobody has a copy). */
int conv_pull(struct gw_backend *b, struct gw_job *j, const char *lost_why);
/* Workers' results back (the backend loop, while tasks_running). */
void conv_take_tasks(struct gw_backend *b);
/* --snapshot-dir: every --snapshot-interval seconds, every idle conversation exported. */
void conv_snapshot_all(struct gw_backend *b, double now);

#endif
