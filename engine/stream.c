#include "stream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "model.h"
#include "skv-error.h"

struct skv_stream {
	struct skv_runner *runner;
	struct skv_policy policy;
	struct skv_seq seq;          /* sink/window/dense: the stream's cache; recompute: scratch */
	void *region;                /* the KV region; its ring state lives inside it */
	size_t region_bytes;
	int owns_region;             /* local streams map their own; engines get an arena's */
	uint64_t tokens_seen;        /* recompute keeps its own count; others read the ring */
	int32_t *history;            /* recompute: the last L tokens, a ring of [L] */
	uint64_t history_len;
};

static const char *const stream_policy_names[] = {
	[SKV_POLICY_SINK] = "sink",
	[SKV_POLICY_WINDOW] = "window",
	[SKV_POLICY_DENSE] = "dense",
	[SKV_POLICY_RECOMPUTE] = "recompute",
};

void skv_policy_default(struct skv_policy *p)
{
	memset(p, 0, sizeof(*p));
	p->kind = SKV_POLICY_SINK;
	p->sink_slots = -1;
	p->window_slots = -1;
	p->evict = SKV_EVICT_TOKEN;
}

int skv_policy_parse(const char *name, enum skv_policy_kind *kind)
{
	for (size_t i = 0; i < sizeof(stream_policy_names) / sizeof(*stream_policy_names); i++)
		if (!strcmp(name, stream_policy_names[i])) {
			*kind = (enum skv_policy_kind)i;
			return 0;
		}
	return -EINVAL;
}

const char *skv_policy_name(enum skv_policy_kind kind)
{
	if ((unsigned)kind >= sizeof(stream_policy_names) / sizeof(*stream_policy_names))
		return "unknown";
	return stream_policy_names[kind];
}

int skv_policy_resolve(struct skv_policy *p, int32_t trained_len, char *msg, size_t msg_len)
{
	const char *name = skv_policy_name(p->kind);
	if (trained_len < 1)
		trained_len = 512;
	switch (p->kind) {
	case SKV_POLICY_SINK:
		if (p->sink_slots < 0)
			p->sink_slots = SKV_DEFAULT_SINKS;
		if (p->window_slots < 0)
			p->window_slots = trained_len > p->sink_slots ? trained_len - p->sink_slots
								      : 1;
		break;
	case SKV_POLICY_WINDOW:
		if (p->sink_slots > 0)
			return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY,
					  "policy window keeps no sinks (got --sink %lld); use "
					  "--policy sink",
					  (long long)p->sink_slots);
		p->sink_slots = 0;
		if (p->window_slots < 0)
			p->window_slots = trained_len;
		break;
	case SKV_POLICY_DENSE:
	case SKV_POLICY_RECOMPUTE:
		if (p->sink_slots > 0)
			return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY,
					  "policy %s keeps no sinks (got --sink %lld)", name,
					  (long long)p->sink_slots);
		p->sink_slots = 0;
		if (p->window_slots < 0)
			p->window_slots = p->kind == SKV_POLICY_DENSE ? SKV_DENSE_DEFAULT_LIMIT
								      : trained_len;
		break;
	default:
		return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY, "unknown policy %d",
				  (int)p->kind);
	}
	if (p->window_slots < 1)
		return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY,
				  "policy %s needs a window of at least 1 token (got %lld)", name,
				  (long long)p->window_slots);
	if ((uint64_t)p->sink_slots + (uint64_t)p->window_slots > SKV_KV_MAX_SLOTS)
		return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY,
				  "policy %s: %lld sinks + %lld window slots exceed the limit of %u",
				  name, (long long)p->sink_slots, (long long)p->window_slots,
				  SKV_KV_MAX_SLOTS);
	if (!p->kv_dtype)
		p->kv_dtype = SKV_KV_DTYPE_F32;
	if (!skv_kv_dtype_bytes(p->kv_dtype))
		return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY,
				  "unknown KV element type %u (f32, f16 or q8)", p->kv_dtype);
	return 0;
}

