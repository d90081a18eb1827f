/* skv-bench: many streams through a running skv-cached, measured from the client side.
 *
 *   skv-bench --socket PATH (--streams N | --sweep N1,N2,...) --tokens T [--warmup W]
 *             [--connections K] [--policy P] [--window W] [--prompt TEXT] [--repeats R]
 *             [--local] [--json] [--series FILE [--sample-every N]]
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
 * same runs, for the cost of the data path.
 *
 * --series FILE: the time series of one run (one N, one repeat), for endless streams: a CSV
 * row every --sample-every tokens per stream (default tokens / 100) and one at the end. A row
 * ends when the streams' timed tokens together reach k * N * every (tokens_per_stream is their
 * mean); the worker whose token reaches it stamps the time and the gaps counted so far, and
 * the main thread, polling every 5 ms, adds the resident sets (one /proc/PID/statm read per
 * process) and the arena in use (one admin request) and writes the row. Columns:
 *   tokens_per_stream      at the end of the row
 *   elapsed_s              since the timed requests were sent
 *   interval_tokens_per_s  aggregate: the row's tokens, all streams, over the row's time
 *   interval_us_per_token  per stream: the mean gap between consecutive TOKENs of a stream
 *                          within the row (empty if the row holds no such gap)
 *   daemon_rss_bytes, engines_rss_bytes (their sum), bench_rss_bytes, arena_used_bytes
 *   streams_done           streams that had all their tokens before the row's last token:
 *                          while it is 0 every stream ran through the row; at the end of a
 *                          many-stream run, streams of a faster engine finish first and the
 *                          aggregate rate of the last rows falls with the streams still going
 * The rows are flushed as they are written, so a long run's file is readable while it goes.
 * Nothing in the series grows with the tokens: per-token gaps are not kept (the report's ITL
 * percentiles are "-"), so this process's resident set stays flat too. The report adds the
 * first row's rate, that of the last row with every stream running, and their ratio (flat =
 * 1). Requests are not capped: a generate
 * request's count is a uint64 from libskv to the engine, so --tokens 4000000 is one request
 * per stream. */
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
#define BENCH_MAX_SERIES_ROWS 100000 /* rows of --series */

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
	const char *series_path;   /* --series, or NULL */
	FILE *series;              /* open for writing, header written */
	long long sample_every;    /* tokens per stream per row of the series */
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

/* One row of --series. The worker whose token ends the row writes t, gap_ns and gaps, then
 * ready (release, paired with the acquire in series_drain); the main thread writes the rest. */
struct bench_series_row {
	double t;                   /* the row's last token was read */
	uint64_t gap_ns, gaps;      /* all workers' timed gaps until then: sum (ns), count */
	uint64_t streams_done;      /* streams finished before the row's last token */
	int ready;
	double tokens_per_s, us_per_token; /* the row's interval; us_per_token < 0: no gap */
	long long rss_daemon, rss_engines, rss_self;
	uint64_t arena_used;
};

struct bench_worker;

