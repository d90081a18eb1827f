/* skv-engine: one engine process of streamkv.
 *
 * Started by skv-cached (with --engine-id, --node, --cpus) or by hand against a running daemon
 * (only --socket). It says HELLO as an engine and receives the daemon's model path and four
 * fds: its node's KV arena, the packed weights, its doorbell (the wake word its clients ring)
 * and its eventfd. It maps the model read-only, the weights read-only, the arena shared; then
 * serves the streams the daemon assigns (ASSIGN: the stream's KV region in the arena, its channel
 * memfd and its client's eventfd) until the daemon drops them (DROP) or goes away.
 *
 * The loop: take control messages; take requests from every stream's input ring; gather one
 * step of work from every runnable stream (a chunk of a pending prompt, or one decode token,
 * or one token of a text being scored) into one batched skv_forward; hand out the results;
 * sleep on the doorbell (and the control socket) when nothing is runnable.
 *
 * A stream's KV bytes are written and read only here, in place in the arena; nothing of them
 * crosses a process boundary. If the daemon goes away the engine exits cleanly (status 0). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "arena.h"
#include "channel.h"
#include "forward.h"
#include "model.h"
#include "proto.h"
#include "sampler.h"
#include "seqlock.h"
#include "skv-error.h"
#include "stream.h"
#include "tokenizer.h"
#include "wake.h"

#define ENGINE_MAX_ROWS 256
#define ENGINE_PREFILL_CHUNK 64
#define ENGINE_SPIN_NS 50000

enum eng_state {
	ENG_IDLE = 0,
	ENG_PREFILL,   /* feeding the prompt's tokens */
	ENG_DECODE,    /* generating: the next token to feed is in next_token */
	ENG_SCORE,     /* feeding a text one token at a time, summing the NLL of the next */
};

struct eng_stream {
	uint64_t id;
	struct skv_stream *s;
	struct skv_policy policy;
	struct skv_sampler sampler;
	void *chan_map;
	size_t chan_bytes;
	struct skv_chan chan;
	int client_efd;
	struct skv_wake_word *client_word; /* in the client's doorbell page: ring it */
	uint32_t epoch;           /* of the request in progress (skv_chan_msg.epoch) */
	enum eng_state state;
	char *text;               /* pending prompt bytes */
	size_t text_len, text_cap;
	int32_t *ids;             /* the request's tokens */
	size_t n_ids, fed;
	uint64_t to_generate, generated;
	uint32_t gen_flags;       /* SKV_GEN_* of the current request */
	uint64_t t_request_ns;    /* when the request was taken */
	uint64_t t_last_token_ns; /* when its previous token went out; 0 before the first */
	int32_t prev_token, next_token;
	uint64_t predictions;     /* SCORE: how many next-token predictions to score */
	double nll;
	float *logits;            /* [vocab] */
	struct skv_chan_msg *out_pending; /* messages waiting for room in the output ring (a
					   * prompt's echo can outgrow the ring): nothing is dropped */
	size_t n_out_pending, cap_out_pending;
	uint32_t cancel_now;      /* hdr->cancel as read at the start of this step */
	int in_batch;             /* rows this stream has in the step being built */
	int emitted;              /* output went out since the client was last rung */
	int broken;               /* its client corrupted the channel: served no more */
	int snap_wanted;          /* a SNAPSHOT waits for the request in progress to end */
	uint32_t snap_flags;      /* SKV_SNAP_* */
	int held;                 /* SNAPSHOTTED sent: not stepped (its region written by nobody)
				   * while the daemon copies the region, until SNAPSHOT_RESUME */
	void *region;             /* its KV region in the arena */
	uint64_t region_bytes;
	struct eng_stream *next;
};

struct engine {
	int sock;
	uint32_t engine_id, node;
	uint64_t instance;
	struct skv_model *model;
	struct skv_tokenizer *tok;
	struct skv_runner *runner;
	void *arena;
	uint64_t arena_bytes;
	const float *weights;
	uint64_t weights_bytes;
	uint32_t threads;           /* matmul threads (--threads) */
	enum skv_weights_mem weights_mem; /* --weights */
	struct skv_wake_word *doorbell;
	struct skv_engine_stats stats; /* private copy, published into the doorbell page */
	int efd;
	struct skv_waiter *waiter;
	struct eng_stream *streams;
	uint32_t n_streams;
	int32_t vocab;
	/* one step */
	struct skv_fwd_item items[ENGINE_MAX_ROWS];
	struct eng_stream *item_stream[ENGINE_MAX_ROWS];
	uint32_t seq;
};

