/* libskv: the client library of streamkv.
 *
 * Connect to skv-cached over its Unix socket, open streams (a cache policy and sampling
 * settings each), send prompts and receive tokens as the engine produces them. Tokens travel
 * through shared memory between this process and the engine serving the stream; the socket
 * carries only control (open, close, the daemon saying a stream failed). A busy stream makes no
 * system call per token: a waiting caller spins briefly before it sleeps, and an engine rings a
 * client only when it sleeps, once for all of the client's streams that moved.
 *
 * Three ways to receive, to mix as you like:
 *   - blocking: skv_client_stream_read() (one stream) or skv_client_wait() (any stream);
 *   - callback: skv_client_stream_run() delivers one request's events to a function;
 *   - event loop: poll skv_client_fd() for POLLIN, then read every stream with timeout 0.
 *
 * Errors: every call that can fail returns a negative errno-style code (-errno or -SKV_E*);
 * skv_strerror() names it, and skv_client_last_error() gives the one-line reason of the latest
 * failure on that client. A dead daemon gives -ECONNREFUSED or -ENOENT at connect and -EPIPE
 * after, never a hang; a stream whose engine died gives -EPIPE on that stream only, or, for
 * a resumable stream the daemon restored from its snapshot (skv-cached --state-dir with
 * --snapshot-interval), -SKV_ERESTORED: skv_client_last_error() names the token it was
 * restored at; close the handle and attach to it again to continue from there.
 *
 * Thread safety: a client and its streams belong to one thread at a time. Use one client per
 * thread to read from several threads.
 *
 * Compile and link: pkg-config --cflags --libs libskv */
#ifndef SKV_CLIENT_H
#define SKV_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SKV_CLIENT_API 1
#define SKV_CLIENT_API_MINOR 1 /* 1.1: resumable streams */

typedef struct skv_client skv_client;
typedef struct skv_client_stream skv_client_stream;
typedef struct skv_client_opts skv_client_opts;

/* The name of an error code returned by any libskv call (also errno values, negated). */
const char *skv_strerror(int err);

/* ---- connection ---------------------------------------------------------------------------- */

/* socket_path NULL: the daemon's default ($XDG_RUNTIME_DIR/streamkv/cached.sock, else
 * /tmp/streamkv-$UID/cached.sock). On failure, errbuf (may be NULL) receives one line saying
 * why. */
int skv_client_connect(const char *socket_path, skv_client **out, char *errbuf, size_t errlen);

/* Closes every stream of the client and the connection. NULL is fine. */
void skv_client_disconnect(skv_client *c);

/* The one-line reason for the latest failed call on c or one of its streams ("" if none). */
const char *skv_client_last_error(const skv_client *c);

/* An fd for event loops: it polls readable (POLLIN) when a stream of c may have events or the
 * daemon sent something (then read each stream with timeout 0, or call skv_client_wait with
 * timeout 0). It stays readable until the ready events are read. Owned by c. */
int skv_client_fd(skv_client *c);

/* Wait up to timeout_ms (< 0: no limit; 0: do not block) for any stream of c with a request
 * in progress to have an event (or to have failed). Returns 1 and that stream in *ready, 0 on
 * timeout, or an error (-EPIPE: the daemon went away). Streams are served in turn. */
int skv_client_wait(skv_client *c, skv_client_stream **ready, int timeout_ms);

/* The daemon's state. */
struct skv_client_stats {
	uint64_t streams;          /* open in the daemon, all clients */
	uint64_t streams_opened;   /* since it started */
	uint64_t streams_queued;   /* waiting for room (--admission queue) */
	uint32_t engines;
	uint32_t engines_ready;
	uint64_t arena_bytes;      /* KV arenas, all nodes */
	uint64_t arena_used_bytes;
	int32_t engine_pid[16];    /* the first 16 engines' pids (0: not running) */
	uint64_t reserved[8];
};
int skv_client_stats(skv_client *c, struct skv_client_stats *out);

/* ---- stream options ------------------------------------------------------------------------ */

enum skv_client_policy {
	SKV_CLIENT_SINK = 0,      /* StreamingLLM: attention sinks + a rolling window (default) */
	SKV_CLIENT_WINDOW = 1,    /* a rolling window only (no sinks) */
	SKV_CLIENT_DENSE = 2,     /* keep everything, up to a limit */
	SKV_CLIENT_RECOMPUTE = 3, /* sliding window with re-computation (slow baseline) */
};

enum skv_client_evict {
	SKV_CLIENT_EVICT_TOKEN = 0,  /* evict the oldest window token as each new one comes */
	SKV_CLIENT_EVICT_PROMPT = 1, /* free room for a whole prompt and its answer at once */
};

/* Defaults: sink policy, the daemon's default sinks (4) and window, per-token eviction,
 * positions inside the cache, greedy sampling (temperature 0), top-p 0.9, seed 0. */
