/* A stream: one never-ending sequence of tokens under a cache policy.
 *
 * Policies (StreamingLLM and the paper's baselines):
 *   sink       S attention sinks (default 4) + a rolling window of W slots (default: the
 *              trained length minus S); positions inside the cache.
 *   window     the same ring with no sinks (S = 0, default W = trained length).
 *   dense      no eviction: the cache grows to a limit (default SKV_DENSE_DEFAULT_LIMIT), then
 *              appending fails with -SKV_ECACHEFULL.
 *   recompute  sliding window with re-computation: every token re-runs the model over the
 *              last L tokens (default L = trained length) from an empty cache, at positions
 *              0..L-1. Quality of a fresh window, cost O(L) rows per token.
 * Eviction modes for sink and window: per token (the window slides one token per token, as in
 * the paper's perplexity runs) or per prompt (skv_stream_make_room frees room for a whole prompt
 * plus its answer in one step, as in the paper's chat demo; tokens beyond that room still evict
 * one by one).
 *
 * A step of a sink/window/dense stream attends to at most S + W keys, its own included: the
 * token takes its window slot before it attends. (The paper's script trims the cache after the
 * step, so its steps attend to one key more.)
 *
 * Local streams own a private anonymous mapping laid out as shm/kv-layout.h describes; pages
 * are touched only as slots fill, so a dense stream's memory grows with its length.
 *
 * Thread safety: a stream belongs to the thread of its runner. */
#ifndef SKV_STREAM_H
#define SKV_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "forward.h"

#define SKV_DEFAULT_SINKS 4
#define SKV_DENSE_DEFAULT_LIMIT 16384

enum skv_policy_kind {
	SKV_POLICY_SINK = 0,
	SKV_POLICY_WINDOW = 1,
	SKV_POLICY_DENSE = 2,
	SKV_POLICY_RECOMPUTE = 3,
};

enum skv_evict_mode {
	SKV_EVICT_TOKEN = 0,
	SKV_EVICT_PROMPT = 1,
};

struct skv_policy {
	enum skv_policy_kind kind;
	int64_t sink_slots;     /* -1: the policy's default */
	int64_t window_slots;   /* -1: default; for dense: the limit; for recompute: L */
	enum skv_evict_mode evict;
	int abs_positions;      /* ablation for sink: sinks see absolute positions */
	uint32_t kv_dtype;      /* SKV_KV_DTYPE_F32 (0 means it too), _F16 or _Q8 */
};

/* The defaults: sink policy, 4 sinks, default window, per-token eviction. */
void skv_policy_default(struct skv_policy *p);

/* "sink", "window", "dense", "recompute" -> kind; -EINVAL otherwise. */
int skv_policy_parse(const char *name, enum skv_policy_kind *kind);
const char *skv_policy_name(enum skv_policy_kind kind);

/* Fill in defaults from the model and check the combination; -SKV_EINVAL_POLICY with a message
 * (sinks with window or dense, a zero or negative window, sizes beyond the layout's limits, an
 * unknown KV dtype). */
int skv_policy_resolve(struct skv_policy *p, int32_t trained_len, char *msg, size_t msg_len);

struct skv_stream;

/* The policy must be resolved. Errors: -ENOMEM, -SKV_EINVAL_POLICY. */
int skv_stream_new(struct skv_runner *r, const struct skv_policy *policy,
		   struct skv_stream **out, char *msg, size_t msg_len);
void skv_stream_free(struct skv_stream *s); /* accepts NULL */

/* A stream over a KV region someone else laid out (the daemon, in a shared arena): region
 * starts with a descriptor that must match what the policy and the model need (checked on a
 * private copy, against region_bytes). fresh: reset the ring state (a new stream); else keep
 * it. The region is not freed with the stream. Errors: -SKV_EFORMAT, -SKV_EVERSION,
 * -SKV_ESHAPE (msg says which field), -SKV_EINVAL_POLICY, -ENOMEM. */
int skv_stream_new_at(struct skv_runner *r, const struct skv_policy *policy, void *region,
		      uint64_t region_bytes, int fresh, struct skv_stream **out, char *msg,
		      size_t msg_len);

/* Describe n tokens of s as one item of a batched skv_forward (the engine's continuous
 * batching). -ENOTSUP for recompute streams, which run alone through skv_stream_feed. */
int skv_stream_item(struct skv_stream *s, const int32_t *tokens, uint32_t n, float *logits,
		    struct skv_fwd_item *item);

/* Feed tokens in order. logits (may be NULL) receives the logits after the last token; with
 * all_logits non-NULL, all_logits receives [n][vocab] (one row per token, for evaluation).
 * Long inputs are split into chunks of the runner's max_rows. Errors: those of skv_forward;
 * on -SKV_ECACHEFULL (dense limit) the tokens before the failing chunk stay fed. */
int skv_stream_feed(struct skv_stream *s, const int32_t *tokens, size_t n, float *logits,
		    float *all_logits);

/* Recompute streams keep the token ids of their window (the last L fed) in the stream, not in
 * the KV region, whose planes are scratch that every token re-runs from them. So that a copy of
 * the region is the whole stream (a snapshot), skv_stream_save_window writes them into the
 * region as a window region holds its tokens: token ids of slots 0..n-1, ring state n tokens
 * seen, none evicted (n = min(tokens seen, L)), which is what the planes hold after the last
 * re-run anyway. A stream made with skv_stream_new_at(fresh = 0) reads them back; its total
 * count (the region says n) comes from skv_stream_restore_count. Only at a request or step
 * boundary (nothing fed half-way). Both do nothing for other policies (restore_count returns
 * 0); restoring a count below the region's n is -EINVAL. A region whose ring or ids are out of
 * range makes skv_stream_new_at fail with -SKV_EFORMAT. */
void skv_stream_save_window(struct skv_stream *s);
int skv_stream_restore_count(struct skv_stream *s, uint64_t tokens_seen);

/* Per-prompt eviction: evict the oldest window tokens so that n more fit without per-token
 * eviction (all of the window if n exceeds it). A no-op for dense, recompute, and
 * per-token mode. Returns the number of tokens evicted. */
uint64_t skv_stream_make_room(struct skv_stream *s, uint64_t n);

const struct skv_policy *skv_stream_policy(const struct skv_stream *s);
uint64_t skv_stream_tokens_seen(const struct skv_stream *s);
/* The stream's KV state (sink/window/dense), or NULL for recompute. */
const struct skv_seq *skv_stream_seq(const struct skv_stream *s);
/* Bytes of KV memory the stream holds (region size; for recompute its scratch region). */
uint64_t skv_stream_kv_bytes(const struct skv_stream *s);

#endif
