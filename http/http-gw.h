/* skv-http: the HTTP gateway of streamkv, a libskv client of skv-cached.
 *
 * Two threads share this state:
 *   - the HTTP thread: libmicrohttpd's internal epoll thread. It reads requests, checks them
 *     (http-api.c), hands generation and conversation jobs to the backend, suspends their
 *     connections and writes what the backend produced (http-server.c);
 *   - the backend thread (http-backend.c): the one libskv connection, every stream multiplexed
 *     on it, conversations, reconnection to a restarted daemon.
 * A job's output fields are guarded by gw->lock (one lock for all jobs: held only to append or
 * take bytes). Everything marked "backend" is touched by the backend thread alone.
 *
 * Lock order: gw->lock, then libmicrohttpd's own (MHD_suspend_connection is called under
 * gw->lock from the content reader; MHD_resume_connection is called without it). */
#ifndef SKV_HTTP_GW_H
#define SKV_HTTP_GW_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define GW_MAX_STOP 4                   /* stop sequences per request, as OpenAI allows */
#define GW_CONV_ID_MAX 128              /* bytes of a conversation id */
#define GW_OUT_HIGH (256u * 1024)       /* SSE bytes a slow reader may leave unread */
#define GW_MODEL_NAME_MAX 256
#define GW_NODE_NAME_MAX 64             /* --node-name, X-Skv-Node */
#define GW_CONV_MAX_BYTES (1ull << 30)  /* largest application/x-skv-conversation body */

struct MHD_Connection;
struct skv_chat_template;

/* Parsed flags (skv-http.c). */
struct gw_opts {
	const char *socket_path;
	char listen_host[64];
	uint16_t listen_port;
	char **api_keys;                /* [n_api_keys]; none: no authentication */
	size_t n_api_keys;
	char *model_name;               /* NULL: the daemon's model file name */
	/* Durable and movable conversations (http-backend.c, http-move.c). */
	char node_name[GW_NODE_NAME_MAX];  /* X-Skv-Node; default: the host name */
	const char *state_dir;          /* NULL: name -> token kept in memory only */
	char **peers;                   /* [n_peers] base URLs asked for unknown conversations */
	size_t n_peers;
	const char *peer_key;           /* the key of peers' requests (and ours to them) */
	const char *snapshot_dir;       /* NULL: no periodic export */
	unsigned snapshot_interval;     /* seconds */
	size_t max_body;
	unsigned max_concurrent;
	uint64_t max_tokens;
	unsigned conversation_idle;     /* seconds */
	int64_t max_window, max_sink;
	const struct skv_chat_template *tmpl; /* engine/chat-template.h; NULL: not known (auto) */
	int tmpl_auto;                  /* --chat-template auto: tmpl from the daemon's model */
};

enum gw_kind { GW_COMPLETION = 1, GW_CHAT = 2, GW_DELETE = 3, GW_EXPORT = 4, GW_IMPORT = 5 };

/* One chat message as the request gave it (strings owned by the request's JSON). */
struct gw_message {
	const char *role;
	const char *content;
	size_t content_len;
};

/* A generation request, as http-api.c parsed and checked it. */
struct gw_request {
	enum gw_kind kind;
	json_t *root;                   /* the body; owns every string below */
	const char *prompt;             /* completions */
	size_t prompt_len;
	struct gw_message *messages;    /* chat, [n_messages] */
	size_t n_messages;
	uint64_t max_tokens;
	float temperature, top_p;
	uint64_t seed;
	int have_seed;
	const char *stop[GW_MAX_STOP];
	size_t stop_len[GW_MAX_STOP];
	int n_stop;
	int stream, include_usage, echo;
	int ignore_eos;                 /* vLLM's extension: generate max_tokens whatever comes */
	char conversation[GW_CONV_ID_MAX + 1]; /* "" : a one-shot stream */
	int policy;                     /* enum skv_client_policy, -1: the default */
	int64_t sinks, window;          /* -1: the default */
};

