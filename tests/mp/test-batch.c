/* Continuous batching changes nothing a stream sees (issue 5): many streams with different
 * prompts, policies, sink counts, window sizes (small ones, so that they evict during the
 * test), eviction modes and sampling settings run through one engine (--engines 1, so they
 * share its forward steps), read concurrently through skv_client_wait, and each stream's output
 * must equal, byte for byte and token for token, the same stream run alone:
 *
 *   - in this process through the engine API, as `skv generate` runs locally (the stronger
 *     reference: no daemon, no batching, one skv_stream_feed per prompt);
 *   - through the daemon one stream at a time, for requests whose meaning the engine defines
 *     (continuations of a stream, per-prompt eviction across requests, scoring).
 *
 * Each test also asserts, from the engine's own statistics (the admin ENGINES listing: rows and
 * steps published in its doorbell page), that the streams really shared steps, so that a test
 * cannot pass because the engine ran them one after another. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "mputil.h"
#include "sampler.h"
#include "skv-error.h"
#include "stream.h"
#include "testutil.h"
#include "tokenizer.h"

#define BATCH_WAIT_SLICE_MS 100
#define BATCH_ADMIN_TIMEOUT_MS 5000
#define BATCH_MAX_REQUESTS 3

static void suite_init(void)
{
	mp_suite_init();
}

static void suite_fini(void)
{
	mp_suite_fini();
}

TestSuite(batch, .init = suite_init, .fini = suite_fini, .timeout = 300);

/* ---- what a stream asks for, and what it got ---------------------------------------------- */

struct batch_request {
	int score;               /* 0: generate; 1: score text */
	const char *text;        /* prompt or text to score ("" continues a generation) */
	uint64_t tokens;         /* generate: max tokens */
	int endless;             /* generate: SKV_CLIENT_ENDLESS */
};

struct batch_spec {
	uint32_t policy;         /* enum skv_policy_kind */
	int64_t sinks, window;   /* -1: the default */
	uint32_t evict;          /* enum skv_evict_mode */
	uint32_t abs_positions;
	float temperature, top_p;
	uint64_t seed;
	struct batch_request req[BATCH_MAX_REQUESTS];
	unsigned n_req;
	int send_all_first;      /* batched run: queue every request at once, else one per DONE */
};

/* Every event of a stream, as the client read it. */
struct batch_out {
	char *text;              /* PROMPT and TOKEN bytes in order */
	size_t len, cap;
	int32_t *events;         /* per event: TOKEN id, or -1000 - type for the others */
	size_t n_events, cap_events;
	uint64_t tokens;
	unsigned ended;          /* requests ended (DONE, SCORED) */
	unsigned sent;           /* requests sent */
	uint64_t done_count[BATCH_MAX_REQUESTS];
	int done_reason[BATCH_MAX_REQUESTS];
	double nll[BATCH_MAX_REQUESTS];
	uint64_t predictions[BATCH_MAX_REQUESTS];
};

static void out_text(struct batch_out *o, const char *bytes, size_t n)
{
	if (o->len + n + 1 > o->cap) {
		o->cap = o->cap ? o->cap * 2 : 4096;
		while (o->cap < o->len + n + 1)
			o->cap *= 2;
		o->text = realloc(o->text, o->cap);
		cr_assert(o->text != NULL);
	}
	memcpy(o->text + o->len, bytes, n);
	o->len += n;
	o->text[o->len] = '\0';
}

static void out_event(struct batch_out *o, int32_t v)
{
	if (o->n_events == o->cap_events) {
		o->cap_events = o->cap_events ? o->cap_events * 2 : 512;
		o->events = realloc(o->events, o->cap_events * sizeof(*o->events));
		cr_assert(o->events != NULL);
	}
	o->events[o->n_events++] = v;
}

static void out_free(struct batch_out *o)
{
	free(o->text);
	free(o->events);
	memset(o, 0, sizeof(*o));
}