void skv_stream_free(struct skv_stream *s)
{
	if (!s)
		return;
	if (s->region && s->owns_region)
		munmap(s->region, s->region_bytes);
	free(s->history);
	free(s);
}

/* A restored recompute stream: its window's token ids as skv_stream_save_window left them in
 * the region (written by another process: the ring copied once, every id checked). */
static int stream_load_window(struct skv_stream *s)
{
	struct skv_kv_ring ring = *s->seq.ring;
	uint64_t L = (uint64_t)s->policy.window_slots;
	int32_t vocab = skv_runner_config(s->runner)->vocab_size;
	if (ring.tokens_seen > L || ring.window_start || ring.tokens_evicted || (ring.seq & 1))
		return -SKV_EFORMAT;
	const int32_t *ids = skv_kv_region_tokens(s->region, &s->seq.desc);
	for (uint64_t i = 0; i < ring.tokens_seen; i++) {
		int32_t id = ids[i];
		if (id < 0 || id >= vocab)
			return -SKV_EFORMAT;
		s->history[i] = id;
	}
	s->history_len = s->tokens_seen = ring.tokens_seen;
	return 0;
}

/* Common to both constructors: s->region holds a validated descriptor. */
static int stream_setup(struct skv_stream *s, int reset_ring)
{
	const struct skv_policy *policy = &s->policy;
	memcpy(&s->seq.desc, s->region, sizeof(s->seq.desc));
	s->seq.kv_base = s->region;
	s->seq.ring = skv_kv_region_ring(s->region);
	s->seq.allow_evict = policy->kind == SKV_POLICY_SINK || policy->kind == SKV_POLICY_WINDOW;
	s->seq.abs_positions = (uint32_t)policy->abs_positions;
	if (reset_ring)
		skv_kv_ring_reset(s->seq.ring, &s->seq.desc);
	if (policy->kind == SKV_POLICY_RECOMPUTE) {
		s->history = calloc((size_t)policy->window_slots, sizeof(*s->history));
		if (!s->history)
			return -ENOMEM;
		if (!reset_ring)
			return stream_load_window(s);
	}
	return 0;
}

static int stream_shape(const struct skv_runner *r, const struct skv_policy *policy,
			struct skv_kv_desc *desc, char *msg, size_t msg_len)
{
	const struct skv_model_config *c = skv_runner_config(r);
	int err = skv_kv_layout_init_dtype(desc, (uint32_t)c->n_layers, (uint32_t)c->n_kv_heads,
					   (uint32_t)c->head_size, (uint32_t)policy->sink_slots,
					   (uint32_t)policy->window_slots,
					   policy->kv_dtype ? policy->kv_dtype : SKV_KV_DTYPE_F32);
	if (err < 0)
		return skv_errorf(msg, msg_len, -SKV_EINVAL_POLICY,
				  "cannot lay out %lld sinks + %lld window slots: %s",
				  (long long)policy->sink_slots, (long long)policy->window_slots,
				  skv_strerror(err));
	return 0;
}

