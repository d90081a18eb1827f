/* skv-bench: many streams through a running skv-cached, measured from the client side.
 *
 *   skv-bench --socket PATH (--streams N | --sweep N1,N2,...) --tokens T [--warmup W]
 *             [--connections K] [--policy P] [--window W] [--prompt TEXT] [--repeats R]
 *             [--local] [--json]
 *
 * One run: N streams, spread over K libskv connections, each served by one thread of this
 * process (default K = 1: one thread multiplexes every stream with skv_client_wait, then reads
 * the stream it names with timeout 0). Every stream sends the same prompt and asks for T
 * tokens, greedy, not stopping at BOS, at the same moment. With --warmup W, each stream first
 * generates W tokens untimed (the prompt's request), then the timed request continues from
 * there with T more: W of about the cache size makes every timed token attend to a full window.
 *
 * Reported per N (medians of --repeats runs for the rate; percentiles over all streams of all
 * runs): aggregate tokens/s (tokens of the timed requests over the wall time from the first
 * request to the last DONE), time to first token (the prompt's request sent -> its first
 * TOKEN), inter-token latency (gaps between consecutive TOKENs of a stream in the timed
 * request), the engines' mean batch (rows per forward step) and their CPU time over the run in
 * cores, arena bytes in use while the streams run, and resident memory: the daemon, each engine
 * and this process (VmRSS, the largest seen during the runs). rss_bytes in --json is their
 * sum: shared pages (arena, packed weights) count once in every process that maps them, so it
 * overstates the machine's use; pss_bytes (sum of the proportional sets) does not.
 *
 * --sweep runs each N in turn in one invocation, one table row (one JSON object of the array)
 * per N. --local also runs one stream in this process (the engine linked in, no daemon) in the
 * same runs, for the cost of the data path. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/un.h>
#include <unistd.h>

#include "admin-conn.h"
#include "bench-util.h"
#include "forward.h"
#include "model.h"
#include "sampler.h"
#include "skv-client.h"
#include "skv-error.h"
#include "stream.h"
#include "tokenizer.h"

#ifndef SKV_MODEL_DIR
#define SKV_MODEL_DIR "models/stories260K"
#endif

#define BENCH_MAX_RUNS 32          /* entries of --sweep */
#define BENCH_MAX_STREAMS 65536
#define BENCH_MAX_CONNECTIONS 1024
#define BENCH_MAX_ENGINES 64       /* engines whose memory and CPU are reported */
#define BENCH_EVENT_TIMEOUT_MS 60000 /* a run with no event for this long has hung */
#define BENCH_SAMPLE_S 0.1         /* memory sampled this often while streams run */

struct bench_opts {
	const char *socket_path;   /* NULL: libskv's default */
	char admin_path[108];      /* the same socket, resolved */
	const char *prompt;
	long long streams[BENCH_MAX_RUNS]; /* N of each run */
	size_t n_runs;
	int sweep;
	long long tokens, warmup;
	int repeats;
	int connections;
	int policy;
	long long window;
	int kv;                    /* enum skv_client_kv, 0: the default (f32) */
	int local;
	int json;
};

/* One stream as this process sees it. */
struct bench_stream {
	skv_client_stream *s;
	double t_request;     /* the request in progress was sent */
	double t_last;        /* its latest TOKEN */
	long long tokens;     /* TOKENs of the request in progress */
	int done;
};

struct bench_by_ptr {
	const skv_client_stream *s;
	uint32_t index;
};

/* One connection and the thread that serves it. */
struct bench_worker {
	const struct bench_opts *o;
	pthread_barrier_t *barrier;
	int *timed_done;            /* workers whose timed request ended (atomic) */
	uint32_t n;                 /* streams of this worker */
	struct bench_stream *st;    /* [n] */
	struct bench_by_ptr *by_ptr; /* [n], sorted by stream: which stream skv_client_wait named */
	double *ttft;               /* [n] */
	uint32_t n_ttft;
	double *gaps;               /* [n * tokens] */
	size_t n_gaps;
	double t_first_request, t_last_end; /* of the timed request */
	long long tokens;           /* timed TOKENs */
	struct skv_client_stream_info info; /* of its first stream */
	int err;
	char msg[320];
};

/* What the main thread saw of the server side during one run. */
struct bench_side {
	int daemon_pid;
	uint32_t n_engines;
	int engine_pid[BENCH_MAX_ENGINES];
	uint64_t steps, rows;               /* summed over engines */
	uint64_t itl_count, itl_sum_ns;     /* the engines' inter-token histogram */
	double cpu_engines_s, cpu_daemon_s, cpu_self_s;
};

