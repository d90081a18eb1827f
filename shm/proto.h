/* The control protocol of skv-cached, and the stream channel's messages.
 *
 * Control plane: a Unix SOCK_SEQPACKET socket (message boundaries kept, file descriptors passed
 * with SCM_RIGHTS). Every message is a struct skv_msg_hdr followed by a fixed-size body for its
 * type; the header's size must equal the body size the receiver expects for that type, or the
 * message is refused. The first message on a connection is HELLO; a peer that speaks another
 * major version, sends garbage or a valid message at the wrong time gets an ERROR and is
 * dropped. A valid request that cannot be served (an unknown stream id, bad stream parameters)
 * gets an ERROR and the connection stays.
 *
 * Data plane: each stream has a channel (shm/channel.h): two rings in a memfd shared by the
 * client and the engine serving the stream, carrying struct skv_chan_msg elements. The daemon
 * never touches them after creating them.
 *
 * All fields are fixed-width, little-endian (the host's: peers are on one machine), explicitly
 * padded; strings are NUL-padded fixed arrays that receivers terminate themselves. */
#ifndef SKV_PROTO_H
#define SKV_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define SKV_PROTO_MAGIC 0x50564b53u /* "SKVP" */
#define SKV_PROTO_MAJOR 2
#define SKV_PROTO_MINOR 3 /* 2.1: resumable streams (OPEN_NAMED, ATTACH, DETACH); 2.2: snapshots;
			   * 2.3: the daemon copies a held stream's region (SNAPSHOT_RESUME) */
#define SKV_MSG_MAX_FDS 4
#define SKV_MSG_TEXT 192