static void engine_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void engine_log(const char *fmt, ...)
{
	va_list ap;
	fputs("skv-engine: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void engine_log_line(const char *line)
{
	engine_log("%s", line);
}

static uint64_t engine_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void engine_hist_add(struct skv_hist *h, uint64_t ns)
{
	static const double bounds[SKV_HIST_BUCKETS] = SKV_HIST_BOUNDS_S;
	double s = (double)ns * 1e-9;
	unsigned i = 0;
	while (i < SKV_HIST_BUCKETS - 1 && s > bounds[i])
		i++;
	h->bucket[i]++;
	h->count++;
	h->sum_ns += ns;
}

/* ---- output ---------------------------------------------------------------------------- */

/* Queue a message for the client; it goes out at once if the ring has room. */
/* A message to the daemon. The socket is non-blocking (the engine never sleeps in it); a full
 * one means the daemon is behind: wait for room rather than lose a DROPPED or a stream's
 * failure, up to a second (a daemon that reads nothing for that long is gone or stuck, and the
 * connection's end will tell). */
static void engine_send(struct engine *e, uint16_t type, const void *body)
{
	for (int tries = 0; tries < 100; tries++) {
		int err = skv_msg_send(e->sock, type, e->seq, body, NULL, 0);
		if (err != -EAGAIN) {
			e->seq++;
			return;
		}
		struct pollfd pfd = { .fd = e->sock, .events = POLLOUT };
		poll(&pfd, 1, 10);
	}
	engine_log("the daemon reads nothing: a %s was not sent", skv_msg_name(type));
}

static void stream_emit(struct engine *e, struct eng_stream *st, const struct skv_chan_msg *m)
{
	(void)e;
	struct skv_chan_msg done;
	if (m->type == SKV_CHAN_DONE && st->s) {
		/* DONE carries the stream's token count (libskv's skv_client_stream_tokens). */
		done = *m;
		uint64_t seen = skv_stream_tokens_seen(st->s);
		memcpy(done.data, &seen, sizeof(seen));
		done.n = sizeof(seen);
		m = &done;
	}
	st->emitted = 1;
	if (st->broken)
		return;
	if (!st->n_out_pending) {
		int err = skv_ring_push(&st->chan.out, m);
		if (err == 0)
			return;
		if (err != -EAGAIN) {
			st->broken = 1;
			return;
		}
	}
	if (st->n_out_pending == st->cap_out_pending) {
		size_t cap = st->cap_out_pending ? 2 * st->cap_out_pending : 64;
		struct skv_chan_msg *q = realloc(st->out_pending, cap * sizeof(*q));
		if (!q) {
			/* Cannot keep it: fail the stream rather than lose output silently. */
			st->broken = 1;
			return;
		}
		st->out_pending = q;
		st->cap_out_pending = cap;
	}
	st->out_pending[st->n_out_pending++] = *m;
}

/* Try to flush queued messages; returns 1 if the queue is empty afterwards. */
static int stream_flush(struct eng_stream *st)
{
	size_t i = 0;
	int err = 0;
	while (i < st->n_out_pending && (err = skv_ring_push(&st->chan.out, &st->out_pending[i])) == 0)
		i++;
	if (err && err != -EAGAIN) {
		st->broken = 1;
		return 0;
	}
	if (i) {
		st->emitted = 1;
		memmove(st->out_pending, st->out_pending + i,
			(st->n_out_pending - i) * sizeof(*st->out_pending));
		st->n_out_pending -= i;
	}
	if (st->n_out_pending) {
		/* Full: ask the client to ring us when it frees a slot (Dekker: flag, fence,
		 * re-check). */
		__atomic_store_n(&st->chan.hdr->engine_wants_room, 1, __ATOMIC_SEQ_CST);
		uint32_t room = skv_ring_count(&st->chan.out);
		if (room == SKV_RING_CORRUPT) {
			st->broken = 1;
			return 0;
		}
		return room > 0 ? stream_flush(st) : 0;
	}
	return 1;
}

static void stream_emit_bytes(struct engine *e, struct eng_stream *st, uint32_t type,
			      uint64_t arg, const char *bytes, size_t len)
{
	size_t off = 0;
	do {
		struct skv_chan_msg m = { .type = type, .arg = arg };
		size_t n = len - off < SKV_CHAN_DATA ? len - off : SKV_CHAN_DATA;
		memcpy(m.data, bytes + off, n);
		m.n = (uint32_t)n;
		m.flags = (off ? SKV_CHAN_CONTINUES : 0) | (off + n < len ? SKV_CHAN_MORE : 0);
		stream_emit(e, st, &m);
		off += n;
	} while (off < len);
}

static void stream_error(struct engine *e, struct eng_stream *st, int code, const char *text)
{
	stream_emit_bytes(e, st, SKV_CHAN_ERROR, (uint64_t)(int64_t)code, text, strlen(text));
	st->state = ENG_IDLE;
	st->text_len = 0;
}

/* ---- streams --------------------------------------------------------------------------- */

static void stream_free(struct eng_stream *st)
{
	if (!st)
		return;
	skv_stream_free(st->s);
	skv_sampler_fini(&st->sampler);
	if (st->chan_map)
		munmap(st->chan_map, st->chan_bytes);
	if (st->client_efd >= 0)
		close(st->client_efd);
	if (st->client_word)
		munmap(st->client_word, SKV_CLIENT_DOORBELL_BYTES);
	free(st->out_pending);
	free(st->text);
	free(st->ids);
	free(st->logits);
	free(st);
}

static struct eng_stream *engine_find(struct engine *e, uint64_t id, struct eng_stream ***link)
{
	struct eng_stream **l = &e->streams;
	for (; *l; l = &(*l)->next)
		if ((*l)->id == id) {
			if (link)
				*link = l;
			return *l;
		}
	return NULL;
}

/* restore: the region holds a restored stream (keep its ring state) and this is the engine
 * state that goes with it (NULL: a new stream). */
static int engine_assign(struct engine *e, const struct skv_msg_assign *a, int chan_fd,
			 int client_efd, int doorbell_fd, const struct skv_stream_state *restore,
			 char *msg, size_t msg_len)
{
	if (engine_find(e, a->stream_id, NULL))
		return skv_errorf(msg, msg_len, -EEXIST, "stream %llu assigned twice",
				  (unsigned long long)a->stream_id);
	/* Never trust the daemon's numbers more than the mapping: the region must lie inside
	 * the arena, aligned. */
	if (a->region_offset % 64 || a->region_offset > e->arena_bytes ||
	    a->region_bytes > e->arena_bytes - a->region_offset || !a->region_bytes ||
	    a->channel_bytes < sizeof(struct skv_chan_hdr) || a->channel_bytes > (1u << 30))
		return skv_errorf(msg, msg_len, -SKV_ESHAPE,
				  "stream %llu: region or channel outside its bounds",
				  (unsigned long long)a->stream_id);
	struct eng_stream *st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->id = a->stream_id;
	st->client_efd = -1;
	st->region = (char *)e->arena + a->region_offset;
	st->region_bytes = a->region_bytes;
	st->chan_bytes = a->channel_bytes;
	st->chan_map = mmap(NULL, st->chan_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, chan_fd, 0);
	int err;
	/* The client's doorbell page, made and sealed by the daemon. */
	st->client_word = mmap(NULL, SKV_CLIENT_DOORBELL_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED,
			       doorbell_fd, 0);
	if (st->client_word == MAP_FAILED) {
		st->client_word = NULL;
		err = skv_errorf(msg, msg_len, -errno, "stream %llu: cannot map its doorbell: %s",
				 (unsigned long long)a->stream_id, strerror(errno));
		goto fail;
	}
	if (st->chan_map == MAP_FAILED) {
		st->chan_map = NULL;
		err = skv_errorf(msg, msg_len, -errno, "stream %llu: cannot map its channel: %s",
				 (unsigned long long)a->stream_id, strerror(errno));
		goto fail;
	}
	err = skv_chan_attach(&st->chan, st->chan_map, st->chan_bytes, 1);
	if (err < 0) {
		skv_errorf(msg, msg_len, err, "stream %llu: bad channel: %s",
			   (unsigned long long)a->stream_id, skv_strerror(err));
		goto fail;
	}
	skv_policy_default(&st->policy);
	st->policy.kind = (enum skv_policy_kind)a->params.policy;
	st->policy.evict = (enum skv_evict_mode)a->params.evict;
	st->policy.sink_slots = a->params.sink_slots;
	st->policy.window_slots = a->params.window_slots;
	st->policy.abs_positions = a->params.abs_positions != 0;
	st->policy.kv_dtype = a->params.kv_dtype;
	err = skv_policy_resolve(&st->policy, e->model->cfg.seq_len, msg, msg_len);
	if (err < 0)
		goto fail;
	err = skv_stream_new_at(e->runner, &st->policy, (char *)e->arena + a->region_offset,
				a->region_bytes, restore == NULL, &st->s, msg, msg_len);
	if (err < 0)
		goto fail;
	err = skv_sampler_init(&st->sampler, e->vocab, a->params.temperature, a->params.top_p,
			       a->params.seed);
	if (err < 0) {
		skv_errorf(msg, msg_len, err, "stream %llu: bad sampling parameters",
			   (unsigned long long)a->stream_id);
		goto fail;
	}
	if (restore) {
		if (!restore->rng || restore->prev_token < 0 || restore->prev_token >= e->vocab ||
		    restore->next_token < 0 || restore->next_token >= e->vocab) {
			err = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					 "stream %llu: restored state out of range",
					 (unsigned long long)a->stream_id);
			goto fail;
		}
		st->sampler.rng = restore->rng;
		st->prev_token = restore->prev_token;
		st->next_token = restore->next_token;
		if (skv_stream_restore_count(st->s, restore->tokens_seen) < 0) {
			err = skv_errorf(msg, msg_len, -SKV_EFORMAT,
					 "stream %llu: restored count below its window",
					 (unsigned long long)a->stream_id);
			goto fail;
		}
	}
	st->logits = malloc((size_t)e->vocab * sizeof(float));
	if (!st->logits) {
		err = -ENOMEM;
		goto fail;
	}
	st->client_efd = client_efd;
	st->next = e->streams;
	e->streams = st;
	e->n_streams++;
	return 0;
fail:
	if (client_efd >= 0)
		close(client_efd);
	st->client_efd = -1;
	stream_free(st);
	return err;
}

/* Tokenize the pending text and start a request. */
static void stream_start(struct engine *e, struct eng_stream *st, const struct skv_chan_msg *m)
{
	st->epoch = m->epoch;
	if ((int32_t)(st->cancel_now - m->epoch) > 0) {
		/* Cancelled before it started: drop its text, end it at once. */
		struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .flags = SKV_DONE_CANCELLED };
		stream_emit(e, st, &done);
		st->text_len = 0;
		return;
	}
	int first = skv_stream_tokens_seen(st->s) == 0;
	free(st->ids);
	st->ids = NULL;
	/* A rendered chat template asks for its special tokens to be parsed (SKV_GEN_SPECIAL). */
	int special = m->type == SKV_CHAN_GENERATE && (m->flags & SKV_GEN_SPECIAL);
	if ((special ? skv_tokenizer_encode_special : skv_tokenizer_encode)(
		    e->tok, st->text ? st->text : "", st->text_len,
		    first && skv_tokenizer_add_bos(e->tok), 0, &st->ids, &st->n_ids) < 0) {
		stream_error(e, st, -ENOMEM, "out of memory tokenizing the prompt");
		return;
	}
	st->text_len = 0;
	st->fed = 0;
	st->nll = 0.0;
	if (m->type == SKV_CHAN_SCORE) {
		if (st->n_ids < 2) {
			stream_error(e, st, -EINVAL, "no text to score");
			return;
		}
		st->predictions = st->n_ids - 1;
		if (m->arg && m->arg < st->predictions)
			st->predictions = m->arg;
		st->state = ENG_SCORE;
		return;
	}
	/* Echo the prompt as its tokens decode, as local mode prints it. */
	for (size_t i = 1; i < st->n_ids; i++) {
		size_t len;
		const char *piece = skv_tokenizer_decode(e->tok, st->ids[i - 1], st->ids[i], &len);
		if (skv_tokenizer_prints(e->tok, st->ids[i], piece, len))
			stream_emit_bytes(e, st, SKV_CHAN_ECHO, (uint64_t)st->ids[i], piece, len);
	}
	st->to_generate = m->arg;
	st->gen_flags = m->flags;
	st->t_request_ns = engine_now_ns();
	st->t_last_token_ns = 0;
	st->generated = 0;
	if (!st->n_ids) {
		/* A continuation with no new text: go on from the last sampled token. */
		st->state = ENG_DECODE;
		return;
	}
	skv_stream_make_room(st->s, st->n_ids + st->to_generate);
	st->state = ENG_PREFILL;
}

