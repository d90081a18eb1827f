/* skv-bench: streams through a running skv-cached, measured from the client side.
 *
 *   skv-bench --socket PATH --streams N --tokens T [--policy P] [--window W] [--prompt TEXT]
 *             [--repeats R] [--local] [--json]
 *
 * N client threads (one libskv connection and one stream each) send the same prompt and ask
 * for T tokens, greedy, at the same moment. Reported: aggregate tokens/s (all tokens over the
 * wall time of the slowest stream), time to first token (request sent -> first TOKEN), and
 * inter-token latency (gaps between consecutive TOKENs of a stream), as p50 and p99 over all
 * streams; memory: arena bytes in use (from the daemon) and the resident set of the daemon, of
 * each engine and of this process. --local also runs one stream of T tokens in this process
 * (the engine linked in, no daemon) in the same run, for the cost of the data path.
 * Medians over --repeats runs where it says so. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

struct bench_opts {
	const char *socket_path;
	const char *prompt;
	int streams;
	long tokens;
	int repeats;
	int policy;
	long long window;
	int local;
	int json;
};

struct bench_stream {
	const struct bench_opts *o;
	pthread_barrier_t *start;
	double t_request, t_first, t_end;
	double *gaps;      /* [tokens] inter-token gaps */
	long n_gaps;
	long tokens;
	int err;
	char msg[256];
};

static void *bench_thread(void *arg)
{
	struct bench_stream *b = arg;
	const struct bench_opts *o = b->o;
	struct skv_client *c = NULL;
	struct skv_client_stream *s = NULL;
	b->err = skv_client_connect(o->socket_path, &c, b->msg, sizeof(b->msg));
	if (!b->err) {
		skv_client_opts *co = NULL;
		b->err = skv_client_opts_new(&co);
		if (!b->err)
			b->err = skv_client_opts_policy(co, (enum skv_client_policy)o->policy);
		if (!b->err)
			b->err = skv_client_opts_window(co, o->window);
		if (!b->err)
			b->err = skv_client_stream_open(c, co, &s);
		if (b->err)
			snprintf(b->msg, sizeof(b->msg), "%s", skv_client_last_error(c));
		skv_client_opts_free(co);
	}
	pthread_barrier_wait(b->start);
	if (b->err)
		goto out;
	b->t_request = bench_now();
	b->err = skv_client_stream_generate(s, o->prompt, strlen(o->prompt), (uint64_t)o->tokens,
					    SKV_CLIENT_ENDLESS);
	double last = 0.0;
	while (!b->err) {
		struct skv_client_event ev;
		int got = skv_client_stream_read(s, &ev, -1);
		if (got < 0) {
			b->err = got;
			snprintf(b->msg, sizeof(b->msg), "%s", skv_client_last_error(c));
			break;
		}
		double now = bench_now();
		if (ev.type == SKV_CLIENT_EV_TOKEN) {
			if (!b->tokens)
				b->t_first = now;
			else if (b->n_gaps < o->tokens)
				b->gaps[b->n_gaps++] = now - last;
			last = now;
			b->tokens++;
		} else if (ev.type == SKV_CLIENT_EV_DONE) {
			b->t_end = now;
			break;
		} else if (ev.type == SKV_CLIENT_EV_ERROR) {
			snprintf(b->msg, sizeof(b->msg), "%.*s", (int)ev.len, ev.text);
			b->err = -EIO;
		}
	}
out:
	skv_client_stream_close(s);
	skv_client_disconnect(c);
	return NULL;
}