/* Same bytes, same token ids in the same order, same ends of the requests. */
static void out_expect_equal(const struct batch_out *got, const struct batch_out *want,
			     unsigned n_req, const char *what, unsigned index)
{
	cr_assert_eq(got->ended, n_req, "%s, stream %u: %u of %u requests ended", what, index,
		     got->ended, n_req);
	cr_assert_eq(got->tokens, want->tokens, "%s, stream %u: %llu tokens, alone %llu", what,
		     index, (unsigned long long)got->tokens, (unsigned long long)want->tokens);
	size_t n = got->n_events < want->n_events ? got->n_events : want->n_events;
	for (size_t i = 0; i < n; i++)
		cr_assert_eq(got->events[i], want->events[i],
			     "%s, stream %u: event %zu is %d, alone %d", what, index, i,
			     got->events[i], want->events[i]);
	cr_assert_eq(got->n_events, want->n_events, "%s, stream %u: %zu events, alone %zu", what,
		     index, got->n_events, want->n_events);
	cr_assert_eq(got->len, want->len, "%s, stream %u: %zu bytes, alone %zu", what, index,
		     got->len, want->len);
	cr_assert(got->len == 0 || memcmp(got->text, want->text, got->len) == 0,
		  "%s, stream %u: the text differs:\n%s\nalone:\n%s", what, index, got->text,
		  want->text);
	for (unsigned r = 0; r < n_req; r++) {
		cr_assert_eq(got->done_count[r], want->done_count[r],
			     "%s, stream %u, request %u: count %llu, alone %llu", what, index, r,
			     (unsigned long long)got->done_count[r],
			     (unsigned long long)want->done_count[r]);
		cr_assert_eq(got->done_reason[r], want->done_reason[r],
			     "%s, stream %u, request %u: reason %d, alone %d", what, index, r,
			     got->done_reason[r], want->done_reason[r]);
		cr_assert_eq(got->predictions[r], want->predictions[r]);
		cr_assert(memcmp(&got->nll[r], &want->nll[r], sizeof(double)) == 0,
			  "%s, stream %u, request %u: NLL %.17g, alone %.17g", what, index, r,
			  got->nll[r], want->nll[r]);
	}
}

/* ---- through the daemon ------------------------------------------------------------------- */

static void spec_params(const struct batch_spec *sp, struct skv_stream_params *p)
{
	mp_params_default(p);
	p->policy = sp->policy;
	p->sink_slots = sp->sinks;
	p->window_slots = sp->window;
	p->evict = sp->evict;
	p->abs_positions = sp->abs_positions;
	p->temperature = sp->temperature;
	p->top_p = sp->top_p ? sp->top_p : 0.9f;
	p->seed = sp->seed;
}

static void send_request(struct skv_client_stream *s, const struct batch_spec *sp,
			 struct batch_out *o)
{
	cr_assert(o->sent < sp->n_req);
	const struct batch_request *rq = &sp->req[o->sent++];
	int err = rq->score ? skv_client_stream_score(s, rq->text, strlen(rq->text), 0)
			    : skv_client_stream_generate(s, rq->text, strlen(rq->text), rq->tokens,
							 rq->endless ? SKV_CLIENT_ENDLESS : 0);
	cr_assert(err == 0, "request: %s (%d)", skv_client_last_error(mp_client_of(s)), err);
}

/* Read every event the stream has now; returns 1 once all its requests ended. */
static int drain(struct skv_client_stream *s, const struct batch_spec *sp, struct batch_out *o,
		 unsigned index)
{
	struct skv_client_event ev;
	int rc;
	while ((rc = skv_client_stream_read(s, &ev, 0)) == 1) {
		switch (ev.type) {
		case SKV_CLIENT_EV_PROMPT:
			out_event(o, -1000 - (int32_t)ev.type);
			out_event(o, ev.token);
			out_text(o, ev.text, ev.len);
			break;
		case SKV_CLIENT_EV_TOKEN:
			o->tokens++;
			out_event(o, ev.token);
			out_text(o, ev.text, ev.len);
			break;
		case SKV_CLIENT_EV_DONE:
		case SKV_CLIENT_EV_SCORED:
			cr_assert(o->ended < sp->n_req, "stream %u: more ends than requests", index);
			out_event(o, -1000 - (int32_t)ev.type);
			o->done_count[o->ended] = ev.type == SKV_CLIENT_EV_DONE ? ev.count : 0;
			o->done_reason[o->ended] = ev.type == SKV_CLIENT_EV_DONE ? ev.reason : -1;
			o->nll[o->ended] = ev.type == SKV_CLIENT_EV_SCORED ? ev.nll : 0.0;
			o->predictions[o->ended] = ev.type == SKV_CLIENT_EV_SCORED ? ev.count : 0;
			o->ended++;
			if (!sp->send_all_first && o->sent < sp->n_req)
				send_request(s, sp, o);
			break;
		case SKV_CLIENT_EV_ERROR:
			cr_assert_fail("stream %u: the engine failed a request: %.*s (%d)", index,
				       (int)ev.len, ev.text, ev.error);
			break;
		default:
			cr_assert_fail("stream %u: unknown event %d", index, (int)ev.type);
		}
	}
	cr_assert(rc == 0, "stream %u: %s (%d)", index,
		  skv_client_last_error(mp_client_of(s)), rc);
	return o->ended == sp->n_req;
}