enum skv_msg_type {
	SKV_MSG_HELLO = 1,          /* peer -> daemon: struct skv_msg_hello */
	SKV_MSG_HELLO_OK = 2,       /* daemon -> peer: struct skv_msg_hello_ok (+ fds: engines get
				     * theirs; a client gets its doorbell page, channel.h) */
	SKV_MSG_ERROR = 3,          /* either way: struct skv_msg_error, then the sender drops */
	SKV_MSG_OPEN = 4,           /* client -> daemon: struct skv_msg_open + fd: client eventfd */
	SKV_MSG_OPENED = 5,         /* daemon -> client: struct skv_msg_opened + fds: channel,
				     * engine doorbell, engine eventfd */
	SKV_MSG_CLOSE = 6,          /* client -> daemon: struct skv_msg_stream */
	SKV_MSG_CLOSED = 7,         /* daemon -> client: struct skv_msg_stream */
	SKV_MSG_FAILED = 8,         /* daemon -> client: struct skv_msg_failed */
	SKV_MSG_ASSIGN = 9,         /* daemon -> engine: struct skv_msg_assign + fds: channel,
				     * client eventfd, client doorbell page */
	SKV_MSG_DROP = 10,          /* daemon -> engine: struct skv_msg_stream */
	SKV_MSG_DROPPED = 11,       /* engine -> daemon: struct skv_msg_stream */
	SKV_MSG_STREAM_ERROR = 12,  /* engine -> daemon: struct skv_msg_failed (a stream failed) */
	SKV_MSG_STATS_REQ = 13,     /* client/admin -> daemon: struct skv_msg_stream (unused id) */
	SKV_MSG_STATS = 14,         /* daemon -> client/admin: struct skv_msg_stats */
	SKV_MSG_ADMIN_REQ = 15,     /* admin -> daemon: struct skv_msg_admin_req */
	SKV_MSG_ADMIN_SERVER = 16,  /* daemon -> admin: struct skv_admin_server */
	SKV_MSG_ADMIN_STREAM = 17,  /* daemon -> admin: struct skv_admin_stream, one per stream */
	SKV_MSG_ADMIN_ARENA = 18,   /* daemon -> admin: struct skv_admin_arena, one per arena */
	SKV_MSG_ADMIN_ENGINE = 19,  /* daemon -> admin: struct skv_admin_engine, one per engine */
	SKV_MSG_ADMIN_TOKENS = 20,  /* daemon -> admin: struct skv_admin_tokens, a chunk of ids */
	SKV_MSG_ADMIN_END = 21,     /* daemon -> admin: struct skv_admin_end, closes a listing */
	SKV_MSG_ADMIN_EVENT = 22,   /* daemon -> admin (after WATCH): struct skv_admin_event */
	SKV_MSG_ADMIN_HIST = 23,    /* daemon -> admin: struct skv_admin_hist */
	SKV_MSG_QUEUED = 24,        /* daemon -> client: struct skv_msg_queued, an OPEN waits for
				     * room (--admission queue); OPENED or ERROR follows */
	/* 2.1: resumable streams. A resumable stream outlives its client's connection: when the
	 * connection drops (or the client sends DETACH) the stream is detached, not closed; it
	 * keeps its KV and its channel until its idle time-out (else --detach-timeout), and a
	 * peer of the same uid (or root) that presents its name and secret token ATTACHes to
	 * it and continues where it was. */
	SKV_MSG_OPEN_NAMED = 25,    /* client -> daemon: struct skv_msg_open_named + fd: client
				     * eventfd; answered OPENED_NAMED (or QUEUED, ERROR) */
	SKV_MSG_OPENED_NAMED = 26,  /* daemon -> client: struct skv_msg_opened_named + the fds of
				     * OPENED */
	SKV_MSG_ATTACH = 27,        /* client -> daemon: struct skv_msg_attach + fd: client
				     * eventfd; answered OPENED_NAMED or ERROR */
	SKV_MSG_DETACH = 28,        /* client -> daemon: struct skv_msg_stream; answered DETACHED */
	SKV_MSG_DETACHED = 29,      /* daemon -> client: struct skv_msg_stream */
	SKV_MSG_REATTACH = 30,      /* daemon -> engine: struct skv_msg_stream + fds: the new
				     * client's eventfd and doorbell page */
	/* 2.2: snapshots (shm/snapshot.h is the file format). */
	SKV_MSG_SNAPSHOT = 31,      /* daemon -> engine: struct skv_msg_snapshot (no fd, 2.3):
				     * hold the stream at its next request boundary */
	SKV_MSG_SNAPSHOTTED = 32,   /* engine -> daemon: struct skv_msg_snapshotted; code 0: the
				     * stream is held (not stepped, its region written by nobody)
				     * until SNAPSHOT_RESUME */
	SKV_MSG_ASSIGN_RESTORED = 33, /* daemon -> engine: struct skv_msg_assign_restored + the
				     * fds of ASSIGN: a stream whose region holds restored KV */
	SKV_MSG_ADMIN_SNAPSHOT = 34, /* admin -> daemon: struct skv_msg_admin_req (stream_id) +
				     * fd: the file to write (the admin's own, opened for writing) */
	SKV_MSG_ADMIN_RESTORE = 35, /* admin -> daemon: struct skv_msg_admin_req + fd: the file */
	SKV_MSG_ADMIN_RESULT = 36,  /* daemon -> admin: struct skv_admin_result */
	SKV_MSG_SNAPSHOT_RESUME = 37, /* daemon -> engine: struct skv_msg_stream: the daemon has
				     * copied the held stream's region; step it again (2.3) */
	SKV_MSG_TYPE_END
};

enum skv_role {
	SKV_ROLE_CLIENT = 1,
	SKV_ROLE_ENGINE = 2,
	SKV_ROLE_ADMIN = 3,
};

struct skv_msg_hdr {
	uint32_t magic;  /* SKV_PROTO_MAGIC */
	uint16_t type;   /* enum skv_msg_type */
	uint16_t flags;  /* zero */
	uint32_t len;    /* bytes of the body that follows */
	uint32_t seq;    /* sender's counter, echoed in replies */
};
_Static_assert(sizeof(struct skv_msg_hdr) == 16, "ABI");

struct skv_msg_hello {
	uint16_t major, minor;
	uint32_t role;       /* enum skv_role */
	uint32_t pid;        /* informational: the daemon trusts SO_PEERCRED, not this */
	uint32_t engine_id;  /* engines started by the daemon: their id; by hand: UINT32_MAX */
	uint32_t node;       /* engines: NUMA node they run on (UINT32_MAX: let the daemon pick) */
	uint32_t reserved[3];
};
_Static_assert(sizeof(struct skv_msg_hello) == 32, "ABI");