int skv_client_opts_new(skv_client_opts **out);
void skv_client_opts_free(skv_client_opts *o);
/* Each setter returns 0 or -EINVAL for a value out of range (the daemon checks the rest). */
int skv_client_opts_policy(skv_client_opts *o, enum skv_client_policy policy);
/* Parse a policy name: "sink", "window", "dense" or "recompute". */
int skv_client_opts_policy_name(skv_client_opts *o, const char *name);
int skv_client_opts_sinks(skv_client_opts *o, int64_t sinks);   /* -1: the default */
int skv_client_opts_window(skv_client_opts *o, int64_t window); /* -1: the default */
int skv_client_opts_evict(skv_client_opts *o, enum skv_client_evict evict);
/* Keep absolute positions instead of positions inside the cache (an ablation). */
int skv_client_opts_abs_positions(skv_client_opts *o, int on);

enum skv_client_kv {
	SKV_CLIENT_KV_F32 = 1,    /* float32 keys and values (default; exact) */
	SKV_CLIENT_KV_F16 = 2,    /* half precision: half the memory and half the memory traffic
				   * of attention, results within rounding of float32 */
	SKV_CLIENT_KV_Q8 = 3,     /* int8 with a float32 scale per slot and kv head: about a
				   * quarter of float32's bytes (head_size + 4 per head and slot) */
};
int skv_client_opts_kv(skv_client_opts *o, enum skv_client_kv kv);
/* temperature 0: greedy; top_p in (0, 1]: nucleus sampling when temperature > 0. */
int skv_client_opts_sampling(skv_client_opts *o, float temperature, float top_p, uint64_t seed);
/* Close the stream after this many seconds with no traffic either way (0: the daemon's
 * --idle-timeout); the stream then fails with -ETIMEDOUT. */
int skv_client_opts_idle_timeout(skv_client_opts *o, uint32_t seconds);

/* ---- streams ------------------------------------------------------------------------------- */

/* o NULL: the defaults. Errors: -EINVAL bad options, -ENOSPC no room in the KV arena (or the
 * daemon's stream limit; with --admission queue the call waits instead, up to the daemon's
 * queue time-out: -ETIMEDOUT), -EPIPE daemon gone. */
int skv_client_stream_open(skv_client *c, const skv_client_opts *o, skv_client_stream **out);

/* Closes the stream; the daemon frees its KV at once. NULL is fine. */
void skv_client_stream_close(skv_client_stream *s);

struct skv_client_stream_info {
	uint64_t id;            /* the daemon's stream id (skv-admin shows it) */
	int64_t sinks;          /* resolved */
	int64_t window;         /* resolved: window slots (dense: its limit) */
	uint64_t kv_bytes;      /* the stream's KV region */
	uint64_t reserved[4];
};
void skv_client_stream_info(const skv_client_stream *s, struct skv_client_stream_info *out);

/* ---- resumable streams (libskv 1.1) ----------------------------------------------------
 * A resumable stream outlives its connection: when the client disconnects, dies or calls
 * skv_client_stream_detach, the daemon keeps it (its KV, and the tokens it produced that were
 * not read yet) for the stream's idle time-out, else the daemon's --detach-timeout (default an
 * hour). Any connection of the same uid (or root) that presents its name and its token
 * attaches to it and continues exactly where it was: the events of requests still in
 * progress are read on the new handle (skv_client_stream_pending counts them), and a prompt
 * the old client was in the middle of sending is dropped. A stream is attached to one
 * connection at a time. The token is a secret: keep it like a password (mode 0600 file).
 * skv_client_stream_close() on a resumable stream ends it for good. */
#define SKV_CLIENT_NAME_MAX 64   /* a name: 1..63 of A-Z a-z 0-9 . _ - */
#define SKV_CLIENT_TOKEN_MAX 33  /* 32 hexadecimal digits and a NUL */

/* Make streams opened with o resumable, under name (NULL or "": the daemon names it "s<id>").
 * Names are unique per uid: opening a second stream of the same name fails with -EEXIST.
 * Returns -EINVAL for a name that is too long or has other characters. */
int skv_client_opts_resumable(skv_client_opts *o, const char *name);

struct skv_client_resume {
	char name[SKV_CLIENT_NAME_MAX];
	char token[SKV_CLIENT_TOKEN_MAX];
	uint64_t id;            /* the daemon's stream id */
	uint64_t tokens_seen;   /* after attach: tokens in the stream when it was attached */
	uint64_t reserved[4];
};
/* The name and token of a resumable stream (-EINVAL if s is not resumable). */
int skv_client_stream_resume_info(const skv_client_stream *s, struct skv_client_resume *out);
/* Attach to the resumable stream name with its token. Errors: -ENOENT no such stream of
 * yours with that token (or it timed out), -EBUSY attached to another connection, -EPIPE it
 * ended (its engine died), -EINVAL malformed name or token. */