/* The engines' rows and steps so far (summed; --engines 1 here), from the admin listing. */
static void engine_counts(struct mp_daemon *d, uint64_t *steps, uint64_t *rows)
{
	struct skv_msg_admin_req req = { .what = SKV_ADMIN_ENGINES };
	cr_assert(skv_msg_send(d->admin, SKV_MSG_ADMIN_REQ, 0, &req, NULL, 0) == 0,
		  "admin: the daemon went away");
	*steps = *rows = 0;
	unsigned n = 0;
	for (;;) {
		struct skv_msg_hdr h;
		union {
			struct skv_admin_engine engine;
			struct skv_admin_end end;
			struct skv_msg_error error;
			uint8_t raw[512];
		} body;
		int rc = mp_raw_recv(d->admin, BATCH_ADMIN_TIMEOUT_MS, &h, &body, sizeof(body), NULL);
		cr_assert_eq(rc, 1, "admin: no ENGINES answer (%d)", rc);
		cr_assert(h.type != SKV_MSG_ERROR, "admin: %s", body.error.text);
		if (h.type == SKV_MSG_ADMIN_END) {
			cr_assert_eq(body.end.count, n);
			break;
		}
		cr_assert_eq(h.type, SKV_MSG_ADMIN_ENGINE, "admin: unexpected %s",
			     skv_msg_name(h.type));
		*steps += body.engine.steps;
		*rows += body.engine.rows;
		n++;
	}
	cr_assert_eq(n, d->engines);
}

/* Open every stream on one connection, send, and read them all concurrently (skv_client_wait
 * names whichever has events). Returns the engine's rows per step over the run. */
static double run_batched(struct mp_daemon *d, const struct batch_spec *specs, unsigned n,
			  struct batch_out *outs, struct skv_client_stream_info *infos)
{
	struct skv_client *c = mp_connect(d);
	struct skv_client_stream **s = calloc(n, sizeof(*s));
	cr_assert(s != NULL);
	for (unsigned i = 0; i < n; i++) {
		struct skv_stream_params p;
		spec_params(&specs[i], &p);
		char msg[256] = "";
		int err = mp_try_open(c, &p, &s[i], msg, sizeof(msg));
		cr_assert(err == 0, "stream %u: open: %s (%d)", i, msg, err);
		if (infos)
			skv_client_stream_info(s[i], &infos[i]);
	}
	uint64_t steps0, rows0, steps1, rows1;
	engine_counts(d, &steps0, &rows0);
	for (unsigned i = 0; i < n; i++) {
		send_request(s[i], &specs[i], &outs[i]);
		while (specs[i].send_all_first && outs[i].sent < specs[i].n_req)
			send_request(s[i], &specs[i], &outs[i]);
	}
	unsigned finished = 0;
	double deadline = mp_now() + REQUEST_TIMEOUT_S;
	while (finished < n) {
		cr_assert(mp_now() < deadline, "%u of %u streams finished within %.0f s", finished, n,
			  REQUEST_TIMEOUT_S);
		struct skv_client_stream *ready = NULL;
		int rc = skv_client_wait(c, &ready, BATCH_WAIT_SLICE_MS);
		cr_assert(rc >= 0, "wait: %s (%d)", skv_client_last_error(c), rc);
		if (!rc)
			continue;
		unsigned i = 0;
		while (i < n && s[i] != ready)
			i++;
		cr_assert(i < n, "skv_client_wait named a stream we did not open");
		int was_done = outs[i].ended == specs[i].n_req;
		if (drain(s[i], &specs[i], &outs[i], i) && !was_done)
			finished++;
	}
	engine_counts(d, &steps1, &rows1);
	for (unsigned i = 0; i < n; i++)
		skv_client_stream_close(s[i]);
	skv_client_disconnect(c);
	free(s);
	cr_assert(steps1 > steps0, "the engine ran no step");
	return (double)(rows1 - rows0) / (double)(steps1 - steps0);
}