/* Take requests from a stream's input ring while it is idle. */
static void stream_take_input(struct engine *e, struct eng_stream *st)
{
	struct skv_chan_msg m;
	int took = 0, err = 0;
	while (st->state == ENG_IDLE && !st->broken && (err = skv_ring_pop(&st->chan.in, &m)) == 0) {
		took = 1;
		uint32_t n = m.n < SKV_CHAN_DATA ? m.n : SKV_CHAN_DATA;
		switch (m.type) {
		case SKV_CHAN_TEXT:
			if (st->text_len + n + 1 > st->text_cap) {
				size_t cap = st->text_cap ? st->text_cap * 2 : 4096;
				while (cap < st->text_len + n + 1)
					cap *= 2;
				char *t = realloc(st->text, cap);
				if (!t) {
					stream_error(e, st, -ENOMEM, "prompt too large for memory");
					break;
				}
				st->text = t;
				st->text_cap = cap;
			}
			memcpy(st->text + st->text_len, m.data, n);
			st->text_len += n;
			st->text[st->text_len] = '\0';
			break;
		case SKV_CHAN_GENERATE:
		case SKV_CHAN_SCORE:
			stream_start(e, st, &m);
			break;
		case SKV_CHAN_RESET:
			/* A client re-attached: what an earlier one left of a prompt goes. */
			st->text_len = 0;
			break;
		default:
			stream_error(e, st, -SKV_EFORMAT, "unknown request type");
			break;
		}
	}
	if (err && err != -EAGAIN)
		st->broken = 1;
	/* A client blocked on a full input ring waits for this. */
	if (took && __atomic_load_n(&st->chan.hdr->client_wants_room, __ATOMIC_SEQ_CST)) {
		__atomic_store_n(&st->chan.hdr->client_wants_room, 0, __ATOMIC_RELAXED);
		skv_wake(st->client_word, st->client_efd);
	}
}