/* To engines, with fds [arena of its node, packed weights, doorbell, engine eventfd]. */
struct skv_msg_hello_ok {
	uint16_t major, minor;
	uint32_t role;
	uint64_t instance;      /* random per daemon start: a restarted daemon is a new instance */
	uint32_t engine_id;     /* engines: the id they serve under */
	uint32_t node;          /* engines: their node */
	uint64_t arena_bytes;   /* engines: size of the arena fd */
	uint64_t weights_bytes; /* engines: size of the packed weights fd */
	uint32_t wait_backend;  /* engines: enum skv_wait_backend the daemon asks for */
	uint32_t reserved0;
	char model_path[512];   /* engines: the model to map (NUL-terminated) */
	char tokenizer_path[512]; /* engines: "" = the model's own / next to it */
};
_Static_assert(sizeof(struct skv_msg_hello_ok) == 1072, "ABI");

struct skv_msg_error {
	int32_t code;                 /* -errno or -SKV_E* */
	uint32_t reserved;
	char text[SKV_MSG_TEXT];      /* one line */
};
_Static_assert(sizeof(struct skv_msg_error) == 200, "ABI");

/* Policy and sampling of a stream, as the client asks for them. */
struct skv_stream_params {
	uint32_t policy;       /* enum skv_policy_kind */
	uint32_t evict;        /* enum skv_evict_mode */
	int64_t sink_slots;    /* -1: the policy's default */
	int64_t window_slots;  /* -1: default; dense: the limit; recompute: L */
	uint16_t abs_positions;
	uint16_t kv_dtype;       /* SKV_KV_DTYPE_F32 (or 0) / _F16 / _Q8 (shm/kv-layout.h) */
	float temperature;
	float top_p;
	uint32_t idle_timeout_s; /* close the stream after this long with no traffic (0: the
				  * daemon's --idle-timeout) */
	uint64_t seed;
};
_Static_assert(sizeof(struct skv_stream_params) == 48, "ABI");

struct skv_msg_open {
	struct skv_stream_params params;
	uint32_t flags;
	uint32_t reserved;
};
_Static_assert(sizeof(struct skv_msg_open) == 56, "ABI");

/* Resumable streams: names are NUL-padded, 1..63 bytes of [A-Za-z0-9._-], unique per uid;
 * tokens are SKV_TOKEN_HEX hexadecimal characters (128 random bits), not NUL-terminated. */
#define SKV_STREAM_NAME_MAX 64
#define SKV_TOKEN_HEX 32

struct skv_msg_open_named {
	struct skv_msg_open open;
	char name[SKV_STREAM_NAME_MAX]; /* "": the daemon names it ("s<id>") */
};
_Static_assert(sizeof(struct skv_msg_open_named) == 120, "ABI");

struct skv_msg_attach {
	char name[SKV_STREAM_NAME_MAX];
	char token[SKV_TOKEN_HEX];
	uint32_t flags;                 /* zero */
	uint32_t reserved;
};
_Static_assert(sizeof(struct skv_msg_attach) == 104, "ABI");

struct skv_msg_opened {
	uint64_t stream_id;
	uint32_t engine_id;
	uint32_t node;
	int64_t sink_slots;    /* resolved */
	int64_t window_slots;  /* resolved */
	uint64_t channel_bytes;
	uint64_t kv_bytes;
};
_Static_assert(sizeof(struct skv_msg_opened) == 48, "ABI");

struct skv_msg_opened_named {
	struct skv_msg_opened opened;
	char name[SKV_STREAM_NAME_MAX];
	char token[SKV_TOKEN_HEX];
	uint64_t tokens_seen;           /* ATTACH: where the stream is (its ring state) */
};
_Static_assert(sizeof(struct skv_msg_opened_named) == 152, "ABI");

struct skv_msg_queued {
	uint32_t position;    /* 1: next to be placed */
	uint32_t timeout_ms;  /* the daemon answers within this (ERROR -ETIMEDOUT at worst) */
};
_Static_assert(sizeof(struct skv_msg_queued) == 8, "ABI");

struct skv_msg_stream {
	uint64_t stream_id;
};
_Static_assert(sizeof(struct skv_msg_stream) == 8, "ABI");

struct skv_msg_failed {
	uint64_t stream_id;
	int32_t code;
	uint32_t reserved;
	char text[SKV_MSG_TEXT];
};
_Static_assert(sizeof(struct skv_msg_failed) == 208, "ABI");