int skv_stream_new(struct skv_runner *r, const struct skv_policy *policy,
		   struct skv_stream **out, char *msg, size_t msg_len)
{
	struct skv_kv_desc desc;
	int err = stream_shape(r, policy, &desc, msg, msg_len);
	if (err < 0)
		return err;
	struct skv_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->runner = r;
	s->policy = *policy;
	/* An anonymous private mapping: zero pages cost nothing until a slot is written. */
	s->region_bytes = desc.region_bytes;
	s->region = mmap(NULL, s->region_bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (s->region == MAP_FAILED) {
		s->region = NULL;
		skv_stream_free(s);
		return skv_errorf(msg, msg_len, -ENOMEM, "cannot map %llu bytes of KV cache",
				  (unsigned long long)desc.region_bytes);
	}
	s->owns_region = 1;
	memcpy(s->region, &desc, sizeof(desc));
	err = stream_setup(s, 1);
	if (err < 0) {
		skv_stream_free(s);
		return err;
	}
	*out = s;
	return 0;
}

int skv_stream_new_at(struct skv_runner *r, const struct skv_policy *policy, void *region,
		      uint64_t region_bytes, int fresh, struct skv_stream **out, char *msg,
		      size_t msg_len)
{
	struct skv_kv_desc expect, found;
	int err = stream_shape(r, policy, &expect, msg, msg_len);
	if (err < 0)
		return err;
	/* The descriptor was written by another process: copy it once, check it against the
	 * mapping and against the shape this stream's policy needs. */
	if (region_bytes < sizeof(found))
		return skv_errorf(msg, msg_len, -SKV_ESHAPE, "KV region of %llu bytes is too small",
				  (unsigned long long)region_bytes);
	memcpy(&found, region, sizeof(found));
	err = skv_kv_layout_check(&found, region_bytes, msg, msg_len);
	if (err < 0)
		return err;
	if (memcmp(&found, &expect, sizeof(found)) != 0)
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "KV region descriptor does not match the stream's policy and model");
	struct skv_stream *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->runner = r;
	s->policy = *policy;
	s->region = region;
	s->region_bytes = region_bytes;
	err = stream_setup(s, fresh);
	if (err < 0) {
		skv_stream_free(s);
		return err;
	}
	*out = s;
	return 0;
}

int skv_stream_item(struct skv_stream *s, const int32_t *tokens, uint32_t n, float *logits,
		    struct skv_fwd_item *item)
{
	if (s->policy.kind == SKV_POLICY_RECOMPUTE)
		return -ENOTSUP;
	*item = (struct skv_fwd_item){ .seq = &s->seq, .tokens = tokens, .n_tokens = n,
				       .logits = logits };
	return 0;
}

static int stream_feed_chunks(struct skv_stream *s, const int32_t *tokens, size_t n,
			      float *logits, float *all_logits)
{
	uint32_t max_rows = skv_runner_max_rows(s->runner);
	size_t vocab = (size_t)skv_runner_config(s->runner)->vocab_size;

	for (size_t done = 0; done < n;) {
		uint32_t chunk = n - done < max_rows ? (uint32_t)(n - done) : max_rows;
		int last = done + chunk == n;
		struct skv_fwd_item item = {
			.seq = &s->seq,
			.tokens = tokens + done,
			.n_tokens = chunk,
			.logits_all = all_logits != NULL,
			.logits = all_logits ? all_logits + done * vocab : last ? logits : NULL,
		};
		int err = skv_forward(s->runner, &item, 1);
		if (err < 0)
			return err;
		if (all_logits && last && logits)
			memcpy(logits, all_logits + (n - 1) * vocab, vocab * sizeof(float));
		done += chunk;
	}
	return 0;
}

/* Re-run the model over the last L tokens from an empty cache; logits of the newest. */
static int stream_recompute(struct skv_stream *s, float *logits)
{
	uint64_t L = (uint64_t)s->policy.window_slots;
	uint64_t n = s->history_len < L ? s->history_len : L;
	uint32_t max_rows = skv_runner_max_rows(s->runner);
	int32_t chunk_tokens[512];
	uint64_t first = s->history_len - n; /* index, in the stream, of the oldest kept token */

	skv_kv_ring_reset(s->seq.ring, &s->seq.desc);
	for (uint64_t done = 0; done < n;) {
		uint32_t chunk = (uint32_t)(n - done);
		if (chunk > max_rows)
			chunk = max_rows;
		if (chunk > sizeof(chunk_tokens) / sizeof(*chunk_tokens))
			chunk = sizeof(chunk_tokens) / sizeof(*chunk_tokens);
		for (uint32_t i = 0; i < chunk; i++)
			chunk_tokens[i] = s->history[(first + done + i) % L];
		int last = done + chunk == n;
		struct skv_fwd_item item = {
			.seq = &s->seq,
			.tokens = chunk_tokens,
			.n_tokens = chunk,
			.logits = last ? logits : NULL,
		};
		int err = skv_forward(s->runner, &item, 1);
		if (err < 0)
			return err;
		done += chunk;
	}
	return 0;
}