/* After the logits of the last fed token: sample, emit, and decide what comes next. */
static void stream_after_logits(struct engine *e, struct eng_stream *st)
{
	int32_t next = skv_sampler_sample(&st->sampler, st->logits);
	st->generated++;
	e->stats.tokens_generated++;
	if (skv_tokenizer_is_end(e->tok, next) && !(st->gen_flags & SKV_GEN_IGNORE_BOS)) {
		struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .arg = st->generated,
					     .flags = SKV_DONE_BOS };
		stream_emit(e, st, &done);
		st->state = ENG_IDLE;
		return;
	}
	/* Every token is one TOKEN message (clients count them); a piece llama2.c would not
	 * print (a lone control byte) goes with no bytes. */
	size_t len = 0;
	const char *piece = skv_tokenizer_decode(e->tok, st->prev_token, next, &len);
	if (!skv_tokenizer_prints(e->tok, next, piece, len))
		len = 0;
	stream_emit_bytes(e, st, SKV_CHAN_TOKEN, (uint64_t)next, piece ? piece : "", len);
	uint64_t now = engine_now_ns();
	if (st->t_last_token_ns)
		engine_hist_add(&e->stats.itl, now - st->t_last_token_ns);
	else
		engine_hist_add(&e->stats.ttft, now - st->t_request_ns);
	st->t_last_token_ns = now;
	st->prev_token = next;
	st->next_token = next;
	if (st->generated >= st->to_generate) {
		struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .arg = st->generated,
					     .flags = SKV_DONE_LENGTH };
		stream_emit(e, st, &done);
		st->state = ENG_IDLE;
		return;
	}
	st->state = ENG_DECODE;
}

/* ---- one step ---------------------------------------------------------------------------- */

static int stream_runnable(struct eng_stream *st)
{
	if (st->state == ENG_IDLE || st->broken)
		return 0;
	return stream_flush(st);
}

/* Recompute streams cannot share a batch (each token re-runs a whole window): run alone. */
static void step_recompute(struct engine *e, struct eng_stream *st)
{
	int err = 0;
	if (st->state == ENG_PREFILL) {
		err = skv_stream_feed(st->s, st->ids, st->n_ids, st->logits, NULL);
		st->prev_token = st->ids[st->n_ids - 1];
		if (!err && !st->to_generate) {
			struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .arg = 0 };
			stream_emit(e, st, &done);
			st->state = ENG_IDLE;
			return;
		}
	} else if (st->state == ENG_DECODE) {
		err = skv_stream_feed(st->s, &st->next_token, 1, st->logits, NULL);
	} else {
		err = skv_stream_feed(st->s, &st->ids[st->fed], 1, st->logits, NULL);
		if (!err) {
			st->nll += skv_nll(st->logits, e->vocab, st->ids[st->fed + 1]);
			st->fed++;
		}
	}
	if (err < 0) {
		stream_error(e, st, err, skv_strerror(err));
		return;
	}
	if (st->state == ENG_SCORE) {
		if (st->fed == st->predictions) {
			struct skv_chan_msg m = { .type = SKV_CHAN_SCORED, .arg = st->predictions,
						  .n = sizeof(double) };
			memcpy(m.data, &st->nll, sizeof(double));
			stream_emit(e, st, &m);
			st->state = ENG_IDLE;
		}
		return;
	}
	stream_after_logits(e, st);
}

static void engine_publish_stats(struct engine *e)
{
	e->stats.wake_syscalls = skv_wake_syscalls();
	e->stats.streams = e->n_streams;
	struct skv_engine_stats *shared = skv_doorbell_stats(e->doorbell);
	skv_seqlock_write(&shared->seq, &shared->steps, &e->stats.steps, SKV_ENGINE_STATS_WORDS);
}

/* Ring each client whose output moved (no system call unless it sleeps). */
static void engine_ring_clients(struct engine *e)
{
	for (struct eng_stream *st = e->streams; st; st = st->next)
		if (st->emitted) {
			st->emitted = 0;
			skv_wake(st->client_word, st->client_efd);
		}
}