struct skv_msg_assign {
	uint64_t stream_id;
	struct skv_stream_params params; /* resolved by the daemon */
	uint64_t region_offset;  /* the stream's KV region in the engine's arena */
	uint64_t region_bytes;
	uint64_t channel_bytes;
};
_Static_assert(sizeof(struct skv_msg_assign) == 80, "ABI");

/* A stream's engine-private state at a request boundary: what the KV region does not hold. */
struct skv_stream_state {
	uint64_t rng;              /* the sampler's xorshift64* state (never 0) */
	int32_t prev_token;        /* the last token fed (decoding its successor needs it) */
	int32_t next_token;        /* the last token sampled, not fed yet (a continuation
				    * with no new text starts from it) */
	uint64_t tokens_generated; /* informational */
	uint64_t tokens_seen;      /* the stream's tokens in all: a recompute stream's region
				    * holds only its window's last L (snapshot format 1.1) */
	uint32_t reserved[8];
};
_Static_assert(sizeof(struct skv_stream_state) == 64, "ABI");

#define SKV_SNAP_NOW 1u /* SNAPSHOT: end the request in progress now (a shutdown) instead of
			 * waiting for it to end */
#define SKV_SNAP_STEP 2u /* SNAPSHOT: a generation in progress is copied at the next step
			  * boundary and goes on (periodic snapshots: restored, the stream is
			  * idle at the last token it had fed) */

struct skv_msg_snapshot {
	uint64_t stream_id;
	uint32_t flags;            /* SKV_SNAP_* */
	uint32_t reserved;
	uint64_t region_bytes;     /* the stream's region, as the daemon knows it */
};
_Static_assert(sizeof(struct skv_msg_snapshot) == 24, "ABI");

struct skv_msg_snapshotted {
	uint64_t stream_id;
	int32_t code;              /* 0 (the stream is held), or why not: -ENOENT, -errno */
	uint32_t reserved;
	uint64_t copy_ns;          /* zero: the daemon copies (2.3) */
	struct skv_stream_state state;
};
_Static_assert(sizeof(struct skv_msg_snapshotted) == 88, "ABI");

struct skv_msg_assign_restored {
	struct skv_msg_assign assign;
	struct skv_stream_state state;
};
_Static_assert(sizeof(struct skv_msg_assign_restored) == 144, "ABI");

struct skv_admin_result {
	int32_t code;              /* 0 or -errno / -SKV_E* */
	uint32_t reserved;
	uint64_t stream_id;        /* snapshot: the stream; restore: the restored stream */
	uint64_t bytes;            /* of the file */
	uint64_t copy_ns;          /* snapshot: the daemon's copy of the region, for which the
				    * stream (and no other) was held */
	uint64_t tokens_seen;
	char name[SKV_STREAM_NAME_MAX]; /* restore: its name (attach with the snapshot's token) */
	char text[SKV_MSG_TEXT];   /* failure: one line */
};
_Static_assert(sizeof(struct skv_admin_result) == 296, "ABI");

/* A summary of the daemon's state, for tests and tools (issue 6 extends what admin tools see). */
struct skv_msg_stats {
	uint64_t instance;
	uint64_t streams;          /* in the stream table (open, closing or failed) */
	uint64_t streams_opened;
	uint64_t streams_closed;
	uint64_t streams_failed;
	uint64_t engine_restarts;
	uint32_t engines;          /* known */
	uint32_t engines_ready;
	uint32_t arenas;
	uint32_t streams_queued;   /* OPENs waiting for room (--admission queue) */
	uint64_t arena_bytes;      /* sum over arenas */
	uint64_t arena_used_bytes; /* KV regions handed out */
	uint64_t arena_largest_free_bytes; /* the largest free extent of any arena */
	int32_t engine_pid[16];    /* pids of the first 16 engines, 0 when not running */
};
_Static_assert(sizeof(struct skv_msg_stats) == 152, "ABI");

/* ---- admin: seeing inside the cache while it serves ------------------------------------
 * An admin peer (HELLO role SKV_ROLE_ADMIN) sends ADMIN_REQ; the daemon answers from its own
 * tables and from the shared state it can read without taking anything an engine waits on (the
 * ring state of each stream in the arena and each engine's statistics block, both behind
 * seqlocks that the daemon retries on a torn read). A listing is a run of rows closed by
 * ADMIN_END; WATCH turns the connection into an event stream (ADMIN_EVENT) until it closes. */