/* One stream at a time through the daemon: the solo reference for engine-defined requests. */
static void run_solo(struct mp_daemon *d, const struct batch_spec *sp, struct batch_out *out,
		     unsigned index)
{
	struct batch_spec solo = *sp;
	solo.send_all_first = 1;
	struct batch_spec *spp = &solo;
	struct batch_out *o = out;
	struct skv_client *c = mp_connect(d);
	struct skv_stream_params p;
	spec_params(spp, &p);
	struct skv_client_stream *s = NULL;
	char msg[256] = "";
	int err = mp_try_open(c, &p, &s, msg, sizeof(msg));
	cr_assert(err == 0, "solo stream %u: open: %s (%d)", index, msg, err);
	while (o->sent < spp->n_req)
		send_request(s, spp, o);
	double deadline = mp_now() + REQUEST_TIMEOUT_S;
	for (;;) {
		cr_assert(mp_now() < deadline, "solo stream %u did not finish", index);
		struct skv_client_stream *ready = NULL;
		int rc = skv_client_wait(c, &ready, BATCH_WAIT_SLICE_MS);
		cr_assert(rc >= 0, "wait: %s (%d)", skv_client_last_error(c), rc);
		if (rc && drain(s, spp, o, index))
			break;
	}
	skv_client_stream_close(s);
	skv_client_disconnect(c);
}

/* ---- in this process: the stream alone, as local mode runs it ------------------------------ */

struct local_engine {
	struct skv_model *model;
	struct skv_tokenizer *tok;
	struct skv_runner *runner;
};

static void local_open(struct local_engine *L)
{
	char msg[512] = "";
	int err = skv_model_open(tu_model_path("stories260K.bin"), &L->model, msg, sizeof(msg));
	cr_assert(err == 0, "%s", msg);
	err = skv_tokenizer_load(tu_model_path("tok512.bin"), L->model->cfg.vocab_size, &L->tok,
				 msg, sizeof(msg));
	cr_assert(err == 0, "%s", msg);
	err = skv_runner_new(L->model, 256, 1, &L->runner, msg, sizeof(msg));
	cr_assert(err == 0, "%s", msg);
}

static void local_close(struct local_engine *L)
{
	skv_runner_free(L->runner);
	skv_tokenizer_free(L->tok);
	skv_model_close(L->model);
}

/* A text scored on a stream that holds text already: no BOS; each token predicts the next,
 * fed one at a time as perplexity runs feed them; the NLLs summed in order, in double. */
static void local_score(struct local_engine *L, struct skv_stream *s, const char *text,
			float *logits, struct batch_out *o)
{
	int32_t *ids = NULL;
	size_t n_ids = 0;
	int32_t vocab = L->model->cfg.vocab_size;
	cr_assert(skv_tokenizer_encode(L->tok, text, strlen(text), 0, 0, &ids, &n_ids) == 0);
	cr_assert(n_ids >= 2);
	double nll = 0.0;
	for (size_t i = 0; i + 1 < n_ids; i++) {
		cr_assert(skv_stream_feed(s, &ids[i], 1, logits, NULL) == 0);
		nll += skv_nll(logits, vocab, ids[i + 1]);
	}
	out_event(o, -1000 - (int32_t)SKV_CLIENT_EV_SCORED);
	o->nll[o->ended] = nll;
	o->predictions[o->ended] = n_ids - 1;
	o->done_reason[o->ended] = -1;
	o->ended++;
	o->sent++;
	free(ids);
}