/* Make st the head of the stream list, the streams before it moving to the tail in order. */
static void engine_rotate(struct engine *e, struct eng_stream *st)
{
	if (e->streams == st)
		return;
	struct eng_stream **l = &e->streams;
	while (*l != st)
		l = &(*l)->next;
	*l = NULL; /* the part before st ends here */
	struct eng_stream *tail = st;
	while (tail->next)
		tail = tail->next;
	tail->next = e->streams;
	e->streams = st;
}

/* At a request boundary (or a step boundary with SKV_SNAP_STEP): hold the stream and hand the
 * daemon its engine state. From here until SNAPSHOT_RESUME this loop does not step it, so
 * nothing writes its region (this loop is its only writer) while the daemon copies it from the
 * arena, and no lock is needed; the other streams go on stepping meanwhile. */
static void stream_snapshot(struct engine *e, struct eng_stream *st)
{
	struct skv_msg_snapshotted m = { .stream_id = st->id };
	st->snap_wanted = 0;
	st->held = 1;
	/* A recompute stream's window lives in the stream: into the region with it. */
	skv_stream_save_window(st->s);
	m.state.tokens_seen = skv_stream_tokens_seen(st->s);
	m.state.rng = st->sampler.rng;
	m.state.prev_token = st->prev_token;
	m.state.next_token = st->next_token;
	m.state.tokens_generated = st->generated;
	engine_send(e, SKV_MSG_SNAPSHOTTED, &m);
}

static int stream_snapshot_due(const struct eng_stream *st)
{
	return st->snap_wanted && !st->held &&
	       (st->state == ENG_IDLE || (st->state == ENG_DECODE && (st->snap_flags & SKV_SNAP_STEP)));
}

/* Gather every runnable stream's work into one forward pass. Returns rows run (0: idle). */
static int engine_step(struct engine *e)
{
	uint32_t n_items = 0, rows = 0;
	int ran = 0;
	struct eng_stream *stop_at = NULL; /* the first stream that did not fit */
	for (struct eng_stream *st = e->streams; st; st = st->next) {
		/* Read the cancel word before the input: a request sent before a cancel is then
		 * visible to stream_take_input (the client bumps it with release order). */
		st->cancel_now = __atomic_load_n(&st->chan.hdr->cancel, __ATOMIC_ACQUIRE);
		/* A snapshot waits for the request in progress to end, and goes before the next;
		 * a held stream takes no input (a new request would write its ring) and no step. */
		if (stream_snapshot_due(st))
			stream_snapshot(e, st);
		st->in_batch = 0;
		if (st->held)
			continue;
		stream_take_input(e, st);
		if (st->state != ENG_IDLE && (int32_t)(st->cancel_now - st->epoch) > 0) {
			struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .arg = st->generated,
						     .flags = SKV_DONE_CANCELLED };
			if (st->state == ENG_SCORE)
				done.arg = 0;
			stream_emit(e, st, &done);
			st->state = ENG_IDLE;
			stream_take_input(e, st);
		}
		st->in_batch = 0;
		if (st->broken == 1) {
			/* Tell the daemon once; it fails the stream to its client, whose CLOSE
			 * makes us drop it. Other streams go on. */
			struct skv_msg_failed f = { .stream_id = st->id, .code = -SKV_EFORMAT };
			snprintf(f.text, sizeof(f.text),
				 "the stream's channel was corrupted by its client");
			engine_send(e, SKV_MSG_STREAM_ERROR, &f);
			engine_log("stream %llu: its channel is corrupt; not serving it any more",
				   (unsigned long long)st->id);
			st->broken = 2;
		}
		if (!stream_runnable(st))
			continue;
		if (st->policy.kind == SKV_POLICY_RECOMPUTE) {
			step_recompute(e, st);
			ran = 1;
			continue;
		}
		const int32_t *tokens;
		uint32_t n;
		if (st->state == ENG_PREFILL) {
			n = (uint32_t)(st->n_ids - st->fed);
			n = n < ENGINE_PREFILL_CHUNK ? n : ENGINE_PREFILL_CHUNK;
			tokens = st->ids + st->fed;
		} else if (st->state == ENG_DECODE) {
			n = 1;
			tokens = &st->next_token;
		} else {
			n = 1;
			tokens = st->ids + st->fed;
		}
		if (rows + n > ENGINE_MAX_ROWS || n_items == ENGINE_MAX_ROWS) {
			stop_at = st;
			break;
		}
		skv_stream_item(st->s, tokens, n, st->logits, &e->items[n_items]);
		e->item_stream[n_items++] = st;
		st->in_batch = (int)n;
		rows += n;
		if (st->state != ENG_DECODE)
			e->stats.prompt_tokens += n;
	}
	if (!n_items) {
		engine_ring_clients(e);
		if (ran)
			engine_publish_stats(e);
		return ran;
	}

	/* More work than one step holds: the streams that did not fit go first next time, so
	 * every stream advances within ceil(streams / ENGINE_MAX_ROWS) steps. */
	if (stop_at)
		engine_rotate(e, stop_at);
	int err = skv_forward(e->runner, e->items, n_items);
	if (err < 0) {
		/* A stream-level refusal (dense cache full, a bad token) fails that stream alone:
		 * retry the others without it. */
		for (uint32_t i = 0; i < n_items; i++) {
			struct eng_stream *st = e->item_stream[i];
			int one = skv_forward(e->runner, &e->items[i], 1);
			if (one < 0) {
				stream_error(e, st, one,
					     one == -SKV_ECACHEFULL
						     ? "the dense cache is full (--limit)"
						     : skv_strerror(one));
				st->in_batch = 0;
			}
		}
	}
	for (uint32_t i = 0; i < n_items; i++) {
		struct eng_stream *st = e->item_stream[i];
		uint32_t n = (uint32_t)st->in_batch;
		if (!n)
			continue;
		if (st->state == ENG_PREFILL) {
			st->fed += n;
			if (st->fed < st->n_ids)
				continue;
			st->prev_token = st->ids[st->n_ids - 1];
			if (!st->to_generate) {
				struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .arg = 0 };
				stream_emit(e, st, &done);
				st->state = ENG_IDLE;
				continue;
			}
			stream_after_logits(e, st);
		} else if (st->state == ENG_DECODE) {
			stream_after_logits(e, st);
		} else if (st->state == ENG_SCORE) {
			st->nll += skv_nll(st->logits, e->vocab, st->ids[st->fed + 1]);
			st->fed++;
			if (st->fed == st->predictions) {
				struct skv_chan_msg m = { .type = SKV_CHAN_SCORED,
							  .arg = st->predictions,
							  .n = sizeof(double) };
				memcpy(m.data, &st->nll, sizeof(double));
				stream_emit(e, st, &m);
				st->state = ENG_IDLE;
			}
		}
	}
	engine_ring_clients(e);
	e->stats.steps++;
	e->stats.rows += rows;
	e->stats.last_batch_rows = rows;
	engine_publish_stats(e);
	return 1;
}

