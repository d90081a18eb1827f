/* skv-admin's side of the admin protocol (shm/proto.h, "admin"): one SOCK_SEQPACKET
 * connection to skv-cached with role SKV_ROLE_ADMIN, the listings it answers, and the
 * tokenizer that turns the token ids of a stream back into text.
 *
 * Everything the daemon sends is copied once and checked before use: row counts against the
 * ADMIN_END that closes a listing, token chunks against the part they claim to belong to, every
 * string terminated here. Listings are capped (ADMIN_MAX_ROWS) so a misbehaving daemon cannot
 * make the tool allocate without bound.
 *
 * Errors: functions return >= 0 or -errno, with msg (may be NULL) holding one line:
 *   -EPIPE       the daemon hung up (it exited, restarted, or dropped us)
 *   -ETIMEDOUT   no answer within ADMIN_REPLY_TIMEOUT_MS
 *   -EPROTO      an answer that breaks the protocol (named in msg)
 *   -EREMOTEIO   the daemon answered ERROR (its text in msg, its code in conn->error_code)
 * Single-threaded, as the tool is. */
#ifndef SKV_ADMIN_CONN_H
#define SKV_ADMIN_CONN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto.h"

#define ADMIN_REPLY_TIMEOUT_MS 10000
#define ADMIN_MAX_ROWS (1u << 20)          /* rows of one listing */
#define ADMIN_MAX_PART_TOKENS (1u << 26)   /* ids of one part (sinks or window) of a stream */
#define ADMIN_STREAM_TRIES 8               /* reads of a stream whose row and ids disagree */

struct admin_conn {
	int sock;                  /* -1 when not connected */
	char path[108];            /* the socket */
	uint32_t seq;
	uint64_t instance;         /* from HELLO_OK: random per daemon start */
	pid_t daemon_pid;          /* SO_PEERCRED of the socket: to resolve a relative model path */
	char model_path[512];      /* from HELLO_OK, NUL-terminated here */
	char tokenizer_path[512];  /* from HELLO_OK ("" = the model's own / next to it) */
	int32_t error_code;        /* code of the last ERROR the daemon answered */
};

/* What one refresh holds. Rows are private copies with their strings terminated. */
struct admin_snapshot {
	struct skv_admin_server server;
	struct skv_admin_stream *streams;
	size_t n_streams;
	struct skv_admin_arena *arenas;
	size_t n_arenas;
	struct skv_admin_engine *engines;
	size_t n_engines;
	struct skv_admin_hist hist;   /* latency histograms, summed over engines */
	int have_hist;                /* 0: not asked for, or a daemon without them */
};

/* Which listings admin_fetch asks for (ADMIN_SERVER always comes first). */
enum {
	ADMIN_WANT_STREAMS = 1u << 0,
	ADMIN_WANT_ARENAS = 1u << 1,
	ADMIN_WANT_ENGINES = 1u << 2,
	ADMIN_WANT_HIST = 1u << 3,   /* a daemon that answers ERROR to it leaves have_hist 0 */
	ADMIN_WANT_ALL = 0xfu,
};

/* One stream in depth: its row and the token ids its cache holds. */
struct admin_stream_detail {
	struct skv_admin_stream row;
	int32_t *sink_ids;         /* [n_sink], position sink_first_pos + i */
	uint32_t n_sink, sink_total;
	uint64_t sink_first_pos;
	int32_t *window_ids;       /* [n_window], oldest first, position window_first_pos + i */
	uint32_t n_window, window_total;
	uint64_t window_first_pos;
};

/* Connect to path and say HELLO as an admin. Any failure leaves c->sock == -1 (an unreachable
 * socket: -ENOENT, -ECONNREFUSED, -EACCES...; a refusal: -EREMOTEIO). */
int admin_connect(struct admin_conn *c, const char *path, char *msg, size_t msg_len);
void admin_disconnect(struct admin_conn *c); /* accepts a never-connected (sock -1) conn */

/* ADMIN_SERVER, then the listings in want. On error the snapshot is left empty. The server
 * row's instance must equal the one HELLO_OK named (else -EPROTO). */
int admin_fetch(struct admin_conn *c, unsigned want, struct admin_snapshot *snap, char *msg,
		size_t msg_len);
void admin_snapshot_free(struct admin_snapshot *snap); /* accepts a zeroed one */

/* SKV_ADMIN_STREAM: -EREMOTEIO when the daemon knows no such stream. The row and the ids must
 * describe the same ring state (fills and window start); a read that mixes two states (the
 * engine appended in between) is retried, up to ADMIN_STREAM_TRIES times, then -EAGAIN. */
int admin_fetch_stream(struct admin_conn *c, uint64_t stream_id, struct admin_stream_detail *d,
		       char *msg, size_t msg_len);
void admin_stream_detail_free(struct admin_stream_detail *d); /* accepts a zeroed one */

/* SKV_ADMIN_WATCH, then one event per admin_watch_next: 1 with *ev filled, 0 when nothing came
 * within timeout_ms (< 0: wait without limit; a signal also returns 0), < 0 as above. */
int admin_watch_start(struct admin_conn *c, char *msg, size_t msg_len);
int admin_watch_next(struct admin_conn *c, struct skv_admin_event *ev, int timeout_ms, char *msg,
		     size_t msg_len);

struct skv_model;
struct skv_tokenizer;

/* The tokenizer the daemon's model uses: override if given (a llama2.c tokenizer file), else
 * the daemon's tokenizer path, else the GGUF's own vocabulary, else tok<vocab>.bin or
 * tokenizer.bin next to the model (as skv does). A relative model path is the daemon's: it is
 * resolved through /proc/<daemon pid>/cwd. *model stays open for the caller to close. */
int admin_tokenizer_open(const struct admin_conn *c, const char *override,
			 struct skv_model **model, struct skv_tokenizer **tok, char *msg,
			 size_t msg_len);

#endif