/* A generate request on a fresh stream, then optionally a score request, and the events the
 * daemon would send for them: the prompt echoed piece by piece (printable pieces only), one
 * TOKEN per sampled token (bytes only when printable), DONE; SCORED. The prompt goes in with
 * one skv_stream_feed, as `skv generate` feeds it; the last sampled token is not fed (the
 * generation ends there). */
static void local_run(struct local_engine *L, const struct batch_spec *sp, struct batch_out *o,
		      int64_t *sinks, int64_t *window)
{
	const struct batch_request *rq = &sp->req[0];
	cr_assert(!rq->score && (sp->n_req == 1 || (sp->n_req == 2 && sp->req[1].score)));
	char msg[512] = "";
	struct skv_policy pol;
	skv_policy_default(&pol);
	pol.kind = (enum skv_policy_kind)sp->policy;
	pol.sink_slots = sp->sinks;
	pol.window_slots = sp->window;
	pol.evict = (enum skv_evict_mode)sp->evict;
	pol.abs_positions = (int)sp->abs_positions;
	int err = skv_policy_resolve(&pol, L->model->cfg.seq_len, msg, sizeof(msg));
	cr_assert(err == 0, "%s", msg);
	*sinks = pol.sink_slots;
	*window = pol.window_slots;
	struct skv_stream *s = NULL;
	err = skv_stream_new(L->runner, &pol, &s, msg, sizeof(msg));
	cr_assert(err == 0, "%s", msg);
	struct skv_sampler sampler;
	int32_t vocab = L->model->cfg.vocab_size;
	cr_assert(skv_sampler_init(&sampler, vocab, sp->temperature, sp->top_p ? sp->top_p : 0.9f,
				   sp->seed) == 0);
	float *logits = malloc((size_t)vocab * sizeof(float));
	int32_t *ids = NULL;
	size_t n_ids = 0;
	cr_assert(logits != NULL);
	cr_assert(skv_tokenizer_encode(L->tok, rq->text, strlen(rq->text), 1, 0, &ids, &n_ids) == 0);
	for (size_t i = 1; i < n_ids; i++) {
		size_t len;
		const char *piece = skv_tokenizer_decode(L->tok, ids[i - 1], ids[i], &len);
		if (piece && skv_piece_is_printable(piece, len)) {
			out_event(o, -1000 - (int32_t)SKV_CLIENT_EV_PROMPT);
			out_event(o, ids[i]);
			out_text(o, piece, len);
		}
	}
	skv_stream_make_room(s, n_ids + rq->tokens);
	cr_assert(skv_stream_feed(s, ids, n_ids, logits, NULL) == 0);
	int32_t prev = ids[n_ids - 1];
	uint64_t made = 0;
	int reason = SKV_CLIENT_DONE_LENGTH;
	while (made < rq->tokens) {
		int32_t next = skv_sampler_sample(&sampler, logits);
		made++;
		if (next == SKV_TOKEN_BOS && !rq->endless) {
			reason = SKV_CLIENT_DONE_EOS;
			break;
		}
		size_t len = 0;
		const char *piece = skv_tokenizer_decode(L->tok, prev, next, &len);
		if (!piece || !skv_piece_is_printable(piece, len))
			len = 0;
		o->tokens++;
		out_event(o, next);
		out_text(o, piece ? piece : "", len);
		prev = next;
		if (made < rq->tokens)
			cr_assert(skv_stream_feed(s, &next, 1, logits, NULL) == 0);
	}
	out_event(o, -1000 - (int32_t)SKV_CLIENT_EV_DONE);
	o->done_count[0] = made;
	o->done_reason[0] = reason;
	o->ended = o->sent = 1;
	if (sp->n_req == 2)
		local_score(L, s, sp->req[1].text, logits, o);
	free(ids);
	free(logits);
	skv_sampler_fini(&sampler);
	skv_stream_free(s);
}

/* ---- the streams ------------------------------------------------------------------------- */

static const char *const prompts[] = {
	"Once upon a time",
	"The little dog was sad because",
	"Lily wanted to play with her friend",
	"",
	"Tom and his mom went to the park. They saw a big",
	"One day, a bird",
	"The sun was hot and the children",
	"Sam had a red ball. He",
	"There was a girl named Sue who loved to",
	"The cat",
};
#define N_PROMPTS (sizeof(prompts) / sizeof(prompts[0]))