struct gw_buf {
	char *data;
	size_t len, cap;
};
int gw_buf_put(struct gw_buf *b, const void *data, size_t len);
int gw_buf_puts(struct gw_buf *b, const char *s);
int gw_buf_printf(struct gw_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void gw_buf_free(struct gw_buf *b);

/* A request in flight. Created by the HTTP thread, queued to the backend; two references (the
 * connection's and the backend's), freed when both are dropped (gw_job_unref). */
struct gw_job {
	struct gw *gw;
	struct gw_request req;
	uint64_t key_hash;              /* the API key it came with: conversations belong to it */
	char id[48];                    /* "cmpl-..." / "chatcmpl-..." */
	int64_t created;                /* Unix seconds */
	int sock_fd;                    /* the client's socket, -1 unknown (for POLLRDHUP) */
	int by_peer;                    /* authorized by --peer-key: any key's conversation */
	int release;                    /* export: close the conversation here once exported;
					 * import: X-Skv-Give-Back (taken while draining) */
	struct gw_buf upload;           /* import: the body */
	/* gw->lock */
	int refs;
	struct MHD_Connection *conn;    /* NULL once the connection is gone */
	int status;                     /* HTTP status; 0 until the backend decided */
	int finished;                   /* no more output will come */
	int suspended;                  /* the connection waits for output */
	int paused;                     /* backend: stopped reading the stream (out is full) */
	int cancel;                     /* the connection went away before the end */
	struct gw_buf out;              /* the body (SSE: the bytes not yet sent from out_off) */
	size_t out_off;
	struct gw_job *queue_next;
	const char *content_type;       /* NULL: application/json */
	char moved_from[GW_NODE_NAME_MAX]; /* X-Skv-Conversation-Moved: from=NODE */
	int restored;                   /* X-Skv-Conversation-Restored: snapshot; age-s= */
	int64_t restored_age_s;
	/* backend */
	int no_fetch;                   /* peers and --snapshot-dir were asked already */
	struct gw_stream *st;
	struct gw_buf gen;              /* the generated text so far (bytes as the engine sent) */
	size_t emitted;                 /* bytes of gen sent on */
	struct gw_buf content;          /* non-streaming: the emitted text, valid UTF-8 */
	int trim;                       /* chat: drop the answer's leading spaces */
	int sent_role;                  /* chat SSE: the first chunk (role) went */
	int stopped;                    /* a stop sequence matched: the rest is dropped */
	int done;                       /* the output is complete (DONE, error or stop) */
	uint64_t prompt_tokens, completion_tokens;
	const char *finish_reason;
};

/* Counters and gauges of the gateway itself, for /metrics (atomics). */
#define GW_STATUS_CODES 12
struct gw_counters {
	uint64_t requests[GW_STATUS_CODES];  /* by gw_status_index */
	uint64_t active_streams;             /* SSE responses being written */
	uint64_t active_jobs;                /* generation requests in flight */
	uint64_t conversations;              /* open */
	uint64_t conversations_opened;
	uint64_t conversations_expired;
	uint64_t tokens;                     /* completion tokens sent on */
	uint64_t prompt_tokens;
	uint64_t cancelled;                  /* generations cut short by a client leaving */
	uint64_t paused_streams;             /* streams not read: their client reads slowly */
	uint64_t reconnects;
	uint64_t daemon_up;                  /* 1 while connected */
	uint64_t engines_ready;              /* as the daemon said at the last look */
	uint64_t conversations_moved_in;     /* imported: PUT, or pulled from a peer */
	uint64_t conversations_moved_out;    /* exported with release=1 */
	uint64_t conversations_restored;     /* from --snapshot-dir */
	uint64_t conversations_lost;         /* their stream was gone: 410 */
	uint64_t conversations_reattached;   /* after a restart of skv-cached or of skv-http */
};
extern const int gw_status_codes[GW_STATUS_CODES];
int gw_status_index(int status);

struct gw {
	struct gw_opts opts;
	pthread_mutex_t lock;
	struct gw_counters count;
	char model_name[GW_MODEL_NAME_MAX];  /* HTTP thread reads it once set at start */
	/* the backend's queue (gw->lock) */
	struct gw_job *queue_head, *queue_tail;
	int wake_fd;                         /* eventfd: the backend has something to do */
	int stopping;
	int cancel_pending;                  /* a connection left: the backend looks */
	int draining;                        /* atomic: POST /admin/drain, SIGUSR1 */
	struct gw_task *tasks_done;          /* workers' results for the backend (gw->lock) */
	double *peer_skip_until;             /* [n_peers] monotonic s: a peer that did not answer
					      * (or is this node) is not asked until then
					      * (gw->lock) */
	pthread_t backend_thread;
	struct gw_backend *backend;
};

/* ---- http-api.c: the OpenAI request and response shapes ---------------------------------- */

/* An OpenAI-style error body {"error":{"message","type","param","code"}} into b. */
int gw_error_body(struct gw_buf *b, const char *message, const char *type, const char *param,
		  const char *code);
/* Parse and check a body of kind (completion or chat) against the operator's limits. On
 * error returns the HTTP status (400 or 404) with b holding the error body. 0 on success, r
 * filled (free with gw_request_free). */
int gw_request_parse(const struct gw_opts *o, const char *model_name, enum gw_kind kind,
		     const char *body, size_t len, struct gw_request *r, struct gw_buf *err);
void gw_request_free(struct gw_request *r);
/* Whether s is a valid conversation id (1..GW_CONV_ID_MAX of [A-Za-z0-9._:-]). */
int gw_conv_id_valid(const char *s);
/* Append s (len bytes) as a JSON string (quoted) to b; invalid UTF-8 becomes U+FFFD. */
int gw_json_string(struct gw_buf *b, const char *s, size_t len);
/* Append s with invalid UTF-8 replaced by U+FFFD (raw bytes, no quoting). */
int gw_utf8_clean(struct gw_buf *b, const char *s, size_t len);
/* The length of the longest prefix of s[0..len) that does not end inside a UTF-8 sequence
 * that the next bytes may complete. */
size_t gw_utf8_complete(const char *s, size_t len);

/* One SSE event "data: {chunk}\n\n" of a job: text (may be empty), finish_reason (NULL:
 * none yet). */
int gw_sse_chunk(struct gw_buf *b, const struct gw_job *j, const char *model, const char *text,
		 size_t len, const char *finish_reason);
/* The usage chunk (stream_options.include_usage) and "data: [DONE]". */
int gw_sse_end(struct gw_buf *b, const struct gw_job *j, const char *model);
/* The whole non-streaming body. */
int gw_response_body(struct gw_buf *b, const struct gw_job *j, const char *model);

/* ---- http-template.c: chat messages to text -------------------------------------------- */

/* NULL if unknown. */
const struct skv_chat_template *gw_template_find(const char *name);
const char *gw_template_names(void);        /* for --help */
const char *gw_template_name(const struct skv_chat_template *t);
/* Append to b the text of m[from, n) of the conversation m[0, n), then the assistant's header
 * unless m[n - 1] is the assistant's (the answer's start the client wrote). 0 or -ENOMEM. */
int gw_template_render(const struct skv_chat_template *t, const struct gw_message *m, size_t n,
		       size_t from, struct gw_buf *b);
/* Whether the answer's leading spaces are dropped (the template ends with a space's place). */
int gw_template_trims(const struct skv_chat_template *t);
/* Whether the text holds special tokens (generate with SKV_CLIENT_SPECIAL). */
int gw_template_special(const struct skv_chat_template *t);
/* --chat-template auto: the format the model file at path names in its GGUF
 * tokenizer.chat_template (engine/chat-template.c recognizes it, as skv chat --template auto).
 * 0 with *out set; 1 with *out = story when the model names none (a llama2.c file, a GGUF
 * without the key); -ENOENT for a template none of the formats match, or the file's -errno,
 * with msg one line saying so (*out NULL). */
int gw_template_auto(const char *path, const struct skv_chat_template **out, char *msg,
		     size_t msg_len);

/* ---- http-backend.c ------------------------------------------------------------------------ */

int gw_backend_start(struct gw *gw);         /* the thread; 0 or -errno */
void gw_backend_stop(struct gw *gw);
/* Hand a job to the backend (takes the backend's reference). */
void gw_backend_submit(struct gw *gw, struct gw_job *j);
/* The connection of j is gone: stop its generation (under gw->lock or not: it takes it). */
void gw_backend_cancel(struct gw *gw, struct gw_job *j);
/* A paused job's reader freed room (called under gw->lock). */
void gw_backend_kick(struct gw *gw);
/* Drop one reference (takes gw->lock). */
void gw_job_unref(struct gw *gw, struct gw_job *j);

/* ---- http-move.c: what moves a conversation ---------------------------------------------
 * application/x-skv-conversation: a 40-byte header (magic "SKVCONV\0", format major and minor
 * as little-endian u32, the JSON state's bytes and the snapshot's as u64, FNV-1a 64 of the JSON
 * state as u64), the gateway's JSON state of the conversation, then the daemon's snapshot file
 * (shm/snapshot.h) of its stream. */
#define GW_CONV_HEADER_BYTES 40
#define GW_CONV_MAJOR 1
#define GW_CONV_MINOR 0
#define GW_FNV_SEED 14695981039346656037ull
#define GW_STATE_FILE "conversations.json"
struct gw_task;

uint64_t gw_fnv64(uint64_t h, const void *data, size_t len);
/* out = header + json + the bytes of snap_fd (from offset 0 to its size). 0 or -errno. */
int gw_conv_pack(struct gw_buf *out, const char *json, size_t json_len, int snap_fd);
/* Split and check a body: 0 with *state (to json_decref) and the snapshot bytes inside body,
 * or the HTTP status (400 malformed, truncated, corrupted; 422 another format version) with
 * msg saying why. */
int gw_conv_unpack(const char *body, size_t len, json_t **state, const char **snap,
		   size_t *snap_len, char *msg, size_t msg_len);
/* The daemon's snapshot of stream_id into a new memfd (*fd_out), over an admin connection.
 * Blocks until the stream's request in progress ends. 0 or -errno with msg. */
int gw_move_snapshot(const char *socket_path, uint64_t stream_id, int *fd_out, char *msg,
		     size_t msg_len);
/* Restore a snapshot's bytes (handed over in a memfd): the stream comes back detached; name
 * and token are what to attach with. 0 or -errno with the daemon's reason in msg. */
int gw_move_restore(const char *socket_path, const void *snap, size_t len, char *name,
		    size_t name_len, char *token, size_t token_len, char *msg, size_t msg_len);
/* GET base/v1/conversations/ID/export?release=1 (Authorization: Bearer key unless NULL) into
 * body, the peer's X-Skv-Node into node. Returns the HTTP status (msg: the error's message
 * when not 200), or -EHOSTUNREACH when there was no answer. *stop non-zero aborts. */
int gw_peer_fetch(const char *base, const char *id, const char *key, const int *stop,
		  struct gw_buf *body, char *node, size_t node_len, char *msg, size_t msg_len);
/* PUT base/v1/conversations/ID with body: give a conversation back to the peer it came from
 * when it cannot be taken here. Returns the HTTP status or -EHOSTUNREACH, msg as above. */
int gw_peer_put(const char *base, const char *id, const char *key, const char *body, size_t len,
		char *msg, size_t msg_len);
/* DIR/conversations.json written whole (0600, through a .tmp and rename), and read back (NULL:
 * no file, or msg says what is wrong with it). */
int gw_state_save(const char *dir, const char *text, size_t len, char *msg, size_t msg_len);
json_t *gw_state_load(const char *dir, char *msg, size_t msg_len);

/* ---- http-server.c ------------------------------------------------------------------------- */

struct MHD_Daemon;
int gw_server_start(struct gw *gw, struct MHD_Daemon **out, char *msg, size_t msg_len);
/* Wake a connection that waits for output of j (called by the backend after appending, or
 * finishing, without gw->lock: the caller took j->suspended under the lock). */
void gw_server_resume(struct MHD_Connection *conn);

#endif
