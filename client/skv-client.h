/* libskv: the thin client of streamkv.
 *
 * Connect to skv-cached over its Unix socket, open streams (a cache policy and sampling
 * settings each), send prompts and read what the engine produces, as it comes. Tokens travel
 * through shared memory between this process and the engine serving the stream (a channel of
 * two rings); the socket only carries control: opening, closing, and the daemon telling us that
 * a stream failed (its engine died). A busy stream makes no system call per token: this side
 * sleeps only when nothing is there, and the engine rings it only then.
 *
 * Every function returns >= 0 or a negative error (-errno or -SKV_E*, see skv_strerror());
 * functions that can fail for a reason a user must read fill msg (may be NULL) with one line.
 * A dead daemon gives -ECONNREFUSED/-ENOENT at connect and -EPIPE later, never a hang.
 *
 * Thread safety: a client and its streams belong to one thread. */
#ifndef SKV_CLIENT_H
#define SKV_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "channel.h"
#include "proto.h"

struct skv_client;
struct skv_client_stream;

/* socket_path NULL: the daemon's default (skv_default_socket_path). */
int skv_client_connect(const char *socket_path, struct skv_client **out, char *msg,
		       size_t msg_len);
/* Closes every stream of the client too. Accepts NULL. */
void skv_client_disconnect(struct skv_client *c);

/* Fill params with the defaults: sink policy, default sinks and window, per-token eviction,
 * greedy sampling. */
void skv_client_params_default(struct skv_stream_params *params);

/* Open a stream. Errors: the daemon's refusal (-EINVAL bad parameters, -ENOSPC arena full,
 * -EAGAIN no engine ready), -EPIPE daemon gone; msg says which. */
int skv_client_stream_open(struct skv_client *c, const struct skv_stream_params *params,
			   struct skv_client_stream **out, char *msg, size_t msg_len);

/* What the daemon resolved: sinks and window (the policy's defaults filled in), KV bytes. */
void skv_client_stream_info(const struct skv_client_stream *s, int64_t *sink_slots,
			    int64_t *window_slots, uint64_t *kv_bytes);

/* Send text and then a request: SKV_CHAN_GENERATE (arg = tokens to generate) or
 * SKV_CHAN_SCORE (arg = most predictions, 0 = all). Waits for room in the input ring when the
 * engine is behind. Errors: -EPIPE (the stream failed or the daemon went away; msg says why). */
int skv_client_stream_request(struct skv_client_stream *s, const char *text, size_t len,
			      uint32_t type, uint64_t arg, char *msg, size_t msg_len);

/* The same with request flags (SKV_GEN_IGNORE_BOS for GENERATE). */
int skv_client_stream_request_flags(struct skv_client_stream *s, const char *text, size_t len,
				    uint32_t type, uint64_t arg, uint32_t flags, char *msg,
				    size_t msg_len);

/* Next message from the engine (SKV_CHAN_TOKEN, ECHO, DONE, SCORED, ERROR). Waits up to
 * timeout_ns (< 0: no limit). Returns 1 with *out filled, 0 on timeout, -EPIPE when the stream
 * failed or the daemon went away (msg says why). */
int skv_client_stream_next(struct skv_client_stream *s, struct skv_chan_msg *out,
			   int64_t timeout_ns, char *msg, size_t msg_len);

/* Ask the daemon for a summary of its state (streams, engines, arena use). */
int skv_client_stats(struct skv_client *c, struct skv_msg_stats *out, char *msg, size_t msg_len);

/* Close a stream: the daemon drops it from its engine and frees its KV. Accepts NULL. */
void skv_client_stream_close(struct skv_client_stream *s);

#endif