int skv_client_stream_attach(skv_client *c, const char *name, const char *token,
			     skv_client_stream **out);
/* Leave a resumable stream to the daemon and free the handle s (also on error). Requests in
 * progress go on until the output ring is full. */
int skv_client_stream_detach(skv_client_stream *s);

/* Flags of skv_client_stream_generate. */
#define SKV_CLIENT_ENDLESS 1u /* do not stop at the end-of-text token: stream on */
#define SKV_CLIENT_SPECIAL 2u /* special tokens in the prompt ("<|im_end|>", "</s>") are
                               * encoded as their ids, as a rendered chat template needs */

/* Send a prompt (len bytes, may be 0 to continue from the last token) and ask for up to
 * max_tokens tokens after it (0: only feed the prompt into the cache). Requests queue: several can be sent before reading. Waits for
 * room in the stream's input ring when the engine is behind. */
int skv_client_stream_generate(skv_client_stream *s, const char *prompt, size_t len,
			       uint64_t max_tokens, unsigned flags);

/* Feed text and score it: the summed negative log-likelihood of each token given the ones
 * before (max_predictions 0: all). Ends with an SKV_CLIENT_EV_SCORED event. */
int skv_client_stream_score(skv_client_stream *s, const char *text, size_t len,
			    uint64_t max_predictions);

/* Cancel every request sent so far: the one in progress stops after its current step and ends
 * with SKV_CLIENT_EV_DONE of reason SKV_CLIENT_DONE_CANCELLED, as do queued ones. The stream
 * stays open: what was fed stays in its cache. */
int skv_client_stream_cancel(skv_client_stream *s);

enum skv_client_event_type {
	SKV_CLIENT_EV_TOKEN = 1,  /* a generated token: token, text (may be empty) */
	SKV_CLIENT_EV_PROMPT = 2, /* a prompt token as the engine read it: token, text */
	SKV_CLIENT_EV_DONE = 3,   /* a generate request ended: count tokens, reason */
	SKV_CLIENT_EV_SCORED = 4, /* a score request ended: count predictions, nll sum */
	SKV_CLIENT_EV_ERROR = 5,  /* a request failed: error, text (the stream stays usable) */
};

enum skv_client_done_reason {
	SKV_CLIENT_DONE_LENGTH = 0,    /* max_tokens generated */
	SKV_CLIENT_DONE_EOS = 1,       /* the model ended the text */
	SKV_CLIENT_DONE_CANCELLED = 2, /* skv_client_stream_cancel */
};

struct skv_client_event {
	enum skv_client_event_type type;
	int32_t token;       /* TOKEN, PROMPT */
	int error;           /* ERROR: the code */
	int reason;          /* DONE: enum skv_client_done_reason */
	uint64_t count;      /* DONE: tokens generated; SCORED: predictions */
	double nll;          /* SCORED: summed negative log-likelihood (nats) */
	const char *text;    /* TOKEN, PROMPT, ERROR: bytes (not NUL-terminated for tokens),
			      * valid until the next call on this stream */
	size_t len;
};

/* The next event of the stream, waiting up to timeout_ms (< 0: no limit; 0: do not block).
 * Returns 1 with *ev filled, 0 on timeout, or the error that ended the stream, for good:
 * -EPIPE its engine or the daemon went away, -ETIMEDOUT the daemon's idle time-out closed it,
 * -SKV_EFORMAT its channel was corrupted (skv_client_last_error says why). The stream must
 * still be closed. Other streams are not affected. */
int skv_client_stream_read(skv_client_stream *s, struct skv_client_event *ev, int timeout_ms);

/* Deliver the events of the request in progress to fn until it ends (DONE, SCORED or ERROR,
 * also delivered). fn returns 0 to go on; anything else stops and is returned (the request
 * goes on unless fn cancelled it). Returns 0 when the request ended, or an error. */
typedef int (*skv_client_event_fn)(skv_client_stream *s, const struct skv_client_event *ev,
				   void *arg);
int skv_client_stream_run(skv_client_stream *s, skv_client_event_fn fn, void *arg);

/* libskv 1.2: the tokens in the stream's history (every prompt token fed and every token
 * generated, evicted ones included) as of the last DONE event read on s, or of its attach.
 * 0, -ENODATA before either (or from an engine that does not say), -EINVAL. A conversation
 * that records it after each answer can tell, when it attaches again, whether the stream came
 * back from an older snapshot (fewer tokens than it left). */
int skv_client_stream_tokens(const skv_client_stream *s, uint64_t *out);

/* Requests sent on s whose end event has not been read yet. */
uint64_t skv_client_stream_pending(const skv_client_stream *s);

#ifdef __cplusplus
}
#endif

#endif