static long bench_rss_kib(int pid)
{
	char path[64], line[256];
	snprintf(path, sizeof(path), "/proc/%d/status", pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long kib = -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/* One stream of T tokens in this process: the engine without the daemon. */
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
		bench_die("%s", msg);
	snprintf(path, sizeof(path), "%s/tok512.bin", dir && *dir ? dir : SKV_MODEL_DIR);
	if (skv_tokenizer_load(path, m->cfg.vocab_size, &tok, msg, sizeof(msg)) < 0 ||
	    skv_runner_new(m, 256, 1, &r, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	skv_policy_default(&p);
	p.kind = (enum skv_policy_kind)o->policy;
	p.window_slots = o->window;
	if (skv_policy_resolve(&p, m->cfg.seq_len, msg, sizeof(msg)) < 0 ||
	    skv_stream_new(r, &p, &s, msg, sizeof(msg)) < 0)
		bench_die("%s", msg);
	int32_t *ids;
	size_t n;
	if (skv_tokenizer_encode(tok, o->prompt, strlen(o->prompt), 1, 0, &ids, &n) < 0)
		bench_die("out of memory");
	float *logits = malloc((size_t)m->cfg.vocab_size * sizeof(float));
	skv_stream_feed(s, ids, n, logits, NULL);
	double t0 = bench_now();
	for (long i = 0; i < o->tokens; i++) {
		int32_t next = skv_argmax(logits, m->cfg.vocab_size);
		size_t len;
		skv_tokenizer_decode(tok, ids[n - 1], next, &len);
		if (skv_stream_feed(s, &next, 1, logits, NULL) < 0)
			bench_die("local forward failed");
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

int main(int argc, char **argv)
{
	static const struct option longs[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "streams", required_argument, NULL, 'n' },
		{ "tokens", required_argument, NULL, 't' },
		{ "policy", required_argument, NULL, 'p' },
		{ "window", required_argument, NULL, 'w' },
		{ "prompt", required_argument, NULL, 'P' },
		{ "repeats", required_argument, NULL, 'r' },
		{ "local", no_argument, NULL, 'l' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct bench_opts o = { .prompt = "Once upon a time", .streams = 1, .tokens = 1000,
				.repeats = 1, .window = -1 };
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
		switch (c) {
		case 's': o.socket_path = optarg; break;
		case 'n': o.streams = (int)bench_parse_int("--streams", optarg, 1, 4096); break;
		case 't': o.tokens = bench_parse_int("--tokens", optarg, 1, 1L << 40); break;
		case 'w': o.window = bench_parse_int("--window", optarg, 1, 1 << 24); break;
		case 'r': o.repeats = (int)bench_parse_int("--repeats", optarg, 1, 1000); break;
		case 'P': o.prompt = optarg; break;
		case 'l': o.local = 1; break;
		case 'j': o.json = 1; break;
		case 'p': {
			enum skv_policy_kind k;
			if (skv_policy_parse(optarg, &k) < 0)
				bench_die("--policy: unknown policy '%s'", optarg);
			o.policy = (int)k;
			break;
		}
		case 'h':
			puts("usage: skv-bench --socket PATH --streams N --tokens T [--policy P] "
			     "[--window W] [--prompt TEXT] [--repeats R] [--local] [--json]");
			return 0;
		default: bench_die("unknown or incomplete flag '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc)
		bench_die("unexpected argument '%s'", argv[optind]);

	double *rates = calloc((size_t)o.repeats, sizeof(double));
	double *locals = calloc((size_t)o.repeats, sizeof(double));
	size_t gap_cap = (size_t)o.streams * (size_t)o.tokens;
	double *all_gaps = malloc(gap_cap * sizeof(double));
	double *ttft = malloc((size_t)o.streams * (size_t)o.repeats * sizeof(double));
	struct bench_stream *bs = calloc((size_t)o.streams, sizeof(*bs));
	pthread_t *th = calloc((size_t)o.streams, sizeof(*th));
	if (!rates || !locals || !all_gaps || !ttft || !bs || !th)
		bench_die("out of memory");
	long n_all_gaps = 0, n_ttft = 0, total_tokens = 0;
	struct skv_client_stats stats_busy = { 0 };

	for (int r = 0; r < o.repeats; r++) {
		if (o.local)
			locals[r] = bench_local(&o);
		pthread_barrier_t start;
		pthread_barrier_init(&start, NULL, (unsigned)o.streams + 1);
		for (int i = 0; i < o.streams; i++) {
			free(bs[i].gaps);
			bs[i] = (struct bench_stream){ .o = &o, .start = &start };
			bs[i].gaps = malloc((size_t)o.tokens * sizeof(double));
			if (pthread_create(&th[i], NULL, bench_thread, &bs[i]))
				bench_die("cannot start thread %d", i);
		}
		pthread_barrier_wait(&start);
		/* Sample the daemon while the streams run. */
		struct skv_client *probe;
		char msg[256];
		if (skv_client_connect(o.socket_path, &probe, msg, sizeof(msg)) == 0) {
			usleep(100000);
			skv_client_stats(probe, &stats_busy);
			skv_client_disconnect(probe);
		}
		double t_first_req = 1e300, t_last_end = 0;
		n_all_gaps = 0;
		for (int i = 0; i < o.streams; i++) {
			pthread_join(th[i], NULL);
			if (bs[i].err)
				bench_die("stream %d: %s", i, bs[i].msg);
			t_first_req = fmin(t_first_req, bs[i].t_request);
			t_last_end = fmax(t_last_end, bs[i].t_end);
			ttft[n_ttft++] = bs[i].t_first - bs[i].t_request;
			memcpy(all_gaps + n_all_gaps, bs[i].gaps, (size_t)bs[i].n_gaps * sizeof(double));
			n_all_gaps += bs[i].n_gaps;
			total_tokens += bs[i].tokens;
		}
		long run_tokens = 0;
		for (int i = 0; i < o.streams; i++)
			run_tokens += bs[i].tokens;
		rates[r] = (double)run_tokens / (t_last_end - t_first_req);
		pthread_barrier_destroy(&start);
	}
	qsort(rates, (size_t)o.repeats, sizeof(double), bench_cmp_double);
	qsort(locals, (size_t)o.repeats, sizeof(double), bench_cmp_double);
	qsort(ttft, (size_t)n_ttft, sizeof(double), bench_cmp_double);
	qsort(all_gaps, (size_t)n_all_gaps, sizeof(double), bench_cmp_double);
	double rate = rates[o.repeats / 2];
	long rss = bench_rss_kib(getpid());
	long rss_total = rss > 0 ? rss : 0;
	for (int i = 0; i < 16; i++)
		if (stats_busy.engine_pid[i] > 0) {
			long k = bench_rss_kib(stats_busy.engine_pid[i]);
			rss_total += k > 0 ? k : 0;
		}
	if (o.json) {
		printf("{\"streams\": %d, \"tokens\": %ld, \"tokens_per_s\": %.1f, "
		       "\"ttft_p50_s\": %.6f, \"ttft_p99_s\": %.6f, \"itl_p50_s\": %.6f, "
		       "\"itl_p99_s\": %.6f, \"rss_bytes\": %ld, \"arena_used_bytes\": %llu",
		       o.streams, o.tokens, rate, bench_pct(ttft, (size_t)n_ttft, 50),
		       bench_pct(ttft, (size_t)n_ttft, 99), bench_pct(all_gaps, (size_t)n_all_gaps, 50),
		       bench_pct(all_gaps, (size_t)n_all_gaps, 99), rss_total * 1024,
		       (unsigned long long)stats_busy.arena_used_bytes);
		if (o.local)
			printf(", \"local_tokens_per_s\": %.1f", locals[o.repeats / 2]);
		printf("}\n");
	} else {
		printf("%d stream(s) x %ld tokens through %s, policy %s, median of %d\n", o.streams,
		       o.tokens, o.socket_path ? o.socket_path : "(default socket)",
		       skv_policy_name((enum skv_policy_kind)o.policy), o.repeats);
		printf("  aggregate            %10.0f tokens/s\n", rate);
		if (o.local)
			printf("  local, same process  %10.0f tokens/s (one stream, no daemon)\n",
			       locals[o.repeats / 2]);
		printf("  time to first token  p50 %8.3f ms   p99 %8.3f ms\n",
		       bench_pct(ttft, (size_t)n_ttft, 50) * 1e3, bench_pct(ttft, (size_t)n_ttft, 99) * 1e3);
		printf("  inter-token latency  p50 %8.3f ms   p99 %8.3f ms\n",
		       bench_pct(all_gaps, (size_t)n_all_gaps, 50) * 1e3,
		       bench_pct(all_gaps, (size_t)n_all_gaps, 99) * 1e3);
		printf("  arena in use         %10llu bytes (%llu streams)\n",
		       (unsigned long long)stats_busy.arena_used_bytes,
		       (unsigned long long)stats_busy.streams);
		printf("  resident memory      %10ld KiB (bench + engines)\n", rss_total);
	}
	(void)total_tokens;
	for (int i = 0; i < o.streams; i++)
		free(bs[i].gaps);
	free(bs);
	free(th);
	free(rates);
	free(locals);
	free(all_gaps);
	free(ttft);
	return 0;
}