/* ---- control plane --------------------------------------------------------------------- */

static int engine_control(struct engine *e)
{
	for (;;) {
		struct skv_msg_hdr hdr;
		union {
			struct skv_msg_assign assign;
			struct skv_msg_assign_restored restored;
			struct skv_msg_stream stream;
			struct skv_msg_snapshot snapshot;
			struct skv_msg_error error;
		} body;
		int fds[SKV_MSG_MAX_FDS], n_fds = 0;
		int got = skv_msg_recv(e->sock, &hdr, &body, sizeof(body), fds, &n_fds);
		if (got == -EAGAIN)
			return 0;
		if (got == 0) {
			engine_log("the daemon went away; exiting");
			return 1;
		}
		if (got < 0) {
			engine_log("bad message from the daemon: %s; exiting", skv_strerror(got));
			return -1;
		}
		char msg[256] = "";
		switch (hdr.type) {
		case SKV_MSG_ASSIGN:
		case SKV_MSG_ASSIGN_RESTORED: {
			/* The restored form starts with the same assign. */
			const struct skv_stream_state *restore =
				hdr.type == SKV_MSG_ASSIGN_RESTORED ? &body.restored.state : NULL;
			int err = n_fds == 3 ? engine_assign(e, &body.assign, fds[0], fds[1],
							     fds[2], restore, msg, sizeof(msg))
					     : -SKV_EFORMAT;
			if (n_fds >= 1)
				close(fds[0]);
			if (n_fds == 3)
				close(fds[2]);
			else
				for (int i = 1; i < n_fds; i++)
					close(fds[i]);
			if (err < 0) {
				struct skv_msg_failed f = { .stream_id = body.assign.stream_id,
							    .code = err };
				snprintf(f.text, sizeof(f.text), "%s",
					 msg[0] ? msg : skv_strerror(err));
				engine_log("stream %llu: %s",
					   (unsigned long long)body.assign.stream_id, f.text);
				engine_send(e, SKV_MSG_STREAM_ERROR, &f);
			}
			break;
		}
		case SKV_MSG_DROP: {
			struct eng_stream **link = NULL;
			struct eng_stream *st = engine_find(e, body.stream.stream_id, &link);
			if (st) {
				*link = st->next;
				e->n_streams--;
				stream_free(st);
			}
			/* Acknowledge even an unknown id: the daemon frees the region after it. */
			engine_send(e, SKV_MSG_DROPPED, &body.stream);
			break;
		}
		case SKV_MSG_SNAPSHOT: {
			struct eng_stream *st = engine_find(e, body.snapshot.stream_id, NULL);
			int code = !st ? -ENOENT
				   : n_fds != 0 || body.snapshot.region_bytes != st->region_bytes
					   ? -SKV_EFORMAT
				   : st->snap_wanted || st->held ? -EBUSY : 0;
			if (code) {
				struct skv_msg_snapshotted m = { .stream_id = body.snapshot.stream_id,
								 .code = code };
				for (int i = 0; i < n_fds; i++)
					close(fds[i]);
				engine_send(e, SKV_MSG_SNAPSHOTTED, &m);
				break;
			}
			st->snap_wanted = 1;
			st->snap_flags = body.snapshot.flags;
			if (st->state != ENG_IDLE && (body.snapshot.flags & SKV_SNAP_NOW)) {
				/* Shutting down: the request ends here, at a step boundary. */
				struct skv_chan_msg done = { .type = SKV_CHAN_DONE, .arg = st->generated,
							     .flags = SKV_DONE_CANCELLED };
				stream_emit(e, st, &done);
				st->state = ENG_IDLE;
			}
			if (stream_snapshot_due(st))
				stream_snapshot(e, st);
			break;
		}
		case SKV_MSG_SNAPSHOT_RESUME: {
			/* The daemon has its copy: the stream steps again. */
			struct eng_stream *st = engine_find(e, body.stream.stream_id, NULL);
			for (int i = 0; i < n_fds; i++)
				close(fds[i]);
			if (st && st->held) {
				st->held = 0;
				st->emitted = 1; /* its client may wait for room we left unread */
			}
			break;
		}
		case SKV_MSG_REATTACH: {
			/* A resumable stream has a new client: ring its wake word from now on. */
			struct eng_stream *st = engine_find(e, body.stream.stream_id, NULL);
			void *word = n_fds == 2 && st ? mmap(NULL, SKV_CLIENT_DOORBELL_BYTES,
							     PROT_READ | PROT_WRITE, MAP_SHARED,
							     fds[1], 0)
						      : MAP_FAILED;
			if (word == MAP_FAILED) {
				for (int i = 0; i < n_fds; i++)
					close(fds[i]);
				if (st)
					engine_log("stream %llu: cannot take its new client",
						   (unsigned long long)st->id);
				break;
			}
			close(fds[1]);
			if (st->client_word)
				munmap(st->client_word, SKV_CLIENT_DOORBELL_BYTES);
			if (st->client_efd >= 0)
				close(st->client_efd);
			st->client_word = word;
			st->client_efd = fds[0];
			st->emitted = 1; /* wake it: its output may be waiting */
			break;
		}
		case SKV_MSG_ERROR:
			body.error.text[sizeof(body.error.text) - 1] = '\0';
			engine_log("the daemon refused us: %s", body.error.text);
			for (int i = 0; i < n_fds; i++)
				close(fds[i]);
			return -1;
		default:
			for (int i = 0; i < n_fds; i++)
				close(fds[i]);
			engine_log("unexpected %s from the daemon; exiting", skv_msg_name(hdr.type));
			return -1;
		}
	}
}