enum skv_admin_what {
	SKV_ADMIN_SERVER = 1,   /* one ADMIN_SERVER */
	SKV_ADMIN_STREAMS = 2,  /* ADMIN_STREAM per stream, then ADMIN_END */
	SKV_ADMIN_STREAM = 3,   /* ADMIN_STREAM of stream_id, its ADMIN_TOKENS (sinks, then the
				 * window oldest first), then ADMIN_END; ERROR if unknown */
	SKV_ADMIN_ARENAS = 4,   /* ADMIN_ARENA per arena, then ADMIN_END */
	SKV_ADMIN_ENGINES = 5,  /* ADMIN_ENGINE per engine, then ADMIN_END */
	SKV_ADMIN_WATCH = 6,    /* ADMIN_EVENT as things happen */
	SKV_ADMIN_HISTOGRAMS = 7, /* one ADMIN_HIST: latency histograms summed over engines */
};

struct skv_msg_admin_req {
	uint32_t what;       /* enum skv_admin_what */
	uint32_t reserved;
	uint64_t stream_id;  /* SKV_ADMIN_STREAM */
};
_Static_assert(sizeof(struct skv_msg_admin_req) == 16, "ABI");

struct skv_admin_server {
	uint64_t instance;
	double uptime_s;
	uint32_t pid;
	uint16_t proto_major, proto_minor;
	uint32_t engines, engines_ready;
	uint32_t arenas;
	uint32_t streams_queued;      /* OPENs waiting in the admission queue */
	uint64_t streams;             /* in the table now */
	uint64_t streams_opened, streams_closed, streams_failed;
	uint64_t engine_restarts;
	uint64_t arena_bytes, arena_used_bytes;
	uint64_t tokens_generated;    /* over the engines' lives, from their statistics */
	uint64_t prompt_tokens;
	uint64_t tokens_evicted;      /* over all streams, closed ones included */
	uint64_t wake_syscalls;       /* engines' wake-ups that needed a system call */
	uint64_t steps;               /* engines' forward steps */
	char version[32];
	char model_path[256];
	char socket_path[108];
	uint32_t reserved1;
};
_Static_assert(sizeof(struct skv_admin_server) == 536, "ABI");

enum skv_admin_stream_state {
	SKV_ADMIN_STREAM_OPEN = 1,
	SKV_ADMIN_STREAM_CLOSING = 2,  /* closed by its client; the engine has not let go yet */
	SKV_ADMIN_STREAM_FAILED = 3,   /* its engine died; waits for the client to close it */
};

enum skv_admin_engine_state {
	SKV_ADMIN_ENGINE_NONE = 0,
	SKV_ADMIN_ENGINE_STARTING = 1,
	SKV_ADMIN_ENGINE_READY = 2,
	SKV_ADMIN_ENGINE_LOST = 3,     /* connection dropped, process not yet gone */
	SKV_ADMIN_ENGINE_EXITED = 4,
};

struct skv_admin_stream {
	uint64_t id;
	uint32_t engine;
	int32_t node;
	uint32_t client_pid;      /* 0 once the client is gone */
	uint32_t state;           /* enum skv_admin_stream_state */
	uint32_t policy;          /* enum skv_policy_kind */
	uint32_t evict;
	int64_t sink_slots, window_slots;
	uint32_t sink_fill, window_fill;
	uint64_t tokens_seen, tokens_evicted;
	uint64_t window_start;    /* absolute position of the oldest window token */
	uint32_t ring_head;       /* slot of the oldest window token */
	uint16_t abs_positions;
	uint16_t kv_dtype;        /* SKV_KV_DTYPE_* */
	uint64_t kv_bytes;
	double age_s;
	double tokens_per_s;      /* tokens appended per second since the previous listing */
};
_Static_assert(sizeof(struct skv_admin_stream) == 112, "ABI");

#define SKV_ADMIN_TOKENS_MAX 256
struct skv_admin_tokens {
	uint64_t stream_id;
	uint32_t part;            /* 0: sinks, 1: window (oldest first) */
	uint32_t offset;          /* index of ids[0] within the part */
	uint32_t n;               /* ids in this chunk */
	uint32_t total;           /* ids in the part */
	uint64_t first_pos;       /* absolute position of the part's first token */
	int32_t ids[SKV_ADMIN_TOKENS_MAX];
};
_Static_assert(sizeof(struct skv_admin_tokens) == 32 + 4 * SKV_ADMIN_TOKENS_MAX, "ABI");