/* The time series of one run (--series). */
struct bench_series {
	long long streams, tokens, every, n_rows;
	double t0;                  /* the timed requests are about to be sent */
	uint64_t total;             /* timed TOKENs of every stream so far (atomic, all workers) */
	uint64_t streams_done;      /* streams with all their timed TOKENs (atomic, all workers) */
	struct bench_worker *workers; /* [n_workers], whose gap counters a row sums */
	int n_workers;
	long long next;             /* the main thread's next row to write */
	struct bench_series_row *rows; /* [n_rows] */
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
	double *gaps;               /* [n * tokens]; NULL with --series */
	size_t n_gaps;
	struct bench_series *series; /* or NULL */
	uint64_t gap_ns, gap_count; /* series: timed gaps so far (written by this worker, atomic) */
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
	struct bench_series *series; /* --series, or NULL */
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

/* --series: one more timed token, read at now; last: the stream's last. The token that brings
 * the streams' total to a row's end stamps that row: time, gaps so far, streams finished. */
static void worker_series_count(struct bench_worker *w, double now, int last)
{
	struct bench_series *ser = w->series;
	uint64_t total = __atomic_add_fetch(&ser->total, 1, __ATOMIC_RELAXED);
	long long k = bench_series_row_at(total, ser->streams, ser->tokens, ser->every);
	if (last)
		__atomic_add_fetch(&ser->streams_done, 1, __ATOMIC_RELAXED);
	if (k < 0)
		return;
	struct bench_series_row *row = &ser->rows[k];
	row->t = now;
	row->streams_done = __atomic_load_n(&ser->streams_done, __ATOMIC_RELAXED) - (last != 0);
	for (int i = 0; i < ser->n_workers; i++) {
		row->gap_ns += __atomic_load_n(&ser->workers[i].gap_ns, __ATOMIC_RELAXED);
		row->gaps += __atomic_load_n(&ser->workers[i].gap_count, __ATOMIC_RELAXED);
	}
	__atomic_store_n(&row->ready, 1, __ATOMIC_RELEASE); /* paired with series_drain */
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
				if (!b->tokens && ttft) {
					w->ttft[w->n_ttft++] = now - b->t_request;
				} else if (b->tokens && timed && w->gaps) {
					w->gaps[w->n_gaps++] = now - b->t_last;
				} else if (b->tokens && timed) {
					uint64_t ns = (uint64_t)((now - b->t_last) * 1e9);
					__atomic_fetch_add(&w->gap_ns, ns, __ATOMIC_RELAXED);
					__atomic_fetch_add(&w->gap_count, 1, __ATOMIC_RELAXED);
				}
				b->t_last = now;
				b->tokens++;
				if (timed && w->series)
					worker_series_count(w, now, b->tokens == tokens);
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

/* --series: write every row the workers have ended, in order, each with the resident sets and
 * the arena as they are now (within the 5 ms poll of the row's end). */
static void series_drain(const struct bench_opts *o, struct admin_conn *admin,
			 const struct bench_side *side, struct bench_result *r)
{
	struct bench_series *ser = r->series;
	while (ser->next < ser->n_rows &&
	       __atomic_load_n(&ser->rows[ser->next].ready, __ATOMIC_ACQUIRE)) {
		long long k = ser->next++;
		struct bench_series_row *row = &ser->rows[k];
		const struct bench_series_row *prev = k ? &ser->rows[k - 1] : NULL;
		double t_prev = prev ? prev->t : ser->t0;
		long long mark_prev = k ? bench_series_mark(k - 1, ser->tokens, ser->every) : 0;
		long long mark = bench_series_mark(k, ser->tokens, ser->every);
		uint64_t gaps = row->gaps - (prev ? prev->gaps : 0);
		uint64_t gap_ns = row->gap_ns - (prev ? prev->gap_ns : 0);
		row->tokens_per_s = row->t > t_prev ? (double)((mark - mark_prev) * ser->streams) /
							      (row->t - t_prev)
						    : 0.0;
		row->us_per_token = gaps ? (double)gap_ns / (double)gaps * 1e-3 : -1.0;

		struct admin_snapshot snap;
		char msg[320];
		if (admin_fetch(admin, 0, &snap, msg, sizeof(msg)) < 0)
			bench_die("asking skv-cached for its arenas: %s", msg);
		row->arena_used = snap.server.arena_used_bytes;
		admin_snapshot_free(&snap);
		row->rss_daemon = bench_proc_rss(side->daemon_pid);
		row->rss_self = bench_proc_rss(0);
		row->rss_engines = 0;
		for (uint32_t i = 0; i < side->n_engines; i++) {
			long long v = bench_proc_rss(side->engine_pid[i]);
			row->rss_engines += v > 0 ? v : 0;
		}
		max_ll(&r->rss_daemon, row->rss_daemon);
		max_ll(&r->rss_self, row->rss_self);
		if (row->arena_used > r->arena_used)
			r->arena_used = row->arena_used;

		fprintf(o->series, "%lld,%.6f,%.1f,", mark, row->t - ser->t0, row->tokens_per_s);
		if (row->us_per_token >= 0)
			fprintf(o->series, "%.3f", row->us_per_token);
		fprintf(o->series, ",%lld,%lld,%lld,%llu,%llu\n", row->rss_daemon, row->rss_engines,
			row->rss_self, (unsigned long long)row->arena_used,
			(unsigned long long)row->streams_done);
		if (fflush(o->series) || ferror(o->series))
			bench_die("writing %s: %s", o->series_path, strerror(errno));
	}
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
	if (r->series) {
		r->series->workers = w;
		r->series->n_workers = k;
	}
	for (int i = 0; i < k; i++) {
		struct bench_worker *wi = &w[i];
		wi->o = o;
		wi->barrier = &barrier;
		wi->timed_done = &timed_done;
		wi->n = (uint32_t)(n_streams / k + (i < n_streams % k));
		wi->st = calloc(wi->n, sizeof(*wi->st));
		wi->by_ptr = calloc(wi->n, sizeof(*wi->by_ptr));
		wi->ttft = calloc(wi->n, sizeof(double));
		wi->series = r->series;
		if (!r->series)
			wi->gaps = malloc((size_t)wi->n * (size_t)o->tokens * sizeof(double));
		if (!wi->st || !wi->by_ptr || !wi->ttft || (!wi->gaps && !r->series))
			bench_die("out of memory for %u streams of %lld tokens", wi->n, o->tokens);
		if (pthread_create(&th[i], NULL, worker_main, wi))
			bench_die("cannot start thread %d", i);
	}

	struct bench_side before, after;
	pthread_barrier_wait(&barrier); /* A */
	side_snapshot(admin, &before, NULL, NULL);
	side_sample_memory(admin, &before, r);
	if (r->series)
		r->series->t0 = bench_now();
	pthread_barrier_wait(&barrier); /* B */
	double next_sample = bench_now() + BENCH_SAMPLE_S;
	while (__atomic_load_n(&timed_done, __ATOMIC_ACQUIRE) < k) {
		usleep(5000);
		if (r->series)
			series_drain(o, admin, &before, r);
		if (bench_now() >= next_sample) {
			side_sample_memory(admin, &before, r);
			next_sample = bench_now() + BENCH_SAMPLE_S;
		}
	}
	if (r->series)
		series_drain(o, admin, &before, r); /* the workers' last rows (acquire: timed_done) */
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
	char itl[32] = "      -/      -"; /* --series keeps no per-token gaps */
	if (r->n_gaps)
		snprintf(itl, sizeof(itl), "%7.3f/%7.2f", bench_pct(r->gaps, r->n_gaps, 50) * 1e3,
			 bench_pct(r->gaps, r->n_gaps, 99) * 1e3);
	printf("%7lld %5d %8.0f %7.0f %8.2f/%8.2f %15s %7.3f %6.1f %5.2f+%5.2f %8.0f %7.1f "
	       "%.0f +",
	       r->streams, r->connections, rate, rate / (double)r->streams,
	       bench_pct(r->ttft, r->n_ttft, 50) * 1e3, bench_pct(r->ttft, r->n_ttft, 99) * 1e3,
	       itl, engine_itl_s(r) * 1e3, r->rows_per_step, cores(r, r->cpu_engines_s),
	       cores(r, r->cpu_self_s), tokens_per_cpu_s(r), mib((long long)r->arena_used),
	       mib(r->rss_daemon));
	for (uint32_t i = 0; i < r->n_engines; i++)
		printf("%s%.0f", i ? "+" : " ", mib(r->rss_engine[i]));
	printf(" + %.0f = %.0f\n", mib(r->rss_self), mib(rss_total(r)));
}

/* --series: the last row through which every stream ran (streams_done 0), or the last row. */
static long long series_last_full(const struct bench_series *ser)
{
	for (long long k = ser->next - 1; k >= 0; k--)
		if (!ser->rows[k].streams_done)
			return k;
	return ser->next - 1;
}

static void report_json(const struct bench_opts *o, const struct bench_result *r)
{
	double rate = r->rates[o->repeats / 2];
	/* --series keeps no per-token gaps */
	char itl50[32] = "null", itl99[32] = "null", itlmax[32] = "null";
	if (r->n_gaps) {
		snprintf(itl50, sizeof(itl50), "%.6f", bench_pct(r->gaps, r->n_gaps, 50));
		snprintf(itl99, sizeof(itl99), "%.6f", bench_pct(r->gaps, r->n_gaps, 99));
		snprintf(itlmax, sizeof(itlmax), "%.6f", bench_pct(r->gaps, r->n_gaps, 100));
	}
	printf("{\"streams\": %lld, \"tokens\": %lld, \"warmup_tokens\": %lld, \"connections\": %d, "
	       "\"repeats\": %d, \"policy\": \"%s\", \"sinks\": %lld, \"window\": %lld, "
	       "\"tokens_per_s\": %.1f, \"tokens_per_s_min\": %.1f, \"tokens_per_s_max\": %.1f, "
	       "\"ttft_p50_s\": %.6f, \"ttft_p99_s\": %.6f, \"itl_p50_s\": %s, "
	       "\"itl_p99_s\": %s, \"itl_max_s\": %s, \"engine_itl_mean_s\": %.6f, "
	       "\"rows_per_step\": %.2f, "
	       "\"engine_cpu_cores\": %.3f, \"daemon_cpu_cores\": %.3f, \"bench_cpu_cores\": %.3f, "
	       "\"tokens_per_engine_cpu_s\": %.1f, \"arena_used_bytes\": %llu, "
	       "\"arena_bytes\": %llu, \"rss_bytes\": %lld, \"rss_daemon_bytes\": %lld, "
	       "\"rss_engine_bytes\": [",
	       r->streams, o->tokens, o->warmup, r->connections, o->repeats,
	       skv_policy_name((enum skv_policy_kind)o->policy), (long long)r->sinks,
	       (long long)r->window, rate, r->rates[0], r->rates[o->repeats - 1],
	       bench_pct(r->ttft, r->n_ttft, 50), bench_pct(r->ttft, r->n_ttft, 99), itl50, itl99,
	       itlmax,
	       engine_itl_s(r), r->rows_per_step, cores(r, r->cpu_engines_s),
	       cores(r, r->cpu_daemon_s), cores(r, r->cpu_self_s), tokens_per_cpu_s(r),
	       (unsigned long long)r->arena_used,
	       (unsigned long long)r->arena_bytes, rss_total(r), r->rss_daemon);
	for (uint32_t i = 0; i < r->n_engines; i++)
		printf("%s%lld", i ? ", " : "", r->rss_engine[i]);
	printf("], \"rss_bench_bytes\": %lld, \"pss_bytes\": %lld", r->rss_self, r->pss_total);
	if (o->local)
		printf(", \"local_tokens_per_s\": %.1f", r->local_rates[o->repeats / 2]);
	const struct bench_series *ser = r->series;
	if (ser && ser->next) {
		/* last: the last row every stream ran through (see report_series) */
		long long k = series_last_full(ser);
		const struct bench_series_row *first = &ser->rows[0], *last = &ser->rows[k];
		printf(", \"series_rows\": %lld, \"series_every\": %lld, "
		       "\"series_rows_all_streams\": %lld, "
		       "\"series_first_tokens_per_s\": %.1f, \"series_last_tokens_per_s\": %.1f, "
		       "\"series_last_over_first\": %.4f, \"series_first_us_per_token\": %.3f, "
		       "\"series_last_us_per_token\": %.3f",
		       ser->next, ser->every, k + 1, first->tokens_per_s, last->tokens_per_s,
		       first->tokens_per_s > 0 ? last->tokens_per_s / first->tokens_per_s : 0.0,
		       first->us_per_token, last->us_per_token);
	}
	printf("}");
}

/* --series: the first row against the last with every stream running (flat = a ratio of 1),
 * the spread of those rows' rates, and the resident sets at the first row, the last, and the
 * largest. */
static void report_series(const struct bench_opts *o, const struct bench_result *r)
{
	const struct bench_series *ser = r->series;
	if (!ser->next) {
		printf("series %s: no row\n", o->series_path);
		return;
	}
	long long n_full = series_last_full(ser) + 1;
	const struct bench_series_row *first = &ser->rows[0], *full = &ser->rows[n_full - 1];
	const struct bench_series_row *last = &ser->rows[ser->next - 1];
	double *rates = malloc((size_t)n_full * sizeof(double));
	if (!rates)
		bench_die("out of memory");
	long long max_daemon = 0, max_engines = 0, max_self = 0;
	for (long long k = 0; k < ser->next; k++) {
		if (k < n_full)
			rates[k] = ser->rows[k].tokens_per_s;
		max_ll(&max_daemon, ser->rows[k].rss_daemon);
		max_ll(&max_engines, ser->rows[k].rss_engines);
		max_ll(&max_self, ser->rows[k].rss_self);
	}
	double median = bench_median(rates, (size_t)n_full); /* sorts rates */
	printf("series %s: %lld rows, one every %lld tokens per stream; every stream ran through "
	       "the first %lld\n",
	       o->series_path, ser->next, ser->every, n_full);
	printf("  interval tokens/s: first %.0f, last of those %.0f (last/first %.3f); min %.0f, "
	       "median %.0f, max %.0f; last row %.0f\n",
	       first->tokens_per_s, full->tokens_per_s,
	       first->tokens_per_s > 0 ? full->tokens_per_s / first->tokens_per_s : 0.0, rates[0],
	       median, rates[n_full - 1], last->tokens_per_s);
	printf("  us/token per stream: first %.2f, last of those %.2f, last row %.2f\n",
	       first->us_per_token, full->us_per_token, last->us_per_token);
	printf("  rss MiB first/last/max: daemon %.1f/%.1f/%.1f, engines (sum) %.1f/%.1f/%.1f, "
	       "bench %.1f/%.1f/%.1f; arena in use MiB first/last %.2f/%.2f\n",
	       mib(first->rss_daemon), mib(last->rss_daemon), mib(max_daemon),
	       mib(first->rss_engines), mib(last->rss_engines), mib(max_engines),
	       mib(first->rss_self), mib(last->rss_self), mib(max_self),
	       mib((long long)first->arena_used), mib((long long)last->arena_used));
	free(rates);
}

/* ---- flags -------------------------------------------------------------------------------- */

static void usage(FILE *out)
{
	fputs("usage: skv-bench [--socket PATH] (--streams N | --sweep N1,N2,...) [--tokens T]\n"
	      "                 [--warmup W] [--connections K] [--policy sink|window|dense|recompute]\n"
	      "                 [--window W] [--kv f32|f16|q8] [--prompt TEXT] [--repeats R] [--local]\n"
	      "                 [--json] [--series FILE [--sample-every N]]\n"
	      "  --socket PATH      skv-cached's socket (default: its default socket)\n"
	      "  --streams N        N concurrent streams (default 1)\n"
	      "  --sweep LIST       run each N of the list in turn: one row (JSON object) each\n"
	      "  --tokens T         timed tokens per stream (default 1000)\n"
	      "  --warmup W         untimed tokens per stream first, to fill the cache (default 0)\n"
	      "  --connections K    spread the streams over K connections, one thread each (default 1)\n"
	      "  --policy, --window the streams' cache (default: sink, the daemon's window)\n"
	      "  --kv f32|f16|q8    the streams' KV element type (default f32)\n"
	      "  --prompt TEXT      every stream's prompt (default \"Once upon a time\")\n"
	      "  --repeats R        runs per N; the rate is their median (default 1)\n"
	      "  --local            also one stream in this process, no daemon\n"
	      "  --json             one JSON object (an array of them with --sweep)\n"
	      "  --series FILE      one run's time series as CSV: a row every --sample-every\n"
	      "                     tokens per stream (rate, us/token, RSS, arena); one N, one repeat\n"
	      "  --sample-every N   tokens per stream per row of --series (default: tokens / 100)\n",
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
		{ "series", required_argument, NULL, 'o' },
		{ "sample-every", required_argument, NULL, 'e' },
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
			else if (!strcmp(optarg, "q8"))
				o->kv = SKV_CLIENT_KV_Q8;
			else
				bench_die("--kv: '%s' is not f32, f16 or q8", optarg);
			break;
		case 'l': o->local = 1; break;
		case 'o':
			if (!*optarg)
				bench_die("--series: empty path");
			o->series_path = optarg;
			break;
		case 'e':
			o->sample_every = bench_parse_int("--sample-every", optarg, 1, 1LL << 32);
			break;
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
	if (o->sample_every && !o->series_path)
		bench_die("--sample-every sets the rows of --series: give --series FILE too");
	if (o->series_path) {
		if (o->sweep)
			bench_die("--series records one run: use --streams N, not --sweep");
		if (o->repeats > 1)
			bench_die("--series records one run: --repeats must be 1");
		if (!o->sample_every)
			o->sample_every = bench_series_every(o->tokens);
		if (bench_series_rows(o->tokens, o->sample_every) > BENCH_MAX_SERIES_ROWS)
			bench_die("--sample-every %lld: %lld tokens make more than %d rows; sample "
				  "less often", o->sample_every, o->tokens, BENCH_MAX_SERIES_ROWS);
		o->series = fopen(o->series_path, "w");
		if (!o->series)
			bench_die("--series: cannot write '%s': %s", o->series_path,
				  strerror(errno));
		fputs("tokens_per_stream,elapsed_s,interval_tokens_per_s,interval_us_per_token,"
		      "daemon_rss_bytes,engines_rss_bytes,bench_rss_bytes,arena_used_bytes,"
		      "streams_done\n",
		      o->series);
		return; /* per-token gaps are not kept */
	}
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
		struct bench_series series = { .streams = r.streams, .tokens = o.tokens,
					       .every = o.sample_every };
		if (o.series) {
			series.n_rows = bench_series_rows(o.tokens, o.sample_every);
			series.rows = calloc((size_t)series.n_rows, sizeof(*series.rows));
			if (!series.rows)
				bench_die("out of memory");
			r.series = &series;
		}
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
		if (!o.json && r.series)
			report_series(&o, &r);
		free(series.rows);
		free(r.rates);
		free(r.local_rates);
		free(r.ttft);
		free(r.gaps);
	}
	if (o.json)
		printf(o.sweep ? "]\n" : "\n");
	admin_disconnect(&admin);
	if (o.series && fclose(o.series))
		bench_die("writing %s: %s", o.series_path, strerror(errno));
	if (fflush(stdout) || ferror(stdout))
		bench_die("writing the report: %s", strerror(errno));
	return 0;
}