static int engine_has_input(void *arg)
{
	struct engine *e = arg;
	for (struct eng_stream *st = e->streams; st; st = st->next) {
		if (st->broken || st->held)
			continue;
		/* A corrupt count (SKV_RING_CORRUPT) is non-zero too: the step finds it and
		 * marks the stream broken. */
		if (st->state != ENG_IDLE && !st->n_out_pending)
			return 1;
		if (st->state == ENG_IDLE && skv_ring_count(&st->chan.in))
			return 1;
		if (st->n_out_pending && skv_ring_count(&st->chan.out))
			return 1;
	}
	return 0;
}

/* ---- start-up ---------------------------------------------------------------------------- */

static void *engine_map_fd(int fd, uint64_t bytes, int prot)
{
	void *p = mmap(NULL, bytes, prot, MAP_SHARED, fd, 0);
	return p == MAP_FAILED ? NULL : p;
}

static int engine_hello(struct engine *e, const char *socket_path, uint32_t want_id,
			uint32_t want_node)
{
	int fd = skv_msg_connect(socket_path);
	if (fd < 0) {
		engine_log("cannot connect to %s: %s (is skv-cached running?)", socket_path,
			   strerror(-fd));
		return -1;
	}
	e->sock = fd;
	struct skv_msg_hello hello = { .major = SKV_PROTO_MAJOR, .minor = SKV_PROTO_MINOR,
				       .role = SKV_ROLE_ENGINE, .pid = (uint32_t)getpid(),
				       .engine_id = want_id, .node = want_node };
	int err = skv_msg_send(fd, SKV_MSG_HELLO, e->seq++, &hello, NULL, 0);
	if (err < 0) {
		engine_log("cannot talk to the daemon: %s", strerror(-err));
		return -1;
	}
	struct skv_msg_hdr hdr;
	union {
		struct skv_msg_hello_ok ok;
		struct skv_msg_error error;
	} body;
	int fds[SKV_MSG_MAX_FDS], n_fds = 0;
	err = skv_msg_recv(fd, &hdr, &body, sizeof(body), fds, &n_fds);
	if (err <= 0) {
		engine_log("no answer from the daemon: %s", err ? skv_strerror(err) : "hang-up");
		return -1;
	}
	if (hdr.type == SKV_MSG_ERROR) {
		body.error.text[sizeof(body.error.text) - 1] = '\0';
		engine_log("the daemon refused us: %s", body.error.text);
		return -1;
	}
	if (hdr.type != SKV_MSG_HELLO_OK || n_fds != 4 || body.ok.major != SKV_PROTO_MAJOR) {
		engine_log("unexpected answer from the daemon (%s, %d fds)", skv_msg_name(hdr.type),
			   n_fds);
		for (int i = 0; i < n_fds; i++)
			close(fds[i]);
		return -1;
	}
	struct skv_msg_hello_ok *ok = &body.ok;
	ok->model_path[sizeof(ok->model_path) - 1] = '\0';
	ok->tokenizer_path[sizeof(ok->tokenizer_path) - 1] = '\0';
	e->engine_id = ok->engine_id;
	e->node = ok->node;
	e->instance = ok->instance;
	e->efd = fds[3];

	char msg[512] = "";
	struct skv_arena_view view;
	err = skv_arena_map_fd(fds[0], &view, msg, sizeof(msg));
	close(fds[0]);
	if (err < 0) {
		engine_log("arena: %s", msg);
		goto fail_fds;
	}
	e->arena = view.base;
	e->arena_bytes = view.bytes;
	e->weights_bytes = ok->weights_bytes;
	/* No packed weights at all (a fully quantized model): everything is read in place. */
	e->weights = e->weights_bytes ? engine_map_fd(fds[1], ok->weights_bytes, PROT_READ) : NULL;
	e->doorbell = engine_map_fd(fds[2], SKV_DOORBELL_BYTES, PROT_READ | PROT_WRITE);
	close(fds[1]);
	close(fds[2]);
	if ((e->weights_bytes && !e->weights) || !e->doorbell) {
		engine_log("cannot map the shared weights or doorbell: %s", strerror(errno));
		return -1;
	}

	err = skv_model_open_mode(ok->model_path, e->weights_mem, &e->model, msg, sizeof(msg));
	if (err < 0) {
		engine_log("%s", msg);
		return -1;
	}
	const struct skv_model_config *c = &e->model->cfg;
	if (e->weights_bytes != skv_pack_floats(e->model) * sizeof(float)) {
		engine_log("the shared weights (%llu bytes) do not fit %s",
			   (unsigned long long)e->weights_bytes, ok->model_path);
		return -1;
	}
	if (ok->tokenizer_path[0])
		err = skv_tokenizer_load(ok->tokenizer_path, c->vocab_size, &e->tok, msg,
					 sizeof(msg));
	else if (e->model->gguf)
		err = skv_tokenizer_from_gguf(e->model->gguf, c->vocab_size, &e->tok, msg,
					      sizeof(msg));
	else
		err = skv_errorf(msg, sizeof(msg), -ENOENT, "no tokenizer given for %s",
				 ok->model_path);
	if (err < 0) {
		engine_log("%s", msg);
		return -1;
	}
	err = skv_runner_new_packed(e->model, e->weights, ENGINE_MAX_ROWS, e->threads, &e->runner, msg,
				    sizeof(msg));
	if (err < 0) {
		engine_log("%s", msg);
		return -1;
	}
	e->vocab = c->vocab_size;
	err = skv_waiter_new((enum skv_wait_backend)ok->wait_backend, e->doorbell, e->efd,
			     engine_log_line, &e->waiter);
	if (err < 0) {
		engine_log("cannot set up waiting: %s", strerror(-err));
		return -1;
	}
	skv_waiter_watch_fd(e->waiter, e->sock);
	/* From here on the control socket is polled between steps, never waited on. */
	if (fcntl(e->sock, F_SETFL, fcntl(e->sock, F_GETFL) | O_NONBLOCK) < 0) {
		engine_log("cannot make the control socket non-blocking: %s", strerror(errno));
		return -1;
	}
	return 0;
fail_fds:
	close(fds[1]);
	close(fds[2]);
	return -1;
}