int skv_stream_feed(struct skv_stream *s, const int32_t *tokens, size_t n, float *logits,
		    float *all_logits)
{
	if (!n)
		return 0;
	int32_t vocab = skv_runner_config(s->runner)->vocab_size;
	for (size_t i = 0; i < n; i++)
		if (tokens[i] < 0 || tokens[i] >= vocab)
			return -EINVAL;
	if (s->policy.kind != SKV_POLICY_RECOMPUTE)
		return stream_feed_chunks(s, tokens, n, logits, all_logits);

	/* Recompute: every token whose logits are wanted costs a full re-run over the window;
	 * tokens whose logits nobody reads only enter the history. */
	uint64_t L = (uint64_t)s->policy.window_slots;
	for (size_t i = 0; i < n; i++) {
		s->history[s->history_len % L] = tokens[i];
		s->history_len++;
		s->tokens_seen++;
		float *out = all_logits ? all_logits + i * (size_t)vocab
					: (i == n - 1 ? logits : NULL);
		if (!out)
			continue;
		int err = stream_recompute(s, out);
		if (err < 0)
			return err;
		if (all_logits && logits && i == n - 1)
			memcpy(logits, out, (size_t)vocab * sizeof(float));
	}
	return 0;
}

void skv_stream_save_window(struct skv_stream *s)
{
	if (s->policy.kind != SKV_POLICY_RECOMPUTE)
		return;
	uint64_t L = (uint64_t)s->policy.window_slots;
	uint64_t n = s->history_len < L ? s->history_len : L;
	int32_t *ids = skv_kv_region_tokens(s->region, &s->seq.desc);
	for (uint64_t i = 0; i < n; i++)
		ids[i] = s->history[(s->history_len - n + i) % L];
	struct skv_kv_ring ring = { .tokens_seen = n };
	skv_kv_ring_publish(s->seq.ring, &ring);
}

int skv_stream_restore_count(struct skv_stream *s, uint64_t tokens_seen)
{
	if (s->policy.kind != SKV_POLICY_RECOMPUTE)
		return 0;
	if (tokens_seen < s->history_len)
		return -EINVAL;
	s->tokens_seen = tokens_seen;
	return 0;
}

uint64_t skv_stream_make_room(struct skv_stream *s, uint64_t n)
{
	if (s->policy.evict != SKV_EVICT_PROMPT || !s->seq.allow_evict)
		return 0;
	const struct skv_kv_desc *d = &s->seq.desc;
	/* Tokens still to enter the sinks need no window room. */
	uint64_t seen = s->seq.ring->tokens_seen;
	uint64_t to_sinks = seen < d->sink_slots ? d->sink_slots - seen : 0;
	uint64_t need = n > to_sinks ? n - to_sinks : 0;
	uint64_t fill = skv_kv_ring_window_fill(s->seq.ring, d);
	if (fill + need <= d->window_slots)
		return 0;
	struct skv_kv_ring ring = *s->seq.ring; /* ours to write: read it plainly */
	uint64_t evicted = skv_kv_ring_evict(&ring, d, fill + need - d->window_slots);
	skv_kv_ring_publish(s->seq.ring, &ring);
	return evicted;
}

const struct skv_policy *skv_stream_policy(const struct skv_stream *s)
{
	return &s->policy;
}

uint64_t skv_stream_tokens_seen(const struct skv_stream *s)
{
	return s->policy.kind == SKV_POLICY_RECOMPUTE ? s->tokens_seen : s->seq.ring->tokens_seen;
}

const struct skv_seq *skv_stream_seq(const struct skv_stream *s)
{
	return s->policy.kind == SKV_POLICY_RECOMPUTE ? NULL : &s->seq;
}

uint64_t skv_stream_kv_bytes(const struct skv_stream *s)
{
	return s->region_bytes;
}