/* Scored after a generation: a bitwise-equal NLL sum shows that every logit of every scored
 * token is the same, which greedy tokens alone would not (a small error rarely moves argmax). */
static const char *const texts[] = {
	"The little girl was happy. She smiled at her mom and said thank you.",
	"Once there was a big tree in the garden, and a bird lived in it.",
	"Tim did not want to share his toys, but his friend was sad.",
};
#define N_TEXTS (sizeof(texts) / sizeof(texts[0]))

#define SINK SKV_POLICY_SINK
#define WINDOW SKV_POLICY_WINDOW
#define DENSE SKV_POLICY_DENSE
#define PER_TOKEN SKV_EVICT_TOKEN
#define PER_PROMPT SKV_EVICT_PROMPT

/* A generate request, then a text scored, per stream: policy, sinks, window (dense: the
 * limit), eviction, absolute positions, temperature, seed, tokens, endless. Windows of 16 to
 * 100 slots evict within the run; dense limits leave room for prompt, answer and text. */
static const struct {
	uint32_t policy;
	int64_t sinks, window;
	uint32_t evict, abs;
	float temperature;
	uint64_t seed;
	uint64_t tokens;
	int endless;
} one_request[] = {
	{ SINK, -1, -1, PER_TOKEN, 0, 0.0f, 0, 200, 0 },
	{ SINK, 4, 16, PER_TOKEN, 0, 0.0f, 0, 250, 1 },
	{ SINK, 4, 33, PER_PROMPT, 0, 0.0f, 0, 300, 1 },
	{ SINK, 2, 64, PER_TOKEN, 0, 0.0f, 0, 220, 0 },
	{ SINK, 1, 16, PER_PROMPT, 0, 0.0f, 0, 180, 1 },
	{ SINK, 4, 33, PER_TOKEN, 1, 0.0f, 0, 240, 1 },
	{ WINDOW, -1, 16, PER_TOKEN, 0, 0.0f, 0, 200, 1 },
	{ WINDOW, -1, 33, PER_PROMPT, 0, 0.0f, 0, 260, 1 },
	{ WINDOW, -1, 64, PER_TOKEN, 0, 0.0f, 0, 300, 0 },
	{ WINDOW, -1, 64, PER_PROMPT, 0, 0.0f, 0, 150, 1 },
	{ DENSE, -1, 320, PER_TOKEN, 0, 0.0f, 0, 280, 0 },
	{ DENSE, -1, 512, PER_TOKEN, 0, 0.0f, 0, 300, 1 },
	{ SINK, 4, 16, PER_TOKEN, 0, 0.8f, 7, 200, 1 },
	{ WINDOW, -1, 33, PER_TOKEN, 0, 1.0f, 11, 220, 1 },
	{ SINK, 4, 64, PER_PROMPT, 0, 0.0f, 0, 300, 1 },
	{ SINK, 8, 48, PER_TOKEN, 0, 0.0f, 0, 250, 1 },
	{ WINDOW, -1, 100, PER_TOKEN, 0, 0.0f, 0, 290, 1 },
	{ DENSE, -1, 400, PER_TOKEN, 0, 0.0f, 0, 150, 0 },
	{ SINK, 4, -1, PER_TOKEN, 0, 0.0f, 0, 300, 1 },
	{ SINK, 4, 20, PER_PROMPT, 0, 0.0f, 0, 170, 0 },
	{ WINDOW, -1, 17, PER_TOKEN, 0, 0.0f, 0, 230, 1 },
	{ SINK, 3, 29, PER_TOKEN, 0, 0.0f, 0, 270, 1 },
	{ SINK, 4, 33, PER_PROMPT, 0, 0.5f, 99, 260, 1 },
	{ DENSE, -1, 300, PER_TOKEN, 0, 0.0f, 0, 260, 1 },
};
#define N_ONE_REQUEST (sizeof(one_request) / sizeof(one_request[0]))