static int engine_pin(const char *cpus)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	char *copy = strdup(cpus), *save = NULL;
	if (!copy)
		return -ENOMEM;
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *end;
		long lo = strtol(tok, &end, 10), hi = lo;
		if (*end == '-')
			hi = strtol(end + 1, &end, 10);
		if (*end || lo < 0 || hi < lo || hi >= CPU_SETSIZE) {
			free(copy);
			return -EINVAL;
		}
		for (long c = lo; c <= hi; c++)
			CPU_SET((int)c, &set);
	}
	free(copy);
	return sched_setaffinity(0, sizeof(set), &set) < 0 ? -errno : 0;
}

static void engine_usage(FILE *out)
{
	fputs("usage: skv-engine --socket PATH [--engine-id N] [--node N] [--cpus LIST] [--threads N]\n"
	      "                  [--weights auto|map|huge]\n"
	      "  --threads N   matmul threads (default 1; a big model needs several cores to\n"
	      "                reach the memory bus)\n"
	      "  --weights M   where the weights read in place live: map (the file's mapping,\n"
	      "                shared), huge (a private copy on transparent huge pages: faster\n"
	      "                decode, the file's size per engine), auto (default: huge from\n"
	      "                64 MiB of such weights when the kernel has huge pages)\n", out);
}

int main(int argc, char **argv)
{
	static const struct option longs[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "engine-id", required_argument, NULL, 'i' },
		{ "node", required_argument, NULL, 'n' },
		{ "cpus", required_argument, NULL, 'c' },
		{ "threads", required_argument, NULL, 't' },
		{ "weights", required_argument, NULL, 'w' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *socket_path = NULL, *cpus = NULL;
	uint32_t want_id = UINT32_MAX, want_node = UINT32_MAX, threads = 1;
	enum skv_weights_mem weights_mem = SKV_WEIGHTS_AUTO;
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
		char *end;
		switch (c) {
		case 's': socket_path = optarg; break;
		case 'i':
		case 'n': {
			unsigned long v = strtoul(optarg, &end, 10);
			if (*end || end == optarg || v >= UINT32_MAX) {
				engine_log("%s: '%s' is not a number", c == 'i' ? "--engine-id" : "--node",
					   optarg);
				return 2;
			}
			*(c == 'i' ? &want_id : &want_node) = (uint32_t)v;
			break;
		}
		case 'c': cpus = optarg; break;
		case 't': {
			unsigned long v = strtoul(optarg, &end, 10);
			if (*end || end == optarg || v < 1 || v > 256) {
				engine_log("--threads: '%s' is not a whole number in [1, 256]", optarg);
				return 2;
			}
			threads = (uint32_t)v;
			break;
		}
		case 'w':
			if (skv_weights_mem_parse(optarg, &weights_mem) < 0) {
				engine_log("--weights: '%s' is not auto, map or huge", optarg);
				return 2;
			}
			break;
		case 'h': engine_usage(stdout); return 0;
		default:
			engine_log("unknown or incomplete flag '%s'", argv[optind - 1]);
			engine_usage(stderr);
			return 2;
		}
	}
	if (!socket_path || optind < argc) {
		engine_usage(stderr);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	/* Each stream costs the engine one fd (its client's eventfd): a thousand streams need
	 * more than the usual soft limit of 1024. */
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		setrlimit(RLIMIT_NOFILE, &nofile);
	}
	if (cpus && engine_pin(cpus) < 0) {
		engine_log("--cpus: cannot pin to '%s'", cpus);
		return 2;
	}
	struct engine e = { .sock = -1, .efd = -1 };
	e.threads = threads;
	e.weights_mem = weights_mem;
	if (engine_hello(&e, socket_path, want_id, want_node) < 0)
		return 1;
	engine_log("engine %u on node %u serving %s with %u thread(s), %s kernels, weights %s",
		   e.engine_id, e.node, e.model->path, e.threads, skv_runner_impl(e.runner, 1),
		   e.model->weights_mem == SKV_WEIGHTS_HUGE ? "copied onto huge pages"
							    : "in the file's mapping");

	int status = 0;
	for (;;) {
		int ctl = engine_control(&e);
		if (ctl != 0) {
			status = ctl > 0 ? 0 : 1;
			break;
		}
		if (engine_step(&e))
			continue;
		int w = skv_waiter_wait(e.waiter, engine_has_input, &e, ENGINE_SPIN_NS, -1);
		if (w < 0 && w != -EINTR) {
			engine_log("waiting failed: %s", strerror(-w));
			status = 1;
			break;
		}
	}
	while (e.streams) {
		struct eng_stream *st = e.streams;
		e.streams = st->next;
		stream_free(st);
	}
	skv_waiter_free(e.waiter);
	skv_runner_free(e.runner);
	skv_tokenizer_free(e.tok);
	skv_model_close(e.model);
	close(e.sock);
	return status;
}