/* One N: every repeat's rate, latencies pooled over the repeats. */
struct bench_result {
	long long streams;
	int connections;
	double *rates;               /* [repeats] */
	double *ttft;                /* pooled */
	size_t n_ttft, cap_ttft;
	double *gaps;                /* pooled */
	size_t n_gaps, cap_gaps;
	double rows_per_step;        /* over all repeats */
	uint64_t steps, rows;
	uint64_t itl_count, itl_sum_ns; /* as the engines measured it */
	long long timed_tokens;      /* over all repeats */
	double cpu_engines_s, cpu_daemon_s, cpu_self_s, wall_s;
	uint64_t arena_used, arena_bytes;
	long long rss_daemon, rss_self, pss_total;
	long long rss_engine[BENCH_MAX_ENGINES];
	uint32_t n_engines;
	double *local_rates;         /* [repeats] with --local */
	int64_t sinks, window;       /* as the daemon resolved them */
};

/* ---- a worker: one connection, its streams, one thread ------------------------------------- */

static int bench_cmp_ptr(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t)((const struct bench_by_ptr *)a)->s;
	uintptr_t y = (uintptr_t)((const struct bench_by_ptr *)b)->s;
	return (x > y) - (x < y);
}

static struct bench_stream *worker_find(struct bench_worker *w, const skv_client_stream *s)
{
	struct bench_by_ptr key = { .s = s };
	struct bench_by_ptr *hit = bsearch(&key, w->by_ptr, w->n, sizeof(key), bench_cmp_ptr);
	return hit ? &w->st[hit->index] : NULL;
}