static void spec_one_request(struct batch_spec *sp, unsigned i)
{
	memset(sp, 0, sizeof(*sp));
	sp->policy = one_request[i].policy;
	sp->sinks = one_request[i].sinks;
	sp->window = one_request[i].window;
	sp->evict = one_request[i].evict;
	sp->abs_positions = one_request[i].abs;
	sp->temperature = one_request[i].temperature;
	sp->top_p = 0.9f;
	sp->seed = one_request[i].seed;
	sp->n_req = 2;
	sp->req[0] = (struct batch_request){ .text = prompts[i % N_PROMPTS],
					      .tokens = one_request[i].tokens,
					      .endless = one_request[i].endless };
	sp->req[1] = (struct batch_request){ .score = 1, .text = texts[i % N_TEXTS] };
	sp->send_all_first = i % 2;
}

/* Compare every stream of a batched run with the same stream run alone in this process. */
static void expect_batched_equals_local(struct mp_daemon *d, const struct batch_spec *specs,
					unsigned n, double min_rows_per_step, const char *what)
{
	struct batch_out *batched = calloc(n, sizeof(*batched));
	struct batch_out *alone = calloc(n, sizeof(*alone));
	struct skv_client_stream_info *infos = calloc(n, sizeof(*infos));
	cr_assert(batched && alone && infos);
	double rows_per_step = run_batched(d, specs, n, batched, infos);

	struct local_engine L;
	local_open(&L);
	uint64_t evicting = 0;
	for (unsigned i = 0; i < n; i++) {
		int64_t sinks, window;
		local_run(&L, &specs[i], &alone[i], &sinks, &window);
		cr_assert_eq(infos[i].sinks, sinks, "%s, stream %u: the daemon resolved %lld sinks, "
			     "local mode %lld", what, i, (long long)infos[i].sinks, (long long)sinks);
		cr_assert_eq(infos[i].window, window, "%s, stream %u: window %lld, local %lld", what,
			     i, (long long)infos[i].window, (long long)window);
		out_expect_equal(&batched[i], &alone[i], specs[i].n_req, what, i);
		/* The run must have made the stream evict (or, dense, hold everything). */
		if (specs[i].policy != DENSE && alone[i].tokens + 1 > (uint64_t)window)
			evicting++;
		out_free(&batched[i]);
		out_free(&alone[i]);
	}
	local_close(&L);
	cr_assert(evicting >= n / 2, "%s: only %llu of %u streams evicted", what,
		  (unsigned long long)evicting, n);
	cr_assert(rows_per_step >= min_rows_per_step,
		  "%s: the engine ran %.2f rows per step: the streams were not batched", what,
		  rows_per_step);
	free(batched);
	free(alone);
	free(infos);
}

/* ==== tests ================================================================================ */

Test(batch, many_policies_and_windows_in_one_batch_equal_each_stream_alone)
{
	struct mp_daemon d;
	mp_daemon_start(&d, "batch_policies", 1, NULL, NULL);
	struct batch_spec specs[N_ONE_REQUEST];
	for (unsigned i = 0; i < N_ONE_REQUEST; i++)
		spec_one_request(&specs[i], i);
	/* 24 streams of 150-300 tokens each start together: most steps carry most of them. */
	expect_batched_equals_local(&d, specs, N_ONE_REQUEST, 8.0, "24 streams, one engine");
	mp_wait_streams_freed(&d, 10.0);
}

Test(batch, more_streams_than_one_step_holds_equal_each_stream_alone)
{
	/* 300 streams: more rows than a step takes (256), so the engine rotates which streams go
	 * first; each stream still advances once per round and computes what it computes alone.
	 * Small windows keep 300 regions inside the test daemon's arena. */
	enum { N = 300 };
	struct mp_daemon d;
	mp_daemon_start(&d, "batch_rotation", 1, NULL, NULL);
	struct batch_spec *specs = calloc(N, sizeof(*specs));
	cr_assert(specs != NULL);
	for (unsigned i = 0; i < N; i++) {
		struct batch_spec *sp = &specs[i];
		sp->policy = i % 3 == 2 ? WINDOW : SINK;
		sp->sinks = sp->policy == SINK ? (int64_t)(1 + i % 4) : -1;
		sp->window = 12 + i % 29;
		sp->evict = i % 5 == 0 ? PER_PROMPT : PER_TOKEN;
		sp->top_p = 0.9f;
		if (i % 7 == 0) {
			sp->temperature = 0.9f;
			sp->seed = 1000 + i;
		}
		sp->req[0] = (struct batch_request){ .text = prompts[i % N_PROMPTS],
						      .tokens = 40 + i % 23, .endless = 1 };
		sp->req[1] = (struct batch_request){ .score = 1, .text = texts[i % N_TEXTS] };
		sp->n_req = 2;
		sp->send_all_first = i % 2;
	}
	expect_batched_equals_local(&d, specs, N, 100.0, "300 streams, one engine");
	free(specs);
	mp_wait_streams_freed(&d, 10.0);
}