struct skv_admin_arena {
	uint32_t index;
	int32_t node;
	uint32_t backing;         /* SKV_ARENA_BACKING_* */
	uint32_t flags;
	uint64_t page_bytes, bytes, used_bytes, free_bytes, largest_free_bytes;
	uint64_t live_allocs, free_extents, failed_allocs;
	uint32_t size_classes_used; /* classes with live allocations */
	uint32_t reserved;
	char backing_desc[320];
};
_Static_assert(sizeof(struct skv_admin_arena) == 408, "ABI");

struct skv_admin_engine {
	uint32_t id;
	uint32_t pid;             /* 0 when not running */
	int32_t node;
	uint32_t state;           /* enum skv_admin_engine_state */
	uint32_t supervised;
	uint32_t streams;
	uint32_t restarts;
	uint32_t last_batch_rows;
	uint64_t steps, tokens_generated, prompt_tokens, rows;
	uint64_t wake_syscalls;
	double tokens_per_s;      /* generated per second since the previous listing */
	char cpus[32];
};
_Static_assert(sizeof(struct skv_admin_engine) == 112, "ABI");

/* Time to first token and inter-token latency as the engines measure them (request taken ->
 * first token emitted; token -> next token of the same request), summed over the running
 * engines. Bucket upper bounds: SKV_HIST_BOUNDS_S in shm/channel.h (last: +Inf); counts are
 * per bucket, not cumulative. */
struct skv_admin_hist {
	uint64_t ttft_bucket[16];
	uint64_t ttft_count, ttft_sum_ns;
	uint64_t itl_bucket[16];
	uint64_t itl_count, itl_sum_ns;
};
_Static_assert(sizeof(struct skv_admin_hist) == 288, "ABI");

struct skv_admin_end {
	uint64_t count;           /* rows sent */
};
_Static_assert(sizeof(struct skv_admin_end) == 8, "ABI");

enum skv_admin_event_type {
	SKV_EVENT_OPEN = 1,
	SKV_EVENT_CLOSE = 2,
	SKV_EVENT_FAIL = 3,
	SKV_EVENT_EVICT = 4,      /* a stream started evicting, or evicted more (arg = evicted) */
	SKV_EVENT_ENGINE_START = 5,
	SKV_EVENT_ENGINE_EXIT = 6,
};

struct skv_admin_event {
	uint32_t type;
	uint32_t engine;
	uint64_t stream_id;
	uint64_t arg;
	double time_s;            /* CLOCK_REALTIME */
	char text[96];
};
_Static_assert(sizeof(struct skv_admin_event) == 128, "ABI");

/* The daemon's default socket: $XDG_RUNTIME_DIR/streamkv/cached.sock, or, without
 * XDG_RUNTIME_DIR, /tmp/streamkv-<uid>/cached.sock. Returns 0 or -ENAMETOOLONG. */
int skv_default_socket_path(char *buf, size_t len);

/* Connect a SOCK_SEQPACKET socket (close-on-exec, blocking) to path: the fd, or -errno
 * (-ENAMETOOLONG for a path that does not fit sockaddr_un). */
int skv_msg_connect(const char *path);

/* Body size of each type; 0 for unknown types. */
size_t skv_msg_body_size(uint16_t type);
const char *skv_msg_name(uint16_t type);

/* Send one message with up to SKV_MSG_MAX_FDS fds. Returns 0 or -errno (-EPIPE: peer gone). */
int skv_msg_send(int sock, uint16_t type, uint32_t seq, const void *body, const int *fds,
		 int n_fds);

/* Receive one message into hdr and body (body_cap bytes). Received fds go to fds[] (up to
 * SKV_MSG_MAX_FDS, *n_fds set; any beyond are closed). Validates magic, type, and that len is
 * exactly the type's body size. Returns 1 for a message, 0 on orderly hang-up, -EAGAIN if
 * non-blocking and nothing is there, -SKV_EFORMAT / -SKV_EVERSION for a bad message (fds
 * received with it are closed), other -errno. */
int skv_msg_recv(int sock, struct skv_msg_hdr *hdr, void *body, size_t body_cap, int *fds,
		 int *n_fds);

#endif