static void worker_fail(struct bench_worker *w, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void worker_fail(struct bench_worker *w, int err, const char *fmt, ...)
{
	if (w->err)
		return;
	w->err = err ? err : -EIO;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(w->msg, sizeof(w->msg), fmt, ap);
	va_end(ap);
}

/* Send one request on every stream, then read them all until each ends. timed: record the
 * gaps and the wall time; ttft: record each stream's first TOKEN. */
static void worker_phase(struct bench_worker *w, skv_client *c, const char *prompt,
			 long long tokens, int timed, int ttft)
{
	size_t len = strlen(prompt);
	for (uint32_t i = 0; i < w->n && !w->err; i++) {
		struct bench_stream *b = &w->st[i];
		b->tokens = 0;
		b->done = 0;
		b->t_request = bench_now();
		if (timed && !i)
			w->t_first_request = b->t_request;
		int err = skv_client_stream_generate(b->s, prompt, len, (uint64_t)tokens,
						     SKV_CLIENT_ENDLESS);
		if (err < 0)
			worker_fail(w, err, "sending a request: %s", skv_client_last_error(c));
	}
	uint32_t remaining = w->n;
	while (remaining && !w->err) {
		skv_client_stream *s = NULL;
		int got = skv_client_wait(c, &s, BENCH_EVENT_TIMEOUT_MS);
		if (got == 0) {
			worker_fail(w, -ETIMEDOUT, "no token from the daemon for %d s (%u streams "
				    "still running)", BENCH_EVENT_TIMEOUT_MS / 1000, remaining);
			break;
		}
		if (got < 0) {
			worker_fail(w, got, "%s", skv_client_last_error(c));
			break;
		}
		struct bench_stream *b = worker_find(w, s);
		if (!b) {
			worker_fail(w, -EPROTO, "skv_client_wait named a stream we did not open");
			break;
		}
		struct skv_client_event ev;
		while ((got = skv_client_stream_read(s, &ev, 0)) == 1) {
			double now = bench_now();
			if (ev.type == SKV_CLIENT_EV_TOKEN) {
				if (!b->tokens && ttft)
					w->ttft[w->n_ttft++] = now - b->t_request;
				else if (b->tokens && timed)
					w->gaps[w->n_gaps++] = now - b->t_last;
				b->t_last = now;
				b->tokens++;
			} else if (ev.type == SKV_CLIENT_EV_DONE) {
				if (b->done || ev.count != (uint64_t)tokens || b->tokens != tokens) {
					worker_fail(w, -EPROTO,
						    "a stream ended after %lld of %lld tokens "
						    "(reason %d)", b->tokens, tokens, ev.reason);
					break;
				}
				b->done = 1;
				remaining--;
				if (timed) {
					w->tokens += b->tokens;
					if (now > w->t_last_end)
						w->t_last_end = now;
				}
			} else if (ev.type == SKV_CLIENT_EV_ERROR) {
				worker_fail(w, ev.error, "the engine failed a request: %.*s%s",
					    (int)ev.len, ev.text,
					    ev.error == -SKV_ECACHEFULL
						    ? " (dense: --window is the limit; give it "
						      "room for prompt + warmup + tokens)"
						    : "");
				break;
			}
		}
		if (got < 0)
			worker_fail(w, got, "%s", skv_client_last_error(c));
	}
}

static void *worker_main(void *arg)
{
	struct bench_worker *w = arg;
	const struct bench_opts *o = w->o;
	skv_client *c = NULL;
	skv_client_opts *co = NULL;
	int err = skv_client_connect(o->socket_path, &c, w->msg, sizeof(w->msg));
	if (err < 0)
		w->err = err;
	if (!w->err && ((err = skv_client_opts_new(&co)) < 0 ||
			(err = skv_client_opts_policy(co, (enum skv_client_policy)o->policy)) < 0 ||
			(err = skv_client_opts_window(co, o->window)) < 0 ||
			(o->kv && (err = skv_client_opts_kv(co, (enum skv_client_kv)o->kv)) < 0)))
		worker_fail(w, err, "stream options: %s", skv_strerror(err));
	for (uint32_t i = 0; i < w->n && !w->err; i++) {
		err = skv_client_stream_open(c, co, &w->st[i].s);
		if (err < 0)
			worker_fail(w, err, "opening stream %u of this connection's %u: %s%s", i + 1,
				    w->n, skv_client_last_error(c),
				    err == -ENOSPC ? " (give skv-cached a larger --arena-mb, or "
						     "raise --max-streams)"
						   : "");
		w->by_ptr[i] = (struct bench_by_ptr){ .s = w->st[i].s, .index = i };
	}
	skv_client_opts_free(co);
	if (!w->err) {
		skv_client_stream_info(w->st[0].s, &w->info);
		qsort(w->by_ptr, w->n, sizeof(*w->by_ptr), bench_cmp_ptr);
		if (o->warmup)
			worker_phase(w, c, o->prompt, o->warmup, 0, 1);
	}
	pthread_barrier_wait(w->barrier); /* A: streams open and warm */
	pthread_barrier_wait(w->barrier); /* B: the main thread took its "before" snapshot */
	if (!w->err)
		worker_phase(w, c, o->warmup ? "" : o->prompt, o->tokens, 1, !o->warmup);
	__atomic_add_fetch(w->timed_done, 1, __ATOMIC_RELEASE);
	pthread_barrier_wait(w->barrier); /* C: the main thread sampled memory, streams open */
	for (uint32_t i = 0; i < w->n; i++)
		skv_client_stream_close(w->st[i].s);
	skv_client_disconnect(c);
	return NULL;
}

/* ---- the server side, seen by the main thread --------------------------------------------- */

static void side_snapshot(struct admin_conn *admin, struct bench_side *side, uint64_t *arena_used,
			  uint64_t *arena_bytes)
{
	struct admin_snapshot snap;
	char msg[320];
	int err = admin_fetch(admin, ADMIN_WANT_ENGINES | ADMIN_WANT_HIST, &snap, msg, sizeof(msg));
	if (err < 0)
		bench_die("asking skv-cached for its engines: %s", msg);
	memset(side, 0, sizeof(*side));
	side->daemon_pid = admin->daemon_pid ? admin->daemon_pid : (int)snap.server.pid;
	for (size_t i = 0; i < snap.n_engines; i++) {
		const struct skv_admin_engine *e = &snap.engines[i];
		side->steps += e->steps;
		side->rows += e->rows;
		if (e->pid && side->n_engines < BENCH_MAX_ENGINES)
			side->engine_pid[side->n_engines++] = (int)e->pid;
	}
	side->itl_count = snap.hist.itl_count;
	side->itl_sum_ns = snap.hist.itl_sum_ns;
	if (arena_used)
		*arena_used = snap.server.arena_used_bytes;
	if (arena_bytes)
		*arena_bytes = snap.server.arena_bytes;
	admin_snapshot_free(&snap);
	for (uint32_t i = 0; i < side->n_engines; i++) {
		double t = bench_proc_cpu_s(side->engine_pid[i]);
		side->cpu_engines_s += t > 0 ? t : 0;
	}
	side->cpu_daemon_s = bench_proc_cpu_s(side->daemon_pid);
	side->cpu_self_s = bench_proc_cpu_s(0);
}

static void max_ll(long long *to, long long v)
{
	if (v > *to)
		*to = v;
}

/* Resident sets now, the largest kept in r. */
static void side_sample_memory(struct admin_conn *admin, const struct bench_side *side,
			       struct bench_result *r)
{
	uint64_t used = 0, bytes = 0;
	struct admin_snapshot snap;
	char msg[320];
	if (admin_fetch(admin, 0, &snap, msg, sizeof(msg)) < 0)
		bench_die("asking skv-cached for its arenas: %s", msg);
	used = snap.server.arena_used_bytes;
	bytes = snap.server.arena_bytes;
	admin_snapshot_free(&snap);
	if (used > r->arena_used)
		r->arena_used = used;
	r->arena_bytes = bytes;
	max_ll(&r->rss_daemon, bench_proc_rss(side->daemon_pid));
	max_ll(&r->rss_self, bench_proc_rss(0));
	if (side->n_engines > r->n_engines)
		r->n_engines = side->n_engines;
	for (uint32_t i = 0; i < side->n_engines; i++)
		max_ll(&r->rss_engine[i], bench_proc_rss(side->engine_pid[i]));
}

static long long side_pss(const struct bench_side *side)
{
	long long total = 0, v;
	if ((v = bench_proc_pss(side->daemon_pid)) > 0)
		total += v;
	if ((v = bench_proc_pss(0)) > 0)
		total += v;
	for (uint32_t i = 0; i < side->n_engines; i++)
		if ((v = bench_proc_pss(side->engine_pid[i])) > 0)
			total += v;
	return total;
}

static void pool_append(double **v, size_t *n, size_t *cap, const double *add, size_t n_add)
{
	if (*n + n_add > *cap) {
		size_t c = *cap ? *cap : 1024;
		while (c < *n + n_add)
			c *= 2;
		double *p = realloc(*v, c * sizeof(double));
		if (!p)
			bench_die("out of memory");
		*v = p;
		*cap = c;
	}
	memcpy(*v + *n, add, n_add * sizeof(double));
	*n += n_add;
}

/* One repeat of N streams; returns its aggregate rate. */
static double bench_run(const struct bench_opts *o, struct admin_conn *admin, long long n_streams,
			struct bench_result *r)
{
	int k = o->connections < n_streams ? o->connections : (int)n_streams;
	r->connections = k;
	struct bench_worker *w = calloc((size_t)k, sizeof(*w));
	pthread_t *th = calloc((size_t)k, sizeof(*th));
	pthread_barrier_t barrier;
	int timed_done = 0;
	if (!w || !th)
		bench_die("out of memory");
	pthread_barrier_init(&barrier, NULL, (unsigned)k + 1);
	for (int i = 0; i < k; i++) {
		struct bench_worker *wi = &w[i];
		wi->o = o;
		wi->barrier = &barrier;
		wi->timed_done = &timed_done;
		wi->n = (uint32_t)(n_streams / k + (i < n_streams % k));
		wi->st = calloc(wi->n, sizeof(*wi->st));
		wi->by_ptr = calloc(wi->n, sizeof(*wi->by_ptr));
		wi->ttft = calloc(wi->n, sizeof(double));
		wi->gaps = malloc((size_t)wi->n * (size_t)o->tokens * sizeof(double));
		if (!wi->st || !wi->by_ptr || !wi->ttft || !wi->gaps)
			bench_die("out of memory for %u streams of %lld tokens", wi->n, o->tokens);
		if (pthread_create(&th[i], NULL, worker_main, wi))
			bench_die("cannot start thread %d", i);
	}

	struct bench_side before, after;
	pthread_barrier_wait(&barrier); /* A */
	side_snapshot(admin, &before, NULL, NULL);
	side_sample_memory(admin, &before, r);
	pthread_barrier_wait(&barrier); /* B */
	double next_sample = bench_now() + BENCH_SAMPLE_S;
	while (__atomic_load_n(&timed_done, __ATOMIC_ACQUIRE) < k) {
		usleep(5000);
		if (bench_now() >= next_sample) {
			side_sample_memory(admin, &before, r);
			next_sample = bench_now() + BENCH_SAMPLE_S;
		}
	}
	side_snapshot(admin, &after, NULL, NULL);
	side_sample_memory(admin, &before, r);
	long long pss = side_pss(&before);
	max_ll(&r->pss_total, pss);
	pthread_barrier_wait(&barrier); /* C */
	for (int i = 0; i < k; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&barrier);

	double t_first = 1e300, t_last = 0;
	long long tokens = 0;
	for (int i = 0; i < k; i++) {
		struct bench_worker *wi = &w[i];
		if (wi->err)
			bench_die("%lld streams, connection %d: %s", n_streams, i + 1,
				  wi->msg[0] ? wi->msg : skv_strerror(wi->err));
		t_first = fmin(t_first, wi->t_first_request);
		t_last = fmax(t_last, wi->t_last_end);
		tokens += wi->tokens;
		pool_append(&r->ttft, &r->n_ttft, &r->cap_ttft, wi->ttft, wi->n_ttft);
		pool_append(&r->gaps, &r->n_gaps, &r->cap_gaps, wi->gaps, wi->n_gaps);
	}
	r->sinks = w[0].info.sinks;
	r->window = w[0].info.window;
	double wall = t_last - t_first;
	r->wall_s += wall;
	r->timed_tokens += tokens;
	r->steps += after.steps - before.steps;
	r->rows += after.rows - before.rows;
	r->itl_count += after.itl_count - before.itl_count;
	r->itl_sum_ns += after.itl_sum_ns - before.itl_sum_ns;
	r->cpu_engines_s += after.cpu_engines_s - before.cpu_engines_s;
	r->cpu_daemon_s += after.cpu_daemon_s - before.cpu_daemon_s;
	r->cpu_self_s += after.cpu_self_s - before.cpu_self_s;
	for (int i = 0; i < k; i++) {
		free(w[i].st);
		free(w[i].by_ptr);
		free(w[i].ttft);
		free(w[i].gaps);
	}
	free(w);
	free(th);
	return (double)tokens / wall;
}

/* ---- local mode: one stream in this process --------------------------------------------- */

static double bench_local(const struct bench_opts *o)
{
	char msg[512] = "", path[4096];
	const char *dir = getenv("SKV_MODEL_DIR");
	snprintf(path, sizeof(path), "%s/stories260K.bin", dir && *dir ? dir : SKV_MODEL_DIR);
	struct skv_model *m;
	struct skv_tokenizer *tok;
	struct skv_runner *r;
	struct skv_stream *s;
	struct skv_policy p;
	if (skv_model_open(path, &m, msg, sizeof(msg)) < 0)
		bench_die("--local: %s", msg);
	snprintf(path, sizeof(path), "%s/tok512.bin", dir && *dir ? dir : SKV_MODEL_DIR);
	if (skv_tokenizer_load(path, m->cfg.vocab_size, &tok, msg, sizeof(msg)) < 0 ||
	    skv_runner_new(m, 256, 1, &r, msg, sizeof(msg)) < 0)
		bench_die("--local: %s", msg);
	skv_policy_default(&p);
	p.kind = (enum skv_policy_kind)o->policy;
	p.window_slots = o->window;
	if (skv_policy_resolve(&p, m->cfg.seq_len, msg, sizeof(msg)) < 0 ||
	    skv_stream_new(r, &p, &s, msg, sizeof(msg)) < 0)
		bench_die("--local: %s", msg);
	int32_t *ids;
	size_t n;
	if (skv_tokenizer_encode(tok, o->prompt, strlen(o->prompt), 1, 0, &ids, &n) < 0)
		bench_die("out of memory");
	float *logits = malloc((size_t)m->cfg.vocab_size * sizeof(float));
	if (!logits)
		bench_die("out of memory");
	if (skv_stream_feed(s, ids, n, logits, NULL) < 0)
		bench_die("--local: the prompt does not fit the cache");
	int32_t prev = ids[n - 1];
	double t0 = 0;
	for (long long i = 0; i < o->warmup + o->tokens; i++) {
		if (i == o->warmup)
			t0 = bench_now();
		int32_t next = skv_argmax(logits, m->cfg.vocab_size);
		size_t len;
		skv_tokenizer_decode(tok, prev, next, &len);
		prev = next;
		if (skv_stream_feed(s, &next, 1, logits, NULL) < 0)
			bench_die("--local: the forward pass failed (a dense cache full?)");
	}
	double rate = (double)o->tokens / (bench_now() - t0);
	free(logits);
	free(ids);
	skv_stream_free(s);
	skv_runner_free(r);
	skv_tokenizer_free(tok);
	skv_model_close(m);
	return rate;
}

/* ---- reporting ---------------------------------------------------------------------------- */

static double mib(long long bytes)
{
	return (double)(bytes > 0 ? bytes : 0) / (1024.0 * 1024.0);
}

static long long rss_total(const struct bench_result *r)
{
	long long t = (r->rss_daemon > 0 ? r->rss_daemon : 0) + (r->rss_self > 0 ? r->rss_self : 0);
	for (uint32_t i = 0; i < r->n_engines; i++)
		t += r->rss_engine[i] > 0 ? r->rss_engine[i] : 0;
	return t;
}

/* CPU seconds over the runs' wall time: cores kept busy. */
static double cores(const struct bench_result *r, double cpu_s)
{
	return r->wall_s > 0 ? cpu_s / r->wall_s : 0.0;
}

/* Tokens per CPU second of the engines: what batching buys, whatever else runs. */
static double tokens_per_cpu_s(const struct bench_result *r)
{
	return r->cpu_engines_s > 0 ? (double)r->timed_tokens / r->cpu_engines_s : 0.0;
}

static double engine_itl_s(const struct bench_result *r)
{
	return r->itl_count ? (double)r->itl_sum_ns * 1e-9 / (double)r->itl_count : 0.0;
}

static void report_header(const struct bench_opts *o, const struct bench_result *r)
{
	printf("skv-bench: %s, policy %s (%lld sinks + %lld window), %lld tokens per stream",
	       o->admin_path, skv_policy_name((enum skv_policy_kind)o->policy),
	       (long long)r->sinks, (long long)r->window, o->tokens);
	if (o->warmup)
		printf(" after %lld untimed", o->warmup);
	printf(", median of %d\n", o->repeats);
	printf("%7s %5s %8s %7s %17s %15s %7s %6s %11s %8s %7s %s\n", "streams", "conns",
	       "tokens/s", "/stream", "ttft p50/p99 ms", "itl p50/p99 ms", "eng itl", "rows/",
	       "cpu cores", "tokens/", "arena", "rss MiB");
	printf("%7s %5s %8s %7s %17s %15s %7s %6s %11s %8s %7s %s\n", "", "", "", "", "", "",
	       "mean ms", "step", "eng + bench", "eng cpu-s", "MiB", "daemon + engines + bench = total");
}

static void report_row(const struct bench_opts *o, const struct bench_result *r)
{
	double rate = r->rates[o->repeats / 2];
	printf("%7lld %5d %8.0f %7.0f %8.2f/%8.2f %7.3f/%7.2f %7.3f %6.1f %5.2f+%5.2f %8.0f %7.1f "
	       "%.0f +",
	       r->streams, r->connections, rate, rate / (double)r->streams,
	       bench_pct(r->ttft, r->n_ttft, 50) * 1e3, bench_pct(r->ttft, r->n_ttft, 99) * 1e3,
	       bench_pct(r->gaps, r->n_gaps, 50) * 1e3, bench_pct(r->gaps, r->n_gaps, 99) * 1e3,
	       engine_itl_s(r) * 1e3, r->rows_per_step, cores(r, r->cpu_engines_s),
	       cores(r, r->cpu_self_s), tokens_per_cpu_s(r), mib((long long)r->arena_used),
	       mib(r->rss_daemon));
	for (uint32_t i = 0; i < r->n_engines; i++)
		printf("%s%.0f", i ? "+" : " ", mib(r->rss_engine[i]));
	printf(" + %.0f = %.0f\n", mib(r->rss_self), mib(rss_total(r)));
}

static void report_json(const struct bench_opts *o, const struct bench_result *r)
{
	double rate = r->rates[o->repeats / 2];
	printf("{\"streams\": %lld, \"tokens\": %lld, \"warmup_tokens\": %lld, \"connections\": %d, "
	       "\"repeats\": %d, \"policy\": \"%s\", \"sinks\": %lld, \"window\": %lld, "
	       "\"tokens_per_s\": %.1f, \"tokens_per_s_min\": %.1f, \"tokens_per_s_max\": %.1f, "
	       "\"ttft_p50_s\": %.6f, \"ttft_p99_s\": %.6f, \"itl_p50_s\": %.6f, "
	       "\"itl_p99_s\": %.6f, \"engine_itl_mean_s\": %.6f, \"rows_per_step\": %.2f, "
	       "\"engine_cpu_cores\": %.3f, \"daemon_cpu_cores\": %.3f, \"bench_cpu_cores\": %.3f, "
	       "\"tokens_per_engine_cpu_s\": %.1f, \"arena_used_bytes\": %llu, "
	       "\"arena_bytes\": %llu, \"rss_bytes\": %lld, \"rss_daemon_bytes\": %lld, "
	       "\"rss_engine_bytes\": [",
	       r->streams, o->tokens, o->warmup, r->connections, o->repeats,
	       skv_policy_name((enum skv_policy_kind)o->policy), (long long)r->sinks,
	       (long long)r->window, rate, r->rates[0], r->rates[o->repeats - 1],
	       bench_pct(r->ttft, r->n_ttft, 50), bench_pct(r->ttft, r->n_ttft, 99),
	       bench_pct(r->gaps, r->n_gaps, 50), bench_pct(r->gaps, r->n_gaps, 99),
	       engine_itl_s(r), r->rows_per_step, cores(r, r->cpu_engines_s),
	       cores(r, r->cpu_daemon_s), cores(r, r->cpu_self_s), tokens_per_cpu_s(r),
	       (unsigned long long)r->arena_used,
	       (unsigned long long)r->arena_bytes, rss_total(r), r->rss_daemon);
	for (uint32_t i = 0; i < r->n_engines; i++)
		printf("%s%lld", i ? ", " : "", r->rss_engine[i]);
	printf("], \"rss_bench_bytes\": %lld, \"pss_bytes\": %lld", r->rss_self, r->pss_total);
	if (o->local)
		printf(", \"local_tokens_per_s\": %.1f", r->local_rates[o->repeats / 2]);
	printf("}");
}

/* ---- flags -------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
	fputs("usage: skv-bench [--socket PATH] (--streams N | --sweep N1,N2,...) [--tokens T]\n"
	      "                 [--warmup W] [--connections K] [--policy sink|window|dense|recompute]\n"
	      "                 [--window W] [--kv f32|f16] [--prompt TEXT] [--repeats R] [--local]\n"
	      "                 [--json]\n"
	      "  --socket PATH      skv-cached's socket (default: its default socket)\n"
	      "  --streams N        N concurrent streams (default 1)\n"
	      "  --sweep LIST       run each N of the list in turn: one row (JSON object) each\n"
	      "  --tokens T         timed tokens per stream (default 1000)\n"
	      "  --warmup W         untimed tokens per stream first, to fill the cache (default 0)\n"
	      "  --connections K    spread the streams over K connections, one thread each (default 1)\n"
	      "  --policy, --window the streams' cache (default: sink, the daemon's window)\n"
	      "  --kv f32|f16       the streams' KV element type (default f32)\n"
	      "  --prompt TEXT      every stream's prompt (default \"Once upon a time\")\n"
	      "  --repeats R        runs per N; the rate is their median (default 1)\n"
	      "  --local            also one stream in this process, no daemon\n"
	      "  --json             one JSON object (an array of them with --sweep)\n",
	      out);
}

static void parse_flags(int argc, char **argv, struct bench_opts *o)
{
	static const struct option longs[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "streams", required_argument, NULL, 'n' },
		{ "sweep", required_argument, NULL, 'S' },
		{ "tokens", required_argument, NULL, 't' },
		{ "warmup", required_argument, NULL, 'W' },
		{ "connections", required_argument, NULL, 'c' },
		{ "policy", required_argument, NULL, 'p' },
		{ "window", required_argument, NULL, 'w' },
		{ "kv", required_argument, NULL, 'k' },
		{ "prompt", required_argument, NULL, 'P' },
		{ "repeats", required_argument, NULL, 'r' },
		{ "local", no_argument, NULL, 'l' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int have_streams = 0, c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longs, NULL)) != -1) {
		switch (c) {
		case 's':
			if (!*optarg)
				bench_die("--socket: empty path");
			o->socket_path = optarg;
			break;
		case 'n':
			o->streams[0] = bench_parse_int("--streams", optarg, 1, BENCH_MAX_STREAMS);
			o->n_runs = 1;
			have_streams = 1;
			break;
		case 'S':
			o->n_runs = bench_parse_list("--sweep", optarg, 1, BENCH_MAX_STREAMS,
						     o->streams, BENCH_MAX_RUNS);
			o->sweep = 1;
			break;
		case 't': o->tokens = bench_parse_int("--tokens", optarg, 1, 1LL << 32); break;
		case 'W': o->warmup = bench_parse_int("--warmup", optarg, 0, 1LL << 32); break;
		case 'c':
			o->connections = (int)bench_parse_int("--connections", optarg, 1,
							      BENCH_MAX_CONNECTIONS);
			break;
		case 'w': o->window = bench_parse_int("--window", optarg, 1, 1 << 24); break;
		case 'r': o->repeats = (int)bench_parse_int("--repeats", optarg, 1, 1000); break;
		case 'P': o->prompt = optarg; break;
		case 'k':
			if (!strcmp(optarg, "f32"))
				o->kv = SKV_CLIENT_KV_F32;
			else if (!strcmp(optarg, "f16"))
				o->kv = SKV_CLIENT_KV_F16;
			else
				bench_die("--kv: '%s' is not f32 or f16", optarg);
			break;
		case 'l': o->local = 1; break;
		case 'j': o->json = 1; break;
		case 'p': {
			enum skv_policy_kind k;
			if (skv_policy_parse(optarg, &k) < 0)
				bench_die("--policy: unknown policy '%s' (sink, window, dense or "
					  "recompute)", optarg);
			o->policy = (int)k;
			break;
		}
		case 'h': usage(stdout); exit(0);
		case ':': bench_die("%s needs a value (see --help)", argv[optind - 1]);
		default:
			bench_die("unknown flag '%s' (see --help)", argv[optind - 1]);
		}
	}
	if (optind < argc)
		bench_die("unexpected argument '%s' (see --help)", argv[optind]);
	if (have_streams && o->sweep)
		bench_die("--streams and --sweep do not go together: --sweep N1,N2,... runs each N");
	if (o->socket_path)
		snprintf(o->admin_path, sizeof(o->admin_path), "%s", o->socket_path);
	else if (skv_default_socket_path(o->admin_path, sizeof(o->admin_path)) < 0)
		bench_die("the default socket path is too long; pass --socket");
	if (strlen(o->admin_path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		bench_die("--socket: '%s' is too long for a Unix socket", o->admin_path);
	for (size_t i = 0; i < o->n_runs; i++)
		if ((double)o->streams[i] * (double)o->tokens * sizeof(double) > 8e9)
			bench_die("%lld streams x %lld tokens: too many latencies to keep (lower "
				  "--tokens)", o->streams[i], o->tokens);
}

int main(int argc, char **argv)
{
	struct bench_opts o = { .prompt = "Once upon a time", .streams = { 1 }, .n_runs = 1,
				.tokens = 1000, .repeats = 1, .connections = 1, .window = -1 };
	parse_flags(argc, argv, &o);
	signal(SIGPIPE, SIG_IGN);
	/* Each stream costs a client an fd (its engine's eventfd): a thousand streams need more
	 * than the usual soft limit of 1024. */
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		setrlimit(RLIMIT_NOFILE, &nofile);
	}

	struct admin_conn admin;
	char msg[320];
	if (admin_connect(&admin, o.admin_path, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);

	if (o.json && o.sweep)
		printf("[");
	for (size_t run = 0; run < o.n_runs; run++) {
		struct bench_result r = { .streams = o.streams[run] };
		r.rates = calloc((size_t)o.repeats, sizeof(double));
		r.local_rates = calloc((size_t)o.repeats, sizeof(double));
		if (!r.rates || !r.local_rates)
			bench_die("out of memory");
		for (int rep = 0; rep < o.repeats; rep++) {
			if (o.local)
				r.local_rates[rep] = bench_local(&o);
			r.rates[rep] = bench_run(&o, &admin, r.streams, &r);
		}
		qsort(r.rates, (size_t)o.repeats, sizeof(double), bench_cmp_double);
		qsort(r.local_rates, (size_t)o.repeats, sizeof(double), bench_cmp_double);
		qsort(r.ttft, r.n_ttft, sizeof(double), bench_cmp_double);
		qsort(r.gaps, r.n_gaps, sizeof(double), bench_cmp_double);
		r.rows_per_step = r.steps ? (double)r.rows / (double)r.steps : 0.0;
		if (o.json) {
			printf("%s", run ? ",\n " : "");
			report_json(&o, &r);
		} else {
			if (!run)
				report_header(&o, &r);
			report_row(&o, &r);
		}
		fflush(stdout);
		if (!o.json && o.local && run + 1 == o.n_runs)
			printf("local: one stream in this process, no daemon: %.0f tokens/s\n",
			       r.local_rates[o.repeats / 2]);
		free(r.rates);
		free(r.local_rates);
		free(r.ttft);
		free(r.gaps);
	}
	if (o.json)
		printf(o.sweep ? "]\n" : "\n");
	admin_disconnect(&admin);
	if (fflush(stdout) || ferror(stdout))
		bench_die("writing the report: %s", strerror(errno));
	return 0;
}