Test(batch, continuations_and_scores_in_one_batch_equal_each_stream_alone_through_the_daemon)
{
	/* Requests whose meaning the engine defines: a second prompt on a stream that already
	 * holds text (per-prompt eviction frees room for it), an empty prompt that continues a
	 * generation, a text scored after a generation. Half the streams queue all their requests
	 * at once, half send the next when the previous ends, so prefill chunks, decode rows and
	 * scored tokens of different streams share steps. The reference runs each stream alone
	 * through the same daemon. */
	enum { N = 16 };
	struct mp_daemon d;
	mp_daemon_start(&d, "batch_continuations", 1, NULL, NULL);
	static const char *const second[] = {
		"Then the dog ran to the tree and",
		"",
		"She said, \"Let's go home now.\"",
		"",
	};
	struct batch_spec specs[N];
	for (unsigned i = 0; i < N; i++) {
		struct batch_spec *sp = &specs[i];
		memset(sp, 0, sizeof(*sp));
		sp->policy = i % 4 == 3 ? WINDOW : SINK;
		sp->sinks = sp->policy == SINK ? 4 : -1;
		sp->window = 16 + 11 * (i % 6);
		sp->evict = i % 2 ? PER_PROMPT : PER_TOKEN;
		sp->top_p = 0.9f;
		if (i % 5 == 1) {
			sp->temperature = 0.7f;
			sp->seed = 42 + i;
		}
		sp->send_all_first = i % 2 == 0;
		sp->req[0] = (struct batch_request){ .text = prompts[i % N_PROMPTS],
						      .tokens = 60 + 7 * i, .endless = 1 };
		sp->req[1] = (struct batch_request){ .text = second[i % 4], .tokens = 50 + 5 * i,
						      .endless = i % 3 != 0 };
		sp->n_req = 2;
		if (i % 3 == 1)
			sp->req[sp->n_req++] = (struct batch_request){
				.score = 1, .text = "The little girl was happy. She smiled at her mom."
			};
	}
	struct batch_out batched[N], alone[N];
	memset(batched, 0, sizeof(batched));
	memset(alone, 0, sizeof(alone));
	double rows_per_step = run_batched(&d, specs, N, batched, NULL);
	cr_assert(rows_per_step >= 4.0,
		  "the engine ran %.2f rows per step: the streams were not batched", rows_per_step);
	unsigned scored = 0;
	for (unsigned i = 0; i < N; i++) {
		uint64_t steps0, rows0, steps1, rows1;
		engine_counts(&d, &steps0, &rows0);
		run_solo(&d, &specs[i], &alone[i], i);
		engine_counts(&d, &steps1, &rows1);
		/* Alone, a decode step carries one row (prompts go in chunks): far fewer rows per
		 * step than the batched run, or the reference was not alone. */
		cr_assert(rows1 - rows0 < (steps1 - steps0) * 2,
			  "solo stream %u: %llu rows in %llu steps", i,
			  (unsigned long long)(rows1 - rows0), (unsigned long long)(steps1 - steps0));
		out_expect_equal(&batched[i], &alone[i], specs[i].n_req, "continuations", i);
		for (unsigned r = 0; r < specs[i].n_req; r++)
			scored += specs[i].req[r].score && alone[i].predictions[r] > 0;
		out_free(&batched[i]);
		out_free(&alone[i]);
	}
	cr_assert_eq(scored, 5, "%u of 5 score requests scored", scored);
	mp_wait_streams_freed(&d, 10.0);
}
